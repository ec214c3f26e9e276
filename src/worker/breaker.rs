//! The kill switch: a circuit breaker that stops a worker's intake when too many of its
//! messages fail, and tries again after a cooldown.
//!
//! Closed (normal) → **open** when, over the sliding `window`, at least `min_messages`
//! outcomes were seen and the share of failures reached `threshold`. Open: the worker
//! drops its subscription, so the broker takes back what was prefetched and not started
//! (handlers already running finish and settle as usual); readiness is false and the
//! worker's state is [`WorkerState::Paused`](super::WorkerState::Paused). After
//! `cooldown` it subscribes again **half-open**: it takes `trial` messages and waits for
//! their outcomes; all succeed → closed, any fails → open again for another cooldown.
//!
//! Metrics (labelled `messaging.system` and `messaging.consumer.group.name` like the
//! worker's others): [`OPEN`] is 1 while intake is stopped, [`TRIPS`] counts the trips.
//!
//! Failures are handler failures (retried or dead-lettered with a transient or permanent
//! error, timeouts and panics included); undecodable or malformed input does not count,
//! nor do duplicates or deferrals.

use super::Outcome;
use crate::error::ErrorKind;
use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};
use tokio::time::Instant;

/// `steadfast.worker.kill_switch.open`: 1 while the kill switch holds intake stopped
/// (open), 0 otherwise.
pub const OPEN: &str = "steadfast.worker.kill_switch.open";
/// `steadfast.worker.kill_switch.trips`: how many times it stopped intake.
pub const TRIPS: &str = "steadfast.worker.kill_switch.trips";

/// The kill switch's settings; give it to [`WorkerBuilder::kill_switch`](super::WorkerBuilder::kill_switch).
///
/// ```
/// use std::time::Duration;
/// use steadfast::worker::KillSwitch;
/// let k = KillSwitch::new(0.15, 10, Duration::from_secs(60))
///     .cooldown(Duration::from_secs(30))
///     .trial(3);
/// assert_eq!(k, KillSwitch::default());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KillSwitch {
    threshold: f64,
    min_messages: u32,
    window: Duration,
    cooldown: Duration,
    trial: u32,
}

impl Default for KillSwitch {
    /// 15 % of at least 10 messages within 60 s; 30 s cooldown; a trial of 3.
    fn default() -> Self {
        Self::new(0.15, 10, Duration::from_secs(60))
    }
}

/// Environment variables read by [`KillSwitch::from_env`].
pub mod env {
    /// `on` (with the defaults) or `off`; any other `STEADFAST_KILL_SWITCH_*` also turns
    /// it on.
    pub const ENABLED: &str = "STEADFAST_KILL_SWITCH";
    /// The failure share that trips it, `0.15` or `15%`.
    pub const THRESHOLD: &str = "STEADFAST_KILL_SWITCH_THRESHOLD";
    /// The fewest outcomes in the window before it may trip.
    pub const MIN_MESSAGES: &str = "STEADFAST_KILL_SWITCH_MIN_MESSAGES";
    /// The sliding window, e.g. `60s`.
    pub const WINDOW: &str = "STEADFAST_KILL_SWITCH_WINDOW";
    /// How long it stays open, e.g. `30s`.
    pub const COOLDOWN: &str = "STEADFAST_KILL_SWITCH_COOLDOWN";
    /// How many messages the half-open trial takes.
    pub const TRIAL: &str = "STEADFAST_KILL_SWITCH_TRIAL";
}

impl KillSwitch {
    /// Trips when at least `min_messages` outcomes within `window` include a share of
    /// failures of `threshold` (0..=1) or more. Cooldown 30 s and a trial of 3 messages.
    pub fn new(threshold: f64, min_messages: u32, window: Duration) -> Self {
        Self {
            threshold,
            min_messages,
            window,
            cooldown: Duration::from_secs(30),
            trial: 3,
        }
    }

    /// How long intake stays stopped before the trial (default 30 s).
    #[must_use]
    pub fn cooldown(mut self, d: Duration) -> Self {
        self.cooldown = d;
        self
    }

    /// How many messages the half-open trial takes (default 3).
    #[must_use]
    pub fn trial(mut self, n: u32) -> Self {
        self.trial = n;
        self
    }

