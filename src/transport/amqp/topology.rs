//! Names and declarations: the topic exchange, the group's work queue (bound by message
//! name), its delay-tier queues and its dead-letter queue. Every declaration is
//! idempotent, with arguments that depend only on the transport's settings and the
//! queue's name, so workers with different retry policies can share a group.

use super::connection::{Config, Inner, Link};
use crate::transport::{Subscription, TransportError, TransportErrorKind};
use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use std::time::Duration;

/// The dead-letter queue of work queue `queue`.
pub(super) fn dlq_name(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// Everything a subscription's topology needs, named.
#[derive(Debug, Clone)]
pub(super) struct GroupTopology {
    pub(super) group: String,
    pub(super) exchange: ShortString,
    pub(super) queue: ShortString,
    pub(super) dlq: ShortString,
    pub(super) names: Vec<ShortString>,
    /// Ascending delay tiers with their queue names.
    pub(super) tiers: Vec<(Duration, ShortString)>,
    pub(super) prefetch: u16,
}

pub(super) fn short(what: &str, s: String) -> Result<ShortString, TransportError> {
    ShortString::try_new(s).map_err(|_| {
        TransportError::new(
            TransportErrorKind::Config,
            format!("{what} is longer than AMQP's 255-byte limit"),
        )
    })
}

impl GroupTopology {
    pub(super) fn new(cfg: &Config, sub: &Subscription) -> Result<Self, TransportError> {
        if sub.group.is_empty() {
            return Err(TransportError::new(
                TransportErrorKind::Config,
                "the consumer group name is empty",
            ));
        }
        let queue = format!("{}{}", cfg.queue_prefix, sub.group);
        let mut delays = sub.retry_delays.clone();
        if delays.is_empty() {
            delays.push(Duration::from_secs(1));
        }
        delays.sort();
        delays.dedup();
        let mut tiers = Vec::with_capacity(delays.len());
        for d in delays {
            // RabbitMQ's TTL has millisecond resolution; never round a delay down to zero.
            let ms = d.as_millis().max(1);
            let ms = u64::try_from(ms)
                .unwrap_or(u64::MAX)
                .min(u64::from(u32::MAX));
            let name = short("a delay queue name", format!("{queue}.delay.{ms}ms"))?;
            if tiers
                .last()
                .is_none_or(|(last, _): &(Duration, _)| last.as_millis() != u128::from(ms))
            {
                tiers.push((Duration::from_millis(ms), name));
            }
        }
        let prefetch = u16::try_from(sub.prefetch.max(1)).map_err(|_| {
            TransportError::new(
                TransportErrorKind::Config,
                format!("prefetch {} is above AMQP's limit of 65535", sub.prefetch),
            )
        })?;
        Ok(Self {
            group: sub.group.clone(),
            exchange: short("the exchange name", cfg.exchange.clone())?,
            dlq: short("the dead-letter queue name", dlq_name(&queue))?,
            queue: short("the queue name", queue)?,
            names: sub
                .names
                .iter()
                .map(|n| short("a message name", n.clone()))
                .collect::<Result<_, _>>()?,
            tiers,
            prefetch,
        })
    }

    /// The tier queue for `delay`: the smallest tier at least as long (a delay is rounded
    /// up), or the longest tier for a delay beyond every tier.
    pub(super) fn tier_for(&self, delay: Duration) -> &ShortString {
        let fallback = &self.tiers[self.tiers.len() - 1].1;
        self.tiers
            .iter()
            .find(|(t, _)| *t >= delay)
            .map_or(fallback, |(_, n)| n)
    }
}

fn put(t: &mut FieldTable, k: &str, v: AMQPValue) {
    t.insert(ShortString::from(k), v);
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn millis(d: Duration) -> AMQPValue {
    AMQPValue::LongLongInt(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn common(cfg: &Config, t: &mut FieldTable) {
    if let Some(e) = cfg.queue_expiry {
        put(t, "x-expires", millis(e));
    }
}

/// Quorum settings under which the broker's own dead-lettering is at-least-once.
fn at_least_once(t: &mut FieldTable) {
    put(t, "x-queue-type", text("quorum"));
    put(t, "x-dead-letter-strategy", text("at-least-once"));
    put(t, "x-overflow", text("reject-publish"));
}

pub(super) fn work_queue_args(cfg: &Config, topo: &GroupTopology) -> FieldTable {
    let mut t = FieldTable::default();
    match cfg.queue_type {
        super::QueueType::Quorum => {
            at_least_once(&mut t);
            put(
                &mut t,
                "x-delivery-limit",
                AMQPValue::LongLongInt(i64::from(cfg.delivery_limit)),
            );
        }
        super::QueueType::Classic => put(&mut t, "x-queue-type", text("classic")),
    }
    put(&mut t, "x-dead-letter-exchange", text(""));
    put(&mut t, "x-dead-letter-routing-key", text(topo.dlq.as_str()));
    common(cfg, &mut t);
    t
}

pub(super) fn delay_queue_args(cfg: &Config, topo: &GroupTopology, ttl: Duration) -> FieldTable {
    let mut t = FieldTable::default();
    at_least_once(&mut t);
    put(&mut t, "x-message-ttl", millis(ttl));
    put(&mut t, "x-dead-letter-exchange", text(""));
    put(
        &mut t,
        "x-dead-letter-routing-key",
        text(topo.queue.as_str()),
    );
    common(cfg, &mut t);
    t
}

pub(super) fn dlq_args(cfg: &Config) -> FieldTable {
    let mut t = FieldTable::default();
    // Classic on purpose: no delivery limit (RabbitMQ 4 gives quorum queues one of 20,
    // which would drop dead letters read 20 times) and requeued messages keep their place.
    put(&mut t, "x-queue-type", text("classic"));
    common(cfg, &mut t);
    t
}

pub(super) async fn declare_exchange(inner: &Inner, ch: &Channel) -> Result<(), TransportError> {
    let name = short("the exchange name", inner.cfg.exchange.clone())?;
    inner
        .bounded(
            "exchange.declare",
            ch.exchange_declare(
                name,
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .map_err(|e| explain_precondition(e, &format!("exchange `{}`", inner.cfg.exchange)))
}

fn explain_precondition(e: TransportError, what: &str) -> TransportError {
    if e.kind() == TransportErrorKind::Config {
        TransportError::new(
            TransportErrorKind::Config,
            format!("cannot declare {what}; if it exists with other settings, delete it or use the same settings"),
        )
        .with_source(e)
    } else {
        e
    }
}

async fn declare_queue(
    inner: &Inner,
    ch: &Channel,
    name: &ShortString,
    args: FieldTable,
) -> Result<(), TransportError> {
    inner
        .bounded(
            "queue.declare",
            ch.queue_declare(
                name.clone(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            ),
        )
        .await
        .map(|_| ())
        .map_err(|e| explain_precondition(e, &format!("queue `{name}`")))
}

/// Declares the whole topology of a group on `ch`: DLQ first (the work queue
/// dead-letters into it), then the work queue and its bindings, then the delay tiers.
pub(super) async fn declare(
    inner: &Inner,
    ch: &Channel,
    topo: &GroupTopology,
) -> Result<(), TransportError> {
    let cfg = &inner.cfg;
    declare_exchange(inner, ch).await?;
    declare_queue(inner, ch, &topo.dlq, dlq_args(cfg)).await?;
    declare_queue(inner, ch, &topo.queue, work_queue_args(cfg, topo)).await?;
    for name in &topo.names {
        inner
            .bounded(
                "queue.bind",
                ch.queue_bind(
                    topo.queue.clone(),
                    topo.exchange.clone(),
                    name.clone(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
    }
    for (ttl, name) in &topo.tiers {
        declare_queue(inner, ch, name, delay_queue_args(cfg, topo, *ttl)).await?;
    }
    Ok(())
}

/// Declares on a channel of its own, closed afterwards (a failed declaration closes
/// its channel).
pub(super) async fn declare_on_new_channel(
    inner: &Inner,
    link: &Link,
    topo: &GroupTopology,
) -> Result<(), TransportError> {
    let ch = inner.open_channel(link).await?;
    let r = declare(inner, &ch, topo).await;
    if ch.status().connected() {
        let _ = tokio::time::timeout(inner.cfg.op_timeout, ch.close(200, "OK".into())).await;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            exchange: "ex".into(),
            queue_prefix: "p-".into(),
            queue_type: super::super::QueueType::Quorum,
            delivery_limit: 20,
            queue_expiry: None,
            op_timeout: Duration::from_secs(1),
            max_reconnect_delay: Duration::from_secs(1),
            consumer_channels: 2,
        }
    }

    #[test]
    fn delays_round_up_to_a_tier() {
        let mut sub = Subscription::new("g", ["a"]);
        sub.retry_delays = [300, 600, 2000].map(Duration::from_millis).to_vec();
        let t = GroupTopology::new(&cfg(), &sub).unwrap();
        assert_eq!(t.queue.as_str(), "p-g");
        assert_eq!(t.dlq.as_str(), "p-g.dlq");
        let tier = |ms| t.tier_for(Duration::from_millis(ms)).as_str().to_owned();
        assert_eq!(tier(0), "p-g.delay.300ms");
        assert_eq!(tier(240), "p-g.delay.300ms");
        assert_eq!(tier(300), "p-g.delay.300ms");
        assert_eq!(tier(301), "p-g.delay.600ms");
        assert_eq!(tier(1999), "p-g.delay.2000ms");
        assert_eq!(
            tier(60_000),
            "p-g.delay.2000ms",
            "beyond every tier: the longest"
        );
    }

    #[test]
    fn sub_millisecond_delays_get_a_tier() {
        let mut sub = Subscription::new("g", ["a"]);
        sub.retry_delays = vec![Duration::from_micros(10), Duration::from_micros(900)];
        let t = GroupTopology::new(&cfg(), &sub).unwrap();
        assert_eq!(t.tiers.len(), 1);
        assert_eq!(t.tiers[0].0, Duration::from_millis(1));
    }

    #[test]
    fn overlong_names_are_config_errors() {
        let sub = Subscription::new("g".repeat(300), ["a"]);
        let e = GroupTopology::new(&cfg(), &sub).unwrap_err();
        assert_eq!(e.kind(), TransportErrorKind::Config);
    }
}
