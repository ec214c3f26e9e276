//! The `steadfast` binary, run as a process, against the local RabbitMQ and NATS with a
//! worker whose handler writes through the PostgreSQL inbox: 2,000 messages (10,000 with
//! `STEADFAST_TEST_CLI_TOTAL=10000`)
//! dead-lettered by a failing handler, grouped, shown by every selector, a dry run that
//! lists ids, a refused purge, a wrong group refused, a replay by failure group recorded
//! in the audit trail, a dead letter corrected and handled once, one purged by id, and a
//! replay killed with SIGKILL halfway then run again — every message applied exactly once.

#[path = "../amqp/raw_frames.rs"]
mod raw_frames;
mod schema;

#[cfg(feature = "console")]
mod browser;
#[cfg(feature = "console")]
mod console;
#[cfg(feature = "console")]
mod http;

use futures::future::BoxFuture;
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgPool};
use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};
use steadfast::{
    Context, Envelope, Handler, HandlerError, Message, MessageId, Worker,
    envelope::header,
    idempotency::PostgresStore,
    transport::{Transport, amqp::AmqpTransport, nats::NatsTransport},
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

const GROUP: &str = "g";

/// How many messages the scenario dead-letters, 30% of them betas: 2,000 (within the CI
/// budget), or `STEADFAST_TEST_CLI_TOTAL` (at least 100; the issue's run is 10,000).
fn total() -> usize {
    std::env::var("STEADFAST_TEST_CLI_TOTAL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
        .max(100)
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "cli.alpha")]
struct Alpha {
    n: u32,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "cli.beta")]
struct Beta {
    n: u32,
}

/// A PostgreSQL schema of its own: the inbox and the table of applied effects.
struct Pg {
    pool: PgPool,
    schema: String,
    inbox: PostgresStore,
}

impl Pg {
    async fn new() -> Self {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let pool = steadfast::idempotency::postgres::connect(&url)
            .await
            .expect("PostgreSQL must run on DATABASE_URL (default 127.0.0.1:5432, database test)");
        let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
        for sql in [
            format!("CREATE SCHEMA {schema}"),
            format!(
                "CREATE TABLE {schema}.effects (msg_id uuid NOT NULL, name text NOT NULL, n bigint NOT NULL)"
            ),
        ] {
            sqlx::query(AssertSqlSafe(sql))
                .execute(&pool)
                .await
                .unwrap();
        }
        let inbox = PostgresStore::new(pool.clone())
            .with_table(&format!("{schema}.steadfast_inbox"))
            .unwrap();
        inbox.migrate().await.unwrap();
        Self {
            pool,
            schema,
            inbox,
        }
    }

    /// (rows, distinct message ids) applied for `name` (or all).
    async fn effects(&self, name: Option<&str>) -> (i64, i64) {
        sqlx::query_as(AssertSqlSafe(format!(
            "SELECT count(*), count(DISTINCT msg_id) FROM {}.effects WHERE $1::text IS NULL OR name = $1",
            self.schema
        )))
        .bind(name)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// The `n` of every effect of message `id`.
    async fn n_of(&self, id: MessageId) -> Vec<i64> {
        let rows: Vec<(i64,)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT n FROM {}.effects WHERE msg_id = $1",
            self.schema
        )))
        .bind(*id.as_uuid())
        .fetch_all(&self.pool)
        .await
        .unwrap();
        rows.into_iter().map(|r| r.0).collect()
    }

    async fn applied_ids(&self) -> HashSet<MessageId> {
        let rows: Vec<(uuid::Uuid,)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT msg_id FROM {}.effects",
            self.schema
        )))
        .fetch_all(&self.pool)
        .await
        .unwrap();
        rows.into_iter().map(|r| MessageId::from(r.0)).collect()
    }

    async fn drop_schema(self) {
        let _ = sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA {} CASCADE",
            self.schema
        )))
        .execute(&self.pool)
        .await;
        self.pool.close().await;
    }
}

/// (attempt, replay count header, audit id header) of one delivery.
type Seen = (u32, Option<String>, Option<String>);

/// Fails every message until fixed; then applies it through the inbox, once.
#[derive(Clone)]
struct Apply {
    fixed: Arc<AtomicBool>,
    pool: PgPool,
    inbox: PostgresStore,
    schema: String,
    calls: Arc<AtomicI64>,
    in_flight: Arc<AtomicI64>,
    /// (attempt, replay count) of every delivery handled after the fix.
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Apply {
    async fn apply(&self, n: u32, cx: &Context) -> Result<(), HandlerError> {
        if !self.fixed.load(Ordering::SeqCst) {
            // The id makes every reason different; the failure group masks it.
            return Err(
                HandlerError::msg(format!("handler bug: cannot apply {}", cx.id())).permanent(),
            );
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.seen.lock().unwrap().push((
            cx.attempt(),
            cx.headers().get(header::REPLAY_COUNT).map(str::to_owned),
            cx.headers().get(header::AUDIT_ID).map(str::to_owned),
        ));
        let mut tx = self.pool.begin().await?;
        if !self.inbox.mark(&mut tx, cx).await? {
            return Ok(());
        }
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {}.effects (msg_id, name, n) VALUES ($1, $2, $3)",
            self.schema
        )))
        .bind(*cx.id().as_uuid())
        .bind(cx.name())
        .bind(i64::from(n))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn guarded(&self, n: u32, cx: &Context) -> Result<(), HandlerError> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let r = self.apply(n, cx).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        r
    }
}

impl Handler<Alpha> for Apply {
    async fn handle(&self, m: Alpha, cx: Context) -> Result<(), HandlerError> {
        self.guarded(m.n, &cx).await
    }
}

impl Handler<Beta> for Apply {
    async fn handle(&self, m: Beta, cx: Context) -> Result<(), HandlerError> {
        self.guarded(m.n, &cx).await
    }
}

