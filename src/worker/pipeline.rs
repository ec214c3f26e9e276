//! What happens around one handler call: size check, decode, idempotency, the guarded
//! call (timeout, panic), outgoing messages, the decision and the settle.

use super::metrics::{Fate, WorkerMetrics};
use super::send::{self, SendKind};
use crate::{
    context::Context,
    envelope::{Envelope, MessageId, truncate},
    error::{ErrorKind, HandlerError},
    handler::Handler,
    idempotency::{Begin, Fingerprint, IdempotencyStore, Key, Lease, OnMismatch, payload_mismatch},
    message::Message,
    retry::{Disposition, Failure, RetryPolicy},
    transport::{Acker, Delivery, Transport, crash},
};
use futures::{
    FutureExt,
    future::{BoxFuture, Either},
};
use std::{
    any::Any, collections::HashMap, fmt, marker::PhantomData, panic::AssertUnwindSafe, sync::Arc,
    time::Duration,
};
use tracing::Instrument;

pub(super) type OutcomeHook = Arc<dyn Fn(&Processed) + Send + Sync>;

/// How long a call to the idempotency store may take before it counts as failed.
const STORE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the worker did with one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Processed {
    /// The message id.
    pub id: MessageId,
    /// The wire name.
    pub name: String,
    /// The attempt that was made.
    pub attempt: u32,
    /// What happened.
    pub outcome: Outcome,
}

/// The outcome of one delivery, as settled with the broker.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The handler succeeded and the message was acked.
    Acked,
    /// The idempotency key was already done: acked without running the handler.
    Duplicate,
    /// Failed transiently; scheduled again after `delay`.
    Retried {
        /// The broker-held delay.
        delay: Duration,
    },
    /// Another worker holds the key; put back after `delay` without using an attempt.
    Deferred {
        /// The broker-held delay.
        delay: Duration,
    },
    /// Moved to the dead-letter queue.
    DeadLettered(Failure),
    /// Settling failed (for example the channel died); the broker will redeliver.
    NotSettled(String),
}

pub(super) struct Shared {
    pub(super) group: Arc<str>,
    /// The queue or stream consumed: the `messaging.destination.name` of `process` spans.
    pub(super) destination: Arc<str>,
    pub(super) transport: Arc<dyn Transport>,
    pub(super) routes: HashMap<String, Arc<dyn Route>>,
    pub(super) policy: RetryPolicy,
    pub(super) store: Option<Arc<dyn IdempotencyStore>>,
    /// `store` is an inbox: look before the handler, no lease (`WorkerBuilder::inbox`).
    pub(super) inbox_only: bool,
    pub(super) on_mismatch: OnMismatch,
    pub(super) handler_timeout: Duration,
    pub(super) lease: Duration,
    pub(super) max_payload_bytes: usize,
    pub(super) crash_limit: u32,
    pub(super) hook: Option<OutcomeHook>,
    pub(super) metrics: WorkerMetrics,
    pub(super) breaker: Option<Arc<super::breaker::Breaker>>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("group", &self.group)
            .field("transport", &self.transport.system())
            .finish_non_exhaustive()
    }
}

/// One message type's handler, with the type erased so a worker can hold many.
pub(super) trait Route: Send + Sync + 'static {
    fn run<'a>(
        &'a self,
        shared: &'a Shared,
        envelope: Envelope,
        acker: Box<dyn Acker>,
        crashes: Option<u32>,
    ) -> BoxFuture<'a, Fate>;
}

pub(super) struct TypedRoute<M, H> {
    handler: H,
    _m: PhantomData<fn() -> M>,
}

impl<M, H> TypedRoute<M, H> {
    pub(super) fn new(handler: H) -> Self {
        Self {
            handler,
            _m: PhantomData,
        }
    }
}

impl<M: Message, H: Handler<M>> Route for TypedRoute<M, H> {
    fn run<'a>(
        &'a self,
        shared: &'a Shared,
        envelope: Envelope,
        acker: Box<dyn Acker>,
        crashes: Option<u32>,
    ) -> BoxFuture<'a, Fate> {
        Box::pin(run_typed::<M, H>(
            &self.handler,
            shared,
            envelope,
            acker,
            crashes,
        ))
    }
}

