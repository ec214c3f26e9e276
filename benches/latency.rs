//! End-to-end latency at fixed publish rates: how long a message waits from its publish
//! to the handler's start and to its ack, for the steadfast worker beside the raw
//! client's consume loop in the same run, on RabbitMQ and on NATS JetStream; and through
//! the PostgreSQL outbox (commit → the handler of a worker on the other side).
//!
//! ```text
//! cargo bench --all-features --bench latency
//! BENCH_SECS=5 BENCH_ROUNDS=1 BENCH_RATES=1000 cargo bench --all-features --bench latency
//! BENCH_ONLY=rabbitmq|nats|outbox cargo bench --all-features --bench latency
//! BENCH_ONLY=rabbitmq BENCH_RATES=1000 BENCH_RAW_HOP=1 cargo bench --all-features --bench latency
//! ```
//!
//! `BENCH_RAW_HOP=1` adds a third RabbitMQ consumer, `raw-hop`: lapin with the worker's
//! two hand-overs and concurrent handling but none of its code (see [`hop_loop`]).
//!
//! Every phase publishes `rate` messages a second for `BENCH_SECS` seconds (default 15)
//! from a transport connection of its own (one publish task per message, awaiting its
//! confirm), each message carrying the time it was published; the consumer, started
//! before the first publish, records the delay when the handler starts (the raw loop:
//! when it has the delivery and its body decoded) and when the ack is done (the raw
//! loop: its `ack().await` returned; the worker: the outcome hook, called once the
//! transport's settle returned). The first second is warm-up and not recorded.
//! Prefetch 100 on both sides: the raw AMQP loop with `basic.qos(100)` acking each
//! delivery (`ack().await`), the raw NATS loop with pull batches of 100 and
//! `max_ack_pending` 100 calling `ack()` (published, as the worker's default acks), the
//! worker with concurrency 100. Both read the same queue or stream, declared by the
//! transport. The raw and the worker phases alternate, `BENCH_ROUNDS` rounds (default 2).
//!
//! The outbox phase commits one row per transaction at the rate (a task per message,
//! the `PostgresOutbox` on `DATABASE_URL`), the relay (a pool of its own, as in a
//! process of its own) publishes to RabbitMQ, and a
//! worker records the delay from the moment the producer's transaction has its
//! connection (so the INSERT and the commit are counted in) to its handler's start.
//!
//! Percentiles (p50, p90, p99, p99.9, max) from an HDR histogram (3 significant digits)
//! go to the console and to the result file (`benches/support`).

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, pull},
};
use futures::StreamExt;
use hdrhistogram::Histogram;
use lapin::{
    Connection, ConnectionProperties,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use serde_json::json;
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};
use steadfast::{
    Context, Envelope, HandlerError, Message, MessageId, Worker,
    idempotency::postgres::connect,
    outbox::{PostgresOutbox, Relay},
    transport::{Transport, amqp::AmqpTransport, nats::NatsTransport},
};
use tokio_util::sync::CancellationToken;

mod support;
use support::{Results, env_or};

const PREFETCH: u16 = 100;
/// Payload size of every message (JSON, padded).
const PAYLOAD: usize = 256;

#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "bench.stamp")]
struct Stamp {
    /// When it was published: µs since the bench started.
    sent_us: u64,
    pad: String,
}

static BASE: OnceLock<Instant> = OnceLock::new();

/// µs since the bench started (one clock for the publisher and the consumer).
fn now_us() -> u64 {
    u64::try_from(BASE.get_or_init(Instant::now).elapsed().as_micros()).unwrap_or(u64::MAX)
}

fn stamp() -> Stamp {
    Stamp {
        sent_us: now_us(),
        pad: "x".repeat(PAYLOAD - 30),
    }
}

/// The two delays of one phase, from publish to the handler and to the ack.
struct Delays {
    handler: Histogram<u64>,
    ack: Histogram<u64>,
    /// Messages published before this (µs) are warm-up: seen, not recorded.
    from_us: u64,
}

type Shared = Arc<Mutex<Delays>>;

impl Delays {
    fn new(warmup: Duration) -> Shared {
        let h = || Histogram::new_with_bounds(1, 600_000_000, 3).expect("bounds");
        Arc::new(Mutex::new(Self {
            handler: h(),
            ack: h(),
            from_us: now_us() + u64::try_from(warmup.as_micros()).unwrap_or(0),
        }))
    }
}

