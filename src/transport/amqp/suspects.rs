//! Suspects (see [`crate::transport::crash`]): a work-queue delivery that came back
//! unsettled more often than this process can explain, or that carries crashes from an
//! earlier copy, is moved — copied, confirmed, then acked — to the group's suspects queue
//! `{queue}.suspects`. The worker takes suspects from there with `basic.get`, one at a
//! time and only while nothing else runs, so that queue's delivery count
//! (`x-delivery-count`) counts exactly the crashes during which the suspect ran alone.
//! Deliveries waiting in the work queue's prefetch when a process dies gain a count
//! there, which only makes them suspects: it never counts as a crash.
//!
//! Returns this process can explain — the connection died under a delivery, or the
//! worker dropped one unsettled — are remembered by message id and subtracted.

use super::{
    acks::ChannelAcks,
    connection::Inner,
    settle::{AmqpAcker, Origin},
    topology::{self, GroupTopology},
    wire,
};
use crate::transport::{Delivery, TransportError, crash::Explained};
use lapin::{
    Channel,
    options::{BasicGetOptions, QueueDeclareOptions},
    types::FieldTable,
};
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

/// How often a subscription looks for suspects that other processes moved.
const POLL_EVERY: Duration = Duration::from_secs(5);

/// The suspects state of one transport.
#[derive(Default)]
pub(super) struct Suspects {
    groups: Mutex<HashMap<String, Arc<GroupSuspects>>>,
    /// Returns this process explains, by message id.
    explained: Explained<String>,
    /// Work queues that kept a lower delivery limit from an earlier version.
    work_limits: Mutex<HashMap<String, u32>>,
}

/// One group's suspects queue, as seen by this process.
pub(super) struct GroupSuspects {
    topo: Arc<GroupTopology>,
    waiting: AtomicBool,
    /// The channel suspects are taken on, with its acknowledger.
    getter: tokio::sync::Mutex<Option<(Channel, Arc<ChannelAcks>)>>,
}

impl Suspects {
    /// Remembers that the delivery of message `id` went back to the broker for a reason
    /// that is not a crash.
    pub(super) fn explain(&self, id: Option<&str>) {
        if let Some(id) = id {
            self.explained.explain(id.to_owned());
        }
    }

    /// Returns of message `id` this process explained.
    pub(super) fn explained(&self, id: Option<&str>) -> u32 {
        id.map_or(0, |id| self.explained.explained(id))
    }

    /// Forgets message `id` (settled, or moved to a queue whose count starts again).
    pub(super) fn forget(&self, id: Option<&str>) {
        if let Some(id) = id {
            self.explained.forget(id);
        }
    }

    /// The group's state, registered on first use.
    pub(super) fn group(&self, topo: &Arc<GroupTopology>) -> Arc<GroupSuspects> {
        let mut g = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        g.entry(topo.group.clone())
            .or_insert_with(|| {
                Arc::new(GroupSuspects {
                    topo: topo.clone(),
                    waiting: AtomicBool::new(false),
                    getter: tokio::sync::Mutex::new(None),
                })
            })
            .clone()
    }

    fn get(&self, group: &str) -> Option<Arc<GroupSuspects>> {
        let g = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        g.get(group).cloned()
    }

    /// Records that work queue `queue` kept an older, lower delivery limit.
    pub(super) fn set_work_limit(&self, queue: &str, limit: u32) {
        let mut m = self.work_limits.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(queue.to_owned(), limit);
    }

    /// The delivery limit work queue `queue` kept from an earlier version, if it did.
    pub(super) fn work_limit(&self, queue: &str) -> Option<u32> {
        let m = self.work_limits.lock().unwrap_or_else(|p| p.into_inner());
        m.get(queue).copied()
    }

    /// Whether suspects of `group` may be waiting.
    pub(super) fn waiting(&self, group: &str) -> bool {
        self.get(group)
            .is_some_and(|g| g.waiting.load(Ordering::Relaxed))
    }
}

impl GroupSuspects {
    /// Says a suspect was moved to the queue (by this process).
    pub(super) fn moved(&self) {
        self.waiting.store(true, Ordering::Relaxed);
    }
}

/// The delivery count at which a copy is made to start the broker's count again, well
/// below a queue's `x-delivery-limit` (`limit`): returns this process explains
/// (connection churn) must never reach the broker's limit, which would dead-letter the
/// message.
fn refresh_at(limit: u32) -> u32 {
    (limit / 2).max(2)
}

/// Whether a work-queue delivery is a suspect: it is a copy of a suspect (retried or
/// deferred), came back unsettled more often than this process explains, or is half-way
/// to the work queue's delivery limit (moving it starts the count again).
pub(super) fn is_suspect(
    inner: &Inner,
    topo: &GroupTopology,
    props: &lapin::BasicProperties,
) -> bool {
    let id = props.message_id().as_ref().map(|s| s.as_str());
    let returned = wire::returned(props);
    let limit = inner
        .suspects
        .work_limit(topo.queue.as_str())
        .unwrap_or_else(|| topology::work_delivery_limit(&inner.cfg));
    wire::crashes(props).is_some()
        || returned >= refresh_at(limit)
        || crate::transport::crash::is_suspect(
            u64::from(returned),
            u64::from(inner.suspects.explained(id)),
        )
}

