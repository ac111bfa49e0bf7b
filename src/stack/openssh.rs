//! The one place that builds OpenSSH options, for every `ssh` and `sshfs` we start.
//!
//! Before this module sshfs and trim's tunnel each had their own list and they drifted (the
//! tunnel had no `PasswordAuthentication=no` and a fixed `ServerAliveCountMax=4`). Every
//! option here is a security or liveness decision, so it must be made once:
//! - `-F /dev/null`: root's `~/.ssh/config` and /etc/ssh/ssh_config must not change what we
//!   connect to (a `ProxyCommand`, another `HostName`, another key).
//! - `BatchMode`, `PasswordAuthentication=no`: unattended, never a prompt.
//! - `StrictHostKeyChecking=yes` with the profile's pinned known_hosts only (the global file
//!   is /dev/null): no trust on first use, no key learned from elsewhere.
//! - `IdentitiesOnly` + `IdentityFile`: only the profile's key, not an agent's.
//! - `ConnectTimeout` and keepalives from `server.timeout`: a dead server fails the run in
//!   about that time instead of hanging it.
//!
//! The destination always follows `--` in ssh's argv, and a user or host that starts with
//! `-` is refused here as well (profile validation does not forbid it), so neither can be
//! read as an option by ssh or by sshfs (which builds its own ssh argv).

use std::path::Path;

use anyhow::{bail, Result};

use crate::profile::Server;

/// Keepalive period in seconds; the count is derived from `server.timeout`.
const ALIVE_INTERVAL: u32 = 15;

/// `Key=value` pairs, in the order they are passed.
pub fn options(server: &Server) -> Vec<String> {
    vec![
        "BatchMode=yes".into(),
        "StrictHostKeyChecking=yes".into(),
        format!("UserKnownHostsFile={}", server.known_hosts.0.display()),
        "GlobalKnownHostsFile=/dev/null".into(),
        "IdentitiesOnly=yes".into(),
        format!("IdentityFile={}", server.identity_file.0.display()),
        "PasswordAuthentication=no".into(),
        format!("ConnectTimeout={}", server.timeout),
        format!("ServerAliveInterval={ALIVE_INTERVAL}"),
        format!(
            "ServerAliveCountMax={}",
            (server.timeout / ALIVE_INTERVAL).max(2)
        ),
    ]
}

/// Refuse a user or host that ssh could take for an option or that breaks `user@host`.
fn check_names(server: &Server) -> Result<()> {
    for (key, v) in [("server.user", &server.user), ("server.host", &server.host)] {
        if v.is_empty() || v.starts_with('-') || v.chars().any(|c| c.is_control() || c == ' ') {
            bail!("{key} `{v}` cannot be passed to ssh (empty, starts with '-', or has spaces)");
        }
    }
    Ok(())
}

/// `user@host` for ssh (which puts it after `--`).
pub fn destination(server: &Server) -> Result<String> {
    check_names(server)?;
    Ok(format!("{}@{}", server.user, server.host))
}

/// The argv for `ssh` up to and including the destination: `-F /dev/null -p PORT -o K=V...
/// EXTRA... -- user@host`. The remote command, if any, follows.
pub fn ssh_args(server: &Server, extra: &[String]) -> Result<Vec<String>> {
    let dest = destination(server)?;
    let mut v: Vec<String> = vec!["-F".into(), "/dev/null".into()];
    v.push("-p".into());
    v.push(server.port.to_string());
    for o in options(server) {
        v.push("-o".into());
        v.push(o);
    }
    v.extend(extra.iter().cloned());
    v.push("--".into());
    v.push(dest);
    Ok(v)
}