fn note(d: &Shared, sent_us: u64, to_ack: bool) {
    let now = now_us();
    let mut d = d.lock().expect("not poisoned");
    if sent_us < d.from_us {
        return;
    }
    let h = if to_ack { &mut d.ack } else { &mut d.handler };
    h.saturating_record(now.saturating_sub(sent_us).max(1));
}

/// Publishes `rate` messages a second for `secs` seconds through `publish`, each in a
/// task of its own; returns how many were sent once all are confirmed.
///
/// Each publish says whether its message went out; the count of those is returned, and
/// a failed one is counted and reported instead of ending the bench (the outbox's
/// producers can time out waiting for a connection on a loaded machine).
async fn publish_at<F, Fut>(rate: usize, secs: u64, publish: F) -> usize
where
    F: Fn(Stamp) -> Fut,
    Fut: Future<Output = bool> + Send + 'static,
{
    let total = rate * usize::try_from(secs).unwrap_or(1);
    let per_tick = (rate / 1000).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    let (mut started, mut sent) = (0, 0);
    while started < total {
        tick.tick().await;
        for _ in 0..per_tick.min(total - started) {
            tasks.spawn(publish(stamp()));
            started += 1;
        }
        while let Some(r) = tasks.try_join_next() {
            sent += usize::from(r.expect("publish task"));
        }
    }
    while let Some(r) = tasks.join_next().await {
        sent += usize::from(r.expect("publish task"));
    }
    if sent < total {
        println!(
            "   {} of {total} publishes failed and are not counted",
            total - sent
        );
    }
    sent
}

/// Waits until `count` reaches `n` (bounded: a phase that loses messages fails loudly).
async fn wait_for(count: &AtomicUsize, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while count.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {n} messages after 120 s",
            count.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A steadfast worker on `t` recording both delays, not started (the caller declares
/// first): the settled count, its stop token and the worker.
fn worker_on(
    t: Arc<dyn Transport>,
    group: &str,
    delays: &Shared,
) -> (Arc<AtomicUsize>, CancellationToken, Worker) {
    let settled = Arc::new(AtomicUsize::new(0));
    let sent: Arc<Mutex<HashMap<MessageId, u64>>> = Arc::default();
    let (d1, d2, s1, s2, count) = (
        delays.clone(),
        delays.clone(),
        sent.clone(),
        sent,
        settled.clone(),
    );
    let worker = Worker::builder_shared(t, group)
        .handle(move |m: Stamp, cx: Context| {
            note(&d1, m.sent_us, false);
            s1.lock().expect("not poisoned").insert(cx.id(), m.sent_us);
            async { Ok::<(), HandlerError>(()) }
        })
        .concurrency(usize::from(PREFETCH))
        .on_outcome(move |p| {
            if let Some(sent_us) = s2.lock().expect("not poisoned").remove(&p.id) {
                note(&d2, sent_us, true);
            }
            count.fetch_add(1, Ordering::Relaxed);
        })
        .build()
        .expect("valid worker");
    (settled, CancellationToken::new(), worker)
}

fn run(worker: Worker, stop: &CancellationToken) -> tokio::task::JoinHandle<()> {
    let token = stop.clone();
    tokio::spawn(async move {
        worker
            .run_until(async move { token.cancelled().await })
            .await
            .expect("worker ran");
    })
}

/// Percentiles of `h` in µs, as the result file and the console show them.
fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    json!({
        "p50": h.value_at_quantile(0.50), "p90": h.value_at_quantile(0.90),
        "p99": h.value_at_quantile(0.99), "p999": h.value_at_quantile(0.999),
        "max": h.max(), "count": h.len(),
    })
}

struct Phase<'a> {
    out: &'a Results,
    transport: &'a str,
    consumer: &'a str,
    rate: usize,
    round: usize,
}

impl Phase<'_> {
    fn report(&self, d: &Shared, sent: usize, took: Duration) {
        let d = d.lock().expect("not poisoned");
        for (to, h) in [("handler", &d.handler), ("ack", &d.ack)] {
            if h.is_empty() {
                continue;
            }
            let p = percentiles(h);
            println!(
                "{:<9} {:>5}/s {:<10} → {to:<7} p50 {:>7} p90 {:>7} p99 {:>7} p99.9 {:>7} max {:>7} µs ({} recorded)",
                self.transport,
                self.rate,
                self.consumer,
                p["p50"],
                p["p90"],
                p["p99"],
                p["p999"],
                p["max"],
                p["count"]
            );
            self.out.record(json!({
                "scenario": "latency", "transport": self.transport, "consumer": self.consumer,
                "baseline": "raw", "rate": self.rate, "round": self.round, "to": to,
                "payload": PAYLOAD, "prefetch": PREFETCH, "messages": sent,
                "achieved_rate": sent as f64 / took.as_secs_f64(), "latency_us": p,
            }));
        }
    }
}

