#![doc = include_str!("../docs/crate.md")]
//!
//! ## Cargo features
//!
//! Nothing but the core is on by default; the list below is generated from the comments
//! of `Cargo.toml`.
//!
#![doc = document_features::document_features!()]
#![cfg_attr(docsrs, feature(doc_cfg))]

/// A named crash window the fault suite can stop the process at (`docs/reliability.md`):
/// a `fail` crate failpoint with the `failpoints` feature, nothing at all without it.
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name);
    };
}

#[cfg(feature = "app")]
#[cfg_attr(docsrs, doc(cfg(feature = "app")))]
pub mod app;
#[cfg(feature = "asyncapi")]
#[cfg_attr(docsrs, doc(cfg(feature = "asyncapi")))]
pub mod asyncapi;
#[cfg(feature = "cli")]
#[cfg_attr(docsrs, doc(cfg(feature = "cli")))]
pub mod cli;
pub mod config;
pub mod context;
pub mod envelope;
pub mod error;
pub mod handler;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
pub mod idempotency;
pub mod message;
#[cfg(feature = "otel")]
#[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
pub mod otel;
#[cfg(feature = "otlp")]
#[cfg_attr(docsrs, doc(cfg(feature = "otlp")))]
pub mod otlp;
pub mod outbox;
mod redact;
pub mod retry;
pub mod sql;
#[cfg(feature = "app")]
#[cfg_attr(docsrs, doc(cfg(feature = "app")))]
pub mod telemetry;
pub mod testing;
pub mod transport;
pub mod worker;

#[cfg(feature = "app")]
#[cfg_attr(docsrs, doc(cfg(feature = "app")))]
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

#[cfg(test)]
mod features_listed {
    /// The features of `Cargo.toml`, but `default`.
    fn features() -> Vec<String> {
        let manifest = include_str!("../Cargo.toml");
        let section = manifest
            .split("\n[features]\n")
            .nth(1)
            .expect("a [features] section");
        section
            .lines()
            .take_while(|l| !l.starts_with('['))
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k.trim().to_owned()))
            .filter(|k| !k.starts_with('#') && k != "default")
            .collect()
    }

    #[test]
    fn every_feature_is_in_the_readme_table_and_on_docs_rs() {
        let features = features();
        assert!(features.len() >= 10, "{features:?}");
        let readme = include_str!("../README.md");
        let manifest = include_str!("../Cargo.toml");
        let docs_rs = manifest
            .split("[package.metadata.docs.rs]")
            .nth(1)
            .and_then(|s| s.lines().find(|l| l.starts_with("features = ")))
            .expect("docs.rs features");
        for f in &features {
            assert!(
                readme.contains(&format!("\n| `{f}` |")),
                "README's features table lacks `{f}`"
            );
            // docs.rs builds every feature but the tests-only failpoints.
            assert_eq!(
                docs_rs.contains(&format!("\"{f}\"")),
                f != "failpoints",
                "docs.rs features and `{f}`"
            );
        }
    }
}

#[doc(hidden)]
pub mod __private {
    pub use serde_json::Value as JsonValue;
    pub use std::borrow::Cow;
}
