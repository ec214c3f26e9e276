//! The connection: connecting with credentials kept out of addresses, the client's own
//! reconnects, the request bound on every operation, and health.

use super::{NatsTransport, builder::NatsBuilder, builder::Settings, suspects::Suspects};
use crate::transport::{BrokerKind, Health, TransportError, TransportErrorKind};
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

/// How long readiness says "reconnecting" after JetStream last reported a passing state
/// (an operation that keeps failing renews it; one that succeeds ends it).
const UNAVAILABLE_SHOWN: Duration = Duration::from_secs(10);

/// What every clone of a [`NatsTransport`] shares: the client, the settings and what
/// this process remembers of its deliveries.
pub(super) struct Inner {
    pub(super) client: async_nats::Client,
    pub(super) js: async_nats::jetstream::Context,
    pub(super) settings: Settings,
    pub(super) server: ServerVersion,
    pub(super) closed: AtomicBool,
    /// When JetStream last answered a publish or settle with a passing state (no
    /// leader, no quorum), in milliseconds since `started` (0: it answered since).
    /// Readiness says reconnecting for [`UNAVAILABLE_SHOWN`] after such an answer.
    pub(super) jetstream_unavailable: AtomicU64,
    /// A fixed point for `jetstream_unavailable`.
    pub(super) started: std::time::Instant,
    /// Deferrals made by this process, per (consumer, stream sequence): subtracted from
    /// the server's delivery count so a deferral does not use an attempt.
    pub(super) deferrals: Mutex<HashMap<(Arc<str>, u64), u32>>,
    /// Suspects of crash loops, their ledger and the returns this process explains.
    pub(super) suspects: Suspects,
}

/// The server's version, for the features that differ (multiple filter subjects: 2.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct ServerVersion(u32, u32, u32);

impl ServerVersion {
    fn parse(v: &str) -> Self {
        let mut it = v
            .trim_start_matches('v')
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().unwrap_or(0));
        Self(
            it.next().unwrap_or(0),
            it.next().unwrap_or(0),
            it.next().unwrap_or(0),
        )
    }

    /// Consumers accept `filter_subjects` (several filters) from 2.10 on; 2.9 ignores the
    /// field silently, which would make a consumer take every subject.
    pub(super) fn multi_filter(self) -> bool {
        self >= Self(2, 10, 0)
    }
}

/// Connects the client a checked builder describes; `seeds` are its servers without
/// their credentials, `stream` the work stream's name.
pub(super) async fn open(
    b: NatsBuilder,
    url_redacted: String,
    seeds: Seeds,
    stream: String,
) -> Result<NatsTransport, TransportError> {
    let mut opts = async_nats::ConnectOptions::new()
        .connection_timeout(b.connect_timeout)
        .request_timeout(Some(b.op_timeout))
        .max_reconnects(None)
        .ping_interval(b.ping_interval)
        .event_callback({
            // The first `Connected` is the initial connection; later ones are
            // reconnects.
            let connected_before = Arc::new(AtomicBool::new(false));
            move |event| {
                let again = matches!(event, async_nats::Event::Connected)
                    && connected_before.swap(true, std::sync::atomic::Ordering::Relaxed);
                async move {
                    if again {
                        crate::transport::count_reconnect("nats");
                    }
                }
            }
        })
        .name(b.name.clone().unwrap_or_else(|| "steadfast".to_owned()));
    if let Some(path) = &b.credentials_file {
        opts = opts.credentials_file(path).await.map_err(|e| {
            TransportError::new(
                TransportErrorKind::Config,
                format!(
                    "cannot read NATS credentials file `{}`: {}",
                    path.display(),
                    e.kind()
                ),
            )
        })?;
    }
    if let Some(seed) = &b.nkey {
        opts = opts.nkey(seed.clone());
    }
    match (b.user_password.clone(), seeds.auth) {
        (Some((u, p)), _) | (None, UrlAuth::UserPassword(u, p)) => {
            opts = opts.user_and_password(u, p);
        }
        (None, UrlAuth::Token(t)) => opts = opts.token(t),
        (None, UrlAuth::None) => {}
    }
    if let Some(t) = &b.token {
        opts = opts.token(t.clone());
    }
    let connect = opts.connect(seeds.addrs);
    let client =
        match tokio::time::timeout(b.connect_timeout + Duration::from_secs(1), connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                // The error text of async-nats may quote the address it was given; use
                // only its kind, with our redacted URL.
                return Err(TransportError::new(
                    TransportErrorKind::Connection,
                    format!("cannot connect to NATS at {url_redacted}: {:?}", e.kind()),
                ));
            }
            Err(_) => {
                return Err(TransportError::new(
                    TransportErrorKind::Timeout,
                    format!("connecting to NATS at {url_redacted} timed out"),
                ));
            }
        };
    let server = ServerVersion::parse(&client.server_info().version);
    if !client.server_info().jetstream {
        tracing::warn!(url = %url_redacted, "the NATS server does not announce JetStream; stream operations will fail");
    }
    let mut js = async_nats::jetstream::new(client.clone());
    js.set_timeout(b.op_timeout);
    let settings = Settings {
        dlq_stream: format!("{stream}_DLQ"),
        stream,
        prefix: b.prefix,
        ack_wait: b.ack_wait,
        max_ack_pending: b.max_ack_pending,
        delivery_margin: b.delivery_margin,
        max_age: b.max_age,
        dlq_max_age: b.dlq_max_age,
        op_timeout: b.op_timeout,
        dedup: b.dedup,
        confirm_acks: b.confirm_acks,
        url_redacted,
        replicas: b.replicas,
    };
    Ok(NatsTransport {
        inner: Arc::new(Inner {
            client,
            js,
            settings,
            server,
            closed: AtomicBool::new(false),
            jetstream_unavailable: AtomicU64::new(0),
            started: std::time::Instant::now(),
            deferrals: Mutex::new(HashMap::new()),
            suspects: Suspects::default(),
        }),
    })
}

