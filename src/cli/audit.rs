//! The audit trail: every replay, purge and edit (of dead letters and of parked outbox
//! rows) is recorded with who, when, what selection, which ids and the outcome. With a
//! database configured the record is a row of `steadfast_audit` (created when missing,
//! like the other steadfast tables), written as `started` before the operation and
//! completed after it, so an operation killed halfway still shows. Without one, the
//! record is a JSON log line on stderr (`audit: {...}`); replayed and corrected copies
//! carry the actor and the record's id in their headers either way.

use super::{CliError, Common, DbArgs};
use crate::{MessageId, config::WorkerConfig, redact, sql::Table};
use clap::Args;
use std::{process::ExitCode, time::Duration};

/// Every database call is bounded by this.
const DB_TIMEOUT: Duration = Duration::from_secs(15);

/// A database the tool opened: the outbox's and the audit trail's.
pub(super) enum Db {
    Pg(sqlx::PgPool, Option<String>),
    Lite(sqlx::SqlitePool),
    My(sqlx::MySqlPool, Option<String>),
}

impl Db {
    /// Error text with the connection's password scrubbed.
    pub(super) fn err(&self, what: &str, e: &dyn std::fmt::Display) -> CliError {
        let secret = match self {
            Db::Pg(_, s) | Db::My(_, s) => s.as_deref(),
            Db::Lite(_) => None,
        };
        CliError(redact::scrub(&format!("{what}: {e}"), secret))
    }

    pub(super) async fn close(&self) {
        match self {
            Db::Pg(p, _) => p.close().await,
            Db::Lite(p) => p.close().await,
            Db::My(p, _) => p.close().await,
        }
    }
}

/// Opens the configured database: `--sqlite`, else `--database-url`/`DATABASE_URL`,
/// else the worker's `STEADFAST_DATABASE_URL` (or its `_FILE`); `None` without any.
pub(super) async fn open_db(db: &DbArgs) -> Result<Option<Db>, CliError> {
    if let Some(path) = &db.sqlite {
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(false);
        let pool = bounded(
            "opening the SQLite database",
            sqlx::SqlitePool::connect_with(opts),
        )
        .await?
        .map_err(|e| {
            CliError(format!(
                "cannot open SQLite database `{}`: {e}",
                path.display()
            ))
        })?;
        return Ok(Some(Db::Lite(pool)));
    }
    let url = match &db.database_url {
        Some(u) if !u.is_empty() => u.clone(),
        _ => match WorkerConfig::database_url_from_lookup(|k| std::env::var(k).ok())
            .map_err(|e| CliError(e.to_string()))?
        {
            Some(u) => u.expose_secret().to_owned(),
            None => return Ok(None),
        },
    };
    let secret = redact::password(&url);
    let scrub =
        |e: crate::sql::StoreError| CliError(redact::scrub(&e.to_string(), secret.as_deref()));
    // MySQL / MariaDB by the URL's scheme; PostgreSQL otherwise.
    if url.starts_with("mysql:") || url.starts_with("mariadb:") {
        let pool = crate::idempotency::mysql::connect(&url)
            .await
            .map_err(scrub)?;
        return Ok(Some(Db::My(pool, secret)));
    }
    let pool = crate::idempotency::postgres::connect(&url)
        .await
        .map_err(scrub)?;
    Ok(Some(Db::Pg(pool, secret)))
}

