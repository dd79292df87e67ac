//! The metrics endpoint: `/metrics`, `/healthz` and `/readyz`, served from a thread of its own
//! so a scrape is answered even while the session is busy with a burst of drops.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

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
use crate::capture::recorder::Ring;

/// How long requests in flight at the stop may take to finish.
const DRAIN: Duration = Duration::from_secs(2);

#[derive(Clone)]
struct Shared {
    registry: Arc<Registry>,
    health: Arc<Health>,
    /// The flight recorder's packets (`/packets.pcapng`), when it is on.
    packets: Option<Arc<Mutex<Ring>>>,
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
    pub fn start(
        addr: SocketAddr,
        registry: Registry,
        health: Arc<Health>,
        packets: Option<Arc<Mutex<Ring>>>,
    ) -> Result<Self> {
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
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/packets.pcapng", get(recorded_packets))
            .with_state(Shared {
                registry: Arc::new(registry),
                health,
                packets,
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

/// The flight recorder's packets as a pcapng file (404 when it is off).
async fn recorded_packets(State(shared): State<Shared>) -> Response {
    let Some(ring) = &shared.packets else {
        return (
            StatusCode::NOT_FOUND,
            "the flight recorder is off (--recorder-packets 0)\n",
        )
            .into_response();
    };
    // Rendered under the lock: a few MB at most, bounded by --recorder-bytes.
    let body = match ring.lock() {
        Ok(r) => r.pcapng(),
        Err(_) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "recorder unavailable\n").into_response()
        }
    };
    (
        [
            (header::CONTENT_TYPE, "application/x-pcapng"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"dropscope-packets.pcapng\"",
            ),
        ],
        body,
    )
        .into_response()
}

/// 200 only while the probes are attached: before, the node's drops are not observed yet.
async fn readyz(State(shared): State<Shared>) -> (StatusCode, &'static str) {
    if shared.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not attached\n")
    }
}
