//! `steadfast dlq ...`: list, show, replay and purge the dead letters of a group.

use super::CliError;
use crate::{
    MessageId,
    envelope::header,
    transport::{DeadLetter, DeadLetterFilter, DeadLetterReport, Transport},
};
use clap::{Args, Subcommand};
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead, IsTerminal, Write},
    process::ExitCode,
    sync::atomic::{AtomicUsize, Ordering},
    time::SystemTime,
};

/// Test hook: after this many dead letters are done, the tool stops making progress
/// (without exiting) so a test can kill it mid-replay. Not for operators.
const STALL_ENV: &str = "STEADFAST_TEST_STALL_AFTER";

#[derive(Debug, Subcommand)]
pub(super) enum DlqCommand {
    /// How many dead letters GROUP has, by reason, message name and error kind.
    List {
        /// The consumer group.
        group: String,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Dead letters of GROUP in full: headers, reason, attempts, body.
    Show {
        /// The consumer group.
        group: String,
        /// Only the message with this id.
        #[arg(long)]
        id: Option<MessageId>,
        /// At most this many (default 10).
        #[arg(long, default_value_t = 10)]
        limit: usize,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Puts the selected dead letters of GROUP back on its work queue (RabbitMQ) or
    /// original subject (NATS): id kept, attempt reset, removed after the broker confirmed.
    Replay {
        /// The consumer group.
        group: String,
        #[command(flatten)]
        filter: FilterArgs,
        /// Show what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Deletes the selected dead letters of GROUP (asks first unless --yes).
    Purge {
        /// The consumer group.
        group: String,
        #[command(flatten)]
        filter: FilterArgs,
        /// Show what would be deleted; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not ask.
        #[arg(long, short)]
        yes: bool,
    },
}

/// Which dead letters: every condition given must hold.
#[derive(Debug, Clone, Args)]
pub(super) struct FilterArgs {
    /// Only this message id (repeatable).
    #[arg(long = "id")]
    ids: Vec<MessageId>,
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
        DeadLetterFilter {
            ids: self.ids.clone(),
            reason: self.reason.clone(),
            name: self.name.clone(),
            since: self.since,
            until: self.until,
            limit: self.limit,
        }
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

pub(super) async fn run(t: &dyn Transport, cmd: DlqCommand) -> Result<ExitCode, CliError> {
    let read_all = |group: &str| {
        let group = group.to_owned();
        async move {
            t.dead_letters(&group, usize::MAX)
                .await
                .map_err(|e| CliError(format!("reading the dead letters of `{group}`: {e}")))
        }
    };
    match cmd {
        DlqCommand::List { group, json } => {
            let all = read_all(&group).await?;
            let s = Summary::of(&all);
            if json {
                println!("{}", s.json(&group));
            } else {
                print!("{}", s.text(&group));
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Show {
            group,
            id,
            limit,
            json,
        } => {
            let mut all = read_all(&group).await?;
            if let Some(id) = id {
                all.retain(|d| d.id() == id);
                if all.is_empty() {
                    return Err(CliError(format!("no dead letter of `{group}` has id {id}")));
                }
            }
            all.truncate(limit);
            if json {
                let v: Vec<_> = all.iter().map(show_json).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                for d in &all {
                    println!("{}", show_text(d));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Replay {
            group,
            filter,
            dry_run,
        } => {
            let f = filter.filter();
            if dry_run {
                return dry_run_report(&read_all(&group).await?, &f, &group, "replay");
            }
            let p = Progress::new("replayed");
            let tick = |_: &DeadLetter| p.tick();
            let report = t.replay_dead_letters(&group, &f, &tick).await;
            p.done();
            let report = report
                .map_err(|e| CliError(format!("replaying dead letters of `{group}`: {e}")))?;
            Ok(finish(&report, "replayed", &group))
        }
        DlqCommand::Purge {
            group,
            filter,
            dry_run,
            yes,
        } => {
            let f = filter.filter();
            let all = read_all(&group).await?;
            if dry_run {
                return dry_run_report(&all, &f, &group, "purge");
            }
            let n = selected(&all, &f).len();
            if n == 0 {
                println!("no dead letter of `{group}` matches; nothing to purge");
                return Ok(ExitCode::SUCCESS);
            }
            if !yes {
                confirm(&format!(
                    "delete {n} dead letter(s) of `{group}` for good? [y/N] "
                ))
                .await?;
            }
            let p = Progress::new("purged");
            let tick = |_: &DeadLetter| p.tick();
            let report = t.purge_dead_letters(&group, &f, &tick).await;
            p.done();
            let report =
                report.map_err(|e| CliError(format!("purging dead letters of `{group}`: {e}")))?;
            Ok(finish(&report, "purged", &group))
        }
    }
}

fn selected<'a>(all: &'a [DeadLetter], f: &DeadLetterFilter) -> Vec<&'a DeadLetter> {
    all.iter()
        .filter(|d| f.matches(d))
        .take(f.limit.unwrap_or(usize::MAX))
        .collect()
}

fn dry_run_report(
    all: &[DeadLetter],
    f: &DeadLetterFilter,
    group: &str,
    verb: &str,
) -> Result<ExitCode, CliError> {
    let sel: Vec<DeadLetter> = selected(all, f).into_iter().cloned().collect();
    println!(
        "dry run: would {verb} {} of {} dead letter(s) of `{group}`; nothing changed",
        sel.len(),
        all.len()
    );
    print!("{}", Summary::of(&sel).breakdown());
    Ok(ExitCode::SUCCESS)
}

/// Asks on the terminal; refuses when there is none.
async fn confirm(question: &str) -> Result<(), CliError> {
    if !std::io::stdin().is_terminal() {
        return Err(CliError::new(
            "refusing to purge without confirmation: no terminal to ask on; pass --yes to delete",
        ));
    }
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

/// A progress line on stderr when stderr is a terminal.
struct Progress {
    verb: &'static str,
    tty: bool,
    stall_after: Option<usize>,
    count: AtomicUsize,
}

impl Progress {
    fn new(verb: &'static str) -> Self {
        Self {
            verb,
            tty: std::io::stderr().is_terminal(),
            stall_after: std::env::var(STALL_ENV).ok().and_then(|v| v.parse().ok()),
            count: AtomicUsize::new(0),
        }
    }

    fn tick(&self) {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        if self.tty && (n < 25 || n.is_multiple_of(25)) {
            eprint!("\r{} {n}", self.verb);
        }
        if self.stall_after == Some(n) {
            eprintln!("\nstalled after {n} ({STALL_ENV})");
            // Test hook only: block this thread for good, so a test can SIGKILL the
            // process with some dead letters done and others in flight.
            loop {
                std::thread::park();
            }
        }
    }

    fn done(&self) {
        if self.tty && self.count.load(Ordering::Relaxed) > 0 {
            eprintln!();
        }
    }
}

fn finish(r: &DeadLetterReport, verb: &str, group: &str) -> ExitCode {
    println!(
        "{verb} {} of {} selected dead letter(s) of `{group}` ({} looked at); {} failed",
        r.done, r.selected, r.scanned, r.failed
    );
    if let Some(e) = &r.first_error {
        println!("first failure: {e}");
    }
    if r.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Counts for `dlq list`.
#[derive(Debug, Default)]
struct Summary {
    total: usize,
    by_reason: BTreeMap<String, usize>,
    by_name: BTreeMap<String, usize>,
    by_kind: BTreeMap<String, usize>,
    oldest: Option<(SystemTime, String)>,
    newest: Option<(SystemTime, String)>,
}

impl Summary {
    fn of(all: &[DeadLetter]) -> Self {
        let mut s = Summary {
            total: all.len(),
            ..Summary::default()
        };
        for d in all {
            *s.by_reason.entry(first_line(&d.reason)).or_default() += 1;
            *s.by_name.entry(d.envelope.name.clone()).or_default() += 1;
            let kind = d
                .kind
                .map_or("unknown".to_owned(), |k| k.as_str().to_owned());
            *s.by_kind.entry(kind).or_default() += 1;
            if let Some(t) = d.failed_at_time() {
                if s.oldest.as_ref().is_none_or(|(o, _)| t < *o) {
                    s.oldest = Some((t, d.failed_at.clone()));
                }
                if s.newest.as_ref().is_none_or(|(n, _)| t > *n) {
                    s.newest = Some((t, d.failed_at.clone()));
                }
            }
        }
        s
    }

    fn text(&self, group: &str) -> String {
        let mut out = format!("{} dead letter(s) in group `{group}`\n", self.total);
        if let (Some(o), Some(n)) = (&self.oldest, &self.newest) {
            let _ = writeln!(out, "oldest failed at {}, newest at {}", o.1, n.1);
        }
        out.push_str(&self.breakdown());
        out
    }

    fn breakdown(&self) -> String {
        let mut out = String::new();
        for (title, map) in [
            ("by reason", &self.by_reason),
            ("by message name", &self.by_name),
            ("by error kind", &self.by_kind),
        ] {
            if map.is_empty() {
                continue;
            }
            let _ = writeln!(out, "{title}:");
            let mut rows: Vec<_> = map.iter().collect();
            rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            for (k, n) in rows {
                let _ = writeln!(out, "  {n:>8}  {k}");
            }
        }
        out
    }

    fn json(&self, group: &str) -> serde_json::Value {
        serde_json::json!({
            "group": group,
            "total": self.total,
            "oldest": self.oldest.as_ref().map(|o| &o.1),
            "newest": self.newest.as_ref().map(|n| &n.1),
            "by_reason": self.by_reason,
            "by_name": self.by_name,
            "by_kind": self.by_kind,
        })
    }
}

fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or_default();
    crate::envelope::truncate(line, 200).to_owned()
}

/// Header names whose values are shown as `***`.
fn is_secret_header(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    [
        "authorization",
        "password",
        "secret",
        "token",
        "cookie",
        "api-key",
        "apikey",
    ]
    .iter()
    .any(|s| k.contains(s))
}

fn headers_of(d: &DeadLetter) -> Vec<(String, String)> {
    d.envelope
        .headers
        .iter()
        .map(|(k, v)| {
            let v = if is_secret_header(k) { "***" } else { v };
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// The body as pretty JSON, or hex when it is not JSON.
fn body_text(bytes: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
        Err(_) => hex(bytes),
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for (i, chunk) in bytes.chunks(16).enumerate() {
        let _ = write!(out, "{:08x} ", i * 16);
        for b in chunk {
            let _ = write!(out, " {b:02x}");
        }
        out.push('\n');
    }
    out
}

fn show_text(d: &DeadLetter) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "id:                   {}", d.id());
    let _ = writeln!(out, "name:                 {}", d.envelope.name);
    let _ = writeln!(out, "reason:               {}", d.reason);
    let _ = writeln!(
        out,
        "error kind:           {}",
        d.kind.map_or("unknown", |k| k.as_str())
    );
    let _ = writeln!(out, "attempts:             {}", d.attempts);
    let _ = writeln!(out, "original destination: {}", d.original_destination);
    let _ = writeln!(out, "group:                {}", d.original_group);
    let _ = writeln!(out, "failed at:            {}", d.failed_at);
    if let Some(t) = &d.envelope.time {
        let _ = writeln!(out, "published at:         {t}");
    }
    if let Some(n) = d.envelope.headers.get(header::REPLAY_COUNT) {
        let _ = writeln!(out, "replayed before:      {n} time(s)");
    }
    let _ = writeln!(out, "headers:");
    for (k, v) in headers_of(d) {
        let _ = writeln!(out, "  {k}: {v}");
    }
    let _ = writeln!(out, "body ({} bytes):", d.envelope.payload.len());
    out.push_str(&body_text(&d.envelope.payload));
    out.push('\n');
    out
}

fn show_json(d: &DeadLetter) -> serde_json::Value {
    let body = match serde_json::from_slice::<serde_json::Value>(&d.envelope.payload) {
        Ok(v) => serde_json::json!({ "json": v }),
        Err(_) => serde_json::json!({ "hex": hex(&d.envelope.payload).replace('\n', " ") }),
    };
    serde_json::json!({
        "id": d.id().to_string(),
        "name": d.envelope.name,
        "reason": d.reason,
        "kind": d.kind.map(|k| k.as_str()),
        "attempts": d.attempts,
        "original_destination": d.original_destination,
        "group": d.original_group,
        "failed_at": d.failed_at,
        "headers": headers_of(d),
        "body": body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Envelope, ErrorKind};

    fn dl(name: &str, reason: &str, at: &str) -> DeadLetter {
        let mut e = Envelope::new(name, &b"{\"a\":1}"[..]);
        e.headers.insert(header::DEAD_LETTER_REASON, reason);
        e.headers
            .insert(header::ERROR_KIND, ErrorKind::Permanent.as_str());
        e.headers.insert(header::FAILED_AT, at);
        e.headers.insert("authorization", "Bearer s3cret");
        DeadLetter::from_envelope(e)
    }

    #[test]
    fn summary_counts_and_orders() {
        let all = vec![
            dl("a", "boom\nstack", "2026-11-23T01:00:00Z"),
            dl("a", "boom", "2026-11-23T03:00:00Z"),
            dl("b", "other", "2026-11-23T02:00:00Z"),
        ];
        let s = Summary::of(&all);
        assert_eq!(s.total, 3);
        assert_eq!(s.by_reason.get("boom"), Some(&2));
        assert_eq!(s.by_name.get("b"), Some(&1));
        assert_eq!(s.by_kind.get("permanent"), Some(&3));
        let j = s.json("g");
        assert_eq!(j["oldest"], "2026-11-23T01:00:00Z");
        assert_eq!(j["newest"], "2026-11-23T03:00:00Z");
        assert!(s.text("g").contains("3 dead letter(s) in group `g`"));
    }

    #[test]
    fn show_hides_secret_headers_and_formats_bodies() {
        let d = dl("a", "boom", "2026-11-23T01:00:00Z");
        let t = show_text(&d);
        assert!(!t.contains("s3cret"), "{t}");
        assert!(t.contains("\"a\": 1"), "{t}");
        assert!(body_text(&[0xff, 0x00]).contains("ff 00"));
    }

    #[test]
    fn filters_select_by_time_and_limit() {
        let all = vec![
            dl("a", "boom", "2026-11-23T01:00:00Z"),
            dl("a", "boom", "2026-11-23T03:00:00Z"),
            dl("b", "boom", "not a time"),
        ];
        let f = DeadLetterFilter {
            since: Some(parse_time("2026-11-23T02:00:00Z").unwrap()),
            ..DeadLetterFilter::default()
        };
        assert_eq!(selected(&all, &f).len(), 1);
        let f = DeadLetterFilter::default().reason("BOOM").limit(2);
        assert_eq!(selected(&all, &f).len(), 2);
        assert!(parse_time("90m").is_ok());
    }
}
