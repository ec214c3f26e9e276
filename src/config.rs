//! Configuration from the environment, for workers deployed as containers.
//!
//! [`WorkerConfig::from_env`] reads every `STEADFAST_*` variable once at start-up, checks
//! it and returns a typed configuration, or one [`ConfigError`] whose text is a single
//! line naming each variable that is wrong. Any variable can instead be given as a file
//! in `NAME_FILE` (a mounted secret); the file's content, less a trailing newline, is the
//! value. Secrets (passwords, whole URLs) never appear in `Debug` output or error text.
//!
//! The broker is an attached resource chosen by its URL's scheme (see
//! [`BrokerKind`]): `amqp://` and `amqps://` for RabbitMQ (feature `amqp`), `nats://`,
//! `tls://`, `ws://` and `wss://` for NATS JetStream (feature `nats`), `memory://` for
//! the in-memory transport. `docs/operations.md` has the table
//! of every variable.
//!
//! ```
//! use std::time::Duration;
//! use steadfast::config::WorkerConfig;
//!
//! let env = [
//!     ("STEADFAST_BROKER_URL", "memory://"),
//!     ("STEADFAST_GROUP", "billing"),
//!     ("STEADFAST_HANDLER_TIMEOUT", "45s"),
//! ];
//! let cfg = WorkerConfig::from_lookup(|name| {
//!     env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
//! })
//! .unwrap();
//! assert_eq!(cfg.handler_timeout, Duration::from_secs(45));
//! assert_eq!(cfg.group.as_deref(), Some("billing"));
//!
//! let err = WorkerConfig::from_lookup(|name| {
//!     (name == "STEADFAST_BROKER_URL").then(|| "kafka://broker:9092".to_string())
//! })
//! .unwrap_err();
//! assert!(err.to_string().contains("STEADFAST_BROKER_URL"));
//! ```

use crate::{
    transport::{ConnectOptions, Transport, TransportError, TransportErrorKind},
    worker::MAX_CONCURRENCY,
};
use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, sync::Arc, time::Duration};

/// The broker URL (a scheme of [`BrokerKind`]: `amqp://`, `nats://`, `memory://`, ...), or several
/// of one scheme separated by commas (the nodes of a cluster, tried in turn). Required.
pub const BROKER_URL: &str = "STEADFAST_BROKER_URL";
/// A password that replaces the one in each broker URL that names a user (usually given
/// as `_FILE`).
pub const BROKER_PASSWORD: &str = "STEADFAST_BROKER_PASSWORD";
/// The consumer group.
pub const GROUP: &str = "STEADFAST_GROUP";
/// Handlers running at once, and the broker prefetch.
pub const CONCURRENCY: &str = "STEADFAST_CONCURRENCY";
/// How long one handler call may run.
pub const HANDLER_TIMEOUT: &str = "STEADFAST_HANDLER_TIMEOUT";
/// How long shutdown waits for in-flight handlers.
pub const DRAIN_TIMEOUT: &str = "STEADFAST_DRAIN_TIMEOUT";
/// The largest payload decoded; larger ones are dead-lettered.
pub const MAX_PAYLOAD_BYTES: &str = "STEADFAST_MAX_PAYLOAD_BYTES";
/// How long the first connection to the broker may take.
pub const CONNECT_TIMEOUT: &str = "STEADFAST_CONNECT_TIMEOUT";
/// Where the health and metrics server listens (`off` for none).
pub const HTTP_ADDR: &str = "STEADFAST_HTTP_ADDR";
/// `json` or `text` logs.
pub const LOG_FORMAT: &str = "STEADFAST_LOG_FORMAT";
/// A PostgreSQL URL for the idempotency store or the outbox.
pub const DATABASE_URL: &str = "STEADFAST_DATABASE_URL";
/// A password that replaces the one in the database URL.
pub const DATABASE_PASSWORD: &str = "STEADFAST_DATABASE_PASSWORD";
/// RabbitMQ: the topic exchange.
pub const AMQP_EXCHANGE: &str = "STEADFAST_AMQP_EXCHANGE";
/// RabbitMQ: a prefix for every queue name.
pub const AMQP_QUEUE_PREFIX: &str = "STEADFAST_AMQP_QUEUE_PREFIX";
/// NATS: the subject prefix.
pub const NATS_SUBJECT_PREFIX: &str = "STEADFAST_NATS_SUBJECT_PREFIX";
/// NATS: the work stream's name.
pub const NATS_STREAM: &str = "STEADFAST_NATS_STREAM";
/// NATS: a `.creds` file.
pub const NATS_CREDENTIALS_FILE: &str = "STEADFAST_NATS_CREDENTIALS_FILE";
/// NATS: an NKey seed (usually given as `_FILE`).
pub const NATS_NKEY: &str = "STEADFAST_NATS_NKEY";
/// NATS: an authentication token (usually given as `_FILE`), instead of one in the URL.
pub const NATS_TOKEN: &str = "STEADFAST_NATS_TOKEN";
/// NATS: replicas of the work and dead-letter streams (1 to 5; 3 on a three-node cluster).
pub const NATS_REPLICAS: &str = "STEADFAST_NATS_REPLICAS";

