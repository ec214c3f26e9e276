//! The database of a run, PostgreSQL or MySQL / MariaDB (chosen by the URL's scheme):
//! its pool, the inbox store and the outbox the model uses, and the few statements the
//! harness needs (schema, effects, counts), so the worker, the relay and the harness are
//! written once for both.

use crate::spec::Work;
use std::time::Duration;
use steadfast::{
    Context, HandlerError,
    idempotency::{MySqlStore, PostgresStore},
    outbox::{MySqlOutbox, PostgresOutbox},
};

type Res<T> = Result<T, String>;

/// Which database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Database {
    /// PostgreSQL (the shared server, restarted with `pg_ctlcluster`).
    Postgres,
    /// MariaDB (a private server the harness starts; see `mariadb`).
    MariaDb,
}

impl Database {
    /// The database a URL names (`mysql://` or `mariadb://` is MariaDB).
    pub fn of_url(url: &str) -> Self {
        if url.starts_with("mysql:") || url.starts_with("mariadb:") {
            Self::MariaDb
        } else {
            Self::Postgres
        }
    }

    /// The name in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "PostgreSQL",
            Self::MariaDb => "MariaDB",
        }
    }
}

/// A pool on the run's database.
#[derive(Debug, Clone)]
pub enum Pool {
    /// PostgreSQL.
    Pg(sqlx::PgPool),
    /// MySQL / MariaDB.
    My(sqlx::MySqlPool),
}

/// The inbox store (the worker's `.idempotency(..)` or `.inbox(..)`).
#[derive(Debug, Clone)]
pub enum Inbox {
    /// PostgreSQL.
    Pg(PostgresStore),
    /// MySQL / MariaDB.
    My(MySqlStore),
}

/// The outbox.
#[derive(Debug, Clone)]
pub enum Outbox {
    /// PostgreSQL.
    Pg(PostgresOutbox),
    /// MySQL / MariaDB.
    My(MySqlOutbox),
}

fn e<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> String {
    move |err| format!("{what}: {err}")
}

/// Runs `$body` with `$p` bound to the pool of either database.
macro_rules! on_pool {
    ($pool:expr, $p:ident => $body:expr) => {
        match $pool {
            Pool::Pg($p) => $body,
            Pool::My($p) => $body,
        }
    };
}

impl Pool {
    /// Connects `max` connections to `url`.
    pub async fn connect(url: &str, max: u32) -> Res<Self> {
        let what = "the database must be running on its URL";
        Ok(match Database::of_url(url) {
            Database::Postgres => Self::Pg(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(max)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(url)
                    .await
                    .map_err(e(what))?,
            ),
            Database::MariaDb => Self::My(
                sqlx::mysql::MySqlPoolOptions::new()
                    .max_connections(max)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(url)
                    .await
                    .map_err(e(what))?,
            ),
        })
    }

    /// Runs statements separated by `;`.
    pub async fn exec(&self, sql: String) -> Res<()> {
        on_pool!(self, p => sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(p).await.map(drop))
            .map_err(|e| e.to_string())
    }

    /// Creates the run's schema (a database on MariaDB) with the `effects` table: no
    /// unique constraint, so a second effect of a message shows.
    pub async fn create_schema(&self, schema: &str) -> Res<()> {
        let sql = match self {
            Pool::Pg(_) => format!(
                "CREATE SCHEMA {schema}; CREATE TABLE {schema}.effects (n bigint NOT NULL, id uuid NOT NULL, attempt int NOT NULL, pid int NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());"
            ),
            Pool::My(_) => format!(
                "CREATE DATABASE {schema}; CREATE TABLE {schema}.effects (n bigint NOT NULL, id char(36) NOT NULL, attempt int NOT NULL, pid int NOT NULL, at timestamp(6) NOT NULL DEFAULT current_timestamp(6), KEY (n)) ENGINE=InnoDB;"
            ),
        };
        self.exec(sql).await.map_err(e("creating the schema"))
    }

    /// Drops the run's schema.
    pub async fn drop_schema(&self, schema: &str) {
        let sql = match self {
            Pool::Pg(_) => format!("DROP SCHEMA {schema} CASCADE"),
            Pool::My(_) => format!("DROP DATABASE {schema}"),
        };
        let _ = self.exec(sql).await;
    }

    /// `SELECT count(..)`-like statement returning one integer.
    pub async fn scalar(&self, sql: String) -> Res<u64> {
        let n: i64 =
            on_pool!(self, p => sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(p).await)
                .map_err(|e| e.to_string())?;
        Ok(n.max(0) as u64)
    }

