//! docs/pegaflow-owner.service: passes `systemd-analyze verify` and asks
//! for what the operations guide promises.
//!
//! Needs `systemd-analyze` (Debian/Ubuntu package `systemd`); without it the
//! verify step is skipped with a message, the static checks still run.

use std::path::{Path, PathBuf};
use std::process::Command;

const OWNER: &str = env!("CARGO_BIN_EXE_pegaflow-owner");
const INSTALLED: &str = "/usr/local/bin/pegaflow-owner";

fn unit() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/pegaflow-owner.service");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn directives(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn unit_asks_for_what_operations_md_promises() {
    let u = unit();
    let d = directives(&u);
    let has = |k: &str, v: &str| d.iter().any(|(a, b)| a == k && b == v);
    assert!(
        has("RuntimeDirectory", "pegaflow"),
        "socket dir /run/pegaflow"
    );
    assert!(has("RuntimeDirectoryPreserve", "yes"));
    assert!(has("Restart", "on-failure"));
    assert!(has("KillSignal", "SIGTERM"));
    assert!(
        d.iter()
            .any(|(k, v)| k == "ExecStartPre" && v.contains("/proc/sys/vm/nr_hugepages")),
        "huge page reservation"
    );
    for forbidden in ["PrivateDevices", "PrivateIPC", "DynamicUser", "RemoveIPC"] {
        assert!(
            !d.iter().any(|(k, v)| k == forbidden && v == "yes"),
            "{forbidden}=yes would lose the cache on restart"
        );
    }
    // Every flag ExecStart passes exists in this owner.
    let help = Command::new(OWNER).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let exec = d
        .iter()
        .find(|(k, _)| k == "ExecStart")
        .map(|(_, v)| v.clone())
        .expect("ExecStart");
    assert!(exec.starts_with(INSTALLED), "{exec}");
    let flags: Vec<&str> = exec
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .collect();
    assert!(!flags.is_empty());
    // Engines of group pegaflow map the segments: the owner gives them mode
    // 0660 and that group itself, whatever the unit's UMask (default 0022;
    // ops_startup checks the modes under umask 022).
    assert!(exec.contains("--group pegaflow"), "{exec}");
    assert!(has("Group", "pegaflow"));
    // The socket directory must pass the owner's check: owned by the
    // service user (RuntimeDirectory does that), not group/world-writable.
    let mode = d
        .iter()
        .find(|(k, _)| k == "RuntimeDirectoryMode")
        .map(|(_, v)| u32::from_str_radix(v, 8).expect("octal RuntimeDirectoryMode"))
        .unwrap_or(0o755);
    assert_eq!(
        mode & 0o022,
        0,
        "RuntimeDirectoryMode {mode:o}: the owner refuses a socket directory others can write"
    );
    for f in flags {
        assert!(
            help.contains(&format!("{f} ")) || help.contains(&format!("{f}\n")),
            "ExecStart flag {f} is not in pegaflow-owner --help"
        );
    }
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!(
            "SKIPPED: systemd-analyze is not installed (apt-get install systemd); \
             docs/pegaflow-owner.service was not verified"
        );
        return;
    };
    assert!(out.status.success());
    // verify insists that ExecStart's binary exists: point it at the one
    // cargo built, leave every other line as shipped.
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("pegaflow-owner.service");
    std::fs::write(&path, unit().replace(INSTALLED, OWNER)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed: {err}");
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("pegaflow-owner.service"))
        .collect();
    assert!(ours.is_empty(), "systemd-analyze verify warnings: {ours:?}");
}

/// The flag table of docs/operations.md is `pegaflow-owner --help`.
#[test]
fn operations_md_lists_every_owner_flag() {
    let help = Command::new(OWNER).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let flags = |text: &str, prefix: &str| -> std::collections::BTreeSet<String> {
        text.lines()
            .filter_map(|l| l.trim_start().strip_prefix(prefix))
            .filter_map(|l| {
                let i = l.find("--")?;
                let f: String = l[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '-')
                    .collect();
                Some(f)
            })
            .collect()
    };
    let from_help = flags(&help, "");
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md"),
    )
    .unwrap();
    let table = doc
        .split("## Reference: owner flags")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("flag table section");
    let from_doc = flags(table, "| `");
    assert!(from_help.len() >= 15, "{from_help:?}");
    assert_eq!(
        from_doc, from_help,
        "docs/operations.md flag table vs --help"
    );
}
