//! The HTML of every console page. maud escapes every value it interpolates, and outputs are
//! only ever interpolated (never `PreEscaped`): what an endpoint wrote is shown as text.

use axum::response::Html;
use chrono::{DateTime, SecondsFormat, Utc};
use maud::{DOCTYPE, Markup, html};

use super::{
    FIRST_LINE_CHARS, Filters,
    filters::{EndpointFilters, STATE_NAMES},
    session::Visitor,
};
use crate::store::{EndpointRow, ExecutionRow, ManifestSummary, RunOutcome, RunState};

/// A whole page, ready to send.
pub type Page = Html<String>;

/// The frame of every page: the navigation, the sign-out form when signed in, `main`.
fn layout(title: &str, current: &str, visitor: Option<&Visitor>, main: Markup) -> Page {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Kanade" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/console.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/" { "Kanade" }
                    nav aria-label="Pages" {
                        @for (href, name) in [("/", "Activity"), ("/endpoints", "Endpoints"), ("/manifests", "Manifests")] {
                            @if name == current {
                                a href=(href) aria-current="page" { (name) }
                            } @else {
                                a href=(href) { (name) }
                            }
                        }
                    }
                    span.live-status data-live-status hidden { "live" }
                    @if let Some(visitor) = visitor.filter(|v| v.signed_in) {
                        form.signout method="post" action="/signout" {
                            span.who { (visitor.name) @if visitor.may_act { " (operator)" } }
                            input type="hidden" name="csrf" value=(visitor.csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { (main) }
            }
        }
    };
    Html(page.into_string())
}

/// `<time>`: UTC in the markup; the script shows it in the browser's time zone, UTC on hover.
fn time(at: DateTime<Utc>) -> Markup {
    let utc = at.to_rfc3339_opts(SecondsFormat::Millis, true);
    html! { time datetime=(utc) title=(utc) { (at.format("%Y-%m-%d %H:%M:%S UTC")) } }
}

/// A duration as people read it: `850 ms`, `12.3 s`, `4 m 05 s`, `2 h 10 m`.
pub fn duration(d: chrono::Duration) -> String {
    let ms = d.num_milliseconds().max(0);
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{} m {:02} s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{} h {:02} m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

fn state_badge(state: RunState) -> Markup {
    html! { span class={"state state-" (state.as_str())} { (state.as_str().replace('_', " ")) } }
}

/// A run's state, and that a cancel waits for its agent when one does.
fn run_state(run: &ExecutionRow) -> Markup {
    html! {
        (state_badge(run.state))
        @if run.cancel.is_some() && run.outcome.is_none() {
            " " span.cancel-requested { "cancel requested" }
        }
    }
}

/// The first non-empty line of the run's output (stdout, else stderr), cut for a table cell.
fn first_line(run: &ExecutionRow) -> String {
    let Some(outcome) = &run.outcome else {
        return String::new();
    };
    let line = [&outcome.stdout, &outcome.stderr]
        .into_iter()
        .flat_map(|s| s.lines())
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let mut cut: String = line.chars().take(FIRST_LINE_CHARS).collect();
    if cut.len() < line.len() {
        cut.push('…');
    }
    cut
}

fn run_href(run: &ExecutionRow) -> String {
    format!("/runs/{}", run.result_id)
}

/// How long the run took, or (running) has been going: the script keeps the latter current.
fn elapsed(run: &ExecutionRow, now: DateTime<Utc>) -> Markup {
    match &run.outcome {
        Some(o) => html! { (duration(o.finished_at - run.started_at)) },
        None => {
            let since = run.started_at.to_rfc3339_opts(SecondsFormat::Millis, true);
            html! { span data-since=(since) { (duration(now - run.started_at)) } }
        }
    }
}

fn runs_table(runs: &[ExecutionRow], now: DateTime<Utc>, caption: &str) -> Markup {
    html! {
        div.table-wrap {
            table.runs {
                caption.visually-hidden { (caption) }
                thead {
                    tr {
                        th scope="col" { "State" }
                        th scope="col" { "Endpoint" }
                        th scope="col" { "Manifest" }
                        th scope="col" { "Exec" }
                        th scope="col" { "Started" }
                        th scope="col" { "Duration" }
                        th scope="col" { "Exit" }
                        th scope="col" { "Output" }
                    }
                }
                tbody {
                    @for run in runs {
                        tr {
                            td { a href=(run_href(run)) { (run_state(run)) } }
                            td { a href={"/?pc=" (urlencode(&run.pc_id))} { (run.pc_id) } }
                            td {
                                a href={"/?manifest=" (urlencode(&run.manifest_id))} { (run.manifest_id) }
                                @if !run.version.is_empty() { span.version { "@" (run.version) } }
                            }
                            td.mono { (run.exec_id) }
                            td { (time(run.started_at)) }
                            td.num { (elapsed(run, now)) }
                            td.num {
                                @if let Some(code) = run.outcome.as_ref().and_then(|o| o.exit_code) { (code) }
                            }
                            td.output { a href=(run_href(run)) { (first_line(run)) } }
                        }
                    }
                }
            }
        }
    }
}

fn urlencode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// What the Activity page shows.
pub struct ActivityView<'a> {
    pub filters: &'a Filters,
    pub running: &'a [ExecutionRow],
    /// More runs are running than `running` holds.
    pub more_running: bool,
    pub runs: &'a [ExecutionRow],
    pub older: Option<&'a str>,
    pub now: DateTime<Utc>,
    pub visitor: &'a Visitor,
    pub grpc_addr: &'a str,
    pub tls: bool,
}

