//! HTTP and gRPC: routes, shared state, and the serve loops. The only module that knows axum and
//! tonic.

pub mod auth;
pub mod error;
pub mod grpc;
mod health;
mod jobs;
pub mod kserve;
mod models;
pub mod openapi;
mod predict;
mod static_files;
pub mod v2;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Request};
use axum::routing::{get, post};
use axum::Router;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::engine::Engine;
use crate::jobs::JobManager;
use error::ApiError;

/// Settings the HTTP layer needs beyond the engine's.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub weights_dir: PathBuf,
    /// Largest request body accepted, in bytes.
    pub payload_limit: usize,
    /// Shown by `/info`.
    pub device_name: String,
    /// Largest data set upload for `/finetune`, in bytes.
    pub max_dataset_bytes: u64,
}

#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub config: Arc<ServerConfig>,
    /// Fine-tuning; the job endpoints answer 503 without it.
    pub jobs: Option<JobManager>,
    /// API key and CORS origins; open to all by default.
    pub access: Arc<auth::Access>,
    default_model: Arc<RwLock<Option<String>>>,
    /// `all`, `api` or `worker`: a worker answers only health and metrics.
    pub role: &'static str,
}

impl AppState {
    pub fn new(engine: Engine, config: ServerConfig, default_model: Option<String>) -> Self {
        Self {
            engine,
            config: Arc::new(config),
            jobs: None,
            access: Arc::default(),
            default_model: Arc::new(RwLock::new(default_model)),
            role: "all",
        }
    }

    pub fn with_jobs(mut self, jobs: JobManager) -> Self {
        self.jobs = Some(jobs);
        self
    }

    /// The replica's role (`all`, `api`, `worker`), as `--role` says.
    pub fn with_role(mut self, role: &'static str) -> Self {
        self.role = role;
        self
    }

    /// Asks for an API key and allows browser pages from other origins, as `access` says.
    pub fn with_access(mut self, access: auth::Access) -> Self {
        self.access = Arc::new(access);
        self
    }

    /// The configured default whenever the weights dir has it (also while it loads, or after its
    /// load failed: it is never replaced by another model); else the first model served.
    pub fn default_model(&self) -> Option<String> {
        let configured = self
            .default_model
            .read()
            .expect("default model lock")
            .clone();
        match configured {
            Some(name) if self.engine.state(&name).is_some() => Some(name),
            configured => self.engine.model_names().into_iter().next().or(configured),
        }
    }
}

/// A worker replica trains; it answers only what its orchestrator asks: health and metrics.
fn worker_router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health::health))
        .route("/ping", get(health::ping))
        .route("/metrics", get(health::metrics))
        .fallback(|| async {
            ApiError::not_found("this replica is a worker (--role worker): it trains and answers only /health, /ping and /metrics")
        })
        .with_state(state)
        .layer(axum::middleware::from_fn(error::json_errors))
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn router(state: AppState) -> Router {
    if state.role == "worker" {
        return worker_router(state);
    }
    let limit = DefaultBodyLimit::max(state.config.payload_limit);
    // Multipart framing on top of the zip itself; the zip's own size is checked as it streams.
    let upload_limit = usize::try_from(state.config.max_dataset_bytes.saturating_add(1 << 20))
        .unwrap_or(usize::MAX);
    let access = state.access.clone();
    let router = Router::new()
        .route("/", get(static_files::index))
        .route("/static/app.js", get(static_files::app))
        .route("/static/style.css", get(static_files::style))
        .route(
            "/finetune",
            post(jobs::submit).layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route("/jobs", get(jobs::list))
        .route("/jobs/{id}", get(jobs::get).delete(jobs::delete))
        .route("/jobs/{id}/events", get(jobs::events))
        .route("/jobs/{id}/examples/{n}", get(jobs::example))
        .route("/models/{name}/download", get(jobs::download))
        .route("/predict", post(predict::predict).layer(limit))
        .route("/models", get(models::list))
        .route("/models/reload", post(models::reload))
        .route("/models/{name}", get(models::get).delete(models::delete))
        .route(
            "/models/{name}/predict",
            post(predict::predict_named).layer(limit),
        )
        .route("/health", get(health::health))
        .route("/ping", get(health::ping))
        .route("/info", get(health::info))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi::openapi))
        .merge(kserve::routes(state.config.payload_limit))
        .merge(openapi::swagger_ui())
        .fallback(|| async { ApiError::not_found("no such endpoint; see the README for the API") })
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            access.api_key.clone(),
            auth::require_key,
        ))
        .layer(axum::middleware::from_fn(error::json_errors));
    // Outside the key check: preflights carry no key, and a 401 must be readable by the page.
    let router = match auth::cors(&access.cors_allow_origins) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
            let id = request
                .headers()
                .get(&REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info_span!("request", method = %request.method(), uri = %auth::redacted(request.uri()), request_id = %id)
        }))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

/// How long a client may send nothing: while sending request headers, and within a request body.
/// Responses (SSE streams included) and bodies that keep arriving are never cut.
#[derive(Debug, Clone, Copy)]
pub struct IdleTimeouts {
    pub headers: std::time::Duration,
    pub body: std::time::Duration,
}

impl Default for IdleTimeouts {
    fn default() -> Self {
        Self {
            headers: std::time::Duration::from_secs(30),
            body: std::time::Duration::from_secs(60),
        }
    }
}

/// Serves `state` on `listener` until `shutdown` resolves, then lets requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, IdleTimeouts::default(), shutdown).await
}

/// [`serve`] with chosen idle timeouts. hyper's own connection loop: `axum::serve` cannot time
/// out a client that stalls while sending its headers.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: AppState,
    timeouts: IdleTimeouts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let app = router(state).layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
        timeouts.body,
    ));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.headers);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "could not accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not when the
/// future is first polled: a signal that arrives while the server is still starting (binding,
/// spawning its loads) is not lost, and does not kill the process outright either.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let (interrupt, terminate) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::interrupt()).ok(),
            signal(SignalKind::terminate()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(interrupt) => {},
                _ = wait(terminate) => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutting down: finishing requests in flight");
    }
}
