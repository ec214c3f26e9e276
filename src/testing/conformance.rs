//! The conformance suite: the pipeline's promises, checked against any transport.
//!
//! Every transport of steadfast runs these same cases (Watermill's shared pub/sub suite
//! is the model), and so can yours: implement [`TransportFactory`] and expand
//! [`conformance_tests!`](crate::conformance_tests) in a test file.
//!
//! ```text
//! steadfast::conformance_tests!(my_transport_tests, MyFactory::new());
//! ```
//!
//! Each case gets a fresh transport from the factory for a unique case id; the factory
//! must isolate it (a unique exchange, subject prefix or stream) so cases can run in
//! parallel on one broker. Cases run in real time with short delays.

use crate::{
    Context, Envelope, ErrorKind, HandlerError, Message, MessageId, RetryPolicy, Worker,
    idempotency::memory::MemoryStore,
    transport::{DeadLetter, Transport},
    worker::{Outcome, Processed, WorkerBuilder},
};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio_util::sync::CancellationToken;

/// Makes a transport isolated for one test case.
pub trait TransportFactory: Send + Sync + 'static {
    /// A transport whose names cannot collide with any other case's. `case` is unique
    /// per call (letters, digits and `-`).
    fn create<'a>(&'a self, case: &'a str) -> BoxFuture<'a, Arc<dyn Transport>>;
}

/// The message most cases use.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Order {
    /// A sequence number.
    pub n: u64,
    /// What the handler should do with it: "ok", "fail-then-ok", "permanent", "always-fail",
    /// "panic-timeout-ok", "slow".
    pub mode: String,
}

impl Message for Order {
    const NAME: &'static str = "conformance.order";
}

/// A message no worker of the group handles (for the unknown-name case), and the
/// message handlers publish (for the publish-on-success case).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Note {
    /// Which order it is about.
    pub n: u64,
}

impl Message for Note {
    const NAME: &'static str = "conformance.note";
}

const WAIT: Duration = Duration::from_secs(45);

/// What the handlers saw.
#[derive(Clone, Default)]
struct Seen {
    calls: Arc<Mutex<Vec<(u64, u32, Instant)>>>,
    outcomes: Arc<Mutex<Vec<Processed>>>,
}

impl Seen {
    fn calls_of(&self, n: u64) -> Vec<(u32, Instant)> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.0 == n)
            .map(|c| (c.1, c.2))
            .collect()
    }
    fn total_calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
    fn outcomes_of(&self, id: MessageId) -> Vec<Outcome> {
        self.outcomes
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.id == id)
            .map(|p| p.outcome.clone())
            .collect()
    }
    fn count(&self, pred: impl Fn(&Outcome) -> bool) -> usize {
        self.outcomes
            .lock()
            .unwrap()
            .iter()
            .filter(|p| pred(&p.outcome))
            .count()
    }
}

fn handler(
    seen: Seen,
    timeout: Duration,
) -> impl Fn(Order, Context) -> BoxFuture<'static, Result<(), HandlerError>> + Send + Sync + 'static
{
    move |o: Order, cx: Context| {
        seen.calls
            .lock()
            .unwrap()
            .push((o.n, cx.attempt(), Instant::now()));
        Box::pin(async move {
            match (o.mode.as_str(), cx.attempt()) {
                ("ok", _) => Ok(()),
                ("fail-then-ok", a) if a < 3 => Err(HandlerError::msg(format!(
                    "flaky dependency on attempt {a}"
                ))),
                ("fail-then-ok", _) => Ok(()),
                ("permanent", _) => Err(HandlerError::msg("order is invalid").permanent()),
                ("always-fail", _) => Err(HandlerError::msg("dependency down")),
                ("panic-timeout-ok", 1) => panic!("handler bug on attempt 1"),
                ("panic-timeout-ok", 2) => {
                    tokio::time::sleep(timeout * 4).await;
                    Ok(())
                }
                ("panic-timeout-ok", _) => Ok(()),
                ("publish", a) => {
                    cx.publish(&Note { n: o.n })?;
                    if a == 1 {
                        Err(HandlerError::msg("failed after buffering a publish"))
                    } else {
                        Ok(())
                    }
                }
                ("slow", _) => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(())
                }
                (other, _) => Err(HandlerError::msg(format!("unknown mode {other}")).permanent()),
            }
        })
    }
}