/// Entry point for one delivery: one future in the worker's in-flight set.
///
/// The prelude (attempt check, span) runs here, outside the future, and the rare paths
/// (dead letters before any handler) are boxed, so the future the worker keeps per
/// delivery stays small: it was 3,768 bytes, copied into the in-flight set per message.
pub(super) fn process(shared: &Shared, delivery: Delivery) -> impl Future<Output = ()> + '_ {
    let started = std::time::Instant::now();
    let m = &shared.metrics;
    m.consumed.increment(1);
    let Delivery {
        mut envelope,
        defect,
        crashes,
        acker,
    } = delivery;
    // The attempt header is ours, but anyone can forge it: a value past the policy's
    // limit is not trusted to skip retries and counts as a first attempt.
    if envelope.attempt > shared.policy.attempts() {
        tracing::warn!(id = %envelope.id, claimed = envelope.attempt, "attempt header beyond the policy's limit; treated as attempt 1");
        envelope.attempt = 1;
    }
    let span = tracing::info_span!(
        "process",
        otel.name = %ProcessName(&shared.destination),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        messaging.system = shared.transport.system(),
        messaging.operation.name = "process",
        messaging.operation.type = "process",
        messaging.destination.name = %shared.destination,
        steadfast.message.name = %envelope.name,
        error.type = tracing::field::Empty,
        messaging.consumer.group.name = %shared.group,
        messaging.message.id = %envelope.id,
        messaging.message.body.size = envelope.payload.len(),
        steadfast.attempt = envelope.attempt,
    );
    #[cfg(feature = "otel")]
    crate::otel::set_parent(&span, &envelope.headers);
    let settled = async move {
        if let Some(defect) = defect {
            return Box::pin(dead_letter_now(
                shared,
                envelope,
                acker,
                format!("malformed delivery: {defect}"),
            ))
            .await;
        }
        if envelope.payload.len() > shared.max_payload_bytes {
            let reason = format!(
                "payload of {} bytes exceeds the limit of {} bytes",
                envelope.payload.len(),
                shared.max_payload_bytes
            );
            return Box::pin(dead_letter_now(shared, envelope, acker, reason)).await;
        }
        match shared.routes.get(envelope.name.as_str()) {
            Some(route) => route.run(shared, envelope, acker, crashes).await,
            None => {
                let reason = format!(
                    "no handler for message name `{}` in group `{}`",
                    truncate(&envelope.name, 200),
                    shared.group
                );
                Box::pin(dead_letter_now(shared, envelope, acker, reason)).await
            }
        }
    }
    .instrument(span);
    // A combinator, not an `async` block: a block would keep `settled` twice (the
    // captured value and the awaited one).
    settled.map(move |fate| m.settled(fate, started.elapsed().as_secs_f64()))
}

struct ProcessName<'a>(&'a str);
impl fmt::Display for ProcessName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "process {}", self.0)
    }
}

async fn dead_letter_now(
    shared: &Shared,
    envelope: Envelope,
    acker: Box<dyn Acker>,
    reason: String,
) -> Fate {
    settle(
        shared,
        envelope,
        acker,
        Disposition::DeadLetter(Failure::new(ErrorKind::Decode, reason)),
    )
    .await
}

