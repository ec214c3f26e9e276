//! What differs between the SQL databases, and only that: a [`Dialect`] names the sqlx
//! driver, how a duration and an id are bound, the server's clock, and how a schema is
//! applied. The inbox and the outbox are written once over it (`idempotency/sql.rs`,
//! `outbox/sql.rs`); each database adds its statements (`idempotency/<db>.rs`,
//! `outbox/<db>.rs`) and what it alone does (PostgreSQL's shared looks and
//! `LISTEN/NOTIFY`, MySQL's claim transaction).

use super::Table;
use sqlx::{Database, Decode, Encode, Type};
use std::{sync::Arc, time::Duration};
use uuid::Uuid;

/// One SQL database as the stores see it. Implemented by a marker type per database
/// (`sql::postgres::Pg`, `sql::sqlite::Lite`, `sql::mysql::My`).
pub(crate) trait Dialect: Send + Sync + 'static {
    /// The sqlx driver.
    type Db: Database;
    /// A duration as bound and read back: seconds (`f64`) on PostgreSQL, whole
    /// milliseconds (`i64`) where times are kept as integers.
    type Span: Value<Self::Db> + Copy + Unpin;
    /// A UUID (a lease token, a message id) as bound and read back: `uuid` on
    /// PostgreSQL, text elsewhere.
    type Uuid: Value<Self::Db> + Clone + Unpin;

    /// `d` as bound.
    fn span(d: Duration) -> Self::Span;

    /// A span read back, when it is a positive duration.
    fn positive(span: Self::Span) -> Option<Duration>;

    /// A span read back as an age, never negative.
    fn age(span: Self::Span) -> Duration;

    /// `id` as bound.
    fn uuid(id: Uuid) -> Self::Uuid;

    /// An id read back.
    fn read_uuid(v: Self::Uuid) -> Result<Uuid, uuid::Error>;

    /// How many rows a statement changed.
    fn rows_affected(done: &<Self::Db as Database>::QueryResult) -> u64;

    /// `sql` for table `t`: `{table}` and `{index}` filled in, and `{now}` with the
    /// server's clock where the dialect keeps times as numbers.
    fn render(t: &Table, sql: &str) -> Arc<str>;
}

/// A value bound to and read from `DB`'s statements.
pub(crate) trait Value<DB: Database>:
    Send + Sync + 'static + for<'q> Encode<'q, DB> + for<'r> Decode<'r, DB> + Type<DB>
{
}

impl<DB: Database, T> Value<DB> for T where
    T: Send + Sync + 'static + for<'q> Encode<'q, DB> + for<'r> Decode<'r, DB> + Type<DB>
{
}

/// The [`Dialect`] of a database that keeps times as Unix milliseconds from the server
/// clock `$now` (an SQL expression) and ids as text: SQLite, MySQL.
#[cfg(any(feature = "sqlite", feature = "mysql"))]
macro_rules! millisecond_dialect {
    ($name:ident, $db:ty, $now:expr) => {
        impl $crate::sql::Dialect for $name {
            type Db = $db;
            type Span = i64;
            type Uuid = String;

            fn span(d: std::time::Duration) -> i64 {
                $crate::sql::millis(d)
            }

            fn positive(ms: i64) -> Option<std::time::Duration> {
                (ms > 0).then(|| std::time::Duration::from_millis(ms.unsigned_abs()))
            }

            fn age(ms: i64) -> std::time::Duration {
                std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0))
            }

            fn uuid(id: uuid::Uuid) -> String {
                id.to_string()
            }

            fn read_uuid(v: String) -> Result<uuid::Uuid, uuid::Error> {
                uuid::Uuid::parse_str(&v)
            }

            fn rows_affected(done: &<$db as sqlx::Database>::QueryResult) -> u64 {
                done.rows_affected()
            }

            fn render(t: &$crate::sql::Table, sql: &str) -> std::sync::Arc<str> {
                t.render(sql).replace("{now}", $now).into()
            }
        }
    };
}
#[cfg(any(feature = "sqlite", feature = "mysql"))]
pub(crate) use millisecond_dialect;
