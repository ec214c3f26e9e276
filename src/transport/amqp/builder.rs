//! The builder: the settings of an [`AmqpTransport`], checked before it connects.

use super::{AmqpTransport, connection};
use crate::{
    redact::redact_url,
    transport::{TransportError, TransportErrorKind},
};
use std::{fmt, sync::Arc, time::Duration};

/// The kind of queue the work queues (and, separately, the dead-letter queues) are.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// Replicated, durable quorum queues (the default and the safe choice): each has a
    /// copy on every node of the cluster (or on [`AmqpBuilder::initial_group_size`]
    /// nodes) and survives the loss of a minority of them; work queues enforce the
    /// delivery limit that stops crash loops, and dead-letter at least once.
    #[default]
    Quorum,
    /// Classic durable queues, an explicit opt-in: **not replicated** — one copy on one
    /// node, unavailable while that node is down and lost with its disk. Classic work
    /// queues have no delivery limit, so a message that crashes the worker every time is
    /// redelivered forever. Delay queues stay quorum queues either way.
    Classic,
}

/// The settings of an [`AmqpTransport`]; see [`AmqpTransport::builder`].
#[derive(Clone)]
pub struct AmqpBuilder {
    pub(super) urls: Vec<String>,
    pub(super) exchange: String,
    pub(super) queue_prefix: String,
    pub(super) queue_type: QueueType,
    pub(super) dlq_type: QueueType,
    pub(super) initial_group_size: Option<u32>,
    pub(super) delivery_limit: u32,
    pub(super) queue_expiry: Option<Duration>,
    pub(super) operation_timeout: Duration,
    pub(super) heartbeat: u16,
    pub(super) max_reconnect_delay: Duration,
    pub(super) consumer_channels: u16,
}

impl fmt::Debug for AmqpBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpBuilder")
            .field(
                "urls",
                &connection::split_nodes(&self.urls)
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("exchange", &self.exchange)
            .field("queue_prefix", &self.queue_prefix)
            .field("queue_type", &self.queue_type)
            .field("dead_letter_queue_type", &self.dlq_type)
            .field("initial_group_size", &self.initial_group_size)
            .field("delivery_limit", &self.delivery_limit)
            .field("queue_expiry", &self.queue_expiry)
            .field("operation_timeout", &self.operation_timeout)
            .field("heartbeat", &self.heartbeat)
            .field("max_reconnect_delay", &self.max_reconnect_delay)
            .field("consumer_channels", &self.consumer_channels)
            .finish()
    }
}

/// The default topic exchange every message is published to.
pub const DEFAULT_EXCHANGE: &str = "steadfast";

/// The default number of channels a subscription consumes on; see
/// [`AmqpBuilder::consumer_channels`].
pub const DEFAULT_CONSUMER_CHANNELS: u16 = 1;

/// The default delivery limit of work queues (the same as RabbitMQ 4's default).
pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;

impl AmqpBuilder {
    pub(super) fn new(url: impl Into<String>) -> Self {
        Self {
            urls: vec![url.into()],
            exchange: DEFAULT_EXCHANGE.to_owned(),
            queue_prefix: String::new(),
            queue_type: QueueType::Quorum,
            dlq_type: QueueType::Quorum,
            initial_group_size: None,
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
            queue_expiry: None,
            operation_timeout: Duration::from_secs(30),
            heartbeat: 10,
            max_reconnect_delay: Duration::from_secs(10),
            consumer_channels: DEFAULT_CONSUMER_CHANNELS,
        }
    }

    /// More nodes of the same cluster, tried in order after the ones given so far (the
    /// URL given to [`AmqpTransport::builder`] may itself be a comma-separated list).
    ///
    /// The transport connects to the first node that answers; when that connection is
    /// lost it goes on to the next node in the list (round the list, with the capped,
    /// jittered backoff between rounds), declares its topology again there and resumes
    /// every subscription, without a restart. Passwords are never shown, in any form.
    ///
    /// ```
    /// use steadfast::transport::amqp::AmqpTransport;
    ///
    /// let builder = AmqpTransport::builder("amqp://app:secret@rabbit-1:5672/%2f")
    ///     .nodes(["amqp://app:secret@rabbit-2:5672/%2f", "amqp://app:secret@rabbit-3:5672/%2f"]);
    /// // The same, as one string:
    /// let same = AmqpTransport::builder(
    ///     "amqp://app:secret@rabbit-1/%2f,amqp://app:secret@rabbit-2/%2f,amqp://app:secret@rabbit-3/%2f",
    /// );
    /// assert!(!format!("{builder:?}{same:?}").contains("secret"));
    /// ```
    #[must_use]
    pub fn nodes<I, S>(mut self, urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.urls.extend(urls.into_iter().map(Into::into));
        self
    }

    /// The durable topic exchange messages are published to, routed by message name
    /// (default `"steadfast"`).
    #[must_use]
    pub fn exchange(mut self, name: impl Into<String>) -> Self {
        self.exchange = name.into();
        self
    }

