//! The binary's user-facing contract: exit codes and messages for bad input, locks, a run
//! that fails half-way, and the recovery of an earlier run's teardown. Tests named `host_*`
//! need root and a private sshd (run with --test-threads=1); the others run anywhere.

mod common;

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use common::{bin, show, Recover, Sshd};
use e2ebackup::profile::Profile;
use e2ebackup::stack::{self, lock, loopdev, mount, sshfs};
use e2ebackup::teardown::{Journal, Stack, Undo};

/// A valid profile for a server that is never contacted (line numbers matter below).
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

fn write_profile(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(&p, text).unwrap();
    // Root's own, 0600: the binary refuses a profile others can read or write.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

// ---------------------------------------------------------------------------------------
// Unprivileged
// ---------------------------------------------------------------------------------------

#[test]
fn validate_typo_exits_2_naming_file_line_and_key() {
    let d = tempfile::tempdir().unwrap();
    let p = write_profile(
        d.path(),
        "typo",
        &PROFILE.replace("  keyfile:", "  keyfil:"),
    );
    let out = bin().arg("validate").arg(&p).output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(err.contains(&*p.to_string_lossy()), "file not named: {err}");
    assert!(err.contains("line 10"), "line not named: {err}");
    assert!(err.contains("keyfil"), "key not named: {err}");
    assert!(out.stdout.is_empty(), "{}", show(&out));
}

#[test]
fn validate_bad_value_exits_2_naming_line_and_key() {
    let d = tempfile::tempdir().unwrap();
    let p = write_profile(
        d.path(),
        "badsize",
        &PROFILE.replace("size: 1G", "size: 2Q"),
    );
    let out = bin().arg("validate").arg(&p).output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(err.contains(&*p.to_string_lossy()), "{err}");
    assert!(err.contains("line 9"), "{err}");
    assert!(err.contains("container.size"), "{err}");

    let p = write_profile(
        d.path(),
        "nopath",
        &PROFILE.replace("  path: /srv/backup\n", ""),
    );
    let out = bin().arg("validate").arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(stderr(&out).contains("path"), "{}", show(&out));
}

/// A profile others can read (it holds the healthcheck URL) or that another user owns is
/// refused as ssh refuses such a key: exit 2, naming the file, its owner and mode, and the
/// commands that fix it; 0600 and ours is accepted.
#[test]
fn profile_others_can_read_or_own_exits_2() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let p = write_profile(
        d.path(),
        "loose",
        &format!("{PROFILE}monitoring:\n  healthcheck_url: https://hc.example/ping/x\n"),
    );
    let out = bin().arg("validate").arg(&p).output().unwrap();
    // Accepted: validate goes on to the (missing) files the profile names.
    assert!(
        stderr(&out).contains("server.identity_file"),
        "0600: {}",
        show(&out)
    );
    assert!(!stderr(&out).contains("chmod 0600"), "0600: {}", show(&out));
    for mode in [0o644, 0o640, 0o602] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = bin().arg("validate").arg(&p).output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{mode:o}: {}", show(&out));
        assert!(err.contains(&*p.to_string_lossy()), "{err}");
        assert!(err.contains(&format!("mode {mode:04o}")), "{err}");
        assert!(
            err.contains(&format!("chmod 0600 {}", p.display())),
            "{err}"
        );
        assert!(!err.contains("hc.example"), "the URL leaks: {err}");
    }
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
        let out = bin().arg("validate").arg(&p).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", show(&out));
        assert!(
            stderr(&out).contains("owned by uid 65534"),
            "{}",
            show(&out)
        );
        assert!(stderr(&out).contains("chown 0:"), "{}", show(&out));
    }
}

