//! Pipeline cases on tokio's paused clock: delays are exact and cost no wall time.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};
use steadfast::{
    Context, Envelope, ErrorKind, HandlerError, Message, RetryPolicy, Worker,
    idempotency::memory::MemoryStore, testing::TestHarness, transport::memory::MemoryTransport,
    worker::Outcome,
};
use tokio::time::Instant;

#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "orders.placed")]
struct OrderPlaced {
    #[message(key)]
    order_id: u64,
}

fn policy() -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_secs(2))
        .factor(3.0)
        .max_attempts(4)
        .max_delay(Duration::from_secs(60))
        .jitter(0.0)
}

#[tokio::test(start_paused = true)]
async fn retries_wait_exactly_the_policys_delays() {
    let broker = MemoryTransport::new();
    let times: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let t = times.clone();
    let builder = Worker::builder(broker.clone(), "billing")
        .retry(policy())
        .handle(move |_: OrderPlaced, cx: Context| {
            t.lock().unwrap().push(Instant::now());
            async move {
                if cx.attempt() < 4 {
                    Err(HandlerError::msg("busy"))
                } else {
                    Ok(())
                }
            }
        });
    let h = TestHarness::start(&broker, builder).await.unwrap();
    let id = h.publish(&OrderPlaced { order_id: 1 }).await.unwrap();
    let report = h.run_until_idle().await;
    let want = [2, 6, 18].map(Duration::from_secs);
    assert_eq!(
        report.outcomes(id),
        [
            Outcome::Retried { delay: want[0] },
            Outcome::Retried { delay: want[1] },
            Outcome::Retried { delay: want[2] },
            Outcome::Acked
        ]
    );
    let times = times.lock().unwrap().clone();
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    // The paused clock only moves when every task waits, so each gap is the delay to the
    // millisecond the harness polls at.
    for (gap, want) in gaps.iter().zip(want) {
        assert!(
            *gap >= want && *gap < want + Duration::from_millis(5),
            "gap {gap:?}, want {want:?}"
        );
    }
    h.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn retry_after_hint_is_honoured_and_capped() {
    let broker = MemoryTransport::new();
    let builder = Worker::builder(broker.clone(), "billing")
        .retry(policy().max_delay(Duration::from_secs(30)))
        .handle(|_: OrderPlaced, cx: Context| async move {
            match cx.attempt() {
                1 => Err(HandlerError::msg("429").retry_after(Duration::from_secs(10))),
                2 => Err(HandlerError::msg("429").retry_after(Duration::from_secs(3600))),
                _ => Ok(()),
            }
        });
    let h = TestHarness::start(&broker, builder).await.unwrap();
    let id = h.publish(&OrderPlaced { order_id: 1 }).await.unwrap();
    let report = h.run_until_idle().await;
    assert_eq!(
        report.outcomes(id),
        [
            Outcome::Retried {
                delay: Duration::from_secs(10)
            },
            Outcome::Retried {
                delay: Duration::from_secs(30)
            },
            Outcome::Acked
        ]
    );
    h.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn timeout_counts_as_transient_and_exhausts_to_dead_letter() {
    let broker = MemoryTransport::new();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let builder = Worker::builder(broker.clone(), "billing")
        .retry(policy().max_attempts(2))
        .handler_timeout(Duration::from_secs(5))
        .handle(move |_: OrderPlaced, _cx: Context| {
            c.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(())
            }
        });
    let h = TestHarness::start(&broker, builder).await.unwrap();
    let id = h.publish(&OrderPlaced { order_id: 9 }).await.unwrap();
    let report = h.run_until_idle().await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let dl = report.dead_letter(id).expect("dead-lettered");
    assert_eq!(dl.kind, Some(ErrorKind::Transient));
    assert_eq!(dl.attempts, 2);
    assert_eq!(
        dl.reason,
        "gave up after 2 attempts: handler timed out after 5s"
    );
    h.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn keys_dedupe_by_field_and_are_scoped_by_message_name() {
    #[derive(serde::Serialize, serde::Deserialize, Message)]
    #[message(name = "orders.cancelled")]
    struct OrderCancelled {
        #[message(key)]
        order_id: u64,
    }
    let broker = MemoryTransport::new();
    let placed = Arc::new(AtomicU32::new(0));
    let cancelled = Arc::new(AtomicU32::new(0));
    let (p, c) = (placed.clone(), cancelled.clone());
    let builder = Worker::builder(broker.clone(), "billing")
        .idempotency(MemoryStore::new())
        .handle(move |_: OrderPlaced, _cx: Context| {
            p.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        })
        .handle(move |_: OrderCancelled, _cx: Context| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        });
    let h = TestHarness::start(&broker, builder).await.unwrap();
    // Two different messages (different ids) with the same business key: one effect.
    h.publish(&OrderPlaced { order_id: 5 }).await.unwrap();
    h.run_until_idle().await;
    h.publish(&OrderPlaced { order_id: 5 }).await.unwrap();
    // Same key value, other message type: not a duplicate.
    h.publish(&OrderCancelled { order_id: 5 }).await.unwrap();
    let report = h.run_until_idle().await;
    assert_eq!(placed.load(Ordering::SeqCst), 1);
    assert_eq!(cancelled.load(Ordering::SeqCst), 1);
    assert_eq!(report.count(|o| *o == Outcome::Duplicate), 1);
    h.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn concurrent_duplicate_is_deferred_not_run_twice() {
    let broker = MemoryTransport::new();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let builder = Worker::builder(broker.clone(), "billing")
        .idempotency(MemoryStore::new())
        .concurrency(4)
        .handle(move |_: OrderPlaced, _cx: Context| {
            c.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Ok(())
            }
        });
    let h = TestHarness::start(&broker, builder).await.unwrap();
    let env = Envelope::encode(&OrderPlaced { order_id: 1 }).unwrap();
    h.publish_envelope(&env).await.unwrap();
    h.publish_envelope(&env).await.unwrap();
    let report = h.run_until_idle().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let outcomes = report.outcomes(env.id);
    assert!(
        outcomes
            .iter()
            .any(|o| matches!(o, Outcome::Deferred { .. })),
        "{outcomes:?}"
    );
    assert!(outcomes.contains(&Outcome::Duplicate), "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|o| **o == Outcome::Acked).count(), 1);
    h.stop().await.unwrap();
}

/// `.inbox(store)` with a handler that never calls `mark`: no lease, so concurrent
/// copies both run, but once one succeeded the worker records the key, and a later copy
/// is acked as a duplicate without running the handler.
#[tokio::test(start_paused = true)]
async fn inbox_mode_records_a_key_the_handler_did_not_mark() {
    let broker = MemoryTransport::new();
    let store = MemoryStore::new();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let builder = Worker::builder(broker.clone(), "billing")
        .inbox(store.clone())
        .concurrency(4)
        .handle(move |_: OrderPlaced, _cx: Context| {
            c.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Ok(())
            }
        });
    let h = TestHarness::start(&broker, builder).await.unwrap();
    let env = Envelope::encode(&OrderPlaced { order_id: 1 }).unwrap();
    h.publish_envelope(&env).await.unwrap();
    h.publish_envelope(&env).await.unwrap();
    let report = h.run_until_idle().await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "no lease: both copies ran");
    assert_eq!(report.count(|o| matches!(o, Outcome::Deferred { .. })), 0);
    assert_eq!(store.completed(), 1, "the worker recorded the key");
    h.publish_envelope(&env).await.unwrap();
    let report = h.run_until_idle().await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the later copy did not run"
    );
    assert!(report.outcomes(env.id).contains(&Outcome::Duplicate));
    h.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn stopping_mid_handler_redelivers_to_the_next_worker() {
    let broker = MemoryTransport::new();
    let builder = Worker::builder(broker.clone(), "billing")
        .drain_timeout(Duration::from_secs(1))
        .handle(|_: OrderPlaced, _cx: Context| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        });
    let h = TestHarness::start(&broker, builder).await.unwrap();
    h.publish(&OrderPlaced { order_id: 1 }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(broker.unacked("billing"), 1);
    h.stop().await.unwrap();
    assert_eq!(broker.unacked("billing"), 0);
    assert_eq!(
        broker.ready("billing"),
        1,
        "back in the queue, not lost and not acked"
    );

    let builder = Worker::builder(broker.clone(), "billing")
        .handle(|_: OrderPlaced, _cx: Context| async { Ok(()) });
    let h2 = TestHarness::start(&broker, builder).await.unwrap();
    let report = h2.run_until_idle().await;
    assert_eq!(report.count(|o| *o == Outcome::Acked), 1);
    h2.stop().await.unwrap();
}

