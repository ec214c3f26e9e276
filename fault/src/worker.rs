//! The worker process (`fault-worker`): one steadfast worker, or one outbox relay,
//! configured by environment variables, with the handler of the harness model.
//!
//! The handler writes one row into the `effects` table — which has no unique constraint,
//! so a second effect of the same message shows — in the same transaction as the inbox
//! key. The message itself says how the handler misbehaves ([`Mode`]).

use crate::{
    db::{Inbox, Outbox, Pool},
    spec::{Mode, Role, Spec, Work},
};
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};
use steadfast::{
    Context, HandlerError, Worker,
    outbox::{OutboxSource, Relay},
    transport::Transport,
    worker::{Outcome, Processed},
};

/// What one worker process did, printed as a `stats` line every 200 ms and at exit, so
/// the harness can add up redeliveries even for processes it killed.
#[derive(Debug, Default)]
pub struct Tally {
    /// Handler calls started.
    pub calls: AtomicU64,
    /// Outcomes: acked, duplicate, retried, deferred, dead-lettered, not settled.
    pub outcomes: [AtomicU64; 6],
}

impl Tally {
    fn record(&self, p: &Processed) {
        let i = match p.outcome {
            Outcome::Acked => 0,
            Outcome::Duplicate => 1,
            Outcome::Retried { .. } => 2,
            Outcome::Deferred { .. } => 3,
            Outcome::DeadLettered(_) => 4,
            _ => 5,
        };
        self.outcomes[i].fetch_add(1, Ordering::Relaxed);
    }

    fn line(&self) -> String {
        let o: Vec<String> = self
            .outcomes
            .iter()
            .map(|a| a.load(Ordering::Relaxed).to_string())
            .collect();
        format!(
            "stats {} {}",
            self.calls.load(Ordering::Relaxed),
            o.join(" ")
        )
    }
}

/// Builds the model's worker on `transport`: the `Work` handler writing effects through
/// the inbox (PostgreSQL or MariaDB), the suite's retry policy and limits. The harness
/// builds the same worker to declare the topology before it publishes.
pub fn build_worker(
    spec: &Spec,
    transport: Arc<dyn Transport>,
    pool: Pool,
    inbox: Inbox,
    tally: Arc<Tally>,
) -> Result<Worker, steadfast::worker::BuildError> {
    let effects = format!("{}.effects", spec.schema);
    let handler_inbox = inbox.clone();
    let calls = tally.clone();
    let builder = Worker::builder_shared(transport, spec.group.clone()).handle(
        move |job: Work, cx: Context| {
            calls.calls.fetch_add(1, Ordering::Relaxed);
            let (pool, inbox, effects) = (pool.clone(), handler_inbox.clone(), effects.clone());
            async move { handle(job, cx, &pool, &inbox, &effects).await }
        },
    );
    let builder = match (spec.inbox_mode, inbox) {
        (true, Inbox::Pg(s)) => builder.inbox(s),
        (true, Inbox::My(s)) => builder.inbox(s),
        (false, Inbox::Pg(s)) => builder.idempotency(s),
        (false, Inbox::My(s)) => builder.idempotency(s),
    };
    builder
        .retry(spec.retry_policy())
        .concurrency(spec.concurrency)
        .prefetch(spec.prefetch.max(spec.concurrency))
        .handler_timeout(spec.handler_timeout)
        .drain_timeout(spec.drain_timeout)
        .max_payload_bytes(spec.max_payload_bytes)
        .on_outcome(move |p| tally.record(p))
        .build()
}

async fn handle(
    job: Work,
    cx: Context,
    pool: &Pool,
    inbox: &Inbox,
    effects: &str,
) -> Result<(), HandlerError> {
    let attempt = cx.attempt();
    match job.mode {
        Mode::Ok => {}
        Mode::Abort => {
            // A message that takes the whole process down, every time.
            eprintln!("fault-worker: message {} aborts the process", job.n);
            std::process::abort();
        }
        Mode::Permanent => {
            return Err(
                HandlerError::msg(format!("message {} is refused for good", job.n)).permanent(),
            );
        }
        Mode::Transient(k) if attempt <= k => {
            return Err(HandlerError::msg(format!(
                "message {} fails transiently on attempt {attempt} of {k}",
                job.n
            )));
        }
        Mode::Panic(k) if attempt <= k => {
            panic!("message {} panics on attempt {attempt}", job.n);
        }
        Mode::Hang(k) if attempt <= k => {
            // Past any handler timeout the suite sets; the pipeline's timeout ends it.
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Mode::Transient(_) | Mode::Panic(_) | Mode::Hang(_) => {}
    }
    pool.write_effect(inbox, effects, &job, &cx).await
}

/// Arms the failpoints named in `FW_ABORT_AT` (`name@k,...`): the process aborts — no
/// unwinding, no cleanup, like a SIGKILL — on the k-th hit of `name`.
fn arm_failpoints(spec: &Spec) -> Result<(), String> {
    if spec.abort_at.is_empty() {
        return Ok(());
    }
    #[cfg(feature = "failpoints")]
    {
        for (name, k) in &spec.abort_at {
            let hits = AtomicU64::new(0);
            let k = *k;
            let shown = name.clone();
            fail::cfg_callback(name.clone(), move || {
                if hits.fetch_add(1, Ordering::Relaxed) + 1 == k {
                    eprintln!("fault-worker: failpoint {shown} hit {k} times: aborting");
                    std::process::abort();
                }
            })?;
        }
        Ok(())
    }
    #[cfg(not(feature = "failpoints"))]
    Err("FW_ABORT_AT needs steadfast-fault built with the `failpoints` feature (CI's --all-features)".into())
}

/// The `fault-worker` binary's main.
pub async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let spec = Spec::from_env()?;
    arm_failpoints(&spec)?;
    let pool = Pool::connect(&spec.db_url, 8).await?;
    let transport = spec.connect().await?;
    match spec.role {
        Role::Worker => run_worker(&spec, transport, pool).await,
        Role::Relay => run_relay(&spec, transport, pool).await,
    }
}

async fn run_worker(
    spec: &Spec,
    transport: Arc<dyn Transport>,
    pool: Pool,
) -> Result<(), Box<dyn std::error::Error>> {
    let inbox = pool.inbox(&spec.inbox_table())?;
    let tally = Arc::new(Tally::default());
    let worker = build_worker(spec, transport.clone(), pool, inbox, tally.clone())?;
    let status = worker.status();
    let t = tally.clone();
    let reporter = tokio::spawn(async move {
        let mut said_ready = false;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            if !said_ready && status.is_ready() {
                said_ready = true;
                println!("ready");
            }
            println!("{}", t.line());
        }
    });
    let result = worker.run().await;
    reporter.abort();
    transport.close().await;
    println!("{}", tally.line());
    println!("stopped");
    result?;
    Ok(())
}

async fn run_relay(
    spec: &Spec,
    transport: Arc<dyn Transport>,
    pool: Pool,
) -> Result<(), Box<dyn std::error::Error>> {
    match pool.outbox(&spec.outbox_table(), Duration::from_secs(5))? {
        Outbox::Pg(o) => relay_from(o, transport).await,
        Outbox::My(o) => relay_from(o, transport).await,
    }
}

async fn relay_from(
    outbox: impl OutboxSource,
    transport: Arc<dyn Transport>,
) -> Result<(), Box<dyn std::error::Error>> {
    let relay =
        steadfast::testing::fault_relay(Relay::builder(outbox, transport.clone())).build()?;
    println!("ready");
    relay.run_until(steadfast::shutdown_signal()).await;
    transport.close().await;
    println!("stopped");
    Ok(())
}
