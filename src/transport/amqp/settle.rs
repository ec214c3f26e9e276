//! Settling a delivery: ack, or publish a copy (retry, defer, dead letter), await the
//! broker's confirm, then ack. A delivery dropped unsettled is requeued.

use super::{acks::ChannelAcks, connection::Inner, publish, topology::GroupTopology, wire};
use crate::{
    envelope::{Envelope, header},
    retry::Disposition,
    transport::{Acker, TransportError},
};
use futures::future::BoxFuture;
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
    pub(super) settled: bool,
}

impl Drop for AmqpAcker {
    fn drop(&mut self) {
        if !self.settled {
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
                self.acks.ack(self.tag).await
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
                        Vec::new(),
                    )
                    .await?;
                    // Crash window: the retry copy is confirmed, the original not acked.
                    failpoint!("steadfast::amqp::retry_confirmed_before_ack");
                }
                Disposition::Defer { delay } => {
                    // The copy carries the returns so far: deferring must not reset the
                    // delivery limit that stops a crash loop.
                    let returns = wire::returns(&self.origin.properties);
                    self.copy_to(
                        self.topo.tier_for(delay).clone(),
                        envelope.attempt,
                        &envelope,
                        false,
                        vec![(wire::RETURNS, returns.to_string())],
                    )
                    .await?;
                }
                Disposition::DeadLetter(failure) => {
                    let mut extra: Vec<(&'static str, String)> =
                        failure.headers(envelope.attempt).into_iter().collect();
                    extra.push((
                        header::ORIGINAL_DESTINATION,
                        format!("{}/{}", self.origin.exchange, self.origin.routing_key),
                    ));
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
            // The copy is durable (or nothing needed one): now the original may go. A
            // failed ack leaves the delivery to the broker, which redelivers it.
            self.settled = true;
            self.acks.ack(self.tag).await
        })
    }
}

impl AmqpAcker {
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
