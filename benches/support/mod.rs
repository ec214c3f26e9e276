//! What the benches share: CPU time of a process, the process's own resources, the
//! machine, and the result file every bench appends its figures to.
//!
//! Each figure is one JSON line in `BENCH_RESULTS` (default
//! `target/bench/results.jsonl`), tagged with `BENCH_RUN` (the run's id, which
//! `scripts/bench.sh` sets once for all the benches it runs) so the plots and the
//! tables compare only figures of one run.
//!
//! Every bench includes this module and uses a part of it.
#![allow(dead_code)]

use serde_json::{Value, json};
use std::{
    io::Write,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// Logs to standard error what `RUST_LOG` asks for, and nothing without it (the figures
/// go to standard output): `RUST_LOG=steadfast=debug cargo bench --bench nats`.
pub(crate) fn log_from_env() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// CPU time (user + system) of process `pid` (a number or `self`) so far: the figures
/// `getrusage` gives, read from `/proc/<pid>/stat` (`unsafe` is forbidden here).
pub(crate) fn proc_cpu(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line: 11 and 12 after the name.
    let hz = 100; // USER_HZ on Linux
    Some(Duration::from_micros(
        (ticks(11) + ticks(12)) * 1_000_000 / hz,
    ))
}

/// CPU time of the processes in `pids` (comma-separated: a cluster's nodes) so far.
pub(crate) fn pids_cpu(pids: &str) -> Option<Duration> {
    pids.split(',').map(|p| proc_cpu(p.trim())).sum()
}

/// CPU time of this process so far.
pub(crate) fn cpu() -> Duration {
    proc_cpu("self").unwrap_or_default()
}

/// The pid in the environment variable `env` when it is set (`scripts/bench.sh` sets it
/// to the process listening on the broker's port), else the first process whose command
/// name is `comm` (`beam.smp`, `nats-server`).
pub(crate) fn find_process(comm: &str, env: &str) -> Option<String> {
    if let Ok(pid) = std::env::var(env) {
        return Some(pid);
    }
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let name = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (name.trim() == comm).then(|| e.file_name().to_string_lossy().into_owned())
    })
}

/// Replicas of the streams a NATS bench creates: `BENCH_NATS_REPLICAS` (3 on a
/// three-node cluster, so the worker and the raw client read R3 streams), default 1.
pub(crate) fn nats_replicas() -> usize {
    std::env::var("BENCH_NATS_REPLICAS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// Resident memory of this process in KiB (`VmRSS`).
pub(crate) fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Open file descriptors of this process, and how many of them are sockets.
pub(crate) fn fds() -> (usize, usize) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return (0, 0);
    };
    let mut all = 0;
    let mut sockets = 0;
    for e in dir.flatten() {
        all += 1;
        if std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:")) {
            sockets += 1;
        }
    }
    (all, sockets)
}

/// Wall time, this process's CPU time and a broker's over one phase.
pub(crate) struct Meter {
    t0: std::time::Instant,
    cpu0: Duration,
    broker: Option<(String, Duration)>,
}

/// What one phase took.
pub(crate) struct Took {
    pub(crate) wall: Duration,
    pub(crate) cpu: Duration,
    pub(crate) broker: Option<Duration>,
}

impl Meter {
    /// Starts measuring; `broker` is the broker's pid (or its nodes', comma-separated),
    /// when it runs on this machine.
    pub(crate) fn start(broker: Option<String>) -> Self {
        let broker = broker.and_then(|p| pids_cpu(&p).map(|c| (p, c)));
        Self {
            t0: std::time::Instant::now(),
            cpu0: cpu(),
            broker,
        }
    }

    pub(crate) fn stop(self) -> Took {
        Took {
            wall: self.t0.elapsed(),
            cpu: cpu() - self.cpu0,
            broker: self
                .broker
                .and_then(|(p, c0)| pids_cpu(&p).map(|c| c.saturating_sub(c0))),
        }
    }
}

impl Took {
    /// msgs/s, client CPU µs/msg and broker CPU µs/msg for `n` messages, as JSON fields.
    pub(crate) fn fields(&self, n: usize) -> Value {
        let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        json!({
            "messages": n,
            "msgs_per_s": n as f64 / self.wall.as_secs_f64(),
            "client_cpu_us": per(self.cpu),
            "broker_cpu_us": self.broker.map(per),
        })
    }
}

/// The median of `v` (the mean of the middle two for an even count); NaN when empty.
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 0 => (v[m - 1] + v[m]) / 2.0,
        _ => v[m],
    }
}

/// An environment variable parsed, or `default`.
pub(crate) fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the figures ran on: cores, CPU model, load average when the bench started.
pub(crate) fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok());
    let mem_gib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map(|kib| (kib / 1024.0 / 1024.0).round())
    });
    json!({ "cores": cores, "cpu": model, "mem_gib": mem_gib, "load1": load })
}

/// Appends figures to the run's result file.
pub(crate) struct Results {
    path: PathBuf,
    run: String,
    bench: &'static str,
    machine: Value,
    brokers: Value,
}

impl Results {
    /// The result file of bench `bench`; `brokers` names the servers and their versions.
    pub(crate) fn new(bench: &'static str, brokers: Value) -> Self {
        let path = std::env::var("BENCH_RESULTS").map_or_else(
            |_| PathBuf::from("target/bench/results.jsonl"),
            PathBuf::from,
        );
        let run = std::env::var("BENCH_RUN")
            .unwrap_or_else(|_| format!("{}-{}", now_secs(), std::process::id()));
        Self {
            path,
            run,
            bench,
            machine: machine(),
            brokers,
        }
    }

    /// Appends one figure: `fields` plus the run, the bench, the machine, the brokers
    /// and the time. A bench that cannot write its result fails loudly.
    pub(crate) fn record(&self, mut fields: Value) {
        let obj = fields.as_object_mut().expect("a JSON object");
        obj.insert("run".into(), json!(self.run));
        obj.insert("bench".into(), json!(self.bench));
        obj.insert("machine".into(), self.machine.clone());
        obj.insert("brokers".into(), self.brokers.clone());
        obj.insert("time".into(), json!(now_secs()));
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).expect("result directory");
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", self.path.display()));
        writeln!(f, "{fields}").expect("result written");
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The RabbitMQ version the bench talks to, as `scripts/bench.sh` read it
/// (`BENCH_RABBITMQ_VERSION`; lapin does not show the server's properties).
pub(crate) fn rabbitmq_version() -> String {
    std::env::var("BENCH_RABBITMQ_VERSION").unwrap_or_else(|_| "unknown".into())
}
