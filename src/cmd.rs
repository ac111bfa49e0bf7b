//! One way to run external programs: resolved from fixed directories, logged, interruptible,
//! and with errors that carry argv, exit status and the tail of stderr.
//!
//! cron and systemd give a minimal PATH, and a backup tool running as root must not pick up
//! an `rsync` from a writable directory, so programs are looked up only in the standard
//! system directories. No secret is ever passed in argv or the environment: keys go to
//! libcryptsetup in memory, and commands only ever see device paths.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::{debug, signals};

const SEARCH: &[&str] = &["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// Absolute path of a system program, or an error naming the package to install.
pub fn which(program: &str) -> Result<PathBuf> {
    for dir in SEARCH {
        let p = Path::new(dir).join(program);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "required program `{program}` not found in {} (install the Debian package {})",
        SEARCH.join(":"),
        package_for(program)
    )
}

fn package_for(program: &str) -> &'static str {
    match program {
        "sshfs" => "sshfs",
        "ssh" => "openssh-client",
        "rsync" => "rsync",
        "mkfs.ext4" | "e2fsck" | "resize2fs" | "dumpe2fs" | "tune2fs" => "e2fsprogs",
        "fusermount" | "fusermount3" => "fuse3",
        "nbd-client" => "nbd-client",
        "fstrim" => "util-linux",
        _ => "providing it",
    }
}

/// A command about to run.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: PathBuf,
    args: Vec<String>,
    /// Exit codes that are not failures (rsync 24 = vanished files, for instance).
    ok_codes: Vec<i32>,
    /// [`Cmd::run`] stops the child and fails after this long.
    limit: Option<Duration>,
    /// Variables added to the inherited environment.
    env: Vec<(String, String)>,
    /// The working directory (default: ours).
    dir: Option<PathBuf>,
}

/// How a command run by [`Cmd::run_in_group`] ended.
#[derive(Debug)]
pub enum Ended {
    Exited(std::process::ExitStatus),
    /// It ran past its time limit; its whole process group was killed.
    TimedOut,
}

/// What a finished command produced.
#[derive(Debug)]
pub struct Done {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Cmd {
    pub fn new(program: &str) -> Result<Cmd> {
        Ok(Cmd {
            program: which(program)?,
            args: Vec::new(),
            ok_codes: vec![0],
            limit: None,
            env: Vec::new(),
            dir: None,
        })
    }

