//! A worker and a publisher on a three-node JetStream cluster (`scripts/brokers.sh
//! nats-cluster start`: client ports 4251-4253, or the seeds in
//! `STEADFAST_TEST_NATS_CLUSTER`) through the faults a cluster sees: the worker's node
//! killed with SIGKILL, the stream and the consumer leader stepped down, a rolling
//! restart, lame-duck mode on the worker's node, a node paused with SIGSTOP for 30 s.
//!
//! Streams have three replicas; a few thousand messages are published while the fault
//! happens and every handled message is counted. Each scenario checks: none lost, no
//! publish reported `Unroutable` (an election is retried), duplicates no more than what
//! was in flight, and states the longest stall in handling and the time to drain. One
//! scenario publishes through the outbox instead (rows committed in PostgreSQL, a table
//! of its own on `DATABASE_URL`, a relay publishing them) and also checks that the stream
//! stored every committed row exactly once (`Nats-Msg-Id`). A last test checks the
//! replica count: an R1 stream where R3 is asked for fails start-up, and an R1 stream on
//! the cluster without a count asked for is a warning. These
//! tests stop and pause nodes of that cluster (never the machine's own server), so they
//! run one at a time (`*_faults`), and each brings every node back when it ends, passed
//! or failed.

use serde::{Deserialize, Serialize};
use std::{
    collections::HashMap,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use steadfast::{
    Context, Envelope, Message, Worker,
    transport::{Transport, TransportErrorKind, nats::NatsTransport},
};
use tokio_util::sync::CancellationToken;

mod outbox;
mod replicas;

use outbox::Outbox;

/// Messages per scenario.
const N: u64 = 3000;
/// Handlers at once; also the pull batch.
const CONCURRENCY: usize = 32;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(name = "cluster.job")]
struct Job {
    n: u64,
}

fn seeds() -> String {
    std::env::var("STEADFAST_TEST_NATS_CLUSTER")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            "nats://127.0.0.1:4251,nats://127.0.0.1:4252,nats://127.0.0.1:4253".to_owned()
        })
}

/// Runs `scripts/brokers.sh nats-cluster <args>` and returns its standard output.
fn cluster(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/brokers.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg("nats-cluster")
        .args(args)
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "scripts/brokers.sh nats-cluster {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn signal(sig: &str, node: u32) {
    let pid = cluster(&["pid", &node.to_string()]);
    let ok = Command::new("kill")
        .args([sig, &pid])
        .status()
        .expect("kill runs")
        .success();
    assert!(ok, "kill {sig} {pid} (node {node})");
}

/// Brings every node back (resumed, started) when a scenario ends, however it ends.
struct Heal;

impl Drop for Heal {
    fn drop(&mut self) {
        for n in 1..=3 {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/brokers.sh");
            if let Ok(out) = Command::new("bash")
                .args([script, "nats-cluster", "pid", &n.to_string()])
                .output()
            {
                let pid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                if !pid.is_empty() {
                    let _ = Command::new("kill").args(["-CONT", &pid]).status();
                }
            }
        }
        let _ = Command::new("bash")
            .args([
                concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/brokers.sh"),
                "nats-cluster",
                "start",
            ])
            .status();
    }
}

/// The node (1..=3) a transport is connected to, from its server name `sf-nN`.
fn node_of(t: &NatsTransport) -> u32 {
    let name = t.server_name();
    name.trim_start_matches("sf-n")
        .parse()
        .unwrap_or_else(|_| panic!("unexpected server name `{name}`"))
}

/// Everything this process logged at `warn` and above (each test runs in a process of
/// its own under nextest).
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Sink;

