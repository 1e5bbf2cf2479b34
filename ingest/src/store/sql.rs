//! The SQL both stores share: the Activity queries are built here once, from static fragments and
//! numbered placeholders (every value is a bind parameter), and each store only says how its
//! dialect writes a placeholder, a time plus some microseconds, and a duration
//! ([`Dialect`]). Timestamps compare as microseconds in both (PostgreSQL `timestamptz`, SQLite
//! integer microseconds), so both answer byte for byte the same.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{
    AgentReport, CancelRequest, EndpointOrder, EndpointQuery, EndpointRow, ExecutionRow,
    FleetTotals, LOST_AFTER_WITHOUT_TIMEOUT, ListQuery, RunOutcome, RunState, StoreError,
    SummaryQuery, storable,
};
use kanade_shared::wire::ExecStatus;

/// How one store's SQL writes what differs between the two.
pub(super) trait Dialect {
    /// The `n`th bind parameter (1-based).
    fn placeholder(n: usize) -> String;
    /// `time` plus `micros` microseconds (both SQL expressions).
    fn time_plus_micros(time: &str, micros: &str) -> String;
    /// Microseconds from `from` to `to` (both SQL expressions), as an integer.
    fn micros_between(from: &str, to: &str) -> String;
}

/// A bind value; each store binds it in its own column types.
#[derive(Debug, Clone)]
pub(super) enum Param {
    Text(String),
    Time(DateTime<Utc>),
    Id(Uuid),
    Int(i64),
}

/// Collects bind values while a query is built.
#[derive(Debug, Default)]
pub(super) struct Params {
    pub values: Vec<Param>,
}

impl Params {
    /// Adds a value; returns its placeholder.
    fn add<D: Dialect>(&mut self, value: Param) -> String {
        self.values.push(value);
        D::placeholder(self.values.len())
    }
}

/// How a write merges into the run's row already stored (SPEC §3), as the `ON CONFLICT` clause
/// of both stores' upserts (`r` is the stored row): a run's fields fill in whichever event
/// brings them, the first result wins, and only the endpoint that first reported the run may
/// write it. A macro, so that each store's statement stays one `&'static str`.
macro_rules! merge_on_conflict {
    () => {
        "ON CONFLICT (result_id) DO UPDATE SET
    version = CASE WHEN r.version = '' THEN EXCLUDED.version ELSE r.version END,
    timeout_secs = COALESCE(r.timeout_secs, EXCLUDED.timeout_secs),
    trace_id = COALESCE(r.trace_id, EXCLUDED.trace_id),
    status = COALESCE(r.status, EXCLUDED.status),
    exit_code = CASE WHEN r.status IS NULL THEN EXCLUDED.exit_code ELSE r.exit_code END,
    stdout = CASE WHEN r.status IS NULL THEN EXCLUDED.stdout ELSE r.stdout END,
    stderr = CASE WHEN r.status IS NULL THEN EXCLUDED.stderr ELSE r.stderr END,
    stdout_dropped_bytes = CASE WHEN r.status IS NULL THEN EXCLUDED.stdout_dropped_bytes
        ELSE r.stdout_dropped_bytes END,
    stderr_dropped_bytes = CASE WHEN r.status IS NULL THEN EXCLUDED.stderr_dropped_bytes
        ELSE r.stderr_dropped_bytes END,
    finished_at = CASE WHEN r.status IS NULL THEN EXCLUDED.finished_at ELSE r.finished_at END
WHERE r.pc_id = EXCLUDED.pc_id"
    };
}
pub(super) use merge_on_conflict;

/// The stored columns a read selects (with the computed `state`): the fields of [`StoredRun`].
pub(super) const COLUMNS: &str = "result_id, request_id, exec_id, pc_id, manifest_id, version, \
     timeout_secs, status, exit_code, stdout, stderr, stdout_dropped_bytes, stderr_dropped_bytes, \
     started_at, finished_at, received_at, trace_id, cancel_requested_at, cancel_reason, \
     cancel_requested_by";

/// When a run without a result counts as lost: `received_at` plus its timeout plus the grace
/// (24 h without a timeout).
fn lost_deadline<D: Dialect>(grace: &str) -> String {
    D::time_plus_micros(
        "received_at",
        &format!(
            "COALESCE(timeout_secs * 1000000 + {grace}, {})",
            LOST_AFTER_WITHOUT_TIMEOUT
                .num_microseconds()
                .unwrap_or(i64::MAX)
        ),
    )
}

