//! The metrics endpoint: `/metrics`, `/healthz` and `/readyz`, served from a thread of its own
//! so a scrape is answered even while the session is busy with a burst of drops.
//!
//! Bounded against clients that misbehave: at most [`MAX_CONNECTIONS`] connections at once (a
//! new one closes the oldest, so idle or slow clients cannot lock a scraper out), a request
//! head must arrive within [`HEAD_TIMEOUT`] and fit in [`MAX_HEAD`] bytes, and no connection
//! lives longer than [`MAX_LIFETIME`].
use std::{
    collections::VecDeque,
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
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use prometheus_client::registry::Registry;
use tokio::{
    sync::watch,
    task::{AbortHandle, JoinSet},
};

use super::{exposition, metrics::Health};
use crate::capture::recorder::Ring;

/// How long requests in flight at the stop may take to finish.
const DRAIN: Duration = Duration::from_secs(2);
/// Connections served at once.
const MAX_CONNECTIONS: usize = 32;
/// Time a client has to send a request's line and headers, from connecting or from the
/// previous answer on the same connection.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read (hyper's smallest allowed buffer is 8 KiB); larger ones get 431.
const MAX_HEAD: usize = 16 * 1024;
/// Headers in one request at most.
const MAX_HEADERS: usize = 64;
/// Longest life of a connection, keep-alive included.
const MAX_LIFETIME: Duration = Duration::from_secs(60);

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
            .route("/healthz", get(healthz))
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

async fn serve(listener: tokio::net::TcpListener, app: Router, mut stopped: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    // Open connections, oldest first.
    let mut open: VecDeque<AbortHandle> = VecDeque::new();
    let (closing, closing_rx) = watch::channel(false);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    while let Some(done) = connections.try_join_next_with_id() {
                        let id = done.map_or_else(|e| e.id(), |(id, ())| id);
                        open.retain(|h| h.id() != id);
                    }
                    if open.len() >= MAX_CONNECTIONS {
                        if let Some(oldest) = open.pop_front() {
                            oldest.abort();
                        }
                    }
                    let conn = connection(stream, app.clone(), closing_rx.clone());
                    open.push_back(connections.spawn(conn));
                }
                Err(e) => {
                    // Out of descriptors, or the like: try again shortly.
                    tracing::debug!("metrics endpoint: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = stopped.changed() => break,
        }
    }
    drop(listener);
    let _ = closing.send(true);
    let drained = tokio::time::timeout(DRAIN, async {
        while connections.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        tracing::warn!("metrics endpoint: requests still open at exit were cut");
    }
}

/// Serves one connection within the limits; at the stop, it finishes the request in flight.
async fn connection(
    stream: tokio::net::TcpStream,
    app: Router,
    mut closing: watch::Receiver<bool>,
) {
    let service = TowerToHyperService::new(app);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .max_headers(MAX_HEADERS);
    let conn = http.serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let lifetime = tokio::time::sleep(MAX_LIFETIME);
    let mut lifetime = std::pin::pin!(lifetime);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            _ = lifetime.as_mut() => break,
            _ = closing.changed(), if !shutting_down => {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
        }
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
