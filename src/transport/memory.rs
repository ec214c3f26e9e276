//! The in-memory transport: a broker in this process, with broker semantics.
//!
//! Made for users' tests and examples: messages are routed by name to every group bound
//! to it (publishing a name no group takes is an error, as with RabbitMQ's `mandatory`);
//! a retry waits on a timer (instant under tokio's paused time); a dead letter is kept
//! with its reason; a delivery dropped unsettled — a worker stopped mid-handler — goes
//! back to the front of its queue for the next worker. Nothing survives the process.

use super::{
    Acker, DeadLetter, DeadLetterFilter, DeadLetterReport, Delivery, DeliveryStream, Subscription,
    Transport, TransportError, TransportErrorKind,
};
use crate::{
    envelope::{Envelope, header},
    retry::Disposition,
};
use futures::future::BoxFuture;
use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
};
use tokio::sync::Notify;

/// A broker in memory. Cheap to clone; clones share the broker.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// use steadfast::{Envelope, transport::{Transport, memory::MemoryTransport}};
///
/// let broker = MemoryTransport::new();
/// broker.bind("audit", ["orders.placed"]);
/// broker.publish(&Envelope::new("orders.placed", &b"{}"[..])).await.unwrap();
/// assert_eq!(broker.ready("audit"), 1);
/// assert!(broker.publish(&Envelope::new("nobody.listens", &b"{}"[..])).await.is_err());
/// # });
/// ```
#[derive(Clone, Default)]
pub struct MemoryTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("MemoryTransport")
            .field("groups", &st.groups.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    bindings: HashMap<String, Vec<String>>,
    groups: HashMap<String, Group>,
    published: Vec<Envelope>,
}

#[derive(Default)]
struct Group {
    ready: VecDeque<Envelope>,
    unacked: usize,
    delayed: usize,
    dead: Vec<DeadLetter>,
    notify: Arc<Notify>,
}

impl MemoryTransport {
    /// An empty broker.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent, so a poisoned lock is safe.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Declares `group`'s queue and binds `names` to it (what `declare` does for a worker).
    pub fn bind(&self, group: &str, names: impl IntoIterator<Item = impl Into<String>>) {
        let mut st = self.lock();
        st.groups.entry(group.to_owned()).or_default();
        for name in names {
            let groups = st.bindings.entry(name.into()).or_default();
            if !groups.iter().any(|g| g == group) {
                groups.push(group.to_owned());
            }
        }
    }

    /// Messages waiting in `group`'s queue.
    pub fn ready(&self, group: &str) -> usize {
        self.lock().groups.get(group).map_or(0, |g| g.ready.len())
    }

    /// Messages handed out to a worker and not yet settled.
    pub fn unacked(&self, group: &str) -> usize {
        self.lock().groups.get(group).map_or(0, |g| g.unacked)
    }

    /// Messages waiting out a retry delay.
    pub fn delayed(&self, group: &str) -> usize {
        self.lock().groups.get(group).map_or(0, |g| g.delayed)
    }

    /// Nothing ready, unacked or delayed for `group`.
    pub fn is_idle(&self, group: &str) -> bool {
        self.lock()
            .groups
            .get(group)
            .is_none_or(|g| g.ready.is_empty() && g.unacked == 0 && g.delayed == 0)
    }

    /// The dead letters of `group`, oldest first.
    pub fn dead_letter_list(&self, group: &str) -> Vec<DeadLetter> {
        self.lock()
            .groups
            .get(group)
            .map(|g| g.dead.clone())
            .unwrap_or_default()
    }

    /// Every envelope published so far, in order (what your handlers sent).
    pub fn published(&self) -> Vec<Envelope> {
        self.lock().published.clone()
    }

    fn enqueue(&self, group: &str, env: Envelope, front: bool) {
        let mut st = self.lock();
        let g = st.groups.entry(group.to_owned()).or_default();
        if front {
            g.ready.push_front(env);
        } else {
            g.ready.push_back(env);
        }
        g.notify.notify_one();
    }

    /// Hands out the next ready message of `group`, waiting for one.
    async fn next(&self, group: &str) -> Envelope {
        loop {
            let notify = self
                .lock()
                .groups
                .entry(group.to_owned())
                .or_default()
                .notify
                .clone();
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                let g = st.groups.entry(group.to_owned()).or_default();
                if let Some(env) = g.ready.pop_front() {
                    g.unacked += 1;
                    // Another waiter may take the next one.
                    if !g.ready.is_empty() {
                        g.notify.notify_one();
                    }
                    return env;
                }
            }
            notified.await;
        }
    }
}

