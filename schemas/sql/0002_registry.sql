-- persona 0002: the adapter registry: users (identity), revisions (immutable), the production alias and its
-- append-only history. Every per-user lookup goes through an index that starts with user_id.

CREATE TABLE users (
    user_id    text PRIMARY KEY CHECK (user_id ~ '^[A-Za-z0-9._:@-]{1,128}$'),
    app        text NOT NULL,                      -- the application that sent the user's first event
    labels     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Users that already have events get their identity row from their first event.
INSERT INTO users (user_id, app, created_at)
SELECT DISTINCT ON (user_id) user_id, app, ingested_at FROM events ORDER BY user_id, seq
ON CONFLICT DO NOTHING;

CREATE TABLE revisions (
    revision_id text PRIMARY KEY CHECK (revision_id ~ '^[0-7][0-9A-HJKMNP-TV-Z]{25}$'),   -- a ULID
    user_id     text NOT NULL REFERENCES users (user_id),
    parent_id   text REFERENCES revisions (revision_id),
    status      text NOT NULL DEFAULT 'candidate'
                CHECK (status IN ('candidate', 'promoted', 'rejected', 'retired')),
    artifact_uri text NOT NULL,
    sha256      text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size_bytes  bigint NOT NULL CHECK (size_bytes > 0),
    manifest    jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    status_at   timestamptz NOT NULL DEFAULT now(),
    -- (revision_id, user_id) is unique because revision_id is; declared so that foreign keys can name the pair.
    CONSTRAINT revisions_id_user UNIQUE (revision_id, user_id)
);
-- A parent is always a revision of the same user.
ALTER TABLE revisions ADD CONSTRAINT revisions_parent_same_user
    FOREIGN KEY (parent_id, user_id) REFERENCES revisions (revision_id, user_id);
CREATE INDEX revisions_user_created ON revisions (user_id, created_at);

-- A revision is immutable once written: only its status (and when it changed) may be updated.
CREATE FUNCTION revisions_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.revision_id, NEW.user_id, NEW.parent_id, NEW.artifact_uri, NEW.sha256, NEW.size_bytes, NEW.manifest,
        NEW.created_at)
       IS DISTINCT FROM
       (OLD.revision_id, OLD.user_id, OLD.parent_id, OLD.artifact_uri, OLD.sha256, OLD.size_bytes, OLD.manifest,
        OLD.created_at) THEN
        RAISE EXCEPTION 'revision % is immutable: only its status may change', OLD.revision_id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER revisions_immutable BEFORE UPDATE ON revisions
    FOR EACH ROW EXECUTE FUNCTION revisions_immutable();

-- The production alias: which revision serves the user. Moved only by compare-and-swap.
CREATE TABLE aliases (
    user_id     text NOT NULL REFERENCES users (user_id),
    alias       text NOT NULL CHECK (alias IN ('production')),
    revision_id text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, alias),
    FOREIGN KEY (revision_id, user_id) REFERENCES revisions (revision_id, user_id)
);

-- Append-only history of every alias move.
CREATE TABLE alias_history (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id       text NOT NULL,
    alias         text NOT NULL,
    from_revision text,
    to_revision   text NOT NULL,
    reason        text NOT NULL,
    actor         text NOT NULL,
    at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX alias_history_user ON alias_history (user_id, alias, id);

CREATE FUNCTION alias_history_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'alias_history is append-only' USING ERRCODE = 'check_violation';
END $$;
CREATE TRIGGER alias_history_append_only BEFORE UPDATE ON alias_history
    FOR EACH ROW EXECUTE FUNCTION alias_history_append_only();
