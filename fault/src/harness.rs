//! The harness model of `docs/reliability.md`: publish N messages with known ids (the
//! ledger records each publish as ok, failed or indeterminate), run worker processes,
//! inject a fault, heal, wait for the system to drain by itself (or fail on a
//! deadline), stop the workers, then check and measure.

use crate::{
    db::{Database, Outbox, Pool},
    mariadb::{self, MariaDb},
    proxy::Proxy,
    rabbit_cluster::{self, RestoreCluster},
    servers::{self, NatsServer, RestoreBroker, RestorePostgres},
    spec::{Broker, Mode, Role, Spec, Work},
    worker::{Tally, build_worker},
};
use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use steadfast::{
    Envelope, MessageId,
    transport::{DeadLetter, Transport},
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// The fault a scenario injects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// None: the baseline for throughput.
    None,
    /// `count` SIGKILLs of a random worker, `every` apart, while messages flow.
    RandomKills {
        /// How many kills.
        count: u32,
        /// Time between kills.
        every: Duration,
    },
    /// One worker aborts at the `hit`-th pass through failpoint `point`.
    Window {
        /// The failpoint name.
        point: &'static str,
        /// Which pass aborts.
        hit: u64,
    },
    /// One worker aborts at the first window's failpoint; its replacement at the next,
    /// and so on: every crash window in one run.
    Windows(Vec<(&'static str, u64)>),
    /// SIGTERM to every worker under load; each must exit 0; fresh ones take over.
    SigtermDrain,
    /// SIGTERM, wait, start again, one worker after the other.
    RollingRestart,
    /// The broker stopped and started (`rabbitmqctl stop_app`/`start_app`; the private
    /// nats-server killed and started on the same store).
    BrokerRestart,
    /// `rabbitmqctl close_all_connections`.
    ConnectionClose,
    /// Every TCP connection between workers and broker cut, new ones refused for 2 s.
    CutBroker,
    /// For `for_`, every connection between workers and broker is cut once it carried
    /// `after_bytes` bytes (mid-frame): many cuts a second under load.
    Flapping {
        /// Bytes a connection carries before it is cut.
        after_bytes: usize,
        /// How long the flapping lasts.
        for_: Duration,
    },
    /// Every TCP connection between relay and database cut, new ones refused for 2 s.
    CutRelayDatabase,
    /// The database restarted while the relay and the workers run (PostgreSQL with
    /// `pg_ctlcluster restart`; MariaDB, a private server, stopped and started).
    DatabaseRestart,
    /// Raw bad input from a plain client while good messages flow.
    BadInput,
    /// Three-node RabbitMQ cluster: the node the workers are connected to (node 1, the
    /// first of their URLs) killed with SIGKILL, started again after 5 s.
    ClusterNodeKill,
    /// Three-node RabbitMQ cluster: the node leading the work queue `stop_app`, then
    /// `start_app` 5 s later (if that is node 1, the workers move too).
    ClusterLeaderRestart,
    /// Three-node RabbitMQ cluster: the node leading the dead-letter queue stopped and
    /// started; the dead letters are read and replayed after their leader moved.
    ClusterDeadLetterLeaderRestart,
    /// Three-node RabbitMQ cluster: each node in turn `stop_app`, 5 s, `start_app`.
    ClusterRollingRestart,
    /// Three-node RabbitMQ cluster: node 1 (the workers' node) paused with SIGSTOP for
    /// the given time (a minority that stops answering), then SIGCONT.
    ClusterNodePause(Duration),
}

impl Fault {
    /// A fault of the three-node RabbitMQ cluster (the scenario runs against it).
    pub fn is_rabbit_cluster(&self) -> bool {
        matches!(
            self,
            Self::ClusterNodeKill
                | Self::ClusterLeaderRestart
                | Self::ClusterDeadLetterLeaderRestart
                | Self::ClusterRollingRestart
                | Self::ClusterNodePause(_)
        )
    }
}

/// How the messages get to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publish {
    /// Published directly with confirms; each message once.
    Direct,
    /// Each message published twice under two message ids, at once (duplicates,
    /// delivered concurrently to different workers).
    Twice,
    /// Committed into the outbox table; a relay process publishes it.
    Outbox,
}

/// One run of the model.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Its name in the table.
    pub name: String,
    /// Which broker.
    pub broker: Broker,
    /// Messages to publish.
    pub n: u64,
    /// Worker processes.
    pub workers: usize,
    /// The fault.
    pub fault: Fault,
    /// How messages are published.
    pub publish: Publish,
    /// Misbehaving messages: every `every`-th message (by n) gets `mode`. Modes other
    /// than `Ok`/`Transient`/`Panic`/`Hang` are poison and must be dead-lettered.
    pub special: Vec<(u64, Mode)>,
    /// RabbitMQ delivery limit / NATS max_deliver.
    pub delivery_limit: u32,
    /// A stuck system fails at this deadline after publishing ended.
    pub deadline: Duration,
    /// Workers built with `.inbox(store)` instead of `.idempotency(store)`.
    pub inbox_mode: bool,
    /// Broker prefetch per worker (at least the concurrency, 32).
    pub prefetch: usize,
    /// The database of the inbox, the effects and the outbox: the shared PostgreSQL, or
    /// a private MariaDB the run starts (and stops) on `FAULT_MARIADB_PORT` (3307).
    pub database: Database,
}

impl Scenario {
    /// A scenario with the suite's defaults: 2 workers, direct publishing.
    pub fn new(name: &str, broker: Broker, n: u64, fault: Fault) -> Self {
        Self {
            name: name.to_owned(),
            broker,
            n,
            workers: 2,
            fault,
            publish: Publish::Direct,
            special: Vec::new(),
            delivery_limit: 20,
            deadline: Duration::from_secs(120),
            inbox_mode: false,
            prefetch: 32,
            database: Database::Postgres,
        }
    }

    fn mode_of(&self, n: u64) -> Mode {
        self.special
            .iter()
            .find(|(every, _)| *every > 0 && n % every == every - 1)
            .map_or(Mode::Ok, |(_, m)| *m)
    }
}

fn is_poison(m: Mode) -> bool {
    matches!(m, Mode::Permanent | Mode::Abort)
}

