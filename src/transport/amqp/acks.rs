//! Coalesced acknowledgements for one consumer channel.
//!
//! Settling a delivery queues its tag here; one task per channel flushes the queue: a
//! single `basic.ack` with `multiple=true` covers every queued tag below the lowest tag
//! still in flight, tags above it are acked one by one, and each settle learns whether
//! its frame went out. Requeues (deliveries dropped unsettled) go out first, one by one,
//! so a later `multiple` ack can never cover them. Under load a flush carries many
//! tags; when idle it goes out at once, so an ack waits well under a millisecond.
//!
//! The whole structure belongs to one channel *generation*: after a reconnect the new
//! channel has new tags and a new `ChannelAcks`, and a delivery of the dead channel can
//! only fail to settle — it is never acked on the new one.

use crate::transport::{TransportError, TransportErrorKind};
use lapin::{
    Channel,
    options::{BasicAckOptions, BasicNackOptions},
};
use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};
use tokio::sync::{Notify, oneshot};

type Done = oneshot::Sender<Result<(), TransportError>>;

enum Op {
    Ack(u64, Done),
    Requeue(u64),
}

#[derive(Default)]
struct State {
    /// Tags handed out and not yet queued for settling.
    in_flight: BTreeSet<u64>,
    queue: Vec<Op>,
    /// No new deliveries will arrive on this channel.
    retired: bool,
}

pub(super) struct ChannelAcks {
    channel: Channel,
    state: Mutex<State>,
    wake: Notify,
    timeout: Duration,
}

impl ChannelAcks {
    /// Starts the flusher of `channel`.
    pub(super) fn start(channel: Channel, timeout: Duration) -> Arc<Self> {
        let acks = Arc::new(Self {
            channel,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            timeout,
        });
        tokio::spawn(acks.clone().flusher());
        acks
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a tag handed out to the worker.
    pub(super) fn register(&self, tag: u64) {
        self.lock().in_flight.insert(tag);
    }

    /// No more deliveries come on this channel; the flusher ends once every delivery
    /// handed out is settled or dropped.
    pub(super) fn retire(&self) {
        self.lock().retired = true;
        self.wake.notify_one();
    }

    /// Acks `tag`; `Ok` once the ack frame went out on this channel.
    pub(super) async fn ack(&self, tag: u64) -> Result<(), TransportError> {
        let (tx, rx) = oneshot::channel();
        self.lock().queue.push(Op::Ack(tag, tx));
        self.wake.notify_one();
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(not_settled("the acknowledger stopped")),
        }
    }

    /// Puts `tag` back in the queue (a delivery dropped unsettled). Fire and forget: if
    /// the channel is gone, the broker has requeued it already.
    pub(super) fn requeue(&self, tag: u64) {
        self.lock().queue.push(Op::Requeue(tag));
        self.wake.notify_one();
    }

    async fn flusher(self: Arc<Self>) {
        loop {
            let notified = self.wake.notified();
            let taken = {
                let mut st = self.lock();
                if st.queue.is_empty() {
                    if st.retired && st.in_flight.is_empty() {
                        return;
                    }
                    None
                } else {
                    let ops = std::mem::take(&mut st.queue);
                    for op in &ops {
                        let tag = match op {
                            Op::Ack(t, _) | Op::Requeue(t) => *t,
                        };
                        st.in_flight.remove(&tag);
                    }
                    Some((ops, st.in_flight.first().copied()))
                }
            };
            match taken {
                Some((ops, low)) => self.flush(ops, low).await,
                None => notified.await,
            }
        }
    }

    async fn flush(&self, ops: Vec<Op>, low: Option<u64>) {
        let mut acks: Vec<(u64, Done)> = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Ack(t, done) => acks.push((t, done)),
                Op::Requeue(t) => {
                    let r = self
                        .bounded(self.channel.basic_nack(
                            t,
                            BasicNackOptions {
                                multiple: false,
                                requeue: true,
                            },
                        ))
                        .await;
                    if let Err(e) = r {
                        tracing::debug!(tag = t, error = %e, "requeue not sent; the broker requeues it when the channel closes");
                    }
                }
            }
        }
        if acks.is_empty() {
            return;
        }
        acks.sort_unstable_by_key(|(t, _)| *t);
        let split = low.map_or(acks.len(), |low| acks.partition_point(|(t, _)| *t < low));
        let mut results: Vec<Result<(), CloneableError>> = Vec::with_capacity(acks.len());
        let (below, above) = acks.split_at(split);
        if let Some((max, _)) = below.last() {
            let multiple = below.len() > 1;
            let r = self
                .bounded(self.channel.basic_ack(*max, BasicAckOptions { multiple }))
                .await;
            results.extend(below.iter().map(|_| r.clone()));
        }
        for (t, _) in above.iter() {
            let r = self
                .bounded(
                    self.channel
                        .basic_ack(*t, BasicAckOptions { multiple: false }),
                )
                .await;
            results.push(r);
        }
        for ((_, done), r) in acks.into_iter().zip(results) {
            let _ = done.send(r.map_err(Into::into));
        }
    }

    async fn bounded(
        &self,
        fut: impl std::future::Future<Output = lapin::Result<()>>,
    ) -> Result<(), CloneableError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(CloneableError(format!("the ack could not be sent: {e}"))),
            Err(_) => Err(CloneableError("the ack was not sent in time".to_owned())),
        }
    }
}

/// An error shared by every settle of one flush.
#[derive(Debug, Clone)]
struct CloneableError(String);

impl std::fmt::Display for CloneableError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<CloneableError> for TransportError {
    fn from(e: CloneableError) -> Self {
        not_settled(&e.0)
    }
}

fn not_settled(why: &str) -> TransportError {
    TransportError::new(
        TransportErrorKind::Connection,
        format!("delivery not settled ({why}); the broker will redeliver it"),
    )
}
