//! The envelope: a message as it travels, with its id, wire name, attempt and headers.
//!
//! One id everywhere: the CloudEvents `id` is the AMQP `message_id`, the NATS
//! `Nats-Msg-Id` and the `messaging.message.id` of traces. Headers follow CloudEvents
//! binary content mode: the transports write the attributes with their binding's prefix
//! (`cloudEvents:` on AMQP, `ce-` on NATS) through [`Envelope::write_wire`] and read them
//! back through [`Envelope::read_wire`].

use crate::message::Message;
use bytes::Bytes;
use std::{
    borrow::Cow,
    collections::{HashMap, hash_map::Entry},
    fmt,
    str::FromStr,
    time::SystemTime,
};
use uuid::Uuid;

/// Header names steadfast itself writes and reads, the same on every transport.
pub mod header {
    /// The framework's attempt counter (1 on the first delivery). Never `x-death`.
    pub const ATTEMPT: &str = "steadfast-attempt";
    /// Why a message was dead-lettered.
    pub const DEAD_LETTER_REASON: &str = "steadfast-dead-letter-reason";
    /// `transient`, `permanent` or `decode`.
    pub const ERROR_KIND: &str = "steadfast-error-kind";
    /// How many attempts were made before the message was dead-lettered.
    pub const ATTEMPTS: &str = "steadfast-attempts";
    /// When it was dead-lettered (RFC 3339, UTC).
    pub const FAILED_AT: &str = "steadfast-failed-at";
    /// Where it was consumed from (exchange/routing key, or subject).
    pub const ORIGINAL_DESTINATION: &str = "steadfast-original-destination";
    /// The consumer group (queue or durable consumer) that failed it.
    pub const ORIGINAL_GROUP: &str = "steadfast-original-group";
    /// When an operator last replayed the message from the dead letters (RFC 3339, UTC).
    pub const REPLAYED_AT: &str = "steadfast-replayed-at";
    /// How many times the message was replayed from the dead letters.
    pub const REPLAY_COUNT: &str = "steadfast-replay-count";
    /// The id a dead letter gets when the message had none (or one that is not a UUID),
    /// so that it can still be picked by id (`steadfast dlq show --id`).
    pub const DEAD_LETTER_ID: &str = "steadfast-dead-letter-id";
    /// On a dead letter corrected and sent again with a new id: the original's id.
    pub const REPLAY_OF: &str = "steadfast-replay-of";
    /// Who replayed or corrected the message (the operator tool's actor).
    pub const REPLAYED_BY: &str = "steadfast-replayed-by";
    /// The id of the audit record of the replay or correction that sent the message.
    pub const AUDIT_ID: &str = "steadfast-audit-id";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state.
    pub const TRACESTATE: &str = "tracestate";
    /// The CloudEvents spec version steadfast writes.
    pub const SPECVERSION: &str = "1.0";
    /// The content type of every payload steadfast encodes.
    pub const CONTENT_TYPE_JSON: &str = "application/json";
}

/// Limits on the headers of a delivery, checked in one linear pass as it is read. A
/// delivery over a limit is a defect: dead-lettered at once with a reason that names
/// the limit, its original bytes and headers kept in the dead letter.
pub mod limits {
    /// The most headers a delivery may carry (every name counts, the transport's and
    /// steadfast's own included).
    pub const MAX_HEADERS: usize = 1_000;
    /// The most bytes its header names and values may take together, as text.
    pub const MAX_HEADER_BYTES: usize = 64 * 1024;
    /// How deeply AMQP header tables and arrays may nest. RabbitMQ accepts any depth that
    /// fits its `frame_max`; deeper values are kept as raw bytes (see
    /// `docs/rabbitmq.md`). NATS headers are flat.
    pub const MAX_HEADER_DEPTH: usize = 64;
}

/// The id of a message: a UUID, version 7 for new messages.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(Uuid);

