-- Every finished state but succeeded is rare (a few %): listing one is a range of this small
-- index, even when it holds no row at all. (SQLite needs no partitions: it serves small fleets.)
CREATE INDEX execution_results_not_succeeded ON execution_results (status, started_at DESC, result_id DESC)
    WHERE status IS NOT NULL AND status <> 'succeeded';
