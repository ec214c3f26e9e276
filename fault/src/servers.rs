//! The servers around a run: rabbitmqctl and pg_ctlcluster (with guards that bring the
//! shared servers back whatever happens), a private nats-server, queue depths, raw bad
//! input from plain clients, versions.

use crate::spec::{Broker, Spec};
use futures::StreamExt;
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};
use tokio::process::{Child, Command};

type Res<T> = Result<T, String>;

/// `host:port` of a URL.
pub fn addr_of(url: &str) -> Res<SocketAddr> {
    let u = url::Url::parse(url).map_err(|e| format!("bad url: {e}"))?;
    let host = u.host_str().unwrap_or("127.0.0.1");
    let port = u.port_or_known_default().or(match u.scheme() {
        "amqp" => Some(5672),
        "nats" => Some(4222),
        "postgres" | "postgresql" => Some(5432),
        "mysql" | "mariadb" => Some(3306),
        _ => None,
    });
    format!("{host}:{}", port.ok_or("url without a port")?)
        .parse()
        .map_err(|e| format!("bad address: {e}"))
}

/// `url` pointed at `addr` instead.
pub fn with_addr(url: &str, addr: SocketAddr) -> Res<String> {
    let mut u = url::Url::parse(url).map_err(|e| format!("bad url: {e}"))?;
    u.set_host(Some(&addr.ip().to_string()))
        .map_err(|e| format!("bad host: {e}"))?;
    u.set_port(Some(addr.port()))
        .map_err(|()| "cannot set the port".to_owned())?;
    Ok(u.to_string())
}

/// Runs `cmd args` within two minutes (a server's stop or restart takes seconds).
async fn run(cmd: &str, args: &[&str]) -> Res<String> {
    run_within(cmd, args, Duration::from_secs(120)).await
}

/// Runs `cmd args` and returns its standard output; the process is killed if it has not
/// finished within `limit`.
async fn run_within(cmd: &str, args: &[&str], limit: Duration) -> Res<String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(limit, out)
        .await
        .map_err(|_| format!("{cmd} {args:?} did not answer within {limit:?}"))?
        .map_err(|e| format!("cannot run {cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A raw connection to the first node of `urls` (one URL, or a cluster's comma-separated
/// list) that takes it.
async fn amqp_connect(urls: &str) -> Res<lapin::Connection> {
    let mut last = String::from("no RabbitMQ URL");
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        match tokio::time::timeout(
            Duration::from_secs(10),
            lapin::Connection::connect(url, lapin::ConnectionProperties::default()),
        )
        .await
        {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(e)) => last = format!("connecting to RabbitMQ: {e}"),
            Err(_) => last = "connecting to RabbitMQ timed out".to_owned(),
        }
    }
    Err(last)
}

/// Runs `rabbitmqctl args`.
pub async fn rabbitmqctl(args: &[&str]) -> Res<()> {
    run("rabbitmqctl", args).await.map(drop)
}

/// Runs `pg_ctlcluster --skip-systemctl-redirect 15 main <action>`.
pub async fn pg_ctl(action: &str) -> Res<()> {
    run(
        "pg_ctlcluster",
        &["--skip-systemctl-redirect", &pg_version(), "main", action],
    )
    .await
    .map(drop)
}

fn pg_version() -> String {
    std::fs::read_dir("/etc/postgresql")
        .ok()
        .and_then(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .max()
        })
        .unwrap_or_else(|| "15".to_owned())
}

/// Starts the RabbitMQ application again when dropped (after a test that stopped it),
/// and waits until it accepts work.
#[derive(Debug)]
pub struct RestoreBroker;

impl Drop for RestoreBroker {
    fn drop(&mut self) {
        let ok = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::process::Command::new("rabbitmq-server")
                .arg("-detached")
                .status();
        }
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["await_startup", "--timeout", "60"])
            .stdout(Stdio::null())
            .status();
    }
}

/// Starts PostgreSQL when dropped (`start` does nothing if it is running).
#[derive(Debug)]
pub struct RestorePostgres;

impl Drop for RestorePostgres {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", &pg_version(), "main", "start"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The nats-server binary of private servers: `STEADFAST_TEST_NATS_SERVER` (for example
/// `scripts/brokers.sh nats-versions bin 2.15.1`), else the machine's
/// `/usr/sbin/nats-server`.
pub fn nats_server_bin() -> String {
    std::env::var("STEADFAST_TEST_NATS_SERVER")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "/usr/sbin/nats-server".to_owned())
}

