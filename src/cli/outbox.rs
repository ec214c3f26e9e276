//! `steadfast outbox ...`: the state of a PostgreSQL, MySQL / MariaDB or SQLite outbox, its parked rows
//! with their errors, and putting them back in line or deleting them by selection, with
//! the same dry-run, JSON and audit rules as the dead-letter commands.

use super::{
    CliError, Common,
    audit::{self, Db},
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
    pub(super) ids: Vec<MessageId>,
    /// Only rows of messages with this name.
    #[arg(long)]
    pub(super) name: Option<String>,
    /// Only rows whose last error contains this text (case ignored).
    #[arg(long)]
    pub(super) error: Option<String>,
    /// At most this many.
    #[arg(long)]
    pub(super) limit: Option<usize>,
}

impl ParkedArgs {
    pub(super) fn matches(&self, r: &ParkedRow) -> bool {
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
    Pg(PostgresOutbox),
    Lite(SqliteOutbox),
    My(MySqlOutbox),
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
            ),
            Db::Lite(p) => Store::Lite(
                SqliteOutbox::new(p.clone())
                    .with_table(table)
                    .map_err(bad_table)?,
            ),
            Db::My(p, _) => Store::My(
                MySqlOutbox::new(p.clone())
                    .with_table(table)
                    .map_err(bad_table)?,
            ),
        })
    }

    async fn status(&self) -> Result<OutboxStatus, StoreError> {
        match self {
            Store::Pg(o) => o.status().await,
            Store::Lite(o) => o.status().await,
            Store::My(o) => o.status().await,
        }
    }
    async fn parked(&self) -> Result<Vec<ParkedRow>, StoreError> {
        match self {
            Store::Pg(o) => o.parked(i64::MAX).await,
            Store::Lite(o) => o.parked(i64::MAX).await,
            Store::My(o) => o.parked(i64::MAX).await,
        }
    }
    async fn requeue(&self, id: MessageId) -> Result<bool, StoreError> {
        match self {
            Store::Pg(o) => o.requeue(id).await,
            Store::Lite(o) => o.requeue(id).await,
            Store::My(o) => o.requeue(id).await,
        }
    }
    /// Deletes a row if it is parked (never a pending or sent one).
    async fn delete_parked(&self, id: MessageId) -> Result<bool, StoreError> {
        match self {
            Store::Pg(o) => o.delete_parked(id).await,
            Store::Lite(o) => o.delete_parked(id).await,
            Store::My(o) => o.delete_parked(id).await,
        }
    }
}

/// The console's outbox in `table` of its database.
#[cfg(feature = "console")]
async fn console_store(db_args: &super::DbArgs, table: &str) -> Result<(Db, Store), CliError> {
    let Some(db) = audit::open_db(db_args).await? else {
        return Err(CliError::new(
            "no outbox database: start the console with --database-url or --sqlite",
        ));
    };
    match Store::open(&db, table) {
        Ok(store) => Ok((db, store)),
        Err(e) => {
            db.close().await;
            Err(e)
        }
    }
}

/// The outbox `table`'s status and parked rows (the console's outbox page).
#[cfg(feature = "console")]
pub(super) async fn overview(
    db_args: &super::DbArgs,
    table: &str,
) -> Result<(OutboxStatus, Vec<ParkedRow>), CliError> {
    let (db, store) = console_store(db_args, table).await?;
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

/// The console's retry or delete of parked rows: the rows `select` picks and the ids it
/// names that are not parked; with `action` (its name, and whether it deletes) also what
/// doing it did, recorded in the audit trail with `selection`.
#[cfg(feature = "console")]
pub(super) async fn console_act(
    db_args: &super::DbArgs,
    table: &str,
    select: &ParkedArgs,
    action: Option<(&str, bool)>,
    selection: serde_json::Value,
) -> Result<(Vec<ParkedRow>, Option<Done>), CliError> {
    let (db, store) = console_store(db_args, table).await?;
    let r = async {
        let picked = pick(&store, &db, select).await?;
        let Some(action) = action else {
            return Ok((picked.0, None));
        };
        let rows = picked.0.clone();
        let done = apply(&store, &db, db_args, table, action, selection, picked).await?;
        Ok((rows, Some(done)))
    }
    .await;
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
            let (rows, _) = pick(store, db, &select).await?;
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
                let n = pick(store, db, &select).await?.0.len();
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

/// The parked rows `select` picks, and the ids it names that are not parked.
async fn pick(
    store: &Store,
    db: &Db,
    select: &ParkedArgs,
) -> Result<(Vec<ParkedRow>, Vec<MessageId>), CliError> {
    let mut rows: Vec<ParkedRow> = store
        .parked()
        .await
        .map_err(|e| db.err("outbox", &e))?
        .into_iter()
        .filter(|r| select.matches(r))
        .collect();
    rows.truncate(select.limit.unwrap_or(usize::MAX));
    let not_parked = select
        .ids
        .iter()
        .filter(|id| !rows.iter().any(|r| r.id == **id))
        .copied()
        .collect();
    Ok((rows, not_parked))
}

/// What a retry or delete of parked rows did.
pub(super) struct Done {
    /// The rows requeued or deleted.
    pub(super) done: Vec<MessageId>,
    /// Ids selected that were not parked (unknown, pending or sent).
    pub(super) missed: Vec<MessageId>,
}

/// Requeues (or deletes, `delete`) `rows`, recorded in the audit trail of `audit_db` as
/// `action` with `selection`; `missed` are selected ids known not to be parked.
async fn apply(
    store: &Store,
    db: &Db,
    audit_db: &super::DbArgs,
    table: &str,
    (action, delete): (&str, bool),
    selection: serde_json::Value,
    (rows, missed): (Vec<ParkedRow>, Vec<MessageId>),
) -> Result<Done, CliError> {
    let audit = audit::begin(audit_db, action, &format!("outbox:{table}"), selection).await?;
    let mut done = Vec::new();
    let mut missed = missed;
    let mut failure = None;
    for r in &rows {
        let ok = if delete {
            store.delete_parked(r.id).await
        } else {
            store.requeue(r.id).await
        }
        .map_err(|e| db.err("outbox", &e));
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
    match failure {
        Some(f) => Err(CliError(f)),
        None => Ok(Done { done, missed }),
    }
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
    let (rows, not_parked) = pick(store, db, select).await?;
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
    let Done { done, missed } = apply(
        store,
        db,
        &common.db,
        table,
        (action, delete),
        select.json(),
        (rows, not_parked),
    )
    .await?;
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
