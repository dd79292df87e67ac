//! dropscope: tells a node operator, live, why the kernel is dropping their packets.
mod causes;
mod cli;
mod events;
mod evidence;
mod filter;
mod kernel;
mod output;
mod pipeline;
mod session;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    init_logging(cli.verbose);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    let result = runtime.map_err(anyhow::Error::from).and_then(|rt| rt.block_on(session::run(cli.run)));
    if let Err(e) = result {
        // One line, whole cause chain: the operator needs the why, not a backtrace.
        eprintln!("dropscope: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DROPSCOPE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}
