//! The quickstart: a worker with two handlers on the in-memory transport, no broker
//! needed. It shows a success, a transient failure retried with backoff and then
//! succeeding, a permanent failure and an undecodable payload dead-lettered with their
//! reasons, and a duplicate skipped by the idempotency store.
//!
//! Run it with:
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! Swap `MemoryTransport::new()` for the RabbitMQ or NATS transport and the same
//! handlers run against a real broker (see `examples/amqp_worker.rs`, `nats_worker.rs`).

use std::{
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};
use steadfast::{
    Context, Envelope, HandlerError, Message, RetryPolicy, Worker,
    idempotency::memory::MemoryStore,
    transport::{Transport, memory::MemoryTransport},
    worker::Outcome,
};

/// An order was placed. `order_id` is the idempotency key: the same order twice is
/// handled once.
#[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "orders.placed")]
struct OrderPlaced {
    #[message(key)]
    order_id: u64,
    total_cents: i64,
}

/// A payment was captured.
#[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "payments.captured")]
struct PaymentCaptured {
    #[message(key)]
    payment_id: String,
    order_id: u64,
}

/// Pretends the payment gateway is busy on the first two tries of each call.
static GATEWAY_CALLS: AtomicU32 = AtomicU32::new(0);

async fn on_order(order: OrderPlaced, cx: Context) -> Result<(), HandlerError> {
    if order.total_cents <= 0 {
        // Retrying cannot fix bad data: straight to the dead-letter queue.
        return Err(HandlerError::msg(format!(
            "order {} has a non-positive total",
            order.order_id
        ))
        .permanent());
    }
    println!(
        "  handler: order {} for {} cents (attempt {})",
        order.order_id,
        order.total_cents,
        cx.attempt()
    );
    Ok(())
}

async fn on_payment(payment: PaymentCaptured, cx: Context) -> Result<(), HandlerError> {
    if GATEWAY_CALLS.fetch_add(1, Ordering::SeqCst) < 2 {
        // Any error turned into HandlerError with `?` is transient: retried with backoff.
        println!(
            "  handler: payment {} - gateway busy on attempt {}, will retry",
            payment.payment_id,
            cx.attempt()
        );
        return Err(HandlerError::msg("payment gateway busy"));
    }
    println!(
        "  handler: payment {} for order {} recorded (attempt {})",
        payment.payment_id,
        payment.order_id,
        cx.attempt()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = MemoryTransport::new();
    let worker = Worker::builder(broker.clone(), "billing")
        .handle(on_order)
        .handle(on_payment)
        .retry(
            RetryPolicy::exponential(Duration::from_millis(100))
                .max_attempts(4)
                .jitter(0.0),
        )
        .idempotency(MemoryStore::new())
        .concurrency(8)
        .on_outcome(|p| {
            let what = match &p.outcome {
                Outcome::Acked => "handled and acked".to_owned(),
                Outcome::Duplicate => {
                    "duplicate: skipped, acked without running the handler".to_owned()
                }
                Outcome::Retried { delay } => format!("failed; retry in {delay:?}"),
                Outcome::DeadLettered(f) => format!("dead-lettered ({}): {}", f.kind, f.reason),
                other => format!("{other:?}"),
            };
            println!("{:<18} attempt {}  {}", p.name, p.attempt, what);
        })
        .build()?;
    worker.declare().await?;

    // 1. A success.
    broker
        .publish(&Envelope::encode(&OrderPlaced {
            order_id: 1,
            total_cents: 4200,
        })?)
        .await?;
    // 2. A transient failure, retried with backoff, then a success.
    broker
        .publish(&Envelope::encode(&PaymentCaptured {
            payment_id: "pay-7".into(),
            order_id: 1,
        })?)
        .await?;
    // 3. A permanent failure.
    broker
        .publish(&Envelope::encode(&OrderPlaced {
            order_id: 2,
            total_cents: -5,
        })?)
        .await?;
    // 4. An undecodable payload.
    broker
        .publish(&Envelope::new(
            "orders.placed",
            &b"{\"order_id\": \"not a number\"}"[..],
        ))
        .await?;
    // 5. A duplicate of order 1 (another message, same idempotency key), sent once the
    //    first is done.
    let broker2 = broker.clone();
    let idle = async move {
        while !broker2.is_idle("billing") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        broker2
            .publish(
                &Envelope::encode(&OrderPlaced {
                    order_id: 1,
                    total_cents: 4200,
                })
                .expect("encodes"),
            )
            .await
            .expect("routable");
        tokio::time::sleep(Duration::from_millis(50)).await;
        while !broker2.is_idle("billing") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    worker.run_until(idle).await?;

    println!("\ndead-letter queue of group `billing`:");
    for dl in broker.dead_letters("billing", 100).await? {
        println!(
            "  {} {} after {} attempt(s): {}",
            dl.envelope.name,
            dl.id(),
            dl.attempts,
            dl.reason
        );
    }
    Ok(())
}
