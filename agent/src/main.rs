//! dropscope: tells a node operator, live, why the kernel is dropping their packets.
mod capture;
mod causes;
mod changes;
mod check;
mod classify;
mod cli;
mod events;
mod evidence;
mod expr;
mod fault;
mod filter;
#[cfg(test)]
mod fuzz;
mod kernel;
mod licenses;
mod netns;
mod output;
mod pipeline;
mod pods;
mod serve;
mod session;

use clap::error::ErrorKind;

fn main() {
    let cli = cli::Cli::parse_env().unwrap_or_else(|e| usage_error(e));
    init_logging(cli.verbose);
    if cli.run.causes {
        print!(
            "{}",
            causes::catalogue::markdown(&causes::Engine::builtin())
        );
        return;
    }
    if cli.run.licenses {
        print!("{}", licenses::TEXT);
        return;
    }
    let observe = match &cli.command {
        Some(cli::Command::Serve(args)) => Some(&args.observe),
        Some(_) => None,
        None => Some(&cli.run.observe),
    };
    if let Some(Err(msg)) = observe.map(|o| o.expression()) {
        eprintln!("dropscope: filter expression: {msg} (see --help)");
        std::process::exit(2);
    }
    let result = match cli.command {
        Some(cli::Command::Completions { shell }) => {
            use std::io::Write;
            std::io::stdout()
                .write_all(&cli::Cli::completions(shell))
                .map_err(anyhow::Error::from)
        }
        Some(cli::Command::Check(args)) => check::run(&args).map(|code| std::process::exit(code)),
        Some(cli::Command::Serve(args)) => {
            if let Err(msg) = args.check() {
                eprintln!("dropscope: {msg} (see dropscope serve --help)");
                std::process::exit(2);
            }
            block_on(serve::run(*args))
        }
        None => block_on(session::run(cli.run)),
    };
    if let Err(e) = result {
        // One line, whole cause chain: the operator needs the why, not a backtrace.
        eprintln!("dropscope: {e:#}");
        std::process::exit(1);
    }
}

/// Runs a mode on a single-threaded runtime: the work is one event loop.
fn block_on(mode: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(mode)
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DROPSCOPE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && !cli::no_color();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}

/// Prints a command-line error as one line (help and version print normally).
fn usage_error(e: clap::Error) -> ! {
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.render().to_string();
    let line: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .collect();
    eprintln!(
        "dropscope: {} (see --help)",
        line.join(" ").trim_start_matches("error: ")
    );
    std::process::exit(2);
}
