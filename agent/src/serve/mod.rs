//! `dropscope serve`: the long-running mode for a DaemonSet. The same session as the live
//! stream, with two sinks instead of a stream: the Prometheus metrics and a JSON log sized
//! for a node's log.
mod bounded;
mod exposition;
mod http;
mod metrics;

use std::{sync::Arc, time::Duration};

use anyhow::Result;

use crate::{
    cli::ServeArgs,
    output::{digest::DigestLog, Clock, Fanout},
    session,
};
use http::Endpoint;
use metrics::{Health, Metrics};

/// Serves metrics and logs drops until SIGTERM/SIGINT (or `--duration`).
pub async fn run(args: ServeArgs) -> Result<()> {
    let health = Arc::new(Health::new(Duration::from_secs_f64(args.observe.interval)));
    let max_series = usize::try_from(args.max_series).unwrap_or(usize::MAX);
    let (metrics, registry) = Metrics::new(max_series, session::kernel_release(), health.clone());
    // Listen first: a taken port fails at once, and /healthz answers while the probes attach.
    let endpoint = Endpoint::start(args.metrics, registry, health)?;
    let url = format!("http://{}/metrics", endpoint.addr());
    let log = DigestLog::new(
        std::io::stdout(),
        Clock::new(),
        Duration::from_secs_f64(args.log_interval),
        url,
    );
    let mut sinks = Fanout(vec![Box::new(metrics), Box::new(log)]);
    let result = session::observe(&args.observe, &mut sinks).await;
    endpoint.stop();
    result
}