#[test]
fn missing_profile_exits_2() {
    for cmd in ["validate", "run", "status", "cleanup"] {
        let out = bin()
            .args([cmd, "/nonexistent/dir/profile.yaml"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", show(&out));
        assert!(
            stderr(&out).contains("/nonexistent/dir/profile.yaml"),
            "{cmd}: {}",
            show(&out)
        );
    }
    // A bare name is looked up in /etc/e2ebackup/profiles.
    let name = common::unique_name("no-such-profile");
    let out = bin().args(["validate", &name]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        stderr(&out).contains(&format!("/etc/e2ebackup/profiles/{name}.yaml")),
        "{}",
        show(&out)
    );
}

#[test]
fn bad_command_lines_exit_2() {
    for args in [
        &["frobnicate"][..],
        &[],
        &["run"],
        &["validate", "--bogus", "x"],
        &["restore", "p"],
    ] {
        let out = bin().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", show(&out));
        assert!(!out.stderr.is_empty(), "{args:?}: no message");
    }
}

/// Commands the README and docs/operations.md document (more may exist).
const COMMANDS: &[&str] = &[
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
];

#[test]
fn help_lists_every_subcommand() {
    let out = bin().arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    // Every subcommand the parser knows (the documented ones at least) is listed.
    let known: Vec<String> = e2ebackup::cli::Cli::command()
        .get_subcommands()
        .filter(|c| !c.is_hide_set()) // generate-assets: for packaging only
        .map(|c| c.get_name().to_string())
        .filter(|n| n != "help")
        .collect();
    for c in COMMANDS {
        assert!(
            known.iter().any(|k| k == c),
            "no `{c}` subcommand: {known:?}"
        );
    }
    for c in &known {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(&format!("{c} "))),
            "--help lacks {c}:\n{text}"
        );
        let out = bin().args([c.as_str(), "--help"]).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{c} --help: {}", show(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&format!("Usage: e2ebackup {c}")),
            "{c} --help: {}",
            show(&out)
        );
    }
    assert!(text.contains("Exit status"), "{text}");
    let out = bin().arg("--version").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn status_json_parses_and_touches_nothing() {
    let d = tempfile::tempdir().unwrap();
    let name = common::unique_name("statustest");
    let p = write_profile(d.path(), &name, PROFILE);
    let lock_file = e2ebackup::layout::local_lock_path(&name);
    let run_dir = Path::new(e2ebackup::layout::RUN_DIR).join(&name);
    let state_dir = Path::new(e2ebackup::layout::STATE_DIR).join(&name);
    let out = bin().args(["status", "--json"]).arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {}", show(&out)));
    assert_eq!(v["profile"], name.as_str());
    for key in [
        "sshfs_mounted",
        "luks_open",
        "filesystem_mounted",
        "mounted_by_mount_command",
    ] {
        assert_eq!(v[key], false, "{key}: {v}");
    }
    assert_eq!(v["lock_holder_pid"], serde_json::Value::Null, "{v}");
    assert_eq!(v["pending_teardown"], serde_json::json!([]), "{v}");
    assert_eq!(v["last_run"], serde_json::Value::Null, "{v}");
    // Read-only: no lock file, no run or state directory.
    assert!(
        !lock_file.exists(),
        "status created {}",
        lock_file.display()
    );
    assert!(!run_dir.exists(), "status created {}", run_dir.display());
    assert!(
        !state_dir.exists(),
        "status created {}",
        state_dir.display()
    );
}

#[test]
fn validate_json_lists_every_problem() {
    let d = tempfile::tempdir().unwrap();
    let p = write_profile(d.path(), &common::unique_name("valjson"), PROFILE);
    let out = bin().args(["validate", "--json"]).arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("validate --json is not JSON ({e}): {}", show(&out)));
    assert_eq!(v["command"], "validate");
    assert_eq!(v["ok"], false);
    assert_eq!(v["exit_code"], 2);
    let problems: Vec<&str> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for want in [
        "server.identity_file /nonexistent/id does not exist",
        "server.known_hosts /nonexistent/known_hosts",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(want)),
            "{want:?} not in {problems:?}"
        );
    }
}

/// Trap 4 of issue 28: `validate` said OK (or only warned) for a source that does not
/// exist, a `.pub` as identity_file, a textfile directory that does not exist; it names each
/// with its line, all at once.
#[test]
fn validate_refuses_what_run_would_fail_on() {
    let d = tempfile::tempdir().unwrap();
    let id = d.path().join("id");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&id)
        .status()
        .unwrap();
    assert!(st.success());
    let text = PROFILE
        .replace("/nonexistent/id", &format!("{}.pub", id.display()))
        .replace("[/etc]", &format!("[/etc, {}/gone]", d.path().display()))
        + &format!(
            "monitoring:\n  prometheus_textfile: {}/no-dir/e.prom\n",
            d.path().display()
        );
    let p = write_profile(d.path(), &common::unique_name("trap4"), &text);
    let out = bin().arg("validate").arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = stderr(&out);
    for want in [
        "is a public key".to_string(),
        format!(
            "line 12: backup.sources: backup source {}/gone does not exist",
            d.path().display()
        ),
        "line 14: monitoring.prometheus_textfile: the directory".to_string(),
    ] {
        assert!(err.contains(&want), "{want:?} not in {err}");
    }
}

