//! The one error of every store: a kind to match on, a message and a source
//! ([`BackendError`] over [`StoreErrorKind`]).

use crate::error::BackendError;
use std::time::Duration;

/// What kind of store failure a [`StoreError`] is. The worker treats every kind as
/// transient (the message is retried); callers match on it to decide more.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreErrorKind {
    /// The database could not be reached, or the connection died; the statement may or
    /// may not have taken effect.
    Unavailable,
    /// The database did not answer within the store's timeout; the outcome is unknown.
    Timeout,
    /// The database refused or failed a statement.
    Query,
    /// The configuration is wrong (a table name, an URL): a start-up error.
    Config,
    /// A message could not be encoded for storing.
    Encode,
    /// Anything else (stores written outside this crate).
    Other,
}

/// A store failed: a [`StoreErrorKind`], a message and a source, in the shape every
/// backend error has ([`BackendError`]). The worker treats it as a transient failure (the
/// message is retried). Its text never contains credentials.
///
/// ```
/// use steadfast::sql::{StoreError, StoreErrorKind};
/// let e = StoreError::of(StoreErrorKind::Timeout, "inbox mark: no answer");
/// assert_eq!(e.kind(), StoreErrorKind::Timeout);
/// ```
pub type StoreError = BackendError<StoreErrorKind>;

impl StoreError {
    /// A store error with a message (never containing credentials), of kind
    /// [`StoreErrorKind::Other`].
    pub fn new(message: impl Into<String>) -> Self {
        Self::of(StoreErrorKind::Other, message)
    }

    /// The error for a statement that did not finish within `limit`.
    pub(crate) fn timeout(what: &str, limit: Duration) -> Self {
        Self::of(
            StoreErrorKind::Timeout,
            format!(
                "{what}: the database did not answer within {}",
                humantime::format_duration(limit)
            ),
        )
    }
}

/// Wraps a database error; sqlx's error text carries no connection URL.
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
pub(crate) fn db_err(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| StoreError::of(kind_of(&e), what).with_source(e)
}

/// The kind of a database error: lost or unreachable connections apart from refusals.
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
pub(crate) fn kind_of(e: &sqlx::Error) -> StoreErrorKind {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => StoreErrorKind::Unavailable,
        sqlx::Error::Configuration(_) => StoreErrorKind::Config,
        _ => StoreErrorKind::Query,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_text() {
        let e = StoreError::new("x").with_source(std::io::Error::other("y"));
        assert_eq!(e.kind(), StoreErrorKind::Other);
        assert_eq!(e.to_string(), "x: y");
        let t = StoreError::timeout("inbox mark", Duration::from_secs(2));
        assert_eq!(t.kind(), StoreErrorKind::Timeout);
        assert!(t.to_string().contains("2s"), "{t}");
    }
}
