//! Human-readable progress lines on stderr, with a verbosity set once by `-v`/`-q`.
//!
//! Lines carry a UTC time stamp because the tool mostly runs from cron or a timer whose
//! output lands in a mail or the journal, where "when" matters more than colour.

use std::sync::atomic::{AtomicI8, Ordering};

static LEVEL: AtomicI8 = AtomicI8::new(0);

/// -1 = quiet (warnings and errors), 0 = normal, 1 = verbose (commands run), 2 = debug.
pub fn set_level(level: i8) {
    LEVEL.store(level, Ordering::Relaxed);
}

pub fn level() -> i8 {
    LEVEL.load(Ordering::Relaxed)
}

pub fn emit(min: i8, tag: &str, msg: std::fmt::Arguments<'_>) {
    if level() >= min {
        let now = crate::snapid::SnapshotId::now();
        eprintln!("{now} {tag}{msg}");
    }
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
