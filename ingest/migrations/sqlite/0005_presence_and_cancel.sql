-- Fleet presence and operator cancel: see the PostgreSQL migration of the same name. SQLite
-- cannot change a CHECK constraint in place, so execution_results is rebuilt with 'cancelled'
-- among its statuses and the cancel columns, rows copied as they are.
CREATE TABLE execution_results_new (
    result_id            TEXT    PRIMARY KEY NOT NULL,
    request_id           TEXT    NOT NULL,
    exec_id              TEXT    NOT NULL,
    pc_id                TEXT    NOT NULL,
    manifest_id          TEXT    NOT NULL,
    version              TEXT    NOT NULL,
    timeout_secs         INTEGER,
    status               TEXT    CHECK (status IN ('succeeded', 'failed', 'timed_out', 'killed', 'spawn_failed', 'interrupted', 'cancelled')),
    exit_code            INTEGER,
    stdout               TEXT,
    stderr               TEXT,
    stdout_dropped_bytes INTEGER,
    stderr_dropped_bytes INTEGER,
    started_at           INTEGER NOT NULL,
    finished_at          INTEGER,
    received_at          INTEGER NOT NULL,
    trace_id             TEXT,
    cancel_requested_at  INTEGER,
    cancel_reason        TEXT,
    cancel_requested_by  TEXT
) WITHOUT ROWID;
INSERT INTO execution_results_new (result_id, request_id, exec_id, pc_id, manifest_id, version,
    timeout_secs, status, exit_code, stdout, stderr, stdout_dropped_bytes, stderr_dropped_bytes,
    started_at, finished_at, received_at, trace_id)
SELECT result_id, request_id, exec_id, pc_id, manifest_id, version, timeout_secs, status,
    exit_code, stdout, stderr, stdout_dropped_bytes, stderr_dropped_bytes, started_at,
    finished_at, received_at, trace_id
FROM execution_results;
DROP TABLE execution_results;
ALTER TABLE execution_results_new RENAME TO execution_results;

CREATE INDEX execution_results_started ON execution_results (started_at DESC, result_id DESC);
CREATE INDEX execution_results_pc ON execution_results (pc_id, started_at DESC, result_id DESC);
CREATE INDEX execution_results_manifest ON execution_results (manifest_id, started_at DESC, result_id DESC);
CREATE INDEX execution_results_exec ON execution_results (exec_id, started_at DESC, result_id DESC);
CREATE INDEX execution_results_running ON execution_results (started_at DESC, result_id DESC) WHERE status IS NULL;
CREATE INDEX execution_results_received ON execution_results (received_at);
CREATE INDEX execution_results_not_succeeded ON execution_results (status, started_at DESC, result_id DESC)
    WHERE status IS NOT NULL AND status <> 'succeeded';

CREATE TABLE pending_cancels (
    result_id TEXT PRIMARY KEY NOT NULL,
    pc_id     TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX pending_cancels_pc ON pending_cancels (pc_id);

-- Times are INTEGER microseconds since the Unix epoch, like every time in this database.
CREATE TABLE endpoints (
    pc_id             TEXT    PRIMARY KEY NOT NULL,
    first_seen        INTEGER NOT NULL,
    last_seen         INTEGER NOT NULL,
    connected         INTEGER NOT NULL,
    stream_id         TEXT    NOT NULL,
    replica           TEXT    NOT NULL,
    connected_since   INTEGER NOT NULL,
    agent_version     TEXT    NOT NULL,
    status_at         INTEGER,
    outbox_depth      INTEGER,
    outbox_bytes      INTEGER,
    oldest_pending_at INTEGER,
    dead_letters      INTEGER,
    running_runs      INTEGER,
    hostname          TEXT,
    os                TEXT
) WITHOUT ROWID;
