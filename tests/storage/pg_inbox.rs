//! PostgreSQL idempotency store and inbox.

use crate::common::*;
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};
use steadfast::{
    idempotency::{Begin, IdempotencyStore, Key},
    transport::{Transport, memory::MemoryTransport},
    worker::Outcome,
};

const K: Key<'static> = Key {
    group: "billing",
    name: "orders.placed",
    key: "1",
    fingerprint: None,
};

#[tokio::test]
async fn lease_release_complete_and_scoping() {
    let pg = Pg::new().await;
    let s = &pg.inbox;
    let Begin::Acquired(l1) = s.begin(K, Duration::from_millis(300)).await.unwrap() else {
        panic!("first begin must acquire")
    };
    assert_eq!(
        s.begin(K, Duration::from_secs(5)).await.unwrap(),
        Begin::InFlight
    );
    // Another message name or group is another key.
    for other in [
        Key {
            name: "orders.cancelled",
            ..K
        },
        Key {
            group: "audit",
            ..K
        },
    ] {
        assert!(matches!(
            s.begin(other, Duration::from_secs(5)).await.unwrap(),
            Begin::Acquired(_)
        ));
    }
    // A crashed holder's key frees itself when the lease ends.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let Begin::Acquired(l2) = s.begin(K, Duration::from_secs(5)).await.unwrap() else {
        panic!("an expired lease must be taken over")
    };
    s.release(K, &l1).await.unwrap(); // stale holder: no effect
    assert_eq!(
        s.begin(K, Duration::from_secs(5)).await.unwrap(),
        Begin::InFlight
    );
    s.release(K, &l2).await.unwrap();
    let Begin::Acquired(l3) = s.begin(K, Duration::from_secs(5)).await.unwrap() else {
        panic!("a released key is free")
    };
    s.complete(K, &l3).await.unwrap();
    assert_eq!(
        s.begin(K, Duration::from_secs(5)).await.unwrap(),
        Begin::AlreadyDone
    );
    s.release(K, &l3).await.unwrap(); // release after complete keeps it done
    assert_eq!(
        s.begin(K, Duration::from_secs(5)).await.unwrap(),
        Begin::AlreadyDone
    );
    pg.drop_schema().await;
}

#[tokio::test]
async fn retention_and_cleanup() {
    let pg = Pg::new().await;
    let s = pg.inbox.clone().with_retention(Duration::from_millis(200));
    let Begin::Acquired(l) = s.begin(K, Duration::from_secs(5)).await.unwrap() else {
        panic!()
    };
    s.complete(K, &l).await.unwrap();
    assert_eq!(
        s.begin(K, Duration::from_secs(5)).await.unwrap(),
        Begin::AlreadyDone
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.cleanup().await.unwrap(), 1);
    assert!(matches!(
        s.begin(K, Duration::from_secs(5)).await.unwrap(),
        Begin::Acquired(_)
    ));
    pg.drop_schema().await;
}

/// The inbox's looks made at once share queries: each still gets its own key's answer,
/// scoped by group and name, and a key done longer ago than the retention is new.
#[tokio::test]
async fn looks_made_at_once_answer_each_key_by_group_name_and_retention() {
    let pg = Pg::new().await;
    let s = pg.inbox.clone().with_retention(Duration::from_millis(400));
    let mark = |key: Key<'static>| {
        let (pool, s) = (pg.pool.clone(), s.clone());
        async move {
            let mut tx = pool.begin().await.unwrap();
            assert!(s.mark_key(&mut tx, key).await.unwrap());
            tx.commit().await.unwrap();
        }
    };
    // An old key, outliving the retention before the looks.
    mark(Key { key: "old", ..K }).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let done: Vec<String> = (0..60)
        .filter(|i| i % 3 == 0)
        .map(|i| i.to_string())
        .collect();
    for k in &done {
        mark(Key {
            key: Box::leak(k.clone().into_boxed_str()),
            ..K
        })
        .await;
    }
    // The same keys under another group or name are not done.
    let mut asks: Vec<(Key<'static>, bool)> = Vec::new();
    for i in 0..60 {
        let key: &'static str = Box::leak(i.to_string().into_boxed_str());
        asks.push((Key { key, ..K }, i % 3 == 0));
        asks.push((
            Key {
                key,
                group: "other",
                ..K
            },
            false,
        ));
        asks.push((
            Key {
                key,
                name: "orders.cancelled",
                ..K
            },
            false,
        ));
    }
    asks.push((Key { key: "old", ..K }, false));
    let answers = futures::future::join_all(asks.iter().map(|(k, _)| s.is_done(*k))).await;
    for ((k, want), got) in asks.iter().zip(answers) {
        assert_eq!(got.unwrap(), *want, "{k:?}");
    }
    pg.drop_schema().await;
}

