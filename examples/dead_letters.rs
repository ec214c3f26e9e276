//! Dead letters, found and replayed from the library: a handler with a bug dead-letters
//! every order; once "fixed", only the orders of one message name are replayed (ids kept,
//! attempt reset) and handled, and the rest stay dead letters. The in-memory transport
//! stands in for a broker; the `steadfast` binary (`--features cli`) does the same against
//! RabbitMQ and NATS (`steadfast dlq list|show|replay|purge`, see `docs/dead-letters.md`).
//!
//! Run it with:
//!
//! ```text
//! cargo run --example dead_letters
//! ```

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};
use steadfast::{
    Context, Envelope, HandlerError, Message, Worker,
    envelope::header,
    transport::{DeadLetterFilter, Transport, memory::MemoryTransport},
};

#[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "orders.placed")]
struct OrderPlaced {
    order_id: u64,
}

#[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "orders.cancelled")]
struct OrderCancelled {
    order_id: u64,
}

async fn drain(broker: &MemoryTransport, worker: Worker) -> Result<(), Box<dyn std::error::Error>> {
    let b = broker.clone();
    worker
        .run_until(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            while !b.is_idle("billing") {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = MemoryTransport::new();
    let fixed = Arc::new(AtomicBool::new(false));
    let build = |fixed: Arc<AtomicBool>| {
        Worker::builder(broker.clone(), "billing")
            .handle(move |o: OrderPlaced, cx: Context| {
                let fixed = fixed.clone();
                async move {
                    if !fixed.load(Ordering::SeqCst) {
                        return Err(HandlerError::msg("bug: tax table missing").permanent());
                    }
                    println!(
                        "  handled order {} (id {}, attempt {}, replay #{})",
                        o.order_id,
                        cx.id(),
                        cx.attempt(),
                        cx.headers().get(header::REPLAY_COUNT).unwrap_or("-")
                    );
                    Ok(())
                }
            })
            .handle(|_: OrderCancelled, _cx: Context| async {
                Err::<(), _>(HandlerError::msg("cancellations not supported yet").permanent())
            })
            .build()
    };

    println!("1. the handler has a bug: every message is dead-lettered");
    let worker = build(fixed.clone())?;
    worker.declare().await?;
    for order_id in 1..=3 {
        broker
            .publish(&Envelope::encode(&OrderPlaced { order_id })?)
            .await?;
        broker
            .publish(&Envelope::encode(&OrderCancelled { order_id })?)
            .await?;
    }
    drain(&broker, worker).await?;
    for dl in broker.dead_letters("billing", 100).await? {
        println!(
            "  dead letter {} {}: {}",
            dl.envelope.name,
            dl.id(),
            dl.reason
        );
    }

    println!("2. the fix is deployed; replay only `orders.placed`");
    fixed.store(true, Ordering::SeqCst);
    let only = DeadLetterFilter::default().name("orders.placed");
    let report = broker
        .replay_dead_letters("billing", &only, &|dl| println!("  replayed {}", dl.id()))
        .await?;
    println!("  {} of {} replayed", report.done, report.selected);
    drain(&broker, build(fixed.clone())?).await?;

    println!("3. what is left in the dead letters:");
    for dl in broker.dead_letters("billing", 100).await? {
        println!("  {} {}", dl.envelope.name, dl.id());
    }
    Ok(())
}
