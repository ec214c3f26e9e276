//! Reading a dead-letter queue without changing it: `basic.consume` with manual ack on a
//! channel of its own, as many messages as the queue held ready when the read began (a
//! passive declare), then close that channel without acking. The broker puts every
//! message back, so nothing is lost; they only gain the `redelivered` flag. Nothing is
//! acked by a read: the consumers' prefetch windows grow from 256 to 4,096 messages, and
//! a consumer that holds its whole window unacked is cancelled (what it holds stays on
//! the channel) and the next one takes the next window (decision 0610). A quorum
//! dead-letter queue (the default) counts the return as a delivery, so it is declared
//! with a delivery limit that is never reached (decision 0104); what one read returns is
//! sorted by failure time (then id), oldest first, whatever the queue's order.
//!
//! Replaying and purging work the same way: every message is received unacked; a selected
//! one is republished to the group's work queue and acked only after the broker's
//! confirm (purge: acked at once); the rest stay unacked and go back to their places
//! when the channel closes — or when the connection dies, whatever kills the process.
//! The read stops after the number of messages the queue held when it started, so dead
//! letters that a replay produces again are not read in the same run. See
//! `docs/dead-letters.md` and decisions 0600 and 0610.

use super::{connection::Inner, publish, topology::short, wire};
use crate::{
    envelope::Envelope,
    envelope::header,
    transport::{
        DeadLetter, DeadLetterFilter, DeadLetterReport, DeadLetterVisitor, TransportError,
        TransportErrorKind,
        settle_dead_letters::{self, DeadLetterCursor},
    },
};
use futures::StreamExt;
use lapin::{
    BasicProperties, Channel, Consumer,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions,
        QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
};
use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, SystemTime},
};

fn dlq_queue(inner: &Inner, group: &str) -> Result<ShortString, TransportError> {
    short(
        "the dead-letter queue name",
        super::topology::dlq_name(&format!("{}{group}", inner.cfg.queue_prefix)),
    )
}

fn unknown_group(queue: &ShortString) -> TransportError {
    TransportError::new(
        TransportErrorKind::Config,
        format!(
            "no dead-letter queue `{queue}` on the broker: is the group name (and the queue prefix) right?"
        ),
    )
}

/// How many dead letters `group` has: a passive declare of its dead-letter queue.
pub(super) async fn count(inner: &Arc<Inner>, group: &str) -> Result<u64, TransportError> {
    let queue = dlq_queue(inner, group)?;
    match count_queue(inner, &queue).await {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == TransportErrorKind::Config => Err(unknown_group(&queue)),
        Err(e) => Err(e),
    }
}