    /// The kill switch configured by the environment ([`mod@env`]), `None` when no
    /// variable turns it on. A malformed value is an error naming the variable.
    ///
    /// ```
    /// // With nothing set, there is no kill switch.
    /// assert_eq!(steadfast::worker::KillSwitch::from_env(), Ok(None));
    /// ```
    pub fn from_env() -> Result<Option<Self>, String> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    pub(crate) fn from_lookup(
        mut get: impl FnMut(&str) -> Option<String>,
    ) -> Result<Option<Self>, String> {
        let vars = [
            env::THRESHOLD,
            env::MIN_MESSAGES,
            env::WINDOW,
            env::COOLDOWN,
            env::TRIAL,
        ];
        let enabled = match get(env::ENABLED).map(|v| v.trim().to_ascii_lowercase()) {
            Some(v) if matches!(v.as_str(), "off" | "false" | "0" | "no") => return Ok(None),
            Some(v) if matches!(v.as_str(), "on" | "true" | "1" | "yes") => true,
            Some(v) => return Err(format!("{}: expected on or off, got `{v}`", env::ENABLED)),
            None => vars.iter().any(|k| get(k).is_some()),
        };
        if !enabled {
            return Ok(None);
        }
        let mut k = Self::default();
        if let Some(v) = get(env::THRESHOLD) {
            let v = v.trim();
            k.threshold = match v.strip_suffix('%') {
                Some(p) => p.trim().parse::<f64>().map(|p| p / 100.0),
                None => v.parse::<f64>(),
            }
            .map_err(|_| {
                format!(
                    "{}: expected a share like 0.15 or 15%, got `{v}`",
                    env::THRESHOLD
                )
            })?;
        }
        let dur = |name: &str, v: String| {
            humantime::parse_duration(v.trim())
                .map_err(|_| format!("{name}: expected a duration like 60s, got `{v}`"))
        };
        let count = |name: &str, v: String| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| format!("{name}: expected a whole number, got `{v}`"))
        };
        if let Some(v) = get(env::MIN_MESSAGES) {
            k.min_messages = count(env::MIN_MESSAGES, v)?;
        }
        if let Some(v) = get(env::WINDOW) {
            k.window = dur(env::WINDOW, v)?;
        }
        if let Some(v) = get(env::COOLDOWN) {
            k.cooldown = dur(env::COOLDOWN, v)?;
        }
        if let Some(v) = get(env::TRIAL) {
            k.trial = count(env::TRIAL, v)?;
        }
        k.problems().map(|()| Some(k))
    }

    /// What is wrong with the settings (checked by the worker builder too).
    pub(crate) fn problems(&self) -> Result<(), String> {
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err("the kill switch threshold must be above 0 and at most 1".into());
        }
        if self.min_messages == 0 || self.trial == 0 {
            return Err("the kill switch needs at least 1 message to judge and to try".into());
        }
        if self.window.is_zero() || self.cooldown.is_zero() {
            return Err("the kill switch window and cooldown must be above zero".into());
        }
        Ok(())
    }
}

/// Where the breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { admitted: u32, succeeded: u32 },
}

/// The breaker's state, shared by the worker loop and the in-flight futures.
pub(crate) struct Breaker {
    cfg: KillSwitch,
    inner: Mutex<State>,
    trips: AtomicU64,
    open_gauge: metrics::Gauge,
    trips_counter: metrics::Counter,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("cfg", &self.cfg)
            .field("trips", &self.trips())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// (when, failed) of the outcomes within the window.
    recent: VecDeque<(Instant, bool)>,
}

