//! The `steadfast` command-line tool (feature `cli`): dead letters on RabbitMQ and NATS
//! JetStream (`dlq list | show | replay | purge`) and outboxes in PostgreSQL and SQLite
//! (`outbox status | retry-parked`). The binary `src/bin/steadfast.rs` only calls
//! [`main`]; everything is here so it can be tested. See `docs/dead-letters.md`.
//!
//! The broker is chosen by `--url`, else `AMQP_URL` or `NATS_URL` (set exactly one);
//! for NATS it may be a comma-separated list of a cluster's servers. Passwords and tokens
//! are replaced by `***` in everything the tool prints, its logs included (`RUST_LOG`,
//! for example `RUST_LOG=debug`, turns logs on, on standard error).
//!
//! ```
//! use clap::Parser;
//! use steadfast::cli::Cli;
//! let cli = Cli::try_parse_from(["steadfast", "dlq", "replay", "billing", "--name", "orders.placed", "--dry-run"]);
//! assert!(cli.is_ok());
//! ```

mod dlq;
mod outbox;

use crate::{
    redact,
    transport::{
        Transport, TransportError,
        amqp::{AmqpTransport, DEFAULT_EXCHANGE},
        nats::NatsTransport,
    },
};
use clap::{Args, Parser, Subcommand};
use std::{fmt, process::ExitCode, sync::Arc, time::Duration};

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "steadfast",
    version,
    about = "Dead letters and outboxes of steadfast consumers on RabbitMQ and NATS JetStream"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Dead letters of a consumer group: list, show, replay, purge.
    Dlq {
        #[command(flatten)]
        broker: Box<BrokerArgs>,
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// A transactional outbox in PostgreSQL or SQLite: status, retry parked rows.
    Outbox {
        #[command(flatten)]
        db: outbox::DbArgs,
        #[command(subcommand)]
        command: outbox::OutboxCommand,
    },
}

/// How to reach the broker; the names must match the worker's transport settings.
#[derive(Debug, Clone, Args)]
struct BrokerArgs {
    /// Broker URL: `amqp://`/`amqps://` for RabbitMQ, `nats://`/`tls://` for NATS; for a
    /// cluster, every node's URL, comma-separated. Default: `AMQP_URL` or `NATS_URL`,
    /// whichever is set.
    #[arg(long, global = true)]
    url: Option<String>,
    /// RabbitMQ: the exchange the workers use.
    #[arg(long, global = true, default_value = DEFAULT_EXCHANGE)]
    exchange: String,
    /// RabbitMQ: the queue prefix the workers use.
    #[arg(long, global = true, default_value = "")]
    queue_prefix: String,
    /// NATS: the subject prefix the workers use.
    #[arg(long, global = true, default_value = "steadfast")]
    subject_prefix: String,
    /// NATS: the work stream's name (default: from the subject prefix, `STEADFAST`);
    /// dead letters are in `{stream}_DLQ`.
    #[arg(long, global = true)]
    stream: Option<String>,
    /// NATS: a credentials file.
    #[arg(long, global = true, env = "NATS_CREDS")]
    nats_creds: Option<std::path::PathBuf>,
    /// NATS: a file holding an NKey seed.
    #[arg(long, global = true, env = "NATS_NKEY_FILE")]
    nats_nkey_file: Option<std::path::PathBuf>,
}

/// A failure of the tool, its text free of secrets.
#[derive(Debug)]
pub(crate) struct CliError(String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl CliError {
    pub(crate) fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }
}

/// Runs the tool with the process's arguments and prints what went wrong.
pub fn main() -> ExitCode {
    run_from(std::env::args_os())
}

/// Runs the tool with `args` (the first is the program name).
pub fn run_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("steadfast: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("steadfast: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a parsed command line.
async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Dlq { broker, command } => {
            let (transport, secret) = connect(&broker).await?;
            let r = dlq::run(transport.as_ref(), command).await;
            transport.close().await;
            r.map_err(|e| CliError(redact::scrub(&e.0, secret.as_deref())))
        }
        Command::Outbox { db, command } => outbox::run(db, command).await,
    }
}

