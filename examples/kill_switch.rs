//! The kill switch: a handler whose dependency is down fails every message; the worker
//! trips its kill switch, stops taking messages and reports not ready; once the
//! dependency is back, the cooldown ends, a trial succeeds and every message is handled.
//! The in-memory transport stands in for a broker.
//!
//! Run it with:
//!
//! ```text
//! cargo run --example kill_switch
//! ```

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};
use steadfast::{
    Context, Envelope, HandlerError, Message, RetryPolicy, Worker,
    transport::{Transport, memory::MemoryTransport},
    worker::{KillSwitch, WorkerState},
};

#[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "orders.placed")]
struct OrderPlaced {
    order_id: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = MemoryTransport::new();
    let up = Arc::new(AtomicBool::new(false));
    let handled = Arc::new(AtomicU32::new(0));
    let (u, h) = (up.clone(), handled.clone());
    let worker = Worker::builder(broker.clone(), "billing")
        .handle(move |o: OrderPlaced, _cx: Context| {
            let (u, h) = (u.clone(), h.clone());
            async move {
                if !u.load(Ordering::SeqCst) {
                    return Err(HandlerError::msg("payment provider unreachable"));
                }
                h.fetch_add(1, Ordering::SeqCst);
                println!("  charged order {}", o.order_id);
                Ok(())
            }
        })
        .retry(RetryPolicy::exponential(Duration::from_millis(50)).max_attempts(10))
        .kill_switch(
            KillSwitch::new(0.15, 10, Duration::from_secs(60))
                .cooldown(Duration::from_millis(500))
                .trial(2),
        )
        .concurrency(4)
        .build()?;
    worker.declare().await?;
    let status = worker.status();
    for order_id in 1..=20 {
        broker
            .publish(&Envelope::encode(&OrderPlaced { order_id })?)
            .await?;
    }
    let run = tokio::spawn(worker.run_until(async move {
        while handled.load(Ordering::SeqCst) < 20 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }));

    while status.state() != WorkerState::Paused {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "kill switch tripped ({} trip): ready = {}, {} message(s) wait in the queue",
        status.kill_switch_trips(),
        status.is_ready(),
        broker.ready("billing")
    );
    println!("the payment provider is back");
    up.store(true, Ordering::SeqCst);
    run.await??;
    println!(
        "every order charged; the worker was {:?} at the end",
        status.state()
    );
    Ok(())
}
