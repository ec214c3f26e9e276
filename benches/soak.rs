//! Soak: a long run of one worker with the PostgreSQL inbox on each broker, and a
//! backlog of outbox rows drained by the relay, sampling the process every few seconds:
//! resident memory, open file descriptors (and how many are sockets), the database
//! pool's connections and the throughput since the last sample.
//!
//! ```text
//! cargo bench --all-features --bench soak                      # 1,000,000 messages each
//! BENCH_SOAK_MESSAGES=100000 cargo bench --all-features --bench soak
//! BENCH_ONLY=rabbitmq|nats|relay cargo bench --all-features --bench soak
//! ```
//!
//! The worker (concurrency 100) marks the inbox key and commits in the handler's
//! transaction, as a real consumer would; every thousandth message fails once
//! (transient: retried by the broker after 100 ms) and every thousandth, offset by one,
//! fails for good (a dead letter). A feeder in the same process publishes through a
//! connection of its own in batches of 500, keeping at most 20,000 messages ahead of
//! the worker. At the end the worker must have settled every message exactly as asked:
//! n acked (the retried ones after their second attempt), n / 1000 retried, n / 1000
//! dead-lettered; the bench fails loudly otherwise.
//!
//! The relay drains `BENCH_SOAK_MESSAGES` rows written before it starts (one enqueued
//! row copied by SQL) into RabbitMQ (a classic queue of its own, bound to the
//! transport's exchange and capped at 10,000 messages, so the shared broker keeps no
//! backlog).
//!
//! The goal (`docs/benchmarks.md`): after the warm-up (the first minute, or the first
//! tenth of a shorter run) resident memory grows by less than 5 %, and the throughput
//! of the last minute stays within 10 % of the first. Samples and a summary per run go
//! to the result file (`benches/support`).

use serde_json::json;
use sqlx::{AssertSqlSafe, PgPool};
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};
use steadfast::{
    Context, Envelope, HandlerError, Message, RetryPolicy, Worker,
    idempotency::{PostgresStore, postgres::connect},
    outbox::{PostgresOutbox, Relay},
    transport::{Subscription, Transport, amqp::AmqpTransport, nats::NatsTransport},
    worker::Outcome,
};
use tokio_util::sync::CancellationToken;

mod support;
use support::{Results, env_or, fds, rss_kib};

#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "bench.soak")]
struct Item {
    #[message(key)]
    seq: u64,
    pad: String,
}

fn item(seq: u64) -> Item {
    Item {
        seq,
        pad: "x".repeat(200),
    }
}

/// Settled deliveries by outcome.
#[derive(Default)]
struct Counts {
    acked: AtomicUsize,
    retried: AtomicUsize,
    dead: AtomicUsize,
    other: AtomicUsize,
}

impl Counts {
    fn settled(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
            + self.dead.load(Ordering::Relaxed)
            + self.other.load(Ordering::Relaxed)
    }
}

/// One sample of the process, `done` messages so far.
struct Sampler<'a> {
    out: &'a Results,
    what: &'a str,
    t0: Instant,
    last: (Instant, usize),
    /// (t, RSS KiB, msgs/s, done)
    samples: Vec<(f64, u64, f64, usize)>,
}

impl<'a> Sampler<'a> {
    fn new(out: &'a Results, what: &'a str) -> Self {
        Self {
            out,
            what,
            t0: Instant::now(),
            last: (Instant::now(), 0),
            samples: Vec::new(),
        }
    }

    fn sample(&mut self, done: usize, pool: &PgPool, extra: serde_json::Value) {
        let now = Instant::now();
        let rate = (done - self.last.1) as f64 / now.duration_since(self.last.0).as_secs_f64();
        self.last = (now, done);
        let t = self.t0.elapsed().as_secs_f64();
        let (all, sockets) = fds();
        let rss = rss_kib();
        self.samples.push((t, rss, rate, done));
        println!(
            "{:<9} t {t:>6.0} s  {done:>8} done  {rate:>7.0} msg/s  RSS {:>6.1} MiB  fds {all:>3} (sockets {sockets:>3})  pool {:>2}  {extra}",
            self.what,
            rss as f64 / 1024.0,
            pool.size()
        );
        self.out.record(json!({
            "scenario": "soak", "transport": self.what, "kind": "sample", "t_s": t,
            "done": done, "msgs_per_s": rate, "rss_kib": rss, "fds": all,
            "sockets": sockets, "pool_connections": pool.size(), "extra": extra,
        }));
    }