/// A URL that may hold a password, or a comma-separated list of such URLs of one scheme
/// (the seed nodes of a cluster): `Debug` and `Display` show each redacted.
///
/// ```
/// use steadfast::config::WorkerConfig;
/// let cfg = WorkerConfig::from_lookup(|n| match n {
///     "STEADFAST_BROKER_URL" => Some("nats://app@n1:4222,nats://app@n2:4222".into()),
///     "STEADFAST_BROKER_PASSWORD" => Some("s3cret".into()),
///     _ => None,
/// })?;
/// assert_eq!(cfg.broker_url.urls().count(), 2);
/// assert!(cfg.broker_url.urls().all(|u| u.contains("s3cret")));
/// assert_eq!(cfg.broker_url.to_string(), "nats://app:***@n1:4222,nats://app:***@n2:4222");
/// # Ok::<(), steadfast::config::ConfigError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// The URL (or the comma-separated list) with its secrets, to hand to a client
    /// library. Never log it.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// Each URL of the list (one for a single URL), with its secrets. Never log them.
    pub fn urls(&self) -> impl Iterator<Item = &str> {
        self.0.split(',').map(str::trim).filter(|u| !u.is_empty())
    }

    /// The scheme (`amqp`, `nats`, ...), lower case.
    pub fn scheme(&self) -> String {
        self.0
            .split_once("://")
            .map(|(s, _)| s.to_ascii_lowercase())
            .unwrap_or_default()
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::redact::redact_list(&self.0))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({self})")
    }
}

/// A secret that is not a URL (an NKey seed): shown as `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, to hand to a client library. Never log it.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

pub use crate::transport::BrokerKind;

/// How logs are written.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One JSON object per line (the default: what log collectors parse).
    #[default]
    Json,
    /// Human-readable lines.
    Text,
}

