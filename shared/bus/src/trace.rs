//! W3C trace context (`traceparent`, `tracestate`) carried in NATS headers, so one request is
//! one distributed trace across every service. The format is the process's global text-map
//! propagator, which the service shell sets to W3C trace context at start-up.
use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::{Context, global};
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Inject<'a>(&'a mut HeaderMap);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct Extract<'a>(&'a HeaderMap);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes the current span's context into `headers` (nothing when no trace is active).
pub fn inject_current(headers: &mut HeaderMap) {
    inject(&tracing::Span::current().context(), headers);
}

/// Writes `cx` into `headers` (nothing when it holds no valid span).
pub fn inject(cx: &Context, headers: &mut HeaderMap) {
    if cx.span().span_context().is_valid() {
        global::get_text_map_propagator(|p| p.inject_context(cx, &mut Inject(headers)));
    }
}

/// The remote parent carried by `headers`, if any.
pub fn extract(headers: Option<&HeaderMap>) -> Context {
    match headers {
        Some(h) => global::get_text_map_propagator(|p| p.extract(&Extract(h))),
        None => Context::new(),
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceContextExt;

    use super::*;

    #[test]
    fn trace_context_survives_a_hop_through_headers() {
        global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut incoming = HeaderMap::new();
        incoming.insert("traceparent", traceparent);
        let cx = extract(Some(&incoming));
        assert_eq!(cx.span().span_context().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let mut outgoing = HeaderMap::new();
        inject(&cx, &mut outgoing);
        assert_eq!(outgoing.get("traceparent").map(|v| v.as_str()), Some(traceparent));
        assert!(!extract(None).span().span_context().is_valid());
    }
}
