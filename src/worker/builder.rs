//! Building a worker: every setting validated in `build()`, never a panic.

use super::{
    Worker, WorkerState,
    breaker::{Breaker, KillSwitch},
    metrics::WorkerMetrics,
    pipeline::{OutcomeHook, Processed, Route, Shared, TypedRoute},
};
use crate::{
    config::WorkerConfig,
    handler::Handler,
    idempotency::{IdempotencyStore, OnMismatch},
    message::{Message, validate_name},
    retry::RetryPolicy,
    transport::{Subscription, Transport},
};
use std::{collections::HashMap, fmt, sync::Arc, time::Duration};
use tokio::sync::watch;

/// The most concurrent handlers a worker may run.
pub const MAX_CONCURRENCY: usize = 10_000;

/// Where a message's JSON Schema comes from ([`Message::json_schema`]).
type SchemaFn = fn() -> Option<serde_json::Value>;

/// What [`WorkerBuilder::described`] tells: group, transport system, messages with their
/// schemas, attempt limit.
pub(crate) type Described<'a> = (
    &'a str,
    &'static str,
    Vec<(&'static str, Option<serde_json::Value>)>,
    u32,
);

/// Builds a [`Worker`]; see [`Worker::builder`].
pub struct WorkerBuilder {
    transport: Arc<dyn Transport>,
    group: String,
    routes: Vec<(&'static str, Arc<dyn Route>)>,
    policy: RetryPolicy,
    store: Option<Arc<dyn IdempotencyStore>>,
    /// The store is used as an inbox (look, no lease) rather than with leases.
    inbox_only: bool,
    on_mismatch: OnMismatch,
    concurrency: usize,
    handler_timeout: Duration,
    drain_timeout: Duration,
    max_payload_bytes: usize,
    prefetch: Option<usize>,
    crash_limit: u32,
    hook: Option<OutcomeHook>,
    kill_switch: Option<KillSwitch>,
    /// Each routed message's JSON Schema source, for `asyncapi`.
    schemas: Vec<(&'static str, SchemaFn)>,
}

impl fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("transport", &self.transport.system())
            .field("group", &self.group)
            .field(
                "names",
                &self.routes.iter().map(|r| r.0).collect::<Vec<_>>(),
            )
            .field("policy", &self.policy)
            .field("idempotency", &self.store.is_some())
            .field("inbox_only", &self.inbox_only)
            .field("on_mismatch", &self.on_mismatch)
            .field("concurrency", &self.concurrency)
            .field("handler_timeout", &self.handler_timeout)
            .field("drain_timeout", &self.drain_timeout)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("prefetch", &self.prefetch)
            .field("crash_limit", &self.crash_limit)
            .finish()
    }
}

/// A worker's configuration is invalid.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid worker configuration for group `{group}`: {problems}")]
pub struct BuildError {
    group: String,
    problems: String,
}

impl WorkerBuilder {
    pub(super) fn new(transport: Arc<dyn Transport>, group: String) -> Self {
        Self {
            transport,
            group,
            routes: Vec::new(),
            policy: RetryPolicy::default(),
            store: None,
            inbox_only: false,
            on_mismatch: OnMismatch::Warn,
            concurrency: 16,
            handler_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(20),
            max_payload_bytes: 1 << 20,
            prefetch: None,
            crash_limit: crate::transport::crash::DEFAULT_CRASH_LIMIT,
            hook: None,
            kill_switch: None,
            schemas: Vec::new(),
        }
    }

    /// Routes messages named `M::NAME` to `handler`. One handler per message name.
    pub fn handle<M: Message, H: Handler<M>>(mut self, handler: H) -> Self {
        self.routes
            .push((M::NAME, Arc::new(TypedRoute::<M, H>::new(handler))));
        self.schemas.push((M::NAME, M::json_schema));
        self
    }

