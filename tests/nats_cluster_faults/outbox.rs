//! The outbox side of the outbox scenario: rows committed in PostgreSQL (a table of its
//! own on `DATABASE_URL`), a relay publishing them to the cluster, and the count of what
//! the stream stored.

use crate::{Job, N, logged};
use std::{
    sync::Arc,
    time::{Duration, Instant},
};
use steadfast::{
    outbox::{PostgresOutbox, Relay},
    transport::{Transport, nats::NatsTransport},
};
use tokio_util::sync::CancellationToken;

/// The outbox side of a scenario: a table of its own in PostgreSQL and a relay, on a
/// connection of its own, publishing its rows to the cluster.
pub(crate) struct Outbox {
    pool: sqlx::PgPool,
    store: PostgresOutbox,
    table: String,
    pub(crate) transport: NatsTransport,
    stop: CancellationToken,
    relay: tokio::task::JoinHandle<()>,
}

impl Outbox {
    pub(crate) async fn start(tag: &str, transport: NatsTransport) -> Self {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(6)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await
            .expect("PostgreSQL must run on DATABASE_URL (default 127.0.0.1:5432, database test)");
        let table = format!("sfc_outbox_{}", &tag[..tag.len().min(36)]);
        let store = PostgresOutbox::new(pool.clone())
            .with_table(&table)
            .unwrap()
            .with_timeout(Duration::from_secs(5));
        store.migrate().await.expect("the outbox table");
        // The fault suite's relay settings.
        let relay = steadfast::testing::fault_relay(Relay::builder(
            store.clone(),
            Arc::new(transport.clone()),
        ))
        .build()
        .unwrap();
        let stop = CancellationToken::new();
        let relay = tokio::spawn(relay.run_until(stop.clone().cancelled_owned()));
        Self {
            pool,
            store,
            table,
            transport,
            stop,
            relay,
        }
    }

    /// Commits the `N` rows, 50 a transaction, about 250 a second.
    pub(crate) fn commit(&self) -> impl Future<Output = ()> + Send + 'static {
        let (pool, store) = (self.pool.clone(), self.store.clone());
        async move {
            for first in (0..N).step_by(50) {
                let mut tx = pool.begin().await.expect("a transaction");
                for n in first..(first + 50).min(N) {
                    store.enqueue(&mut tx, &Job { n }).await.expect("enqueue");
                }
                tx.commit().await.expect("commit");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// Waits until the relay published every row, stops it, drops the table, and
    /// returns how many messages the stream stores, how many publishes failed (and were
    /// tried again) and the failures reported unroutable.
    pub(crate) async fn finish(
        self,
        admin: &async_nats::jetstream::Context,
        stream: &str,
    ) -> (u64, u64, Vec<String>) {
        let start = Instant::now();
        loop {
            let status = self.store.status().await.expect("outbox status");
            assert_eq!(status.parked, 0, "outbox rows parked");
            if status.pending == 0 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "the relay did not publish every row within 120 s: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.stop.cancel();
        self.relay.await.expect("the relay stopped");
        self.transport.close().await;
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {}",
            self.table
        )))
        .execute(&self.pool)
        .await;
        let messages = admin
            .get_stream(stream)
            .await
            .expect("the work stream")
            .info()
            .await
            .expect("stream info")
            .state
            .messages;
        let log = logged();
        let failed: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("outbox publish failed"))
            .collect();
        if let Some(first) = failed.first() {
            println!("first failed relay publish: {first}");
        }
        let unroutable = failed
            .iter()
            .filter(|l| l.contains("Unroutable"))
            .map(|l| (*l).to_owned())
            .collect();
        (messages, failed.len() as u64, unroutable)
    }
}
