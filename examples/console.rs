//! The web console over real dead letters: a worker whose handler has a bug dead-letters
//! 25 orders on RabbitMQ, then `steadfast console` serves them on
//! http://127.0.0.1:8089/ (log in with the token printed below; Ctrl-C stops it). From
//! the page: the failure group and its count, one dead letter in full, and a replay with
//! its dry run. See `docs/console.md`.
//!
//! Run it with (RabbitMQ on `AMQP_URL`, default 127.0.0.1:5672):
//!
//! ```text
//! cargo run --features console --example console
//! ```

use std::time::Duration;
use steadfast::{
    Context, Envelope, HandlerError, Message, Worker,
    transport::{Transport, amqp::AmqpTransport},
};

#[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "orders.placed")]
struct OrderPlaced {
    order_id: u64,
}

fn main() -> std::process::ExitCode {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let dead = rt.block_on(async {
        let t = AmqpTransport::builder(url.clone())
            .exchange("console-example")
            .queue_prefix("console-example.")
            .connect()
            .await
            .expect("RabbitMQ on AMQP_URL");
        let worker = Worker::builder(t.clone(), "billing")
            .handle(|m: OrderPlaced, _cx: Context| async move {
                Err::<(), _>(
                    HandlerError::msg(format!("no tax rate for order {}", m.order_id)).permanent(),
                )
            })
            .build()
            .expect("valid worker");
        worker.declare().await.expect("declare");
        let envs: Vec<Envelope> = (0..25)
            .map(|order_id| Envelope::encode(&OrderPlaced { order_id }).expect("encode"))
            .collect();
        for r in t.publish_batch(&envs).await {
            r.expect("published");
        }
        worker
            .run_until(tokio::time::sleep(Duration::from_secs(3)))
            .await
            .expect("worker ran");
        let n = t.dead_letter_count("billing").await.expect("count");
        t.close().await;
        n
    });
    drop(rt);
    let token = format!("example-{}", uuid::Uuid::new_v4().simple());
    println!("{dead} dead letters in group billing; log in with the token {token}");
    // The token reaches the console in a file (never on the command line, where `ps`
    // would show it).
    let file = std::env::temp_dir().join("steadfast-console-example.token");
    std::fs::write(&file, &token).expect("write the token file");
    steadfast::cli::run_from([
        "steadfast",
        "console",
        "--group",
        "billing",
        "--url",
        &url,
        "--exchange",
        "console-example",
        "--queue-prefix",
        "console-example.",
        "--token-file",
        &file.to_string_lossy(),
    ])
}