/// A running worker with its stop switch.
struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn start(builder: WorkerBuilder, seen: &Seen) -> Running {
    let sink = seen.outcomes.clone();
    let worker = builder
        .on_outcome(move |p| sink.lock().unwrap().push(p.clone()))
        .build()
        .expect("valid test worker");
    let stop = CancellationToken::new();
    let token = stop.clone();
    worker.declare().await.expect("declare");
    let task = tokio::spawn(async move {
        worker
            .run_until(async move { token.cancelled().await })
            .await
            .expect("worker ran");
    });
    Running { stop, task }
}

fn policy() -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_millis(300))
        .max_attempts(3)
        .jitter(0.0)
        .max_delay(Duration::from_secs(2))
}

fn builder(t: &Arc<dyn Transport>, group: &str, seen: &Seen) -> WorkerBuilder {
    let timeout = Duration::from_millis(500);
    Worker::builder_shared(t.clone(), group)
        .handle(handler(seen.clone(), timeout))
        .retry(policy())
        .handler_timeout(timeout)
        .concurrency(8)
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < WAIT,
            "timed out after {WAIT:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn dead_letters(t: &Arc<dyn Transport>, group: &str, at_least: usize) -> Vec<DeadLetter> {
    let start = Instant::now();
    loop {
        let list = t
            .dead_letters(group, 1000)
            .await
            .expect("dead letters readable");
        if list.len() >= at_least {
            return list;
        }
        assert!(
            start.elapsed() < WAIT,
            "expected {at_least} dead letters in `{group}`, found {}",
            list.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn publish(t: &Arc<dyn Transport>, n: u64, mode: &str) -> Envelope {
    let env = Envelope::encode(&Order {
        n,
        mode: mode.into(),
    })
    .unwrap();
    t.publish(&env).await.expect("publish confirmed");
    env
}

/// Quiet period after the expected state: nothing further may happen.
async fn settle_quietly() {
    tokio::time::sleep(Duration::from_millis(700)).await;
}

/// Every message is handled once and acked; no dead letters.
pub async fn acks_each_message_once(f: &dyn TransportFactory) {
    let t = f.create("acks").await;
    let seen = Seen::default();
    let w = start(builder(&t, "conf-acks", &seen), &seen).await;
    let mut ids = Vec::new();
    for n in 0..50 {
        ids.push(publish(&t, n, "ok").await.id);
    }
    wait_until("50 acks", || seen.count(|o| *o == Outcome::Acked) == 50).await;
    settle_quietly().await;
    for (n, id) in ids.iter().enumerate() {
        assert_eq!(seen.calls_of(n as u64).len(), 1, "message {n} handled once");
        assert_eq!(seen.outcomes_of(*id), [Outcome::Acked]);
    }
    assert!(t.dead_letters("conf-acks", 10).await.unwrap().is_empty());
    w.stop().await;
}

/// A transient failure is retried after the policy's delays, held by the broker.
pub async fn retries_with_policy_delays(f: &dyn TransportFactory) {
    let t = f.create("retry").await;
    let seen = Seen::default();
    let w = start(builder(&t, "conf-retry", &seen), &seen).await;
    let id = publish(&t, 1, "fail-then-ok").await.id;
    wait_until("acked after two retries", || {
        seen.outcomes_of(id).contains(&Outcome::Acked)
    })
    .await;
    settle_quietly().await;
    assert_eq!(
        seen.outcomes_of(id),
        [
            Outcome::Retried {
                delay: Duration::from_millis(300)
            },
            Outcome::Retried {
                delay: Duration::from_millis(600)
            },
            Outcome::Acked
        ]
    );
    let calls = seen.calls_of(1);
    assert_eq!(
        calls.iter().map(|c| c.0).collect::<Vec<_>>(),
        [1, 2, 3],
        "attempts counted by the framework"
    );
    // The broker held each delay (at least the policy's, less a little clock slack).
    for (pair, want) in calls.windows(2).zip([300u64, 600]) {
        let gap = pair[1].1 - pair[0].1;
        assert!(
            gap >= Duration::from_millis(want - 30),
            "gap {gap:?} shorter than the {want} ms delay"
        );
    }
    assert!(t.dead_letters("conf-retry", 10).await.unwrap().is_empty());
    w.stop().await;
}

/// A permanent failure is dead-lettered at once, with its reason, and never retried.
pub async fn permanent_failure_dead_letters_without_retry(f: &dyn TransportFactory) {
    let t = f.create("perm").await;
    let seen = Seen::default();
    let w = start(builder(&t, "conf-perm", &seen), &seen).await;
    let env = publish(&t, 1, "permanent").await;
    let dl = dead_letters(&t, "conf-perm", 1).await;
    settle_quietly().await;
    assert_eq!(seen.calls_of(1).len(), 1, "never retried");
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].id(), env.id);
    assert_eq!(dl[0].kind, Some(ErrorKind::Permanent));
    assert_eq!(dl[0].reason, "order is invalid");
    assert_eq!(dl[0].attempts, 1);
    assert!(!dl[0].failed_at.is_empty());
    assert_eq!(dl[0].envelope.payload, env.payload, "original bytes kept");
    assert_eq!(dl[0].envelope.name, Order::NAME);
    w.stop().await;
}

/// Undecodable, oversize and unknown-name messages are dead-lettered at once with their
/// bytes, the handler never runs, and the worker keeps going.
pub async fn bad_input_dead_lettered_at_once(f: &dyn TransportFactory) {
    let t = f.create("bad").await;
    let seen = Seen::default();
    // Bind `Note` to the group too (as if a handler had been removed), then run a worker
    // that only handles `Order`.
    Worker::builder_shared(t.clone(), "conf-bad")
        .handle(|_: Note, _cx: Context| async { Ok(()) })
        .build()
        .unwrap()
        .declare()
        .await
        .unwrap();
    let w = start(
        builder(&t, "conf-bad", &seen).max_payload_bytes(1024),
        &seen,
    )
    .await;
    let garbage = Envelope::new(Order::NAME, &b"{\"n\": 1, \"mode\": "[..]);
    t.publish(&garbage).await.unwrap();
    let wrong_schema = Envelope::new(Order::NAME, &b"{\"n\": \"one\"}"[..]);
    t.publish(&wrong_schema).await.unwrap();
    let big = Envelope::encode(&Order {
        n: 2,
        mode: "x".repeat(2000),
    })
    .unwrap();
    t.publish(&big).await.unwrap();
    let unknown = Envelope::encode(&Note { n: 3 }).unwrap();
    t.publish(&unknown).await.unwrap();
    let good = publish(&t, 4, "ok").await;

    let dl = dead_letters(&t, "conf-bad", 4).await;
    wait_until("the good message acked", || {
        seen.outcomes_of(good.id) == [Outcome::Acked]
    })
    .await;
    settle_quietly().await;
    assert_eq!(
        seen.total_calls(),
        1,
        "only the good message reached the handler"
    );
    let by_id: HashMap<MessageId, &DeadLetter> = dl.iter().map(|d| (d.id(), d)).collect();
    for (env, needle) in [
        (&garbage, "cannot decode"),
        (&wrong_schema, "cannot decode"),
        (&big, "exceeds the limit of 1024 bytes"),
        (&unknown, "no handler for message name `conformance.note`"),
    ] {
        let d = by_id
            .get(&env.id)
            .unwrap_or_else(|| panic!("{needle}: not dead-lettered"));
        assert_eq!(d.kind, Some(ErrorKind::Decode), "{needle}");
        assert!(
            d.reason.contains(needle),
            "reason `{}` lacks `{needle}`",
            d.reason
        );
        assert_eq!(d.envelope.payload, env.payload, "original bytes kept");
        assert_eq!(d.attempts, 1);
    }
    assert_eq!(dl.len(), 4);
    w.stop().await;
}

/// A panic and a timeout are transient failures: retried, then handled.
pub async fn panic_and_timeout_are_retried(f: &dyn TransportFactory) {
    let t = f.create("panic").await;
    let seen = Seen::default();
    let w = start(builder(&t, "conf-panic", &seen), &seen).await;
    let id = publish(&t, 1, "panic-timeout-ok").await.id;
    wait_until("acked on attempt 3", || {
        seen.outcomes_of(id).contains(&Outcome::Acked)
    })
    .await;
    settle_quietly().await;
    assert_eq!(
        seen.calls_of(1).iter().map(|c| c.0).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(matches!(
        seen.outcomes_of(id)[..],
        [
            Outcome::Retried { .. },
            Outcome::Retried { .. },
            Outcome::Acked
        ]
    ));
    assert!(t.dead_letters("conf-panic", 10).await.unwrap().is_empty());
    w.stop().await;
}

/// When attempts run out, the message is dead-lettered with the reason and the count.
pub async fn exhausted_retries_dead_letter(f: &dyn TransportFactory) {
    let t = f.create("exhaust").await;
    let seen = Seen::default();
    let w = start(builder(&t, "conf-exhaust", &seen), &seen).await;
    let env = publish(&t, 1, "always-fail").await;
    let dl = dead_letters(&t, "conf-exhaust", 1).await;
    settle_quietly().await;
    assert_eq!(seen.calls_of(1).len(), 3);
    assert_eq!(dl[0].id(), env.id);
    assert_eq!(dl[0].kind, Some(ErrorKind::Transient));
    assert_eq!(dl[0].attempts, 3);
    assert_eq!(dl[0].reason, "gave up after 3 attempts: dependency down");
    assert_eq!(dl[0].envelope.payload, env.payload);
    w.stop().await;
}

/// A forged attempt header is not trusted to skip retries.
pub async fn forged_attempt_header_is_not_trusted(f: &dyn TransportFactory) {
    let t = f.create("forged").await;
    let seen = Seen::default();
    let w = start(builder(&t, "conf-forged", &seen), &seen).await;
    let mut env = Envelope::encode(&Order {
        n: 1,
        mode: "always-fail".into(),
    })
    .unwrap();
    env.attempt = 999;
    t.publish(&env).await.unwrap();
    let dl = dead_letters(&t, "conf-forged", 1).await;
    settle_quietly().await;
    assert_eq!(
        seen.calls_of(1).iter().map(|c| c.0).collect::<Vec<_>>(),
        [1, 2, 3],
        "retried normally"
    );
    assert_eq!(dl[0].attempts, 3);
    w.stop().await;
}

/// The same message delivered twice runs its handler once (with an idempotency store).
pub async fn duplicate_delivery_handled_once(f: &dyn TransportFactory) {
    let t = f.create("dup").await;
    let seen = Seen::default();
    let w = start(
        builder(&t, "conf-dup", &seen).idempotency(MemoryStore::new()),
        &seen,
    )
    .await;
    let env = Envelope::encode(&Order {
        n: 1,
        mode: "ok".into(),
    })
    .unwrap();
    t.publish(&env).await.unwrap();
    wait_until("first copy acked", || {
        seen.outcomes_of(env.id).contains(&Outcome::Acked)
    })
    .await;
    t.publish(&env).await.unwrap();
    wait_until("second copy settled", || {
        seen.outcomes_of(env.id).len() == 2
    })
    .await;
    settle_quietly().await;
    assert_eq!(seen.calls_of(1).len(), 1, "handler ran once");
    assert_eq!(
        seen.outcomes_of(env.id),
        [Outcome::Acked, Outcome::Duplicate]
    );
    w.stop().await;
}

/// A failed first attempt is not deduplicated on its retry.
pub async fn failed_attempt_is_not_deduplicated(f: &dyn TransportFactory) {
    let t = f.create("dupfail").await;
    let seen = Seen::default();
    let w = start(
        builder(&t, "conf-dupfail", &seen).idempotency(MemoryStore::new()),
        &seen,
    )
    .await;
    let id = publish(&t, 1, "fail-then-ok").await.id;
    wait_until("acked", || seen.outcomes_of(id).contains(&Outcome::Acked)).await;
    settle_quietly().await;
    assert_eq!(seen.calls_of(1).len(), 3, "each retry ran the handler");
    w.stop().await;
}

/// Outgoing messages are sent only when the handler succeeds, with stable ids.
pub async fn publishes_only_on_success(f: &dyn TransportFactory) {
    let t = f.create("outgoing").await;
    let seen = Seen::default();
    let notes: Arc<Mutex<Vec<MessageId>>> = Arc::default();
    let sink = notes.clone();
    let note_seen = Seen::default();
    let notes_worker = start(
        Worker::builder_shared(t.clone(), "conf-outgoing-notes").handle(
            move |_: Note, cx: Context| {
                sink.lock().unwrap().push(cx.id());
                async { Ok(()) }
            },
        ),
        &note_seen,
    )
    .await;
    let w = start(builder(&t, "conf-outgoing", &seen), &seen).await;
    let id = publish(&t, 1, "publish").await.id;
    wait_until("acked on attempt 2", || {
        seen.outcomes_of(id).contains(&Outcome::Acked)
    })
    .await;
    wait_until("the note arrived", || !notes.lock().unwrap().is_empty()).await;
    settle_quietly().await;
    let got = notes.lock().unwrap().clone();
    assert_eq!(
        got,
        [MessageId::derived(id, 0)],
        "one note, from the successful attempt only"
    );
    w.stop().await;
    notes_worker.stop().await;
}

/// Shutdown with work in flight: finished messages are settled, unfinished ones go back
/// to the broker and the next worker handles them; none is lost.
pub async fn shutdown_redelivers_unfinished_work(f: &dyn TransportFactory) {
    let t = f.create("shutdown").await;
    let seen = Seen::default();
    let w1 = start(
        builder(&t, "conf-shutdown", &seen)
            .drain_timeout(Duration::from_millis(300))
            // Far above the drain deadline, so the slow handlers are abandoned rather
            // than timed out; and bounded, because a transport may hand an abandoned
            // delivery back only after its ack deadline (nats-server 2.9 was seen holding
            // a Nak'ed message until `ack_wait`, which is derived from this timeout).
            .handler_timeout(Duration::from_secs(8)),
        &seen,
    )
    .await;
    let mut ids = Vec::new();
    for n in 0..6 {
        ids.push(publish(&t, n, "ok").await.id);
    }
    let slow: Vec<MessageId> = vec![
        publish(&t, 100, "slow").await.id,
        publish(&t, 101, "slow").await.id,
    ];
    wait_until("fast ones acked and slow ones started", || {
        seen.count(|o| *o == Outcome::Acked) == 6
            && seen.calls_of(100).len() == 1
            && seen.calls_of(101).len() == 1
    })
    .await;
    w1.stop().await;
    assert!(
        slow.iter().all(|id| seen.outcomes_of(*id).is_empty()),
        "unfinished work is not settled"
    );

    // The next worker gets the slow ones again; this time they complete.
    let seen2 = Seen::default();
    let timeout = Duration::from_secs(5);
    let w2 = start(
        Worker::builder_shared(t.clone(), "conf-shutdown")
            .retry(policy())
            .handle(move |o: Order, cx: Context| {
                seen2
                    .calls
                    .lock()
                    .unwrap()
                    .push((o.n, cx.attempt(), Instant::now()));
                async { Ok(()) }
            })
            .handler_timeout(timeout),
        &seen,
    )
    .await;
    // At least once, never lost: a transport may hand an abandoned delivery back more
    // than once (nats-server 2.9 was seen doing so), which idempotency absorbs; every
    // copy must end acked.
    wait_until("slow ones acked by the next worker", || {
        slow.iter()
            .all(|id| seen.outcomes_of(*id).contains(&Outcome::Acked))
    })
    .await;
    settle_quietly().await;
    for id in &slow {
        let outcomes = seen.outcomes_of(*id);
        assert!(
            outcomes.iter().all(|o| *o == Outcome::Acked),
            "{outcomes:?}"
        );
    }
    for id in &ids {
        assert_eq!(
            seen.outcomes_of(*id),
            [Outcome::Acked],
            "finished work is not redelivered"
        );
    }
    w2.stop().await;
}

/// Expands to one `#[tokio::test]` per conformance case, inside a module `$module`,
/// for the factory `$factory`.
#[macro_export]
macro_rules! conformance_tests {
    ($module:ident, $factory:expr) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $crate::conformance_tests!(@case $factory;
                acks_each_message_once, retries_with_policy_delays, permanent_failure_dead_letters_without_retry,
                bad_input_dead_lettered_at_once, panic_and_timeout_are_retried, exhausted_retries_dead_letter,
                forged_attempt_header_is_not_trusted, duplicate_delivery_handled_once, failed_attempt_is_not_deduplicated,
                publishes_only_on_success, shutdown_redelivers_unfinished_work);
        }
    };
    (@case $factory:expr; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let factory = $factory;
                $crate::testing::conformance::$case(&factory).await;
            }
        )*
    };
}
