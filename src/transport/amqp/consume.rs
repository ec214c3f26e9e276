//! Consuming: each subscription consumes on one or more channels
//! ([`consumer_channels`](super::AmqpBuilder::consumer_channels)), each with
//! `basic.qos` set to its share of the prefetch and manual acks, all fed into one
//! [`DeliveryStream`] that survives reconnects. Dropping the stream cancels the consumers
//! and requeues what was prefetched but not handed out; a channel stays open until every
//! delivery it handed out is settled or dropped.

use super::{
    acks::ChannelAcks,
    connection::Inner,
    settle::{AmqpAcker, Origin},
    suspects,
    topology::{self, GroupTopology},
    wire,
};
use crate::transport::{
    Delivery, DeliveryStream, Subscription, TransportError, TransportErrorKind, backoff::Backoff,
};
use futures::StreamExt;
use lapin::{
    Channel, Consumer,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use std::{sync::Arc, time::Duration};
use tokio::sync::mpsc;

struct Session {
    channel: Channel,
    consumer: Consumer,
    acks: Arc<ChannelAcks>,
}

/// The prefetch of each of a subscription's channels: `total` split as evenly as it
/// goes over at most `channels` channels, none with less than one.
fn shares(total: u16, channels: u16) -> Vec<u16> {
    let n = channels.clamp(1, total.max(1));
    let (each, extra) = (total / n, total % n);
    (0..n).map(|i| each + u16::from(i < extra)).collect()
}

pub(super) async fn subscribe(
    inner: Arc<Inner>,
    sub: Subscription,
) -> Result<DeliveryStream, TransportError> {
    let topo = Arc::new(GroupTopology::new(&inner.cfg, &sub)?);
    // The first sessions are set up here, so configuration errors reach the caller; the
    // topology is declared once, on the first.
    let mut first = Vec::new();
    for (i, prefetch) in shares(topo.prefetch, inner.cfg.consumer_channels)
        .into_iter()
        .enumerate()
    {
        match start_session(&inner, &topo, prefetch, i == 0).await {
            Ok(s) => first.push((s, prefetch)),
            Err(e) => {
                for (s, _) in first {
                    stop(&inner, s).await;
                }
                return Err(e);
            }
        }
    }
    let (tx, rx) = mpsc::channel::<Delivery>(usize::from(topo.prefetch));
    let pumps = first
        .into_iter()
        .map(|(session, prefetch)| {
            tokio::spawn(run(
                inner.clone(),
                topo.clone(),
                session,
                prefetch,
                tx.clone(),
            ))
        })
        .collect();
    let watcher = tx.clone();
    tokio::spawn(topology::keep_declared(
        inner.clone(),
        topo.clone(),
        async move { watcher.closed().await },
    ));
    let watcher = tx.clone();
    tokio::spawn(suspects::poll(
        inner.clone(),
        inner.suspects.group(&topo),
        async move { watcher.closed().await },
    ));
    Ok(Box::pin(Intake {
        rx: Some(rx),
        pumps,
    }))
}

/// The subscription's stream. Dropping it stops intake; the deliveries waiting in it
/// are requeued only once every consumer is cancelled: requeued earlier, a quorum queue
/// may hand one straight back to the consumer being cancelled, where it would arrive
/// after `basic.cancel-ok`, be discarded by the client and come back when the channel
/// closes, counted as a return nobody explains (a suspect).
struct Intake {
    /// `None` only while being dropped.
    rx: Option<mpsc::Receiver<Delivery>>,
    /// The channels' pumps, which end once their consumers are cancelled.
    pumps: Vec<tokio::task::JoinHandle<()>>,
}

impl futures::Stream for Intake {
    type Item = Result<Delivery, TransportError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        match self.rx.as_mut() {
            Some(rx) => rx.poll_recv(cx).map(|d| d.map(Ok)),
            None => std::task::Poll::Ready(None),
        }
    }
}

impl Drop for Intake {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        // Closing makes the pumps stop, each after cancelling its consumer; dropping
        // the receiver then drops (requeues) what waits in it.
        rx.close();
        let pumps = std::mem::take(&mut self.pumps);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for pump in pumps {
                    let _ = pump.await;
                }
                drop(rx);
            });
        }
    }
}

