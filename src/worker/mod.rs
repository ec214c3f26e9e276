//! The worker: pulls deliveries from a transport, runs up to `concurrency` of them
//! through the pipeline at once (each handler call guarded by a timeout and panic capture),
//! and shuts down gracefully.

mod breaker;
mod builder;
pub mod metrics;
mod pipeline;
pub mod send;

pub use breaker::{
    KillSwitch, OPEN as KILL_SWITCH_OPEN, TRIPS as KILL_SWITCH_TRIPS, env as kill_switch_env,
};
pub use builder::{BuildError, MAX_CONCURRENCY, WorkerBuilder};
pub use pipeline::{Outcome, Processed};

use crate::transport::{Health, Subscription, Transport, TransportError};
use futures::{FutureExt, StreamExt, stream::FuturesUnordered};
use pipeline::Shared;
use std::{
    future::Future,
    panic::AssertUnwindSafe,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};
use tokio::{sync::watch, time::Instant};

/// How often a running worker's loop records that it is alive.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// A running worker whose loop has not recorded a heartbeat for this long is not live:
/// something blocks its task (a handler doing blocking work on the async thread, say).
pub const LIVENESS_STALL: Duration = Duration::from_secs(15);

/// Consumes one consumer group's messages and routes them by name to handlers.
///
/// ```
/// use std::time::Duration;
/// use steadfast::{Context, HandlerError, Message, RetryPolicy, Worker, transport::memory::MemoryTransport};
///
/// #[derive(serde::Serialize, serde::Deserialize, Message)]
/// #[message(name = "orders.placed")]
/// struct OrderPlaced { #[message(key)] order_id: u64 }
///
/// async fn on_order(msg: OrderPlaced, _cx: Context) -> Result<(), HandlerError> {
///     println!("order {}", msg.order_id);
///     Ok(())
/// }
///
/// # fn main() -> Result<(), steadfast::worker::BuildError> {
/// let worker = Worker::builder(MemoryTransport::new(), "billing")
///     .handle(on_order)
///     .retry(RetryPolicy::exponential(Duration::from_millis(200)).max_attempts(5))
///     .concurrency(32)
///     .handler_timeout(Duration::from_secs(10))
///     .build()?;
/// // worker.run().await runs until SIGTERM or ctrl-c.
/// # drop(worker); Ok(()) }
/// ```
#[derive(Debug)]
pub struct Worker {
    shared: Arc<Shared>,
    subscription: Subscription,
    concurrency: usize,
    drain_timeout: Duration,
    state: watch::Sender<WorkerState>,
    heartbeat: Arc<Heartbeat>,
}

/// When the worker loop last went round, as milliseconds since `epoch`.
#[derive(Debug)]
struct Heartbeat {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Heartbeat {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn beat(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn age(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// Where a worker is in its life (for readiness).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Built, not yet consuming.
    Starting,
    /// Consuming.
    Running,
    /// The kill switch stopped intake after too many failures; it tries again after its
    /// cooldown. Not ready.
    Paused,
    /// Intake stopped; finishing in-flight work.
    Draining,
    /// Done.
    Stopped,
}

/// A cheap handle to a worker's state, for health endpoints.
///
/// Readiness and liveness are computed from the state, the transport's health and the
/// loop's heartbeat only, never from a broker round trip.
#[derive(Debug, Clone)]
pub struct StatusHandle {
    group: Arc<str>,
    state: watch::Receiver<WorkerState>,
    transport: Arc<dyn Transport>,
    heartbeat: Arc<Heartbeat>,
    breaker: Option<Arc<breaker::Breaker>>,
}

impl StatusHandle {
    /// The worker's consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The worker's state.
    pub fn state(&self) -> WorkerState {
        *self.state.borrow()
    }

    /// Ready to take messages: running (consumers started, not draining) and the
    /// transport is connected.
    pub fn is_ready(&self) -> bool {
        self.state() == WorkerState::Running && self.transport.health() == Health::Connected
    }

    /// The transport's health.
    pub fn transport_health(&self) -> Health {
        self.transport.health()
    }

    /// Alive: the worker's loop is not stuck. Independent of the broker, so an outage
    /// does not get every replica restarted: a running worker is live while its loop
    /// went round within [`LIVENESS_STALL`]; starting, draining and stopped workers are
    /// live (start-up and drain are bounded by their own timeouts).
    pub fn is_live(&self) -> bool {
        self.state() != WorkerState::Running || self.heartbeat.age() < LIVENESS_STALL
    }

    /// How long ago the worker's loop last recorded a heartbeat.
    pub fn heartbeat_age(&self) -> Duration {
        self.heartbeat.age()
    }

    /// Waits until the state changes (or the worker is gone), for servers that report it.
    pub async fn changed(&mut self) -> WorkerState {
        let _ = self.state.changed().await;
        self.state()
    }

    /// How many times the kill switch stopped intake (0 without a kill switch).
    pub fn kill_switch_trips(&self) -> u64 {
        self.breaker.as_ref().map_or(0, |b| b.trips())
    }
}

/// Why a worker stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// Declaring or subscribing failed at start-up.
    #[error("could not subscribe consumer group `{group}`: {source}")]
    Subscribe {
        /// The group.
        group: String,
        /// Why.
        #[source]
        source: TransportError,
    },
    /// The transport closed the delivery stream while the worker was running.
    #[error("the transport closed the delivery stream of group `{0}`")]
    StreamEnded(String),
}

impl Worker {
    /// Starts building a worker for `group` on `transport`.
    pub fn builder(transport: impl Transport, group: impl Into<String>) -> WorkerBuilder {
        WorkerBuilder::new(Arc::new(transport), group.into())
    }