/// Where the servers are.
#[derive(Debug, Clone)]
pub struct Env {
    /// RabbitMQ.
    pub amqp_url: String,
    /// The shared NATS server.
    pub nats_url: String,
    /// PostgreSQL.
    pub db_url: String,
    /// The `fault-worker` binary.
    pub worker_exe: PathBuf,
}

impl Env {
    /// From `AMQP_URL`, `NATS_URL`, `DATABASE_URL` or the local defaults.
    pub fn from_env(worker_exe: &Path) -> Self {
        let get = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
        Self {
            amqp_url: get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
            nats_url: get("NATS_URL", "nats://127.0.0.1:4222"),
            db_url: get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test"),
            worker_exe: worker_exe.to_owned(),
        }
    }
}

/// The figures and checks of one run.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// Scenario name.
    pub scenario: String,
    /// Broker name.
    pub broker: &'static str,
    /// Publishes the ledger counts as ok.
    pub messages: u64,
    /// Publishes that failed or were indeterminate.
    pub failed_or_unknown: u64,
    /// Ok ids neither in effects nor dead-lettered.
    pub lost: u64,
    /// count(effects) - count(distinct n).
    pub duplicate_effects: u64,
    /// Poison messages (and raw bad inputs) expected in the dead-letter queue.
    pub dead_expected: u64,
    /// Distinct poison messages (and raw bad inputs) found there with a reason.
    pub dead_actual: u64,
    /// Healthy messages found in the dead-letter queue.
    pub wrongly_dead: u64,
    /// Poison messages that also have an effect.
    pub poison_with_effect: u64,
    /// Messages left in the work and delay queues after the workers stopped.
    pub left_unacked: u64,
    /// Outbox rows not dispatched.
    pub outbox_left: u64,
    /// Settled outcomes beyond one per message (retries, redeliveries, duplicates),
    /// deferrals not counted.
    pub redeliveries: u64,
    /// Deliveries put back because another (possibly dead) worker held the key's lease.
    pub deferrals: u64,
    /// Deliveries the workers' store recognised as already handled and acked without a
    /// second effect: the at-least-once copies (a relay publishing a row again, a
    /// redelivery after the effect committed), counted.
    pub duplicates: u64,
    /// Worker processes killed or aborted, and restarted.
    pub restarts: u64,
    /// From the end of the fault to the first new effect.
    pub recover: Option<Duration>,
    /// How long publishing 100 messages took right after a broker restart.
    pub publish_after_fault: Option<Duration>,
    /// From the first publish to the last check passing.
    pub drain: Duration,
    /// Messages per second over the run.
    pub throughput: f64,
    /// Peak resident memory of any worker process, KiB.
    pub peak_rss_kib: u64,
    /// Drained by the deadline.
    pub drained: bool,
    /// Every worker stopped with SIGTERM exited 0 within its grace period.
    pub clean_exits: bool,
    /// The reasons of the poison messages' dead letters.
    pub poison_reasons: Vec<String>,
    /// The reasons of healthy messages' dead letters (the first few).
    pub wrong_reasons: Vec<String>,
    /// What went wrong, if anything.
    pub problems: Vec<String>,
}

impl Row {
    /// Every check of the model passed.
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }

    fn judge(&mut self) {
        let mut p = Vec::new();
        if !self.drained {
            p.push("did not drain by the deadline (stuck)".to_owned());
        }
        if self.lost > 0 {
            p.push(format!("{} lost", self.lost));
        }
        if self.duplicate_effects > 0 {
            p.push(format!("{} duplicate effects", self.duplicate_effects));
        }
        if self.dead_actual < self.dead_expected {
            p.push(format!(
                "{} of {} poison messages dead-lettered",
                self.dead_actual, self.dead_expected
            ));
        }
        if self.wrongly_dead > 0 {
            p.push(format!(
                "{} healthy messages dead-lettered",
                self.wrongly_dead
            ));
        }
        if self.poison_with_effect > 0 {
            p.push(format!(
                "{} poison messages with effects",
                self.poison_with_effect
            ));
        }
        if self.left_unacked > 0 {
            p.push(format!("{} left in the queues", self.left_unacked));
        }
        if self.outbox_left > 0 {
            p.push(format!("{} outbox rows not dispatched", self.outbox_left));
        }
        if !self.clean_exits {
            p.push("a worker did not exit 0 on SIGTERM within its grace period".to_owned());
        }
        self.problems.extend(p);
    }
}

/// The table header (Markdown).
pub fn table_header() -> String {
    "| scenario | broker | messages | lost | duplicate effects | dead-lettered (expected / actual) | wrongly dead-lettered | left unacked | redeliveries (deferrals) | restarts | time to recover | time to drain | throughput (msg/s; ÷ no fault) | peak RSS | result |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |".to_owned()
}

/// One table line; `baseline` is the same broker's throughput without a fault.
pub fn table_line(r: &Row, baseline: Option<f64>) -> String {
    let ratio = match baseline {
        Some(b) if b > 0.0 => format!("{:.0} ({:.2})", r.throughput, r.throughput / b),
        _ => format!("{:.0}", r.throughput),
    };
    let mut recover = r
        .recover
        .map_or("–".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()));
    if let Some(p) = r.publish_after_fault {
        recover = format!("{recover} (publish {:.1} s)", p.as_secs_f64());
    }
    let result = if r.passed() {
        "pass".to_owned()
    } else {
        format!("FAIL: {}", r.problems.join("; "))
    };
    format!(
        "| {} | {} | {} | {} | {} | {} / {} | {} | {} | {} ({}) | {} | {} | {:.1} s | {} | {:.0} MiB | {} |",
        r.scenario,
        r.broker,
        r.messages,
        r.lost,
        r.duplicate_effects,
        r.dead_expected,
        r.dead_actual,
        r.wrongly_dead,
        r.left_unacked,
        r.redeliveries,
        r.deferrals,
        r.restarts,
        recover,
        r.drain.as_secs_f64(),
        ratio,
        r.peak_rss_kib as f64 / 1024.0,
        result
    )
}

// ---------------------------------------------------------------------------------
// Worker processes

#[derive(Default)]
struct ProcState {
    ready: bool,
    stats: [u64; 7],
    peak_rss_kib: u64,
}

