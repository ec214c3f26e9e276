//! How fast the web console's pages answer with many dead letters: 100,000 (or
//! `BENCH_DEAD_LETTERS`) dead-lettered by a worker whose handler refuses every message,
//! on RabbitMQ and on NATS JetStream, then `steadfast console` (the binary of this build)
//! asked for the failure groups page, a consumer group's list page and the pages of the
//! first and the last dead letter (the front and the back of the queue or stream),
//! `BENCH_REQUESTS` (default 200) times each, one request at a time. It also prints how
//! long the console's first full read took and whether a dead letter's page came from it.
//!
//! ```text
//! cargo bench --features console --bench console
//! BENCH_ONLY=nats BENCH_DEAD_LETTERS=10000 cargo bench --features console --bench console
//! BENCH_CONSOLE_ARGS="--index-memory-mib 0" BENCH_REQUESTS=5 cargo bench --features console --bench console
//! ```
//!
//! Prints the median and 99th percentile of each page's answer time. The queues and
//! streams have names of their own and are deleted at the end. `AMQP_URL` and `NATS_URL`
//! name the brokers (default the local ones); the console listens on a loopback port the
//! system picks.

use lapin::{Connection, ConnectionProperties, options::QueueDeleteOptions};
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use steadfast::{
    Context, Envelope, HandlerError, Message, Worker,
    transport::{Transport, amqp::AmqpTransport, nats::NatsTransport},
};
use tokio::io::{AsyncBufReadExt, BufReader};

#[path = "../tests/cli/http.rs"]
mod http;

const TOKEN: &str = "console-bench-token-0123456789";
const GROUP: &str = "bench";

#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "bench.order")]
struct Order {
    n: u64,
}

