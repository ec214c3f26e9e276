//! The builder: the settings of a [`NatsTransport`], checked before it connects.

use super::{
    NatsTransport,
    connection::{self, parse_seeds, redact_url},
};
use crate::transport::{TransportError, TransportErrorKind};
use std::{fmt, path::PathBuf, time::Duration};

/// Settings shared by every part of the transport.
#[derive(Debug, Clone)]
pub(super) struct Settings {
    /// Subjects are `{prefix}.{message name}`.
    pub(super) prefix: String,
    /// The work stream.
    pub(super) stream: String,
    /// The dead-letter stream, `{stream}_DLQ`.
    pub(super) dlq_stream: String,
    /// Overrides the ack deadline derived from the handler timeout.
    pub(super) ack_wait: Option<Duration>,
    /// Overrides the group consumer's `max_ack_pending` (default: 1,000, or the
    /// worker's concurrency if larger).
    pub(super) max_ack_pending: Option<i64>,
    /// Deliveries allowed beyond the retry policy's attempts before the server's
    /// delivery limit (`max_deliver`) stops a message.
    pub(super) delivery_margin: u32,
    /// Work stream retention (`max_age`; zero keeps messages until other limits).
    pub(super) max_age: Duration,
    /// Dead-letter stream retention (zero keeps them until removed).
    pub(super) dlq_max_age: Duration,
    /// Bound on every request to the server (acks, PubAcks, API calls).
    pub(super) op_timeout: Duration,
    /// Whether publishes set `Nats-Msg-Id`.
    pub(super) dedup: bool,
    /// Whether an `Ack` waits for the server's reply (a request per message) instead of
    /// being published to the ack subject.
    pub(super) confirm_acks: bool,
    /// The URL with any password removed, for logs and errors.
    pub(super) url_redacted: String,
    /// Replicas asked for the work and dead-letter streams (`None`: the server's
    /// default for new streams, one).
    pub(super) replicas: Option<usize>,
}

impl Settings {
    /// The subject a message name is published on.
    pub(super) fn subject(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }

    /// The dead-letter subject of a consumer group.
    pub(super) fn dlq_subject(&self, group: &str) -> String {
        format!("{}-dlq.{group}", self.prefix)
    }
}

/// Builds a [`NatsTransport`]: subject prefix, stream name, credentials and limits.
///
/// ```no_run
/// # async fn run() -> Result<(), steadfast::transport::TransportError> {
/// use steadfast::transport::nats::NatsTransport;
/// let transport = NatsTransport::builder("nats://127.0.0.1:4222")
///     .subject_prefix("shop")
///     .stream("SHOP")
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct NatsBuilder {
    pub(super) url: String,
    pub(super) prefix: String,
    pub(super) stream: Option<String>,
    pub(super) credentials_file: Option<PathBuf>,
    pub(super) nkey: Option<String>,
    pub(super) user_password: Option<(String, String)>,
    pub(super) token: Option<String>,
    pub(super) ping_interval: Duration,
    pub(super) replicas: Option<usize>,
    pub(super) name: Option<String>,
    pub(super) ack_wait: Option<Duration>,
    pub(super) max_ack_pending: Option<i64>,
    pub(super) delivery_margin: u32,
    pub(super) max_age: Duration,
    pub(super) dlq_max_age: Duration,
    pub(super) op_timeout: Duration,
    pub(super) connect_timeout: Duration,
    pub(super) dedup: bool,
    pub(super) confirm_acks: bool,
}

impl fmt::Debug for NatsBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBuilder")
            .field("url", &redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("stream", &self.stream)
            .field("credentials_file", &self.credentials_file)
            .field("nkey", &self.nkey.as_ref().map(|_| "<redacted>"))
            .field(
                "user",
                &self.user_password.as_ref().map(|(u, _)| (u, "<redacted>")),
            )
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ping_interval", &self.ping_interval)
            .field("replicas", &self.replicas)
            .field("ack_wait", &self.ack_wait)
            .field("delivery_margin", &self.delivery_margin)
            .field("max_age", &self.max_age)
            .field("confirm_acks", &self.confirm_acks)
            .finish_non_exhaustive()
    }
}