impl std::io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut log = LOG.lock().unwrap_or_else(|p| p.into_inner());
        if log.len() < 64 << 20 {
            log.extend_from_slice(b);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends steadfast's warnings to [`LOG`]; returns what was logged so far.
fn logged() -> String {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("steadfast=warn"))
            .with_ansi(false)
            .with_writer(|| Sink)
            .try_init();
    });
    String::from_utf8_lossy(&LOG.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

/// Where a scenario's messages come from.
#[derive(Clone, Copy, PartialEq)]
enum Source {
    /// A publisher task, `publish_batch` of 50, a failed message sent again.
    Publisher,
    /// Rows committed to a PostgreSQL outbox, 50 a transaction; a relay publishes them.
    Outbox,
}

/// What a scenario gives the fault.
struct Scene {
    worker: NatsTransport,
    /// The relay's transport (outbox scenarios).
    relay: Option<NatsTransport>,
    stream: String,
    consumer: String,
    admin: async_nats::jetstream::Context,
}

impl Scene {
    /// Sends a JetStream API request and checks the answer is not an error.
    async fn api(&self, subject: String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r: Result<serde_json::Value, _> = self
                .admin
                .request(subject.clone(), &serde_json::json!({}))
                .await;
            match r {
                Ok(v) if v.get("error").is_none() => return,
                other => {
                    assert!(Instant::now() < deadline, "{subject}: {other:?}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The publisher: batches of 50, paced so publishing spans the fault; a failed message
/// is sent again (same id: the stream's duplicate window absorbs a copy whose PubAck was
/// lost) until it is stored. Counts the failures in `retried`, with the text of those
/// reported unroutable.
async fn publish(publisher: NatsTransport, retried: Arc<Mutex<(u64, Vec<String>)>>) {
    let started = Instant::now();
    for first in (0..N).step_by(50) {
        let mut batch: Vec<Envelope> = (first..(first + 50).min(N))
            .map(|n| Envelope::encode(&Job { n }).unwrap())
            .collect();
        while !batch.is_empty() {
            let results = publisher.publish_batch(&batch).await;
            let mut again = Vec::new();
            for (env, res) in batch.into_iter().zip(results) {
                if let Err(e) = res {
                    let mut r = retried.lock().unwrap();
                    r.0 += 1;
                    if e.kind() == TransportErrorKind::Unroutable {
                        r.1.push(e.to_string());
                    }
                    again.push(env);
                }
            }
            if !again.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            batch = again;
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "publishing did not get through in 180 s"
            );
        }
        // About 250 messages a second.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    publisher.close().await;
}

/// Publishes and consumes `N` messages on R3 streams while `fault` runs, then checks and
/// prints the figures.
async fn scenario<F, Fut>(name: &str, source: Source, fault: F)
where
    F: FnOnce(Arc<Scene>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let _heal = Heal;
    cluster(&["start"]);
    logged();
    let tag = format!(
        "{}{}",
        name.replace(['-', '_'], ""),
        uuid::Uuid::now_v7().simple()
    );
    let tag = &tag[..tag.len().min(40)];
    let prefix = format!("sfc{tag}");
    let stream = format!("SFC_{}", tag.to_uppercase());
    let group = "clustergroup";
    let build = || {
        NatsTransport::builder(&seeds())
            .subject_prefix(prefix.clone())
            .stream(stream.clone())
            .replicas(3)
            .request_timeout(Duration::from_secs(5))
    };
    let worker_t = build().connect().await.expect("worker connects");
    let server = worker_t.server_version();

    let effects: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let last_effect = Arc::new(Mutex::new(Instant::now()));
    let longest_stall = Arc::new(Mutex::new(Duration::ZERO));
    let e = effects.clone();
    let (le, ls) = (last_effect.clone(), longest_stall.clone());
    let worker = Worker::builder(worker_t.clone(), group)
        .handle(move |j: Job, _: Context| {
            let (e, le, ls) = (e.clone(), le.clone(), ls.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                *e.lock().unwrap().entry(j.n).or_insert(0) += 1;
                let now = Instant::now();
                let mut last = le.lock().unwrap();
                let gap = now - *last;
                *last = now;
                let mut l = ls.lock().unwrap();
                *l = (*l).max(gap);
                Ok(())
            }
        })
        .concurrency(CONCURRENCY)
        .handler_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    worker.declare().await.expect("declare on the cluster");
    let admin = async_nats::jetstream::new(
        async_nats::ConnectOptions::new()
            .connect(seeds().split(',').map(str::to_owned).collect::<Vec<_>>())
            .await
            .unwrap(),
    );
    let outbox = match source {
        Source::Publisher => None,
        Source::Outbox => {
            let relay = build().connect().await.expect("relay connects");
            Some(Outbox::start(&tag.to_lowercase(), relay).await)
        }
    };
    let scene = Arc::new(Scene {
        worker: worker_t.clone(),
        relay: outbox.as_ref().map(|o| o.transport.clone()),
        stream: stream.clone(),
        consumer: group.to_owned(),
        admin,
    });
    let stop = CancellationToken::new();
    let token = stop.clone();
    let run = tokio::spawn(async move { worker.run_until(token.cancelled_owned()).await });

    let retried = Arc::new(Mutex::new((0u64, Vec::<String>::new())));
    let publishing = match &outbox {
        None => {
            let publisher = build().connect().await.expect("publisher connects");
            tokio::spawn(publish(publisher, retried.clone()))
        }
        Some(o) => tokio::spawn(o.commit()),
    };

    // The fault, once handling is under way.
    let e = effects.clone();
    wait_for("handling under way", Duration::from_secs(60), || {
        e.lock().unwrap().len() as u64 >= N / 10
    })
    .await;
    let in_flight_at_fault = N - e.lock().unwrap().len() as u64;
    let fault_started = Instant::now();
    fault(scene.clone()).await;
    let fault_took = fault_started.elapsed();

    publishing.await.expect("publisher finished");
    let mut stored = String::new();
    if let Some(o) = outbox {
        let (messages, retries, unroutable) = o.finish(&scene.admin, &stream).await;
        stored = format!(", {messages} messages stored for {N} rows");
        assert_eq!(
            messages, N,
            "{name}: the stream stores each committed row once"
        );
        *retried.lock().unwrap() = (retries, unroutable);
    }
    let e = effects.clone();
    wait_for("every message handled", Duration::from_secs(180), || {
        e.lock().unwrap().len() as u64 >= N
    })
    .await;
    let drained = fault_started.elapsed();
    // Redeliveries of lost acks come after ack_wait (10 s): wait them out before counting.
    tokio::time::sleep(Duration::from_secs(12)).await;
    stop.cancel();
    run.await.unwrap().expect("worker ran");

    let effects = effects.lock().unwrap().clone();
    let lost = (0..N).filter(|n| !effects.contains_key(n)).count();
    let duplicates: u32 = effects.values().map(|c| c - 1).sum();
    let (publish_retries, unroutable) = retried.lock().unwrap().clone();
    let stall = *longest_stall.lock().unwrap();
    println!(
        "cluster scenario {name}: nats-server {server}, R3, {N} messages: lost {lost}, duplicate effects {duplicates}, publishes retried {publish_retries}, reported unroutable {}, longest stall in handling {stall:.1?}, fault took {fault_took:.1?}, drained {drained:.1?} after the fault began{stored}",
        unroutable.len()
    );
    assert_eq!(lost, 0, "{name}: messages lost");
    assert!(
        unroutable.is_empty(),
        "{name}: publishes reported unroutable during a fault: {:?}",
        &unroutable[..unroutable.len().min(3)]
    );
    // A duplicate is a message whose ack the fault swallowed: at most what the worker
    // held at the time (concurrency + the pull batch) per node event.
    let bound = 3 * 2 * CONCURRENCY as u32;
    assert!(
        duplicates <= bound,
        "{name}: {duplicates} duplicate effects, more than was in flight ({bound})"
    );
    assert!(in_flight_at_fault > 0);
    let _ = scene.admin.delete_stream(&stream).await;
    let _ = scene.admin.delete_stream(format!("{stream}_DLQ")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_node_killed() {
    scenario("node-sigkill", Source::Publisher, |s| async move {
        let node = node_of(&s.worker);
        signal("-KILL", node);
        tokio::time::sleep(Duration::from_secs(5)).await;
        cluster(&["start"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_and_consumer_leaders_step_down() {
    scenario("leader-stepdown", Source::Publisher, |s| async move {
        s.api(format!("STREAM.LEADER.STEPDOWN.{}", s.stream)).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        s.api(format!(
            "CONSUMER.LEADER.STEPDOWN.{}.{}",
            s.stream, s.consumer
        ))
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart() {
    scenario("rolling-restart", Source::Publisher, |_s| async move {
        for node in 1..=3 {
            signal("-TERM", node);
            tokio::time::sleep(Duration::from_secs(2)).await;
            cluster(&["start"]);
            // Let it catch up before the next one goes.
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_node_in_lame_duck_mode() {
    scenario("lame-duck", Source::Publisher, |s| async move {
        let node = node_of(&s.worker);
        cluster(&["ldm", &node.to_string()]);
        // Lame-duck mode moves the clients off over 30 s, then the node exits.
        tokio::time::sleep(Duration::from_secs(33)).await;
        cluster(&["start"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_node_paused_30s() {
    scenario("sigstop-30s", Source::Publisher, |s| async move {
        let node = node_of(&s.worker);
        signal("-STOP", node);
        tokio::time::sleep(Duration::from_secs(30)).await;
        signal("-CONT", node);
    })
    .await;
}

/// The outbox relay publishing to the cluster: its node SIGKILLed (restarted after 5 s),
/// then the stream leader stepped down; the stream stores every committed row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_relay_through_node_kill_and_stepdown() {
    scenario("outbox-relay", Source::Outbox, |s| async move {
        let relay = s.relay.as_ref().expect("an outbox scenario");
        signal("-KILL", node_of(relay));
        tokio::time::sleep(Duration::from_secs(5)).await;
        cluster(&["start"]);
        tokio::time::sleep(Duration::from_secs(2)).await;
        s.api(format!("STREAM.LEADER.STEPDOWN.{}", s.stream)).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
    })
    .await;
}