fn filter_form(f: &Filters) -> Markup {
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    let bound =
        |b: &Option<super::filters::TimeBound>| b.as_ref().map(|b| b.text()).unwrap_or_default();
    html! {
        form.filters method="get" action="/" aria-label="Filter runs" {
            fieldset.states {
                legend { "State" }
                @for name in STATE_NAMES {
                    @let checked = f.states.iter().any(|s| s.as_str() == name);
                    label {
                        input type="checkbox" name="state" value=(name) checked[checked];
                        " " (name.replace('_', " "))
                    }
                }
            }
            div.fields {
                label { "Endpoint " input type="text" name="pc" value=(text(&f.pc)) placeholder="pc_id"; }
                label { "Manifest " input type="text" name="manifest" value=(text(&f.manifest)); }
                label { "Exec " input type="text" name="exec" value=(text(&f.exec)); }
                label { "Started after " input type="text" name="after" value=(bound(&f.after)) placeholder="1h, 7d or RFC 3339"; }
                label { "before " input type="text" name="before" value=(bound(&f.before)) placeholder="RFC 3339 or 30m"; }
                button type="submit" { "Apply" }
                @if !f.is_empty() { a href="/" { "Clear filters" } }
            }
        }
    }
}

fn grpcurl_prefix(tls: bool) -> &'static str {
    if tls { "grpcurl" } else { "grpcurl -plaintext" }
}

pub fn activity(v: &ActivityView<'_>) -> Page {
    let main = html! {
        h1 { "Activity" }
        (filter_form(v.filters))
        div data-live {
            @if v.filters.page.is_none() && (v.filters.states.is_empty() || v.filters.states.contains(&RunState::Running)) {
                section.running aria-labelledby="running-now" {
                    h2 #running-now {
                        "Running now "
                        span.count {
                            "(" (v.running.len()) @if v.more_running { "+" } ")"
                        }
                    }
                    @if v.more_running {
                        p { "The newest " (v.running.len()) " are shown: " a href="/?state=running" { "every running run" } }
                    }
                    @if v.running.is_empty() {
                        p.empty { "Nothing is running." }
                    } @else {
                        (runs_table(v.running, v.now, "Runs in progress"))
                    }
                }
            }
            section aria-labelledby="runs" {
                h2 #runs { "Runs" }
                @if v.runs.is_empty() {
                    @if v.filters.is_empty() {
                        div.empty {
                            p { "No runs yet. Run a script through an agent and it shows up here:" }
                            pre { "kanade-agent exec --ingest " (if v.tls { "https://" } else { "http://" }) (v.grpc_addr) " --data-dir ./agent-data --pc-id my-laptop \\\n  --wait --manifest hello -- sh -c 'echo hello from kanade'" }
                            p { "or publish one by hand with grpcurl (README, \"Talking to ingest with grpcurl\"):" }
                            pre { (grpcurl_prefix(v.tls)) " " (v.grpc_addr) " list" }
                        }
                    } @else {
                        p.empty { "No runs match these filters. " a href="/" { "Clear filters" } }
                    }
                } @else {
                    (runs_table(v.runs, v.now, "Runs, newest first"))
                    @if let Some(older) = v.older {
                        p.paging { a href=(older) rel="next" { "Older runs →" } }
                    }
                }
            }
        }
    };
    layout("Activity", "Activity", Some(v.visitor), main)
}

