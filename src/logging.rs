//! Human-readable progress lines on stderr, with a verbosity set once by `-v`/`-q`.
//!
//! Where the lines go depends on how the tool was started:
//! - under systemd (stderr is the journal stream named by `$JOURNAL_STREAM`): each line gets a
//!   `<N>` priority prefix and no time stamp, so `journalctl -p warning` works and the
//!   journal's own time is not doubled;
//! - unattended otherwise (cron: stderr is not a terminal): UTC-stamped lines on stderr (the
//!   cron mail) and the same messages to syslog (`/dev/log`, facility daemon), so the
//!   journal or /var/log/syslog has them even when nobody reads cron's mail;
//! - on a terminal: UTC-stamped lines on stderr, and a live progress line during rsync
//!   ([`crate::progress`]).
//!
//! The last lines are also kept in memory for the failure ping of a healthcheck.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicI8, Ordering};
use std::sync::{Mutex, OnceLock};

static LEVEL: AtomicI8 = AtomicI8::new(0);
static TAIL: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());
const TAIL_LINES: usize = 100;

/// -1 = quiet (warnings and errors), 0 = normal, 1 = verbose (commands run), 2 = debug.
pub fn set_level(level: i8) {
    LEVEL.store(level, Ordering::Relaxed);
}

pub fn level() -> i8 {
    LEVEL.load(Ordering::Relaxed)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Terminal,
    Journal,
    /// Not a terminal, not the journal: stderr plus syslog.
    Unattended,
}

/// Where stderr goes (decided once).
pub fn sink() -> Sink {
    static SINK: OnceLock<Sink> = OnceLock::new();
    *SINK.get_or_init(|| {
        if stderr_is_journal() {
            Sink::Journal
        } else if std::io::stderr().is_terminal() {
            Sink::Terminal
        } else {
            Sink::Unattended
        }
    })
}

/// systemd sets JOURNAL_STREAM=dev:inode of the stream it connected; it is only ours if
/// stderr is still that stream (not redirected by a wrapper script).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(meta.dev()) && ino.parse::<u64>().ok() == Some(meta.ino())
}

/// syslog(3) priority for a message of verbosity `min`.
fn priority(min: i8) -> libc::c_int {
    match min {
        i8::MIN..=-2 => libc::LOG_ERR,
        -1 => libc::LOG_WARNING,
        0 => libc::LOG_INFO,
        _ => libc::LOG_DEBUG,
    }
}

fn to_syslog(min: i8, line: &str) {
    static OPEN: OnceLock<bool> = OnceLock::new();
    let open = *OPEN.get_or_init(|| {
        if !std::path::Path::new("/dev/log").exists() {
            return false;
        }
        // SAFETY: the ident is a static C string, as openlog requires.
        unsafe { libc::openlog(c"e2ebackup".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
        true
    });
    if !open {
        return;
    }
    if let Ok(c) = std::ffi::CString::new(line.replace('\0', " ")) {
        // SAFETY: a constant format string and a valid C string argument.
        unsafe { libc::syslog(priority(min), c"%s".as_ptr(), c.as_ptr()) };
    }
}

pub fn emit(min: i8, tag: &str, msg: std::fmt::Arguments<'_>) {
    let text = format!("{tag}{msg}");
    if min <= 0 {
        let mut t = TAIL.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() == TAIL_LINES {
            t.pop_front();
        }
        t.push_back(format!("{} {text}", crate::snapid::SnapshotId::now()));
    }
    if level() < min {
        return;
    }
    clear_line();
    let mut err = std::io::stderr().lock();
    match sink() {
        Sink::Journal => {
            for l in text.lines() {
                let _ = writeln!(err, "<{}>{l}", priority(min));
            }
        }
        s => {
            let _ = writeln!(err, "{} {text}", crate::snapid::SnapshotId::now());
            if s == Sink::Unattended {
                to_syslog(min, &text);
            }
        }
    }
}

/// The last lines logged at normal verbosity or above (for a healthcheck's failure ping).
pub fn tail() -> String {
    let t = TAIL.lock().unwrap_or_else(|e| e.into_inner());
    t.iter().map(|l| format!("{l}\n")).collect()
}

#[macro_export]
macro_rules! info {
    ($($t:tt)*) => { $crate::logging::emit(0, "", format_args!($($t)*)) };
}
#[macro_export]
macro_rules! warn {
    ($($t:tt)*) => { $crate::logging::emit(-1, "WARNING: ", format_args!($($t)*)) };
}
#[macro_export]
macro_rules! debug {
    ($($t:tt)*) => { $crate::logging::emit(1, "  ", format_args!($($t)*)) };
}

/// Whether a live progress line is on the terminal (set by [`crate::progress`], which draws
/// it; cleared here before a log line is printed over it).
static LINE_SHOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Record that a live line is shown.
pub fn line_shown() {
    LINE_SHOWN.store(true, Ordering::Relaxed);
}

/// Erase the live line (before a log line is printed over it).
pub fn clear_line() {
    if LINE_SHOWN.swap(false, Ordering::Relaxed) {
        eprint!("\r\x1b[K");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines_only() {
        for i in 0..(TAIL_LINES + 5) {
            crate::info!("tail test line {i}");
        }
        let t = tail();
        assert!(
            t.contains(&format!("tail test line {}", TAIL_LINES + 4)),
            "{t}"
        );
        assert!(!t.contains("tail test line 4\n"), "{t}");
        assert!(t.lines().count() <= TAIL_LINES);
    }

    #[test]
    fn priorities_follow_verbosity() {
        assert_eq!(priority(-2), libc::LOG_ERR);
        assert_eq!(priority(-1), libc::LOG_WARNING);
        assert_eq!(priority(0), libc::LOG_INFO);
        assert_eq!(priority(1), libc::LOG_DEBUG);
    }
}