/// The state of a row as SQL: its status once finished, else `lost` past its deadline, else
/// `running`.
fn state_sql<D: Dialect>(now: &str, grace: &str) -> String {
    let deadline = lost_deadline::<D>(grace);
    format!(
        "CASE WHEN status IS NOT NULL THEN status WHEN {deadline} < {now} THEN 'lost' ELSE 'running' END"
    )
}

/// The state expression with its `now` and grace bound.
fn bound_state<D: Dialect>(
    params: &mut Params,
    now: DateTime<Utc>,
    grace: chrono::Duration,
) -> String {
    let now = params.add::<D>(Param::Time(now));
    let grace = params.add::<D>(Param::Int(grace.num_microseconds().unwrap_or(i64::MAX)));
    state_sql::<D>(&now, &grace)
}

/// One run by id, outputs whole.
pub(super) fn get_sql<D: Dialect>(
    result_id: Uuid,
    now: DateTime<Utc>,
    grace: chrono::Duration,
) -> (String, Params) {
    let mut params = Params::default();
    let id = params.add::<D>(Param::Id(result_id));
    let state = bound_state::<D>(&mut params, now, grace);
    let sql =
        format!("SELECT {COLUMNS}, {state} AS state FROM execution_results WHERE result_id = {id}");
    (sql, params)
}

/// The runs among `result_ids` that have a result, outputs whole.
pub(super) fn finished_among_sql<D: Dialect>(
    result_ids: &[Uuid],
    now: DateTime<Utc>,
    grace: chrono::Duration,
) -> (String, Params) {
    let mut params = Params::default();
    let ids: Vec<String> = result_ids
        .iter()
        .map(|id| params.add::<D>(Param::Id(*id)))
        .collect();
    let state = bound_state::<D>(&mut params, now, grace);
    let sql = format!(
        "SELECT {COLUMNS}, {state} AS state FROM execution_results \
         WHERE result_id IN ({}) AND status IS NOT NULL",
        ids.join(", ")
    );
    (sql, params)
}

/// Where a state filter sends the query: each finished state is one range of the rare-state
/// index (or, for `succeeded`, 98 % of rows: any ordered index finds 50 fast), and running and
/// lost rows are the few without a status (their own partial index). States are written as
/// literals — they are Kanade's own names, never input — so the planner can prove that a branch
/// only needs a partial index, even in a generic plan.
fn state_branches(states: &[RunState], state: &str) -> Vec<String> {
    let mut branches = Vec::new();
    let mut unfinished = Vec::new();
    for s in states {
        match s {
            RunState::Running | RunState::Lost => {
                if !unfinished.contains(s) {
                    unfinished.push(*s);
                }
            }
            RunState::Finished(ExecStatus::Succeeded) => {
                branches.push("status = 'succeeded'".to_string())
            }
            RunState::Finished(status) => branches.push(format!(
                "status IS NOT NULL AND status <> 'succeeded' AND status = '{}'",
                status.as_str()
            )),
        }
    }
    branches.sort();
    branches.dedup();
    if !unfinished.is_empty() {
        let names: Vec<String> = unfinished
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        branches.push(format!(
            "status IS NULL AND ({state}) IN ({})",
            names.join(", ")
        ));
    }
    branches
}

