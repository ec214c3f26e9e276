//! The one error of every store: a kind to match on, a message and a source.

use std::{error::Error as StdError, fmt, time::Duration};

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

/// A store failed; the worker treats it as a transient failure (the message is retried).
/// Its text never contains credentials.
#[derive(Debug)]
pub struct StoreError {
    kind: StoreErrorKind,
    message: String,
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

impl StoreError {
    /// A store error with a message (never containing credentials), of kind
    /// [`StoreErrorKind::Other`].
    pub fn new(message: impl Into<String>) -> Self {
        Self::of(StoreErrorKind::Other, message)
    }

    /// A store error of `kind` with a message.
    pub fn of(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying error.
    #[must_use]
    pub fn with_source(
        mut self,
        source: impl Into<Box<dyn StdError + Send + Sync + 'static>>,
    ) -> Self {
        self.source = Some(source.into());
        self
    }

    /// What went wrong.
    ///
    /// ```
    /// use steadfast::sql::{StoreError, StoreErrorKind};
    /// let e = StoreError::of(StoreErrorKind::Timeout, "inbox mark: no answer");
    /// assert_eq!(e.kind(), StoreErrorKind::Timeout);
    /// ```
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
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

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl StdError for StoreError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static))
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
