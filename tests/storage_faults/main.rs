//! PostgreSQL restarted while the outbox relay runs: every row committed before or after
//! the restart is dispatched once the server is back. Runs alone (it restarts the shared
//! server); a guard starts PostgreSQL again even if the test fails.
#![cfg(feature = "postgres")]

use sqlx::AssertSqlSafe;
use std::{collections::HashSet, sync::Arc, time::Duration};
use steadfast::{
    Message,
    outbox::{PostgresOutbox, Relay},
    transport::memory::MemoryTransport,
};
use tokio_util::sync::CancellationToken;

#[derive(serde::Serialize, serde::Deserialize, Message)]
#[message(name = "orders.placed")]
struct OrderPlaced {
    order_id: i64,
}

fn pg_ctl(action: &str) -> bool {
    std::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", "15", "main", action])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Starts PostgreSQL on drop, whatever happened.
struct RestoreServer;
impl Drop for RestoreServer {
    fn drop(&mut self) {
        // `start` fails harmlessly if it is already running.
        let _ = pg_ctl("start");
    }
}

async fn enqueue_retrying(pool: &sqlx::PgPool, outbox: &PostgresOutbox, ids: std::ops::Range<i64>) {
    for id in ids {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let attempt = async {
                let mut tx = pool.begin().await?;
                outbox
                    .enqueue(&mut tx, &OrderPlaced { order_id: id })
                    .await
                    .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
                tx.commit().await
            };
            match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                Ok(Ok(())) => break,
                _ if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                other => panic!("could not enqueue after the restart: {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_dispatches_every_row_across_a_postgres_restart() {
    let _restore = RestoreServer;
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let pool = steadfast::idempotency::postgres::connect(&url)
        .await
        .unwrap();
    let schema = format!("f_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&pool)
        .await
        .unwrap();
    let outbox = PostgresOutbox::new(pool.clone())
        .with_table(&format!("{schema}.steadfast_outbox"))
        .unwrap();
    outbox.migrate().await.unwrap();

    let broker = MemoryTransport::new();
    broker.bind("billing", ["orders.placed"]);
    let relay = Relay::builder(outbox.clone(), Arc::new(broker.clone()))
        .poll_interval(Duration::from_millis(200))
        .batch_size(10)
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay.run_until(stop.clone().cancelled_owned()));

    // Rows committed just before the restart: some are still pending when it hits.
    enqueue_retrying(&pool, &outbox, 0..50).await;
    assert!(pg_ctl("stop"), "could not stop PostgreSQL");
    tokio::time::sleep(Duration::from_secs(2)).await; // the relay fails and backs off
    assert!(pg_ctl("start"), "could not start PostgreSQL");
    // Rows committed after the restart, through a pool whose connections died.
    enqueue_retrying(&pool, &outbox, 50..100).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ids: HashSet<_> = broker.published().iter().map(|e| e.id).collect();
        if ids.len() == 100 && matches!(outbox.pending().await, Ok(0)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of 100 rows dispatched after the restart",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    task.await.unwrap();
    let _ = sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&pool)
        .await;
}
