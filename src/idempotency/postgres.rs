//! The PostgreSQL idempotency store and transactional inbox.

use super::{
    Begin, IdempotencyStore, Key, Lease, StoreError,
    looks::{LookBatch, Looks, OwnedKey},
};
use crate::{
    context::Context,
    outbox::{Table, bounded, db_err},
};
use futures::future::BoxFuture;
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row};
use std::{fmt, sync::Arc, time::Duration};
use uuid::Uuid;

const SCHEMA: &str = include_str!("../../sql/postgres/inbox.sql");
/// The advisory lock taken while creating steadfast's tables, so concurrent starts do not
/// race on `CREATE TABLE IF NOT EXISTS`.
pub(crate) const MIGRATE_LOCK: i64 = 0x5354_4541_4446_4153; // "STEADFAS"

/// Idempotency keys and the transactional inbox in a PostgreSQL table (default
/// `steadfast_inbox`).
///
/// Give one to the worker (`.inbox(store.clone())`) and use the same store inside
/// the handler: [`mark`](Self::mark) marks the delivery's key done in *your*
/// transaction, so the business write, the inbox key and any outbox rows commit
/// together, exactly once.
///
/// The worker's looks before each handler (`.inbox`) are shared: the looks waiting at
/// one moment go out as one query, on a connection the store opens for them with the
/// pool's options and keeps (one more than the pool's).
///
/// ```no_run
/// use steadfast::{Context, HandlerError, Message, idempotency::PostgresStore, outbox::PostgresOutbox};
///
/// #[derive(serde::Serialize, serde::Deserialize, Message)]
/// #[message(name = "orders.placed")]
/// struct OrderPlaced { #[message(key)] order_id: i64, cents: i64 }
/// #[derive(serde::Serialize, serde::Deserialize, Message)]
/// #[message(name = "billing.charged")]
/// struct Charged { order_id: i64 }
///
/// async fn charge(
///     pool: &sqlx::PgPool, inbox: &PostgresStore, outbox: &PostgresOutbox,
///     msg: OrderPlaced, cx: Context,
/// ) -> Result<(), HandlerError> {
///     let mut tx = pool.begin().await?;
///     if !inbox.mark(&mut tx, &cx).await? {
///         return Ok(()); // already handled: nothing to do, the delivery is acked
///     }
///     sqlx::query("INSERT INTO charges (order_id, cents) VALUES ($1, $2)")
///         .bind(msg.order_id).bind(msg.cents).execute(&mut *tx).await?;
///     outbox.enqueue(&mut tx, &Charged { order_id: msg.order_id }).await?;
///     tx.commit().await?;
///     Ok(())
/// }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    table: Table,
    retention: Duration,
    timeout: Duration,
    sql: Sql,
    looks: Looks,
}

struct Sql {
    begin: Arc<str>,
    state: Arc<str>,
    done_many: Arc<str>,
    complete: Arc<str>,
    release: Arc<str>,
    remaining: Arc<str>,
    mark: Arc<str>,
    cleanup: Arc<str>,
}

