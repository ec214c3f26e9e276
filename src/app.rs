//! The app runner (feature `app`): a whole worker process from the environment.
//!
//! [`App`] reads [`WorkerConfig::from_env`], sets up logging (and, with `otel`, tracing
//! with W3C trace context; with `otlp`, export to a collector), installs the Prometheus
//! recorder, connects the transport, builds any number of workers and outbox relays,
//! serves `/livez`, `/readyz` and `/metrics`, and waits for SIGTERM or ctrl-c. Then it
//! shuts down in order: readiness false, intake stopped, in-flight work drained (each
//! worker within `STEADFAST_DRAIN_TIMEOUT`), the relays stopped once the workers are
//! (so what the handlers wrote to the outbox while draining still goes out), the transport
//! closed, the ops server stopped, telemetry flushed, and the exit code returned.
//!
//! Exit codes: 0 after a clean shutdown; 2 for a bad configuration (one line on standard
//! error naming every variable at fault); 1 for anything else that stops it (a broker
//! that cannot be reached, a port in use, a worker whose subscription ended).
//!
//! ```no_run
//! use steadfast::{App, Context, HandlerError, Message};
//!
//! #[derive(serde::Serialize, serde::Deserialize, Message)]
//! #[message(name = "orders.placed")]
//! struct OrderPlaced { #[message(key)] order_id: u64 }
//!
//! async fn on_order(msg: OrderPlaced, _cx: Context) -> Result<(), HandlerError> {
//!     tracing::info!(order_id = msg.order_id, "order placed");
//!     Ok(())
//! }
//!
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     App::from_env()
//!         .worker("billing", |w| w.handle(on_order))
//!         .run()
//!         .await
//! }
//! ```

use crate::{
    config::{ConfigError, WorkerConfig},
    http::{OpsServer, Prometheus},
    outbox::{OutboxSource, Relay, RelayBuilder},
    transport::Transport,
    worker::{Worker, WorkerBuilder, shutdown_signal},
};
use std::{fmt, future::Future, pin::Pin, process::ExitCode, sync::Arc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

type WorkerSetup = Box<dyn FnOnce(WorkerBuilder) -> WorkerBuilder + Send>;
type RelaySetup = Box<dyn FnOnce(Arc<dyn Transport>) -> RelayBuilder + Send>;
type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A worker process: configuration, telemetry, transport, workers, relays, ops server,
/// signals and the shutdown order. See the [module](self) docs.
pub struct App {
    config: Result<WorkerConfig, ConfigError>,
    workers: Vec<(String, WorkerSetup)>,
    relays: Vec<RelaySetup>,
    telemetry: bool,
    shutdown: Option<Shutdown>,
    #[cfg(feature = "postgres")]
    postgres_idempotency: bool,
}

impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("App")
            .field("config", &self.config)
            .field(
                "workers",
                &self.workers.iter().map(|w| &w.0).collect::<Vec<_>>(),
            )
            .field("relays", &self.relays.len())
            .field("telemetry", &self.telemetry)
            .finish_non_exhaustive()
    }
}

/// Why the app stopped before or instead of a clean shutdown.
#[derive(Debug)]
enum Fatal {
    Config(String),
    Other(String),
}

impl App {
    /// An app configured by the environment ([`WorkerConfig::from_env`]). A bad variable
    /// is reported when the app [runs](App::run): one line and exit code 2.
    pub fn from_env() -> Self {
        Self::new(WorkerConfig::from_env())
    }

    /// An app with this configuration (from [`WorkerConfig::from_lookup`], say).
    pub fn from_config(config: WorkerConfig) -> Self {
        Self::new(Ok(config))
    }

    fn new(config: Result<WorkerConfig, ConfigError>) -> Self {
        Self {
            config,
            workers: Vec::new(),
            relays: Vec::new(),
            telemetry: true,
            shutdown: None,
            #[cfg(feature = "postgres")]
            postgres_idempotency: false,
        }
    }

