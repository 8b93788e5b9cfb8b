//! A test aid: `CNNSERVE_CRASH_AT=<step>` kills the process (SIGKILL, as `kill -9`) when it reaches
//! that step of a state change, so that tests can check that a restart finds a consistent state
//! after a crash at each instant that matters. Unset, every call is one comparison.
//!
//! Steps: `upload` (a data set streamed to disk, no job yet), `staged` (a finished job's model
//! files written to its staging folder, the job not yet recorded), `committed` (the job recorded
//! as succeeded, its files still staged), `renamed` (the weights moved into the weights dir, the
//! metadata not yet), `published` (both moved and the model served, subscribers not yet told).

//!
//! `CNNSERVE_CRASH_AT=panic-<step>` panics instead, once, at a [`panic_point`]: `panic-forward`
//! (a model worker's forward pass).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

fn at() -> Option<&'static str> {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    AT.get_or_init(|| std::env::var("CNNSERVE_CRASH_AT").ok())
        .as_deref()
}

/// Panics here, the first time only, if `CNNSERVE_CRASH_AT` is `panic-<step>`.
pub fn panic_point(step: &str) {
    static DONE: AtomicBool = AtomicBool::new(false);
    if at().and_then(|a| a.strip_prefix("panic-")) == Some(step)
        && !DONE.swap(true, Ordering::SeqCst)
    {
        panic!("CNNSERVE_CRASH_AT: a panic at {step}");
    }
}

/// Dies here if `CNNSERVE_CRASH_AT` names `step`.
pub fn point(step: &str) {
    if at() == Some(step) {
        tracing::warn!(step, "CNNSERVE_CRASH_AT: killing the process here");
        // SAFETY: sending a signal to ourselves; SIGKILL ends the process at once.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
