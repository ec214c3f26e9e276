//! A silent server (the connection stays open but nothing comes back: a half-open TCP
//! connection, a partition) is noticed by the client's pings: readiness turns false
//! within 30 s, and once the path heals the worker reconnects and consumes again without
//! a restart. The blackhole is a TCP proxy of the test's own; the shared server is not
//! touched.

use crate::{cleanup, counting_worker, transport_with, url};
use serde::{Deserialize, Serialize};
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};
use steadfast::{Envelope, Message, transport::Transport};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(name = "silent.job")]
struct Job {
    n: u64,
}

/// Forwards 127.0.0.1:(its port) to `target`; while `blackhole` is set, every byte read
/// in either direction is dropped.
async fn proxy(target: String, blackhole: Arc<AtomicBool>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(&target).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pipe(cr, sw, blackhole.clone()));
            tokio::spawn(pipe(sr, cw, blackhole.clone()));
        }
    });
    port
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    blackhole: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if blackhole.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_connection_turns_readiness_false_and_recovers() {
    let blackhole = Arc::new(AtomicBool::new(false));
    let target = url().trim_start_matches("nats://").to_owned();
    let port = proxy(target, blackhole.clone()).await;
    let nt = transport_with("silent", |b| b).await;
    // `transport_with` connects to the server directly (for its streams); the worker's
    // own transport goes through the proxy, with the same prefix and stream.
    let through =
        steadfast::transport::nats::NatsTransport::builder(&format!("nats://127.0.0.1:{port}"))
            .subject_prefix(nt.subject_for("x").strip_suffix(".x").unwrap().to_owned())
            .stream(nt.stream_name())
            .request_timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap();
    let (worker, handled) = counting_worker::<Job>(Arc::new(through), "silentgroup");
    worker.declare().await.unwrap();
    let status = worker.status();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move { worker.run_until(token.cancelled_owned()).await });

    let wait = async |what: &str, limit: Duration, cond: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !cond() {
            assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        start.elapsed()
    };
    nt.publish(&Envelope::encode(&Job { n: 1 }).unwrap())
        .await
        .unwrap();
    wait("first message handled", Duration::from_secs(30), &|| {
        handled.load(Ordering::SeqCst) == 1
    })
    .await;
    wait("ready", Duration::from_secs(10), &|| status.is_ready()).await;

    blackhole.store(true, Ordering::SeqCst);
    let noticed = wait("readiness false", Duration::from_secs(30), &|| {
        !status.is_ready()
    })
    .await;
    eprintln!("silent server noticed after {noticed:?}");
    // A message published meanwhile (directly) waits in the stream.
    nt.publish(&Envelope::encode(&Job { n: 2 }).unwrap())
        .await
        .unwrap();

    blackhole.store(false, Ordering::SeqCst);
    let back = wait("ready again", Duration::from_secs(40), &|| {
        status.is_ready()
    })
    .await;
    eprintln!("ready again {back:?} after the path healed");
    wait(
        "the message published during the blackhole handled",
        Duration::from_secs(60),
        &|| handled.load(Ordering::SeqCst) >= 2,
    )
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    cleanup(&nt).await;
}
