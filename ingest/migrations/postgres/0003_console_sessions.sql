-- Console sign-ins (SPEC §13). The browser's cookie holds a random session id; only its SHA-256
-- is kept here, with the SHA-256 of the token it was opened with (removing that token from the
-- tokens file ends its sessions), the session's CSRF token and when it expires. Every replica
-- reads the same table, so a sign-in holds whichever replica a request reaches.
CREATE TABLE console_sessions (
    id_sha256    text        PRIMARY KEY,
    token_sha256 text        NOT NULL,
    csrf         text        NOT NULL,
    expires_at   timestamptz NOT NULL
);
CREATE INDEX console_sessions_expires ON console_sessions (expires_at);