impl Sql {
    fn new(t: &Table) -> Self {
        let r = |s: &str| Arc::<str>::from(t.render(s));
        Self {
            // The lease is not what makes effects happen once — the inbox `mark` in the
            // handler's transaction is — so this statement commits without waiting for
            // its WAL flush (`synchronous_commit = off` for this one implicit
            // transaction only): a lease lost in a database crash only lets a
            // redelivery start the handler again, whose `mark` then finds the key done
            // or wins it. Saves one fsync wait per message (decision 0304).
            begin: r(
                "INSERT INTO {table} AS t (grp, name, key, state, token, lease_until) \
                 SELECT $1, $2, $3, 'held', $4, now() + make_interval(secs => $5) \
                 FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit \
                 ON CONFLICT (grp, name, key) DO UPDATE \
                 SET state = 'held', token = EXCLUDED.token, lease_until = EXCLUDED.lease_until, done_at = NULL \
                 WHERE (t.state = 'held' AND t.lease_until <= now()) \
                    OR (t.state = 'done' AND t.done_at <= now() - make_interval(secs => $6)) \
                 RETURNING t.token",
            ),
            state: r("SELECT state FROM {table} WHERE grp = $1 AND name = $2 AND key = $3"),
            // The inbox's looks, many at once (see `looks`): the ordinals of the keys
            // that are done. A lateral lookup per key, in the primary key: as a join, the
            // planner hashed every done key found through the `done_at` index (4 ms per
            // look on the bench, its statistics from when the table was small).
            done_many: r(
                "SELECT k.i FROM unnest($1::text[], $2::text[], $3::text[]) \
                 WITH ORDINALITY AS k(grp, name, key, i) \
                 CROSS JOIN LATERAL (SELECT 1 FROM {table} t \
                   WHERE t.grp = k.grp AND t.name = k.name AND t.key = k.key \
                     AND t.state = 'done' AND t.done_at > now() - make_interval(secs => $4) \
                   LIMIT 1) AS done",
            ),
            // After an inbox `mark` the row is already done: the UPDATE matches nothing
            // without locking it and nothing is inserted, so this writes no WAL and
            // costs no commit flush on the common path.
            complete: r("WITH u AS ( \
                   UPDATE {table} SET state = 'done', done_at = now(), token = NULL, lease_until = NULL \
                   WHERE grp = $1 AND name = $2 AND key = $3 AND state = 'held' RETURNING 1) \
                 INSERT INTO {table} (grp, name, key, state, done_at) \
                 SELECT $1, $2, $3, 'done', now() \
                 WHERE NOT EXISTS (SELECT 1 FROM u) \
                   AND NOT EXISTS (SELECT 1 FROM {table} WHERE grp = $1 AND name = $2 AND key = $3) \
                 ON CONFLICT (grp, name, key) DO NOTHING"),
            release: r("DELETE FROM {table} \
                 WHERE grp = $1 AND name = $2 AND key = $3 AND state = 'held' AND token = $4"),
            remaining: r(
                "SELECT EXTRACT(EPOCH FROM lease_until - now())::float8 FROM {table} \
                 WHERE grp = $1 AND name = $2 AND key = $3 AND state = 'held' AND lease_until > now()",
            ),
            mark: r("INSERT INTO {table} AS t (grp, name, key, state, done_at) \
                 VALUES ($1, $2, $3, 'done', now()) \
                 ON CONFLICT (grp, name, key) DO UPDATE \
                 SET state = 'done', done_at = now(), token = NULL, lease_until = NULL \
                 WHERE t.state = 'held' \
                    OR (t.state = 'done' AND t.done_at <= now() - make_interval(secs => $4)) \
                 RETURNING 1"),
            cleanup: r("DELETE FROM {table} \
                 WHERE (state = 'done' AND done_at < now() - make_interval(secs => $1)) \
                    OR (state = 'held' AND lease_until < now() - interval '1 hour')"),
        }
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.inner.table.name)
            .field("retention", &self.inner.retention)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// A store in table `steadfast_inbox` of `pool`'s database, keeping completed keys
    /// for 7 days.
    pub fn new(pool: PgPool) -> Self {
        Self::build(
            pool,
            Table::parse("steadfast_inbox").expect("a valid constant name"),
            Duration::from_secs(7 * 24 * 3600),
            Duration::from_secs(10),
        )
    }

    fn build(pool: PgPool, table: Table, retention: Duration, timeout: Duration) -> Self {
        let sql = Sql::new(&table);
        let looks = Looks::new(look_batch(
            pool.clone(),
            sql.done_many.clone(),
            retention,
            timeout,
        ));
        Self {
            inner: Arc::new(Inner {
                pool,
                table,
                retention,
                timeout,
                sql,
                looks,
            }),
        }
    }

    /// Uses table `name` (`table` or `schema.table`) instead of `steadfast_inbox`.
    pub fn with_table(self, name: &str) -> Result<Self, StoreError> {
        let table = Table::parse(name)?;
        let i = &self.inner;
        Ok(Self::build(i.pool.clone(), table, i.retention, i.timeout))
    }

    /// Keeps completed keys for `retention` (default 7 days): a duplicate arriving later
    /// than that runs the handler again. Make it longer than the broker can hold a message.
    #[must_use]
    pub fn with_retention(self, retention: Duration) -> Self {
        let i = &self.inner;
        Self::build(i.pool.clone(), i.table.clone(), retention, i.timeout)
    }

