//! Acks by the batch (`AmqpBuilder::ack_batch_wait`, off by default): in-order acks
//! settled within the wait reach the broker in one frame — counted by a proxy that
//! reads the client's AMQP frames — while without it each goes out on its own; and with
//! it every ack still goes out, whatever the burst.

use crate::{broker::Task, support};
use futures::{StreamExt, stream::FuturesUnordered};
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};
use steadfast::{
    Disposition, Envelope, Message,
    transport::{Subscription, Transport},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A loopback proxy to the broker that counts the `basic.ack` frames clients send.
struct AckCounter {
    addr: SocketAddr,
    acks: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl AckCounter {
    async fn start() -> Self {
        let upstream = {
            let url = support::url();
            let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
            let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            host.split('/').next().unwrap_or(host).to_owned()
        };
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acks = Arc::new(AtomicU64::new(0));
        let counted = acks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(upstream.as_str())
                    .await
                    .expect("RabbitMQ on AMQP_URL");
                tokio::spawn(relay(client, server, counted.clone()));
            }
        });
        Self { addr, acks, accept }
    }

    /// `AMQP_URL` through the proxy.
    fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    fn acks(&self) -> u64 {
        self.acks.load(Ordering::SeqCst)
    }
}

impl Drop for AckCounter {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies both ways; reads the client's frames (after the 8-byte protocol header) and
/// counts the `basic.ack` methods (class 60, method 80).
async fn relay(client: TcpStream, server: TcpStream, acks: Arc<AtomicU64>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let down = tokio::spawn(async move { tokio::io::copy(&mut sr, &mut cw).await });
    let mut seen: Vec<u8> = Vec::new();
    let mut header = 8usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match cr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if sw.write_all(&buf[..n]).await.is_err() {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        let skip = header.min(seen.len());
        seen.drain(..skip);
        header -= skip;
        // type (1), channel (2), size (4), payload, frame end (1)
        while seen.len() >= 7 {
            let size = u32::from_be_bytes([seen[3], seen[4], seen[5], seen[6]]) as usize;
            if seen.len() < 7 + size + 1 {
                break;
            }
            if seen[0] == 1 && size >= 4 && seen[7..11] == [0, 60, 0, 80] {
                acks.fetch_add(1, Ordering::SeqCst);
            }
            seen.drain(..7 + size + 1);
        }
    }
    down.abort();
}

/// How many ack frames twelve in-order settles, 25 ms apart, take through `proxy` with
/// `wait` as the ack batch wait (prefetch 100, so a batch would be 50). Every one is
/// acked: none comes back to a new consumer.
async fn ack_frames_for_a_trickle(proxy: &AckCounter, wait: Duration) -> u64 {
    let name = support::unique("ackbatch");
    let t = support::builder(&proxy.url(), &name)
        .ack_batch_wait(wait)
        .connect()
        .await
        .expect("RabbitMQ on AMQP_URL");
    let mut sub = Subscription::new("g", [Task::NAME]);
    sub.prefetch = 100;
    let mut stream = t.subscribe(&sub).await.unwrap();
    let batch: Vec<_> = (0..12)
        .map(|n| Envelope::encode(&Task { n }).unwrap())
        .collect();
    for r in t.publish_batch(&batch).await {
        r.unwrap();
    }
    let mut deliveries = Vec::new();
    while deliveries.len() < batch.len() {
        let d = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("delivered")
            .expect("stream open")
            .expect("delivery");
        deliveries.push(d);
    }
    let before = proxy.acks();
    let mut settles = FuturesUnordered::new();
    for d in deliveries {
        settles.push(tokio::spawn(d.settle(Disposition::Ack)));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    while let Some(r) = settles.next().await {
        r.unwrap().expect("acked");
    }
    let frames = proxy.acks() - before;
    drop(stream);
    support::nothing_comes_back(&t, &sub).await;
    t.close().await;
    frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_settled_within_the_batch_wait_go_out_in_one_frame() {
    let proxy = AckCounter::start().await;
    // Off (the default): each settle 25 ms after the last goes out on its own (a busy
    // machine may merge a few).
    let single = ack_frames_for_a_trickle(&proxy, Duration::ZERO).await;
    // 12 settles over about 300 ms, all within a 1 s wait: one frame (two if the machine
    // stalls past the wait).
    let batched = ack_frames_for_a_trickle(&proxy, Duration::from_secs(1)).await;
    assert!(
        (1..=2).contains(&batched) && batched < single,
        "{batched} ack frames with a batch wait, {single} without"
    );
}

/// Acks by the batch still ack every burst and trickle (decision 0103's stall: acks
/// queued while a frame went out, fewer than a batch, were never sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_by_the_batch_ack_every_burst() {
    let name = support::unique("ackbatch-bursts");
    let t = support::builder(&support::url(), &name)
        .ack_batch_wait(Duration::from_millis(1))
        .connect()
        .await
        .expect("RabbitMQ on AMQP_URL");
    crate::broker::every_burst_and_trickle_is_acked(&t, 1).await;
    t.close().await;
}
