//! The I/O watchdog: a server whose storage hangs must not hang the client for good.
//!
//! When the disk (or NFS mount) under a server's sftp-server hangs, sftp-server stops
//! answering while sshd still answers keepalives, so neither ssh's keepalives nor any
//! socket timeout fires. Every request the loop device sends through sshfs then waits for
//! ever, and the tasks behind them (rsync, dmcrypt_write, jbd2, this process in a syscall)
//! sit in D state, where not even SIGKILL ends them (measured in the test guest; FACTS.md).
//! The one lever left is the FUSE connection: aborting it
//! (`/sys/fs/fuse/connections/N/abort`, N = the sshfs mount's device number) or killing the
//! sshfs daemon fails every pending and every later request with an error, so the blocked
//! I/O returns, ext4 aborts its journal, and the ordinary teardown can run.
//!
//! So a thread samples, once a second, how many requests the sshfs connection has pending
//! (the fusectl `waiting` count) and in flight on the loop device over the container
//! (`/sys/block/loopN/stat`), and how many the loop device has completed. Requests pending
//! while nothing completes for longer than [`crate::profile::Server::stall_limit`] is a
//! hung server: the watchdog aborts the connection, kills sshfs and its ssh, says so in
//! words, and makes the main thread's next [`crate::signals::check`] fail, so the command
//! unwinds as on SIGTERM and exits 1 (or 5 if some of the teardown could not be done).
//!
//! Why completions and not bytes: sshfs's own read/write counters (`/proc/PID/io`) rise
//! whenever a new request arrives, hung server or not, and ssh's rise with every keepalive.
//! Completions on the loop device rise only when the server answered. A pending count that
//! drops also counts as progress (requests outside the loop device: the lock file, statfs).
//!
//! The decision is [`Detector::feed`], pure logic over a sequence of samples, tested below
//! without a kernel; [`Probe`] reads the real counters.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cmd::Proc;
use crate::stack::{loopdev, mount};
use crate::{debug, warn};

/// One look at the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// Requests of the sshfs connection not yet answered (fusectl `waiting`).
    pub waiting: u64,
    /// Requests in flight on the loop device(s) over the container.
    pub in_flight: u64,
    /// Requests the loop device(s) completed so far (reads, writes, discards, flushes).
    pub completed: u64,
}

impl Sample {
    fn busy(&self) -> bool {
        self.waiting > 0 || self.in_flight > 0
    }
}

/// What a sample says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing pending.
    Idle,
    /// Something completed since the last sample.
    Progress,
    /// Requests pending, nothing completed for this long (under the limit).
    Waiting(Duration),
    /// Requests pending, nothing completed for this long: at or over the limit.
    Stalled(Duration),
}

/// Turns samples into verdicts. Time is passed in, so the logic is testable.
#[derive(Debug)]
pub struct Detector {
    limit: Duration,
    last: Option<Sample>,
    /// When the current stretch without progress began.
    since: Option<Duration>,
}

impl Detector {
    pub fn new(limit: Duration) -> Detector {
        Detector {
            limit,
            last: None,
            since: None,
        }
    }

    /// `at`: time of the sample on any monotonic clock.
    pub fn feed(&mut self, at: Duration, s: Sample) -> Verdict {
        let last = self.last.replace(s);
        if !s.busy() {
            self.since = None;
            return Verdict::Idle;
        }
        let progressed = match last {
            None => true,
            Some(l) => s.completed != l.completed || s.waiting < l.waiting || !l.busy(),
        };
        if progressed || self.since.is_none() {
            self.since = Some(at);
            return Verdict::Progress;
        }
        let stuck = at.saturating_sub(self.since.unwrap_or(at));
        if stuck >= self.limit {
            Verdict::Stalled(stuck)
        } else {
            Verdict::Waiting(stuck)
        }
    }
}