/// What a run page shows.
pub struct RunView<'a> {
    pub run: &'a ExecutionRow,
    pub now: DateTime<Utc>,
    pub trace_url: Option<&'a str>,
    pub grpc_addr: &'a str,
    pub tls: bool,
    pub tokens: bool,
    pub visitor: &'a Visitor,
}

/// One stored output of a finished run.
fn output_block(name: &str, file: &str, run: &ExecutionRow, outcome: &RunOutcome) -> Markup {
    let (text, dropped) = if name == "stdout" {
        (outcome.stdout.as_str(), outcome.stdout_dropped_bytes)
    } else {
        (outcome.stderr.as_str(), outcome.stderr_dropped_bytes)
    };
    html! {
        section.output aria-labelledby={"h-" (name)} {
            h2 #{"h-" (name)} {
                (name) " "
                span.meta { (text.len()) " bytes" }
                " " a.download href={"/runs/" (run.result_id) "/" (file)} download { "download" }
            }
            @if dropped > 0 {
                p.dropped { (dropped) " more bytes were dropped by the agent (output beyond its limit)." }
            }
            @if text.is_empty() {
                p.empty { "(empty)" }
            } @else {
                pre.out #{"out-" (name)} tabindex="0" { (text) }
            }
        }
    }
}

pub fn run(v: &RunView<'_>) -> Page {
    let run = v.run;
    let command = format!(
        "{} {}-d '{{\"result_id\": \"{}\"}}' {} kanade.v1.Activity/GetExecution",
        grpcurl_prefix(v.tls),
        if v.tokens {
            "-H \"authorization: Bearer $KANADE_TOKEN\" "
        } else {
            ""
        },
        run.result_id,
        v.grpc_addr
    );
    // Followed live while it runs; once it has a result its view is final.
    let live = if run.state == RunState::Running {
        "running"
    } else {
        "final"
    };
    let main = html! {
        div data-live=(live) {
            h1 { "Run " span.mono { (run.result_id) } " " (run_state(run)) }
            dl.fields {
                dt { "Endpoint" } dd { a href={"/?pc=" (urlencode(&run.pc_id))} { (run.pc_id) } }
                dt { "Manifest" } dd {
                    a href={"/?manifest=" (urlencode(&run.manifest_id))} { (run.manifest_id) }
                    @if !run.version.is_empty() { span.version { "@" (run.version) } }
                }
                dt { "Exec" } dd.mono { a href={"/?exec=" (urlencode(&run.exec_id))} { (run.exec_id) } }
                dt { "Request" } dd.mono { (run.request_id) }
                dt { "Started" } dd { (time(run.started_at)) }
                dt { "Finished" } dd {
                    @if let Some(o) = &run.outcome { (time(o.finished_at)) } @else { "—" }
                }
                dt { "Duration" } dd { (elapsed(run, v.now)) }
                dt { "Status" } dd {
                    @if let Some(o) = &run.outcome {
                        (o.status.as_str())
                        @if let Some(code) = o.exit_code { ", exit code " (code) }
                    } @else { "no result yet" }
                }
                dt { "Timeout" } dd {
                    @if let Some(t) = run.timeout_secs { (t) " s" } @else { "none" }
                }
                dt { "Received" } dd { (time(run.received_at)) }
                dt { "Trace" } dd.mono {
                    @match (&run.trace_id, v.trace_url) {
                        (Some(id), Some(template)) => a href=(template.replace("{trace_id}", id)) { (id) },
                        (Some(id), None) => (id),
                        (None, _) => "none (the agent exported no trace)",
                    }
                }
                @if let Some(cancel) = &run.cancel {
                    dt { "Cancel" } dd.cancel-note {
                        "requested " (time(cancel.at)) " by " (cancel.by) ": " q { (cancel.reason) }
                        @if run.outcome.is_none() {
                            br;
                            span.cancel-requested {
                                "Waiting for the agent to end the run: it is offline, or too old to know cancel."
                            }
                        }
                    }
                }
            }
            @if let Some(outcome) = &run.outcome {
                (output_block("stdout", "stdout.txt", run, outcome))
                (output_block("stderr", "stderr.txt", run, outcome))
            } @else {
                p.empty.outputs-later {
                    "No result yet: both outputs are stored when the run ends, and show here "
                    "as it writes them meanwhile."
                }
            }
        }
        // The output as the script writes it, outside the live part so what arrived survives the
        // page's re-reads; the script shows it once the stream opens and hides it at the end
        // (the final view then shows the outputs as stored).
        @if run.outcome.is_none() {
            section.tail aria-labelledby="h-tail" data-tail={"/runs/" (run.result_id) "/live"} hidden data-hide-when-final {
                h2 #h-tail { "Live output " span.meta data-tail-notice { "following the run" } }
                h3 { "stdout" }
                pre.out data-tail-stream="stdout" tabindex="0" {}
                h3 { "stderr" }
                pre.out data-tail-stream="stderr" tabindex="0" {}
            }
        }
        // Outside the live part, so a reason being typed survives the page's live re-reads; the
        // script hides it once the run has a result.
        @if run.outcome.is_none() && run.cancel.is_none() && v.visitor.may_act {
            form.cancel method="post" action={"/runs/" (run.result_id) "/cancel"} data-hide-when-final {
                input type="hidden" name="csrf" value=(v.visitor.csrf);
                label {
                    "Reason "
                    input type="text" name="reason" required maxlength="1024"
                        placeholder="why this run is stopped";
                }
                button.danger type="submit" { "Cancel run" }
                p.hint { "The agent ends the run's processes (TERM, then KILL after its grace) and reports it cancelled." }
            }
        }
        section.grpcurl aria-labelledby="h-grpcurl" {
            h2 #h-grpcurl { "The same run with grpcurl " button.copy type="button" data-copy="grpcurl-command" hidden { "Copy" } }
            pre #grpcurl-command tabindex="0" { (command) }
        }
    };
    layout(&format!("Run {}", run.result_id), "", Some(v.visitor), main)
}