    pub fn env(mut self, key: &str, value: impl Into<String>) -> Cmd {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Cmd {
        self.dir = Some(dir.into());
        self
    }

    pub fn arg(mut self, a: impl AsRef<std::ffi::OsStr>) -> Cmd {
        self.args.push(a.as_ref().to_string_lossy().into_owned());
        self
    }

    pub fn args<I, S>(mut self, it: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        for a in it {
            self = self.arg(a);
        }
        self
    }

    pub fn ok_codes(mut self, codes: &[i32]) -> Cmd {
        self.ok_codes = codes.to_vec();
        self
    }

    /// Give up on the child after `limit` (a wait on the server must be bounded).
    pub fn time_limit(mut self, limit: Duration) -> Cmd {
        self.limit = Some(limit);
        self
    }

    pub fn argv(&self) -> Vec<String> {
        let mut v = vec![self.program.display().to_string()];
        v.extend(self.args.iter().cloned());
        v
    }

    fn describe(&self) -> String {
        self.argv().join(" ")
    }

    /// `stderr`: the write end of [`stderr_reader`]'s pipe.
    fn expr(&self, stderr: std::io::PipeWriter) -> duct::Expression {
        self.expr_with_stdout(None, stderr)
    }

    /// `stdout`: a pipe to stream the child's output through, instead of capturing it.
    fn expr_with_stdout(
        &self,
        stdout: Option<std::io::PipeWriter>,
        stderr: std::io::PipeWriter,
    ) -> duct::Expression {
        let mut e = duct::cmd(&self.program, &self.args).stdin_null();
        for (k, v) in &self.env {
            e = e.env(k, v);
        }
        if let Some(d) = &self.dir {
            e = e.dir(d);
        }
        let e = match stdout {
            Some(w) => e.stdout_file(w),
            None => e.stdout_capture(),
        };
        e.stderr_file(stderr)
            .unchecked()
            .env("LC_ALL", "C")
            .before_spawn(|c| {
                use std::os::unix::process::CommandExt;
                // If e2ebackup is killed (even with SIGKILL), its children die with it:
                // an orphaned rsync would keep the filesystem busy and block the next run's
                // recovery. sshfs is unaffected: its daemon is a grandchild (prctl is not
                // inherited across fork).
                // SAFETY: prctl is async-signal-safe and touches no memory of ours.
                unsafe {
                    c.pre_exec(|| {
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                        Ok(())
                    });
                }
                Ok(())
            })
    }

    /// Run to completion without interruption (used by teardown, which must not be cut short).
    pub fn run_uninterruptible(&self) -> Result<Done> {
        debug!("$ {}", self.describe());
        let (w, stderr) = stderr_reader()?;
        let mut out = self
            .expr(w)
            .run()
            .with_context(|| format!("cannot start `{}`", self.describe()))?;
        out.stderr = stderr.join().unwrap_or_default();
        self.finish(out)
    }

    /// Run to completion; on SIGINT/SIGTERM/SIGHUP stop the child and return Interrupted.
    pub fn run(&self) -> Result<Done> {
        signals::check()?;
        debug!("$ {}", self.describe());
        let (w, stderr) = stderr_reader()?;
        let handle = self
            .expr(w)
            .start()
            .with_context(|| format!("cannot start `{}`", self.describe()))?;
        let started = Instant::now();
        let mut stderr = Some(stderr);
        loop {
            if let Some(out) = handle.wait_timeout(Duration::from_millis(100))? {
                let out = Output {
                    status: out.status,
                    stdout: out.stdout.clone(),
                    stderr: stderr
                        .take()
                        .and_then(|t| t.join().ok())
                        .unwrap_or_default(),
                };
                return self.finish(out);
            }
            if let Err(e) = signals::check() {
                stop(&handle);
                return Err(e.context(format!("while running `{}`", self.describe())));
            }
            if let Some(limit) = self.limit.filter(|l| started.elapsed() >= *l) {
                stop(&handle);
                bail!(
                    "`{}` did not finish within {} s; stopped it",
                    self.describe(),
                    limit.as_secs()
                );
            }
        }
    }

    /// Like [`Cmd::run`], handing each line (or `\r`-separated update) of the child's stdout
    /// to `on_line` as it arrives; lines it returns `true` for are kept in `Done::stdout`.
    pub fn run_streaming(&self, mut on_line: impl FnMut(&str) -> bool) -> Result<Done> {
        use std::io::Read;
        use std::os::fd::AsFd;
        signals::check()?;
        debug!("$ {}", self.describe());
        let (mut reader, writer) = std::io::pipe().context("creating a pipe")?;
        // Read without blocking, so the wait loop below keeps watching for signals.
        let fl = nix::fcntl::fcntl(reader.as_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let fl = nix::fcntl::OFlag::from_bits_truncate(fl) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(reader.as_fd(), nix::fcntl::FcntlArg::F_SETFL(fl))?;
        let (w, stderr) = stderr_reader()?;
        let expr = self.expr_with_stdout(Some(writer), w);
        let handle = expr
            .start()
            .with_context(|| format!("cannot start `{}`", self.describe()))?;
        // Our copies of the write ends must go, or the pipes never report end of file.
        drop(expr);
        let mut stderr = Some(stderr);
        let mut kept = String::new();
        let mut pending = Vec::new();
        let mut buf = [0u8; 16384];
        let mut drain = |pending: &mut Vec<u8>, kept: &mut String, eof: bool| {
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
                while let Some(i) = pending.iter().position(|b| *b == b'\n' || *b == b'\r') {
                    let line: Vec<u8> = pending.drain(..=i).collect();
                    let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                    if on_line(&line) {
                        kept.push_str(&line);
                        kept.push('\n');
                    }
                }
            }
            // After the loop, not inside it: an unterminated last line that an earlier
            // drain already read is still pending when this read finds end of file.
            if eof && !pending.is_empty() {
                let line = String::from_utf8_lossy(pending).into_owned();
                pending.clear();
                if on_line(&line) {
                    kept.push_str(&line);
                }
            }
        };
        loop {
            drain(&mut pending, &mut kept, false);
            if let Some(out) = handle.wait_timeout(Duration::from_millis(100))? {
                drain(&mut pending, &mut kept, true);
                let out = Output {
                    status: out.status,
                    stdout: kept.into_bytes(),
                    stderr: stderr
                        .take()
                        .and_then(|t| t.join().ok())
                        .unwrap_or_default(),
                };
                return self.finish(out);
            }
            if let Err(e) = signals::check() {
                stop(&handle);
                return Err(e.context(format!("while running `{}`", self.describe())));
            }
        }
    }

    fn finish(&self, out: Output) -> Result<Done> {
        let code = out.status.code().unwrap_or(-1);
        let done = Done {
            code,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        if self.ok_codes.contains(&code) {
            return Ok(done);
        }
        Err(anyhow!(
            "`{}` failed with {}: {}",
            self.describe(),
            match out.status.code() {
                Some(c) => format!("exit status {c}"),
                None => "a signal".to_string(),
            },
            tail(&done.stderr, 12)
        ))
    }
}

/// A process we started, known by its pid and its start time (clock ticks after boot,
/// field 22 of /proc/PID/stat), as recorded in the undo journal when we started it.
///
/// Never by argv: any local user can start a process whose argv[0] is "sshfs" and whose
/// arguments name our mount point (`exec -a sshfs sleep inf /run/e2ebackup/NAME/server`);
/// nobody can give a process our recorded pid and start time, since a pid is reused only
/// after its process has exited and been reaped, and the new one starts later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Proc {
    pub pid: u32,
    pub start: u64,
}

/// State letter and start time of `pid`, from /proc/PID/stat.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and ')'; fields resume after the last ')'.
    let mut rest = stat[stat.rfind(')')? + 2..].split(' ');
    let state = rest.next()?.chars().next()?;
    Some((state, rest.nth(18)?.parse().ok()?))
}

impl Proc {
    /// The process `pid` as it is now (None if there is none).
    pub fn of(pid: u32) -> Option<Proc> {
        proc_stat(pid).map(|(_, start)| Proc { pid, start })
    }

