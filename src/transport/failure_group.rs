//! Failure groups: dead letters that failed the same way share a fingerprint of their
//! error kind, message name and normalised reason, so a thousand dead letters with a
//! thousand order numbers in their reasons are one line to read and one selection to
//! replay. See `docs/dead-letters.md`.

use super::DeadLetter;
use uuid::Uuid;

/// Namespace of the fingerprints (a UUIDv5 of the group's key, shortened).
const NAMESPACE: Uuid = Uuid::from_u128(0x5f0d_3c1e_9a4b_4c7e_8d21_6b0f_a9e3_7c55);

/// Longest normalised reason kept (the first line of the reason, masked).
const MAX_REASON: usize = 300;

/// The reason with what varies between messages masked: UUIDs become `<uuid>`, quoted
/// values `"<v>"`, numbers `<n>`, and any other word holding a digit (an order number,
/// a hex id) `<id>`. Only the first line counts (stack traces differ).
///
/// ```
/// use steadfast::transport::normalise_reason;
/// assert_eq!(
///     normalise_reason("order 4711 of 'ACME Ltd' not found (id 0191c1f4-8a2b-7c3d-9e4f-0123456789ab)\nat line 3"),
///     "order <n> of '<v>' not found (id <uuid>)"
/// );
/// assert_eq!(normalise_reason("timeout after 30.5s on db-7"), "timeout after <n>.<id> on db-<n>");
/// ```
pub fn normalise_reason(reason: &str) -> String {
    let line = reason.lines().next().unwrap_or_default().trim();
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::with_capacity(line.len().min(MAX_REASON));
    let mut i = 0;
    while i < chars.len() && out.len() < MAX_REASON {
        let c = chars[i];
        if is_uuid_at(&chars, i) {
            out.push_str("<uuid>");
            i += 36;
        } else if matches!(c, '\'' | '"' | '`')
            && let Some(end) = chars[i + 1..].iter().position(|&q| q == c)
        {
            out.push(c);
            out.push_str("<v>");
            out.push(c);
            i += end + 2;
        } else if c.is_alphanumeric() {
            let start = i;
            while i < chars.len() && chars[i].is_alphanumeric() {
                i += 1;
            }
            let word = &chars[start..i];
            if word.iter().all(char::is_ascii_digit) {
                out.push_str("<n>");
            } else if word.iter().any(char::is_ascii_digit) {
                out.push_str("<id>");
            } else {
                out.extend(word);
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn is_uuid_at(chars: &[char], i: usize) -> bool {
    let Some(s) = chars.get(i..i + 36) else {
        return false;
    };
    let boundary = |j: Option<&char>| j.is_none_or(|c| !c.is_ascii_alphanumeric());
    s.iter().enumerate().all(|(k, c)| {
        if matches!(k, 8 | 13 | 18 | 23) {
            *c == '-'
        } else {
            c.is_ascii_hexdigit()
        }
    }) && boundary(chars.get(i + 36))
        && (i == 0 || boundary(chars.get(i - 1)))
}

impl DeadLetter {
    /// The failure group's fingerprint: 12 hexadecimal characters derived from the
    /// error kind, the message name and the [normalised](normalise_reason) reason.
    /// Dead letters that failed the same way share it, across runs and machines.
    ///
    /// ```
    /// use steadfast::{Envelope, envelope::header, transport::DeadLetter};
    /// let dl = |reason: &str| {
    ///     let mut e = Envelope::new("orders.placed", &b"{}"[..]);
    ///     e.headers.insert(header::DEAD_LETTER_REASON, reason);
    ///     DeadLetter::from_envelope(e)
    /// };
    /// assert_eq!(dl("order 17 not found").fingerprint(), dl("order 4242 not found").fingerprint());
    /// assert_ne!(dl("order 17 not found").fingerprint(), dl("card declined").fingerprint());
    /// assert_eq!(dl("x").fingerprint().len(), 12);
    /// ```
    pub fn fingerprint(&self) -> String {
        let key = format!(
            "{}\n{}\n{}",
            self.kind.map_or("unknown", |k| k.as_str()),
            self.envelope.name,
            normalise_reason(&self.reason)
        );
        let mut s = Uuid::new_v5(&NAMESPACE, key.as_bytes())
            .simple()
            .to_string();
        s.truncate(12);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_what_varies_and_keeps_words() {
        assert_eq!(
            normalise_reason("card \"4111\" declined for user abc123 at 2026-11-23T01:00:00Z"),
            "card \"<v>\" declined for user <id> at <n>-<n>-<id>:<n>:<id>"
        );
        assert_eq!(
            normalise_reason("handler bug: cannot apply"),
            "handler bug: cannot apply"
        );
        assert_eq!(
            normalise_reason("an unclosed 'quote 12"),
            "an unclosed 'quote <n>"
        );
        assert_eq!(normalise_reason(""), "");
        let long = "word ".repeat(200);
        assert!(normalise_reason(&long).len() <= MAX_REASON + 5);
    }
}