/// Trap 8 of issue 28: `keys export-kit` writes everything a new machine needs, private
/// (0700 directory, 0600 files), and refuses a directory others can read.
#[test]
fn keys_export_kit_writes_a_private_complete_kit() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let k = d.path().join("keys");
    std::fs::create_dir(&k).unwrap();
    for (f, data) in [
        ("id", "PRIVATE KEY\n"),
        ("known_hosts", "h ssh-ed25519 AAAA\n"),
        ("c.key", "K"),
        ("c.key.header", "H"),
    ] {
        std::fs::write(k.join(f), data).unwrap();
    }
    let name = common::unique_name("kit");
    let text = PROFILE.replace("/nonexistent", &k.display().to_string());
    let text = text.replace(
        &format!("{}/key", k.display()),
        &format!("{}/c.key", k.display()),
    );
    let p = write_profile(d.path(), &name, &text);
    let kit = d.path().join("kit");
    let out = bin()
        .args(["keys", "export-kit"])
        .arg(&p)
        .arg(&kit)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&kit), 0o700);
    for (f, want) in [
        (format!("{name}.yaml"), text.as_str()),
        ("c.key".into(), "K"),
        ("c.key.header".into(), "H"),
        ("id".into(), "PRIVATE KEY\n"),
        ("known_hosts".into(), "h ssh-ed25519 AAAA\n"),
    ] {
        assert_eq!(std::fs::read_to_string(kit.join(&f)).unwrap(), want, "{f}");
        assert_eq!(mode(&kit.join(&f)), 0o600, "{f}");
    }
    let readme = std::fs::read_to_string(kit.join("README.txt")).unwrap();
    assert!(
        readme.contains(&format!("e2ebackup restore {name} latest")),
        "{readme}"
    );
    assert!(
        readme.contains(&format!("{}/c.key", k.display())),
        "{readme}"
    );
    // Not again into the same (now non-empty) directory, nor into one others can read.
    let out = bin()
        .args(["keys", "export-kit"])
        .arg(&p)
        .arg(&kit)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let open = d.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = bin()
        .args(["keys", "export-kit"])
        .arg(&p)
        .arg(&open)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        stderr(&out).contains("readable by others"),
        "{}",
        show(&out)
    );
    assert_eq!(std::fs::read_dir(&open).unwrap().count(), 0);
}

/// Trap 7 of issue 28: the README never said how to get from a clone to the package that
/// install.md told people to `apt install`. The path it gives must be the one build-deb.sh
/// writes.
#[test]
fn readme_gives_the_path_from_a_clone_to_an_installed_package() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |f: &str| std::fs::read_to_string(root.join(f)).unwrap();
    let script = read("scripts/build-deb.sh");
    assert!(
        script.contains("DEB=$(ls target/debian/e2ebackup_*.deb)"),
        "build-deb.sh output moved"
    );
    for doc in ["README.md", "docs/install.md", "docs/quick-start.md"] {
        let t = read(doc);
        assert!(
            t.contains("scripts/build-deb.sh"),
            "{doc} does not say how to build the package"
        );
        assert!(
            t.contains("apt install ./target/debian/e2ebackup_*.deb"),
            "{doc} does not install what build-deb.sh writes"
        );
    }
}

/// Trap 5 of issue 28: `run` before `init` said "opening keyfile ...: No such file or
/// directory".
#[test]
fn run_before_init_says_to_init_first() {
    let d = tempfile::tempdir().unwrap();
    let name = common::unique_name("noinit");
    let p = write_profile(d.path(), &name, PROFILE);
    let out = bin().arg("run").arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        stderr(&out).contains(&format!("run `e2ebackup init {name}` first")),
        "{}",
        show(&out)
    );
    let _ = std::fs::remove_dir_all(Path::new(e2ebackup::layout::STATE_DIR).join(&name));
}

