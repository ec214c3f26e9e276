//! Reading a dead-letter queue without changing it: `basic.get` with manual ack up to
//! `limit` messages on a channel of its own, then close that channel without acking. The
//! broker puts every message back where it was (classic queues keep the position of
//! requeued messages), so nothing is lost or reordered; they only gain the
//! `redelivered` flag.

use super::{connection::Inner, topology::short, wire};
use crate::transport::{DeadLetter, TransportError, TransportErrorKind};
use lapin::{
    BasicProperties,
    options::BasicGetOptions,
    types::{AMQPValue, FieldTable},
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
    // Closing the channel returns every fetched message, in order, to the queue.
    if ch.status().connected() {
        let _ = tokio::time::timeout(inner.cfg.op_timeout, ch.close(200, "OK".into())).await;
    }
    result.map(|()| out)
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
            dl.original_destination = b.destination;
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
/// "delivery limit reached ...".
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
    let reason = match reason.as_str() {
        "delivery_limit" => format!(
            "delivery limit reached: queue `{queue}` handed the message out too many times without it being settled (the worker crashed, was killed or lost its connection while handling it each time)"
        ),
        other => format!("dead-lettered by RabbitMQ from queue `{queue}`: {other}"),
    };
    Some(BrokerDeath {
        reason,
        destination: format!("{exchange}/{routing_key}"),
        time,
    })
}