// ---- RabbitMQ ----

async fn amqp_transport(name: &str) -> AmqpTransport {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    AmqpTransport::builder(url)
        .exchange(name)
        .queue_prefix(format!("{name}."))
        .queue_expiry(Duration::from_secs(120))
        .connect()
        .await
        .expect("RabbitMQ on AMQP_URL")
}

/// Declares `group`'s queue for `Stamp` on `t` (what a worker would declare).
async fn declare(t: Arc<dyn Transport>, group: &str) {
    Worker::builder_shared(t, group)
        .handle(|_: Stamp, _cx: Context| async { Ok::<(), HandlerError>(()) })
        .build()
        .expect("valid")
        .declare()
        .await
        .expect("declared");
}

async fn amqp_phase(p: &Phase<'_>, secs: u64) {
    let name = format!("sf-lat-{}", uuid::Uuid::now_v7().simple());
    let publisher: Arc<dyn Transport> = Arc::new(amqp_transport(&name).await);
    let delays = Delays::new(Duration::from_secs(1));
    let total = p.rate * usize::try_from(secs).unwrap_or(1);
    let pubs = publisher.clone();
    let publish = move |s: Stamp| {
        let t = pubs.clone();
        async move {
            let env = Envelope::encode(&s).expect("encodes");
            t.publish(&env).await.expect("published");
            true
        }
    };
    let t0 = Instant::now();
    if p.consumer == "raw" || p.consumer == "raw-hop" {
        declare(publisher.clone(), "raw").await;
        let url = std::env::var("AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .expect("RabbitMQ on AMQP_URL");
        let ch = conn.create_channel().await.expect("channel");
        ch.basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .expect("qos");
        let queue = format!("{name}.raw");
        let mut consumer = ch
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let d = delays.clone();
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        let task = if p.consumer == "raw" {
            tokio::spawn(async move {
                while count.load(Ordering::Relaxed) < total {
                    let m = consumer.next().await.expect("open").expect("delivery");
                    raw_handle(m, &d, &count).await;
                }
            })
        } else {
            tokio::spawn(hop_loop(consumer, d, count, total))
        };
        let sent = publish_at(p.rate, secs, publish).await;
        wait_for(&seen, sent, "raw lapin").await;
        task.await.expect("raw loop");
        p.report(&delays, sent, t0.elapsed());
        let _ = ch
            .queue_delete(queue.as_str().into(), Default::default())
            .await;
        let _ = conn.close(200, "OK".into()).await;
    } else {
        let t: Arc<dyn Transport> = Arc::new(amqp_transport(&name).await);
        let (settled, stop, worker) = worker_on(t.clone(), "sf", &delays);
        worker.declare().await.expect("declared");
        let task = run(worker, &stop);
        let sent = publish_at(p.rate, secs, publish).await;
        wait_for(&settled, sent, "steadfast worker").await;
        p.report(&delays, sent, t0.elapsed());
        stop.cancel();
        task.await.expect("worker task");
        t.close().await;
    }
    publisher.close().await;
}

/// What the raw consumers do with a delivery: decode its stamp, note the time to the
/// handler, await the ack, note the time to the ack, count it.
async fn raw_handle(m: lapin::message::Delivery, d: &Shared, count: &AtomicUsize) {
    let s: Stamp = serde_json::from_slice(&m.data).expect("a stamp");
    note(d, s.sent_us, false);
    m.ack(BasicAckOptions::default()).await.expect("acked");
    note(d, s.sent_us, true);
    count.fetch_add(1, Ordering::Relaxed);
}

/// `raw-hop`: lapin's consumer with the worker's shape and none of its code. A task
/// forwards each delivery through a channel of the prefetch's size (as the transport's
/// consumer task hands deliveries to the worker's stream), and a second task runs up to
/// the prefetch of them at once as futures of its own (as the worker runs its handlers),
/// each decoding, noting and awaiting its ack. Set against `raw` (one loop, each ack
/// awaited in turn) and the worker, it shows what the two hand-overs and the concurrent
/// handling cost the latency without steadfast's per-message work.
async fn hop_loop(mut consumer: lapin::Consumer, d: Shared, count: Arc<AtomicUsize>, total: usize) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(usize::from(PREFETCH));
    let intake = tokio::spawn(async move {
        while let Some(m) = consumer.next().await {
            if tx.send(m.expect("delivery")).await.is_err() {
                break;
            }
        }
    });
    let mut running = futures::stream::FuturesUnordered::new();
    while count.load(Ordering::Relaxed) < total {
        tokio::select! {
            Some(()) = running.next(), if !running.is_empty() => {}
            m = rx.recv(), if running.len() < usize::from(PREFETCH) => {
                let m = m.expect("the intake task runs");
                let (d, count) = (d.clone(), count.clone());
                running.push(async move { raw_handle(m, &d, &count).await });
            }
        }
    }
    intake.abort();
}