    /// RSS growth after warm-up and the last minute's rate against the first's. Samples
    /// taken once all `n` were done (the tail's stragglers) count for memory only.
    fn summary(&self, n: usize) {
        let end = self.samples.last().map_or(0.0, |s| s.0);
        let warm = (end / 10.0).min(60.0);
        let minute = 60.0_f64.min(end / 3.0);
        let after_warm: Vec<_> = self.samples.iter().filter(|s| s.0 >= warm).collect();
        let rss_warm = after_warm.first().map_or(0, |s| s.1);
        let rss_end = self.samples.last().map_or(0, |s| s.1);
        let rss_max = after_warm.iter().map(|s| s.1).max().unwrap_or(0);
        let full: Vec<_> = after_warm.iter().filter(|s| s.3 < n).collect();
        let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let (t_first, t_last) = (
            full.first().map_or(0.0, |s| s.0),
            full.last().map_or(0.0, |s| s.0),
        );
        let first = mean(
            full.iter()
                .filter(|s| s.0 <= t_first + minute)
                .map(|s| s.2)
                .collect(),
        );
        let last = mean(
            full.iter()
                .filter(|s| s.0 >= t_last - minute)
                .map(|s| s.2)
                .collect(),
        );
        let growth = (rss_end as f64 / rss_warm.max(1) as f64 - 1.0) * 100.0;
        println!(
            "{}: {n} messages in {end:.0} s; RSS {:.1} MiB after warm-up ({warm:.0} s), {:.1} MiB at the end ({growth:+.1} %, max {:.1}); {first:.0} msg/s the first minute, {last:.0} the last ({:.2}x)",
            self.what,
            rss_warm as f64 / 1024.0,
            rss_end as f64 / 1024.0,
            rss_max as f64 / 1024.0,
            last / first
        );
        self.out.record(json!({
            "scenario": "soak", "transport": self.what, "kind": "summary", "messages": n,
            "seconds": end, "warmup_s": warm, "rss_warm_kib": rss_warm, "rss_end_kib": rss_end,
            "rss_max_kib": rss_max, "rss_growth_pct": growth, "rate_first_minute": first,
            "rate_last_minute": last, "rate_ratio": last / first,
            "msgs_per_s": n as f64 / end,
        }));
    }
}

