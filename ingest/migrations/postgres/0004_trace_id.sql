-- The W3C trace id of the run's trace (from its events' traceparent), when the agent exported
-- traces: the console links a run to it (--trace-url). The first event that carries one sets it.
ALTER TABLE execution_results ADD COLUMN trace_id text;
