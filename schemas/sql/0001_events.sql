-- persona 0001: applications and their API keys, per-user event buffers.

CREATE TABLE apps (
    app_id      text PRIMARY KEY CHECK (app_id ~ '^[A-Za-z0-9._:-]{1,64}$'),
    description text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Keys are 256-bit random secrets, so a plain sha256 is a safe hash (no password stretching needed).
CREATE TABLE api_keys (
    key_id     text PRIMARY KEY,
    app_id     text NOT NULL REFERENCES apps (app_id),
    key_sha256 bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE INDEX api_keys_app ON api_keys (app_id);

-- One row per valid event, exactly once (event_id is the idempotency key). seq is the ingestion position
-- (unique by construction; no index of its own: every read of it is per user, through events_user_seq).
CREATE TABLE events (
    seq              bigint GENERATED ALWAYS AS IDENTITY,
    event_id         text NOT NULL PRIMARY KEY,
    user_id          text NOT NULL,
    app              text NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('message', 'feedback', 'preference', 'edit')),
    split            text NOT NULL CHECK (split IN ('train', 'holdout')),
    occurred_at      timestamptz NOT NULL,
    ingested_at      timestamptz NOT NULL DEFAULT now(),
    payload          jsonb NOT NULL,
    meta             jsonb,
    source_partition integer,
    source_offset    bigint
);
CREATE INDEX events_user_seq ON events (user_id, seq);

-- The per-user buffer summary, updated in the same transaction as the events it counts.
CREATE TABLE user_state (
    user_id           text PRIMARY KEY,
    pending_count     bigint NOT NULL DEFAULT 0 CHECK (pending_count >= 0),
    oldest_pending_at timestamptz,
    total_events      bigint NOT NULL DEFAULT 0,
    last_event_at     timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 85);
-- oldest_pending_at is NULL exactly when nothing is pending. Filtering the index on it (not on pending_count)
-- and leaving room in the pages lets the counter updates of every ingest batch be HOT updates.
CREATE INDEX user_state_due ON user_state (oldest_pending_at) WHERE oldest_pending_at IS NOT NULL;