    /// Bounds every store call (default 10 s).
    #[must_use]
    pub fn with_timeout(self, timeout: Duration) -> Self {
        let i = &self.inner;
        Self::build(i.pool.clone(), i.table.clone(), i.retention, timeout)
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.inner.table.name
    }

    /// The SQL that creates the table, for your own migrations. Idempotent.
    pub fn schema_sql(&self) -> String {
        self.inner.table.render(SCHEMA)
    }

    /// Creates the table if it does not exist (plain `CREATE ... IF NOT EXISTS`, no
    /// migrations table of its own) and warns if `synchronous_commit` is off.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let sql = self.schema_sql();
        bounded(
            self.inner.timeout,
            "creating the inbox table",
            apply_schema(&self.inner.pool, sql),
        )
        .await?;
        warn_unsafe_settings(&self.inner.pool).await;
        Ok(())
    }

    /// Marks the delivery of `cx` handled, inside your transaction `conn`. Returns
    /// `false` if it was handled before: then do nothing and return `Ok(())`.
    ///
    /// Race-safe: two deliveries of the same message marking at once end with one `true`
    /// (the second waits on the first's row lock and sees it done once it commits; if
    /// the first rolls back, the second goes ahead).
    pub async fn mark(&self, conn: &mut PgConnection, cx: &Context) -> Result<bool, StoreError> {
        let marked = self
            .mark_key(
                conn,
                Key {
                    group: cx.group(),
                    name: cx.name(),
                    key: cx.idempotency_key(),
                },
            )
            .await?;
        cx.note_marked();
        Ok(marked)
    }

    /// [`mark`](Self::mark) for an explicit key.
    pub async fn mark_key(
        &self,
        conn: &mut PgConnection,
        key: Key<'_>,
    ) -> Result<bool, StoreError> {
        let fut = async {
            sqlx::query(AssertSqlSafe(self.inner.sql.mark.clone()))
                .bind(key.group)
                .bind(key.name)
                .bind(key.key)
                .bind(self.inner.retention.as_secs_f64())
                .fetch_optional(conn)
                .await
                .map_err(db_err("could not mark the inbox key"))
        };
        let row = bounded(self.inner.timeout, "inbox mark", fut).await?;
        Ok(row.is_some())
    }

    /// Deletes completed keys older than the retention and leases abandoned for over an
    /// hour; returns how many rows went.
    pub async fn cleanup(&self) -> Result<u64, StoreError> {
        let fut = async {
            sqlx::query(AssertSqlSafe(self.inner.sql.cleanup.clone()))
                .bind(self.inner.retention.as_secs_f64())
                .execute(&self.inner.pool)
                .await
                .map(|r| r.rows_affected())
                .map_err(db_err("could not clean up the inbox"))
        };
        bounded(self.inner.timeout, "inbox cleanup", fut).await
    }

    /// Runs [`cleanup`](Self::cleanup) every `every` until the returned handle is
    /// aborted or dropped with the runtime. Errors are logged and retried next time.
    pub fn spawn_cleanup(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
            loop {
                tick.tick().await;
                match store.cleanup().await {
                    Ok(n) if n > 0 => tracing::debug!(removed = n, "inbox cleanup"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "inbox cleanup failed"),
                }
            }
        })
    }

    async fn begin_inner(&self, key: Key<'_>, lease: Duration) -> Result<Begin, StoreError> {
        let sql = &self.inner.sql;
        // Two tries: a key released between the upsert and the read is free again.
        for _ in 0..2 {
            let token = Uuid::now_v7();
            let got = sqlx::query(AssertSqlSafe(sql.begin.clone()))
                .bind(key.group)
                .bind(key.name)
                .bind(key.key)
                .bind(token)
                .bind(lease.as_secs_f64())
                .bind(self.inner.retention.as_secs_f64())
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(db_err("could not take the idempotency key"))?;
            if got.is_some() {
                return Ok(Begin::Acquired(Lease { token }));
            }
            let state = sqlx::query(AssertSqlSafe(sql.state.clone()))
                .bind(key.group)
                .bind(key.name)
                .bind(key.key)
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(db_err("could not read the idempotency key"))?;
            match state.map(|r| r.try_get::<String, _>(0)).transpose() {
                Ok(Some(s)) if s == "done" => return Ok(Begin::AlreadyDone),
                Ok(Some(_)) => return Ok(Begin::InFlight),
                Ok(None) => continue,
                Err(e) => return Err(db_err("could not read the idempotency key")(e)),
            }
        }
        Ok(Begin::InFlight)
    }
}

