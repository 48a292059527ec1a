//! `pegaflow-owner`: see `pegaflow-owner --help` and docs/operations.md.

use clap::Parser;
use pegaflow_owner::config::Args;
use tracing_subscriber::EnvFilter;

fn main() {
    let args = Args::parse();
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&args.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour())
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    if let Err(e) = pegaflow_owner::run(args) {
        tracing::error!("{e}");
        eprintln!("pegaflow-owner: {e}");
        std::process::exit(1);
    }
}

/// Colours only on a terminal, and never with `NO_COLOR` set
/// (<https://no-color.org>): a journal or a log file gets plain text.
fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
