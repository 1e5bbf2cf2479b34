//! The web console (SPEC §13): the Activity view for people, served by ingest over HTTP/1.1.
//!
//! - this module: the routes, their handlers and the headers every answer carries;
//! - [`filters`]: the Activity page's URL parameters, read and written (URLs are a contract);
//! - [`pages`]: the HTML of every page (maud templates: every value is escaped by construction);
//! - [`live`]: Server-Sent Events telling open pages to re-read when runs change, and carrying a
//!   running run's output to its page;
//! - [`session`]: sign-in with a reader or operator token, sessions, CSRF tokens;
//! - `assets/`: the stylesheet and the one script, embedded in the binary.
//!
//! A new page is a route in [`router`], a handler here reading through the store's queries (the
//! same ones the Activity service uses), and its markup in [`pages`].

mod filters;
mod live;
mod pages;
mod session;

use std::{sync::Arc, time::Duration};

use axum::{
    Extension, Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use chrono::{DateTime, SubsecRound, Utc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    auth::Tokens,
    changes::Changes,
    control::{CancelError, Cancels, Tails},
    presence,
    store::{
        EndpointOrder, EndpointQuery, ListQuery, ReadStore, RunState, Store, StoreError,
        SummaryQuery,
    },
};

pub use filters::{EndpointFilters, Filters};
use session::{Sessions, Visitor};

/// Runs per page of the Activity table.
const PAGE_SIZE: u32 = 50;
/// Runs shown at most in the "running now" section.
const RUNNING_NOW: u32 = 50;
/// Characters of output shown in a table cell.
const FIRST_LINE_CHARS: usize = 120;
/// Endpoints per page of the endpoints table.
const ENDPOINTS_PAGE: u32 = 100;
/// Endpoints shown at most in the "needs attention" section.
const ATTENTION: u32 = 50;

/// What the console is configured with.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    pub lost_grace: chrono::Duration,
    /// Where a run's trace is shown: a URL template with `{trace_id}`.
    pub trace_url: Option<String>,
    pub session_ttl: Duration,
    /// Served over TLS: cookies are `Secure`, grpcurl commands drop `-plaintext`.
    pub tls: bool,
    /// Where gRPC listens, for the grpcurl commands shown.
    pub grpc_addr: String,
    /// A read replica serves the queries: a commit shows there a moment later.
    pub read_replica: bool,
    /// `--presence-every`: how long an endpoint's row stays trusted without a refresh.
    pub presence_every: Duration,
}

/// The console's shared state; cheap to clone.
#[derive(Clone)]
pub struct Console {
    inner: Arc<Inner>,
}

struct Inner {
    /// Every page's queries.
    reads: Arc<dyn ReadStore>,
    changes: Changes,
    /// The Cancel button's work.
    cancels: Cancels,
    /// A running run's live output.
    tails: Tails,
    /// `None`: no authentication configured, every page is open.
    sessions: Option<Sessions>,
    config: ConsoleConfig,
    /// Ends the live streams at shutdown (they would otherwise hold it up forever).
    stop: CancellationToken,
}

/// Everything the console is built from.
pub struct ConsoleParts {
    /// Every page's queries.
    pub reads: Arc<dyn ReadStore>,
    /// Where sessions are kept: the primary (a sign-in must hold at once, on every replica).
    pub store: Arc<dyn Store>,
    /// With a tokens file, every page needs a sign-in with a reader token.
    pub tokens: Option<Arc<Tokens>>,
    pub changes: Changes,
    pub cancels: Cancels,
    pub tails: Tails,
    pub config: ConsoleConfig,
    /// Ends the live streams at shutdown.
    pub stop: CancellationToken,
}

impl Console {
    pub fn new(parts: ConsoleParts) -> Console {
        let ConsoleParts {
            reads,
            store,
            tokens,
            changes,
            cancels,
            tails,
            config,
            stop,
        } = parts;
        let sessions =
            tokens.map(|tokens| Sessions::new(store, tokens, config.session_ttl, config.tls));
        Console {
            inner: Arc::new(Inner {
                reads,
                changes,
                cancels,
                tails,
                sessions,
                config,
                stop,
            }),
        }
    }
}

impl Inner {
    /// Where gRPC is reached, for the commands a page shows.
    fn grpc_addr_for(&self, headers: &HeaderMap) -> String {
        grpc_addr_shown(
            &self.config.grpc_addr,
            headers.get(header::HOST).and_then(|h| h.to_str().ok()),
        )
    }
}

