//! The checker's primitives for the model's copy in [`super`]: shuttle's
//! locks, condition variable and atomics; [`preempt`] and [`yield_now`]
//! are scheduling points.

pub use shuttle::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
pub use shuttle::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A scheduling point: the checker may run another thread here.
pub fn preempt() {
    shuttle::thread::yield_now();
}

/// Lets other threads run while this one spins.
pub fn yield_now() {
    shuttle::thread::yield_now();
}
