//! The one lock-poisoning policy: a lock whose holder panicked is used as it was left.
//!
//! What vigil guards with a mutex is plain data (counters, queues, maps) that a panic can leave
//! at most one update short, never unreadable. Recovering the guard keeps the other threads
//! serving (the engine also catches a batch's panic and fails its prompts) instead of turning
//! one panic into a panic in every thread that touches the same lock.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Lock `m`, poisoned or not.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// [`Condvar::wait`], poisoned or not.
pub fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(PoisonError::into_inner)
}

/// [`Condvar::wait_timeout`] (whether it timed out is left to the caller's clock), poisoned or not.
pub fn wait_timeout<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>, timeout: Duration) -> MutexGuard<'a, T> {
    cv.wait_timeout(guard, timeout).unwrap_or_else(PoisonError::into_inner).0
}
