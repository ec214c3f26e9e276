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
    envelope::header,
    transport::{
        DeadLetter, DeadLetterFilter, DeadLetterReport, TransportError, TransportErrorKind,
    },
};
use lapin::{
    BasicProperties, Channel,
    options::{BasicAckOptions, BasicGetOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

pub(super) async fn read(
    inner: &Arc<Inner>,
    group: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>, TransportError> {
    let queue = short(
        "the dead-letter queue name",
        super::topology::dlq_name(&format!("{}{group}", inner.cfg.queue_prefix)),
    )?;
    let link = inner.link_bounded().await?;
    let ch = inner.open_channel(&link).await?;
    let mut out = Vec::new();
    let mut result = Ok(());
    while out.len() < limit {
        match inner
            .bounded(
                "basic.get",
                ch.basic_get(queue.clone(), BasicGetOptions { no_ack: false }),
            )
            .await
        {
            Ok(Some(m)) => {
                let d = m.delivery;
                out.push(dead_letter(&d.properties, d.data));
            }
            Ok(None) => break,
            Err(e) if e.kind() == TransportErrorKind::Config => {
                // No such queue: the group has never been declared, so it has no dead
                // letters (the channel is closed by the broker).
                return Ok(Vec::new());
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
    out.sort_by(|a, b| {
        (a.failed_at.as_str(), a.envelope.id).cmp(&(b.failed_at.as_str(), b.envelope.id))
    });
    result.map(|()| out)
}

/// How many selected messages are republished before their confirms are awaited together.
const BATCH: usize = 64;

/// What to do with the selected dead letters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    /// Republish to the group's work queue, then remove.
    Replay,
    /// Remove.
    Purge,
}

struct Fetched {
    tag: u64,
    props: BasicProperties,
    body: Vec<u8>,
    dl: DeadLetter,
}

/// Replays or purges the dead letters of `group` that `filter` selects.
pub(super) async fn settle_selected(
    inner: &Arc<Inner>,
    group: &str,
    filter: &DeadLetterFilter,
    action: Action,
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
        let dl = dead_letter(&d.properties, d.data.clone());
        if !filter.matches(&dl) {
            continue; // stays unacked: back in its place when the channel closes
        }
        report.selected += 1;
        batch.push(Fetched {
            tag: d.delivery_tag,
            props: d.properties,
            body: d.data,
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
                progress,
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
            progress,
        )
        .await
    {
        result = Err(e);
    }
    // Closing the channel returns every message not acked, in order, to the queue.
    if ch.status().connected() {
        let _ = tokio::time::timeout(inner.cfg.op_timeout, ch.close(200, "OK".into())).await;
    }
    result.map(|()| report)
}

/// Republishes (replay) the batch, pipelined, and acks each message whose copy the broker
/// confirmed; purge acks them all. A message whose copy failed stays unacked.
async fn flush(
    inner: &Arc<Inner>,
    ch: &Channel,
    work_queue: &ShortString,
    action: Action,
    batch: &mut Vec<Fetched>,
    report: &mut DeadLetterReport,
    progress: &(dyn Fn(&DeadLetter) + Send + Sync),
) -> Result<(), TransportError> {
    let items = std::mem::take(batch);
    let confirms: Vec<Result<(), TransportError>> = match action {
        Action::Purge => items.iter().map(|_| Ok(())).collect(),
        Action::Replay => {
            futures::future::join_all(items.iter().map(|f| {
                publish::publish_raw(
                    inner,
                    ShortString::from(""),
                    work_queue.clone(),
                    &f.body,
                    replay_properties(&f.props, &f.dl),
                )
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
