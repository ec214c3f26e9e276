//! NATS JetStream transport (feature `nats`, async-nats).
//!
//! One file-backed work stream captures `{prefix}.>`: a message named `orders.placed`
//! is published on `{prefix}.orders.placed` with `Nats-Msg-Id` = its id and the
//! CloudEvents attributes as `ce-*` headers. Each consumer group is a durable pull
//! consumer with explicit acks whose filter is the group's subjects. Retries and
//! deferrals are `Nak`s with a delay (the server holds the message); dead letters go to
//! a second stream, `{stream}_DLQ`, on `{prefix}-dlq.{group}`, and the original is
//! `Term`ed once the dead letter's PubAck arrived. A message that reaches the server's
//! delivery limit (a worker that crashes on it) is moved there by the
//! `MAX_DELIVERIES` advisory. See `docs/nats.md` for the tables and version notes.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use steadfast::transport::nats::NatsTransport;
//! let transport = NatsTransport::connect("nats://127.0.0.1:4222").await?;
//! # Ok(()) }
//! ```

mod advisory;
mod builder;
mod connection;
mod consume;
mod dead_letters;
mod publish;
mod settle;
mod suspects;
mod topology;
mod wire;

pub use builder::NatsBuilder;

use crate::{
    envelope::Envelope,
    transport::{
        DeadLetter, DeadLetterVisitor, DeliveryStream, Health, Subscription, Transport,
        TransportError, batch_failed,
    },
};
use connection::{Inner, err};
use futures::future::BoxFuture;
use std::{
    fmt,
    future::Future,
    sync::{Arc, atomic::Ordering},
};

/// A NATS JetStream transport. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct NatsTransport {
    inner: Arc<Inner>,
}

impl fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.inner.settings;
        f.debug_struct("NatsTransport")
            .field("url", &s.url_redacted)
            .field("prefix", &s.prefix)
            .field("stream", &s.stream)
            .field("server", &self.inner.server)
            .finish_non_exhaustive()
    }
}

impl NatsTransport {
    /// Connects to `url` (for example `nats://127.0.0.1:4222`) with the default
    /// subject prefix `steadfast` and stream `STEADFAST`.
    pub async fn connect(url: &str) -> Result<NatsTransport, TransportError> {
        Self::builder(url).connect().await
    }

    /// A builder for the subject prefix, stream, credentials and limits.
    pub fn builder(url: &str) -> NatsBuilder {
        NatsBuilder::new(url)
    }

    /// The work stream's name.
    pub fn stream_name(&self) -> &str {
        &self.inner.settings.stream
    }

    /// The dead-letter stream's name.
    pub fn dead_letter_stream_name(&self) -> &str {
        &self.inner.settings.dlq_stream
    }

    /// The subject a message name is published on.
    pub fn subject_for(&self, name: &str) -> String {
        self.inner.settings.subject(name)
    }

    /// The server's version string.
    pub fn server_version(&self) -> String {
        self.inner.client.server_info().version
    }

    /// The name of the server the connection is on at the moment; on a cluster it
    /// changes when the client moves to another node.
    pub fn server_name(&self) -> String {
        self.inner.client.server_info().server_name
    }
}

impl NatsTransport {
    /// `job`, run only while the transport is open.
    fn guarded<'a, T: Send + 'a>(
        &'a self,
        job: impl Future<Output = Result<T, TransportError>> + Send + 'a,
    ) -> BoxFuture<'a, Result<T, TransportError>> {
        Box::pin(async move {
            self.inner.check_open()?;
            job.await
        })
    }
}

impl Transport for NatsTransport {
    fn system(&self) -> &'static str {
        "nats"
    }

    fn destination(&self, _sub: &Subscription) -> String {
        self.stream_name().to_owned()
    }

    fn publish_destination(&self, name: &str) -> String {
        self.subject_for(name)
    }

    fn declare<'a>(&'a self, sub: &'a Subscription) -> BoxFuture<'a, Result<(), TransportError>> {
        self.guarded(async move { topology::ensure_group(&self.inner, sub).await.map(|_| ()) })
    }

    fn subscribe<'a>(
        &'a self,
        sub: &'a Subscription,
    ) -> BoxFuture<'a, Result<DeliveryStream, TransportError>> {
        self.guarded(consume::subscribe(self.inner.clone(), sub))
    }

    fn publish<'a>(&'a self, envelope: &'a Envelope) -> BoxFuture<'a, Result<(), TransportError>> {
        self.guarded(publish::publish(&self.inner, envelope))
    }

    fn publish_batch<'a>(
        &'a self,
        envelopes: &'a [Envelope],
    ) -> BoxFuture<'a, Vec<Result<(), TransportError>>> {
        Box::pin(async move {
            match self.inner.check_open() {
                Ok(()) => publish::publish_batch(&self.inner, envelopes).await,
                Err(e) => batch_failed(envelopes.len(), &e),
            }
        })
    }

    fn dead_letters<'a>(
        &'a self,
        group: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, TransportError>> {
        self.guarded(dead_letters::read(&self.inner, group, limit))
    }

    crate::transport::crash::suspect_methods!();

    crate::transport::dead_letter_settling!(
        /// Publishes each selected dead letter to its original subject (every group that
        /// takes the subject gets it again; their idempotency absorbs it) and deletes it from
        /// the dead-letter stream after the PubAck.
    );

    fn dead_letter_count<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<u64, TransportError>> {
        self.guarded(dead_letters::count(&self.inner, group))
    }

    fn scan_dead_letters<'a>(
        &'a self,
        group: &'a str,
        visit: &'a mut DeadLetterVisitor<'_>,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        self.guarded(dead_letters::scan(&self.inner, group, visit))
    }

    fn health(&self) -> Health {
        self.inner.health()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.inner.closed.swap(true, Ordering::AcqRel) {
                return;
            }
            let limit = self.inner.settings.op_timeout;
            let _ = tokio::time::timeout(limit, self.inner.client.flush()).await;
            let _ = tokio::time::timeout(limit, self.inner.client.drain()).await;
        })
    }
}
