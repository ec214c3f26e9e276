//! Consumer throughput on RabbitMQ: the steadfast worker against raw lapin doing the
//! same work, in one run, on one pre-filled durable quorum queue per scenario.
//!
//! ```text
//! cargo bench --features amqp --bench amqp        # AMQP_URL, default the local broker
//! BENCH_ONLY=steadfast cargo bench --features amqp --bench amqp   # the worker alone
//! BENCH_ONLY=coalesced cargo bench --features amqp --bench amqp   # the raw ceiling alone
//! BENCH_ONLY=coalesced-2ch cargo bench --features amqp --bench amqp  # on two channels
//! ```
//!
//! Scenarios, each with prefetch 100 and payloads of 256 B and 1 KiB:
//! - `raw-ack-await`: lapin, the consume loop awaiting one `basic.ack` per message before
//!   taking the next (the common hand-written consumer; the issue's "raw per-message-ack"
//!   baseline);
//! - `raw-ack-spawn`: lapin, each `basic.ack` awaited in a task of its own (faster, and
//!   memory bounded only by how many acks are outstanding);
//! - `raw-coalesced`: lapin, one `basic.ack(multiple=true)` per 50 messages, inline (the
//!   ceiling: nothing but receiving and acking);
//! - `steadfast`: a `Worker` with concurrency 100 decoding JSON and running a no-op
//!   handler, acking through the transport's coalescing acker;
//! - `raw-coal-2ch`: the coalesced loop on two channels of the one connection, each a
//!   task with prefetch 50 acking every 25 messages: the same total prefetch, split as
//!   the worker splits it with `consumer_channels(2)` (lapin's ceiling for that shape);
//! - `raw-coal-plain`: the coalesced loop again, on messages with no properties but
//!   persistent delivery (what lapin's ceiling is without the headers a real publisher
//!   sets; printed for reference).
//!
//! The raw loops but the last read the same deliveries the worker reads: messages with
//! the properties and CloudEvents headers a steadfast publisher sets, so every consumer
//! parses the same frames. Every raw loop runs as a spawned task. `BENCH_ROUNDS` (default
//! 2) repeats the six, interleaved. `BENCH_CHANNELS=n` sets the worker's consumer
//! channels (default: the transport's default, 1).
//!
//! Prints msgs/s, client CPU µs/msg (user+system time of this process from
//! `/proc/self/stat`, the figures `getrusage` gives; `unsafe` is forbidden here) and,
//! when the broker runs on this machine, its CPU µs/msg over the same interval (the
//! `beam.smp` process found in `/proc`, or `BENCH_BROKER_PID`): on a machine the client
//! and the broker share, their sum is what bounds the rate.

use futures::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, LongString},
};
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};
use steadfast::{
    Context, Envelope, HandlerError, Message, Worker,
    transport::{Transport, amqp::AmqpTransport},
};
use tokio_util::sync::CancellationToken;

mod support;
use serde_json::json;
use support::{Meter, Results, Took};

const PREFETCH: u16 = 100;

#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "bench.item")]
struct Item {
    pad: String,
}

fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The port of `url` (5672 for the single node, 5701.. for the cluster).
fn url_port(url: &str) -> Option<u16> {
    url::Url::parse(url).ok()?.port()
}

fn count() -> usize {
    std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000)
}

/// The local broker's process: `BENCH_BROKER_PID`, or the `beam.smp` found in `/proc`.
fn broker_pid() -> Option<String> {
    support::find_process("beam.smp", "BENCH_BROKER_PID")
}

fn body(size: usize) -> Vec<u8> {
    let overhead = br#"{"pad":""}"#.len();
    serde_json::to_vec(&Item {
        pad: "x".repeat(size - overhead),
    })
    .unwrap()
}

struct Figures {
    rate: f64,
}