    /// A prefix for every queue name this transport declares (default empty): the work
    /// queue of group `g` is `{prefix}g`.
    #[must_use]
    pub fn queue_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.queue_prefix = prefix.into();
        self
    }

    /// Quorum (default, replicated) or classic (one copy) work queues.
    #[must_use]
    pub fn queue_type(mut self, t: QueueType) -> Self {
        self.queue_type = t;
        self
    }

    /// Quorum (default, replicated) or classic (one copy) dead-letter queues.
    ///
    /// A quorum dead-letter queue is declared with a delivery limit too high to reach
    /// (reading dead letters hands them out and puts them back), so dead letters are
    /// never dropped however often they are listed, on RabbitMQ 3.x and 4.x alike.
    /// [`QueueType::Classic`] keeps a dead-letter queue that an earlier steadfast
    /// declared as a classic queue (see `docs/rabbitmq.md`, "Upgrading").
    #[must_use]
    pub fn dead_letter_queue_type(mut self, t: QueueType) -> Self {
        self.dlq_type = t;
        self
    }

    /// How many nodes hold a copy of each new quorum queue
    /// (`x-quorum-initial-group-size`); unset (the default), RabbitMQ puts one on every
    /// node of the cluster, up to its own cap. Leaders are spread over the nodes either
    /// way (`x-queue-leader-locator = balanced`). Both are read only when a queue is
    /// created: an existing queue keeps its replicas (`rabbitmq-queues grow`/`shrink`
    /// change them).
    ///
    /// ```
    /// use steadfast::transport::amqp::AmqpTransport;
    ///
    /// // A five-node cluster, three copies of each queue.
    /// let builder = AmqpTransport::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
    ///     .initial_group_size(3);
    /// # let _ = builder;
    /// ```
    #[must_use]
    pub fn initial_group_size(mut self, n: u32) -> Self {
        self.initial_group_size = Some(n);
        self
    }

    /// How many times the broker may hand out one copy of a suspect (a message run
    /// alone after unexplained returns) without it being settled before it
    /// dead-letters it: the suspects queue's `x-delivery-limit`, default 20. The work
    /// queue's limit is this or 1,000, whichever is higher, a backstop only: a dead
    /// connection's prefetch counts there too. Retries are new copies and do not count.
    /// Part of the queues' arguments: every transport declaring the same queues must use
    /// the same value.
    #[must_use]
    pub fn delivery_limit(mut self, n: u32) -> Self {
        self.delivery_limit = n;
        self
    }

    /// Lets the broker delete this transport's queues after they have been unused for
    /// `d` (`x-expires`), messages included: for tests and throw-away groups. RabbitMQ
    /// counts consumers and `basic.get` as use, not publishing, and a declaration renews
    /// a classic queue's lease but not a quorum queue's; so while a worker consumes a
    /// group, every third of `d` it declares the group's queues again and takes one
    /// `basic.get` from the dead-letter queue and each delay queue, requeueing what it
    /// took (that message gains one delivery count). Without this, those queues, which
    /// the worker only publishes to, expired under it with their messages. Once the
    /// group's last worker has stopped, its queues go after `d`, dead letters included.
    #[must_use]
    pub fn queue_expiry(mut self, d: Duration) -> Self {
        self.queue_expiry = Some(d);
        self
    }

    /// The bound on every single broker operation: connect, declare, publisher confirm,
    /// ack (default 30 s). An operation that takes longer fails with
    /// [`TransportErrorKind::Timeout`].
    #[must_use]
    pub fn operation_timeout(mut self, d: Duration) -> Self {
        self.operation_timeout = d;
        self
    }

    /// The heartbeat interval in seconds proposed to the broker (default 10; a
    /// `heartbeat=` in the URL wins). A silent peer is detected after about two
    /// intervals.
    #[must_use]
    pub fn heartbeat(mut self, secs: u16) -> Self {
        self.heartbeat = secs;
        self
    }

    /// The cap on the jittered exponential backoff between reconnect attempts
    /// (default 10 s).
    #[must_use]
    pub fn max_reconnect_delay(mut self, d: Duration) -> Self {
        self.max_reconnect_delay = d;
        self
    }

    /// How many channels, each with a consumer of its own, one subscription consumes on
    /// (default [`DEFAULT_CONSUMER_CHANNELS`], 1). The subscription's prefetch (its
    /// worker's concurrency) is split between them, so the broker never hands out more
    /// unsettled messages than with one channel; a subscription with a prefetch of `p`
    /// uses at most `p` channels, so a worker with concurrency 1 always consumes on one.
    ///
    /// RabbitMQ runs each channel in a process of its own: on two cores, lapin's own
    /// coalesced consumer took 1 KiB messages about 1.2× as fast on two channels as on
    /// one with the same total prefetch, while the worker on two channels was slower
    /// than on one (decision 0103, `docs/benchmarks.md`). Measure before raising it.
    ///
    /// ```
    /// use steadfast::transport::amqp::AmqpTransport;
    ///
    /// let builder = AmqpTransport::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
    ///     .consumer_channels(2);
    /// # let _ = builder;
    /// ```
    #[must_use]
    pub fn consumer_channels(mut self, n: u16) -> Self {
        self.consumer_channels = n;
        self
    }

    /// Checks the settings, connects and declares the exchange.
    pub async fn connect(self) -> Result<AmqpTransport, TransportError> {
        let problems = self.problems();
        if !problems.is_empty() {
            return Err(TransportError::new(
                TransportErrorKind::Config,
                format!("invalid RabbitMQ settings: {}", problems.join("; ")),
            ));
        }
        let inner = connection::Inner::new(self)?;
        let inner = Arc::new(inner);
        inner.first_connect().await?;
        Ok(AmqpTransport { inner })
    }

    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.exchange.is_empty() || self.exchange.len() > 200 {
            p.push("the exchange name must be 1..=200 bytes".to_owned());
        }
        if self.exchange.starts_with("amq.") {
            p.push("exchange names starting with `amq.` are reserved by RabbitMQ".to_owned());
        }
        if self.queue_prefix.len() > 100 {
            p.push("the queue prefix must be at most 100 bytes".to_owned());
        }
        if self.consumer_channels == 0 {
            p.push("a subscription needs at least 1 consumer channel".to_owned());
        }
        if self.initial_group_size == Some(0) {
            p.push("the initial group size must be at least 1".to_owned());
        }
        if self.delivery_limit == 0 {
            p.push("the delivery limit must be at least 1".to_owned());
        }
        if self.operation_timeout.is_zero() {
            p.push("the operation timeout must be above zero".to_owned());
        }
        if self.max_reconnect_delay < Duration::from_millis(100) {
            p.push("the maximum reconnect delay must be at least 100 ms".to_owned());
        }
        if let Some(e) = self.queue_expiry
            && e < Duration::from_secs(1)
        {
            p.push("the queue expiry must be at least 1 s".to_owned());
        }
        p
    }
}