impl Inner {
    /// Runs `fut` under the request bound, mapping a timeout to [`TransportErrorKind::Timeout`].
    /// The bound on one request: the request timeout, plus slack for the client's own
    /// timer to fire first.
    pub(super) fn op_limit(&self) -> Duration {
        self.settings.op_timeout + Duration::from_millis(500)
    }

    pub(super) async fn bounded<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, TransportError>>,
    ) -> Result<T, TransportError> {
        let limit = self.op_limit();
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::new(
                TransportErrorKind::Timeout,
                format!("{what}: no answer from NATS within {limit:?}"),
            )),
        }
    }

    /// A publish or settle met a passing JetStream state.
    pub(super) fn jetstream_unavailable(&self) {
        let now = u64::try_from(self.started.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        if self.jetstream_unavailable.swap(now, Ordering::AcqRel) == 0 {
            tracing::warn!(
                "JetStream is not answering (a leader election or a cluster without quorum); retrying within each operation's deadline"
            );
        }
    }

    /// JetStream answered again.
    pub(super) fn jetstream_answered(&self) {
        if self.jetstream_unavailable.load(Ordering::Relaxed) != 0
            && self.jetstream_unavailable.swap(0, Ordering::AcqRel) != 0
        {
            tracing::info!("JetStream answers again");
        }
    }

    /// Whether JetStream reported a passing state lately and has not answered since.
    fn jetstream_troubled(&self) -> bool {
        let at = self.jetstream_unavailable.load(Ordering::Acquire);
        at != 0
            && self.started.elapsed().as_millis() < u128::from(at) + UNAVAILABLE_SHOWN.as_millis()
    }

    pub(super) fn check_open(&self) -> Result<(), TransportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::new(
                TransportErrorKind::Closed,
                "the NATS transport was closed",
            ));
        }
        Ok(())
    }

    /// Connected, reconnecting (the client is, or JetStream reported a passing state
    /// lately) or closed.
    pub(super) fn health(&self) -> Health {
        if self.closed.load(Ordering::Acquire) {
            return Health::Closed;
        }
        match self.client.connection_state() {
            async_nats::connection::State::Connected if !self.jetstream_troubled() => {
                Health::Connected
            }
            _ => Health::Reconnecting,
        }
    }
}

/// An async-nats error as a [`TransportError`] of `kind`, with the error's text (which
/// names subjects, never credentials).
pub(super) fn err(
    kind: TransportErrorKind,
    what: impl Into<String>,
    e: impl std::fmt::Display,
) -> TransportError {
    TransportError::new(kind, format!("{}: {e}", what.into()))
}

/// Credentials found in the server URLs.
#[derive(PartialEq, Eq)]
enum UrlAuth {
    None,
    UserPassword(String, String),
    Token(String),
}

/// The servers of a URL list, without their credentials, and those credentials.
pub(super) struct Seeds {
    addrs: Vec<String>,
    auth: UrlAuth,
}

