//! The RabbitMQ transport against a real local broker (`AMQP_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`): the conformance suite, plus what only a
//! real broker shows — broker-held delays, killed workers, raw bad input, dead-letter
//! headers, delivery limits.

mod bad_input;
mod broker;
mod raw_frames;
mod support;

use std::sync::Arc;
use steadfast::{testing::conformance::TransportFactory, transport::Transport};

/// Gives every conformance case its own exchange and queue prefix.
struct Factory;

impl TransportFactory for Factory {
    fn create<'a>(&'a self, case: &'a str) -> futures::future::BoxFuture<'a, Arc<dyn Transport>> {
        Box::pin(async move { Arc::new(support::transport(case).await) as Arc<dyn Transport> })
    }
}

steadfast::conformance_tests!(amqp_conformance, crate::Factory);