/// Opens a channel and starts a consumer on it with `prefetch`, declaring the group's
/// topology first when `declare` is set.
async fn start_session(
    inner: &Arc<Inner>,
    topo: &GroupTopology,
    prefetch: u16,
    declare: bool,
) -> Result<Session, TransportError> {
    let link = inner.link_bounded().await?;
    if declare {
        topology::declare_or_reuse(inner, &link, topo).await?;
    }
    let channel = inner.open_channel(&link).await?;
    let r = async {
        inner
            .bounded(
                "basic.qos",
                channel.basic_qos(prefetch, BasicQosOptions { global: false }),
            )
            .await?;
        inner
            .bounded(
                "basic.consume",
                channel.basic_consume(
                    topo.queue.clone(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await
    }
    .await;
    match r {
        Ok(consumer) => {
            let acks = ChannelAcks::start(
                channel.clone(),
                inner.cfg.op_timeout,
                usize::from(prefetch) * 2 + 64,
            );
            inner.track(&acks);
            Ok(Session {
                channel,
                consumer,
                acks,
            })
        }
        Err(e) if e.kind() == TransportErrorKind::Timeout => {
            // The broker may still register the consumer: the channel goes, and what it
            // would deliver goes back to the queue when its close is done.
            inner.abandon(channel);
            Err(e)
        }
        Err(e) => {
            if channel.status().connected() {
                let _ = tokio::time::timeout(inner.cfg.op_timeout, channel.close(200, "OK".into()))
                    .await;
            }
            Err(e)
        }
    }
}

/// Feeds one channel's deliveries to the stream until it is dropped or the transport
/// closed, starting a new session (reconnecting if needed) whenever one ends.
async fn run(
    inner: Arc<Inner>,
    topo: Arc<GroupTopology>,
    first: Session,
    prefetch: u16,
    tx: mpsc::Sender<Delivery>,
) {
    let mut next = Some(first);
    loop {
        let session = match next.take() {
            Some(s) => s,
            None => match resume(&inner, &topo, prefetch, &tx).await {
                Some(s) => s,
                None => return,
            },
        };
        match pump(&inner, &topo, session, &tx).await {
            Ended::Stop => return,
            Ended::Lost => {
                tracing::warn!(group = %topo.group, "consumer lost; resuming");
            }
        }
    }
}

enum Ended {
    Stop,
    Lost,
}

async fn pump(
    inner: &Arc<Inner>,
    topo: &Arc<GroupTopology>,
    mut s: Session,
    tx: &mpsc::Sender<Delivery>,
) -> Ended {
    loop {
        let next = tokio::select! {
            biased;
            () = tx.closed() => {
                stop(inner, s).await;
                return Ended::Stop;
            }
            () = inner.closed.cancelled() => {
                s.acks.retire();
                return Ended::Stop;
            }
            n = s.consumer.next() => n,
        };
        match next {
            Some(Ok(d)) => {
                if suspects::is_suspect(inner, topo, &d.properties) {
                    // Moved to the suspects queue, to run alone (see `suspects.rs`).
                    let gs = inner.suspects.group(topo);
                    let payload = d.data.clone();
                    let acker = acker_of(inner, topo, &s.acks, d, None);
                    let group = topo.group.clone();
                    tokio::spawn(async move {
                        match acker.move_to_suspects(&payload).await {
                            Ok(()) => gs.moved(),
                            Err(e) => {
                                tracing::warn!(%group, error = %e, "suspect not moved; the broker will redeliver it");
                            }
                        }
                    });
                    continue;
                }
                let delivery = to_delivery(inner, topo, &s.acks, d);
                if let Err(unsent) = tx.send(delivery).await {
                    // The stream was dropped; the delivery requeues itself when dropped,
                    // after the cancel (see `Intake`).
                    stop(inner, s).await;
                    drop(unsent);
                    return Ended::Stop;
                }
            }
            Some(Err(e)) => {
                tracing::warn!(group = %topo.group, error = %inner.error("consume", &e), "consumer failed");
            }
            None => {
                // Everything handed out on this channel comes back: not a crash.
                for id in s.acks.lost() {
                    inner.suspects.explain(Some(&id));
                }
                s.acks.retire();
                return Ended::Lost;
            }
        }
    }
}

fn acker_of(
    inner: &Arc<Inner>,
    topo: &Arc<GroupTopology>,
    acks: &Arc<ChannelAcks>,
    d: lapin::message::Delivery,
    crashes: Option<u32>,
) -> AmqpAcker {
    acks.register(
        d.delivery_tag,
        d.properties.message_id().as_ref().map(|s| s.as_str()),
    );
    AmqpAcker {
        tag: d.delivery_tag,
        acks: acks.clone(),
        topo: topo.clone(),
        inner: inner.clone(),
        origin: Origin {
            exchange: d.exchange,
            routing_key: d.routing_key,
            properties: d.properties,
        },
        crashes,
        settled: false,
    }
}

fn to_delivery(
    inner: &Arc<Inner>,
    topo: &Arc<GroupTopology>,
    acks: &Arc<ChannelAcks>,
    mut d: lapin::message::Delivery,
) -> Delivery {
    let body = std::mem::take(&mut d.data);
    let (envelope, defect) = wire::envelope(&d.properties, body);
    Delivery::new(envelope, acker_of(inner, topo, acks, d, None)).with_defect(defect)
}

/// Cancels the consumer, requeues what it had prefetched, and lets the channel close
/// once the deliveries handed out are settled.
async fn stop(inner: &Arc<Inner>, mut s: Session) {
    let tag = s.consumer.tag();
    let cancelled = inner
        .bounded(
            "basic.cancel",
            s.channel.basic_cancel(tag, BasicCancelOptions::default()),
        )
        .await;
    if cancelled.is_ok() {
        // Deliveries already on their way arrive before the consumer's end.
        let drain = async {
            while let Some(Ok(d)) = s.consumer.next().await {
                // Requeued by us: a return that is not a crash.
                let id = d.properties.message_id().as_ref().map(|s| s.as_str());
                inner.suspects.explain(id);
                s.acks.register(d.delivery_tag, id);
                s.acks.requeue(d.delivery_tag);
            }
        };
        let _ = tokio::time::timeout(inner.cfg.op_timeout, drain).await;
    }
    s.acks.retire();
}

/// Starts a new session after one was lost, with capped jittered backoff, declaring the
/// topology again (the broker may have lost what was not durable, or expired it). `None`
/// when the stream was dropped or the transport closed meanwhile.
async fn resume(
    inner: &Arc<Inner>,
    topo: &Arc<GroupTopology>,
    prefetch: u16,
    tx: &mpsc::Sender<Delivery>,
) -> Option<Session> {
    let mut backoff = Backoff::new(Duration::from_millis(100), inner.cfg.max_reconnect_delay);
    loop {
        let attempt = tokio::select! {
            biased;
            () = tx.closed() => return None,
            () = inner.closed.cancelled() => return None,
            r = async {
                let _ = inner.link().await?;
                start_session(inner, topo, prefetch, true).await
            } => r,
        };
        match attempt {
            Ok(s) => {
                tracing::info!(group = %topo.group, "consumer resumed");
                return Some(s);
            }
            Err(e) => {
                let wait = backoff.pause();
                tracing::warn!(group = %topo.group, error = %e, retry_in = ?wait, "could not resume consuming");
                tokio::select! {
                    () = tx.closed() => return None,
                    () = inner.closed.cancelled() => return None,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::shares;

    #[test]
    fn the_prefetch_is_split_without_loss_and_never_below_one() {
        assert_eq!(shares(100, 2), [50, 50]);
        assert_eq!(shares(5, 2), [3, 2]);
        assert_eq!(shares(1, 2), [1]);
        assert_eq!(shares(3, 8), [1, 1, 1]);
        assert_eq!(shares(7, 1), [7]);
        assert_eq!(shares(10, 3), [4, 3, 3]);
        for (total, n) in [(100u16, 3u16), (65_535, 7), (2, 2), (9, 4)] {
            let s = shares(total, n);
            assert_eq!(
                s.iter().map(|&p| u32::from(p)).sum::<u32>(),
                u32::from(total)
            );
            assert!(s.iter().all(|&p| p >= 1));
        }
    }
}
