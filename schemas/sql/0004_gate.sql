-- persona 0004: gate decisions. One decision per candidate revision, with every rule's inputs and outcome, so a
-- decision can be explained and replayed under other rules.

CREATE TABLE decisions (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    revision_id         text NOT NULL UNIQUE REFERENCES revisions (revision_id),
    user_id             text NOT NULL,
    app                 text NOT NULL,
    current_revision_id text,                        -- production when the candidate was judged
    outcome             text NOT NULL CHECK (outcome IN ('promoted', 'rejected', 'stale')),
    passed              boolean NOT NULL,            -- what the rules said (a stale candidate may have passed)
    reason              text NOT NULL,               -- one line
    metrics             jsonb NOT NULL,              -- candidate, current, base and evidence
    results             jsonb NOT NULL,              -- the decision: each rule's inputs and outcome
    rules_digest        text NOT NULL,
    rules_source        text NOT NULL,
    decided_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX decisions_user ON decisions (user_id, decided_at);
CREATE INDEX decisions_at ON decisions (decided_at);