/// A page of a listing, newest first. A filter on several states is a `UNION ALL` of one
/// branch per state (each ordered and limited on its own index), merged: one `IN` over states
/// would have PostgreSQL sort every matching row before it could return the first 50.
pub(super) fn list_sql<D: Dialect>(query: &ListQuery) -> (String, Params) {
    let mut params = Params::default();
    let state = bound_state::<D>(&mut params, query.now, query.lost_grace);
    let mut filters = Vec::new();
    for (column, value) in [
        ("pc_id", &query.pc_id),
        ("manifest_id", &query.manifest_id),
        ("exec_id", &query.exec_id),
    ] {
        if let Some(value) = value {
            let p = params.add::<D>(Param::Text(storable(value.clone())));
            filters.push(format!("{column} = {p}"));
        }
    }
    if let Some(after) = query.started_after {
        let p = params.add::<D>(Param::Time(after));
        filters.push(format!("started_at >= {p}"));
    }
    if let Some(before) = query.started_before {
        let p = params.add::<D>(Param::Time(before));
        filters.push(format!("started_at < {p}"));
    }
    if let Some(cursor) = query.after {
        let t = params.add::<D>(Param::Time(cursor.started_at));
        let id = params.add::<D>(Param::Id(cursor.result_id));
        filters.push(format!(
            "(started_at < {t} OR (started_at = {t} AND result_id < {id}))"
        ));
    }
    // A literal (a number Kanade computes, at most 501): planned once for every call (generic
    // plans), a LIMIT the planner cannot see makes it plan for every row.
    let limit = query.limit;
    let select = |branch: Option<&String>| {
        let conditions: Vec<&str> = filters
            .iter()
            .map(String::as_str)
            .chain(branch.map(String::as_str))
            .collect();
        let where_clause = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        format!(
            "SELECT {COLUMNS}, {state} AS state FROM execution_results {where_clause} \
             ORDER BY started_at DESC, result_id DESC LIMIT {limit}"
        )
    };
    let branches = state_branches(&query.states, &state);
    let sql = match branches.as_slice() {
        [] => select(None),
        [one] => select(Some(one)),
        many => {
            let parts: Vec<String> = many
                .iter()
                .enumerate()
                .map(|(i, b)| format!("SELECT * FROM ({}) AS b{i}", select(Some(b))))
                .collect();
            format!(
                "SELECT * FROM ({}) AS u ORDER BY started_at DESC, result_id DESC LIMIT {limit}",
                parts.join(" UNION ALL ")
            )
        }
    };
    (sql, params)
}

/// The window and filter of a manifest summary, its lost-deadline expression, and their
/// parameters (with the placeholder of `now`), for either store's summary query.
pub(super) fn summary_window<D: Dialect>(
    query: &SummaryQuery,
) -> (Vec<String>, String, SummaryParams) {
    let mut params = Params::default();
    let now = params.add::<D>(Param::Time(query.now));
    let grace = params.add::<D>(Param::Int(
        query.lost_grace.num_microseconds().unwrap_or(i64::MAX),
    ));
    let deadline = lost_deadline::<D>(&grace);
    let after = params.add::<D>(Param::Time(query.started_after));
    let before = params.add::<D>(Param::Time(query.started_before));
    let mut filters = vec![
        format!("started_at >= {after}"),
        format!("started_at < {before}"),
    ];
    if let Some(manifest) = &query.manifest_id {
        let p = params.add::<D>(Param::Text(storable(manifest.clone())));
        filters.push(format!("manifest_id = {p}"));
    }
    (
        filters,
        deadline,
        SummaryParams {
            now,
            values: params,
        },
    )
}

/// Parameters of a summary query.
pub(super) struct SummaryParams {
    /// The placeholder of `now`.
    pub now: String,
    pub values: Params,
}

/// Per manifest over a window of `started_at`: counts by state, the p50 and p95 duration of
/// finished runs (`percentile_disc`: the value at position ⌈p·n⌉ of the sorted durations,
/// computed with window functions), and the newest failure. SQLite's; PostgreSQL computes the
/// same numbers its own faster way.
pub(super) fn summary_sql<D: Dialect>(query: &SummaryQuery) -> (String, Params) {
    let (filters, deadline, params) = summary_window::<D>(query);
    let now = params.now;
    let state = format!(
        "CASE WHEN status IS NOT NULL THEN status WHEN {deadline} < {now} THEN 'lost' ELSE 'running' END"
    );
    let duration = D::micros_between("started_at", "finished_at");
    let sql = format!(
        "WITH runs AS (
            SELECT manifest_id, result_id, finished_at, {state} AS state,
                CASE WHEN status IS NULL THEN NULL ELSE {duration} END AS duration
            FROM execution_results WHERE {filters}
        ),
        finished AS (
            SELECT manifest_id, duration,
                ROW_NUMBER() OVER (PARTITION BY manifest_id ORDER BY duration) AS position,
                COUNT(*) OVER (PARTITION BY manifest_id) AS n
            FROM runs WHERE duration IS NOT NULL
        ),
        percentiles AS (
            SELECT manifest_id,
                MAX(CASE WHEN position = (n + 1) / 2 THEN duration END) AS p50,
                MAX(CASE WHEN position = (95 * n + 99) / 100 THEN duration END) AS p95
            FROM finished GROUP BY manifest_id
        ),
        failures AS (
            SELECT manifest_id, result_id, finished_at,
                ROW_NUMBER() OVER (PARTITION BY manifest_id ORDER BY finished_at DESC, result_id DESC)
                    AS newest
            FROM runs WHERE state NOT IN ('succeeded', 'running', 'lost')
        ),
        counts AS (
            SELECT manifest_id,
                COUNT(*) AS runs,
                SUM(CASE WHEN state = 'running' THEN 1 ELSE 0 END) AS running,
                SUM(CASE WHEN state = 'succeeded' THEN 1 ELSE 0 END) AS succeeded,
                SUM(CASE WHEN state NOT IN ('succeeded', 'running', 'lost') THEN 1 ELSE 0 END)
                    AS failed,
                SUM(CASE WHEN state = 'lost' THEN 1 ELSE 0 END) AS lost
            FROM runs GROUP BY manifest_id
        )
        SELECT c.manifest_id, c.runs, c.running, c.succeeded, c.failed, c.lost, p.p50, p.p95,
            f.result_id AS last_failure_result_id, f.finished_at AS last_failure_at
        FROM counts c
        LEFT JOIN percentiles p ON p.manifest_id = c.manifest_id
        LEFT JOIN failures f ON f.manifest_id = c.manifest_id AND f.newest = 1
        ORDER BY c.manifest_id",
        filters = filters.join(" AND ")
    );
    (sql, params.values)
}

