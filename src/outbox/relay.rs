//! The relay: claims committed outbox rows, publishes them with the broker's
//! confirmation, marks them sent; parks rows that keep failing.

use super::{Claimed, FailedRow, HeldBatch, OutboxSource};
use crate::worker::send::{self, SendKind};
use crate::{
    envelope::{Envelope, MessageId},
    sql::StoreError,
    transport::{Transport, TransportErrorKind},
};
use futures::{StreamExt, future::BoxFuture, stream::FuturesUnordered};
use std::{fmt, future::Future, sync::Arc, time::Duration};
use tokio::time::Instant;

/// `steadfast.outbox.pending` (gauge): rows waiting to be published, labelled
/// `outbox.backend` and `outbox.table`; updated by a running relay every 10 s.
pub const BACKLOG_PENDING: &str = "steadfast.outbox.pending";
/// `steadfast.outbox.oldest_age` (gauge, seconds): how long the oldest pending row has
/// waited: the relay's lag.
pub const BACKLOG_OLDEST_AGE: &str = "steadfast.outbox.oldest_age";
/// `steadfast.outbox.parked` (gauge): rows parked after repeated failures, waiting for
/// an operator (`steadfast outbox retry-parked`).
pub const BACKLOG_PARKED: &str = "steadfast.outbox.parked";
/// `steadfast.outbox.relayed` (counter): rows this relay handled, labelled `outcome`:
/// `published` (the broker confirmed), `failed` (tried again later), `parked`.
pub const RELAYED: &str = "steadfast.outbox.relayed";
/// How often a running relay measures its outbox's backlog.
const BACKLOG_EVERY: Duration = Duration::from_secs(10);

/// Publishes an outbox's committed rows through a transport.
///
/// One loop for every backend: [`run_until`](Self::run_until) claims a batch, publishes it
/// with [`Transport::publish_batch`] (confirms pipelined) and claims the next while up to
/// [`in_flight`](RelayBuilder::in_flight) batches await their confirms. A batch held in its
/// store's transaction (PostgreSQL, see [`hold_claims`](RelayBuilder::hold_claims)) is
/// recorded by one commit; a leased one by marking the confirmed rows sent in one
/// statement and recording the failures. A full batch means claim
/// again at once; a short one, once the batches in flight are confirmed; an empty one,
/// wait for a notification or the poll interval.
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
    counters: Counters,
}

/// The relay's counters, bound at build time to the recorder installed then.
struct Counters {
    published: metrics::Counter,
    failed: metrics::Counter,
    parked: metrics::Counter,
}

impl Counters {
    fn new(labels: &[(&'static str, String)]) -> Self {
        metrics::describe_counter!(
            RELAYED,
            metrics::Unit::Count,
            "Outbox rows relayed, by outcome."
        );
        let with = |outcome: &'static str| {
            let mut l = labels.to_vec();
            l.push(("outcome", outcome.to_owned()));
            metrics::counter!(RELAYED, &l)
        };
        Self {
            published: with("published"),
            failed: with("failed"),
            parked: with("parked"),
        }
    }
}

/// The labels of an outbox's metrics: `outbox.backend` and `outbox.table`.
fn labels(source: &dyn OutboxSource) -> [(&'static str, String); 2] {
    [
        ("outbox.backend", source.backend().to_owned()),
        ("outbox.table", source.table().to_owned()),
    ]
}

#[derive(Debug, Clone)]
struct Config {
    batch_size: usize,
    in_flight: usize,
    poll_interval: Duration,
    claim_lease: Duration,
    publish_timeout: Duration,
    max_attempts: u32,
    retry_delay: Duration,
    max_retry_delay: Duration,
    retention: Duration,
    max_payload_bytes: usize,
    hold_claims: bool,
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
    /// Rows per claim and per `publish_batch` (default 500). A claim takes what is
    /// there up to this, so a trickle of rows is not held back; under load, bigger
    /// batches mean fewer statements per row. On the storage bench against bare
    /// publishing to RabbitMQ with 1,000 messages awaiting confirms, rows kept, leased
    /// claims: 4 × 100 relayed at 0.49–0.56×, 4 × 250 at 0.70–0.78×, 2 × 500 at
    /// 0.73–0.92×; 2 × 500 with held claims (the defaults on PostgreSQL) at 0.79–0.95×
    /// (medians of runs; `docs/benchmarks.md`).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.cfg.batch_size = n;
        self
    }

    /// Batches awaiting their broker confirms at once in
    /// [`run_until`](Relay::run_until) (default 2, up to 64). With the default batch
    /// size, 1,000 messages are on their way while the next batch is claimed; more hides
    /// more broker latency, and every batch in flight is published again if the relay
    /// dies before recording it. One more batch is claimed ahead and published as soon
    /// as one in flight is confirmed (if the relay dies first, its rows come back: at
    /// once when held, when their claim lease ends when leased).
    pub fn in_flight(mut self, n: usize) -> Self {
        self.cfg.in_flight = n;
        self
    }

    /// How long to wait for work without a notification (default 1 s; SQLite relies on
    /// it, PostgreSQL only as the fallback to LISTEN/NOTIFY).
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.cfg.poll_interval = d;
        self
    }