/// One broker under test: a transport for the worker and the CLI arguments that reach
/// the same names.
struct Broker {
    transport: Arc<dyn Transport>,
    args: Vec<String>,
    cleanup: Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>,
}

fn unique() -> String {
    format!("sfcli{}", uuid::Uuid::now_v7().simple())
}

async fn rabbitmq() -> Broker {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let name = unique();
    let t = AmqpTransport::builder(url.clone())
        .exchange(name.clone())
        .queue_prefix(format!("{name}."))
        .queue_expiry(Duration::from_secs(300))
        .connect()
        .await
        .expect("RabbitMQ must be running on AMQP_URL (default 127.0.0.1:5672)");
    Broker {
        transport: Arc::new(t),
        args: vec![
            "--url".into(),
            url,
            "--exchange".into(),
            name.clone(),
            "--queue-prefix".into(),
            format!("{name}."),
        ],
        cleanup: Box::new(|| Box::pin(async {})),
    }
}

async fn nats() -> Broker {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let u = unique();
    let stream = format!("SFTEST_{}", u.to_uppercase());
    let t = NatsTransport::builder(&url)
        .subject_prefix(u.clone())
        .stream(stream.clone())
        .max_age(Duration::from_secs(3600))
        .dead_letter_max_age(Duration::from_secs(3600))
        .connect()
        .await
        .expect("a nats-server with JetStream on NATS_URL (default 127.0.0.1:4222)");
    let cleanup_url = url.clone();
    let cleanup_stream = stream.clone();
    Broker {
        transport: Arc::new(t),
        args: vec![
            "--url".into(),
            url,
            "--subject-prefix".into(),
            u,
            "--stream".into(),
            stream,
        ],
        cleanup: Box::new(move || {
            Box::pin(async move {
                if let Ok(c) = async_nats::connect(cleanup_url).await {
                    let js = async_nats::jetstream::new(c);
                    let _ = js.delete_stream(&cleanup_stream).await;
                    let _ = js.delete_stream(format!("{cleanup_stream}_DLQ")).await;
                }
            })
        }),
    }
}

/// The binary under test: Cargo's, or `STEADFAST_TEST_BIN` when set (a copy taken right
/// after the build, where several checkouts share one target directory).
fn steadfast_bin() -> String {
    std::env::var("STEADFAST_TEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_steadfast").to_owned())
}

/// A running `steadfast console` and what it wrote to standard error.
#[cfg(feature = "console")]
struct ConsoleProcess {
    child: tokio::process::Child,
    err: tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    log: Vec<String>,
}

#[cfg(feature = "console")]
impl ConsoleProcess {
    /// `steadfast console` over `b`'s `GROUP` on `127.0.0.1:port` with `token` and the
    /// `extra` arguments, once it says it listens.
    async fn start(b: &Broker, port: u16, token: &str, extra: &[&std::ffi::OsStr]) -> Self {
        let mut child = tokio::process::Command::new(steadfast_bin())
            .arg("console")
            .args(["--group", GROUP, "--listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .args(&b.args)
            .env_remove("AMQP_URL")
            .env_remove("NATS_URL")
            .env_remove("DATABASE_URL")
            .env("STEADFAST_CONSOLE_TOKEN", token)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the console");
        let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut log = Vec::new();
        loop {
            let Some(line) = err.next_line().await.unwrap() else {
                panic!("the console did not start: {log:?}");
            };
            let up = line.contains("steadfast console on");
            log.push(line);
            if up {
                return Self { child, err, log };
            }
        }
    }

    /// Stops it: everything it wrote to standard error.
    async fn stop(mut self) -> Vec<String> {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        while let Ok(Some(line)) = self.err.next_line().await {
            self.log.push(line);
        }
        self.log
    }
}

/// The process's Prometheus recorder, installed once (before any worker is built).
#[cfg(feature = "console")]
fn prometheus() -> steadfast::http::Prometheus {
    static P: std::sync::OnceLock<steadfast::http::Prometheus> = std::sync::OnceLock::new();
    P.get_or_init(|| steadfast::http::Prometheus::install().expect("the recorder installs"))
        .clone()
}

/// An operations server watching `status` with the process's metrics, on a free loopback
/// port: its URL, and the token that stops it.
#[cfg(feature = "console")]
async fn ops_server(status: steadfast::worker::StatusHandle) -> (String, CancellationToken) {
    let server = steadfast::http::OpsServer::new()
        .watch(status)
        .prometheus(prometheus())
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .expect("the ops server binds");
    let url = format!("http://{}", server.local_addr());
    let stop = CancellationToken::new();
    tokio::spawn(server.serve_until(stop.clone().cancelled_owned()));
    (url, stop)
}

/// What a run of the binary printed.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn cli(b: &Broker, args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(steadfast_bin());
    c.arg("dlq")
        .args(args)
        .args(&b.args)
        .env_remove("AMQP_URL")
        .env_remove("NATS_URL")
        .env_remove("DATABASE_URL")
        .env_remove("STEADFAST_DATABASE_URL")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    c
}

async fn run(b: &Broker, args: &[&str]) -> Run {
    let out = cli(b, args)
        .output()
        .await
        .expect("the steadfast binary runs");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs a command that prints JSON and must succeed.
async fn json(b: &Broker, args: &[&str]) -> Value {
    let r = run(b, args).await;
    assert!(r.ok, "{args:?} failed: {}\n{}", r.stdout, r.stderr);
    serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("{args:?} --json prints JSON ({e}): {}", r.stdout))
}

/// `dlq list GROUP --json`.
async fn list(b: &Broker) -> Value {
    json(b, &["list", GROUP, "--json"]).await
}

/// How many dead letters the group has (the queue's or stream's own count).
async fn count(b: &Broker) -> u64 {
    b.transport.dead_letter_count(GROUP).await.expect("count")
}

fn ids_of(v: &Value) -> HashSet<MessageId> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|i| i.as_str().unwrap().parse().unwrap())
        .collect()
}

