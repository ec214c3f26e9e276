//! The connection: connect with heartbeats, reconnect with capped jittered backoff, the
//! shared publisher-confirm channel, and health.

use super::{AmqpBuilder, QueueType, acks::ChannelAcks, guard, redact_url, topology};
use crate::transport::{Health, TransportError, TransportErrorKind};
use backon::BackoffBuilder;
use lapin::{
    Channel, Connection, ConnectionProperties, options::ConfirmSelectOptions, uri::AMQPUri,
};
use std::{
    future::Future,
    str::FromStr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The settings, checked.
#[derive(Debug, Clone)]
pub(super) struct Config {
    pub(super) exchange: String,
    pub(super) queue_prefix: String,
    pub(super) queue_type: QueueType,
    pub(super) delivery_limit: u32,
    pub(super) queue_expiry: Option<Duration>,
    pub(super) op_timeout: Duration,
    pub(super) max_reconnect_delay: Duration,
    pub(super) consumer_channels: u16,
}

/// One live connection, numbered: deliveries remember the generation they came from.
#[derive(Clone)]
pub(super) struct Link {
    pub(super) generation: u64,
    pub(super) conn: Arc<Connection>,
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
    pub(super) cfg: Config,
    pub(super) redacted_url: String,
    /// Holds the password: never printed.
    uri: AMQPUri,
    password: String,
    slot: watch::Sender<Slot>,
    reconnecting: AtomicBool,
    generation: AtomicU64,
    publisher: tokio::sync::Mutex<Option<(u64, Channel)>>,
    /// The acknowledgers of consumer channels, so `close` can wait for in-flight settles.
    consumers: Mutex<Vec<Weak<ChannelAcks>>>,
    pub(super) closed: CancellationToken,
    last_error: Mutex<Option<String>>,
}

impl Inner {
    pub(super) fn new(b: AmqpBuilder) -> Result<Self, TransportError> {
        let redacted_url = redact_url(&b.url);
        let mut uri = AMQPUri::from_str(&b.url).map_err(|_| {
            TransportError::new(
                TransportErrorKind::Config,
                format!("invalid RabbitMQ URL `{redacted_url}`"),
            )
        })?;
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = Some(b.heartbeat);
        }
        if uri.query.connection_timeout.is_none() {
            uri.query.connection_timeout =
                Some(u64::try_from(b.operation_timeout.as_millis()).unwrap_or(u64::MAX));
        }
        let password = uri.authority.userinfo.password.clone();
        let cfg = Config {
            exchange: b.exchange,
            queue_prefix: b.queue_prefix,
            queue_type: b.queue_type,
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
            uri,
            password,
            slot,
            reconnecting: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            publisher: tokio::sync::Mutex::new(None),
            consumers: Mutex::new(Vec::new()),
            closed: CancellationToken::new(),
            last_error: Mutex::new(None),
        })
    }

    /// The first connection: its failure is the caller's error (no retry loop).
    pub(super) async fn first_connect(self: &Arc<Self>) -> Result<(), TransportError> {
        let link = self.connect_once().await?;
        self.slot.send_replace(Slot::Up(link));
        Ok(())
    }

    async fn connect_once(&self) -> Result<Link, TransportError> {
        let props = ConnectionProperties::default()
            .with_connection_name(format!("steadfast {}", env!("CARGO_PKG_VERSION")).into());
        let conn = self
            .bounded("connect", guard::connect(self.uri.clone(), props))
            .await?;
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let link = Link {
            generation,
            conn: Arc::new(conn),
        };
        // The exchange exists before anything is published or bound.
        let ch = self.open_channel(&link).await?;
        topology::declare_exchange(self, &ch).await?;
        let _ = ch.close(200, "OK".into()).await;
        tracing::info!(url = %self.redacted_url, generation, "connected to RabbitMQ");
        Ok(link)
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
                tracing::warn!(url = %this.redacted_url, "connection to RabbitMQ lost; reconnecting");
                let mut backoff = backon::ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(this.cfg.max_reconnect_delay)
                    .with_jitter()
                    .without_max_times()
                    .build();
                loop {
                    if this.closed.is_cancelled() {
                        break;
                    }
                    match this.connect_once().await {
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
                            let wait = backoff.next().unwrap_or(this.cfg.max_reconnect_delay);
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
        if !self.password.is_empty() {
            text = text.replace(&self.password, "***");
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
