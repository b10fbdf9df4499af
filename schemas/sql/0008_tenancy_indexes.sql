-- persona 0008: the reads tenancy added. A serving worker lists an application's users with a production revision
-- (GET /v1/models: users by owner), and at start checks its disk copies against the registry (revisions by sha256).

CREATE INDEX users_app ON users (app, user_id);
CREATE INDEX revisions_sha256 ON revisions (sha256);
