//! The RabbitMQ transport (feature `amqp`, built on lapin).
//!
//! One connection per [`AmqpTransport`] (clones share it), with heartbeats, a
//! publisher-confirm channel for everything it publishes, and
//! [`consumer_channels`](AmqpBuilder::consumer_channels) channels (default 1) per
//! subscription. The topology it declares, how each [`Disposition`](crate::Disposition)
//! is carried out and how it recovers are described in `docs/rabbitmq.md`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), steadfast::transport::TransportError> {
//! use steadfast::transport::amqp::{AmqpTransport, QueueType};
//!
//! let transport = AmqpTransport::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
//!     .exchange("steadfast")
//!     .queue_prefix("")
//!     .queue_type(QueueType::Quorum)
//!     .connect()
//!     .await?;
//! assert!(transport.is_connected());
//! # Ok(()) }
//! ```

mod acks;
mod builder;
mod connection;
mod consume;
mod dead_letters;
mod guard;
mod publish;
mod settle;
mod suspects;
mod topology;
mod wire;

use super::{
    DeadLetter, DeadLetterVisitor, DeliveryStream, Health, Subscription, Transport, TransportError,
};
use crate::envelope::Envelope;
use futures::future::BoxFuture;
use std::{fmt, sync::Arc};

pub use builder::{
    AmqpBuilder, DEFAULT_CONSUMER_CHANNELS, DEFAULT_DELIVERY_LIMIT, DEFAULT_EXCHANGE, QueueType,
};

/// A RabbitMQ transport. Cheap to clone: clones share the connection.
///
/// `Debug` output and every error it returns leave the URL's password out.
#[derive(Clone)]
pub struct AmqpTransport {
    inner: Arc<connection::Inner>,
}

impl fmt::Debug for AmqpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpTransport")
            .field("url", &self.inner.redacted_url)
            .field("exchange", &self.inner.cfg.exchange)
            .field("queue_prefix", &self.inner.cfg.queue_prefix)
            .field("queue_type", &self.inner.cfg.queue_type)
            .field("health", &self.inner.health())
            .finish()
    }
}

impl AmqpTransport {
    /// Connects with the default settings (exchange `"steadfast"`, quorum queues, no
    /// prefix).
    pub async fn connect(url: &str) -> Result<AmqpTransport, TransportError> {
        Self::builder(url).connect().await
    }

    /// Starts configuring a transport for the broker at `url`
    /// (`amqp://user:password@host:5672/vhost`, or `amqps://`), or for the nodes of a
    /// cluster as a comma-separated list of such URLs (see [`AmqpBuilder::nodes`]; a comma
    /// in a password is written `%2C`).
    pub fn builder(url: impl Into<String>) -> AmqpBuilder {
        AmqpBuilder::new(url)
    }

    /// The URL, without its password, of the node the transport is connected to right
    /// now; `None` while it reconnects.
    pub fn connected_node(&self) -> Option<String> {
        self.inner.connected_node()
    }

    /// Whether the connection to the broker is up right now.
    pub fn is_connected(&self) -> bool {
        self.inner.health() == Health::Connected
    }

    /// Connected, reconnecting or closed (the same as [`Transport::health`], without
    /// importing the trait).
    pub fn health(&self) -> Health {
        self.inner.health()
    }

    /// The name of the work queue of `group` (with the prefix).
    pub fn queue_name(&self, group: &str) -> String {
        format!("{}{group}", self.inner.cfg.queue_prefix)
    }

    /// The name of the dead-letter queue of `group`.
    pub fn dead_letter_queue_name(&self, group: &str) -> String {
        topology::dlq_name(&self.queue_name(group))
    }

    /// The exchange messages are published to.
    pub fn exchange(&self) -> &str {
        &self.inner.cfg.exchange
    }
}

impl Transport for AmqpTransport {
    fn system(&self) -> &'static str {
        "rabbitmq"
    }

    fn destination(&self, sub: &Subscription) -> String {
        self.queue_name(&sub.group)
    }

    fn publish_destination(&self, _name: &str) -> String {
        self.inner.cfg.exchange.clone()
    }

    fn declare<'a>(&'a self, sub: &'a Subscription) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let topo = topology::GroupTopology::new(&self.inner.cfg, sub)?;
            let link = self.inner.link().await?;
            topology::declare(&self.inner, &link, &topo).await
        })
    }

    fn subscribe<'a>(
        &'a self,
        sub: &'a Subscription,
    ) -> BoxFuture<'a, Result<DeliveryStream, TransportError>> {
        Box::pin(consume::subscribe(self.inner.clone(), sub.clone()))
    }

    fn publish<'a>(&'a self, envelope: &'a Envelope) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(publish::publish(&self.inner, envelope))
    }

    fn publish_batch<'a>(
        &'a self,
        envelopes: &'a [Envelope],
    ) -> BoxFuture<'a, Vec<Result<(), TransportError>>> {
        Box::pin(publish::publish_batch(&self.inner, envelopes))
    }

    fn dead_letters<'a>(
        &'a self,
        group: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, TransportError>> {
        Box::pin(dead_letters::read(&self.inner, group, limit))
    }

    super::crash::suspect_methods!();

    super::dead_letter_settling!(
        /// Republishes each selected dead letter straight to `group`'s work queue (through
        /// the default exchange, so other groups bound to the name do not get it again) and
        /// acks it in the dead-letter queue after the broker confirmed the copy.
    );

    fn dead_letter_count<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<u64, TransportError>> {
        Box::pin(dead_letters::count(&self.inner, group))
    }

    fn scan_dead_letters<'a>(
        &'a self,
        group: &'a str,
        visit: &'a mut DeadLetterVisitor<'_>,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(dead_letters::scan(&self.inner, group, visit))
    }

    fn health(&self) -> Health {
        self.inner.health()
    }

    /// Stops intake, waits up to the operation timeout for deliveries already handed
    /// out to be settled or dropped, then closes the connection.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.inner.close())
    }
}
