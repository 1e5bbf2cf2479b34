-- Fleet presence and operator cancel (SPEC §14).

-- A cancel request is committed on the run's row before CancelExecution answers: when, why and
-- by whom. A run cancelled by its agent ends with status 'cancelled'.
ALTER TABLE execution_results
    ADD COLUMN cancel_requested_at timestamptz,
    ADD COLUMN cancel_reason       text,
    ADD COLUMN cancel_requested_by text;
DO $$
DECLARE
    name text;
BEGIN
    -- The status check's name depends on how the table was made (0002 renamed its way around
    -- the unpartitioned table's): find it by what it checks.
    FOR name IN SELECT conname FROM pg_constraint
        WHERE conrelid = 'execution_results'::regclass AND contype = 'c'
        AND pg_get_constraintdef(oid) LIKE '%status%'
    LOOP
        EXECUTE format('ALTER TABLE execution_results DROP CONSTRAINT %I', name);
    END LOOP;
END $$;
ALTER TABLE execution_results ADD CONSTRAINT execution_results_status_check CHECK (status IN
    ('succeeded', 'failed', 'timed_out', 'killed', 'spawn_failed', 'interrupted', 'cancelled'));

-- The cancels still to deliver: a run's agent is told again after every Welcome until the run has
-- a result. Kept apart from the partitioned table so that the question asked at every agent's
-- Hello ("anything to cancel for this endpoint?") is one probe of a small table, not one per day
-- partition; rows whose run has a result are swept by retention.
CREATE TABLE pending_cancels (
    result_id uuid PRIMARY KEY,
    pc_id     text NOT NULL
);
CREATE INDEX pending_cancels_pc ON pending_cancels (pc_id);

-- One row per endpoint: its agent's stream (which replica, since when, last known alive) and what
-- the agent last reported. Written in batches by the replica holding the stream, which refreshes
-- last_seen of its open streams every --presence-every; an endpoint counts as connected while
-- `connected` and last_seen is within three of those intervals, so a replica that died leaves
-- nothing connected for long. pc_id sorts bytewise ("C"), as SQLite sorts it.
CREATE TABLE endpoints (
    pc_id             text COLLATE "C" PRIMARY KEY,
    first_seen        timestamptz NOT NULL,
    last_seen         timestamptz NOT NULL,
    connected         boolean     NOT NULL,
    -- The stream this row speaks of (the newest one): its id, replica and opening.
    stream_id         uuid        NOT NULL,
    replica           text        NOT NULL,
    connected_since   timestamptz NOT NULL,
    agent_version     text        NOT NULL,
    -- The agent's last AgentStatus, when it sent one.
    status_at         timestamptz,
    outbox_depth      bigint,
    outbox_bytes      bigint,
    oldest_pending_at timestamptz,
    dead_letters      bigint,
    running_runs      integer,
    hostname          text,
    os                text
);
