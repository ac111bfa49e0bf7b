//! `e2ebackup schedule PROFILE [--install]`: a systemd service and timer for the profile.
//!
//! - `Persistent=true`: a run missed while the machine was off happens at the next boot.
//! - `RandomizedDelaySec`: many clients of one server do not all start at midnight.
//! - `KillMode=mixed`: on stop, SIGTERM goes to e2ebackup only, which stops rsync and tears
//!   the stack down in order; the rest of the cgroup (the sshfs daemon!) is killed only
//!   after that, when nothing needs it any more. The default (control-group) would kill
//!   sshfs at the same moment and leave the loop device over a dead FUSE file.
//! - `SuccessExitStatus=3`: a snapshot committed with warnings is not a failed unit.
//! - `TimeoutStartSec` ([`start_timeout`]): a oneshot unit has no start limit by default, so
//!   a run that never ends would block every later one. The limit is the run's own deadline
//!   (`server.run_timeout`) plus what may follow it: the teardown (one watchdog stall limit
//!   plus the unmount retries) and the hooks that report the outcome. e2ebackup's own
//!   deadline fires first; systemd's SIGTERM is the backstop.
//! - Hardening that does not get in the way of a root tool that mounts, attaches loop
//!   devices and reads everything: no new privileges, private /tmp, read-only /usr and /boot
//!   and /etc (`ProtectSystem=full`), no access to kernel tunables or logs.
//!
//! `--install` writes the units to /etc/systemd/system and, when systemd is the running init,
//! reloads it and enables the timer. Without systemd (a container, another init) it still
//! writes the units but skips `systemctl`, which could only fail there, and exits 3 with a
//! warning that says how to enable the timer later.

use std::path::Path;

use anyhow::{Context, Result};

use crate::error::Exit;
use crate::ops::fail;
use crate::profile::Profile;
use crate::{info, warn};

/// Seconds for `TimeoutStartSec`: `server.run_timeout`, then a teardown of at most one
/// watchdog stall limit plus 5 min of unmount and detach retries, then each `failed` (or
/// `after`, whichever has more) and `finally` hook command at `hooks.timeout`, plus 1 min
/// for the monitoring ping and the record.
pub fn start_timeout(p: &Profile) -> u64 {
    let h = &p.hooks;
    let after_hooks = h.failed.0.len().max(h.after.0.len()) + h.finally.0.len();
    p.server.run_timeout.0
        + p.server.stall_limit().as_secs()
        + 300
        + after_hooks as u64 * h.timeout.0
        + 60
}

pub fn units(
    p: &Profile,
    exe: &Path,
    on_calendar: &str,
    on_failure: Option<&str>,
) -> (String, String) {
    let name = &p.name;
    let failure = on_failure
        .map(|u| format!("OnFailure={u}\n"))
        .unwrap_or_default();
    let service = format!(
        "[Unit]
Description=e2ebackup: encrypted backup of profile {name}
Wants=network-online.target
After=network-online.target
{failure}
[Service]
Type=oneshot
ExecStart={exe} run {profile}
KillMode=mixed
TimeoutStartSec={start_timeout}
TimeoutStopSec=180
SuccessExitStatus=3
Nice=10
IOSchedulingClass=best-effort
IOSchedulingPriority=7
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=full
ProtectKernelTunables=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
RestrictRealtime=yes
LockPersonality=yes
",
        exe = exe.display(),
        profile = profile_path(p).display(),
        start_timeout = start_timeout(p),
    );
    let timer = format!(
        "[Unit]
Description=e2ebackup: schedule for profile {name}

[Timer]
OnCalendar={on_calendar}
RandomizedDelaySec=30min
Persistent=true

[Install]
WantedBy=timers.target
"
    );
    (service, timer)
}