    /// Still running: same pid, same start time, not a zombie. A zombie that is our own
    /// child is reaped here (its pid would otherwise stay taken and look alive).
    pub fn is_running(&self) -> bool {
        match proc_stat(self.pid) {
            Some((state, start)) if start == self.start => {
                if state != 'Z' {
                    return true;
                }
                let _ = nix::sys::wait::waitpid(
                    nix::unistd::Pid::from_raw(self.pid as i32),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                );
                false
            }
            _ => false,
        }
    }

    /// Wait up to `timeout` for the process to exit; true if it has.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.is_running() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    }

    /// Ensure the process has exited: SIGTERM to its process group (it leads one: see
    /// [`Cmd::spawn_detached`]), then SIGKILL. A pid that now belongs to another process
    /// (another start time) is left alone.
    pub fn ensure_stopped(&self) -> Result<()> {
        use nix::sys::signal::{killpg, Signal};
        let pg = nix::unistd::Pid::from_raw(self.pid as i32);
        for sig in [Signal::SIGTERM, Signal::SIGKILL] {
            if !self.is_running() {
                return Ok(());
            }
            let _ = killpg(pg, sig);
            if self.wait_exit(Duration::from_secs(5)) {
                return Ok(());
            }
        }
        bail!("process {} did not exit after SIGKILL", self.pid)
    }
}

impl Cmd {
    /// Start the command detached: in a new session (so it leads its own process group and
    /// gets no terminal signals), with no parent-death signal (it must outlive us if we are
    /// killed, so the next command's recovery can still tear down in order), stdin from
    /// /dev/null. Returns its identity for the undo journal; the caller records it at once.
    pub fn spawn_detached(
        &self,
        stdout: std::process::Stdio,
        stderr: std::process::Stdio,
    ) -> Result<Proc> {
        use std::os::unix::process::CommandExt;
        signals::check()?;
        debug!("$ {} (detached)", self.describe());
        let mut c = std::process::Command::new(&self.program);
        c.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("LC_ALL", "C")
            .stdin(std::process::Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        // SAFETY: setsid is async-signal-safe and touches no memory of ours.
        unsafe {
            c.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = c
            .spawn()
            .with_context(|| format!("cannot start `{}`", self.describe()))?;
        // Not yet waited for, so even if it exited already its pid (a zombie) is still ours
        // and its start time readable. The Child handle is dropped without killing it.
        Proc::of(child.id())
            .ok_or_else(|| anyhow!("`{}` vanished right after it started", self.describe()))
    }
}

impl Cmd {
    /// Run a program of the administrator's (a hook): in its own process group, with stdin
    /// from /dev/null and its output on our stderr (so it lands in the same mail or journal
    /// as ours), killed with its whole group after `limit`, on SIGINT/SIGTERM/SIGHUP (then
    /// the error is `Interrupted`), and when it exits (whatever it left running goes with
    /// it). Its locale is left alone.
    pub fn run_in_group(&self, limit: Duration) -> Result<Ended> {
        use std::os::fd::AsFd;
        use std::os::unix::process::CommandExt;
        use std::process::Stdio;
        signals::check()?;
        debug!("$ {} (own process group)", self.describe());
        let stderr = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating stderr")?;
        let mut c = std::process::Command::new(&self.program);
        c.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(stderr.try_clone()?))
            .stderr(Stdio::from(stderr))
            .process_group(0);
        if let Some(d) = &self.dir {
            c.current_dir(d);
        }
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = c
            .spawn()
            .with_context(|| format!("cannot start `{}`", self.describe()))?;
        let group = nix::unistd::Pid::from_raw(child.id() as i32);
        let kill_group = || {
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        };
        let started = Instant::now();
        let ended = loop {
            if let Some(st) = child.try_wait()? {
                break Ended::Exited(st);
            }
            if let Err(e) = signals::check() {
                kill_group();
                let _ = child.wait();
                return Err(e);
            }
            if started.elapsed() >= limit {
                kill_group();
                let _ = child.wait();
                break Ended::TimedOut;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        kill_group();
        Ok(ended)
    }
}

/// The most of a child's error output that is kept; the rest is counted, not stored. rsync
/// prints a line for every file it cannot read, and a local user can make such files
/// without limit: root's backup must not run out of memory on them.
pub const STDERR_KEEP: usize = 4 << 20;

/// A pipe for a child's stderr, and the thread that reads it to its end, keeping the first
/// [`STDERR_KEEP`] bytes and then one line that says how many more there were (a line no
/// caller takes for anything but an error: [`crate::snapshots::complaints`] counts it among
/// the errors that fail a run). Join the thread once the child has exited.
fn stderr_reader() -> Result<(std::io::PipeWriter, std::thread::JoinHandle<Vec<u8>>)> {
    use std::io::Read;
    let (mut r, w) = std::io::pipe().context("creating a pipe")?;
    let t = std::thread::Builder::new()
        .name("stderr".into())
        .spawn(move || {
            let (mut kept, mut more) = (Vec::new(), 0u64);
            let mut buf = [0u8; 16384];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let room = STDERR_KEEP.saturating_sub(kept.len()).min(n);
                        kept.extend_from_slice(&buf[..room]);
                        more += (n - room) as u64;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            if more > 0 {
                kept.extend_from_slice(
                    format!("\n[e2ebackup: {more} more bytes of error output were not kept]\n")
                        .as_bytes(),
                );
            }
            kept
        })
        .context("starting the thread that reads a command's error output")?;
    Ok((w, t))
}

/// Stop a child gently (SIGTERM, so rsync can clean up its temp files), then for good.
fn stop(handle: &duct::Handle) {
    for pid in handle.pids() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = handle.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = handle.kill();
    let _ = handle.wait();
}

/// The last `n` non-empty lines of `s`, for error messages.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(n);
    let t = lines[start..].join("\n");
    if t.is_empty() {
        "(no error output)".into()
    } else {
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_output_is_kept_up_to_a_bound() {
        // 10 MB on stderr: the first STDERR_KEEP bytes are kept, the rest counted.
        let d = Cmd::new("sh")
            .unwrap()
            .args([
                "-c",
                "head -c 10000000 /dev/zero | tr '\\0' x >&2; echo out",
            ])
            .run()
            .unwrap();
        assert_eq!(d.stdout.trim(), "out");
        assert!(d.stderr.len() < STDERR_KEEP + 200, "{}", d.stderr.len());
        assert!(d.stderr.starts_with("xxxx"));
        let more = 10_000_000 - STDERR_KEEP;
        assert!(
            d.stderr.ends_with(&format!(
                "\n[e2ebackup: {more} more bytes of error output were not kept]\n"
            )),
            "{}",
            &d.stderr[d.stderr.len() - 100..]
        );
        // The same through the streaming and the uninterruptible runs.
        let sh = || {
            Cmd::new("sh")
                .unwrap()
                .args(["-c", "head -c 5000000 /dev/zero >&2"])
        };
        let d = sh().run_streaming(|_| true).unwrap();
        assert!(d
            .stderr
            .contains("more bytes of error output were not kept"));
        let d = sh().run_uninterruptible().unwrap();
        assert!(d
            .stderr
            .contains("more bytes of error output were not kept"));
        // A few lines are kept whole, with no note.
        let d = Cmd::new("sh")
            .unwrap()
            .args(["-c", "echo one >&2; echo two >&2"])
            .run()
            .unwrap();
        assert_eq!(d.stderr, "one\ntwo\n");
    }

    #[test]
    fn failure_names_the_command_and_stderr() {
        let err = Cmd::new("sh")
            .unwrap()
            .args(["-c", "echo boom >&2; exit 3"])
            .run()
            .unwrap_err()
            .to_string();
        assert!(err.contains("/sh -c"), "{err}");
        assert!(err.contains("exit status 3"), "{err}");
        assert!(err.contains("boom"), "{err}");
    }

    #[test]
    fn accepted_codes_are_not_errors() {
        let d = Cmd::new("sh")
            .unwrap()
            .args(["-c", "echo hi; exit 24"])
            .ok_codes(&[0, 24])
            .run()
            .unwrap();
        assert_eq!(d.code, 24);
        assert_eq!(d.stdout.trim(), "hi");
    }

    #[test]
    fn streamed_output_reaches_the_callback_as_it_comes() {
        let mut seen = Vec::new();
        let d = Cmd::new("sh")
            .unwrap()
            .args([
                "-c",
                "printf 'a 1%%\\rb 2%%\\nstats: 3\\n'; echo err >&2; printf tail",
            ])
            .run_streaming(|l| {
                seen.push(l.to_string());
                !l.contains('%')
            })
            .unwrap();
        assert_eq!(seen, ["a 1%", "b 2%", "stats: 3", "tail"]);
        assert_eq!(d.stdout, "stats: 3\ntail");
        assert_eq!(d.stderr.trim(), "err");
    }

    #[test]
    fn time_limit_stops_the_child() {
        let t = Instant::now();
        let e = Cmd::new("sleep")
            .unwrap()
            .arg("30")
            .time_limit(Duration::from_millis(300))
            .run()
            .unwrap_err()
            .to_string();
        assert!(e.contains("did not finish within 0 s"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_detached_process_is_known_by_pid_and_start_and_stopped() {
        let p = Cmd::new("sleep")
            .unwrap()
            .arg("30")
            .spawn_detached(std::process::Stdio::null(), std::process::Stdio::null())
            .unwrap();
        assert!(p.is_running());
        // Its own process group and session (setsid).
        assert_eq!(
            nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(p.pid as i32)))
                .unwrap()
                .as_raw() as u32,
            p.pid
        );
        // Another start time is another process: never signalled, reported not running.
        let other = Proc {
            pid: p.pid,
            start: p.start + 1,
        };
        assert!(!other.is_running());
        other.ensure_stopped().unwrap();
        assert!(p.is_running());
        p.ensure_stopped().unwrap();
        assert!(!p.is_running());
        assert!(Proc::of(p.pid).is_none(), "zombie not reaped");
    }

    #[test]
    fn missing_program_names_a_package() {
        let e = which("sshfs-does-not-exist").unwrap_err().to_string();
        assert!(e.contains("not found"), "{e}");
    }
}
