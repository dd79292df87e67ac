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
    capture::recorder::Recorder,
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
    // The flight recorder: the last dropped packets, served as pcapng.
    let snaplen = args.observe.snaplen;
    let recorder = (args.recorder_packets > 0).then(|| {
        Recorder::new(
            args.recorder_packets,
            args.recorder_bytes,
            snaplen,
            String::new(),
        )
    });
    // Listen first: a taken port fails at once, and /healthz answers while the probes attach.
    let endpoint = Endpoint::start(
        args.metrics,
        registry,
        health,
        recorder.as_ref().map(Recorder::ring),
    )?;
    let url = format!("http://{}/metrics", endpoint.addr());
    let recorder = recorder.map(|r| {
        Box::new(r.served_at(format!("http://{}/packets.pcapng", endpoint.addr())))
            as Box<dyn crate::capture::PacketTap>
    });
    let log = DigestLog::new(
        std::io::stdout(),
        Clock::new(),
        Duration::from_secs_f64(args.log_interval),
        url,
    );
    let mut sinks = Fanout(vec![Box::new(metrics), Box::new(log)]);
    let result = session::observe(&args.observe, &mut sinks, recorder).await;
    endpoint.stop();
    result
}
