//! Reporting a run to the outside: healthchecks-style pings, a Prometheus textfile, and the
//! staleness check behind `status`.
//!
//! None of this may change a run's outcome: a monitoring endpoint that is down costs a
//! warning, never a backup.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::profile::Profile;
use crate::state::LastRun;
use crate::warn;

/// Pings a healthchecks.io-style URL: `URL/start`, `URL` (success), `URL/fail` (failure).
pub struct Pinger {
    url: String,
    agent: ureq::Agent,
}

/// At most this much of the log goes with a ping (healthchecks keeps 100 kB by default).
const BODY_LIMIT: usize = 10_000;

impl Pinger {
    pub fn new(p: &Profile) -> Option<Pinger> {
        let url = p.monitoring.healthcheck_url.as_ref()?;
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::PlatformVerifier)
            .build();
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .tls_config(tls)
            .user_agent(concat!("e2ebackup/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Some(Pinger {
            url: url.trim_end_matches('/').to_string(),
            agent,
        })
    }

    pub fn start(&self) {
        self.send("start", None);
    }

    /// Success or failure, with the tail of the log as the body.
    pub fn finish(&self, success: bool, log: &str) {
        let mut body = log.to_string();
        if body.len() > BODY_LIMIT {
            let mut cut = body.len() - BODY_LIMIT;
            while !body.is_char_boundary(cut) {
                cut += 1;
            }
            body = body.split_off(cut);
        }
        self.send(if success { "" } else { "fail" }, Some(body));
    }

    /// Three tries, a few seconds apart: a ping lost to a passing network blip would raise a
    /// false alarm later. Returns whether the ping got through (a failure only warns).
    fn send(&self, suffix: &str, body: Option<String>) -> bool {
        let url = if suffix.is_empty() {
            self.url.clone()
        } else {
            format!("{}/{suffix}", self.url)
        };
        let mut last_err = String::new();
        for attempt in 0..3 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_secs(2 * attempt));
            }
            let r = match &body {
                Some(b) => self.agent.post(&url).send(b.as_bytes()).map(|_| ()),
                None => self.agent.get(&url).call().map(|_| ()),
            };
            match r {
                Ok(()) => {
                    crate::debug!("pinged {url}");
                    return true;
                }
                Err(e) => last_err = e.to_string(),
            }
        }
        warn!("healthcheck ping {url} failed: {last_err}");
        false
    }
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition of a run record.
pub fn textfile(p: &Profile, r: &LastRun) -> String {
    let label = format!("{{profile=\"{}\"}}", escape_label(&p.name));
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, v: Option<f64>| {
        if let Some(v) = v {
            out.push_str(&format!(
                "# HELP e2ebackup_{name} {help}\n# TYPE e2ebackup_{name} gauge\ne2ebackup_{name}{label} {v}\n"
            ));
        }
    };
    let f = |v: Option<u64>| v.map(|v| v as f64);
    metric(
        "last_run_timestamp_seconds",
        "When the last run finished (Unix time).",
        r.finished_unix.map(|v| v as f64),
    );
    metric(
        "last_success_timestamp_seconds",
        "When the last successful run finished (Unix time).",
        r.last_success_unix.map(|v| v as f64),
    );
    metric(
        "last_exit_code",
        "Exit status of the last run (0 ok, 3 ok with warnings; see docs/operations.md).",
        Some(r.exit_code as f64),
    );
    metric(
        "last_duration_seconds",
        "Wall time of the last run, teardown and hooks included.",
        r.duration_seconds,
    );
    metric(
        "last_files_transferred",
        "Regular files copied by the last run (the rest are hard links).",
        f(r.files_transferred),
    );
    metric(
        "last_bytes_transferred",
        "Bytes of file data copied by the last run.",
        f(r.bytes_transferred),
    );
    metric(
        "container_size_bytes",
        "Apparent size of the container file.",
        f(r.container_size),
    );
    metric(
        "snapshots",
        "Complete snapshots in the container.",
        f(r.snapshot_count),
    );
    metric(
        "consecutive_skips",
        "Runs in a row skipped by a before hook (exit 75); 0 after any other run.",
        Some(r.consecutive_skips as f64),
    );
    metric(
        "skip_alarm",
        "1 when consecutive_skips reached monitoring.max_skips: as bad as a failed run.",
        Some(f64::from(u8::from(skip_alarm(p, Some(r)).is_some()))),
    );
    metric(
        "last_unread_files",
        "Source files the last run could not read (committed without them).",
        Some(r.unread_files.len() as f64),
    );
    metric(
        "last_skipped_large_files",
        "Files the last run skipped for backup.max_file_size.",
        Some(r.skipped_large_files.len() as f64),
    );
    out
}

