//! The SQL inbox, written once over a [`Dialect`]: taking, completing and releasing
//! keys, the inbox `mark` in the user's transaction, the looks and the cleanup. A
//! database supplies its statements ([`InboxSql`]) and, through its dialect, how it binds
//! times and tokens; `idempotency/<db>.rs` holds those and its public store type, made by
//! [`sql_inbox!`](crate::idempotency::sql::sql_inbox).

use super::{
    Begin, Fingerprint, Key, Lease, StoreError,
    looks::Looks,
    steps::{CLEANUP, COMPLETE, FINGERPRINT, LOOK, MARK, RELEASE, REMAINING, STATE, TAKE},
    stored_fingerprint,
};
use crate::sql::{Dialect, Setup, bounded, keyed, keyed_scalar, run};
use sqlx::{
    AssertSqlSafe, ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Type,
};
use std::{sync::Arc, time::Duration};
use uuid::Uuid;

/// A parameter bound after a key's group, name and key, for the statements whose
/// parameters each database orders (and repeats) its own way.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Param {
    /// The lease token being taken or written.
    Token,
    /// How long the lease lasts.
    Lease,
    /// How long completed keys are kept.
    Retention,
    /// The payload fingerprint (nullable text).
    Fingerprint,
}

/// A statement and the parameters it binds after the key, in order.
pub(crate) struct Stmt {
    pub(crate) sql: Arc<str>,
    pub(crate) params: &'static [Param],
}

/// How a store answers "is this key done?".
pub(crate) enum Look {
    /// One statement a look, binding the key and the retention.
    One(Arc<str>),
    /// Looks shared between the callers waiting at one moment (PostgreSQL).
    Shared(Looks),
}

/// The inbox's statements in one database's SQL. Each binds a key's group, name and key
/// first (but `cleanup`).
pub(crate) struct InboxSql {
    /// Takes a free key, a lapsed lease or a key done longer ago than the retention.
    pub(crate) take: Stmt,
    /// Marks a key done in the user's transaction, unless it is done already.
    pub(crate) mark: Stmt,
    /// For databases whose upsert returns nothing (MySQL): whether the key holds the
    /// token (then `take` and `mark` write the token they bind only when they win).
    /// Without it, `take` and `mark` return a row when they win.
    pub(crate) holds: Option<Arc<str>>,
    /// The key's state (`held` or `done`).
    pub(crate) state: Arc<str>,
    /// The key's stored payload fingerprint.
    pub(crate) fingerprint: Arc<str>,
    /// Marks a key done after its handler, binding the fingerprint.
    pub(crate) complete: Arc<str>,
    /// Frees a key held with the token bound.
    pub(crate) release: Arc<str>,
    /// The lease left on a held key, as the dialect's span.
    pub(crate) remaining: Arc<str>,
    /// Deletes done keys older than the retention bound and leases abandoned an hour.
    pub(crate) cleanup: Arc<str>,
}

/// An inbox in one table of one database.
pub(crate) struct Inbox<D: Dialect> {
    pub(crate) pool: Pool<D::Db>,
    pub(crate) setup: Setup,
    sql: InboxSql,
    look: Look,
}