    /// How long a leased claim hides its rows from other claims, and how long a held
    /// claim's transaction may stay idle before the server ends its session (default
    /// 60 s): a relay killed or hung mid-batch has its rows published again after this at
    /// the latest.
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

    /// Whether to hold claims in a transaction open while their batch is published,
    /// where the store can (default true; the PostgreSQL outbox can, see
    /// [`OutboxSource::claim_held`]). Held, a row is written once by its claim and the
    /// outcome is a commit: half the database work per row of a leased claim and its
    /// `sent` mark, and a dropped batch's rows are free at once. The price: each batch in
    /// flight, and the one claimed ahead, keeps a pool connection and an open
    /// transaction until its confirms are in (`in_flight + 1` connections). `false`
    /// claims with leases only: no transaction stays open across the network (for a
    /// statement-pooling proxy, or a pool too small to lend them).
    pub fn hold_claims(mut self, hold: bool) -> Self {
        self.cfg.hold_claims = hold;
        self
    }

    /// How long sent rows are kept before they are deleted (default 1 day).
    ///
    /// `Duration::ZERO` deletes each batch's rows as soon as the broker confirmed them,
    /// in the statement that would otherwise mark them sent: less database work per
    /// message (no new row version, no `sent_at` index entry; see `docs/benchmarks.md`),
    /// at the price of no record of what was sent in the outbox table itself.
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
        if c.in_flight == 0 || c.in_flight > 64 {
            problems.push(format!("in_flight must be 1..=64, got {}", c.in_flight));
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
        let counters = Counters::new(&labels(&*self.source));
        Ok(Relay {
            source: self.source,
            transport: self.transport,
            cfg: self.cfg,
            counters,
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
                batch_size: 500,
                in_flight: 2,
                poll_interval: Duration::from_secs(1),
                claim_lease: Duration::from_secs(60),
                publish_timeout: Duration::from_secs(30),
                max_attempts: 10,
                retry_delay: Duration::from_secs(1),
                max_retry_delay: Duration::from_secs(300),
                retention: Duration::from_secs(24 * 3600),
                max_payload_bytes: 1 << 20,
                hold_claims: true,
            },
        }
    }

    /// One pass: claim a batch, publish it, record the outcome.
    ///
    /// An error means the database could not be reached: claimed rows whose outcome was
    /// not recorded come back (and are published again): a held claim's when its
    /// transaction rolls back, a leased one's when its lease ends.
    pub async fn run_once(&self) -> Result<RelayStats, StoreError> {
        let claimed = self.claim().await?;
        if claimed.is_empty() {
            return Ok(RelayStats::default());
        }
        let published = self.publish_and_finish(claimed).await;
        if published.is_empty() {
            return Ok(published.stats);
        }
        self.record(published).await.map_err(|(_, e)| e)
    }

    /// A held claim where the store offers one (its transaction records the outcome),
    /// a leased one otherwise.
    async fn claim(&self) -> Result<Batch, StoreError> {
        let cfg = &self.cfg;
        let delete = cfg.retention.is_zero();
        let held = cfg
            .hold_claims
            .then(|| {
                self.source
                    .claim_held(cfg.batch_size, cfg.claim_lease, delete)
            })
            .flatten();
        match held {
            Some(held) => held.await.map(Batch::Held),
            None => self
                .source
                .claim(cfg.batch_size, cfg.claim_lease)
                .await
                .map(Batch::Leased),
        }
    }