impl MessageId {
    /// A new time-ordered (v7) id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id of the `index`-th message published by the handler of message `parent`.
    ///
    /// Deterministic (UUID v5 in the parent's namespace), so when a handler is retried
    /// after a partial publish, its outgoing messages keep their ids and the broker's
    /// duplicate window and the consumers' idempotency absorb the re-send.
    pub fn derived(parent: MessageId, index: u32) -> Self {
        Self(Uuid::new_v5(&parent.0, &index.to_be_bytes()))
    }

    /// The nil id, used only for deliveries whose id header is missing or malformed.
    pub const fn nil() -> Self {
        Self(Uuid::nil())
    }

    /// The UUID.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<Uuid> for MessageId {
    fn from(u: Uuid) -> Self {
        Self(u)
    }
}

impl FromStr for MessageId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0.hyphenated())
    }
}

/// Headers other than the CloudEvents core attributes: trace context, the framework's
/// own `steadfast-*` headers and the user's. Small and ordered; keys are compared
/// ASCII-case-insensitively, since NATS and HTTP-style headers are.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// No headers.
    pub const fn new() -> Self {
        Self(Vec::new())
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// Headers from `pairs` in one linear pass: a later value of a name (compared
    /// ASCII-case-insensitively) replaces an earlier one in its place, as
    /// [`insert`](Self::insert) does.
    fn from_pairs(pairs: Vec<(String, String)>) -> Self {
        // A delivery's usual few headers (trace context, a handful of the user's): a
        // search per pair costs less than hashing a lowercased copy of every name. Past
        // that the index keeps the pass linear.
        const SEARCHED_UP_TO: usize = 16;
        if pairs.len() <= SEARCHED_UP_TO {
            let mut out: Vec<(String, String)> = Vec::with_capacity(pairs.len());
            for (k, v) in pairs {
                match out.iter_mut().find(|(o, _)| o.eq_ignore_ascii_case(&k)) {
                    Some(slot) => slot.1 = v,
                    None => out.push((k, v)),
                }
            }
            return Self(out);
        }
        let mut index: HashMap<String, usize> = HashMap::with_capacity(pairs.len());
        let mut out: Vec<(String, String)> = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            match index.entry(k.to_ascii_lowercase()) {
                Entry::Occupied(e) => out[*e.get()].1 = v,
                Entry::Vacant(e) => {
                    e.insert(out.len());
                    out.push((k, v));
                }
            }
        }
        Self(out)
    }

    /// Sets `key` to `value`, replacing an earlier value.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let key = key.into();
        let value = value.into();
        match self
            .0
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(&key))
        {
            Some(slot) => slot.1 = value,
            None => self.0.push((key, value)),
        }
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        let i = self
            .0
            .iter()
            .position(|(k, _)| k.eq_ignore_ascii_case(key))?;
        Some(self.0.remove(i).1)
    }

    /// All headers in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// How many headers there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| (k, v)))
            .finish()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Headers::from_pairs(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

/// A message as it travels: id, wire name, attempt, headers and payload bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Envelope {
    /// The message id (CloudEvents `id`).
    pub id: MessageId,
    /// The wire name (CloudEvents `type`), which routes it to a handler.
    pub name: String,
    /// CloudEvents `source`, when known.
    pub source: Option<String>,
    /// CloudEvents `time`: when it was first published (RFC 3339).
    pub time: Option<String>,
    /// Which attempt this delivery is; 1 on the first. Carried in
    /// [`header::ATTEMPT`], never taken from broker-specific redelivery headers.
    pub attempt: u32,
    /// Other headers.
    pub headers: Headers,
    /// The payload, JSON for messages steadfast encodes.
    pub payload: Bytes,
}

/// Encoding a message failed (serde could not serialize it).
#[derive(Debug, thiserror::Error)]
#[error("could not encode message `{name}`: {source}")]
pub struct EncodeError {
    name: &'static str,
    #[source]
    source: serde_json::Error,
}

