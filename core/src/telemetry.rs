//! Logs, traces and metrics for every role.
//!
//! - **Logs** go to stderr (command output stays clean on stdout), as text or one JSON object per line
//!   (`telemetry.log_format`). `RUST_LOG` selects levels; the default is `info` with chatty libraries at `warn`.
//! - **Traces**: `tracing` spans become OpenTelemetry spans and are exported over OTLP. A trace follows an event
//!   from the gRPC or HTTP request (a caller's `traceparent` is continued) through the Kafka produce (the
//!   `traceparent` travels in the record's headers) to the archiver's file and upload, and restorer calls get
//!   their own spans.
//! - **Metrics** (names in [`crate::metrics`]) are recorded once through the OpenTelemetry API and leave the
//!   process two ways: pushed over OTLP, and served in Prometheus text format by the operations endpoint (`cli/src/ops.rs`).
//!
//! Configuration follows the standard OpenTelemetry environment variables, read by the SDK and the OTLP
//! exporter: `OTEL_SERVICE_NAME` (default `chatvault-<role>`), `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]{ENDPOINT,PROTOCOL,HEADERS,TIMEOUT,COMPRESSION}`,
//! `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_METRIC_EXPORT_INTERVAL`, `OTEL_BSP_*`, and, implemented here because
//! opentelemetry-rust does not, `OTEL_SDK_DISABLED` and `OTEL_{TRACES,METRICS}_EXPORTER=otlp|none`.
//!
//! Two deliberate choices: OTLP export only starts when an endpoint is set (or `OTEL_*_EXPORTER=otlp` asks for
//! the default `localhost` one), so a deployment without a collector does not log export failures forever;
//! and an unreachable collector is never an error: exports fail in the background (the SDK logs them), the
//! archive does not notice. `OTEL_SDK_DISABLED=true` switches off traces and OTLP export; `/metrics` is
//! governed by `telemetry.metrics_listen` alone.

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapCompositePropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue, global};
use opentelemetry_otlp::{MetricExporter, SpanExporter};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TelemetryConfig};
use crate::error::{Error, Result};

const DEFAULT_FILTER: &str = "info,rdkafka=warn,h2=warn,hyper=warn,tower=warn,opentelemetry=warn";

/// Text logs to stderr, no traces or metrics: for client commands and tests.
pub fn init_logging() {
    let _ = tracing_subscriber::registry()
        .with(log_layer(LogFormat::Text))
        .try_init();
}

fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
}

fn log_layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_target(true)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => layer.with_filter(env_filter()).boxed(),
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(env_filter())
            .boxed(),
    }
}

/// The installed telemetry of a role process. [`Telemetry::shutdown`] flushes what is buffered; call it last.
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: SdkMeterProvider,
    registry: prometheus::Registry,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("traces", &self.tracer_provider.is_some())
            .finish_non_exhaustive()
    }
}

/// What the environment asks of one signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Export {
    Off,
    Grpc,
    Http,
}

fn env_var(env: &HashMap<String, String>, name: &str) -> Option<String> {
    env.get(name)
        .map(|value| value.trim().to_string())
        .filter(|value| !value.is_empty())
}

/// Decides whether and how `signal` (`TRACES` or `METRICS`) is exported, from the standard variables.
fn export_choice(env: &HashMap<String, String>, signal: &str) -> Result<Export> {
    if env_var(env, "OTEL_SDK_DISABLED").is_some_and(|value| value.eq_ignore_ascii_case("true")) {
        return Ok(Export::Off);
    }
    let exporter_var = format!("OTEL_{signal}_EXPORTER");
    let asked = match env_var(env, &exporter_var).as_deref() {
        None => false,
        Some("none") => return Ok(Export::Off),
        Some("otlp") => true,
        Some(other) => {
            return Err(Error::invalid_argument(format!(
                "{exporter_var}: `{other}` is not supported; use otlp or none"
            )));
        }
    };
    let endpoint_set = env_var(env, "OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || env_var(env, &format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")).is_some();
    if !asked && !endpoint_set {
        return Ok(Export::Off);
    }
    let protocol_var = format!("OTEL_EXPORTER_OTLP_{signal}_PROTOCOL");
    let protocol = env_var(env, &protocol_var)
        .map(|value| (protocol_var.clone(), value))
        .or_else(|| {
            env_var(env, "OTEL_EXPORTER_OTLP_PROTOCOL")
                .map(|value| ("OTEL_EXPORTER_OTLP_PROTOCOL".to_string(), value))
        });
    match protocol {
        None => Ok(Export::Grpc),
        Some((_, value)) if value == "grpc" => Ok(Export::Grpc),
        Some((_, value)) if value == "http/protobuf" => Ok(Export::Http),
        Some((name, value)) => Err(Error::invalid_argument(format!(
            "{name}: `{value}` is not supported; use grpc or http/protobuf"
        ))),
    }
}

