//! The NATS JetStream transport against a nats-server with JetStream (the local one on
//! 127.0.0.1:4222, or the one `STEADFAST_TEST_NATS_URL` names, so CI runs the same tests
//! on several server versions): the conformance suite, then what is particular to
//! JetStream (raw bad input, broker-held delays across a worker kill, progress past
//! `ack_wait`, the max-deliveries advisory, consumer config checks, deduplication,
//! consumer updates that keep every field, authentication without leaks, a silent
//! server noticed). Every test has its own subject prefix and streams; streams carry a
//! max_age and old test streams are removed at start.

mod auth;
mod cases;
mod jwt;
mod servers;
mod silent;
mod updates;

use futures::future::BoxFuture;
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};
use steadfast::{
    testing::conformance::TransportFactory,
    transport::{Transport, nats::NatsTransport},
};
use tokio::sync::OnceCell;

/// The server under test: `STEADFAST_TEST_NATS_URL`, else the shared local one.
pub fn url() -> &'static str {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        std::env::var("STEADFAST_TEST_NATS_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned())
    })
}
/// Streams of this test binary start with this, so stale ones can be found.
pub const STREAM_PREFIX: &str = "SFTEST_";

/// A unique token for names: process id, time and a counter.
pub fn unique(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{tag}{}x{:x}x{}",
        std::process::id(),
        nanos & 0xffff_ffff,
        N.fetch_add(1, Ordering::Relaxed)
    )
    .replace('-', "")
}

/// Removes this binary's test streams older than ten minutes (left by earlier runs).
pub async fn sweep_old_streams() {
    static ONCE: OnceCell<()> = OnceCell::const_new();
    ONCE.get_or_init(|| async {
        let Ok(client) = async_nats::connect(url()).await else {
            return;
        };
        let js = async_nats::jetstream::new(client);
        use futures::StreamExt;
        let mut names = js.stream_names();
        let mut old = Vec::new();
        while let Some(Ok(n)) = names.next().await {
            if n.starts_with(STREAM_PREFIX) {
                old.push(n);
            }
        }
        for n in old {
            if let Ok(mut s) = js.get_stream(&n).await
                && let Ok(info) = s.info().await
            {
                let age = time::OffsetDateTime::now_utc() - info.created;
                if age > time::Duration::minutes(10) {
                    let _ = js.delete_stream(&n).await;
                }
            }
        }
    })
    .await;
}

/// A transport with its own prefix and streams (which expire after an hour).
pub async fn transport(tag: &str) -> NatsTransport {
    transport_with(tag, |b| b).await
}

/// Like [`transport`], with builder tweaks.
pub async fn transport_with(
    tag: &str,
    f: impl FnOnce(steadfast::transport::nats::NatsBuilder) -> steadfast::transport::nats::NatsBuilder,
) -> NatsTransport {
    sweep_old_streams().await;
    let u = unique(tag);
    let b = NatsTransport::builder(url())
        .subject_prefix(format!("sft{u}"))
        .stream(format!("{STREAM_PREFIX}{}", u.to_uppercase()))
        .max_age(Duration::from_secs(3600))
        .dead_letter_max_age(Duration::from_secs(3600));
    f(b).connect()
        .await
        .unwrap_or_else(|e| panic!("a nats-server with JetStream at {}: {e}", url()))
}

/// A worker of `group` on `t` that counts the messages of type `M` it handled.
pub fn counting_worker<M: steadfast::Message>(
    t: Arc<dyn Transport>,
    group: &str,
) -> (steadfast::Worker, Arc<AtomicU64>) {
    let handled = Arc::new(AtomicU64::new(0));
    let h = handled.clone();
    let worker = steadfast::Worker::builder_shared(t, group)
        .handle(move |_: M, _: steadfast::Context| {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .build()
        .expect("valid worker");
    (worker, handled)
}

/// Deletes a transport's streams.
pub async fn cleanup(t: &NatsTransport) {
    let client = async_nats::connect(url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let _ = js.delete_stream(t.stream_name()).await;
    let _ = js.delete_stream(t.dead_letter_stream_name()).await;
}

/// The conformance factory: a fresh prefix and stream per case. Publishes do not set
/// `Nats-Msg-Id`, because the duplicate case re-sends the same envelope on purpose and
/// the stream's duplicate window would absorb it before the consumer could. The suite
/// runs twice: with the default (published) acks and with `confirm_acks(true)`.
#[derive(Debug)]
pub struct Factory {
    /// Await the server's reply to every ack.
    pub confirm_acks: bool,
}

impl TransportFactory for Factory {
    fn create<'a>(&'a self, case: &'a str) -> BoxFuture<'a, Arc<dyn Transport>> {
        Box::pin(async move {
            let confirm = self.confirm_acks;
            let t = transport_with(&format!("c{}", case.replace('-', "")), |b| {
                b.deduplicate(false).confirm_acks(confirm)
            })
            .await;
            Arc::new(t) as Arc<dyn Transport>
        })
    }
}

steadfast::conformance_tests!(
    nats_conformance,
    crate::Factory {
        confirm_acks: false
    }
);
steadfast::conformance_tests!(
    nats_conformance_confirmed_acks,
    crate::Factory { confirm_acks: true }
);
