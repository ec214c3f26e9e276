//! Orders → billing on SQLite and the in-memory transport, no broker needed.
//!
//! The orders service writes an order and its `OrderPlaced` message in one transaction;
//! the relay publishes the message once the transaction committed; the billing worker
//! charges each order exactly once through the transactional inbox, even when the broker
//! delivers a message twice.
//!
//! Run: `cargo run --example outbox_sqlite --features sqlite`

use std::{sync::Arc, time::Duration};
use steadfast::{
    Context, HandlerError, Message, Worker,
    idempotency::{SqliteStore, sqlite::open},
    outbox::{Relay, SqliteOutbox},
    transport::{Transport, memory::MemoryTransport},
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "orders.placed")]
struct OrderPlaced {
    #[message(key)]
    order_id: i64,
    cents: i64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::temp_dir().join(format!("steadfast-example-{}.db", std::process::id()));
    let pool = open(&path).await?; // WAL + synchronous=FULL
    let inbox = SqliteStore::new(pool.clone());
    let outbox = SqliteOutbox::new(pool.clone());
    inbox.migrate().await?;
    outbox.migrate().await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, cents INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS charges (order_id INTEGER NOT NULL, cents INTEGER NOT NULL);",
    )
    .execute(&pool)
    .await?;

    let broker = MemoryTransport::new();
    let transport: Arc<dyn Transport> = Arc::new(broker.clone());
    let stop = CancellationToken::new();

    // Billing: the charge and the inbox key commit together.
    let (bpool, binbox) = (pool.clone(), inbox.clone());
    let billing = Worker::builder_shared(transport.clone(), "billing")
        .handle(move |msg: OrderPlaced, cx: Context| {
            let (pool, inbox) = (bpool.clone(), binbox.clone());
            async move {
                let mut tx = pool.begin().await?;
                if !inbox.mark(&mut tx, &cx).await? {
                    return Ok::<_, HandlerError>(()); // charged before: nothing to do
                }
                sqlx::query("INSERT INTO charges (order_id, cents) VALUES (?1, ?2)")
                    .bind(msg.order_id)
                    .bind(msg.cents)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                println!(
                    "billing: charged order {} ({} cents)",
                    msg.order_id, msg.cents
                );
                Ok(())
            }
        })
        .inbox(inbox.clone()) // the same table: a duplicate is acked unhandled
        .build()?;
    billing.declare().await?;
    let worker = tokio::spawn(billing.run_until(stop.clone().cancelled_owned()));

    // One relay per SQLite file.
    let relay = Relay::builder(outbox.clone(), transport.clone())
        .poll_interval(Duration::from_millis(100))
        .build()?;
    let relay = tokio::spawn(relay.run_until(stop.clone().cancelled_owned()));

    // Orders: the order row and its message, or neither.
    for (id, cents) in [(1, 1200), (2, 550), (3, 9900)] {
        let mut tx = pool.begin().await?;
        sqlx::query("INSERT INTO orders (id, cents) VALUES (?1, ?2)")
            .bind(id)
            .bind(cents)
            .execute(&mut *tx)
            .await?;
        outbox
            .enqueue(
                &mut tx,
                &OrderPlaced {
                    order_id: id,
                    cents,
                },
            )
            .await?;
        tx.commit().await?;
        println!("orders: placed order {id}");
    }

    // The broker delivers the first message a second time: billing acks it unharmed.
    let charged = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM charges")
            .fetch_one(&pool)
            .await
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while charged().await? < 3 {
        if tokio::time::Instant::now() > deadline {
            return Err("billing did not charge every order within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(first) = broker.published().first() {
        broker.publish(first).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!(
        "charges: {} for 3 orders (a duplicate delivery changed nothing)",
        charged().await?
    );

    stop.cancel();
    worker.await??;
    relay.await?;
    pool.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}
