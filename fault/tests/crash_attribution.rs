//! Crash attribution against the local RabbitMQ, NATS and PostgreSQL, with real worker
//! processes (`fault-worker`) that a message aborts, restarted as an orchestrator would:
//! only the message at fault ends in the dead-letter queue, with a crash-loop reason;
//! every healthy message is handled exactly once (the effects table has no unique
//! constraint); a flapping connection dead-letters nothing. These tests restart no
//! shared server: the faults are worker aborts and cuts in the harness's own TCP proxy.
//!
//! Three tests, about a minute together: the crash loop in `.inbox` mode on both brokers
//! and the flapping connection on RabbitMQ (where the broker counts prefetch lost with a
//! connection). The `.idempotency` crash loop and NATS flapping are the fault suite's
//! long-run scenarios (`crash-loop-one`, `flapping`; `docs/reliability.md`), and the
//! several-poison `crash-loop` scenario runs in `broker_faults`.
//!
//! `AMQP_URL` / `NATS_URL` pick the broker (for example a RabbitMQ 4 node).

use std::time::Duration;
use steadfast_fault::{
    harness::{self, Env},
    spec::Broker,
    suite,
};

async fn check(name: &str, broker: Broker, n: u64) -> harness::Row {
    let env = Env::from_env(env!("CARGO_BIN_EXE_fault-worker").as_ref());
    let mut s = suite::scenario(name, broker, n).expect("a scenario for this broker");
    s.deadline = Duration::from_secs(150);
    let row = harness::run(&env, &s, None)
        .await
        .unwrap_or_else(|e| panic!("{name} on {}: {e}", broker.as_str()));
    eprintln!(
        "{}\n{}",
        harness::table_header(),
        harness::table_line(&row, None)
    );
    assert!(
        row.passed(),
        "{}: {}; healthy dead letters: {:?}",
        s.name,
        row.problems.join("; "),
        row.wrong_reasons
    );
    assert_eq!(row.lost, 0);
    assert_eq!(
        row.duplicate_effects, 0,
        "every healthy message handled once"
    );
    assert_eq!(row.wrongly_dead, 0, "no healthy message dead-lettered");
    assert_eq!(row.left_unacked, 0);
    row
}

/// One poison among 200 healthy messages, concurrency 32, prefetch 100.
async fn one_poison(name: &str, broker: Broker) {
    let row = check(name, broker, 201).await;
    assert_eq!(row.dead_expected, 1);
    assert_eq!(row.dead_actual, 1, "the poison is dead-lettered");
    assert!(
        !row.poison_reasons.is_empty()
            && row
                .poison_reasons
                .iter()
                .all(|r| r.starts_with("crash loop: the worker stopped")),
        "reasons: {:?}",
        row.poison_reasons
    );
    // The crash limit decided, not the broker's backstop (`crash loop: delivery limit
    // reached`): the first crash shares nothing with the limit, 1 + the limit (3) at least.
    assert!(row.restarts >= 4, "{} restarts", row.restarts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_one_crash_loop_message_among_200_healthy_inbox_mode() {
    one_poison("crash-loop-one+inbox", Broker::Amqp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_one_crash_loop_message_among_200_healthy_inbox_mode() {
    one_poison("crash-loop-one+inbox", Broker::Nats).await;
}

/// Connections cut after 6 KB, about 13 times a second for 15 s: RabbitMQ counts every
/// prefetched delivery such a connection dies with, and none of that may dead-letter a
/// message (the work queue's limit is a backstop far above the crash limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_flapping_connection_dead_letters_nothing() {
    let row = check("flapping", Broker::Amqp, 600).await;
    assert_eq!(row.dead_actual, 0);
}