/// Rewrite the textfile atomically (node-exporter may read it at any moment), never through
/// a link: its directory may belong to another user (node-exporter's), who could plant
/// links at any name there, so the directory is held open without following an untrusted
/// link and the file is written through [`crate::fsutil::HeldDir::replace_file`] (a new
/// file under a random name, `O_EXCL | O_NOFOLLOW`, renamed over the textfile). Such a
/// directory is accepted: root only ever creates new files in it and renames them.
pub fn write_textfile(path: &Path, text: &str) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no file name", path.display()))?;
    let held = crate::fsutil::HeldDir::open(dir, false, true)?;
    held.replace_file(name, text.as_bytes(), 0o644)
}

/// Everything that reports a finished run: the textfile, then the ping.
pub fn report(p: &Profile, r: &LastRun, pinger: Option<&Pinger>) {
    if let Some(path) = &p.monitoring.prometheus_textfile {
        if let Err(e) = write_textfile(&path.0, &textfile(p, r)) {
            warn!("cannot write the Prometheus textfile: {e:#}");
        }
    }
    let Some(pg) = pinger else { return };
    if r.result == crate::state::SKIPPED {
        // A skip is not a success: no success ping (the check's own period then notices a
        // target that stays away), and a failure ping once the skips reach the limit.
        if let Some(alarm) = skip_alarm(p, Some(r)) {
            warn!("{}: {alarm}", p.name);
            pg.finish(false, &format!("{alarm}\n{}", crate::logging::tail()));
        }
        return;
    }
    pg.finish(
        r.exit_code == 0 || r.exit_code == 3,
        &crate::logging::tail(),
    );
}

/// A failure for monitoring when the last `monitoring.max_skips` runs (or more) in a row were
/// skipped by a `before` hook: a target that is never available is a backup that never runs.
pub fn skip_alarm(p: &Profile, r: Option<&LastRun>) -> Option<String> {
    let n = r?.consecutive_skips;
    let max = p.monitoring.max_skips;
    (max > 0 && n >= u64::from(max)).then(|| {
        format!(
            "the last {n} runs were skipped (a before hook said the target is unavailable; \
             monitoring.max_skips is {max})"
        )
    })
}

