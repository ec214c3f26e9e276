//! The PostgreSQL idempotency store and transactional inbox.

use super::{
    Begin, Fingerprint, IdempotencyStore, Key, Lease, StoreError, TakeKey, begin_with,
    looks::{LookBatch, Looks, OwnedKey},
    steps::{CLEANUP, COMPLETE, FINGERPRINT, MARK, RELEASE, REMAINING, STATE, TAKE},
    stored_fingerprint,
};
pub use crate::sql::postgres::connect;
use crate::sql::{Setup, Table, bounded, db_err, keyed, keyed_scalar, run};
use futures::future::BoxFuture;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};
use std::{fmt, sync::Arc, time::Duration};
use uuid::Uuid;

const SCHEMA: &str = include_str!("../../sql/postgres/inbox.sql");

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
    setup: Setup,
    sql: Sql,
    looks: Looks,
}

struct Sql {
    begin: Arc<str>,
    state: Arc<str>,
    fingerprint: Arc<str>,
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
                "INSERT INTO {table} AS t (grp, name, key, state, token, lease_until, fingerprint) \
                 SELECT $1, $2, $3, 'held', $4, now() + make_interval(secs => $5), $7 \
                 FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit \
                 ON CONFLICT (grp, name, key) DO UPDATE \
                 SET state = 'held', token = EXCLUDED.token, lease_until = EXCLUDED.lease_until, done_at = NULL, \
                     fingerprint = EXCLUDED.fingerprint \
                 WHERE (t.state = 'held' AND t.lease_until <= now()) \
                    OR (t.state = 'done' AND t.done_at <= now() - make_interval(secs => $6)) \
                 RETURNING t.token",
            ),
            state: r("SELECT state FROM {table} WHERE grp = $1 AND name = $2 AND key = $3"),
            fingerprint: r(
                "SELECT fingerprint FROM {table} WHERE grp = $1 AND name = $2 AND key = $3",
            ),
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
                 INSERT INTO {table} (grp, name, key, state, done_at, fingerprint) \
                 SELECT $1, $2, $3, 'done', now(), $4 \
                 WHERE NOT EXISTS (SELECT 1 FROM u) \
                   AND NOT EXISTS (SELECT 1 FROM {table} WHERE grp = $1 AND name = $2 AND key = $3) \
                 ON CONFLICT (grp, name, key) DO NOTHING"),
            release: r("DELETE FROM {table} \
                 WHERE grp = $1 AND name = $2 AND key = $3 AND state = 'held' AND token = $4"),
            remaining: r(
                "SELECT EXTRACT(EPOCH FROM lease_until - now())::float8 FROM {table} \
                 WHERE grp = $1 AND name = $2 AND key = $3 AND state = 'held' AND lease_until > now()",
            ),
            mark: r(
                "INSERT INTO {table} AS t (grp, name, key, state, done_at, fingerprint) \
                 VALUES ($1, $2, $3, 'done', now(), $5) \
                 ON CONFLICT (grp, name, key) DO UPDATE \
                 SET state = 'done', done_at = now(), token = NULL, lease_until = NULL, \
                     fingerprint = coalesce(EXCLUDED.fingerprint, t.fingerprint) \
                 WHERE t.state = 'held' \
                    OR (t.state = 'done' AND t.done_at <= now() - make_interval(secs => $4)) \
                 RETURNING 1",
            ),
            cleanup: r("DELETE FROM {table} \
                 WHERE (state = 'done' AND done_at < now() - make_interval(secs => $1)) \
                    OR (state = 'held' AND lease_until < now() - interval '1 hour')"),
        }
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.inner.setup.table.name)
            .field("retention", &self.inner.setup.retention)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// A store in table `steadfast_inbox` of `pool`'s database, keeping completed keys
    /// for 7 days.
    pub fn new(pool: PgPool) -> Self {
        Self::build(pool, Setup::new("steadfast_inbox"))
    }

    fn build(pool: PgPool, setup: Setup) -> Self {
        let sql = Sql::new(&setup.table);
        let looks = Looks::new(look_batch(
            pool.clone(),
            sql.done_many.clone(),
            setup.retention,
            setup.timeout,
        ));
        Self {
            inner: Arc::new(Inner {
                pool,
                setup,
                sql,
                looks,
            }),
        }
    }

    fn setup(&self) -> &Setup {
        &self.inner.setup
    }

    fn rebuild(&self, setup: Setup) -> Self {
        Self::build(self.inner.pool.clone(), setup)
    }

    crate::sql::store_methods!();
    super::inbox_methods!(PgConnection);

    /// Creates the table if it does not exist (plain `CREATE ... IF NOT EXISTS`, no
    /// migrations table of its own) and warns if `synchronous_commit` is off.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        crate::sql::postgres::migrate(&self.inner.pool, self.schema_sql(), self.setup().timeout)
            .await
    }

    /// [`mark`](Self::mark) for an explicit key.
    pub async fn mark_key(
        &self,
        conn: &mut PgConnection,
        key: Key<'_>,
    ) -> Result<bool, StoreError> {
        let q = keyed(&self.inner.sql.mark, key.parts())
            .bind(self.retention_secs())
            .bind(key.fingerprint_text());
        let row = run(self.setup().timeout, MARK, q.fetch_optional(conn)).await?;
        Ok(row.is_some())
    }

    /// Deletes completed keys older than the retention and leases abandoned for over an
    /// hour; returns how many rows went.
    pub async fn cleanup(&self) -> Result<u64, StoreError> {
        let q =
            sqlx::query(AssertSqlSafe(self.inner.sql.cleanup.clone())).bind(self.retention_secs());
        let done = run(self.setup().timeout, CLEANUP, q.execute(&self.inner.pool)).await?;
        Ok(done.rows_affected())
    }

    fn retention_secs(&self) -> f64 {
        self.setup().retention.as_secs_f64()
    }
}

