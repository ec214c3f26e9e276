//! A worker on NATS JetStream with two handlers: orders and payments.
//!
//! It declares its stream and consumer, publishes a few messages itself (one of them
//! invalid, one that fails once), handles them, and stops once all are settled (or on
//! ctrl-c). The handler code is the same as in the RabbitMQ example; only the transport
//! differs.
//!
//! `NATS_URL` may name several servers of a cluster (seeds, tried in turn) and carry
//! credentials (`nats://user:password@host`, `nats://token@host`); `NATS_USER` with
//! `NATS_PASSWORD_FILE` gives them from a mounted secret instead, and `NATS_REPLICAS`
//! the replicas of the streams it creates.
//!
//! ```text
//! NATS_URL=nats://127.0.0.1:4222 cargo run --example nats_worker --features nats
//!
//! # the project's three-node cluster (scripts/brokers.sh nats-cluster start):
//! NATS_URL=nats://127.0.0.1:4251,nats://127.0.0.1:4252,nats://127.0.0.1:4253 NATS_REPLICAS=3 \
//!   cargo run --example nats_worker --features nats
//!
//! # a server that requires a user and password, the password from a file:
//! NATS_URL=nats://n1:4222,nats://n2:4222 NATS_USER=shop NATS_PASSWORD_FILE=/run/secrets/nats \
//!   cargo run --example nats_worker --features nats
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
    // One URL or a comma-separated list; credentials in it are sent as credentials and
    // never appear in logs or errors.
    let mut builder = NatsTransport::builder(&url)
        .subject_prefix("example")
        .stream("EXAMPLE");
    if let (Ok(user), Ok(path)) = (
        std::env::var("NATS_USER"),
        std::env::var("NATS_PASSWORD_FILE"),
    ) {
        let password = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read NATS_PASSWORD_FILE `{path}`: {}", e.kind()))?;
        builder = builder.user_and_password(user, password.trim_end());
    }
    if let Ok(n) = std::env::var("NATS_REPLICAS") {
        builder = builder.replicas(n.parse().map_err(|_| "NATS_REPLICAS: a number 1-5")?);
    }
    let transport = builder.connect().await?;

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
