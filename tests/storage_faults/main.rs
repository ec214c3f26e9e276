//! A database restarted while the outbox relay runs (PostgreSQL, and MySQL / MariaDB
//! with the `mysql` feature): every row committed before or after the restart is
//! dispatched once the server is back. Runs alone (it restarts the shared PostgreSQL; a
//! guard starts it again even if the test fails). MariaDB is a private server on
//! `FAULT_MARIADB_PORT` (3307), never the shared one, stopped when the test ends.
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

/// The fault suite's private MariaDB server (`fault/src/mariadb.rs`).
#[cfg(feature = "mysql")]
#[allow(dead_code, unreachable_pub)]
#[path = "../../fault/src/mariadb.rs"]
mod mariadb;

/// Starts the server on drop, whatever happened.
struct RestoreServer(fn(&str) -> bool);
impl Drop for RestoreServer {
    fn drop(&mut self) {
        // `start` is harmless if it is already running.
        let _ = (self.0)("start");
    }
}

/// Enqueues `ids`, one transaction each, retrying each for up to 60 s while the server
/// is away.
macro_rules! enqueue_retrying {
    ($pool:expr, $outbox:expr, $ids:expr) => {
        for id in $ids {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let attempt = async {
                    let mut tx = $pool.begin().await?;
                    $outbox
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
    };
}

/// The relay across a restart of the database (`$stop` and `$start` are `bool`
/// expressions, evaluated in place), on `$outbox` in a table of its own; waits up to 60 s
/// for every row. Evaluates to nothing; panics on a loss.
macro_rules! relay_across_restart {
    ($pool:expr, $outbox:expr, $stop:expr, $start:expr) => {{
        let (pool, outbox) = (&$pool, &$outbox);
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
        enqueue_retrying!(pool, outbox, 0..50);
        assert!($stop, "could not stop the database server");
        tokio::time::sleep(Duration::from_secs(2)).await; // the relay fails and backs off
        assert!($start, "could not start the database server");
        // Rows committed after the restart, through a pool whose connections died.
        enqueue_retrying!(pool, outbox, 50..100);

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
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_dispatches_every_row_across_a_postgres_restart() {
    let _restore = RestoreServer(pg_ctl);
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
    relay_across_restart!(pool, outbox, pg_ctl("stop"), pg_ctl("start"));
    let _ = sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&pool)
        .await;
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_dispatches_every_row_across_a_mariadb_restart() {
    // Dropped (stopped, its files removed) however the test ends.
    let mut server = mariadb::MariaDb::start(mariadb::private_port())
        .await
        .unwrap();
    let pool = steadfast::idempotency::mysql::connect(&server.url())
        .await
        .unwrap();
    let outbox = steadfast::outbox::MySqlOutbox::new(pool.clone())
        .with_table("steadfast_outbox")
        .unwrap();
    relay_across_restart!(
        pool,
        outbox,
        {
            server.stop().await;
            true
        },
        server.start_again().await.is_ok()
    );
}
