//! Settling a delivery: ack, or publish a copy (retry, defer, dead letter), await the
//! broker's confirm, then ack. A delivery dropped unsettled is requeued.

use super::{acks::ChannelAcks, connection::Inner, publish, topology::GroupTopology, wire};
use crate::{
    envelope::{Envelope, header},
    retry::Disposition,
    transport::{Acker, TransportError},
};
use futures::future::BoxFuture;

/// The attempt header of a delivery, as the envelope reads it (1 when absent).
fn wire_attempt(props: &BasicProperties) -> u32 {
    let empty = lapin::types::FieldTable::default();
    let t = props.headers().as_ref().unwrap_or(&empty);
    t.inner()
        .iter()
        .find(|(k, _)| k.as_str().eq_ignore_ascii_case(header::ATTEMPT))
        .and_then(|(_, v)| wire::value_text(v).trim().parse::<u32>().ok())
        .unwrap_or(1)
        .max(1)
}
use lapin::{BasicProperties, types::ShortString};
use std::sync::Arc;

/// Where a delivery came from, for the dead-letter headers.
pub(super) struct Origin {
    pub(super) exchange: ShortString,
    pub(super) routing_key: ShortString,
    pub(super) properties: BasicProperties,
}

pub(super) struct AmqpAcker {
    pub(super) tag: u64,
    pub(super) acks: Arc<ChannelAcks>,
    pub(super) topo: Arc<GroupTopology>,
    pub(super) inner: Arc<Inner>,
    pub(super) origin: Origin,
    /// Set for a suspect: the crashes attributed to it so far, carried by every copy
    /// (which stays a suspect).
    pub(super) crashes: Option<u32>,
    pub(super) settled: bool,
}

impl Drop for AmqpAcker {
    fn drop(&mut self) {
        if !self.settled {
            // Going back to the broker for a reason that is not a crash (when the channel
            // is dead, its loss explained it already).
            if self.acks.is_open() {
                self.inner.suspects.explain(self.id());
            }
            self.acks.requeue(self.tag);
        }
    }
}

impl Acker for AmqpAcker {
    fn settle(
        mut self: Box<Self>,
        envelope: Envelope,
        disposition: Disposition,
    ) -> BoxFuture<'static, Result<(), TransportError>> {
        if matches!(disposition, Disposition::Ack) {
            // The common case, in a future of its own: the one below holds a copy's
            // properties and publish, several times the size, allocated per message.
            drop(envelope);
            return Box::pin(async move {
                self.settled = true;
                let r = self.acks.ack(self.tag).await;
                self.after_ack(&r);
                r
            });
        }
        Box::pin(async move {
            match disposition {
                // Settled by the future above.
                Disposition::Ack => {}
                Disposition::Retry { delay } => {
                    let attempt = envelope.attempt.saturating_add(1);
                    self.copy_to(
                        self.topo.tier_for(delay).clone(),
                        attempt,
                        &envelope,
                        false,
                        self.crash_header(),
                    )
                    .await?;
                    // Crash window: the retry copy is confirmed, the original not acked.
                    failpoint!("steadfast::amqp::retry_confirmed_before_ack");
                }
                Disposition::Defer { delay } => {
                    self.copy_to(
                        self.topo.tier_for(delay).clone(),
                        envelope.attempt,
                        &envelope,
                        false,
                        self.crash_header(),
                    )
                    .await?;
                }
                Disposition::DeadLetter(failure) => {
                    let mut extra: Vec<(&'static str, String)> =
                        failure.headers(envelope.attempt).into_iter().collect();
                    extra.push((header::ORIGINAL_DESTINATION, self.destination()));
                    extra.push((header::ORIGINAL_GROUP, self.topo.group.clone()));
                    if let Some(id) = crate::transport::dead_letter_id(&envelope) {
                        extra.push((header::DEAD_LETTER_ID, id));
                    }
                    self.copy_to(
                        self.topo.dlq.clone(),
                        envelope.attempt,
                        &envelope,
                        true,
                        extra,
                    )
                    .await?;
                    // Crash window: the dead letter is confirmed, the original not acked.
                    failpoint!("steadfast::amqp::dead_letter_confirmed_before_ack");
                }
            }
            // A copy's delivery count starts again: what this process explained about the
            // original does not apply to it.
            self.inner.suspects.forget(self.id());
            // The copy is durable (or nothing needed one): now the original may go. A
            // failed ack leaves the delivery to the broker, which redelivers it.
            self.settled = true;
            let r = self.acks.ack(self.tag).await;
            self.after_ack(&r);
            r
        })
    }
}

impl AmqpAcker {
    fn id(&self) -> Option<&str> {
        self.origin
            .properties
            .message_id()
            .as_ref()
            .map(ShortString::as_str)
    }

    /// A delivery whose ack did not go out comes back: its channel's loss explains that
    /// return, or, on a live channel, this.
    fn after_ack(&self, r: &Result<(), TransportError>) {
        if r.is_err() && self.acks.is_open() {
            self.inner.suspects.explain(self.id());
        }
    }

    /// Where the message was first delivered from: this delivery's exchange and routing
    /// key, or those a moved suspect kept.
    fn destination(&self) -> String {
        wire::header_text(&self.origin.properties, wire::MOVED_FROM)
            .unwrap_or_else(|| format!("{}/{}", self.origin.exchange, self.origin.routing_key))
    }

    /// The crash count a copy carries (copies start the broker's count again).
    fn crash_header(&self) -> Vec<(&'static str, String)> {
        match self.crashes {
            None => Vec::new(),
            Some(n) => vec![(wire::CRASHES, n.to_string())],
        }
    }

    /// Moves a suspect to the group's suspects queue: a copy with the crashes so far,
    /// confirmed, then the original acked. On error the original goes back (dropped).
    pub(super) async fn move_to_suspects(mut self, payload: &[u8]) -> Result<(), TransportError> {
        if self.crashes.is_none() {
            self.crashes = Some(wire::crashes(&self.origin.properties).unwrap_or(0));
        }
        let mut extra = self.crash_header();
        extra.push((wire::MOVED_FROM, self.destination()));
        let props = wire::copy_properties(
            &self.origin.properties,
            wire_attempt(&self.origin.properties),
            false,
            extra,
        );
        publish::publish_raw(
            &self.inner,
            ShortString::from(""),
            self.topo.suspects.clone(),
            payload,
            props,
        )
        .await?;
        // Its count starts again in the suspects queue.
        self.inner.suspects.forget(self.id());
        self.settled = true;
        self.acks.ack(self.tag).await
    }
    /// Publishes a copy of the delivery to `queue` through the default exchange and
    /// waits for the broker's confirm. On error the acker stays unsettled, so dropping
    /// it requeues the original.
    async fn copy_to(
        &self,
        queue: ShortString,
        attempt: u32,
        envelope: &Envelope,
        keep_broker_headers: bool,
        extra: Vec<(&'static str, String)>,
    ) -> Result<(), TransportError> {
        let props =
            wire::copy_properties(&self.origin.properties, attempt, keep_broker_headers, extra);
        publish::publish_raw(
            &self.inner,
            ShortString::from(""),
            queue,
            &envelope.payload,
            props,
        )
        .await
    }
}
