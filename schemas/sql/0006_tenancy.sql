-- persona 0006: tenancy. Keys get scopes and an expiry; operator keys (no application) exist; a user belongs to the
-- application in users.app (its owner); a forgotten user leaves a tombstone that keeps the forget final.

-- Keys issued before this migration could only post events: they keep exactly that.
ALTER TABLE api_keys
    ADD COLUMN scopes      text[] NOT NULL DEFAULT '{ingest}',
    ADD COLUMN expires_at  timestamptz,
    ADD COLUMN description text NOT NULL DEFAULT '',
    ALTER COLUMN app_id DROP NOT NULL;   -- NULL: an operator key (every application, operator actions)
ALTER TABLE api_keys ALTER COLUMN scopes DROP DEFAULT;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_scopes
    CHECK (scopes <@ ARRAY['ingest', 'serve', 'admin']::text[] AND cardinality(scopes) > 0);
ALTER TABLE api_keys ADD CONSTRAINT api_keys_operator_admin
    CHECK (app_id IS NOT NULL OR scopes = ARRAY['admin']::text[]);

-- One row per forgotten user id, keyed by the sha256 of the id (the tombstone does not keep the id itself).
-- Events of that id that occurred at or before forgotten_at are dropped wherever they arrive (ingest API, consumer),
-- and a training or gate that started before it writes nothing. A later forget of the same id moves forgotten_at.
CREATE TABLE tombstones (
    user_sha256  bytea PRIMARY KEY CHECK (length(user_sha256) = 32),
    app          text NOT NULL,          -- the owner when it was forgotten (not personal data)
    forgotten_at timestamptz NOT NULL DEFAULT now(),
    actor        text NOT NULL
);

-- '.' and '..' are path segments: no object store key can hold them (events are validated the same way).
-- NOT VALID: a database that already holds such a user keeps it until `persona forget` removes it.
ALTER TABLE users ADD CONSTRAINT users_id_not_dots CHECK (user_id !~ '^\.+$') NOT VALID;