fn resource(default_service_name: &str, env: &HashMap<String, String>) -> Resource {
    // The builder reads OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME; the role's name only fills in when the
    // environment names no service.
    let mut builder = Resource::builder()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if env_var(env, "OTEL_SERVICE_NAME").is_none() {
        builder = builder.with_service_name(default_service_name.to_string());
    }
    builder.build()
}

impl Telemetry {
    /// Installs logging, tracing and metrics for a role process named `service_name` (for example
    /// `chatvault-gateway`). Must run inside the Tokio runtime (the gRPC exporter needs it). Fails only on
    /// invalid settings, never because a collector is unreachable.
    pub fn install(service_name: &str, config: &TelemetryConfig) -> Result<Telemetry> {
        let env: HashMap<String, String> = std::env::vars().collect();
        let trace_export = export_choice(&env, "TRACES")?;
        let metric_export = export_choice(&env, "METRICS")?;
        let resource = resource(service_name, &env);

        global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
            Box::new(TraceContextPropagator::new()),
            Box::new(BaggagePropagator::new()),
        ]));

        let tracer_provider = match trace_export {
            Export::Off => None,
            choice => {
                let exporter = match choice {
                    Export::Http => SpanExporter::builder().with_http().build(),
                    _ => SpanExporter::builder().with_tonic().build(),
                }
                .map_err(|error| {
                    Error::invalid_argument(format!("OTLP trace exporter: {error}"))
                })?;
                Some(
                    SdkTracerProvider::builder()
                        .with_resource(resource.clone())
                        .with_batch_exporter(exporter)
                        .build(),
                )
            }
        };

        let registry = prometheus::Registry::new();
        let prometheus_reader = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .scope_info_enabled(false)
            .build()
            .map_err(|error| Error::internal(format!("prometheus exporter: {error}")))?;
        let mut meter_builder = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(prometheus_reader);
        if metric_export != Export::Off {
            let exporter = match metric_export {
                Export::Http => MetricExporter::builder().with_http().build(),
                _ => MetricExporter::builder().with_tonic().build(),
            }
            .map_err(|error| Error::invalid_argument(format!("OTLP metric exporter: {error}")))?;
            meter_builder = meter_builder.with_periodic_exporter(exporter);
        }
        let meter_provider = meter_builder.build();
        global::set_meter_provider(meter_provider.clone());

        let otel_layer = tracer_provider.as_ref().map(|provider| {
            global::set_tracer_provider(provider.clone());
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("chatvault"))
                .with_filter(EnvFilter::new("info"))
        });
        tracing_subscriber::registry()
            .with(log_layer(config.log_format))
            .with(otel_layer)
            .try_init()
            .map_err(|error| Error::internal(format!("installing the log subscriber: {error}")))?;
        tracing::info!(
            service = service_name,
            traces = ?trace_export,
            otlp_metrics = ?metric_export,
            "telemetry installed"
        );
        Ok(Telemetry {
            tracer_provider,
            meter_provider,
            registry,
        })
    }

    /// The current metrics in Prometheus text format (`text/plain; version=0.0.4`).
    pub fn prometheus_text(&self) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|error| format!("# encoding metrics failed: {error}\n"))
    }

    /// Exports what is buffered and stops the exporters. Bounded: the SDK's own export timeouts apply, and
    /// an unreachable collector only costs that timeout.
    pub fn shutdown(self) {
        if let Some(provider) = &self.tracer_provider
            && let Err(error) = provider.shutdown_with_timeout(Duration::from_secs(5))
        {
            tracing::warn!(%error, "flushing traces at shutdown failed");
        }
        if let Err(error) = self
            .meter_provider
            .shutdown_with_timeout(Duration::from_secs(5))
        {
            tracing::warn!(%error, "flushing metrics at shutdown failed");
        }
    }
}

