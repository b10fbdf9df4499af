-- persona 0007: when a training's plan was made. A forget that lands after it makes the training write nothing
-- (the candidate write checks the user's tombstone against it, in the write's transaction). A takeover keeps it.
-- Plans made before this migration get it on their next takeover (now(), later than the truth: still before any
-- forget that can reach them, since a forget deletes the plan with the user's buffer row).

ALTER TABLE user_state ADD COLUMN lease_planned_at timestamptz;
