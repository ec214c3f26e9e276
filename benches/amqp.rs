//! Consumer throughput on RabbitMQ: the steadfast worker against raw lapin doing the
//! same work, in one run, on one pre-filled durable quorum queue per scenario.
//!
//! ```text
//! cargo bench --features amqp --bench amqp        # AMQP_URL, default the local broker
//! BENCH_ONLY=steadfast cargo bench --features amqp --bench amqp   # the worker alone
//! BENCH_ONLY=coalesced cargo bench --features amqp --bench amqp   # the raw ceiling alone
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
//! - `raw-coal-plain`: the coalesced loop again, on messages with no properties but
//!   persistent delivery (what lapin's ceiling is without the headers a real publisher
//!   sets; printed for reference).
//!
//! The three raw loops before `steadfast` read the same deliveries the worker reads:
//! messages with the properties and CloudEvents headers a steadfast publisher sets, so
//! every consumer parses the same frames. Every raw loop runs as a spawned task.
//! `BENCH_ROUNDS` (default 2) repeats the five, interleaved.
//!
//! Prints msgs/s and client CPU µs/msg (user+system time of this process from
//! `/proc/self/stat`, the figures `getrusage` gives; `unsafe` is forbidden here).

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
    time::{Duration, Instant},
};
use steadfast::{
    Context, Envelope, HandlerError, Message, Worker,
    transport::{Transport, amqp::AmqpTransport},
};
use tokio_util::sync::CancellationToken;

const PREFETCH: u16 = 100;

#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "bench.item")]
struct Item {
    pad: String,
}

fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn count() -> usize {
    std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000)
}

/// CPU time (user + system) of this process so far.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line: 11 and 12 after the name.
    let hz = 100; // USER_HZ on Linux
    Duration::from_micros((ticks(11) + ticks(12)) * 1_000_000 / hz)
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
    cpu_us: f64,
}

fn report(name: &str, size: usize, n: usize, wall: Duration, cpu: Duration) -> Figures {
    let f = Figures {
        rate: n as f64 / wall.as_secs_f64(),
        cpu_us: cpu.as_secs_f64() * 1e6 / n as f64,
    };
    println!(
        "{name:<16} {size:>5} B  {n:>7} msgs  {:>9.0} msgs/s  {:>6.1} µs CPU/msg",
        f.rate, f.cpu_us
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
) -> (Duration, Duration) {
    raw_queue(conn, queue, size, n, shape).await;
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
}

/// Consumes `n` messages of `queue` on `ch` as the loop of a spawned task (run inside
/// `block_on`, lapin loses about a quarter of its throughput).
async fn raw_consume(ch: Channel, queue: String, n: usize, ack: Ack) -> (Duration, Duration) {
    tokio::spawn(async move {
        ch.basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .unwrap();
        // On stderr, so a profiler can attach to the consume phase alone.
        eprintln!("consuming");
        let (cpu0, t0) = (cpu(), Instant::now());
        let mut consumer = ch
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
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
                Ack::Coalesce => {
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
        let r = (t0.elapsed(), cpu() - cpu0);
        let _ = ch.close(200, "OK".into()).await;
        r
    })
    .await
    .unwrap()
}

async fn steadfast_run(size: usize, n: usize) -> (Duration, Duration) {
    let name = format!("sf-bench-{}", uuid::Uuid::now_v7().simple());
    let t = AmqpTransport::builder(url())
        .exchange(name.clone())
        .queue_prefix(format!("{name}."))
        .queue_expiry(Duration::from_secs(120))
        .connect()
        .await
        .expect("RabbitMQ on AMQP_URL");
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
    let (cpu0, t0) = (cpu(), Instant::now());
    let task = tokio::spawn(worker.run_until(async move { token.cancelled().await }));
    while settled.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let r = (t0.elapsed(), cpu() - cpu0);
    stop.cancel();
    task.await.unwrap().unwrap();
    t.close().await;
    r
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
        println!("RabbitMQ consumer throughput, prefetch {PREFETCH}, {n} messages per run, durable quorum queues, persistent messages");
        // `BENCH_ONLY=steadfast` runs the worker alone, `BENCH_ONLY=coalesced` the raw
        // ceiling alone (for profiling one of them).
        match std::env::var("BENCH_ONLY").as_deref() {
            Ok("steadfast") => {
                for size in [256usize, 1024] {
                    let (w, c) = steadfast_run(size, n).await;
                    report("steadfast", size, n, w, c);
                }
                return;
            }
            Ok("coalesced") => {
                for size in [256usize, 1024] {
                    let q = format!("sf-bench-raw-{}", uuid::Uuid::now_v7().simple());
                    let (w, c) =
                        raw_run(&conn, &q, size, n, Ack::Coalesce, Shape::Steadfast).await;
                    report("raw-coalesced", size, n, w, c);
                    let ch = conn.create_channel().await.unwrap();
                    let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
                }
                return;
            }
            _ => {}
        }
        // `BENCH_ROUNDS` rounds (default 2), the five consumers interleaved within each,
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
                let (w, c) = raw(Ack::Await, Shape::Steadfast).await;
                let awaited = report("raw-ack-await", size, n, w, c);
                let (w, c) = raw(Ack::Spawn, Shape::Steadfast).await;
                let spawned = report("raw-ack-spawn", size, n, w, c);
                let (w, c) = raw(Ack::Coalesce, Shape::Steadfast).await;
                let ceiling = report("raw-coalesced", size, n, w, c);
                let (w, c) = steadfast_run(size, n).await;
                let ours = report("steadfast", size, n, w, c);
                let (w, c) = raw(Ack::Coalesce, Shape::Plain).await;
                let plain = report("raw-coal-plain", size, n, w, c);
                println!(
                    "  steadfast = {:.0}% of the coalesced ceiling, {:.2}x raw ack-await, {:.2}x raw ack-spawn ({:.0}% of the ceiling on header-less messages)",
                    ours.rate / ceiling.rate * 100.0,
                    ours.rate / awaited.rate,
                    ours.rate / spawned.rate,
                    ours.rate / plain.rate * 100.0
                );
                let ch = conn.create_channel().await.unwrap();
                let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
            }
        }
        let _ = conn.close(200, "OK".into()).await;
    });
}