/// Prints one consumer's figures and appends them to the result file, beside the raw
/// loop they compare with (`baseline`) and the round.
fn report(out: &Results, round: usize, name: &str, size: usize, n: usize, took: Took) -> Figures {
    let mut fields = took.fields(n);
    let obj = fields.as_object_mut().expect("an object");
    obj.insert("scenario".into(), json!("throughput"));
    obj.insert("consumer".into(), json!(name));
    obj.insert("payload".into(), json!(size));
    obj.insert("round".into(), json!(round));
    obj.insert("baseline".into(), json!("raw-coalesced"));
    out.record(fields);
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    let f = Figures {
        rate: n as f64 / took.wall.as_secs_f64(),
    };
    let broker = took
        .broker
        .map_or_else(|| "-".to_owned(), |b| format!("{:.1}", per(b)));
    println!(
        "{name:<16} {size:>5} B  {n:>7} msgs  {:>9.0} msgs/s  {:>6.1} µs CPU/msg  broker {broker:>6} µs CPU/msg",
        f.rate,
        per(took.cpu)
    );
    f
}

/// What the raw loops' messages carry besides the body.
#[derive(Clone, Copy)]
enum Shape {
    /// Exactly what a steadfast publisher sends: `message_id`, `type`, `content_type`,
    /// persistent, `timestamp`, and the CloudEvents binary-mode headers (spec version,
    /// id, type) with the attempt. The raw loops read the same deliveries as the worker.
    Steadfast,
    /// Persistent delivery and nothing else: the bare minimum a raw loop reads.
    Plain,
}

impl Shape {
    fn properties(self) -> BasicProperties {
        let plain = BasicProperties::default().with_delivery_mode(2);
        match self {
            Self::Plain => plain,
            Self::Steadfast => {
                let env = Envelope::new(Item::NAME, Vec::new());
                let mut headers = FieldTable::default();
                env.write_wire("cloudEvents:", |k, v| {
                    headers.insert(
                        k.into_owned().into(),
                        AMQPValue::LongString(LongString::from(v.into_owned())),
                    );
                });
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                plain
                    .with_message_id(env.id.to_string().into())
                    .with_type(Item::NAME.into())
                    .with_content_type(steadfast::envelope::header::CONTENT_TYPE_JSON.into())
                    .with_timestamp(now)
                    .with_headers(headers)
            }
        }
    }
}

async fn raw_queue(conn: &Connection, name: &str, size: usize, n: usize, shape: Shape) {
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    // Whatever an earlier scenario left (a channel closed with deliveries unacked
    // returns them) must not count for this one.
    ch.queue_purge(name.into(), Default::default())
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let payload = body(size);
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for _ in chunk {
            confirms.push(
                ch.basic_publish(
                    "".into(),
                    name.into(),
                    BasicPublishOptions::default(),
                    &payload,
                    shape.properties(),
                )
                .await
                .unwrap(),
            );
        }
        for c in confirms {
            assert!(c.await.unwrap().is_ack());
        }
    }
    let _ = ch.close(200, "OK".into()).await;
}

/// Pre-fills `queue` with `n` messages of `shape` and consumes them with `ack`.
async fn raw_run(
    conn: &Connection,
    queue: &str,
    size: usize,
    n: usize,
    ack: Ack,
    shape: Shape,
) -> Took {
    raw_queue(conn, queue, size, n, shape).await;
    if let Ack::Split(channels) = ack {
        return raw_consume_split(conn, queue, n, channels).await;
    }
    let ch = conn.create_channel().await.unwrap();
    raw_consume(ch, queue.to_owned(), n, ack).await
}

/// How the raw lapin consumer acks.
#[derive(Clone, Copy)]
enum Ack {
    /// `ack().await` for each delivery before taking the next (the usual hand-written loop).
    Await,
    /// Each `ack()` in a task of its own (faster, with no bound on memory but the batch).
    Spawn,
    /// `multiple = true` every 50 deliveries, inline: the ceiling.
    Coalesce,
    /// The coalesced loop on this many channels, the prefetch split between them, each
    /// acking (`multiple = true`) every half of its share.
    Split(u16),
}

