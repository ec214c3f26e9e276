//! How fast the web console's pages answer with many dead letters: 100,000 (or
//! `BENCH_DEAD_LETTERS`) dead-lettered by a worker whose handler refuses every message,
//! on RabbitMQ and on NATS JetStream, then `steadfast console` (the binary of this build)
//! asked for the failure groups page, a consumer group's list page and one dead letter's
//! page, `BENCH_REQUESTS` (default 200) times each, one request at a time.
//!
//! ```text
//! cargo bench --features console --bench console
//! BENCH_ONLY=nats BENCH_DEAD_LETTERS=10000 cargo bench --features console --bench console
//! ```
//!
//! Prints the median and 99th percentile of each page's answer time. The queues and
//! streams have names of their own and are deleted at the end. `AMQP_URL` and `NATS_URL`
//! name the brokers (default the local ones); the console listens on 127.0.0.1:8100.

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
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const TOKEN: &str = "console-bench-token-0123456789";
const GROUP: &str = "bench";
const PORT: u16 = 8100;

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

/// One GET with the token: the status and the body.
async fn get(path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", PORT))
        .await
        .expect("the console listens");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{PORT}\r\nConnection: close\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(600), s.read_to_end(&mut out))
        .await
        .expect("the console answers within 10 minutes")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Dead-letters `n` messages on `t` under `GROUP`; returns the first one's id.
async fn fill(t: Arc<dyn Transport>, n: u64) -> String {
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
    let mut first = None;
    let mut sent = 0u64;
    while sent < n {
        let batch: Vec<Envelope> = (sent..(sent + 1000).min(n))
            .map(|i| Envelope::encode(&Order { n: i }).unwrap())
            .collect();
        first.get_or_insert_with(|| batch[0].id.to_string());
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
    first.unwrap()
}

async fn measure(system: &str, t: Arc<dyn Transport>, args: Vec<String>) {
    let n = env_n("BENCH_DEAD_LETTERS", 100_000);
    let requests = env_n("BENCH_REQUESTS", 200) as usize;
    eprintln!("{system}:");
    let first = fill(t.clone(), n).await;
    let mut console = tokio::process::Command::new(env!("CARGO_BIN_EXE_steadfast"))
        .arg("console")
        .args(["--group", GROUP, "--listen", &format!("127.0.0.1:{PORT}")])
        .args(&args)
        .env("STEADFAST_CONSOLE_TOKEN", TOKEN)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the steadfast binary of this build (--features console)");
    let mut err = BufReader::new(console.stderr.take().unwrap()).lines();
    while !err
        .next_line()
        .await
        .unwrap()
        .expect("the console starts")
        .contains("steadfast console on")
    {}
    // The failure groups as the page shows them once the first full read is done.
    let started = Instant::now();
    loop {
        let (s, page) = get("/").await;
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
    for (name, path) in [
        ("failure groups", "/".to_owned()),
        ("group list (50)", format!("/g/{GROUP}")),
        ("one dead letter", format!("/g/{GROUP}/dl/{first}")),
    ] {
        let mut times = Vec::with_capacity(requests);
        for _ in 0..requests {
            let at = Instant::now();
            let (s, page) = get(&path).await;
            times.push(at.elapsed());
            assert_eq!(s, 200, "{page}");
        }
        times.sort();
        println!(
            "{system:8} {name:16} {n} dead letters: p50 {:7.1} ms  p99 {:7.1} ms",
            quantile(&times, 0.5).as_secs_f64() * 1e3,
            quantile(&times, 0.99).as_secs_f64() * 1e3
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
        for q in [format!("{name}.{GROUP}"), format!("{name}.{GROUP}.dlq")] {
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