/// The service and timer of a `verify --read-data PERCENT` schedule: the run's unit with
/// `verify` as the command. `verify` exits 6 when it finds changed data: a failed unit, and
/// `OnFailure=` fires as for a run.
pub fn verify_units(
    p: &Profile,
    exe: &Path,
    percent: u32,
    on_calendar: &str,
    on_failure: Option<&str>,
) -> (String, String) {
    let (service, timer) = units(p, exe, on_calendar, on_failure);
    let run = format!(
        "ExecStart={} run {}\n",
        exe.display(),
        profile_path(p).display()
    );
    let verify = format!(
        "ExecStart={} verify {} --read-data {percent}\n",
        exe.display(),
        profile_path(p).display()
    );
    (
        service.replace(&run, &verify).replace(
            "encrypted backup of profile",
            "verify the backup of profile",
        ),
        timer.replace("schedule for profile", "verify schedule for profile"),
    )
}

/// The profile file as an absolute path: systemd and cron start commands in `/`, so a relative
/// path given to `schedule` (`./p.yaml`) would name a file that is not there at run time.
pub fn profile_path(p: &Profile) -> std::path::PathBuf {
    std::path::absolute(&p.source_file).unwrap_or_else(|_| p.source_file.clone())
}

/// The cron line: the same command as the unit, at the unit's priorities (`Nice=10`, I/O class
/// best-effort level 7).
pub fn cron_line(p: &Profile, exe: &Path, args: &str) -> String {
    format!(
        "30 2 * * * root nice -n 10 ionice -c 2 -n 7 {} -q {args} {}",
        exe.display(),
        profile_path(p).display()
    )
}

/// Refuse an `OnCalendar=` expression systemd would refuse (`systemd-analyze calendar`), before
/// anything is written: a timer with a bad expression never fires, and says so only when it is
/// loaded. Without systemd-analyze the expression is not checked, and a warning says so.
pub fn check_calendar(expr: &str) -> Result<()> {
    let Ok(cmd) = crate::cmd::Cmd::new("systemd-analyze") else {
        warn!(
            "cannot check the calendar expression `{expr}`: systemd-analyze is not installed \
             (package systemd); systemd checks it when it loads the timer"
        );
        return Ok(());
    };
    cmd.arg("calendar")
        .arg(expr)
        .run()
        .map(|_| ())
        .map_err(|e| {
            crate::error::usage(format!(
                "--on-calendar `{expr}` is not a systemd calendar expression \
             (examples: daily, '*-*-* 03:17:00', 'Mon..Fri 22:00'; see man systemd.time): {e:#}"
            ))
        })
}

pub fn schedule(
    p: &Profile,
    on_calendar: &str,
    on_failure: Option<&str>,
    install: bool,
    verify: Option<(u32, &str)>,
) -> Exit {
    let exe = match unit_binary(install) {
        Ok(exe) => exe,
        Err(e) => return fail(e),
    };
    for cal in std::iter::once(on_calendar).chain(verify.map(|v| v.1)) {
        if let Err(e) = check_calendar(cal) {
            return fail(e);
        }
    }
    let (service, timer) = units(p, &exe, on_calendar, on_failure);
    let base = format!("e2ebackup-{}", p.name);
    let mut sets = vec![(base.clone(), service, timer)];
    if let Some((pct, cal)) = verify {
        let (vs, vt) = verify_units(p, &exe, pct, cal, on_failure);
        sets.push((format!("{base}-verify"), vs, vt));
    }
    if !install {
        for (b, service, timer) in &sets {
            println!("# {UNIT_DIR}/{b}.service\n{service}");
            println!("# {UNIT_DIR}/{b}.timer\n{timer}");
        }
        println!("# or, with cron (/etc/cron.d/{base}):");
        println!("# {}", cron_line(p, &exe, "run"));
        if let Some((pct, _)) = verify {
            println!(
                "# {}",
                cron_line(p, &exe, &format!("verify --read-data {pct}")).replacen(
                    "30 2 * * *",
                    "30 5 * * 0",
                    1
                )
            );
        }
        return Exit::Ok;
    }
    let mut worst = Exit::Ok;
    for (b, service, timer) in &sets {
        match install_units(Path::new(UNIT_DIR), b, service, timer, systemd_running()) {
            Ok(Exit::Ok) => {}
            Ok(code) => worst = code,
            Err(e) => return fail(e),
        }
    }
    worst
}

