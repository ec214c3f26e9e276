//! Shared fixtures: databases with a unique schema or file per test, the messages, the
//! billing handler that writes through the inbox, and transports that fail on purpose.

use futures::{StreamExt, future::BoxFuture};
use sqlx::{AssertSqlSafe, PgPool, SqlitePool};
use std::{
    future::Future,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};
use steadfast::{
    Context, Disposition, Envelope, Handler, HandlerError, Message, RetryPolicy, Worker,
    idempotency::{PostgresStore, SqliteStore},
    outbox::{PostgresOutbox, SqliteOutbox},
    transport::{
        Acker, Delivery, DeliveryStream, Subscription, Transport, TransportError,
        TransportErrorKind, memory::MemoryTransport,
    },
    worker::{Outcome, Processed},
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "orders.placed")]
pub(crate) struct OrderPlaced {
    #[message(key)]
    pub(crate) order_id: i64,
    pub(crate) cents: i64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "billing.charged")]
pub(crate) struct Charged {
    pub(crate) order_id: i64,
}

pub(crate) fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema of its own in the shared test database, so tests run in parallel.
pub(crate) struct Pg {
    pub(crate) pool: PgPool,
    pub(crate) schema: String,
    pub(crate) inbox: PostgresStore,
    pub(crate) outbox: PostgresOutbox,
}

pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

impl Pg {
    pub(crate) async fn new() -> Self {
        init_tracing();
        let pool = steadfast::idempotency::postgres::connect(&database_url())
            .await
            .expect("PostgreSQL must run on DATABASE_URL (default 127.0.0.1:5432, database test)");
        let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
        sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {schema}.effects (order_id bigint NOT NULL, msg_id uuid NOT NULL)"
        )))
        .execute(&pool)
        .await
        .unwrap();
        let inbox = PostgresStore::new(pool.clone())
            .with_table(&format!("{schema}.steadfast_inbox"))
            .unwrap();
        let outbox = PostgresOutbox::new(pool.clone())
            .with_table(&format!("{schema}.steadfast_outbox"))
            .unwrap();
        inbox.migrate().await.unwrap();
        outbox.migrate().await.unwrap();
        Self {
            pool,
            schema,
            inbox,
            outbox,
        }
    }

    pub(crate) async fn effects(&self) -> (i64, i64) {
        sqlx::query_as(AssertSqlSafe(format!(
            "SELECT count(*), count(DISTINCT order_id) FROM {}.effects",
            self.schema
        )))
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    pub(crate) async fn drop_schema(self) {
        let _ = sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA {} CASCADE",
            self.schema
        )))
        .execute(&self.pool)
        .await;
        self.pool.close().await;
    }

    pub(crate) fn billing(&self) -> PgBilling {
        PgBilling {
            pg: Arc::new(PgParts {
                pool: self.pool.clone(),
                inbox: self.inbox.clone(),
                outbox: self.outbox.clone(),
                schema: self.schema.clone(),
            }),
            calls: Arc::default(),
            fail_first_attempt: false,
            hold: Duration::ZERO,
        }
    }
}

pub(crate) struct PgParts {
    pool: PgPool,
    inbox: PostgresStore,
    outbox: PostgresOutbox,
    schema: String,
}

/// The gold path: inbox key, business write and outbox row in one transaction.
#[derive(Clone)]
pub(crate) struct PgBilling {
    pg: Arc<PgParts>,
    pub(crate) calls: Arc<AtomicU32>,
    /// Fail on attempt 1 after the business write (before commit).
    pub(crate) fail_first_attempt: bool,
    /// Hold the transaction open this long before committing.
    pub(crate) hold: Duration,
}

