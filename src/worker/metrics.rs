//! The worker's metrics, through the `metrics` facade.
//!
//! Every handle is registered once, when the worker is built, so the per-message cost is
//! an atomic add on a handle: no name lookup, no label allocation. Labels are fixed per
//! worker (messaging system, consumer group) plus a closed set of outcomes and error
//! types; nothing per message (no id, no key, no incoming name).
//!
//! Handles bind to the recorder installed when the worker is built: install the
//! recorder (for example `steadfast::http::Prometheus::install`) first.

use super::pipeline::Outcome;
use crate::error::ErrorKind;
use metrics::{Counter, Gauge, Histogram, Unit};

/// `messaging.client.consumed.messages` (OpenTelemetry semantic conventions): deliveries
/// handed to the worker.
pub const CONSUMED: &str = "messaging.client.consumed.messages";
/// `messaging.process.duration` (OpenTelemetry semantic conventions): seconds from a
/// delivery's arrival in the worker to its settlement, labelled `error.type` when it
/// failed.
pub const PROCESS_DURATION: &str = "messaging.process.duration";
/// `steadfast.worker.outcomes`: settled deliveries by `outcome` (`acked`, `duplicate`,
/// `retried`, `deferred`, `dead_lettered`, `not_settled`).
pub const OUTCOMES: &str = "steadfast.worker.outcomes";
/// `steadfast.worker.in_flight`: deliveries being processed now, sampled every second
/// (and every 1024 turns of a busy worker loop).
pub const IN_FLIGHT: &str = "steadfast.worker.in_flight";
/// `steadfast.worker.ready`: 1 while the worker is ready (consuming, connected, not
/// paused by the kill switch, not draining), as `/readyz` says; sampled every second.
pub const READY: &str = "steadfast.worker.ready";

/// The handles of one worker.
pub(super) struct WorkerMetrics {
    pub(super) consumed: Counter,
    pub(super) in_flight: Gauge,
    pub(super) ready: Gauge,
    acked: Counter,
    duplicate: Counter,
    retried: Counter,
    deferred: Counter,
    dead_lettered: Counter,
    not_settled: Counter,
    duration_ok: Histogram,
    duration_transient: Histogram,
    duration_permanent: Histogram,
    duration_decode: Histogram,
    duration_not_settled: Histogram,
}

/// What a delivery ended as, for the metrics: cheap to return from the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fate {
    Acked,
    Duplicate,
    Retried,
    Deferred,
    DeadLettered(ErrorKind),
    NotSettled,
}

impl Fate {
    pub(super) fn of(o: &Outcome) -> Self {
        match o {
            Outcome::Acked => Self::Acked,
            Outcome::Duplicate => Self::Duplicate,
            Outcome::Retried { .. } => Self::Retried,
            Outcome::Deferred { .. } => Self::Deferred,
            Outcome::DeadLettered(f) => Self::DeadLettered(f.kind),
            Outcome::NotSettled(_) => Self::NotSettled,
        }
    }
}

impl WorkerMetrics {
    pub(super) fn new(system: &'static str, group: &str) -> Self {
        describe();
        crate::transport::reconnects(system).increment(0);
        let base = [
            ("messaging.system", system.to_owned()),
            ("messaging.consumer.group.name", group.to_owned()),
            ("messaging.operation.name", "process".to_owned()),
        ];
        let with = |k: &'static str, v: &'static str| {
            let mut l: Vec<(&'static str, String)> = base.to_vec();
            l.push((k, v.to_owned()));
            l
        };
        let outcome = |v| metrics::counter!(OUTCOMES, &with("outcome", v));
        let duration = |e: Option<&'static str>| match e {
            None => metrics::histogram!(PROCESS_DURATION, &base),
            Some(e) => metrics::histogram!(PROCESS_DURATION, &with("error.type", e)),
        };
        Self {
            consumed: metrics::counter!(CONSUMED, &base),
            in_flight: metrics::gauge!(IN_FLIGHT, &base[..2]),
            ready: metrics::gauge!(READY, &base[..2]),
            acked: outcome("acked"),
            duplicate: outcome("duplicate"),
            retried: outcome("retried"),
            deferred: outcome("deferred"),
            dead_lettered: outcome("dead_lettered"),
            not_settled: outcome("not_settled"),
            duration_ok: duration(None),
            duration_transient: duration(Some("transient")),
            duration_permanent: duration(Some("permanent")),
            duration_decode: duration(Some("decode")),
            duration_not_settled: duration(Some("not_settled")),
        }
    }

    /// Counts one settled delivery and its duration in seconds.
    pub(super) fn settled(&self, s: Fate, seconds: f64) {
        let (counter, histogram) = match s {
            Fate::Acked => (&self.acked, &self.duration_ok),
            Fate::Duplicate => (&self.duplicate, &self.duration_ok),
            Fate::Deferred => (&self.deferred, &self.duration_ok),
            Fate::Retried => (&self.retried, &self.duration_transient),
            Fate::DeadLettered(kind) => (
                &self.dead_lettered,
                match kind {
                    ErrorKind::Permanent => &self.duration_permanent,
                    ErrorKind::Decode => &self.duration_decode,
                    _ => &self.duration_transient,
                },
            ),
            Fate::NotSettled => (&self.not_settled, &self.duration_not_settled),
        };
        counter.increment(1);
        histogram.record(seconds);
    }
}

fn describe() {
    metrics::describe_counter!(
        CONSUMED,
        Unit::Count,
        "Messages delivered to the application."
    );
    metrics::describe_histogram!(
        PROCESS_DURATION,
        Unit::Seconds,
        "Duration of processing a delivery, from arrival in the worker to settlement."
    );
    metrics::describe_counter!(
        OUTCOMES,
        Unit::Count,
        "Settled deliveries by outcome: acked, duplicate, retried, deferred, dead_lettered, not_settled."
    );
    metrics::describe_gauge!(IN_FLIGHT, Unit::Count, "Deliveries being processed now.");
    metrics::describe_gauge!(READY, "1 while the worker is ready to take messages.");
    super::send::describe();
}
