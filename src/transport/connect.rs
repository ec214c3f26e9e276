//! Choosing a transport by its URL's scheme and connecting it: the one place that knows
//! which scheme means which broker, used by [`WorkerConfig`](crate::config::WorkerConfig),
//! the `steadfast` tool and anyone who holds only a URL.

use super::{Transport, TransportError, TransportErrorKind, memory::MemoryTransport};
use std::{fmt, path::PathBuf, sync::Arc, time::Duration};

/// Which transport a broker URL selects.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// `amqp://` or `amqps://`: RabbitMQ (feature `amqp`).
    Amqp,
    /// `nats://`, `tls://`, `ws://` or `wss://`: NATS JetStream (feature `nats`).
    Nats,
    /// `memory://`: the in-process transport (trials and tests; nothing leaves the process).
    Memory,
}

/// Every scheme a broker URL may have, with the transport it selects.
const SCHEMES: &[(&str, BrokerKind)] = &[
    ("amqp", BrokerKind::Amqp),
    ("amqps", BrokerKind::Amqp),
    ("nats", BrokerKind::Nats),
    ("tls", BrokerKind::Nats),
    ("ws", BrokerKind::Nats),
    ("wss", BrokerKind::Nats),
    ("memory", BrokerKind::Memory),
];

impl BrokerKind {
    /// The transport `url` selects by its scheme (the first URL's, for a comma-separated
    /// list of a cluster's nodes).
    ///
    /// An error of kind [`TransportErrorKind::Config`] for a scheme no transport takes,
    /// or one whose transport this build leaves out (its feature is off).
    ///
    /// ```
    /// use steadfast::transport::{BrokerKind, TransportErrorKind};
    /// assert_eq!(BrokerKind::from_url("memory://").unwrap(), BrokerKind::Memory);
    /// let e = BrokerKind::from_url("kafka://broker:9092").unwrap_err();
    /// assert_eq!(e.kind(), TransportErrorKind::Config);
    /// ```
    pub fn from_url(url: &str) -> Result<Self, TransportError> {
        let first = url.split(',').map(str::trim).next().unwrap_or_default();
        let scheme = first
            .split_once("://")
            .map(|(s, _)| s.to_ascii_lowercase())
            .unwrap_or_default();
        Self::from_scheme(&scheme)
    }

    /// The transport a scheme (`amqp`, `nats`, ...; any case) selects; see
    /// [`from_url`](Self::from_url).
    pub fn from_scheme(scheme: &str) -> Result<Self, TransportError> {
        let Some(&(_, kind)) = SCHEMES.iter().find(|(s, _)| s.eq_ignore_ascii_case(scheme)) else {
            let shown = crate::envelope::truncate(scheme, 20);
            return Err(TransportError::new(
                TransportErrorKind::Config,
                format!("unknown scheme `{shown}` (expected {})", Self::expected()),
            ));
        };
        match kind.feature() {
            Some(feature) if !kind.built() => Err(TransportError::new(
                TransportErrorKind::Config,
                format!("scheme `{scheme}` needs steadfast's `{feature}` feature"),
            )),
            _ => Ok(kind),
        }
    }

    /// The schemes that select this transport.
    pub fn schemes(self) -> impl Iterator<Item = &'static str> {
        SCHEMES
            .iter()
            .filter(move |(_, k)| *k == self)
            .map(|(s, _)| *s)
    }

    /// Every scheme, as `amqp://, ... or memory://`, for messages.
    pub(crate) fn expected() -> String {
        let all: Vec<String> = SCHEMES.iter().map(|(s, _)| format!("{s}://")).collect();
        match all.split_last() {
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        }
    }

    /// The crate feature the transport needs, if any.
    fn feature(self) -> Option<&'static str> {
        match self {
            Self::Amqp => Some("amqp"),
            Self::Nats => Some("nats"),
            Self::Memory => None,
        }
    }

    /// Whether this build has the transport.
    fn built(self) -> bool {
        match self {
            Self::Amqp => cfg!(feature = "amqp"),
            Self::Nats => cfg!(feature = "nats"),
            Self::Memory => true,
        }
    }
}

