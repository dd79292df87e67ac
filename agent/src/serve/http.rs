//! The metrics endpoint: `/metrics`, `/healthz` and `/readyz`, served from a thread of its own
//! so a scrape is answered even while the session is busy with a burst of drops.
use std::{net::SocketAddr, sync::Arc, thread::JoinHandle, time::Duration};

use anyhow::{Context, Result};
use axum::{
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use super::{exposition, metrics::Health};

/// How long requests in flight at the stop may take to finish.
const DRAIN: Duration = Duration::from_secs(2);

#[derive(Clone)]
struct Shared {
    registry: Arc<Registry>,
    health: Arc<Health>,
}

/// A running endpoint; `stop` ends it.
pub struct Endpoint {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    thread: JoinHandle<()>,
}

impl Endpoint {
    /// Listens on `addr` at once (a taken port fails before anything is attached) and serves
    /// `registry` and `health` from a thread.
    pub fn start(addr: SocketAddr, registry: Registry, health: Arc<Health>) -> Result<Self> {
        let std_listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot listen on --metrics {addr}"))?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = {
            let _context = runtime.enter();
            tokio::net::TcpListener::from_std(std_listener)?
        };
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(Shared {
                registry: Arc::new(registry),
                health,
            });
        let (stop, stopped) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("metrics-http".into())
            .spawn(move || runtime.block_on(serve(listener, app, stopped)))
            .context("starting the metrics endpoint")?;
        Ok(Endpoint { addr, stop, thread })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets requests in flight finish (for at most `DRAIN`), and returns
    /// once the port is closed.
    pub fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.thread.join();
    }
}

async fn serve(listener: tokio::net::TcpListener, app: Router, stopped: watch::Receiver<bool>) {
    let (mut graceful, mut drain) = (stopped.clone(), stopped);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = graceful.changed().await;
    });
    let deadline = async move {
        let _ = drain.changed().await;
        tokio::time::sleep(DRAIN).await;
    };
    tokio::select! {
        result = server => if let Err(e) = result {
            tracing::warn!("metrics endpoint: {e}");
        },
        _ = deadline => tracing::warn!("metrics endpoint: requests still open at exit were cut"),
    }
}

async fn metrics(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    match exposition::render(&shared.registry, accept) {
        Ok((content_type, body)) => ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics\n",
        )
            .into_response(),
    }
}

/// 200 while the observe loop ticks (or is still attaching); 503 once it has missed its ticks
/// for longer than the health's threshold: the process runs but observes nothing.
async fn healthz(State(shared): State<Shared>) -> (StatusCode, String) {
    match shared.health.alive() {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(since) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stalled: the observe loop has not ticked for {:.1} s (limit {:.1} s)\n",
                since.as_secs_f64(),
                shared.health.stale_after().as_secs_f64()
            ),
        ),
    }
}

/// 200 only while the probes are attached: before, the node's drops are not observed yet.
async fn readyz(State(shared): State<Shared>) -> (StatusCode, &'static str) {
    if shared.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not attached\n")
    }
}
