//! The `MAX_DELIVERIES` advisory: a message the server stopped delivering because it
//! reached `max_deliver` (a worker that crashes on it, again and again) is copied to the
//! dead-letter stream with a reason that says so, then removed from the work stream
//! when no other group reads that stream.
//!
//! Advisories are core NATS messages (at most once): a queue subscription makes one
//! process of the group handle each; if no worker of the group runs when the server
//! sends it, the message stays in the work stream, undelivered (see `docs/nats.md`).

use super::{
    Inner,
    publish::{self, DeadLetterCopy},
    settle::dedup_id,
    topology::GroupConsumer,
};
use crate::transport::{TransportError, TransportErrorKind, backoff::Backoff, crash};
use futures::StreamExt;
use std::{collections::HashSet, sync::Arc, time::Duration};
use tokio::task::JoinHandle;

/// The listener tasks of one subscription; aborted when the last stream handle drops.
pub(super) struct Listener {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[derive(serde::Deserialize)]
struct MaxDeliveries {
    stream: String,
    consumer: String,
    stream_seq: u64,
    deliveries: u64,
}

/// Starts one listener per consumer of the group.
pub(super) async fn spawn(
    inner: Arc<Inner>,
    group: Arc<str>,
    consumers: &[GroupConsumer],
) -> Result<Arc<Listener>, TransportError> {
    let names: Arc<HashSet<String>> = Arc::new(consumers.iter().map(|c| c.name.clone()).collect());
    let mut tasks = Vec::new();
    for c in consumers {
        let subject = format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}",
            inner.settings.stream, c.name
        );
        let mut sub = inner
            .client
            .queue_subscribe(subject.clone(), "steadfast-max-deliveries".to_owned())
            .await
            .map_err(|e| {
                super::err(
                    TransportErrorKind::Connection,
                    format!("subscribing to `{subject}`"),
                    e,
                )
            })?;
        let inner = inner.clone();
        let group = group.clone();
        let names = names.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let adv: MaxDeliveries = match serde_json::from_slice(&msg.payload) {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "unreadable MAX_DELIVERIES advisory");
                        continue;
                    }
                };
                if adv.stream != inner.settings.stream {
                    continue;
                }
                // Retry a few times: the advisory is not sent again.
                let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
                for attempt in 1..=8 {
                    match move_to_dead_letters(&inner, &group, &names, &adv).await {
                        Ok(()) => break,
                        Err(e) if attempt == 8 => {
                            tracing::error!(consumer = %adv.consumer, seq = adv.stream_seq, error = %e,
                                "could not dead-letter a message that reached the delivery limit; it stays in the work stream, undelivered");
                        }
                        Err(e) => {
                            tracing::warn!(seq = adv.stream_seq, error = %e, "dead-lettering after the delivery limit failed; retrying");
                            tokio::time::sleep(backoff.pause()).await;
                        }
                    }
                }
            }
        }));
    }
    Ok(Arc::new(Listener { tasks }))
}

async fn move_to_dead_letters(
    inner: &Inner,
    group: &str,
    group_consumers: &HashSet<String>,
    adv: &MaxDeliveries,
) -> Result<(), TransportError> {
    let st = inner
        .bounded("work stream", async {
            inner
                .js
                .get_stream_no_info(&inner.settings.stream)
                .await
                .map_err(|e| super::err(TransportErrorKind::Connection, "work stream", e))
        })
        .await?;
    let msg = inner
        .bounded("get message", async {
            match st.get_raw_message(adv.stream_seq).await {
                Ok(m) => Ok(Some(m)),
                Err(e)
                    if matches!(
                        e.kind(),
                        async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound
                    ) =>
                {
                    Ok(None)
                }
                Err(e) => Err(super::err(TransportErrorKind::Protocol, "get message", e)),
            }
        })
        .await?;
    let Some(msg) = msg else {
        tracing::info!(
            seq = adv.stream_seq,
            "message past its delivery limit is no longer in the stream"
        );
        return Ok(());
    };
    let deliveries = u32::try_from(adv.deliveries).unwrap_or(u32::MAX);
    let failure = crash::delivery_limit_reached(format_args!(
        "delivered {} times to consumer `{}` without being settled (max_deliver)",
        adv.deliveries, adv.consumer
    ));
    publish::publish_dead_letter(
        inner,
        DeadLetterCopy {
            group,
            subject: msg.subject.as_str(),
            headers: msg.headers.clone(),
            payload: msg.payload.clone(),
            failure: &failure,
            attempts: deliveries,
            dedup_id: dedup_id(group, adv.stream_seq),
        },
    )
    .await?;
    tracing::warn!(consumer = %adv.consumer, seq = adv.stream_seq, deliveries = adv.deliveries, "message reached the delivery limit; dead-lettered");

    // Remove it from the work stream only when this group is its only reader.
    let mut st = st;
    let others = inner
        .bounded("list consumers", async {
            let mut names = st.consumer_names();
            let mut others = 0usize;
            while let Some(n) = names.next().await {
                match n {
                    Ok(n) if !group_consumers.contains(&n) => others += 1,
                    Ok(_) => {}
                    Err(e) => {
                        return Err(super::err(
                            TransportErrorKind::Protocol,
                            "consumer names",
                            e,
                        ));
                    }
                }
            }
            Ok(others)
        })
        .await?;
    if others == 0 {
        let _ = inner
            .bounded("delete message", async {
                st.delete_message(adv.stream_seq)
                    .await
                    .map_err(|e| super::err(TransportErrorKind::Protocol, "delete message", e))
            })
            .await;
    }
    let _ = &mut st;
    Ok(())
}