/// The URL to use: `--url`, else the one of `AMQP_URL` / `NATS_URL` that is set.
fn broker_url(args: &BrokerArgs) -> Result<String, CliError> {
    if let Some(u) = &args.url {
        return Ok(u.clone());
    }
    let amqp = std::env::var("AMQP_URL").ok().filter(|s| !s.is_empty());
    let nats = std::env::var("NATS_URL").ok().filter(|s| !s.is_empty());
    match (amqp, nats) {
        (Some(a), None) => Ok(a),
        (None, Some(n)) => Ok(n),
        (Some(_), Some(_)) => Err(CliError::new(
            "both AMQP_URL and NATS_URL are set: say which broker with --url",
        )),
        (None, None) => Err(CliError::new(
            "no broker: pass --url, or set AMQP_URL (RabbitMQ) or NATS_URL (NATS)",
        )),
    }
}

/// `url` (or each URL of a comma-separated list) for display: the password and any
/// token or user name in it replaced by `***`.
pub(crate) fn display_url(url: &str) -> String {
    url.split(',')
        .map(|one| display_one_url(one.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

fn display_one_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if !u.username().is_empty() && u.password().is_none() {
                // nats://TOKEN@host: the user part is the secret.
                let _ = u.set_username("***");
            }
            redact::redact_url(u.as_str())
        }
        Err(_) => "(unparseable url)".to_owned(),
    }
}

/// The secret in `url` (password, or a token in the user part; the first URL's of a
/// list), to scrub from errors.
fn url_secret(url: &str) -> Option<String> {
    let url = url.split(',').next().unwrap_or_default().trim();
    redact::password(url).or_else(|| {
        url::Url::parse(url)
            .ok()
            .map(|u| u.username().to_owned())
            .filter(|s| s.len() >= 8)
    })
}

async fn connect(args: &BrokerArgs) -> Result<(Arc<dyn Transport>, Option<String>), CliError> {
    let url = broker_url(args)?;
    let secret = url_secret(&url);
    let scheme = url
        .split("://")
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let fail = |e: TransportError| CliError(redact::scrub(&e.to_string(), secret.as_deref()));
    let t: Arc<dyn Transport> = match scheme.as_str() {
        "amqp" | "amqps" => Arc::new(
            AmqpTransport::builder(url.clone())
                .exchange(args.exchange.clone())
                .queue_prefix(args.queue_prefix.clone())
                .operation_timeout(Duration::from_secs(15))
                .connect()
                .await
                .map_err(fail)?,
        ),
        "nats" | "tls" | "ws" | "wss" => {
            let mut b = NatsTransport::builder(&url).subject_prefix(args.subject_prefix.clone());
            if let Some(s) = &args.stream {
                b = b.stream(s.clone());
            }
            if let Some(c) = &args.nats_creds {
                b = b.credentials_file(c.clone());
            }
            if let Some(path) = &args.nats_nkey_file {
                let seed = std::fs::read_to_string(path).map_err(|e| {
                    CliError(format!(
                        "cannot read the NKey seed file `{}`: {}",
                        path.display(),
                        e.kind()
                    ))
                })?;
                b = b.nkey(seed.trim());
            }
            Arc::new(b.connect().await.map_err(fail)?)
        }
        _ => {
            return Err(CliError(format!(
                "cannot tell the broker from `{}`: use amqp://, amqps://, nats:// or tls://",
                display_url(&url)
            )));
        }
    };
    Ok((t, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_secrets() {
        assert_eq!(
            display_url("amqp://guest:s3cret@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
        assert_eq!(display_url("nats://tok3nvalue@h:4222"), "nats://***@h:4222");
        assert_eq!(display_url("nats://h:4222"), "nats://h:4222");
        assert_eq!(
            display_url("nats://u:pw1@h1:4222, nats://u:pw1@h2:4222"),
            "nats://u:***@h1:4222,nats://u:***@h2:4222"
        );
        assert_eq!(
            url_secret("nats://u:pw1@h1:4222,nats://u:pw1@h2:4222").as_deref(),
            Some("pw1")
        );
        assert_eq!(
            url_secret("nats://tok3nvalue@h:4222").as_deref(),
            Some("tok3nvalue")
        );
    }

    #[test]
    fn parses_filters_and_rejects_nonsense() {
        assert!(
            Cli::try_parse_from([
                "steadfast",
                "dlq",
                "--url",
                "amqp://h",
                "replay",
                "g",
                "--since",
                "2h",
                "--until",
                "2026-01-01T00:00:00Z",
                "--limit",
                "5",
                "--reason",
                "boom",
            ])
            .is_ok()
        );
        assert!(
            Cli::try_parse_from(["steadfast", "dlq", "replay", "g", "--since", "yesterday"])
                .is_err()
        );
        assert!(
            Cli::try_parse_from(["steadfast", "dlq", "show", "g", "--id", "not-a-uuid"]).is_err()
        );
    }
}