pub(super) async fn bounded<T>(
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, CliError> {
    tokio::time::timeout(DB_TIMEOUT, fut).await.map_err(|_| {
        CliError(format!(
            "{what}: no answer within {}s",
            DB_TIMEOUT.as_secs()
        ))
    })
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS {table} (\
    id text PRIMARY KEY, \
    at text NOT NULL, \
    actor text NOT NULL, \
    action text NOT NULL, \
    target text NOT NULL, \
    selection text NOT NULL, \
    ids text NOT NULL, \
    outcome text NOT NULL)";
const INSERT: &str = "INSERT INTO {table} (id, at, actor, action, target, selection, ids, outcome) \
    VALUES ($1, $2, $3, $4, $5, $6, '[]', '\"started\"')";
const FINISH: &str = "UPDATE {table} SET ids = $1, outcome = $2 WHERE id = $3";
const HISTORY: &str = "SELECT id, at, actor, action, target, selection, ids, outcome FROM {table} \
    WHERE ($1 = '' OR target LIKE $2) ORDER BY at DESC, id DESC LIMIT $3";

/// The SQL of `template` for `db`'s table: SQLite numbers its parameters `?N`, MySQL's
/// are `?` in order (the templates use theirs in order) and its keys have a length.
fn sql(db: &Db, table: &Table, template: &str) -> String {
    let s = table.render(template);
    match db {
        Db::Pg(..) => s,
        Db::Lite(_) => s.replace('$', "?"),
        Db::My(..) => {
            let mut out = String::with_capacity(s.len());
            let mut chars = s.chars().peekable();
            while let Some(c) = chars.next() {
                if c == '$' {
                    out.push('?');
                    while chars.next_if(char::is_ascii_digit).is_some() {}
                } else {
                    out.push(c);
                }
            }
            out.replace("id text PRIMARY KEY", "id VARCHAR(64) PRIMARY KEY")
        }
    }
}

macro_rules! on_db {
    ($db:expr, $q:ident => $run:expr) => {
        match $db {
            Db::Pg(pool, _) => {
                let $q = pool;
                $run
            }
            Db::Lite(pool) => {
                let $q = pool;
                $run
            }
            Db::My(pool, _) => {
                let $q = pool;
                $run
            }
        }
    };
}

/// One operation's record, open until [`Audit::finish`].
pub(super) struct Audit {
    id: MessageId,
    actor: String,
    action: String,
    target: String,
    selection: serde_json::Value,
    store: Option<(Db, Table)>,
}

/// Who acts: `--actor`/`STEADFAST_ACTOR`, else `user@host`.
fn actor(db: &DbArgs) -> String {
    if let Some(a) = db.actor.as_ref().filter(|a| !a.trim().is_empty()) {
        return a.trim().to_owned();
    }
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("USERNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{user}@{host}")
}

async fn open_table(db: &Db, name: &str) -> Result<Table, CliError> {
    let table = Table::parse(name).map_err(|e| CliError(e.to_string()))?;
    let create = sql(db, &table, SCHEMA);
    on_db!(db, p => bounded("creating the audit table", sqlx::query(sqlx::AssertSqlSafe(create.clone())).execute(p))
        .await?
        .map(|_| ())
        .map_err(|e| db.err("creating the audit table", &e))?);
    Ok(table)
}

/// Starts the record of `action` on `target` (a broker and group, or an outbox table).
pub(super) async fn begin(
    db: &DbArgs,
    action: &str,
    target: &str,
    selection: serde_json::Value,
) -> Result<Audit, CliError> {
    let store = match open_db(db).await? {
        Some(d) => {
            let t = open_table(&d, &db.audit_table).await?;
            Some((d, t))
        }
        None => None,
    };
    let a = Audit {
        id: MessageId::new(),
        actor: actor(db),
        action: action.to_owned(),
        target: target.to_owned(),
        selection,
        store,
    };
    if let Some((d, t)) = &a.store {
        let q = sql(d, t, INSERT);
        let at = now();
        let sel = a.selection.to_string();
        let id = a.id.to_string();
        on_db!(d, p => bounded("writing the audit record", sqlx::query(sqlx::AssertSqlSafe(q.clone()))
            .bind(&id).bind(&at).bind(&a.actor).bind(&a.action).bind(&a.target).bind(&sel)
            .execute(p))
            .await?
            .map(|_| ())
            .map_err(|e| d.err("writing the audit record", &e))?);
    }
    Ok(a)
}

fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

impl Audit {
    pub(super) fn id(&self) -> MessageId {
        self.id
    }

    pub(super) fn actor(&self) -> &str {
        &self.actor
    }

    /// Completes the record with the ids done and the outcome.
    pub(super) async fn finish(
        self,
        ids: &[MessageId],
        outcome: serde_json::Value,
    ) -> Result<(), CliError> {
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        match &self.store {
            Some((d, t)) => {
                let q = sql(d, t, FINISH);
                let ids = serde_json::to_string(&ids).unwrap_or_default();
                let out = outcome.to_string();
                let id = self.id.to_string();
                let r = on_db!(d, p => bounded("completing the audit record", sqlx::query(sqlx::AssertSqlSafe(q.clone()))
                    .bind(&ids).bind(&out).bind(&id).execute(p))
                    .await
                    .map(|r| r.map(|_| ())));
                d.close().await;
                r?.map_err(|e| d.err("completing the audit record", &e))?;
            }
            None => {
                eprintln!(
                    "audit: {}",
                    serde_json::json!({
                        "id": self.id.to_string(),
                        "at": now(),
                        "actor": self.actor,
                        "action": self.action,
                        "target": self.target,
                        "selection": self.selection,
                        "ids": ids,
                        "outcome": outcome,
                    })
                );
            }
        }
        Ok(())
    }
}

/// `dlq history`: which records.
#[derive(Debug, Clone, Args)]
pub(super) struct HistoryArgs {
    /// Only records of this consumer group (or outbox table).
    group: Option<String>,
    /// At most this many, newest first.
    #[arg(long, default_value_t = 20)]
    limit: i64,
}

pub(super) type Row = (
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
);

/// The newest audit records of `group` (or all): id, at, actor, action, target,
/// selection, ids, outcome.
pub(super) async fn records(
    db_args: &DbArgs,
    group: Option<&str>,
    limit: i64,
) -> Result<Vec<Row>, CliError> {
    let Some(db) = open_db(db_args).await? else {
        return Err(CliError::new(
            "no audit database: pass --database-url or --sqlite (or set DATABASE_URL or STEADFAST_DATABASE_URL); without one, records are the `audit:` lines the tool printed and the headers of the copies it sent",
        ));
    };
    let table = open_table(&db, &db_args.audit_table).await?;
    let q = sql(&db, &table, HISTORY);
    let group = group.unwrap_or_default().to_owned();
    let like = format!("%:{group}");
    let rows: Result<Vec<Row>, sqlx::Error> = on_db!(&db, p => bounded("reading the audit trail", sqlx::query_as(sqlx::AssertSqlSafe(q.clone()))
        .bind(&group).bind(&like).bind(limit).fetch_all(p))
        .await?);
    db.close().await;
    rows.map_err(|e| db.err("reading the audit trail", &e))
}

/// Prints the newest audit records.
pub(super) async fn history(common: &Common, h: HistoryArgs) -> Result<ExitCode, CliError> {
    let rows = records(&common.db, h.group.as_deref(), h.limit).await?;
    let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or(s.into());
    if common.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(id, at, actor, action, target, sel, ids, out)| {
                serde_json::json!({
                    "id": id, "at": at, "actor": actor, "action": action, "target": target,
                    "selection": parse(sel), "ids": parse(ids), "outcome": parse(out),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
        for (id, at, actor, action, target, sel, ids, out) in &rows {
            let n = parse(ids).as_array().map_or(0, Vec::len);
            println!("{at}  {action:<8} {target}  by {actor}  ({n} id(s))  audit id {id}");
            println!("    selection: {sel}");
            println!("    outcome:   {out}");
        }
        if rows.is_empty() {
            println!("no audit records");
        }
    }
    Ok(ExitCode::SUCCESS)
}
