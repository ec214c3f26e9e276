//! `steadfast outbox ...`: the state of a PostgreSQL, MySQL / MariaDB or SQLite outbox, its parked rows
//! with their errors, and putting them back in line or deleting them by selection, with
//! the same dry-run, JSON and audit rules as the dead-letter commands.

use super::{
    CliError, Common,
    audit::{self, Db, bounded},
    dlq::confirm,
};
use crate::{
    MessageId,
    idempotency::StoreError,
    outbox::{MySqlOutbox, OutboxStatus, ParkedRow, PostgresOutbox, SqliteOutbox},
};
use clap::{Args, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub(super) enum OutboxCommand {
    /// Pending and parked rows, and how long the oldest pending row has waited.
    Status,
    /// Parked rows (the relay gave up on them) with their attempts and last error.
    Parked {
        #[command(flatten)]
        select: ParkedArgs,
    },
    /// Puts the selected parked rows back in line for the relay.
    RetryParked {
        #[command(flatten)]
        select: ParkedArgs,
        /// List the ids that would be put back; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Deletes the selected parked rows (asks first unless --yes).
    DeleteParked {
        #[command(flatten)]
        select: ParkedArgs,
        /// List the ids that would be deleted; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not ask.
        #[arg(long, short)]
        yes: bool,
    },
}

/// Which parked rows: every condition given must hold.
#[derive(Debug, Clone, Args)]
pub(super) struct ParkedArgs {
    /// Only this row id (repeatable).
    #[arg(long = "id")]
    ids: Vec<MessageId>,
    /// Only rows of messages with this name.
    #[arg(long)]
    name: Option<String>,
    /// Only rows whose last error contains this text (case ignored).
    #[arg(long)]
    error: Option<String>,
    /// At most this many.
    #[arg(long)]
    limit: Option<usize>,
}

impl ParkedArgs {
    fn matches(&self, r: &ParkedRow) -> bool {
        (self.ids.is_empty() || self.ids.contains(&r.id))
            && self.name.as_ref().is_none_or(|n| r.name == *n)
            && self.error.as_ref().is_none_or(|e| {
                r.error
                    .to_ascii_lowercase()
                    .contains(&e.to_ascii_lowercase())
            })
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "ids": self.ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "name": self.name,
            "error": self.error,
            "limit": self.limit,
        })
    }
}

enum Store {
    Pg(PostgresOutbox, sqlx::PgPool),
    Lite(SqliteOutbox, sqlx::SqlitePool),
    My(MySqlOutbox, sqlx::MySqlPool),
}

impl Store {
    /// The outbox in `table` of `db`.
    fn open(db: &Db, table: &str) -> Result<Self, CliError> {
        let bad_table = |e: StoreError| CliError(e.to_string());
        Ok(match db {
            Db::Pg(p, _) => Store::Pg(
                PostgresOutbox::new(p.clone())
                    .with_table(table)
                    .map_err(bad_table)?,
                p.clone(),
            ),
            Db::Lite(p) => Store::Lite(
                SqliteOutbox::new(p.clone())
                    .with_table(table)
                    .map_err(bad_table)?,
                p.clone(),
            ),
            Db::My(p, _) => Store::My(
                MySqlOutbox::new(p.clone())
                    .with_table(table)
                    .map_err(bad_table)?,
                p.clone(),
            ),
        })
    }