async fn run_typed<M: Message, H: Handler<M>>(
    handler: &H,
    shared: &Shared,
    envelope: Envelope,
    acker: Box<dyn Acker>,
    crashes: Option<u32>,
) -> Fate {
    let msg: M = match serde_json::from_slice(&envelope.payload) {
        Ok(m) => m,
        Err(e) => {
            let reason = format!("cannot decode `{}` as JSON: {e}", M::NAME);
            return Box::pin(dead_letter_now(shared, envelope, acker, reason)).await;
        }
    };
    let key: Option<String> = msg.idempotency_key().map(|k| k.into_owned());
    // Idempotency: take the key before the handler, mark it done only after success.
    let mut lease: Option<Lease> = None;
    let mut key = key;
    // The payload's fingerprint, hashed only when a store keeps it (hashing every payload
    // cost about a tenth of the worker's CPU per message).
    let mut fingerprint: Option<Fingerprint> = None;
    if let Some(store) = &shared.store {
        let fp = *fingerprint.insert(Fingerprint::of(&envelope.payload));
        let k = Key::new(
            &shared.group,
            M::NAME,
            key.get_or_insert_with(|| envelope.id.to_string()),
        )
        .with_fingerprint(fp);
        // `None`: run the handler without a lease (an inbox whose key is not done).
        let begun = if shared.inbox_only {
            bounded(store.is_done(k))
                .await
                .map(|done| done.then_some(Begin::AlreadyDone))
        } else {
            bounded(store.begin(k, shared.lease)).await.map(Some)
        };
        if let Ok(Some(Begin::AlreadyDone | Begin::InFlight)) = &begun
            && let Some(reason) = payload_mismatch(store.as_ref(), k, shared.lease).await
            && shared.on_mismatch == OnMismatch::DeadLetter
        {
            return Box::pin(dead_letter_now(shared, envelope, acker, reason)).await;
        }
        match begun {
            Ok(None) => {}
            Ok(Some(Begin::Acquired(l))) => lease = Some(l),
            Ok(Some(Begin::AlreadyDone)) => {
                tracing::debug!("duplicate: idempotency key already done");
                return Box::pin(settle_as(
                    shared,
                    envelope,
                    acker,
                    Disposition::Ack,
                    Outcome::Duplicate,
                ))
                .await;
            }
            Ok(Some(Begin::InFlight)) => {
                // Not a failure: another worker is on it — or was, and died holding the
                // key, which then frees itself only when the lease ends. Look again then:
                // every look is a delivery, and the broker's delivery limit counts them
                // (looking every 100 ms dead-lettered healthy messages after a crash).
                let floor = shared.policy.base_delay(1).max(Duration::from_millis(100));
                let delay = match bounded(store.lease_remaining(k)).await {
                    Ok(Some(left)) => (left + Duration::from_millis(50)).clamp(floor, shared.lease),
                    _ => floor,
                };
                return Box::pin(settle(
                    shared,
                    envelope,
                    acker,
                    Disposition::Defer { delay },
                ))
                .await;
            }
            Err(e) => {
                let result = Err(e);
                let d = shared.policy.decide(&result, envelope.attempt, envelope.id);
                return Box::pin(settle(shared, envelope, acker, d)).await;
            }
        }
    }

    // A suspect that crashed its worker too often while running alone: dead-lettered
    // without a handler. Only after the store was asked, so a message whose effect is
    // recorded is acked above whatever its crashes.
    if let Some(failure) = crashes.and_then(|c| crash::crash_loop(c, shared.crash_limit)) {
        if let (Some(store), Some(l), Some(key), Some(fp)) =
            (&shared.store, &lease, key.as_deref(), fingerprint)
        {
            let k = Key::new(&shared.group, M::NAME, key).with_fingerprint(fp);
            if let Err(e) = bounded(store.release(k, l)).await {
                tracing::warn!(error = %e, "could not release the idempotency key; it frees itself when the lease ends");
            }
        }
        return Box::pin(settle(
            shared,
            envelope,
            acker,
            Disposition::DeadLetter(failure),
        ))
        .await;
    }

    let attempt = envelope.attempt;
    let id = envelope.id;
    let cx = Context::new(envelope, shared.group.clone(), key);
    let mut result = call_guarded(
        handler.handle(msg, cx.clone()),
        shared.handler_timeout,
        acker.as_ref(),
    )
    .await;
    let crate::context::Finished {
        envelope,
        key,
        outgoing,
        marked,
    } = cx.finish();

    if result.is_ok() && !outgoing.is_empty() {
        let n = outgoing.len();
        let system = shared.transport.system();
        let span = send::span(
            system,
            &shared.transport.publish_destination(&outgoing[0].name),
            SendKind::Publish,
            n,
        );
        let results = send::traced(
            span,
            system,
            SendKind::Publish,
            n,
            shared.transport.publish_batch(&outgoing),
            |r| send::batch_error(r),
        )
        .await;
        if let Some(e) = results.into_iter().find_map(Result::err) {
            result = Err(HandlerError::transient(e));
            tracing::warn!(
                outgoing = n,
                "publishing the handler's outgoing messages failed; the message will be retried"
            );
        }
    }

    if let (Some(store), Some(key), Some(fp)) = (&shared.store, key.as_deref(), fingerprint) {
        let k = Key::new(&shared.group, M::NAME, key).with_fingerprint(fp);
        match (&result, &lease) {
            // The handler marked the key in its own transaction (the inbox): the `done`
            // row committed with its effects, and the inbox is what deduplicates. A
            // `complete` would find the row done and change nothing; skipping it saves
            // a database round trip per message.
            (Ok(()), _) if marked => {}
            (Ok(()), _) => {
                // The handler's effects stand; failing to record that only weakens
                // deduplication of a later duplicate, so the message is still acked.
                // (An inbox worker took no lease; `complete` does not need one.)
                let lease = lease.unwrap_or_default();
                if let Err(e) = bounded(store.complete(k, &lease)).await {
                    tracing::warn!(error = %e, "handled, but the idempotency key could not be marked done");
                }
            }
            (Err(_), Some(lease)) => {
                if let Err(e) = bounded(store.release(k, lease)).await {
                    tracing::warn!(error = %e, "could not release the idempotency key; it frees itself when the lease ends");
                }
            }
            // An inbox worker took no lease: nothing to release.
            (Err(_), None) => {}
        }
    }

    let disposition = shared.policy.decide(&result, attempt, id);
    if let Err(e) = &result {
        mark_failed(e.kind());
        tracing::warn!(error = %e, error.type = e.kind().as_str(), "handler failed");
    }
    settle(shared, envelope, acker, disposition).await
}

