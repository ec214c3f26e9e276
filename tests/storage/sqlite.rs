//! The SQLite store, inbox and outbox (one relay per file).

use crate::common::*;
use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};
use steadfast::{
    Envelope,
    idempotency::{Begin, IdempotencyStore, Key},
    outbox::Relay,
    transport::{Transport, memory::MemoryTransport},
    worker::Outcome,
};
use tokio_util::sync::CancellationToken;

const K: Key<'static> = Key {
    group: "billing",
    name: "orders.placed",
    key: "1",
    fingerprint: None,
};

#[tokio::test]
async fn lease_release_complete_retention() {
    let db = Lite::new().await;
    let s = db.inbox.clone().with_retention(Duration::from_millis(300));
    let Begin::Acquired(l1) = s.begin(K, Duration::from_millis(200)).await.unwrap() else {
        panic!()
    };
    assert_eq!(
        s.begin(K, Duration::from_secs(5)).await.unwrap(),
        Begin::InFlight
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    let Begin::Acquired(l2) = s.begin(K, Duration::from_secs(5)).await.unwrap() else {
        panic!("expired lease taken over")
    };
    s.release(K, &l1).await.unwrap();
    assert_eq!(
        s.begin(K, Duration::from_secs(5)).await.unwrap(),
        Begin::InFlight
    );
    s.complete(K, &l2).await.unwrap();
    assert_eq!(
        s.begin(K, Duration::from_secs(5)).await.unwrap(),
        Begin::AlreadyDone
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(s.cleanup().await.unwrap(), 1);
    assert!(matches!(
        s.begin(K, Duration::from_secs(5)).await.unwrap(),
        Begin::Acquired(_)
    ));
    db.remove().await;
}

#[tokio::test]
async fn duplicate_and_crash_after_commit_make_one_effect() {
    duplicate_and_crash_after_commit_make_one_effect_as(Dedup::Lease).await;
}

#[tokio::test]
async fn inbox_mode_duplicate_and_crash_after_commit_make_one_effect() {
    duplicate_and_crash_after_commit_make_one_effect_as(Dedup::Inbox).await;
}

async fn duplicate_and_crash_after_commit_make_one_effect_as(dedup: Dedup) {
    let db = Lite::new().await;
    let broker = MemoryTransport::new();
    broker.bind("billing", ["orders.placed"]);
    let crashed = Arc::new(AtomicBool::new(false));
    let flaky: Arc<dyn Transport> = Arc::new(CrashBeforeFirstAck {
        inner: broker.clone(),
        crashed: crashed.clone(),
    });
    let outcomes = Outcomes::default();
    let billing = db.billing();
    let calls = billing.calls.clone();
    let w = start_worker_as(dedup, flaky, billing, db.inbox.clone(), &outcomes, 4);
    let env = order(1);
    broker.publish(&env).await.unwrap();
    eventually(
        10,
        "redelivery after the crash acked as duplicate",
        || async { outcomes.count(|o| *o == Outcome::Duplicate) == 1 },
    )
    .await;
    broker.publish(&env).await.unwrap();
    eventually(10, "second duplicate", || async {
        outcomes.count(|o| *o == Outcome::Duplicate) == 2
    })
    .await;
    assert!(crashed.load(Ordering::SeqCst));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(db.effects().await, (1, 1));
    w.stop().await;
    db.remove().await;
}

#[tokio::test]
async fn failing_handler_is_rolled_back_and_retried() {
    failing_handler_is_rolled_back_and_retried_as(Dedup::Lease).await;
}

#[tokio::test]
async fn inbox_mode_failing_handler_is_rolled_back_and_retried() {
    failing_handler_is_rolled_back_and_retried_as(Dedup::Inbox).await;
}

async fn failing_handler_is_rolled_back_and_retried_as(dedup: Dedup) {
    let db = Lite::new().await;
    let broker = MemoryTransport::new();
    broker.bind("billing", ["orders.placed"]);
    let outcomes = Outcomes::default();
    let mut billing = db.billing();
    billing.fail_first_attempt = true;
    let calls = billing.calls.clone();
    let w = start_worker_as(
        dedup,
        Arc::new(broker.clone()),
        billing,
        db.inbox.clone(),
        &outcomes,
        2,
    );
    broker.publish(&order(1)).await.unwrap();
    eventually(10, "acked on retry", || async {
        outcomes.count(|o| *o == Outcome::Acked) == 1
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(db.effects().await, (1, 1));
    assert_eq!(db.outbox.pending().await.unwrap(), 1);
    w.stop().await;
    db.remove().await;
}

#[tokio::test]
async fn outbox_relay_out_of_order_commits_and_poison_rows() {
    let db = Lite::new().await;
    let broker = MemoryTransport::new();
    broker.bind("billing", ["orders.placed"]);
    let relay = Relay::builder(db.outbox.clone(), Arc::new(broker.clone()))
        .poll_interval(Duration::from_millis(50))
        .max_attempts(2)
        .max_payload_bytes(1024)
        .retry_delay(Duration::from_millis(10), Duration::from_millis(20))
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay.run_until(stop.clone().cancelled_owned()));
    // A poison row first: it must not block the rows behind it.
    let mut tx = db.pool.begin().await.unwrap();
    db.outbox
        .enqueue_envelope(&mut tx, Envelope::new("nobody.listens", &b"{}"[..]))
        .await
        .unwrap();
    db.outbox
        .enqueue_envelope(&mut tx, Envelope::new("orders.placed", vec![b' '; 2048]))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // SQLite serialises writers, so "out of order" here means a long transaction that
    // took its sequence number first and commits after shorter ones.
    let mut producers = Vec::new();
    for p in 0..8_i64 {
        let pool = db.pool.clone();
        let outbox = db.outbox.clone();
        producers.push(tokio::spawn(async move {
            for i in 0..10_i64 {
                let mut tx = pool.begin().await.unwrap();
                outbox
                    .enqueue(
                        &mut tx,
                        &OrderPlaced {
                            order_id: p * 1000 + i,
                            cents: 1,
                        },
                    )
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            }
        }));
    }
    for p in producers {
        p.await.unwrap();
    }
    eventually(20, "all good rows published", || async {
        db.outbox.pending().await.unwrap() == 0
    })
    .await;
    let got: HashSet<_> = broker.published().iter().map(|e| e.id).collect();
    assert_eq!(got.len(), 80);
    assert_eq!(broker.published().len(), 80);
    let parked = db.outbox.parked(10).await.unwrap();
    assert_eq!(parked.len(), 2, "{parked:?}");
    assert!(parked.iter().any(|p| p.error.contains("exceeds")));
    assert!(
        parked
            .iter()
            .any(|p| p.error.contains("nobody.listens") && p.attempts == 2)
    );
    stop.cancel();
    task.await.unwrap();
    db.remove().await;
}

#[tokio::test]
async fn zero_retention_deletes_confirmed_rows_and_keeps_failed_ones() {
    let db = Lite::new().await;
    let broker = MemoryTransport::new();
    broker.bind("billing", ["orders.placed"]);
    let mut tx = db.pool.begin().await.unwrap();
    let unroutable = db
        .outbox
        .enqueue_envelope(&mut tx, Envelope::new("nobody.listens", &b"{}"[..]))
        .await
        .unwrap();
    for order_id in 1..=3 {
        db.outbox
            .enqueue(&mut tx, &OrderPlaced { order_id, cents: 1 })
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let relay = Relay::builder(db.outbox.clone(), Arc::new(broker.clone()))
        .retention(Duration::ZERO)
        .max_attempts(1)
        .build()
        .unwrap();
    let stats = relay.run_once().await.unwrap();
    assert_eq!((stats.claimed, stats.sent, stats.parked), (4, 3, 1));
    assert_eq!(broker.published().len(), 3);
    // The confirmed rows are gone at once; the parked one stays for an operator.
    let rows: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, state FROM {}",
        db.outbox.table()
    )))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows, vec![(unroutable.to_string(), "parked".to_owned())]);
    db.remove().await;
}