/// The settings, checked.
#[derive(Debug, Clone)]
pub(super) struct Settings {
    pub(super) exchange: String,
    pub(super) queue_prefix: String,
    pub(super) queue_type: QueueType,
    pub(super) dlq_type: QueueType,
    pub(super) initial_group_size: Option<u32>,
    pub(super) delivery_limit: u32,
    pub(super) queue_expiry: Option<Duration>,
    pub(super) op_timeout: Duration,
    pub(super) max_reconnect_delay: Duration,
    pub(super) consumer_channels: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("amqp://guest:s3cret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact_url("amqp://host/%2f"), "amqp://host/%2f");
        assert_eq!(redact_url("::s3cret::"), "(unparseable url)");
        let b = AmqpTransport::builder("amqp://u:s3cret@h/");
        assert!(!format!("{b:?}").contains("s3cret"));
    }

    #[test]
    fn several_nodes_in_one_string_or_a_list_keep_their_passwords_hidden() {
        let b = AmqpTransport::builder("amqp://u:s3cret@h1/%2f, amqp://u:t0p%2Csecret@h2/%2f,")
            .nodes(["amqps://v:an0ther@h3:5671/%2f"]);
        let shown = format!("{b:?}");
        for secret in ["s3cret", "t0p", "an0ther"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert_eq!(
            connection::split_nodes(&b.urls),
            [
                "amqp://u:s3cret@h1/%2f",
                "amqp://u:t0p%2Csecret@h2/%2f",
                "amqps://v:an0ther@h3:5671/%2f"
            ]
        );
        assert!(shown.contains("amqp://u:***@h1/%2f"), "{shown}");
    }

    #[tokio::test]
    async fn a_bad_url_among_the_nodes_is_refused_without_its_password() {
        let e = AmqpTransport::builder("amqp://u:s3cret@127.0.0.1:1/%2f,nope://u:s3cret@h:x")
            .connect()
            .await
            .unwrap_err();
        assert_eq!(e.kind(), TransportErrorKind::Config);
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let e = AmqpTransport::builder(" , ").connect().await.unwrap_err();
        assert_eq!(e.kind(), TransportErrorKind::Config);
    }
    #[test]
    fn zero_consumer_channels_is_refused_with_the_other_problems() {
        let b = AmqpTransport::builder("amqp://u:s3cret@h/")
            .consumer_channels(0)
            .delivery_limit(0);
        let p = b.problems();
        assert!(p.contains(&"a subscription needs at least 1 consumer channel".to_owned()));
        assert!(p.contains(&"the delivery limit must be at least 1".to_owned()));
        assert!(
            AmqpTransport::builder("amqp://h/")
                .consumer_channels(1)
                .problems()
                .is_empty()
        );
    }
}