/// A worker's configuration, read from the environment by [`WorkerConfig::from_env`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerConfig {
    /// The broker (`STEADFAST_BROKER_URL`, with `STEADFAST_BROKER_PASSWORD` applied to
    /// each URL of the list that names a user).
    pub broker_url: SecretUrl,
    /// The transport the URL selects.
    pub broker: BrokerKind,
    /// The consumer group (`STEADFAST_GROUP`), if set.
    pub group: Option<String>,
    /// Handlers at once and broker prefetch (`STEADFAST_CONCURRENCY`, default 16).
    pub concurrency: usize,
    /// Per-call handler limit (`STEADFAST_HANDLER_TIMEOUT`, default 30 s).
    pub handler_timeout: Duration,
    /// Shutdown drain limit (`STEADFAST_DRAIN_TIMEOUT`, default 20 s).
    pub drain_timeout: Duration,
    /// Largest payload decoded (`STEADFAST_MAX_PAYLOAD_BYTES`, default 1 MiB).
    pub max_payload_bytes: usize,
    /// First connection limit (`STEADFAST_CONNECT_TIMEOUT`, default 10 s).
    pub connect_timeout: Duration,
    /// Health and metrics server address (`STEADFAST_HTTP_ADDR`, default `0.0.0.0:9090`;
    /// `off` for none).
    pub http_addr: Option<SocketAddr>,
    /// Log format (`STEADFAST_LOG_FORMAT`, default `json`).
    pub log_format: LogFormat,
    /// PostgreSQL (`STEADFAST_DATABASE_URL`, with `STEADFAST_DATABASE_PASSWORD` applied).
    pub database_url: Option<SecretUrl>,
    /// RabbitMQ exchange (`STEADFAST_AMQP_EXCHANGE`, default `steadfast`).
    pub amqp_exchange: String,
    /// RabbitMQ queue prefix (`STEADFAST_AMQP_QUEUE_PREFIX`, default empty).
    pub amqp_queue_prefix: String,
    /// NATS subject prefix (`STEADFAST_NATS_SUBJECT_PREFIX`, default `steadfast`).
    pub nats_subject_prefix: String,
    /// NATS stream (`STEADFAST_NATS_STREAM`, default: the prefix in upper case).
    pub nats_stream: Option<String>,
    /// NATS `.creds` file (`STEADFAST_NATS_CREDENTIALS_FILE`).
    pub nats_credentials_file: Option<PathBuf>,
    /// NATS NKey seed (`STEADFAST_NATS_NKEY`).
    pub nats_nkey: Option<Secret>,
    /// NATS authentication token (`STEADFAST_NATS_TOKEN`).
    pub nats_token: Option<Secret>,
    /// NATS stream replicas (`STEADFAST_NATS_REPLICAS`); unset: the server's default.
    pub nats_replicas: Option<usize>,
    /// The kill switch (`STEADFAST_KILL_SWITCH` and `STEADFAST_KILL_SWITCH_*`, see
    /// [`KillSwitch::from_env`](crate::worker::KillSwitch::from_env)); off unless set.
    pub kill_switch: Option<crate::worker::KillSwitch>,
}

/// The configuration is invalid: one line naming every variable that is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    problems: Vec<(String, String)>,
}