impl Handler<OrderPlaced> for PgBilling {
    async fn handle(&self, msg: OrderPlaced, cx: Context) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut tx = self.pg.pool.begin().await?;
        if !self.pg.inbox.mark(&mut tx, &cx).await? {
            return Ok(());
        }
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {}.effects (order_id, msg_id) VALUES ($1, $2)",
            self.pg.schema
        )))
        .bind(msg.order_id)
        .bind(*cx.id().as_uuid())
        .execute(&mut *tx)
        .await?;
        self.pg
            .outbox
            .enqueue_from(
                &mut tx,
                &Charged {
                    order_id: msg.order_id,
                },
                &cx,
            )
            .await?;
        if self.fail_first_attempt && cx.attempt() == 1 {
            return Err(HandlerError::msg("failed after partial work"));
        }
        tokio::time::sleep(self.hold).await;
        tx.commit().await?;
        Ok(())
    }
}

/// A SQLite database in a temporary file of its own.
pub(crate) struct Lite {
    pub(crate) pool: SqlitePool,
    pub(crate) path: PathBuf,
    pub(crate) inbox: SqliteStore,
    pub(crate) outbox: SqliteOutbox,
}

impl Lite {
    pub(crate) async fn new() -> Self {
        let path = std::env::temp_dir().join(format!(
            "steadfast-test-{}.db",
            uuid::Uuid::now_v7().simple()
        ));
        let pool = steadfast::idempotency::sqlite::open(&path).await.unwrap();
        sqlx::query("CREATE TABLE effects (order_id INTEGER NOT NULL, msg_id TEXT NOT NULL)")
            .execute(&pool)
            .await
            .unwrap();
        let inbox = SqliteStore::new(pool.clone());
        let outbox = SqliteOutbox::new(pool.clone());
        inbox.migrate().await.unwrap();
        outbox.migrate().await.unwrap();
        Self {
            pool,
            path,
            inbox,
            outbox,
        }
    }

    pub(crate) async fn effects(&self) -> (i64, i64) {
        sqlx::query_as("SELECT count(*), count(DISTINCT order_id) FROM effects")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub(crate) async fn remove(self) {
        self.pool.close().await;
        for suffix in ["", "-wal", "-shm"] {
            let mut p = self.path.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }

    pub(crate) fn billing(&self) -> LiteBilling {
        LiteBilling {
            pool: self.pool.clone(),
            inbox: self.inbox.clone(),
            outbox: self.outbox.clone(),
            calls: Arc::default(),
            fail_first_attempt: false,
        }
    }
}

#[derive(Clone)]
pub(crate) struct LiteBilling {
    pool: SqlitePool,
    inbox: SqliteStore,
    outbox: SqliteOutbox,
    pub(crate) calls: Arc<AtomicU32>,
    pub(crate) fail_first_attempt: bool,
}

impl Handler<OrderPlaced> for LiteBilling {
    async fn handle(&self, msg: OrderPlaced, cx: Context) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut tx = self.pool.begin().await?;
        if !self.inbox.mark(&mut tx, &cx).await? {
            return Ok(());
        }
        sqlx::query("INSERT INTO effects (order_id, msg_id) VALUES (?1, ?2)")
            .bind(msg.order_id)
            .bind(cx.id().to_string())
            .execute(&mut *tx)
            .await?;
        self.outbox
            .enqueue_from(
                &mut tx,
                &Charged {
                    order_id: msg.order_id,
                },
                &cx,
            )
            .await?;
        if self.fail_first_attempt && cx.attempt() == 1 {
            return Err(HandlerError::msg("failed after partial work"));
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Outcomes seen by a worker's hook.
#[derive(Clone, Default)]
pub(crate) struct Outcomes(Arc<Mutex<Vec<Processed>>>);

impl Outcomes {
    pub(crate) fn hook(&self) -> impl Fn(&Processed) + Send + Sync + 'static {
        let list = self.0.clone();
        move |p| list.lock().unwrap().push(p.clone())
    }
    pub(crate) fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|p| f(&p.outcome))
            .count()
    }
}

/// A running worker, stopped on drop of the token.
pub(crate) struct Running {
    pub(crate) stop: CancellationToken,
    pub(crate) task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

pub(crate) fn start_worker<H: Handler<OrderPlaced>>(
    transport: Arc<dyn Transport>,
    handler: H,
    store: impl steadfast::idempotency::IdempotencyStore,
    outcomes: &Outcomes,
    concurrency: usize,
) -> Running {
    start_worker_as(
        Dedup::Lease,
        transport,
        handler,
        store,
        outcomes,
        concurrency,
    )
}

/// How the worker uses its store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dedup {
    /// `.idempotency(store)`: a lease around the handler.
    Lease,
    /// `.inbox(store)`: a look before the handler; the handler's `mark` decides.
    Inbox,
}

pub(crate) fn start_worker_as<H: Handler<OrderPlaced>>(
    dedup: Dedup,
    transport: Arc<dyn Transport>,
    handler: H,
    store: impl steadfast::idempotency::IdempotencyStore,
    outcomes: &Outcomes,
    concurrency: usize,
) -> Running {
    let builder = Worker::builder_shared(transport, "billing").handle(handler);
    let builder = match dedup {
        Dedup::Lease => builder.idempotency(store),
        Dedup::Inbox => builder.inbox(store),
    };
    let worker = builder
        .retry(RetryPolicy::fixed(Duration::from_millis(50)).max_attempts(5))
        .concurrency(concurrency)
        // The lease is 2 × this + 5 s, and a duplicate that finds the key held waits out
        // the rest of the lease (decision 0401): short, so concurrent duplicates settle
        // within the tests' deadlines.
        .handler_timeout(Duration::from_secs(3))
        .drain_timeout(Duration::from_secs(5))
        .on_outcome(outcomes.hook())
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        worker.run_until(s.cancelled_owned()).await.unwrap();
    });
    Running { stop, task }
}