/// Counts (dropped bytes, outbox depths) are `u64` on the wire and `bigint` in the tables;
/// counts past `i64::MAX`, which nothing real reaches, are stored saturated.
pub(super) fn bigint(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// One stored row as a store reads it, named column by column (`FromRow`), before its state
/// and outcome are interpreted. Each store reads ids and times in its own column types
/// (PostgreSQL `uuid`/`timestamptz`, SQLite text/integer microseconds) and maps them to
/// `StoredRun<Uuid, DateTime<Utc>>`, which becomes an [`ExecutionRow`].
#[derive(Debug, sqlx::FromRow)]
pub(super) struct StoredRun<Id, Time> {
    result_id: Id,
    request_id: String,
    exec_id: String,
    pc_id: String,
    manifest_id: String,
    version: String,
    timeout_secs: Option<i64>,
    state: String,
    status: Option<String>,
    exit_code: Option<i32>,
    stdout: Option<String>,
    stderr: Option<String>,
    stdout_dropped_bytes: Option<i64>,
    stderr_dropped_bytes: Option<i64>,
    started_at: Time,
    finished_at: Option<Time>,
    received_at: Time,
    trace_id: Option<String>,
    cancel_requested_at: Option<Time>,
    cancel_reason: Option<String>,
    cancel_requested_by: Option<String>,
}

impl<Id, Time> StoredRun<Id, Time> {
    /// The same row with its id and times in other types.
    pub(super) fn map<I, T>(
        self,
        id: impl FnOnce(Id) -> Result<I, StoreError>,
        time: impl Fn(Time) -> Result<T, StoreError>,
    ) -> Result<StoredRun<I, T>, StoreError> {
        Ok(StoredRun {
            result_id: id(self.result_id)?,
            request_id: self.request_id,
            exec_id: self.exec_id,
            pc_id: self.pc_id,
            manifest_id: self.manifest_id,
            version: self.version,
            timeout_secs: self.timeout_secs,
            state: self.state,
            status: self.status,
            exit_code: self.exit_code,
            stdout: self.stdout,
            stderr: self.stderr,
            stdout_dropped_bytes: self.stdout_dropped_bytes,
            stderr_dropped_bytes: self.stderr_dropped_bytes,
            started_at: time(self.started_at)?,
            finished_at: self.finished_at.map(&time).transpose()?,
            received_at: time(self.received_at)?,
            trace_id: self.trace_id,
            cancel_requested_at: self.cancel_requested_at.map(&time).transpose()?,
            cancel_reason: self.cancel_reason,
            cancel_requested_by: self.cancel_requested_by,
        })
    }
}

/// A value read from the store that Kanade never writes: the database was changed by hand.
pub(super) fn corrupt(what: String) -> StoreError {
    StoreError::Other(sqlx::Error::Decode(what.into()))
}

impl TryFrom<StoredRun<Uuid, DateTime<Utc>>> for ExecutionRow {
    type Error = StoreError;

    fn try_from(row: StoredRun<Uuid, DateTime<Utc>>) -> Result<ExecutionRow, StoreError> {
        let result_id = row.result_id;
        let state = RunState::from_name(&row.state)
            .ok_or_else(|| corrupt(format!("unknown state {:?} for run {result_id}", row.state)))?;
        let outcome = match (row.status, row.finished_at) {
            (Some(status), Some(finished_at)) => Some(RunOutcome {
                status: ExecStatus::from_name(&status).ok_or_else(|| {
                    corrupt(format!("unknown status {status:?} for run {result_id}"))
                })?,
                exit_code: row.exit_code,
                stdout: row.stdout.unwrap_or_default(),
                stderr: row.stderr.unwrap_or_default(),
                stdout_dropped_bytes: row.stdout_dropped_bytes.unwrap_or(0).max(0) as u64,
                stderr_dropped_bytes: row.stderr_dropped_bytes.unwrap_or(0).max(0) as u64,
                finished_at,
            }),
            _ => None,
        };
        Ok(ExecutionRow {
            result_id,
            request_id: row.request_id,
            exec_id: row.exec_id,
            pc_id: row.pc_id,
            manifest_id: row.manifest_id,
            version: row.version,
            timeout_secs: row.timeout_secs.and_then(|t| u32::try_from(t).ok()),
            state,
            outcome,
            started_at: row.started_at,
            received_at: row.received_at,
            trace_id: row.trace_id,
            cancel: row.cancel_requested_at.map(|at| CancelRequest {
                at,
                reason: row.cancel_reason.unwrap_or_default(),
                by: row.cancel_requested_by.unwrap_or_default(),
            }),
        })
    }
}

/// One manifest's summary as a store reads it (`FromRow`), before ids and times are mapped.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct StoredSummary<Id, Time> {
    pub manifest_id: String,
    pub runs: i64,
    pub running: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub lost: i64,
    pub p50: Option<i64>,
    pub p95: Option<i64>,
    pub last_failure_result_id: Option<Id>,
    pub last_failure_at: Option<Time>,
}