impl IdempotencyStore for PostgresStore {
    fn lease_remaining<'a>(
        &'a self,
        key: Key<'a>,
    ) -> BoxFuture<'a, Result<Option<Duration>, StoreError>> {
        let fut = async move {
            let secs: Option<f64> =
                sqlx::query_scalar(AssertSqlSafe(self.inner.sql.remaining.clone()))
                    .bind(key.group)
                    .bind(key.name)
                    .bind(key.key)
                    .fetch_optional(&self.inner.pool)
                    .await
                    .map_err(db_err("could not read the idempotency lease"))?;
            Ok(secs
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(|s| Duration::from_secs_f64(s.min(86_400.0))))
        };
        Box::pin(bounded(self.inner.timeout, "idempotency lease", fut))
    }

    fn begin<'a>(
        &'a self,
        key: Key<'a>,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Begin, StoreError>> {
        Box::pin(bounded(
            self.inner.timeout,
            "idempotency begin",
            self.begin_inner(key, lease),
        ))
    }

    fn is_done<'a>(&'a self, key: Key<'a>) -> BoxFuture<'a, Result<bool, StoreError>> {
        // Shared with the other looks waiting (one query for all of them); a key done
        // longer ago than the retention counts as new, as in `begin`/`mark`.
        Box::pin(self.inner.looks.look(key))
    }

    fn complete<'a>(
        &'a self,
        key: Key<'a>,
        _lease: &'a Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        // Completing is right even if the lease lapsed: the handler did succeed. A key the
        // handler already marked through the inbox stays as it is.
        let fut = async move {
            sqlx::query(AssertSqlSafe(self.inner.sql.complete.clone()))
                .bind(key.group)
                .bind(key.name)
                .bind(key.key)
                .execute(&self.inner.pool)
                .await
                .map(drop)
                .map_err(db_err("could not complete the idempotency key"))
        };
        Box::pin(bounded(self.inner.timeout, "idempotency complete", fut))
    }

    fn release<'a>(
        &'a self,
        key: Key<'a>,
        lease: &'a Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let fut = async move {
            sqlx::query(AssertSqlSafe(self.inner.sql.release.clone()))
                .bind(key.group)
                .bind(key.name)
                .bind(key.key)
                .bind(lease.token)
                .execute(&self.inner.pool)
                .await
                .map(drop)
                .map_err(db_err("could not release the idempotency key"))
        };
        Box::pin(bounded(self.inner.timeout, "idempotency release", fut))
    }
}

/// Runs a schema script in one transaction under steadfast's advisory lock.
pub(crate) async fn apply_schema(pool: &PgPool, sql: String) -> Result<(), StoreError> {
    let mut tx = pool
        .begin()
        .await
        .map_err(db_err("could not start the schema transaction"))?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATE_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(db_err("could not take the schema lock"))?;
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(&mut *tx)
        .await
        .map_err(db_err("could not create steadfast's table"))?;
    tx.commit()
        .await
        .map_err(db_err("could not commit steadfast's schema"))
}

/// Warns when the server would acknowledge commits it could still lose.
pub(crate) async fn warn_unsafe_settings(pool: &PgPool) {
    if server_setting(pool, "synchronous_commit").await.as_deref() == Some("off") {
        tracing::warn!(
            "PostgreSQL synchronous_commit is off: a committed inbox key or outbox row can be lost in a server crash; set it to on"
        );
    }
}

