//! The context a handler receives beside its message.

use crate::{
    envelope::{EncodeError, Envelope, Headers, MessageId},
    message::Message,
};
use std::{
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

/// What a handler knows about the delivery it handles, and a publish-on-success buffer.
///
/// Cheap to clone; clones share the buffer.
///
/// ```
/// use steadfast::{Context, HandlerError, Message};
///
/// #[derive(serde::Serialize, serde::Deserialize, Message)]
/// #[message(name = "orders.placed")]
/// struct OrderPlaced { #[message(key)] order_id: u64 }
/// #[derive(serde::Serialize, serde::Deserialize, Message)]
/// #[message(name = "invoices.requested")]
/// struct InvoiceRequested { order_id: u64 }
///
/// async fn on_order(msg: OrderPlaced, cx: Context) -> Result<(), HandlerError> {
///     println!("attempt {} of message {}", cx.attempt(), cx.id());
///     // Sent only if this handler returns Ok, after it returned.
///     cx.publish(&InvoiceRequested { order_id: msg.order_id })?;
///     Ok(())
/// }
/// ```
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) envelope: Envelope,
    pub(crate) group: Arc<str>,
    /// The `#[message(key)]` value, or `None` for "the message id" (formatted lazily).
    pub(crate) key: Option<String>,
    pub(crate) id_text: std::sync::OnceLock<String>,
    pub(crate) outgoing: Mutex<Vec<Envelope>>,
    /// Set when the handler marked this delivery's key through an inbox store
    /// (`PostgresStore::mark`, `SqliteStore::mark`).
    pub(crate) marked: AtomicBool,
}

/// What the pipeline takes back from a context once the handler is done.
pub(crate) struct Finished {
    pub(crate) envelope: Envelope,
    pub(crate) key: Option<String>,
    pub(crate) outgoing: Vec<Envelope>,
    /// The handler marked the key in its own transaction.
    pub(crate) marked: bool,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("id", &self.inner.envelope.id)
            .field("name", &self.inner.envelope.name)
            .field("attempt", &self.inner.envelope.attempt)
            .field("group", &self.inner.group)
            .field("idempotency_key", &self.idempotency_key())
            .finish_non_exhaustive()
    }
}

impl Context {
    pub(crate) fn new(envelope: Envelope, group: Arc<str>, key: Option<String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                envelope,
                group,
                key,
                id_text: std::sync::OnceLock::new(),
                outgoing: Mutex::new(Vec::new()),
                marked: AtomicBool::new(false),
            }),
        }
    }

    /// Takes the envelope and the buffered messages back once the handler is done. If the
    /// handler kept a clone of the context alive, the envelope is copied.
    pub(crate) fn finish(self) -> Finished {
        match Arc::try_unwrap(self.inner) {
            Ok(inner) => Finished {
                envelope: inner.envelope,
                key: inner.key,
                outgoing: inner
                    .outgoing
                    .into_inner()
                    .unwrap_or_else(|p| p.into_inner()),
                marked: inner.marked.into_inner(),
            },
            Err(shared) => Finished {
                outgoing: std::mem::take(
                    &mut *shared.outgoing.lock().unwrap_or_else(|p| p.into_inner()),
                ),
                envelope: shared.envelope.clone(),
                key: shared.key.clone(),
                marked: shared.marked.load(Ordering::Acquire),
            },
        }
    }

    /// The fingerprint of the delivery's payload, kept with its inbox key.
    #[cfg_attr(
        not(any(feature = "postgres", feature = "sqlite", feature = "mysql")),
        allow(dead_code)
    )]
    pub(crate) fn payload_fingerprint(&self) -> crate::idempotency::Fingerprint {
        crate::idempotency::Fingerprint::of(&self.inner.envelope.payload)
    }

    /// Records that the handler marked this delivery's key through an inbox store: the
    /// key's `done` row then commits with the handler's own transaction.
    #[cfg_attr(
        not(any(feature = "postgres", feature = "sqlite", feature = "mysql")),
        allow(dead_code)
    )]
    pub(crate) fn note_marked(&self) {
        self.inner.marked.store(true, Ordering::Release);
    }

    /// A context for calling a handler directly in a unit test, outside any worker.
    pub fn for_test(envelope: Envelope, group: &str) -> Self {
        Self::new(envelope, Arc::from(group), None)
    }

    /// The message id.
    pub fn id(&self) -> MessageId {
        self.inner.envelope.id
    }

    /// The message's wire name.
    pub fn name(&self) -> &str {
        &self.inner.envelope.name
    }

    /// Which attempt this is (1 on the first delivery).
    pub fn attempt(&self) -> u32 {
        self.inner.envelope.attempt
    }

    /// The delivery's headers other than the CloudEvents attributes.
    pub fn headers(&self) -> &Headers {
        &self.inner.envelope.headers
    }

    /// The consumer group handling the message.
    pub fn group(&self) -> &str {
        &self.inner.group
    }

    /// The idempotency key: the `#[message(key)]` field, or the message id.
    pub fn idempotency_key(&self) -> &str {
        match &self.inner.key {
            Some(k) => k,
            None => self
                .inner
                .id_text
                .get_or_init(|| self.inner.envelope.id.to_string()),
        }
    }

    /// Buffers `msg` to be published if, and only if, this handler succeeds; the worker
    /// awaits the broker's confirmation before it acks the incoming message. Ids are
    /// derived from the incoming id, so a retried handler re-sends the same ids.
    pub fn publish<M: Message>(&self, msg: &M) -> Result<MessageId, EncodeError> {
        let env = Envelope::encode(msg)?;
        Ok(self.publish_envelope(env))
    }

    /// Buffers a ready-made envelope (its id is replaced by a derived one).
    pub fn publish_envelope(&self, mut env: Envelope) -> MessageId {
        let mut out = self
            .inner
            .outgoing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        env.id = MessageId::derived(self.inner.envelope.id, out.len() as u32);
        // The handler's span (a child of the `process` span) is the producer's context.
        #[cfg(feature = "otel")]
        crate::otel::inject_current(&mut env.headers);
        let id = env.id;
        out.push(env);
        id
    }
}