impl NatsBuilder {
    pub(super) fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            prefix: "steadfast".to_owned(),
            stream: None,
            credentials_file: None,
            nkey: None,
            user_password: None,
            token: None,
            ping_interval: DEFAULT_PING_INTERVAL,
            replicas: None,
            name: None,
            ack_wait: None,
            max_ack_pending: None,
            delivery_margin: 5,
            max_age: Duration::ZERO,
            dlq_max_age: Duration::ZERO,
            op_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            dedup: true,
            confirm_acks: false,
        }
    }

    /// The subject prefix: messages are published on `{prefix}.{name}` and dead letters on
    /// `{prefix}-dlq.{group}` (default `steadfast`).
    #[must_use]
    pub fn subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The work stream's name (default: the prefix in upper case); the dead-letter stream
    /// is `{stream}_DLQ`.
    #[must_use]
    pub fn stream(mut self, name: impl Into<String>) -> Self {
        self.stream = Some(name.into());
        self
    }

    /// Authenticates with a `.creds` file (JWT + NKey seed). Its contents never appear in
    /// logs or errors.
    #[must_use]
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.credentials_file = Some(path.into());
        self
    }

    /// Authenticates with an NKey seed. Never shown in `Debug` output or errors.
    #[must_use]
    pub fn nkey(mut self, seed: impl Into<String>) -> Self {
        self.nkey = Some(seed.into());
        self
    }

    /// Authenticates with a user name and password, instead of (or overriding) the ones
    /// in the URL (`nats://user:password@host`). Never shown in `Debug` output, logs or
    /// errors.
    #[must_use]
    pub fn user_and_password(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.user_password = Some((user.into(), password.into()));
        self
    }

    /// Authenticates with a token, instead of (or overriding) one in the URL
    /// (`nats://token@host`). Never shown in `Debug` output, logs or errors.
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// How often the client pings the server (default 5 s). The client gives a
    /// connection up as dead when two pings are unanswered at the third, so a server
    /// that stops answering (a half-open connection, a paused process) is noticed
    /// within about three intervals (15 s by default): readiness turns false and the
    /// client reconnects, to another seed if there is one.
    #[must_use]
    pub fn ping_interval(mut self, d: Duration) -> Self {
        self.ping_interval = d;
        self
    }

    /// How many replicas the work and dead-letter streams get when this transport
    /// creates them (default: the server's default, one). Use 3 on a three-node cluster.
    /// At start-up an existing stream with another count is an error when this is set;
    /// when it is not set, a single-replica stream on a cluster is a warning.
    #[must_use]
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = Some(n);
        self
    }

    /// The connection name the server shows in its monitoring.
    #[must_use]
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The consumers' ack deadline. Default: the handler timeout plus 5 s. A shorter one
    /// is allowed: the worker sends progress every half of it while a handler runs.
    #[must_use]
    pub fn ack_wait(mut self, d: Duration) -> Self {
        self.ack_wait = Some(d);
        self
    }

    /// How many of the group's messages may be delivered and not yet acked at once,
    /// across every worker of the group — including messages waiting out a retry delay
    /// (a `Nak` with a delay stays pending). Default: 1,000, or the worker's concurrency
    /// if that is larger. Each worker still holds no more than its concurrency plus the
    /// pull batch it has asked for next; this is the group-wide cap, so it must leave
    /// room for every replica and for the retries in their delays. Set to the
    /// concurrency for one worker that holds nothing beyond what it works on.
    #[must_use]
    pub fn max_ack_pending(mut self, n: u32) -> Self {
        self.max_ack_pending = Some(i64::from(n.max(1)));
        self
    }

    /// Deliveries allowed beyond the retry policy's attempts before the server stops a
    /// message (`max_deliver = max_attempts + margin`, default margin 5). Redeliveries
    /// after a crash or an expired ack deadline use up this margin; a message that
    /// reaches the limit goes to the dead-letter stream through the server's advisory.
    #[must_use]
    pub fn delivery_margin(mut self, margin: u32) -> Self {
        self.delivery_margin = margin;
        self
    }

    /// How long the work stream keeps messages, when this transport creates it (default:
    /// no age limit). Consumed messages stay in a limits-retention stream until then.
    #[must_use]
    pub fn max_age(mut self, d: Duration) -> Self {
        self.max_age = d;
        self
    }

    /// How long the dead-letter stream keeps dead letters, when this transport creates
    /// it (default: no age limit).
    #[must_use]
    pub fn dead_letter_max_age(mut self, d: Duration) -> Self {
        self.dlq_max_age = d;
        self
    }

    /// The bound on every request to the server: acks, PubAcks, API calls (default 10 s).
    #[must_use]
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.op_timeout = d;
        self
    }

    /// Whether publishes carry `Nats-Msg-Id` = the message id (default `true`), so the
    /// stream's duplicate window (2 minutes) drops a re-sent copy. Turn it off only to
    /// let deliberate duplicates through (the conformance suite's duplicate case).
    #[must_use]
    pub fn deduplicate(mut self, on: bool) -> Self {
        self.dedup = on;
        self
    }

    /// Whether an `Ack` waits for the server's confirmation (default `false`).
    ///
    /// By default an `Ack` is published to the delivery's ack subject (`+ACK`, as
    /// async-nats's `Message::ack` does) and `Ok` means it was handed to a connected
    /// client, which writes it out at once. The promise is kept either way — a message is
    /// acked only after its outcome is durable — and an ack lost to a connection drop
    /// only makes the server redeliver the message after `ack_wait` (a duplicate, which
    /// an idempotency store absorbs). With `true`, every ack is a request and `Ok` means
    /// the server recorded it: fewer such duplicates after a connection drop, at the cost
    /// of a round trip and roughly twice the client CPU per message (see
    /// `docs/nats.md`). Nak (retry, defer), Term (dead letter) and progress are awaited
    /// in both modes.
    #[must_use]
    pub fn confirm_acks(mut self, on: bool) -> Self {
        self.confirm_acks = on;
        self
    }

    /// Connects. The URL may be a comma-separated list of servers (seeds), tried in turn;
    /// the client also learns the other nodes of a cluster from the server. Credentials in
    /// the URLs (`nats://user:password@host`, `nats://token@host`) are sent as the
    /// connection's credentials and never handed to the client library inside an
    /// address, so its own logs cannot show them. The client reconnects by itself
    /// afterwards; the first connection must succeed within the connect timeout (10 s).
    pub async fn connect(self) -> Result<NatsTransport, TransportError> {
        let url_redacted = redact_url(&self.url);
        let seeds = parse_seeds(&self.url, &url_redacted)?;
        if self.replicas == Some(0) || self.replicas.is_some_and(|n| n > 5) {
            return Err(TransportError::new(
                TransportErrorKind::Config,
                "replicas must be 1 to 5",
            ));
        }
        if self.ping_interval.is_zero() {
            return Err(TransportError::new(
                TransportErrorKind::Config,
                "ping_interval must be above zero",
            ));
        }
        validate_token("subject prefix", &self.prefix)?;
        let stream = self
            .stream
            .clone()
            .unwrap_or_else(|| self.prefix.to_ascii_uppercase().replace(['.', '-'], "_"));
        if stream.is_empty()
            || stream
                .chars()
                .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
        {
            return Err(TransportError::new(
                TransportErrorKind::Config,
                format!("invalid stream name `{stream}`"),
            ));
        }
        if self.op_timeout.is_zero() {
            return Err(TransportError::new(
                TransportErrorKind::Config,
                "request_timeout must be above zero",
            ));
        }
        connection::open(self, url_redacted, seeds, stream).await
    }
}