impl ConfigError {
    /// The variables that are wrong, with what is wrong with each.
    pub fn problems(&self) -> impl Iterator<Item = (&str, &str)> {
        self.problems.iter().map(|(v, p)| (v.as_str(), p.as_str()))
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid configuration: ")?;
        for (i, (var, problem)) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{var}: {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Reads variables, records problems, never echoes a secret value.
struct Reader<F> {
    lookup: F,
    problems: Vec<(String, String)>,
}

impl<F: FnMut(&str) -> Option<String>> Reader<F> {
    fn problem(&mut self, var: &str, text: impl Into<String>) {
        self.problems.push((var.to_owned(), text.into()));
    }

    /// The value of `var` or of the file named by `var_FILE`; empty counts as unset.
    fn raw(&mut self, var: &str) -> Option<String> {
        let direct = (self.lookup)(var).filter(|v| !v.is_empty());
        let file_var = format!("{var}_FILE");
        let file = (self.lookup)(&file_var).filter(|v| !v.is_empty());
        match (direct, file) {
            (Some(_), Some(_)) => {
                self.problem(var, format!("set either {var} or {file_var}, not both"));
                None
            }
            (Some(v), None) => Some(v),
            (None, Some(path)) => match std::fs::read_to_string(&path) {
                Ok(s) => Some(s.trim_end_matches(['\n', '\r']).to_owned()),
                Err(e) => {
                    self.problem(&file_var, format!("cannot read `{path}`: {}", e.kind()));
                    None
                }
            },
            (None, None) => None,
        }
    }

    fn parsed<T>(
        &mut self,
        var: &str,
        default: T,
        what: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> T {
        match self.raw(var) {
            None => default,
            Some(v) => match parse(v.trim()) {
                Some(t) => t,
                None => {
                    let shown = crate::envelope::truncate(&v, 60).to_owned();
                    self.problem(var, format!("`{shown}` is not {what}"));
                    default
                }
            },
        }
    }

    fn duration(&mut self, var: &str, default: Duration) -> Duration {
        let d = self.parsed(
            var,
            default,
            "a duration (for example `30s`, `500ms`, `2m`)",
            |s| humantime::parse_duration(s).ok(),
        );
        if d.is_zero() {
            self.problem(var, "must be above zero");
        }
        d
    }

    /// A URL variable: its value never echoed; `password_var` replaces the URL's
    /// password. With `list`, the value may be several URLs separated by commas, all of
    /// one scheme; the password then goes into each one that names a user.
    fn url(&mut self, var: &str, password_var: &str, list: bool) -> Option<SecretUrl> {
        let raw = self.raw(var);
        let password = self.raw(password_var);
        let raw = raw?;
        let items: Vec<&str> = if list {
            raw.split(',').map(str::trim).collect()
        } else {
            vec![raw.trim()]
        };
        let mut urls = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let which = if items.len() > 1 {
                format!("URL {} of the list", i + 1)
            } else {
                "not a URL".to_owned()
            };
            if item.is_empty() {
                self.problem(var, format!("{which} is empty"));
                return None;
            }
            match url::Url::parse(item) {
                Ok(u) => urls.push(u),
                Err(e) => {
                    let text = if items.len() > 1 {
                        format!("{which} is not a URL ({e})")
                    } else {
                        format!("not a URL ({e})")
                    };
                    self.problem(var, text);
                    return None;
                }
            }
        }
        if urls.iter().any(|u| u.scheme() != urls[0].scheme()) {
            self.problem(var, "the URLs of the list must all have the same scheme");
            return None;
        }
        if let Some(pw) = password {
            let mut applied = false;
            for u in urls.iter_mut().filter(|u| !u.username().is_empty()) {
                applied |= u.set_password(Some(&pw)).is_ok();
            }
            if !applied {
                self.problem(
                    password_var,
                    format!("cannot be applied: the URL in {var} has no user name"),
                );
            }
        }
        let joined = urls
            .iter()
            .map(url::Url::as_str)
            .collect::<Vec<_>>()
            .join(",");
        Some(SecretUrl(joined))
    }
}

impl WorkerConfig {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `lookup` (a variable's value by name), so it can
    /// be tested without touching the process environment.
    pub fn from_lookup(lookup: impl FnMut(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut r = Reader {
            lookup,
            problems: Vec::new(),
        };
        let broker_url = r.url(BROKER_URL, BROKER_PASSWORD, true);
        let broker = match &broker_url {
            None => {
                if !r.problems.iter().any(|(v, _)| v.starts_with(BROKER_URL)) {
                    r.problem(
                        BROKER_URL,
                        format!("missing: set the broker URL ({})", BrokerKind::expected()),
                    );
                }
                None
            }
            Some(u) => match BrokerKind::from_scheme(&u.scheme()) {
                Ok(kind) => Some(kind),
                Err(e) => {
                    r.problem(BROKER_URL, e.to_string());
                    None
                }
            },
        };
        let group = r.raw(GROUP).map(|g| g.trim().to_owned());
        if let Some(g) = &group
            && (g.len() > 100
                || !g
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            r.problem(
                GROUP,
                "must be 1..=100 ASCII letters, digits, `_`, `-` or `.`",
            );
        }
        let concurrency = r.parsed(
            CONCURRENCY,
            16,
            &format!("a whole number in 1..={MAX_CONCURRENCY}"),
            |s| {
                s.parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_CONCURRENCY).contains(n))
            },
        );
        let handler_timeout = r.duration(HANDLER_TIMEOUT, Duration::from_secs(30));
        let drain_timeout = r.duration(DRAIN_TIMEOUT, Duration::from_secs(20));
        let max_payload_bytes = r.parsed(
            MAX_PAYLOAD_BYTES,
            1 << 20,
            "a number of bytes above zero",
            |s| s.parse::<usize>().ok().filter(|n| *n > 0),
        );
        let connect_timeout = r.duration(CONNECT_TIMEOUT, Duration::from_secs(10));
        let http_addr = r.parsed(
            HTTP_ADDR,
            Some(SocketAddr::from(([0, 0, 0, 0], 9090))),
            "`host:port` (an IP address and a port) or `off`",
            |s| {
                if s.eq_ignore_ascii_case("off") {
                    Some(None)
                } else {
                    SocketAddr::from_str(s).ok().map(Some)
                }
            },
        );
        let log_format = r.parsed(LOG_FORMAT, LogFormat::Json, "`json` or `text`", |s| match s
            .to_ascii_lowercase()
            .as_str()
        {
            "json" => Some(LogFormat::Json),
            "text" => Some(LogFormat::Text),
            _ => None,
        });
        let database_url = r.url(DATABASE_URL, DATABASE_PASSWORD, false);
        if let Some(u) = &database_url
            && !matches!(u.scheme().as_str(), "postgres" | "postgresql")
        {
            r.problem(DATABASE_URL, "must be a postgres:// URL");
        }
        let amqp_exchange = r.raw(AMQP_EXCHANGE).unwrap_or_else(|| "steadfast".into());
        let amqp_queue_prefix = r.raw(AMQP_QUEUE_PREFIX).unwrap_or_default();
        let nats_subject_prefix = r
            .raw(NATS_SUBJECT_PREFIX)
            .unwrap_or_else(|| "steadfast".into());
        let nats_stream = r.raw(NATS_STREAM);
        let nats_credentials_file = r.raw(NATS_CREDENTIALS_FILE).map(PathBuf::from);
        let nats_nkey = r.raw(NATS_NKEY).map(Secret);
        let nats_token = r.raw(NATS_TOKEN).map(Secret);
        let nats_replicas = r.parsed(NATS_REPLICAS, None, "a whole number in 1..=5", |s| {
            s.parse::<usize>()
                .ok()
                .filter(|n| (1..=5).contains(n))
                .map(Some)
        });
        let kill_switch = match crate::worker::KillSwitch::from_lookup(|k| r.raw(k)) {
            Ok(k) => k,
            Err(e) => {
                let (var, text) = e.split_once(": ").unwrap_or(("STEADFAST_KILL_SWITCH", &e));
                let (var, text) = (var.to_owned(), text.to_owned());
                r.problem(&var, text);
                None
            }
        };

        match (broker_url, broker) {
            (Some(broker_url), Some(broker)) if r.problems.is_empty() => Ok(Self {
                broker_url,
                broker,
                group,
                concurrency,
                handler_timeout,
                drain_timeout,
                max_payload_bytes,
                connect_timeout,
                http_addr,
                log_format,
                database_url,
                amqp_exchange,
                amqp_queue_prefix,
                nats_subject_prefix,
                nats_stream,
                nats_credentials_file,
                nats_nkey,
                nats_token,
                nats_replicas,
                kill_switch,
            }),
            _ => Err(ConfigError {
                problems: r.problems,
            }),
        }
    }

    /// Only the database URL (`STEADFAST_DATABASE_URL` or its `_FILE`, with
    /// `STEADFAST_DATABASE_PASSWORD` applied), read the way
    /// [`from_lookup`](Self::from_lookup) reads it, for tools that need no broker.
    ///
    /// ```
    /// use steadfast::config::WorkerConfig;
    /// let url = WorkerConfig::database_url_from_lookup(|n| {
    ///     (n == "STEADFAST_DATABASE_URL").then(|| "postgres://app:pw@db/app".to_string())
    /// })
    /// .unwrap()
    /// .unwrap();
    /// assert_eq!(url.to_string(), "postgres://app:***@db/app");
    /// ```
    pub fn database_url_from_lookup(
        lookup: impl FnMut(&str) -> Option<String>,
    ) -> Result<Option<SecretUrl>, ConfigError> {
        let mut r = Reader {
            lookup,
            problems: Vec::new(),
        };
        let url = r.url(DATABASE_URL, DATABASE_PASSWORD, false);
        if r.problems.is_empty() {
            Ok(url)
        } else {
            Err(ConfigError {
                problems: r.problems,
            })
        }
    }

    /// The consumer group: `STEADFAST_GROUP` if set, else `default`.
    pub fn group_or(&self, default: &str) -> String {
        self.group.clone().unwrap_or_else(|| default.to_owned())
    }

    /// Connects the transport the broker URL selects, within the connect timeout,
    /// through [`transport::connect`](crate::transport::connect) with the options this
    /// configuration holds.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use steadfast::config::WorkerConfig;
    /// let cfg = WorkerConfig::from_lookup(|n| (n == "STEADFAST_BROKER_URL").then(|| "memory://".into()))?;
    /// let transport = cfg.connect().await?;
    /// assert_eq!(transport.system(), "memory");
    /// # Ok(()) }
    /// ```
    pub async fn connect(&self) -> Result<Arc<dyn Transport>, TransportError> {
        crate::transport::connect(self.broker_url.expose_secret(), &self.connect_options())
            .await
            .map_err(|e| match e.kind() {
                TransportErrorKind::Timeout => TransportError::new(
                    TransportErrorKind::Timeout,
                    format!("{e} ({CONNECT_TIMEOUT})"),
                ),
                _ => e,
            })
    }

    /// The options [`connect`](Self::connect) hands to
    /// [`transport::connect`](crate::transport::connect). RabbitMQ's operation timeout is
    /// the connect timeout.
    pub fn connect_options(&self) -> ConnectOptions {
        let secret = |s: &Option<Secret>| s.as_ref().map(|s| s.expose_secret().to_owned());
        ConnectOptions {
            timeout: self.connect_timeout,
            amqp_exchange: Some(self.amqp_exchange.clone()),
            amqp_queue_prefix: Some(self.amqp_queue_prefix.clone()),
            amqp_operation_timeout: Some(self.connect_timeout),
            nats_subject_prefix: Some(self.nats_subject_prefix.clone()),
            nats_stream: self.nats_stream.clone(),
            nats_credentials_file: self.nats_credentials_file.clone(),
            nats_nkey: secret(&self.nats_nkey),
            nats_token: secret(&self.nats_token),
            nats_replicas: self.nats_replicas,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(vars: &[(&str, &str)]) -> Result<WorkerConfig, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        WorkerConfig::from_lookup(|n| map.get(n).cloned())
    }

    #[test]
    fn defaults_and_typed_values() {
        let cfg = load(&[
            (BROKER_URL, "memory://"),
            (CONCURRENCY, "4"),
            (DRAIN_TIMEOUT, "5s"),
            (HTTP_ADDR, "off"),
            (LOG_FORMAT, "TEXT"),
        ])
        .unwrap();
        assert_eq!(cfg.broker, BrokerKind::Memory);
        assert_eq!(cfg.concurrency, 4);
        assert_eq!(cfg.handler_timeout, Duration::from_secs(30));
        assert_eq!(cfg.drain_timeout, Duration::from_secs(5));
        assert_eq!(cfg.http_addr, None);
        assert_eq!(cfg.log_format, LogFormat::Text);
        assert_eq!(cfg.group_or("g"), "g");
    }

    #[test]
    fn every_bad_variable_is_named_on_one_line() {
        let e = load(&[
            (BROKER_URL, "memory://"),
            (HANDLER_TIMEOUT, "30 parsecs"),
            (CONCURRENCY, "0"),
            (HTTP_ADDR, "localhost"),
        ])
        .unwrap_err()
        .to_string();
        assert!(!e.contains('\n'), "{e}");
        for v in [HANDLER_TIMEOUT, CONCURRENCY, HTTP_ADDR] {
            assert!(e.contains(v), "{e}");
        }
        let e = load(&[]).unwrap_err().to_string();
        assert!(e.contains(BROKER_URL) && e.contains("missing"), "{e}");
        let e = load(&[(BROKER_URL, "kafka://k:9092")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown scheme `kafka`"), "{e}");
        let e = load(&[(BROKER_URL, "memory://"), (DRAIN_TIMEOUT, "0s")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("DRAIN_TIMEOUT: must be above zero"), "{e}");
    }

    #[test]
    fn secrets_come_from_files_and_never_show() {
        let dir = std::env::temp_dir().join(format!("steadfast-cfg-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let pw = dir.join("pw");
        std::fs::write(&pw, "canary-5ecret\n").unwrap();
        let pw_path = pw.to_str().unwrap();
        let cfg = load(&[
            (BROKER_URL, "memory://app@localhost"),
            ("STEADFAST_BROKER_PASSWORD_FILE", pw_path),
            (NATS_NKEY, "SUAcanary-5ecret"),
            (DATABASE_URL, "postgres://db:canary-5ecret@db/x"),
        ])
        .unwrap();
        assert!(cfg.broker_url.expose_secret().contains("canary-5ecret"));
        let shown = format!("{cfg:?} {} {:?}", cfg.broker_url, cfg.database_url);
        assert!(!shown.contains("canary-5ecret"), "{shown}");

        // A bad value next to a secret: the error names variables, never the secret.
        let e = load(&[
            (BROKER_URL, "kafka://app:canary-5ecret@k"),
            (DATABASE_URL, "mysql://db:canary-5ecret@db/x"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            !e.contains("canary-5ecret") && e.contains(DATABASE_URL),
            "{e}"
        );

        let e = load(&[
            (BROKER_URL, "memory://"),
            (
                "STEADFAST_BROKER_PASSWORD_FILE",
                "/nonexistent/steadfast/pw",
            ),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("STEADFAST_BROKER_PASSWORD_FILE: cannot read"),
            "{e}"
        );
        let e = load(&[
            (BROKER_URL, "memory://"),
            ("STEADFAST_BROKER_URL_FILE", pw_path),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("not both"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn url_lists_share_a_scheme_and_get_the_password_each() {
        let cfg = load(&[
            (
                BROKER_URL,
                "amqp://app@r1:5672/%2f, amqp://app@r2:5672/%2f,amqp://r3",
            ),
            (BROKER_PASSWORD, "canary-5ecret"),
        ])
        .unwrap();
        let urls: Vec<&str> = cfg.broker_url.urls().collect();
        assert_eq!(
            urls,
            [
                "amqp://app:canary-5ecret@r1:5672/%2f",
                "amqp://app:canary-5ecret@r2:5672/%2f",
                "amqp://r3"
            ]
        );
        assert_eq!(cfg.broker, BrokerKind::Amqp);
        let shown = format!("{} {:?}", cfg.broker_url, cfg.broker_url);
        assert!(!shown.contains("canary-5ecret"), "{shown}");
        assert_eq!(
            cfg.broker_url.to_string(),
            "amqp://app:***@r1:5672/%2f,amqp://app:***@r2:5672/%2f,amqp://r3"
        );
        let cfg = load(&[(BROKER_URL, "nats://tok3n-canary@n1:4222,nats://n2:4222")]).unwrap();
        assert_eq!(cfg.broker, BrokerKind::Nats);
        assert!(!cfg.broker_url.to_string().contains("tok3n-canary"));

        let e = load(&[(BROKER_URL, "nats://n1:4222,amqp://n2:5672")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("same scheme"), "{e}");
        let e = load(&[(BROKER_URL, "nats://n1:4222,,nats://n2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("URL 2 of the list is empty"), "{e}");
        let e = load(&[(BROKER_URL, "nats://a:canary-5ecret@n1:4222,n2 :4222")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("URL 2 of the list is not a URL") && !e.contains("canary-5ecret"),
            "{e}"
        );
        let e = load(&[(BROKER_URL, "nats://n1,nats://n2"), (BROKER_PASSWORD, "pw")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no user name"), "{e}");
    }

    #[test]
    fn token_urls_are_redacted_too() {
        let u = SecretUrl("nats://s3cr3t-token@nats:4222".into());
        assert!(!u.to_string().contains("s3cr3t"), "{u}");
        let u = SecretUrl("amqp://app:pw@rabbit:5672/%2f".into());
        assert_eq!(u.to_string(), "amqp://app:***@rabbit:5672/%2f");
    }
}