impl StoredSummary<Uuid, DateTime<Utc>> {
    pub(super) fn into_summary(self) -> super::ManifestSummary {
        let count = |n: i64| n.max(0) as u64;
        let duration =
            |micros: Option<i64>| micros.map(|m| std::time::Duration::from_micros(m.max(0) as u64));
        super::ManifestSummary {
            manifest_id: self.manifest_id,
            runs: count(self.runs),
            running: count(self.running),
            succeeded: count(self.succeeded),
            failed: count(self.failed),
            lost: count(self.lost),
            p50_duration: duration(self.p50),
            p95_duration: duration(self.p95),
            last_failure: self.last_failure_result_id.zip(self.last_failure_at),
        }
    }
}

/// The columns a read of `endpoints` selects, the fields of [`StoredEndpoint`], with
/// `connected_now` (connected, and refreshed since `connected_after`) at `{connected}`.
fn endpoint_columns(connected_now: &str) -> String {
    format!(
        "pc_id, {connected_now} AS connected_now, replica, connected_since, first_seen, \
         last_seen, agent_version, status_at, outbox_depth, outbox_bytes, oldest_pending_at, \
         dead_letters, running_runs, hostname, os"
    )
}

/// Whether an endpoint's stream is open now: marked connected, and refreshed by its replica
/// at or after `connected_after` (a placeholder).
fn connected_now(connected_after: &str) -> String {
    format!("(connected AND last_seen >= {connected_after})")
}

