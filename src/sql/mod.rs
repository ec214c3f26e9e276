//! The layer every SQL store stands on: the store error, table names, bounded
//! statements, settings checks and schema application, written once for the inbox
//! ([`crate::idempotency`]) and the outbox ([`crate::outbox`]).
//!
//! A database backend is one small file per concern: `sql/<db>.rs` (connecting, the
//! settings it warns about, applying a schema), `idempotency/<db>.rs` (the inbox's
//! statements), `outbox/<db>.rs` (the outbox's statements), and `sql/<db>/*.sql` at the
//! repository root (the tables). Each passes the store conformance suite
//! ([`crate::testing::stores`]); `docs/architecture.md` lists the steps.

#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
mod dialect;
mod error;
#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
pub(crate) use dialect::{Dialect, Value};
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
pub(crate) use error::db_err;
pub use error::{StoreError, StoreErrorKind};

#[cfg_attr(
    not(any(feature = "postgres", feature = "sqlite", feature = "mysql")),
    allow(dead_code)
)]
use std::time::Duration;

/// A validated table name (`name` or `schema.name`) and the SQL rendered for it.
#[cfg_attr(
    not(any(feature = "postgres", feature = "sqlite", feature = "mysql")),
    allow(dead_code)
)]
#[derive(Debug, Clone)]
pub(crate) struct Table {
    pub(crate) name: String,
    /// The unqualified name, for index names and the NOTIFY channel.
    pub(crate) base: String,
}

#[cfg_attr(
    not(any(feature = "postgres", feature = "sqlite", feature = "mysql")),
    allow(dead_code)
)]
impl Table {
    /// Accepts `[A-Za-z_][A-Za-z0-9_]*`, optionally schema-qualified, each part at most 50
    /// characters (index names add a suffix within PostgreSQL's 63 and MySQL's 64).
    pub(crate) fn parse(name: &str) -> Result<Self, StoreError> {
        let ok_part = |p: &str| {
            !p.is_empty()
                && p.len() <= 50
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !p.starts_with(|c: char| c.is_ascii_digit())
        };
        let parts: Vec<&str> = name.split('.').collect();
        if parts.is_empty() || parts.len() > 2 || !parts.iter().all(|p| ok_part(p)) {
            return Err(StoreError::of(
                StoreErrorKind::Config,
                format!(
                    "invalid table name `{}`: use letters, digits and `_`, optionally `schema.table`",
                    crate::envelope::truncate(name, 120)
                ),
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            base: parts[parts.len() - 1].to_owned(),
        })
    }

    /// A constant default name.
    pub(crate) fn default_named(name: &'static str) -> Self {
        Self::parse(name).expect("a valid constant name")
    }

    /// `template` with `{table}` and `{index}` filled in.
    pub(crate) fn render(&self, template: &str) -> String {
        template
            .replace("{table}", &self.name)
            .replace("{index}", &self.base)
    }
}

/// What every SQL store is configured with: its table, the bound on each call and (for
/// the inbox) how long completed keys are kept.
#[cfg_attr(
    not(any(feature = "postgres", feature = "sqlite", feature = "mysql")),
    allow(dead_code)
)]
#[derive(Debug, Clone)]
pub(crate) struct Setup {
    pub(crate) table: Table,
    pub(crate) timeout: Duration,
    pub(crate) retention: Duration,
}

#[cfg_attr(
    not(any(feature = "postgres", feature = "sqlite", feature = "mysql")),
    allow(dead_code)
)]
impl Setup {
    /// The defaults: `table`, 10 s per call, keys kept 7 days.
    pub(crate) fn new(table: &'static str) -> Self {
        Self {
            table: Table::default_named(table),
            timeout: Duration::from_secs(10),
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// A step of a store, named for its timeout and for its database error.
#[cfg_attr(
    not(any(feature = "postgres", feature = "sqlite", feature = "mysql")),
    allow(dead_code)
)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step {
    /// What was being done (for a timeout).
    pub(crate) doing: &'static str,
    /// What could not be done (for a database error).
    pub(crate) failed: &'static str,
}

/// Runs `fut` with a time limit, turning a timeout into a [`StoreError`].
#[cfg_attr(
    not(any(feature = "postgres", feature = "sqlite", feature = "mysql")),
    allow(dead_code)
)]
pub(crate) async fn bounded<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(StoreError::timeout(what, limit)),
    }
}

/// Creates a store's table within `timeout` (`apply`, idempotent), then warns about the
/// database's settings that could lose a commit (`warn`): the migration of every backend.
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
pub(crate) async fn migrate(
    timeout: Duration,
    apply: impl std::future::Future<Output = Result<(), StoreError>>,
    warn: impl std::future::Future<Output = ()>,
) -> Result<(), StoreError> {
    bounded(timeout, "creating steadfast's table", apply).await?;
    warn.await;
    Ok(())
}