    /// Adds a worker for consumer group `group`: `setup` receives its builder, already
    /// on the app's transport and [configured](WorkerBuilder::configure) from the
    /// environment, and adds handlers (and anything else). In an app with one worker,
    /// `STEADFAST_GROUP` replaces `group` when set.
    pub fn worker(
        mut self,
        group: impl Into<String>,
        setup: impl FnOnce(WorkerBuilder) -> WorkerBuilder + Send + 'static,
    ) -> Self {
        self.workers.push((group.into(), Box::new(setup)));
        self
    }

    /// Adds an outbox relay from `source` to the app's transport; `setup` may tune its
    /// builder (batch size, poll interval...). Relays stop after the workers have drained.
    pub fn relay(
        mut self,
        source: impl OutboxSource,
        setup: impl FnOnce(RelayBuilder) -> RelayBuilder + Send + 'static,
    ) -> Self {
        self.relays
            .push(Box::new(move |transport: Arc<dyn Transport>| {
                setup(Relay::builder(source, transport))
            }));
        self
    }

    /// With `STEADFAST_DATABASE_URL` set, deduplicates every worker's deliveries through
    /// a PostgreSQL idempotency store (its table created if missing); without it, does
    /// nothing.
    #[cfg(feature = "postgres")]
    pub fn postgres_idempotency(mut self) -> Self {
        self.postgres_idempotency = true;
        self
    }

    /// Leaves logging and tracing to the caller, who installs a `tracing` subscriber of
    /// their own before [`run`](App::run). By default the app installs one.
    pub fn without_telemetry(mut self) -> Self {
        self.telemetry = false;
        self
    }

    /// Shuts down when `signal` completes instead of on SIGTERM or ctrl-c (tests).
    pub fn shutdown_on(mut self, signal: impl Future<Output = ()> + Send + 'static) -> Self {
        self.shutdown = Some(Box::pin(signal));
        self
    }

