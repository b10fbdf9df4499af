"""The request bodies of the serving API and their bounds.

Static bounds (types, ranges) are pydantic's; the configured ones (`pipeline.config.ServingSettings`: stop strings,
messages, max_tokens, the context) are checked by the functions here, before any adapter is acquired or a stream
starts, so a bad request gets its 4xx JSON error and never a 200 with an empty or broken body. OpenAI fields this
server does not implement are accepted and ignored (``user``, ``logprobs``, ...), except ``n`` > 1, which is refused.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from pipeline.config import ServingSettings
from pipeline.domain.errors import InvalidInput

_INT64 = 2**63


class ContextLengthExceeded(InvalidInput):
    """The prompt (plus the tokens asked for) does not fit the model's context."""

    code = "context_length_exceeded"


class RequestTooLarge(InvalidInput):
    """The request body is larger than the configured limit."""

    http_status = 413
    code = "request_too_large"


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``: ``include_usage`` adds a last event with the token counts (empty ``choices``)."""

    include_usage: bool = False


class _Sampling(BaseModel):
    """The sampling parameters both completion endpoints take (OpenAI's names and meanings)."""

    #: max_tokens of a request that names none (before the configured maximum and the context cap it).
    DEFAULT_MAX_TOKENS: ClassVar[int] = 16

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-_INT64, le=_INT64 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        # OpenAI clients may send an explicit null for an optional parameter: it means "the default".
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in ("temperature", "top_p", "n", "stream"))}
        return data

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def requested_tokens(self) -> int | None:
        """The max_tokens the client asked for, or None."""
        return self.max_tokens


class CompletionBody(_Sampling):
    prompt: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str


class ChatBody(_Sampling):
    DEFAULT_MAX_TOKENS: ClassVar[int] = 64

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def rendered_messages(self) -> list[dict[str, str]]:
        """The messages for the chat template (``developer`` is OpenAI's newer name for ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in self.messages]


class ScoreBody(BaseModel):
    model: str
    text: str = Field(min_length=1)
    prompt: str | None = None


def check_sampling(body: _Sampling, cfg: ServingSettings) -> None:
    """The configured bounds of a completion or chat body (InvalidInput names the field and what is allowed)."""
    if body.n != 1:
        raise InvalidInput(f"n must be 1 (one choice per request here), got {body.n}", param="n")
    stops = body.stops()
    if len(stops) > cfg.max_stop:
        raise InvalidInput(f"stop has {len(stops)} strings; at most {cfg.max_stop} are allowed", param="stop")
    for s in stops:
        if len(s) > cfg.max_stop_chars:
            raise InvalidInput(
                f"a stop string has {len(s)} characters; at most {cfg.max_stop_chars} are allowed", param="stop"
            )
    requested = body.requested_tokens()
    if requested is not None and requested > cfg.max_tokens:
        raise InvalidInput(
            f"max_tokens is {requested}; this server generates at most {cfg.max_tokens} tokens per request",
            param="max_tokens",
        )
    if isinstance(body, ChatBody) and len(body.messages) > cfg.max_messages:
        raise InvalidInput(
            f"messages has {len(body.messages)} entries; at most {cfg.max_messages} are allowed", param="messages"
        )


def completion_budget(body: _Sampling, prompt_tokens: int, context: int, cfg: ServingSettings) -> int:
    """The max_tokens to generate: the one asked for, if prompt + it fits ``context``; else the default, capped by
    the configured maximum and by what is left of the context. ContextLengthExceeded when nothing fits."""
    param = "messages" if isinstance(body, ChatBody) else "prompt"
    requested = body.requested_tokens()
    room = context - prompt_tokens
    if requested is None and room >= 1:
        return min(body.DEFAULT_MAX_TOKENS, cfg.max_tokens, room)
    asked = requested if requested is not None else 1
    if prompt_tokens + asked > context:
        raise ContextLengthExceeded(
            f"this model's maximum context length is {context} tokens; this request needs {prompt_tokens + asked} "
            f"({prompt_tokens} in the {param}, {asked} for the completion): shorten the {param} or max_tokens",
            param=param,
        )
    return asked


def check_score_length(prompt_tokens: int, text_tokens: int, context: int) -> None:
    """The scored input (prompt + text) must fit the model's context."""
    if prompt_tokens + text_tokens > context:
        raise ContextLengthExceeded(
            f"this model's maximum context length is {context} tokens; the input has {prompt_tokens + text_tokens} "
            f"({prompt_tokens} of prompt, {text_tokens} of text): shorten the text or the prompt",
            param="text",
        )
