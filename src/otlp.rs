//! Telemetry to a collector (feature `otlp`): spans and metrics exported with the
//! OpenTelemetry protocol (OTLP over HTTP, protobuf bodies), configured by the standard
//! `OTEL_*` environment variables.
//!
//! [`App`](crate::App), or [`telemetry::init`](crate::telemetry::init) for a process of
//! your own, sets it up; nothing is exported unless a variable asks for it, so a worker
//! built with the feature and run without a collector sends nothing anywhere:
//!
//! | variable | meaning |
//! | --- | --- |
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` | the collector's base URL (`http://otel-collector:4318`); `/v1/traces` and `/v1/metrics` are appended. Setting it (or a per-signal endpoint) turns export on |
//! | `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` | one signal's full URL, used as it is |
//! | `OTEL_TRACES_EXPORTER`, `OTEL_METRICS_EXPORTER` | `otlp` exports to the default endpoint (`http://localhost:4318`) even with no endpoint set; `none` turns that signal off |
//! | `OTEL_SDK_DISABLED` | `true`: nothing is exported |
//! | `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` | the resource (`service.name` defaults to `unknown_service:<executable>`) |
//! | `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG` | sampling (`parentbased_always_on` by default; `parentbased_traceidratio` with `0.1` keeps a tenth of new traces) |
//! | `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT` | headers sent with each export (an API key), its timeout in milliseconds |
//! | `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` | span batching (every 5 s, 2,048 spans at most queued) |
//! | `OTEL_METRIC_EXPORT_INTERVAL` | how often metrics are pushed, in milliseconds (60,000) |
//!
//! Only the `http/protobuf` protocol is built in (no gRPC stack in the build); the
//! exporter speaks plain HTTP, so run the collector next to the worker (a sidecar or a
//! node agent) and let it forward over TLS. Metrics are the ones of the `metrics` facade
//! listed in `docs/operations.md`, under their OpenTelemetry names
//! (`messaging.process.duration` in seconds, ...), pushed as well as served on
//! `/metrics`. [`Telemetry::shutdown`](crate::telemetry::Telemetry::shutdown) exports
//! what is still buffered, which `App` does after its workers have drained.

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use opentelemetry::{KeyValue, metrics::Meter};
use opentelemetry_sdk::{Resource, metrics::SdkMeterProvider, trace::SdkTracerProvider};
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

/// Bucket bounds of histograms in seconds: the messaging conventions' bounds, plus 30 s
/// and 60 s (the same as the Prometheus recorder's).
const SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
];

/// The meter provider of this process, once [`meter_provider`] made one: the
/// Prometheus recorder forwards the `metrics` facade to it too.
static METER: OnceLock<SdkMeterProvider> = OnceLock::new();

/// Whether a signal (`TRACES`, `METRICS`) is to be exported, by the `OTEL_*` variables.
fn wanted(signal: &str) -> bool {
    wanted_by(signal, |k| std::env::var(k).ok())
}

fn wanted_by(signal: &str, var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |k: &str| var(k).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return false;
    }
    match set(&format!("OTEL_{signal}_EXPORTER")) {
        Some(v) if v.trim().eq_ignore_ascii_case("none") => return false,
        Some(v) if v.split(',').any(|e| e.trim().eq_ignore_ascii_case("otlp")) => return true,
        _ => {}
    }
    set("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || set(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")).is_some()
}

/// The resource of every span and metric: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`
/// and the SDK's own attributes.
fn resource() -> Resource {
    Resource::builder().build()
}

/// A tracer provider with an OTLP batch exporter when the variables ask for one (and the
/// sampler they name); `None` when they do not, or the exporter cannot be built (logged
/// on standard error: the subscriber is not installed yet).
pub(crate) fn tracer_provider() -> Option<SdkTracerProvider> {
    if !wanted("TRACES") {
        return None;
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("warning: OTLP span export is off: {e}");
            return None;
        }
    };
    Some(
        SdkTracerProvider::builder()
            .with_resource(resource())
            .with_batch_exporter(exporter)
            .build(),
    )
}

/// The process's meter provider with an OTLP periodic reader, when the variables ask for
/// one; made once, kept for [`recorder`].
pub(crate) fn meter_provider() -> Option<SdkMeterProvider> {
    if let Some(m) = METER.get() {
        return Some(m.clone());
    }
    if !wanted("METRICS") {
        return None;
    }
    let exporter = match opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("warning: OTLP metric export is off: {e}");
            return None;
        }
    };
    let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(exporter).build();
    let provider = SdkMeterProvider::builder()
        .with_resource(resource())
        .with_reader(reader)
        .build();
    Some(METER.get_or_init(|| provider).clone())
}

/// A `metrics` recorder that records into the OTLP meter provider, if there is one.
pub(crate) fn recorder() -> Option<OtelRecorder> {
    METER.get().map(|p| {
        use opentelemetry::metrics::MeterProvider as _;
        OtelRecorder {
            meter: p.meter("steadfast"),
            described: Mutex::new(HashMap::new()),
        }
    })
}

/// Records the `metrics` facade's counters, gauges and histograms as OpenTelemetry
/// instruments of the same names, units and descriptions; labels become attributes.
pub(crate) struct OtelRecorder {
    meter: Meter,
    described: Mutex<HashMap<String, (Option<Unit>, SharedString)>>,
}

