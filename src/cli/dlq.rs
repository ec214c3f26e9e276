//! `steadfast dlq ...`: list, group, show, replay, purge and edit the dead letters of a
//! group. Every command takes every selector; replay, purge and edit are recorded in the
//! audit trail (`audit.rs`).

use super::{
    CliError, Common, audit,
    print::{self, Groups, Summary},
    progress::Progress,
};
use crate::{
    MessageId,
    envelope::header,
    transport::{DeadLetter, DeadLetterFilter, DeadLetterReport, Transport},
};
use clap::{Args, Subcommand};
use std::{
    io::{BufRead, IsTerminal, Write},
    process::ExitCode,
    sync::Mutex,
    time::SystemTime,
};

#[derive(Debug, Subcommand)]
pub(super) enum DlqCommand {
    /// How many dead letters GROUP has, by reason, message name and error kind.
    List {
        /// The consumer group.
        group: String,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Failure groups of GROUP: dead letters with the same error kind, message name and
    /// reason (numbers, ids and quoted values masked), with count, first and last failure.
    Groups {
        /// The consumer group.
        group: String,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Dead letters of GROUP in full: headers, reason, attempts, body (at most --limit,
    /// default 10; reading stops once there are enough).
    Show {
        /// The consumer group.
        group: String,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Puts the selected dead letters of GROUP back on its work queue (RabbitMQ) or
    /// original subject (NATS): id kept, attempt reset, removed after the broker confirmed.
    Replay {
        /// The consumer group.
        group: String,
        #[command(flatten)]
        filter: FilterArgs,
        /// List the ids that would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Deletes the selected dead letters of GROUP (asks first unless --yes).
    Purge {
        /// The consumer group.
        group: String,
        #[command(flatten)]
        filter: FilterArgs,
        /// List the ids that would be deleted; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not ask.
        #[arg(long, short)]
        yes: bool,
    },
    /// Corrects one dead letter's body or headers and sends it again with a new id whose
    /// `steadfast-replay-of` header names the original; the original is removed only
    /// after the broker confirmed the copy. Without --body or --header, opens $EDITOR.
    Edit(EditArgs),
    /// The audit trail: every replay, purge and edit, newest first.
    History(audit::HistoryArgs),
}

/// Which dead letters: every condition given must hold.
#[derive(Debug, Clone, Default, Args)]
pub(super) struct FilterArgs {
    /// Only this message id (repeatable).
    #[arg(long = "id")]
    ids: Vec<MessageId>,
    /// Only this failure group: its fingerprint from `dlq groups`, or the start of it
    /// (repeatable).
    #[arg(long = "group-id")]
    group_ids: Vec<String>,
    /// Only dead letters whose reason contains this text (case ignored).
    #[arg(long)]
    reason: Option<String>,
    /// Only messages with this name.
    #[arg(long)]
    name: Option<String>,
    /// Only dead letters that failed at or after this time: RFC 3339
    /// (`2026-11-23T01:00:00Z`) or a duration ago (`2h`, `30m`).
    #[arg(long, value_parser = parse_time)]
    since: Option<SystemTime>,
    /// Only dead letters that failed before this time (same forms as --since).
    #[arg(long, value_parser = parse_time)]
    until: Option<SystemTime>,
    /// At most this many.
    #[arg(long)]
    limit: Option<usize>,
}

impl FilterArgs {
    fn filter(&self) -> DeadLetterFilter {
        let mut f = DeadLetterFilter::default();
        f.ids.clone_from(&self.ids);
        f.fingerprints.clone_from(&self.group_ids);
        f.reason.clone_from(&self.reason);
        f.name.clone_from(&self.name);
        f.since = self.since;
        f.until = self.until;
        f.limit = self.limit;
        if !self.ids.is_empty() {
            // Ids are unique: once each is found, the rest need not be read.
            f.ids.sort_unstable();
            f.ids.dedup();
            f.limit = Some(f.limit.unwrap_or(usize::MAX).min(f.ids.len()));
        }
        f
    }

    /// The selection as recorded in the audit trail and printed by --json.
    fn json(&self) -> serde_json::Value {
        let time =
            |t: &Option<SystemTime>| t.map(|t| humantime::format_rfc3339_seconds(t).to_string());
        serde_json::json!({
            "ids": self.ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "group_ids": self.group_ids,
            "reason": self.reason,
            "name": self.name,
            "since": time(&self.since),
            "until": time(&self.until),
            "limit": self.limit,
        })
    }
}

/// `dlq edit`: what to change.
#[derive(Debug, Clone, Args)]
pub(super) struct EditArgs {
    /// The consumer group.
    pub(super) group: String,
    /// The dead letter to correct.
    #[arg(long)]
    pub(super) id: MessageId,
    /// The new body, from this file (`-` for standard input).
    #[arg(long)]
    pub(super) body: Option<std::path::PathBuf>,
    /// Sets a header: `name=value` (repeatable).
    #[arg(long = "header", value_parser = parse_header)]
    pub(super) headers: Vec<(String, String)>,
    /// Removes a header (repeatable).
    #[arg(long = "remove-header")]
    pub(super) remove_headers: Vec<String>,
    /// Show the corrected message; send nothing.
    #[arg(long)]
    pub(super) dry_run: bool,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("`{s}` is not `name=value`")),
    }
}

/// An RFC 3339 time, or a duration meaning that long ago.
fn parse_time(s: &str) -> Result<SystemTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    match humantime::parse_duration(s) {
        Ok(d) => SystemTime::now()
            .checked_sub(d)
            .ok_or_else(|| format!("`{s}` ago is before the epoch")),
        Err(_) => Err(format!(
            "`{s}` is neither an RFC 3339 time (2026-11-23T01:00:00Z) nor a duration (2h)"
        )),
    }
}

/// The selected dead letters of `group`, in order; reading stops at the filter's limit.
pub(super) async fn select(
    t: &dyn Transport,
    group: &str,
    f: &DeadLetterFilter,
    mut each: impl FnMut(DeadLetter) + Send,
) -> Result<(), CliError> {
    let mut n = 0usize;
    let mut visit = |d: DeadLetter| {
        if f.matches(&d) {
            n += 1;
            each(d);
        }
        f.wants_more(n)
    };
    if !f.wants_more(0) {
        return Ok(());
    }
    t.scan_dead_letters(group, &mut visit)
        .await
        .map_err(|e| CliError(format!("reading the dead letters of `{group}`: {e}")))
}

pub(super) async fn run(
    t: &dyn Transport,
    common: &Common,
    cmd: DlqCommand,
) -> Result<ExitCode, CliError> {
    let json = common.json;
    let depth = |group: String| async move {
        t.dead_letter_count(&group)
            .await
            .map_err(|e| CliError(format!("group `{group}`: {e}")))
    };
    match cmd {
        DlqCommand::List { group, filter } => {
            depth(group.clone()).await?;
            let mut s = Summary::default();
            select(t, &group, &filter.filter(), |d| s.add(&d)).await?;
            if json {
                println!("{}", s.json(&group));
            } else {
                print!("{}", s.text(&group));
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Groups { group, filter } => {
            depth(group.clone()).await?;
            let mut g = Groups::default();
            select(t, &group, &filter.filter(), |d| g.add(&d)).await?;
            if json {
                println!("{}", g.json(&group));
            } else {
                print!("{}", g.text(&group));
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Show { group, filter } => {
            depth(group.clone()).await?;
            let mut f = filter.filter();
            f.limit = Some(filter.limit.unwrap_or(10));
            let mut all = Vec::new();
            select(t, &group, &f, |d| all.push(d)).await?;
            if all.is_empty() && !filter.ids.is_empty() {
                return Err(CliError(format!(
                    "no dead letter of `{group}` has the id(s) given"
                )));
            }
            if json {
                let v: Vec<_> = all.iter().map(print::show_json).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                for d in &all {
                    println!("{}", print::show_text(d));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Replay {
            group,
            filter,
            dry_run,
        } => {
            let total = depth(group.clone()).await?;
            let f = filter.filter();
            if dry_run {
                return dry_run_report(t, &group, &f, "replay", json).await;
            }
            let audit = audit::begin(
                &common.db,
                "replay",
                &format!("{}:{group}", t.system()),
                filter.json(),
            )
            .await?;
            let (actor, audit_id) = (audit.actor().to_owned(), audit.id().to_string());
            let rewrite = move |d: &DeadLetter| {
                let mut e = d.replay_envelope();
                e.headers.insert(header::REPLAYED_BY, actor.as_str());
                e.headers.insert(header::AUDIT_ID, audit_id.as_str());
                e
            };
            let done = Mutex::new(Vec::new());
            let p = Progress::new("replayed", f.limit.map_or(total, |l| total.min(l as u64)));
            let tick = |d: &DeadLetter| {
                done.lock().unwrap_or_else(|e| e.into_inner()).push(d.id());
                p.tick();
            };
            let report = t.replay_dead_letters_as(&group, &f, &rewrite, &tick).await;
            p.done();
            let ids = done.into_inner().unwrap_or_else(|e| e.into_inner());
            audit.finish(&ids, outcome(&report)).await?;
            let report = report
                .map_err(|e| CliError(format!("replaying dead letters of `{group}`: {e}")))?;
            Ok(finish(&report, &ids, "replayed", &group, json))
        }
        DlqCommand::Purge {
            group,
            filter,
            dry_run,
            yes,
        } => {
            let total = depth(group.clone()).await?;
            let f = filter.filter();
            if dry_run {
                return dry_run_report(t, &group, &f, "purge", json).await;
            }
            if !yes {
                refuse_without_terminal()?;
                let mut n = 0usize;
                select(t, &group, &f, |_| n += 1).await?;
                if n == 0 {
                    println!("no dead letter of `{group}` matches; nothing to purge");
                    return Ok(ExitCode::SUCCESS);
                }
                confirm(&format!(
                    "delete {n} dead letter(s) of `{group}` for good? [y/N] "
                ))
                .await?;
            }
            let audit = audit::begin(
                &common.db,
                "purge",
                &format!("{}:{group}", t.system()),
                filter.json(),
            )
            .await?;
            let done = Mutex::new(Vec::new());
            let p = Progress::new("purged", f.limit.map_or(total, |l| total.min(l as u64)));
            let tick = |d: &DeadLetter| {
                done.lock().unwrap_or_else(|e| e.into_inner()).push(d.id());
                p.tick();
            };
            let report = t.purge_dead_letters(&group, &f, &tick).await;
            p.done();
            let ids = done.into_inner().unwrap_or_else(|e| e.into_inner());
            audit.finish(&ids, outcome(&report)).await?;
            let report =
                report.map_err(|e| CliError(format!("purging dead letters of `{group}`: {e}")))?;
            Ok(finish(&report, &ids, "purged", &group, json))
        }
        DlqCommand::Edit(e) => {
            depth(e.group.clone()).await?;
            super::edit::run(t, common, e).await
        }
        DlqCommand::History(_) => Err(CliError::new("history is served without a broker")),
    }
}

pub(super) fn outcome(
    r: &Result<DeadLetterReport, crate::transport::TransportError>,
) -> serde_json::Value {
    match r {
        Ok(r) => serde_json::json!({
            "scanned": r.scanned,
            "selected": r.selected,
            "done": r.done,
            "failed": r.failed,
            "first_error": r.first_error,
        }),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    }
}

async fn dry_run_report(
    t: &dyn Transport,
    group: &str,
    f: &DeadLetterFilter,
    verb: &str,
    json: bool,
) -> Result<ExitCode, CliError> {
    let mut ids = Vec::new();
    let mut s = Summary::default();
    select(t, group, f, |d| {
        ids.push(d.id());
        s.add(&d);
    })
    .await?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "dry_run": true,
                "action": verb,
                "group": group,
                "count": ids.len(),
                "ids": ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })
        );
    } else {
        println!(
            "dry run: would {verb} {} dead letter(s) of `{group}`; nothing changed",
            ids.len()
        );
        print!("{}", s.breakdown());
        println!("ids:");
        for id in &ids {
            println!("  {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Deleting needs --yes or a terminal to ask on.
pub(super) fn refuse_without_terminal() -> Result<(), CliError> {
    if std::io::stdin().is_terminal() {
        Ok(())
    } else {
        Err(CliError::new(
            "refusing to delete without confirmation: no terminal to ask on; pass --yes to delete",
        ))
    }
}

/// Asks on the terminal; refuses when there is none.
pub(super) async fn confirm(question: &str) -> Result<(), CliError> {
    refuse_without_terminal()?;
    let q = question.to_owned();
    let answer = tokio::task::spawn_blocking(move || {
        eprint!("{q}");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).map(|_| line)
    })
    .await
    .map_err(|e| CliError(format!("reading the answer: {e}")))?
    .map_err(|e| CliError(format!("reading the answer: {e}")))?;
    if matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        Ok(())
    } else {
        Err(CliError::new("not confirmed; nothing deleted"))
    }
}

fn finish(
    r: &DeadLetterReport,
    ids: &[MessageId],
    verb: &str,
    group: &str,
    json: bool,
) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "action": verb,
                "group": group,
                "scanned": r.scanned,
                "selected": r.selected,
                "done": r.done,
                "failed": r.failed,
                "first_error": r.first_error,
                "ids": ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })
        );
    } else {
        println!(
            "{verb} {} of {} selected dead letter(s) of `{group}` ({} looked at); {} failed",
            r.done, r.selected, r.scanned, r.failed
        );
        if let Some(e) = &r.first_error {
            println!("first failure: {e}");
        }
    }
    if r.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cli::print::tests::dl, transport::memory::MemoryTransport};

    #[test]
    fn filters_select_by_time_limit_and_group() {
        let all = [
            dl("a", "order 1 missing", "2026-11-23T01:00:00Z"),
            dl("a", "order 2 missing", "2026-11-23T03:00:00Z"),
            dl("b", "boom", "not a time"),
        ];
        let f = FilterArgs {
            since: Some(parse_time("2026-11-23T02:00:00Z").unwrap()),
            ..FilterArgs::default()
        }
        .filter();
        assert_eq!(all.iter().filter(|d| f.matches(d)).count(), 1);
        let f = FilterArgs {
            group_ids: vec![all[0].fingerprint()[..6].to_owned()],
            ..FilterArgs::default()
        }
        .filter();
        assert_eq!(all.iter().filter(|d| f.matches(d)).count(), 2);
        assert!(parse_time("90m").is_ok());
        assert!(parse_header("a=b=c").unwrap().1 == "b=c");
        assert!(parse_header("=x").is_err());
    }

    #[tokio::test]
    async fn select_stops_reading_at_the_limit() {
        let t = MemoryTransport::new();
        let f = DeadLetterFilter::default().limit(0);
        let mut n = 0;
        select(&t, "g", &f, |_| n += 1).await.unwrap();
        assert_eq!(n, 0);
    }
}