fn env_n(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One GET with the token to the console on `port`: the status and the body.
async fn get(port: u16, path: &str) -> (u16, String) {
    let bearer = format!("Bearer {TOKEN}");
    let (status, _, body) = http::request(
        port,
        "GET",
        path,
        &[("Authorization", &bearer)],
        "",
        Duration::from_secs(600),
    )
    .await;
    (status, body)
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Dead-letters `n` messages on `t` under `GROUP`; returns the first and the last one's
/// ids.
async fn fill(t: Arc<dyn Transport>, n: u64) -> (String, String) {
    let dead = Arc::new(AtomicU64::new(0));
    let d = dead.clone();
    let worker = Worker::builder_shared(t.clone(), GROUP)
        .handle(|m: Order, _: Context| async move {
            Err::<(), _>(HandlerError::msg(format!("no stock for order {}", m.n)).permanent())
        })
        .concurrency(200)
        .on_outcome(move |p| {
            if matches!(p.outcome, steadfast::worker::Outcome::DeadLettered(_)) {
                d.fetch_add(1, Ordering::Relaxed);
            }
        })
        .build()
        .expect("valid worker");
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    let running = tokio::spawn(async move {
        let _ = worker.run_until(s.cancelled_owned()).await;
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let (mut first, mut last) = (None, String::new());
    let mut sent = 0u64;
    while sent < n {
        let batch: Vec<Envelope> = (sent..(sent + 1000).min(n))
            .map(|i| Envelope::encode(&Order { n: i }).unwrap())
            .collect();
        first.get_or_insert_with(|| batch[0].id.to_string());
        last = batch[batch.len() - 1].id.to_string();
        for r in t.publish_batch(&batch).await {
            r.expect("published");
        }
        sent += batch.len() as u64;
    }
    while dead.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    let _ = running.await;
    eprintln!(
        "  {n} dead letters in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    (first.unwrap(), last)
}

async fn measure(system: &str, t: Arc<dyn Transport>, args: Vec<String>) {
    let n = env_n("BENCH_DEAD_LETTERS", 100_000);
    let requests = env_n("BENCH_REQUESTS", 200) as usize;
    eprintln!("{system}:");
    let (first, last) = fill(t.clone(), n).await;
    let mut console = tokio::process::Command::new(env!("CARGO_BIN_EXE_steadfast"))
        .arg("console")
        .args(["--group", GROUP, "--listen", "127.0.0.1:0"])
        .args(&args)
        .args(
            std::env::var("BENCH_CONSOLE_ARGS")
                .unwrap_or_default()
                .split_whitespace(),
        )
        .env("STEADFAST_CONSOLE_TOKEN", TOKEN)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the steadfast binary of this build (--features console)");
    // It listens on a port the system chose and says which.
    let mut err = BufReader::new(console.stderr.take().unwrap()).lines();
    let port: u16 = loop {
        let line = err.next_line().await.unwrap().expect("the console starts");
        if let Some(at) = line.strip_prefix("steadfast console on http://127.0.0.1:") {
            break at.trim_end_matches('/').parse().expect("a port");
        }
    };
    // Keep reading what it says, so a full pipe never blocks it.
    tokio::spawn(async move { while let Ok(Some(_)) = err.next_line().await {} });
    // The failure groups as the page shows them once the first full read is done.
    let started = Instant::now();
    loop {
        let (s, page) = get(port, "/").await;
        assert_eq!(s, 200, "{page}");
        if page.contains("class=\"as-of\"") {
            assert!(
                page.contains(&format!("<td class=\"count\">{n}</td>")),
                "{page}"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "  first full read for the failure groups: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // The console's memory with that read kept (Linux).
    if let Some(rss) = console
        .id()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(str::to_owned)
        })
    {
        eprintln!("  console {rss}");
    }
    for (name, path) in [
        ("failure groups", "/".to_owned()),
        ("group list (50)", format!("/g/{GROUP}")),
        ("first dead letter", format!("/g/{GROUP}/dl/{first}")),
        ("last dead letter", format!("/g/{GROUP}/dl/{last}")),
    ] {
        let mut times = Vec::with_capacity(requests);
        let mut kept = 0;
        for _ in 0..requests {
            let at = Instant::now();
            let (s, page) = get(port, &path).await;
            times.push(at.elapsed());
            assert_eq!(s, 200, "{page}");
            kept += usize::from(name.ends_with("dead letter") && page.contains("class=\"as-of\""));
        }
        times.sort();
        println!(
            "{system:8} {name:17} {n} dead letters: p50 {:7.1} ms  p99 {:7.1} ms{}",
            quantile(&times, 0.5).as_secs_f64() * 1e3,
            quantile(&times, 0.99).as_secs_f64() * 1e3,
            if kept > 0 {
                format!("  ({kept} of {requests} from the console's read)")
            } else {
                String::new()
            }
        );
    }
    let _ = console.start_kill();
    let _ = console.wait().await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let name = format!("sfbench{}", uuid::Uuid::now_v7().simple());
    if only.is_empty() || only == "rabbitmq" {
        let url = std::env::var("AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        let t = AmqpTransport::builder(url.clone())
            .exchange(name.clone())
            .queue_prefix(format!("{name}."))
            .connect()
            .await
            .expect("RabbitMQ on AMQP_URL");
        let t: Arc<dyn Transport> = Arc::new(t);
        let args = vec![
            "--url".into(),
            url.clone(),
            "--exchange".into(),
            name.clone(),
            "--queue-prefix".into(),
            format!("{name}."),
        ];
        measure("rabbitmq", t.clone(), args).await;
        t.close().await;
        let c = Connection::connect(&url, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = c.create_channel().await.unwrap();
        // The group's queues: work, dead letters, suspects and the default retry
        // policy's delay tiers.
        let suffixes = ["", ".dlq", ".suspects"]
            .map(str::to_owned)
            .into_iter()
            .chain([1, 2, 4, 8, 300].map(|s| format!(".delay.{s}000ms")));
        for q in suffixes.map(|s| format!("{name}.{GROUP}{s}")) {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = ch
            .exchange_delete(name.as_str().into(), Default::default())
            .await;
    }
    if only.is_empty() || only == "nats" {
        let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
        let stream = format!("SFBENCH_{}", name.to_uppercase());
        let t = NatsTransport::builder(&url)
            .subject_prefix(name.clone())
            .stream(stream.clone())
            .connect()
            .await
            .expect("NATS JetStream on NATS_URL");
        let t: Arc<dyn Transport> = Arc::new(t);
        let args = vec![
            "--url".into(),
            url.clone(),
            "--subject-prefix".into(),
            name.clone(),
            "--stream".into(),
            stream.clone(),
        ];
        measure("nats", t.clone(), args).await;
        t.close().await;
        if let Ok(c) = async_nats::connect(url).await {
            let js = async_nats::jetstream::new(c);
            let _ = js.delete_stream(&stream).await;
            let _ = js.delete_stream(format!("{stream}_DLQ")).await;
        }
    }
}
