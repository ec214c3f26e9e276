//! Consuming: one channel per subscription with `basic.qos(prefetch)` and manual acks,
//! fed into a [`DeliveryStream`] that survives reconnects. Dropping the stream cancels
//! the consumer and requeues what was prefetched but not handed out; the channel stays
//! open until every delivery handed out is settled or dropped.

use super::QueueType;
use super::{
    acks::ChannelAcks,
    connection::Inner,
    settle::{AmqpAcker, Origin},
    topology::{self, GroupTopology},
    wire,
};
use crate::{
    error::ErrorKind,
    retry::{Disposition, Failure},
    transport::{Delivery, DeliveryStream, Subscription, TransportError},
};
use backon::BackoffBuilder;
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

pub(super) async fn subscribe(
    inner: Arc<Inner>,
    sub: Subscription,
) -> Result<DeliveryStream, TransportError> {
    let topo = Arc::new(GroupTopology::new(&inner.cfg, &sub)?);
    // The first session is set up here, so configuration errors reach the caller.
    let first = start_session(&inner, &topo).await?;
    let (tx, mut rx) = mpsc::channel::<Delivery>(usize::from(topo.prefetch));
    tokio::spawn(run(inner, topo, first, tx));
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|d| d.map(Ok)));
    Ok(Box::pin(stream))
}

async fn start_session(
    inner: &Arc<Inner>,
    topo: &GroupTopology,
) -> Result<Session, TransportError> {
    let link = inner.link_bounded().await?;
    let channel = inner.open_channel(&link).await?;
    let r = async {
        topology::declare(inner, &channel, topo).await?;
        inner
            .bounded(
                "basic.qos",
                channel.basic_qos(topo.prefetch, BasicQosOptions { global: false }),
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
            let acks = ChannelAcks::start(channel.clone(), inner.cfg.op_timeout);
            inner.track(&acks);
            Ok(Session {
                channel,
                consumer,
                acks,
            })
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

/// Feeds deliveries to the stream until it is dropped or the transport closed,
/// starting a new session (reconnecting if needed) whenever one ends.
async fn run(
    inner: Arc<Inner>,
    topo: Arc<GroupTopology>,
    first: Session,
    tx: mpsc::Sender<Delivery>,
) {
    let mut next = Some(first);
    loop {
        let session = match next.take() {
            Some(s) => s,
            None => match resume(&inner, &topo, &tx).await {
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
                let returns = wire::returns(&d.properties);
                let delivery = to_delivery(inner, topo, &s.acks, d);
                if inner.cfg.queue_type == QueueType::Quorum && returns > inner.cfg.delivery_limit {
                    // Returned unsettled more often than the limit across deferred
                    // copies (the broker counts only this copy's): a crash loop. Dead-letter
                    // it here, without a handler.
                    let reason = format!(
                        "delivery limit reached: returned unsettled {returns} times (limit {}); the handler may be crashing the worker",
                        inner.cfg.delivery_limit
                    );
                    let failure = Failure::new(ErrorKind::Permanent, reason);
                    let group = topo.group.clone();
                    tokio::spawn(async move {
                        // Not settled: the original stays in the queue and comes back.
                        if let Err(e) = delivery.settle(Disposition::DeadLetter(failure)).await {
                            tracing::warn!(%group, error = %e, "crash-loop message not dead-lettered; the broker will redeliver it");
                        }
                    });
                    continue;
                }
                if tx.send(delivery).await.is_err() {
                    // The stream was dropped; the delivery was dropped with the error and
                    // requeued itself.
                    stop(inner, s).await;
                    return Ended::Stop;
                }
            }
            Some(Err(e)) => {
                tracing::warn!(group = %topo.group, error = %inner.error("consume", &e), "consumer failed");
            }
            None => {
                s.acks.retire();
                return Ended::Lost;
            }
        }
    }
}

fn to_delivery(
    inner: &Arc<Inner>,
    topo: &Arc<GroupTopology>,
    acks: &Arc<ChannelAcks>,
    d: lapin::message::Delivery,
) -> Delivery {
    let (envelope, defect) = wire::envelope(&d.properties, d.data);
    acks.register(d.delivery_tag);
    let acker = AmqpAcker {
        tag: d.delivery_tag,
        acks: acks.clone(),
        topo: topo.clone(),
        inner: inner.clone(),
        origin: Origin {
            exchange: d.exchange,
            routing_key: d.routing_key,
            properties: d.properties,
        },
        settled: false,
    };
    Delivery::new(envelope, acker).with_defect(defect)
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
                s.acks.register(d.delivery_tag);
                s.acks.requeue(d.delivery_tag);
            }
        };
        let _ = tokio::time::timeout(inner.cfg.op_timeout, drain).await;
    }
    s.acks.retire();
}

/// Starts a new session after one was lost, with capped jittered backoff. `None` when
/// the stream was dropped or the transport closed meanwhile.
async fn resume(
    inner: &Arc<Inner>,
    topo: &Arc<GroupTopology>,
    tx: &mpsc::Sender<Delivery>,
) -> Option<Session> {
    let mut backoff = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(inner.cfg.max_reconnect_delay)
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        let attempt = tokio::select! {
            biased;
            () = tx.closed() => return None,
            () = inner.closed.cancelled() => return None,
            r = async {
                let _ = inner.link().await?;
                start_session(inner, topo).await
            } => r,
        };
        match attempt {
            Ok(s) => {
                tracing::info!(group = %topo.group, "consumer resumed");
                return Some(s);
            }
            Err(e) => {
                let wait = backoff.next().unwrap_or(inner.cfg.max_reconnect_delay);
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
