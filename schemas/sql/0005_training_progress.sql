-- persona 0005: how far a running training is, written with each lease renewal (one statement per batch), so
-- operators and the demo see progress from the database instead of a worker's log.

ALTER TABLE user_state
    ADD COLUMN lease_step      integer,       -- optimizer steps the lease holder has made (NULL: none yet)
    ADD COLUMN lease_max_steps integer,       -- its upper bound of steps
    ADD COLUMN lease_loss      real;          -- its last training loss