/// Trap 2 of issue 28: `schedule ./p.yaml` wrote `run ./p.yaml` (systemd and cron run in
/// `/`), and accepted any `--on-calendar`.
#[test]
fn schedule_writes_the_absolute_profile_path_and_checks_the_calendar() {
    let d = tempfile::tempdir().unwrap();
    let name = common::unique_name("sched");
    write_profile(d.path(), &name, PROFILE);
    let rel = format!("./{name}.yaml");
    let out = bin()
        .current_dir(d.path())
        .args(["schedule", &rel, "--verify-read-data", "5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let abs = d
        .path()
        .canonicalize()
        .unwrap()
        .join(format!("{name}.yaml"));
    let abs = abs.display();
    assert!(text.contains(&format!(" run {abs}\n")), "{text}");
    assert!(
        text.contains(&format!(" verify {abs} --read-data 5\n")),
        "{text}"
    );
    assert!(
        text.contains("nice -n 10 ionice -c 2 -n 7 "),
        "cron line without priorities: {text}"
    );
    assert!(!text.contains(&format!(" {rel}")), "{text}");
    if e2ebackup::cmd::which("systemd-analyze").is_ok() {
        let out = bin()
            .current_dir(d.path())
            .args(["schedule", &rel, "--on-calendar", "every day at 3"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", show(&out));
        assert!(stderr(&out).contains("every day at 3"), "{}", show(&out));
        assert!(out.stdout.is_empty(), "{}", show(&out));
    }
}

// ---------------------------------------------------------------------------------------
// Privileged: against a private sshd
// ---------------------------------------------------------------------------------------

/// Nothing of the profile's stack is left on this host.
fn assert_nothing_left(p: &Profile) {
    let (srv, fs) = (p.sshfs_dir(), p.fs_dir());
    assert_eq!(mount::mounted_at(&srv).unwrap(), None, "sshfs left mounted");
    assert_eq!(mount::mounted_at(&fs).unwrap(), None, "ext4 left mounted");
    assert_eq!(sshfs::sshfs_process_for(&srv), None, "sshfs process left");
    assert_eq!(
        loopdev::devices_for(&srv.join(&p.container.file.0)),
        Vec::<PathBuf>::new(),
        "loop device left attached"
    );
    assert!(!p.journal_path().exists(), "undo journal left behind");
}

fn status_json(path: &Path) -> serde_json::Value {
    let out = bin().args(["status", "--json"]).arg(path).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
#[ignore = "needs root (sshd on 127.0.0.1, sshfs, loop devices); run as root with --include-ignored, as CI does"]
fn host_concurrent_run_exits_4_and_touches_nothing() {
    let sshd = Sshd::start();
    let (name, path, p, _state) = sshd.keyed_profile("locktest");
    let held = lock::lock_local(&name).unwrap();

    // status sees the holder (from /proc/locks, without probing the lock itself).
    let v = status_json(&path);
    assert_eq!(v["lock_holder_pid"], std::process::id(), "{v}");

    let out = bin().arg("run").arg(&path).output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{}", show(&out));
    assert!(err.contains("in use"), "{err}");
    assert!(err.contains(&name), "{err}");
    assert_eq!(
        sshd.server_entries(),
        Vec::<String>::new(),
        "server touched"
    );
    assert!(
        !p.run_dir().exists(),
        "{} created by a run that did not get the lock",
        p.run_dir().display()
    );
    assert!(
        e2ebackup::state::read_last_run(&p).is_none(),
        "a locked-out run must not overwrite the last run record"
    );
    // cleanup respects the lock as well.
    let out = bin().arg("cleanup").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", show(&out));

    // Once the lock is free, a run gets as far as the server (no container there yet: 2).
    drop(held);
    let out = bin().arg("run").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(stderr(&out).contains("no container"), "{}", show(&out));
    assert!(stderr(&out).contains("e2ebackup init"), "{}", show(&out));
    assert_eq!(
        sshd.server_entries(),
        Vec::<String>::new(),
        "server touched"
    );
    assert_nothing_left(&p);
    let last = e2ebackup::state::read_last_run(&p).expect("last run recorded");
    assert_eq!((last.exit_code, last.teardown_complete), (2, true));
}

#[test]
#[ignore = "needs root (sshd on 127.0.0.1, sshfs, loop devices); run as root with --include-ignored, as CI does"]
fn host_run_failing_unlock_tears_everything_down() {
    let sshd = Sshd::start();
    let (_name, path, p, _state) = sshd.keyed_profile("badcontainer");
    let _guard = Recover::new(&p.journal_path());
    // A container file that is not LUKS: the run gets through ssh, sshfs, the server lock
    // and the loop device, then fails to unlock and must undo all of it.
    let container = sshd.server_dir().join(&p.container.file.0);
    std::fs::File::create(&container)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();

    let out = bin().arg("run").arg(&path).output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(err.contains("ERROR"), "{err}");
    assert!(
        err.contains("LUKS"),
        "failed somewhere else than the unlock: {err}"
    );
    assert!(!err.contains("INCOMPLETE"), "{err}");
    assert_nothing_left(&p);
    assert_eq!(
        sshd.server_entries(),
        vec![p.container.file.0.clone()],
        "the server lock must be released, nothing else created"
    );
    let meta = std::fs::metadata(&container).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(
        std::fs::read(&container).unwrap().iter().all(|b| *b == 0),
        "a failed unlock must not write to the container"
    );
    let last = e2ebackup::state::read_last_run(&p).expect("last run recorded");
    assert_eq!(last.exit_code, 1);
    assert!(last.teardown_complete);
    assert!(last.error.is_some());
    assert_eq!(last.snapshot, None);
}

#[test]
#[ignore = "needs root (sshd on 127.0.0.1, sshfs, loop devices); run as root with --include-ignored, as CI does"]
fn host_cleanup_and_run_finish_an_earlier_teardown() {
    let sshd = Sshd::start();
    let (name, path, p, _state) = sshd.keyed_profile("recover");
    let journal = p.journal_path();
    let _guard = Recover::new(&journal);
    let srv = p.sshfs_dir();

    // What a process leaves behind when it dies holding the server directory and its lock.
    let leave_behind = |persistent: bool| {
        let mut s = Stack::persistent(journal.clone(), "run").unwrap();
        sshfs::mount(&mut s, &p.server, &srv).unwrap_or_else(|e| panic!("{e:#}"));
        let sd = e2ebackup::fsutil::ServerDir::open(&srv, "server").unwrap();
        let lock_name = p.server_lock_name();
        let mut me = lock::ServerLock::mine("run");
        me.pid_start += 1; // as if held by a process that is gone
        lock::take_server_lock(&mut s, &sd, &lock_name, &me).unwrap();
        if persistent {
            s.set_persistent(true).unwrap();
        }
        // Dropped without unwinding: only the journal knows.
        drop(s);
        assert!(mount::mounted_at(&srv).unwrap().is_some());
        assert!(Journal::read(&journal).unwrap().is_some());
    };

    // A `mount` session: status shows it; run refuses (4) and leaves it; cleanup ends it.
    leave_behind(true);
    let v = status_json(&path);
    assert_eq!(v["sshfs_mounted"], true, "{v}");
    assert_eq!(v["mounted_by_mount_command"], true, "{v}");
    assert_eq!(
        v["pending_teardown"].as_array().map(|a| a.len()),
        Some(2),
        "{v}"
    );
    let out = bin().arg("run").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", show(&out));
    assert!(
        stderr(&out).contains(&format!("e2ebackup umount {name}")),
        "{}",
        show(&out)
    );
    assert!(
        mount::mounted_at(&srv).unwrap().is_some(),
        "run must leave a mount session alone"
    );
    let out = bin().arg("cleanup").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_nothing_left(&p);
    assert_eq!(
        sshd.server_entries(),
        Vec::<String>::new(),
        "lock not released"
    );
    let out = bin().arg("cleanup").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        stderr(&out).contains("nothing to clean up"),
        "{}",
        show(&out)
    );

    // A killed run: the next run finishes its teardown before anything else.
    leave_behind(false);
    let out = bin().arg("run").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        stderr(&out).contains("finishing the teardown of an earlier"),
        "{}",
        show(&out)
    );
    assert_nothing_left(&p);
    assert_eq!(
        sshd.server_entries(),
        Vec::<String>::new(),
        "lock not released"
    );

    // The same through stack::Real directly, for a journal that names a loop device gone
    // long ago and a mount point never mounted: every undo is a no-op, and succeeds.
    let mut s = Stack::persistent(journal.clone(), "run").unwrap();
    for u in [
        Undo::UnmountSshfs {
            target: srv.clone(),
            daemon: None,
        },
        Undo::DetachLoop {
            device: "/dev/loop250".into(),
            backing: srv.join(&p.container.file.0),
        },
        Undo::Unmount { target: p.fs_dir() },
    ] {
        s.push(u).unwrap();
    }
    let r = s.unwind(&mut stack::Real);
    assert!(r.complete(), "{:?}", r.failed);
    assert_nothing_left(&p);
}
