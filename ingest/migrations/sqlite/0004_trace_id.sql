-- The W3C trace id of the run's trace: see the PostgreSQL migration of the same name.
ALTER TABLE execution_results ADD COLUMN trace_id TEXT;