impl Breaker {
    pub(crate) fn new(cfg: KillSwitch, system: &'static str, group: &str) -> Self {
        let labels = [
            ("messaging.system", system.to_owned()),
            ("messaging.consumer.group.name", group.to_owned()),
        ];
        metrics::describe_gauge!(OPEN, "1 while the kill switch holds intake stopped");
        metrics::describe_counter!(TRIPS, "times the kill switch stopped intake");
        let open_gauge = metrics::gauge!(OPEN, &labels);
        open_gauge.set(0.0);
        Self {
            cfg,
            inner: Mutex::new(State {
                phase: Phase::Closed,
                recent: VecDeque::new(),
            }),
            trips: AtomicU64::new(0),
            open_gauge,
            trips_counter: metrics::counter!(TRIPS, &labels),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn phase(&self) -> Phase {
        self.lock().phase
    }

    /// How many times it tripped.
    pub(crate) fn trips(&self) -> u64 {
        self.trips.load(Ordering::Relaxed)
    }

    /// Whether intake may take one more message now.
    pub(crate) fn admits(&self) -> bool {
        match self.lock().phase {
            Phase::Closed => true,
            Phase::Open { .. } => false,
            Phase::HalfOpen { admitted, .. } => admitted < self.cfg.trial,
        }
    }

    /// Intake took a message.
    pub(crate) fn admitted(&self) {
        if let Phase::HalfOpen { admitted, .. } = &mut self.lock().phase {
            *admitted += 1;
        }
    }

    /// The cooldown is over: start the trial.
    pub(crate) fn half_open(&self) {
        let mut st = self.lock();
        if matches!(st.phase, Phase::Open { .. }) {
            st.phase = Phase::HalfOpen {
                admitted: 0,
                succeeded: 0,
            };
            st.recent.clear();
            self.open_gauge.set(0.0);
        }
    }

    /// Re-subscribing failed: stay open for another cooldown.
    pub(crate) fn reopen(&self) {
        self.lock().phase = Phase::Open {
            until: Instant::now() + self.cfg.cooldown,
        };
        self.open_gauge.set(1.0);
    }

    /// Records an outcome.
    pub(crate) fn record(&self, outcome: &Outcome) {
        let failed = match outcome {
            Outcome::Acked | Outcome::Duplicate => Some(false),
            Outcome::Retried { .. } => Some(true),
            // Bad input is not the handler's failure.
            Outcome::DeadLettered(f) => Some(f.kind != ErrorKind::Decode),
            _ => None,
        };
        match failed {
            Some(failed) => self.record_at(Instant::now(), failed),
            None => self.ignore(),
        }
    }

    /// An outcome that says nothing about the handler: a trial slot it used is given back.
    fn ignore(&self) {
        if let Phase::HalfOpen { admitted, .. } = &mut self.lock().phase {
            *admitted = admitted.saturating_sub(1);
        }
    }

    fn record_at(&self, now: Instant, failed: bool) {
        let mut st = self.lock();
        match st.phase {
            Phase::Open { .. } => {} // stragglers of before the trip
            Phase::HalfOpen {
                admitted,
                succeeded,
            } => {
                if failed {
                    self.trip(&mut st, now);
                } else if succeeded + 1 >= self.cfg.trial {
                    st.phase = Phase::Closed;
                    st.recent.clear();
                    tracing::info!("kill switch closed: the trial messages succeeded");
                } else {
                    st.phase = Phase::HalfOpen {
                        admitted,
                        succeeded: succeeded + 1,
                    };
                }
            }
            Phase::Closed => {
                st.recent.push_back((now, failed));
                while st
                    .recent
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > self.cfg.window)
                {
                    st.recent.pop_front();
                }
                let total = st.recent.len();
                let failures = st.recent.iter().filter(|(_, f)| *f).count();
                #[allow(clippy::cast_precision_loss)]
                let share = failures as f64 / total.max(1) as f64;
                if total >= self.cfg.min_messages as usize && share >= self.cfg.threshold {
                    tracing::warn!(
                        failures,
                        total,
                        window = ?self.cfg.window,
                        cooldown = ?self.cfg.cooldown,
                        "kill switch tripped: intake stopped"
                    );
                    self.trip(&mut st, now);
                }
            }
        }
    }

    fn trip(&self, st: &mut State, now: Instant) {
        st.phase = Phase::Open {
            until: now + self.cfg.cooldown,
        };
        st.recent.clear();
        self.trips.fetch_add(1, Ordering::Relaxed);
        self.trips_counter.increment(1);
        self.open_gauge.set(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ks() -> KillSwitch {
        KillSwitch::new(0.5, 4, Duration::from_secs(10))
            .cooldown(Duration::from_secs(5))
            .trial(2)
    }

    #[tokio::test(start_paused = true)]
    async fn trips_on_the_share_in_the_window_and_recovers_by_trial() {
        let b = Breaker::new(ks(), "memory", "g");
        let t0 = Instant::now();
        // Three failures are not enough messages to judge.
        for _ in 0..3 {
            b.record_at(t0, true);
        }
        assert_eq!(b.phase(), Phase::Closed);
        // Old outcomes leave the window.
        b.record_at(t0 + Duration::from_secs(11), false);
        assert_eq!(b.phase(), Phase::Closed);
        let t1 = t0 + Duration::from_secs(12);
        for _ in 0..3 {
            b.record_at(t1, true);
        }
        assert!(matches!(b.phase(), Phase::Open { .. }));
        assert!(!b.admits());
        assert_eq!(b.trips(), 1);
        // Half-open: two trial messages, a failure reopens.
        b.half_open();
        assert!(b.admits());
        b.admitted();
        b.admitted();
        assert!(!b.admits(), "the trial takes only 2");
        b.record_at(t1, false);
        b.record_at(t1, true);
        assert!(matches!(b.phase(), Phase::Open { .. }));
        assert_eq!(b.trips(), 2);
        // Two successes close it.
        b.half_open();
        b.record_at(t1, false);
        b.record_at(t1, false);
        assert_eq!(b.phase(), Phase::Closed);
        assert!(b.admits());
    }

    #[test]
    fn env_config() {
        let none = KillSwitch::from_lookup(|_| None);
        assert_eq!(none, Ok(None));
        let on = KillSwitch::from_lookup(|k| (k == env::ENABLED).then(|| "on".to_owned()));
        assert_eq!(on, Ok(Some(KillSwitch::default())));
        let custom = KillSwitch::from_lookup(|k| match k {
            env::THRESHOLD => Some("25%".into()),
            env::COOLDOWN => Some("5s".into()),
            _ => None,
        })
        .unwrap()
        .unwrap();
        assert_eq!(
            custom,
            KillSwitch::new(0.25, 10, Duration::from_secs(60)).cooldown(Duration::from_secs(5))
        );
        let bad = KillSwitch::from_lookup(|k| (k == env::WINDOW).then(|| "soon".to_owned()));
        assert!(bad.unwrap_err().contains(env::WINDOW));
        let off = KillSwitch::from_lookup(|k| {
            (k == env::ENABLED || k == env::TRIAL).then(|| "off".to_owned())
        });
        assert_eq!(off, Ok(None));
    }
}
