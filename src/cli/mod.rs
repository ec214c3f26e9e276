//! The `steadfast` command-line tool (feature `cli`): dead letters on RabbitMQ and NATS
//! JetStream (`dlq list | groups | show | replay | purge | edit | history`) and outboxes
//! in PostgreSQL, SQLite and MySQL / MariaDB (`outbox status | parked | retry-parked |
//! delete-parked`), and the SQL of the stores' tables (`schema inbox|outbox <database>`).
//! The binary `src/bin/steadfast.rs` only calls [`main`]; everything is here so it can
//! be tested. See `docs/dead-letters.md`.
//!
//! One configuration: the tool reads the worker's `STEADFAST_*` variables (and their
//! `_FILE` forms) through [`WorkerConfig`](crate::config::WorkerConfig), so it runs
//! beside a worker with the worker's settings; flags win over variables, and without
//! `STEADFAST_BROKER_URL` it takes `AMQP_URL` or `NATS_URL`; for NATS the URL may be a
//! comma-separated list of a cluster's servers. Passwords and tokens are replaced by
//! `***` in everything the tool prints, its logs included (`RUST_LOG`, for example
//! `RUST_LOG=debug`, turns logs on, on standard error).
//!
//! ```
//! use clap::Parser;
//! use steadfast::cli::Cli;
//! let cli = Cli::try_parse_from(["steadfast", "dlq", "replay", "billing", "--name", "orders.placed", "--dry-run"]);
//! assert!(cli.is_ok());
//! ```

mod audit;
#[cfg(feature = "console")]
mod console;
mod dlq;
mod edit;
mod outbox;
mod print;
mod progress;
mod schema;
#[cfg(feature = "console")]
mod workers;

use crate::{
    config::{self, WorkerConfig},
    redact,
    transport::{Transport, TransportError},
};
use clap::{Args, CommandFactory, Parser, Subcommand};
use std::{fmt, process::ExitCode, sync::Arc};

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "steadfast",
    version,
    about = "Dead letters and outboxes of steadfast consumers on RabbitMQ and NATS JetStream"
)]
pub struct Cli {
    /// Print JSON for scripts (every command).
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    db: DbArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Dead letters of a consumer group: list, groups, show, replay, purge, edit, history.
    Dlq {
        #[command(flatten)]
        broker: Box<BrokerArgs>,
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// A transactional outbox in PostgreSQL or SQLite: status, parked rows, retry, delete.
    Outbox {
        /// The outbox table (`name` or `schema.name`).
        #[arg(long, global = true, default_value = "steadfast_outbox")]
        table: String,
        #[command(subcommand)]
        command: outbox::OutboxCommand,
    },
    /// Serves the web console (feature `console`): failure groups, dead letters, replay
    /// and purge with a dry run, behind a token, on loopback by default.
    #[cfg(feature = "console")]
    Console {
        #[command(flatten)]
        broker: Box<BrokerArgs>,
        #[command(flatten)]
        args: console::ConsoleArgs,
    },
    /// Prints the SQL that creates the inbox's or outbox's table on a database, with your
    /// table name, for your own migrations (what `migrate()` runs); no connection needed:
    /// `steadfast schema outbox postgres --table app.outbox`.
    Schema {
        /// `inbox` or `outbox`.
        store: schema::Store,
        /// `postgres`, `sqlite` or `mysql` (MySQL / MariaDB).
        database: schema::Database,
        /// The table (`name` or `schema.name`); default `steadfast_inbox` or
        /// `steadfast_outbox`.
        #[arg(long)]
        table: Option<String>,
    },
    /// Prints a shell completion script: `steadfast completions bash > /etc/bash_completion.d/steadfast`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// How to reach the broker; the names must match the worker's transport settings. Each
/// flag defaults to the worker's `STEADFAST_*` variable.
#[derive(Debug, Clone, Default, Args)]
struct BrokerArgs {
    /// Broker URL: `amqp://`/`amqps://` for RabbitMQ, `nats://`/`tls://`/`ws://`/`wss://`
    /// for NATS (as `steadfast::transport::connect`); for a cluster, every node's URL,
    /// comma-separated. Default: `STEADFAST_BROKER_URL`, else `AMQP_URL` or `NATS_URL`,
    /// whichever is set.
    #[arg(long, global = true)]
    url: Option<String>,
    /// RabbitMQ: the exchange the workers use (default: `STEADFAST_AMQP_EXCHANGE`, `steadfast`).
    #[arg(long, global = true)]
    exchange: Option<String>,
    /// RabbitMQ: the queue prefix the workers use (default: `STEADFAST_AMQP_QUEUE_PREFIX`).
    #[arg(long, global = true)]
    queue_prefix: Option<String>,
    /// NATS: the subject prefix the workers use (default: `STEADFAST_NATS_SUBJECT_PREFIX`,
    /// `steadfast`).
    #[arg(long, global = true)]
    subject_prefix: Option<String>,
    /// NATS: the work stream's name (default: `STEADFAST_NATS_STREAM`, else from the
    /// subject prefix, `STEADFAST`); dead letters are in `{stream}_DLQ`.
    #[arg(long, global = true)]
    stream: Option<String>,
    /// NATS: a `.creds` file, user JWT and NKey seed (default:
    /// `STEADFAST_NATS_CREDENTIALS_FILE`); also `--nats-creds-file`.
    #[arg(
        long,
        global = true,
        env = "NATS_CREDS",
        visible_alias = "nats-creds-file"
    )]
    nats_creds: Option<std::path::PathBuf>,
    /// NATS: a file holding an NKey seed (default: `STEADFAST_NATS_NKEY_FILE`).
    #[arg(long, global = true, env = "NATS_NKEY_FILE")]
    nats_nkey_file: Option<std::path::PathBuf>,
}

