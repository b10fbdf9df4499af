-- persona 0009: the operator console (`persona console`). An audit row per operator action taken there (who, what,
-- on which user and revision, how it ended), and the indexes of its users list: keyset pages by user id within a
-- status, and by last event / last promotion.

CREATE TABLE operator_audit (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,                 -- the principal: operator/key:KID or app:APP/key:KID
    action      text NOT NULL CHECK (action IN ('login', 'promote', 'rollback', 'forget')),
    user_id     text,                          -- NULL once the user is forgotten (the id is personal data)
    user_sha256 bytea CHECK (user_sha256 IS NULL OR length(user_sha256) = 32),
    revision_id text,
    outcome     text NOT NULL CHECK (outcome IN ('ok', 'refused', 'error')),
    message     text NOT NULL DEFAULT ''
);
CREATE INDEX operator_audit_user ON operator_audit (user_id, id) WHERE user_id IS NOT NULL;

-- Users list by id, in the "C" collation whatever the database's (ids are ASCII; a prefix is then an index range).
CREATE INDEX users_id_c ON users ((user_id COLLATE "C"));
-- Users list: "sort by last event" and "sort by last promotion" walk these in order (keyset on (time, user_id)).
CREATE INDEX user_state_last_event ON user_state (last_event_at, user_id) WHERE last_event_at IS NOT NULL;
CREATE INDEX aliases_updated ON aliases (updated_at, user_id);
-- Users list by a status few users have, in id order: a candidate waiting for the gate, a rejected decision, a
-- training plan (running or failing).
CREATE INDEX revisions_candidates ON revisions ((user_id COLLATE "C")) WHERE status = 'candidate';
CREATE INDEX decisions_rejected ON decisions ((user_id COLLATE "C")) WHERE outcome = 'rejected';
CREATE INDEX user_state_planned ON user_state ((user_id COLLATE "C")) WHERE lease_revision_id IS NOT NULL;