/// Runs `n` messages through a worker with the inbox on `worker_side`, fed through
/// `feeder`, sampling every `every`.
async fn soak_worker(
    out: &Results,
    what: &str,
    pool: &PgPool,
    feeder: Arc<dyn Transport>,
    worker_side: Arc<dyn Transport>,
    n: usize,
    every: Duration,
) {
    let table = format!("bench_soak_inbox_{}", uuid::Uuid::now_v7().simple());
    let inbox = PostgresStore::new(pool.clone())
        .with_table(&table)
        .expect("table name");
    inbox.migrate().await.expect("inbox table");
    let counts = Arc::new(Counts::default());
    let (c, p, i) = (counts.clone(), pool.clone(), inbox.clone());
    let worker = Worker::builder_shared(worker_side.clone(), "soak")
        .handle(move |m: Item, cx: Context| {
            let (pool, inbox) = (p.clone(), i.clone());
            async move {
                if m.seq % 1000 == 1 && cx.attempt() == 1 {
                    return Err(HandlerError::msg("soak: fails once")
                        .retry_after(Duration::from_millis(100)));
                }
                if m.seq % 1000 == 2 {
                    return Err(HandlerError::msg("soak: fails for good").permanent());
                }
                let mut tx = pool.begin().await?;
                inbox.mark(&mut tx, &cx).await?;
                tx.commit().await?;
                Ok(())
            }
        })
        .inbox(inbox.clone())
        .retry(RetryPolicy::fixed(Duration::from_millis(100)).max_attempts(3))
        .concurrency(100)
        .on_outcome(move |p| {
            let slot = match p.outcome {
                Outcome::Acked => &c.acked,
                Outcome::Retried { .. } => &c.retried,
                Outcome::DeadLettered(_) => &c.dead,
                _ => &c.other,
            };
            slot.fetch_add(1, Ordering::Relaxed);
        })
        .build()
        .expect("valid worker");
    worker.declare().await.expect("declared");
    let stop = CancellationToken::new();
    let task = tokio::spawn(worker.run_until(stop.clone().cancelled_owned()));
    let cf = counts.clone();
    let feed = tokio::spawn(async move {
        let mut seq = 0u64;
        while (seq as usize) < n {
            while seq as usize - cf.settled() > 20_000 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let batch: Vec<Envelope> = (seq..(seq + 500).min(n as u64))
                .map(|s| Envelope::encode(&item(s)).expect("encodes"))
                .collect();
            seq += batch.len() as u64;
            for r in feeder.publish_batch(&batch).await {
                r.expect("published");
            }
        }
    });
    let mut sampler = Sampler::new(out, what);
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    let mut stalled = (0, Instant::now());
    while counts.settled() < n {
        tick.tick().await;
        let done = counts.settled();
        sampler.sample(
            done,
            pool,
            json!({"retried": counts.retried.load(Ordering::Relaxed), "dead": counts.dead.load(Ordering::Relaxed)}),
        );
        if done != stalled.0 {
            stalled = (done, Instant::now());
        }
        assert!(
            stalled.1.elapsed() < Duration::from_secs(120),
            "{what}: stuck at {done} of {n} for two minutes"
        );
    }
    feed.await.expect("feeder");
    stop.cancel();
    task.await.expect("worker task").expect("worker ran");
    sampler.summary(n);
    let expected = n / 1000 + usize::from(n % 1000 > 2);
    let (acked, retried, dead, other) = (
        counts.acked.load(Ordering::Relaxed),
        counts.retried.load(Ordering::Relaxed),
        counts.dead.load(Ordering::Relaxed),
        counts.other.load(Ordering::Relaxed),
    );
    println!("{what}: {acked} acked, {retried} retried, {dead} dead letters, {other} other");
    assert_eq!(dead, expected, "{what}: one dead letter per thousand");
    assert!(retried >= expected, "{what}: one retry per thousand");
    assert_eq!(acked + dead, n, "{what}: every message settled once");
    let _ = sqlx::query(AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(pool)
        .await;
}

/// Drains `n` outbox rows written before the relay starts.
async fn soak_relay(out: &Results, pool: &PgPool, n: usize, every: Duration) {
    let table = format!("bench_soak_outbox_{}", uuid::Uuid::now_v7().simple());
    let outbox = PostgresOutbox::new(pool.clone())
        .with_table(&table)
        .expect("table name")
        .with_notify(false);
    outbox.migrate().await.expect("outbox table");
    let mut tx = pool.begin().await.expect("begin");
    outbox.enqueue(&mut tx, &item(0)).await.expect("enqueued");
    tx.commit().await.expect("commit");
    // The rest copied from the first in one statement (ids random, not v7: the relay
    // does not read them).
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {table} (id, name, source, time, headers, payload)
         SELECT gen_random_uuid(), name, source, time, headers, payload
         FROM {table}, generate_series(2, $1)"
    )))
    .bind(i64::try_from(n).expect("fits"))
    .execute(pool)
    .await
    .expect("backlog written");
    sqlx::query(AssertSqlSafe(format!("VACUUM ANALYZE {table}")))
        .execute(pool)
        .await
        .expect("vacuum");
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let name = format!("sf-soak-{}", uuid::Uuid::now_v7().simple());
    let amqp = AmqpTransport::builder(url.clone())
        .exchange(name.clone())
        .queue_prefix(format!("{name}."))
        .queue_expiry(Duration::from_secs(120))
        .connect()
        .await
        .expect("RabbitMQ on AMQP_URL");
    // The exchange, then a capped classic queue of our own in place of the group's.
    amqp.declare(&Subscription::new("tmp", [Item::NAME]))
        .await
        .expect("declared");
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    let ch = conn.create_channel().await.expect("channel");
    let sink = format!("{name}.sink");
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-max-length".into(),
        lapin::types::AMQPValue::LongInt(10_000),
    );
    args.insert(
        "x-expires".into(),
        lapin::types::AMQPValue::LongInt(120_000),
    );
    ch.queue_declare(sink.as_str().into(), Default::default(), args)
        .await
        .expect("sink queue");
    ch.queue_bind(
        sink.as_str().into(),
        name.as_str().into(),
        Item::NAME.into(),
        Default::default(),
        Default::default(),
    )
    .await
    .expect("bound");
    for q in [format!("{name}.tmp"), format!("{name}.tmp.dlq")] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    let relay = Relay::builder(outbox.clone(), Arc::new(amqp.clone()))
        .retention(Duration::ZERO)
        .build()
        .expect("relay");
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay.run_until(stop.clone().cancelled_owned()));
    let mut sampler = Sampler::new(out, "relay");
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let pending = usize::try_from(outbox.pending().await.expect("pending")).unwrap_or(0);
        sampler.sample(n - pending, pool, json!({"pending": pending}));
        if pending == 0 {
            break;
        }
    }
    stop.cancel();
    task.await.expect("relay task");
    sampler.summary(n);
    let _ = ch
        .queue_delete(sink.as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "OK".into()).await;
    amqp.close().await;
    let _ = sqlx::query(AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(pool)
        .await;
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let n: usize = env_or("BENCH_SOAK_MESSAGES", 1_000_000);
        let every = Duration::from_secs(env_or("BENCH_SOAK_SAMPLE_SECS", 5));
        let only = std::env::var("BENCH_ONLY").unwrap_or_default();
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let pool = connect(&url).await.expect("PostgreSQL on DATABASE_URL");
        let version: String = sqlx::query_scalar("SHOW server_version")
            .fetch_one(&pool)
            .await
            .expect("version");
        let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
        let out = Results::new(
            "soak",
            json!({ "rabbitmq": support::rabbitmq_version(), "postgresql": version }),
        );
        println!("soak: {n} messages per run, a sample every {every:?}");
        if only.is_empty() || only == "rabbitmq" {
            let url = std::env::var("AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
            let name = format!("sf-soak-{}", uuid::Uuid::now_v7().simple());
            // The expiry cleans up after the run. The worker keeps its group's queues in
            // use every 40 s while it runs: the dead-letter and delay queues, only
            // published to, expired under it before it did (2 minutes into the run).
            let connect = || {
                AmqpTransport::builder(url.clone())
                    .exchange(name.clone())
                    .queue_prefix(format!("{name}."))
                    .queue_expiry(Duration::from_secs(120))
                    .connect()
            };
            let feeder: Arc<dyn Transport> = Arc::new(connect().await.expect("RabbitMQ"));
            let side: Arc<dyn Transport> = Arc::new(connect().await.expect("RabbitMQ"));
            soak_worker(
                &out,
                "rabbitmq",
                &pool,
                feeder.clone(),
                side.clone(),
                n,
                every,
            )
            .await;
            feeder.close().await;
            side.close().await;
        }
        if only.is_empty() || only == "nats" {
            let tag = uuid::Uuid::now_v7().simple().to_string();
            let stream = format!("SOAK_{tag}");
            let builder = NatsTransport::builder(&nats_url)
                .subject_prefix(format!("soak{tag}"))
                .stream(stream.clone())
                .max_age(Duration::from_secs(3600))
                .dead_letter_max_age(Duration::from_secs(3600))
                .replicas(support::nats_replicas());
            let feeder: Arc<dyn Transport> =
                Arc::new(builder.clone().connect().await.expect("NATS"));
            let side: Arc<dyn Transport> = Arc::new(builder.connect().await.expect("NATS"));
            soak_worker(&out, "nats", &pool, feeder.clone(), side.clone(), n, every).await;
            feeder.close().await;
            side.close().await;
            let js =
                async_nats::jetstream::new(async_nats::connect(&nats_url).await.expect("NATS"));
            let _ = js.delete_stream(&stream).await;
            let _ = js.delete_stream(format!("{stream}_DLQ")).await;
        }
        if only.is_empty() || only == "relay" {
            soak_relay(&out, &pool, n, every).await;
        }
    });
}
