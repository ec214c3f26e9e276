//! The worker: pulls deliveries from a transport, runs up to `concurrency` of them
//! through the pipeline at once (each handler call guarded by a timeout and panic capture),
//! and shuts down gracefully.

mod builder;
mod pipeline;

pub use builder::{BuildError, MAX_CONCURRENCY, WorkerBuilder};
pub use pipeline::{Outcome, Processed};

use crate::transport::{Health, Subscription, Transport, TransportError};
use futures::{FutureExt, StreamExt, stream::FuturesUnordered};
use pipeline::Shared;
use std::{future::Future, panic::AssertUnwindSafe, sync::Arc, time::Duration};
use tokio::sync::watch;

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
}

/// Where a worker is in its life (for readiness).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Built, not yet consuming.
    Starting,
    /// Consuming.
    Running,
    /// Intake stopped; finishing in-flight work.
    Draining,
    /// Done.
    Stopped,
}

/// A cheap handle to a worker's state, for health endpoints.
#[derive(Debug, Clone)]
pub struct StatusHandle {
    state: watch::Receiver<WorkerState>,
    transport: Arc<dyn Transport>,
}

impl StatusHandle {
    /// The worker's state.
    pub fn state(&self) -> WorkerState {
        *self.state.borrow()
    }

    /// Ready to take messages: running, and the transport is connected.
    pub fn is_ready(&self) -> bool {
        self.state() == WorkerState::Running && self.transport.health() == Health::Connected
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
            state: self.state.subscribe(),
            transport: self.shared.transport.clone(),
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
        let mut stream = self
            .shared
            .transport
            .subscribe(&self.subscription)
            .await
            .map_err(|source| WorkerError::Subscribe {
                group: group.clone(),
                source,
            })?;
        self.state.send_replace(WorkerState::Running);
        tracing::info!(group = %group, names = ?self.subscription.names, "worker started");

        // In-flight deliveries are futures owned by this task, at most `concurrency` of
        // them. Each handler call is guarded (timeout, panic capture) inside its future;
        // abandoning work at the drain deadline is dropping the set, which drops each
        // delivery unsettled so the broker redelivers it.
        let shared: &Shared = &self.shared;
        let mut in_flight = FuturesUnordered::new();
        tokio::pin!(shutdown);
        let mut result = Ok(());
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                next = stream.next(), if in_flight.len() < self.concurrency => match next {
                    Some(Ok(delivery)) => in_flight.push(guard(pipeline::process(shared, delivery))),
                    Some(Err(e)) => {
                        tracing::warn!(group = %group, error = %e, "delivery stream error; continuing");
                    }
                    None => {
                        result = Err(WorkerError::StreamEnded(group.clone()));
                        break;
                    }
                },
            }
        }

        // Stop intake first: the consumer is cancelled, nothing new arrives.
        self.state.send_replace(WorkerState::Draining);
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
        self.state.send_replace(WorkerState::Stopped);
        tracing::info!(group = %group, "worker stopped");
        result
    }
}

/// Keeps a panic that escapes the pipeline (an `on_outcome` hook, say) from taking the
/// worker down; handler panics are already caught, and turned into transient failures,
/// inside the pipeline.
async fn guard(fut: impl Future<Output = ()>) {
    if AssertUnwindSafe(fut).catch_unwind().await.is_err() {
        tracing::error!(
            "a panic escaped the message pipeline; the delivery goes back to the broker"
        );
    }
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
