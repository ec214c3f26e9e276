//! The AMQP mapping of an envelope: CloudEvents binary mode (`cloudEvents:` headers),
//! `message_id` = envelope id, `type` = wire name, persistent delivery. Header values
//! of any AMQP type are read as text, never trusted as typed.

use super::{guard, topology::short};
use crate::{
    envelope::{Envelope, header},
    transport::TransportError,
};
use bytes::Bytes;
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use std::{borrow::Cow, fmt::Write as _, time::SystemTime};

/// The CloudEvents AMQP binding's header prefix.
pub(super) const PREFIX: &str = "cloudEvents:";

/// Persistent delivery mode.
pub(super) const PERSISTENT: u8 = 2;

pub(super) fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// The properties a published envelope carries.
pub(super) fn properties(env: &Envelope) -> Result<BasicProperties, TransportError> {
    let mut headers = FieldTable::default();
    let mut bad: Option<String> = None;
    env.write_wire(PREFIX, |k, v| match ShortString::try_new(k.into_owned()) {
        Ok(k) => {
            headers.insert(k, text(&v));
        }
        Err(_) => bad = Some("a header name is longer than 255 bytes".to_owned()),
    });
    if let Some(b) = bad {
        return Err(TransportError::new(
            crate::transport::TransportErrorKind::Config,
            b,
        ));
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(BasicProperties::default()
        .with_message_id(env.id.to_string().into())
        .with_type(short("the message name", env.name.clone())?)
        .with_content_type(header::CONTENT_TYPE_JSON.into())
        .with_delivery_mode(PERSISTENT)
        .with_timestamp(now)
        .with_headers(headers))
}

/// Reads the envelope of a delivery; the second value is what is wrong with it: first
/// what the frame guard had to change to read it safely (see `guard`), then what
/// [`Envelope::read_wire`] finds.
pub(super) fn envelope(props: &BasicProperties, body: Vec<u8>) -> (Envelope, Option<String>) {
    let empty = FieldTable::default();
    let table = props.headers().as_ref().unwrap_or(&empty);
    let guarded = table
        .inner()
        .get(guard::DEFECT)
        .map(|v| value_text(v).into_owned());
    let (env, defect) = Envelope::read_wire(
        PREFIX,
        table
            .inner()
            .iter()
            .map(|(k, v)| (k.as_str(), value_text(v))),
        props.message_id().as_ref().map(ShortString::as_str),
        props.kind().as_ref().map(ShortString::as_str),
        Bytes::from(body),
    );
    (env, guarded.or(defect))
}

/// Any AMQP value as text: strings as they are (invalid UTF-8 replaced), numbers and
/// booleans in decimal, arrays and tables as JSON-like text.
pub(super) fn value_text(v: &AMQPValue) -> Cow<'_, str> {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()),
        AMQPValue::ShortString(s) => Cow::Borrowed(s.as_str()),
        _ => {
            let mut out = String::new();
            write_value(&mut out, v, 0);
            Cow::Owned(out)
        }
    }
}

fn write_value(out: &mut String, v: &AMQPValue, depth: usize) {
    if depth > 8 {
        out.push_str("...");
        return;
    }
    let _ = match v {
        AMQPValue::Boolean(b) => write!(out, "{b}"),
        AMQPValue::ShortShortInt(n) => write!(out, "{n}"),
        AMQPValue::ShortShortUInt(n) => write!(out, "{n}"),
        AMQPValue::ShortInt(n) => write!(out, "{n}"),
        AMQPValue::ShortUInt(n) => write!(out, "{n}"),
        AMQPValue::LongInt(n) => write!(out, "{n}"),
        AMQPValue::LongUInt(n) => write!(out, "{n}"),
        AMQPValue::LongLongInt(n) => write!(out, "{n}"),
        AMQPValue::Float(n) => write!(out, "{n}"),
        AMQPValue::Double(n) => write!(out, "{n}"),
        AMQPValue::DecimalValue(d) => write!(out, "{}e-{}", d.value, d.scale),
        AMQPValue::Timestamp(t) => write!(out, "{t}"),
        AMQPValue::ShortString(s) => write!(out, "{:?}", s.as_str()),
        AMQPValue::LongString(s) => write!(out, "{:?}", String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::ByteArray(b) => {
            for byte in b.as_slice() {
                let _ = write!(out, "{byte:02x}");
            }
            Ok(())
        }
        AMQPValue::Void => Ok(()),
        AMQPValue::FieldArray(a) => {
            out.push('[');
            for (i, item) in a.as_slice().iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item, depth + 1);
            }
            out.push(']');
            Ok(())
        }
        AMQPValue::FieldTable(t) => {
            out.push('{');
            for (i, (k, item)) in t.inner().iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{:?}:", k.as_str());
                write_value(out, item, depth + 1);
            }
            out.push('}');
            Ok(())
        }
    };
}

/// The header in which a copy carries the crashes attributed to the message so far
/// (see `transport::crash`): RabbitMQ's `x-delivery-count` starts again at zero on a
/// copy, so a retried or deferred suspect would otherwise lose its crash count.
pub(super) const CRASHES: &str = "steadfast-crashes";

/// The header in which a suspect moved to the suspects queue keeps where it was first
/// delivered from (`exchange/routing key`), for its dead letter.
pub(super) const MOVED_FROM: &str = "steadfast-moved-from";

/// A header's value as text.
pub(super) fn header_text(props: &BasicProperties, name: &str) -> Option<String> {
    props
        .headers()
        .as_ref()?
        .inner()
        .iter()
        .find(|(k, _)| k.as_str().eq_ignore_ascii_case(name))
        .map(|(_, v)| value_text(v).into_owned())
}

