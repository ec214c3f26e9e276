//! What a worker process is told: the broker, the names, the database, the limits and
//! the failpoints, passed as `FW_*` environment variables so the harness and the worker
//! build the same topology.

use std::{collections::BTreeMap, sync::Arc, time::Duration};
use steadfast::{
    Message, RetryPolicy,
    transport::{Transport, amqp::AmqpTransport, nats::NatsTransport},
};

/// How a message's handler behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Mode {
    /// Writes its effect and succeeds.
    Ok,
    /// Fails transiently on attempts `1..=k`, then succeeds.
    Transient(u32),
    /// Panics on attempts `1..=k`, then succeeds.
    Panic(u32),
    /// Hangs past the handler timeout on attempts `1..=k`, then succeeds.
    Hang(u32),
    /// Fails permanently: a poison message, dead-lettered with its reason.
    Permanent,
    /// Aborts the worker process every time: a crash loop, stopped by the delivery limit.
    Abort,
}

/// The model's message: `n` is the known id (and the idempotency key, so a copy published
/// under another message id is still the same message to the inbox).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "fault.work")]
pub struct Work {
    /// The known id.
    #[message(key)]
    pub n: u64,
    /// How the handler behaves.
    pub mode: Mode,
}

/// Which broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    /// RabbitMQ (quorum queues).
    Amqp,
    /// NATS JetStream.
    Nats,
}

impl Broker {
    /// The name in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            Broker::Amqp => "rabbitmq",
            Broker::Nats => "nats",
        }
    }
}

/// What the process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A steadfast worker with the model's handler.
    Worker,
    /// An outbox relay from the run's outbox table to the broker.
    Relay,
}

/// A worker process's configuration.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Worker or relay.
    pub role: Role,
    /// Which broker.
    pub broker: Broker,
    /// The broker URL (possibly through the harness's TCP proxy).
    pub broker_url: String,
    /// The run's unique name: the AMQP exchange and queue prefix, the NATS subject
    /// prefix and stream.
    pub name: String,
    /// The consumer group.
    pub group: String,
    /// The database URL, PostgreSQL or `mysql://` (possibly through the proxy).
    pub db_url: String,
    /// The run's schema: `effects`, `inbox`, `outbox` tables.
    pub schema: String,
    /// Concurrent handlers.
    pub concurrency: usize,
    /// Broker prefetch (AMQP `basic.qos`; NATS pulls), at least the concurrency.
    pub prefetch: usize,
    /// Handler timeout.
    pub handler_timeout: Duration,
    /// Drain timeout on SIGTERM.
    pub drain_timeout: Duration,
    /// Payload limit.
    pub max_payload_bytes: usize,
    /// RabbitMQ's delivery limit; NATS's `max_deliver` (at least the 8 attempts + 1).
    pub delivery_limit: u32,
    /// Failpoints to abort at: name -> hit number.
    pub abort_at: BTreeMap<String, u64>,
    /// The worker uses its store with `.inbox(store)` (a look, no lease) instead of
    /// `.idempotency(store)`.
    pub inbox_mode: bool,
}

fn var(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))
}

fn num<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

impl Spec {
    /// The suite's defaults for a run named `name`.
    pub fn new(broker: Broker, broker_url: String, db_url: String, name: &str) -> Self {
        Self {
            role: Role::Worker,
            broker,
            broker_url,
            name: name.to_owned(),
            group: "work".to_owned(),
            db_url,
            schema: name.replace('-', "_"),
            concurrency: 32,
            prefetch: 32,
            handler_timeout: Duration::from_millis(1000),
            drain_timeout: Duration::from_secs(10),
            max_payload_bytes: 64 * 1024,
            delivery_limit: 20,
            abort_at: BTreeMap::new(),
            inbox_mode: false,
        }
    }

