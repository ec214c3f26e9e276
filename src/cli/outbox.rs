//! `steadfast outbox ...`: the state of a PostgreSQL or SQLite outbox, and putting
//! parked rows back in line.

use super::CliError;
use crate::{
    MessageId,
    outbox::{OutboxStatus, ParkedRow, PostgresOutbox, SqliteOutbox},
    redact,
};
use clap::{Args, Subcommand};
use std::process::ExitCode;

/// Which outbox.
#[derive(Debug, Clone, Args)]
pub(super) struct DbArgs {
    /// A PostgreSQL outbox: the database URL.
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// A SQLite outbox: the database file (wins over a PostgreSQL URL).
    #[arg(long, global = true)]
    sqlite: Option<std::path::PathBuf>,
    /// The outbox table (`name` or `schema.name`).
    #[arg(long, global = true, default_value = "steadfast_outbox")]
    table: String,
}

#[derive(Debug, Subcommand)]
pub(super) enum OutboxCommand {
    /// Pending and parked rows, and how long the oldest pending row has waited.
    Status {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Puts parked rows back in line for the relay (all of them, or those given).
    RetryParked {
        /// Only this row id (repeatable).
        #[arg(long = "id")]
        ids: Vec<MessageId>,
    },
}

enum Store {
    Pg(PostgresOutbox, sqlx::PgPool),
    Lite(SqliteOutbox, sqlx::SqlitePool),
}

impl Store {
    async fn status(&self) -> Result<OutboxStatus, crate::idempotency::StoreError> {
        match self {
            Store::Pg(o, _) => o.status().await,
            Store::Lite(o, _) => o.status().await,
        }
    }
    async fn parked(&self, limit: i64) -> Result<Vec<ParkedRow>, crate::idempotency::StoreError> {
        match self {
            Store::Pg(o, _) => o.parked(limit).await,
            Store::Lite(o, _) => o.parked(limit).await,
        }
    }
    async fn requeue(&self, id: MessageId) -> Result<bool, crate::idempotency::StoreError> {
        match self {
            Store::Pg(o, _) => o.requeue(id).await,
            Store::Lite(o, _) => o.requeue(id).await,
        }
    }
    async fn close(self) {
        match self {
            Store::Pg(_, p) => p.close().await,
            Store::Lite(_, p) => p.close().await,
        }
    }
}

async fn open(db: &DbArgs) -> Result<Store, CliError> {
    let bad_table = |e: crate::idempotency::StoreError| CliError(e.to_string());
    if let Some(path) = &db.sqlite {
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(false);
        let pool = sqlx::SqlitePool::connect_with(opts).await.map_err(|e| {
            CliError(format!(
                "cannot open SQLite database `{}`: {e}",
                path.display()
            ))
        })?;
        let o = SqliteOutbox::new(pool.clone())
            .with_table(&db.table)
            .map_err(bad_table)?;
        return Ok(Store::Lite(o, pool));
    }
    let Some(url) = &db.database_url else {
        return Err(CliError::new(
            "no outbox: pass --database-url (or set DATABASE_URL) for PostgreSQL, or --sqlite FILE",
        ));
    };
    let pool = crate::idempotency::postgres::connect(url)
        .await
        .map_err(|e| {
            CliError(redact::scrub(
                &e.to_string(),
                redact::password(url).as_deref(),
            ))
        })?;
    let o = PostgresOutbox::new(pool.clone())
        .with_table(&db.table)
        .map_err(bad_table)?;
    Ok(Store::Pg(o, pool))
}

pub(super) async fn run(db: DbArgs, cmd: OutboxCommand) -> Result<ExitCode, CliError> {
    let store = open(&db).await?;
    let r = run_on(&store, &db, cmd).await;
    store.close().await;
    r
}

async fn run_on(store: &Store, db: &DbArgs, cmd: OutboxCommand) -> Result<ExitCode, CliError> {
    let err = |e: crate::idempotency::StoreError| {
        let secret = db.database_url.as_deref().and_then(redact::password);
        CliError(redact::scrub(&e.to_string(), secret.as_deref()))
    };
    match cmd {
        OutboxCommand::Status { json } => {
            let s = store.status().await.map_err(err)?;
            let age = s.oldest_pending_age.map(|d| d.as_secs_f64());
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "table": db.table,
                        "pending": s.pending,
                        "parked": s.parked,
                        "oldest_pending_age_seconds": age,
                    })
                );
            } else {
                println!("outbox `{}`", db.table);
                println!("  pending: {}", s.pending);
                println!("  parked:  {}", s.parked);
                match s.oldest_pending_age {
                    Some(d) => println!(
                        "  oldest pending row waiting for {}",
                        humantime::format_duration(std::time::Duration::from_secs(d.as_secs()))
                    ),
                    None => println!("  no pending rows"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        OutboxCommand::RetryParked { ids } => {
            let ids = if ids.is_empty() {
                store
                    .parked(i64::MAX)
                    .await
                    .map_err(err)?
                    .into_iter()
                    .map(|r| r.id)
                    .collect()
            } else {
                ids
            };
            let mut requeued = 0usize;
            let mut not_parked = Vec::new();
            for id in ids {
                if store.requeue(id).await.map_err(err)? {
                    requeued += 1;
                } else {
                    not_parked.push(id);
                }
            }
            println!("requeued {requeued} parked row(s) of `{}`", db.table);
            for id in &not_parked {
                println!("not parked (unknown, pending or sent): {id}");
            }
            Ok(if not_parked.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
