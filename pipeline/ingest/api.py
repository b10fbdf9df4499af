"""HTTP ingest API: ``POST /v1/events`` (a JSON array of interaction.v1 events), ``/healthz``, ``/metrics``.

Authentication: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` with an application key that has the
``ingest`` scope (``persona apps keys create``; 401 without a valid key, 403 without the scope). Every event's
``app`` must be the authenticated application (``app_mismatch``), and its user must be that application's or new
(``foreign_user``: a user belongs to the application of its first stored event). The answer is 202 with a result
per event (by index): ``accepted``; ``rejected`` with machine-readable reasons; or ``dropped`` (reason
``forgotten``) for an event of a forgotten user that occurred at or before the forget (it is not stored). Only
accepted events are produced to Kafka, and 202 is sent only after the broker acknowledged all of them; on a
broker failure the answer is 503 and the whole request may be retried as is (event_id makes it idempotent).
Errors have the OpenAI-style shape ``{"error": {"type", "code", "message", "param"}}``.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.config import SCHEMAS_DIR, DatabaseSettings, EventSettings, IngestSettings, KafkaSettings
from pipeline.domain.apikeys import Principal
from pipeline.domain.errors import PersonaError, Unauthorized, body_of, error_body
from pipeline.domain.events import Event, Reason, Rejected, validate
from pipeline.ingest.producer import EventProducer, ProducerError
from pipeline.observability import metrics
from pipeline.storage import apps as app_store
from pipeline.storage import tenancy
from pipeline.storage.db import Database

log = logging.getLogger(__name__)


class MissingApiKey(Unauthorized):
    """The request carries no application key."""

    code = "missing_api_key"


def _error(status: int, code: str, message: str, param: str | None = None, **headers: str) -> JSONResponse:
    metrics.INGEST_REQUESTS.labels(str(status)).inc()
    return JSONResponse(error_body(status, code, message, param), status_code=status, headers=headers or None)


def _rejected(ev: Event, field: str, code: str, message: str) -> Rejected:
    return Rejected((Reason(field, code, message),), event_id=ev.event_id, user_id=ev.user_id)


def _api_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def create_app(
    ingest: IngestSettings | None = None,
    kafka: KafkaSettings | None = None,
    database: DatabaseSettings | None = None,
    events: EventSettings | None = None,
) -> FastAPI:
    """The ingest ASGI application; its producer and DB pool open at startup and close at shutdown."""
    cfg = ingest or IngestSettings()
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["db"] = Database(database or DatabaseSettings(), name="persona-ingest", wait=False)
        # Built at the first request and rebuilt after a broker failure, so the API starts and heals without it.
        state["producer"] = EventProducer(
            kafka,
            events,
            connect=False,
            rebuild_interval_s=cfg.producer_rebuild_interval_s,
            max_block_s=cfg.produce_timeout_s,
        )
        try:
            yield
        finally:
            state["producer"].close()
            state["db"].close()

    app = FastAPI(title="persona ingest", version="1", lifespan=lifespan)

    @app.exception_handler(PersonaError)
    async def persona_error(_: Request, e: PersonaError) -> JSONResponse:
        # e.g. StorageError (503) when PostgreSQL does not answer while authenticating
        metrics.INGEST_REQUESTS.labels(str(e.http_status)).inc()
        headers = {"Retry-After": str(math.ceil(e.retry_after_s))} if e.retry_after_s else None
        if e.http_status >= 500:
            log.warning("answering %d %s: %s", e.http_status, e.code, e)
        return JSONResponse(body_of(e), status_code=e.http_status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        # Routing errors (an unknown path, a wrong method) in the same shape as every other error.
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return _error(e.status_code, code, str(e.detail))

    @app.exception_handler(Exception)
    async def bug(_: Request, e: Exception) -> JSONResponse:
        # Not raised on purpose: a bug. Answered 500 in the usual shape; Starlette logs the traceback.
        return _error(500, "internal_error", "internal error; see the ingest API's log")

    def authenticate(key: str) -> Principal | None:
        database: Database = state["db"]
        with database.connection() as conn:
            return app_store.authenticate(conn, key)

    def tenancy_of(user_ids: list[str]) -> tuple[dict[str, str], dict[str, datetime]]:
        """(owner app of the users that exist, forgotten_at of the users that have a tombstone)."""
        database: Database = state["db"]
        with database.connection() as conn:
            return tenancy.owners(conn, user_ids), tenancy.forgotten_since(conn, user_ids)

    @app.post(
        "/v1/events",
        status_code=202,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": events_body_schema(cfg.max_events)}},
            }
        },
    )
    async def post_events(request: Request) -> Response:
        started = time.perf_counter()
        key = _api_key(request)
        if not key:
            raise MissingApiKey("send the application's key as 'Authorization: Bearer <key>'")
        principal = await run_in_threadpool(authenticate, key)
        if principal is None:
            raise Unauthorized("the API key is unknown, revoked or expired")
        principal.require("ingest")
        app_id = principal.app_id

        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_body_bytes:
            return _error(413, "body_too_large", f"the body is {length} bytes, at most {cfg.max_body_bytes} allowed")
        body = bytearray()
        async for chunk in request.stream():  # bounded even without (or with a lying) Content-Length
            body += chunk
            if len(body) > cfg.max_body_bytes:
                return _error(413, "body_too_large", f"the body exceeds {cfg.max_body_bytes} bytes")
        try:
            items = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            return _error(400, "invalid_json", f"the body is not valid JSON: {e}")
        if not isinstance(items, list):
            return _error(400, "not_an_array", f"the body must be a JSON array of events, got {type(items).__name__}")
        if not items:
            return _error(400, "empty_batch", "the body is an empty array; send 1 or more events")
        if len(items) > cfg.max_events:
            return _error(
                413, "too_many_events", f"{len(items)} events in one request, at most {cfg.max_events}", param="body"
            )

        producer: EventProducer = state["producer"]
        checked: list[Event | Rejected] = []
        for i, obj in enumerate(items):
            try:
                ev = validate(obj, producer.limits)
            except Exception as e:  # a bug on some input: that event is refused, the request still answers
                log.exception("unexpected error validating event %d", i)
                ev = Rejected((Reason("", "internal_error", f"{type(e).__name__} while validating the event"),))
            if isinstance(ev, Event) and ev.app != app_id:
                ev = _rejected(
                    ev, "app", "app_mismatch", f"app {ev.app!r} is not the authenticated application {app_id!r}"
                )
            checked.append(ev)
        users = sorted({ev.user_id for ev in checked if isinstance(ev, Event)})
        owners, forgotten = await run_in_threadpool(tenancy_of, users) if users else ({}, {})

        results: list[dict[str, Any]] = []
        accepted: list[tuple[int, Event]] = []
        n_dropped = 0
        for i, ev in enumerate(checked):
            if isinstance(ev, Event) and owners.get(ev.user_id, app_id) != app_id:
                ev = _rejected(
                    ev,
                    "user_id",
                    "foreign_user",
                    f"user {ev.user_id!r} belongs to another application; an application sends events of its own "
                    "users only (user ids are unique across applications: prefix yours, e.g. 'myapp:42')",
                )
                metrics.FOREIGN_EVENTS.labels("api").inc()
            if isinstance(ev, Rejected):
                results.append(
                    {
                        "index": i,
                        "event_id": ev.event_id,
                        "status": "rejected",
                        "reasons": [r.as_dict() for r in ev.reasons],
                    }
                )
                for r in ev.reasons:
                    metrics.INGEST_REJECTIONS.labels(r.code).inc()
            elif (at := forgotten.get(ev.user_id)) is not None and ev.occurred_at <= at:
                n_dropped += 1
                reason = Reason(
                    "occurred_at",
                    "forgotten",
                    f"user {ev.user_id!r} was forgotten at {at.isoformat()}; events that occurred before are dropped",
                )
                results.append(
                    {"index": i, "event_id": ev.event_id, "status": "dropped", "reasons": [reason.as_dict()]}
                )
            else:
                accepted.append((i, ev))
                results.append({"index": i, "event_id": ev.event_id, "status": "accepted"})
        if n_dropped:
            metrics.FORGOTTEN_EVENTS_DROPPED.labels("api").inc(n_dropped)
        try:
            await run_in_threadpool(producer.produce_valid, accepted, timeout_s=cfg.produce_timeout_s)
        except ProducerError as e:
            log.error("broker failure, answering 503: %s", e)
            return _error(
                503,
                "broker_unavailable",
                "the event broker did not acknowledge the events; retry the "
                "same request (event_id makes it idempotent)",
                **{"Retry-After": str(math.ceil(e.retry_after_s or 1))},
            )
        n_rej = len(items) - len(accepted) - n_dropped
        metrics.INGEST_EVENTS.labels("accepted").inc(len(accepted))
        metrics.INGEST_EVENTS.labels("rejected").inc(n_rej)
        metrics.INGEST_EVENTS.labels("dropped").inc(n_dropped)
        metrics.INGEST_REQUESTS.labels("202").inc()
        metrics.INGEST_REQUEST_SECONDS.observe(time.perf_counter() - started)
        return Response(
            orjson.dumps({"accepted": len(accepted), "rejected": n_rej, "dropped": n_dropped, "results": results}),
            status_code=202,
            media_type="application/json",
        )

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        """Each dependency: ``ok`` or why not. 503 when one is down."""
        checks: dict[str, str] = {}
        try:
            state["db"].ping()
            checks["database"] = "ok"
        except Exception as e:
            checks["database"] = f"down: {e}"
        checks["broker"] = _broker_health(state["producer"], (kafka or KafkaSettings()).servers)
        healthy = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ok" if healthy else "unhealthy", **checks}, status_code=200 if healthy else 503
        )

    @app.get("/metrics")
    def prom() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def events_body_schema(max_events: int) -> dict[str, Any]:
    """The body of POST /v1/events for the OpenAPI document: an array of interaction.v1 events (the schema file,
    with its ``$defs`` inlined so that it stands alone inside the OpenAPI document)."""
    schema = orjson.loads((SCHEMAS_DIR / "events" / "interaction.v1.json").read_bytes())
    defs = schema.pop("$defs", {})
    for name in ("$schema", "$id"):
        schema.pop(name, None)

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"type": "array", "minItems": 1, "maxItems": max_events, "items": inline(schema)}


def _broker_health(producer: EventProducer, servers: list[str], timeout_s: float = 1.0) -> str:
    """``ok`` when a bootstrap server accepts a connection and the last produce (if any failed) has been followed
    by an acknowledged one; else what is wrong."""
    errors = []
    for server in servers:
        host, _, port = server.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
                break
        except (OSError, ValueError) as e:
            errors.append(f"{server}: {e}")
    else:
        return "down: no bootstrap server accepts connections (" + "; ".join(errors) + ")"
    if producer.last_error is not None:
        return f"failing: {producer.last_error}"
    return "ok"


def serve(
    ingest: IngestSettings | None = None,
    database: DatabaseSettings | None = None,
    kafka: KafkaSettings | None = None,
    events: EventSettings | None = None,
) -> None:
    """Run the ingest API with uvicorn until interrupted."""
    import uvicorn

    cfg = ingest or IngestSettings()
    app = create_app(cfg, kafka, database, events)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", access_log=False)