impl Transport for MemoryTransport {
    fn system(&self) -> &'static str {
        "memory"
    }

    fn declare<'a>(&'a self, sub: &'a Subscription) -> BoxFuture<'a, Result<(), TransportError>> {
        self.bind(&sub.group, sub.names.iter().cloned());
        Box::pin(async { Ok(()) })
    }

    fn subscribe<'a>(
        &'a self,
        sub: &'a Subscription,
    ) -> BoxFuture<'a, Result<DeliveryStream, TransportError>> {
        self.bind(&sub.group, sub.names.iter().cloned());
        let broker = self.clone();
        let group: Arc<str> = Arc::from(sub.group.as_str());
        let stream = futures::stream::unfold((broker, group), |(broker, group)| async move {
            let env = broker.next(&group).await;
            let acker = MemoryAcker {
                broker: broker.clone(),
                group: group.clone(),
                original: Some(env.clone()),
            };
            Some((Ok(Delivery::new(env, acker)), (broker, group)))
        });
        Box::pin(async move { Ok(Box::pin(stream) as DeliveryStream) })
    }

    fn publish<'a>(&'a self, envelope: &'a Envelope) -> BoxFuture<'a, Result<(), TransportError>> {
        let mut st = self.lock();
        let groups = st.bindings.get(&envelope.name).cloned().unwrap_or_default();
        if groups.is_empty() {
            let name = envelope.name.clone();
            return Box::pin(async move {
                Err(TransportError::new(
                    TransportErrorKind::Unroutable,
                    format!("no group is bound to message name `{name}`"),
                ))
            });
        }
        st.published.push(envelope.clone());
        for group in groups {
            let g = st.groups.entry(group).or_default();
            g.ready.push_back(envelope.clone());
            g.notify.notify_one();
        }
        Box::pin(async { Ok(()) })
    }

    fn dead_letters<'a>(
        &'a self,
        group: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<super::DeadLetter>, TransportError>> {
        let mut list = self.dead_letter_list(group);
        list.truncate(limit);
        Box::pin(async move { Ok(list) })
    }

    /// Moves the selected dead letters to the back of `group`'s queue (never to other groups bound to the name), in their order.
    fn replay_dead_letters_as<'a>(
        &'a self,
        group: &'a str,
        filter: &'a DeadLetterFilter,
        rewrite: &'a super::DeadLetterRewrite<'_>,
        progress: &'a (dyn Fn(&DeadLetter) + Send + Sync),
    ) -> BoxFuture<'a, Result<DeadLetterReport, TransportError>> {
        Box::pin(async move { Ok(self.take_dead_letters(group, filter, progress, Some(rewrite))) })
    }

    fn purge_dead_letters<'a>(
        &'a self,
        group: &'a str,
        filter: &'a DeadLetterFilter,
        progress: &'a (dyn Fn(&DeadLetter) + Send + Sync),
    ) -> BoxFuture<'a, Result<DeadLetterReport, TransportError>> {
        Box::pin(async move { Ok(self.take_dead_letters(group, filter, progress, None)) })
    }
}

impl MemoryTransport {
    fn take_dead_letters(
        &self,
        group: &str,
        filter: &DeadLetterFilter,
        progress: &(dyn Fn(&DeadLetter) + Send + Sync),
        replay: Option<&super::DeadLetterRewrite<'_>>,
    ) -> DeadLetterReport {
        let mut report = DeadLetterReport::default();
        let taken = {
            let mut st = self.lock();
            let Some(g) = st.groups.get_mut(group) else {
                return report;
            };
            let mut kept = Vec::with_capacity(g.dead.len());
            let mut taken = Vec::new();
            for dl in g.dead.drain(..) {
                report.scanned += 1;
                if filter.wants_more(report.selected) && filter.matches(&dl) {
                    report.selected += 1;
                    taken.push(dl);
                } else {
                    kept.push(dl);
                }
            }
            g.dead = kept;
            if let Some(rewrite) = replay {
                for dl in &taken {
                    g.ready.push_back(rewrite(dl));
                }
                g.notify.notify_one();
            }
            taken
        };
        for dl in &taken {
            report.done += 1;
            progress(dl);
        }
        report
    }
}

struct MemoryAcker {
    broker: MemoryTransport,
    group: Arc<str>,
    /// Kept until settled; a drop without settle puts it back (like a closed channel).
    original: Option<Envelope>,
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        if let Some(env) = self.original.take() {
            {
                let mut st = self.broker.lock();
                if let Some(g) = st.groups.get_mut(&*self.group) {
                    g.unacked -= 1;
                }
            }
            self.broker.enqueue(&self.group, env, true);
        }
    }
}

impl Acker for MemoryAcker {
    fn settle(
        mut self: Box<Self>,
        mut envelope: Envelope,
        disposition: Disposition,
    ) -> BoxFuture<'static, Result<(), TransportError>> {
        self.original = None;
        let broker = self.broker.clone();
        let group = self.group.clone();
        let mut st = broker.lock();
        let g = st.groups.entry(group.to_string()).or_default();
        g.unacked -= 1;
        let delay = match disposition {
            Disposition::Ack => None,
            Disposition::Retry { delay } => {
                envelope.attempt += 1;
                Some(delay)
            }
            Disposition::Defer { delay } => Some(delay),
            Disposition::DeadLetter(failure) => {
                let attempts = envelope.attempt;
                for (k, v) in failure.headers(attempts) {
                    envelope.headers.insert(k, v);
                }
                envelope
                    .headers
                    .insert(header::ORIGINAL_DESTINATION, envelope.name.clone());
                envelope
                    .headers
                    .insert(header::ORIGINAL_GROUP, group.to_string());
                if let Some(id) = super::dead_letter_id(&envelope) {
                    envelope.headers.insert(header::DEAD_LETTER_ID, id);
                }
                g.dead.push(DeadLetter::from_envelope(envelope.clone()));
                None
            }
        };
        if let Some(delay) = delay {
            g.delayed += 1;
            drop(st);
            let broker = broker.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let mut st = broker.lock();
                let g = st.groups.entry(group.to_string()).or_default();
                g.delayed -= 1;
                g.ready.push_back(envelope);
                g.notify.notify_one();
            });
        }
        Box::pin(async { Ok(()) })
    }
}