/// A server setting's value (`SHOW name`, within 5 s); `None` when it cannot be read.
/// `name` is one of this crate's constants, never user input.
pub(crate) async fn server_setting(pool: &PgPool, name: &'static str) -> Option<String> {
    let fut =
        sqlx::query_scalar::<_, String>(AssertSqlSafe(format!("SHOW {name}"))).fetch_one(pool);
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()?
        .ok()
}

/// The inbox's looks at `retention`, answered `sql` (`done_many`) at a time on a
/// connection of their own, opened with `pool`'s options: looks waiting for a pool
/// connection behind handlers' transactions took 7 ms per batch on the storage bench
/// (and the inbox fell to 0.14× of consuming without it).
fn look_batch(pool: PgPool, sql: Arc<str>, retention: Duration, timeout: Duration) -> LookBatch {
    let kept: Arc<std::sync::Mutex<Option<PgConnection>>> = Arc::default();
    Arc::new(move |keys: Vec<OwnedKey>| {
        let (pool, sql, kept) = (pool.clone(), sql.clone(), kept.clone());
        let fut = async move {
            let n = keys.len();
            let (mut groups, mut names, mut ids) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            for k in keys {
                groups.push(k.group);
                names.push(k.name);
                ids.push(k.key);
            }
            // Taken out while in use: a look cancelled mid-query drops its connection. A
            // kept connection may have died with the server since: then once more on a
            // new one.
            let mut conn = kept.lock().unwrap_or_else(|p| p.into_inner()).take();
            let found: Vec<i64> = loop {
                let fresh = conn.is_none();
                let mut c = match conn.take() {
                    Some(c) => c,
                    None => {
                        <PgConnection as sqlx::Connection>::connect_with(&pool.connect_options())
                            .await
                            .map_err(db_err("could not connect for the inbox lookups"))?
                    }
                };
                let r = sqlx::query_scalar(AssertSqlSafe(sql.clone()))
                    .bind(&groups[..])
                    .bind(&names[..])
                    .bind(&ids[..])
                    .bind(retention.as_secs_f64())
                    .fetch_all(&mut c)
                    .await;
                match r {
                    Ok(found) => {
                        *kept.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
                        break found;
                    }
                    Err(e) if fresh => return Err(db_err("could not look up the inbox keys")(e)),
                    Err(_) => {}
                }
            };
            let mut done = vec![false; n];
            for i in found {
                if let Some(d) = usize::try_from(i - 1).ok().and_then(|i| done.get_mut(i)) {
                    *d = true;
                }
            }
            Ok(done)
        };
        Box::pin(bounded(timeout, "inbox lookup", fut))
    })
}

/// Connects a pool to `url` (for example `DATABASE_URL`). The password never appears in
/// errors or logs.
pub async fn connect(url: &str) -> Result<PgPool, StoreError> {
    use sqlx::postgres::PgPoolOptions;
    let shown = crate::redact::redact_url(url);
    let secret = crate::redact::password(url);
    let fail = |what: &str, e: sqlx::Error| {
        StoreError::new(format!(
            "{what} {shown}: {}",
            crate::redact::scrub(&e.to_string(), secret.as_deref())
        ))
    };
    let opts: sqlx::postgres::PgConnectOptions =
        url.parse().map_err(|e| fail("invalid PostgreSQL url", e))?;
    if !is_loopback(url) && matches!(sslmode(url).as_deref(), None | Some("disable" | "allow")) {
        tracing::warn!(url = %shown, "connecting to a non-loopback PostgreSQL host without requiring TLS; add sslmode=require");
    }
    let connect = PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts);
    match tokio::time::timeout(Duration::from_secs(15), connect).await {
        Ok(Ok(pool)) => Ok(pool),
        Ok(Err(e)) => Err(fail("could not connect to", e)),
        Err(_) => Err(StoreError::new(format!(
            "could not connect to {shown}: no answer within 15s"
        ))),
    }
}

fn is_loopback(url: &str) -> bool {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .is_none_or(|h| {
            h == "localhost" || h.starts_with("127.") || h == "[::1]" || h.starts_with('/')
        })
}

fn sslmode(url: &str) -> Option<String> {
    url::Url::parse(url).ok().and_then(|u| {
        u.query_pairs()
            .find(|(k, _)| k == "sslmode")
            .map(|(_, v)| v.into_owned())
    })
}
