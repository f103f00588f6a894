//! An OTLP/gRPC collector on a loopback TCP port: it speaks the OpenTelemetry collector protocol
//! (`opentelemetry.proto.collector.{trace,metrics}.v1`) and keeps what it receives, so tests can check the
//! spans and metrics a chatvault process exports.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

/// A span as received, with the resource's `service.name`.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub service: String,
    pub span: Span,
}

impl ReceivedSpan {
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// A string attribute of the span.
    pub fn attribute(&self, key: &str) -> Option<String> {
        self.span
            .attributes
            .iter()
            .find(|attribute| attribute.key == key)
            .and_then(|attribute| attribute.value.as_ref())
            .and_then(|value| value.value.as_ref())
            .map(|value| match value {
                Value::StringValue(text) => text.clone(),
                Value::IntValue(number) => number.to_string(),
                Value::BoolValue(flag) => flag.to_string(),
                Value::DoubleValue(number) => number.to_string(),
                other => format!("{other:?}"),
            })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[derive(Debug, Default)]
struct Received {
    spans: Vec<ReceivedSpan>,
    metric_names: BTreeSet<String>,
    metric_exports: usize,
}

#[derive(Clone, Default)]
struct Collector {
    received: Arc<Mutex<Received>>,
}

fn service_name(resource: Option<&opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
    resource
        .into_iter()
        .flat_map(|resource| resource.attributes.iter())
        .find(|attribute| attribute.key == "service.name")
        .and_then(|attribute| attribute.value.as_ref())
        .and_then(|value| match &value.value {
            Some(Value::StringValue(name)) => Some(name.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.received.lock().expect("collector lock");
        for resource_spans in request.into_inner().resource_spans {
            let service = service_name(resource_spans.resource.as_ref());
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    received.spans.push(ReceivedSpan {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut received = self.received.lock().expect("collector lock");
        received.metric_exports += 1;
        for resource_metrics in request.into_inner().resource_metrics {
            for scope_metrics in resource_metrics.scope_metrics {
                for metric in scope_metrics.metrics {
                    received.metric_names.insert(metric.name);
                }
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

pub struct OtlpCollector {
    /// `http://127.0.0.1:<port>`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: String,
    collector: Collector,
    task: JoinHandle<()>,
}

impl OtlpCollector {
    pub async fn start() -> anyhow::Result<OtlpCollector> {
        Self::start_at("127.0.0.1:0").await
    }

    /// Starts on `address` (`host:port`), for a process that was told the endpoint before it started.
    pub async fn start_at(address: &str) -> anyhow::Result<OtlpCollector> {
        let listener = TcpListener::bind(address).await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let collector = Collector::default();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .add_service(MetricsServiceServer::new(collector.clone()));
        let task = tokio::spawn(async move {
            let _ = server
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        Ok(OtlpCollector {
            endpoint,
            collector,
            task,
        })
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.collector
            .received
            .lock()
            .expect("collector lock")
            .spans
            .clone()
    }

    /// Names of every metric received so far.
    pub fn metric_names(&self) -> BTreeSet<String> {
        self.collector
            .received
            .lock()
            .expect("collector lock")
            .metric_names
            .clone()
    }
}

impl Drop for OtlpCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}