/// The listen address, or, when ingest listens on every interface (0.0.0.0, [::]), the host the
/// browser used (`host`, the request's `Host`) with gRPC's port.
fn grpc_addr_shown(configured: &str, host: Option<&str>) -> String {
    let Ok(addr) = configured.parse::<std::net::SocketAddr>() else {
        return configured.to_string();
    };
    if !addr.ip().is_unspecified() {
        return configured.to_string();
    }
    let name = host
        .map(|h| match h.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => h,
        })
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()));
    match name {
        Some(name) => format!("{name}:{}", addr.port()),
        None => configured.to_string(),
    }
}

/// Every route of the console.
pub fn router(console: Console) -> Router {
    let pages = Router::new()
        .route("/", get(activity))
        .route("/runs/{result_id}", get(run))
        .route("/runs/{result_id}/cancel", post(cancel))
        .route("/runs/{result_id}/live", get(live::run_output))
        .route("/runs/{result_id}/{output}", get(download))
        .route("/endpoints", get(endpoints))
        .route("/manifests", get(manifests))
        .route("/events", get(live::events))
        .route(
            "/signout",
            post(session::sign_out).get(session::sign_out_page),
        )
        .route_layer(middleware::from_fn_with_state(
            console.clone(),
            session::require_sign_in,
        ));
    Router::new()
        .merge(pages)
        .route("/signin", get(session::sign_in_page).post(session::sign_in))
        .route("/assets/console.css", get(stylesheet))
        .route("/assets/console.js", get(script))
        .fallback(not_found)
        .layer(middleware::from_fn(security_headers))
        .with_state(console)
}

/// What a page failed with, shown as a page (and its status).
#[derive(Debug)]
pub enum PageError {
    /// The request itself is wrong: say what to change.
    BadRequest(String),
    /// The visitor may not do this: say what it takes.
    Forbidden(String),
    NotFound(String),
    /// Cannot be done in the state things are in: say why.
    Conflict(String),
    /// The store is unavailable: try again.
    Unavailable(String),
    /// A bug or a misconfigured database; details are in the log.
    Internal,
}

impl From<StoreError> for PageError {
    fn from(err: StoreError) -> PageError {
        if err.is_transient() {
            PageError::Unavailable(format!("{err}; reload in a moment"))
        } else {
            tracing::error!(error = %err, "console: store error");
            PageError::Internal
        }
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (status, title, message) = match self {
            PageError::BadRequest(m) => (StatusCode::BAD_REQUEST, "Bad request", m),
            PageError::Forbidden(m) => (StatusCode::FORBIDDEN, "Not allowed", m),
            PageError::NotFound(m) => (StatusCode::NOT_FOUND, "Not found", m),
            PageError::Conflict(m) => (StatusCode::CONFLICT, "Cannot do that now", m),
            PageError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, "Unavailable", m),
            PageError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "Error",
                "the console failed; see ingest's log".to_string(),
            ),
        };
        (status, pages::error(title, &message)).into_response()
    }
}

fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// `/`: the running runs, then every run matching the filters, newest first.
async fn activity(
    State(console): State<Console>,
    Extension(visitor): Extension<Visitor>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, PageError> {
    let raw = query.unwrap_or_default();
    let filters = Filters::parse(&raw).map_err(PageError::BadRequest)?;
    // The filter form submits empty fields too: show the same view at its canonical URL.
    let canonical = filters.to_query();
    if canonical != raw {
        return Ok(Redirect::to(&format!("/{}", with_question_mark(&canonical))).into_response());
    }
    let console = &console.inner;
    let now = now();
    let mut query = filters.list_query(now, console.config.lost_grace, PAGE_SIZE + 1)?;
    let mut runs = console.reads.list(&query).await?;
    let older = (runs.len() > PAGE_SIZE as usize).then(|| {
        runs.truncate(PAGE_SIZE as usize);
        let last = runs.last().expect("a full page");
        filters.older(crate::store::Cursor::after(last))
    });
    // The running section: on the first page, when the filters let running runs through.
    let running = if filters.page.is_none()
        && (filters.states.is_empty() || filters.states.contains(&RunState::Running))
    {
        query.states = vec![RunState::Running];
        query.after = None;
        query.limit = RUNNING_NOW + 1;
        console.reads.list(&query).await?
    } else {
        Vec::new()
    };
    let more_running = running.len() > RUNNING_NOW as usize;
    let running = &running[..running.len().min(RUNNING_NOW as usize)];
    let grpc_addr = console.grpc_addr_for(&headers);
    Ok(pages::activity(&pages::ActivityView {
        filters: &filters,
        running,
        more_running,
        runs: &runs,
        older: older.as_deref(),
        now,
        visitor: &visitor,
        grpc_addr: &grpc_addr,
        tls: console.config.tls,
    })
    .into_response())
}

fn with_question_mark(query: &str) -> String {
    if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    }
}

fn parse_result_id(text: &str) -> Result<Uuid, PageError> {
    Uuid::try_parse(text)
        .map_err(|_| PageError::BadRequest(format!("{text:?} is not a run's result_id (a UUID)")))
}