/// Reads propagation headers (`traceparent`, `tracestate`, `baggage`) from HTTP headers or gRPC metadata.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
}

/// A lone W3C `traceparent` value, as the archiver keeps it from a Kafka record's headers.
struct TraceparentExtractor<'a>(&'a str);

impl Extractor for TraceparentExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

fn extract_context(carrier: &dyn Extractor) -> Context {
    global::get_text_map_propagator(|propagator| propagator.extract(carrier))
}

/// Makes `span` a child of the remote parent named by `headers` (HTTP headers, or gRPC metadata through
/// `metadata.as_ref()`); no-op when they name none.
pub fn continue_remote_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    let parent = extract_context(&HeaderExtractor(headers));
    if parent.has_active_span() {
        let _ = span.set_parent(parent);
    }
}

/// The server span of one gRPC call of `service` (for example `chatvault.v1.IngestService`), continuing the
/// caller's trace. `events` may be recorded on it; [`record_span_error`] marks a failure.
pub fn grpc_server_span(
    service: &'static str,
    method: &'static str,
    metadata: &tonic::metadata::MetadataMap,
) -> tracing::Span {
    let span = tracing::info_span!(
        "grpc",
        otel.name = format!("{service}/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        events = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        error.code = tracing::field::Empty,
    );
    continue_remote_trace(&span, metadata.as_ref());
    span
}

/// Marks `span` (one declaring `otel.status_code` and `error.code`) as failed with `code`.
pub fn record_span_error(span: &tracing::Span, code: crate::ErrorCode) {
    span.record("otel.status_code", "ERROR");
    span.record("error.code", code.as_str());
}

/// For a span that processes records from many traces (an archive batch): continues the trace of the first
/// `traceparent` and links to the others. Call before the span is first entered.
pub fn continue_batch_traces(span: &tracing::Span, traceparents: &[String]) {
    let mut contexts = traceparents
        .iter()
        .map(|traceparent| extract_context(&TraceparentExtractor(traceparent)));
    if let Some(first) = contexts.next()
        && first.has_active_span()
    {
        let _ = span.set_parent(first);
    }
    for context in contexts {
        let linked = context.span().span_context().clone();
        if linked.is_valid() {
            span.add_link(linked);
        }
    }
}

/// The propagation headers of `span`, for carriers we write (Kafka records). Empty when traces are off.
pub fn propagation_headers(span: &tracing::Span) -> Vec<(String, String)> {
    struct Collect(Vec<(String, String)>);
    impl Injector for Collect {
        fn set(&mut self, key: &str, value: String) {
            self.0.push((key.to_string(), value));
        }
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut headers = Collect(Vec::new());
    global::get_text_map_propagator(|propagator| propagator.inject_context(&context, &mut headers));
    headers.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn export_starts_only_when_asked_and_honours_the_standard_variables() {
        assert_eq!(export_choice(&env(&[]), "TRACES").unwrap(), Export::Off);
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
        assert_eq!(
            export_choice(&env(&[endpoint]), "TRACES").unwrap(),
            Export::Grpc
        );
        assert_eq!(
            export_choice(&env(&[("OTEL_METRICS_EXPORTER", "otlp")]), "METRICS").unwrap(),
            Export::Grpc
        );
        assert_eq!(
            export_choice(
                &env(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]),
                "METRICS"
            )
            .unwrap(),
            Export::Http
        );
        // The signal-specific protocol wins over the general one.
        assert_eq!(
            export_choice(
                &env(&[
                    endpoint,
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                    ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
                ]),
                "TRACES"
            )
            .unwrap(),
            Export::Grpc
        );
        assert_eq!(
            export_choice(&env(&[endpoint, ("OTEL_SDK_DISABLED", "true")]), "TRACES").unwrap(),
            Export::Off
        );
        assert_eq!(
            export_choice(
                &env(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")]),
                "TRACES"
            )
            .unwrap(),
            Export::Off
        );
        let error = export_choice(
            &env(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]),
            "TRACES",
        )
        .unwrap_err();
        assert!(
            error.message().contains("OTEL_EXPORTER_OTLP_PROTOCOL"),
            "{error}"
        );
        let error =
            export_choice(&env(&[("OTEL_TRACES_EXPORTER", "zipkin")]), "TRACES").unwrap_err();
        assert!(error.message().contains("OTEL_TRACES_EXPORTER"), "{error}");
    }
}