    /// Publishes a claimed batch; a held one is then recorded by committing its
    /// transaction. What is left to record (a leased batch's outcome, or a held one's
    /// whose commit failed) comes back for [`record`](Self::record).
    async fn publish_and_finish(&self, batch: Batch) -> Published {
        match batch {
            Batch::Leased(rows) => self.publish(rows).await,
            Batch::Held(mut held) => {
                let mut p = self.publish(std::mem::take(&mut held.rows)).await;
                // Crash window: the broker confirmed the batch, its transaction is open.
                failpoint!("steadfast::relay::confirmed_before_mark_sent");
                match held.finish(&p.sent, &p.failures).await {
                    Ok(()) => {
                        p.sent.clear();
                        p.failures.clear();
                    }
                    // Rolled back: every row is pending again. Recorded by id instead,
                    // so they are not all published a second time.
                    Err(e) => tracing::warn!(
                        error = %e,
                        rows = p.sent.len() + p.failures.len(),
                        "could not commit a published outbox batch; recording its rows by id"
                    ),
                }
                p
            }
        }
    }

    /// Publishes a claimed batch and sorts the rows into sent and failed. No database
    /// call: the outcome is recorded by [`record`](Self::record).
    async fn publish(&self, claimed: Vec<Claimed>) -> Published {
        let cfg = &self.cfg;
        let mut stats = RelayStats {
            claimed: claimed.len(),
            ..RelayStats::default()
        };
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

        let results = if batch.is_empty() {
            Vec::new()
        } else {
            // One `send` span per batch, linked to the context each row was enqueued in
            // (the handler or request that wrote it), which the message itself carries on.
            let system = self.transport.system();
            let span = send::span(
                system,
                &self.transport.publish_destination(&batch[0].name),
                SendKind::Relay,
                batch.len(),
            );
            #[cfg(feature = "otel")]
            crate::otel::link_to_senders(&span, &batch);
            let publish =
                tokio::time::timeout(cfg.publish_timeout, self.transport.publish_batch(&batch));
            match send::traced(
                span,
                system,
                SendKind::Relay,
                batch.len(),
                publish,
                |r| match r {
                    Ok(r) => send::batch_error(r),
                    Err(_) => Some("timeout"),
                },
            )
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
        self.counters.published.increment(stats.sent as u64);
        self.counters.failed.increment(stats.failed as u64);
        self.counters.parked.increment(stats.parked as u64);
        Published {
            sent,
            failures,
            stats,
        }
    }

    /// Marks the confirmed rows sent (one statement) and records the failures. On an
    /// error, what is not recorded yet comes back with it: recorded again, or published
    /// again after the claim lease (a duplicate with the same id, never a loss).
    async fn record(&self, mut p: Published) -> Result<RelayStats, (Published, StoreError)> {
        // Crash window: the broker confirmed the batch, no row is marked sent yet.
        failpoint!("steadfast::relay::confirmed_before_mark_sent");
        if !p.sent.is_empty() {
            let done = if self.cfg.retention.is_zero() {
                self.source.delete_sent(&p.sent).await
            } else {
                self.source.mark_sent(&p.sent).await
            };
            if let Err(e) = done {
                return Err((p, e));
            }
            p.sent.clear();
        }
        if !p.failures.is_empty()
            && let Err(e) = self.source.mark_failed(&p.failures).await
        {
            return Err((p, e));
        }
        Ok(p.stats)
    }

    /// Relays until `shutdown` completes, then returns once what it claimed is published
    /// and recorded. Database outages are logged and retried with backoff; nothing here
    /// gives up.
    ///
    /// Under load the database and the broker work at once: up to
    /// [`in_flight`](RelayBuilder::in_flight) batches await their confirms while the next
    /// batch is claimed (and waits, ready, until one of them is confirmed) and the
    /// confirmed ones are recorded. Batches are disjoint (a claimed row is locked by its
    /// held claim, or hidden by its lease), so the overlap changes no outcome; it only
    /// lets batches' messages interleave on the broker.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let cfg = self.cfg.clone();
        let purge_every = Duration::from_secs(60).min(cfg.retention.max(Duration::from_secs(1)));
        let mut next_purge = Instant::now();
        let mut next_backlog = Instant::now();
        let labels = labels(&*self.source);
        metrics::describe_gauge!(
            BACKLOG_PENDING,
            metrics::Unit::Count,
            "Outbox rows waiting to be published."
        );
        metrics::describe_gauge!(
            BACKLOG_OLDEST_AGE,
            metrics::Unit::Seconds,
            "Age of the oldest outbox row waiting to be published."
        );
        metrics::describe_gauge!(
            BACKLOG_PARKED,
            metrics::Unit::Count,
            "Outbox rows parked after repeated failures."
        );
        let pending_gauge = metrics::gauge!(BACKLOG_PENDING, &labels);
        let age_gauge = metrics::gauge!(BACKLOG_OLDEST_AGE, &labels);
        let parked_gauge = metrics::gauge!(BACKLOG_PARKED, &labels);
        tracing::info!(
            backend = self.source.backend(),
            transport = self.transport.system(),
            in_flight = cfg.in_flight,
            "outbox relay started"
        );
        // Batches awaiting their confirms; the claim under way (and when it started); the
        // record under way.
        let mut publishing = FuturesUnordered::new();
        let mut claiming: Option<BoxFuture<'_, Result<Batch, StoreError>>> = None;
        let mut claim_started = Instant::now();
        // The batch claimed last, and when its claim started: published as soon as fewer
        // than `in_flight` batches await their confirms. While they all do, it waits
        // claimed ahead, so no claim stands between a confirm and the next publish
        // (measured: a claim of 250 rows took 4–5 ms, a batch's confirms from RabbitMQ
        // 58 ms and more).
        let mut ready: Option<(Batch, Instant)> = None;
        let mut recording: Option<BoxFuture<'_, Result<RelayStats, (Published, StoreError)>>> =
            None;
        // Published and not yet recorded (kept and recorded again after a database
        // error, so a blip does not make them wait for their claim lease to be published
        // a second time).
        let mut unrecorded = Published::default();
        let mut pace = Pace::Full;
        let (mut claim_backoff, mut record_backoff) = (Backoff::default(), Backoff::default());
        let (mut claim_at, mut record_at) = (Instant::now(), Instant::now());
        let mut stopping = false;
        loop {
            let now = Instant::now();
            // Housekeeping, also under sustained load.
            if !stopping && now >= next_purge {
                next_purge = now + purge_every;
                match self.source.purge_sent(cfg.retention).await {
                    Ok(n) if n > 0 => tracing::debug!(removed = n, "purged sent outbox rows"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "could not purge sent outbox rows"),
                }
            }
            if !stopping && now >= next_backlog {
                next_backlog = now + BACKLOG_EVERY;
                match self.source.backlog().await {
                    Ok(Some(b)) => {
                        pending_gauge.set(b.pending as f64);
                        age_gauge.set(b.oldest_age.as_secs_f64());
                        parked_gauge.set(b.parked as f64);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "could not measure the outbox backlog"),
                }
            }
            let now = Instant::now();
            if recording.is_none() && !unrecorded.is_empty() && now >= record_at {
                recording = Some(Box::pin(self.record(std::mem::take(&mut unrecorded))));
            }
            if publishing.len() < cfg.in_flight
                && let Some((batch, claimed)) = ready.take()
            {
                // Published only with a whole publish timeout of its lease left, so a slow
                // publish cannot outlive the lease and be sent twice; otherwise its rows
                // come back when the lease ends.
                // (A held batch's transaction may stay idle no longer than the lease.)
                if claimed.elapsed() + cfg.publish_timeout < cfg.claim_lease {
                    publishing.push(self.publish_and_finish(batch));
                } else {
                    tracing::debug!(
                        rows = batch.len(),
                        held = matches!(batch, Batch::Held(_)),
                        "a batch claimed ahead waited too long; its rows are claimed again (a held claim is released now, a leased one when its lease ends)"
                    );
                }
            }
            let room = ready.is_none()
                && match pace {
                    // Also while `in_flight` batches publish: the next batch waits ready.
                    Pace::Full => true,
                    Pace::Partial => publishing.is_empty(),
                    Pace::Empty => false,
                };
            if claiming.is_none() && !stopping && room && now >= claim_at {
                claim_started = Instant::now();
                claiming = Some(Box::pin(self.claim()));
            }
            if claiming.is_none() && publishing.is_empty() && recording.is_none() && ready.is_none()
            {
                // Nothing under way.
                if stopping {
                    break;
                }
                let mut wake = None::<Instant>;
                if pace != Pace::Empty {
                    wake = Some(claim_at);
                }
                if !unrecorded.is_empty() {
                    wake = Some(wake.map_or(record_at, |w| w.min(record_at)));
                }
                tokio::select! {
                    biased;
                    () = &mut shutdown => stopping = true,
                    () = self.source.wait(cfg.poll_interval), if pace == Pace::Empty => pace = Pace::Full,
                    () = tokio::time::sleep_until(wake.unwrap_or(now)), if wake.is_some() => {}
                }
                continue;
            }
            // A step in progress is bounded (every database call and the publish have
            // time limits) and not interrupted by the shutdown.
            tokio::select! {
                biased;
                () = &mut shutdown, if !stopping => stopping = true,
                r = opt(&mut recording) => {
                    recording = None;
                    match r {
                        Ok(_) => record_backoff.reset(),
                        Err((left, e)) => {
                            record_at = Instant::now()
                                + record_backoff.failed("record the published outbox rows", &e);
                            unrecorded = left.merge(std::mem::take(&mut unrecorded));
                        }
                    }
                }
                Some(p) = publishing.next(), if !publishing.is_empty() => {
                    unrecorded = std::mem::take(&mut unrecorded).merge(p);
                }
                r = opt(&mut claiming) => {
                    claiming = None;
                    match r {
                        Ok(c) => {
                            claim_backoff.reset();
                            pace = match c.len() {
                                0 => Pace::Empty,
                                n if n < cfg.batch_size => Pace::Partial,
                                _ => Pace::Full,
                            };
                            // Published at the top of the loop, at once if fewer than
                            // `in_flight` batches await their confirms.
                            if !c.is_empty() {
                                ready = Some((c, claim_started));
                            }
                        }
                        Err(e) => {
                            claim_at = Instant::now() + claim_backoff.failed("claim outbox rows", &e);
                        }
                    }
                }
            }
        }
        if !unrecorded.is_empty() {
            tracing::warn!(
                rows = unrecorded.sent.len() + unrecorded.failures.len(),
                "outbox relay stopped with published rows not recorded; they are published again"
            );
        }
        tracing::info!("outbox relay stopped");
    }
}