impl<D: Dialect> Inbox<D>
where
    for<'c> &'c mut <D::Db as Database>::Connection: Executor<'c, Database = D::Db>,
    <D::Db as Database>::Arguments: IntoArguments<D::Db>,
    for<'q> &'q str: Encode<'q, D::Db> + Type<D::Db>,
    String: for<'q> Encode<'q, D::Db> + for<'r> Decode<'r, D::Db> + Type<D::Db>,
    Option<String>: for<'q> Encode<'q, D::Db>,
    usize: ColumnIndex<<D::Db as Database>::Row>,
{
    pub(crate) fn new(pool: Pool<D::Db>, setup: Setup, sql: InboxSql, look: Look) -> Self {
        Self {
            pool,
            setup,
            sql,
            look,
        }
    }

    fn timeout(&self) -> Duration {
        self.setup.timeout
    }

    /// `stmt` for `key`, its parameters bound in the database's order.
    fn bound<'q>(
        &self,
        stmt: &Stmt,
        key: Key<'q>,
        token: Uuid,
        lease: Duration,
    ) -> sqlx::query::Query<'q, D::Db, <D::Db as Database>::Arguments> {
        let mut q = keyed(&stmt.sql, key.parts());
        for p in stmt.params {
            q = match p {
                Param::Token => q.bind(D::uuid(token)),
                Param::Lease => q.bind(D::span(lease)),
                Param::Retention => q.bind(D::span(self.setup.retention)),
                Param::Fingerprint => q.bind(key.fingerprint_text()),
            };
        }
        q
    }

    /// Takes `key` for `token`; whether it was won.
    async fn take(&self, key: Key<'_>, token: Uuid, lease: Duration) -> Result<bool, StoreError> {
        let q = self.bound(&self.sql.take, key, token, lease);
        match &self.sql.holds {
            None => Ok(run(self.timeout(), TAKE, q.fetch_optional(&self.pool))
                .await?
                .is_some()),
            Some(holds) => {
                run(self.timeout(), TAKE, q.execute(&self.pool)).await?;
                let q = keyed(holds, key.parts()).bind(D::uuid(token));
                let row = run(self.timeout(), TAKE, q.fetch_optional(&self.pool)).await?;
                Ok(row.is_some())
            }
        }
    }

    /// Takes `key` if it is free, or tells why not: done, or held by another lease.
    pub(crate) async fn begin(&self, key: Key<'_>, lease: Duration) -> Result<Begin, StoreError> {
        bounded(self.timeout(), "idempotency begin", async {
            // A key deleted between the take and the look (a release, a cleanup) is
            // taken again, once.
            for _ in 0..2 {
                let token = Uuid::now_v7();
                if self.take(key, token, lease).await? {
                    return Ok(Begin::Acquired(Lease { token }));
                }
                let q = keyed_scalar::<_, String>(&self.sql.state, key.parts());
                match run(self.timeout(), STATE, q.fetch_optional(&self.pool))
                    .await?
                    .as_deref()
                {
                    Some("done") => return Ok(Begin::AlreadyDone),
                    Some(_) => return Ok(Begin::InFlight),
                    None => {}
                }
            }
            Ok(Begin::InFlight)
        })
        .await
    }

    pub(crate) async fn fingerprint(
        &self,
        key: Key<'_>,
    ) -> Result<Option<Fingerprint>, StoreError> {
        let q = keyed_scalar(&self.sql.fingerprint, key.parts());
        let kept = run(self.timeout(), FINGERPRINT, q.fetch_optional(&self.pool)).await?;
        Ok(stored_fingerprint(kept))
    }

    pub(crate) async fn lease_remaining(
        &self,
        key: Key<'_>,
    ) -> Result<Option<Duration>, StoreError> {
        let q = keyed_scalar::<_, D::Span>(&self.sql.remaining, key.parts());
        let left = run(self.timeout(), REMAINING, q.fetch_optional(&self.pool)).await?;
        Ok(left.and_then(D::positive))
    }

    pub(crate) async fn is_done(&self, key: Key<'_>) -> Result<bool, StoreError> {
        // A key done longer ago than the retention counts as new, as in `begin`/`mark`.
        match &self.look {
            Look::Shared(looks) => looks.look(key).await,
            Look::One(sql) => {
                let q = keyed(sql, key.parts()).bind(D::span(self.setup.retention));
                Ok(run(self.timeout(), LOOK, q.fetch_optional(&self.pool))
                    .await?
                    .is_some())
            }
        }
    }

    /// Marks `key` done after its handler succeeded. Right even if the lease lapsed:
    /// the handler did succeed. A key the handler marked through the inbox stays as is.
    pub(crate) async fn complete(&self, key: Key<'_>) -> Result<(), StoreError> {
        let q = keyed(&self.sql.complete, key.parts()).bind(key.fingerprint_text());
        run(self.timeout(), COMPLETE, q.execute(&self.pool))
            .await
            .map(drop)
    }

    pub(crate) async fn release(&self, key: Key<'_>, lease: &Lease) -> Result<(), StoreError> {
        let q = keyed(&self.sql.release, key.parts()).bind(D::uuid(lease.token));
        run(self.timeout(), RELEASE, q.execute(&self.pool))
            .await
            .map(drop)
    }

    /// Marks `key` done in the user's transaction on `conn`; whether this mark won it.
    pub(crate) async fn mark_key(
        &self,
        conn: &mut <D::Db as Database>::Connection,
        key: Key<'_>,
    ) -> Result<bool, StoreError> {
        let token = Uuid::now_v7();
        let q = self.bound(&self.sql.mark, key, token, Duration::ZERO);
        match &self.sql.holds {
            None => Ok(run(self.timeout(), MARK, q.fetch_optional(conn))
                .await?
                .is_some()),
            Some(holds) => {
                run(self.timeout(), MARK, q.execute(&mut *conn)).await?;
                // The row is locked by this transaction now: it holds this token if and
                // only if this mark won it.
                let q = keyed(holds, key.parts()).bind(D::uuid(token));
                Ok(run(self.timeout(), MARK, q.fetch_optional(conn))
                    .await?
                    .is_some())
            }
        }
    }

    pub(crate) async fn cleanup(&self) -> Result<u64, StoreError> {
        let q = sqlx::query(AssertSqlSafe(self.sql.cleanup.clone()))
            .bind(D::span(self.setup.retention));
        let done = run(self.timeout(), CLEANUP, q.execute(&self.pool)).await?;
        Ok(D::rows_affected(&done))
    }
}

