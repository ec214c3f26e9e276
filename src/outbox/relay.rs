//! The relay: claims committed outbox rows, publishes them with the broker's
//! confirmation, marks them sent; parks rows that keep failing.

use super::{FailedRow, OutboxSource};
use crate::{
    envelope::{Envelope, MessageId},
    idempotency::StoreError,
    transport::{Transport, TransportErrorKind},
};
use std::{fmt, future::Future, sync::Arc, time::Duration};

/// Publishes an outbox's committed rows through a transport.
///
/// One loop for every backend: [`run_until`](Self::run_until) claims a batch, publishes it
/// with [`Transport::publish_batch`] (confirms pipelined), marks the confirmed rows sent
/// in one statement and records the failures; then goes on at once if the batch was
/// full, or waits for a notification or the poll interval.
///
/// ```no_run
/// # async fn f(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use steadfast::{outbox::{PostgresOutbox, Relay}, transport::memory::MemoryTransport};
/// let relay = Relay::builder(PostgresOutbox::new(pool), Arc::new(MemoryTransport::new()))
///     .batch_size(100)
///     .build()?;
/// relay.run_until(steadfast::shutdown_signal()).await;
/// # Ok(()) }
/// ```
pub struct Relay {
    source: Arc<dyn OutboxSource>,
    transport: Arc<dyn Transport>,
    cfg: Config,
}

#[derive(Debug, Clone)]
struct Config {
    batch_size: usize,
    poll_interval: Duration,
    claim_lease: Duration,
    publish_timeout: Duration,
    max_attempts: u32,
    retry_delay: Duration,
    max_retry_delay: Duration,
    retention: Duration,
    max_payload_bytes: usize,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("backend", &self.source.backend())
            .field("transport", &self.transport.system())
            .field("config", &self.cfg)
            .finish()
    }
}

/// What one relay pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Rows claimed.
    pub claimed: usize,
    /// Rows the broker confirmed and that were marked sent.
    pub sent: usize,
    /// Rows that failed and will be tried again.
    pub failed: usize,
    /// Rows parked.
    pub parked: usize,
}

/// Builds a [`Relay`]; see [`Relay::builder`].
pub struct RelayBuilder {
    source: Arc<dyn OutboxSource>,
    transport: Arc<dyn Transport>,
    cfg: Config,
}

impl fmt::Debug for RelayBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayBuilder")
            .field("backend", &self.source.backend())
            .field("config", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// A relay's configuration is invalid.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid relay configuration: {0}")]
pub struct RelayConfigError(String);

impl RelayBuilder {
    /// Rows per claim and per `publish_batch` (default 100).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.cfg.batch_size = n;
        self
    }

    /// How long to wait for work without a notification (default 1 s; SQLite relies on
    /// it, PostgreSQL only as the fallback to LISTEN/NOTIFY).
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.cfg.poll_interval = d;
        self
    }

    /// How long a claimed row stays hidden from other claims (default 60 s): a relay
    /// killed mid-batch has its rows published again after this.
    pub fn claim_lease(mut self, d: Duration) -> Self {
        self.cfg.claim_lease = d;
        self
    }

    /// How long one `publish_batch` may take (default 30 s; must be below the claim lease).
    pub fn publish_timeout(mut self, d: Duration) -> Self {
        self.cfg.publish_timeout = d;
        self
    }

    /// Failed publishes before a row is parked (default 10).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.cfg.max_attempts = n;
        self
    }

    /// The first retry delay of a failed row, doubled per attempt up to `max` (default
    /// 1 s up to 5 min).
    pub fn retry_delay(mut self, first: Duration, max: Duration) -> Self {
        self.cfg.retry_delay = first;
        self.cfg.max_retry_delay = max;
        self
    }

    /// How long sent rows are kept before they are deleted (default 1 day).
    pub fn retention(mut self, d: Duration) -> Self {
        self.cfg.retention = d;
        self
    }

    /// Rows with a larger payload are parked without being published (default 1 MiB, the
    /// workers' default limit).
    pub fn max_payload_bytes(mut self, n: usize) -> Self {
        self.cfg.max_payload_bytes = n;
        self
    }

    /// Validates the configuration.
    pub fn build(self) -> Result<Relay, RelayConfigError> {
        let c = &self.cfg;
        let mut problems = Vec::new();
        if c.batch_size == 0 || c.batch_size > 10_000 {
            problems.push(format!(
                "batch_size must be 1..=10000, got {}",
                c.batch_size
            ));
        }
        if c.poll_interval.is_zero() {
            problems.push("poll_interval must be above zero".to_owned());
        }
        if c.publish_timeout.is_zero() || c.publish_timeout >= c.claim_lease {
            problems.push(
                "publish_timeout must be above zero and below claim_lease (or a slow publish is sent twice)"
                    .to_owned(),
            );
        }
        if c.max_attempts == 0 {
            problems.push("max_attempts must be at least 1".to_owned());
        }
        if c.max_payload_bytes == 0 {
            problems.push("max_payload_bytes must be above zero".to_owned());
        }
        if !problems.is_empty() {
            return Err(RelayConfigError(problems.join("; ")));
        }
        Ok(Relay {
            source: self.source,
            transport: self.transport,
            cfg: self.cfg,
        })
    }
}

