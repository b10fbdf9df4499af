"""Every Prometheus metric of persona, in one place (prefix ``persona_``, units in names)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# --- ingest API -------------------------------------------------------------------------------------------------
INGEST_REQUESTS = Counter("persona_ingest_requests_total", "POST /v1/events requests by HTTP status.", ["status"])
INGEST_EVENTS = Counter(
    "persona_ingest_events_total",
    "Events received by the ingest API, by result (accepted/rejected/dropped: a forgotten user's).",
    ["result"],
)
INGEST_REJECTIONS = Counter(
    "persona_ingest_rejections_total", "Reasons of events rejected by the ingest API, by reason code.", ["code"]
)
INGEST_REQUEST_SECONDS = Histogram(
    "persona_ingest_request_seconds",
    "Seconds to answer POST /v1/events (validation and broker acknowledgement included).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

INGEST_PRODUCER_REBUILDS = Counter(
    "persona_ingest_producer_rebuilds_total",
    "Broker clients of the ingest API rebuilt after a failed produce, by outcome (built/failed).",
    ["outcome"],
)
INGEST_BROKER_UP = Gauge(
    "persona_ingest_broker_up", "1 when the ingest API's last produce was acknowledged (or none failed yet), else 0."
)

# --- producer SDK -----------------------------------------------------------------------------------------------
PRODUCER_EVENTS = Counter(
    "persona_producer_events_total", "Events sent to Kafka by the producer SDK, by result.", ["result"]
)

# --- buffer consumer ----------------------------------------------------------------------------------------------
BUFFER_EVENTS = Counter(
    "persona_buffer_events_total", "Events newly written to the per-user buffers, by kind.", ["kind"]
)
BUFFER_DUPLICATES = Counter(
    "persona_buffer_duplicates_total", "Valid records skipped because their event_id was already buffered."
)
BUFFER_REJECTED = Counter(
    "persona_buffer_rejected_total", "Records sent to the dead-letter topic, by first reason code.", ["reason"]
)
BUFFER_BATCH_SECONDS = Histogram(
    "persona_buffer_batch_seconds",
    "Seconds to process one poll batch: validation, DLQ, DB transaction and offset commit.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BUFFER_BATCH_RECORDS = Histogram(
    "persona_buffer_batch_records",
    "Records in one poll batch.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
)
BUFFER_RETRIES = Counter(
    "persona_buffer_retries_total",
    "Operations of the buffer consumer retried after a transient error, by dependency (kafka/database) and "
    "operation (connect, poll, write, dead_letter, commit; `stall`: a call that had not come back after "
    "PERSONA_CONSUMER_STALL_REPORT_S, counted once a stall; `reconnect`: a new Kafka client after the group "
    "coordinator stayed unknown for PERSONA_CONSUMER_COORDINATOR_LOST_S).",
    ["dependency", "operation"],
)
FORGOTTEN_EVENTS_DROPPED = Counter(
    "persona_forgotten_events_dropped_total",
    "Events of a forgotten user that occurred at or before the forget, dropped on arrival, by path (api, consumer).",
    ["path"],
)
FOREIGN_EVENTS = Counter(
    "persona_foreign_events_total",
    "Events for a user that another application owns, rejected, by path (api, consumer).",
    ["path"],
)
BUFFER_ID_CONFLICTS = Counter(
    "persona_buffer_id_conflicts_total",
    "Records whose event_id was already buffered with different content (dead-lettered as id_conflict).",
)
BUFFER_DLQ_TRUNCATED = Counter(
    "persona_buffer_dlq_truncated_total", "Dead-letter records whose value was truncated to fit the broker's limit."
)
BUFFER_LAST_COMMIT = Gauge(
    "persona_buffer_last_commit_timestamp_seconds", "Unix time of the buffer consumer's last offset commit."
)

# --- training -----------------------------------------------------------------------------------------------------
TRAINING_SECONDS = Histogram(
    "persona_training_seconds",
    "Seconds of one user's retrain (examples, training and writing the revision).",
    buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
TRAINING_TOKENS_PER_SECOND = Gauge(
    "persona_training_tokens_per_second", "Target tokens per second of the last retrain of this worker."
)
TRAINING_FINAL_LOSS = Gauge("persona_training_final_loss", "Final training loss of the last retrain of this worker.")
TRAINING_OUTCOMES = Counter(
    "persona_training_outcomes_total",
    "Retrain tasks by outcome (trained, resumed, nothing_to_do, no_examples, busy, failed).",
    ["outcome"],
)
BUFFER_PENDING = Gauge(
    "persona_buffer_pending_events", "Events buffered and not yet trained on, all users (set by the scheduler)."
)
BUFFER_OLDEST_PENDING_AGE = Gauge(
    "persona_buffer_oldest_pending_age_seconds",
    "Age of the oldest event not yet trained on, all users (0 when none; set by the scheduler).",
)
SCHEDULER_ENQUEUED = Counter("persona_scheduler_enqueued_total", "Users the scheduler enqueued for a retrain.")
QUEUE_DEPTH = Gauge("persona_queue_depth", "Tasks waiting in a Celery queue (Redis list length).", ["queue"])

# --- evaluation gate ----------------------------------------------------------------------------------------------
GATE_DECISIONS = Counter(
    "persona_gate_decisions_total", "Gate decisions by outcome (promoted, rejected, stale).", ["outcome"]
)
GATE_RULE_OUTCOMES = Counter(
    "persona_gate_rule_outcomes_total",
    "Outcomes of each gating rule (pass, fail, skip, missing_reject).",
    ["rule", "outcome"],
)
GATE_ROWS_REUSED = Counter(
    "persona_gate_rows_reused_total",
    "Rows of the batched gate taken from the serving revision's own gate (its and the base's) instead of run again.",
)
GATE_SECONDS = Histogram(
    "persona_gate_seconds",
    "Seconds to judge one candidate (metrics of candidate, current and base).",
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
PROMOTIONS = Counter("persona_promotions_total", "Production alias moves announced, by reason.", ["reason"])

# --- serving: requests ----------------------------------------------------------------------------------------------
SERVING_REQUESTS = Counter(
    "persona_serving_requests_total", "Serving API requests, by endpoint and HTTP status.", ["endpoint", "status"]
)
SERVING_REQUEST_SECONDS = Histogram(
    "persona_serving_request_seconds",
    "Seconds from a serving request's arrival to its last byte (the whole stream, when streaming), by endpoint.",
    ["endpoint"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120),
)
SERVING_TOKENS = Counter(
    "persona_serving_tokens_total", "Tokens of finished generations, by kind (prompt | completion).", ["kind"]
)

SERVING_ENGINE_SECONDS = Counter(
    "persona_serving_engine_seconds_total",
    "Wall seconds of a serving worker's engine thread, by phase: step (one whole step), deliver (handing its "
    "tokens to their streams), idle (no work): together the thread's time. The fast engine splits step further: "
    "plan (planning a step, its inputs to the device), wait (for the GPU to finish a step), finish (reading it "
    "back, per-token bookkeeping); the rest of step is launching. A wait for the GIL counts in the phase it "
    "interrupts.",
    ["phase"],
)
SERVING_ENGINE_STEPS = Counter("persona_serving_engine_steps_total", "Engine steps a serving worker ran.")
SERVING_ADMISSION_WAITING = Gauge(
    "persona_serving_admission_waiting",
    "Generation requests waiting for a turn before the engine's queue (a worker keeps at most "
    "PERSONA_SERVE_MAX_BATCH + PERSONA_SERVE_MAX_QUEUED started; the rest wait holding no adapter slot).",
)
SERVING_ADMISSION_WAIT_SECONDS = Histogram(
    "persona_serving_admission_wait_seconds",
    "Seconds a generation request waited for its turn before the engine's queue (only those that waited).",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
SERVING_OVERLOADED = Counter(
    "persona_serving_overloaded_total",
    "Generation requests refused (429 overloaded) after waiting PERSONA_SERVE_QUEUE_TIMEOUT_S for their turn.",
)

# --- serving: adapter cache ---------------------------------------------------------------------------------------
# tier: slot (device slots), host (CPU tensors), disk (local copies), store (object store fetches).
ADAPTER_CACHE_HITS = Counter(
    "persona_adapter_cache_hits_total", "Adapter lookups answered by a cache tier, by tier.", ["tier"]
)
ADAPTER_CACHE_MISSES = Counter(
    "persona_adapter_cache_misses_total",
    "Adapter lookups a cache tier could not answer (store: the object does not exist), by tier.",
    ["tier"],
)
ADAPTER_LOAD_SECONDS = Histogram(
    "persona_adapter_load_seconds",
    "Seconds to bring one adapter into a tier from the one below (store: fetch + verify; disk: read + verify; "
    "host: parse + limit checks + pack into the engine's slot layout; slot: copy of the packed adapter into a slot).",
    ["tier"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ADAPTER_CACHE_RESIDENT = Gauge("persona_adapter_cache_resident", "Adapters resident in a cache tier.", ["tier"])
ADAPTER_CACHE_RESIDENT_BYTES = Gauge(
    "persona_adapter_cache_resident_bytes", "Bytes of the adapters resident in a cache tier.", ["tier"]
)
ADAPTER_CACHE_EVICTIONS = Counter(
    "persona_adapter_cache_evictions_total", "Adapters evicted from a cache tier to make room, by tier.", ["tier"]
)

# --- serving: API keys --------------------------------------------------------------------------------------------
SERVING_KEY_LOOKUPS = Counter(
    "persona_serving_key_lookups_total",
    "API key verifications of the serving API, by where the answer came from (cache | database).",
    ["source"],
)
SERVING_AUTH_REFUSALS = Counter(
    "persona_serving_auth_refusals_total",
    "Serving API requests refused before any work, by reason (missing_key | invalid_key | insufficient_scope).",
    ["reason"],
)

# --- forget is final ------------------------------------------------------------------------------------------------
# stage: training (found at a lease renewal), candidate (the candidate write), gate (the decision), publish (a
# production pointer written as the user was forgotten, deleted again).
FORGOTTEN_WRITES_DROPPED = Counter(
    "persona_forgotten_writes_dropped_total",
    "Writes dropped because their user was forgotten while the work ran, by stage.",
    ["stage"],
)
FORGETS = Counter("persona_forgets_total", "Forgets run, by whether persona held the user (held | unknown).", ["held"])
