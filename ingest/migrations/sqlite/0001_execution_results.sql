-- One row per run, coalesced from its EventStarted and ExecResult (SPEC §3). Mirrors the
-- PostgreSQL table; timestamps are INTEGER microseconds since the Unix epoch (UTC), ids TEXT in
-- lowercase hyphenated UUID form, so ordering matches PostgreSQL's.
CREATE TABLE execution_results (
    result_id            TEXT    PRIMARY KEY NOT NULL,
    request_id           TEXT    NOT NULL,
    exec_id              TEXT    NOT NULL,
    pc_id                TEXT    NOT NULL,
    manifest_id          TEXT    NOT NULL,
    version              TEXT    NOT NULL,
    timeout_secs         INTEGER,
    status               TEXT    CHECK (status IN ('succeeded', 'failed', 'timed_out', 'killed', 'spawn_failed', 'interrupted')),
    exit_code            INTEGER,
    stdout               TEXT,
    stderr               TEXT,
    stdout_dropped_bytes INTEGER,
    stderr_dropped_bytes INTEGER,
    started_at           INTEGER NOT NULL,
    finished_at          INTEGER,
    received_at          INTEGER NOT NULL
) WITHOUT ROWID;

CREATE INDEX execution_results_started ON execution_results (started_at DESC, result_id DESC);
CREATE INDEX execution_results_pc ON execution_results (pc_id, started_at DESC, result_id DESC);
CREATE INDEX execution_results_manifest ON execution_results (manifest_id, started_at DESC, result_id DESC);
CREATE INDEX execution_results_exec ON execution_results (exec_id, started_at DESC, result_id DESC);
CREATE INDEX execution_results_running ON execution_results (started_at DESC, result_id DESC) WHERE status IS NULL;
CREATE INDEX execution_results_received ON execution_results (received_at);