/// Runs one database call as `step`: bounded by `limit`, its error wrapped.
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
pub(crate) async fn run<T>(
    limit: Duration,
    step: Step,
    fut: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, StoreError> {
    bounded(limit, step.doing, async {
        fut.await.map_err(db_err(step.failed))
    })
    .await
}

/// `sql` with `parts` bound as its first parameters (a key's group, name and key).
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
pub(crate) fn keyed<DB: sqlx::Database>(
    sql: &std::sync::Arc<str>,
    parts: [&str; 3],
) -> sqlx::query::Query<'static, DB, DB::Arguments>
where
    for<'t> &'t str: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    let [a, b, c] = parts;
    sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
        .bind(a)
        .bind(b)
        .bind(c)
}

/// [`keyed`] for a statement that returns one column of type `O`.
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
pub(crate) fn keyed_scalar<'q, DB: sqlx::Database, O>(
    sql: &std::sync::Arc<str>,
    parts: [&'q str; 3],
) -> sqlx::query::QueryScalar<'q, DB, O, DB::Arguments>
where
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    (O,): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let [a, b, c] = parts;
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
        .bind(a)
        .bind(b)
        .bind(c)
}

/// `d` in whole milliseconds, as SQLite and MySQL times are kept.
#[cfg(any(feature = "sqlite", feature = "mysql"))]
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Whether `url` names this machine (or a Unix socket).
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) fn is_loopback(url: &str) -> bool {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .is_none_or(|h| {
            h == "localhost" || h.starts_with("127.") || h == "[::1]" || h.starts_with('/')
        })
}

/// A pool of up to 16 connections to `url` (a `db` database), connected within 15 s;
/// with `insecure` (the hint that would require TLS) a warning when the host is not this
/// machine. The password never appears in errors or logs.
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) async fn open_pool<DB: sqlx::Database>(
    url: &str,
    db: &str,
    insecure: Option<&str>,
) -> Result<sqlx::Pool<DB>, StoreError>
where
    <DB::Connection as sqlx::Connection>::Options: std::str::FromStr<Err = sqlx::Error>,
{
    let shown = crate::redact::redact_url(url);
    let secret = crate::redact::password(url);
    let fail = |kind, what: &str, e: sqlx::Error| {
        StoreError::of(
            kind,
            format!(
                "{what} {shown}: {}",
                crate::redact::scrub(&e.to_string(), secret.as_deref())
            ),
        )
    };
    let opts: <DB::Connection as sqlx::Connection>::Options = url
        .parse()
        .map_err(|e| fail(StoreErrorKind::Config, &format!("invalid {db} url"), e))?;
    if let Some(hint) = insecure
        && !is_loopback(url)
    {
        tracing::warn!(url = %shown, "connecting to a non-loopback {db} host without requiring TLS; {hint}");
    }
    let connect = sqlx::pool::PoolOptions::<DB>::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts);
    match tokio::time::timeout(Duration::from_secs(15), connect).await {
        Ok(Ok(pool)) => Ok(pool),
        Ok(Err(e)) => Err(fail(StoreErrorKind::Unavailable, "could not connect to", e)),
        Err(_) => Err(StoreError::of(
            StoreErrorKind::Unavailable,
            format!("could not connect to {shown}: no answer within 15s"),
        )),
    }
}

/// The value of query parameter `name` of `url`.
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) fn url_param(url: &str, name: &str) -> Option<String> {
    url::Url::parse(url).ok().and_then(|u| {
        u.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    })
}

/// The public methods every SQL store shares, written once: `with_table`,
/// `with_timeout`, `table` and `schema_sql`. The store provides `setup(&self) -> &Setup`,
/// `rebuild(&self, Setup) -> Self` and a `SCHEMA` constant.
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
macro_rules! store_methods {
    () => {
        /// Uses table `name` (`table` or `schema.table`) instead of the default.
        pub fn with_table(self, name: &str) -> Result<Self, $crate::sql::StoreError> {
            let mut setup = self.setup().clone();
            setup.table = $crate::sql::Table::parse(name)?;
            Ok(self.rebuild(setup))
        }

        /// Bounds every call of this store to the database (default 10 s).
        #[must_use]
        pub fn with_timeout(self, timeout: std::time::Duration) -> Self {
            let mut setup = self.setup().clone();
            setup.timeout = timeout;
            self.rebuild(setup)
        }

        /// The table's name.
        pub fn table(&self) -> &str {
            &self.setup().table.name
        }

        /// The SQL that creates the table, for your own migrations. Idempotent.
        pub fn schema_sql(&self) -> String {
            self.setup().table.render(SCHEMA)
        }
    };
}
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
pub(crate) use store_methods;

#[cfg(test)]
mod tests {
    use super::Table;

    #[test]
    fn table_names_are_validated() {
        assert!(Table::parse("steadfast_outbox").is_ok());
        let t = Table::parse("tenant_1.steadfast_outbox").unwrap();
        assert_eq!(t.base, "steadfast_outbox");
        assert_eq!(
            t.render("{table}/{index}_x"),
            "tenant_1.steadfast_outbox/steadfast_outbox_x"
        );
        for bad in ["", "a.b.c", "x; drop table y", "1abc", "a-b", "a."] {
            let e = Table::parse(bad).unwrap_err();
            assert_eq!(e.kind(), super::StoreErrorKind::Config, "{bad}");
        }
    }
}