async fn wait_for<F: std::future::Future<Output = bool>>(what: &str, mut cond: impl FnMut() -> F) {
    let start = Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("waited {:?} for {what}", start.elapsed());
}

/// The dead-letter count once the broker has put back what a finished command held.
/// RabbitMQ returns the messages that a closed channel or a dead connection held unacked
/// after the command has gone (a quorum queue through its log), so a count read at once
/// can be short: wait until two reads 300 ms apart agree.
async fn settled_count(b: &Broker) -> u64 {
    let start = Instant::now();
    let first = count(b).await;
    let mut last = first;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = count(b).await;
        if now == last {
            if now != first {
                eprintln!(
                    "dead-letter count settled from {first} to {now} in {:?}",
                    start.elapsed()
                );
            }
            return now;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the dead-letter count does not settle: {first}, then {last}, then {now}"
        );
        last = now;
    }
}

/// Declares the worker's topology and runs it in the background until `stop` is
/// cancelled.
async fn start(worker: Worker) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    worker.declare().await.expect("declare");
    let stop = CancellationToken::new();
    let token = stop.clone();
    let running = tokio::spawn(async move {
        worker
            .run_until(async move { token.cancelled().await })
            .await
            .expect("worker ran");
    });
    (stop, running)
}

async fn scenario(b: Broker) {
    let pg = Pg::new().await;
    let apply = Apply {
        fixed: Arc::default(),
        pool: pg.pool.clone(),
        inbox: pg.inbox.clone(),
        schema: pg.schema.clone(),
        calls: Arc::default(),
        in_flight: Arc::default(),
        seen: Arc::default(),
    };
    let dead = Arc::new(AtomicI64::new(0));
    let dead_count = dead.clone();
    let worker = Worker::builder_shared(b.transport.clone(), GROUP)
        .handle::<Alpha, _>(apply.clone())
        .handle::<Beta, _>(apply.clone())
        .concurrency(16)
        .on_outcome(move |p| {
            if matches!(p.outcome, steadfast::worker::Outcome::DeadLettered(_)) {
                dead_count.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .expect("valid worker");
    let (stop, running) = start(worker).await;

    // The messages, 70% alpha and 30% beta, all dead-lettered by the broken handler.
    let (n_total, n_betas) = (total(), total() * 3 / 10);
    let stall = (n_total - n_betas) / 3;
    let mut envs = Vec::with_capacity(n_total);
    for n in 0..n_total as u32 {
        envs.push(if (n as usize) < n_betas {
            Envelope::encode(&Beta { n }).unwrap()
        } else {
            Envelope::encode(&Alpha { n }).unwrap()
        });
    }
    // The one edited below carries a header the edit removes.
    envs[n_betas].headers.insert("x-bad", "1");
    let betas: HashSet<MessageId> = envs[..n_betas].iter().map(|e| e.id).collect();
    let all: HashSet<MessageId> = envs.iter().map(|e| e.id).collect();
    for chunk in envs.chunks(100) {
        for r in b.transport.publish_batch(chunk).await {
            r.expect("published");
        }
    }
    wait_for("every message dead-lettered", || {
        let n = dead.load(Ordering::SeqCst);
        async move { n == n_total as i64 }
    })
    .await;

    // A wrong group is an error, not "0 dead letters".
    for cmd in ["list", "groups", "replay"] {
        let w = run(&b, &[cmd, "no-such-group"]).await;
        assert!(!w.ok, "{cmd} of a wrong group must fail: {}", w.stdout);
        assert!(w.stderr.contains("no-such-group"), "{}", w.stderr);
    }

    // Failure groups: the ids in the reasons are masked, so one group per message name.
    let g = json(&b, &["groups", GROUP, "--json"]).await;
    let groups = g["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{g}");
    let by_name = |name: &str| {
        groups
            .iter()
            .find(|x| x["name"] == name)
            .unwrap_or_else(|| panic!("no group of {name}: {g}"))
            .clone()
    };
    let (alpha_g, beta_g) = (by_name("cli.alpha"), by_name("cli.beta"));
    assert_eq!(alpha_g["count"], n_total - n_betas);
    assert_eq!(beta_g["count"], n_betas);
    assert_eq!(beta_g["kind"], "permanent");
    assert_eq!(beta_g["reason"], "handler bug: cannot apply <uuid>");
    assert!(beta_g["first_failed_at"].is_string() && beta_g["last_failed_at"].is_string());
    let beta_fp = beta_g["fingerprint"].as_str().unwrap().to_owned();

    // `show` prints the failure facts and the body, and reads only what it shows.
    let s = run(&b, &["show", GROUP, "--limit", "1"]).await;
    assert!(s.ok, "{}", s.stderr);
    for needle in [
        "handler bug",
        "attempts:",
        "original destination:",
        "failed at:",
        "\"n\":",
    ] {
        assert!(
            s.stdout.contains(needle),
            "`{needle}` missing in:\n{}",
            s.stdout
        );
    }
    // Every selector, on `show` and `list`.
    let an_hour_on =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(3600))
            .to_string();
    let beta_id = envs[7].id.to_string();
    for (args, n, name) in [
        (
            vec!["--name", "cli.beta", "--limit", "3"],
            3,
            Some("cli.beta"),
        ),
        (
            vec!["--group-id", &beta_fp[..8], "--limit", "2"],
            2,
            Some("cli.beta"),
        ),
        (vec!["--reason", "HANDLER BUG", "--limit", "4"], 4, None),
        (
            vec!["--since", "1h", "--until", &an_hour_on, "--limit", "2"],
            2,
            None,
        ),
        (vec!["--id", &beta_id], 1, Some("cli.beta")),
    ] {
        let v = json(&b, &[&["show", GROUP, "--json"][..], &args].concat()).await;
        let shown = v.as_array().unwrap();
        assert_eq!(shown.len(), n, "{args:?}: {v}");
        if let Some(name) = name {
            assert!(shown.iter().all(|d| d["name"] == name), "{args:?}: {v}");
        }
    }
    let one = json(&b, &["show", GROUP, "--json", "--id", &beta_id]).await;
    assert_eq!(one[0]["id"], beta_id);
    assert!(one[0]["reason"].as_str().unwrap().contains(&beta_id));
    let l = json(&b, &["list", GROUP, "--json", "--name", "cli.beta"]).await;
    assert_eq!(l["total"], n_betas);
    assert_eq!(l["by_kind"]["permanent"], n_betas);
    assert!(l["oldest"].is_string() && l["newest"].is_string(), "{l}");

    // A dry run lists exactly the ids it would touch and changes nothing.
    let d = json(
        &b,
        &[
            "replay",
            GROUP,
            "--group-id",
            &beta_fp,
            "--dry-run",
            "--json",
        ],
    )
    .await;
    assert_eq!(d["count"], n_betas);
    assert_eq!(ids_of(&d["ids"]), betas);
    assert_eq!(settled_count(&b).await, n_total as u64);

    // Purge without --yes and without a terminal refuses and deletes nothing.
    let p = run(&b, &["purge", GROUP, "--name", "cli.beta"]).await;
    assert!(!p.ok, "purge without --yes must fail: {}", p.stdout);
    assert!(p.stderr.contains("refusing"), "{}", p.stderr);
    assert_eq!(settled_count(&b).await, n_total as u64);
    assert_eq!(apply.calls.load(Ordering::SeqCst), 0);

    // The fix is deployed; replay the betas' failure group: exactly those are handled,
    // once, and the replay is in the audit trail.
    let db_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let audit_table = format!("{}.steadfast_audit", pg.schema);
    let audited = |args: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        v.extend(
            [
                "--database-url",
                &db_url,
                "--audit-table",
                &audit_table,
                "--actor",
                "tester",
            ]
            .map(str::to_owned),
        );
        v
    };
    apply.fixed.store(true, Ordering::SeqCst);
    let args = audited(&["replay", GROUP, "--group-id", &beta_fp, "--json"]);
    let r = json(&b, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(
        (r["done"].as_u64(), r["failed"].as_u64()),
        (Some(n_betas as u64), Some(0))
    );
    assert_eq!(ids_of(&r["ids"]), betas);
    wait_for("the betas applied", || async {
        pg.effects(None).await.1 == n_betas as i64
    })
    .await;
    assert_eq!(settled_count(&b).await, (n_total - n_betas) as u64);
    assert_eq!(pg.applied_ids().await, betas);
    assert_eq!(
        pg.effects(Some("cli.beta")).await,
        (n_betas as i64, n_betas as i64)
    );
    assert_eq!(
        apply.calls.load(Ordering::SeqCst),
        n_betas as i64,
        "each beta handled once"
    );
    let args = audited(&["history", GROUP, "--json"]);
    let h = json(&b, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let rec = &h[0];
    assert_eq!(rec["action"], "replay", "{h}");
    assert_eq!(rec["actor"], "tester");
    assert_eq!(rec["selection"]["group_ids"][0], beta_fp.as_str());
    assert_eq!(ids_of(&rec["ids"]), betas);
    assert_eq!(rec["outcome"]["done"], n_betas);
    let audit_id = rec["id"].as_str().unwrap().to_owned();
    assert!(
        apply
            .seen
            .lock()
            .unwrap()
            .iter()
            .all(|s| s.2.as_deref() == Some(audit_id.as_str())),
        "each replayed copy carries its audit record's id"
    );

    // Edit and retry: one alpha's body corrected; the copy (a new id) is handled once
    // and the dead letter is gone; the original id is never applied.
    let edited = envs[n_betas].id;
    let body = std::env::temp_dir().join(format!("{}.json", unique()));
    std::fs::write(&body, br#"{"n": 424242}"#).unwrap();
    let body_arg = body.to_string_lossy().into_owned();
    let edited_arg = edited.to_string();
    // Headers set and removed, as a dry run: the copy it would send, nothing changed.
    let header_of = |v: &Value, k: &str| {
        v["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p[0] == k)
            .map(|p| p[1].as_str().unwrap().to_owned())
    };
    let shown = json(&b, &["show", GROUP, "--id", &edited_arg, "--json"]).await;
    let shown = if shown.is_array() {
        shown[0].clone()
    } else {
        shown
    };
    assert_eq!(header_of(&shown, "x-bad").as_deref(), Some("1"), "{shown}");
    let d = json(
        &b,
        &[
            "edit",
            GROUP,
            "--id",
            &edited_arg,
            "--header",
            "tenant=acme",
            "--remove-header",
            "x-bad",
            "--dry-run",
            "--json",
        ],
    )
    .await;
    assert_eq!(d["dry_run"], true, "{d}");
    assert_eq!(
        header_of(&d["message"], "tenant").as_deref(),
        Some("acme"),
        "{d}"
    );
    assert_eq!(header_of(&d["message"], "x-bad"), None, "{d}");
    let args = audited(&[
        "edit",
        GROUP,
        "--id",
        &edited_arg,
        "--body",
        &body_arg,
        "--json",
    ]);
    let e = json(&b, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let _ = std::fs::remove_file(&body);
    assert_eq!(e["done"], 1, "{e}");
    let new_id: MessageId = e["new_id"].as_str().unwrap().parse().unwrap();
    assert_ne!(new_id, edited);
    wait_for("the corrected copy applied", || async {
        pg.applied_ids().await.contains(&new_id)
    })
    .await;
    assert_eq!(
        pg.n_of(new_id).await,
        vec![424_242],
        "applied once, with the new body"
    );
    assert_eq!(settled_count(&b).await, (n_total - n_betas - 1) as u64);
    let gone = run(&b, &["show", GROUP, "--id", &edited_arg]).await;
    assert!(!gone.ok, "the original is gone: {}", gone.stdout);
    let args = audited(&["history", GROUP, "--json", "--limit", "1"]);
    let h = json(&b, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(h[0]["action"], "edit");
    assert_eq!(h[0]["ids"][0], edited_arg.as_str());
    assert_eq!(h[0]["outcome"]["new_id"], new_id.to_string());

    // Purge one by id, with JSON: exactly that one.
    let purged = envs[n_betas + 1].id;
    let purged_arg = purged.to_string();
    let p = json(
        &b,
        &["purge", GROUP, "--id", &purged_arg, "--yes", "--json"],
    )
    .await;
    assert_eq!(ids_of(&p["ids"]), HashSet::from([purged]));
    assert_eq!(settled_count(&b).await, (n_total - n_betas - 2) as u64);

    // Replay the rest, SIGKILL it after a third are done (more are in flight), run it again.
    let mut child = cli(&b, &["replay", GROUP])
        .env("STEADFAST_TEST_STALL_AFTER", stall.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the replay");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("the replay stalls before it ends");
        if line.contains(&format!("stalled after {stall}")) {
            break;
        }
    }
    child.start_kill().expect("SIGKILL");
    let status = child.wait().await.unwrap();
    assert!(!status.success(), "killed: {status:?}");
    // The kill came before the end. (On RabbitMQ's quorum dead-letter queue, acks still
    // on their way when the connection dies may be lost: those dead letters stay and are
    // replayed again below, their duplicates absorbed by the inbox.)
    let left = settled_count(&b).await;
    assert!(
        left > 0 && left <= (n_total - n_betas - 2) as u64,
        "the kill came before the end: {left} dead letters left"
    );
    let r = run(&b, &["replay", GROUP]).await;
    assert!(r.ok, "second replay failed: {}\n{}", r.stdout, r.stderr);

    // Every message applied exactly once; duplicates of what was in flight absorbed.
    let mut expected = all.clone();
    expected.remove(&edited);
    expected.remove(&purged);
    expected.insert(new_id);
    wait_for("every message applied", || async {
        pg.effects(None).await.1 == expected.len() as i64
    })
    .await;
    wait_for("the worker to go quiet", || async {
        let before = apply.calls.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(500)).await;
        apply.in_flight.load(Ordering::SeqCst) == 0 && apply.calls.load(Ordering::SeqCst) == before
    })
    .await;
    let left = settled_count(&b).await;
    if left > 0 {
        let applied = pg.applied_ids().await;
        for d in b.transport.dead_letters(GROUP, 20).await.expect("read") {
            eprintln!(
                "left: {} applied={} reason={:?} attempts={} headers={:?}",
                d.id(),
                applied.contains(&d.id()),
                d.reason,
                d.attempts,
                d.envelope.headers
            );
        }
    }
    assert_eq!(left, 0, "dead letters left after the second replay");
    assert_eq!(
        pg.effects(None).await,
        (expected.len() as i64, expected.len() as i64),
        "none applied twice"
    );
    assert_eq!(pg.applied_ids().await, expected, "none lost");
    let seen = apply.seen.lock().unwrap().clone();
    assert!(seen.len() >= expected.len());
    assert!(
        seen.iter()
            .all(|(attempt, count, _)| *attempt == 1 && count.as_deref() == Some("1")),
        "replays reset the attempt and record the replay"
    );

    stop.cancel();
    running.await.unwrap();
    b.transport.close().await;
    (b.cleanup)().await;
    pg.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_replay_with_filter_and_after_sigkill() {
    scenario(rabbitmq().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_replay_with_filter_and_after_sigkill() {
    scenario(nats().await).await;
}

/// `outbox status` and `outbox retry-parked` on a PostgreSQL, a MariaDB and a SQLite
/// outbox, each with its audit trail in the same database.
#[tokio::test]
async fn outbox_status_and_retry_parked() {
    use steadfast::outbox::{MySqlOutbox, PostgresOutbox, SqliteOutbox};

    async fn outbox(args: &[&str]) -> Run {
        let out = tokio::process::Command::new(steadfast_bin())
            .arg("outbox")
            .args(args)
            .env_remove("DATABASE_URL")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .expect("the steadfast binary runs");
        Run {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    async fn check(db: &[&str], parked: MessageId) {
        let s = outbox(&[&["status", "--json"][..], db].concat()).await;
        assert!(s.ok, "{}", s.stderr);
        let v: Value = serde_json::from_str(&s.stdout).unwrap();
        assert_eq!(
            (v["pending"].as_i64(), v["parked"].as_i64()),
            (Some(2), Some(1)),
            "{v}"
        );
        assert!(v["oldest_pending_age_seconds"].as_f64().unwrap() >= 0.0);
        // Parked rows with their errors, and a dry run that lists their ids.
        let p = outbox(&[&["parked", "--json", "--error", "NO ROUTE"][..], db].concat()).await;
        assert!(p.ok, "{}", p.stderr);
        let v: Value = serde_json::from_str(&p.stdout).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
        assert_eq!(v[0]["id"], parked.to_string());
        assert_eq!(v[0]["error"], "no route");
        let p = outbox(&[&["parked", "--json", "--name", "other"][..], db].concat()).await;
        assert_eq!(p.stdout.trim(), "[]");
        let d = outbox(&[&["retry-parked", "--dry-run", "--json"][..], db].concat()).await;
        let v: Value = serde_json::from_str(&d.stdout).unwrap();
        assert_eq!(v["ids"][0], parked.to_string(), "{v}");
        let r = outbox(&[&["retry-parked"][..], db].concat()).await;
        assert!(r.ok, "{}", r.stderr);
        assert!(r.stdout.contains("requeued 1 parked row"), "{}", r.stdout);
        let s = outbox(&[&["status", "--json"][..], db].concat()).await;
        let v: Value = serde_json::from_str(&s.stdout).unwrap();
        assert_eq!(
            (v["pending"].as_i64(), v["parked"].as_i64()),
            (Some(3), Some(0)),
            "{v}"
        );
        // Requeueing or deleting a row that is not parked is reported and fails.
        let id = parked.to_string();
        let r = outbox(&[&["retry-parked", "--id", id.as_str()][..], db].concat()).await;
        assert!(!r.ok && r.stdout.contains("not parked"), "{}", r.stdout);
        let r = outbox(&[&["delete-parked", "--yes", "--id", id.as_str()][..], db].concat()).await;
        assert!(!r.ok && r.stdout.contains("not parked"), "{}", r.stdout);
        // Each action is in the audit trail.
        let mut audit_db = Vec::new();
        let mut it = db.iter();
        while let Some(a) = it.next() {
            if *a == "--table" {
                it.next();
            } else {
                audit_db.push(*a);
            }
        }
        let h = tokio::process::Command::new(steadfast_bin())
            .args([&["dlq", "history", "--json"][..], &audit_db].concat())
            .env_remove("DATABASE_URL")
            .output()
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&h.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&h.stderr)));
        let actions: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["action"].as_str().unwrap())
            .collect();
        assert_eq!(
            actions,
            ["delete-parked", "retry-parked", "retry-parked"],
            "{v}"
        );
        assert_eq!(v[2]["ids"][0], id);
    }

    // Three rows in one transaction of `$pool`, the last parked as the relay parks a row
    // that keeps failing: `$park` is the UPDATE (its id placeholder last), `$id` makes the
    // value bound to it from the row's id. Evaluates to that id.
    macro_rules! three_rows_last_parked {
        ($outbox:expr, $pool:expr, $park:expr, $id:expr) => {{
            let mut tx = $pool.begin().await.unwrap();
            let mut parked = None;
            for n in 0..3 {
                parked = Some($outbox.enqueue(&mut tx, &Alpha { n }).await.unwrap());
            }
            tx.commit().await.unwrap();
            let parked: MessageId = parked.unwrap();
            sqlx::query(AssertSqlSafe($park))
                .bind(($id)(parked))
                .execute(&$pool)
                .await
                .unwrap();
            parked
        }};
    }

    // PostgreSQL, in a schema of its own.
    let pg = Pg::new().await;
    let table = format!("{}.steadfast_outbox", pg.schema);
    let o = PostgresOutbox::new(pg.pool.clone())
        .with_table(&table)
        .unwrap();
    o.migrate().await.unwrap();
    let parked = three_rows_last_parked!(
        o,
        pg.pool,
        format!(
            "UPDATE {table} SET state = 'parked', attempts = 9, last_error = 'no route' WHERE id = $1"
        ),
        |id: MessageId| *id.as_uuid()
    );
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let audit = format!("{}.steadfast_audit", pg.schema);
    check(
        &[
            "--database-url",
            &url,
            "--table",
            &table,
            "--audit-table",
            &audit,
        ],
        parked,
    )
    .await;
    pg.drop_schema().await;

    // MySQL / MariaDB, in tables of their own.
    let url = std::env::var("MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned());
    let pool = steadfast::idempotency::mysql::connect(&url)
        .await
        .expect("MariaDB must run on MYSQL_URL (default 127.0.0.1:3306, database test)");
    let prefix = format!("cli_{}", uuid::Uuid::now_v7().simple());
    let (table, audit) = (format!("{prefix}_outbox"), format!("{prefix}_audit"));
    let o = MySqlOutbox::new(pool.clone()).with_table(&table).unwrap();
    o.migrate().await.unwrap();
    let parked = three_rows_last_parked!(
        o,
        pool,
        format!(
            "UPDATE {table} SET state = 'parked', attempts = 9, last_error = 'no route' WHERE id = ?"
        ),
        |id: MessageId| id.to_string()
    );
    let args = [
        "--database-url",
        &url,
        "--table",
        &table,
        "--audit-table",
        &audit,
    ];
    check(&args, parked).await;
    for t in [&table, &audit] {
        let _ = sqlx::query(AssertSqlSafe(format!("DROP TABLE {t}")))
            .execute(&pool)
            .await;
    }

    // SQLite, in a file of its own.
    let path = std::env::temp_dir().join(format!(
        "steadfast-cli-{}.db",
        uuid::Uuid::now_v7().simple()
    ));
    let pool = steadfast::idempotency::sqlite::open(&path).await.unwrap();
    let o = SqliteOutbox::new(pool.clone());
    o.migrate().await.unwrap();
    let parked = three_rows_last_parked!(
        o,
        pool,
        "UPDATE steadfast_outbox SET state = 'parked', attempts = 9, last_error = 'no route' WHERE id = ?1",
        |id: MessageId| id.to_string()
    );
    let p = path.to_string_lossy().into_owned();
    check(&["--sqlite", &p], parked).await;
    // Parked again, then deleted by selection: gone for good, and recorded.
    sqlx::query(
        "UPDATE steadfast_outbox SET state = 'parked', last_error = 'no route' WHERE id = ?1",
    )
    .bind(parked.to_string())
    .execute(&pool)
    .await
    .unwrap();
    let r = outbox(&[
        "delete-parked",
        "--yes",
        "--json",
        "--error",
        "route",
        "--sqlite",
        &p,
    ])
    .await;
    assert!(r.ok, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["ids"][0], parked.to_string(), "{v}");
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM steadfast_outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 2, "the parked row is deleted, the pending ones stay");
    pool.close().await;
    let _ = std::fs::remove_file(&path);
}

#[derive(Debug, serde::Serialize, serde::Deserialize, schemars::JsonSchema, Message)]
#[message(name = "docs.placed", schema)]
struct Placed {
    /// The order.
    order_id: u64,
    lines: Vec<Line>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
struct Line {
    sku: String,
    qty: u32,
}

/// Every `$ref` in `v` points at something in `root`.
fn refs_resolve(root: &Value, v: &Value) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                let ptr = r.strip_prefix('#').expect("local ref");
                assert!(root.pointer(ptr).is_some(), "dangling $ref {r}");
            }
            m.values().for_each(|x| refs_resolve(root, x));
        }
        Value::Array(a) => a.iter().for_each(|x| refs_resolve(root, x)),
        _ => {}
    }
}

/// `steadfast completions bash` (as the docs install it) prints a completion script that
/// knows the subcommands; a shell it does not know is refused.
#[test]
fn completions_print_a_script() {
    let out = std::process::Command::new(steadfast_bin())
        .args(["completions", "bash"])
        .output()
        .expect("the steadfast binary runs");
    assert!(out.status.success());
    let script = String::from_utf8_lossy(&out.stdout);
    for word in [
        "_steadfast()",
        "complete -F _steadfast",
        "dlq",
        "replay",
        "--group-id",
    ] {
        assert!(script.contains(word), "no {word} in the bash script");
    }
    let bad = std::process::Command::new(steadfast_bin())
        .args(["completions", "cmd.exe"])
        .output()
        .expect("the steadfast binary runs");
    assert!(!bad.status.success());
}

/// The AsyncAPI document of a worker validates against the AsyncAPI 3.0 JSON Schema
/// (checked by Python's `jsonschema`, draft 7, against the published schema kept beside
/// this test), and says what a reader needs.
#[test]
fn asyncapi_document_validates() {
    use std::io::Write as _;
    let builder = Worker::builder(
        steadfast::transport::memory::MemoryTransport::new(),
        "billing",
    )
    .handle(|_: Placed, _cx: Context| async { Ok::<(), HandlerError>(()) })
    .handle(|_: Alpha, _cx: Context| async { Ok::<(), HandlerError>(()) });
    let doc = steadfast::asyncapi::Document::from_worker("Billing", "1.2.3", &builder).to_json();
    refs_resolve(&doc, &doc);
    let placed = &doc["components"]["messages"]["docs.placed"]["payload"];
    assert_eq!(
        placed["properties"]["lines"]["items"]["properties"]["qty"]["type"],
        "integer"
    );
    assert_eq!(
        doc["components"]["messages"]["cli.alpha"]["payload"],
        serde_json::json!({})
    );
    assert_eq!(
        doc["operations"]["billing.receive.docs.placed"]["action"],
        "receive"
    );
    assert_eq!(doc["operations"]["billing.dead-letter"]["action"], "send");
    let dl = &doc["components"]["messages"]["docs.placed.dead-letter"]["headers"]["properties"];
    for h in [
        header::DEAD_LETTER_REASON,
        header::ERROR_KIND,
        header::ATTEMPTS,
        header::FAILED_AT,
    ] {
        assert!(dl.get(h).is_some(), "failure header {h} documented");
    }

    let schema = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cli/asyncapi-3.0.0.json");
    let check = |doc: &Value| -> String {
        let mut py = std::process::Command::new("python3")
            .args([
                "-c",
                "import json, sys, jsonschema\n\
                 schema = json.load(open(sys.argv[1]))\n\
                 doc = json.load(sys.stdin)\n\
                 errs = list(jsonschema.Draft7Validator(schema).iter_errors(doc))\n\
                 print(len(errs)); [print(e.message[:300], list(e.path)) for e in errs[:5]]",
                schema,
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 with the jsonschema package validates the document");
        py.stdin
            .take()
            .unwrap()
            .write_all(doc.to_string().as_bytes())
            .unwrap();
        let out = py.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "python3 -c 'import jsonschema' must work"
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let verdict = check(&doc);
    assert!(
        verdict.starts_with("0\n"),
        "invalid AsyncAPI 3.0 document:\n{verdict}"
    );
    // The check can fail: an operation with an unknown action is refused.
    let mut bad = doc.clone();
    bad["operations"]["billing.dead-letter"]["action"] = "fly".into();
    assert!(!check(&bad).starts_with("0\n"));
}

/// The kill switch on RabbitMQ: a handler failing every message trips it; intake stops
/// (the consumer is gone and the broker holds the messages ready); after the cooldown
/// and the fix, every message is handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_switch_stops_intake_and_recovers() {
    use lapin::{options::QueueDeclareOptions, types::FieldTable};
    use steadfast::{
        RetryPolicy,
        worker::{KillSwitch, WorkerState},
    };

    const N: u32 = 60;
    let b = rabbitmq().await;
    let url = b.args[1].clone();
    let queue = format!("{}g", b.args[5]);
    let fixed = Arc::new(AtomicBool::new(false));
    let handled: Arc<Mutex<HashSet<MessageId>>> = Arc::default();
    let (f, h) = (fixed.clone(), handled.clone());
    let worker = Worker::builder_shared(b.transport.clone(), GROUP)
        .handle(move |_: Alpha, cx: Context| {
            let (f, h) = (f.clone(), h.clone());
            async move {
                if !f.load(Ordering::SeqCst) {
                    return Err(HandlerError::msg("downstream is down"));
                }
                h.lock().unwrap().insert(cx.id());
                Ok(())
            }
        })
        .concurrency(4)
        .retry(RetryPolicy::exponential(Duration::from_millis(100)).max_attempts(6))
        .kill_switch(
            KillSwitch::new(0.15, 10, Duration::from_secs(60))
                .cooldown(Duration::from_secs(3))
                .trial(2),
        )
        .build()
        .expect("valid worker");
    let status = worker.status();
    let (stop, running) = start(worker).await;
    let envs: Vec<Envelope> = (0..N)
        .map(|n| Envelope::encode(&Alpha { n }).unwrap())
        .collect();
    for r in b.transport.publish_batch(&envs).await {
        r.unwrap();
    }

    wait_for("the kill switch to trip", || {
        let s = status.state();
        async move { s == WorkerState::Paused }
    })
    .await;
    assert!(!status.is_ready(), "not ready while paused");
    assert_eq!(status.kill_switch_trips(), 1);
    // The broker shows the consumer gone and the messages waiting as ready.
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let declare = || async {
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
    };
    wait_for("the consumer to be cancelled", || async {
        declare().await.consumer_count() == 0
    })
    .await;
    let q = declare().await;
    assert!(
        q.message_count() > 0,
        "messages wait as ready: {}",
        q.message_count()
    );
    assert_eq!(
        status.state(),
        WorkerState::Paused,
        "still paused during the checks"
    );
    assert!(handled.lock().unwrap().is_empty());

    // The fix; after the cooldown the trial succeeds and every message is handled.
    fixed.store(true, Ordering::SeqCst);
    wait_for("every message handled", || {
        let n = handled.lock().unwrap().len();
        async move { n == N as usize }
    })
    .await;
    assert_eq!(status.state(), WorkerState::Running);
    assert!(status.is_ready());
    let all: HashSet<MessageId> = envs.iter().map(|e| e.id).collect();
    assert_eq!(*handled.lock().unwrap(), all);
    stop.cancel();
    running.await.unwrap();
    let _ = conn.close(200, "OK".into()).await;
    b.transport.close().await;
}

/// `dlq list/show/replay/purge` on a group whose dead-letter queue holds messages with
/// header tables nested 10,000 deep: one put there as the broker's own delivery limit
/// would (headers as published), one dead-lettered by the worker, which had no message
/// id and gets one of its own that `--id` picks, and keeps through a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_dlq_commands_survive_nested_headers() {
    use raw_frames::{RawMessage, Value};

    let b = rabbitmq().await;
    let url = b.args[1].clone();
    let exchange = b.args[3].clone();
    let dlq = format!("{}{GROUP}.dlq", b.args[5]);
    let handled = Arc::new(AtomicI64::new(0));
    let seen = handled.clone();
    let worker = Worker::builder_shared(b.transport.clone(), GROUP)
        .handle(move |_m: Alpha, _cx: Context| {
            seen.fetch_add(1, Ordering::SeqCst);
            async { Ok::<(), HandlerError>(()) }
        })
        .build()
        .expect("valid worker");
    let (stop, running) = start(worker).await;
    let deep = |id: Option<String>, depth: usize| RawMessage {
        headers: vec![
            ("cloudEvents:type".to_owned(), Value::text("cli.alpha")),
            (
                "deep".to_owned(),
                Value::nested(depth, false, Value::text("leaf")),
            ),
        ],
        message_id: id,
        body: br#"{"n":1}"#.to_vec(),
        ..RawMessage::default()
    };
    // Straight into the dead-letter queue, as RabbitMQ's delivery limit would leave it.
    raw_frames::publish(
        &url,
        "",
        &dlq,
        &deep(Some(MessageId::new().to_string()), 10_000),
    )
    .await;
    // Through the worker, without a message id.
    raw_frames::publish(&url, &exchange, "cli.alpha", &deep(None, 10_000)).await;
    wait_for("two dead letters", || async {
        list(&b).await["total"] == 2
    })
    .await;
    let l = list(&b).await;
    let reasons = l["by_reason"].as_object().unwrap();
    assert!(
        reasons
            .keys()
            .any(|r| r.contains("header nesting deeper than 64")),
        "{reasons:?}"
    );
    let dls = b.transport.dead_letters(GROUP, 10).await.expect("read");
    let ours = dls
        .iter()
        .find(|d| d.reason.contains("header nesting deeper than 64"))
        .expect("the worker's dead letter");
    let id = ours.id();
    assert_ne!(id, MessageId::nil(), "a dead letter without an id gets one");
    let id = id.to_string();

    let s = run(&b, &["show", GROUP, "--id", &id]).await;
    assert!(s.ok, "{}", s.stderr);
    assert!(s.stdout.contains(&id), "{}", s.stdout);
    assert!(s.stdout.contains("nests 10000 levels"), "{}", s.stdout);
    let all = run(&b, &["show", GROUP, "--limit", "10", "--json"]).await;
    assert!(all.ok, "{}", all.stderr);

    // Replayed, the worker dead-letters it again (its header is still not what was
    // sent), under the same id.
    let r = run(&b, &["replay", GROUP, "--id", &id]).await;
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("replayed 1 of 1"), "{}", r.stdout);
    wait_for("the replayed message dead-lettered again", || async {
        run(&b, &["show", GROUP, "--id", &id])
            .await
            .stdout
            .contains("replayed before:")
    })
    .await;
    assert_eq!(list(&b).await["total"], 2);

    let p = run(&b, &["purge", GROUP, "--yes"]).await;
    assert!(p.ok, "{}\n{}", p.stdout, p.stderr);
    assert!(p.stdout.contains("purged 2 of 2"), "{}", p.stdout);
    assert_eq!(list(&b).await["total"], 0);
    assert_eq!(handled.load(Ordering::SeqCst), 0, "the handler never ran");
    stop.cancel();
    running.await.unwrap();
    b.transport.close().await;
}