/// How often the client pings the server unless the builder says otherwise.
const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(5);

/// Checks that `s` can be a subject token sequence (no spaces, wildcards or empty tokens).
pub(super) fn validate_token(what: &str, s: &str) -> Result<(), TransportError> {
    let bad = s.is_empty()
        || s.split('.').any(|t| t.is_empty())
        || s.chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '*' | '>'));
    if bad {
        return Err(TransportError::new(
            TransportErrorKind::Config,
            format!(
                "invalid {what} `{}`: must be non-empty subject tokens without spaces or wildcards",
                crate::envelope::truncate(s, 100)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_debug_hides_the_seed() {
        let b = NatsTransport::builder("nats://u:hunter2@localhost:4222")
            .nkey("SUASECRETSEED")
            .user_and_password("bob", "hunter3")
            .token("tok3n-hunter4");
        let text = format!("{b:?}");
        assert!(
            !text.contains("hunter") && !text.contains("SUASECRETSEED"),
            "{text}"
        );
    }

    #[test]
    fn tokens_are_checked() {
        assert!(validate_token("name", "orders.placed").is_ok());
        for bad in ["", "a..b", "a b", "a.*", ">", ".a"] {
            assert!(validate_token("name", bad).is_err(), "{bad}");
        }
    }
}