impl Envelope {
    /// An envelope with a new id for raw bytes under a wire name.
    pub fn new(name: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            id: MessageId::new(),
            name: name.into(),
            source: None,
            time: Some(humantime::format_rfc3339_micros(SystemTime::now()).to_string()),
            attempt: 1,
            headers: Headers::new(),
            payload: payload.into(),
        }
    }

    /// Encodes a message as JSON into a new envelope.
    ///
    /// ```
    /// # use steadfast::{Envelope, Message};
    /// #[derive(serde::Serialize, serde::Deserialize, Message)]
    /// #[message(name = "greetings.sent")]
    /// struct Greeting { to: String }
    ///
    /// let env = Envelope::encode(&Greeting { to: "Ada".into() }).unwrap();
    /// assert_eq!(env.name, "greetings.sent");
    /// assert_eq!(&env.payload[..], br#"{"to":"Ada"}"#);
    /// assert_eq!(env.attempt, 1);
    /// ```
    pub fn encode<M: Message>(msg: &M) -> Result<Self, EncodeError> {
        let payload = serde_json::to_vec(msg).map_err(|source| EncodeError {
            name: M::NAME,
            source,
        })?;
        Ok(Self::new(M::NAME, payload))
    }

    /// Sets the id (builder style).
    #[must_use]
    pub fn with_id(mut self, id: MessageId) -> Self {
        self.id = id;
        self
    }

    /// Sets a header (builder style).
    #[must_use]
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key, value);
        self
    }

    /// Writes the envelope's headers for a transport whose CloudEvents binding uses
    /// `prefix` (`"cloudEvents:"` on AMQP, `"ce-"` on NATS): the CloudEvents attributes
    /// under the prefix, then the attempt, then every other header as it is. With the
    /// `otel` feature, an envelope without a `traceparent` also gets the current span's
    /// trace context (see [`otel`](crate::otel)'s module docs).
    pub fn write_wire(&self, prefix: &str, mut put: impl FnMut(Cow<'_, str>, Cow<'_, str>)) {
        let p = |attr: &str| Cow::Owned(format!("{prefix}{attr}"));
        put(p("specversion"), Cow::Borrowed(header::SPECVERSION));
        put(p("id"), Cow::Owned(self.id.to_string()));
        put(p("type"), Cow::Borrowed(&self.name));
        if let Some(s) = &self.source {
            put(p("source"), Cow::Borrowed(s));
        }
        if let Some(t) = &self.time {
            put(p("time"), Cow::Borrowed(t));
        }
        put(
            Cow::Borrowed(header::ATTEMPT),
            Cow::Owned(self.attempt.to_string()),
        );
        for (k, v) in self.headers.iter() {
            put(Cow::Borrowed(k), Cow::Borrowed(v));
        }
        #[cfg(feature = "otel")]
        if let Some(trace) = crate::otel::current_context(&self.headers) {
            for (k, v) in trace.iter() {
                put(Cow::Owned(k.to_owned()), Cow::Owned(v.to_owned()));
            }
        }
    }

    /// Reads an envelope from wire headers written by [`write_wire`](Self::write_wire)
    /// with the same `prefix`. `fallback_id` and `fallback_name` are the transport's own
    /// properties (AMQP `message_id`/`type`, NATS `Nats-Msg-Id`), used when the
    /// CloudEvents attribute is absent so plain producers interoperate.
    ///
    /// Always returns an envelope; the second value says what is wrong with it, if
    /// anything: more headers than [`limits::MAX_HEADERS`] or more header bytes than
    /// [`limits::MAX_HEADER_BYTES`], a missing or malformed id or type. Such deliveries
    /// are dead-lettered at once by the worker. The envelope keeps every header within
    /// the limits, and steadfast's own (`steadfast-*`) whatever their number; the
    /// transports keep the rest on the wire in the dead letter. One pass, linear in the
    /// number of headers. An attempt header that is not a number is not trusted and
    /// counts as attempt 1.
    pub fn read_wire<'a>(
        prefix: &str,
        headers: impl IntoIterator<Item = (&'a str, Cow<'a, str>)>,
        fallback_id: Option<&str>,
        fallback_name: Option<&str>,
        payload: Bytes,
    ) -> (Self, Option<String>) {
        let mut env = Self {
            id: MessageId::nil(),
            name: String::new(),
            source: None,
            time: None,
            attempt: 1,
            headers: Headers::new(),
            payload,
        };
        let mut id: Option<Cow<'a, str>> = None;
        let (mut count, mut bytes, mut kept_bytes) = (0usize, 0usize, 0usize);
        let mut kept: Vec<(String, String)> = Vec::new();
        for (k, v) in headers {
            count += 1;
            let size = k.len().saturating_add(v.len());
            bytes = bytes.saturating_add(size);
            let attr = k
                .get(..prefix.len())
                .filter(|p| p.eq_ignore_ascii_case(prefix))
                .map(|_| &k[prefix.len()..]);
            match attr {
                Some("id") => id = Some(v),
                Some("type") => env.name = v.into_owned(),
                Some("source") => env.source = Some(v.into_owned()),
                Some("time") => env.time = Some(v.into_owned()),
                Some("specversion") => {}
                _ if k.eq_ignore_ascii_case(header::ATTEMPT) => {
                    env.attempt = v
                        .trim()
                        .parse::<u32>()
                        .ok()
                        .filter(|a| *a >= 1)
                        .unwrap_or(1);
                }
                _ => {
                    let fits = kept.len() < limits::MAX_HEADERS
                        && kept_bytes.saturating_add(size) <= limits::MAX_HEADER_BYTES;
                    if fits || is_own_header(k) {
                        kept_bytes = kept_bytes.saturating_add(size);
                        kept.push((k.to_owned(), v.into_owned()));
                    }
                }
            }
        }
        env.headers = Headers::from_pairs(kept);
        if env.name.is_empty() {
            env.name = fallback_name.unwrap_or_default().to_owned();
        }
        let mut defect = if count > limits::MAX_HEADERS {
            Some(format!(
                "{count} header entries (limit {})",
                limits::MAX_HEADERS
            ))
        } else if bytes > limits::MAX_HEADER_BYTES {
            Some(format!(
                "{bytes} header bytes (limit {})",
                limits::MAX_HEADER_BYTES
            ))
        } else {
            None
        };
        match id.as_deref().or(fallback_id) {
            None => {
                defect.get_or_insert_with(|| "missing message id header".to_owned());
            }
            Some(raw) => match raw.parse::<MessageId>() {
                Ok(parsed) => env.id = parsed,
                Err(_) => {
                    defect.get_or_insert_with(|| {
                        format!("message id `{}` is not a UUID", truncate(raw, 64))
                    });
                }
            },
        }
        if env.name.is_empty() {
            defect.get_or_insert_with(|| "missing message type header".to_owned());
        }
        (env, defect)
    }
}