/// The argv for `sshfs` (the mount options `fuse_opts` are added to the same `-o`):
/// `-F /dev/null -p PORT -o SSHOPTS,FUSEOPTS user@[host]:path TARGET`.
///
/// sshfs takes ssh options as `-o Key=value` in its comma-separated list, so no path may
/// contain a comma. sshfs parses the source itself (no `--` possible there): the checked
/// names keep it from starting with `-`.
pub fn sshfs_args(server: &Server, fuse_opts: &[&str], target: &Path) -> Result<Vec<String>> {
    check_names(server)?;
    for (key, p) in [
        ("server.identity_file", &server.identity_file.0),
        ("server.known_hosts", &server.known_hosts.0),
    ] {
        if p.to_string_lossy().contains(',') {
            bail!(
                "{key} {}: sshfs cannot take a path containing a comma",
                p.display()
            );
        }
    }
    let host = if server.host.contains(':') {
        format!("[{}]", server.host)
    } else {
        server.host.clone()
    };
    let mut opts = options(server);
    opts.extend(fuse_opts.iter().map(|s| s.to_string()));
    Ok(vec![
        "-F".into(),
        "/dev/null".into(),
        "-p".into(),
        server.port.to_string(),
        "-o".into(),
        opts.join(","),
        format!("{}@{}:{}", server.user, host, server.path),
        target.display().to_string(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::AbsPath;
    use std::path::PathBuf;

    fn server(host: &str, timeout: u32) -> Server {
        Server {
            host: host.into(),
            port: 2222,
            user: "backup".into(),
            identity_file: AbsPath(PathBuf::from("/etc/e2ebackup/id")),
            known_hosts: AbsPath(PathBuf::from("/etc/e2ebackup/known_hosts")),
            path: "/srv/b".into(),
            timeout,
            run_timeout: crate::profile::Duration(86400),
        }
    }

    #[test]
    fn ssh_argv_has_every_option_and_dashdash_before_the_destination() {
        let a = ssh_args(&server("srv.example", 30), &["-T".into()]).unwrap();
        let opts: Vec<&str> = a
            .windows(2)
            .filter(|w| w[0] == "-o")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(
            opts,
            [
                "BatchMode=yes",
                "StrictHostKeyChecking=yes",
                "UserKnownHostsFile=/etc/e2ebackup/known_hosts",
                "GlobalKnownHostsFile=/dev/null",
                "IdentitiesOnly=yes",
                "IdentityFile=/etc/e2ebackup/id",
                "PasswordAuthentication=no",
                "ConnectTimeout=30",
                "ServerAliveInterval=15",
                "ServerAliveCountMax=2",
            ]
        );
        assert_eq!(&a[..4], ["-F", "/dev/null", "-p", "2222"]);
        assert_eq!(&a[a.len() - 3..], ["-T", "--", "backup@srv.example"]);
    }

    #[test]
    fn keepalive_count_follows_the_timeout() {
        let o = options(&server("h", 120));
        assert!(o.contains(&"ServerAliveCountMax=8".to_string()), "{o:?}");
        assert!(o.contains(&"ConnectTimeout=120".to_string()), "{o:?}");
    }

    #[test]
    fn sshfs_argv_shares_the_ssh_options() {
        let a = sshfs_args(
            &server("::1", 30),
            &["contain_symlinks", "nosuid"],
            Path::new("/run/e2ebackup/x/server"),
        )
        .unwrap();
        let ssh_opts = options(&server("::1", 30)).join(",");
        assert_eq!(a[5], format!("{ssh_opts},contain_symlinks,nosuid"));
        assert_eq!(a[6], "backup@[::1]:/srv/b");
        assert_eq!(a[7], "/run/e2ebackup/x/server");
    }

    #[test]
    fn a_host_or_user_that_looks_like_an_option_is_refused() {
        for h in ["-oProxyCommand=touch /tmp/p", "", "a b"] {
            let e = ssh_args(&server(h, 30), &[]).unwrap_err().to_string();
            assert!(e.contains("server.host"), "{e}");
            assert!(sshfs_args(&server(h, 30), &[], Path::new("/m")).is_err());
        }
        let mut s = server("h", 30);
        s.user = "-oProxyCommand=x".into();
        assert!(ssh_args(&s, &[])
            .unwrap_err()
            .to_string()
            .contains("server.user"));
    }

    #[test]
    fn a_comma_in_a_path_is_refused_for_sshfs() {
        let mut s = server("h", 30);
        s.identity_file = AbsPath(PathBuf::from("/etc/a,b"));
        let e = sshfs_args(&s, &[], Path::new("/m"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("comma"), "{e}");
    }
}