    async fn status(&self) -> Result<OutboxStatus, StoreError> {
        match self {
            Store::Pg(o, _) => o.status().await,
            Store::Lite(o, _) => o.status().await,
            Store::My(o, _) => o.status().await,
        }
    }
    async fn parked(&self) -> Result<Vec<ParkedRow>, StoreError> {
        match self {
            Store::Pg(o, _) => o.parked(i64::MAX).await,
            Store::Lite(o, _) => o.parked(i64::MAX).await,
            Store::My(o, _) => o.parked(i64::MAX).await,
        }
    }
    async fn requeue(&self, id: MessageId) -> Result<bool, StoreError> {
        match self {
            Store::Pg(o, _) => o.requeue(id).await,
            Store::Lite(o, _) => o.requeue(id).await,
            Store::My(o, _) => o.requeue(id).await,
        }
    }
    /// Deletes a row if it is parked (never a pending or sent one).
    async fn delete_parked(&self, db: &Db, id: MessageId) -> Result<bool, CliError> {
        let n = match self {
            Store::Pg(o, pool) => {
                let q = format!(
                    "DELETE FROM {} WHERE id = $1 AND state = 'parked'",
                    o.table()
                );
                bounded(
                    "deleting a parked row",
                    sqlx::query(sqlx::AssertSqlSafe(q))
                        .bind(*id.as_uuid())
                        .execute(pool),
                )
                .await?
                .map(|r| r.rows_affected())
            }
            Store::Lite(o, pool) => {
                let q = format!(
                    "DELETE FROM {} WHERE id = ?1 AND state = 'parked'",
                    o.table()
                );
                bounded(
                    "deleting a parked row",
                    sqlx::query(sqlx::AssertSqlSafe(q))
                        .bind(id.to_string())
                        .execute(pool),
                )
                .await?
                .map(|r| r.rows_affected())
            }
            Store::My(o, pool) => {
                let q = format!(
                    "DELETE FROM {} WHERE id = ? AND state = 'parked'",
                    o.table()
                );
                bounded(
                    "deleting a parked row",
                    sqlx::query(sqlx::AssertSqlSafe(q))
                        .bind(id.to_string())
                        .execute(pool),
                )
                .await?
                .map(|r| r.rows_affected())
            }
        };
        n.map(|n| n == 1)
            .map_err(|e| db.err("deleting a parked row", &e))
    }
}

/// The outbox `table`'s status and parked rows (the console's outbox page).
#[cfg(feature = "console")]
pub(super) async fn overview(
    db_args: &super::DbArgs,
    table: &str,
) -> Result<(OutboxStatus, Vec<ParkedRow>), CliError> {
    let Some(db) = audit::open_db(db_args).await? else {
        return Err(CliError::new(
            "no outbox database: start the console with --database-url or --sqlite",
        ));
    };
    let store = Store::open(&db, table)?;
    let r = async {
        let status = store.status().await?;
        let parked = store.parked().await?;
        Ok::<_, StoreError>((status, parked))
    }
    .await
    .map_err(|e| db.err("outbox", &e));
    db.close().await;
    r
}

pub(super) async fn run(
    common: &Common,
    table: &str,
    cmd: OutboxCommand,
) -> Result<ExitCode, CliError> {
    let Some(db) = audit::open_db(&common.db).await? else {
        return Err(CliError::new(
            "no outbox: pass --database-url (or set DATABASE_URL or STEADFAST_DATABASE_URL) for PostgreSQL or MySQL / MariaDB (mysql://...), or --sqlite FILE",
        ));
    };
    let store = Store::open(&db, table)?;
    let r = run_on(&store, &db, common, table, cmd).await;
    db.close().await;
    r
}

