//! Consume-and-ack throughput on NATS JetStream: a steadfast worker against a raw
//! async-nats pull consumer doing the same work (same batch, explicit per-message acks
//! in a spawned task), on a pre-filled file-backed stream, for 256 B and 1 KiB payloads.
//!
//! Prints msgs/s and the client's CPU time per message (user + system of this process,
//! the figures getrusage reports, read from /proc/self/stat).
//!
//! ```text
//! cargo bench --bench nats --features nats            # local nats-server on 4222
//! BENCH_MESSAGES=100000 cargo bench --bench nats --features nats
//! ```

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, pull},
};
use futures::StreamExt;
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};
use steadfast::{
    Context, Message, Worker,
    transport::{Transport, nats::NatsTransport},
};
use tokio_util::sync::CancellationToken;

const URL: &str = "nats://127.0.0.1:4222";
const BATCH: usize = 64;

#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "bench.blob")]
struct Blob {
    data: String,
}

/// Process CPU time (user + system) in microseconds.
fn cpu_micros() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name in parentheses; utime and stime are 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Index 11/12 here = fields 14/15 overall (state is field 3 = index 0).
    let hz = 100.0;
    (ticks(11) + ticks(12)) / hz * 1e6
}

struct Figures {
    rate: f64,
    cpu_us: f64,
}

fn report(label: &str, n: usize, wall: Duration, cpu: f64) -> Figures {
    let rate = n as f64 / wall.as_secs_f64();
    let cpu_us = cpu / n as f64;
    println!(
        "{label:<34} {n:>7} msgs in {:>6.2} s = {rate:>9.0} msgs/s, client CPU {cpu_us:>6.2} µs/msg",
        wall.as_secs_f64()
    );
    Figures { rate, cpu_us }
}

async fn prefill(js: &jetstream::Context, subject: &str, n: usize, size: usize) {
    let payload = serde_json::to_vec(&Blob {
        data: "x".repeat(size.saturating_sub(11)),
    })
    .unwrap();
    let env = steadfast::Envelope::new(Blob::NAME, payload);
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut acks = Vec::with_capacity(chunk.len());
        for _ in chunk {
            let mut h = async_nats::HeaderMap::new();
            let e = env.clone().with_id(steadfast::MessageId::new());
            e.write_wire("ce-", |k, v| h.insert(k.as_ref(), v.as_ref()));
            acks.push(
                js.publish_with_headers(subject.to_owned(), h, e.payload.clone())
                    .await
                    .unwrap(),
            );
        }
        for a in acks {
            a.await.unwrap();
        }
    }
}

async fn raw(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
    filter: &str,
    n: usize,
    double: bool,
) -> Figures {
    let st = js.get_stream(stream).await.unwrap();
    let consumer = st
        .create_consumer(pull::Config {
            durable_name: Some(durable.into()),
            filter_subject: filter.into(),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(35),
            max_ack_pending: BATCH as i64,
            ..Default::default()
        })
        .await
        .unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let (cpu0, t0) = (cpu_micros(), Instant::now());
    let mut msgs = consumer
        .stream()
        .max_messages_per_batch(BATCH)
        .messages()
        .await
        .unwrap();
    let mut seen = 0;
    while seen < n {
        let m = msgs.next().await.unwrap().unwrap();
        seen += 1;
        let done = done.clone();
        tokio::spawn(async move {
            if double {
                m.double_ack().await.unwrap();
            } else {
                m.ack().await.unwrap();
            }
            done.fetch_add(1, Ordering::Relaxed);
        });
    }
    while done.load(Ordering::Relaxed) < n {
        tokio::task::yield_now().await;
    }
    let label = if double {
        "raw async-nats (double_ack)"
    } else {
        "raw async-nats (ack)"
    };
    report(label, n, t0.elapsed(), cpu_micros() - cpu0)
}

async fn steadfast_worker(t: &NatsTransport, group: &str, n: usize) -> Figures {
    let acked = Arc::new(AtomicUsize::new(0));
    let counter = acked.clone();
    let worker = Worker::builder(t.clone(), group)
        .handle(|_: Blob, _cx: Context| async { Ok(()) })
        .concurrency(BATCH)
        .on_outcome(move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        })
        .build()
        .unwrap();
    worker.declare().await.unwrap();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let (cpu0, t0) = (cpu_micros(), Instant::now());
    let task = tokio::spawn(worker.run_until(async move { token.cancelled().await }));
    while acked.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let fig = report(
        "steadfast worker (awaited ack)",
        n,
        t0.elapsed(),
        cpu_micros() - cpu0,
    );
    stop.cancel();
    task.await.unwrap().unwrap();
    fig
}

fn main() {
    let n: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let client = async_nats::connect(URL).await.expect("nats-server on 4222");
        println!("nats-server {}, {n} messages per run, batch {BATCH}", client.server_info().version);
        let js = jetstream::new(client);
        for size in [256usize, 1024] {
            let tag = format!("{}{size}", std::process::id());
            let prefix = format!("bench{tag}");
            let stream_name = format!("BENCH_{tag}");
            let t = NatsTransport::builder(URL)
                .subject_prefix(prefix.clone())
                .stream(stream_name.clone())
                .max_age(Duration::from_secs(600))
                .dead_letter_max_age(Duration::from_secs(600))
                .connect()
                .await
                .unwrap();
            // Streams and the worker's consumer first, so the prefill is in its backlog.
            let g = format!("sf{size}");
            Worker::builder(t.clone(), &g)
                .handle(|_: Blob, _cx: Context| async { Ok(()) })
                .concurrency(BATCH)
                .build()
                .unwrap()
                .declare()
                .await
                .unwrap();
            let subject = t.subject_for(Blob::NAME);
            prefill(&js, &subject, n, size).await;
            println!("-- {size} B payload, file storage");
            let a = raw(&js, &stream_name, "rawack", &subject, n, false).await;
            let b = raw(&js, &stream_name, "rawdouble", &subject, n, true).await;
            let s = steadfast_worker(&t, &g, n).await;
            println!(
                "   steadfast vs raw(ack): {:.0} %, {:+.2} µs/msg; vs raw(double_ack): {:.0} %, {:+.2} µs/msg",
                s.rate / a.rate * 100.0,
                s.cpu_us - a.cpu_us,
                s.rate / b.rate * 100.0,
                s.cpu_us - b.cpu_us
            );
            t.close().await;
            let _ = js.delete_stream(&stream_name).await;
            let _ = js.delete_stream(format!("{stream_name}_DLQ")).await;
        }
    });
}
