//! RabbitMQ faults: the broker application restarted (`rabbitmqctl stop_app` /
//! `start_app`) and every connection closed (`rabbitmqctl close_all_connections`) while a
//! worker handles 10,000 messages. Every message must be handled (no loss), and the same
//! worker — same process, same delivery stream — must resume by itself.
//!
//! These tests stop a shared broker: the project's test script runs `*_faults` binaries
//! alone, after everything else. A guard brings the broker back even when a test fails.

use std::{
    collections::HashSet,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use steadfast::{
    Context, Envelope, HandlerError, Message, MessageId, Worker,
    transport::{Health, Transport, amqp::AmqpTransport},
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "faults.job")]
struct Job {
    n: u64,
}

const TOTAL: usize = 10_000;

fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn rabbitmqctl(args: &[&str]) -> bool {
    match Command::new("rabbitmqctl").args(args).output() {
        Ok(o) => {
            if !o.status.success() {
                eprintln!(
                    "rabbitmqctl {args:?} failed: {}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            o.status.success()
        }
        Err(e) => {
            eprintln!("cannot run rabbitmqctl: {e}");
            false
        }
    }
}

/// Holds the broker for one test at a time (nextest runs each test in its own process,
/// so the lock is a file lock) and restores the broker when dropped, whatever happened
/// in the test.
struct BrokerGuard {
    _lock: std::fs::File,
}

impl BrokerGuard {
    fn take() -> Self {
        let path = std::env::temp_dir().join("steadfast-amqp-faults.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .expect("open the fault-test lock file");
        // Blocks until the test holding the broker is done with it.
        tokio::task::block_in_place(|| file.lock()).expect("lock the fault-test lock file");
        Self { _lock: file }
    }
}

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        if !rabbitmqctl(&["start_app"]) {
            // The node itself may be down: start it.
            let _ = Command::new("rabbitmq-server").arg("-detached").status();
        }
        let _ = rabbitmqctl(&["await_startup", "--timeout", "60"]);
    }
}

async fn run_ctl(args: &'static [&'static str]) {
    let ok = tokio::task::spawn_blocking(move || rabbitmqctl(args))
        .await
        .unwrap_or(false);
    assert!(ok, "rabbitmqctl {args:?} failed");
}

struct Setup {
    transport: AmqpTransport,
    handled: Arc<Mutex<HashSet<MessageId>>>,
    calls: Arc<Mutex<usize>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn setup(tag: &str) -> Setup {
    let name = format!("sf-faults-{tag}-{}", uuid::Uuid::now_v7().simple());
    let transport = AmqpTransport::builder(url())
        .exchange(name.clone())
        .queue_prefix(format!("{name}."))
        .queue_expiry(Duration::from_secs(600))
        .max_reconnect_delay(Duration::from_secs(1))
        .operation_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("RabbitMQ must be running");
    let handled: Arc<Mutex<HashSet<MessageId>>> = Arc::default();
    let calls: Arc<Mutex<usize>> = Arc::default();
    let (h, c) = (handled.clone(), calls.clone());
    let worker = Worker::builder(transport.clone(), "jobs")
        .handle(move |_: Job, cx: Context| {
            h.lock().unwrap().insert(cx.id());
            *c.lock().unwrap() += 1;
            // Slow enough (at most 5,000/s with 100 at once) that the fault, which takes
            // rabbitmqctl about a second to deliver, lands mid-stream.
            async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok::<(), HandlerError>(())
            }
        })
        .concurrency(100)
        .build()
        .unwrap();
    worker.declare().await.unwrap();
    let envelopes: Vec<Envelope> = (0..TOTAL as u64)
        .map(|n| Envelope::encode(&Job { n }).unwrap())
        .collect();
    for chunk in envelopes.chunks(500) {
        for r in transport.publish_batch(chunk).await {
            r.expect("published");
        }
    }
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        worker
            .run_until(async move { token.cancelled().await })
            .await
            .expect("the worker keeps running through the fault");
    });
    Setup {
        transport,
        handled,
        calls,
        stop,
        task,
    }
}