// ---- NATS ----

const NATS_URL: &str = "nats://127.0.0.1:4222";

async fn nats_phase(p: &Phase<'_>, js: &jetstream::Context, secs: u64) {
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let stream = format!("LAT_{tag}");
    let builder = NatsTransport::builder(&nats_url())
        .subject_prefix(format!("lat{tag}"))
        .stream(stream.clone())
        .max_age(Duration::from_secs(600))
        .dead_letter_max_age(Duration::from_secs(600))
        .replicas(support::nats_replicas());
    let publisher = builder.clone().connect().await.expect("NATS on NATS_URL");
    let subject = publisher.subject_for(Stamp::NAME);
    let publisher: Arc<dyn Transport> = Arc::new(publisher);
    let delays = Delays::new(Duration::from_secs(1));
    let total = p.rate * usize::try_from(secs).unwrap_or(1);
    let pubs = publisher.clone();
    let publish = move |s: Stamp| {
        let t = pubs.clone();
        async move {
            let env = Envelope::encode(&s).expect("encodes");
            t.publish(&env).await.expect("published");
            true
        }
    };
    let t0 = Instant::now();
    if p.consumer == "raw" {
        declare(publisher.clone(), "raw").await;
        let consumer = js
            .get_stream(&stream)
            .await
            .expect("stream")
            .create_consumer(pull::Config {
                durable_name: Some("raw".into()),
                filter_subject: subject,
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: i64::from(PREFETCH),
                ..Default::default()
            })
            .await
            .expect("consumer");
        let mut msgs = consumer
            .stream()
            .max_messages_per_batch(usize::from(PREFETCH))
            .messages()
            .await
            .expect("messages");
        let d = delays.clone();
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        let task = tokio::spawn(async move {
            while count.load(Ordering::Relaxed) < total {
                let m = msgs.next().await.expect("open").expect("message");
                let s: Stamp = serde_json::from_slice(&m.payload).expect("a stamp");
                note(&d, s.sent_us, false);
                m.ack().await.expect("acked");
                note(&d, s.sent_us, true);
                count.fetch_add(1, Ordering::Relaxed);
            }
        });
        let sent = publish_at(p.rate, secs, publish).await;
        wait_for(&seen, sent, "raw async-nats").await;
        task.await.expect("raw loop");
        p.report(&delays, sent, t0.elapsed());
    } else {
        let t: Arc<dyn Transport> = Arc::new(builder.connect().await.expect("NATS"));
        let (settled, stop, worker) = worker_on(t.clone(), "sf", &delays);
        worker.declare().await.expect("declared");
        let task = run(worker, &stop);
        let sent = publish_at(p.rate, secs, publish).await;
        wait_for(&settled, sent, "steadfast worker").await;
        p.report(&delays, sent, t0.elapsed());
        stop.cancel();
        task.await.expect("worker task");
        t.close().await;
    }
    publisher.close().await;
    let _ = js.delete_stream(&stream).await;
    let _ = js.delete_stream(format!("{stream}_DLQ")).await;
}

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| NATS_URL.into())
}

// ---- the outbox ----