    /// A statement returning pairs of integers.
    pub async fn pairs(&self, sql: String) -> Res<Vec<(i64, i64)>> {
        on_pool!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(p).await)
            .map_err(|e| e.to_string())
    }

    /// The inbox store in `table`.
    pub fn inbox(&self, table: &str) -> Res<Inbox> {
        Ok(match self {
            Pool::Pg(p) => Inbox::Pg(
                PostgresStore::new(p.clone())
                    .with_table(table)
                    .map_err(e("inbox"))?,
            ),
            Pool::My(p) => Inbox::My(
                MySqlStore::new(p.clone())
                    .with_table(table)
                    .map_err(e("inbox"))?,
            ),
        })
    }

    /// The outbox in `table`, its store calls bounded by `timeout`.
    pub fn outbox(&self, table: &str, timeout: Duration) -> Res<Outbox> {
        Ok(match self {
            Pool::Pg(p) => Outbox::Pg(
                PostgresOutbox::new(p.clone())
                    .with_table(table)
                    .map_err(e("outbox"))?
                    .with_timeout(timeout),
            ),
            Pool::My(p) => Outbox::My(
                MySqlOutbox::new(p.clone())
                    .with_table(table)
                    .map_err(e("outbox"))?
                    .with_timeout(timeout),
            ),
        })
    }

    /// The model handler's write: the inbox mark and one row into `effects`, in one
    /// transaction (with the before-commit crash window).
    pub async fn write_effect(
        &self,
        inbox: &Inbox,
        effects: &str,
        job: &Work,
        cx: &Context,
    ) -> Result<(), HandlerError> {
        let n = i64::try_from(job.n).unwrap_or(i64::MAX);
        let attempt = i32::try_from(cx.attempt()).unwrap_or(i32::MAX);
        let pid = i32::try_from(std::process::id()).unwrap_or(0);
        // One body for both databases: `$id` is the bound id, `$sql` the insert.
        macro_rules! effect {
            ($pool:expr, $inbox:expr, $sql:expr, $id:expr) => {{
                let mut tx = $pool.begin().await?;
                if !$inbox.mark(&mut tx, cx).await? {
                    return Ok(()); // handled before: no second effect
                }
                sqlx::query(sqlx::AssertSqlSafe($sql))
                    .bind(n)
                    .bind($id)
                    .bind(attempt)
                    .bind(pid)
                    .execute(&mut *tx)
                    .await?;
                // Crash window: the effect is written, the transaction not committed.
                #[cfg(feature = "failpoints")]
                fail::fail_point!("fault::handler::before_commit");
                tx.commit().await?;
            }};
        }
        match (self, inbox) {
            (Pool::Pg(p), Inbox::Pg(i)) => effect!(
                p,
                i,
                format!("INSERT INTO {effects} (n, id, attempt, pid) VALUES ($1, $2, $3, $4)"),
                *cx.id().as_uuid()
            ),
            (Pool::My(p), Inbox::My(i)) => effect!(
                p,
                i,
                format!("INSERT INTO {effects} (n, id, attempt, pid) VALUES (?, ?, ?, ?)"),
                cx.id().to_string()
            ),
            _ => return Err(HandlerError::msg("the inbox is on another database").permanent()),
        }
        Ok(())
    }
}

impl Inbox {
    /// Creates its table.
    pub async fn migrate(&self) -> Res<()> {
        match self {
            Inbox::Pg(s) => s.migrate().await,
            Inbox::My(s) => s.migrate().await,
        }
        .map_err(e("inbox migrate"))
    }
}

impl Outbox {
    /// Creates its table.
    pub async fn migrate(&self) -> Res<()> {
        match self {
            Outbox::Pg(o) => o.migrate().await,
            Outbox::My(o) => o.migrate().await,
        }
        .map_err(e("outbox migrate"))
    }

    /// Rows not yet dispatched.
    pub async fn pending(&self) -> Res<i64> {
        match self {
            Outbox::Pg(o) => o.pending().await,
            Outbox::My(o) => o.pending().await,
        }
        .map_err(|e| e.to_string())
    }

    /// Commits `chunk` into the outbox in one transaction on `pool`.
    pub async fn enqueue_all(&self, pool: &Pool, chunk: &[Work]) -> Res<()> {
        macro_rules! enqueue {
            ($pool:expr, $outbox:expr) => {{
                let mut tx = $pool.begin().await.map_err(|e| e.to_string())?;
                for w in chunk {
                    $outbox
                        .enqueue(&mut tx, w)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                tx.commit().await.map_err(|e| e.to_string())
            }};
        }
        match (pool, self) {
            (Pool::Pg(p), Outbox::Pg(o)) => enqueue!(p, o),
            (Pool::My(p), Outbox::My(o)) => enqueue!(p, o),
            _ => Err("the outbox is on another database".to_owned()),
        }
    }
}