async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn finish(s: Setup, fault: &str) {
    let started = Instant::now();
    let handled = s.handled.clone();
    wait_for("every message handled", Duration::from_secs(50), || {
        handled.lock().unwrap().len() == TOTAL
    })
    .await;
    let distinct = s.handled.lock().unwrap().len();
    let calls = *s.calls.lock().unwrap();
    eprintln!(
        "{fault}: {distinct} distinct ids handled, {calls} handler calls ({} redeliveries), drained {:?} after recovery",
        calls - distinct,
        started.elapsed()
    );
    assert_eq!(distinct, TOTAL, "none lost");
    assert_eq!(s.transport.health(), Health::Connected);
    s.stop.cancel();
    s.task.await.expect("worker task");
    s.transport.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_nothing() {
    let _guard = BrokerGuard::take();
    let s = setup("restart").await;
    let handled = s.handled.clone();
    wait_for("some messages handled", Duration::from_secs(30), || {
        handled.lock().unwrap().len() >= 500
    })
    .await;
    run_ctl(&["stop_app"]).await;
    let down = Instant::now();
    let t = s.transport.clone();
    wait_for(
        "health to report the outage",
        Duration::from_secs(10),
        || t.health() == Health::Reconnecting,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(down.elapsed())).await;
    let before = s.handled.lock().unwrap().len();
    assert!(
        before < TOTAL,
        "the fault hit mid-stream ({before} handled)"
    );
    run_ctl(&["start_app"]).await;
    finish(s, "stop_app/start_app").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_connection_close_loses_nothing() {
    let _guard = BrokerGuard::take();
    let s = setup("close").await;
    let handled = s.handled.clone();
    wait_for("some messages handled", Duration::from_secs(30), || {
        handled.lock().unwrap().len() >= 500
    })
    .await;
    run_ctl(&["close_all_connections", "steadfast fault test"]).await;
    let before = s.handled.lock().unwrap().len();
    assert!(
        before < TOTAL,
        "the fault hit mid-stream ({before} handled)"
    );
    finish(s, "close_all_connections").await;
}

/// A delivery received before the connection died cannot be acked afterwards — not on
/// the dead channel, and never on the new one: its settle is an error ("not settled"),
/// and the broker hands the message out again on the same stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_after_the_connection_died_is_not_settled_and_redelivers() {
    use futures::StreamExt;
    use steadfast::{
        Disposition,
        transport::{Subscription, TransportErrorKind},
    };
    let _guard = BrokerGuard::take();
    let name = format!("sf-faults-gen-{}", uuid::Uuid::now_v7().simple());
    let t = AmqpTransport::builder(url())
        .exchange(name.clone())
        .queue_prefix(format!("{name}."))
        .queue_expiry(Duration::from_secs(600))
        .max_reconnect_delay(Duration::from_secs(1))
        .operation_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("RabbitMQ must be running");
    let sub = Subscription::new("g", [Job::NAME]);
    let mut stream = t.subscribe(&sub).await.unwrap();
    let env = Envelope::encode(&Job { n: 1 }).unwrap();
    t.publish(&env).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("delivered")
        .unwrap()
        .unwrap();
    assert_eq!(first.envelope.id, env.id);
    run_ctl(&["close_all_connections", "steadfast fault test"]).await;
    let t2 = t.clone();
    wait_for("the outage noticed", Duration::from_secs(10), || {
        t2.health() != Health::Connected
    })
    .await;
    // The same stream resumes and gets the message again.
    let again = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("redelivered after the reconnect")
        .unwrap()
        .unwrap();
    assert_eq!(again.envelope.id, env.id);
    assert_eq!(t.health(), Health::Connected);
    let e = first
        .settle(Disposition::Ack)
        .await
        .expect_err("an ack of the dead channel's delivery is not settled");
    assert_eq!(e.kind(), TransportErrorKind::Connection, "{e}");
    again
        .settle(Disposition::Ack)
        .await
        .expect("acked on the new channel");
    drop(stream);
    t.close().await;
}