async fn run_on(
    store: &Store,
    db: &Db,
    common: &Common,
    table: &str,
    cmd: OutboxCommand,
) -> Result<ExitCode, CliError> {
    let err = |e: StoreError| db.err("outbox", &e);
    let json = common.json;
    let selected = |select: &ParkedArgs| {
        let select = select.clone();
        async move {
            let rows = store.parked().await.map_err(err)?;
            let mut out: Vec<ParkedRow> = rows.into_iter().filter(|r| select.matches(r)).collect();
            out.truncate(select.limit.unwrap_or(usize::MAX));
            Ok::<_, CliError>(out)
        }
    };
    match cmd {
        OutboxCommand::Status => {
            let s = store.status().await.map_err(err)?;
            let age = s.oldest_pending_age.map(|d| d.as_secs_f64());
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "table": table,
                        "pending": s.pending,
                        "parked": s.parked,
                        "oldest_pending_age_seconds": age,
                    })
                );
            } else {
                println!("outbox `{table}`");
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
        OutboxCommand::Parked { select } => {
            let rows = selected(&select).await?;
            if json {
                let v: Vec<_> = rows.iter().map(row_json).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!("{} parked row(s) in `{table}`", rows.len());
                for r in &rows {
                    println!("{}  {}  {} attempt(s)", r.id, r.name, r.attempts);
                    println!("    last error: {}", r.error);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        OutboxCommand::RetryParked { select, dry_run } => {
            act(
                store,
                db,
                common,
                table,
                &select,
                dry_run,
                "retry-parked",
                false,
            )
            .await
        }
        OutboxCommand::DeleteParked {
            select,
            dry_run,
            yes,
        } => {
            if !dry_run && !yes {
                super::dlq::refuse_without_terminal()?;
                let n = selected(&select).await?.len();
                if n == 0 {
                    println!("no parked row of `{table}` matches; nothing to delete");
                    return Ok(ExitCode::SUCCESS);
                }
                confirm(&format!(
                    "delete {n} parked row(s) of `{table}` for good? [y/N] "
                ))
                .await?;
            }
            act(
                store,
                db,
                common,
                table,
                &select,
                dry_run,
                "delete-parked",
                true,
            )
            .await
        }
    }
}

fn row_json(r: &ParkedRow) -> serde_json::Value {
    serde_json::json!({
        "id": r.id.to_string(),
        "name": r.name,
        "attempts": r.attempts,
        "error": r.error,
    })
}

/// Retries or deletes the selected parked rows, recorded in the audit trail. Ids given
/// with --id that are not parked are reported and make the exit code non-zero.
#[allow(clippy::too_many_arguments)]
async fn act(
    store: &Store,
    db: &Db,
    common: &Common,
    table: &str,
    select: &ParkedArgs,
    dry_run: bool,
    action: &str,
    delete: bool,
) -> Result<ExitCode, CliError> {
    let err = |e: StoreError| db.err("outbox", &e);
    let mut rows: Vec<ParkedRow> = store
        .parked()
        .await
        .map_err(err)?
        .into_iter()
        .filter(|r| select.matches(r))
        .collect();
    rows.truncate(select.limit.unwrap_or(usize::MAX));
    let not_parked: Vec<MessageId> = select
        .ids
        .iter()
        .filter(|id| !rows.iter().any(|r| r.id == **id))
        .copied()
        .collect();
    if dry_run {
        if common.json {
            println!(
                "{}",
                serde_json::json!({
                    "dry_run": true,
                    "action": action,
                    "table": table,
                    "count": rows.len(),
                    "ids": rows.iter().map(|r| r.id.to_string()).collect::<Vec<_>>(),
                    "not_parked": not_parked.iter().map(ToString::to_string).collect::<Vec<_>>(),
                })
            );
        } else {
            println!(
                "dry run: would {action} {} parked row(s) of `{table}`; nothing changed",
                rows.len()
            );
            for r in &rows {
                println!("  {}  {}  {}", r.id, r.name, r.error);
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let audit = audit::begin(
        &common.db,
        action,
        &format!("outbox:{table}"),
        select.json(),
    )
    .await?;
    let mut done = Vec::new();
    let mut missed = not_parked;
    let mut failure = None;
    for r in &rows {
        let ok = if delete {
            store.delete_parked(db, r.id).await
        } else {
            store.requeue(r.id).await.map_err(err)
        };
        match ok {
            Ok(true) => done.push(r.id),
            Ok(false) => missed.push(r.id),
            Err(e) => {
                failure = Some(e.to_string());
                break;
            }
        }
    }
    audit
        .finish(
            &done,
            serde_json::json!({
                "done": done.len(),
                "not_parked": missed.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "error": failure,
            }),
        )
        .await?;
    if let Some(f) = failure {
        return Err(CliError(f));
    }
    let verb = if delete { "deleted" } else { "requeued" };
    if common.json {
        println!(
            "{}",
            serde_json::json!({
                "action": action,
                "table": table,
                "done": done.len(),
                "ids": done.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "not_parked": missed.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })
        );
    } else {
        println!("{verb} {} parked row(s) of `{table}`", done.len());
        for id in &missed {
            println!("not parked (unknown, pending or sent): {id}");
        }
    }
    Ok(if missed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
