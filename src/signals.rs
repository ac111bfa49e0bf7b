//! Signals set a flag; the work checks it between steps and while waiting on children.
//!
//! Nothing is done in the handler itself: unwinding from a handler would run teardown
//! concurrently with the step it interrupted. Instead SIGINT, SIGTERM and SIGHUP store their
//! number, every step boundary calls [`check`], and [`crate::cmd`] polls it while a child runs
//! so it can stop the child and return. The teardown itself is not interruptible: a second
//! signal during teardown is recorded and ignored (systemd's KillMode=mixed gives us the time).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::Failure;

static RECEIVED: AtomicUsize = AtomicUsize::new(0);

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

/// The signal received so far, if any.
pub fn pending() -> Option<&'static str> {
    match RECEIVED.load(Ordering::SeqCst) as i32 {
        0 => None,
        libc::SIGINT => Some("SIGINT"),
        libc::SIGTERM => Some("SIGTERM"),
        libc::SIGHUP => Some("SIGHUP"),
        _ => Some("signal"),
    }
}

/// Err(Interrupted) once a signal has arrived.
pub fn check() -> anyhow::Result<()> {
    match pending() {
        Some(s) => Err(Failure::Interrupted(s).into()),
        None => Ok(()),
    }
}