impl Relay {
    /// Starts building a relay from `source` (a `PostgresOutbox`, `SqliteOutbox`, ...)
    /// to `transport`.
    pub fn builder(source: impl OutboxSource, transport: Arc<dyn Transport>) -> RelayBuilder {
        RelayBuilder {
            source: Arc::new(source),
            transport,
            cfg: Config {
                batch_size: 100,
                poll_interval: Duration::from_secs(1),
                claim_lease: Duration::from_secs(60),
                publish_timeout: Duration::from_secs(30),
                max_attempts: 10,
                retry_delay: Duration::from_secs(1),
                max_retry_delay: Duration::from_secs(300),
                retention: Duration::from_secs(24 * 3600),
                max_payload_bytes: 1 << 20,
            },
        }
    }

    /// One pass: claim a batch, publish it, record the outcome.
    ///
    /// An error means the database could not be reached: claimed rows whose outcome was
    /// not recorded come back when their claim lease ends (and are published again).
    pub async fn run_once(&self) -> Result<RelayStats, StoreError> {
        let cfg = &self.cfg;
        let claimed = self.source.claim(cfg.batch_size, cfg.claim_lease).await?;
        let mut stats = RelayStats {
            claimed: claimed.len(),
            ..RelayStats::default()
        };
        if claimed.is_empty() {
            return Ok(stats);
        }
        let mut failures: Vec<FailedRow> = Vec::new();
        let mut batch: Vec<Envelope> = Vec::with_capacity(claimed.len());
        let mut attempts: Vec<u32> = Vec::with_capacity(claimed.len());
        for c in claimed {
            if c.envelope.payload.len() > cfg.max_payload_bytes {
                failures.push(FailedRow {
                    id: c.envelope.id,
                    error: format!(
                        "payload of {} bytes exceeds the relay's limit of {} bytes",
                        c.envelope.payload.len(),
                        cfg.max_payload_bytes
                    ),
                    park: true,
                    retry_after: Duration::ZERO,
                });
            } else {
                attempts.push(c.attempts);
                batch.push(c.envelope);
            }
        }

        let results =
            match tokio::time::timeout(cfg.publish_timeout, self.transport.publish_batch(&batch))
                .await
            {
                Ok(r) if r.len() == batch.len() => r
                    .into_iter()
                    .map(|r| r.map_err(|e| (Some(e.kind()), e.to_string())))
                    .collect(),
                Ok(r) => {
                    let msg = format!(
                        "transport returned {} results for {} messages",
                        r.len(),
                        batch.len()
                    );
                    vec![Err((None, msg)); batch.len()]
                }
                Err(_) => {
                    let msg = format!(
                        "publish not confirmed within {}",
                        humantime::format_duration(cfg.publish_timeout)
                    );
                    vec![Err((Some(TransportErrorKind::Timeout), msg)); batch.len()]
                }
            };

        let mut sent: Vec<MessageId> = Vec::with_capacity(batch.len());
        for ((env, prior), result) in batch.iter().zip(attempts).zip(results) {
            match result {
                Ok(()) => sent.push(env.id),
                Err((kind, error)) => {
                    let attempt = prior.saturating_add(1);
                    let park = attempt >= cfg.max_attempts;
                    tracing::warn!(id = %env.id, name = %env.name, attempt, ?kind, %error, park, "outbox publish failed");
                    let exp = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
                    failures.push(FailedRow {
                        id: env.id,
                        error,
                        park,
                        retry_after: cfg.retry_delay.saturating_mul(exp).min(cfg.max_retry_delay),
                    });
                }
            }
        }
        stats.sent = sent.len();
        stats.parked = failures.iter().filter(|f| f.park).count();
        stats.failed = failures.len() - stats.parked;
        if !sent.is_empty() {
            // If this fails the rows are published again after the claim lease: a
            // duplicate with the same id, never a loss.
            self.source.mark_sent(&sent).await?;
        }
        if !failures.is_empty() {
            self.source.mark_failed(&failures).await?;
        }
        Ok(stats)
    }

    /// Relays until `shutdown` completes, then returns after the pass in progress.
    /// Database outages are logged and retried with backoff; nothing here gives up.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let cfg = self.cfg.clone();
        let purge_every = Duration::from_secs(60).min(cfg.retention.max(Duration::from_secs(1)));
        let mut next_purge = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(100);
        tracing::info!(
            backend = self.source.backend(),
            transport = self.transport.system(),
            "outbox relay started"
        );
        loop {
            if futures::FutureExt::now_or_never(&mut shutdown).is_some() {
                break;
            }
            // A pass is bounded (every database call and the publish have time limits)
            // and not interrupted, so its outcome is recorded before shutdown.
            let pass = self.run_once().await;
            let more = match pass {
                Ok(stats) => {
                    backoff = Duration::from_millis(100);
                    stats.claimed == cfg.batch_size
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "outbox relay pass failed");
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            if tokio::time::Instant::now() >= next_purge {
                next_purge = tokio::time::Instant::now() + purge_every;
                match self.source.purge_sent(cfg.retention).await {
                    Ok(n) if n > 0 => tracing::debug!(removed = n, "purged sent outbox rows"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "could not purge sent outbox rows"),
                }
            }
            if !more {
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    () = self.source.wait(cfg.poll_interval) => {}
                }
            }
        }
        tracing::info!("outbox relay stopped");
    }
}
