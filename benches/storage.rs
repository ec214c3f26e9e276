//! Storage costs, measured against the same work without them (harness = false, short):
//!
//! 1. consuming: a handler writing one row per message in a transaction, without
//!    idempotency vs with the PostgreSQL inbox (worker `begin`/`complete` + `mark` in
//!    the handler's transaction), on the in-memory transport;
//! 2. outbox: enqueue (one transaction per message) vs the same plain INSERT, and the
//!    relay's drain rate (claim → publish_batch → confirm → mark sent) vs the bare
//!    `publish_batch` of the same envelopes.
//!
//! Run: `cargo bench --bench storage --all-features` (needs PostgreSQL on
//! `DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`; with the `amqp`
//! feature also RabbitMQ on `AMQP_URL` for the relay → RabbitMQ figures; with the
//! `mysql` feature the same figures on MySQL / MariaDB on `MYSQL_URL`, default
//! `mysql://root@127.0.0.1:3306/test`, after PostgreSQL's: consuming without idempotency
//! and through the inbox, and the relay beside bare confirmed publishing.
//! `BENCH_MYSQL=0` leaves them out, `BENCH_ONLY=mysql` measures them alone).

use futures::{StreamExt, future::BoxFuture};
use sqlx::{AssertSqlSafe, PgPool};
use std::{future::Future, sync::Arc, time::Duration};
use steadfast::{
    Context, Envelope, HandlerError, Message, Worker,
    idempotency::{IdempotencyStore, PostgresStore, postgres::connect},
    outbox::{OutboxSource, PostgresOutbox, Relay},
    transport::{Transport, memory::MemoryTransport},
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod support;
use serde_json::json;

const N: i64 = 10_000;
/// Rows per relay figure: enough for the relay to reach its steady state
/// (`BENCH_RELAY_ROWS` overrides it, e.g. to profile one figure for longer).
fn relay_rows() -> i64 {
    std::env::var("BENCH_RELAY_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "bench.item")]
struct Item {
    #[message(key)]
    id: i64,
}

/// How the consuming worker deduplicates.
#[derive(Clone, Copy)]
enum Dedup {
    /// No store: the handler writes its row and commits.
    None,
    /// `.idempotency(store)` (a lease around the handler) and `mark` in the handler.
    Lease,
    /// `.inbox(store)` (a look before the handler) and `mark` in the handler.
    Inbox,
}

/// Consumes `N` fresh messages (ids from `base`, so a round never meets the inbox keys
/// of an earlier one).
async fn consume<S, W, F>(store: &S, dedup: Dedup, base: i64, write: W) -> f64
where
    S: IdempotencyStore + Clone,
    W: Fn(Item, Context, Option<S>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    let inbox = match dedup {
        Dedup::None => None,
        Dedup::Lease | Dedup::Inbox => Some(store.clone()),
    };
    let broker = MemoryTransport::new();
    broker.bind("bench", ["bench.item"]);
    for id in base..base + N {
        broker
            .publish(&Envelope::encode(&Item { id }).unwrap())
            .await
            .unwrap();
    }
    let mut builder = Worker::builder(broker.clone(), "bench")
        .concurrency(16)
        .handle(move |m: Item, cx: Context| write(m, cx, inbox.clone()));
    builder = match dedup {
        Dedup::None => builder,
        Dedup::Lease => builder.idempotency(store.clone()),
        Dedup::Inbox => builder.inbox(store.clone()),
    };
    let worker = builder.build().unwrap();
    let stop = CancellationToken::new();
    let start = Instant::now();
    let task = tokio::spawn(worker.run_until(stop.clone().cancelled_owned()));
    while !broker.is_idle("bench") {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    stop.cancel();
    task.await.unwrap().unwrap();
    N as f64 / secs
}

/// The inbox and outbox of one database (`$store`, `$outbox` on `$pool`), migrated, in
/// the tables `{$base}_inbox` and `{$base}_outbox`.
macro_rules! migrated_stores {
    ($store:ident, $outbox:ident, $pool:expr, $base:expr) => {{
        let base = $base;
        let inbox = $store::new($pool.clone())
            .with_table(&format!("{base}_inbox"))
            .unwrap();
        let outbox = $outbox::new($pool.clone())
            .with_table(&format!("{base}_outbox"))
            .unwrap();
        inbox.migrate().await.unwrap();
        outbox.migrate().await.unwrap();
        (inbox, outbox)
    }};
}

/// `fn $name(pool, table)`: the handler's write on one database, its row in `table` in
/// one transaction with the inbox `mark` when there is an inbox (`$insert` the statement).
macro_rules! writer {
    ($name:ident, $pool:ty, $store:ty, $insert:literal) => {
        fn $name(
            pool: $pool,
            table: &str,
        ) -> impl Fn(Item, Context, Option<$store>) -> BoxFuture<'static, Result<(), HandlerError>>
        + Clone
        + Send
        + Sync
        + 'static {
            let sql: Arc<str> = format!($insert, table = table).into();
            move |m, cx, inbox| {
                let (pool, sql) = (pool.clone(), sql.clone());
                Box::pin(async move {
                    let mut tx = pool.begin().await?;
                    if let Some(inbox) = &inbox
                        && !inbox.mark(&mut tx, &cx).await?
                    {
                        return Ok(());
                    }
                    let q = sqlx::query(AssertSqlSafe(sql)).bind(m.id);
                    q.execute(&mut *tx).await?;
                    tx.commit().await?;
                    Ok(())
                })
            }
        }
    };
}
writer!(
    pg_write,
    PgPool,
    PostgresStore,
    "INSERT INTO {table} (id) VALUES ($1)"
);

async fn enqueue_rate(pool: &PgPool, outbox: Option<&PostgresOutbox>, schema: &str) -> f64 {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (pool, outbox, schema) = (pool.clone(), outbox.cloned(), schema.to_owned());
        tasks.push(tokio::spawn(async move {
            for id in (w..N).step_by(8) {
                let mut tx = pool.begin().await.unwrap();
                match &outbox {
                    Some(o) => {
                        o.enqueue(&mut tx, &Item { id }).await.unwrap();
                    }
                    None => {
                        let env = Envelope::encode(&Item { id }).unwrap();
                        sqlx::query(AssertSqlSafe(format!(
                            "INSERT INTO {schema}.plain (id, name, payload) VALUES ($1, $2, $3)"
                        )))
                        .bind(*env.id.as_uuid())
                        .bind(&env.name)
                        .bind(&env.payload[..])
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    }
                }
                tx.commit().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    N as f64 / start.elapsed().as_secs_f64()
}

/// How a relay figure runs: rows per batch, batches awaiting confirms, and whether sent
/// rows are kept (the default retention) or deleted at once (zero retention).
#[derive(Clone, Copy)]
struct Shape {
    batch: usize,
    in_flight: usize,
    keep: bool,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rows = if self.keep { "kept" } else { "deleted" };
        write!(
            f,
            "{} × {:<4} sent rows {rows:<7}",
            self.in_flight, self.batch
        )
    }
}

async fn relay_rate<O: OutboxSource + Clone>(
    outbox: &O,
    transport: Arc<dyn Transport>,
    shape: Shape,
    pending: &impl AsyncFn() -> bool,
) -> f64 {
    // `run_until`, as a service runs it: claims, publishes and records overlap.
    let retention = if shape.keep {
        Duration::from_secs(24 * 3600)
    } else {
        Duration::ZERO
    };
    let relay = Relay::builder(outbox.clone(), transport)
        .batch_size(shape.batch)
        .in_flight(shape.in_flight)
        .retention(retention)
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    // On stderr, for a profiler to attach to the figure.
    eprintln!("relaying: {shape}");
    let start = Instant::now();
    let task = tokio::spawn(relay.run_until(stop.clone().cancelled_owned()));
    // Done when no row is pending (claimed rows stay pending until marked sent). Asked
    // every 25 ms for the newest pending row: the relay works in sequence order, so until
    // the end that row is the first the index gives. Both earlier asks loaded the
    // database only on the relay's side of the comparison: `outbox.pending()` counts
    // every pending row (2.7–4.6 ms per ask at 20,000 rows), and `EXISTS` over pending
    // rows walked the index entries of the rows already sent first (2.3 ms per ask
    // beside RabbitMQ, 0.09 of a core, in `pg_stat_statements`).
    while pending().await {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let rate = relay_rows() as f64 / start.elapsed().as_secs_f64();
    stop.cancel();
    task.await.unwrap();
    rate
}

/// Whether `table` still has a pending row: its newest, so the relay's index gives it
/// first until the end (see `relay_rate`).
async fn has_pending<DB: sqlx::Database>(pool: &sqlx::Pool<DB>, table: &str) -> bool
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
    i64: for<'r> sqlx::Decode<'r, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let sql = format!("SELECT seq FROM {table} WHERE state = 'pending' ORDER BY seq DESC LIMIT 1");
    sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
        .fetch_optional(pool)
        .await
        .unwrap()
        .is_some()
}

/// Empties the outbox and enqueues `relay_rows()` fresh rows, 500 per transaction.
async fn drain_and_refill(pool: &PgPool, outbox: &PostgresOutbox, schema: &str) {
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM {schema}.steadfast_outbox"
    )))
    .execute(pool)
    .await
    .unwrap();
    for chunk in (0..relay_rows()).collect::<Vec<_>>().chunks(500) {
        let mut tx = pool.begin().await.unwrap();
        for &id in chunk {
            outbox.enqueue(&mut tx, &Item { id }).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
    // The table's statistics, as autovacuum on a server with default settings gathers
    // them (50 + 10 % of the rows changed, checked every minute). The servers of this
    // project run with autovacuum off, and a table never analysed gets a claim plan
    // that sorts every pending row for each claim (bitmap scan of the claim index, then
    // a sort: 6.0 ms per claim of 250 in SQL at 20,000 pending rows, against 3.2 ms
    // walking the index in order). `BENCH_STATS=none` leaves the table unanalysed, to
    // measure that.
    if std::env::var("BENCH_STATS").as_deref() == Ok("none") {
        return;
    }
    sqlx::query(AssertSqlSafe(format!("ANALYZE {}", outbox.table())))
        .execute(pool)
        .await
        .unwrap();
}

async fn raw_publish_rate(transport: &dyn Transport) -> f64 {
    let envs: Vec<Envelope> = (0..relay_rows())
        .map(|id| Envelope::encode(&Item { id }).unwrap())
        .collect();
    // Pipelined: five batches of 200 in flight, so up to 1,000 messages await their
    // confirms at once (the direct-publishing figure).
    eprintln!("publishing: {}", transport.system());
    let start = Instant::now();
    let mut batches = futures::stream::iter(envs.chunks(200))
        .map(|chunk| transport.publish_batch(chunk))
        .buffer_unordered(5);
    while let Some(results) = batches.next().await {
        for r in results {
            r.unwrap();
        }
    }
    relay_rows() as f64 / start.elapsed().as_secs_f64()
}

/// "median (min–max) unit" of `v`.
fn spread(v: &mut [f64], unit: &str) -> String {
    v.sort_by(f64::total_cmp);
    let (lo, hi, mid) = (v[0], v[v.len() - 1], v[v.len() / 2]);
    if unit == "x" {
        format!("{mid:.2}{unit} ({lo:.2}–{hi:.2})")
    } else {
        format!("{mid:>9.0} {unit} ({lo:.0}–{hi:.0})")
    }
}

/// Records one rate of the result file: `consumer` beside `baseline`, of one `round`.
fn recorder(out: &support::Results) -> impl Fn(&str, &str, &str, i64, f64) + '_ {
    move |scenario, consumer, baseline, round, rate| {
        out.record(json!({
            "scenario": scenario, "consumer": consumer, "baseline": baseline,
            "round": round + 1, "msgs_per_s": rate,
        }));
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `BENCH_ONLY=mysql` measures MySQL / MariaDB alone.
    #[cfg(feature = "mysql")]
    if std::env::var("BENCH_ONLY").as_deref() == Ok("mysql") {
        let out = support::Results::new("storage", json!({}));
        let record = recorder(&out);
        let rounds = std::env::var("BENCH_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok());
        mysql::figures(rounds.unwrap_or(3), &record).await;
        return;
    }
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let pool = connect(&url).await.expect("PostgreSQL must run");
    let schema = format!("bench_{}", uuid::Uuid::now_v7().simple());
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE SCHEMA {schema};
         CREATE TABLE {schema}.effects (id bigint NOT NULL);
         CREATE TABLE {schema}.plain (id uuid PRIMARY KEY, seq bigint GENERATED ALWAYS AS IDENTITY, name text NOT NULL, payload bytea NOT NULL);"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let (inbox, outbox) = migrated_stores!(
        PostgresStore,
        PostgresOutbox,
        pool,
        format!("{schema}.steadfast")
    );
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await
        .unwrap();
    println!("PostgreSQL {version}, {N} messages per figure, concurrency 16 / 8 producers");
    let out = support::Results::new(
        "storage",
        json!({ "postgresql": version, "rabbitmq": support::rabbitmq_version() }),
    );
    let record = recorder(&out);

    // The two sides alternate, `BENCH_ROUNDS` times (default 3), so a change in the
    // machine's load lands on both; medians with the range, and the ratio per round.
    let rounds: i64 = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    // `BENCH_ONLY=relay` measures the relay alone; `BENCH_ONLY=consume` skips it.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let effects = format!("{schema}.effects");
    let quiet = outbox.clone().with_notify(false);
    if only != "relay" {
        let mut figures: [Vec<f64>; 5] = Default::default();
        for r in 0..rounds {
            let none = consume(
                &inbox,
                Dedup::None,
                3 * r * N,
                pg_write(pool.clone(), &effects),
            )
            .await;
            let lease = consume(
                &inbox,
                Dedup::Lease,
                (3 * r + 1) * N,
                pg_write(pool.clone(), &effects),
            )
            .await;
            let look = consume(
                &inbox,
                Dedup::Inbox,
                (3 * r + 2) * N,
                pg_write(pool.clone(), &effects),
            )
            .await;
            for (name, rate) in [("no-idempotency", none), ("lease", lease), ("inbox", look)] {
                record("consume-postgres", name, "no-idempotency", r, rate);
            }
            for (i, v) in [none, lease, look, lease / none, look / none]
                .into_iter()
                .enumerate()
            {
                figures[i].push(v);
            }
        }
        let [none, lease, look, lease_x, look_x] = &mut figures;
        println!(
            "consume, tx write, no idempotency     {}",
            spread(none, "msg/s")
        );
        println!(
            "consume + mark, .idempotency (lease)  {}",
            spread(lease, "msg/s")
        );
        println!(
            "consume + mark, .inbox (look)         {}",
            spread(look, "msg/s")
        );
        println!(
            "  lease ÷ none, per round             {}",
            spread(lease_x, "x")
        );
        println!(
            "  inbox ÷ none, per round             {}",
            spread(look_x, "x")
        );

        let plain = enqueue_rate(&pool, None, &schema).await;
        let enq = enqueue_rate(&pool, Some(&outbox), &schema).await;
        println!("plain INSERT, 1 tx per row           {plain:>9.0} rows/s");
        println!(
            "outbox enqueue (+NOTIFY), 1 tx/row   {enq:>9.0} rows/s  ({:.2}x)",
            enq / plain
        );
        let enq_quiet = enqueue_rate(&pool, Some(&quiet), &schema).await;
        println!(
            "outbox enqueue, no NOTIFY, 1 tx/row  {enq_quiet:>9.0} rows/s  ({:.2}x)",
            enq_quiet / plain
        );
    }
    if only == "consume" {
        let _ = sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&pool)
            .await;
        #[cfg(feature = "mysql")]
        if std::env::var("BENCH_MYSQL").as_deref() != Ok("0") {
            mysql::figures(rounds, &record).await;
        }
        return;
    }

    let pending = async || has_pending(&pool, outbox.table()).await;
    let memory = MemoryTransport::new();
    memory.bind("bench", ["bench.item"]);
    let raw = raw_publish_rate(&memory).await;
    let memory_shape = Shape {
        batch: 500,
        in_flight: 2,
        keep: true,
    };
    println!("{} rows per relay figure", relay_rows());
    println!("memory: pipelined publish_batch      {raw:>9.0} msg/s");
    for keep in [true, false] {
        drain_and_refill(&pool, &quiet, &schema).await;
        let shape = Shape {
            keep,
            ..memory_shape
        };
        let relayed = relay_rate(&outbox, Arc::new(memory.clone()), shape, &pending).await;
        println!("memory: relay {shape}  {relayed:>9.0} msg/s");
    }
    #[cfg(feature = "amqp")]
    {
        use steadfast::transport::{Subscription, amqp::AmqpTransport};
        let url = std::env::var("AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
        let amqp = AmqpTransport::builder(url.clone())
            .queue_prefix(format!("{schema}-"))
            .queue_expiry(Duration::from_secs(600))
            .connect()
            .await
            .expect("RabbitMQ must run on AMQP_URL");
        amqp.declare(&Subscription::new("bench", ["bench.item"]))
            .await
            .unwrap();
        let amqp: Arc<dyn Transport> = Arc::new(amqp);
        // Emptied before every figure, so no side publishes into a longer queue.
        let raw_conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let raw_ch = raw_conn.create_channel().await.unwrap();
        let queue = format!("{schema}-bench");
        let sub = Subscription::new("bench", ["bench.item"]);
        let purge = || async {
            // Declared again first: publishing does not count as using a queue, and
            // RabbitMQ 3.10 stopped confirming publishes to a quorum queue that expired
            // under them (seen once here: the run hung until the publish timeout).
            amqp.declare(&sub).await.unwrap();
            raw_ch
                .queue_purge(queue.as_str().into(), Default::default())
                .await
                .unwrap();
        };
        // The relay with its defaults (2 batches of 500: 1,000 awaiting confirms, as in
        // the baseline), the same deleting sent rows at once (zero retention), and the
        // earlier default of 4 batches of 250, rows kept and deleted. (Batches of 100,
        // the default until 2026-11-24, relayed at 0.49–0.56× where 4 × 250 gave
        // 0.62–0.67× that day.)
        let shape = |batch, in_flight, keep| Shape {
            batch,
            in_flight,
            keep,
        };
        let mut shapes = vec![
            shape(500, 2, true),
            shape(500, 2, false),
            shape(250, 4, true),
            shape(250, 4, false),
        ];
        // `BENCH_SHAPES=500x2k,1000x1d` measures other shapes: rows per batch `x`
        // batches in flight, sent rows `k`ept or `d`eleted.
        if let Ok(list) = std::env::var("BENCH_SHAPES") {
            shapes = list
                .split(',')
                .map(|s| {
                    let (batch, rest) = s.split_once('x').expect("BENCH_SHAPES: 250x4k,...");
                    let (n, keep) = rest.split_at(rest.len() - 1);
                    shape(batch.parse().unwrap(), n.parse().unwrap(), keep == "k")
                })
                .collect();
        }
        let mut raws = Vec::new();
        let mut relays: Vec<Vec<f64>> = vec![Vec::new(); shapes.len()];
        let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); shapes.len()];
        // Each relay figure is paired with a bare one taken just before it, after the same
        // refill and purge, so both meet the same broker and database state (a queue
        // purged of the previous figure's messages, autovacuum after the refill).
        for r in 0..rounds {
            for (i, &shape) in shapes.iter().enumerate() {
                drain_and_refill(&pool, &quiet, &schema).await;
                purge().await;
                let raw = raw_publish_rate(&*amqp).await;
                raws.push(raw);
                purge().await;
                let relayed = relay_rate(&outbox, amqp.clone(), shape, &pending).await;
                relays[i].push(relayed);
                ratios[i].push(relayed / raw);
                // A pair per shape: its bare rate is the baseline of that shape alone.
                let name = format!(
                    "relay {}",
                    shape
                        .to_string()
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                );
                record(&name, "raw-publish", "raw-publish", r, raw);
                record(&name, "relay", "raw-publish", r, relayed);
            }
        }
        println!(
            "rabbitmq: pipelined publish_batch    {}",
            spread(&mut raws, "msg/s")
        );
        for (i, shape) in shapes.iter().enumerate() {
            println!(
                "rabbitmq: relay {shape}  {}",
                spread(&mut relays[i], "msg/s")
            );
            println!(
                "  relay ÷ bare just before it       {}",
                spread(&mut ratios[i], "x")
            );
        }
        // Deleted, not left to expire: a quorum queue that took this run's messages
        // holds broker memory until then, and later runs measured a slower broker.
        for q in [queue.clone(), format!("{queue}.dlq")] {
            raw_ch
                .queue_delete(q.as_str().into(), Default::default())
                .await
                .unwrap();
        }
        amqp.close().await;
    }

    let _ = sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&pool)
        .await;
    #[cfg(feature = "mysql")]
    if std::env::var("BENCH_MYSQL").as_deref() != Ok("0") {
        mysql::figures(rounds, &record).await;
    }
}

/// The MySQL / MariaDB figures, beside PostgreSQL's in the same run.
#[cfg(feature = "mysql")]
mod mysql {
    use super::*;
    use sqlx::MySqlPool;
    use steadfast::{idempotency::MySqlStore, outbox::MySqlOutbox};

    writer!(
        write,
        MySqlPool,
        MySqlStore,
        "INSERT INTO {table} (id) VALUES (?)"
    );

    /// Empties the outbox and enqueues `relay_rows()` fresh rows, 500 per transaction.
    async fn refill(pool: &MySqlPool, outbox: &MySqlOutbox) {
        let delete = format!("DELETE FROM {}", outbox.table());
        sqlx::query(AssertSqlSafe(delete))
            .execute(pool)
            .await
            .unwrap();
        for chunk in (0..relay_rows()).collect::<Vec<_>>().chunks(500) {
            let mut tx = pool.begin().await.unwrap();
            for &id in chunk {
                outbox.enqueue(&mut tx, &Item { id }).await.unwrap();
            }
            tx.commit().await.unwrap();
        }
    }

    /// Two rates taken side by side each round (a baseline, then the figure) and the
    /// figure's ratio to its baseline.
    struct Pair {
        scenario: String,
        names: [&'static str; 2],
        rates: [Vec<f64>; 3],
    }

    impl Pair {
        fn new(scenario: impl Into<String>, names: [&'static str; 2]) -> Self {
            Self {
                scenario: scenario.into(),
                names,
                rates: Default::default(),
            }
        }

        /// Records round `r`: `base`, then `rate` beside it.
        fn add(
            &mut self,
            r: i64,
            base: f64,
            rate: f64,
            record: &impl Fn(&str, &str, &str, i64, f64),
        ) {
            let [b, f] = self.names;
            record(&self.scenario, b, b, r, base);
            record(&self.scenario, f, b, r, rate);
            for (v, x) in self.rates.iter_mut().zip([base, rate, rate / base]) {
                v.push(x);
            }
        }

        /// The medians with their ranges, under `labels`.
        fn print(&mut self, labels: [&str; 3]) {
            for ((label, v), unit) in labels
                .iter()
                .zip(&mut self.rates)
                .zip(["msg/s", "msg/s", "x"])
            {
                println!("{label:<42} {}", spread(v, unit));
            }
        }
    }

    pub(super) async fn figures(rounds: i64, record: &impl Fn(&str, &str, &str, i64, f64)) {
        let url = std::env::var("MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned());
        let pool = steadfast::idempotency::mysql::connect(&url)
            .await
            .expect("MySQL / MariaDB must run on MYSQL_URL");
        let prefix = format!("bench_{}", uuid::Uuid::now_v7().simple());
        let version: String = sqlx::query_scalar("SELECT VERSION()")
            .fetch_one(&pool)
            .await
            .unwrap();
        let ddl = format!("CREATE TABLE {prefix}_effects (id BIGINT NOT NULL)");
        sqlx::query(AssertSqlSafe(ddl))
            .execute(&pool)
            .await
            .unwrap();
        let (inbox, outbox) = migrated_stores!(MySqlStore, MySqlOutbox, pool, &prefix);
        println!("MySQL {version}, {N} messages per figure, concurrency 16");
        let effects = format!("{prefix}_effects");

        let mut consumed = Pair::new("consume-mysql", ["no-idempotency", "inbox"]);
        for r in 0..rounds {
            let base = 2 * r * N;
            let a = consume(&inbox, Dedup::None, base, write(pool.clone(), &effects)).await;
            let b = consume(
                &inbox,
                Dedup::Inbox,
                base + N,
                write(pool.clone(), &effects),
            )
            .await;
            consumed.add(r, a, b, record);
        }
        consumed.print([
            "mysql: consume, tx write, no idempotency",
            "mysql: consume + mark, .inbox (look)",
            "mysql:   inbox ÷ none, per round",
        ]);

        let shape = Shape {
            batch: 500,
            in_flight: 2,
            keep: true,
        };
        let pending = async || has_pending(&pool, outbox.table()).await;
        let mut transports: Vec<(&str, Arc<dyn Transport>)> = Vec::new();
        let memory = MemoryTransport::new();
        memory.bind("bench", ["bench.item"]);
        transports.push(("memory", Arc::new(memory)));
        #[cfg(feature = "amqp")]
        {
            use steadfast::transport::{Subscription, amqp::AmqpTransport};
            let url = std::env::var("AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
            let amqp = AmqpTransport::builder(url)
                .queue_prefix(format!("{prefix}-"))
                .queue_expiry(Duration::from_secs(600))
                .connect()
                .await
                .expect("RabbitMQ must run on AMQP_URL");
            amqp.declare(&Subscription::new("bench", ["bench.item"]))
                .await
                .unwrap();
            transports.push(("rabbitmq", Arc::new(amqp)));
        }
        for (name, transport) in transports {
            let mut relayed = Pair::new(format!("relay-mysql {name}"), ["raw-publish", "relay"]);
            for r in 0..rounds {
                refill(&pool, &outbox).await;
                let raw = raw_publish_rate(&*transport).await;
                let relay = relay_rate(&outbox, transport.clone(), shape, &pending).await;
                relayed.add(r, raw, relay, record);
            }
            relayed.print([
                &format!("mysql: {name}: pipelined publish_batch"),
                &format!("mysql: {name}: relay {shape}"),
                "mysql:   relay ÷ bare just before it",
            ]);
            transport.close().await;
        }
        for t in ["effects", "inbox", "outbox"] {
            let drop = format!("DROP TABLE {prefix}_{t}");
            let _ = sqlx::query(AssertSqlSafe(drop)).execute(&pool).await;
        }
    }
}
