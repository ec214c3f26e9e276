//! Coalesced acknowledgements for one consumer channel.
//!
//! Settling a delivery queues its tag here; one task per channel flushes the queue: a
//! single `basic.ack` with `multiple=true` covers every queued tag below the lowest tag
//! still in flight; a tag above it waits up to [`HOLD`] (1 ms) for the lower ones to be
//! settled so that a later `multiple` ack covers it too, then goes out on its own. Each
//! settle learns whether its frame went out. Requeues (deliveries dropped unsettled) go
//! out first, one by one, so a later `multiple` ack can never cover them. When idle an
//! in-order ack goes out at once; under load one frame covers many messages.
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
    time::{Duration, Instant},
};

/// How long an ack above the lowest in-flight tag may wait for a `multiple` ack to
/// cover it before it is sent on its own.
const HOLD: Duration = Duration::from_millis(1);
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
    /// Message ids of the latest deliveries handed out (at most `recent_cap`): when the
    /// channel dies, these are the ones the broker may hand out again.
    recent: std::collections::VecDeque<String>,
}

pub(super) struct ChannelAcks {
    channel: Channel,
    recent_cap: usize,
    state: Mutex<State>,
    wake: Notify,
    timeout: Duration,
}

impl ChannelAcks {
    /// Starts the flusher of `channel`, which remembers the ids of its latest
    /// `recent_cap` deliveries.
    pub(super) fn start(channel: Channel, timeout: Duration, recent_cap: usize) -> Arc<Self> {
        let acks = Arc::new(Self {
            channel,
            recent_cap,
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

    /// Nothing handed out is waiting to be settled.
    pub(super) fn is_idle(&self) -> bool {
        let st = self.lock();
        st.in_flight.is_empty() && st.queue.is_empty()
    }

    /// Records a tag handed out to the worker, with its message id.
    pub(super) fn register(&self, tag: u64, id: Option<&str>) {
        let mut st = self.lock();
        st.in_flight.insert(tag);
        if let Some(id) = id {
            if st.recent.len() >= self.recent_cap {
                st.recent.pop_front();
            }
            st.recent.push_back(id.to_owned());
        }
    }

    /// The channel died: the ids of its latest deliveries, which the broker hands out
    /// again unless their acks got through (a return this process explains).
    pub(super) fn lost(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().recent).into()
    }

    /// Whether the channel is still open.
    pub(super) fn is_open(&self) -> bool {
        self.channel.status().connected()
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
        // Acks above the lowest in-flight tag, held back briefly so that a later
        // `multiple` ack can cover them.
        let mut held: Vec<(u64, Done, Instant)> = Vec::new();
        loop {
            let notified = self.wake.notified();
            let (requeues, low, done) = {
                let mut st = self.lock();
                let ops = std::mem::take(&mut st.queue);
                let now = Instant::now();
                let mut requeues = Vec::new();
                for op in ops {
                    match op {
                        Op::Ack(t, done) => {
                            st.in_flight.remove(&t);
                            held.push((t, done, now));
                        }
                        Op::Requeue(t) => {
                            st.in_flight.remove(&t);
                            requeues.push(t);
                        }
                    }
                }
                let done = st.retired && st.in_flight.is_empty() && held.is_empty();
                (requeues, st.in_flight.first().copied(), done)
            };
            if done && requeues.is_empty() {
                return;
            }
            for t in requeues {
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
            self.flush(&mut held, low).await;
            match held.iter().map(|h| h.2).min() {
                Some(oldest) => {
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep_until((oldest + HOLD).into()) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Sends what `held` allows: one `multiple` ack for every tag below `low`, and single
    /// acks for the tags above it that were held for [`HOLD`] already.
    async fn flush(&self, held: &mut Vec<(u64, Done, Instant)>, low: Option<u64>) {
        if held.is_empty() {
            return;
        }
        held.sort_unstable_by_key(|h| h.0);
        let split = low.map_or(held.len(), |low| held.partition_point(|h| h.0 < low));
        let below: Vec<_> = held.drain(..split).collect();
        if let Some((max, _, _)) = below.last() {
            let multiple = below.len() > 1;
            let r = self
                .bounded(self.channel.basic_ack(*max, BasicAckOptions { multiple }))
                .await;
            for (_, done, _) in below {
                let _ = done.send(r.clone().map_err(Into::into));
            }
        }
        let now = Instant::now();
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(held)
            .into_iter()
            .partition(|h| now.duration_since(h.2) >= HOLD || self.lock().retired);
        *held = keep;
        if due.is_empty() {
            return;
        }
        // Frames go out in call order; their results are awaited together.
        let sends = due.iter().map(|(t, _, _)| {
            self.bounded(
                self.channel
                    .basic_ack(*t, BasicAckOptions { multiple: false }),
            )
        });
        let results = futures::future::join_all(sends).await;
        for ((_, done, _), r) in due.into_iter().zip(results) {
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