/// Reads the dead letters of `group` in order, each to `visit` until it says stop.
pub(super) async fn scan(
    inner: &Arc<Inner>,
    group: &str,
    visit: &mut DeadLetterVisitor<'_>,
) -> Result<(), TransportError> {
    let queue = dlq_queue(inner, group)?;
    let link = inner.link_bounded().await?;
    let mut reader = match Reader::open(inner, &link, &queue).await {
        Ok(r) => r,
        Err(e) if e.kind() == TransportErrorKind::Config => return Err(unknown_group(&queue)),
        Err(e) => return Err(e),
    };
    let result = loop {
        match reader.next(inner).await {
            Ok(Some(r)) => {
                let d = r.delivery;
                if !visit(dead_letter(&d.properties, d.data)) {
                    break Ok(());
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    // Closing the channel returns every message read to the queue.
    reader.close(inner).await;
    result
}

/// The first consumer's prefetch window of a [`Reader`].
const FIRST_WINDOW: u16 = 256;
/// The largest window: what the client may buffer of a read the visitor has not taken yet
/// (AMQP would allow 65,535).
const MAX_WINDOW: u16 = 4096;
/// How long a [`Reader`] with room in its window waits for a delivery before it asks
/// whether the queue has any ready message left.
const IDLE: Duration = Duration::from_millis(250);

/// Reads a dead-letter queue on a channel of its own, acking nothing itself: a passive
/// declare says how many messages are ready, then consumers with manual ack deliver that
/// many, pipelined. A consumer whose prefetch window is full of unacked messages gets no
/// more, and none is on its way to it (every ack sent for it has been counted), so it is
/// cancelled, its messages stay held by the channel, and the next consumer gets a window
/// twice as large (up to [`MAX_WINDOW`]). A read that stops early holds at most one
/// window more than it took. Everything unacked goes back when the channel closes, or
/// when the connection dies.
struct Reader {
    ch: Channel,
    queue: ShortString,
    /// Deliveries still to take: the ready count at the start, less what was taken.
    left: u64,
    consumer: Option<Consumer>,
    /// The current consumer's number, prefetch and unacked deliveries.
    number: u64,
    prefetch: u16,
    held: u32,
    /// The next consumer's window.
    window: u16,
    /// Deliveries taken and acked in all.
    taken: u64,
    acks: u64,
}

/// A delivery of a [`Reader`] and the consumer it came from (for [`Reader::acked`]).
struct Read {
    consumer: u64,
    delivery: Delivery,
}

impl Reader {
    /// Opens a channel and counts the ready messages of `queue` (a `Config` error when
    /// there is no such queue).
    async fn open(
        inner: &Arc<Inner>,
        link: &super::connection::Link,
        queue: &ShortString,
    ) -> Result<Self, TransportError> {
        let ch = inner.open_channel(link).await?;
        let declared = inner
            .bounded(
                "queue.declare (passive)",
                ch.queue_declare(queue.clone(), passive(), FieldTable::default()),
            )
            .await;
        match declared {
            Ok(q) => Ok(Self {
                ch,
                queue: queue.clone(),
                left: u64::from(q.message_count()),
                consumer: None,
                number: 0,
                prefetch: 0,
                held: 0,
                window: FIRST_WINDOW,
                taken: 0,
                acks: 0,
            }),
            Err(e) => {
                close_channel(inner, &ch).await;
                Err(e)
            }
        }
    }

    /// Whether the current consumer holds its whole window: the next delivery needs a new
    /// consumer unless some of what it holds is acked first.
    fn full(&self) -> bool {
        self.consumer.is_some() && self.held >= u32::from(self.prefetch)
    }

    /// Counts an ack of a delivery: one window place free again if it came from the
    /// current consumer.
    fn acked(&mut self, consumer: u64) {
        self.acks += 1;
        if consumer == self.number {
            self.held = self.held.saturating_sub(1);
        }
    }

    /// The next delivery, or `None` once as many as the queue held at the start were
    /// taken, or the queue has no ready message left.
    async fn next(&mut self, inner: &Inner) -> Result<Option<Read>, TransportError> {
        let mut idle = Duration::ZERO;
        let mut empty = false;
        while self.left > 0 {
            if self.consumer.is_none() || self.full() {
                self.rotate(inner).await?;
            }
            let Some(consumer) = self.consumer.as_mut() else {
                return Ok(None);
            };
            match tokio::time::timeout(IDLE, consumer.next()).await {
                Ok(Some(Ok(delivery))) => {
                    self.left -= 1;
                    self.held += 1;
                    self.taken += 1;
                    return Ok(Some(Read {
                        consumer: self.number,
                        delivery,
                    }));
                }
                Ok(Some(Err(e))) => return Err(inner.error("basic.consume", &e)),
                // The broker cancelled the consumer (the queue was deleted).
                Ok(None) => return Ok(None),
                // Fewer ready than at the start (another reader holds them, or they were
                // removed): nothing came after the queue said it had none ready.
                Err(_) if empty => return Ok(None),
                Err(_) => {
                    idle += IDLE;
                    if idle >= inner.cfg.op_timeout {
                        return Err(TransportError::new(
                            TransportErrorKind::Timeout,
                            format!(
                                "RabbitMQ delivered nothing from `{}` within {}",
                                self.queue,
                                humantime::format_duration(inner.cfg.op_timeout)
                            ),
                        ));
                    }
                    let q = inner
                        .bounded(
                            "queue.declare (passive)",
                            self.ch.queue_declare(
                                self.queue.clone(),
                                passive(),
                                FieldTable::default(),
                            ),
                        )
                        .await?;
                    empty = q.message_count() == 0;
                }
            }
        }
        Ok(None)
    }

    /// Cancels the current consumer (its deliveries stay unacked on the channel) and
    /// starts the next with a window as large as what is left, at most `window`.
    async fn rotate(&mut self, inner: &Inner) -> Result<(), TransportError> {
        if let Some(c) = self.consumer.take() {
            inner
                .bounded(
                    "basic.cancel",
                    self.ch.basic_cancel(c.tag(), BasicCancelOptions::default()),
                )
                .await?;
            self.window = self.window.saturating_mul(2).min(MAX_WINDOW);
        }
        self.prefetch = u16::try_from(self.left)
            .unwrap_or(u16::MAX)
            .min(self.window);
        inner
            .bounded(
                "basic.qos",
                self.ch
                    .basic_qos(self.prefetch, BasicQosOptions { global: false }),
            )
            .await?;
        let consumer = inner
            .bounded(
                "basic.consume",
                self.ch.basic_consume(
                    self.queue.clone(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
        self.consumer = Some(consumer);
        self.number += 1;
        self.held = 0;
        Ok(())
    }

    /// Closes the channel: the broker puts back every delivery not acked. Waits until
    /// the queue shows them ready again (while its count moves, see [`RETURN_WAIT`]), so
    /// a read that follows sees them; a quorum queue takes them back after the close is
    /// answered. Gives the ready count before the close and the last one seen after it.
    async fn close(mut self, inner: &Arc<Inner>) -> Option<(u64, u64)> {
        // After `basic.cancel-ok` nothing more comes: what is buffered is all it holds.
        if let Some(c) = self.consumer.take() {
            let cancelled = inner
                .bounded(
                    "basic.cancel",
                    self.ch.basic_cancel(c.tag(), BasicCancelOptions::default()),
                )
                .await;
            if cancelled.is_ok() {
                let mut c = c;
                while let Some(Some(Ok(_))) = futures::FutureExt::now_or_never(c.next()) {
                    self.taken += 1;
                }
            }
        }
        let held = self.taken - self.acks;
        let before = if held > 0 {
            inner
                .bounded(
                    "queue.declare (passive)",
                    self.ch
                        .queue_declare(self.queue.clone(), passive(), FieldTable::default()),
                )
                .await
                .ok()
                .map(|q| u64::from(q.message_count()))
        } else {
            None
        };
        close_channel(inner, &self.ch).await;
        let before = before?;
        let started = tokio::time::Instant::now();
        let (mut last, mut moved) = (before, started);
        let mut pause = Duration::from_millis(2);
        loop {
            let now = count_queue(inner, &self.queue).await.ok()?;
            if now != last {
                (last, moved) = (now, tokio::time::Instant::now());
            }
            if now >= before + held
                || moved.elapsed() >= RETURN_WAIT
                || started.elapsed() >= inner.cfg.op_timeout
            {
                return Some((before, now));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }
}

/// How long closing a [`Reader`] waits for the queue's count to move towards showing its
/// messages again (100,000 can take seconds on a busy broker; the whole wait is bounded
/// by the operation timeout).
const RETURN_WAIT: Duration = Duration::from_secs(2);

fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    }
}

async fn close_channel(inner: &Inner, ch: &Channel) {
    if ch.status().connected() {
        let _ = tokio::time::timeout(inner.cfg.op_timeout, ch.close(200, "OK".into())).await;
    }
}

pub(super) async fn read(
    inner: &Arc<Inner>,
    group: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>, TransportError> {
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    let mut visit = |d| {
        out.push(d);
        out.len() < limit
    };
    let scanned = scan(inner, group, &mut visit).await;
    // A quorum queue moves returned messages to its back: show them by failure time.
    out.sort_by(|a, b| {
        (a.failed_at.as_str(), a.envelope.id).cmp(&(b.failed_at.as_str(), b.envelope.id))
    });
    match scanned {
        Ok(()) => Ok(out),
        // The group has never been declared, so it has no dead letters.
        Err(e) if e.kind() == TransportErrorKind::Config => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

pub(super) use crate::transport::settle_dead_letters::Action;

/// Replays or purges the dead letters of `group` that `filter` selects.
pub(super) async fn settle_selected(
    inner: &Arc<Inner>,
    group: &str,
    filter: &DeadLetterFilter,
    action: Action<'_>,
    progress: &(dyn Fn(&DeadLetter) + Send + Sync),
) -> Result<DeadLetterReport, TransportError> {
    let work_queue = format!("{}{group}", inner.cfg.queue_prefix);
    let queue = short(
        "the dead-letter queue name",
        super::topology::dlq_name(&work_queue),
    )?;
    let work_queue = short("the work queue name", work_queue)?;
    let link = inner.link_bounded().await?;
    let reader = match Reader::open(inner, &link, &queue).await {
        Ok(r) => r,
        // No such queue: the group was never declared, so it has no dead letters.
        Err(e) if e.kind() == TransportErrorKind::Config => {
            return Ok(DeadLetterReport::default());
        }
        Err(e) => return Err(e),
    };
    let mut cursor = Cursor {
        inner,
        reader,
        work_queue,
        removed: HashSet::new(),
    };
    let (report, mut result) =
        settle_dead_letters::settle_selected(&mut cursor, filter, action, progress).await;
    let removed = cursor.removed;
    // Closing the channel returns every message not acked, in order, to the queue.
    let mut returned = close_counting(inner, cursor.reader).await;
    // RabbitMQ's quorum queues can drop acks that arrive just before their channel
    // closes and put those messages back (rabbitmq-server issue 10327): a replayed dead
    // letter would then stay beside its confirmed copy. When the queue grew by more than
    // what was left unacked, remove what came back of what was removed (a few rounds:
    // the same can happen to those acks).
    for _ in 0..3 {
        if !returned || removed.is_empty() {
            break;
        }
        match remove_again(inner, &link, &queue, &removed).await {
            Ok(again) => returned = again,
            Err(e) => {
                if result.is_ok() {
                    result = Err(e);
                }
                break;
            }
        }
    }
    result.map(|()| report)
}

/// What identifies one dead letter that a replay or purge removed: its id, failure time
/// and replay count (a copy dead-lettered again has a later failure and a higher count).
type Removed = (crate::MessageId, String, String);

fn removed_key(dl: &DeadLetter) -> Removed {
    (
        dl.id(),
        dl.failed_at.clone(),
        dl.envelope
            .headers
            .get(header::REPLAY_COUNT)
            .unwrap_or_default()
            .to_owned(),
    )
}

/// Closes a reader's channel and says whether its queue got back more than the reader
/// held (acks dropped at the close; or new dead letters that arrived meanwhile, which
/// costs only a needless check).
async fn close_counting(inner: &Arc<Inner>, reader: Reader) -> bool {
    let held = reader.taken - reader.acks;
    let queue = reader.queue.clone();
    // The passive declare on the channel after its acks: the broker has taken them all.
    let Some((before, mut last)) = reader.close(inner).await else {
        return false;
    };
    // Wait until the count stops moving (bounded).
    for _ in 0..25 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(now) = count_queue(inner, &queue).await else {
            return false;
        };
        if now == last {
            break;
        }
        last = now;
    }
    last > before + held
}

/// The ready messages of `queue` (a passive declare on a channel of its own).
async fn count_queue(inner: &Arc<Inner>, queue: &ShortString) -> Result<u64, TransportError> {
    let link = inner.link_bounded().await?;
    let ch = inner.open_channel(&link).await?;
    let declared = inner
        .bounded(
            "queue.declare (passive)",
            ch.queue_declare(queue.clone(), passive(), FieldTable::default()),
        )
        .await;
    close_channel(inner, &ch).await;
    declared.map(|q| u64::from(q.message_count()))
}

/// One pass over `queue` that acks the dead letters in `removed` again (their copies
/// were confirmed, or they were purged) and leaves the rest; says whether the close
/// returned more than it should have again.
async fn remove_again(
    inner: &Arc<Inner>,
    link: &super::connection::Link,
    queue: &ShortString,
    removed: &HashSet<Removed>,
) -> Result<bool, TransportError> {
    let mut reader = Reader::open(inner, link, queue).await?;
    let mut acked = 0u64;
    let mut result = Ok(());
    loop {
        let r = match reader.next(inner).await {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        let d = r.delivery;
        if removed.contains(&removed_key(&dead_letter(&d.properties, d.data))) {
            match inner
                .bounded(
                    "basic.ack",
                    reader
                        .ch
                        .basic_ack(d.delivery_tag, BasicAckOptions { multiple: false }),
                )
                .await
            {
                Ok(()) => {
                    acked += 1;
                    reader.acked(r.consumer);
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
    }
    if acked > 0 {
        tracing::warn!(
            queue = queue.as_str(),
            count = acked,
            "dead letters the broker put back after their removal were removed again"
        );
    }
    let returned = close_counting(inner, reader).await;
    result.map(|()| returned && acked > 0)
}

/// A group's dead-letter queue read by a [`Reader`], up to the number of messages it held
/// at the start. What is read stays unacked (held) until it is removed; closing the
/// channel puts the rest back.
struct Cursor<'a> {
    inner: &'a Arc<Inner>,
    reader: Reader,
    work_queue: ShortString,
    /// What was removed, to recognise it if the broker puts it back.
    removed: HashSet<Removed>,
}

impl DeadLetterCursor for Cursor<'_> {
    /// The delivery tag, the reader's consumer it came from, and the original properties
    /// (republished with their types).
    type Held = (u64, u64, BasicProperties);

    async fn next(&mut self) -> Result<Option<(Self::Held, DeadLetter)>, TransportError> {
        let Some(r) = self.reader.next(self.inner).await? else {
            return Ok(None);
        };
        let d = r.delivery;
        let dl = dead_letter(&d.properties, d.data);
        Ok(Some(((d.delivery_tag, r.consumer, d.properties), dl)))
    }

    async fn republish(
        &self,
        items: &[(Self::Held, DeadLetter)],
        copies: &[Envelope],
    ) -> Vec<Result<(), TransportError>> {
        let copies = items.iter().zip(copies);
        futures::future::join_all(copies.map(|(((_, _, props), dl), out)| async move {
            let props = rewritten_properties(props, dl, out)?;
            publish::publish_raw(
                self.inner,
                ShortString::from(""),
                self.work_queue.clone(),
                &out.payload,
                props,
            )
            .await
        }))
        .await
    }

    async fn remove(
        &mut self,
        (tag, consumer, _): Self::Held,
        dl: &DeadLetter,
    ) -> Result<(), TransportError> {
        self.inner
            .bounded(
                "basic.ack",
                self.reader
                    .ch
                    .basic_ack(tag, BasicAckOptions { multiple: false }),
            )
            .await?;
        self.reader.acked(consumer);
        self.removed.insert(removed_key(dl));
        Ok(())
    }
}

/// The properties of a replayed copy: every original property and header with its type,
/// minus the broker's and steadfast's failure headers, attempt 1, the replay headers.
fn replay_properties(original: &BasicProperties, dl: &DeadLetter) -> BasicProperties {
    let env = dl.replay_envelope();
    let extra = [header::REPLAYED_AT, header::REPLAY_COUNT]
        .map(|k| (k, env.headers.get(k).unwrap_or_default().to_owned()));
    let props = wire::copy_properties(original, 1, false, extra);
    let failure = [
        header::DEAD_LETTER_REASON,
        header::ERROR_KIND,
        header::ATTEMPTS,
        header::FAILED_AT,
        header::ORIGINAL_DESTINATION,
        header::ORIGINAL_GROUP,
    ];
    let mut kept = FieldTable::default();
    if let Some(h) = props.headers() {
        for (k, v) in h.inner() {
            if !failure.iter().any(|f| k.as_str().eq_ignore_ascii_case(f)) {
                kept.insert(k.clone(), v.clone());
            }
        }
    }
    props.with_headers(kept)
}

/// The properties of what a rewrite made of a dead letter: [`replay_properties`], with
/// the id, name and headers `out` has (headers it did not change keep their AMQP types).
fn rewritten_properties(
    original: &BasicProperties,
    dl: &DeadLetter,
    out: &Envelope,
) -> Result<BasicProperties, TransportError> {
    let props = replay_properties(original, dl);
    let mut kept = FieldTable::default();
    if let Some(h) = props.headers() {
        for (k, v) in h.inner() {
            let key = k.as_str();
            let framework =
                key.starts_with(wire::PREFIX) || key.eq_ignore_ascii_case(header::ATTEMPT);
            if framework || out.headers.get(key) == Some(wire::value_text(v).as_ref()) {
                kept.insert(k.clone(), v.clone());
            }
        }
    }
    for (k, v) in out.headers.iter() {
        if !kept.contains_key(k) {
            kept.insert(short("a header name", k.to_owned())?, wire::text(v));
        }
    }
    let id = out.id.to_string();
    kept.insert(format!("{}id", wire::PREFIX).into(), wire::text(&id));
    kept.insert(
        format!("{}type", wire::PREFIX).into(),
        wire::text(&out.name),
    );
    Ok(props
        .with_headers(kept)
        .with_message_id(id.into())
        .with_type(short("the message name", out.name.clone())?))
}

/// A dead letter from a DLQ message: the framework's headers when steadfast put it
/// there, the broker's `x-death` facts when RabbitMQ did (delivery limit).
fn dead_letter(props: &BasicProperties, body: Vec<u8>) -> DeadLetter {
    let (envelope, _defect) = wire::envelope(props, body);
    let broker = props.headers().as_ref().and_then(broker_death);
    let mut dl = DeadLetter::from_envelope(envelope);
    if dl.reason.is_empty()
        && let Some(b) = broker
    {
        dl.reason = b.reason;
        if dl.original_destination.is_empty() {
            dl.original_destination =
                wire::header_text(props, wire::MOVED_FROM).unwrap_or(b.destination);
        }
        if dl.failed_at.is_empty() {
            dl.failed_at = b.time;
        }
        if dl.attempts == 0 {
            dl.attempts = dl.envelope.attempt;
        }
    }
    dl
}

struct BrokerDeath {
    reason: String,
    destination: String,
    time: String,
}

fn get_text(t: &FieldTable, k: &str) -> Option<String> {
    t.inner().get(k).map(|v| wire::value_text(v).into_owned())
}

/// Reads RabbitMQ's own dead-lettering record. `delivery_limit` is reported as
/// "crash loop: delivery limit reached ..." (`transport::crash`).
fn broker_death(h: &FieldTable) -> Option<BrokerDeath> {
    let reason = get_text(h, "x-first-death-reason")?;
    let queue = get_text(h, "x-first-death-queue").unwrap_or_default();
    let exchange = get_text(h, "x-first-death-exchange").unwrap_or_default();
    let first = match h.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().iter().find_map(|v| match v {
            AMQPValue::FieldTable(t) => Some(t.clone()),
            _ => None,
        }),
        _ => None,
    };
    let routing_key = first
        .as_ref()
        .and_then(|t| match t.inner().get("routing-keys") {
            Some(AMQPValue::FieldArray(a)) => a
                .as_slice()
                .first()
                .map(|v| wire::value_text(v).into_owned()),
            _ => None,
        })
        .unwrap_or_default();
    let time = first
        .as_ref()
        .and_then(|t| match t.inner().get("time") {
            Some(AMQPValue::Timestamp(s)) => Some(
                humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(*s))
                    .to_string(),
            ),
            _ => None,
        })
        .unwrap_or_default();
    let reason =
        match reason.as_str() {
            "delivery_limit" => crate::transport::crash::delivery_limit_reached(format_args!(
                "queue `{queue}` handed it out `x-delivery-limit` times without it being settled"
            ))
            .reason,
            other => format!("dead-lettered by RabbitMQ from queue `{queue}`: {other}"),
        };
    Some(BrokerDeath {
        reason,
        destination: format!("{exchange}/{routing_key}"),
        time,
    })
}
