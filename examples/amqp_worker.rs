//! A worker on RabbitMQ: an order handler and a payment handler in one consumer group,
//! with retries held by the broker and dead letters with reasons.
//!
//! ```text
//! cargo run --features amqp --example amqp_worker      # then, in another terminal:
//! cargo run --features amqp --example amqp_publish
//! ```
//!
//! `AMQP_URL` picks the broker (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//! Stop it with ctrl-c: intake stops, in-flight messages finish, then it exits.
//! An order with `qty == 0` is refused for good (dead-lettered at once); a payment whose
//! amount ends in 7 fails twice, then succeeds on its third attempt.

use std::time::Duration;
use steadfast::{
    Context, HandlerError, Message, RetryPolicy, Worker, transport::amqp::AmqpTransport,
};

/// An order was placed.
#[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "orders.placed")]
pub struct OrderPlaced {
    /// The order's id: the idempotency key.
    #[message(key)]
    pub order_id: u64,
    /// How many items.
    pub qty: u32,
}

/// A payment was received.
#[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "payments.received")]
pub struct PaymentReceived {
    /// The order paid for.
    #[message(key)]
    pub order_id: u64,
    /// Amount in cents.
    pub cents: u64,
}

async fn on_order(order: OrderPlaced, cx: Context) -> Result<(), HandlerError> {
    if order.qty == 0 {
        return Err(
            HandlerError::msg(format!("order {} has no items", order.order_id)).permanent(),
        );
    }
    println!(
        "order {} ({} items), attempt {}",
        order.order_id,
        order.qty,
        cx.attempt()
    );
    Ok(())
}

async fn on_payment(payment: PaymentReceived, cx: Context) -> Result<(), HandlerError> {
    if payment.cents % 10 == 7 && cx.attempt() < 3 {
        return Err(HandlerError::msg("payment gateway timed out"));
    }
    println!(
        "payment of {} cents for order {}, attempt {}",
        payment.cents,
        payment.order_id,
        cx.attempt()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    // An exchange and queues of the example's own, so it runs beside any other worker
    // on the same broker (the two examples share them).
    let transport = AmqpTransport::builder(url)
        .exchange("example-amqp")
        .queue_prefix("example-amqp.")
        .connect()
        .await?;
    println!("connected: {transport:?}");
    let worker = Worker::builder(transport, "billing")
        .handle(on_order)
        .handle(on_payment)
        .retry(
            RetryPolicy::exponential(Duration::from_millis(500))
                .max_attempts(5)
                .max_delay(Duration::from_secs(10)),
        )
        .concurrency(32)
        .handler_timeout(Duration::from_secs(10))
        .build()?;
    worker.run().await?;
    Ok(())
}