/// Takes the next suspect of `group` with `basic.get`; `None` when the queue is empty.
pub(super) async fn take(
    inner: &Arc<Inner>,
    group: &str,
) -> Result<Option<Delivery>, TransportError> {
    let Some(gs) = inner.suspects.get(group) else {
        return Ok(None);
    };
    let mut getter = gs.getter.lock().await;
    let (ch, acks) = match &*getter {
        Some((ch, acks)) if ch.status().connected() => (ch.clone(), acks.clone()),
        _ => {
            if let Some((_, old)) = getter.take() {
                // The suspect taken on the dead channel comes back: not a crash.
                for id in old.lost() {
                    inner.suspects.explain(Some(&id));
                }
                old.retire();
            }
            let link = inner.link_bounded().await?;
            let ch = inner.open_channel(&link).await?;
            let acks = ChannelAcks::start(ch.clone(), inner.cfg.op_timeout, 1);
            inner.track(&acks);
            *getter = Some((ch.clone(), acks.clone()));
            (ch, acks)
        }
    };
    loop {
        let got = inner
            .bounded(
                "basic.get",
                ch.basic_get(gs.topo.suspects.clone(), BasicGetOptions { no_ack: false }),
            )
            .await;
        let msg = match got {
            Ok(Some(m)) => m,
            Ok(None) => {
                gs.waiting.store(false, Ordering::Relaxed);
                return Ok(None);
            }
            Err(e) => {
                gs.waiting.store(false, Ordering::Relaxed);
                // A late answer to this `basic.get` would take the next one's place:
                // the channel goes, and with it what it holds (back to the queue).
                if let Some((ch, old)) = getter.take() {
                    for id in old.lost() {
                        inner.suspects.explain(Some(&id));
                    }
                    old.retire();
                    inner.abandon(ch);
                }
                return Err(e);
            }
        };
        gs.waiting.store(msg.message_count > 0, Ordering::Relaxed);
        let d = msg.delivery;
        let id = d.properties.message_id().as_ref().map(|s| s.as_str());
        let returned = wire::returned(&d.properties);
        // Crashes before this copy, plus this copy's returns this process cannot explain.
        let crashes = wire::crashes(&d.properties)
            .unwrap_or(0)
            .saturating_add(returned.saturating_sub(inner.suspects.explained(id)));
        acks.register(d.delivery_tag, id);
        let payload = d.data;
        let acker = AmqpAcker {
            tag: d.delivery_tag,
            acks: acks.clone(),
            topo: gs.topo.clone(),
            inner: inner.clone(),
            origin: Origin {
                exchange: d.exchange,
                routing_key: d.routing_key,
                properties: d.properties,
            },
            crashes: Some(crashes),
            settled: false,
        };
        if returned >= refresh_at(inner.cfg.delivery_limit) {
            // Half-way to the broker's limit: a copy with the crashes so far starts the
            // count again (at the queue's tail).
            acker.move_to_suspects(&payload).await?;
            continue;
        }
        let (envelope, defect) = wire::envelope(&acker.origin.properties, payload);
        return Ok(Some(
            Delivery::new(envelope, acker)
                .with_defect(defect)
                .alone(crashes),
        ));
    }
}

/// Looks every [`POLL_EVERY`] for suspects that other processes moved (or that a
/// process left when it died), until `stop` completes.
pub(super) async fn poll(
    inner: Arc<Inner>,
    gs: Arc<GroupSuspects>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut ch: Option<Channel> = None;
    loop {
        tokio::select! {
            () = &mut stop => break,
            () = inner.closed.cancelled() => break,
            () = tokio::time::sleep(POLL_EVERY) => {}
        }
        if gs.waiting.load(Ordering::Relaxed) {
            continue;
        }
        if ch.as_ref().is_none_or(|c| !c.status().connected()) {
            ch = match inner.link_bounded().await {
                Ok(link) => inner.open_channel(&link).await.ok(),
                Err(_) => None,
            };
        }
        let Some(c) = &ch else { continue };
        let declared = inner
            .bounded(
                "queue.declare (passive)",
                c.queue_declare(
                    gs.topo.suspects.clone(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await;
        match declared {
            Ok(q) if q.message_count() > 0 => gs.waiting.store(true, Ordering::Relaxed),
            Ok(_) => {}
            Err(_) => {
                if let Some(c) = ch.take() {
                    inner.abandon(c);
                }
            }
        }
    }
    if let Some(c) = ch
        && c.status().connected()
    {
        let _ = tokio::time::timeout(inner.cfg.op_timeout, c.close(200, "OK".into())).await;
    }
}