/// A page of endpoints.
pub(super) fn endpoints_sql<D: Dialect>(query: &EndpointQuery) -> (String, Params) {
    let mut params = Params::default();
    let after = params.add::<D>(Param::Time(query.connected_after));
    let now = connected_now(&after);
    let mut filters = Vec::new();
    match query.connected {
        Some(true) => filters.push(now.clone()),
        Some(false) => filters.push(format!("NOT {now}")),
        None => {}
    }
    if let Some(prefix) = &query.pc_id_prefix {
        let p = params.add::<D>(Param::Text(storable(prefix.clone())));
        filters.push(format!("substr(pc_id, 1, length({p})) = {p}"));
    }
    let order = match query.order {
        EndpointOrder::PcId => {
            if let Some(last) = &query.after {
                let p = params.add::<D>(Param::Text(last.clone()));
                filters.push(format!("pc_id > {p}"));
            }
            "pc_id".to_string()
        }
        EndpointOrder::AttentionFirst => {
            let behind = params.add::<D>(Param::Time(query.backlogged_before));
            filters.push(format!(
                "(NOT {now} OR (outbox_depth > 0 AND oldest_pending_at < {behind}))"
            ));
            format!(
                "CASE WHEN {now} THEN 1 ELSE 0 END, \
                 CASE WHEN {now} THEN NULL ELSE last_seen END DESC NULLS LAST, \
                 oldest_pending_at NULLS LAST, pc_id"
            )
        }
    };
    let where_clause = if filters.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", filters.join(" AND "))
    };
    let sql = format!(
        "SELECT {} FROM endpoints {where_clause} ORDER BY {order} LIMIT {}",
        endpoint_columns(&now),
        query.limit
    );
    (sql, params)
}

/// One endpoint by pc_id.
pub(super) fn endpoint_sql<D: Dialect>(
    pc_id: &str,
    connected_after: DateTime<Utc>,
) -> (String, Params) {
    let mut params = Params::default();
    let after = params.add::<D>(Param::Time(connected_after));
    let id = params.add::<D>(Param::Text(storable(pc_id.to_string())));
    let sql = format!(
        "SELECT {} FROM endpoints WHERE pc_id = {id}",
        endpoint_columns(&connected_now(&after))
    );
    (sql, params)
}

/// The fleet's totals ([`FleetTotals`]).
pub(super) fn fleet_totals_sql<D: Dialect>(connected_after: DateTime<Utc>) -> (String, Params) {
    let mut params = Params::default();
    let after = params.add::<D>(Param::Time(connected_after));
    let now = connected_now(&after);
    // SUM of bigints is numeric in PostgreSQL: cast back to one integer type for both.
    let sql = format!(
        "SELECT CAST(COALESCE(SUM(CASE WHEN {now} THEN 1 ELSE 0 END), 0) AS BIGINT) AS connected, \
         CAST(COALESCE(SUM(CASE WHEN {now} THEN 0 ELSE 1 END), 0) AS BIGINT) AS disconnected, \
         CAST(COALESCE(SUM(outbox_depth), 0) AS BIGINT) AS backlog_events, \
         CAST(COALESCE(SUM(dead_letters), 0) AS BIGINT) AS dead_letters FROM endpoints"
    );
    (sql, params)
}

/// The columns of a presence write, in the order both stores bind them.
pub(super) const PRESENCE_COLUMNS: &str = "pc_id, stream_id, replica, connected_since, \
     agent_version, last_seen, connected, status_at, outbox_depth, outbox_bytes, \
     oldest_pending_at, dead_letters, running_runs, hostname, os";

/// How a presence write merges into the endpoint's row (see [`super::Store::write_presence`]),
/// as the `ON CONFLICT` clause of both stores' upserts (`e` is the stored row, `stale` the
/// placeholder of `stale_before`, `greatest` the dialect's two-argument maximum).
pub(super) fn presence_on_conflict(stale: &str, greatest: &str) -> String {
    let mine = "e.stream_id = excluded.stream_id";
    let newer = format!(
        "(excluded.connected AND (NOT e.connected OR e.last_seen < {stale} \
         OR excluded.connected_since >= e.connected_since))"
    );
    let report = "(excluded.status_at IS NOT NULL \
         AND (e.status_at IS NULL OR excluded.status_at >= e.status_at))";
    let stream = |column: &str| {
        format!("{column} = CASE WHEN {mine} OR {newer} THEN excluded.{column} ELSE e.{column} END")
    };
    let reported = |column: &str| {
        format!("{column} = CASE WHEN {report} THEN excluded.{column} ELSE e.{column} END")
    };
    let mut sets = vec![format!(
        "connected = CASE WHEN {mine} THEN excluded.connected WHEN {newer} THEN TRUE \
         ELSE e.connected END"
    )];
    sets.extend(
        ["stream_id", "replica", "connected_since", "agent_version"]
            .into_iter()
            .map(stream),
    );
    sets.push(format!(
        "last_seen = CASE WHEN {mine} OR {newer} THEN {greatest}(e.last_seen, excluded.last_seen) \
         ELSE e.last_seen END"
    ));
    sets.extend(
        [
            "status_at",
            "outbox_depth",
            "outbox_bytes",
            "oldest_pending_at",
            "dead_letters",
            "running_runs",
            "hostname",
            "os",
        ]
        .into_iter()
        .map(reported),
    );
    format!(
        "ON CONFLICT (pc_id) DO UPDATE SET {} WHERE {mine} OR {newer} OR {report}",
        sets.join(", ")
    )
}