/// The looks' own connection, dropped by the server between two looks (an idle timeout,
/// a restart): the next look opens a new one and is answered, not failed.
#[tokio::test]
async fn a_look_after_its_connection_was_closed_is_answered_on_a_new_one() {
    let pg = Pg::new().await;
    assert!(!pg.inbox.is_done(K).await.unwrap());
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE pid <> pg_backend_pid() AND query LIKE '%unnest%' AND query LIKE '%' || $1 || '%'",
    )
    .bind(&pg.schema)
    .fetch_all(&pg.pool)
    .await
    .unwrap();
    assert_eq!(killed, [true], "the looks' connection, and only it");
    let mut tx = pg.pool.begin().await.unwrap();
    assert!(pg.inbox.mark_key(&mut tx, K).await.unwrap());
    tx.commit().await.unwrap();
    assert!(pg.inbox.is_done(K).await.unwrap());
    pg.drop_schema().await;
}

#[tokio::test]
async fn concurrent_marks_in_transactions_make_one_effect() {
    let pg = Pg::new().await;
    let key = Key { key: "race", ..K };
    let mut a = pg.pool.begin().await.unwrap();
    let mut b = pg.pool.begin().await.unwrap();
    assert!(pg.inbox.mark_key(&mut a, key).await.unwrap());
    // b waits on a's row lock; it learns the outcome only when a finishes.
    let inbox = pg.inbox.clone();
    let waiter = tokio::spawn(async move {
        let won = inbox.mark_key(&mut b, key).await.unwrap();
        b.commit().await.unwrap();
        won
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiter.is_finished(),
        "the second mark must wait for the first transaction"
    );
    a.commit().await.unwrap();
    assert!(
        !waiter.await.unwrap(),
        "after the first commits, the second sees it done"
    );

    // If the first rolls back, the second goes ahead.
    let key = Key {
        key: "rollback",
        ..K
    };
    let mut a = pg.pool.begin().await.unwrap();
    assert!(pg.inbox.mark_key(&mut a, key).await.unwrap());
    let inbox = pg.inbox.clone();
    let pool = pg.pool.clone();
    let waiter = tokio::spawn(async move {
        let mut b = pool.begin().await.unwrap();
        let won = inbox.mark_key(&mut b, key).await.unwrap();
        b.commit().await.unwrap();
        won
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.rollback().await.unwrap();
    assert!(waiter.await.unwrap());
    pg.drop_schema().await;
}

#[tokio::test]
async fn duplicate_delivery_makes_one_effect() {
    duplicate_delivery_makes_one_effect_as(Dedup::Lease).await;
}

#[tokio::test]
async fn inbox_mode_duplicate_delivery_makes_one_effect() {
    duplicate_delivery_makes_one_effect_as(Dedup::Inbox).await;
}

async fn duplicate_delivery_makes_one_effect_as(dedup: Dedup) {
    let pg = Pg::new().await;
    let broker = MemoryTransport::new();
    let outcomes = Outcomes::default();
    let billing = pg.billing();
    let calls = billing.calls.clone();
    let w = start_worker_as(
        dedup,
        Arc::new(broker.clone()),
        billing,
        pg.inbox.clone(),
        &outcomes,
        4,
    );
    let env = order(1);
    broker.bind("billing", ["orders.placed"]);
    broker.publish(&env).await.unwrap();
    eventually(10, "first delivery acked", || async {
        outcomes.count(|o| *o == Outcome::Acked) == 1
    })
    .await;
    broker.publish(&env).await.unwrap(); // the broker delivers it again
    eventually(10, "duplicate acked", || async {
        outcomes.count(|o| *o == Outcome::Duplicate) == 1
    })
    .await;
    assert_eq!(pg.effects().await, (1, 1));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the duplicate must not run the handler"
    );
    assert_eq!(
        pg.outbox.pending().await.unwrap(),
        1,
        "one outgoing message"
    );
    w.stop().await;
    pg.drop_schema().await;
}

#[tokio::test]
async fn same_message_to_two_workers_at_once_makes_one_effect() {
    let pg = Pg::new().await;
    let broker = MemoryTransport::new();
    broker.bind("billing", ["orders.placed"]);
    let outcomes = Outcomes::default();
    let mut billing = pg.billing();
    billing.hold = Duration::from_millis(300); // both deliveries overlap in time
    let w1 = start_worker(
        Arc::new(broker.clone()),
        billing.clone(),
        pg.inbox.clone(),
        &outcomes,
        1,
    );
    let w2 = start_worker(
        Arc::new(broker.clone()),
        billing.clone(),
        pg.inbox.clone(),
        &outcomes,
        1,
    );
    for id in 1..=5 {
        let env = order(id);
        broker.publish(&env).await.unwrap();
        broker.publish(&env).await.unwrap();
    }
    // The second copy waits out the first's lease (decision 0401): allow more than one.
    eventually(30, "all deliveries settled", || async {
        outcomes.count(|o| matches!(o, Outcome::Acked | Outcome::Duplicate)) == 10
    })
    .await;
    assert_eq!(pg.effects().await, (5, 5));
    assert!(broker.is_idle("billing"));
    w1.stop().await;
    w2.stop().await;

    // Without the worker's store (two plain consumers racing), the inbox mark alone
    // still makes one effect.
    let broker = MemoryTransport::new();
    broker.bind("billing", ["orders.placed"]);
    let outcomes = Outcomes::default();
    let mut billing = pg.billing();
    billing.hold = Duration::from_millis(200);
    let none = steadfast::idempotency::MemoryStore::new();
    let w1 = start_worker(
        Arc::new(broker.clone()),
        billing.clone(),
        none.clone(),
        &outcomes,
        1,
    );
    let w2 = start_worker(
        Arc::new(broker.clone()),
        billing.clone(),
        steadfast::idempotency::MemoryStore::new(),
        &outcomes,
        1,
    );
    let env = order(6);
    broker.publish(&env).await.unwrap();
    broker.publish(&env).await.unwrap();
    eventually(20, "both acked", || async {
        outcomes.count(|o| *o == Outcome::Acked) == 2
    })
    .await;
    assert_eq!(billing.calls.load(Ordering::SeqCst), 2, "both handlers ran");
    assert_eq!(pg.effects().await, (6, 6), "but only one wrote");
    w1.stop().await;
    w2.stop().await;
    pg.drop_schema().await;
}

#[tokio::test]
async fn inbox_mode_same_message_to_two_workers_at_once_makes_one_effect() {
    let pg = Pg::new().await;
    let broker = MemoryTransport::new();
    broker.bind("billing", ["orders.placed"]);
    let outcomes = Outcomes::default();
    let mut billing = pg.billing();
    billing.hold = Duration::from_millis(300); // both copies overlap in time
    let start = |b| {
        start_worker_as(
            Dedup::Inbox,
            Arc::new(broker.clone()),
            b,
            pg.inbox.clone(),
            &outcomes,
            1,
        )
    };
    let (w1, w2) = (start(billing.clone()), start(billing.clone()));
    for id in 1..=5 {
        let env = order(id);
        broker.publish(&env).await.unwrap();
        broker.publish(&env).await.unwrap();
    }
    eventually(30, "all deliveries settled", || async {
        outcomes.count(|o| matches!(o, Outcome::Acked | Outcome::Duplicate)) == 10
    })
    .await;
    assert_eq!(pg.effects().await, (5, 5), "one effect per message");
    assert_eq!(
        outcomes.count(|o| matches!(o, Outcome::Deferred { .. })),
        0,
        "no lease, so no copy waits for another"
    );
    assert!(
        billing.calls.load(Ordering::SeqCst) > 5,
        "copies that overlapped both ran the handler; their marks kept one effect"
    );
    assert!(broker.is_idle("billing"));
    w1.stop().await;
    w2.stop().await;
    pg.drop_schema().await;
}

#[tokio::test]
async fn handler_failing_after_partial_work_is_rolled_back_and_retried() {
    handler_failing_after_partial_work_is_rolled_back_and_retried_as(Dedup::Lease).await;
}

#[tokio::test]
async fn inbox_mode_handler_failing_after_partial_work_is_rolled_back_and_retried() {
    handler_failing_after_partial_work_is_rolled_back_and_retried_as(Dedup::Inbox).await;
}

async fn handler_failing_after_partial_work_is_rolled_back_and_retried_as(dedup: Dedup) {
    let pg = Pg::new().await;
    let broker = MemoryTransport::new();
    broker.bind("billing", ["orders.placed"]);
    let outcomes = Outcomes::default();
    let mut billing = pg.billing();
    billing.fail_first_attempt = true;
    let calls = billing.calls.clone();
    let w = start_worker_as(
        dedup,
        Arc::new(broker.clone()),
        billing,
        pg.inbox.clone(),
        &outcomes,
        2,
    );
    broker.publish(&order(1)).await.unwrap();
    eventually(10, "acked on retry", || async {
        outcomes.count(|o| *o == Outcome::Acked) == 1
    })
    .await;
    assert_eq!(outcomes.count(|o| matches!(o, Outcome::Retried { .. })), 1);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the retry ran the handler again"
    );
    assert_eq!(
        outcomes.count(|o| *o == Outcome::Duplicate),
        0,
        "the failure was not deduplicated"
    );
    assert_eq!(
        pg.effects().await,
        (1, 1),
        "the failed attempt's write was rolled back"
    );
    assert_eq!(
        pg.outbox.pending().await.unwrap(),
        1,
        "and so was its outbox row"
    );
    w.stop().await;
    pg.drop_schema().await;
}

#[tokio::test]
async fn crash_after_commit_before_ack_is_acked_without_running_again() {
    crash_after_commit_before_ack_is_acked_without_running_again_as(Dedup::Lease).await;
}

#[tokio::test]
async fn inbox_mode_crash_after_commit_before_ack_is_acked_without_running_again() {
    crash_after_commit_before_ack_is_acked_without_running_again_as(Dedup::Inbox).await;
}

async fn crash_after_commit_before_ack_is_acked_without_running_again_as(dedup: Dedup) {
    let pg = Pg::new().await;
    let broker = MemoryTransport::new();
    broker.bind("billing", ["orders.placed"]);
    let crashed = Arc::new(AtomicBool::new(false));
    let flaky: Arc<dyn Transport> = Arc::new(CrashBeforeFirstAck {
        inner: broker.clone(),
        crashed: crashed.clone(),
    });
    let outcomes = Outcomes::default();
    let billing = pg.billing();
    let calls = billing.calls.clone();
    let w = start_worker_as(dedup, flaky, billing, pg.inbox.clone(), &outcomes, 2);
    broker.publish(&order(1)).await.unwrap();
    eventually(10, "redelivery acked as duplicate", || async {
        outcomes.count(|o| *o == Outcome::Duplicate) == 1
    })
    .await;
    assert!(crashed.load(Ordering::SeqCst));
    assert_eq!(outcomes.count(|o| matches!(o, Outcome::NotSettled(_))), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(pg.effects().await, (1, 1));
    eventually(5, "nothing left at the broker", || async {
        broker.is_idle("billing")
    })
    .await;
    w.stop().await;
    pg.drop_schema().await;
}

#[tokio::test]
async fn secrets_never_appear_in_errors_or_debug() {
    let canary = "CANARY-pw-7f3a";
    let url = format!("postgres://postgres:{canary}@127.0.0.1:1/test");
    let err = steadfast::idempotency::postgres::connect(&url)
        .await
        .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(!text.contains(canary), "{text}");
    assert!(text.contains("***"), "{text}");
}

/// `begin` commits its lease without waiting for the WAL flush, for its own statement
/// only: the next transaction on the same connection (the user's, with the inbox key)
/// is synchronous again.
#[tokio::test]
async fn lease_commit_does_not_leave_the_connection_asynchronous() {
    let pg = Pg::new().await;
    let one = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&database_url())
        .await
        .unwrap();
    let store = steadfast::idempotency::PostgresStore::new(one.clone())
        .with_table(&format!("{}.steadfast_inbox", pg.schema))
        .unwrap();
    assert!(matches!(
        store.begin(K, Duration::from_secs(5)).await.unwrap(),
        Begin::Acquired(_)
    ));
    let setting: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&one)
        .await
        .unwrap();
    assert_eq!(setting, "on");
    one.close().await;
    pg.drop_schema().await;
}
