#![doc = include_str!("../docs/crate.md")]

pub mod context;
pub mod envelope;
pub mod error;
pub mod handler;
pub mod idempotency;
pub mod message;
pub mod outbox;
mod redact;
pub mod retry;
pub mod testing;
pub mod transport;
pub mod worker;

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
}

#[doc(hidden)]
pub mod __private {
    pub use std::borrow::Cow;
}