impl TakeKey for PostgresStore {
    fn take<'a>(
        &'a self,
        key: Key<'a>,
        token: Uuid,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let q = keyed(&self.inner.sql.begin, key.parts())
            .bind(token)
            .bind(lease.as_secs_f64())
            .bind(self.retention_secs())
            .bind(key.fingerprint_text());
        let fut = run(
            self.setup().timeout,
            TAKE,
            q.fetch_optional(&self.inner.pool),
        );
        Box::pin(async move { Ok(fut.await?.is_some()) })
    }

    fn state<'a>(&'a self, key: Key<'a>) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        let q = keyed_scalar(&self.inner.sql.state, key.parts());
        Box::pin(run(
            self.setup().timeout,
            STATE,
            q.fetch_optional(&self.inner.pool),
        ))
    }
}

impl IdempotencyStore for PostgresStore {
    fn fingerprint<'a>(
        &'a self,
        key: Key<'a>,
    ) -> BoxFuture<'a, Result<Option<Fingerprint>, StoreError>> {
        let q = keyed_scalar(&self.inner.sql.fingerprint, key.parts());
        let fut = run(
            self.setup().timeout,
            FINGERPRINT,
            q.fetch_optional(&self.inner.pool),
        );
        Box::pin(async move { Ok(stored_fingerprint(fut.await?)) })
    }

    fn lease_remaining<'a>(
        &'a self,
        key: Key<'a>,
    ) -> BoxFuture<'a, Result<Option<Duration>, StoreError>> {
        let q = keyed_scalar(&self.inner.sql.remaining, key.parts());
        let fut = run(
            self.setup().timeout,
            REMAINING,
            q.fetch_optional(&self.inner.pool),
        );
        Box::pin(async move {
            let secs: Option<f64> = fut.await?;
            Ok(secs
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(|s| Duration::from_secs_f64(s.min(86_400.0))))
        })
    }

    fn begin<'a>(
        &'a self,
        key: Key<'a>,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Begin, StoreError>> {
        Box::pin(bounded(
            self.setup().timeout,
            "idempotency begin",
            begin_with(self, key, lease),
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
        let q = keyed(&self.inner.sql.complete, key.parts()).bind(key.fingerprint_text());
        let fut = run(self.setup().timeout, COMPLETE, q.execute(&self.inner.pool));
        Box::pin(async move { fut.await.map(drop) })
    }

    fn release<'a>(
        &'a self,
        key: Key<'a>,
        lease: &'a Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let q = keyed(&self.inner.sql.release, key.parts()).bind(lease.token);
        let fut = run(self.setup().timeout, RELEASE, q.execute(&self.inner.pool));
        Box::pin(async move { fut.await.map(drop) })
    }
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
