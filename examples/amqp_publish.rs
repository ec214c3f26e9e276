//! Publishes a few orders and payments for `amqp_worker` to handle, each confirmed by
//! the broker, including one order that is refused and one payment that is retried.
//!
//! ```text
//! cargo run --features amqp --example amqp_worker      # first, so its queue exists
//! cargo run --features amqp --example amqp_publish
//! ```
//!
//! `AMQP_URL` picks the broker (default `amqp://guest:guest@127.0.0.1:5672/%2f`). Then
//! look at the dead letter with `rabbitmqctl list_queues name messages` (queue
//! `billing.dlq`).

use steadfast::{
    Envelope, Message,
    transport::{Transport, amqp::AmqpTransport},
};

/// An order was placed (the same wire shape as in `amqp_worker`).
#[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "orders.placed")]
pub struct OrderPlaced {
    /// The order's id.
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

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    // An exchange and queues of the example's own, so it runs beside any other worker
    // on the same broker (the two examples share them).
    let transport = AmqpTransport::builder(url)
        .exchange("example-amqp")
        .queue_prefix("example-amqp.")
        .connect()
        .await?;
    let mut batch = Vec::new();
    for order_id in 1..=5 {
        batch.push(Envelope::encode(&OrderPlaced {
            order_id,
            qty: if order_id == 3 { 0 } else { 2 },
        })?);
        batch.push(Envelope::encode(&PaymentReceived {
            order_id,
            cents: 1000 * order_id + if order_id == 4 { 7 } else { 0 },
        })?);
    }
    // Confirms are pipelined; each result says whether the broker took that message.
    let mut refused = 0;
    for (env, result) in batch.iter().zip(transport.publish_batch(&batch).await) {
        match result {
            Ok(()) => println!("published {} {}", env.name, env.id),
            Err(e) => {
                eprintln!("not published {} {}: {e}", env.name, env.id);
                refused += 1;
            }
        }
    }
    transport.close().await;
    if refused > 0 {
        // A script that runs this must see the failure, not an exit code of 0.
        return Err(format!(
            "{refused} of {} messages not published (is `amqp_worker` running? it declares the queue)",
            batch.len()
        )
        .into());
    }
    Ok(())
}