/// Polls `cond` until it holds, failing the test after `secs` seconds: a stuck system is
/// a failure too.
pub(crate) async fn eventually<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs}s waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) fn order(order_id: i64) -> Envelope {
    Envelope::encode(&OrderPlaced {
        order_id,
        cents: 100 * order_id,
    })
    .unwrap()
}

/// Simulates a worker that dies after the handler's transaction committed and before
/// its ack reached the broker: the first `Ack` is not carried out, the delivery is
/// dropped unsettled and the broker redelivers it.
pub(crate) struct CrashBeforeFirstAck {
    pub(crate) inner: MemoryTransport,
    pub(crate) crashed: Arc<AtomicBool>,
}

struct CrashAcker {
    inner: Delivery,
    crashed: Arc<AtomicBool>,
}

impl Acker for CrashAcker {
    fn settle(
        self: Box<Self>,
        envelope: Envelope,
        disposition: Disposition,
    ) -> BoxFuture<'static, Result<(), TransportError>> {
        let Self { mut inner, crashed } = *self;
        if matches!(disposition, Disposition::Ack) && !crashed.swap(true, Ordering::SeqCst) {
            drop(inner); // unsettled: back to the broker, as when a process dies
            return Box::pin(async {
                Err(TransportError::new(
                    TransportErrorKind::Connection,
                    "simulated crash before the ack",
                ))
            });
        }
        inner.envelope = envelope;
        Box::pin(inner.settle(disposition))
    }
}

impl Transport for CrashBeforeFirstAck {
    fn system(&self) -> &'static str {
        "memory"
    }
    fn declare<'a>(&'a self, sub: &'a Subscription) -> BoxFuture<'a, Result<(), TransportError>> {
        self.inner.declare(sub)
    }
    fn subscribe<'a>(
        &'a self,
        sub: &'a Subscription,
    ) -> BoxFuture<'a, Result<DeliveryStream, TransportError>> {
        let crashed = self.crashed.clone();
        Box::pin(async move {
            let stream = self.inner.subscribe(sub).await?;
            let mapped = stream.map(move |d| {
                d.map(|d| {
                    let env = d.envelope.clone();
                    Delivery::new(
                        env,
                        CrashAcker {
                            inner: d,
                            crashed: crashed.clone(),
                        },
                    )
                })
            });
            Ok(Box::pin(mapped) as DeliveryStream)
        })
    }
    fn publish<'a>(&'a self, envelope: &'a Envelope) -> BoxFuture<'a, Result<(), TransportError>> {
        self.inner.publish(envelope)
    }
}

