//! The PostgreSQL idempotency store and transactional inbox.

use super::{
    StoreError,
    looks::{LookBatch, Looks, OwnedKey},
    sql::{Inbox, InboxSql, Look, Param, Stmt, sql_inbox},
};
pub use crate::sql::postgres::connect;
use crate::sql::{Dialect, Setup, Table, bounded, db_err, postgres::Pg};
use sqlx::{AssertSqlSafe, PgConnection, PgPool};
use std::{sync::Arc, time::Duration};

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
    inner: Arc<Inbox<Pg>>,
}

sql_inbox!(PostgresStore, PgPool, PgConnection);

/// The statements, and the inbox's looks many at once (`done_many`).
struct Sql {
    inbox: InboxSql,
    done_many: Arc<str>,
}

impl Sql {
    fn new(t: &Table) -> Self {
        let r = |s: &str| Pg::render(t, s);
        use Param::{Fingerprint, Lease, Retention, Token};
        let inbox = InboxSql {
            // The lease is not what makes effects happen once — the inbox `mark` in the
            // handler's transaction is — so this statement commits without waiting for
            // its WAL flush (`synchronous_commit = off` for this one implicit
            // transaction only): a lease lost in a database crash only lets a
            // redelivery start the handler again, whose `mark` then finds the key done
            // or wins it. Saves one fsync wait per message (decision 0304).
            take: Stmt {
                sql: r(
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
                params: &[Token, Lease, Retention, Fingerprint],
            },
            holds: None,
            state: r("SELECT state FROM {table} WHERE grp = $1 AND name = $2 AND key = $3"),
            fingerprint: r(
                "SELECT fingerprint FROM {table} WHERE grp = $1 AND name = $2 AND key = $3",
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
            mark: Stmt {
                sql: r(
                    "INSERT INTO {table} AS t (grp, name, key, state, done_at, fingerprint) \
                 VALUES ($1, $2, $3, 'done', now(), $5) \
                 ON CONFLICT (grp, name, key) DO UPDATE \
                 SET state = 'done', done_at = now(), token = NULL, lease_until = NULL, \
                     fingerprint = coalesce(EXCLUDED.fingerprint, t.fingerprint) \
                 WHERE t.state = 'held' \
                    OR (t.state = 'done' AND t.done_at <= now() - make_interval(secs => $4)) \
                 RETURNING 1",
                ),
                params: &[Retention, Fingerprint],
            },
            cleanup: r("DELETE FROM {table} \
                 WHERE (state = 'done' AND done_at < now() - make_interval(secs => $1)) \
                    OR (state = 'held' AND lease_until < now() - interval '1 hour')"),
        };
        Self {
            inbox,
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
        }
    }
}

impl PostgresStore {
    fn build(pool: PgPool, setup: Setup) -> Self {
        let sql = Sql::new(&setup.table);
        let looks = Looks::new(look_batch(
            pool.clone(),
            sql.done_many,
            setup.retention,
            setup.timeout,
        ));
        Self {
            inner: Arc::new(Inbox::new(pool, setup, sql.inbox, Look::Shared(looks))),
        }
    }

    /// Creates the table if it does not exist (plain `CREATE ... IF NOT EXISTS`, no
    /// migrations table of its own) and warns if `synchronous_commit` is off.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        crate::sql::postgres::migrate(&self.inner.pool, self.schema_sql(), self.setup().timeout)
            .await
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