/// Starts a consumer on `queue` (manual acks).
async fn consume(ch: &Channel, queue: &str) -> lapin::Consumer {
    ch.basic_consume(
        queue.into(),
        "".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap()
}

/// Consumes `n` messages of `queue` on `ch` as the loop of a spawned task (run inside
/// `block_on`, lapin loses about a quarter of its throughput).
async fn raw_consume(ch: Channel, queue: String, n: usize, ack: Ack) -> Took {
    tokio::spawn(async move {
        ch.basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .unwrap();
        // On stderr, so a profiler can attach to the consume phase alone.
        eprintln!("consuming");
        let meter = Meter::start(broker_pid());
        let mut consumer = consume(&ch, &queue).await;
        let mut tasks = Vec::new();
        let mut seen = 0;
        while seen < n {
            let d = consumer.next().await.unwrap().unwrap();
            seen += 1;
            match ack {
                Ack::Await => {
                    d.ack(BasicAckOptions::default()).await.unwrap();
                }
                Ack::Spawn => {
                    tasks.push(tokio::spawn(async move {
                        d.ack(BasicAckOptions::default()).await.unwrap();
                    }));
                    if tasks.len() >= 1000 {
                        for t in tasks.drain(..) {
                            t.await.unwrap();
                        }
                    }
                }
                // `Split` runs in `raw_consume_split`; it never reaches this loop.
                Ack::Coalesce | Ack::Split(_) => {
                    if seen % 50 == 0 || seen == n {
                        ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                            .await
                            .unwrap();
                    }
                }
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        let took = meter.stop();
        let _ = ch.close(200, "OK".into()).await;
        took
    })
    .await
    .unwrap()
}

/// Consumes `n` messages of `queue` on `channels` channels, each the loop of a spawned
/// task with its share of the prefetch, acking `multiple = true` every half share.
async fn raw_consume_split(conn: &Connection, queue: &str, n: usize, channels: u16) -> Took {
    let share = PREFETCH / channels;
    let left = Arc::new(AtomicUsize::new(n));
    let mut chans = Vec::new();
    for _ in 0..channels {
        let ch = conn.create_channel().await.unwrap();
        ch.basic_qos(share, BasicQosOptions::default())
            .await
            .unwrap();
        chans.push(ch);
    }
    eprintln!("consuming");
    let meter = Meter::start(broker_pid());
    let tasks: Vec<_> = chans
        .into_iter()
        .map(|ch| {
            let (queue, left) = (queue.to_owned(), left.clone());
            tokio::spawn(async move {
                let mut consumer = consume(&ch, &queue).await;
                let every = usize::from(share / 2).max(1);
                let (mut unacked, mut last_tag) = (0, 0);
                // Ends when every message of the run is taken; the other channel's last
                // messages may come after this one's.
                loop {
                    let d = tokio::select! {
                        d = consumer.next() => d.unwrap().unwrap(),
                        () = async {
                            while left.load(Ordering::Relaxed) > 0 {
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                        } => break,
                    };
                    unacked += 1;
                    last_tag = d.delivery_tag;
                    let last = left
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1))
                        == Ok(1);
                    if unacked == every || last {
                        ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                            .await
                            .unwrap();
                        unacked = 0;
                    }
                }
                // This channel's tail, when the run's last message went to the other.
                if unacked > 0 {
                    ch.basic_ack(last_tag, BasicAckOptions { multiple: true })
                        .await
                        .unwrap();
                }
                ch
            })
        })
        .collect();
    let mut chans = Vec::new();
    for t in tasks {
        let ch = tokio::time::timeout(Duration::from_secs(300), t)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "two-channel loop stuck with {} messages not received",
                    left.load(Ordering::Relaxed)
                )
            });
        chans.push(ch.unwrap());
    }
    let took = meter.stop();
    for ch in chans {
        let _ = ch.close(200, "OK".into()).await;
    }
    took
}

