//! A worker on NATS JetStream with two handlers: orders and payments.
//!
//! It declares its stream and consumer, publishes a few messages itself (one of them
//! invalid, one that fails once), handles them, and stops once all are settled (or on
//! ctrl-c). The handler code is the same as in the RabbitMQ example; only the transport
//! differs.
//!
//! ```text
//! NATS_URL=nats://127.0.0.1:4222 cargo run --example nats_worker --features nats
//! ```

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};
use steadfast::{
    Context, Envelope, HandlerError, Message, RetryPolicy, Worker,
    transport::{Transport, nats::NatsTransport},
    worker::Outcome,
};

/// An order was placed.
#[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "orders.placed")]
struct OrderPlaced {
    #[message(key)]
    order_id: u64,
    amount_cents: u64,
}

/// A payment was captured for an order.
#[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "payments.captured")]
struct PaymentCaptured {
    #[message(key)]
    order_id: u64,
    amount_cents: u64,
}

/// An order of zero is a bug upstream: no retry will fix it, so it is dead-lettered.
async fn on_order(msg: OrderPlaced, cx: Context) -> Result<(), HandlerError> {
    if msg.amount_cents == 0 {
        return Err(HandlerError::msg(format!("order {} has no amount", msg.order_id)).permanent());
    }
    println!(
        "order {} for {} cents (attempt {})",
        msg.order_id,
        msg.amount_cents,
        cx.attempt()
    );
    Ok(())
}

/// The ledger is flaky on a first attempt: the error is transient and the broker holds
/// the retry for the policy's delay.
async fn on_payment(msg: PaymentCaptured, cx: Context) -> Result<(), HandlerError> {
    if cx.attempt() == 1 && msg.order_id.is_multiple_of(2) {
        return Err(HandlerError::msg("ledger busy, try again"));
    }
    println!(
        "payment for order {}: {} cents (attempt {})",
        msg.order_id,
        msg.amount_cents,
        cx.attempt()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let transport = NatsTransport::builder(&url)
        .subject_prefix("example")
        .stream("EXAMPLE")
        .connect()
        .await?;

    let settled = Arc::new(AtomicUsize::new(0));
    let counter = settled.clone();
    let worker = Worker::builder(transport.clone(), "example-shop")
        .handle(on_order)
        .handle(on_payment)
        .retry(RetryPolicy::exponential(Duration::from_millis(500)).max_attempts(4))
        .concurrency(16)
        .on_outcome(move |p| {
            if !matches!(p.outcome, Outcome::Retried { .. }) {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            println!("  -> {} {:?}", p.name, p.outcome);
        })
        .build()?;
    worker.declare().await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    let run = tokio::spawn(worker.run_until(async move { token.cancelled().await }));

    let mut sent = 0;
    for order_id in 1..=3 {
        let amount_cents = order_id * 1250;
        transport
            .publish(&Envelope::encode(&OrderPlaced {
                order_id,
                amount_cents,
            })?)
            .await?;
        transport
            .publish(&Envelope::encode(&PaymentCaptured {
                order_id,
                amount_cents,
            })?)
            .await?;
        sent += 2;
    }
    // One bad order: dead-lettered with its reason.
    transport
        .publish(&Envelope::encode(&OrderPlaced {
            order_id: 99,
            amount_cents: 0,
        })?)
        .await?;
    sent += 1;

    let done = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while settled.load(Ordering::SeqCst) < sent && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        () = done => {}
        () = steadfast::worker::shutdown_signal() => {}
    }
    stop.cancel();
    run.await??;
    for dl in transport.dead_letters("example-shop", 10).await? {
        println!("dead letter {}: {}", dl.id(), dl.reason);
    }
    transport.close().await;
    Ok(())
}
