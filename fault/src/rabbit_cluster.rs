//! The three-node RabbitMQ cluster of `scripts/brokers/rabbitmq-cluster.sh` (nodes
//! `sf-c1@localhost`.. on 127.0.0.1:5701-5703): start it, act on one node (SIGKILL,
//! SIGSTOP/SIGCONT, `stop_app`/`start_app`), find a queue's leader, and a guard that
//! brings every node back whatever happens.

use std::{path::PathBuf, process::Stdio, time::Duration};
use tokio::process::Command;

type Res<T> = Result<T, String>;

/// The nodes, 1-based.
pub const NODES: [u8; 3] = [1, 2, 3];

/// The AMQP URL of node `n`.
pub fn node_url(n: u8) -> String {
    format!("amqp://guest:guest@127.0.0.1:{}/%2f", 5700 + u16::from(n))
}

/// The cluster as a worker is given it: every node, comma-separated, node 1 first (so
/// every worker starts on node 1: "the worker's node").
pub fn urls() -> String {
    NODES.map(node_url).join(",")
}

/// The cluster with node `first` first, then the others in order: workers given it
/// connect to node `first`.
pub fn urls_from(first: u8) -> String {
    let mut order = vec![first];
    order.extend(NODES.into_iter().filter(|n| *n != first));
    order
        .into_iter()
        .map(node_url)
        .collect::<Vec<_>>()
        .join(",")
}

/// The Erlang node name of node `n`.
pub fn node_name(n: u8) -> String {
    format!("sf-c{n}@localhost")
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/brokers.sh")
}

async fn brokers(args: &[&str]) -> Res<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        Command::new(script())
            .arg("rabbitmq-cluster")
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| format!("scripts/brokers.sh rabbitmq-cluster {args:?} took over 300 s"))?
    .map_err(|e| format!("cannot run scripts/brokers.sh: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "scripts/brokers.sh rabbitmq-cluster {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Starts the nodes that are not running (all three on a fresh machine, installing
/// rabbitmq-server if needed) and waits until the three see each other.
pub async fn start() -> Res<()> {
    brokers(&["start"]).await.map(drop)
}

/// `rabbitmqctl` on node `n`.
pub async fn ctl(n: u8, args: &[&str]) -> Res<String> {
    let node = n.to_string();
    let mut all = vec!["ctl", node.as_str()];
    all.extend_from_slice(args);
    brokers(&all).await
}

/// The OS process id of node `n`'s Erlang VM.
pub async fn pid(n: u8) -> Res<i32> {
    brokers(&["pid", &n.to_string()])
        .await?
        .trim()
        .parse()
        .map_err(|e| format!("pid of node {n}: {e}"))
}

/// Sends `signal` (`KILL`, `STOP`, `CONT`) to node `n`'s Erlang VM.
pub async fn signal(n: u8, signal: &str) -> Res<()> {
    let pid = pid(n).await?;
    let ok = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .await
        .map_err(|e| e.to_string())?
        .success();
    if ok {
        Ok(())
    } else {
        Err(format!("kill -{signal} {pid} (node {n}) failed"))
    }
}

/// The node (1..=3) that leads quorum queue `queue`, as a running node other than
/// `avoid` sees it.
pub async fn leader_of(queue: &str, avoid: Option<u8>) -> Res<u8> {
    let ask = NODES.into_iter().find(|n| Some(*n) != avoid).unwrap_or(1);
    let out = ctl(
        ask,
        &["-q", "list_queues", "name", "leader", "--no-table-headers"],
    )
    .await?;
    for line in out.lines() {
        let mut cols = line.split('\t');
        if cols.next() == Some(queue) {
            let leader = cols.next().unwrap_or_default().trim();
            return NODES
                .into_iter()
                .find(|n| node_name(*n) == leader)
                .ok_or_else(|| format!("queue `{queue}` has no leader among the nodes: {line}"));
        }
    }
    Err(format!("queue `{queue}` not found on the cluster"))
}

/// Brings every node back when dropped: SIGCONT to a paused node, then `start` (which
/// starts a killed node again, and `start_app` for a stopped application).
#[derive(Debug)]
pub struct RestoreCluster;

impl Drop for RestoreCluster {
    fn drop(&mut self) {
        let script = script();
        for n in NODES {
            let pid = std::process::Command::new(&script)
                .args(["rabbitmq-cluster", "pid", &n.to_string()])
                .stderr(Stdio::null())
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
            if let Some(pid) = pid.filter(|p| !p.is_empty()) {
                let _ = std::process::Command::new("kill")
                    .args(["-CONT", &pid])
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = std::process::Command::new(&script)
                .args(["rabbitmq-cluster", "ctl", &n.to_string(), "-q", "start_app"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::process::Command::new(&script)
            .args(["rabbitmq-cluster", "start"])
            .stdout(Stdio::null())
            .status();
    }
}