/// Where fusectl lives (systemd mounts it at boot; a minimal system may not).
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Reads the real counters of one sshfs mount and the loop devices over one container.
#[derive(Debug)]
pub struct Probe {
    /// `/sys/fs/fuse/connections/N` of the sshfs mount, if fusectl is there.
    pub connection: Option<PathBuf>,
    /// The sshfs daemon, as recorded when it was started (never looked up by argv: a local
    /// user can run a look-alike).
    pub daemon: Option<Proc>,
    pub container: PathBuf,
}

impl Probe {
    pub fn new(sshfs_target: &Path, daemon: Option<Proc>, container: &Path) -> Probe {
        Probe {
            connection: fuse_connection(sshfs_target),
            daemon,
            container: container.to_path_buf(),
        }
    }

    pub fn sample(&self) -> Sample {
        let mut s = Sample {
            waiting: self
                .connection
                .as_ref()
                .and_then(|c| read_u64(&c.join("waiting")))
                .unwrap_or(0),
            ..Sample::default()
        };
        for dev in loopdev::devices_for(&self.container) {
            let name = dev.file_name().unwrap_or_default().to_os_string();
            let stat = Path::new("/sys/block").join(name).join("stat");
            if let Some((in_flight, completed)) = std::fs::read_to_string(stat)
                .ok()
                .and_then(|t| parse_block_stat(&t))
            {
                s.in_flight += in_flight;
                s.completed += completed;
            }
        }
        s
    }

    /// Fail every pending and later request of the connection: write its fusectl `abort`,
    /// then kill the recorded sshfs daemon (a killed sshfs aborts the connection too, when
    /// its /dev/fuse descriptor closes, so this also works without fusectl) and its ssh
    /// child. Returns what was done, for the log.
    pub fn abort(&self) -> Vec<String> {
        let mut done = Vec::new();
        if let Some(c) = &self.connection {
            match std::fs::write(c.join("abort"), "1") {
                Ok(()) => done.push(format!("aborted FUSE connection {}", c.display())),
                Err(e) => warn!("cannot abort FUSE connection {}: {e}", c.display()),
            }
        }
        if let Some(pid) = self.daemon.filter(|d| d.is_running()).map(|d| d.pid) {
            let children = children_of(pid);
            kill(pid, nix::sys::signal::Signal::SIGKILL);
            done.push(format!("killed sshfs (pid {pid})"));
            for c in children {
                kill(c, nix::sys::signal::Signal::SIGKILL);
                done.push(format!("killed its ssh (pid {c})"));
            }
        }
        done
    }
}

fn kill(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// Processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // The fields after the command name (which may hold spaces and parentheses).
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 2..].split(' ').nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            v.push(child);
        }
    }
    v
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// (in flight, completed) from a `/sys/block/X/stat` line (Documentation/block/stat.rst:
/// reads completed is field 1, writes 5, in_flight 9, discards 12, flushes 16; older
/// kernels have only the first 11 fields).
pub fn parse_block_stat(text: &str) -> Option<(u64, u64)> {
    let f: Vec<u64> = text
        .split_whitespace()
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if f.len() < 11 {
        return None;
    }
    let at = |i: usize| f.get(i - 1).copied().unwrap_or(0);
    Some((at(9), at(1) + at(5) + at(12) + at(16)))
}

/// The fusectl directory of the FUSE mount at `target`: named by the superblock's device
/// number in the kernel's encoding (major << 20 | minor), which for FUSE's anonymous devices
/// (major 0) is the minor of /proc/self/mountinfo's `major:minor`. Mounts fusectl first if
/// it is not mounted (it is a standard, harmless mount, so it is left in place).
pub fn fuse_connection(target: &Path) -> Option<PathBuf> {
    let (major, minor) = match mount::device_of(target) {
        Ok(Some(d)) => d,
        _ => return None,
    };
    let dir = Path::new(FUSECTL).join(((major << 20) | minor).to_string());
    if !dir.exists() {
        let mounted = mount::mounted_at(Path::new(FUSECTL))
            .ok()
            .flatten()
            .is_some_and(|m| m.fstype == "fusectl");
        if !mounted {
            let r = sys_mount::Mount::builder()
                .fstype("fusectl")
                .mount("fusectl", FUSECTL);
            if let Err(e) = r {
                warn!(
                    "cannot mount fusectl on {FUSECTL} ({e}): the I/O watchdog sees only the \
                     loop device and can abort a hung server only by killing sshfs"
                );
            }
        }
    }
    dir.exists().then_some(dir)
}

