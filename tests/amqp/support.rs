//! Shared helpers: unique names, transports isolated per test, a raw lapin channel, a
//! worker running in the background.

use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::FieldTable,
};
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use steadfast::{
    transport::amqp::AmqpTransport,
    worker::{Processed, WorkerBuilder},
};
use tokio_util::sync::CancellationToken;

/// The broker under test.
pub(crate) fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A name no other test (or earlier run) uses.
pub(crate) fn unique(tag: &str) -> String {
    format!("sf-test-{tag}-{}", uuid::Uuid::now_v7().simple())
}

/// A transport on exchange `name` with queue prefix `{name}.`, the delivery limit
/// given, and queues that expire when unused so test runs do not pile up.
pub(crate) async fn transport_named(name: &str, delivery_limit: u32) -> AmqpTransport {
    AmqpTransport::builder(url())
        .exchange(name)
        .queue_prefix(format!("{name}."))
        .queue_expiry(Duration::from_secs(300))
        .delivery_limit(delivery_limit)
        .connect()
        .await
        .expect("RabbitMQ must be running on AMQP_URL (default 127.0.0.1:5672)")
}

/// A transport with its own exchange and queue prefix.
pub(crate) async fn transport(tag: &str) -> AmqpTransport {
    transport_named(&unique(tag), 20).await
}

/// A raw lapin channel with publisher confirms, for what steadfast would never send.
pub(crate) async fn raw_channel() -> (Connection, Channel) {
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .expect("raw connection");
    let ch = conn.create_channel().await.expect("raw channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    (conn, ch)
}

/// Publishes raw bytes and properties to `exchange` under `routing_key`, confirmed.
pub(crate) async fn raw_publish(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            body,
            props,
        )
        .await
        .expect("raw publish")
        .await
        .expect("raw confirm");
    assert!(
        confirm.is_ack() && confirm.take_message().is_none(),
        "raw publish routed"
    );
}

/// How many ready messages `queue` holds (passive declare).
pub(crate) async fn ready(ch: &Channel, queue: &str) -> u32 {
    passive(ch, queue).await.message_count()
}

/// How many consumers `queue` has.
pub(crate) async fn consumers(ch: &Channel, queue: &str) -> u32 {
    passive(ch, queue).await.consumer_count()
}

/// `queue` as the broker reports it (a passive declare: it must exist).
async fn passive(ch: &Channel, queue: &str) -> lapin::Queue {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("queue exists")
}

/// A worker running in the background, with its outcomes recorded.
pub(crate) struct Running {
    pub(crate) outcomes: Arc<Mutex<Vec<Processed>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub(crate) async fn start(builder: WorkerBuilder) -> Self {
        let outcomes: Arc<Mutex<Vec<Processed>>> = Arc::default();
        let sink = outcomes.clone();
        let worker = builder
            .on_outcome(move |p| sink.lock().unwrap().push(p.clone()))
            .build()
            .expect("valid worker");
        worker.declare().await.expect("declare");
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            worker
                .run_until(async move { token.cancelled().await })
                .await
                .expect("worker ran");
        });
        Self {
            outcomes,
            stop,
            task,
        }
    }

    pub(crate) fn count(&self) -> usize {
        self.outcomes.lock().unwrap().len()
    }

    pub(crate) async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("worker task");
    }
}

/// Polls `cond` until it holds, failing after `limit`.
pub(crate) async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls an async condition for up to 10 s.
pub(crate) async fn wait_for_async<F: std::future::Future<Output = bool>>(
    what: &str,
    mut cond: impl FnMut() -> F,
) {
    let start = Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
