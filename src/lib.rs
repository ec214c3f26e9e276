#![doc = include_str!("../docs/crate.md")]

/// A named crash window the fault suite can stop the process at (`docs/reliability.md`):
/// a `fail` crate failpoint with the `failpoints` feature, nothing at all without it.
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name);
    };
}

#[cfg(feature = "app")]
pub mod app;
#[cfg(feature = "asyncapi")]
pub mod asyncapi;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod context;
pub mod envelope;
pub mod error;
pub mod handler;
#[cfg(feature = "http")]
pub mod http;
pub mod idempotency;
pub mod message;
#[cfg(feature = "otel")]
pub mod otel;
pub mod outbox;
mod redact;
pub mod retry;
pub mod sql;
#[cfg(feature = "app")]
pub mod telemetry;
pub mod testing;
pub mod transport;
pub mod worker;

#[cfg(feature = "app")]
pub use app::App;
pub use context::Context;
pub use envelope::{Envelope, Headers, MessageId};
pub use error::{ErrorKind, HandlerError, ResultExt};
pub use handler::Handler;
pub use message::Message;
pub use retry::{Disposition, Failure, RetryPolicy};
pub use worker::{Worker, shutdown_signal};

/// Derives [`Message`]: `#[message(name = "orders.placed")]` on the type, and optionally
/// `#[message(key)]` on the field that is the idempotency key.
pub use steadfast_macros::Message;

/// Guides, included from `docs/` so that their examples are compiled and run as tests.
pub mod guide {
    #[doc = include_str!("../docs/architecture.md")]
    pub mod architecture {}
    #[doc = include_str!("../docs/retries-and-dead-letters.md")]
    pub mod retries_and_dead_letters {}
    #[doc = include_str!("../docs/dead-letters.md")]
    pub mod dead_letters {}
    #[cfg(feature = "asyncapi")]
    #[doc = include_str!("../docs/asyncapi.md")]
    pub mod asyncapi {}
    #[doc = include_str!("../docs/kill-switch.md")]
    pub mod kill_switch {}
    #[doc = include_str!("../docs/testing.md")]
    pub mod testing {}
    #[cfg(feature = "amqp")]
    #[doc = include_str!("../docs/rabbitmq.md")]
    pub mod rabbitmq {}
    #[cfg(feature = "nats")]
    #[doc = include_str!("../docs/nats.md")]
    pub mod nats {}
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    #[doc = include_str!("../docs/idempotency.md")]
    pub mod idempotency {}
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    #[doc = include_str!("../docs/outbox.md")]
    pub mod outbox {}
    #[doc = include_str!("../docs/reliability.md")]
    pub mod reliability {}
    #[cfg(all(feature = "app", feature = "otel", feature = "postgres"))]
    #[doc = include_str!("../docs/operations.md")]
    pub mod operations {}
}

#[doc(hidden)]
pub mod __private {
    pub use serde_json::Value as JsonValue;
    pub use std::borrow::Cow;
}
