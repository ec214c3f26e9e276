//! Consume-and-ack throughput on NATS JetStream: a steadfast worker against a raw
//! async-nats pull consumer doing the same work (same batch, explicit per-message acks
//! in a spawned task), on a pre-filled file-backed stream, for 256 B and 1 KiB payloads.
//!
//! Four clients read the same pre-filled stream, each through a fresh durable consumer:
//! raw `ack()` (published, not awaited), raw `double_ack()` (awaited), the steadfast
//! worker with its default acks (published) and with `confirm_acks(true)` (awaited).
//! Every client runs once per round; rounds are interleaved so drift in the machine's
//! load hits all of them alike.
//!
//! Prints msgs/s and the client's CPU time per message (user + system of this process,
//! the figures getrusage reports, read from /proc/self/stat), then the spread per client.
//!
//! ```text
//! cargo bench --bench nats --features nats            # local nats-server on 4222
//! BENCH_MESSAGES=100000 BENCH_ROUNDS=3 cargo bench --bench nats --features nats
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
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    report(
        LABELS[usize::from(double)],
        n,
        t0.elapsed(),
        cpu_micros() - cpu0,
    )
}

async fn steadfast_worker(t: &NatsTransport, group: &str, n: usize, label: &str) -> Figures {
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
    let fig = report(label, n, t0.elapsed(), cpu_micros() - cpu0);
    stop.cancel();
    task.await.unwrap().unwrap();
    fig
}

const LABELS: [&str; 4] = [
    "raw async-nats ack()",
    "raw async-nats double_ack()",
    "steadfast (default acks)",
    "steadfast confirm_acks(true)",
];

/// The median of sorted values (the mean of the middle two for an even count).
fn median(v: &[f64]) -> f64 {
    let m = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[m - 1] + v[m]) / 2.0
    } else {
        v[m]
    }
}

fn spread(label: &str, runs: &[Figures]) {
    let (mut r, mut c): (Vec<f64>, Vec<f64>) = runs.iter().map(|f| (f.rate, f.cpu_us)).unzip();
    r.sort_by(f64::total_cmp);
    c.sort_by(f64::total_cmp);
    println!(
        "   {label:<30} msgs/s {:>7.0} .. {:>7.0} (median {:>7.0}); CPU µs/msg {:>6.2} .. {:>6.2} (median {:>6.2})",
        r[0],
        r[r.len() - 1],
        median(&r),
        c[0],
        c[c.len() - 1],
        median(&c)
    );
}

fn main() {
    let n: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
        .max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let client = async_nats::connect(URL).await.expect("nats-server on 4222");
        println!(
            "nats-server {}, {n} messages per run, batch {BATCH}, {rounds} rounds",
            client.server_info().version
        );
        let js = jetstream::new(client);
        for size in [256usize, 1024] {
            let tag = format!("{}{size}", std::process::id());
            let prefix = format!("bench{tag}");
            let stream_name = format!("BENCH_{tag}");
            let builder = NatsTransport::builder(URL)
                .subject_prefix(prefix.clone())
                .stream(stream_name.clone())
                .max_age(Duration::from_secs(600))
                .dead_letter_max_age(Duration::from_secs(600));
            let t = builder.clone().connect().await.unwrap();
            let tc = builder.confirm_acks(true).connect().await.unwrap();
            // Creates the streams; every consumer below starts at the stream's beginning.
            Worker::builder(t.clone(), format!("sfdeclare{size}"))
                .handle(|_: Blob, _cx: Context| async { Ok(()) })
                .build()
                .unwrap()
                .declare()
                .await
                .unwrap();
            let subject = t.subject_for(Blob::NAME);
            prefill(&js, &subject, n, size).await;
            println!("-- {size} B payload, file storage");
            let mut runs: [Vec<Figures>; 4] = Default::default();
            for r in 0..rounds {
                runs[0].push(raw(&js, &stream_name, &format!("rawack{r}"), &subject, n, false).await);
                runs[1].push(raw(&js, &stream_name, &format!("rawdouble{r}"), &subject, n, true).await);
                runs[2].push(steadfast_worker(&t, &format!("sf{size}r{r}"), n, LABELS[2]).await);
                runs[3].push(steadfast_worker(&tc, &format!("sfc{size}r{r}"), n, LABELS[3]).await);
            }
            println!("   spread over {rounds} rounds:");
            for (label, v) in LABELS.iter().zip(&runs) {
                spread(label, v);
            }
            let med = |v: &[Figures], f: fn(&Figures) -> f64| {
                let mut x: Vec<f64> = v.iter().map(f).collect();
                x.sort_by(f64::total_cmp);
                median(&x)
            };
            let (ar, ac) = (med(&runs[0], |f| f.rate), med(&runs[0], |f| f.cpu_us));
            let (sr, sc) = (med(&runs[2], |f| f.rate), med(&runs[2], |f| f.cpu_us));
            let (br, bc) = (med(&runs[1], |f| f.rate), med(&runs[1], |f| f.cpu_us));
            let (cr, cc) = (med(&runs[3], |f| f.rate), med(&runs[3], |f| f.cpu_us));
            println!(
                "   medians: steadfast vs raw ack(): {:.0} %, {:+.2} µs/msg; confirm_acks vs raw double_ack(): {:.0} %, {:+.2} µs/msg",
                sr / ar * 100.0,
                sc - ac,
                cr / br * 100.0,
                cc - bc
            );
            t.close().await;
            tc.close().await;
            let _ = js.delete_stream(&stream_name).await;
            let _ = js.delete_stream(format!("{stream_name}_DLQ")).await;
        }
    });
}