/// The `Transport` methods a test wrapper passes through to its `inner`
/// `MemoryTransport` unchanged.
macro_rules! delegate_to_inner {
    () => {
        fn system(&self) -> &'static str {
            "memory"
        }
        fn declare<'a>(
            &'a self,
            sub: &'a Subscription,
        ) -> BoxFuture<'a, Result<(), TransportError>> {
            self.inner.declare(sub)
        }
        fn subscribe<'a>(
            &'a self,
            sub: &'a Subscription,
        ) -> BoxFuture<'a, Result<DeliveryStream, TransportError>> {
            self.inner.subscribe(sub)
        }
        fn publish<'a>(
            &'a self,
            envelope: &'a Envelope,
        ) -> BoxFuture<'a, Result<(), TransportError>> {
            self.inner.publish(envelope)
        }
    };
}

/// Simulates a relay killed after the broker confirmed a batch and before the rows were
/// marked sent: the first batch is published, then the call never returns (the test
/// aborts the relay task when `confirmed` fires).
pub(crate) struct HangAfterConfirm {
    pub(crate) inner: MemoryTransport,
    pub(crate) armed: AtomicBool,
    pub(crate) confirmed: Arc<Notify>,
}

impl Transport for HangAfterConfirm {
    delegate_to_inner!();
    fn publish_batch<'a>(
        &'a self,
        envelopes: &'a [Envelope],
    ) -> BoxFuture<'a, Vec<Result<(), TransportError>>> {
        Box::pin(async move {
            let out = self.inner.publish_batch(envelopes).await;
            if self.armed.swap(false, Ordering::SeqCst) {
                self.confirmed.notify_one();
                std::future::pending::<()>().await;
            }
            out
        })
    }
}

/// A broker whose confirms take `delay`; counts the `publish_batch` calls under way at
/// once and the most seen.
pub(crate) struct SlowConfirms {
    pub(crate) inner: MemoryTransport,
    pub(crate) delay: Duration,
    pub(crate) now: AtomicU32,
    pub(crate) most: AtomicU32,
}

impl SlowConfirms {
    pub(crate) fn new(inner: MemoryTransport, delay: Duration) -> Self {
        Self {
            inner,
            delay,
            now: AtomicU32::new(0),
            most: AtomicU32::new(0),
        }
    }
}

impl Transport for SlowConfirms {
    delegate_to_inner!();
    fn publish_batch<'a>(
        &'a self,
        envelopes: &'a [Envelope],
    ) -> BoxFuture<'a, Vec<Result<(), TransportError>>> {
        Box::pin(async move {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(n, Ordering::SeqCst);
            let out = self.inner.publish_batch(envelopes).await;
            tokio::time::sleep(self.delay).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            out
        })
    }
}

/// A broker that, before confirming a batch, ends the PostgreSQL sessions left idle in a
/// transaction on `table` (a relay's held claim): the batch is confirmed, and its commit
/// fails.
pub(crate) struct EndsHeldSessions {
    pub(crate) inner: MemoryTransport,
    pub(crate) pool: PgPool,
    pub(crate) table: String,
    pub(crate) ended: AtomicU32,
}

impl Transport for EndsHeldSessions {
    delegate_to_inner!();
    fn publish_batch<'a>(
        &'a self,
        envelopes: &'a [Envelope],
    ) -> BoxFuture<'a, Vec<Result<(), TransportError>>> {
        Box::pin(async move {
            let ended: Vec<bool> = sqlx::query_scalar(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE state = 'idle in transaction' AND position($1 in query) > 0",
            )
            .bind(&self.table)
            .fetch_all(&self.pool)
            .await
            .unwrap();
            let n = ended.into_iter().filter(|e| *e).count() as u32;
            self.ended.fetch_add(n, Ordering::SeqCst);
            self.inner.publish_batch(envelopes).await
        })
    }
}