/// A database's public inbox type over [`Inbox`]: `new`, the builder methods, `mark`,
/// `mark_key`, `cleanup`, `spawn_cleanup` and [`IdempotencyStore`](super::IdempotencyStore),
/// written once. The type is `struct $store { inner: Arc<Inbox<D>> }` with a
/// `build(pool, Setup) -> Self` of its own (its statements).
macro_rules! sql_inbox {
    ($store:ident, $pool:ty, $conn:ty) => {
        impl std::fmt::Debug for $store {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($store))
                    .field("table", &self.inner.setup.table.name)
                    .field("retention", &self.inner.setup.retention)
                    .finish_non_exhaustive()
            }
        }

        impl $store {
            /// A store in table `steadfast_inbox` of `pool`'s database, keeping completed
            /// keys for 7 days.
            pub fn new(pool: $pool) -> Self {
                Self::build(pool, $crate::sql::Setup::new("steadfast_inbox"))
            }

            fn setup(&self) -> &$crate::sql::Setup {
                &self.inner.setup
            }

            fn rebuild(&self, setup: $crate::sql::Setup) -> Self {
                Self::build(self.inner.pool.clone(), setup)
            }

            $crate::sql::store_methods!();
            $crate::idempotency::inbox_methods!($conn);

            /// [`mark`](Self::mark) for an explicit key.
            pub async fn mark_key(
                &self,
                conn: &mut $conn,
                key: $crate::idempotency::Key<'_>,
            ) -> Result<bool, $crate::sql::StoreError> {
                self.inner.mark_key(conn, key).await
            }

            /// Deletes completed keys older than the retention and leases abandoned for
            /// over an hour; returns how many rows went.
            pub async fn cleanup(&self) -> Result<u64, $crate::sql::StoreError> {
                self.inner.cleanup().await
            }
        }

        impl $crate::idempotency::IdempotencyStore for $store {
            fn begin<'a>(
                &'a self,
                key: $crate::idempotency::Key<'a>,
                lease: std::time::Duration,
            ) -> futures::future::BoxFuture<
                'a,
                Result<$crate::idempotency::Begin, $crate::sql::StoreError>,
            > {
                Box::pin(self.inner.begin(key, lease))
            }

            fn complete<'a>(
                &'a self,
                key: $crate::idempotency::Key<'a>,
                _lease: &'a $crate::idempotency::Lease,
            ) -> futures::future::BoxFuture<'a, Result<(), $crate::sql::StoreError>> {
                Box::pin(self.inner.complete(key))
            }

            fn release<'a>(
                &'a self,
                key: $crate::idempotency::Key<'a>,
                lease: &'a $crate::idempotency::Lease,
            ) -> futures::future::BoxFuture<'a, Result<(), $crate::sql::StoreError>> {
                Box::pin(self.inner.release(key, lease))
            }

            fn is_done<'a>(
                &'a self,
                key: $crate::idempotency::Key<'a>,
            ) -> futures::future::BoxFuture<'a, Result<bool, $crate::sql::StoreError>> {
                Box::pin(self.inner.is_done(key))
            }

            fn lease_remaining<'a>(
                &'a self,
                key: $crate::idempotency::Key<'a>,
            ) -> futures::future::BoxFuture<
                'a,
                Result<Option<std::time::Duration>, $crate::sql::StoreError>,
            > {
                Box::pin(self.inner.lease_remaining(key))
            }

            fn fingerprint<'a>(
                &'a self,
                key: $crate::idempotency::Key<'a>,
            ) -> futures::future::BoxFuture<
                'a,
                Result<Option<$crate::idempotency::Fingerprint>, $crate::sql::StoreError>,
            > {
                Box::pin(self.inner.fingerprint(key))
            }
        }
    };
}
pub(crate) use sql_inbox;
