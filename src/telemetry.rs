//! Telemetry shared by both programs: logs, and OpenTelemetry traces over OTLP/gRPC.
//!
//! Logs are human-readable by default, JSON on request, filtered by `RUST_LOG` (else the
//! program's default, usually `info`), always on stderr so stdout stays for answers. Traces are exported only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set; otherwise no OpenTelemetry layer is installed at all,
//! so tracing costs what plain `tracing` costs. The standard variables are honoured by the
//! OpenTelemetry SDK itself: `OTEL_SERVICE_NAME` (default: the program's name),
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`/`_ARG`, `OTEL_BSP_*`.
//!
//! A run's W3C trace context travels in `Event.trace_context`; [`inject`] and [`extract`] move
//! it between spans and that map.

use std::{
    collections::{BTreeMap, HashMap},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use opentelemetry::{Context, propagation::TextMapPropagator, trace::TracerProvider as _};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing::Level;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer, filter::Targets, fmt, layer::SubscriberExt, util::SubscriberInitExt,
};

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The OpenTelemetry SDK's own limit on a span's links, for a program whose spans link little.
pub const SDK_MAX_LINKS_PER_SPAN: u32 = 128;

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are being exported (`OTEL_EXPORTER_OTLP_ENDPOINT` is set). Callers skip
/// context bookkeeping when they are not.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes what is buffered.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the exporter (bounded, so a dead collector cannot hold the exit).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(err) = provider.shutdown_with_timeout(Duration::from_secs(5))
        {
            eprintln!("flushing traces failed: {err}");
        }
    }
}

fn tracer_provider(
    default_service_name: &'static str,
    max_links_per_span: u32,
) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| format!("OTLP exporter: {e}"))?;
    let mut resource = Resource::builder();
    let named_by_env = std::env::var_os("OTEL_SERVICE_NAME").is_some()
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|a| a.contains("service.name="));
    if !named_by_env {
        resource = resource.with_service_name(default_service_name);
    }
    let mut builder = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build());
    if std::env::var_os("OTEL_SPAN_LINK_COUNT_LIMIT").is_none() {
        builder = builder.with_max_links_per_span(max_links_per_span);
    }
    Ok(builder.build())
}

/// Installs logging and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, trace export. Call once,
/// inside the tokio runtime (the OTLP exporter runs on it). `default_filter` applies when
/// `RUST_LOG` is not set (e.g. `"info"`); `max_links_per_span` when `OTEL_SPAN_LINK_COUNT_LIMIT`
/// is not (ingest's batch span links every event of its batch).
pub fn init(
    format: LogFormat,
    default_service_name: &'static str,
    default_filter: &str,
    max_links_per_span: u32,
) -> Telemetry {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let logs = match format {
        LogFormat::Text => fmt::layer()
            .with_writer(std::io::stderr)
            // Colours for a person at a terminal; plain text for journald, files and pipes.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => fmt::layer().json().with_writer(std::io::stderr).boxed(),
    };
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default();
    let (provider, problem) = if endpoint.is_empty() {
        (None, None)
    } else {
        match tracer_provider(default_service_name, max_links_per_span) {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        }
    };
    let traces = provider.as_ref().map(|p| {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        // Only Kanade's own spans are exported: the HTTP/2 and gRPC libraries' spans would drown
        // them, and the exporter's own requests would trace themselves in a loop.
        let kanade = Targets::new()
            .with_target("kanade_agent", Level::INFO)
            .with_target("kanade_ingest", Level::INFO)
            .with_target("kanade_shared", Level::INFO);
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(default_service_name))
            .with_filter(kanade)
    });
    tracing_subscriber::registry()
        .with(traces)
        .with(logs.with_filter(filter))
        .init();
    EXPORTING.store(provider.is_some(), Ordering::Relaxed);
    if let Some(problem) = problem {
        tracing::error!(%endpoint, %problem, "traces are not exported");
    } else if provider.is_some() {
        tracing::info!(%endpoint, "exporting traces over OTLP/gRPC");
    }
    Telemetry { provider }
}

/// The W3C trace context of `span`, as carried in `Event.trace_context`. Empty when traces are
/// not exported.
pub fn inject(span: &tracing::Span) -> BTreeMap<String, String> {
    let mut carrier = HashMap::new();
    if exporting() {
        TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    }
    carrier.into_iter().collect()
}

/// The context a carried W3C trace context names (empty when there is none).
pub fn extract<'a>(carrier: impl IntoIterator<Item = (&'a str, &'a str)>) -> Context {
    let map: HashMap<String, String> = carrier
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    TraceContextPropagator::new().extract(&map)
}

/// Makes `span` a child of the carried context, and records its trace id in the span's
/// `trace_id` field so log lines show it. A no-op when traces are not exported.
pub fn continue_trace<'a>(
    span: &tracing::Span,
    carrier: impl IntoIterator<Item = (&'a str, &'a str)>,
) {
    if !exporting() {
        return;
    }
    let parent = extract(carrier);
    use opentelemetry::trace::TraceContextExt;
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    record_trace_id(span);
}

/// Records the span's trace id in its `trace_id` field (declared `Empty` by the caller).
pub fn record_trace_id(span: &tracing::Span) {
    if !exporting() {
        return;
    }
    use opentelemetry::trace::TraceContextExt;
    let context = span.context();
    let id = context.span().span_context().trace_id();
    span.record("trace_id", tracing::field::display(id));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_carried_traceparent_is_extracted() {
        use opentelemetry::trace::TraceContextExt;
        let carrier = [(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )];
        let cx = extract(carrier);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
    }

    #[test]
    fn nothing_is_injected_when_traces_are_not_exported() {
        assert!(!exporting());
        assert!(inject(&tracing::info_span!("run")).is_empty());
    }
}
