//! Structured logs (pretty or JSON) and optional OTLP trace export.
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Keeps the exporter alive; flushed on [`Telemetry::shutdown`].
pub struct Telemetry {
    provider: SdkTracerProvider,
}

pub fn init(service: &'static str, filter: &str, json: bool, otlp_endpoint: Option<&str>) -> anyhow::Result<Telemetry> {
    // W3C trace context in NATS headers works with or without an exporter.
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // The provider always exists so trace context flows through this service even when it
    // exports nothing; the exporter is added only with an endpoint.
    let mut provider = SdkTracerProvider::builder()
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(service).build());
    if let Some(endpoint) = otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build()?;
        provider = provider.with_batch_exporter(exporter);
    }
    let provider = provider.build();
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer(service));
    let fmt = if json {
        tracing_subscriber::fmt::layer().json().flatten_event(true).boxed()
    } else {
        tracing_subscriber::fmt::layer().boxed()
    };
    tracing_subscriber::registry().with(EnvFilter::try_new(filter)?).with(fmt).with(otel).try_init()?;
    if let Some(endpoint) = otlp_endpoint {
        tracing::info!(endpoint, "exporting traces over OTLP");
    }
    Ok(Telemetry { provider })
}

impl Telemetry {
    /// Flushes pending spans. Runs on a blocking thread: on the actix system thread the flush
    /// would block the runtime the exporter needs.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    }
}