/// The database of the outbox and of the audit trail.
#[derive(Debug, Clone, Args)]
struct DbArgs {
    /// PostgreSQL or MySQL / MariaDB (`mysql://...`): the database URL (default:
    /// `DATABASE_URL`, else `STEADFAST_DATABASE_URL`).
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// SQLite: the database file (wins over a PostgreSQL URL).
    #[arg(long, global = true)]
    sqlite: Option<std::path::PathBuf>,
    /// The audit trail's table (`name` or `schema.name`), created when missing.
    #[arg(long, global = true, default_value = "steadfast_audit")]
    audit_table: String,
    /// Who is acting, for the audit trail (default: `STEADFAST_ACTOR`, else user@host).
    #[arg(long, global = true, env = "STEADFAST_ACTOR")]
    actor: Option<String>,
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

/// Options every command shares.
#[derive(Debug, Clone)]
struct Common {
    json: bool,
    db: DbArgs,
}

/// Runs a parsed command line.
async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let common = Common {
        json: cli.json,
        db: cli.db,
    };
    match cli.command {
        Command::Dlq { broker, command } => {
            if let dlq::DlqCommand::History(h) = command {
                return audit::history(&common, h).await;
            }
            let cfg = worker_config(&broker, |k| std::env::var(k).ok())?;
            let secret = url_secret(cfg.broker_url.expose_secret());
            let scrub =
                |e: TransportError| CliError(redact::scrub(&e.to_string(), secret.as_deref()));
            let transport: Arc<dyn Transport> = cfg.connect().await.map_err(scrub)?;
            let r = dlq::run(transport.as_ref(), &common, command).await;
            transport.close().await;
            r.map_err(|e| CliError(redact::scrub(&e.0, secret.as_deref())))
        }
        Command::Outbox { table, command } => outbox::run(&common, &table, command).await,
        #[cfg(feature = "console")]
        Command::Console { broker, args } => {
            let cfg = worker_config(&broker, |k| std::env::var(k).ok())?;
            let secret = url_secret(cfg.broker_url.expose_secret());
            let scrub =
                |e: TransportError| CliError(redact::scrub(&e.to_string(), secret.as_deref()));
            let transport: Arc<dyn Transport> = cfg.connect().await.map_err(scrub)?;
            let r = console::run(transport.clone(), common.db.clone(), args).await;
            transport.close().await;
            r.map_err(|e| CliError(redact::scrub(&e.0, secret.as_deref())))
        }
        Command::Schema {
            store,
            database,
            table,
        } => {
            print!("{}", schema::render(store, database, table.as_deref())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "steadfast",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The worker's configuration as the tool sees it: flags, then the worker's
/// `STEADFAST_*` variables through [`WorkerConfig::from_lookup`] (the code the worker
/// runs), then `AMQP_URL` / `NATS_URL` for the broker.
fn worker_config(
    args: &BrokerArgs,
    env: impl Fn(&str) -> Option<String>,
) -> Result<WorkerConfig, CliError> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    let fallback_url = if args.url.is_none()
        && set(config::BROKER_URL).is_none()
        && set(&format!("{}_FILE", config::BROKER_URL)).is_none()
    {
        match (set("AMQP_URL"), set("NATS_URL")) {
            (Some(a), None) => Some(a),
            (None, Some(n)) => Some(n),
            (Some(_), Some(_)) => {
                return Err(CliError::new(
                    "both AMQP_URL and NATS_URL are set: say which broker with --url",
                ));
            }
            (None, None) => {
                return Err(CliError::new(
                    "no broker: pass --url, or set STEADFAST_BROKER_URL (as the worker does), AMQP_URL or NATS_URL",
                ));
            }
        }
    } else {
        None
    };
    let path =
        |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
    let nkey_file = format!("{}_FILE", config::NATS_NKEY);
    let flags: [(&str, Option<String>); 7] = [
        (config::BROKER_URL, args.url.clone().or(fallback_url)),
        (config::AMQP_EXCHANGE, args.exchange.clone()),
        (config::AMQP_QUEUE_PREFIX, args.queue_prefix.clone()),
        (config::NATS_SUBJECT_PREFIX, args.subject_prefix.clone()),
        (config::NATS_STREAM, args.stream.clone()),
        (config::NATS_CREDENTIALS_FILE, path(&args.nats_creds)),
        // The seed's own variable, given as its `_FILE` form.
        (&nkey_file, path(&args.nats_nkey_file)),
    ];
    WorkerConfig::from_lookup(|name| {
        for (var, value) in &flags {
            if let Some(v) = value {
                if name == *var {
                    return Some(v.clone());
                }
                if name.strip_suffix("_FILE") == Some(var)
                    || var.strip_suffix("_FILE") == Some(name)
                {
                    return None;
                }
            }
        }
        env(name)
    })
    .map_err(|e| CliError(e.to_string()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_urls_have_their_secret_found() {
        assert_eq!(
            url_secret("amqp://guest:s3cret@h/").as_deref(),
            Some("s3cret")
        );
        assert_eq!(
            url_secret("nats://tok3nvalue@h:4222").as_deref(),
            Some("tok3nvalue")
        );
    }

    #[test]
    fn flags_win_over_the_workers_variables_which_win_over_amqp_url() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let vars: &[(&str, &str)] = &[
            ("STEADFAST_BROKER_URL", "amqp://app:pw@rabbit/%2f"),
            ("STEADFAST_AMQP_QUEUE_PREFIX", "prod."),
            ("AMQP_URL", "amqp://other/%2f"),
        ];
        let cfg = worker_config(&BrokerArgs::default(), env(vars)).unwrap();
        assert_eq!(cfg.broker_url.expose_secret(), "amqp://app:pw@rabbit/%2f");
        assert_eq!(cfg.amqp_queue_prefix, "prod.");
        let flags = BrokerArgs {
            url: Some("nats://n:4222".into()),
            queue_prefix: Some("dev.".into()),
            ..BrokerArgs::default()
        };
        let cfg = worker_config(&flags, env(vars)).unwrap();
        assert_eq!(cfg.broker_url.expose_secret(), "nats://n:4222");
        assert_eq!(cfg.amqp_queue_prefix, "dev.");
        let cfg = worker_config(
            &BrokerArgs::default(),
            env(&[("NATS_URL", "nats://x:4222")]),
        )
        .unwrap();
        assert_eq!(cfg.broker, config::BrokerKind::Nats);
        let e = worker_config(&BrokerArgs::default(), env(&[])).unwrap_err();
        assert!(e.0.contains("STEADFAST_BROKER_URL"), "{e}");
        // The worker's own checks apply: a bad variable is named.
        let e = worker_config(
            &BrokerArgs::default(),
            env(&[("STEADFAST_BROKER_URL", "kafka://k:9092")]),
        )
        .unwrap_err();
        assert!(e.0.contains("STEADFAST_BROKER_URL"), "{e}");
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
                "--group-id",
                "0123abcd4567",
                "--json",
            ])
            .is_ok()
        );
        for cmd in ["list", "groups", "show", "replay", "purge"] {
            assert!(
                Cli::try_parse_from(["steadfast", "dlq", cmd, "g", "--name", "a", "--since", "1h"])
                    .is_ok(),
                "{cmd}"
            );
        }
        assert!(
            Cli::try_parse_from(["steadfast", "dlq", "replay", "g", "--since", "yesterday"])
                .is_err()
        );
        assert!(
            Cli::try_parse_from(["steadfast", "dlq", "show", "g", "--id", "not-a-uuid"]).is_err()
        );
        assert!(Cli::try_parse_from(["steadfast", "completions", "zsh"]).is_ok());
    }
}