async fn outbox_phase(p: &Phase<'_>, secs: u64) {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    // The producers' pool, and the relay's own (a relay runs in a process of its own;
    // sharing one pool, 1,000 commits a second left the relay waiting for connections).
    let pool = connect(&url).await.expect("PostgreSQL on DATABASE_URL");
    let relay_pool = connect(&url).await.expect("PostgreSQL on DATABASE_URL");
    let table = format!("bench_lat_outbox_{}", uuid::Uuid::now_v7().simple());
    let outbox = PostgresOutbox::new(pool.clone())
        .with_table(&table)
        .expect("table name");
    outbox.migrate().await.expect("outbox table");
    let relay_outbox = PostgresOutbox::new(relay_pool)
        .with_table(&table)
        .expect("table name");
    let name = format!("sf-lat-{}", uuid::Uuid::now_v7().simple());
    let relay_side: Arc<dyn Transport> = Arc::new(amqp_transport(&name).await);
    let t: Arc<dyn Transport> = Arc::new(amqp_transport(&name).await);
    let delays = Delays::new(Duration::from_secs(1));
    let (settled, stop, worker) = worker_on(t.clone(), "sf", &delays);
    worker.declare().await.expect("declared");
    let task = run(worker, &stop);
    let relay = Relay::builder(relay_outbox, relay_side.clone())
        .retention(Duration::ZERO)
        .build()
        .expect("relay");
    let relay = tokio::spawn(relay.run_until(stop.clone().cancelled_owned()));
    let t0 = Instant::now();
    let (pool2, outbox2) = (pool.clone(), outbox.clone());
    let publish = move |_: Stamp| {
        let (pool, outbox) = (pool2.clone(), outbox2.clone());
        async move {
            // Stamped once the transaction has its connection: a producer waiting for
            // the pool is the database's limit, not the relay's.
            let committed = async {
                let mut tx = pool.begin().await?;
                outbox.enqueue(&mut tx, &stamp()).await?;
                tx.commit().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            };
            match committed.await {
                Ok(()) => true,
                Err(e) => {
                    static SAID: OnceLock<()> = OnceLock::new();
                    if SAID.set(()).is_ok() {
                        println!("   an outbox producer failed (the first such error): {e}");
                    }
                    false
                }
            }
        }
    };
    let sent = publish_at(p.rate, secs, publish).await;
    wait_for(&settled, sent, "outbox → worker").await;
    p.report(&delays, sent, t0.elapsed());
    stop.cancel();
    task.await.expect("worker task");
    relay.await.expect("relay task");
    t.close().await;
    relay_side.close().await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(&pool)
        .await;
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        now_us();
        let secs: u64 = env_or("BENCH_SECS", 15);
        let rounds: usize = env_or("BENCH_ROUNDS", 2);
        let rates: Vec<usize> = std::env::var("BENCH_RATES")
            .unwrap_or_else(|_| "1000,5000".into())
            .split(',')
            .filter_map(|r| r.trim().parse().ok())
            .collect();
        let only = std::env::var("BENCH_ONLY").unwrap_or_default();
        let hop = std::env::var_os("BENCH_RAW_HOP").is_some_and(|v| v == "1");
        let client = async_nats::connect(nats_url()).await.expect("NATS on NATS_URL");
        let out = Results::new(
            "latency",
            json!({
                "rabbitmq": support::rabbitmq_version(),
                "nats": client.server_info().version,
            }),
        );
        let js = jetstream::new(client);
        println!("latency from publish, {secs} s per phase (1 s warm-up), {rounds} rounds, rates {rates:?}/s, prefetch {PREFETCH}, {PAYLOAD} B");
        for round in 1..=rounds {
            for &rate in &rates {
                // Raw first in odd rounds, the worker first in even ones.
                let mut order = vec!["raw", "steadfast"];
                if hop {
                    order.insert(1, "raw-hop");
                }
                if round % 2 == 0 {
                    order.reverse();
                }
                for consumer in order {
                    let phase = |transport| Phase {
                        out: &out,
                        transport,
                        consumer,
                        rate,
                        round,
                    };
                    if only.is_empty() || only == "rabbitmq" {
                        amqp_phase(&phase("rabbitmq"), secs).await;
                    }
                    if (only.is_empty() || only == "nats") && consumer != "raw-hop" {
                        nats_phase(&phase("nats"), &js, secs).await;
                    }
                }
            }
            if (only.is_empty() || only == "outbox") && rates.contains(&1000) {
                let phase = Phase {
                    out: &out,
                    transport: "outbox-pg",
                    consumer: "steadfast",
                    rate: 1000,
                    round,
                };
                outbox_phase(&phase, secs).await;
            }
        }
    });
}