impl Published {
    fn is_empty(&self) -> bool {
        self.sent.is_empty() && self.failures.is_empty()
    }

    /// Both sets of outcomes, to be recorded together.
    fn merge(mut self, other: Published) -> Published {
        self.sent.extend(other.sent);
        self.failures.extend(other.failures);
        let (a, b) = (&mut self.stats, other.stats);
        a.claimed += b.claimed;
        a.sent += b.sent;
        a.failed += b.failed;
        a.parked += b.parked;
        self
    }
}

/// A claimed batch: held in its store's open transaction, or leased.
enum Batch {
    Held(HeldBatch),
    Leased(Vec<Claimed>),
}

impl Batch {
    fn len(&self) -> usize {
        match self {
            Batch::Held(h) => h.rows.len(),
            Batch::Leased(rows) => rows.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How the last claim came back, which decides when to claim again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pace {
    /// A full batch: claim again while fewer than `in_flight` batches are published.
    Full,
    /// Fewer rows than a batch: claim again once the batches in flight are confirmed.
    Partial,
    /// Nothing: wait for a notification or the poll interval.
    Empty,
}

/// Awaits the future in `slot`, or never when there is none.
async fn opt<T>(slot: &mut Option<BoxFuture<'_, T>>) -> T {
    match slot {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Published batches, their outcome not yet recorded.
#[derive(Default)]
struct Published {
    sent: Vec<MessageId>,
    failures: Vec<FailedRow>,
    stats: RelayStats,
}

/// The relay's wait after a failed database call: 100 ms doubling to 5 s.
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Duration::from_millis(100))
    }
}

impl Backoff {
    fn reset(&mut self) {
        *self = Self::default();
    }

    /// Logs the failure and returns how long to wait before trying again.
    fn failed(&mut self, what: &str, e: &StoreError) -> Duration {
        let wait = self.0;
        tracing::warn!(error = %e, retry_in = ?wait, "outbox relay could not {what}");
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        wait
    }
}