impl std::fmt::Debug for OtelRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtelRecorder").finish_non_exhaustive()
    }
}

impl OtelRecorder {
    fn describe(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.described
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.as_str().to_owned(), (unit, description));
    }

    /// The unit (UCUM, as OpenTelemetry writes it) and description of `name`.
    fn described(&self, name: &str) -> (Option<&'static str>, String) {
        let map = self.described.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(name) {
            Some((unit, text)) => (
                unit.and_then(|u| match u {
                    Unit::Seconds => Some("s"),
                    Unit::Milliseconds => Some("ms"),
                    Unit::Bytes => Some("By"),
                    Unit::Count => Some("1"),
                    _ => None,
                }),
                text.to_string(),
            ),
            None => (None, String::new()),
        }
    }
}

fn attributes(key: &Key) -> Arc<[KeyValue]> {
    key.labels()
        .map(|l| KeyValue::new(l.key().to_owned(), l.value().to_owned()))
        .collect()
}

impl Recorder for OtelRecorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.describe(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.describe(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.describe(key, unit, description);
    }

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let name = key.name().to_owned();
        let (unit, text) = self.described(&name);
        let mut b = self.meter.u64_counter(name).with_description(text);
        if let Some(u) = unit {
            b = b.with_unit(u);
        }
        Counter::from_arc(Arc::new(OtelCounter {
            counter: b.build(),
            attributes: attributes(key),
            last: AtomicU64::new(0),
        }))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let name = key.name().to_owned();
        let (unit, text) = self.described(&name);
        let mut b = self.meter.f64_gauge(name).with_description(text);
        if let Some(u) = unit {
            b = b.with_unit(u);
        }
        Gauge::from_arc(Arc::new(OtelGauge {
            gauge: b.build(),
            attributes: attributes(key),
            value: Mutex::new(0.0),
        }))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let name = key.name().to_owned();
        let (unit, text) = self.described(&name);
        let mut b = self.meter.f64_histogram(name).with_description(text);
        if let Some(u) = unit {
            b = b.with_unit(u);
            if u == "s" {
                b = b.with_boundaries(SECONDS_BUCKETS.to_vec());
            }
        }
        Histogram::from_arc(Arc::new(OtelHistogram {
            histogram: b.build(),
            attributes: attributes(key),
        }))
    }
}

struct OtelCounter {
    counter: opentelemetry::metrics::Counter<u64>,
    attributes: Arc<[KeyValue]>,
    /// The last absolute value set, to turn `absolute` into an increment.
    last: AtomicU64,
}

impl CounterFn for OtelCounter {
    fn increment(&self, value: u64) {
        self.counter.add(value, &self.attributes);
    }

    fn absolute(&self, value: u64) {
        let before = self.last.fetch_max(value, Ordering::Relaxed);
        if value > before {
            self.counter.add(value - before, &self.attributes);
        }
    }
}

struct OtelGauge {
    gauge: opentelemetry::metrics::Gauge<f64>,
    attributes: Arc<[KeyValue]>,
    /// The current value: OpenTelemetry gauges only record, the facade also adds.
    value: Mutex<f64>,
}

impl OtelGauge {
    fn update(&self, f: impl FnOnce(f64) -> f64) {
        let mut v = self.value.lock().unwrap_or_else(|p| p.into_inner());
        *v = f(*v);
        self.gauge.record(*v, &self.attributes);
    }
}

impl GaugeFn for OtelGauge {
    fn increment(&self, value: f64) {
        self.update(|v| v + value);
    }

    fn decrement(&self, value: f64) {
        self.update(|v| v - value);
    }

    fn set(&self, value: f64) {
        self.update(|_| value);
    }
}

struct OtelHistogram {
    histogram: opentelemetry::metrics::Histogram<f64>,
    attributes: Arc<[KeyValue]>,
}

impl HistogramFn for OtelHistogram {
    fn record(&self, value: f64) {
        self.histogram.record(value, &self.attributes);
    }
}

#[cfg(test)]
mod tests {
    use super::wanted_by;

    fn with<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn export_is_on_only_when_a_variable_asks_for_it() {
        assert!(!wanted_by("TRACES", with(&[])));
        let endpoint = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")];
        assert!(wanted_by("TRACES", with(&endpoint)));
        assert!(wanted_by("METRICS", with(&endpoint)));
        let traces_only = [(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://collector:4318/v1/traces",
        )];
        assert!(wanted_by("TRACES", with(&traces_only)));
        assert!(!wanted_by("METRICS", with(&traces_only)));
        assert!(wanted_by(
            "METRICS",
            with(&[("OTEL_METRICS_EXPORTER", "otlp")])
        ));
        let off = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_METRICS_EXPORTER", "none"),
        ];
        assert!(wanted_by("TRACES", with(&off)));
        assert!(!wanted_by("METRICS", with(&off)));
        let disabled = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_SDK_DISABLED", "true"),
        ];
        assert!(!wanted_by("TRACES", with(&disabled)));
        assert!(!wanted_by(
            "TRACES",
            with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])
        ));
    }
}