fn header_number(props: &BasicProperties, name: &str) -> Option<u32> {
    props
        .headers()
        .as_ref()?
        .inner()
        .iter()
        .find(|(k, _)| k.as_str().eq_ignore_ascii_case(name))
        .and_then(|(_, v)| value_text(v).trim().parse::<u32>().ok())
}

/// How often the broker handed this copy out before without it being settled: quorum
/// queues' `x-delivery-count`, or `x-acquired-count` where the broker counts every
/// acquisition there (RabbitMQ 4.3 and later); the larger of the two.
pub(super) fn returned(props: &BasicProperties) -> u32 {
    let count = |name| header_number(props, name).unwrap_or(0);
    count("x-delivery-count").max(count("x-acquired-count"))
}

/// The crashes earlier copies carried in [`CRASHES`]; `Some` (perhaps 0) marks a copy
/// of a suspect, which stays one.
pub(super) fn crashes(props: &BasicProperties) -> Option<u32> {
    header_number(props, CRASHES)
}

/// Headers the broker writes, which a copy published by us must not carry (a text
/// `x-death` would confuse the broker's own dead-lettering).
pub(super) fn is_broker_header(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    k == "x-death"
        || k == "x-delivery-count"
        || k == "x-acquired-count"
        || k.starts_with("x-first-death-")
        || k.starts_with("x-last-death-")
}

/// The properties of a copy of a delivery: every original property and header kept (with
/// their original types), broker headers and any per-message TTL dropped, persistent,
/// the attempt header set to `attempt`, then `extra` headers added.
pub(super) fn copy_properties(
    original: &BasicProperties,
    attempt: u32,
    keep_broker_headers: bool,
    extra: impl IntoIterator<Item = (&'static str, String)>,
) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(t) = original.headers() {
        for (k, v) in t.inner() {
            if k.as_str().eq_ignore_ascii_case(header::ATTEMPT)
                || k.as_str().eq_ignore_ascii_case(CRASHES)
                || (!keep_broker_headers && is_broker_header(k.as_str()))
            {
                continue;
            }
            headers.insert(k.clone(), v.clone());
        }
    }
    headers.insert(header::ATTEMPT.into(), text(&attempt.to_string()));
    for (k, v) in extra {
        headers.insert(k.into(), text(&v));
    }
    // Rebuilt field by field: everything is kept but `expiration` (a per-message TTL would
    // fight the delay tier's) and `user_id` (the broker refuses one that is not the
    // publishing connection's user).
    let o = original;
    let mut p = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(PERSISTENT);
    if let Some(v) = o.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = o.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = o.priority() {
        p = p.with_priority(*v);
    }
    if let Some(v) = o.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = o.reply_to() {
        p = p.with_reply_to(v.clone());
    }
    if let Some(v) = o.message_id() {
        p = p.with_message_id(v.clone());
    }
    if let Some(v) = o.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = o.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = o.app_id() {
        p = p.with_app_id(v.clone());
    }
    if let Some(v) = o.cluster_id() {
        p = p.with_cluster_id(v.clone());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;

    #[test]
    fn envelope_round_trips_through_properties() {
        let env =
            Envelope::new("orders.placed", &b"{}"[..]).with_header("traceparent", "00-a-b-01");
        let props = properties(&env).unwrap();
        assert_eq!(props.delivery_mode(), &Some(PERSISTENT));
        let (back, defect) = envelope(&props, b"{}".to_vec());
        assert_eq!(defect, None);
        assert_eq!(back, env);
    }

    #[test]
    fn odd_header_types_become_text() {
        let mut t = FieldTable::default();
        t.insert("n".into(), AMQPValue::LongInt(-7));
        t.insert("b".into(), AMQPValue::Boolean(true));
        t.insert(
            "a".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString("x".into())])),
        );
        t.insert("bin".into(), AMQPValue::LongString(vec![0xff, b'a'].into()));
        t.insert(header::ATTEMPT.into(), AMQPValue::LongLongInt(2));
        t.insert("cloudEvents:id".into(), AMQPValue::LongLongInt(12345));
        let props = BasicProperties::default()
            .with_headers(t)
            .with_type("x".into());
        let (env, defect) = envelope(&props, Vec::new());
        assert!(defect.unwrap().contains("not a UUID"));
        assert_eq!(env.attempt, 2);
        assert_eq!(env.headers.get("n"), Some("-7"));
        assert_eq!(env.headers.get("b"), Some("true"));
        assert_eq!(env.headers.get("a"), Some(r#"["x"]"#));
        assert_eq!(env.headers.get("bin"), Some("\u{fffd}a"));
    }

    #[test]
    fn copies_drop_broker_headers_and_set_the_attempt() {
        let mut t = FieldTable::default();
        t.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::default()),
        );
        t.insert("x-delivery-count".into(), AMQPValue::LongInt(1));
        t.insert("Steadfast-Attempt".into(), text("999"));
        t.insert("user".into(), AMQPValue::LongInt(5));
        let props = BasicProperties::default()
            .with_headers(t)
            .with_expiration("100".into());
        let copy = copy_properties(&props, 3, false, [("extra", "1".to_owned())]);
        let h = copy.headers().as_ref().unwrap().inner();
        assert!(!h.contains_key("x-death") && !h.contains_key("x-delivery-count"));
        assert!(!h.contains_key("Steadfast-Attempt"));
        assert_eq!(h.get(header::ATTEMPT), Some(&text("3")));
        assert_eq!(h.get("user"), Some(&AMQPValue::LongInt(5)));
        assert_eq!(copy.expiration(), &None);
        assert_eq!(copy.delivery_mode(), &Some(PERSISTENT));
    }
}
