//! The store conformance factories of steadfast's own SQL backends: PostgreSQL (a schema
//! per case), SQLite (a file per case) and MySQL/MariaDB (a table prefix per case).

use super::{CaseDb, CaseTx, Features, StoreCase, StoreFactory};
use crate::{envelope::Envelope, idempotency::Key, sql::StoreError};
use futures::future::BoxFuture;
use sqlx::AssertSqlSafe;
use std::sync::Arc;

/// A failed statement of the fixture (not of the store under test).
fn fixture(e: sqlx::Error) -> StoreError {
    crate::sql::db_err("conformance fixture")(e)
}

/// The transaction and the database of one backend's case: `$db` the sqlx database,
/// `$store` / `$outbox` its stores, `$insert` the effect insert (one parameter, the key),
/// `$count` the effect count (one parameter).
macro_rules! sql_case {
    ($tx:ident, $case:ident, $db:ty, $store:ty, $outbox:ty) => {
        struct $tx {
            tx: sqlx::Transaction<'static, $db>,
            inbox: $store,
            outbox: $outbox,
            insert: Arc<str>,
        }

        impl CaseTx for $tx {
            fn mark<'a>(&'a mut self, key: Key<'a>) -> BoxFuture<'a, Result<bool, StoreError>> {
                Box::pin(self.inbox.mark_key(&mut self.tx, key))
            }

            fn effect<'a>(&'a mut self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
                Box::pin(async move {
                    sqlx::query(AssertSqlSafe(self.insert.clone()))
                        .bind(key)
                        .execute(&mut *self.tx)
                        .await
                        .map(drop)
                        .map_err(fixture)
                })
            }

            fn enqueue(&mut self, envelope: Envelope) -> BoxFuture<'_, Result<(), StoreError>> {
                Box::pin(async move {
                    self.outbox
                        .enqueue_envelope(&mut self.tx, envelope)
                        .await
                        .map(drop)
                })
            }

            fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), StoreError>> {
                Box::pin(async move { self.tx.commit().await.map_err(fixture) })
            }

            fn rollback(self: Box<Self>) -> BoxFuture<'static, Result<(), StoreError>> {
                Box::pin(async move { self.tx.rollback().await.map_err(fixture) })
            }
        }

        struct $case {
            pool: sqlx::Pool<$db>,
            inbox: $store,
            outbox: $outbox,
            insert: Arc<str>,
            count: Arc<str>,
            drop: Vec<String>,
            /// Files to remove once the pool is closed.
            files: Vec<std::path::PathBuf>,
        }

        impl CaseDb for $case {
            fn begin(&self) -> BoxFuture<'_, Result<Box<dyn CaseTx>, StoreError>> {
                Box::pin(async move {
                    let tx = self.pool.begin().await.map_err(fixture)?;
                    Ok(Box::new($tx {
                        tx,
                        inbox: self.inbox.clone(),
                        outbox: self.outbox.clone(),
                        insert: self.insert.clone(),
                    }) as Box<dyn CaseTx>)
                })
            }

            fn effects<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
                Box::pin(async move {
                    let n: i64 = sqlx::query_scalar(AssertSqlSafe(self.count.clone()))
                        .bind(key)
                        .fetch_one(&self.pool)
                        .await
                        .map_err(fixture)?;
                    Ok(u64::try_from(n).unwrap_or(0))
                })
            }

            fn drop_case(&self) -> BoxFuture<'_, ()> {
                Box::pin(async move {
                    for sql in &self.drop {
                        if let Err(e) = sqlx::raw_sql(AssertSqlSafe(sql.clone()))
                            .execute(&self.pool)
                            .await
                        {
                            tracing::warn!(error = %e, "could not drop a conformance case");
                        }
                    }
                    self.pool.close().await;
                    for f in &self.files {
                        let _ = std::fs::remove_file(f);
                    }
                })
            }
        }

        impl $case {
            fn into_case(self, features: Features) -> StoreCase {
                StoreCase {
                    inbox: Arc::new(self.inbox.clone()),
                    outbox: Arc::new(self.outbox.clone()),
                    db: Box::new(self),
                    features,
                }
            }
        }
    };
}

#[cfg(feature = "postgres")]
sql_case!(
    PgTx,
    PgCase,
    sqlx::Postgres,
    crate::idempotency::PostgresStore,
    crate::outbox::PostgresOutbox
);
#[cfg(feature = "sqlite")]
sql_case!(
    LiteTx,
    LiteCase,
    sqlx::Sqlite,
    crate::idempotency::SqliteStore,
    crate::outbox::SqliteOutbox
);
#[cfg(feature = "mysql")]
sql_case!(
    MyTx,
    MyCase,
    sqlx::MySql,
    crate::idempotency::MySqlStore,
    crate::outbox::MySqlOutbox
);

/// Runs `sql` for a case's set-up, failing the case loudly.
macro_rules! setup {
    ($pool:expr, $sql:expr) => {
        sqlx::raw_sql(AssertSqlSafe($sql))
            .execute($pool)
            .await
            .expect("the conformance case's tables are created")
    };
}

/// Cases on PostgreSQL at `url`, each in a schema of its own.
#[cfg(feature = "postgres")]
#[derive(Debug, Clone)]
pub struct PostgresFactory {
    url: String,
}

