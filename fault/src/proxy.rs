//! A small TCP proxy for cutting connections: accept, copy both ways, and on
//! [`Proxy::cut`] drop every live connection and refuse new ones for a while.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};
use tokio::{
    net::{TcpListener, TcpStream},
    task::AbortHandle,
};

/// A running proxy to one upstream address; stops when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    live: Arc<Mutex<Vec<AbortHandle>>>,
    refusing: Arc<AtomicBool>,
    accept: AbortHandle,
}

impl Proxy {
    /// Listens on an ephemeral loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let live: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let refusing = Arc::new(AtomicBool::new(false));
        let (l, r) = (live.clone(), refusing.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if r.load(Ordering::Relaxed) {
                    drop(inbound);
                    continue;
                }
                let task = tokio::spawn(async move {
                    let connect =
                        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(upstream));
                    if let Ok(Ok(mut outbound)) = connect.await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
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
            accept,
        })
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
