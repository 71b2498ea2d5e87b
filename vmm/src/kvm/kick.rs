//! Kicking a vCPU out of `KVM_RUN`, as Firecracker does: a real-time signal
//! whose handler sets `immediate_exit` in the target thread's `kvm_run`, so a
//! kick that lands just before `KVM_RUN` is not lost.

use std::cell::Cell;
use std::sync::Once;

use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::Error;

/// Offset from `SIGRTMIN` of the kick signal.
const KICK_SIGNAL_OFFSET: c_int = 0;

thread_local! {
    /// `&kvm_run.immediate_exit` of the vCPU this thread runs, or null.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal number.
pub fn kick_signal() -> c_int {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn handle_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    let ptr = IMMEDIATE_EXIT.with(Cell::get);
    if !ptr.is_null() {
        // SAFETY: the pointer was set by this thread to a field of its own
        // mapped `kvm_run` and is cleared before that mapping goes away; a
        // volatile byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(ptr, 1) };
    }
}

/// Installs the kick handler (once per process).
pub fn install_handler() -> Result<(), Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), handle_kick).map_err(Error::KickHandler);
    });
    result
}

/// Registers `ptr` (this thread's `kvm_run.immediate_exit`) for the handler;
/// the guard unregisters it.
pub fn register_immediate_exit(ptr: *mut u8) -> ImmediateExitGuard {
    IMMEDIATE_EXIT.with(|c| c.set(ptr));
    ImmediateExitGuard(())
}

/// Clears the registration on drop, before the `kvm_run` mapping is unmapped.
#[must_use]
pub struct ImmediateExitGuard(());

impl Drop for ImmediateExitGuard {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }
}