/// The settings [`connect`] hands to the transport the URL selects; those of the other
/// brokers are ignored. Unset (`None`), the transport's own default holds.
///
/// `Debug` output leaves the NKey seed and the token out.
///
/// ```
/// use std::time::Duration;
/// use steadfast::transport::ConnectOptions;
/// let mut options = ConnectOptions::default();
/// options.timeout = Duration::from_secs(5);
/// options.amqp_exchange = Some("shop".into());
/// options.nats_subject_prefix = Some("shop".into());
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// How long the first connection may take (default [`DEFAULT_CONNECT_TIMEOUT`], 10 s).
    pub timeout: Duration,
    /// RabbitMQ: see [`AmqpBuilder::exchange`](crate::transport::amqp::AmqpBuilder::exchange).
    pub amqp_exchange: Option<String>,
    /// RabbitMQ: see [`AmqpBuilder::queue_prefix`](crate::transport::amqp::AmqpBuilder::queue_prefix).
    pub amqp_queue_prefix: Option<String>,
    /// RabbitMQ: see [`AmqpBuilder::operation_timeout`](crate::transport::amqp::AmqpBuilder::operation_timeout).
    pub amqp_operation_timeout: Option<Duration>,
    /// NATS: see [`NatsBuilder::subject_prefix`](crate::transport::nats::NatsBuilder::subject_prefix).
    pub nats_subject_prefix: Option<String>,
    /// NATS: see [`NatsBuilder::stream`](crate::transport::nats::NatsBuilder::stream).
    pub nats_stream: Option<String>,
    /// NATS: see [`NatsBuilder::credentials_file`](crate::transport::nats::NatsBuilder::credentials_file).
    pub nats_credentials_file: Option<PathBuf>,
    /// NATS: see [`NatsBuilder::nkey`](crate::transport::nats::NatsBuilder::nkey).
    pub nats_nkey: Option<String>,
    /// NATS: see [`NatsBuilder::token`](crate::transport::nats::NatsBuilder::token).
    pub nats_token: Option<String>,
    /// NATS: see [`NatsBuilder::replicas`](crate::transport::nats::NatsBuilder::replicas).
    pub nats_replicas: Option<usize>,
}

/// How long [`connect`] waits for the first connection unless told otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_CONNECT_TIMEOUT,
            amqp_exchange: None,
            amqp_queue_prefix: None,
            amqp_operation_timeout: None,
            nats_subject_prefix: None,
            nats_stream: None,
            nats_credentials_file: None,
            nats_nkey: None,
            nats_token: None,
            nats_replicas: None,
        }
    }
}

impl fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("ConnectOptions")
            .field("timeout", &self.timeout)
            .field("amqp_exchange", &self.amqp_exchange)
            .field("amqp_queue_prefix", &self.amqp_queue_prefix)
            .field("amqp_operation_timeout", &self.amqp_operation_timeout)
            .field("nats_subject_prefix", &self.nats_subject_prefix)
            .field("nats_stream", &self.nats_stream)
            .field("nats_credentials_file", &self.nats_credentials_file)
            .field("nats_nkey", &hidden(&self.nats_nkey))
            .field("nats_token", &hidden(&self.nats_token))
            .field("nats_replicas", &self.nats_replicas)
            .finish()
    }
}