/// Splits a comma-separated server list, takes the credentials out of each URL (the
/// same in every URL that has any) and returns addresses free of secrets.
pub(super) fn parse_seeds(raw: &str, shown: &str) -> Result<Seeds, TransportError> {
    let bad = |text: String| TransportError::new(TransportErrorKind::Config, text);
    let mut addrs = Vec::new();
    let mut auth = UrlAuth::None;
    let items: Vec<&str> = raw.split(',').map(str::trim).collect();
    for (i, item) in items.iter().enumerate() {
        let which = format!("server {} of `{shown}`", i + 1);
        if item.is_empty() {
            return Err(bad(format!("{which} is empty")));
        }
        let with_scheme = if item.contains("://") {
            (*item).to_owned()
        } else {
            format!("nats://{item}")
        };
        let mut u = url::Url::parse(&with_scheme)
            .map_err(|e| bad(format!("{which} is not a URL ({e})")))?;
        if !matches!(BrokerKind::from_scheme(u.scheme()), Ok(BrokerKind::Nats)) || !u.has_host() {
            return Err(bad(format!(
                "{which} must be nats://host:port (or tls://, ws://, wss://)"
            )));
        }
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let this = match (u.username(), u.password()) {
            ("", None) => UrlAuth::None,
            (user, Some(pw)) => UrlAuth::UserPassword(decode(user), decode(pw)),
            (token, None) => UrlAuth::Token(decode(token)),
        };
        if this != UrlAuth::None {
            if auth != UrlAuth::None && auth != this {
                return Err(bad(format!(
                    "the servers of `{shown}` carry different credentials: give them once"
                )));
            }
            auth = this;
        }
        if u.set_username("").is_err() || u.set_password(None).is_err() {
            return Err(bad(format!("{which} cannot be used")));
        }
        addrs.push(u.to_string());
    }
    Ok(Seeds { addrs, auth })
}

/// The URL with its password (and any token in the user part) replaced by `***`.
pub(super) fn redact_url(raw: &str) -> String {
    raw.split(',')
        .map(|one| match url::Url::parse(one.trim()) {
            Ok(mut u) if u.has_host() => {
                if u.password().is_some() {
                    let _ = u.set_password(Some("***"));
                } else if !u.username().is_empty() {
                    // `nats://TOKEN@host`: the user part is the secret.
                    let _ = u.set_username("***");
                }
                u.to_string()
            }
            // Not a URL we can parse (e.g. `host:port`): keep only what follows an `@`.
            _ => match one.rsplit_once('@') {
                Some((_, host)) => format!("***@{host}"),
                None => one.trim().to_owned(),
            },
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_secrets() {
        assert_eq!(
            redact_url("nats://alice:s3cret@host:4222"),
            "nats://alice:***@host:4222"
        );
        assert_eq!(redact_url("nats://tok3n@host:4222"), "nats://***@host:4222");
        assert_eq!(redact_url("alice:s3cret@host:4222"), "***@host:4222");
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        let many = redact_url("nats://a:pw1@h1:4222,nats://b:pw2@h2:4222");
        assert!(!many.contains("pw1") && !many.contains("pw2"), "{many}");
    }

    #[test]
    fn seeds_lose_their_credentials() {
        let s = parse_seeds("nats://alice:s3%40cret@h1:4222, nats://h2:4223,h3", "shown").unwrap();
        assert_eq!(s.addrs, ["nats://h1:4222", "nats://h2:4223", "nats://h3"]);
        assert!(s.auth == UrlAuth::UserPassword("alice".into(), "s3@cret".into()));
        let s = parse_seeds("tls://tok3n@h1:4222", "shown").unwrap();
        assert_eq!(s.addrs, ["tls://h1:4222"]);
        assert!(s.auth == UrlAuth::Token("tok3n".into()));
        for bad in [
            "nats://a:b@h1,nats://a:c@h2",
            "nats://h1,,nats://h2",
            "amqp://h1",
            "nats://h1,http://h2",
        ] {
            let e = parse_seeds(bad, "shown").err().expect(bad).to_string();
            assert!(!e.contains('b') || !e.contains("a:b"), "{e}");
        }
    }

    #[test]
    fn versions() {
        assert!(!ServerVersion::parse("2.9.10").multi_filter());
        assert!(ServerVersion::parse("2.10.0").multi_filter());
        assert!(ServerVersion::parse("v2.11.3-beta").multi_filter());
        assert!(!ServerVersion::parse("garbage").multi_filter());
    }
}
