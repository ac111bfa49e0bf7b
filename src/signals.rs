//! Signals set a flag; the work checks it between steps and while waiting on children.
//!
//! Nothing is done in the handler itself: unwinding from a handler would run teardown
//! concurrently with the step it interrupted. Instead SIGINT, SIGTERM and SIGHUP store their
//! number, every step boundary calls [`check`], and [`crate::cmd`] polls it while a child runs
//! so it can stop the child and return. The teardown itself is not interruptible: a second
//! signal during teardown is recorded and ignored (systemd's KillMode=mixed gives us the time).
//!
//! The same flag carries the two time limits (issue 14): a command's overall deadline
//! (`server.run_timeout`, armed by the session) and a stall verdict of the I/O watchdog
//! ([`crate::watchdog`]). Either makes [`check`] fail with [`Failure::TimedOut`] (exit 1), so
//! the command unwinds exactly as on SIGTERM. [`disarm`] clears both once the teardown is
//! done, so the `failed` hook that reports the time-out is not cut short by it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::error::Failure;

static RECEIVED: AtomicUsize = AtomicUsize::new(0);

/// The overall deadline of the running command and the message to fail with past it.
static DEADLINE: Mutex<Option<(Instant, String)>> = Mutex::new(None);
/// Set by the watchdog when it gave up on the server: why.
static ABORTED: Mutex<Option<String>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Fail every later [`check`] after `at`, with `message`.
pub fn set_deadline(at: Instant, message: String) {
    *lock(&DEADLINE) = Some((at, message));
}

/// Make every later [`check`] fail with `reason` (the watchdog's verdict). The first reason
/// stays: it is the cause, later ones are consequences.
pub fn abort(reason: String) {
    lock(&ABORTED).get_or_insert(reason);
}

/// Clear the deadline and the watchdog's verdict (after the teardown). Signals stay.
pub fn disarm() {
    *lock(&DEADLINE) = None;
    *lock(&ABORTED) = None;
}

/// Why the command must stop for a time limit, if it must.
fn timed_out() -> Option<String> {
    if let Some(r) = lock(&ABORTED).clone() {
        return Some(r);
    }
    match &*lock(&DEADLINE) {
        Some((at, msg)) if Instant::now() >= *at => Some(msg.clone()),
        _ => None,
    }
}

/// Install the handlers. Idempotent enough: a second call registers again, harmlessly.
pub fn install() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        let flag = Arc::new(AtomicUsize::new(0));
        // SAFETY: the action only stores to an atomic, which is async-signal-safe.
        unsafe {
            signal_hook::low_level::register(sig, move || {
                RECEIVED.store(sig as usize, Ordering::SeqCst);
                flag.store(1, Ordering::SeqCst);
            })?;
        }
    }
    Ok(())
}

/// The signal received so far (or `time-out` for a time limit), if any.
pub fn pending() -> Option<&'static str> {
    match RECEIVED.load(Ordering::SeqCst) as i32 {
        0 if timed_out().is_some() => Some("time-out"),
        0 => None,
        libc::SIGINT => Some("SIGINT"),
        libc::SIGTERM => Some("SIGTERM"),
        libc::SIGHUP => Some("SIGHUP"),
        _ => Some("signal"),
    }
}

/// Err(Interrupted) once a signal has arrived; Err(TimedOut) past a time limit.
pub fn check() -> anyhow::Result<()> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => match timed_out() {
            Some(why) => Err(Failure::TimedOut(why).into()),
            None => Ok(()),
        },
        _ => Err(Failure::Interrupted(pending().unwrap_or("signal")).into()),
    }
}