struct Proc {
    child: Child,
    pid: u32,
    state: Arc<Mutex<ProcState>>,
}

/// The worker (and relay) processes of a run, with a supervisor that starts a process
/// again when it dies (as an orchestrator would), and tallies across all of them.
struct Fleet {
    exe: PathBuf,
    slots: Vec<(Spec, Option<Proc>)>,
    /// Tallies of processes that are gone.
    done_stats: [u64; 7],
    peak_rss_kib: u64,
    restarts: u64,
    clean_exits: bool,
    /// Failpoints the next restarted workers abort at, one each.
    windows: std::collections::VecDeque<(String, u64)>,
}

impl Fleet {
    fn new(exe: &Path) -> Self {
        Self {
            exe: exe.to_owned(),
            slots: Vec::new(),
            done_stats: [0; 7],
            peak_rss_kib: 0,
            restarts: 0,
            clean_exits: true,
            windows: std::collections::VecDeque::new(),
        }
    }

    fn spawn(&self, spec: &Spec) -> std::io::Result<Proc> {
        let mut cmd = Command::new(&self.exe);
        cmd.envs(spec.to_env())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if std::env::var_os("FAULT_VERBOSE").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0);
        let state: Arc<Mutex<ProcState>> = Arc::default();
        let out = child.stdout.take().expect("piped stdout");
        let s = state.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut g = s.lock().unwrap_or_else(|p| p.into_inner());
                if line == "ready" {
                    g.ready = true;
                } else if let Some(rest) = line.strip_prefix("stats ") {
                    for (i, v) in rest.split(' ').enumerate().take(7) {
                        g.stats[i] = v.parse().unwrap_or(g.stats[i]);
                    }
                }
            }
        });
        Ok(Proc { child, pid, state })
    }

    fn add(&mut self, spec: Spec) -> std::io::Result<()> {
        let p = self.spawn(&spec)?;
        self.slots.push((spec, Some(p)));
        Ok(())
    }

    fn retire(&mut self, p: &Proc) {
        let g = p.state.lock().unwrap_or_else(|p| p.into_inner());
        for (sum, v) in self.done_stats.iter_mut().zip(g.stats) {
            *sum += v;
        }
        self.peak_rss_kib = self.peak_rss_kib.max(g.peak_rss_kib);
    }

    /// Samples memory, restarts processes that died. Called every 100 ms.
    fn supervise(&mut self) {
        let mut dead = Vec::new();
        for (i, (_, slot)) in self.slots.iter_mut().enumerate() {
            if let Some(p) = slot {
                if let Some(kib) = vm_hwm(p.pid) {
                    let mut g = p.state.lock().unwrap_or_else(|p| p.into_inner());
                    g.peak_rss_kib = g.peak_rss_kib.max(kib);
                }
                if let Ok(Some(_)) = p.child.try_wait() {
                    dead.push(i);
                }
            }
        }
        for i in dead {
            if let Some(p) = self.slots[i].1.take() {
                self.retire(&p);
            }
            // A process that crashed at a failpoint comes back without it, or armed with
            // the next window of the scenario.
            self.slots[i].0.abort_at.clear();
            if self.slots[i].0.role == Role::Worker
                && let Some((point, hit)) = self.windows.pop_front()
            {
                self.slots[i].0.abort_at.insert(point, hit);
            }
            self.restarts += 1;
            match self.spawn(&self.slots[i].0.clone()) {
                Ok(p) => self.slots[i].1 = Some(p),
                Err(e) => eprintln!("cannot restart a worker: {e}"),
            }
        }
    }

    fn all_ready(&self) -> bool {
        self.slots.iter().all(|(_, p)| {
            p.as_ref()
                .is_some_and(|p| p.state.lock().unwrap_or_else(|p| p.into_inner()).ready)
        })
    }

    async fn wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        while !self.all_ready() {
            if start.elapsed() > limit {
                return Err(format!("workers not ready within {limit:?}"));
            }
            self.supervise();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    fn worker_pids(&self) -> Vec<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, (s, p))| s.role == Role::Worker && p.is_some())
            .map(|(i, _)| i)
            .collect()
    }

    fn sigkill(&mut self, i: usize) {
        if let Some(p) = &mut self.slots[i].1 {
            let _ = p.child.start_kill();
        }
    }

    /// SIGTERM to slot `i`; waits for the exit within `grace`; records whether it was a
    /// clean exit 0. The slot is left empty.
    async fn sigterm(&mut self, i: usize, grace: Duration) {
        let Some(mut p) = self.slots[i].1.take() else {
            return;
        };
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &p.pid.to_string()])
            .status();
        let deadline = Instant::now() + grace;
        let status = loop {
            if let Some(kib) = vm_hwm(p.pid) {
                let mut g = p.state.lock().unwrap_or_else(|p| p.into_inner());
                g.peak_rss_kib = g.peak_rss_kib.max(kib);
            }
            match p.child.try_wait() {
                Ok(Some(s)) => break Some(s),
                _ if Instant::now() > deadline => break None,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        if status.is_none_or(|s| !s.success()) {
            eprintln!("worker {} did not exit 0 on SIGTERM: {status:?}", p.pid);
            self.clean_exits = false;
            let _ = p.child.kill().await;
        }
        // Let the reader take the last stats line.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.retire(&p);
    }

    fn respawn(&mut self, i: usize) -> std::io::Result<()> {
        let p = self.spawn(&self.slots[i].0)?;
        self.slots[i].1 = Some(p);
        Ok(())
    }

    async fn stop_all(&mut self, grace: Duration) {
        for i in 0..self.slots.len() {
            self.sigterm(i, grace).await;
        }
    }

    fn totals(&self) -> [u64; 7] {
        let mut t = self.done_stats;
        for (_, p) in &self.slots {
            if let Some(p) = p {
                let g = p.state.lock().unwrap_or_else(|p| p.into_inner());
                for (sum, v) in t.iter_mut().zip(g.stats) {
                    *sum += v;
                }
            }
        }
        t
    }
}