/// Whether `k` is one of steadfast's own headers (kept whatever the limits).
fn is_own_header(k: &str) -> bool {
    k.get(..10)
        .is_some_and(|p| p.eq_ignore_ascii_case("steadfast-"))
}

/// Shortens `s` to at most `max` bytes on a char boundary (for error texts).
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(prefix: &str, env: &Envelope) -> (Envelope, Option<String>) {
        let mut wire: Vec<(String, String)> = Vec::new();
        env.write_wire(prefix, |k, v| wire.push((k.into_owned(), v.into_owned())));
        Envelope::read_wire(
            prefix,
            wire.iter()
                .map(|(k, v)| (k.as_str(), Cow::Borrowed(v.as_str()))),
            None,
            None,
            env.payload.clone(),
        )
    }

    #[test]
    fn wire_round_trip_both_prefixes() {
        let mut env =
            Envelope::new("orders.placed", &b"{}"[..]).with_header("traceparent", "00-abc-def-01");
        env.attempt = 3;
        env.source = Some("/orders".into());
        for prefix in ["cloudEvents:", "ce-"] {
            let (back, defect) = round_trip(prefix, &env);
            assert_eq!(defect, None);
            assert_eq!(back, env);
        }
    }

    #[test]
    fn bad_headers_are_defects_not_panics() {
        let (env, defect) = Envelope::read_wire(
            "ce-",
            [("ce-type", Cow::Borrowed("a.b"))],
            None,
            None,
            Bytes::new(),
        );
        assert_eq!(defect.as_deref(), Some("missing message id header"));
        assert_eq!(env.name, "a.b");
        let (_, defect) = Envelope::read_wire(
            "ce-",
            [("ce-id", Cow::Borrowed("nope"))],
            None,
            None,
            Bytes::new(),
        );
        assert!(defect.unwrap().contains("not a UUID"));
        let id = MessageId::new().to_string();
        let (env, defect) = Envelope::read_wire(
            "ce-",
            [
                ("ce-id", Cow::Borrowed(id.as_str())),
                ("ce-type", Cow::Borrowed("x")),
                (header::ATTEMPT, Cow::Borrowed("-4")),
            ],
            None,
            None,
            Bytes::new(),
        );
        assert_eq!(defect, None);
        assert_eq!(env.attempt, 1, "a malformed attempt is not trusted");
    }

    #[test]
    fn header_limits_are_defects_and_own_headers_are_kept() {
        let id = MessageId::new().to_string();
        let many: Vec<(String, String)> = (0..10_000)
            .map(|i| (format!("h{i}"), "v".to_owned()))
            .chain([(header::DEAD_LETTER_REASON.to_owned(), "boom".to_owned())])
            .collect();
        let (env, defect) = Envelope::read_wire(
            "ce-",
            many.iter()
                .map(|(k, v)| (k.as_str(), Cow::Borrowed(v.as_str()))),
            Some(&id),
            Some("a.b"),
            Bytes::new(),
        );
        assert_eq!(defect.as_deref(), Some("10001 header entries (limit 1000)"));
        assert_eq!(env.headers.len(), limits::MAX_HEADERS + 1);
        assert_eq!(env.headers.get(header::DEAD_LETTER_REASON), Some("boom"));
        let big = "x".repeat(100 * 1024);
        let (env, defect) = Envelope::read_wire(
            "ce-",
            [
                ("big", Cow::Borrowed(big.as_str())),
                ("small", Cow::Borrowed("s")),
            ],
            Some(&id),
            Some("a.b"),
            Bytes::new(),
        );
        assert_eq!(defect.as_deref(), Some("102409 header bytes (limit 65536)"));
        assert_eq!(env.headers.get("big"), None, "over the limit: not read");
        assert_eq!(env.headers.get("small"), Some("s"));
    }

    #[test]
    fn headers_from_pairs_replace_case_insensitively() {
        let h: Headers = [("A", "1"), ("b", "2"), ("a", "3")].into_iter().collect();
        assert_eq!(h.iter().collect::<Vec<_>>(), [("A", "3"), ("b", "2")]);
    }

    #[test]
    fn fallbacks_let_plain_producers_in() {
        let id = MessageId::new().to_string();
        let (env, defect) =
            Envelope::read_wire("cloudEvents:", [], Some(&id), Some("a.b"), Bytes::new());
        assert_eq!(defect, None);
        assert_eq!(env.id.to_string(), id);
        assert_eq!(env.name, "a.b");
    }

    #[test]
    fn derived_ids_are_stable() {
        let p = MessageId::new();
        assert_eq!(MessageId::derived(p, 0), MessageId::derived(p, 0));
        assert_ne!(MessageId::derived(p, 0), MessageId::derived(p, 1));
    }
}
