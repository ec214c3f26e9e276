//! Names and declarations: the topic exchange, the group's work queue (bound by message
//! name), its delay-tier queues and its dead-letter queue. Every declaration is
//! idempotent, with arguments that depend only on the transport's settings and the
//! queue's name, so workers with different retry policies can share a group.

use super::{
    builder::Settings,
    connection::{Inner, Link},
};
use crate::transport::{Subscription, TransportError, TransportErrorKind};
use lapin::{
    Channel, ExchangeKind,
    options::{
        BasicGetOptions, BasicRejectOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use std::{future::Future, sync::Arc, time::Duration};

/// The dead-letter queue of work queue `queue`.
pub(super) fn dlq_name(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// The suspects queue of work queue `queue` (see `suspects.rs`).
pub(super) fn suspects_name(queue: &str) -> String {
    format!("{queue}.suspects")
}

/// Everything a subscription's topology needs, named.
#[derive(Debug, Clone)]
pub(super) struct GroupTopology {
    pub(super) group: String,
    pub(super) exchange: ShortString,
    pub(super) queue: ShortString,
    pub(super) dlq: ShortString,
    pub(super) suspects: ShortString,
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
    pub(super) fn new(cfg: &Settings, sub: &Subscription) -> Result<Self, TransportError> {
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
            suspects: short("the suspects queue name", suspects_name(&queue))?,
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

fn common(cfg: &Settings, t: &mut FieldTable) {
    if let Some(e) = cfg.queue_expiry {
        put(t, "x-expires", millis(e));
    }
}

/// The delivery limit of quorum dead-letter queues: none in effect. Reading dead letters
/// returns them to the queue, which counts as a delivery; RabbitMQ 4 gives quorum queues
/// a limit of 20 unless told otherwise, and `-1` (unlimited on 4.x) means "drop at the
/// first return" on 3.x, so the one value that reads the same on every version is the
/// largest (decision 0104).
pub(super) const DLQ_DELIVERY_LIMIT: i64 = i32::MAX as i64;

/// The work queue's delivery limit when the user's `delivery_limit` is lower: a backstop
/// only, far above the crash limit (decision 0009). RabbitMQ counts every delivery a
/// dead connection held, prefetched ones the client never received included, so under
/// connection churn a healthy message can gain counts here without steadfast ever
/// seeing it; only the suspects queue, read one message at a time, counts crashes.
pub(super) const WORK_QUEUE_DELIVERY_LIMIT: u32 = 1_000;

/// The work queue's `x-delivery-limit`: [`WORK_QUEUE_DELIVERY_LIMIT`], or the user's
/// `delivery_limit` if that is higher.
pub(super) fn work_delivery_limit(cfg: &Settings) -> u32 {
    cfg.delivery_limit.max(WORK_QUEUE_DELIVERY_LIMIT)
}

/// Where a new quorum queue's replicas and leader go: leaders spread over the cluster
/// (`balanced`) and, when the user set one, the number of replicas. RabbitMQ reads
/// these only when it creates the queue; see [`declare_queue`] for existing ones.
fn placement(cfg: &Settings, t: &mut FieldTable) {
    put(t, "x-queue-leader-locator", text("balanced"));
    if let Some(n) = cfg.initial_group_size {
        put(
            t,
            "x-quorum-initial-group-size",
            AMQPValue::LongLongInt(i64::from(n)),
        );
    }
}

/// The arguments that only place a new queue.
const PLACEMENT_ARGS: [&str; 2] = ["x-queue-leader-locator", "x-quorum-initial-group-size"];

/// Quorum settings under which the broker's own dead-lettering is at-least-once.
fn at_least_once(cfg: &Settings, t: &mut FieldTable) {
    put(t, "x-queue-type", text("quorum"));
    put(t, "x-dead-letter-strategy", text("at-least-once"));
    put(t, "x-overflow", text("reject-publish"));
    placement(cfg, t);
}

pub(super) fn work_queue_args(cfg: &Settings, topo: &GroupTopology) -> FieldTable {
    let mut t = FieldTable::default();
    match cfg.queue_type {
        super::QueueType::Quorum => {
            at_least_once(cfg, &mut t);
            put(
                &mut t,
                "x-delivery-limit",
                AMQPValue::LongLongInt(i64::from(work_delivery_limit(cfg))),
            );
        }
        super::QueueType::Classic => put(&mut t, "x-queue-type", text("classic")),
    }
    put(&mut t, "x-dead-letter-exchange", text(""));
    put(&mut t, "x-dead-letter-routing-key", text(topo.dlq.as_str()));
    common(cfg, &mut t);
    t
}

/// The suspects queue: a quorum queue whatever the work queue's type (its delivery count
/// is the crash count), with the user's `delivery_limit` as a backstop into the DLQ. It
/// is read with `basic.get`, one message at a time, so a dead connection returns at most
/// the one suspect it held, never a prefetch.
pub(super) fn suspects_queue_args(cfg: &Settings, topo: &GroupTopology) -> FieldTable {
    let mut t = FieldTable::default();
    at_least_once(cfg, &mut t);
    put(
        &mut t,
        "x-delivery-limit",
        AMQPValue::LongLongInt(i64::from(cfg.delivery_limit)),
    );
    put(&mut t, "x-dead-letter-exchange", text(""));
    put(&mut t, "x-dead-letter-routing-key", text(topo.dlq.as_str()));
    common(cfg, &mut t);
    t
}

pub(super) fn delay_queue_args(cfg: &Settings, topo: &GroupTopology, ttl: Duration) -> FieldTable {
    let mut t = FieldTable::default();
    at_least_once(cfg, &mut t);
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

pub(super) fn dlq_args(cfg: &Settings) -> FieldTable {
    let mut t = FieldTable::default();
    match cfg.dlq_type {
        super::QueueType::Quorum => {
            // Replicated, and read any number of times without being dropped. Nothing
            // is dead-lettered out of it, so it needs no dead-letter strategy.
            put(&mut t, "x-queue-type", text("quorum"));
            put(
                &mut t,
                "x-delivery-limit",
                AMQPValue::LongLongInt(DLQ_DELIVERY_LIMIT),
            );
            placement(cfg, &mut t);
        }
        // The explicit opt-in: one copy, on one node.
        super::QueueType::Classic => put(&mut t, "x-queue-type", text("classic")),
    }
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
    if e.kind() != TransportErrorKind::Config {
        return e;
    }
    let text = e.to_string();
    let advice = if text.contains("'x-queue-type'") && what.ends_with(".dlq`") {
        "; a dead-letter queue declared by steadfast before 0.2 is a classic queue: move its \
         dead letters (replay them) and delete it so that it is declared again as a replicated \
         quorum queue, or keep it with `dead_letter_queue_type(QueueType::Classic)` \
         (see docs/rabbitmq.md, \"Upgrading\")"
    } else {
        "; if it exists with other settings, delete it or use the same settings"
    };
    TransportError::new(
        TransportErrorKind::Config,
        format!("cannot declare {what}{advice}"),
    )
    .with_source(e)
}

fn names_a_placement_arg(e: &TransportError) -> bool {
    let text = e.to_string();
    PLACEMENT_ARGS
        .iter()
        .any(|a| text.contains(&format!("'{a}'")))
}

/// Declares a durable queue on `ch`. A queue that already exists with other placement
/// arguments (declared before steadfast set them, or with another initial group size)
/// is kept as it is: those arguments only place a new queue, so the declaration is
/// repeated without them, and if the broker still names one, the queue is only checked
/// to exist. A refused declaration closes its channel: `ch` is replaced by a new one.
async fn declare_queue(
    inner: &Inner,
    link: &Link,
    ch: &mut Channel,
    name: &ShortString,
    args: FieldTable,
) -> Result<(), TransportError> {
    let what = format!("queue `{name}`");
    match queue_declare(inner, ch, name, args.clone(), false).await {
        Ok(()) => return Ok(()),
        Err(e) if has_placement(&args) && names_a_placement_arg(&e) => {}
        Err(e) => return Err(explain_precondition(e, &what)),
    }
    *ch = inner.open_channel(link).await?;
    let mut plain = FieldTable::default();
    for (k, v) in args.inner() {
        if !PLACEMENT_ARGS.contains(&k.as_str()) {
            plain.insert(k.clone(), v.clone());
        }
    }
    match queue_declare(inner, ch, name, plain, false).await {
        Ok(()) => {}
        Err(e) if names_a_placement_arg(&e) => {
            *ch = inner.open_channel(link).await?;
            queue_declare(inner, ch, name, FieldTable::default(), true)
                .await
                .map_err(|e| explain_precondition(e, &what))?;
        }
        Err(e) => return Err(explain_precondition(e, &what)),
    }
    tracing::info!(queue = %name, "queue exists with other placement settings (leader locator, initial group size); kept as it is");
    Ok(())
}

fn has_placement(args: &FieldTable) -> bool {
    args.inner()
        .keys()
        .any(|k| PLACEMENT_ARGS.contains(&k.as_str()))
}

async fn close_quietly(inner: &Inner, ch: &Channel) {
    if ch.status().connected() {
        let _ = tokio::time::timeout(inner.cfg.op_timeout, ch.close(200, "OK".into())).await;
    }
}

async fn queue_declare(
    inner: &Inner,
    ch: &Channel,
    name: &ShortString,
    args: FieldTable,
    passive: bool,
) -> Result<(), TransportError> {
    inner
        .bounded(
            "queue.declare",
            ch.queue_declare(
                name.clone(),
                QueueDeclareOptions {
                    durable: true,
                    passive,
                    ..QueueDeclareOptions::default()
                },
                args,
            ),
        )
        .await
        .map(|_| ())
}

/// Declares the whole topology of a group on a channel of its own, closed afterwards:
/// DLQ first (the work queue dead-letters into it), then the work queue and its
/// bindings, then the delay tiers.
pub(super) async fn declare(
    inner: &Inner,
    link: &Link,
    topo: &GroupTopology,
) -> Result<(), TransportError> {
    let mut ch = inner.open_channel(link).await?;
    let r = declare_all(inner, link, &mut ch, topo).await;
    match &r {
        // The broker is still at it (see `declare_or_reuse`): the close would wait too.
        Err(e) if e.kind() == TransportErrorKind::Timeout => inner.abandon(ch),
        _ => close_quietly(inner, &ch).await,
    }
    r
}

/// [`declare`], for a subscription (re)starting: when the broker does not answer in time
/// but the work queue exists, its topology is taken as it is and consuming goes on. A
/// cluster changes bindings and queues in a transaction over every node it still counts
/// as up, so while one node is paused (not yet declared down) a `queue.bind` waits, even
/// though consuming from a quorum queue whose majority is up works.
pub(super) async fn declare_or_reuse(
    inner: &Inner,
    link: &Link,
    topo: &GroupTopology,
) -> Result<(), TransportError> {
    let e = match declare(inner, link, topo).await {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == TransportErrorKind::Timeout => e,
        Err(e) => return Err(e),
    };
    let ch = inner.open_channel(link).await?;
    let exists = queue_declare(inner, &ch, &topo.queue, FieldTable::default(), true).await;
    match &exists {
        Err(e) if e.kind() == TransportErrorKind::Timeout => inner.abandon(ch),
        _ => close_quietly(inner, &ch).await,
    }
    match exists {
        Ok(()) => {
            tracing::warn!(queue = %topo.queue, error = %e, "topology not redeclared (the broker is slow to change it: a cluster node may be unreachable); consuming from the existing queue");
            Ok(())
        }
        Err(_) => Err(e),
    }
}

/// How often a consumed group's queues are kept in use when they expire
/// (`queue_expiry`): a third of the expiry, so two rounds in a row can fail before a
/// queue expires.
pub(super) fn refresh_every(expiry: Duration) -> Duration {
    (expiry / 3).max(Duration::from_millis(500))
}

/// Keeps a consumed group's queues from expiring while it is consumed: with
/// `queue_expiry` set, every [`refresh_every`] until `done` resolves or the transport
/// closes, declares the group's topology again and takes one `basic.get` from the
/// dead-letter queue and each delay queue, rejecting (requeueing) what it got.
///
/// RabbitMQ counts consumers and `basic.get` as use, not publishing: the dead-letter
/// and delay queues, which a worker only publishes to, expired under it with their
/// messages, and its retries and dead letters became unroutable. A declaration renews a
/// classic queue's lease but not a quorum queue's (RabbitMQ 3.10); a `basic.get` renews
/// both. A message taken and requeued keeps its place in time (a delay's TTL runs from
/// its enqueue) and gains one delivery count. The suspects queue needs none of this: it
/// is read with `basic.get` every few seconds. The declaration also brings back a queue
/// deleted by hand. Without `queue_expiry` this returns at once.
pub(super) async fn keep_declared(
    inner: Arc<Inner>,
    topo: Arc<GroupTopology>,
    done: impl Future<Output = ()>,
) {
    let Some(expiry) = inner.cfg.queue_expiry else {
        return;
    };
    let every = refresh_every(expiry);
    tokio::pin!(done);
    loop {
        tokio::select! {
            () = &mut done => return,
            () = inner.closed.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let r = async {
            let link = inner.link_bounded().await?;
            declare(&inner, &link, &topo).await?;
            touch(&inner, &link, &topo).await
        }
        .await;
        match r {
            Ok(()) => tracing::debug!(group = %topo.group, "group's queues kept in use"),
            Err(e) => tracing::warn!(
                group = %topo.group,
                error = %e,
                "group's queues not kept in use this round; unused, they expire after {expiry:?}"
            ),
        }
    }
}

/// One `basic.get` on the dead-letter queue and on each delay queue, what it takes
/// rejected back to its queue at once (see [`keep_declared`]). If the reject or the
/// channel fails, closing the channel returns the message all the same.
async fn touch(inner: &Inner, link: &Link, topo: &GroupTopology) -> Result<(), TransportError> {
    let ch = inner.open_channel(link).await?;
    let r: Result<(), TransportError> = async {
        for queue in std::iter::once(&topo.dlq).chain(topo.tiers.iter().map(|(_, q)| q)) {
            let got = inner
                .bounded(
                    "basic.get",
                    ch.basic_get(queue.clone(), BasicGetOptions { no_ack: false }),
                )
                .await?;
            if let Some(m) = got {
                inner
                    .bounded(
                        "basic.reject",
                        ch.basic_reject(
                            m.delivery.delivery_tag,
                            BasicRejectOptions { requeue: true },
                        ),
                    )
                    .await?;
            }
        }
        Ok(())
    }
    .await;
    match &r {
        Err(e) if e.kind() == TransportErrorKind::Timeout => inner.abandon(ch),
        _ => close_quietly(inner, &ch).await,
    }
    r
}

/// Declares the work queue. One declared by steadfast before crash attribution has the
/// user's `delivery_limit` (default 20) as its `x-delivery-limit`, which RabbitMQ will
/// not change: it is kept as it is, with a warning, and suspects are moved out of it
/// half-way to that limit (the suspects' `refresh_at`).
async fn declare_work_queue(
    inner: &Inner,
    link: &Link,
    ch: &mut Channel,
    topo: &GroupTopology,
) -> Result<(), TransportError> {
    let cfg = &inner.cfg;
    let args = work_queue_args(cfg, topo);
    match declare_queue(inner, link, ch, &topo.queue, args).await {
        Err(e) if e.to_string().contains("'x-delivery-limit'") => {
            *ch = inner.open_channel(link).await?;
            queue_declare(inner, ch, &topo.queue, FieldTable::default(), true)
                .await
                .map_err(|_| e)?;
            inner
                .suspects
                .set_work_limit(topo.queue.as_str(), cfg.delivery_limit);
            tracing::warn!(
                queue = %topo.queue,
                "work queue declared by an earlier version with another x-delivery-limit; kept as it is. \
                 Connection churn can dead-letter healthy messages through that limit: drain and delete \
                 the queue while no worker runs to have it declared with {} (docs/rabbitmq.md, \"Upgrading\")",
                work_delivery_limit(cfg)
            );
            Ok(())
        }
        r => r,
    }
}

async fn declare_all(
    inner: &Inner,
    link: &Link,
    ch: &mut Channel,
    topo: &GroupTopology,
) -> Result<(), TransportError> {
    let cfg = &inner.cfg;
    declare_exchange(inner, ch).await?;
    declare_queue(inner, link, ch, &topo.dlq, dlq_args(cfg)).await?;
    declare_work_queue(inner, link, ch, topo).await?;
    declare_queue(
        inner,
        link,
        ch,
        &topo.suspects,
        suspects_queue_args(cfg, topo),
    )
    .await?;
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
        declare_queue(inner, link, ch, name, delay_queue_args(cfg, topo, *ttl)).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Settings {
        Settings {
            exchange: "ex".into(),
            queue_prefix: "p-".into(),
            queue_type: super::super::QueueType::Quorum,
            dlq_type: super::super::QueueType::Quorum,
            initial_group_size: None,
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
        assert_eq!(t.suspects.as_str(), "p-g.suspects");
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

    fn arg(t: &FieldTable, k: &str) -> Option<AMQPValue> {
        t.inner().get(k).cloned()
    }

    #[test]
    fn every_queue_is_replicated_with_balanced_leaders_by_default() {
        let mut c = cfg();
        let t = GroupTopology::new(&c, &Subscription::new("g", ["a"])).unwrap();
        let quorum = Some(text("quorum"));
        let balanced = Some(text("balanced"));
        for args in [
            dlq_args(&c),
            work_queue_args(&c, &t),
            delay_queue_args(&c, &t, Duration::from_secs(1)),
        ] {
            assert_eq!(arg(&args, "x-queue-type"), quorum);
            assert_eq!(arg(&args, "x-queue-leader-locator"), balanced);
            assert_eq!(arg(&args, "x-quorum-initial-group-size"), None);
        }
        // Dead letters are never dropped for being read too often, on 3.x or 4.x.
        assert_eq!(
            arg(&dlq_args(&c), "x-delivery-limit"),
            Some(AMQPValue::LongLongInt(i64::from(i32::MAX)))
        );
        c.initial_group_size = Some(3);
        assert_eq!(
            arg(&dlq_args(&c), "x-quorum-initial-group-size"),
            Some(AMQPValue::LongLongInt(3))
        );
        // Classic only when asked for, and then without quorum-only arguments.
        c.dlq_type = super::super::QueueType::Classic;
        c.queue_type = super::super::QueueType::Classic;
        for args in [dlq_args(&c), work_queue_args(&c, &t)] {
            assert_eq!(arg(&args, "x-queue-type"), Some(text("classic")));
            assert!(!has_placement(&args));
        }
        // Delay queues stay quorum queues.
        let delay = delay_queue_args(&c, &t, Duration::from_secs(1));
        assert_eq!(arg(&delay, "x-queue-type"), quorum);
    }

    #[test]
    fn a_refusal_naming_a_placement_argument_is_recognised() {
        let e = TransportError::new(
            TransportErrorKind::Config,
            "RabbitMQ `queue.declare` failed: PRECONDITION_FAILED - inequivalent arg 'x-queue-leader-locator' for queue 'q'",
        );
        assert!(names_a_placement_arg(&e));
        let e = TransportError::new(
            TransportErrorKind::Config,
            "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'q'",
        );
        assert!(!names_a_placement_arg(&e));
    }

    #[test]
    fn overlong_names_are_config_errors() {
        let sub = Subscription::new("g".repeat(300), ["a"]);
        let e = GroupTopology::new(&cfg(), &sub).unwrap_err();
        assert_eq!(e.kind(), TransportErrorKind::Config);
    }
}
