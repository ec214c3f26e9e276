//! A worker built for containers with the app runner: configured entirely from the
//! environment, JSON logs with trace ids, health and Prometheus metrics on their own
//! port, and a graceful SIGTERM (readiness false, intake stopped, in-flight work drained,
//! exit 0). It handles `jobs.requested` (`{"job_id": 1, "work_ms": 50}`): each sleeps
//! `work_ms` and logs `job done`; with `STEADFAST_DATABASE_URL` set, deliveries are
//! deduplicated through PostgreSQL. A bad variable: one line, exit 2; a broker that
//! cannot be reached: one line, exit 1. With `OTEL_EXPORTER_OTLP_ENDPOINT` set, its spans
//! and metrics go to that OpenTelemetry collector too (flushed at shutdown). The
//! `Dockerfile` builds it.
//!
//! ```text
//! STEADFAST_BROKER_URL=amqp://guest:guest@127.0.0.1:5672/%2f STEADFAST_HTTP_ADDR=127.0.0.1:9090 \
//!   OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 OTEL_SERVICE_NAME=jobs-worker \
//!   cargo run --features amqp,nats,postgres,app,otlp --example container_worker
//! curl -s 127.0.0.1:9090/readyz; curl -s 127.0.0.1:9090/metrics
//! ```

use std::{process::ExitCode, time::Duration};
use steadfast::{App, Context, HandlerError, Message};

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
    App::from_env()
        .postgres_idempotency()
        .worker("jobs", |w| w.handle(on_job))
        .run()
        .await
}
