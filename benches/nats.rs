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
//! cargo bench --bench nats --features nats            # NATS_URL, default the local server
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
    time::Duration,
};
use steadfast::{
    Context, Message, Worker,
    transport::{Transport, nats::NatsTransport},
};
use tokio_util::sync::CancellationToken;

mod support;
use serde_json::json;
use support::{Meter, Results, Took, median};

/// `NATS_URL`, default the local server.
fn url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}
const BATCH: usize = 64;

#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "bench.blob")]
struct Blob {
    data: String,
}

struct Figures {
    rate: f64,
    cpu_us: f64,
}

/// Where a figure goes: the result file, the round and the payload size.
type At<'a> = (&'a Results, usize, usize);

/// The nats-server's process: `BENCH_NATS_PID`, or the first `nats-server` in `/proc`.
fn broker_pid() -> Option<String> {
    support::find_process("nats-server", "BENCH_NATS_PID")
}

/// Prints one consumer's figures and appends them to the result file.
/// `at`: the result file, the round and the payload size.
fn report(at: At<'_>, label: &str, n: usize, took: Took) -> Figures {
    let (out, round, size) = at;
    let mut fields = took.fields(n);
    let obj = fields.as_object_mut().expect("an object");
    obj.insert("scenario".into(), json!("throughput"));
    obj.insert(
        "consumer".into(),
        json!(CONSUMERS[LABELS.iter().position(|l| *l == label).unwrap_or(0)]),
    );
    obj.insert("payload".into(), json!(size));
    obj.insert("round".into(), json!(round));
    obj.insert("baseline".into(), json!("raw-ack"));
    out.record(fields);
    let rate = n as f64 / took.wall.as_secs_f64();
    let cpu_us = took.cpu.as_secs_f64() * 1e6 / n as f64;
    let broker = took.broker.map_or_else(
        || "-".to_owned(),
        |b| format!("{:.1}", b.as_secs_f64() * 1e6 / n as f64),
    );
    println!(
        "{label:<34} {n:>7} msgs in {:>6.2} s = {rate:>9.0} msgs/s, client CPU {cpu_us:>6.2} µs/msg, broker {broker:>6} µs/msg",
        took.wall.as_secs_f64()
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
    at: At<'_>,
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
    let meter = Meter::start(broker_pid());
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
    report(at, LABELS[usize::from(double)], n, meter.stop())
}

async fn steadfast_worker(
    at: At<'_>,
    t: &NatsTransport,
    group: &str,
    n: usize,
    label: &str,
) -> Figures {
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
    let meter = Meter::start(broker_pid());
    let task = tokio::spawn(worker.run_until(async move { token.cancelled().await }));
    while acked.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let fig = report(at, label, n, meter.stop());
    stop.cancel();
    task.await.unwrap().unwrap();
    fig
}

/// The consumers' names in the result file.
const CONSUMERS: [&str; 4] = [
    "raw-ack",
    "raw-double-ack",
    "steadfast",
    "steadfast-confirm",
];

const LABELS: [&str; 4] = [
    "raw async-nats ack()",
    "raw async-nats double_ack()",
    "steadfast (default acks)",
    "steadfast confirm_acks(true)",
];

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
    support::log_from_env();
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
        let client = async_nats::connect(url()).await.expect("nats-server on NATS_URL");
        println!(
            "nats-server {}, {n} messages per run, batch {BATCH}, {rounds} rounds",
            client.server_info().version
        );
        let out = Results::new("nats", json!({ "nats": client.server_info().version }));
        let js = jetstream::new(client);
        for size in [256usize, 1024] {
            let tag = format!("{}{size}", std::process::id());
            let prefix = format!("bench{tag}");
            let stream_name = format!("BENCH_{tag}");
            let builder = NatsTransport::builder(&url())
                .subject_prefix(prefix.clone())
                .stream(stream_name.clone())
                .max_age(Duration::from_secs(600))
                .dead_letter_max_age(Duration::from_secs(600))
                .replicas(support::nats_replicas());
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
                let at = (&out, r + 1, size);
                runs[0].push(raw(at, &js, &stream_name, &format!("rawack{r}"), &subject, n, false).await);
                runs[1].push(raw(at, &js, &stream_name, &format!("rawdouble{r}"), &subject, n, true).await);
                runs[2].push(steadfast_worker(at, &t, &format!("sf{size}r{r}"), n, LABELS[2]).await);
                runs[3].push(steadfast_worker(at, &tc, &format!("sfc{size}r{r}"), n, LABELS[3]).await);
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
