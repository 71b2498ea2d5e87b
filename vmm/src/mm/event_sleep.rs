//! The VMM's half of litmus events that may sleep (`cowlab_abi::event` has
//! the guest's half and the protocol): where a vCPU thread sleeps until a
//! shared event word is set. Not Linux's memory manager, but kept beside
//! it so that the concurrency checker compiles it with its own primitives
//! and runs it against the guest's half (`check/races.rs`).

use std::time::Duration;

use super::sync::{Condvar, Mutex};

/// Sleepers on shared event words, woken together.
#[derive(Debug, Default)]
pub struct EventSleep {
    lock: Mutex<()>,
    woken: Condvar,
}

impl EventSleep {
    /// How long a sleeper waits before it looks again unwoken: only for
    /// being stopped (the watchdog, a teardown), which does not wake it.
    pub const POLL: Duration = Duration::from_millis(5);

    /// Sleeps until `set()` (looked at under the lock before every wait,
    /// so a [`EventSleep::wake`] after the word was set cannot be missed)
    /// or `give_up()`. `poll`: wake up that often to ask `give_up` again;
    /// `None` waits for a wake-up only (the checker, where a lost wake-up
    /// must show as a deadlock).
    pub fn sleep_until(
        &self,
        set: impl Fn() -> bool,
        give_up: impl Fn() -> bool,
        poll: Option<Duration>,
    ) {
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        while !set() && !give_up() {
            guard = match poll {
                Some(p) => {
                    self.woken
                        .wait_timeout(guard, p)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.woken.wait(guard).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }

    /// Wakes every sleeper to look at its word again.
    pub fn wake(&self) {
        drop(self.lock.lock().unwrap_or_else(|e| e.into_inner()));
        self.woken.notify_all();
    }
}