/// One endpoint row as a store reads it (`FromRow`), before its times are mapped.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct StoredEndpoint<Time> {
    pc_id: String,
    connected_now: bool,
    replica: String,
    connected_since: Time,
    first_seen: Time,
    last_seen: Time,
    agent_version: String,
    status_at: Option<Time>,
    outbox_depth: Option<i64>,
    outbox_bytes: Option<i64>,
    oldest_pending_at: Option<Time>,
    dead_letters: Option<i64>,
    running_runs: Option<i32>,
    hostname: Option<String>,
    os: Option<String>,
}

impl<Time> StoredEndpoint<Time> {
    /// The endpoint, its times mapped by `time`.
    pub(super) fn into_row(
        self,
        time: impl Fn(Time) -> Result<DateTime<Utc>, StoreError>,
    ) -> Result<EndpointRow, StoreError> {
        let count = |n: Option<i64>| n.unwrap_or(0).max(0) as u64;
        let report = match self.status_at {
            Some(at) => Some(AgentReport {
                at: time(at)?,
                outbox_depth: count(self.outbox_depth),
                outbox_bytes: count(self.outbox_bytes),
                oldest_pending_at: self.oldest_pending_at.map(&time).transpose()?,
                dead_letters: count(self.dead_letters),
                running_runs: self.running_runs.unwrap_or(0).max(0) as u32,
                hostname: self.hostname.unwrap_or_default(),
                os: self.os.unwrap_or_default(),
            }),
            None => None,
        };
        Ok(EndpointRow {
            pc_id: self.pc_id,
            connected: self.connected_now,
            replica: self.replica,
            connected_since: time(self.connected_since)?,
            first_seen: time(self.first_seen)?,
            last_seen: time(self.last_seen)?,
            agent_version: self.agent_version,
            report,
        })
    }
}

/// The fleet's totals as a store reads them.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct StoredTotals {
    connected: i64,
    disconnected: i64,
    backlog_events: i64,
    dead_letters: i64,
}

impl From<StoredTotals> for FleetTotals {
    fn from(t: StoredTotals) -> FleetTotals {
        let count = |n: i64| n.max(0) as u64;
        FleetTotals {
            connected: count(t.connected),
            disconnected: count(t.disconnected),
            backlog_events: count(t.backlog_events),
            dead_letters: count(t.dead_letters),
        }
    }
}

/// Records a cancel on a run without a result and no earlier request (`$1` the run, `$2` when,
/// `$3` why, `$4` by whom); the run's `pc_id` comes back when it did.
pub(super) fn cancel_sql<D: Dialect>() -> String {
    let p = D::placeholder;
    format!(
        "UPDATE execution_results SET cancel_requested_at = {}, cancel_reason = {}, \
         cancel_requested_by = {} \
         WHERE result_id = {} AND status IS NULL AND cancel_requested_at IS NULL RETURNING pc_id",
        p(2),
        p(3),
        p(4),
        p(1)
    )
}

/// The cancels still to deliver (of one endpoint when `{pc}` filters), with their reasons.
pub(super) fn pending_cancels_sql(pc_filter: &str) -> String {
    format!(
        "SELECT p.pc_id, e.result_id, e.cancel_reason, e.cancel_requested_by \
         FROM pending_cancels p JOIN execution_results e ON e.result_id = p.result_id \
         WHERE e.status IS NULL AND e.cancel_requested_at IS NOT NULL {pc_filter} \
         ORDER BY p.pc_id, e.result_id"
    )
}

/// Forgets the cancels whose run has a result, or is gone.
pub(super) const FORGET_SETTLED_CANCELS: &str = "DELETE FROM pending_cancels WHERE NOT EXISTS \
     (SELECT 1 FROM execution_results e WHERE e.result_id = pending_cancels.result_id \
     AND e.status IS NULL)";
