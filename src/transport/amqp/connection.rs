//! The connection: connect with heartbeats, reconnect with capped jittered backoff, the
//! shared publisher-confirm channel, and health.

use super::{
    acks::ChannelAcks,
    builder::{AmqpBuilder, Settings},
    guard,
    suspects::Suspects,
    topology,
};
use crate::{
    redact::redact_url,
    transport::{Health, TransportError, TransportErrorKind, backoff::Backoff},
};
use lapin::{
    Channel, Connection, ConnectionProperties, options::ConfirmSelectOptions, uri::AMQPUri,
};
use std::{
    future::Future,
    str::FromStr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One live connection, numbered: deliveries remember the generation they came from.
#[derive(Clone)]
pub(super) struct Link {
    pub(super) generation: u64,
    pub(super) conn: Arc<Connection>,
    /// The index of the node it is connected to.
    pub(super) node: usize,
}

/// One node of the cluster: its URL parsed (with the password) and shown (without).
struct Node {
    uri: AMQPUri,
    redacted: String,
}

/// The node URLs of `urls`: each entry may itself be a comma-separated list; blanks
/// around the commas are ignored. A comma inside a password must be written `%2C`.
pub(super) fn split_nodes(urls: &[String]) -> Vec<String> {
    urls.iter()
        .flat_map(|u| u.split(','))
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

impl Link {
    pub(super) fn is_up(&self) -> bool {
        self.conn.status().connected()
    }
}

enum Slot {
    Down,
    Up(Link),
    Closed,
}

pub(super) struct Inner {
    pub(super) cfg: Settings,
    /// Every node's URL without its password, comma-separated.
    pub(super) redacted_url: String,
    /// Hold the passwords: never printed.
    nodes: Vec<Node>,
    passwords: Vec<String>,
    /// The node of the live connection (or of the last one).
    current: AtomicUsize,
    slot: watch::Sender<Slot>,
    reconnecting: AtomicBool,
    generation: AtomicU64,
    publisher: tokio::sync::Mutex<Option<(u64, Channel)>>,
    /// The acknowledgers of consumer channels, so `close` can wait for in-flight settles.
    consumers: Mutex<Vec<Weak<ChannelAcks>>>,
    pub(super) closed: CancellationToken,
    /// Suspects of crash loops and the returns this process explains.
    pub(super) suspects: Suspects,
    last_error: Mutex<Option<String>>,
}

impl Inner {
    pub(super) fn new(b: AmqpBuilder) -> Result<Self, TransportError> {
        let urls = split_nodes(&b.urls);
        if urls.is_empty() {
            return Err(TransportError::new(
                TransportErrorKind::Config,
                "no RabbitMQ URL: give at least one node (amqp:// or amqps://)",
            ));
        }
        let mut nodes = Vec::with_capacity(urls.len());
        let mut passwords = Vec::new();
        for url in &urls {
            let redacted = redact_url(url);
            let mut uri = AMQPUri::from_str(url).map_err(|_| {
                TransportError::new(
                    TransportErrorKind::Config,
                    format!("invalid RabbitMQ URL `{redacted}`"),
                )
            })?;
            if uri.query.heartbeat.is_none() {
                uri.query.heartbeat = Some(b.heartbeat);
            }
            if uri.query.connection_timeout.is_none() {
                uri.query.connection_timeout =
                    Some(u64::try_from(b.operation_timeout.as_millis()).unwrap_or(u64::MAX));
            }
            if !uri.authority.userinfo.password.is_empty() {
                passwords.push(uri.authority.userinfo.password.clone());
            }
            nodes.push(Node { uri, redacted });
        }
        let redacted_url = nodes
            .iter()
            .map(|n| n.redacted.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let cfg = Settings {
            exchange: b.exchange,
            queue_prefix: b.queue_prefix,
            queue_type: b.queue_type,
            dlq_type: b.dlq_type,
            initial_group_size: b.initial_group_size,
            delivery_limit: b.delivery_limit,
            queue_expiry: b.queue_expiry,
            op_timeout: b.operation_timeout,
            max_reconnect_delay: b.max_reconnect_delay,
            consumer_channels: b.consumer_channels,
        };
        let (slot, _) = watch::channel(Slot::Down);
        Ok(Self {
            cfg,
            redacted_url,
            nodes,
            passwords,
            current: AtomicUsize::new(0),
            slot,
            reconnecting: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            publisher: tokio::sync::Mutex::new(None),
            consumers: Mutex::new(Vec::new()),
            closed: CancellationToken::new(),
            suspects: Suspects::default(),
            last_error: Mutex::new(None),
        })
    }

    /// The first connection, to the first node that answers in the order given: its
    /// failure is the caller's error (no retry loop).
    pub(super) async fn first_connect(self: &Arc<Self>) -> Result<(), TransportError> {
        let link = self.connect_any(0).await?;
        self.slot.send_replace(Slot::Up(link));
        Ok(())
    }

    /// One attempt at each node, starting with node `start` and going round the list:
    /// the first that connects wins. The error names every node's failure.
    async fn connect_any(&self, start: usize) -> Result<Link, TransportError> {
        let n = self.nodes.len();
        let mut failures = Vec::new();
        for i in (0..n).map(|k| (start + k) % n) {
            match self.connect_once(i).await {
                Ok(link) => return Ok(link),
                Err(e) if n == 1 => return Err(e),
                Err(e) => {
                    tracing::debug!(node = %self.nodes[i].redacted, error = %e, "RabbitMQ node did not take the connection");
                    failures.push((e.kind(), format!("{}: {e}", self.nodes[i].redacted)));
                }
            }
        }
        // A setting every node refuses is a configuration error; else a connection one.
        let kind = if failures
            .iter()
            .all(|(k, _)| *k == TransportErrorKind::Config)
        {
            TransportErrorKind::Config
        } else {
            TransportErrorKind::Connection
        };
        let each: Vec<String> = failures.into_iter().map(|(_, t)| t).collect();
        Err(TransportError::new(
            kind,
            format!(
                "no RabbitMQ node of {n} took the connection: {}",
                each.join("; ")
            ),
        ))
    }

    async fn connect_once(&self, node: usize) -> Result<Link, TransportError> {
        let props = ConnectionProperties::default()
            .with_connection_name(format!("steadfast {}", env!("CARGO_PKG_VERSION")).into());
        let conn = self
            .bounded(
                "connect",
                guard::connect(self.nodes[node].uri.clone(), props),
            )
            .await?;
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let link = Link {
            generation,
            conn: Arc::new(conn),
            node,
        };
        // The exchange exists before anything is published or bound.
        let declared = async {
            let ch = self.open_channel(&link).await?;
            topology::declare_exchange(self, &ch).await?;
            let _ = tokio::time::timeout(self.cfg.op_timeout, ch.close(200, "OK".into())).await;
            Ok::<_, TransportError>(())
        }
        .await;
        if let Err(e) = declared {
            let _ =
                tokio::time::timeout(self.cfg.op_timeout, link.conn.close(200, "OK".into())).await;
            return Err(e);
        }
        self.current.store(node, Ordering::SeqCst);
        tracing::info!(url = %self.nodes[node].redacted, generation, "connected to RabbitMQ");
        Ok(link)
    }

    /// The URL (without password) of the node of the live connection, if it is up.
    pub(super) fn connected_node(&self) -> Option<String> {
        match &*self.slot.borrow() {
            Slot::Up(l) if l.is_up() => Some(self.nodes[l.node].redacted.clone()),
            _ => None,
        }
    }

    pub(super) fn health(&self) -> Health {
        match &*self.slot.borrow() {
            Slot::Closed => Health::Closed,
            Slot::Up(l) if l.is_up() => Health::Connected,
            _ => Health::Reconnecting,
        }
    }

    /// The live connection, reconnecting (and waiting for it) if it is down. Waits
    /// without bound; callers that need a bound wrap it.
    pub(super) async fn link(self: &Arc<Self>) -> Result<Link, TransportError> {
        let mut rx = self.slot.subscribe();
        loop {
            let failed = match &*rx.borrow_and_update() {
                Slot::Closed => return Err(closed_error()),
                Slot::Up(l) if l.is_up() => return Ok(l.clone()),
                Slot::Up(l) => Some(l.generation),
                Slot::Down => None,
            };
            self.start_reconnect(failed);
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Err(closed_error()) },
                () = self.closed.cancelled() => return Err(closed_error()),
                // The slot does not change when the link dies under us; look again.
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// Like [`link`](Self::link), bounded by the operation timeout.
    pub(super) async fn link_bounded(self: &Arc<Self>) -> Result<Link, TransportError> {
        match tokio::time::timeout(self.cfg.op_timeout, self.link()).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::new(
                TransportErrorKind::Connection,
                format!(
                    "not connected to RabbitMQ at {} (reconnecting{})",
                    self.redacted_url,
                    self.last_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_deref()
                        .map(|e| format!("; last error: {e}"))
                        .unwrap_or_default()
                ),
            )),
        }
    }

    /// Starts the reconnect loop once, if it is not running.
    fn start_reconnect(self: &Arc<Self>, failed: Option<u64>) {
        if self.closed.is_cancelled() || self.reconnecting.swap(true, Ordering::SeqCst) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            this.slot.send_if_modified(|s| match s {
                Slot::Up(l) if Some(l.generation) == failed || !l.is_up() => {
                    *s = Slot::Down;
                    true
                }
                _ => false,
            });
            // Another task may have reconnected already.
            let up = matches!(&*this.slot.borrow(), Slot::Up(l) if l.is_up());
            if !up {
                // Start with the node after the one lost: it is likely down, and in a
                // cluster any node serves every queue.
                let lost = this.current.load(Ordering::SeqCst);
                let mut start = (lost + 1) % this.nodes.len();
                tracing::warn!(url = %this.nodes[lost].redacted, "connection to RabbitMQ lost; reconnecting");
                let mut backoff =
                    Backoff::new(Duration::from_millis(100), this.cfg.max_reconnect_delay);
                loop {
                    if this.closed.is_cancelled() {
                        break;
                    }
                    match this.connect_any(start).await {
                        Ok(link) => {
                            let conn = link.conn.clone();
                            let mut link = Some(link);
                            this.slot.send_if_modified(|s| {
                                if matches!(s, Slot::Closed) {
                                    return false;
                                }
                                match link.take() {
                                    Some(l) => {
                                        *s = Slot::Up(l);
                                        true
                                    }
                                    None => false,
                                }
                            });
                            if link.is_none() {
                                crate::transport::count_reconnect("rabbitmq");
                            } else {
                                // Closed meanwhile: do not resurrect the transport.
                                let _ = tokio::time::timeout(
                                    this.cfg.op_timeout,
                                    conn.close(200, "OK".into()),
                                )
                                .await;
                            }
                            break;
                        }
                        Err(e) => {
                            // The next round starts where the list was left off.
                            start = (start + 1) % this.nodes.len();
                            let wait = backoff.pause();
                            tracing::warn!(error = %e, retry_in = ?wait, "reconnect to RabbitMQ failed");
                            *this.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(e.to_string());
                            tokio::select! {
                                () = tokio::time::sleep(wait) => {}
                                () = this.closed.cancelled() => break,
                            }
                        }
                    }
                }
            }
            this.reconnecting.store(false, Ordering::SeqCst);
        });
    }

    pub(super) async fn open_channel(&self, link: &Link) -> Result<Channel, TransportError> {
        self.bounded("open a channel", link.conn.create_channel())
            .await
    }

    /// Gives up a channel an operation timed out on: it is never used again (its
    /// replies would be out of step with its requests, e.g. a late `basic.get-ok`
    /// answering the next `basic.get` and leaving a message unacked on it), and it is
    /// closed in the background, since the broker answers the close only after the
    /// operation it is still doing (under the operation timeout there too).
    pub(super) fn abandon(&self, ch: Channel) {
        if !ch.status().connected() {
            return;
        }
        let timeout = self.cfg.op_timeout;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(timeout, ch.close(200, "OK".into())).await;
        });
    }

    /// The shared publisher-confirm channel of the current connection.
    pub(super) async fn publisher(self: &Arc<Self>) -> Result<Channel, TransportError> {
        let link = self.link_bounded().await?;
        let mut slot = self.publisher.lock().await;
        if let Some((g, ch)) = &*slot
            && *g == link.generation
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        let ch = self.open_channel(&link).await?;
        self.bounded(
            "enable publisher confirms",
            ch.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        *slot = Some((link.generation, ch.clone()));
        Ok(ch)
    }

    /// Runs a lapin operation under the operation timeout, mapping its error.
    pub(super) async fn bounded<T>(
        &self,
        what: &str,
        fut: impl Future<Output = lapin::Result<T>>,
    ) -> Result<T, TransportError> {
        match tokio::time::timeout(self.cfg.op_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.error(what, &e)),
            Err(_) => Err(TransportError::new(
                TransportErrorKind::Timeout,
                format!(
                    "RabbitMQ did not answer `{what}` within {}",
                    humantime::format_duration(self.cfg.op_timeout)
                ),
            )),
        }
    }

    /// Maps a lapin error to a transport error whose text has no password in it.
    pub(super) fn error(&self, what: &str, e: &lapin::Error) -> TransportError {
        let kind = match e.kind() {
            lapin::ErrorKind::ProtocolError(p) => match p.get_id() {
                404 | 406 | 403 | 530 => TransportErrorKind::Config,
                _ => TransportErrorKind::Protocol,
            },
            _ => TransportErrorKind::Connection,
        };
        let mut text = e.to_string();
        for password in &self.passwords {
            text = crate::redact::scrub(&text, Some(password));
        }
        TransportError::new(kind, format!("RabbitMQ `{what}` failed: {text}"))
    }

    /// Remembers a consumer channel's acknowledger for [`close`](Self::close).
    pub(super) fn track(&self, acks: &Arc<ChannelAcks>) {
        let mut list = self.consumers.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(acks));
    }

    /// Stops intake, waits (up to the operation timeout) for deliveries already handed
    /// out to be settled or dropped, then closes the connection.
    pub(super) async fn close(&self) {
        self.closed.cancel();
        let deadline = tokio::time::Instant::now() + self.cfg.op_timeout;
        loop {
            let busy = self
                .consumers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter_map(Weak::upgrade)
                .any(|a| !a.is_idle());
            if !busy || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Let the last coalesced acks go out.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let old = self.slot.send_replace(Slot::Closed);
        if let Some((_, ch)) = self.publisher.lock().await.take() {
            let _ = tokio::time::timeout(self.cfg.op_timeout, ch.close(200, "OK".into())).await;
        }
        if let Slot::Up(l) = old {
            let _ = tokio::time::timeout(self.cfg.op_timeout, l.conn.close(200, "OK".into())).await;
        }
    }
}

pub(super) fn closed_error() -> TransportError {
    TransportError::new(
        TransportErrorKind::Closed,
        "the RabbitMQ transport is closed",
    )
}