/// Where the package installs the program.
pub const INSTALLED: &str = "/usr/bin/e2ebackup";

/// The program the units run, as root, every night: the installed [`INSTALLED`] when it is
/// this very program (same file, or the same bytes), else this one. Either must be safe from
/// other users: the file root-owned and not group- or world-writable, and every directory
/// above it root-owned and not writable by others (a binary in a build directory that a
/// user can write would be theirs to replace). With `install`, an unsafe one is refused
/// (exit 6, naming it); printed units only carry a warning.
pub fn unit_binary(install: bool) -> Result<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let exe = std::env::current_exe().context("finding this program (/proc/self/exe)")?;
    let same = |a: &Path, b: &Path| -> bool {
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) if x.dev() == y.dev() && x.ino() == y.ino() => true,
            (Ok(x), Ok(y)) if x.len() == y.len() => {
                matches!((std::fs::read(a), std::fs::read(b)), (Ok(p), Ok(q)) if p == q)
            }
            _ => false,
        }
    };
    let chosen = if same(Path::new(INSTALLED), &exe) {
        std::path::PathBuf::from(INSTALLED)
    } else {
        exe
    };
    if let Err(why) = binary_is_roots(&chosen) {
        let msg = format!(
            "{} would run as root from the timer, but {why}; install the package (which puts it \
             at {INSTALLED}), or copy it somewhere only root can change \
             (install -o root -g root -m 0755 {} /usr/local/sbin/e2ebackup) and run \
             `schedule` from there",
            chosen.display(),
            chosen.display()
        );
        if install {
            return Err(crate::error::Failure::Security(msg).into());
        }
        crate::warn!("{msg}");
    }
    Ok(chosen)
}

/// Whether only root can change the program at `path`: the file itself and every directory
/// above it ([`crate::fsutil::HeldDir`]'s walk). Err says who else could.
fn binary_is_roots(path: &Path) -> std::result::Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).map_err(|e| format!("it cannot be examined: {e}"))?;
    if md.uid() != 0 || md.mode() & 0o022 != 0 {
        return Err(format!(
            "it is owned by uid {} with mode {:04o}, so another user could replace it",
            md.uid(),
            md.mode() & 0o7777
        ));
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    match crate::fsutil::HeldDir::open(dir, false, true) {
        Ok(h) => match h.untrusted {
            None => Ok(()),
            Some((at, uid, mode)) => Err(format!(
                "{} (owner uid {uid}, mode {:04o}) lets another user replace it",
                at.display(),
                mode & 0o7777
            )),
        },
        Err(e) => Err(format!("{e:#}")),
    }
}

/// Where `--install` writes the units.
pub const UNIT_DIR: &str = "/etc/systemd/system";

