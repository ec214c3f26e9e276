//! Shared helpers: unique names, a transport isolated per test.

use std::time::Duration;
use steadfast::transport::amqp::AmqpTransport;

/// The broker under test.
pub(crate) fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A name no other test (or earlier run) uses.
pub(crate) fn unique(tag: &str) -> String {
    format!("sf-test-{tag}-{}", uuid::Uuid::now_v7().simple())
}

/// A transport with its own exchange and queue prefix; its queues expire when unused
/// so test runs do not pile up on the broker.
pub(crate) async fn transport(tag: &str) -> AmqpTransport {
    let name = unique(tag);
    AmqpTransport::builder(url())
        .exchange(name.clone())
        .queue_prefix(format!("{name}."))
        .queue_expiry(Duration::from_secs(300))
        .connect()
        .await
        .expect("RabbitMQ must be running on AMQP_URL (default 127.0.0.1:5672)")
}
