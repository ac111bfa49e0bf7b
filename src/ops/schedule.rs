//! `e2ebackup schedule PROFILE [--install]`: a systemd service and timer for the profile.
//!
//! - `Persistent=true`: a run missed while the machine was off happens at the next boot.
//! - `RandomizedDelaySec`: many clients of one server do not all start at midnight.
//! - `KillMode=mixed`: on stop, SIGTERM goes to e2ebackup only, which stops rsync and tears
//!   the stack down in order; the rest of the cgroup (the sshfs daemon!) is killed only
//!   after that, when nothing needs it any more. The default (control-group) would kill
//!   sshfs at the same moment and leave the loop device over a dead FUSE file.
//! - `SuccessExitStatus=3`: a snapshot committed with warnings is not a failed unit.
//! - Hardening that does not get in the way of a root tool that mounts, attaches loop
//!   devices and reads everything: no new privileges, private /tmp, read-only /usr and /boot
//!   and /etc (`ProtectSystem=full`), no access to kernel tunables or logs.

use std::path::Path;

use anyhow::{Context, Result};

use crate::error::Exit;
use crate::ops::fail;
use crate::profile::Profile;
use crate::{info, warn};

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
        profile = p.source_file.display(),
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

pub fn schedule(p: &Profile, on_calendar: &str, on_failure: Option<&str>, install: bool) -> Exit {
    let exe = std::env::current_exe().unwrap_or_else(|_| "/usr/bin/e2ebackup".into());
    let (service, timer) = units(p, &exe, on_calendar, on_failure);
    let base = format!("e2ebackup-{}", p.name);
    if !install {
        println!("# /etc/systemd/system/{base}.service\n{service}");
        println!("# /etc/systemd/system/{base}.timer\n{timer}");
        println!("# or, with cron (/etc/cron.d/{base}):");
        println!(
            "# 30 2 * * * root {} -q run {}",
            exe.display(),
            p.source_file.display()
        );
        return Exit::Ok;
    }
    let r = (|| -> Result<()> {
        let dir = Path::new("/etc/systemd/system");
        for (ext, text) in [("service", &service), ("timer", &timer)] {
            let path = dir.join(format!("{base}.{ext}"));
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            info!("wrote {}", path.display());
        }
        match crate::cmd::which("systemctl") {
            Ok(_) => {
                crate::cmd::Cmd::new("systemctl")?
                    .arg("daemon-reload")
                    .run()?;
                crate::cmd::Cmd::new("systemctl")?
                    .args(["enable", "--now"])
                    .arg(format!("{base}.timer"))
                    .run()?;
                info!("enabled {base}.timer");
            }
            Err(_) => warn!("no systemctl here: enable {base}.timer yourself"),
        }
        Ok(())
    })();
    match r {
        Ok(()) => Exit::Ok,
        Err(e) => fail(e),
    }
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
        assert!(
            t.contains("Persistent=true")
                && t.contains("RandomizedDelaySec=")
                && t.contains("OnCalendar=daily")
        );
    }

    /// The generated units pass `systemd-analyze verify` (where systemd is installed).
    #[test]
    fn host_units_pass_systemd_analyze_verify() {
        let analyze = Path::new("/usr/bin/systemd-analyze");
        if !analyze.exists() {
            eprintln!("skipping: no systemd-analyze here");
            return;
        }
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