#[cfg(feature = "postgres")]
impl PostgresFactory {
    /// Cases on the database at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into() }
    }

    /// `DATABASE_URL`, or the local test database `postgres://postgres@127.0.0.1:5432/test`.
    pub fn local() -> Self {
        Self::new(
            std::env::var("DATABASE_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned()),
        )
    }
}

#[cfg(feature = "postgres")]
impl StoreFactory for PostgresFactory {
    fn create<'a>(&'a self, case: &'a str) -> BoxFuture<'a, StoreCase> {
        Box::pin(async move {
            let pool = crate::sql::postgres::connect(&self.url)
                .await
                .expect("PostgreSQL answers for the store conformance suite");
            let schema = format!("sc_{case}");
            setup!(
                &pool,
                format!("CREATE SCHEMA {schema}; CREATE TABLE {schema}.effects (k text NOT NULL)")
            );
            let inbox = crate::idempotency::PostgresStore::new(pool.clone())
                .with_table(&format!("{schema}.steadfast_inbox"))
                .expect("a valid table name");
            let outbox = crate::outbox::PostgresOutbox::new(pool.clone())
                .with_table(&format!("{schema}.steadfast_outbox"))
                .expect("a valid table name");
            inbox.migrate().await.expect("the inbox table is created");
            outbox.migrate().await.expect("the outbox table is created");
            PgCase {
                pool,
                inbox,
                outbox,
                insert: format!("INSERT INTO {schema}.effects (k) VALUES ($1)").into(),
                count: format!("SELECT count(*) FROM {schema}.effects WHERE k = $1").into(),
                drop: vec![format!("DROP SCHEMA {schema} CASCADE")],
                files: Vec::new(),
            }
            .into_case(Features::concurrent())
        })
    }
}

/// Cases on SQLite, each in a database file of its own in the temporary directory.
#[cfg(feature = "sqlite")]
#[derive(Debug, Clone, Default)]
pub struct SqliteFactory;

#[cfg(feature = "sqlite")]
impl StoreFactory for SqliteFactory {
    fn create<'a>(&'a self, case: &'a str) -> BoxFuture<'a, StoreCase> {
        Box::pin(async move {
            let path = std::env::temp_dir().join(format!("steadfast-stores-{case}.db"));
            let pool = crate::sql::sqlite::open(&path)
                .await
                .expect("a SQLite file in the temporary directory");
            setup!(&pool, "CREATE TABLE effects (k TEXT NOT NULL)".to_owned());
            let inbox = crate::idempotency::SqliteStore::new(pool.clone());
            let outbox = crate::outbox::SqliteOutbox::new(pool.clone());
            inbox.migrate().await.expect("the inbox table is created");
            outbox.migrate().await.expect("the outbox table is created");
            LiteCase {
                pool,
                inbox,
                outbox,
                insert: "INSERT INTO effects (k) VALUES (?1)".into(),
                count: "SELECT count(*) FROM effects WHERE k = ?1".into(),
                drop: Vec::new(),
                files: ["", "-wal", "-shm"]
                    .iter()
                    .map(|s| std::path::PathBuf::from(format!("{}{s}", path.display())))
                    .collect(),
            }
            .into_case(Features::single_writer())
        })
    }
}

/// Cases on MySQL or MariaDB at `url`, each with tables of its own (`c_<case>_*`).
#[cfg(feature = "mysql")]
#[derive(Debug, Clone)]
pub struct MySqlFactory {
    url: String,
}

#[cfg(feature = "mysql")]
impl MySqlFactory {
    /// Cases on the database at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into() }
    }

    /// `MYSQL_URL`, or the local test database `mysql://root@127.0.0.1:3306/test`.
    pub fn local() -> Self {
        Self::new(
            std::env::var("MYSQL_URL")
                .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned()),
        )
    }
}

#[cfg(feature = "mysql")]
impl StoreFactory for MySqlFactory {
    fn create<'a>(&'a self, case: &'a str) -> BoxFuture<'a, StoreCase> {
        Box::pin(async move {
            let pool = crate::sql::mysql::connect(&self.url)
                .await
                .expect("MySQL/MariaDB answers for the store conformance suite");
            let p = format!("c_{case}");
            setup!(
                &pool,
                format!("CREATE TABLE {p}_effects (k VARCHAR(255) NOT NULL) ENGINE = InnoDB")
            );
            let inbox = crate::idempotency::MySqlStore::new(pool.clone())
                .with_table(&format!("{p}_inbox"))
                .expect("a valid table name");
            let outbox = crate::outbox::MySqlOutbox::new(pool.clone())
                .with_table(&format!("{p}_outbox"))
                .expect("a valid table name");
            inbox.migrate().await.expect("the inbox table is created");
            outbox.migrate().await.expect("the outbox table is created");
            MyCase {
                pool,
                inbox,
                outbox,
                insert: format!("INSERT INTO {p}_effects (k) VALUES (?)").into(),
                count: format!("SELECT COUNT(*) FROM {p}_effects WHERE k = ?").into(),
                drop: vec![format!("DROP TABLE {p}_effects, {p}_inbox, {p}_outbox")],
                files: Vec::new(),
            }
            .into_case(Features::concurrent())
        })
    }
}