/// Whether systemd is the running init: the test of sd_booted(3).
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Write `BASE.service` and `BASE.timer` into `dir`, then, if systemd runs, reload it and
/// enable the timer. Without systemd (a container, another init) the units are still written,
/// and the result is a warning (exit 3) saying how to enable the timer later: `systemctl`
/// would only fail there.
pub fn install_units(
    dir: &Path,
    base: &str,
    service: &str,
    timer: &str,
    systemd_running: bool,
) -> Result<Exit> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (ext, text) in [("service", service), ("timer", timer)] {
        let path = dir.join(format!("{base}.{ext}"));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        info!("wrote {}", path.display());
    }
    let later = format!("systemctl daemon-reload && systemctl enable --now {base}.timer");
    if !systemd_running {
        warn!(
            "systemd is not running (no /run/systemd/system): the units are written, but \
             {base}.timer was not enabled. Once systemd runs, enable it with `{later}`; or use \
             cron instead (`e2ebackup schedule` without --install prints a cron line)"
        );
        return Ok(Exit::Warnings);
    }
    if crate::cmd::which("systemctl").is_err() {
        warn!("no systemctl found: {base}.timer was not enabled; enable it with `{later}`");
        return Ok(Exit::Warnings);
    }
    crate::cmd::Cmd::new("systemctl")?
        .arg("daemon-reload")
        .run()?;
    crate::cmd::Cmd::new("systemctl")?
        .args(["enable", "--now"])
        .arg(format!("{base}.timer"))
        .run()?;
    info!("enabled {base}.timer");
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_carry_the_safety_settings() {
        let p = Profile::parse(
            Path::new("/etc/e2ebackup/profiles/home.yaml"),
            "server: {host: h, user: u, identity_file: /k, known_hosts: /kh, path: /srv}\n\
             container: {file: c.luks, size: 1G, keyfile: /key}\nbackup: {sources: [/home]}\n",
        )
        .unwrap();
        let (s, t) = units(
            &p,
            Path::new("/usr/bin/e2ebackup"),
            "daily",
            Some("notify@%n.service"),
        );
        assert!(s.contains("ExecStart=/usr/bin/e2ebackup run /etc/e2ebackup/profiles/home.yaml"));
        assert!(s.contains("KillMode=mixed"));
        assert!(s.contains("SuccessExitStatus=3"));
        assert!(s.contains("OnFailure=notify@%n.service"));
        // Default run_timeout 24h + stall limit (2*30+30) + 300 + 60, no hooks.
        assert!(s.contains("TimeoutStartSec=86850\n"), "{s}");
        assert!(
            t.contains("Persistent=true")
                && t.contains("RandomizedDelaySec=")
                && t.contains("OnCalendar=daily")
        );
    }

    #[test]
    fn start_timeout_follows_the_profile() {
        let p = Profile::parse(
            Path::new("/etc/e2ebackup/profiles/home.yaml"),
            "server: {host: h, user: u, identity_file: /k, known_hosts: /kh, path: /srv, \
             timeout: 15, run_timeout: 2h}\n\
             container: {file: c.luks, size: 1G, keyfile: /key}\nbackup: {sources: [/home]}\n\
             hooks: {failed: [a, b], after: c, finally: d, timeout: 1m}\n",
        )
        .unwrap();
        // 2 h + (2*15+30) + 300 + 3 hooks (2 failed + 1 finally) * 60 + 60.
        assert_eq!(start_timeout(&p), 7200 + 60 + 300 + 180 + 60);
        let (s, _) = units(&p, Path::new("/usr/bin/e2ebackup"), "daily", None);
        assert!(s.contains("TimeoutStartSec=7800\n"), "{s}");
    }

    /// A relative profile path becomes absolute in the unit and the cron line (systemd and cron
    /// run commands in `/`); the cron line has the unit's priorities.
    #[test]
    fn relative_profile_path_is_made_absolute() {
        let p = Profile::parse(
            Path::new("./rel.yaml"),
            "server: {host: h, user: u, identity_file: /k, known_hosts: /kh, path: /srv}\n\
             container: {file: c.luks, size: 1G, keyfile: /key}\nbackup: {sources: [/home]}\n",
        )
        .unwrap();
        let abs = std::env::current_dir().unwrap().join("rel.yaml");
        let exe = Path::new("/usr/bin/e2ebackup");
        let (s, _) = units(&p, exe, "daily", None);
        let want = format!("ExecStart=/usr/bin/e2ebackup run {}\n", abs.display());
        assert!(s.contains(&want), "{s}");
        let c = cron_line(&p, exe, "run");
        assert_eq!(
            c,
            format!(
                "30 2 * * * root nice -n 10 ionice -c 2 -n 7 /usr/bin/e2ebackup -q run {}",
                abs.display()
            )
        );
        let (vs, vt) = verify_units(&p, exe, 5, "weekly", None);
        let want = format!(
            "ExecStart=/usr/bin/e2ebackup verify {} --read-data 5\n",
            abs.display()
        );
        assert!(vs.contains(&want) && !vs.contains(" run "), "{vs}");
        assert!(vt.contains("OnCalendar=weekly\n"), "{vt}");
    }

    /// `every day at 3` is refused (exit 2) where systemd-analyze can check it.
    #[test]
    fn calendar_expressions_are_checked() {
        if crate::cmd::which("systemd-analyze").is_err() {
            // Without it the check only warns: nothing to assert but that.
            assert!(check_calendar("every day at 3").is_ok());
            return;
        }
        assert!(check_calendar("daily").is_ok());
        assert!(check_calendar("*-*-* 03:17:00").is_ok());
        let e = check_calendar("every day at 3").unwrap_err();
        assert_eq!(crate::error::exit_for(&e), Exit::Usage);
        assert!(format!("{e:#}").contains("every day at 3"), "{e:#}");
    }

    /// Without systemd as init the units are still written; systemctl is not run, and the
    /// result is a warning (exit 3).
    #[test]
    fn install_without_systemd_writes_the_units_and_warns() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("etc/systemd/system");
        let code = install_units(&dir, "e2ebackup-home", "S\n", "T\n", false).unwrap();
        assert_eq!(code, Exit::Warnings);
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("e2ebackup-home.service"), "S\n");
        assert_eq!(read("e2ebackup-home.timer"), "T\n");
        // Installing again replaces the units.
        let code = install_units(&dir, "e2ebackup-home", "S2\n", "T2\n", false).unwrap();
        assert_eq!(code, Exit::Warnings);
        assert_eq!(read("e2ebackup-home.timer"), "T2\n");
    }

    /// A program another user could replace is refused for the timer: the file writable by
    /// others or owned by another user, or a directory above it that another user owns.
    #[test]
    fn a_binary_others_can_replace_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (chown)");
            return;
        }
        let base = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join(format!("e2eb-sched-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("user")).unwrap();
        let exe = base.join("e2ebackup");
        std::fs::write(&exe, b"#!/bin/true\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        if crate::fsutil::HeldDir::open(&base, false, true)
            .unwrap()
            .untrusted
            .is_some()
        {
            eprintln!(
                "skipped: {} is below a directory others can change",
                base.display()
            );
            return;
        }
        binary_is_roots(&exe).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(binary_is_roots(&exe).unwrap_err().contains("mode 0775"));
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&exe, Some(65534), None).unwrap();
        assert!(binary_is_roots(&exe).unwrap_err().contains("uid 65534"));
        let inner = base.join("user/e2ebackup");
        std::fs::copy(&exe, &inner).unwrap();
        std::os::unix::fs::chown(&inner, Some(0), None).unwrap();
        std::os::unix::fs::chown(base.join("user"), Some(65534), None).unwrap();
        let e = binary_is_roots(&inner).unwrap_err();
        assert!(
            e.contains(&format!("{} (owner uid 65534", base.join("user").display())),
            "{e}"
        );
        // This test program, in a build directory only root can change, is accepted.
        assert!(unit_binary(true).is_ok());
        let _ = std::fs::remove_dir_all(&base);
    }

    /// The generated units pass `systemd-analyze verify` (where systemd is installed).
    #[test]
    #[ignore = "needs /usr/bin/systemd-analyze (package systemd); CI installs it and runs --include-ignored"]
    fn host_units_pass_systemd_analyze_verify() {
        let analyze = Path::new("/usr/bin/systemd-analyze");
        let d = tempfile::tempdir().unwrap();
        let prof = d.path().join("nightly.yaml");
        std::fs::write(
            &prof,
            "server: {host: h, user: u, identity_file: /k, known_hosts: /kh, path: /srv}\n\
             container: {file: c.luks, size: 1G, keyfile: /key}\nbackup: {sources: [/home]}\n",
        )
        .unwrap();
        let p = Profile::load(&prof).unwrap();
        let exe = std::env::current_exe().unwrap();
        let (s, t) = units(&p, &exe, "*-*-* 02:30:00", None);
        let svc = d.path().join("e2ebackup-nightly.service");
        let tim = d.path().join("e2ebackup-nightly.timer");
        std::fs::write(&svc, s).unwrap();
        std::fs::write(&tim, t).unwrap();
        let out = std::process::Command::new(analyze)
            .arg("verify")
            .arg(&svc)
            .arg(&tim)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "systemd-analyze verify: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
