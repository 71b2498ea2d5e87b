//! The synchronisation primitives of the mm model, in one place.
//!
//! The model is compiled twice: here, with `std`'s primitives, for the
//! VMM; and in the test build as [`crate::mm::check`]'s copy, whose `sync`
//! module exports the concurrency checker's (shuttle) instead, so that
//! every lock, atomic and explicit [`preempt`] point of the model is a
//! place where the checker may switch threads (docs/reliability.md).
//!
//! Guest-physical memory (PTEs, data) stays `std` atomics in both builds
//! ([`super::phys::Word`]): the KVM layer maps it onto guest memory. The
//! model marks its unlocked PTE accesses with [`preempt`] instead.

pub use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
pub use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A point where another thread may run first: nothing in the VMM; a
/// scheduling point under the checker.
#[inline(always)]
pub fn preempt() {}

/// Lets other threads run while this one spins.
pub fn yield_now() {
    std::thread::yield_now();
}
