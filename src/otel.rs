//! Trace context across services (feature `otel`): the current span's context is written
//! into a message's headers when it is published or enqueued in an outbox, and read back
//! when it is consumed, so the worker's `process` span is a child of the producer's span.
//!
//! The format is the one of the OpenTelemetry global text-map propagator; install the W3C
//! one (`traceparent`/`tracestate`) at start-up, with `tracing-opentelemetry`'s layer in
//! your subscriber:
//!
//! ```
//! use opentelemetry_sdk::propagation::TraceContextPropagator;
//! opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
//! ```
//!
//! Without a propagator or without the layer nothing is written or read, and nothing
//! fails. A message that already carries a `traceparent` (a retry copy, an outbox row
//! whose context was captured when it was enqueued) keeps it.

use crate::envelope::{Headers, header};
use opentelemetry::{
    propagation::{Extractor, Injector},
    trace::TraceContextExt,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Inject<'a>(&'a mut Headers);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

struct Extract<'a>(&'a Headers);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k).collect()
    }
}

/// Writes the current span's context into `headers`, unless they already carry a
/// `traceparent` or there is no valid current span.
pub(crate) fn inject_current(headers: &mut Headers) {
    if let Some(trace) = current_context(headers) {
        for (k, v) in trace.iter() {
            headers.insert(k, v);
        }
    }
}

/// The headers that carry the current span's context, if `existing` does not carry a
/// `traceparent` already and there is a valid current span.
pub(crate) fn current_context(existing: &Headers) -> Option<Headers> {
    if existing.get(header::TRACEPARENT).is_some() {
        return None;
    }
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut out = Headers::new();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut Inject(&mut out))
    });
    Some(out).filter(|h| !h.is_empty())
}

/// Makes the producer's context in `headers`, if any, the parent of `span` (a span not
/// entered yet).
pub(crate) fn set_parent(span: &tracing::Span, headers: &Headers) {
    if headers.is_empty() {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Extract(headers)));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// The OpenTelemetry trace and span ids of a `tracing` span, as lower-case hex, when the
/// OpenTelemetry layer is installed and the span's context is valid.
#[cfg(feature = "app")]
pub(crate) fn ids_of(id: &tracing::span::Id) -> Option<(String, String)> {
    let cx = tracing::dispatcher::get_default(|d| tracing_opentelemetry::get_otel_context(id, d))?;
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// The tracer provider the app installs: without an exporter, spans still get ids and
/// carry trace context across the broker.
#[cfg(feature = "app")]
pub(crate) fn tracer_provider() -> opentelemetry_sdk::trace::SdkTracerProvider {
    opentelemetry_sdk::trace::SdkTracerProvider::builder().build()
}

/// Adds to `span` (a relay's `send` span) a link to the context each envelope carries.
pub(crate) fn link_to_senders(span: &tracing::Span, envelopes: &[crate::Envelope]) {
    for e in envelopes {
        if e.headers.get(header::TRACEPARENT).is_none() {
            continue;
        }
        let cx =
            opentelemetry::global::get_text_map_propagator(|p| p.extract(&Extract(&e.headers)));
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            span.add_link(sc);
        }
    }
}