    /// Runs until SIGTERM or ctrl-c, shuts down in order, and returns the exit code.
    pub async fn run(self) -> ExitCode {
        let config = match &self.config {
            Ok(c) => c.clone(),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        let telemetry = self
            .telemetry
            .then(|| crate::telemetry::init(config.log_format));
        let code = match self.run_inner(config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(Fatal::Config(e)) => {
                tracing::error!(error = %e, "bad configuration");
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
            Err(Fatal::Other(e)) => {
                tracing::error!(error = %e, "stopped by an error");
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
        if let Some(t) = telemetry {
            t.shutdown();
        }
        code
    }

    async fn run_inner(self, cfg: WorkerConfig) -> Result<(), Fatal> {
        tracing::info!(config = ?cfg, "starting");
        // The recorder first: the metric handles of workers and relays bind to it.
        let prometheus = match Prometheus::install() {
            Ok(p) => Some(p),
            Err(e) if cfg.http_addr.is_some() => return Err(Fatal::Other(e.to_string())),
            Err(_) => None,
        };
        let transport = cfg
            .connect()
            .await
            .map_err(|e| Fatal::Other(e.to_string()))?;
        let result = self.serve(&cfg, transport.clone(), prometheus).await;
        transport.close().await;
        tracing::info!("stopped");
        result
    }

    async fn serve(
        self,
        cfg: &WorkerConfig,
        transport: Arc<dyn Transport>,
        prometheus: Option<Prometheus>,
    ) -> Result<(), Fatal> {
        #[cfg(feature = "postgres")]
        let store = match (&cfg.database_url, self.postgres_idempotency) {
            (Some(url), true) => Some(postgres_store(cfg, url).await?),
            _ => None,
        };
        let single = self.workers.len() == 1;
        let mut workers = Vec::new();
        for (group, setup) in self.workers {
            let group = if single { cfg.group_or(&group) } else { group };
            let builder = Worker::builder_shared(transport.clone(), group).configure(cfg);
            #[cfg(feature = "postgres")]
            let builder = match &store {
                Some(s) => builder.idempotency(s.clone()),
                None => builder,
            };
            let worker = setup(builder)
                .build()
                .map_err(|e| Fatal::Config(e.to_string()))?;
            workers.push(worker);
        }
        let relays = self
            .relays
            .into_iter()
            .map(|setup| setup(transport.clone()).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Fatal::Config(e.to_string()))?;

        let stop_http = CancellationToken::new();
        let http = match cfg.http_addr {
            Some(addr) => {
                let mut server = OpsServer::new();
                for w in &workers {
                    server = server.watch(w.status());
                }
                if let Some(p) = prometheus {
                    server = server.prometheus(p);
                }
                let server = server.bind(addr).await.map_err(|e| {
                    Fatal::Other(format!(
                        "cannot listen on {addr} (STEADFAST_HTTP_ADDR): {e}"
                    ))
                })?;
                tracing::info!(http_addr = %server.local_addr(), "health and metrics server listening");
                Some(tokio::spawn(
                    server.serve_until(stop_http.clone().cancelled_owned()),
                ))
            }
            None => None,
        };

        // Workers stop on the signal, or when one of them fails (its subscription ended);
        // relays stop once every worker has drained.
        let stop_workers = CancellationToken::new();
        let stop_relays = CancellationToken::new();
        let signal: Shutdown = self.shutdown.unwrap_or_else(|| Box::pin(shutdown_signal()));
        let on_signal = {
            let stop = stop_workers.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = signal => tracing::info!("shutdown requested"),
                    () = stop.cancelled() => {}
                }
                stop.cancel();
            })
        };
        let mut relay_tasks = JoinSet::new();
        for relay in relays {
            relay_tasks.spawn(relay.run_until(stop_relays.clone().cancelled_owned()));
        }
        let mut worker_tasks = JoinSet::new();
        for worker in workers {
            let stop = stop_workers.clone();
            worker_tasks.spawn(async move {
                let r = worker.run_until(stop.clone().cancelled_owned()).await;
                if r.is_err() {
                    stop.cancel();
                }
                r
            });
        }
        let mut result = Ok(());
        while let Some(done) = worker_tasks.join_next().await {
            let failure = match done {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(format!("a worker task failed: {e}")),
            };
            if let (Some(e), Ok(())) = (failure, &result) {
                result = Err(Fatal::Other(e));
            }
        }
        stop_workers.cancel();
        let _ = on_signal.await;
        stop_relays.cancel();
        while relay_tasks.join_next().await.is_some() {}
        stop_http.cancel();
        if let Some(h) = http {
            match h.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "ops server stopped with an error"),
                Err(e) => tracing::warn!(error = %e, "ops server task failed"),
            }
        }
        result
    }
}

/// The PostgreSQL idempotency store on `STEADFAST_DATABASE_URL`, its table created.
#[cfg(feature = "postgres")]
async fn postgres_store(
    cfg: &WorkerConfig,
    url: &crate::config::SecretUrl,
) -> Result<crate::idempotency::postgres::PostgresStore, Fatal> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(u32::try_from(cfg.concurrency.min(32)).unwrap_or(8))
        .acquire_timeout(cfg.connect_timeout)
        .connect(url.expose_secret())
        .await
        .map_err(|e| {
            // The error's own text could quote the URL: only its kind.
            let kind = match e {
                sqlx::Error::Io(_) | sqlx::Error::Tls(_) => "connection failed",
                sqlx::Error::PoolTimedOut => "timed out",
                sqlx::Error::Database(_) => "refused by the server",
                _ => "error",
            };
            Fatal::Other(format!("cannot connect to PostgreSQL at {url}: {kind}"))
        })?;
    let store = crate::idempotency::postgres::PostgresStore::new(pool);
    store
        .migrate()
        .await
        .map_err(|e| Fatal::Other(e.to_string()))?;
    Ok(store)
}
