-- execution_results partitioned by day (SPEC §15, Storage), so retention drops whole days
-- (whatever their size) instead of deleting rows one by one.
--
-- The partition key is result_id itself, by range: the agent mints UUIDv7 result_ids, whose
-- first 48 bits are the mint time in milliseconds, so a day of runs is one range of ids. Keyed
-- by the upsert key, every event of a run lands in its run's partition however late it comes
-- (a result days after its start finds its row), and result_id stays unique across the whole
-- table. Ids outside every day partition (not UUIDv7, or minted by a clock far off) go to the
-- default partition, which retention cleans row by row by received_at.

CREATE FUNCTION kanade_uuid_floor(at timestamptz) RETURNS uuid
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN (lpad(to_hex((extract(epoch FROM at) * 1000)::bigint), 12, '0') || '00000000000000000000')::uuid;

-- The partition holding the runs minted on `day` (UTC), created when missing. Runs of that day
-- already in the default partition move into it. Callers serialise with an advisory lock.
CREATE FUNCTION kanade_ensure_day_partition(day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    name text := 'execution_results_p' || to_char(day, 'YYYYMMDD');
    low uuid := kanade_uuid_floor(day::timestamp AT TIME ZONE 'UTC');
    high uuid := kanade_uuid_floor((day + 1)::timestamp AT TIME ZONE 'UTC');
BEGIN
    IF to_regclass(name) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE execution_results INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', name);
    EXECUTE format(
        'WITH moved AS (DELETE FROM execution_results_default WHERE result_id >= %L AND result_id < %L RETURNING *)
         INSERT INTO %I SELECT * FROM moved', low, high, name);
    EXECUTE format('ALTER TABLE execution_results ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
        name, low, high);
    RETURN true;
END $$;

ALTER TABLE execution_results RENAME TO execution_results_unpartitioned;
ALTER TABLE execution_results_unpartitioned RENAME CONSTRAINT execution_results_pkey
    TO execution_results_unpartitioned_pkey;
DROP INDEX execution_results_started, execution_results_pc, execution_results_manifest,
    execution_results_exec, execution_results_running, execution_results_received;

CREATE TABLE execution_results (
    result_id            uuid        NOT NULL,
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
    received_at          timestamptz NOT NULL,
    PRIMARY KEY (result_id)
) PARTITION BY RANGE (result_id);

CREATE TABLE execution_results_default PARTITION OF execution_results DEFAULT;

-- Activity lists newest first by (started_at, result_id), optionally filtered.
CREATE INDEX execution_results_started ON execution_results (started_at DESC, result_id DESC);
CREATE INDEX execution_results_pc ON execution_results (pc_id, started_at DESC, result_id DESC);
CREATE INDEX execution_results_manifest ON execution_results (manifest_id, started_at DESC, result_id DESC);
CREATE INDEX execution_results_exec ON execution_results (exec_id, started_at DESC, result_id DESC);
-- "What is running now" (and lost) only ever looks at the few rows without a result.
CREATE INDEX execution_results_running ON execution_results (started_at DESC, result_id DESC) WHERE status IS NULL;
-- Every finished state but succeeded is rare (a few %): listing one is a range of this small
-- index, even when it holds no row at all.
CREATE INDEX execution_results_not_succeeded ON execution_results (status, started_at DESC, result_id DESC)
    WHERE status IS NOT NULL AND status <> 'succeeded';
-- Retention of the default partition (the day partitions are dropped whole).
CREATE INDEX execution_results_default_received ON execution_results_default (received_at);

-- Day partitions for the rows already there (within 400 days of now; older or odd ones stay in
-- the default partition) and the next days, then the rows.
DO $$
DECLARE
    first_day date;
    day date;
BEGIN
    SELECT greatest(
        coalesce(min(to_timestamp(
            ('x' || substr(replace(result_id::text, '-', ''), 1, 12))::bit(48)::bigint / 1000.0))::date,
            current_date),
        current_date - 400)
    INTO first_day
    FROM execution_results_unpartitioned
    WHERE substr(result_id::text, 15, 1) = '7';
    day := first_day;
    WHILE day <= current_date + 3 LOOP
        PERFORM kanade_ensure_day_partition(day);
        day := day + 1;
    END LOOP;
END $$;

INSERT INTO execution_results SELECT * FROM execution_results_unpartitioned;
DROP TABLE execution_results_unpartitioned;
