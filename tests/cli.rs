//! The binary's user-facing contract: exit codes and messages for bad input and locks.

mod common;

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_e2ebackup"))
}

const PROFILE: &str = "server:
  host: 127.0.0.1
  user: backupuser
  identity_file: /nonexistent/id
  known_hosts: /nonexistent/known_hosts
  path: /srv/backup
container:
  file: c.luks
  size: 1G
  keyfile: /nonexistent/key
backup:
  sources: [/etc]
";

#[test]
fn typo_exits_2_naming_file_line_and_key() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("typo.yaml");
    std::fs::write(&p, PROFILE.replace("  keyfile:", "  keyfil:")).unwrap();
    let out = bin().arg("validate").arg(&p).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("typo.yaml"), "{err}");
    assert!(err.contains("line 10"), "{err}");
    assert!(err.contains("keyfil"), "{err}");
}

#[test]
fn missing_profile_and_bad_args_exit_2() {
    let out = bin()
        .args(["run", "/nonexistent/profile.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/profile.yaml"));
    let out = bin().args(["frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn help_lists_every_command() {
    let out = bin().arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for c in [
        "init",
        "run",
        "validate",
        "status",
        "cleanup",
        "snapshots",
        "mount",
        "umount",
        "restore",
        "prune",
        "grow",
        "trim",
    ] {
        assert!(
            text.contains(&format!("  {c} ")),
            "--help lacks {c}:\n{text}"
        );
    }
}

#[test]
fn status_json_parses() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("statustest.yaml");
    std::fs::write(&p, PROFILE).unwrap();
    let out = bin().args(["status", "--json"]).arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["profile"], "statustest");
    assert_eq!(v["luks_open"], false);
}

#[test]
fn host_concurrent_run_exits_4_and_touches_nothing() {
    if common::skip_unless_root("host_concurrent_run_exits_4_and_touches_nothing") {
        return;
    }
    let sshd = common::Sshd::start();
    let name = format!("locktest{}", std::process::id());
    let p = sshd.profile(&name, &[std::path::Path::new("/etc")]);
    let _held = e2ebackup::stack::lock::lock_local(&name).unwrap();
    let out = bin().arg("run").arg(&p).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("in use"), "{err}");
    assert_eq!(
        std::fs::read_dir(sshd.server_dir()).unwrap().count(),
        0,
        "server touched"
    );
    let _ = std::fs::remove_file(e2ebackup::stack::lock::local_lock_path(&name));
}
