//! Orders → billing on PostgreSQL: the transactional outbox and the transactional inbox.
//!
//! - The orders service writes an order and its `OrderPlaced` message in **one**
//!   transaction (`PostgresOutbox::enqueue`): both commit, or neither.
//! - The relay claims committed rows (`FOR UPDATE SKIP LOCKED`, woken by LISTEN/NOTIFY)
//!   in a transaction, publishes them to RabbitMQ awaiting the publisher confirms, and
//!   deletes them in that transaction before it commits.
//! - The billing worker marks the inbox key, records the charge and commits in one
//!   transaction, so a redelivered message is acked without charging twice.
//!
//! Needs PostgreSQL (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`)
//! and RabbitMQ (`AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//! Run: `cargo run --example outbox_postgres --features postgres,amqp`

use std::{sync::Arc, time::Duration};
use steadfast::{
    Context, HandlerError, Message, Worker,
    idempotency::{PostgresStore, postgres::connect},
    outbox::{PostgresOutbox, Relay},
    transport::{Transport, amqp::AmqpTransport},
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "orders.placed")]
struct OrderPlaced {
    #[message(key)]
    order_id: i64,
    cents: i64,
}

/// RabbitMQ, with queues under an `example-` prefix so they stay apart from others'.
async fn transport() -> Result<Arc<dyn Transport>, Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let amqp = AmqpTransport::builder(url) // the password never shows in errors or Debug
        .exchange("example-outbox-postgres") // its own, beside any other worker
        .queue_prefix("example-outbox-postgres.")
        .connect()
        .await?;
    Ok(Arc::new(amqp))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let pool = connect(&url).await?; // errors show the URL with its password as ***
    let inbox = PostgresStore::new(pool.clone());
    let outbox = PostgresOutbox::new(pool.clone());
    inbox.migrate().await?; // or apply inbox.schema_sql() in your own migrations
    outbox.migrate().await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS example_orders (id bigserial PRIMARY KEY, cents bigint NOT NULL);
         CREATE TABLE IF NOT EXISTS example_charges (order_id bigint NOT NULL, cents bigint NOT NULL);",
    )
    .execute(&pool)
    .await?;

    let transport = transport().await?;
    let stop = CancellationToken::new();

    // Billing: inbox key + charge in one transaction; the worker acks after the commit.
    let (bpool, binbox) = (pool.clone(), inbox.clone());
    let billing = Worker::builder_shared(transport.clone(), "billing")
        .handle(move |msg: OrderPlaced, cx: Context| {
            let (pool, inbox) = (bpool.clone(), binbox.clone());
            async move {
                let mut tx = pool.begin().await?;
                if !inbox.mark(&mut tx, &cx).await? {
                    return Ok::<_, HandlerError>(()); // charged before
                }
                sqlx::query("INSERT INTO example_charges (order_id, cents) VALUES ($1, $2)")
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
    billing.declare().await?; // so the relay's first publish is routable
    let worker = tokio::spawn(billing.run_until(stop.clone().cancelled_owned()));
    // Sent rows are kept a day by default, marked `sent`; a zero retention deletes each
    // row once the broker confirmed it, which costs the database less per message.
    let relay = Relay::builder(outbox.clone(), transport.clone())
        .retention(Duration::ZERO)
        .build()?;
    let relay = tokio::spawn(relay.run_until(stop.clone().cancelled_owned()));
    let cleanup = inbox.spawn_cleanup(Duration::from_secs(3600));

    // Orders: the order and its message commit together.
    let mut placed = Vec::new();
    for cents in [1200_i64, 550, 9900] {
        let mut tx = pool.begin().await?;
        let id: i64 =
            sqlx::query_scalar("INSERT INTO example_orders (cents) VALUES ($1) RETURNING id")
                .bind(cents)
                .fetch_one(&mut *tx)
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
        placed.push(id);
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let charged: i64 =
            sqlx::query_scalar("SELECT count(*) FROM example_charges WHERE order_id = ANY($1)")
                .bind(&placed)
                .fetch_one(&pool)
                .await?;
        if charged == 3 {
            println!("charges: 3 for 3 orders");
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("only {charged} of 3 orders charged within 20 s").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    cleanup.abort();
    stop.cancel();
    worker.await??;
    relay.await?;
    transport.close().await;
    Ok(())
}