/// Runs the handler future with a timeout, catching panics, and keeps a long handler's
/// delivery alive at the broker. Built from combinators (an `async fn` would hold the
/// handler's future twice), with the progress loop, which only some transports need,
/// boxed so that it does not enlarge every delivery's future.
fn call_guarded<'a>(
    fut: impl Future<Output = Result<(), HandlerError>> + Send + 'a,
    timeout: Duration,
    acker: &'a dyn Acker,
) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a {
    let guarded = AssertUnwindSafe(tokio::time::timeout(timeout, fut)).catch_unwind();
    let outcome = match acker.progress_interval() {
        None => Either::Left(guarded),
        Some(every) => Either::Right(Box::pin(with_progress(guarded, every, acker))),
    };
    outcome.map(move |outcome| match outcome {
        Ok(Ok(r)) => r,
        Ok(Err(_elapsed)) => Err(HandlerError::msg(format!(
            "handler timed out after {}",
            humantime::format_duration(timeout)
        ))),
        Err(panic) => Err(HandlerError::msg(format!(
            "handler panicked: {}",
            panic_text(&*panic)
        ))),
    })
}

/// Awaits `guarded` while extending the delivery's ack deadline every `every`.
async fn with_progress<F: Future>(guarded: F, every: Duration, acker: &dyn Acker) -> F::Output {
    tokio::pin!(guarded);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            out = &mut guarded => break out,
            _ = tick.tick() => {
                if let Err(e) = acker.progress().await {
                    tracing::warn!(error = %e, "could not extend the delivery's ack deadline");
                }
            }
        }
    }
}

fn panic_text(p: &(dyn Any + Send)) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-text panic payload)")
}

/// `fut` within [`STORE_TIMEOUT`], its error a transient handler error. A combinator, so
/// the future is held once.
fn bounded<T, E: std::error::Error + Send + Sync + 'static>(
    fut: impl Future<Output = Result<T, E>>,
) -> impl Future<Output = Result<T, HandlerError>> {
    tokio::time::timeout(STORE_TIMEOUT, fut).map(|r| match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(HandlerError::transient(e)),
        Err(_) => Err(HandlerError::msg(format!(
            "idempotency store did not answer within {STORE_TIMEOUT:?}"
        ))),
    })
}

async fn settle(
    shared: &Shared,
    envelope: Envelope,
    acker: Box<dyn Acker>,
    d: Disposition,
) -> Fate {
    let outcome = match &d {
        Disposition::Ack => Outcome::Acked,
        Disposition::Retry { delay } => Outcome::Retried { delay: *delay },
        Disposition::Defer { delay } => Outcome::Deferred { delay: *delay },
        Disposition::DeadLetter(f) => Outcome::DeadLettered(f.clone()),
    };
    settle_as(shared, envelope, acker, d, outcome).await
}

async fn settle_as(
    shared: &Shared,
    envelope: Envelope,
    acker: Box<dyn Acker>,
    d: Disposition,
    mut outcome: Outcome,
) -> Fate {
    let (id, attempt) = (envelope.id, envelope.attempt);
    let name = shared.hook.as_ref().map(|_| envelope.name.clone());
    let sends = match &d {
        Disposition::DeadLetter(f) => {
            mark_failed(f.kind);
            tracing::warn!(kind = %f.kind, reason = %f.reason, "dead-lettered");
            Some(SendKind::DeadLetter)
        }
        Disposition::Retry { .. } => Some(SendKind::Retry),
        _ => None,
    };
    // Crash window: the handler's transaction committed (or its failure was decided),
    // nothing settled with the broker yet.
    failpoint!("steadfast::worker::before_settle");
    let settled = match sends {
        // A retry copy or a dead letter is a message sent: a `send` span of its own.
        Some(kind) => {
            let system = shared.transport.system();
            let span = send::span(system, &shared.destination, kind, 1);
            send::traced(span, system, kind, 1, acker.settle(envelope, d), |r| {
                r.as_ref().err().map(send::error_type)
            })
            .await
        }
        None => acker.settle(envelope, d).await,
    };
    if let Err(e) = settled {
        tracing::warn!(error = %e, "delivery not settled; the broker will redeliver it");
        outcome = Outcome::NotSettled(e.to_string());
    }
    let settled = Fate::of(&outcome);
    if let Some(b) = &shared.breaker {
        b.record(&outcome);
    }
    if let (Some(hook), Some(name)) = (&shared.hook, name) {
        hook(&Processed {
            id,
            name,
            attempt,
            outcome,
        });
    }
    settled
}

/// Marks the current `process` span as failed: error status and `error.type`.
fn mark_failed(kind: crate::ErrorKind) {
    let span = tracing::Span::current();
    span.record("otel.status_code", "ERROR");
    span.record("error.type", kind.as_str());
}