/// A warning when the last success is older than the profile's expected interval.
pub fn staleness(p: &Profile, r: Option<&LastRun>, now_unix: i64) -> Option<String> {
    let every = p.monitoring.expected_interval?;
    match r.and_then(|r| r.last_success_unix.map(|t| (t, r))) {
        None => Some(format!(
            "no successful run recorded (expected one every {every})"
        )),
        Some((t, r)) if now_unix - t > every.0 as i64 => Some(format!(
            "last success {} is older than the expected interval {every}",
            r.last_success.as_deref().unwrap_or("?")
        )),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    fn profile(monitoring: &str) -> Profile {
        let text = format!(
            "server:\n  host: 127.0.0.1\n  user: u\n  identity_file: /k\n  known_hosts: /kh\n  path: /srv\n\
             container:\n  file: c.luks\n  size: 1G\n  keyfile: /key\n\
             backup:\n  sources: [/etc]\nmonitoring:\n{monitoring}"
        );
        Profile::parse(Path::new("/etc/e2ebackup/profiles/mon.yaml"), &text).unwrap()
    }

    /// A real HTTP server on 127.0.0.1 that records "METHOD PATH BODY" of each request.
    fn http_server(requests: usize) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/ping/abc-123", l.local_addr().unwrap());
        let h = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..requests {
                let (s, _) = l.accept().unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut first = String::new();
                r.read_line(&mut first).unwrap();
                let mut len = 0;
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                let mut parts = first.split_whitespace();
                seen.push(format!(
                    "{} {} {}",
                    parts.next().unwrap(),
                    parts.next().unwrap(),
                    String::from_utf8_lossy(&body)
                ));
                let mut s = s;
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK")
                    .unwrap();
            }
            seen
        });
        (url, h)
    }

    #[test]
    fn pings_reach_the_start_success_and_fail_paths() {
        let (url, server) = http_server(3);
        let p = profile(&format!("  healthcheck_url: {url}/\n"));
        let pg = Pinger::new(&p).unwrap();
        pg.start();
        pg.finish(true, "all good\n");
        pg.finish(false, &format!("{}the cause\n", "x".repeat(20_000)));
        let seen = server.join().unwrap();
        assert_eq!(seen[0], "GET /ping/abc-123/start ");
        assert_eq!(seen[1], "POST /ping/abc-123 all good\n");
        assert!(
            seen[2].starts_with("POST /ping/abc-123/fail x"),
            "{}",
            &seen[2][..40]
        );
        assert!(seen[2].ends_with("the cause\n"));
        assert!(seen[2].len() < BODY_LIMIT + 40);
    }

    #[test]
    fn unreachable_endpoint_only_warns() {
        // Port 9 on 127.0.0.1 (discard) is closed here: connection refused, three times.
        let p = profile("  healthcheck_url: http://127.0.0.1:9/x\n");
        let pinger = Pinger::new(&p).unwrap();
        assert!(
            !pinger.send("start", None),
            "a refused ping must report failure"
        );
        pinger.start(); // and the public entry point returns instead of failing the run
    }

    #[test]
    fn textfile_has_the_metrics_and_is_replaced_atomically() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("e2ebackup-mon.prom");
        let p = profile(&format!("  prometheus_textfile: {}\n", path.display()));
        let r = LastRun {
            command: "run".into(),
            exit_code: 0,
            finished_unix: Some(1_700_000_000),
            last_success_unix: Some(1_700_000_000),
            duration_seconds: Some(12.5),
            bytes_transferred: Some(4096),
            container_size: Some(1 << 30),
            snapshot_count: Some(3),
            unread_files: vec!["/home/a/x".into(), "/home/b/y".into()],
            ..Default::default()
        };
        report(&p, &r, None);
        let t = std::fs::read_to_string(&path).unwrap();
        for want in [
            "e2ebackup_last_success_timestamp_seconds{profile=\"mon\"} 1700000000\n",
            "e2ebackup_last_exit_code{profile=\"mon\"} 0\n",
            "e2ebackup_last_duration_seconds{profile=\"mon\"} 12.5\n",
            "e2ebackup_container_size_bytes{profile=\"mon\"} 1073741824\n",
            "e2ebackup_snapshots{profile=\"mon\"} 3\n",
            "e2ebackup_last_unread_files{profile=\"mon\"} 2\n",
            "e2ebackup_last_skipped_large_files{profile=\"mon\"} 0\n",
            "# TYPE e2ebackup_snapshots gauge\n",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
        // Unknown figures are left out rather than reported as 0.
        assert!(!t.contains("files_transferred"), "{t}");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn stale_when_older_than_the_interval() {
        let p = profile("  expected_interval: 26h\n");
        let mut r = LastRun {
            last_success_unix: Some(1_000_000),
            last_success: Some("then".into()),
            ..Default::default()
        };
        assert_eq!(staleness(&p, Some(&r), 1_000_000 + 26 * 3600), None);
        let w = staleness(&p, Some(&r), 1_000_000 + 26 * 3600 + 1).unwrap();
        assert!(w.contains("older than the expected interval 26h"), "{w}");
        r.last_success_unix = None;
        assert!(staleness(&p, Some(&r), 0)
            .unwrap()
            .contains("no successful run"));
        assert!(staleness(&p, None, 0).is_some());
        assert_eq!(staleness(&profile("  {}\n"), None, 0), None);
    }

    #[test]
    fn skips_in_a_row_are_an_alarm_at_max_skips() {
        let p = profile("  max_skips: 2\n");
        let mut r = LastRun {
            command: "run".into(),
            result: crate::state::SKIPPED.into(),
            consecutive_skips: 1,
            ..Default::default()
        };
        assert_eq!(skip_alarm(&p, Some(&r)), None);
        assert!(textfile(&p, &r).contains("e2ebackup_skip_alarm{profile=\"mon\"} 0\n"));
        r.consecutive_skips = 2;
        let a = skip_alarm(&p, Some(&r)).unwrap();
        assert!(a.contains("last 2 runs were skipped"), "{a}");
        let t = textfile(&p, &r);
        assert!(
            t.contains("e2ebackup_consecutive_skips{profile=\"mon\"} 2\n"),
            "{t}"
        );
        assert!(
            t.contains("e2ebackup_skip_alarm{profile=\"mon\"} 1\n"),
            "{t}"
        );
        // The default limit is 3; 0 turns the alarm off.
        assert_eq!(skip_alarm(&profile("  {}\n"), Some(&r)), None);
        r.consecutive_skips = 3;
        assert!(skip_alarm(&profile("  {}\n"), Some(&r)).is_some());
        assert_eq!(skip_alarm(&profile("  max_skips: 0\n"), Some(&r)), None);
    }

    #[test]
    fn the_skip_that_reaches_the_limit_pings_fail() {
        let (url, server) = http_server(1);
        let p = profile(&format!("  healthcheck_url: {url}\n  max_skips: 2\n"));
        let pg = Pinger::new(&p).unwrap();
        let mut r = LastRun {
            command: "run".into(),
            result: crate::state::SKIPPED.into(),
            consecutive_skips: 1,
            ..Default::default()
        };
        report(&p, &r, Some(&pg)); // under the limit: no ping at all
        r.consecutive_skips = 2;
        report(&p, &r, Some(&pg));
        let seen = server.join().unwrap();
        assert!(
            seen[0].starts_with("POST /ping/abc-123/fail the last 2 runs were skipped"),
            "{seen:?}"
        );
    }
}
