//! `pegaflow-inspect`: look inside a PegaFlow owner's shared memory,
//! read-only, whether the owner is alive or dead.
//!
//! Exit status: 0 success (`verify`: no error, warnings allowed); 1 `verify`
//! found corruption; 2 the segment could not be read, or bad usage.

#[path = "../inspect/mod.rs"]
mod inspect;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::json;

use inspect::verify::Severity;
use inspect::{InspectError, Target};

/// Read a PegaFlow owner's shared-memory segments without disturbing it.
///
/// Maps the control segment read-only and takes no lock, so it is safe on a
/// live owner and works post-mortem on the segments a dead owner left.
#[derive(Parser, Debug)]
#[command(name = "pegaflow-inspect", version, about, long_about)]
struct Cli {
    /// Owner instance name (pegaflow-owner --name); selects
    /// $PEGAFLOW_SHM_DIR/pegaflow-NAME.ctl (default /dev/shm).
    #[arg(
        long,
        global = true,
        default_value = "default",
        env = "PEGAFLOW_NAME",
        conflicts_with = "control"
    )]
    name: String,

    /// Path of a control segment (.ctl) to read instead, e.g. a copy.
    #[arg(long, global = true)]
    control: Option<PathBuf>,

    /// Print one JSON document instead of text.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Owner state, epoch, pool, geometry and occupancy.
    Status,
    /// Every client entry: pid, label, namespace, ring depths, pins, counters.
    Clients,
    /// Slabs and block sizes, with slots by state.
    Pool,
    /// Committed blocks (slot, namespace, hash, length).
    Keys {
        /// Only this namespace (decimal or 0x hex).
        #[arg(long, value_parser = inspect::parse_namespace)]
        namespace: Option<u64>,
        /// Show at most this many keys (the total is still counted).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Check the slot table, index, slab table and client areas; exit 1 on
    /// corruption, naming each problem.
    Verify {
        /// Pause before re-checking findings (a live owner can be caught
        /// mid-update).
        #[arg(long, default_value_t = 200)]
        recheck_ms: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = cli
        .control
        .clone()
        .unwrap_or_else(|| pegaflow_shm::segment::control_path(&cli.name));
    match run(&cli, path) {
        Ok(code) => code,
        Err(e) => {
            if cli.json {
                println!("{}", json!({ "error": e.to_string() }));
            }
            eprintln!("pegaflow-inspect: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: &Cli, path: PathBuf) -> Result<ExitCode, InspectError> {
    let t = Target::open(&path)?;
    let (value, text) = match &cli.cmd {
        Cmd::Status => inspect::report::status(&t)?,
        Cmd::Clients => inspect::report::clients(&t)?,
        Cmd::Pool => inspect::report::pool(&t)?,
        Cmd::Keys { namespace, limit } => inspect::report::keys(&t, *namespace, *limit)?,
        Cmd::Verify { recheck_ms } => return Ok(verify(cli, &t, *recheck_ms)),
    };
    if cli.json {
        println!("{value}");
    } else {
        print!("{text}");
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(cli: &Cli, t: &Target, recheck_ms: u64) -> ExitCode {
    let (findings, counts) = inspect::verify::verify(t, Duration::from_millis(recheck_ms));
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    let warnings = findings.len() - errors;
    if cli.json {
        let list: Vec<_> = findings
            .iter()
            .map(|f| {
                json!({
                    "severity": f.severity.name(),
                    "check": f.check,
                    "subject": f.subject,
                    "detail": f.detail,
                })
            })
            .collect();
        println!(
            "{}",
            json!({
                "control": t.path.display().to_string(),
                "ok": errors == 0,
                "errors": errors,
                "warnings": warnings,
                "checked": {
                    "slabs_assigned": counts.slabs_assigned,
                    "slots": counts.slots_checked,
                    "committed": counts.committed,
                    "index_entries": counts.index_entries,
                    "clients": counts.clients,
                    "stash_entries": counts.stash_entries,
                },
                "findings": list,
            })
        );
    } else {
        for f in &findings {
            println!(
                "{}: {}: {} {}",
                f.severity.name(),
                f.check,
                f.subject,
                f.detail
            );
        }
        println!(
            "{}: checked {} slabs, {} slots ({} committed), {} index entries, {} clients, {} stash entries: {} error{}, {} warning{}",
            if errors == 0 { "OK" } else { "CORRUPT" },
            counts.slabs_assigned,
            counts.slots_checked,
            counts.committed,
            counts.index_entries,
            counts.clients,
            counts.stash_entries,
            errors,
            if errors == 1 { "" } else { "s" },
            warnings,
            if warnings == 1 { "" } else { "s" },
        );
    }
    if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
