//! Orders → billing on MySQL or MariaDB: the transactional outbox and inbox.
//!
//! - The orders service writes an order and its `OrderPlaced` message in **one**
//!   transaction (`MySqlOutbox::enqueue`): both commit, or neither.
//! - The relay claims committed rows with `FOR UPDATE SKIP LOCKED` (MySQL 8.0+,
//!   MariaDB 10.6+; several relays are safe) and publishes them to RabbitMQ awaiting the
//!   publisher confirms. MySQL has no LISTEN/NOTIFY: enqueues in this process wake the
//!   relay at once, others are found by a poll whose interval adapts to the traffic.
//! - The billing worker marks the inbox key, records the charge and commits in one
//!   transaction, so a redelivered message is acked without charging twice.
//!
//! Needs MySQL or MariaDB (`MYSQL_URL`, default `mysql://root@127.0.0.1:3306/test`) and
//! RabbitMQ (`AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//! Run: `cargo run --example outbox_mysql --features mysql,amqp`

use std::{sync::Arc, time::Duration};
use steadfast::{
    Context, HandlerError, Message, Worker,
    idempotency::{MySqlStore, mysql::connect},
    outbox::{MySqlOutbox, Relay},
    transport::{Transport, amqp::AmqpTransport},
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "shop.order_placed")]
struct OrderPlaced {
    #[message(key)]
    order_id: u64,
    cents: i64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url =
        std::env::var("MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    let pool = connect(&url).await?; // errors show the URL with its password as ***
    let (inbox, outbox) = (
        MySqlStore::new(pool.clone()),
        MySqlOutbox::new(pool.clone()),
    );
    // Plain CREATE TABLE IF NOT EXISTS; warns about innodb_flush_log_at_trx_commit,
    // sync_binlog and the isolation level when they could lose a commit.
    inbox.migrate().await?;
    outbox.migrate().await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS example_shop_orders (
             id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY, cents BIGINT NOT NULL);
         CREATE TABLE IF NOT EXISTS example_shop_charges (
             order_id BIGINT UNSIGNED NOT NULL, cents BIGINT NOT NULL);",
    )
    .execute(&pool)
    .await?;

    let amqp_url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let transport: Arc<dyn Transport> = Arc::new(
        AmqpTransport::builder(amqp_url)
            .exchange("example-outbox-mysql") // its own, beside any other worker
            .queue_prefix("example-outbox-mysql.")
            .connect()
            .await?,
    );
    let stop = CancellationToken::new();

    let billing = {
        let (pool, marks) = (pool.clone(), inbox.clone());
        Worker::builder_shared(transport.clone(), "shop-billing")
            .handle(move |msg: OrderPlaced, cx: Context| {
                let (pool, inbox) = (pool.clone(), marks.clone());
                async move {
                    let mut tx = pool.begin().await?;
                    if !inbox.mark(&mut tx, &cx).await? {
                        return Ok::<_, HandlerError>(()); // charged before
                    }
                    sqlx::query("INSERT INTO example_shop_charges (order_id, cents) VALUES (?, ?)")
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
            .inbox(inbox.clone())
            .build()?
    };
    billing.declare().await?; // so the relay's first publish is routable
    let worker = tokio::spawn(billing.run_until(stop.clone().cancelled_owned()));
    let relay = Relay::builder(outbox.clone(), transport.clone())
        .poll_interval(Duration::from_millis(500)) // the longest wait for other processes' rows
        .retention(Duration::ZERO) // delete rows once the broker confirmed them
        .build()?;
    let relay = tokio::spawn(relay.run_until(stop.clone().cancelled_owned()));

    let mut placed = Vec::new();
    for cents in [4200_i64, 75, 13_000] {
        let mut tx = pool.begin().await?;
        let id = sqlx::query("INSERT INTO example_shop_orders (cents) VALUES (?)")
            .bind(cents)
            .execute(&mut *tx)
            .await?
            .last_insert_id();
        outbox
            .enqueue(
                &mut tx,
                &OrderPlaced {
                    order_id: id,
                    cents,
                },
            )
            .await?;
        tx.commit().await?; // the order and its message, or neither
        println!("orders: placed order {id}");
        placed.push(id);
    }

    let wanted = placed.len() as i64;
    let ids = placed
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let count = format!("SELECT COUNT(*) FROM example_shop_charges WHERE order_id IN ({ids})");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let charged: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(count.clone()))
            .fetch_one(&pool)
            .await?;
        if charged == wanted {
            println!("charges: {charged} for {wanted} orders");
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("only {charged} of {wanted} orders charged within 20 s").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    stop.cancel();
    worker.await??;
    relay.await?;
    transport.close().await;
    Ok(())
}