    /// Starts building a worker on a transport shared with others.
    pub fn builder_shared(
        transport: Arc<dyn Transport>,
        group: impl Into<String>,
    ) -> WorkerBuilder {
        WorkerBuilder::new(transport, group.into())
    }

    /// The subscription this worker consumes (group, names, limits).
    pub fn subscription(&self) -> &Subscription {
        &self.subscription
    }

    /// A handle to the worker's state, for readiness checks.
    pub fn status(&self) -> StatusHandle {
        StatusHandle {
            group: self.shared.group.clone(),
            state: self.state.subscribe(),
            transport: self.shared.transport.clone(),
            heartbeat: self.heartbeat.clone(),
            breaker: self.shared.breaker.clone(),
        }
    }

    /// Declares the worker's topology without consuming (so producers can publish before
    /// the first worker starts).
    pub async fn declare(&self) -> Result<(), WorkerError> {
        self.shared
            .transport
            .declare(&self.subscription)
            .await
            .map_err(|source| WorkerError::Subscribe {
                group: self.subscription.group.clone(),
                source,
            })
    }

    /// Runs until SIGTERM or ctrl-c, then drains and returns.
    pub async fn run(self) -> Result<(), WorkerError> {
        self.run_until(shutdown_signal()).await
    }

    /// Runs until `shutdown` completes: then stops intake, lets in-flight handlers finish
    /// within the drain timeout, and returns. Handlers still running at the deadline are
    /// abandoned unsettled, so the broker redelivers their messages.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
        let group = self.subscription.group.clone();
        let stream = self
            .shared
            .transport
            .subscribe(&self.subscription)
            .await
            .map_err(|source| WorkerError::Subscribe {
                group: group.clone(),
                source,
            })?;
        self.heartbeat.beat();
        self.state.send_replace(WorkerState::Running);
        tracing::info!(group = %group, names = ?self.subscription.names, "worker started");

