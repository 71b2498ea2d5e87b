//! The guest's half of litmus events that may sleep: a futex on a word of
//! the page every process shares, in the guest and under the VMM's
//! concurrency checker alike (the same code, over [`EventWord`]).
//!
//! A signal sets its event word, then asks the VMM to wake sleepers only
//! if it sees one counted in [`crate::bytecode::SLEEPERS_WORD`]. A waiter
//! that spun without seeing its event counts itself there, looks at the
//! word again and only then sleeps in the VMM, which looks at the word
//! once more under its lock before each wait. All four accesses are
//! sequentially consistent, so of a signaller and a waiter at least one
//! sees the other's write: either the waiter finds the word set, or the
//! signaller finds it counted and wakes it. No wake-up can be lost.

use core::sync::atomic::{AtomicU64, Ordering};

/// A shared 64-bit word as the protocol uses it.
pub trait EventWord {
    fn load(&self, order: Ordering) -> u64;
    fn store(&self, value: u64, order: Ordering);
    fn fetch_add(&self, value: u64, order: Ordering) -> u64;
    fn fetch_sub(&self, value: u64, order: Ordering) -> u64;
}

impl EventWord for AtomicU64 {
    fn load(&self, order: Ordering) -> u64 {
        AtomicU64::load(self, order)
    }
    fn store(&self, value: u64, order: Ordering) {
        AtomicU64::store(self, value, order)
    }
    fn fetch_add(&self, value: u64, order: Ordering) -> u64 {
        AtomicU64::fetch_add(self, value, order)
    }
    fn fetch_sub(&self, value: u64, order: Ordering) -> u64 {
        AtomicU64::fetch_sub(self, value, order)
    }
}

/// `signal`: sets `word`, then calls `wake` (the VMM's `WakeEvents`) if a
/// sleeper is counted in `sleepers`.
pub fn signal(word: &impl EventWord, sleepers: &impl EventWord, wake: impl FnOnce()) {
    word.store(1, Ordering::SeqCst);
    if sleepers.load(Ordering::SeqCst) != 0 {
        wake();
    }
}

/// `await` that may sleep: returns once `word` is set. Calls `spin` up to
/// `spins` times while looking at it, then sleeps by `sleep` (the VMM's
/// `AwaitEvent`, which returns once the word is set, or early: the loop
/// looks again) while counted in `sleepers`.
pub fn await_sleeping(
    word: &impl EventWord,
    sleepers: &impl EventWord,
    spins: u32,
    mut spin: impl FnMut(),
    mut sleep: impl FnMut(),
) {
    for _ in 0..spins {
        if word.load(Ordering::Acquire) != 0 {
            return;
        }
        spin();
    }
    while word.load(Ordering::Acquire) == 0 {
        sleepers.fetch_add(1, Ordering::SeqCst);
        if word.load(Ordering::SeqCst) == 0 {
            sleep();
        }
        sleepers.fetch_sub(1, Ordering::SeqCst);
    }
}
