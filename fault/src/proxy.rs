//! A small TCP proxy for cutting connections: accept, copy both ways, and on
//! [`Proxy::cut`] drop every live connection and refuse new ones for a while; with
//! [`Proxy::cut_after`] each connection is cut once it carried a number of bytes
//! (a flapping link, cut mid-frame).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::AbortHandle,
};

/// A running proxy to one upstream address; stops when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    live: Arc<Mutex<Vec<AbortHandle>>>,
    refusing: Arc<AtomicBool>,
    /// Bytes after which a connection is cut (0: never).
    budget: Arc<AtomicUsize>,
    cuts: Arc<AtomicU64>,
    accept: AbortHandle,
}

impl Proxy {
    /// Listens on an ephemeral loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let live: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let refusing = Arc::new(AtomicBool::new(false));
        let budget = Arc::new(AtomicUsize::new(0));
        let cuts = Arc::new(AtomicU64::new(0));
        let (l, r, b, c) = (live.clone(), refusing.clone(), budget.clone(), cuts.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if r.load(Ordering::Relaxed) {
                    drop(inbound);
                    continue;
                }
                let (b, c) = (b.clone(), c.clone());
                let task = tokio::spawn(async move {
                    let connect =
                        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(upstream));
                    if let Ok(Ok(outbound)) = connect.await {
                        copy_with_budget(inbound, outbound, &b, &c).await;
                    }
                });
                let mut g = l.lock().unwrap_or_else(|p| p.into_inner());
                g.retain(|h| !h.is_finished());
                g.push(task.abort_handle());
            }
        })
        .abort_handle();
        Ok(Self {
            addr,
            live,
            refusing,
            budget,
            cuts,
            accept,
        })
    }

    /// From now on, cut each connection once it carried `bytes` bytes (both ways
    /// together), or never with `None`.
    pub fn cut_after(&self, bytes: Option<usize>) {
        self.budget.store(bytes.unwrap_or(0), Ordering::Relaxed);
    }

    /// Connections cut by [`cut_after`](Self::cut_after) so far.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Relaxed)
    }

    /// The address to connect to instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every live connection (both sides see the socket close) and refuses new
    /// ones for `down`; returns how many were cut.
    pub async fn cut(&self, down: Duration) -> usize {
        self.refusing.store(true, Ordering::Relaxed);
        let cut = {
            let mut g = self.live.lock().unwrap_or_else(|p| p.into_inner());
            let n = g.iter().filter(|h| !h.is_finished()).count();
            for h in g.drain(..) {
                h.abort();
            }
            n
        };
        tokio::time::sleep(down).await;
        self.refusing.store(false, Ordering::Relaxed);
        cut
    }
}

/// Copies both ways until either side closes, or until the connection carried the
/// current budget's bytes (when one is set), then drops both sockets.
async fn copy_with_budget(
    inbound: TcpStream,
    outbound: TcpStream,
    budget: &AtomicUsize,
    cuts: &AtomicU64,
) {
    let (mut ir, mut iw) = inbound.into_split();
    let (mut or, mut ow) = outbound.into_split();
    let mut carried = 0usize;
    let mut a = [0u8; 4096];
    let mut b = [0u8; 4096];
    loop {
        let (n, up) = tokio::select! {
            r = ir.read(&mut a) => match r { Ok(0) | Err(_) => return, Ok(n) => (n, true) },
            r = or.read(&mut b) => match r { Ok(0) | Err(_) => return, Ok(n) => (n, false) },
        };
        let limit = budget.load(Ordering::Relaxed);
        let mut take = n;
        if limit > 0 && carried + n >= limit {
            // Forward part of this chunk, then cut: mid-frame.
            take = limit.saturating_sub(carried).min(n);
        }
        let w = if up {
            ow.write_all(&a[..take]).await
        } else {
            iw.write_all(&b[..take]).await
        };
        if w.is_err() {
            return;
        }
        carried += take;
        if limit > 0 && carried >= limit {
            cuts.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for h in self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            h.abort();
        }
    }
}