/// VmHWM (peak resident set) of a live process, KiB.
fn vm_hwm(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

// ---------------------------------------------------------------------------------
// The run

type Res<T> = Result<T, String>;

fn e<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> String {
    move |err| format!("{what}: {err}")
}

/// The ledger: what the publisher knows about each id.
#[derive(Debug, Default)]
struct Ledger {
    ok: HashSet<u64>,
    failed: u64,
    indeterminate: u64,
}

/// Runs `s` and returns its row; the caller asserts [`Row::passed`].
pub async fn run(env: &Env, s: &Scenario, baseline: Option<f64>) -> Res<Row> {
    let tag = format!("sf-{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    // MariaDB scenarios restart or cut their database: a private server, never the
    // shared one; stopped when `_mariadb` drops, however the run ends.
    let mut _mariadb: Option<MariaDb> = None;
    let db_url = match s.database {
        Database::Postgres => env.db_url.clone(),
        Database::MariaDb => {
            let srv = MariaDb::start(mariadb::private_port()).await?;
            let url = srv.url();
            _mariadb = Some(srv);
            url
        }
    };
    let pool = Pool::connect(&db_url, 4).await?;

    // Servers and proxies for this scenario.
    let mut _nats: Option<NatsServer> = None;
    let mut broker_url = match s.broker {
        Broker::Amqp if s.fault.is_rabbit_cluster() => {
            rabbit_cluster::start().await?;
            rabbit_cluster::urls()
        }
        Broker::Amqp => env.amqp_url.clone(),
        Broker::Nats => env.nats_url.clone(),
    };
    if s.broker == Broker::Nats && s.fault == Fault::BrokerRestart {
        let srv = NatsServer::start(14_223).await?;
        broker_url = srv.url();
        _nats = Some(srv);
    }
    let mut spec = Spec::new(s.broker, broker_url.clone(), db_url.clone(), &tag);
    spec.delivery_limit = s.delivery_limit;
    spec.inbox_mode = s.inbox_mode;
    spec.prefetch = s.prefetch;
    let broker_proxy = if matches!(s.fault, Fault::CutBroker | Fault::Flapping { .. }) {
        Some(
            Proxy::start(servers::addr_of(&broker_url)?)
                .await
                .map_err(e("proxy"))?,
        )
    } else {
        None
    };
    let db_proxy = if s.fault == Fault::CutRelayDatabase {
        Some(
            Proxy::start(servers::addr_of(&db_url)?)
                .await
                .map_err(e("proxy"))?,
        )
    } else {
        None
    };

    // Schema: effects without a unique constraint, the inbox, the outbox.
    let schema = spec.schema.clone();
    pool.create_schema(&schema).await?;
    let inbox = pool.inbox(&spec.inbox_table())?;
    inbox.migrate().await?;
    let outbox = pool.outbox(&spec.outbox_table(), Duration::from_secs(10))?;
    outbox.migrate().await?;

    // The harness's own transport: declares the topology, publishes, reads dead letters.
    let mut transport = spec.connect().await.map_err(e("connecting the harness"))?;
    build_worker(
        &spec,
        transport.clone(),
        pool.clone(),
        inbox.clone(),
        Arc::new(Tally::default()),
    )
    .map_err(e("building the worker"))?
    .declare()
    .await
    .map_err(e("declaring"))?;
    if let Fault::ClusterNodePause(_) = s.fault {
        // The worst case, every time: the node paused leads the work queue, and the
        // workers, the relay and the harness's own transport are all connected to it.
        let leader =
            rabbit_cluster::leader_of(&format!("{}.{}", spec.name, spec.group), None).await?;
        spec.broker_url = rabbit_cluster::urls_from(leader);
        transport.close().await;
        transport = spec.connect().await.map_err(e("connecting the harness"))?;
    }

    // Workers (through the proxy if the fault cuts them off) and the relay.
    let mut fleet = Fleet::new(&env.worker_exe);
    if let Fault::Windows(list) = &s.fault {
        fleet.windows = list.iter().map(|(p, k)| ((*p).to_owned(), *k)).collect();
    }
    for i in 0..s.workers {
        let mut w = spec.clone();
        if let Some(p) = &broker_proxy {
            w.broker_url = servers::with_addr(&broker_url, p.addr())?;
        }
        if i == 0
            && let Fault::Window { point, hit } = &s.fault
            && !point.starts_with("steadfast::relay")
        {
            w.abort_at.insert((*point).to_owned(), *hit);
        }
        if i == 0
            && let Some((point, hit)) = fleet.windows.pop_front()
        {
            w.abort_at.insert(point, hit);
        }
        fleet.add(w).map_err(e("spawning fault-worker"))?;
    }
    if s.publish == Publish::Outbox {
        let mut r = spec.clone();
        r.role = Role::Relay;
        if let Some(p) = &db_proxy {
            r.db_url = servers::with_addr(&db_url, p.addr())?;
        }
        if let Fault::Window { point, hit } = &s.fault
            && point.starts_with("steadfast::relay")
        {
            r.abort_at.insert((*point).to_owned(), *hit);
        }
        fleet.add(r).map_err(e("spawning the relay"))?;
    }
    fleet.wait_ready(Duration::from_secs(60)).await?;

    // Publish in the background, recording the ledger.
    let messages: Vec<Work> = (0..s.n)
        .map(|n| Work {
            n,
            mode: s.mode_of(n),
        })
        .collect();
    let poison: HashSet<u64> = messages
        .iter()
        .filter(|w| is_poison(w.mode))
        .map(|w| w.n)
        .collect();
    let ledger: Arc<Mutex<Ledger>> = Arc::default();
    let started = Instant::now();
    // On the cluster, half the messages are held back until the node fault is in place:
    // work that exists only once the fault began shows whether consumption resumed (with
    // all of it published first, the workers had often drained the queue before the
    // node went, and "resumed" could not be seen), and the poison among it is
    // dead-lettered while the fault lasts.
    let (release, gate) = tokio::sync::oneshot::channel::<()>();
    let held_back = if s.fault.is_rabbit_cluster() {
        Some((messages.len() / 2, gate))
    } else {
        None
    };
    let mut release = Some(release);
    let publisher = tokio::spawn(publish_all(
        s.publish,
        transport.clone(),
        outbox.clone(),
        pool.clone(),
        messages,
        ledger.clone(),
        held_back,
    ));

    // The fault, once a quarter of the work is done.
    let effects_table = format!("{schema}.effects");
    let quarter = (s.n - poison.len() as u64) / 4;
    // (On the cluster, a quarter of all is half of what is published before the fault.)
    wait_effects(
        &pool,
        &effects_table,
        quarter,
        &mut fleet,
        Duration::from_secs(120),
    )
    .await?;
    let mut raw_bad = 0u64;
    let mut resumed = None;
    let fault_end = if s.fault.is_rabbit_cluster() {
        // Each worker may hold a prefetch of deliveries it received before the fault,
        // and finish them after it; twice that is beyond doubt new work.
        let margin = 2 * (s.workers * spec.concurrency) as u64;
        let progress = Progress {
            pool: &pool,
            table: &effects_table,
            margin,
        };
        inject_cluster(s, &mut fleet, &spec, &progress, &mut resumed, &mut release).await?
    } else {
        inject(
            s,
            &mut fleet,
            &spec,
            _nats.as_mut(),
            _mariadb.as_mut(),
            broker_proxy.as_ref(),
            db_proxy.as_ref(),
            &mut raw_bad,
        )
        .await?
    };
    let at_end = count_effects(&pool, &effects_table).await.unwrap_or(0);
    // After a broker restart, publish 100 more and time it: the publisher must come back
    // by itself too (session 1 saw NATS publishes stall for over a minute after a restart).
    let mut publish_after = None;
    if s.fault == Fault::BrokerRestart {
        let extra: Vec<Envelope> = (s.n..s.n + 100)
            .map(|n| Envelope::encode(&Work { n, mode: Mode::Ok }))
            .collect::<Result<_, _>>()
            .map_err(e("encode"))?;
        let t0 = Instant::now();
        let results = tokio::time::timeout(Duration::from_secs(180), async {
            // Retried while the client reconnects; each failed try is a failed publish.
            let mut left: Vec<usize> = (0..extra.len()).collect();
            while !left.is_empty() {
                let batch: Vec<Envelope> = left.iter().map(|i| extra[*i].clone()).collect();
                let r = transport.publish_batch(&batch).await;
                let mut still = Vec::new();
                {
                    let mut l = ledger.lock().unwrap_or_else(|p| p.into_inner());
                    for (i, r) in left.iter().zip(r) {
                        if r.is_ok() {
                            l.ok.insert(s.n + *i as u64);
                        } else {
                            l.failed += 1;
                            still.push(*i);
                        }
                    }
                }
                left = still;
                if !left.is_empty() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        })
        .await;
        publish_after = Some(t0.elapsed());
        if results.is_err() {
            eprintln!("publishing after the restart did not finish within 180 s");
        }
    }

    // Heal -> drain: wait for everything to be accounted for and the queues empty.
    drop(release);
    publisher.await.map_err(e("publisher task"))??;
    let (ok, failed, indeterminate) = {
        let l = ledger.lock().unwrap_or_else(|p| p.into_inner());
        (l.ok.clone(), l.failed, l.indeterminate)
    };
    let healthy_ok: HashSet<u64> = ok.difference(&poison).copied().collect();
    let poison_ok: HashSet<u64> = ok.intersection(&poison).copied().collect();
    let deadline = Instant::now() + s.deadline;
    let mut recover = None;
    let mut drained = false;
    let mut last_dlq = Instant::now() - Duration::from_secs(10);
    let mut dead: Vec<DeadLetter>;
    while Instant::now() < deadline {
        fleet.supervise();
        let have = count_distinct(&pool, &effects_table).await.unwrap_or(0);
        if recover.is_none() && (have > at_end || have >= healthy_ok.len() as u64) {
            recover = fault_end.map(|t| t.elapsed());
        }
        if have >= healthy_ok.len() as u64 && last_dlq.elapsed() > Duration::from_secs(1) {
            last_dlq = Instant::now();
            dead = read_dead(&transport, &spec).await?;
            let (dl_n, raw) = dead_ids(&dead);
            let poison_done = poison_ok.iter().all(|n| dl_n.contains(n));
            // The outbox first: once no row is pending, every row was confirmed by the
            // broker, so an empty queue read after it cannot miss a row the relay
            // publishes again (read the other way round, a republish between the two
            // reads passed for drained and was left in the queue).
            if poison_done
                && raw >= raw_bad
                && outbox.pending().await.unwrap_or(1) == 0
                && queues_empty(&spec, &transport, false).await.unwrap_or(1) == 0
            {
                drained = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drain = started.elapsed();
    let throughput = ok.len() as f64 / drain.as_secs_f64();
    // On the cluster, after the fault moved leaders: the dead letters are replayed to
    // the work queue, and the workers (still running) dead-letter the poison ones again.
    let replay_problem = if drained && s.fault.is_rabbit_cluster() && !poison_ok.is_empty() {
        replay_and_wait(&transport, &spec, &poison_ok, &mut fleet)
            .await
            .err()
    } else {
        None
    };

    // Stop everything (SIGTERM, exit 0 within the grace period), then look.
    fleet
        .stop_all(spec.drain_timeout + Duration::from_secs(5))
        .await;
    let left = queues_empty(&spec, &transport, true).await?;
    let outbox_left = outbox.pending().await.map_err(e("outbox pending"))? as u64;
    dead = read_dead(&transport, &spec).await?;
    let (dl_n, raw_dead) = dead_ids(&dead);
    let effects = effect_counts(&pool, &effects_table).await?;
    let total_effects: u64 = effects.values().sum();

    let mut row = Row {
        scenario: s.name.clone(),
        broker: s.broker.as_str(),
        messages: ok.len() as u64 + raw_bad,
        failed_or_unknown: failed + indeterminate,
        lost: ok
            .iter()
            .filter(|n| !effects.contains_key(n) && !dl_n.contains(n))
            .count() as u64,
        duplicate_effects: total_effects - effects.len() as u64,
        dead_expected: poison_ok.len() as u64 + raw_bad,
        dead_actual: poison_ok.iter().filter(|n| dl_n.contains(n)).count() as u64
            + raw_dead.min(raw_bad),
        wrongly_dead: healthy_ok.iter().filter(|n| dl_n.contains(n)).count() as u64,
        poison_with_effect: poison_ok.iter().filter(|n| effects.contains_key(n)).count() as u64,
        left_unacked: left,
        outbox_left,
        redeliveries: 0,
        deferrals: 0,
        duplicates: 0,
        restarts: fleet.restarts,
        recover,
        publish_after_fault: publish_after,
        drain,
        throughput,
        peak_rss_kib: fleet.peak_rss_kib,
        drained,
        clean_exits: fleet.clean_exits,
        poison_reasons: dead
            .iter()
            .filter(|d| {
                serde_json::from_slice::<Work>(&d.envelope.payload)
                    .is_ok_and(|w| poison_ok.contains(&w.n))
            })
            .map(|d| d.reason.clone())
            .collect(),
        wrong_reasons: dead
            .iter()
            .filter(|d| {
                serde_json::from_slice::<Work>(&d.envelope.payload)
                    .is_ok_and(|w| healthy_ok.contains(&w.n))
            })
            .map(|d| d.reason.clone())
            .take(3)
            .collect(),
        problems: Vec::new(),
    };
    let t = fleet.totals();
    // t = [calls, acked, duplicate, retried, deferred, dead, not settled]
    let settled: u64 = t[1..].iter().sum::<u64>() - t[4];
    row.redeliveries = settled.saturating_sub(row.messages);
    row.deferrals = t[4];
    row.duplicates = t[2];
    if s.fault.is_rabbit_cluster() {
        // The figure that matters on a cluster: how soon consumption resumed on the other
        // nodes while the fault lasted.
        row.recover = resumed;
        if resumed.is_none() {
            row.problems
                .push("consumption did not resume after the fault".to_owned());
        }
    }
    if let Some(p) = replay_problem {
        row.problems.push(p);
    }
    if dead.iter().any(|d| d.reason.trim().is_empty()) {
        row.problems
            .push("a dead letter without a reason".to_owned());
    }
    let _ = baseline;
    row.judge();

    // Clean up what is ours (queues expire by themselves).
    transport.close().await;
    if s.broker == Broker::Nats && _nats.is_none() {
        let _ = servers::delete_nats_streams(&spec).await;
    }
    if s.broker == Broker::Amqp {
        let _ = servers::amqp_delete_topology(&spec).await;
    }
    pool.drop_schema(&schema).await;
    Ok(row)
}

async fn publish_all(
    how: Publish,
    transport: Arc<dyn Transport>,
    outbox: Outbox,
    pool: Pool,
    messages: Vec<Work>,
    ledger: Arc<Mutex<Ledger>>,
    held_back: Option<(usize, tokio::sync::oneshot::Receiver<()>)>,
) -> Res<()> {
    const CHUNK: usize = 200;
    let (split, mut gate) = match held_back {
        Some((at, rx)) => (at.min(messages.len()), Some(rx)),
        None => (messages.len(), None),
    };
    let (before, after) = messages.split_at(split);
    for (i, chunk) in before.chunks(CHUNK).chain(after.chunks(CHUNK)).enumerate() {
        if i == before.len().div_ceil(CHUNK)
            && let Some(rx) = gate.take()
        {
            // Released once the fault is in place (or when the sender is dropped).
            let _ = rx.await;
        }
        match how {
            Publish::Direct | Publish::Twice => {
                let mut envs: Vec<Envelope> = Vec::with_capacity(chunk.len() * 2);
                for w in chunk {
                    envs.push(Envelope::encode(w).map_err(e("encode"))?);
                    if how == Publish::Twice {
                        envs.push(
                            Envelope::encode(w)
                                .map_err(e("encode"))?
                                .with_id(MessageId::new()),
                        );
                    }
                }
                let per = if how == Publish::Twice { 2 } else { 1 };
                match tokio::time::timeout(Duration::from_secs(15), transport.publish_batch(&envs))
                    .await
                {
                    Ok(results) => {
                        let mut l = ledger.lock().unwrap_or_else(|p| p.into_inner());
                        for (i, w) in chunk.iter().enumerate() {
                            // A message counts as published if any copy was confirmed.
                            if results[i * per..(i + 1) * per].iter().any(Result::is_ok) {
                                l.ok.insert(w.n);
                            } else {
                                l.failed += 1;
                            }
                        }
                    }
                    Err(_) => {
                        ledger
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .indeterminate += chunk.len() as u64;
                    }
                }
            }
            Publish::Outbox => {
                // A committed outbox row counts as ok; retry the transaction through
                // database outages (a rolled-back one published nothing).
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let attempt = outbox.enqueue_all(&pool, chunk);
                    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                        Ok(Ok(())) => {
                            ledger
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .ok
                                .extend(chunk.iter().map(|w| w.n));
                            break;
                        }
                        Ok(Err(err)) if Instant::now() > deadline => {
                            return Err(format!("cannot enqueue: {err}"));
                        }
                        Err(_) if Instant::now() > deadline => {
                            return Err("cannot enqueue: timed out".to_owned());
                        }
                        _ => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
            }
        }
    }
    Ok(())
}

async fn count_effects(pool: &Pool, table: &str) -> Res<u64> {
    pool.scalar(format!("SELECT count(*) FROM {table}"))
        .await
        .map_err(e("counting effects"))
}

async fn count_distinct(pool: &Pool, table: &str) -> Res<u64> {
    pool.scalar(format!("SELECT count(DISTINCT n) FROM {table}"))
        .await
        .map_err(e("counting effects"))
}

async fn effect_counts(pool: &Pool, table: &str) -> Res<HashMap<u64, u64>> {
    let rows = pool
        .pairs(format!("SELECT n, count(*) FROM {table} GROUP BY n"))
        .await
        .map_err(e("reading effects"))?;
    Ok(rows
        .into_iter()
        .map(|(n, c)| (n as u64, c as u64))
        .collect())
}

async fn wait_effects(
    pool: &Pool,
    table: &str,
    at_least: u64,
    fleet: &mut Fleet,
    limit: Duration,
) -> Res<()> {
    let start = Instant::now();
    loop {
        fleet.supervise();
        // The database may be down for a moment in some scenarios: keep asking.
        if count_effects(pool, table).await.unwrap_or(0) >= at_least {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(format!("fewer than {at_least} effects after {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn read_dead(transport: &Arc<dyn Transport>, spec: &Spec) -> Res<Vec<DeadLetter>> {
    transport
        .dead_letters(&spec.group, 100_000)
        .await
        .map_err(e("reading dead letters"))
}

/// The model ids in the dead letters (with a reason), and how many are not model
/// messages at all (raw bad input).
fn dead_ids(dead: &[DeadLetter]) -> (HashSet<u64>, u64) {
    let mut ids = HashSet::new();
    let mut raw: HashSet<String> = HashSet::new();
    for d in dead {
        if d.reason.trim().is_empty() {
            continue;
        }
        // Raw bad input carries a `case` header; model messages never do.
        if let Some(case) = d.envelope.headers.get("case") {
            raw.insert(case.to_owned());
        } else if let Ok(w) = serde_json::from_slice::<Work>(&d.envelope.payload) {
            ids.insert(w.n);
        } else {
            raw.insert(format!("unknown {}", d.envelope.id));
        }
    }
    (ids, raw.len() as u64)
}

/// Messages still in the group's work, suspects and delay queues, handed out or not
/// (AMQP: ready messages, plus the unacked ones while the workers run, read with
/// `rabbitmqctl` where the harness can reach the node; NATS: pending plus ack pending
/// of the group's consumers).
///
/// A delivery the workers hold unsettled shows in no ready count: a redelivery of a
/// message already handled, or a suspect being moved to the suspects queue. Stopping
/// the workers then would return it to the queue as "left unacked" although nothing
/// was wrong but the moment of the stop.
async fn queues_empty(spec: &Spec, transport: &Arc<dyn Transport>, after_stop: bool) -> Res<u64> {
    let _ = transport;
    match spec.broker {
        Broker::Amqp => {
            let ready = servers::amqp_queue_depth(spec).await?;
            if ready > 0 || after_stop {
                return Ok(ready);
            }
            match servers::amqp_unacked(spec).await {
                Ok(Some(n)) if n > 0 => {
                    eprintln!("0 ready but {n} unacked in the group's queues: not drained yet");
                    Ok(n)
                }
                Ok(_) => Ok(0),
                Err(e) => {
                    // The ready count alone, as before this check existed.
                    eprintln!("unacked messages not read: {e}");
                    Ok(0)
                }
            }
        }
        Broker::Nats => servers::nats_pending(spec).await,
    }
}

#[allow(clippy::too_many_arguments)]
async fn inject(
    s: &Scenario,
    fleet: &mut Fleet,
    spec: &Spec,
    nats: Option<&mut NatsServer>,
    mariadb: Option<&mut MariaDb>,
    broker_proxy: Option<&Proxy>,
    db_proxy: Option<&Proxy>,
    raw_bad: &mut u64,
) -> Res<Option<Instant>> {
    let grace = spec.drain_timeout + Duration::from_secs(5);
    match &s.fault {
        Fault::None | Fault::Window { .. } | Fault::Windows(_) => Ok(None),
        Fault::RandomKills { count, every } => {
            let mut rng = uuid::Uuid::now_v7().as_u128() as u64;
            for _ in 0..*count {
                let ws = fleet.worker_pids();
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let pick = ws[(rng >> 33) as usize % ws.len()];
                fleet.sigkill(pick);
                let until = Instant::now() + *every;
                while Instant::now() < until {
                    fleet.supervise();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Ok(Some(Instant::now()))
        }
        Fault::SigtermDrain => {
            for i in fleet.worker_pids() {
                fleet.sigterm(i, grace).await;
            }
            for i in 0..fleet.slots.len() {
                if fleet.slots[i].1.is_none() {
                    fleet.respawn(i).map_err(e("respawn"))?;
                }
            }
            Ok(Some(Instant::now()))
        }
        Fault::RollingRestart => {
            for i in fleet.worker_pids() {
                fleet.sigterm(i, grace).await;
                fleet.respawn(i).map_err(e("respawn"))?;
                fleet.wait_ready(Duration::from_secs(30)).await?;
            }
            Ok(Some(Instant::now()))
        }
        Fault::BrokerRestart => match s.broker {
            Broker::Amqp => {
                let _restore = RestoreBroker;
                servers::rabbitmqctl(&["stop_app"]).await?;
                sleep_supervised(fleet, Duration::from_secs(3)).await;
                servers::rabbitmqctl(&["start_app"]).await?;
                Ok(Some(Instant::now()))
            }
            Broker::Nats => {
                let srv = nats.ok_or("no private nats-server")?;
                srv.stop().await;
                sleep_supervised(fleet, Duration::from_secs(2)).await;
                srv.start_again().await?;
                Ok(Some(Instant::now()))
            }
        },
        Fault::ConnectionClose => {
            servers::rabbitmqctl(&["close_all_connections", "steadfast fault suite"]).await?;
            Ok(Some(Instant::now()))
        }
        Fault::CutBroker => {
            let p = broker_proxy.ok_or("no proxy")?;
            p.cut(Duration::from_secs(2)).await;
            Ok(Some(Instant::now()))
        }
        Fault::Flapping { after_bytes, for_ } => {
            let p = broker_proxy.ok_or("no proxy")?;
            p.cut_after(Some(*after_bytes));
            sleep_supervised(fleet, *for_).await;
            p.cut_after(None);
            eprintln!("flapping: {} connections cut", p.cuts());
            Ok(Some(Instant::now()))
        }
        Fault::CutRelayDatabase => {
            let p = db_proxy.ok_or("no proxy")?;
            p.cut(Duration::from_secs(2)).await;
            Ok(Some(Instant::now()))
        }
        Fault::DatabaseRestart => {
            match s.database {
                Database::Postgres => {
                    let _restore = RestorePostgres;
                    servers::pg_ctl("restart").await?;
                }
                Database::MariaDb => {
                    mariadb.ok_or("no private MariaDB")?.restart().await?;
                }
            }
            Ok(Some(Instant::now()))
        }
        Fault::BadInput => {
            *raw_bad = servers::publish_bad_input(spec).await?;
            Ok(Some(Instant::now()))
        }
        other => Err(format!("{other:?} is a cluster fault (see inject_cluster)")),
    }
}

/// How far the workers got: distinct effects, and how many may still land from
/// deliveries in flight when a fault began (they do not show that consumption resumed).
struct Progress<'a> {
    pool: &'a Pool,
    table: &'a str,
    margin: u64,
}

impl Progress<'_> {
    async fn now(&self) -> u64 {
        count_distinct(self.pool, self.table).await.unwrap_or(0)
    }

    /// Waits (supervising the workers) up to `bound` for more effects than `base` plus
    /// the in-flight margin: the time from `since` when they came, if they did.
    async fn resumed(
        &self,
        fleet: &mut Fleet,
        base: u64,
        since: Instant,
        bound: Duration,
    ) -> Option<Duration> {
        while since.elapsed() < bound {
            fleet.supervise();
            if self.now().await > base + self.margin {
                return Some(since.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "no progress within {bound:?}: {} effects, {base} when the fault began (+{} in flight)",
            self.now().await,
            self.margin
        );
        None
    }
}

/// The cluster faults: each measures how soon consumption resumed after the fault began
/// (while the node was still down), and brings every node back, whatever happens.
async fn inject_cluster(
    s: &Scenario,
    fleet: &mut Fleet,
    spec: &Spec,
    progress: &Progress<'_>,
    resumed: &mut Option<Duration>,
    release: &mut Option<tokio::sync::oneshot::Sender<()>>,
) -> Res<Option<Instant>> {
    // Lets the held-back half of the messages go, once the fault is in place.
    let mut go = || {
        if let Some(tx) = release.take() {
            let _ = tx.send(());
        }
    };
    let _restore = RestoreCluster;
    let work_queue = format!("{}.{}", spec.name, spec.group);
    // The effects so far are counted once the fault is in place (what the workers did
    // while it was being set up is not resumption); the time runs from its start.
    let t0 = Instant::now();
    match &s.fault {
        Fault::ClusterNodeKill => {
            rabbit_cluster::signal(1, "KILL").await?;
            let base = progress.now().await;
            go();
            *resumed = progress
                .resumed(fleet, base, t0, Duration::from_secs(60))
                .await;
            sleep_supervised(fleet, Duration::from_secs(5).saturating_sub(t0.elapsed())).await;
            rabbit_cluster::start().await?;
        }
        Fault::ClusterLeaderRestart | Fault::ClusterDeadLetterLeaderRestart => {
            let queue = if s.fault == Fault::ClusterLeaderRestart {
                work_queue
            } else {
                format!("{work_queue}.dlq")
            };
            let leader = rabbit_cluster::leader_of(&queue, None).await?;
            eprintln!("{queue}: leader on node {leader}; stop_app");
            rabbit_cluster::ctl(leader, &["-q", "stop_app"]).await?;
            let base = progress.now().await;
            go();
            *resumed = progress
                .resumed(fleet, base, t0, Duration::from_secs(60))
                .await;
            sleep_supervised(fleet, Duration::from_secs(5).saturating_sub(t0.elapsed())).await;
            let moved = rabbit_cluster::leader_of(&queue, Some(leader)).await?;
            eprintln!("{queue}: leader moved to node {moved}; start_app on node {leader}");
            rabbit_cluster::ctl(leader, &["-q", "start_app"]).await?;
        }
        Fault::ClusterRollingRestart => {
            for n in rabbit_cluster::NODES {
                let t = Instant::now();
                rabbit_cluster::ctl(n, &["-q", "stop_app"]).await?;
                if n == 1 {
                    // The workers' node: they move to another one.
                    let base = progress.now().await;
                    go();
                    *resumed = progress
                        .resumed(fleet, base, t, Duration::from_secs(60))
                        .await;
                }
                sleep_supervised(fleet, Duration::from_secs(5).saturating_sub(t.elapsed())).await;
                rabbit_cluster::ctl(n, &["-q", "start_app"]).await?;
                // Let the node's replicas catch up before the next one goes.
                sleep_supervised(fleet, Duration::from_secs(5)).await;
            }
        }
        Fault::ClusterNodePause(d) => {
            // The workers' node, chosen (see `run`) as the work queue's leader.
            let node = rabbit_cluster::leader_of(&work_queue, None).await?;
            eprintln!("{work_queue}: leader on node {node}, the workers' node; pausing it");
            rabbit_cluster::signal(node, "STOP").await?;
            let base = progress.now().await;
            go();
            *resumed = progress.resumed(fleet, base, t0, *d).await;
            sleep_supervised(fleet, d.saturating_sub(t0.elapsed())).await;
            rabbit_cluster::signal(node, "CONT").await?;
            if resumed.is_none() {
                // A paused node is not declared down before the distribution's tick
                // timeout (60 s by default): a queue it leads waits for it. Consumption
                // must then resume once it answers again.
                eprintln!("consumption did not resume during the pause; waiting for the node");
                *resumed = progress
                    .resumed(fleet, base, t0, *d + Duration::from_secs(60))
                    .await;
            }
        }
        other => return Err(format!("{other:?} is not a cluster fault")),
    }
    Ok(Some(Instant::now()))
}

/// Replays every dead letter of the run and waits (up to 60 s) until the workers have
/// dead-lettered each poison message again: the dead letters are readable and
/// replayable after the fault moved their queue's leader.
async fn replay_and_wait(
    transport: &Arc<dyn Transport>,
    spec: &Spec,
    poison: &HashSet<u64>,
    fleet: &mut Fleet,
) -> Result<(), String> {
    let before = read_dead(transport, spec).await?;
    let report = transport
        .replay_dead_letters(
            &spec.group,
            &steadfast::transport::DeadLetterFilter::default(),
            &|_| {},
        )
        .await
        .map_err(|e| format!("replaying the dead letters: {e}"))?;
    if report.done < poison.len() || report.failed > 0 {
        return Err(format!(
            "replayed {} dead letters of {} ({} read before; {:?})",
            report.done,
            poison.len(),
            before.len(),
            report.first_error
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        sleep_supervised(fleet, Duration::from_millis(500)).await;
        let (ids, _) = dead_ids(&read_dead(transport, spec).await?);
        if poison.iter().all(|n| ids.contains(n)) {
            return Ok(());
        }
    }
    Err("replayed dead letters did not come back to the dead-letter queue within 60 s".to_owned())
}

async fn sleep_supervised(fleet: &mut Fleet, d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        fleet.supervise();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Versions of the servers, for the report.
pub async fn versions(env: &Env) -> String {
    let mut out = String::new();
    let _ = write!(out, "{}", servers::versions(env).await);
    out
}
