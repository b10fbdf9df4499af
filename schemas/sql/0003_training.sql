-- persona 0003: continual training: which revision consumed an event, the scheduler's queue mark, and the per-user
-- training lease (one training of a user at a time; a dead worker's lease expires and its job is taken over).

ALTER TABLE events ADD COLUMN consumed_by text;   -- the revision whose training first read the event
CREATE INDEX events_user_pending ON events (user_id, seq) WHERE consumed_by IS NULL;

ALTER TABLE user_state
    ADD COLUMN last_trained_at    timestamptz,
    ADD COLUMN queued_at          timestamptz,     -- set by the scheduler when it enqueues a training
    ADD COLUMN lease_owner        text,            -- the task that trains the user now
    ADD COLUMN lease_expires_at   timestamptz,
    ADD COLUMN lease_revision_id  text,            -- the revision that training will write (kept on takeover)
    ADD COLUMN lease_parent_id    text,            -- its parent: the production revision when planned
    ADD COLUMN lease_snapshot_seq bigint;          -- it trains on events up to this ingestion position

CREATE INDEX user_state_busy ON user_state (queued_at) WHERE queued_at IS NOT NULL OR lease_expires_at IS NOT NULL;
