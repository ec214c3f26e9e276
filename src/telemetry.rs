//! Logs and traces of a worker process (feature `app`); [`App`](crate::App) calls
//! [`init`] unless told not to.
//!
//! - Logs go to standard output, filtered by `RUST_LOG` (default `info`): one JSON object
//!   per line (`timestamp`, `level`, `target`, `fields`, `span`, and with `otel` the
//!   current `trace_id` and `span_id`) or human-readable lines.
//! - With `otel`, spans become OpenTelemetry spans, and the W3C trace-context propagator
//!   is installed so trace context crosses the broker (see [`crate::otel`]).
//! - With `otlp`, spans and metrics are exported to a collector when the `OTEL_*`
//!   variables ask for it (see [`crate::otlp`]); [`Telemetry::shutdown`] flushes them.
//!
//! ```
//! use steadfast::{config::LogFormat, telemetry};
//! let t = telemetry::init(LogFormat::Json);
//! tracing::info!(answer = 42, "logged as JSON");
//! t.shutdown();
//! ```

use crate::config::LogFormat;
use std::{fmt, io};
use tracing::{Event, Subscriber};
use tracing_subscriber::{
    EnvFilter, Layer,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    layer::SubscriberExt,
    registry::LookupSpan,
    util::SubscriberInitExt,
};

/// What [`init`] set up; [`shutdown`](Telemetry::shutdown) flushes it before exit.
pub struct Telemetry {
    #[cfg(feature = "otel")]
    tracer: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    #[cfg(feature = "otlp")]
    meter: Option<opentelemetry_sdk::metrics::SdkMeterProvider>,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Flushes and stops what was set up (spans still buffered are exported).
    pub fn shutdown(self) {
        // Spans and metrics flush at once: a collector that does not answer holds the
        // exit for one export timeout (the SDK's 5 s), not one per signal.
        std::thread::scope(|s| {
            #[cfg(feature = "otlp")]
            if let Some(m) = self.meter {
                s.spawn(move || {
                    if let Err(e) = m.shutdown() {
                        tracing::warn!(error = %e, "could not flush metrics");
                    }
                });
            }
            #[cfg(feature = "otel")]
            if let Some(t) = self.tracer
                && let Err(e) = t.shutdown()
            {
                tracing::warn!(error = %e, "could not flush spans");
            }
            let _ = s;
        });
    }
}

/// Installs the process's `tracing` subscriber: logs in `format` on standard output and,
/// with `otel`, OpenTelemetry spans. If a subscriber is already installed, it is kept and
/// nothing is changed.
pub fn init(format: LogFormat) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(io::stdout)
            .boxed(),
        _ => tracing_subscriber::fmt::layer()
            .with_writer(io::stdout)
            .event_format(JsonLines)
            .boxed(),
    };
    let registry = tracing_subscriber::registry().with(filter).with(logs);
    #[cfg(feature = "otel")]
    {
        use opentelemetry::trace::TracerProvider as _;
        #[cfg(feature = "otlp")]
        let provider = crate::otlp::tracer_provider().unwrap_or_else(crate::otel::tracer_provider);
        #[cfg(not(feature = "otlp"))]
        let provider = crate::otel::tracer_provider();
        // Made before any worker: the Prometheus recorder forwards to it.
        #[cfg(feature = "otlp")]
        let meter = crate::otlp::meter_provider();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("steadfast"));
        if registry.with(layer).try_init().is_err() {
            return Telemetry {
                tracer: None,
                #[cfg(feature = "otlp")]
                meter,
            };
        }
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        opentelemetry::global::set_tracer_provider(provider.clone());
        Telemetry {
            tracer: Some(provider),
            #[cfg(feature = "otlp")]
            meter,
        }
    }
    #[cfg(not(feature = "otel"))]
    {
        let _ = registry.try_init();
        Telemetry {}
    }
}

/// One JSON object per event, in the shape of `tracing-subscriber`'s JSON format plus the
/// OpenTelemetry ids of the current span.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut fields = serde_json::Map::new();
        event.record(&mut Fields(&mut fields));
        let mut line = serde_json::Map::new();
        line.insert(
            "timestamp".into(),
            humantime::format_rfc3339_micros(std::time::SystemTime::now())
                .to_string()
                .into(),
        );
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        line.insert("fields".into(), fields.into());
        if let Some(span) = ctx.lookup_current() {
            let mut s = serde_json::Map::new();
            s.insert("name".into(), span.name().into());
            line.insert("span".into(), s.into());
            #[cfg(feature = "otel")]
            if let Some((trace_id, span_id)) = crate::otel::ids_of(&span.id()) {
                line.insert("trace_id".into(), trace_id.into());
                line.insert("span_id".into(), span_id.into());
            }
        }
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// An event's fields as JSON values.
struct Fields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for Fields<'_> {
    fn record_f64(&mut self, f: &tracing::field::Field, v: f64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_i64(&mut self, f: &tracing::field::Field, v: i64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_u64(&mut self, f: &tracing::field::Field, v: u64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_bool(&mut self, f: &tracing::field::Field, v: bool) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn fmt::Debug) {
        self.0.insert(f.name().into(), format!("{v:?}").into());
    }
}
