-- One row per run, coalesced from its EventStarted and ExecResult (SPEC §3).
CREATE TABLE execution_results (
    result_id            uuid        PRIMARY KEY,
    request_id           text        NOT NULL,
    exec_id              text        NOT NULL,
    pc_id                text        NOT NULL,
    manifest_id          text        NOT NULL,
    version              text        NOT NULL,
    timeout_secs         bigint,
    -- NULL while running; set once by the first committed result.
    status               text        CHECK (status IN ('succeeded', 'failed', 'timed_out', 'killed', 'spawn_failed', 'interrupted')),
    exit_code            integer,
    stdout               text,
    stderr               text,
    stdout_dropped_bytes bigint,
    stderr_dropped_bytes bigint,
    started_at           timestamptz NOT NULL,
    finished_at          timestamptz,
    -- Ingest's clock when the row was first inserted.
    received_at          timestamptz NOT NULL
);

-- Activity lists newest first by (started_at, result_id), optionally filtered.
CREATE INDEX execution_results_started ON execution_results (started_at DESC, result_id DESC);
CREATE INDEX execution_results_pc ON execution_results (pc_id, started_at DESC, result_id DESC);
CREATE INDEX execution_results_manifest ON execution_results (manifest_id, started_at DESC, result_id DESC);
CREATE INDEX execution_results_exec ON execution_results (exec_id, started_at DESC, result_id DESC);
-- "What is running now" (and lost) only ever looks at the few rows without a result.
CREATE INDEX execution_results_running ON execution_results (started_at DESC, result_id DESC) WHERE status IS NULL;
-- Retention deletes by age.
CREATE INDEX execution_results_received ON execution_results (received_at);