/// `/runs/{result_id}`: one run, outputs whole.
async fn run(
    State(console): State<Console>,
    Extension(visitor): Extension<Visitor>,
    headers: HeaderMap,
    Path(result_id): Path<String>,
) -> Result<Response, PageError> {
    let result_id = parse_result_id(&result_id)?;
    let console = &console.inner;
    let now = now();
    let row = console
        .reads
        .get(result_id, now, console.config.lost_grace)
        .await?
        .ok_or_else(|| not_yet(result_id, console.config.read_replica))?;
    Ok(pages::run(&pages::RunView {
        run: &row,
        now,
        trace_url: console.config.trace_url.as_deref(),
        grpc_addr: &console.grpc_addr_for(&headers),
        tls: console.config.tls,
        tokens: console.sessions.is_some(),
        visitor: &visitor,
    })
    .into_response())
}

/// `POST /runs/{result_id}/cancel` (`csrf`, `reason`): the Cancel button; back to the run's page.
async fn cancel(
    State(console): State<Console>,
    Extension(visitor): Extension<Visitor>,
    headers: HeaderMap,
    Path(result_id): Path<String>,
    body: Bytes,
) -> Result<Response, PageError> {
    if !visitor.sent(&headers, session::form_field(&body, "csrf").as_deref()) {
        return Ok(session::refused_form());
    }
    if !visitor.may_act {
        return Err(PageError::Forbidden(
            "cancelling a run needs an operator token: sign in with one (kanade-ingest token \
             add --operator --name NAME)"
                .into(),
        ));
    }
    let id = parse_result_id(&result_id)?;
    let reason = session::form_field(&body, "reason").unwrap_or_default();
    match console
        .inner
        .cancels
        .cancel(&result_id, &reason, &visitor.name)
        .await
    {
        Ok(_) => Ok(Redirect::to(&format!("/runs/{id}")).into_response()),
        Err(err) => Err(match err {
            CancelError::NotAnId(_) | CancelError::NoReason | CancelError::ReasonTooLong { .. } => {
                PageError::BadRequest(err.to_string())
            }
            CancelError::NotFound(_) => PageError::NotFound(err.to_string()),
            CancelError::Finished { .. } => PageError::Conflict(err.to_string()),
            CancelError::Store(err) => err.into(),
        }),
    }
}

/// `/endpoints`: those needing attention, then every endpoint by pc_id.
async fn endpoints(
    State(console): State<Console>,
    Extension(visitor): Extension<Visitor>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, PageError> {
    let raw = query.unwrap_or_default();
    let filters = EndpointFilters::parse(&raw).map_err(PageError::BadRequest)?;
    let canonical = filters.to_query();
    if canonical != raw {
        return Ok(
            Redirect::to(&format!("/endpoints{}", with_question_mark(&canonical))).into_response(),
        );
    }
    let console = &console.inner;
    let now = now();
    let behind = chrono::Duration::from_std(presence::BACKLOG_AGE).unwrap_or_default();
    let mut query = EndpointQuery {
        connected: filters.connected,
        pc_id_prefix: filters.prefix.clone(),
        after: filters.page.clone(),
        limit: ENDPOINTS_PAGE + 1,
        order: EndpointOrder::PcId,
        connected_after: presence::connected_after(now, console.config.presence_every),
        backlogged_before: now - behind,
    };
    let mut rows = console.reads.list_endpoints(&query).await?;
    let next = (rows.len() > ENDPOINTS_PAGE as usize).then(|| {
        rows.truncate(ENDPOINTS_PAGE as usize);
        filters.next(&rows.last().expect("a full page").pc_id)
    });
    let attention = if filters == EndpointFilters::default() {
        query.order = EndpointOrder::AttentionFirst;
        query.after = None;
        query.limit = ATTENTION + 1;
        Some(console.reads.list_endpoints(&query).await?)
    } else {
        None
    };
    let more_attention = attention
        .as_ref()
        .is_some_and(|a| a.len() > ATTENTION as usize);
    let attention = attention
        .as_deref()
        .map(|a| &a[..a.len().min(ATTENTION as usize)]);
    Ok(pages::endpoints(&pages::EndpointsView {
        filters: &filters,
        attention,
        more_attention,
        endpoints: &rows,
        next: next.as_deref(),
        now,
        visitor: &visitor,
        grpc_addr: &console.grpc_addr_for(&headers),
        tls: console.config.tls,
    })
    .into_response())
}

fn not_yet(result_id: Uuid, read_replica: bool) -> PageError {
    PageError::NotFound(if read_replica {
        format!(
            "no run has result_id {result_id} (yet: this console reads a replica, which shows \
             a run a moment after it is committed)"
        )
    } else {
        format!("no run has result_id {result_id}")
    })
}

/// `/runs/{result_id}/stdout.txt` and `…/stderr.txt`: one output, raw, as a download.
async fn download(
    State(console): State<Console>,
    Path((result_id, output)): Path<(String, String)>,
) -> Result<Response, PageError> {
    let result_id = parse_result_id(&result_id)?;
    let stream = match output.as_str() {
        "stdout.txt" => Output::Stdout,
        "stderr.txt" => Output::Stderr,
        other => {
            return Err(PageError::NotFound(format!(
                "a run has stdout.txt and stderr.txt, not {other:?}"
            )));
        }
    };
    let console = &console.inner;
    let row = console
        .reads
        .get(result_id, now(), console.config.lost_grace)
        .await?
        .ok_or_else(|| not_yet(result_id, console.config.read_replica))?;
    let text = row
        .outcome
        .map(|o| match stream {
            Output::Stdout => o.stdout,
            Output::Stderr => o.stderr,
        })
        .unwrap_or_default();
    let disposition = format!("attachment; filename=\"{result_id}-{output}\"");
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            ),
            (
                header::CONTENT_DISPOSITION,
                HeaderValue::from_str(&disposition).expect("a UUID and a fixed name"),
            ),
        ],
        text,
    )
        .into_response())
}