/// The running watchdog thread; stopped by [`Watchdog::stop`] or on drop.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Watch the sshfs mount at `sshfs_target` of `host` and the loop devices over
    /// `container`; give up on the server after `limit` without progress.
    pub fn start(
        host: &str,
        sshfs_target: &Path,
        daemon: Option<Proc>,
        container: &Path,
        limit: Duration,
    ) -> Watchdog {
        let probe = Probe::new(sshfs_target, daemon, container);
        debug!(
            "I/O watchdog on {} (connection {}), limit {} s",
            sshfs_target.display(),
            probe
                .connection
                .as_ref()
                .map(|c| c.display().to_string())
                .unwrap_or_else(|| "unknown".into()),
            limit.as_secs()
        );
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let host = host.to_string();
        let handle = std::thread::Builder::new()
            .name("io-watchdog".into())
            .spawn(move || watch(&probe, &host, limit, &flag))
            .map_err(|e| warn!("cannot start the I/O watchdog: {e}"))
            .ok();
        Watchdog { stop, handle }
    }

    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.halt();
    }
}

const TICK: Duration = Duration::from_secs(1);

fn watch(probe: &Probe, host: &str, limit: Duration, stop: &AtomicBool) {
    let t0 = Instant::now();
    let mut d = Detector::new(limit);
    let mut warned = false;
    while !stop.load(Ordering::SeqCst) {
        let s = probe.sample();
        match d.feed(t0.elapsed(), s) {
            Verdict::Idle | Verdict::Progress => warned = false,
            Verdict::Waiting(w) => {
                if !warned && w >= limit / 2 {
                    warned = true;
                    warn!(
                        "the server {host} has not answered file requests for {} s ({} pending); \
                         giving up after {} s",
                        w.as_secs(),
                        s.waiting.max(s.in_flight),
                        limit.as_secs()
                    );
                }
            }
            Verdict::Stalled(w) => {
                let msg = format!(
                    "the server {host} stopped answering file requests for {} s while its SSH \
                     connection stayed up (its storage may be hung); aborted the connection so \
                     that the blocked I/O fails. Check the server's disk and its sftp-server; the \
                     next run finishes any teardown left over",
                    w.as_secs(),
                );
                // The verdict first: the abort makes the blocked I/O fail at once, and the
                // main thread must find the reason when it looks.
                crate::signals::abort(msg.clone());
                let done = probe.abort();
                warn!(
                    "{msg} ({})",
                    if done.is_empty() {
                        "found nothing to abort".to_string()
                    } else {
                        done.join(", ")
                    }
                );
                return;
            }
        }
        // Sleep in short steps so that stop() returns promptly.
        let next = Instant::now() + TICK;
        while Instant::now() < next && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(waiting: u64, in_flight: u64, completed: u64) -> Sample {
        Sample {
            waiting,
            in_flight,
            completed,
        }
    }

    /// Feed one sample a second; return the verdicts.
    fn run(limit: u64, samples: &[Sample]) -> Vec<Verdict> {
        let mut d = Detector::new(Duration::from_secs(limit));
        samples
            .iter()
            .enumerate()
            .map(|(i, x)| d.feed(Duration::from_secs(i as u64), *x))
            .collect()
    }

    #[test]
    fn idle_is_never_a_stall() {
        let v = run(3, &[s(0, 0, 5); 10]);
        assert!(v.iter().all(|x| *x == Verdict::Idle), "{v:?}");
    }

    #[test]
    fn busy_with_completions_is_progress() {
        let samples: Vec<Sample> = (0..20).map(|i| s(4, 2, 100 + i)).collect();
        let v = run(3, &samples);
        assert!(v.iter().all(|x| *x == Verdict::Progress), "{v:?}");
    }

    #[test]
    fn pending_without_completions_stalls_after_the_limit() {
        // Working, then the server stops answering at t=2 with 3 requests pending.
        let v = run(
            3,
            &[
                s(1, 1, 10),
                s(2, 1, 11),
                s(3, 2, 12),
                s(3, 2, 12),
                s(3, 2, 12),
                s(3, 2, 12),
                s(3, 2, 12),
            ],
        );
        use Verdict::*;
        let sec = Duration::from_secs;
        assert_eq!(
            v,
            [
                Progress,
                Progress,
                Progress,
                Waiting(sec(1)),
                Waiting(sec(2)),
                Stalled(sec(3)),
                Stalled(sec(4))
            ]
        );
    }

    #[test]
    fn new_requests_piling_up_are_not_progress() {
        // More and more requests arrive; none completes.
        let samples: Vec<Sample> = (0..6).map(|i| s(1 + i, 1, 7)).collect();
        let v = run(3, &samples);
        let sec = Duration::from_secs;
        assert_eq!(
            v[1..3],
            [Verdict::Waiting(sec(1)), Verdict::Waiting(sec(2))]
        );
        assert_eq!(v[3], Verdict::Stalled(sec(3)));
    }

    #[test]
    fn one_completion_restarts_the_clock() {
        let v = run(
            3,
            &[
                s(2, 1, 5),
                s(2, 1, 5),
                s(2, 1, 5),
                s(2, 1, 6), // an answer, just in time
                s(2, 1, 6),
                s(2, 1, 6),
                s(2, 1, 6),
            ],
        );
        assert_eq!(v[3], Verdict::Progress);
        assert_eq!(v[5], Verdict::Waiting(Duration::from_secs(2)));
        assert_eq!(v[6], Verdict::Stalled(Duration::from_secs(3)));
    }

    #[test]
    fn going_idle_restarts_the_clock() {
        let v = run(
            2,
            &[
                s(1, 0, 0),
                s(1, 0, 0),
                s(0, 0, 0),
                s(1, 0, 0),
                s(1, 0, 0),
                s(1, 0, 0),
            ],
        );
        use Verdict::*;
        let sec = Duration::from_secs;
        assert_eq!(
            v,
            [
                Progress,
                Waiting(sec(1)),
                Idle,
                Progress,
                Waiting(sec(1)),
                Stalled(sec(2))
            ]
        );
    }

    #[test]
    fn fewer_pending_requests_count_as_progress() {
        // Requests outside the loop device (no completion counter) being answered.
        let v = run(
            2,
            &[s(5, 0, 0), s(4, 0, 0), s(3, 0, 0), s(3, 0, 0), s(3, 0, 0)],
        );
        use Verdict::*;
        assert_eq!(v[..3], [Progress, Progress, Progress]);
        assert_eq!(v[4], Stalled(Duration::from_secs(2)));
    }

    #[test]
    fn block_stat_fields() {
        // A 6.1 kernel's loop device: 17 fields.
        let t = "    1200 0 9600 300 800 0 6400 900 3 1500 1200 10 0 80 0 7 20\n";
        assert_eq!(parse_block_stat(t), Some((3, 1200 + 800 + 10 + 7)));
        // Older kernels: 11 fields, no discards or flushes.
        assert_eq!(parse_block_stat("5 0 40 1 6 0 48 2 1 3 3"), Some((1, 11)));
        assert_eq!(parse_block_stat("garbage"), None);
        assert_eq!(parse_block_stat("1 2 3"), None);
    }
}
