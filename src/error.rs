//! Errors: what a handler returns when it fails and how steadfast classifies it
//! ([`HandlerError`], [`ErrorKind`]), and the one shape of the errors its backends return
//! ([`BackendError`]: transports and stores).

use std::{error::Error as StdError, fmt, time::Duration};

/// How a failure is treated by the retry policy.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Might succeed later: retried with backoff, dead-lettered when attempts run out.
    /// The default for any error converted with `?`, for timeouts and for panics.
    Transient,
    /// Will never succeed: dead-lettered at once, without retries.
    Permanent,
    /// The message could not be read (bad payload, unknown name, oversize, bad header):
    /// dead-lettered at once with its original bytes.
    Decode,
}

impl ErrorKind {
    /// The lowercase name used in the `steadfast-error-kind` header.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
            ErrorKind::Decode => "decode",
        }
    }

    /// Parses the header form back (`transient`, `permanent`, `decode`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "transient" => Some(ErrorKind::Transient),
            "permanent" => Some(ErrorKind::Permanent),
            "decode" => Some(ErrorKind::Decode),
            _ => None,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// The error a handler returns.
///
/// Any `std::error::Error` converts into it with `?` as a [`ErrorKind::Transient`]
/// failure: retried, never dropped. Reclassify at the call site with
/// [`permanent`](HandlerError::permanent) (or [`ResultExt::permanent`]) and pass an
/// upstream's back-off hint with [`retry_after`](HandlerError::retry_after).
///
/// Like `anyhow::Error`, it does not itself implement `std::error::Error`; that is what
/// lets it take every error with `?`.
///
/// ```
/// use steadfast::{HandlerError, ResultExt, ErrorKind};
/// use std::time::Duration;
///
/// fn parse(s: &str) -> Result<u32, HandlerError> {
///     let n: u32 = s.parse().permanent()?; // bad data never gets better
///     Ok(n)
/// }
/// assert_eq!(parse("x").unwrap_err().kind(), ErrorKind::Permanent);
///
/// let busy = HandlerError::msg("upstream said 429").retry_after(Duration::from_secs(5));
/// assert_eq!(busy.kind(), ErrorKind::Transient);
/// assert_eq!(busy.retry_after_hint(), Some(Duration::from_secs(5)));
/// ```
pub struct HandlerError {
    kind: ErrorKind,
    source: BoxError,
    retry_after: Option<Duration>,
}

#[derive(Debug)]
struct Message(String);
impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl StdError for Message {}

impl HandlerError {
    /// A transient error from any error value.
    pub fn transient(e: impl Into<BoxError>) -> Self {
        Self {
            kind: ErrorKind::Transient,
            source: e.into(),
            retry_after: None,
        }
    }

    /// A permanent error from any error value: dead-lettered without retries.
    pub fn permanent_from(e: impl Into<BoxError>) -> Self {
        Self {
            kind: ErrorKind::Permanent,
            source: e.into(),
            retry_after: None,
        }
    }

    /// A decode error: the message cannot be read.
    pub fn decode(e: impl Into<BoxError>) -> Self {
        Self {
            kind: ErrorKind::Decode,
            source: e.into(),
            retry_after: None,
        }
    }

    /// A transient error from a plain text.
    pub fn msg(text: impl Into<String>) -> Self {
        Self::transient(Message(text.into()))
    }

    /// Reclassifies this error as permanent.
    #[must_use]
    pub fn permanent(mut self) -> Self {
        self.kind = ErrorKind::Permanent;
        self
    }

    /// Asks that the next attempt wait at least `delay` (an upstream's `Retry-After`).
    /// The error stays transient; the policy's cap on delays still applies.
    #[must_use]
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// The classification.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The back-off hint given with [`retry_after`](Self::retry_after).
    pub fn retry_after_hint(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The underlying error.
    pub fn source(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.source
    }

    /// The error and its chain of sources, joined by `: ` (what dead letters carry).
    pub fn chain_text(&self) -> String {
        let mut text = self.source.to_string();
        let mut cur = self.source.source();
        while let Some(e) = cur {
            text.push_str(": ");
            text.push_str(&e.to_string());
            cur = e.source();
        }
        text
    }
}

impl<E: StdError + Send + Sync + 'static> From<E> for HandlerError {
    fn from(e: E) -> Self {
        Self::transient(e)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("error", &self.chain_text())
            .field("retry_after", &self.retry_after)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error: {}", self.kind, self.chain_text())
    }
}

/// The one shape of the errors steadfast's backends return:
/// [`TransportError`](crate::transport::TransportError) (a broker) and
/// [`StoreError`](crate::sql::StoreError) (a database) are this struct over their kind
/// enums. Each is a kind to match on, a message that never holds credentials, and the
/// underlying error, if any; its text is the message, then `: ` and the source's text.
///
/// Both convert into a [`HandlerError`] with `?` (as transient failures).
///
/// ```
/// use steadfast::{
///     sql::{StoreError, StoreErrorKind},
///     transport::{TransportError, TransportErrorKind},
/// };
/// let t = TransportError::new(TransportErrorKind::Timeout, "publish: no confirm");
/// let s = StoreError::of(StoreErrorKind::Timeout, "inbox mark: no answer")
///     .with_source(std::io::Error::other("reset"));
/// assert_eq!(t.kind(), TransportErrorKind::Timeout);
/// assert_eq!(s.kind(), StoreErrorKind::Timeout);
/// assert_eq!(s.to_string(), "inbox mark: no answer: reset");
/// ```
#[derive(Debug)]
pub struct BackendError<K> {
    kind: K,
    message: String,
    source: Option<BoxError>,
}

impl<K: Copy> BackendError<K> {
    /// An error of `kind` with a message (never containing credentials).
    pub fn of(kind: K, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying error. Its text must not contain credentials either.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> K {
        self.kind
    }
}

impl<K> fmt::Display for BackendError<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl<K: fmt::Debug> StdError for BackendError<K> {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static))
    }
}

/// Classify errors at the call site: `call().permanent()?`.
pub trait ResultExt<T> {
    /// Converts the error into a permanent [`HandlerError`].
    fn permanent(self) -> Result<T, HandlerError>;
    /// Converts the error into a transient [`HandlerError`] with a back-off hint.
    fn retry_after(self, delay: Duration) -> Result<T, HandlerError>;
}

impl<T, E: Into<BoxError>> ResultExt<T> for Result<T, E> {
    fn permanent(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::permanent_from)
    }
    fn retry_after(self, delay: Duration) -> Result<T, HandlerError> {
        self.map_err(|e| HandlerError::transient(e).retry_after(delay))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_mark_is_transient() {
        fn f() -> Result<(), HandlerError> {
            let _: u8 = "300".parse::<u8>()?;
            Ok(())
        }
        let e = f().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Transient);
        assert!(e.to_string().starts_with("transient error: "));
    }

    #[test]
    fn kinds_round_trip() {
        for k in [
            ErrorKind::Transient,
            ErrorKind::Permanent,
            ErrorKind::Decode,
        ] {
            assert_eq!(ErrorKind::parse(k.as_str()), Some(k));
        }
    }
}