#[derive(Debug, Clone, Copy)]
enum Output {
    Stdout,
    Stderr,
}

/// The windows `/manifests` offers.
const WINDOWS: [(&str, i64); 3] = [("1h", 1), ("24h", 24), ("7d", 7 * 24)];

/// `/manifests?window=24h`: per manifest over the window.
async fn manifests(
    State(console): State<Console>,
    Extension(visitor): Extension<Visitor>,
    RawQuery(query): RawQuery,
) -> Result<Response, PageError> {
    let mut window = "24h".to_string();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "window" => window = value.into_owned(),
            other => {
                return Err(PageError::BadRequest(format!(
                    "unknown parameter {other:?}: /manifests takes window=1h, 24h or 7d"
                )));
            }
        }
    }
    let hours = WINDOWS
        .iter()
        .find(|(name, _)| *name == window)
        .map(|(_, hours)| *hours)
        .ok_or_else(|| {
            PageError::BadRequest(format!("window must be 1h, 24h or 7d, not {window:?}"))
        })?;
    let console = &console.inner;
    let now = now();
    let summaries = console
        .reads
        .summarize(&SummaryQuery {
            started_after: now - chrono::Duration::hours(hours),
            started_before: now,
            manifest_id: None,
            now,
            lost_grace: console.config.lost_grace,
        })
        .await?;
    Ok(pages::manifests(&window, &WINDOWS.map(|(w, _)| w), &summaries, &visitor).into_response())
}

async fn not_found() -> PageError {
    PageError::NotFound("no such page: the console has /, /runs/…, /endpoints, /manifests".into())
}

async fn stylesheet() -> impl IntoResponse {
    asset(
        "text/css; charset=utf-8",
        include_str!("assets/console.css"),
    )
}

async fn script() -> impl IntoResponse {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/console.js"),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// The page is attacker-written text in a frame of ours: nothing but the console's own script
/// and style runs, nothing embeds it, nothing sniffs a download into HTML.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; \
     frame-ancestors 'none'";

async fn security_headers(request: axum::extract::Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers: &mut HeaderMap = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "same-origin"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// A `ListQuery` for filters, at `now`.
impl Filters {
    fn list_query(
        &self,
        now: DateTime<Utc>,
        lost_grace: chrono::Duration,
        limit: u32,
    ) -> Result<ListQuery, PageError> {
        let mut query = ListQuery::all(now, lost_grace, limit);
        query.states = self.states.clone();
        query.pc_id = self.pc.clone();
        query.manifest_id = self.manifest.clone();
        query.exec_id = self.exec.clone();
        query.started_after = self.after.as_ref().map(|t| t.at(now));
        query.started_before = self.before.as_ref().map(|t| t.at(now));
        query.after = self.page;
        Ok(query)
    }
}

#[cfg(test)]
mod tests {
    use super::grpc_addr_shown;

    #[test]
    fn commands_name_the_host_the_browser_used_when_ingest_listens_everywhere() {
        assert_eq!(
            grpc_addr_shown("127.0.0.1:50051", Some("x:8080")),
            "127.0.0.1:50051"
        );
        assert_eq!(
            grpc_addr_shown("0.0.0.0:50051", Some("ingest.example.com:8080")),
            "ingest.example.com:50051"
        );
        assert_eq!(
            grpc_addr_shown("[::]:50051", Some("[::1]:8080")),
            "[::1]:50051"
        );
        assert_eq!(grpc_addr_shown("0.0.0.0:50051", None), "0.0.0.0:50051");
    }
}
