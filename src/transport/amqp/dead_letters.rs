//! Reading a dead-letter queue without changing it: `basic.get` with manual ack up to
//! `limit` messages on a channel of its own, then close that channel without acking. The
//! broker puts every message back, so nothing is lost; they only gain the `redelivered`
//! flag. A quorum dead-letter queue (the default) puts returned messages at its back
//! and counts the return as a delivery, so it is declared with a delivery limit that is
//! never reached (decision 0104), and what one read returns is sorted by failure time
//! (then id), oldest first, whatever the queue's order.
//!
//! Replaying and purging work the same way: every message is fetched unacked; a selected
//! one is republished to the group's work queue and acked only after the broker's
//! confirm (purge: acked at once); the rest stay unacked and go back to their places
//! when the channel closes — or when the connection dies, whatever kills the process.
//! The scan stops after the number of messages the queue held when it started, so dead
//! letters that a replay produces again are not read in the same run. See
//! `docs/dead-letters.md` and decision 0600.

use super::{connection::Inner, publish, topology::short, wire};
use crate::{
    envelope::Envelope,
    envelope::header,
    transport::{
        DeadLetter, DeadLetterFilter, DeadLetterReport, DeadLetterRewrite, DeadLetterVisitor,
        TransportError, TransportErrorKind,
    },
};
use lapin::{
    BasicProperties, Channel,
    options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions},
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
    let ch = inner.open_channel(&link).await?;
    let mut result = Ok(());
    let mut read = 0usize;
    loop {
        match inner
            .bounded(
                "basic.get",
                ch.basic_get(queue.clone(), BasicGetOptions { no_ack: false }),
            )
            .await
        {
            Ok(Some(m)) => {
                read += 1;
                let d = m.delivery;
                if !visit(dead_letter(&d.properties, d.data)) {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) if e.kind() == TransportErrorKind::Config && read == 0 => {
                // No such queue (the broker closed the channel).
                return Err(unknown_group(&queue));
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    // Closing the channel returns every fetched message to the queue.
    if ch.status().connected() {
        let _ = tokio::time::timeout(inner.cfg.op_timeout, ch.close(200, "OK".into())).await;
    }
    result
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

/// How many selected messages are republished before their confirms are awaited together.
const BATCH: usize = 64;

/// What to do with the selected dead letters.
#[derive(Clone, Copy)]
pub(super) enum Action<'a> {
    /// Republish what the rewrite makes of each to the group's work queue, then remove.
    Replay(&'a DeadLetterRewrite<'a>),
    /// Remove.
    Purge,
}

struct Fetched {
    tag: u64,
    props: BasicProperties,
    dl: DeadLetter,
}

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
    let ch = inner.open_channel(&link).await?;
    let mut report = DeadLetterReport::default();
    let mut budget: Option<u64> = None;
    let mut batch: Vec<Fetched> = Vec::new();
    // What was removed, to recognise it if the broker puts it back (below).
    let removed: std::sync::Mutex<HashSet<Removed>> = std::sync::Mutex::default();
    let track = |dl: &DeadLetter| {
        removed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(removed_key(dl));
        progress(dl);
    };
    let mut result = Ok(());
    while filter.wants_more(report.selected) && budget.is_none_or(|b| b > 0) {
        let got = inner
            .bounded(
                "basic.get",
                ch.basic_get(queue.clone(), BasicGetOptions { no_ack: false }),
            )
            .await;
        let m = match got {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) if e.kind() == TransportErrorKind::Config && report.scanned == 0 => {
                // No such queue: the group was never declared, so it has no dead letters.
                return Ok(report);
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        // `message_count` is what is left behind this one: the queue's size at the start
        // bounds the scan, so what this replay dead-letters again is not read again.
        let left = budget.get_or_insert(u64::from(m.message_count) + 1);
        *left -= 1;
        report.scanned += 1;
        let d = m.delivery;
        let dl = dead_letter(&d.properties, d.data);
        if !filter.matches(&dl) {
            continue; // stays unacked: back in its place when the channel closes
        }
        report.selected += 1;
        batch.push(Fetched {
            tag: d.delivery_tag,
            props: d.properties,
            dl,
        });
        if batch.len() >= BATCH
            && let Err(e) = flush(
                inner,
                &ch,
                &work_queue,
                action,
                &mut batch,
                &mut report,
                &track,
            )
            .await
        {
            result = Err(e);
            break;
        }
    }
    if result.is_ok()
        && let Err(e) = flush(
            inner,
            &ch,
            &work_queue,
            action,
            &mut batch,
            &mut report,
            &track,
        )
        .await
    {
        result = Err(e);
    }
    // Closing the channel returns every message not acked, in order, to the queue.
    let held = (report.scanned - report.done) as u64;
    let mut returned = close_counting(inner, &ch, &queue, held).await;
    let removed = removed
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
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

/// Closes a channel that holds `held` unacked messages of `queue` and says whether the
/// queue got back more than those (acks dropped at the close; or new dead letters that
/// arrived meanwhile, which costs only a needless check).
async fn close_counting(inner: &Arc<Inner>, ch: &Channel, queue: &ShortString, held: u64) -> bool {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    // A round trip on the channel after its acks: the broker has taken them all.
    let before = inner
        .bounded(
            "queue.declare (passive)",
            ch.queue_declare(queue.clone(), passive, FieldTable::default()),
        )
        .await
        .ok()
        .map(|q| u64::from(q.message_count()));
    if ch.status().connected() {
        let _ = tokio::time::timeout(inner.cfg.op_timeout, ch.close(200, "OK".into())).await;
    }
    let Some(before) = before else {
        return false;
    };
    // The broker returns what the channel held after it closed: wait until the count
    // stops moving (bounded).
    let mut last = None;
    for _ in 0..25 {
        let Ok(now) = count_queue(inner, queue).await else {
            return false;
        };
        if last == Some(now) {
            break;
        }
        last = Some(now);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    last.is_some_and(|after| after > before + held)
}

/// The ready messages of `queue` (a passive declare on a channel of its own).
async fn count_queue(inner: &Arc<Inner>, queue: &ShortString) -> Result<u64, TransportError> {
    let link = inner.link_bounded().await?;
    let ch = inner.open_channel(&link).await?;
    let declared = inner
        .bounded(
            "queue.declare (passive)",
            ch.queue_declare(
                queue.clone(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
    if ch.status().connected() {
        let _ = tokio::time::timeout(inner.cfg.op_timeout, ch.close(200, "OK".into())).await;
    }
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
    let ch = inner.open_channel(link).await?;
    let (mut scanned, mut acked) = (0u64, 0u64);
    let mut budget: Option<u64> = None;
    let mut result = Ok(());
    while budget.is_none_or(|b| b > 0) {
        let m = match inner
            .bounded(
                "basic.get",
                ch.basic_get(queue.clone(), BasicGetOptions { no_ack: false }),
            )
            .await
        {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        let left = budget.get_or_insert(u64::from(m.message_count) + 1);
        *left -= 1;
        scanned += 1;
        let d = m.delivery;
        if removed.contains(&removed_key(&dead_letter(&d.properties, d.data))) {
            match inner
                .bounded(
                    "basic.ack",
                    ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: false }),
                )
                .await
            {
                Ok(()) => acked += 1,
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
    let returned = close_counting(inner, &ch, queue, scanned - acked).await;
    result.map(|()| returned && acked > 0)
}

/// Republishes (replay) the batch, pipelined, and acks each message whose copy the broker
/// confirmed; purge acks them all. A message whose copy failed stays unacked.
async fn flush(
    inner: &Arc<Inner>,
    ch: &Channel,
    work_queue: &ShortString,
    action: Action<'_>,
    batch: &mut Vec<Fetched>,
    report: &mut DeadLetterReport,
    progress: &(dyn Fn(&DeadLetter) + Send + Sync),
) -> Result<(), TransportError> {
    let items = std::mem::take(batch);
    let confirms: Vec<Result<(), TransportError>> = match action {
        Action::Purge => items.iter().map(|_| Ok(())).collect(),
        Action::Replay(rewrite) => {
            futures::future::join_all(items.iter().map(|f| async move {
                let out = rewrite(&f.dl);
                let props = rewritten_properties(&f.props, &f.dl, &out)?;
                publish::publish_raw(
                    inner,
                    ShortString::from(""),
                    work_queue.clone(),
                    &out.payload,
                    props,
                )
                .await
            }))
            .await
        }
    };
    for (f, confirmed) in items.into_iter().zip(confirms) {
        match confirmed {
            Ok(()) => {
                inner
                    .bounded(
                        "basic.ack",
                        ch.basic_ack(f.tag, BasicAckOptions { multiple: false }),
                    )
                    .await?;
                report.done += 1;
                progress(&f.dl);
            }
            Err(e) => report.fail(format!("{}: {e}", f.dl.id())),
        }
    }
    Ok(())
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
