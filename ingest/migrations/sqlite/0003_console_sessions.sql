-- Console sign-ins (SPEC §13): see the PostgreSQL migration of the same name. expires_at is in
-- microseconds since the Unix epoch, like every time in this database.
CREATE TABLE console_sessions (
    id_sha256    TEXT    PRIMARY KEY,
    token_sha256 TEXT    NOT NULL,
    csrf         TEXT    NOT NULL,
    expires_at   INTEGER NOT NULL
);
CREATE INDEX console_sessions_expires ON console_sessions (expires_at);
