//! Publishing with publisher confirms: persistent, mandatory (an unroutable message is
//! an error, never a silent drop), every wait bounded.

use super::{connection::Inner, topology::short, wire};
use crate::{
    envelope::Envelope,
    transport::{TransportError, TransportErrorKind, batch_failed},
};
use lapin::{
    BasicProperties, Confirmation, PublisherConfirm, options::BasicPublishOptions,
    types::ShortString,
};
use std::sync::Arc;

const MANDATORY: BasicPublishOptions = BasicPublishOptions {
    mandatory: true,
    immediate: false,
};

/// Publishes `envelope` to the exchange under its name; `Ok` once confirmed.
pub(super) async fn publish(inner: &Arc<Inner>, envelope: &Envelope) -> Result<(), TransportError> {
    let props = wire::properties(envelope)?;
    let rk = short("the message name", envelope.name.clone())?;
    let exchange = short("the exchange name", inner.cfg.exchange.clone())?;
    publish_raw(inner, exchange, rk, &envelope.payload, props).await
}

/// Publishes raw bytes; `Ok` once the broker confirmed and did not return them.
pub(super) async fn publish_raw(
    inner: &Arc<Inner>,
    exchange: ShortString,
    routing_key: ShortString,
    payload: &[u8],
    props: BasicProperties,
) -> Result<(), TransportError> {
    let ch = inner.publisher().await?;
    let what = routing_key.to_string();
    let confirm = inner
        .bounded(
            "basic.publish",
            ch.basic_publish(exchange, routing_key, MANDATORY, payload, props),
        )
        .await?;
    await_confirm(inner, &what, confirm).await
}

async fn await_confirm(
    inner: &Inner,
    routing_key: &str,
    confirm: PublisherConfirm,
) -> Result<(), TransportError> {
    match inner.bounded("publisher confirm", confirm).await? {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(ret)) | Confirmation::Nack(Some(ret)) => Err(TransportError::new(
            TransportErrorKind::Unroutable,
            format!(
                "RabbitMQ returned the message for `{routing_key}`: {} {} (no queue is bound to it)",
                ret.reply_code, ret.reply_text
            ),
        )),
        Confirmation::Nack(None) => Err(TransportError::new(
            TransportErrorKind::Rejected,
            format!("RabbitMQ refused the message for `{routing_key}` (nack)"),
        )),
        Confirmation::NotRequested => Err(TransportError::new(
            TransportErrorKind::Protocol,
            "publisher confirms are not enabled on the channel",
        )),
    }
}

/// Publishes every envelope, then awaits all confirms together (pipelined).
pub(super) async fn publish_batch(
    inner: &Arc<Inner>,
    envelopes: &[Envelope],
) -> Vec<Result<(), TransportError>> {
    let ready = async {
        let ch = inner.publisher().await?;
        Ok((ch, short("the exchange name", inner.cfg.exchange.clone())?))
    };
    let (ch, exchange) = match ready.await {
        Ok(r) => r,
        Err(e) => return batch_failed(envelopes.len(), &e),
    };
    let mut pending = Vec::with_capacity(envelopes.len());
    for env in envelopes {
        let sent = async {
            let props = wire::properties(env)?;
            let rk = short("the message name", env.name.clone())?;
            inner
                .bounded(
                    "basic.publish",
                    ch.basic_publish(exchange.clone(), rk, MANDATORY, &env.payload, props),
                )
                .await
        }
        .await;
        pending.push(sent);
    }
    let waits = pending
        .into_iter()
        .zip(envelopes)
        .map(|(sent, env)| async move {
            match sent {
                Ok(confirm) => await_confirm(inner, &env.name, confirm).await,
                Err(e) => Err(e),
            }
        });
    futures::future::join_all(waits).await
}
