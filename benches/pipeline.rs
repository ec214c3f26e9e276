//! Per-message overhead of the worker pipeline on the in-memory transport.
//!
//! Three loops consume the same pre-filled queue of 10,000 small messages on a
//! two-thread tokio runtime: a bare loop that takes each delivery and acks it (the
//! transport's own cost), the steadfast worker, and the worker with the in-memory
//! idempotency store. The difference per message is what the pipeline costs: the span,
//! routing, decoding, the guarded handler call, the decision and the settle.
//!
//! ```text
//! cargo bench --bench pipeline
//! ```

use criterion::{Criterion, Throughput, criterion_group};
use futures::StreamExt;
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};
use steadfast::{
    Context, Disposition, Envelope, HandlerError, Message, Worker,
    idempotency::memory::MemoryStore,
    transport::{Subscription, Transport, memory::MemoryTransport},
};
use tokio::sync::Notify;

mod support;

/// Every timed pass of each loop, for the result file (criterion keeps its own).
static PASSES: std::sync::Mutex<[Vec<f64>; 3]> =
    std::sync::Mutex::new([Vec::new(), Vec::new(), Vec::new()]);

/// Notes one pass of loop `i` (0 bare, 1 worker, 2 worker + store) and returns it.
fn pass(i: usize, took: Duration) -> Duration {
    PASSES.lock().expect("not poisoned")[i].push(took.as_secs_f64() * 1e6 / N as f64);
    took
}

const N: usize = 10_000;

#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "bench.tick")]
struct Tick {
    n: u64,
    note: String,
}

async fn prefill(broker: &MemoryTransport) {
    broker.bind("bench", [Tick::NAME]);
    for n in 0..N as u64 {
        let env = Envelope::encode(&Tick {
            n,
            note: "x".repeat(200),
        })
        .expect("encodes");
        broker.publish(&env).await.expect("routable");
    }
}

async fn tick(_t: Tick, _cx: Context) -> Result<(), HandlerError> {
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The transport alone: pull each delivery and ack it, in a spawned task.
fn bare(rt: &tokio::runtime::Runtime) -> Duration {
    rt.block_on(async {
        let broker = MemoryTransport::new();
        prefill(&broker).await;
        let sub = Subscription::new("bench", [Tick::NAME]);
        let mut stream = broker.subscribe(&sub).await.expect("subscribes");
        let start = Instant::now();
        tokio::spawn(async move {
            for _ in 0..N {
                let d = stream.next().await.expect("delivery").expect("ok");
                d.settle(Disposition::Ack).await.expect("acked");
            }
        })
        .await
        .expect("loop ran");
        start.elapsed()
    })
}

fn worker(rt: &tokio::runtime::Runtime, idempotency: bool) -> Duration {
    rt.block_on(async {
        let broker = MemoryTransport::new();
        prefill(&broker).await;
        let done = Arc::new(Notify::new());
        let count = Arc::new(AtomicUsize::new(0));
        let (d, c) = (done.clone(), count.clone());
        let mut builder = Worker::builder(broker.clone(), "bench")
            .handle(tick)
            .concurrency(64)
            .on_outcome(move |_| {
                if c.fetch_add(1, Ordering::Relaxed) + 1 == N {
                    d.notify_one();
                }
            });
        if idempotency {
            builder = builder.idempotency(MemoryStore::new());
        }
        let worker = builder.build().expect("valid");
        let start = Instant::now();
        tokio::spawn(worker.run_until(async move { done.notified().await }))
            .await
            .expect("joined")
            .expect("ran");
        assert_eq!(count.load(Ordering::Relaxed), N);
        start.elapsed()
    })
}

fn pipeline(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("memory_consume_10k");
    g.throughput(Throughput::Elements(N as u64))
        .sample_size(10)
        .measurement_time(Duration::from_secs(6));
    g.bench_function("bare_transport_ack", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| pass(0, bare(&rt))).sum())
    });
    g.bench_function("steadfast_worker", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| pass(1, worker(&rt, false))).sum())
    });
    g.bench_function("steadfast_worker_idempotent", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| pass(2, worker(&rt, true))).sum())
    });
    g.finish();
}

criterion_group!(benches, pipeline);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // The median pass of each loop, in µs per message, to the result file.
    let out = support::Results::new("pipeline", serde_json::json!({}));
    let passes = PASSES.lock().expect("not poisoned");
    let names = ["bare-transport", "steadfast", "steadfast-idempotent"];
    for (name, v) in names.iter().zip(passes.iter()) {
        if v.is_empty() {
            continue; // filtered out on the command line
        }
        let us = support::median(v);
        out.record(serde_json::json!({
            "scenario": "memory-consume", "consumer": name, "baseline": "bare-transport",
            "round": 1, "us_per_msg": us, "msgs_per_s": 1e6 / us, "passes": v.len(),
        }));
    }
}