/// Connects the transport `url`'s scheme selects (see [`BrokerKind`]) with `options`,
/// within `options.timeout`. `url` may list the nodes of a cluster, comma-separated, all
/// of one scheme.
///
/// Errors: [`TransportErrorKind::Config`] for a scheme no transport of this build takes
/// or a bad setting, [`TransportErrorKind::Timeout`] when the first connection took too
/// long, and what the transport's own `connect` returns. No error text holds a password.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), steadfast::transport::TransportError> {
/// use std::time::Duration;
/// use steadfast::transport::{self, ConnectOptions, TransportErrorKind};
///
/// // RabbitMQ, NATS or memory, by the URL; the other broker's options are ignored.
/// let mut options = ConnectOptions::default();
/// options.timeout = Duration::from_secs(5);
/// options.amqp_exchange = Some("shop".into());
/// let transport = transport::connect("memory://", &options).await?;
/// assert_eq!(transport.system(), "memory");
///
/// let e = transport::connect("kafka://broker:9092", &options).await.unwrap_err();
/// assert_eq!(e.kind(), TransportErrorKind::Config);
/// # Ok(()) }
/// ```
pub async fn connect(
    url: &str,
    options: &ConnectOptions,
) -> Result<Arc<dyn Transport>, TransportError> {
    let kind = BrokerKind::from_url(url)?;
    let limit = options.timeout;
    match tokio::time::timeout(limit, open(kind, url, options)).await {
        Ok(r) => r,
        Err(_) => Err(TransportError::new(
            TransportErrorKind::Timeout,
            format!(
                "could not connect to {} within {}",
                crate::redact::redact_list(url),
                humantime::format_duration(limit)
            ),
        )),
    }
}

async fn open(
    kind: BrokerKind,
    url: &str,
    options: &ConnectOptions,
) -> Result<Arc<dyn Transport>, TransportError> {
    let _ = (url, options);
    match kind {
        BrokerKind::Memory => Ok(Arc::new(MemoryTransport::new())),
        #[cfg(feature = "amqp")]
        BrokerKind::Amqp => {
            let mut b = super::amqp::AmqpTransport::builder(url);
            if let Some(e) = &options.amqp_exchange {
                b = b.exchange(e.clone());
            }
            if let Some(p) = &options.amqp_queue_prefix {
                b = b.queue_prefix(p.clone());
            }
            if let Some(d) = options.amqp_operation_timeout {
                b = b.operation_timeout(d);
            }
            Ok(Arc::new(b.connect().await?))
        }
        #[cfg(feature = "nats")]
        BrokerKind::Nats => {
            let mut b = super::nats::NatsTransport::builder(url);
            if let Some(p) = &options.nats_subject_prefix {
                b = b.subject_prefix(p.clone());
            }
            if let Some(s) = &options.nats_stream {
                b = b.stream(s.clone());
            }
            if let Some(p) = &options.nats_credentials_file {
                b = b.credentials_file(p.clone());
            }
            if let Some(k) = &options.nats_nkey {
                b = b.nkey(k.clone());
            }
            if let Some(t) = &options.nats_token {
                b = b.token(t.clone());
            }
            if let Some(n) = options.nats_replicas {
                b = b.replicas(n);
            }
            Ok(Arc::new(b.connect().await?))
        }
        // `from_url` refuses a transport this build leaves out.
        #[allow(unreachable_patterns)]
        other => Err(TransportError::new(
            TransportErrorKind::Config,
            format!("this build of steadfast has no transport for {other:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_list_of_schemes() {
        assert_eq!(
            BrokerKind::expected(),
            "amqp://, amqps://, nats://, tls://, ws://, wss:// or memory://"
        );
        assert_eq!(BrokerKind::Nats.schemes().count(), 4);
        for (url, kind) in [
            ("AMQPS://u:pw@h/%2f", BrokerKind::Amqp),
            ("nats://n1:4222, nats://n2:4222", BrokerKind::Nats),
            ("memory://", BrokerKind::Memory),
        ] {
            match BrokerKind::from_url(url) {
                Ok(k) => assert_eq!(k, kind),
                // A build without that transport's feature.
                Err(e) => assert!(e.to_string().contains("feature"), "{e}"),
            }
        }
        let e = BrokerKind::from_url("kafka://k:9092").unwrap_err();
        assert!(e.to_string().contains("unknown scheme `kafka`"), "{e}");
        let e = BrokerKind::from_url("no-scheme").unwrap_err();
        assert_eq!(e.kind(), TransportErrorKind::Config);
    }

    #[test]
    fn options_hide_their_secrets() {
        let o = ConnectOptions {
            nats_nkey: Some("SUASECRETSEED".into()),
            nats_token: Some("tok3n-canary".into()),
            ..ConnectOptions::default()
        };
        let shown = format!("{o:?}");
        assert!(
            !shown.contains("SUASECRET") && !shown.contains("canary"),
            "{shown}"
        );
    }
}