fn summary_duration(d: Option<std::time::Duration>) -> String {
    d.and_then(|d| chrono::Duration::from_std(d).ok())
        .map(duration)
        .unwrap_or_else(|| "—".into())
}

pub fn manifests(
    window: &str,
    windows: &[&str],
    summaries: &[ManifestSummary],
    visitor: &Visitor,
) -> Page {
    let main = html! {
        h1 { "Manifests" }
        nav.windows aria-label="Window" {
            "Runs started in the last "
            @for w in windows {
                @if *w == window {
                    a href={"/manifests?window=" (w)} aria-current="page" { (w) }
                } @else {
                    a href={"/manifests?window=" (w)} { (w) }
                }
                " "
            }
        }
        // The summary is an expensive query: re-read at most every half minute.
        div data-live data-live-every="30" {
            @if summaries.is_empty() {
                p.empty { "No runs started in the last " (window) "." }
            } @else {
                div.table-wrap {
                    table.manifests {
                        thead {
                            tr {
                                th scope="col" { "Manifest" }
                                th scope="col" { "Runs" }
                                th scope="col" { "Running" }
                                th scope="col" { "Succeeded" }
                                th scope="col" { "Failed" }
                                th scope="col" { "Lost" }
                                th scope="col" { "p50" }
                                th scope="col" { "p95" }
                                th scope="col" { "Last failure" }
                            }
                        }
                        tbody {
                            @for s in summaries {
                                @let m = urlencode(&s.manifest_id);
                                tr {
                                    td { a href={"/?manifest=" (m) "&after=" (window)} { (s.manifest_id) } }
                                    td.num { (s.runs) }
                                    td.num { (s.running) }
                                    td.num { (s.succeeded) }
                                    td.num {
                                        @if s.failed > 0 {
                                            a.bad href={"/?state=failed&state=timed_out&state=killed&state=spawn_failed&state=interrupted&state=cancelled&manifest=" (m) "&after=" (window)} { (s.failed) }
                                        } @else { "0" }
                                    }
                                    td.num { (s.lost) }
                                    td.num { (summary_duration(s.p50_duration)) }
                                    td.num { (summary_duration(s.p95_duration)) }
                                    td {
                                        @if let Some((id, at)) = s.last_failure {
                                            a href={"/runs/" (id)} { (time(at)) }
                                        } @else { "—" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    layout("Manifests", "Manifests", Some(visitor), main)
}

/// What the endpoints page shows.
pub struct EndpointsView<'a> {
    pub filters: &'a EndpointFilters,
    /// Disconnected and backlogged endpoints (on the unfiltered first page only).
    pub attention: Option<&'a [EndpointRow]>,
    /// More need attention than `attention` holds.
    pub more_attention: bool,
    pub endpoints: &'a [EndpointRow],
    /// The next page's URL.
    pub next: Option<&'a str>,
    pub now: DateTime<Utc>,
    pub visitor: &'a Visitor,
    pub grpc_addr: &'a str,
    pub tls: bool,
}

/// How long ago `at` was, as people read it (the script keeps it current).
fn ago(now: DateTime<Utc>, at: DateTime<Utc>) -> Markup {
    let since = at.to_rfc3339_opts(SecondsFormat::Millis, true);
    html! { span data-since=(since) title=(since) { (duration(now - at)) } " ago" }
}

fn endpoint_state(e: &EndpointRow) -> Markup {
    if e.connected {
        html! { span.state.state-connected { "connected" } }
    } else {
        html! { span.state.state-disconnected { "disconnected" } }
    }
}

fn endpoints_table(rows: &[EndpointRow], now: DateTime<Utc>, caption: &str) -> Markup {
    html! {
        div.table-wrap {
            table.endpoints {
                caption.visually-hidden { (caption) }
                thead {
                    tr {
                        th scope="col" { "Endpoint" }
                        th scope="col" { "Connection" }
                        th scope="col" { "Replica" }
                        th scope="col" { "Backlog" }
                        th scope="col" { "Dead letters" }
                        th scope="col" { "Running" }
                        th scope="col" { "Agent" }
                        th scope="col" { "Host" }
                        th scope="col" { "Reported" }
                    }
                }
                tbody {
                    @for e in rows {
                        @let pc = urlencode(&e.pc_id);
                        tr {
                            td { a href={"/?pc=" (pc)} title="This endpoint's runs" { (e.pc_id) } }
                            td {
                                (endpoint_state(e)) br;
                                span.meta {
                                    @if e.connected { "since " (time(e.connected_since)) }
                                    @else { "last seen " (ago(now, e.last_seen)) }
                                }
                            }
                            td.mono { (e.replica) }
                            @match &e.report {
                                Some(r) => {
                                    td.num {
                                        @if r.outbox_depth > 0 {
                                            span.behind { (r.outbox_depth) " events" }
                                            @if let Some(oldest) = r.oldest_pending_at {
                                                br; span.meta { "oldest " (ago(now, oldest)) }
                                            }
                                        } @else { "0" }
                                    }
                                    td.num {
                                        @if r.dead_letters > 0 { span.bad { (r.dead_letters) } } @else { "0" }
                                    }
                                    td.num {
                                        @if r.running_runs > 0 {
                                            a href={"/?state=running&pc=" (pc)} { (r.running_runs) }
                                        } @else { "0" }
                                    }
                                }
                                None => {
                                    td.num.meta colspan="3" { "not reported (agent too old)" }
                                }
                            }
                            td { (e.agent_version) }
                            td.host {
                                @if let Some(r) = &e.report {
                                    (r.hostname) br; span.meta { (r.os) }
                                }
                            }
                            td {
                                @if let Some(r) = &e.report { (ago(now, r.at)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

pub fn endpoints(v: &EndpointsView<'_>) -> Page {
    let f = v.filters;
    let main = html! {
        h1 { "Endpoints" }
        form.filters method="get" action="/endpoints" aria-label="Filter endpoints" {
            div.fields {
                label { "Endpoint starts with " input type="text" name="prefix" value=(f.prefix.clone().unwrap_or_default()) placeholder="pc_id prefix"; }
                label {
                    "Connection "
                    select name="connected" {
                        option value="" selected[f.connected.is_none()] { "any" }
                        option value="yes" selected[f.connected == Some(true)] { "connected" }
                        option value="no" selected[f.connected == Some(false)] { "disconnected" }
                    }
                }
                button type="submit" { "Apply" }
                @if !f.is_empty() { a href="/endpoints" { "Clear filters" } }
            }
        }
        div data-live {
            @if let Some(attention) = v.attention {
                section.attention aria-labelledby="h-attention" {
                    h2 #h-attention {
                        "Needs attention "
                        span.count { "(" (attention.len()) @if v.more_attention { "+" } ")" }
                    }
                    @if attention.is_empty() {
                        p.empty { "Every endpoint is connected and keeping up." }
                    } @else {
                        p.meta {
                            "Disconnected endpoints (most recently lost first), then those whose oldest waiting event is over a minute old."
                            @if v.more_attention {
                                " The first " (attention.len()) " are shown: " a href="/endpoints?connected=no" { "every disconnected endpoint" }
                            }
                        }
                        (endpoints_table(attention, v.now, "Endpoints that need attention"))
                    }
                }
            }
            section aria-labelledby="h-endpoints" {
                h2 #h-endpoints { "All endpoints" }
                @if v.endpoints.is_empty() {
                    @if f.is_empty() {
                        div.empty {
                            p { "No agent has connected yet. Start one and it shows up here:" }
                            pre { "kanade-agent run --config /etc/kanade/agent.toml   # ingest = \"" (if v.tls { "https://" } else { "http://" }) (v.grpc_addr) "\"" }
                        }
                    } @else {
                        p.empty { "No endpoint matches these filters. " a href="/endpoints" { "Clear filters" } }
                    }
                } @else {
                    (endpoints_table(v.endpoints, v.now, "Endpoints by pc_id"))
                    @if let Some(next) = v.next {
                        p.paging { a href=(next) rel="next" { "More endpoints →" } }
                    }
                }
            }
        }
    };
    layout("Endpoints", "Endpoints", Some(v.visitor), main)
}

pub fn sign_in(next: &str, refused: Option<&str>) -> Page {
    let main = html! {
        h1 { "Sign in" }
        form.signin method="post" action="/signin" {
            @if let Some(message) = refused {
                p.error role="alert" { (message) }
            }
            input type="hidden" name="next" value=(next);
            label {
                "Reader or operator token"
                input type="password" name="token" autocomplete="current-password" required autofocus;
            }
            button type="submit" { "Sign in" }
            p.hint {
                "Make one with " code { "kanade-ingest token add --reader --tokens-file FILE" }
                " (" code { "--operator --name NAME" } " to cancel runs too)."
            }
        }
    };
    layout("Sign in", "", None, main)
}

pub fn sign_out(visitor: &Visitor) -> Page {
    let main = html! {
        h1 { "Sign out" }
        form.signin method="post" action="/signout" {
            input type="hidden" name="csrf" value=(visitor.csrf);
            button type="submit" { "Sign out" }
        }
    };
    layout("Sign out", "", Some(visitor), main)
}

/// Loads `path` again from the console itself (a same-site navigation, so the session cookie
/// comes along), without script: a meta refresh, with a link for browsers that ignore it.
pub fn same_site_reload(path: &str) -> Page {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content={"0;url=" (path)};
                title { "Kanade" }
            }
            body { p { a href=(path) { "Continue to the console" } } }
        }
    };
    Html(page.into_string())
}

pub fn error(title: &str, message: &str) -> Page {
    layout(
        title,
        "",
        None,
        html! {
            h1 { (title) }
            p.error role="alert" { (message) }
            p { a href="/" { "Back to Activity" } }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        let ms = chrono::Duration::milliseconds;
        assert_eq!(duration(ms(850)), "850 ms");
        assert_eq!(duration(ms(12_340)), "12.3 s");
        assert_eq!(duration(ms(245_000)), "4 m 05 s");
        assert_eq!(duration(ms(7_800_000)), "2 h 10 m");
        assert_eq!(duration(ms(-5)), "0 ms");
    }

    #[test]
    fn markup_in_values_is_text() {
        let page = error("x", "<script>alert(1)</script><img src=x onerror=alert(2)>");
        let html = page.0;
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{html}"
        );
    }
}