        // In-flight deliveries are futures owned by this task, at most `concurrency` of
        // them. Each handler call is guarded (timeout, panic capture) inside its future;
        // abandoning work at the drain deadline is dropping the set, which drops each
        // delivery unsettled so the broker redelivers it.
        let shared: &Shared = &self.shared;
        let breaker = shared.breaker.as_deref();
        let mut in_flight = FuturesUnordered::new();
        let mut stream = Some(stream);
        tokio::pin!(shutdown);
        let mut result = Ok(());
        // The heartbeat: a timer arm polled only when nothing else is ready (an idle
        // loop), and every 1024 turns of a busy loop, whose other arms are always ready.
        // Either way a loop that stops turning stops beating.
        let mut beat = tokio::time::interval(HEARTBEAT_EVERY);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The in-flight gauge is sampled with the heartbeat, so counting costs the
        // per-message path nothing.
        let beat_now = |in_flight: usize| {
            self.heartbeat.beat();
            shared.metrics.in_flight.set(in_flight as f64);
            let ready = *self.state.borrow() == WorkerState::Running
                && shared.transport.health() == Health::Connected;
            shared.metrics.ready.set(if ready { 1.0 } else { 0.0 });
        };
        let mut turns: u32 = 0;
        let mut suspects_pause_until = Instant::now();
        loop {
            turns = turns.wrapping_add(1);
            if turns.is_multiple_of(1024) {
                beat_now(in_flight.len());
            }
            // The kill switch tripped: drop the subscription, so what the broker handed
            // out and we did not start goes back; running handlers finish as usual.
            let reopen_at = match breaker.map(breaker::Breaker::phase) {
                Some(breaker::Phase::Open { until }) => {
                    if stream.take().is_some() {
                        self.state.send_replace(WorkerState::Paused);
                        tracing::warn!(group = %group, "kill switch open: intake stopped until {:?} from now", until.saturating_duration_since(tokio::time::Instant::now()));
                    }
                    Some(until)
                }
                _ => None,
            };
            let admits = breaker.is_none_or(breaker::Breaker::admits);
            // Suspects wait (see `transport::crash`): start nothing else, and once nothing
            // runs, take them one at a time, so a crash during one is its own.
            let isolate = stream.is_some()
                && Instant::now() >= suspects_pause_until
                && shared.transport.suspects_waiting(&group);
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                () = std::future::ready(()), if isolate && in_flight.is_empty() => {
                    match shared.transport.take_suspect(&self.subscription).await {
                        Ok(Some(delivery)) => {
                            tracing::info!(group = %group, id = %delivery.envelope.id, crashes = ?delivery.crashes, "running a suspect alone");
                            in_flight.push(guard(pipeline::process(shared, delivery)));
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(group = %group, error = %e, "could not take a suspect; trying again in a second");
                            suspects_pause_until = Instant::now() + Duration::from_secs(1);
                        }
                    }
                }
                () = sleep_until(reopen_at), if reopen_at.is_some() => {
                    if let Some(b) = breaker {
                        b.half_open();
                        match shared.transport.subscribe(&self.subscription).await {
                            Ok(s) => {
                                stream = Some(s);
                                self.state.send_replace(WorkerState::Running);
                                tracing::info!(group = %group, "kill switch half-open: trying a few messages");
                            }
                            Err(e) => {
                                tracing::warn!(group = %group, error = %e, "kill switch: could not subscribe again; staying paused");
                                b.reopen();
                            }
                        }
                    }
                }
                next = next_of(&mut stream), if stream.is_some() && admits && !isolate && in_flight.len() < self.concurrency => match next {
                    Some(Ok(delivery)) => {
                        if let Some(b) = breaker {
                            b.admitted();
                        }
                        in_flight.push(guard(pipeline::process(shared, delivery)));
                    }
                    Some(Err(e)) => {
                        tracing::warn!(group = %group, error = %e, "delivery stream error; continuing");
                    }
                    None => {
                        result = Err(WorkerError::StreamEnded(group.clone()));
                        break;
                    }
                },
                _ = beat.tick() => beat_now(in_flight.len()),
            }
        }

        // Readiness goes false first (Draining), then intake stops: the consumer is
        // cancelled, nothing new arrives.
        self.state.send_replace(WorkerState::Draining);
        shared.metrics.ready.set(0.0);
        drop(stream);
        tracing::info!(group = %group, in_flight = in_flight.len(), "draining");
        let drained = tokio::time::timeout(self.drain_timeout, async {
            while in_flight.next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                group = %group,
                left = in_flight.len(),
                "drain deadline passed; abandoning unfinished work unsettled for redelivery"
            );
            drop(in_flight);
        }
        shared.metrics.in_flight.set(0.0);
        self.state.send_replace(WorkerState::Stopped);
        tracing::info!(group = %group, "worker stopped");
        result
    }
}

/// The next delivery of the subscription, or never while there is none (kill switch open).
async fn next_of(
    stream: &mut Option<crate::transport::DeliveryStream>,
) -> Option<Result<crate::transport::Delivery, TransportError>> {
    match stream {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Keeps a panic that escapes the pipeline (an `on_outcome` hook, say) from taking the
/// worker down; handler panics are already caught, and turned into transient failures,
/// inside the pipeline.
fn guard(fut: impl Future<Output = ()>) -> impl Future<Output = ()> {
    // A combinator rather than an `async fn`, which would hold `fut` twice.
    AssertUnwindSafe(fut).catch_unwind().map(|r| {
        if r.is_err() {
            tracing::error!(
                "a panic escaped the message pipeline; the delivery goes back to the broker"
            );
        }
    })
}

/// Completes on SIGTERM or ctrl-c (SIGINT).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
