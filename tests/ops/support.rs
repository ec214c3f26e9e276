//! Shared helpers: the example binary, a child worker process with its output captured,
//! a minimal HTTP GET, unique names and RabbitMQ clean-up.

use lapin::{
    Connection, ConnectionProperties,
    options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
};
use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::Instant,
};

/// The local RabbitMQ.
pub(crate) const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How long anything may take before a test gives up (a stuck system is a failure).
pub(crate) const DEADLINE: Duration = Duration::from_secs(60);

/// A name no other test (or earlier run) uses.
pub(crate) fn unique(tag: &str) -> String {
    format!("sf-test-{tag}-{}", uuid::Uuid::now_v7().simple())
}

/// The `container_worker` example as the test build itself made it: `cargo test --no-run
/// --workspace --all-features`, the build nextest runs before the tests, which compiles
/// every example once (as a program, not as a test) to check it builds. When the suite was
/// built that way this is a fingerprint check of well under a second. A `cargo build
/// --example` of its own, in either the `dev` or the `test` profile, built the proc-macro
/// and build-script dependencies again in another profile: 141 crates, 98 s on an idle
/// machine, and in CI one to two minutes of the first two tests that asked for it.
pub(crate) fn example_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let mut cargo = Command::new(env!("CARGO"));
        // Without the variables cargo sets for this test process: a build script that
        // watches one (ring's: CARGO_MANIFEST_DIR) would otherwise see it change, and
        // ring and everything above it would be rebuilt here, then again by the next
        // plain cargo command.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if [
                "CARGO_MANIFEST_",
                "CARGO_PKG_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .iter()
            .any(|p| k.starts_with(p))
            {
                cargo.env_remove(&*k);
            }
        }
        let out = cargo
            .args([
                "test",
                "--no-run",
                "--quiet",
                "--workspace",
                "--all-features",
                "--message-format=json",
                "--manifest-path",
                concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
            ])
            .stderr(Stdio::inherit())
            .output()
            .expect("run cargo test --no-run for the container_worker example");
        assert!(out.status.success(), "building container_worker failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| {
                v["reason"] == "compiler-artifact"
                    && v["target"]["name"] == "container_worker"
                    && v["profile"]["test"].as_bool() == Some(false)
            })
            .find_map(|v| v["executable"].as_str().map(PathBuf::from))
            .expect("cargo reports the container_worker executable")
    })
    .clone()
}

/// A worker process; its standard output and error are collected line by line.
pub(crate) struct WorkerProcess {
    child: Child,
    pub(crate) stdout: Arc<Mutex<Vec<String>>>,
    pub(crate) stderr: Arc<Mutex<Vec<String>>>,
}

impl WorkerProcess {
    /// Starts the example with exactly `env` (plus `RUST_LOG=info`) as its environment.
    pub(crate) fn start(env: &[(&str, String)]) -> Self {
        let mut cmd = Command::new(example_binary());
        cmd.env_clear()
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start container_worker");
        let stdout = collect(child.stdout.take().expect("stdout"));
        let stderr = collect(child.stderr.take().expect("stderr"));
        Self {
            child,
            stdout,
            stderr,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub(crate) fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Sends SIGTERM, as a container runtime does.
    pub(crate) fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Waits for the exit, failing the test after the deadline.
    pub(crate) async fn wait(&mut self) -> ExitStatus {
        let until = Instant::now() + DEADLINE;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                // Let the reader threads take the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return s;
            }
            assert!(Instant::now() < until, "the worker did not exit in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The first stdout line for which `f` holds, waiting for it.
    pub(crate) async fn line(&mut self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + DEADLINE;
        loop {
            if let Some(l) = self.stdout.lock().unwrap().iter().find(|l| f(l)) {
                return l.clone();
            }
            if !self.running() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "the worker exited before logging {what}; stderr: {:?}",
                    self.stderr.lock().unwrap()
                );
            }
            assert!(Instant::now() < until, "no log line: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The address of its health and metrics server, from its start-up log line.
    pub(crate) async fn http_addr(&mut self) -> String {
        let l = self
            .line("the http address", |l| l.contains("\"http_addr\""))
            .await;
        let v: serde_json::Value = serde_json::from_str(&l).expect("JSON log line");
        v["fields"]["http_addr"]
            .as_str()
            .expect("http_addr field")
            .to_owned()
    }

    /// Everything it wrote.
    pub(crate) fn output(&self) -> String {
        let mut s = self.stdout.lock().unwrap().join("\n");
        s.push('\n');
        s.push_str(&self.stderr.lock().unwrap().join("\n"));
        s
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect(r: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let out = lines.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            out.lock().unwrap().push(l);
        }
    });
    lines
}

/// `GET http://{addr}{path}`: the status code and the body. HTTP/1.1 with
/// `Connection: close`, all a probe needs.
pub(crate) async fn get(addr: &str, path: &str) -> (u16, String) {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .expect("HTTP answer in time")
        .expect("HTTP GET");
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("an HTTP status line");
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Polls `GET path` until it answers `status`.
pub(crate) async fn wait_status(addr: &str, path: &str, status: u16) -> String {
    let until = Instant::now() + DEADLINE;
    loop {
        let (s, body) = get(addr, path).await;
        if s == status {
            return body;
        }
        assert!(
            Instant::now() < until,
            "{path} never answered {status}; last {s}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the Prometheus sample named `name` whose labels contain every one of
/// `labels` (`key="value"`), or 0 when there is none yet.
pub(crate) fn sample(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `/metrics` until `name{labels}` reaches `at_least`; returns the last scrape.
pub(crate) async fn wait_metric(addr: &str, name: &str, labels: &[&str], at_least: f64) -> String {
    let until = Instant::now() + DEADLINE;
    loop {
        let (_, body) = get(addr, "/metrics").await;
        if sample(&body, name, labels) >= at_least {
            return body;
        }
        assert!(
            Instant::now() < until,
            "{name}{labels:?} never reached {at_least}; last scrape:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Messages ready in a RabbitMQ queue.
pub(crate) async fn queue_depth(queue: &str) -> u32 {
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be running on 127.0.0.1:5672");
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the queue exists");
    let n = q.message_count();
    let _ = conn.close(200, "OK".into()).await;
    n
}

/// Deletes what a worker of `group` declared under `prefix` on `exchange`.
pub(crate) async fn remove_topology(exchange: &str, prefix: &str, group: &str) {
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be running on 127.0.0.1:5672");
    let ch = conn.create_channel().await.expect("channel");
    let queue = format!("{prefix}{group}");
    let mut names = vec![queue.clone(), format!("{queue}.dlq")];
    for d in steadfast::RetryPolicy::default().delay_tiers() {
        names.push(format!("{queue}.delay.{}ms", d.as_millis().max(1)));
    }
    for n in names {
        let _ = ch
            .queue_delete(n.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await;
    let _ = conn.close(200, "OK".into()).await;
}