#[tokio::test]
async fn bad_configuration_is_an_error_not_a_panic() {
    let broker = MemoryTransport::new();
    let err = Worker::builder(broker.clone(), "bad group!")
        .concurrency(0)
        .retry(RetryPolicy::default().max_attempts(0))
        .build()
        .unwrap_err();
    let text = err.to_string();
    for needle in [
        "group must be",
        "no handlers",
        "max_attempts",
        "concurrency must be",
    ] {
        assert!(text.contains(needle), "`{text}` lacks `{needle}`");
    }
    let dup = Worker::builder(broker, "g")
        .handle(|_: OrderPlaced, _cx: Context| async { Ok(()) })
        .handle(|_: OrderPlaced, _cx: Context| async { Ok(()) })
        .build()
        .unwrap_err();
    assert!(
        dup.to_string()
            .contains("two handlers for message `orders.placed`")
    );
}

/// A worker died holding the key (its lease runs for 40 s more): the redelivery is put
/// back once, for the rest of the lease — not every 100 ms, which spent a broker's whole
/// delivery limit and dead-lettered healthy messages — and is handled when the lease ends.
#[tokio::test(start_paused = true)]
async fn key_held_by_a_dead_worker_defers_once_for_the_rest_of_its_lease() {
    use steadfast::idempotency::{Begin, IdempotencyStore, Key};
    let broker = MemoryTransport::new();
    let store = MemoryStore::new();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let builder = Worker::builder(broker.clone(), "billing")
        .idempotency(store.clone())
        .handle(move |_: OrderPlaced, _cx: Context| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        });
    let h = TestHarness::start(&broker, builder).await.unwrap();
    let key = Key {
        group: "billing",
        name: "orders.placed",
        key: "9",
        fingerprint: None,
    };
    let dead = store.begin(key, Duration::from_secs(40)).await.unwrap();
    assert!(matches!(dead, Begin::Acquired(_)), "{dead:?}");
    let id = h.publish(&OrderPlaced { order_id: 9 }).await.unwrap();
    let report = h.run_until_idle().await;
    let outcomes = report.outcomes(id);
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
    match outcomes[0] {
        Outcome::Deferred { delay } => assert!(
            delay >= Duration::from_secs(39) && delay <= Duration::from_secs(41),
            "{delay:?}"
        ),
        ref o => panic!("first outcome {o:?}"),
    }
    assert_eq!(outcomes[1], Outcome::Acked);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    h.stop().await.unwrap();
}