    /// The group, the transport's system and each routed message name with its JSON
    /// Schema, for documents such as AsyncAPI.
    #[cfg_attr(not(feature = "asyncapi"), allow(dead_code))]
    pub(crate) fn described(&self) -> Described<'_> {
        let msgs = self.schemas.iter().map(|(n, f)| (*n, f())).collect();
        (
            &self.group,
            self.transport.system(),
            msgs,
            self.policy.attempts(),
        )
    }

    /// The retry policy (default: [`RetryPolicy::default`]).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// What to do with a delivery whose idempotency key was already taken by a message
    /// with another payload (default [`OnMismatch::Warn`]: a warning and the
    /// [`PAYLOAD_MISMATCH`](crate::idempotency::PAYLOAD_MISMATCH) counter, then the
    /// delivery is the duplicate its key says). [`OnMismatch::DeadLetter`] dead-letters
    /// it with the reason instead. The stores keep a fingerprint of each key's payload;
    /// the comparison is made only for deliveries found to be duplicates, so it costs
    /// nothing on the common path.
    ///
    /// ```
    /// use steadfast::{Worker, idempotency::{MemoryStore, OnMismatch}, transport::memory::MemoryTransport};
    /// let builder = Worker::builder(MemoryTransport::new(), "billing")
    ///     .idempotency(MemoryStore::new())
    ///     .on_payload_mismatch(OnMismatch::DeadLetter);
    /// ```
    pub fn on_payload_mismatch(mut self, on: OnMismatch) -> Self {
        self.on_mismatch = on;
        self
    }

    /// Deduplicates deliveries through `store` (keys scoped by group and message name):
    /// before the handler the worker takes the key with a lease, so a second delivery of
    /// a message in flight waits instead of running at the same time; after success it
    /// marks the key done. For handlers whose effects are outside your database. When
    /// every handler marks its key in its own transaction, [`inbox`](Self::inbox) costs
    /// less.
    pub fn idempotency(mut self, store: impl IdempotencyStore) -> Self {
        self.store = Some(Arc::new(store));
        self.inbox_only = false;
        self
    }

    /// The transactional inbox: the handlers mark their key in their own transaction
    /// (`PostgresStore::mark`, `SqliteStore::mark`), and that mark — not a lease — is what
    /// makes their effects happen once. Before a handler the worker only looks whether
    /// the key is done, and acks a duplicate without running the handler; it takes no
    /// lease, so two deliveries of one message may run at once, and the second one's
    /// `mark` waits for the first transaction and then returns `false`. A handler that
    /// does not call `mark` gets its key marked done after it succeeds.
    ///
    /// One statement less per message than [`idempotency`](Self::idempotency), and no
    /// lease left behind by a crash for a redelivery to wait out.
    ///
    /// ```no_run
    /// # async fn f(transport: steadfast::transport::memory::MemoryTransport, pool: sqlx::PgPool) {
    /// use steadfast::{Context, HandlerError, Message, Worker, idempotency::PostgresStore};
    ///
    /// #[derive(serde::Serialize, serde::Deserialize, Message)]
    /// #[message(name = "orders.placed")]
    /// struct OrderPlaced { #[message(key)] order_id: i64 }
    ///
    /// let inbox = PostgresStore::new(pool.clone());
    /// let store = inbox.clone();
    /// let worker = Worker::builder(transport, "billing")
    ///     .inbox(inbox.clone())
    ///     .handle(move |m: OrderPlaced, cx: Context| {
    ///         let (pool, inbox) = (pool.clone(), store.clone());
    ///         async move {
    ///             let mut tx = pool.begin().await?;
    ///             if !inbox.mark(&mut tx, &cx).await? {
    ///                 return Ok::<_, HandlerError>(()); // handled before
    ///             }
    ///             sqlx::query("INSERT INTO charges (order_id) VALUES ($1)")
    ///                 .bind(m.order_id).execute(&mut *tx).await?;
    ///             tx.commit().await?;
    ///             Ok(())
    ///         }
    ///     })
    ///     .build()
    ///     .unwrap();
    /// # }
    /// ```
    pub fn inbox(mut self, store: impl IdempotencyStore) -> Self {
        self.store = Some(Arc::new(store));
        self.inbox_only = true;
        self
    }

    /// How many messages are handled at once; also the broker prefetch (default 16).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// How long one handler call may run before it counts as a transient failure
    /// (default 30 s).
    pub fn handler_timeout(mut self, d: Duration) -> Self {
        self.handler_timeout = d;
        self
    }

    /// How long shutdown waits for in-flight handlers (default 20 s, below the usual
    /// 30 s container grace period).
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }

    /// Payloads larger than this are dead-lettered without being decoded (default 1 MiB).
    pub fn max_payload_bytes(mut self, n: usize) -> Self {
        self.max_payload_bytes = n;
        self
    }

    /// How many unsettled messages the broker may hand this worker at once (AMQP
    /// `basic.qos`; NATS `max_ack_pending` is at least this); at least the concurrency,
    /// which is the default.
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = Some(n);
        self
    }

    /// How many times a message may crash the worker while it runs alone before it is
    /// dead-lettered as a crash loop (default 3; see `steadfast::transport::crash`).
    /// Messages that merely shared a crash with it are never counted: after a crash,
    /// every delivery the broker returns unexplained is a suspect and runs alone once.
    ///
    /// ```
    /// use steadfast::{Context, Message, Worker, transport::memory::MemoryTransport};
    ///
    /// #[derive(serde::Serialize, serde::Deserialize, Message)]
    /// #[message(name = "images.resize")]
    /// struct Resize { url: String }
    ///
    /// let worker = Worker::builder(MemoryTransport::new(), "thumbnails")
    ///     .handle(|_m: Resize, _cx: Context| async { Ok(()) })
    ///     .concurrency(32)
    ///     .prefetch(100) // the broker may hand out 100 unsettled messages
    ///     .crash_limit(2) // a message that crashes the worker twice alone is dead-lettered
    ///     .build()
    ///     .unwrap();
    /// # drop(worker);
    /// ```
    pub fn crash_limit(mut self, n: u32) -> Self {
        self.crash_limit = n;
        self
    }

    /// Stops intake when too many messages fail, and tries again after a cooldown (see
    /// [`KillSwitch`]; `KillSwitch::from_env()` reads it from the environment). Off by
    /// default.
    pub fn kill_switch(mut self, k: KillSwitch) -> Self {
        self.kill_switch = Some(k);
        self
    }

    /// Applies a [`WorkerConfig`] read from the environment: concurrency (and prefetch),
    /// handler timeout, drain timeout, payload limit and kill switch.
    ///
    /// ```
    /// # use steadfast::{Context, HandlerError, Message, Worker, config::WorkerConfig};
    /// # #[derive(serde::Serialize, serde::Deserialize, Message)]
    /// # #[message(name = "orders.placed")]
    /// # struct OrderPlaced { order_id: u64 }
    /// # async fn on_order(_: OrderPlaced, _: Context) -> Result<(), HandlerError> { Ok(()) }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cfg = WorkerConfig::from_lookup(|n| match n {
    ///     "STEADFAST_BROKER_URL" => Some("memory://".into()),
    ///     "STEADFAST_CONCURRENCY" => Some("4".into()),
    ///     _ => None,
    /// })?;
    /// let worker = Worker::builder_shared(cfg.connect().await?, cfg.group_or("billing"))
    ///     .configure(&cfg)
    ///     .handle(on_order)
    ///     .build()?;
    /// assert_eq!(worker.subscription().prefetch, 4);
    /// # Ok(()) }
    /// ```
    pub fn configure(self, cfg: &WorkerConfig) -> Self {
        let b = self
            .concurrency(cfg.concurrency)
            .handler_timeout(cfg.handler_timeout)
            .drain_timeout(cfg.drain_timeout)
            .max_payload_bytes(cfg.max_payload_bytes);
        match cfg.kill_switch {
            Some(k) => b.kill_switch(k),
            None => b,
        }
    }

    /// Calls `hook` with the outcome of every delivery (tests, metrics, audit).
    pub fn on_outcome(mut self, hook: impl Fn(&Processed) + Send + Sync + 'static) -> Self {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// Validates the configuration and builds the worker.
    pub fn build(self) -> Result<Worker, BuildError> {
        let mut problems: Vec<String> = Vec::new();
        if self.group.is_empty()
            || self.group.len() > 100
            || !self
                .group
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            problems
                .push("the group must be 1..=100 ASCII letters, digits, `_`, `-` or `.`".into());
        }
        if self.routes.is_empty() {
            problems.push("no handlers: add one with .handle(..)".into());
        }
        let mut routes: HashMap<String, Arc<dyn Route>> = HashMap::new();
        for (name, route) in self.routes {
            if let Err(e) = validate_name(name) {
                problems.push(e);
            }
            if routes.insert(name.to_owned(), route).is_some() {
                problems.push(format!("two handlers for message `{name}`"));
            }
        }
        if let Err(e) = self.policy.validate() {
            problems.push(e.to_string());
        }
        if self.concurrency == 0 || self.concurrency > MAX_CONCURRENCY {
            problems.push(format!(
                "concurrency must be 1..={MAX_CONCURRENCY}, got {}",
                self.concurrency
            ));
        }
        if self.handler_timeout.is_zero() {
            problems.push("handler_timeout must be above zero".into());
        }
        if self.max_payload_bytes == 0 {
            problems.push("max_payload_bytes must be above zero".into());
        }
        if self.prefetch.is_some_and(|p| p < self.concurrency) {
            problems.push(format!(
                "prefetch must be at least the concurrency ({}), got {}",
                self.concurrency,
                self.prefetch.unwrap_or(0)
            ));
        }
        if self.crash_limit == 0 {
            problems.push("crash_limit must be above zero".into());
        }
        if let Some(Err(e)) = self.kill_switch.map(|k| k.problems()) {
            problems.push(e);
        }
        if !problems.is_empty() {
            return Err(BuildError {
                group: self.group,
                problems: problems.join("; "),
            });
        }
        let mut names: Vec<String> = routes.keys().cloned().collect();
        names.sort();
        let mut subscription = Subscription::new(self.group.clone(), names);
        subscription.prefetch = self.prefetch.unwrap_or(self.concurrency);
        subscription.crash_limit = self.crash_limit;
        subscription.max_attempts = self.policy.attempts();
        subscription.retry_delays = self.policy.delay_tiers();
        subscription.handler_timeout = self.handler_timeout;
        subscription.max_payload_bytes = self.max_payload_bytes;
        let metrics = WorkerMetrics::new(self.transport.system(), &self.group);
        let breaker = self
            .kill_switch
            .map(|k| Arc::new(Breaker::new(k, self.transport.system(), &self.group)));
        let shared = Shared {
            metrics,
            destination: Arc::from(self.transport.destination(&subscription)),
            group: Arc::from(self.group.as_str()),
            transport: self.transport,
            routes,
            policy: self.policy,
            store: self.store,
            inbox_only: self.inbox_only,
            on_mismatch: self.on_mismatch,
            handler_timeout: self.handler_timeout,
            // A crashed worker's key frees itself once the lease ends; it must outlive a
            // handler that is still legitimately running.
            lease: self.handler_timeout * 2 + Duration::from_secs(5),
            max_payload_bytes: self.max_payload_bytes,
            crash_limit: self.crash_limit,
            hook: self.hook,
            breaker,
        };
        Ok(Worker {
            shared: Arc::new(shared),
            subscription,
            concurrency: self.concurrency,
            drain_timeout: self.drain_timeout,
            state: watch::Sender::new(WorkerState::Starting),
            heartbeat: Arc::new(super::Heartbeat::new()),
        })
    }
}
