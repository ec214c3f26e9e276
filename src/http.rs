//! The operations server (feature `http`): liveness, readiness and Prometheus metrics on
//! a port of their own.
//!
//! - `GET /livez`: 200 while every watched worker's loop is going round (see
//!   [`StatusHandle::is_live`]). Never tied to the broker: a broker outage must not get
//!   every replica restarted.
//! - `GET /readyz`: 200 while every watched worker is running (consumers started, not
//!   draining) and its transport is connected; 503 with the reason otherwise, and from
//!   the moment shutdown begins.
//! - `GET /metrics`: the Prometheus text format, when a [`Prometheus`] recorder is given.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use steadfast::{Context, HandlerError, Message, Worker, http::{OpsServer, Prometheus}};
//! use steadfast::transport::memory::MemoryTransport;
//! # #[derive(serde::Serialize, serde::Deserialize, Message)]
//! # #[message(name = "orders.placed")]
//! # struct OrderPlaced { order_id: u64 }
//! # async fn on_order(_: OrderPlaced, _: Context) -> Result<(), HandlerError> { Ok(()) }
//!
//! // Install the recorder before building workers: their metric handles bind to it.
//! let prometheus = Prometheus::install()?;
//! let worker = Worker::builder(MemoryTransport::new(), "billing").handle(on_order).build()?;
//! let server = OpsServer::new()
//!     .watch(worker.status())
//!     .prometheus(prometheus)
//!     .bind("127.0.0.1:0".parse()?)
//!     .await?;
//! println!("health and metrics on http://{}", server.local_addr());
//! let stop = tokio_util::sync::CancellationToken::new();
//! let serving = tokio::spawn(server.serve_until(stop.clone().cancelled_owned()));
//! // worker.run().await? ... then:
//! stop.cancel();
//! serving.await??;
//! # Ok(()) }
//! ```

use crate::worker::{
    StatusHandle, WorkerState, metrics::PROCESS_DURATION, send::OPERATION_DURATION,
};
use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::{fmt, fmt::Write as _, future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

/// Bucket bounds of `messaging.process.duration` and `messaging.client.operation.duration`,
/// in seconds: the ones the OpenTelemetry messaging conventions recommend, plus 30 s and
/// 60 s for slow handlers.
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
];

/// How often the recorder folds recorded histogram samples into its buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The process-wide Prometheus recorder of the `metrics` facade.
#[derive(Clone)]
pub struct Prometheus {
    handle: PrometheusHandle,
}

impl fmt::Debug for Prometheus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prometheus").finish_non_exhaustive()
    }
}

/// The Prometheus recorder could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the Prometheus recorder: {0}")]
pub struct InstallError(String);

impl Prometheus {
    /// Installs the recorder for the whole process (Prometheus naming: `_total` on
    /// counters, unit suffixes) and starts its upkeep on the current Tokio runtime.
    /// Call it once, before building workers and relays, inside the runtime. With the
    /// `otlp` feature and metric export configured ([`crate::otlp`]), every metric is
    /// also recorded for the OTLP exporter.
    pub fn install() -> Result<Self, InstallError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| InstallError("call it inside a Tokio runtime".to_owned()))?;
        let recorder = PrometheusBuilder::new()
            .with_recommended_naming(true)
            .set_buckets_for_metric(Matcher::Full(PROCESS_DURATION.to_owned()), DURATION_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(OPERATION_DURATION.to_owned()),
                    DURATION_BUCKETS,
                )
            })
            .map_err(|e| InstallError(e.to_string()))?
            .build_recorder();
        let handle = recorder.handle();
        // With OTLP metric export on, every metric goes to both.
        #[cfg(feature = "otlp")]
        let installed = match crate::otlp::recorder() {
            Some(otlp) => metrics::set_global_recorder(
                metrics_util::layers::FanoutBuilder::default()
                    .add_recorder(recorder)
                    .add_recorder(otlp)
                    .build(),
            )
            .map_err(|e| e.to_string()),
            None => metrics::set_global_recorder(recorder).map_err(|e| e.to_string()),
        };
        #[cfg(not(feature = "otlp"))]
        let installed = metrics::set_global_recorder(recorder).map_err(|e| e.to_string());
        installed.map_err(InstallError)?;
        let upkeep = handle.clone();
        runtime.spawn(async move {
            let mut every = tokio::time::interval(UPKEEP_EVERY);
            loop {
                every.tick().await;
                upkeep.run_upkeep();
            }
        });
        Ok(Self { handle })
    }

    /// The current metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

/// Builds the operations server; see the [module docs](self).
#[derive(Debug, Default)]
pub struct OpsServer {
    workers: Vec<StatusHandle>,
    prometheus: Option<Prometheus>,
}

#[derive(Debug)]
struct Shared {
    workers: Vec<StatusHandle>,
    prometheus: Option<Prometheus>,
}

impl OpsServer {
    /// A server watching no worker yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Watches a worker: it must be live for `/livez` and ready for `/readyz`.
    pub fn watch(mut self, status: StatusHandle) -> Self {
        self.workers.push(status);
        self
    }

    /// Serves `/metrics` from `prometheus`.
    pub fn prometheus(mut self, prometheus: Prometheus) -> Self {
        self.prometheus = Some(prometheus);
        self
    }

    /// Binds the listening socket (port 0 picks a free port).
    pub async fn bind(self, addr: SocketAddr) -> io::Result<BoundOpsServer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            workers: self.workers,
            prometheus: self.prometheus,
        });
        let router = Router::new()
            .route("/livez", get(livez))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(shared);
        Ok(BoundOpsServer {
            listener,
            local_addr,
            router,
        })
    }
}

/// A bound operations server, ready to serve.
pub struct BoundOpsServer {
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    router: Router,
}

impl fmt::Debug for BoundOpsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundOpsServer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl BoundOpsServer {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes. Keep it serving while the worker drains, so
    /// probes see "not ready" rather than a refused connection, and stop it after.
    pub async fn serve_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await
    }
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

fn state_name(s: WorkerState) -> &'static str {
    match s {
        WorkerState::Starting => "starting",
        WorkerState::Running => "running",
        WorkerState::Draining => "draining",
        WorkerState::Stopped => "stopped",
        WorkerState::Paused => "paused (kill switch open)",
        #[allow(unreachable_patterns)]
        _ => "other",
    }
}

async fn livez(State(s): State<Arc<Shared>>) -> Response {
    let mut body = String::new();
    let mut live = true;
    for w in &s.workers {
        let ok = w.is_live();
        live &= ok;
        let _ = writeln!(
            body,
            "{}: {} (state {}, last heartbeat {} ms ago)",
            w.group(),
            if ok { "live" } else { "stalled" },
            state_name(w.state()),
            w.heartbeat_age().as_millis()
        );
    }
    let status = if live {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    text(status, body)
}

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    let mut body = String::new();
    let mut ready = !s.workers.is_empty();
    if s.workers.is_empty() {
        body.push_str("no worker is watched\n");
    }
    for w in &s.workers {
        let ok = w.is_ready();
        ready &= ok;
        let _ = writeln!(
            body,
            "{}: {} (state {}, transport {:?})",
            w.group(),
            if ok { "ready" } else { "not ready" },
            state_name(w.state()),
            w.transport_health()
        );
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    text(status, body)
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    match &s.prometheus {
        Some(p) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            p.render(),
        )
            .into_response(),
        None => text(
            StatusCode::NOT_FOUND,
            "no metrics recorder is configured\n".to_owned(),
        ),
    }
}
