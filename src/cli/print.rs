//! What the dead-letter commands print: summaries, failure groups and messages, as text
//! or JSON, with secret headers shown as `***`.

use crate::{
    envelope::header,
    transport::{DeadLetter, normalise_reason},
};
use std::{collections::BTreeMap, fmt::Write as _, time::SystemTime};

/// Counts for `dlq list`.
#[derive(Debug, Default)]
pub(super) struct Summary {
    pub(super) total: usize,
    by_reason: BTreeMap<String, usize>,
    by_name: BTreeMap<String, usize>,
    by_kind: BTreeMap<String, usize>,
    oldest: Option<(SystemTime, String)>,
    newest: Option<(SystemTime, String)>,
}

impl Summary {
    #[cfg(test)]
    fn of(all: &[DeadLetter]) -> Self {
        let mut s = Summary::default();
        for d in all {
            s.add(d);
        }
        s
    }

    pub(super) fn add(&mut self, d: &DeadLetter) {
        let s = self;
        s.total += 1;
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

    pub(super) fn text(&self, group: &str) -> String {
        let mut out = format!("{} dead letter(s) in group `{group}`\n", self.total);
        if let (Some(o), Some(n)) = (&self.oldest, &self.newest) {
            let _ = writeln!(out, "oldest failed at {}, newest at {}", o.1, n.1);
        }
        out.push_str(&self.breakdown());
        out
    }

    pub(super) fn breakdown(&self) -> String {
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

    pub(super) fn json(&self, group: &str) -> serde_json::Value {
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
pub(super) fn is_secret_header(k: &str) -> bool {
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
pub(super) fn body_text(bytes: &[u8]) -> String {
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

pub(super) fn show_text(d: &DeadLetter) -> String {
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

pub(super) fn show_json(d: &DeadLetter) -> serde_json::Value {
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

/// Dead letters that failed the same way (see [`DeadLetter::fingerprint`]).
#[derive(Debug)]
pub(super) struct FailureGroup {
    pub(super) fingerprint: String,
    pub(super) count: usize,
    kind: String,
    name: String,
    reason: String,
    example: String,
    first: Option<(SystemTime, String)>,
    last: Option<(SystemTime, String)>,
}

/// The failure groups of `all`, largest first.
#[derive(Debug, Default)]
pub(super) struct Groups(BTreeMap<String, FailureGroup>);

impl Groups {
    pub(super) fn add(&mut self, d: &DeadLetter) {
        let fp = d.fingerprint();
        let g = self.0.entry(fp.clone()).or_insert_with(|| FailureGroup {
            fingerprint: fp,
            count: 0,
            kind: d
                .kind
                .map_or("unknown".to_owned(), |k| k.as_str().to_owned()),
            name: d.envelope.name.clone(),
            reason: normalise_reason(&d.reason),
            example: first_line(&d.reason),
            first: None,
            last: None,
        });
        g.count += 1;
        if let Some(t) = d.failed_at_time() {
            if g.first.as_ref().is_none_or(|(o, _)| t < *o) {
                g.first = Some((t, d.failed_at.clone()));
            }
            if g.last.as_ref().is_none_or(|(n, _)| t > *n) {
                g.last = Some((t, d.failed_at.clone()));
            }
        }
    }

    pub(super) fn sorted(&self) -> Vec<&FailureGroup> {
        let mut v: Vec<_> = self.0.values().collect();
        v.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then(a.fingerprint.cmp(&b.fingerprint))
        });
        v
    }

    pub(super) fn text(&self, group: &str) -> String {
        let total: usize = self.0.values().map(|g| g.count).sum();
        let mut out = format!(
            "{} failure group(s), {total} dead letter(s) in group `{group}`\n",
            self.0.len()
        );
        for g in self.sorted() {
            let _ = writeln!(
                out,
                "\n{}  {:>8}  {} {} ({})",
                g.fingerprint, g.count, g.kind, g.name, g.reason
            );
            let _ = writeln!(out, "  e.g. {}", g.example);
            if let (Some(f), Some(l)) = (&g.first, &g.last) {
                let _ = writeln!(out, "  first failed at {}, last at {}", f.1, l.1);
            }
        }
        out
    }

    pub(super) fn json(&self, group: &str) -> serde_json::Value {
        let groups: Vec<_> = self
            .sorted()
            .into_iter()
            .map(|g| {
                serde_json::json!({
                    "fingerprint": g.fingerprint,
                    "count": g.count,
                    "kind": g.kind,
                    "name": g.name,
                    "reason": g.reason,
                    "example": g.example,
                    "first_failed_at": g.first.as_ref().map(|f| &f.1),
                    "last_failed_at": g.last.as_ref().map(|l| &l.1),
                })
            })
            .collect();
        serde_json::json!({ "group": group, "groups": groups })
    }
}
#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::{Envelope, ErrorKind};

    pub(in crate::cli) fn dl(name: &str, reason: &str, at: &str) -> DeadLetter {
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
}