    /// Reads the `FW_*` variables.
    pub fn from_env() -> Result<Self, String> {
        let broker = match var("FW_BROKER")?.as_str() {
            "amqp" => Broker::Amqp,
            "nats" => Broker::Nats,
            other => return Err(format!("FW_BROKER={other:?}: expected amqp or nats")),
        };
        let role = match std::env::var("FW_ROLE").as_deref() {
            Ok("relay") => Role::Relay,
            _ => Role::Worker,
        };
        let mut abort_at = BTreeMap::new();
        if let Ok(list) = std::env::var("FW_ABORT_AT") {
            for item in list.split(',').filter(|s| !s.is_empty()) {
                let (name, k) = item
                    .rsplit_once('@')
                    .ok_or_else(|| format!("FW_ABORT_AT item {item:?}: expected name@hit"))?;
                let k: u64 = k
                    .parse()
                    .map_err(|_| format!("FW_ABORT_AT item {item:?}: bad hit number"))?;
                abort_at.insert(name.to_owned(), k);
            }
        }
        Ok(Self {
            role,
            broker,
            broker_url: var("FW_BROKER_URL")?,
            name: var("FW_NAME")?,
            group: var("FW_GROUP")?,
            db_url: var("FW_DB_URL")?,
            schema: var("FW_SCHEMA")?,
            concurrency: num("FW_CONCURRENCY", 32)?,
            prefetch: num("FW_PREFETCH", 32)?,
            handler_timeout: Duration::from_millis(num("FW_HANDLER_TIMEOUT_MS", 1000)?),
            drain_timeout: Duration::from_millis(num("FW_DRAIN_MS", 10_000)?),
            max_payload_bytes: num("FW_MAX_PAYLOAD", 64 * 1024)?,
            delivery_limit: num("FW_DELIVERY_LIMIT", 20)?,
            abort_at,
            inbox_mode: std::env::var("FW_INBOX_MODE").is_ok_and(|v| v == "1"),
        })
    }

    /// The `FW_*` variables that [`from_env`](Self::from_env) reads back.
    pub fn to_env(&self) -> Vec<(String, String)> {
        let abort: Vec<String> = self
            .abort_at
            .iter()
            .map(|(n, k)| format!("{n}@{k}"))
            .collect();
        [
            (
                "FW_ROLE",
                if self.role == Role::Relay {
                    "relay"
                } else {
                    "worker"
                }
                .to_owned(),
            ),
            (
                "FW_BROKER",
                match self.broker {
                    Broker::Amqp => "amqp",
                    Broker::Nats => "nats",
                }
                .to_owned(),
            ),
            ("FW_BROKER_URL", self.broker_url.clone()),
            ("FW_NAME", self.name.clone()),
            ("FW_GROUP", self.group.clone()),
            ("FW_DB_URL", self.db_url.clone()),
            ("FW_SCHEMA", self.schema.clone()),
            ("FW_CONCURRENCY", self.concurrency.to_string()),
            ("FW_PREFETCH", self.prefetch.to_string()),
            (
                "FW_HANDLER_TIMEOUT_MS",
                self.handler_timeout.as_millis().to_string(),
            ),
            ("FW_DRAIN_MS", self.drain_timeout.as_millis().to_string()),
            ("FW_MAX_PAYLOAD", self.max_payload_bytes.to_string()),
            ("FW_DELIVERY_LIMIT", self.delivery_limit.to_string()),
            ("FW_ABORT_AT", abort.join(",")),
            ("FW_INBOX_MODE", u8::from(self.inbox_mode).to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// The suite's retry policy: 8 attempts, 100 ms doubling up to 2 s (about 7 s in
    /// all, so a database restart does not exhaust it).
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::exponential(Duration::from_millis(100))
            .max_attempts(8)
            .max_delay(Duration::from_secs(2))
            .jitter(0.0)
    }

    /// `schema.inbox`.
    pub fn inbox_table(&self) -> String {
        format!("{}.inbox", self.schema)
    }

    /// `schema.outbox`.
    pub fn outbox_table(&self) -> String {
        format!("{}.outbox", self.schema)
    }

    /// The NATS stream of the run.
    pub fn stream(&self) -> String {
        self.name.to_ascii_uppercase().replace('-', "_")
    }

    /// Connects the transport the spec names.
    pub async fn connect(
        &self,
    ) -> Result<Arc<dyn Transport>, steadfast::transport::TransportError> {
        Ok(match self.broker {
            Broker::Amqp => Arc::new(
                AmqpTransport::builder(self.broker_url.clone())
                    .exchange(self.name.clone())
                    .queue_prefix(format!("{}.", self.name))
                    .queue_expiry(Duration::from_secs(1800))
                    .delivery_limit(self.delivery_limit)
                    .operation_timeout(Duration::from_secs(5))
                    .max_reconnect_delay(Duration::from_secs(1))
                    .heartbeat(5)
                    .connect()
                    .await?,
            ),
            Broker::Nats => Arc::new(
                NatsTransport::builder(&self.broker_url)
                    .subject_prefix(self.name.clone())
                    .stream(self.stream())
                    .request_timeout(Duration::from_secs(3))
                    .ack_wait(Duration::from_secs(2))
                    .delivery_margin(self.delivery_limit.saturating_sub(8).max(1))
                    .connect()
                    .await?,
            ),
        })
    }
}