/// A private nats-server with JetStream on its own port and store directory; killed
/// and its directory removed when dropped.
#[derive(Debug)]
pub struct NatsServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts one on `port` and waits until it listens.
    pub async fn start(port: u16) -> Res<Self> {
        let dir = std::env::temp_dir().join(format!(
            "steadfast-fault-nats-{port}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("nats store dir: {e}"))?;
        let mut s = Self {
            port,
            dir,
            child: None,
        };
        s.start_again().await?;
        Ok(s)
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts it (again, on the same store) and waits for the port.
    pub async fn start_again(&mut self) -> Res<()> {
        let child = Command::new(nats_server_bin())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("nats-server at {}: {e}", nats_server_bin()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                return Err("the private nats-server did not start".to_owned());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Stops it with SIGTERM (a clean shutdown, as a restart would) and waits.
    pub async fn stop(&mut self) {
        crate::mariadb::terminate(self.child.take(), Duration::from_secs(20)).await;
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The group's work, suspects and delay queues.
fn group_queues(spec: &Spec) -> Vec<String> {
    let work = format!("{}.{}", spec.name, spec.group);
    let mut queues = vec![work.clone(), format!("{work}.suspects")];
    for d in spec.retry_policy().delay_tiers() {
        queues.push(format!("{work}.delay.{}ms", d.as_millis()));
    }
    queues
}

/// Ready messages in the group's work, suspects and delay queues (after the workers stopped
/// this includes everything they had unacked).
pub async fn amqp_queue_depth(spec: &Spec) -> Res<u64> {
    use lapin::{options::QueueDeclareOptions, types::FieldTable};
    let conn = amqp_connect(&spec.broker_url).await?;
    let mut total = 0;
    for q in group_queues(spec) {
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| format!("channel: {e}"))?;
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            ch.queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .map_err(|_| "queue.declare timed out".to_owned())?;
        match r {
            Ok(queue) => total += u64::from(queue.message_count()),
            Err(e) => return Err(format!("queue `{q}`: {e}")),
        }
        let _ = ch.close(200, "OK".into()).await;
    }
    let _ = conn.close(200, "OK".into()).await;
    Ok(total)
}

/// Messages of the group's work, suspects and delay queues that RabbitMQ handed out
/// and that are not settled yet (`messages_unacknowledged`), which a passive
/// `queue.declare` does not show: read with `rabbitmqctl` from the node
/// `spec.broker_url` names, within 20 s. `None` for a node this harness cannot reach
/// with `rabbitmqctl` (one not started by `scripts/brokers.sh` nor the machine's own on
/// 5672).
pub async fn amqp_unacked(spec: &Spec) -> Res<Option<u64>> {
    let first = spec.broker_url.split(',').next().unwrap_or_default();
    let port = addr_of(first)?.port();
    let brokers = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/brokers.sh");
    let list = [
        "-q",
        "list_queues",
        "name",
        "messages_unacknowledged",
        "--no-table-headers",
    ];
    let n = port.saturating_sub(5700).to_string();
    let (cmd, mut args) = match port {
        5672 => ("rabbitmqctl", vec![]),
        5701..=5703 => (brokers, vec!["rabbitmq-cluster", "ctl", n.as_str()]),
        5710 => (brokers, vec!["rabbitmq-4", "ctl"]),
        _ => return Ok(None),
    };
    args.extend(list);
    let out = run_within(cmd, &args, Duration::from_secs(20)).await?;
    let queues = group_queues(spec);
    let mut total = 0;
    for line in out.lines() {
        let mut cols = line.split_whitespace();
        let (Some(name), Some(n)) = (cols.next(), cols.next()) else {
            continue;
        };
        if queues.iter().any(|q| q == name) {
            total += n
                .parse::<u64>()
                .map_err(|e| format!("rabbitmqctl printed `{line}`: {e}"))?;
        }
    }
    Ok(Some(total))
}

/// Deletes the run's queues (work, delay tiers, dead letters) and exchange, so runs do
/// not pile up quorum queues on the shared broker.
pub async fn amqp_delete_topology(spec: &Spec) -> Res<()> {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let conn = amqp_connect(&spec.broker_url).await?;
    let work = format!("{}.{}", spec.name, spec.group);
    let mut queues = vec![
        work.clone(),
        format!("{work}.dlq"),
        format!("{work}.suspects"),
    ];
    for d in spec.retry_policy().delay_tiers() {
        queues.push(format!("{work}.delay.{}ms", d.as_millis()));
    }
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    for q in queues {
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()),
        )
        .await;
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        ch.exchange_delete(spec.name.as_str().into(), ExchangeDeleteOptions::default()),
    )
    .await;
    let _ = conn.close(200, "OK".into()).await;
    Ok(())
}

/// Pending plus ack-pending messages of the group's consumers.
pub async fn nats_pending(spec: &Spec) -> Res<u64> {
    let client = async_nats::connect(&spec.broker_url)
        .await
        .map_err(|e| format!("connecting to NATS: {e}"))?;
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream(spec.stream())
        .await
        .map_err(|e| format!("stream: {e}"))?;
    let want = format!("steadfast group {}", spec.group);
    let mut total = 0u64;
    let mut infos = stream.consumers();
    while let Some(i) = infos.next().await {
        let i = i.map_err(|e| format!("consumer info: {e}"))?;
        if i.config.description.as_deref() == Some(want.as_str()) {
            total += i.num_pending + i.num_ack_pending as u64;
        }
    }
    Ok(total)
}

/// Deletes the run's streams from the shared NATS server.
pub async fn delete_nats_streams(spec: &Spec) -> Res<()> {
    let client = async_nats::connect(&spec.broker_url)
        .await
        .map_err(|e| format!("connecting to NATS: {e}"))?;
    let js = async_nats::jetstream::new(client);
    let s = spec.stream();
    let _ = js.delete_stream(format!("{s}_DLQ")).await;
    let _ = js.delete_stream(&s).await;
    Ok(())
}

/// One raw input: case, id header, type header, body, extra headers.
type BadCase = (
    &'static str,
    Option<String>,
    &'static str,
    Vec<u8>,
    Vec<(&'static str, &'static str)>,
);

/// Publishes raw bad input with a plain client; returns how many must be dead-lettered.
/// Each carries a `case` header, so dead letters are counted by case.
pub async fn publish_bad_input(spec: &Spec) -> Res<u64> {
    let id = || steadfast::MessageId::new().to_string();
    let big = vec![b' '; spec.max_payload_bytes + 1];
    let cases: Vec<BadCase> = vec![
        (
            "invalid-json",
            Some(id()),
            "fault.work",
            b"{\"n\": ".to_vec(),
            vec![],
        ),
        (
            "wrong-schema",
            Some(id()),
            "fault.work",
            br#"{"n":"x"}"#.to_vec(),
            vec![],
        ),
        (
            "unknown-type",
            Some(id()),
            "fault.nobody",
            br#"{}"#.to_vec(),
            vec![],
        ),
        (
            "non-utf8",
            Some(id()),
            "fault.work",
            vec![0xff, 0xfe, 0x00],
            vec![],
        ),
        ("oversize", Some(id()), "fault.work", big, vec![]),
        (
            "missing-id",
            None,
            "fault.work",
            br#"{"n":1,"mode":"Ok"}"#.to_vec(),
            vec![],
        ),
        (
            "bad-id",
            Some("order-17".to_owned()),
            "fault.work",
            br#"{"n":1,"mode":"Ok"}"#.to_vec(),
            vec![],
        ),
        (
            "forged-attempt-poison",
            Some(id()),
            "fault.work",
            br#"{"n":"forged"}"#.to_vec(),
            vec![("steadfast-attempt", "999")],
        ),
    ];
    let n = cases.len() as u64;
    match spec.broker {
        Broker::Amqp => {
            use lapin::{
                BasicProperties, Connection, ConnectionProperties,
                options::{BasicPublishOptions, ConfirmSelectOptions},
                types::{AMQPValue, FieldTable, LongString},
            };
            let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
            let conn = Connection::connect(&spec.broker_url, ConnectionProperties::default())
                .await
                .map_err(|e| format!("raw AMQP connection: {e}"))?;
            let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| e.to_string())?;
            let work_queue = format!("{}.{}", spec.name, spec.group);
            for (case, cid, ty, body, extra) in cases {
                let mut h = FieldTable::default();
                h.insert("cloudEvents:specversion".into(), text("1.0"));
                if let Some(i) = &cid {
                    h.insert("cloudEvents:id".into(), text(i));
                }
                h.insert("cloudEvents:type".into(), text(ty));
                h.insert("case".into(), text(case));
                for (k, v) in extra {
                    h.insert(k.into(), text(v));
                }
                let props = BasicProperties::default()
                    .with_headers(h)
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into());
                // Straight into the work queue, so an unknown type arrives too.
                let confirm = ch
                    .basic_publish(
                        "".into(),
                        work_queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        props,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                confirm.await.map_err(|e| e.to_string())?;
            }
            let _ = conn.close(200, "OK".into()).await;
        }
        Broker::Nats => {
            let client = async_nats::connect(&spec.broker_url)
                .await
                .map_err(|e| format!("raw NATS connection: {e}"))?;
            let js = async_nats::jetstream::new(client);
            let subject = format!("{}.fault.work", spec.name);
            for (case, cid, ty, body, extra) in cases {
                let mut h = async_nats::HeaderMap::new();
                if let Some(i) = &cid {
                    h.insert("ce-id", i.as_str());
                }
                h.insert("ce-type", ty);
                h.insert("case", case);
                for (k, v) in extra {
                    h.insert(k, v);
                }
                js.publish_with_headers(subject.clone(), h, body.into())
                    .await
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(n)
}

/// RabbitMQ, NATS and PostgreSQL versions, one line.
pub async fn versions(env: &crate::harness::Env) -> String {
    let rabbit = run("rabbitmqctl", &["version"])
        .await
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".to_owned());
    let nats = run("/usr/sbin/nats-server", &["--version"])
        .await
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".to_owned());
    let pg = match sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&env.db_url)
        .await
    {
        Ok(p) => sqlx::query_scalar::<_, String>("SHOW server_version")
            .fetch_one(&p)
            .await
            .unwrap_or_else(|_| "?".to_owned()),
        Err(_) => "?".to_owned(),
    };
    let maria = run("/usr/sbin/mariadbd", &["--version"])
        .await
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".to_owned());
    format!("RabbitMQ {rabbit}, {nats}, PostgreSQL {pg}, {maria} (private)")
}
