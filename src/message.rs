//! Messages: the typed values handlers receive, and how they name themselves on the wire.

use serde::{Serialize, de::DeserializeOwned};
use std::borrow::Cow;

/// A message type that steadfast can publish and route to a handler.
///
/// Implement it with `#[derive(Message)]`; the wire name is what routes a message to its
/// handler on every transport (the AMQP routing key, the NATS subject suffix, the
/// CloudEvents `type`).
///
/// ```
/// use steadfast::Message;
///
/// #[derive(serde::Serialize, serde::Deserialize, Message)]
/// #[message(name = "orders.placed")]
/// struct OrderPlaced {
///     #[message(key)]
///     order_id: u64,
///     total_cents: i64,
/// }
///
/// assert_eq!(OrderPlaced::NAME, "orders.placed");
/// let m = OrderPlaced { order_id: 7, total_cents: 1200 };
/// assert_eq!(m.idempotency_key().as_deref(), Some("7"));
/// ```
pub trait Message: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The wire name: dot-separated tokens of `[A-Za-z0-9_-]`, checked at compile time by
    /// the derive and again by [`validate_name`] when a worker is built.
    const NAME: &'static str;

    /// The idempotency key of this message, if one of its fields is marked
    /// `#[message(key)]`. `None` means "use the message id".
    fn idempotency_key(&self) -> Option<Cow<'_, str>> {
        None
    }

    /// The JSON Schema of the payload, for the AsyncAPI document
    /// (`steadfast::asyncapi`, feature `asyncapi`). `#[message(name = "...", schema)]`
    /// with `#[derive(schemars::JsonSchema)]` beside `Message` provides it; `None` means
    /// "any JSON".
    fn json_schema() -> Option<serde_json::Value> {
        None
    }
}

/// A field type that can serve as an idempotency key (`#[message(key)]`).
///
/// Implemented for strings, integers and UUIDs: values with one canonical text form.
/// Floats, collections and structs are deliberately not keys: two equal orders must not
/// produce two different keys.
pub trait MessageKey {
    /// The canonical text of the key.
    fn as_key(&self) -> Cow<'_, str>;
}

impl MessageKey for String {
    fn as_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

impl MessageKey for str {
    fn as_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

impl<T: MessageKey + ?Sized> MessageKey for &T {
    fn as_key(&self) -> Cow<'_, str> {
        (**self).as_key()
    }
}

impl MessageKey for uuid::Uuid {
    fn as_key(&self) -> Cow<'_, str> {
        Cow::Owned(self.to_string())
    }
}

macro_rules! int_keys {
    ($($t:ty),*) => {$(
        impl MessageKey for $t {
            fn as_key(&self) -> Cow<'_, str> {
                Cow::Owned(self.to_string())
            }
        }
    )*};
}
int_keys!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize
);

/// Checks that a message name is a valid AMQP routing key and NATS subject token list:
/// non-empty dot-separated tokens of ASCII letters, digits, `_` and `-`, at most 200 bytes.
///
/// ```
/// assert!(steadfast::message::validate_name("orders.placed").is_ok());
/// assert!(steadfast::message::validate_name("orders.*").is_err());
/// ```
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a message name cannot be empty".into());
    }
    if name.len() > 200 {
        return Err(format!("message name is {} bytes; at most 200", name.len()));
    }
    for token in name.split('.') {
        if token.is_empty() {
            return Err(format!(
                "message name `{name}` has an empty token (leading, trailing or double dot)"
            ));
        }
        if let Some(c) = token
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(format!(
                "message name `{name}` contains `{c}`; only ASCII letters, digits, `_`, `-` and `.` are allowed"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "orders.placed", "a-b_c.D9"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".a", "a.", "a..b", "a b", "a.*", "a.>", "a#", "é"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert!(validate_name(&"a".repeat(201)).is_err());
    }
}
