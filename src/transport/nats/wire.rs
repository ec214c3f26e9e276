//! The wire mapping: an [`Envelope`] as a JetStream message's headers (CloudEvents
//! `ce-*` attributes, the attempt, the user's headers, `Nats-Msg-Id` = the id) and back.

use crate::envelope::Envelope;
use async_nats::HeaderMap;
use bytes::Bytes;
use std::borrow::Cow;

/// The header JetStream deduplicates on.
pub(super) const MSG_ID: &str = "Nats-Msg-Id";

/// The wire headers of `env`: CloudEvents `ce-*`, the attempt, the others, and
/// `Nats-Msg-Id` = the envelope id.
pub(super) fn wire_headers(env: &Envelope, dedup: bool) -> HeaderMap {
    let mut h = HeaderMap::new();
    env.write_wire("ce-", |k, v| h.insert(k.as_ref(), v.as_ref()));
    if dedup {
        h.insert(MSG_ID, env.id.to_string().as_str());
    }
    h
}

/// The envelope a message's headers and payload carry, and what is wrong with its
/// headers, if anything (see [`Envelope::read_wire`]). `fallback_name` is the name when
/// the headers carry none (the subject without its prefix).
pub(super) fn envelope(
    headers: Option<&HeaderMap>,
    fallback_name: Option<&str>,
    payload: Bytes,
) -> (Envelope, Option<String>) {
    let empty = HeaderMap::new();
    let headers = headers.unwrap_or(&empty);
    let (mut env, defect) = Envelope::read_wire(
        "ce-",
        pairs(headers),
        get(headers, MSG_ID),
        fallback_name,
        payload,
    );
    env.headers.remove(MSG_ID);
    (env, defect)
}

/// A header by name, ignoring ASCII case.
pub(super) fn get<'a>(h: &'a HeaderMap, key: &str) -> Option<&'a str> {
    h.iter()
        .find(|(k, _)| AsRef::<str>::as_ref(k).eq_ignore_ascii_case(key))
        .and_then(|(_, v)| v.first())
        .map(|v| v.as_str())
}

/// Every header value as `(name, value)` pairs for [`Envelope::read_wire`].
pub(super) fn pairs(h: &HeaderMap) -> impl Iterator<Item = (&str, Cow<'_, str>)> {
    h.iter().flat_map(|(k, vs)| {
        vs.iter()
            .map(move |v| (AsRef::<str>::as_ref(k), Cow::Borrowed(v.as_str())))
    })
}
