-- Events waiting for ingest's ack, in the order they were committed.
CREATE TABLE outbox (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    result_id   TEXT    NOT NULL,
    kind        TEXT    NOT NULL CHECK (kind IN ('started', 'result')),
    -- JSON of kanade_shared::wire::Event (its seq is this row's).
    payload     TEXT    NOT NULL,
    bytes       INTEGER NOT NULL,
    -- Unix microseconds.
    enqueued_at INTEGER NOT NULL
);

-- Events ingest refused, or rows that could not be decoded: kept for the operator.
CREATE TABLE dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    seq         INTEGER NOT NULL,
    result_id   TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    payload     TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    enqueued_at INTEGER NOT NULL,
    dead_at     INTEGER NOT NULL
);

-- Runs in progress. Each is guarded by a lock file runs/RESULT_ID.lock held by the process
-- running it; a row whose lock is free belongs to a dead process.
CREATE TABLE runs (
    result_id TEXT PRIMARY KEY NOT NULL,
    -- JSON of the run's EventStarted.
    started   TEXT NOT NULL,
    -- JSON of the run's trace context.
    trace_context TEXT NOT NULL
);

-- What `kanade-agent status` shows about the sender (connection, last ack).
CREATE TABLE agent_state (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
