//! A worker built for containers: configured entirely from the environment, JSON logs on
//! standard output, health and Prometheus metrics on their own port, W3C trace context
//! carried from producers into the worker's spans, and a graceful SIGTERM (readiness
//! false first, intake stopped, in-flight work drained, exit 0). The `Dockerfile` builds
//! it; `docs/operations.md` lists every variable.
//!
//! ```text
//! STEADFAST_BROKER_URL=amqp://guest:guest@127.0.0.1:5672/%2f STEADFAST_GROUP=jobs \
//!   STEADFAST_HTTP_ADDR=127.0.0.1:9090 \
//!   cargo run --features amqp,nats,postgres,http,otel --example container_worker
//! curl -s 127.0.0.1:9090/readyz; curl -s 127.0.0.1:9090/metrics
//! ```
//!
//! It handles `jobs.requested` messages (`{"job_id": 1, "work_ms": 50}`): each sleeps
//! `work_ms` and logs `job done`. With `STEADFAST_DATABASE_URL` set, deliveries are
//! deduplicated through a PostgreSQL idempotency store. A bad or missing variable is one
//! line on standard error and exit code 2; a broker that cannot be reached, exit code 1.

use std::{process::ExitCode, time::Duration};
use steadfast::{
    Context, HandlerError, Message, Worker,
    config::{LogFormat, WorkerConfig},
    http::{OpsServer, Prometheus},
    idempotency::postgres::PostgresStore,
};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

/// A job to run.
#[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
#[message(name = "jobs.requested")]
pub struct JobRequested {
    /// The job's id: the idempotency key.
    #[message(key)]
    pub job_id: u64,
    /// How long the job takes, in milliseconds.
    pub work_ms: u64,
}

async fn on_job(job: JobRequested, cx: Context) -> Result<(), HandlerError> {
    tracing::info!(job_id = job.job_id, attempt = cx.attempt(), "job started");
    tokio::time::sleep(Duration::from_millis(job.work_ms)).await;
    tracing::info!(job_id = job.job_id, "job done");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cfg = match WorkerConfig::from_env() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let tracer_provider = init_telemetry(cfg.log_format);
    let code = match run(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "worker failed");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    };
    let _ = tracer_provider.shutdown();
    code
}

async fn run(cfg: WorkerConfig) -> Result<(), Box<dyn std::error::Error>> {
    tracing::info!(config = ?cfg, "starting");
    // The recorder first: the worker's metric handles bind to it when it is built.
    let prometheus = Prometheus::install()?;
    let transport = cfg.connect().await?;
    let mut builder = Worker::builder_shared(transport.clone(), cfg.group_or("jobs"))
        .configure(&cfg)
        .handle(on_job);
    if let Some(url) = &cfg.database_url {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(u32::try_from(cfg.concurrency.min(32)).unwrap_or(8))
            .acquire_timeout(cfg.connect_timeout)
            .connect(url.expose_secret())
            .await
            .map_err(|e| format!("cannot connect to PostgreSQL at {url}: {}", kind(&e)))?;
        let store = PostgresStore::new(pool);
        store.migrate().await?;
        builder = builder.idempotency(store);
    }
    let worker = builder.build()?;

    let stop_http = CancellationToken::new();
    let http = match cfg.http_addr {
        Some(addr) => {
            let server = OpsServer::new()
                .watch(worker.status())
                .prometheus(prometheus)
                .bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr} (STEADFAST_HTTP_ADDR): {e}"))?;
            tracing::info!(http_addr = %server.local_addr(), "health and metrics server listening");
            Some(tokio::spawn(
                server.serve_until(stop_http.clone().cancelled_owned()),
            ))
        }
        None => None,
    };

    // Runs until SIGTERM or ctrl-c: readiness goes false, intake stops, in-flight work
    // drains within STEADFAST_DRAIN_TIMEOUT.
    let result = worker.run().await;
    transport.close().await;
    stop_http.cancel();
    if let Some(h) = http {
        let _ = h.await;
    }
    tracing::info!("stopped");
    result.map_err(Into::into)
}

/// What kind of database error, without its text (which could quote the URL).
fn kind(e: &sqlx::Error) -> &'static str {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) => "connection failed",
        sqlx::Error::PoolTimedOut => "timed out",
        sqlx::Error::Database(_) => "refused by the server",
        _ => "error",
    }
}

/// Logs to standard output (JSON by default) and spans to OpenTelemetry, with the W3C
/// propagator so trace context crosses the broker. Exporting spans to a collector is one
/// more layer (`opentelemetry-otlp`), left out to keep the example's build small.
fn init_telemetry(format: LogFormat) -> opentelemetry_sdk::trace::SdkTracerProvider {
    use opentelemetry::trace::TracerProvider as _;
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("container_worker"));
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stdout);
    match format {
        LogFormat::Json => registry.with(fmt.json().with_current_span(true)).init(),
        _ => registry.with(fmt).init(),
    }
    provider
}
