//! Testing helpers for users' own tests: run a worker on the in-memory transport until
//! it is idle, then look at what was acked, retried and dead-lettered, and why.
//!
//! Use tokio's paused clock (`#[tokio::test(start_paused = true)]`): retry delays then
//! cost no wall time, and the delays observed are exact.
//!
//! ```
//! use std::time::Duration;
//! use steadfast::{Context, HandlerError, Message, RetryPolicy, Worker};
//! use steadfast::testing::TestHarness;
//! use steadfast::transport::memory::MemoryTransport;
//! use steadfast::worker::Outcome;
//!
//! #[derive(serde::Serialize, serde::Deserialize, Message)]
//! #[message(name = "orders.placed")]
//! struct OrderPlaced { #[message(key)] order_id: u64 }
//!
//! async fn flaky(msg: OrderPlaced, cx: Context) -> Result<(), HandlerError> {
//!     if cx.attempt() < 3 { return Err(HandlerError::msg("database busy")); }
//!     Ok(())
//! }
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let broker = MemoryTransport::new();
//! let builder = Worker::builder(broker.clone(), "billing")
//!     .handle(flaky)
//!     .retry(RetryPolicy::exponential(Duration::from_secs(1)).jitter(0.0));
//! let harness = TestHarness::start(&broker, builder).await.unwrap();
//! let id = harness.publish(&OrderPlaced { order_id: 1 }).await.unwrap();
//! let report = harness.run_until_idle().await;
//! assert_eq!(report.outcomes(id), [
//!     Outcome::Retried { delay: Duration::from_secs(1) },
//!     Outcome::Retried { delay: Duration::from_secs(2) },
//!     Outcome::Acked,
//! ]);
//! harness.stop().await.unwrap();
//! # }
//! ```

pub mod conformance;
pub mod stores;

use crate::{
    envelope::{EncodeError, Envelope, MessageId},
    message::Message,
    outbox::RelayBuilder,
    transport::{DeadLetter, Transport, TransportError, memory::MemoryTransport},
    worker::{BuildError, Outcome, Processed, WorkerBuilder, WorkerError},
};
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The relay settings steadfast's own fault tests run with, for a user's fault tests to
/// start from: claims of 200 rows, a poll every 200 ms, an 8 s claim lease, a 5 s publish
/// timeout, and retries from 200 ms up to 2 s for 1,000 attempts, so that a broker node
/// that is away for a minute delays rows instead of parking them.
///
/// ```
/// use std::sync::Arc;
/// use steadfast::outbox::{OutboxSource, Relay};
/// use steadfast::transport::memory::MemoryTransport;
///
/// fn relay_for_my_fault_test(outbox: impl OutboxSource) -> Relay {
///     let broker = Arc::new(MemoryTransport::new());
///     steadfast::testing::fault_relay(Relay::builder(outbox, broker))
///         .build()
///         .expect("valid settings")
/// }
/// ```
pub fn fault_relay(builder: RelayBuilder) -> RelayBuilder {
    builder
        .batch_size(200)
        .poll_interval(Duration::from_millis(200))
        .claim_lease(Duration::from_secs(8))
        .publish_timeout(Duration::from_secs(5))
        .retry_delay(Duration::from_millis(200), Duration::from_secs(2))
        .max_attempts(1000)
}

/// A worker running on an in-memory broker, with everything it did recorded.
#[derive(Debug)]
pub struct TestHarness {
    broker: MemoryTransport,
    group: String,
    log: Arc<Mutex<Vec<Processed>>>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), WorkerError>>,
}

/// Publishing through the harness failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The message could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The broker refused it.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

impl TestHarness {
    /// Builds the worker (with an outcome recorder added), declares its topology on
    /// `broker` and starts it in the background.
    pub async fn start(
        broker: &MemoryTransport,
        builder: WorkerBuilder,
    ) -> Result<Self, BuildError> {
        let log: Arc<Mutex<Vec<Processed>>> = Arc::default();
        let sink = log.clone();
        let worker = builder
            .on_outcome(move |p| {
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(p.clone())
            })
            .build()?;
        let group = worker.subscription().group.clone();
        broker.bind(&group, worker.subscription().names.iter().cloned());
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(worker.run_until(async move { token.cancelled().await }));
        Ok(Self {
            broker: broker.clone(),
            group,
            log,
            stop,
            task,
        })
    }

    /// Encodes and publishes a message; returns its id.
    pub async fn publish<M: Message>(&self, msg: &M) -> Result<MessageId, PublishError> {
        let env = Envelope::encode(msg)?;
        self.broker.publish(&env).await?;
        Ok(env.id)
    }

    /// Publishes a ready-made envelope (a duplicate, raw bytes, odd headers).
    pub async fn publish_envelope(&self, env: &Envelope) -> Result<(), TransportError> {
        self.broker.publish(env).await
    }

    /// Waits until nothing is ready, in flight or waiting out a retry delay, and returns
    /// what happened so far.
    ///
    /// # Panics
    /// If the group is still busy after one hour of tokio time: a stuck pipeline is a test
    /// failure.
    pub async fn run_until_idle(&self) -> Report {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
        loop {
            if self.broker.is_idle(&self.group) {
                // Let the settling task record its outcome, then confirm.
                tokio::time::sleep(Duration::from_millis(1)).await;
                if self.broker.is_idle(&self.group) {
                    return self.report();
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "group `{}` did not become idle within an hour",
                self.group
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// What happened so far.
    pub fn report(&self) -> Report {
        Report {
            processed: self.log.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            dead_letters: self.broker.dead_letter_list(&self.group),
            published: self.broker.published(),
        }
    }

    /// Stops the worker gracefully and returns how it ended.
    pub async fn stop(self) -> Result<(), WorkerError> {
        self.stop.cancel();
        match self.task.await {
            Ok(r) => r,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }
}

/// What a worker did, in order.
#[derive(Debug, Clone)]
pub struct Report {
    /// Every delivery's outcome, in the order they were settled.
    pub processed: Vec<Processed>,
    /// The group's dead letters.
    pub dead_letters: Vec<DeadLetter>,
    /// Every envelope published on the broker (including the test's own).
    pub published: Vec<Envelope>,
}

impl Report {
    /// The outcomes of message `id`, one per delivery, in order.
    pub fn outcomes(&self, id: MessageId) -> Vec<Outcome> {
        self.processed
            .iter()
            .filter(|p| p.id == id)
            .map(|p| p.outcome.clone())
            .collect()
    }

    /// How many deliveries ended with `pred`.
    pub fn count(&self, pred: impl Fn(&Outcome) -> bool) -> usize {
        self.processed.iter().filter(|p| pred(&p.outcome)).count()
    }

    /// The dead letter of message `id`, if it was dead-lettered.
    pub fn dead_letter(&self, id: MessageId) -> Option<&DeadLetter> {
        self.dead_letters.iter().find(|d| d.envelope.id == id)
    }
}