async fn steadfast_run(size: usize, n: usize) -> Took {
    let name = format!("sf-bench-{}", uuid::Uuid::now_v7().simple());
    let mut builder = AmqpTransport::builder(url())
        .exchange(name.clone())
        .queue_prefix(format!("{name}."))
        .queue_expiry(Duration::from_secs(120));
    if let Some(n) = std::env::var("BENCH_CHANNELS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        builder = builder.consumer_channels(n);
    }
    let t = builder.connect().await.expect("RabbitMQ on AMQP_URL");
    let handled = Arc::new(AtomicUsize::new(0));
    let settled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let s = settled.clone();
    let worker = Worker::builder(t.clone(), "bench")
        .handle(move |_: Item, _cx: Context| {
            h.fetch_add(1, Ordering::Relaxed);
            async { Ok::<(), HandlerError>(()) }
        })
        .concurrency(usize::from(PREFETCH))
        .on_outcome(move |_| {
            s.fetch_add(1, Ordering::Relaxed);
        })
        .build()
        .unwrap();
    worker.declare().await.unwrap();
    let payload = body(size);
    let envs: Vec<Envelope> = (0..n)
        .map(|_| Envelope::new(Item::NAME, payload.clone()))
        .collect();
    for chunk in envs.chunks(1000) {
        for r in t.publish_batch(chunk).await {
            r.unwrap();
        }
    }
    let stop = CancellationToken::new();
    let token = stop.clone();
    eprintln!("consuming");
    let meter = Meter::start(broker_pid());
    let task = tokio::spawn(worker.run_until(async move { token.cancelled().await }));
    while settled.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let took = meter.stop();
    stop.cancel();
    task.await.unwrap().unwrap();
    t.close().await;
    took
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let n = count();
        let conn = Connection::connect(&url(), ConnectionProperties::default())
            .await
            .expect("RabbitMQ on AMQP_URL");
        let out = Results::new(
            "amqp",
            json!({ "rabbitmq": support::rabbitmq_version(), "url_port": url_port(&url()) }),
        );
        println!("RabbitMQ consumer throughput, prefetch {PREFETCH}, {n} messages per run, durable quorum queues, persistent messages");
        // `BENCH_ONLY=steadfast` runs the worker alone, `BENCH_ONLY=coalesced` the raw
        // ceiling alone (for profiling one of them).
        match std::env::var("BENCH_ONLY").as_deref() {
            Ok("steadfast") => {
                for size in [256usize, 1024] {
                    report(&out, 1, "steadfast", size, n, steadfast_run(size, n).await);
                }
                return;
            }
            Ok(only @ ("coalesced" | "coalesced-2ch")) => {
                let (name, ack) = if only == "coalesced" {
                    ("raw-coalesced", Ack::Coalesce)
                } else {
                    ("raw-coal-2ch", Ack::Split(2))
                };
                for size in [256usize, 1024] {
                    let q = format!("sf-bench-raw-{}", uuid::Uuid::now_v7().simple());
                    let took = raw_run(&conn, &q, size, n, ack, Shape::Steadfast).await;
                    report(&out, 1, name, size, n, took);
                    let ch = conn.create_channel().await.unwrap();
                    let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
                }
                return;
            }
            _ => {}
        }
        // `BENCH_ROUNDS` rounds (default 2), the six consumers interleaved within each,
        // so a change in the machine's load lands on all of them.
        let rounds: usize = std::env::var("BENCH_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2);
        for round in 1..=rounds {
            for size in [256usize, 1024] {
                println!("round {round}, {size} B");
                let q = format!("sf-bench-raw-{}", uuid::Uuid::now_v7().simple());
                let raw = |ack: Ack, shape: Shape| raw_run(&conn, &q, size, n, ack, shape);
                let awaited = report(&out, round, "raw-ack-await", size, n, raw(Ack::Await, Shape::Steadfast).await);
                let spawned = report(&out, round, "raw-ack-spawn", size, n, raw(Ack::Spawn, Shape::Steadfast).await);
                let ceiling = report(&out, round, "raw-coalesced", size, n, raw(Ack::Coalesce, Shape::Steadfast).await);
                let ours = report(&out, round, "steadfast", size, n, steadfast_run(size, n).await);
                let split = report(&out, round, "raw-coal-2ch", size, n, raw(Ack::Split(2), Shape::Steadfast).await);
                let plain = report(&out, round, "raw-coal-plain", size, n, raw(Ack::Coalesce, Shape::Plain).await);
                println!(
                    "  steadfast = {:.0}% of the coalesced ceiling, {:.2}x raw ack-await, {:.2}x raw ack-spawn ({:.0}% of the two-channel ceiling, {:.0}% of the ceiling on header-less messages)",
                    ours.rate / ceiling.rate * 100.0,
                    ours.rate / awaited.rate,
                    ours.rate / spawned.rate,
                    ours.rate / split.rate * 100.0,
                    ours.rate / plain.rate * 100.0
                );
                let ch = conn.create_channel().await.unwrap();
                let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
            }
        }
        let _ = conn.close(200, "OK".into()).await;
    });
}
