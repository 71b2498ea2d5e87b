//! Which vCPU the current thread runs: the one owner of that fact.
//!
//! The vCPU threads declare their CPU once ([`set_current`]); the trace
//! recorder puts events on that CPU's track, the hooks filter and report by
//! it, and the mm notes it as a lock's holder. It sits below all of them
//! (it imports nothing from the crate), so none of them needs another to
//! learn it.

use std::cell::Cell;

thread_local! {
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The vCPU this thread runs, or `None` for the VMM's own threads.
pub fn current() -> Option<usize> {
    CURRENT.with(|c| c.get())
}

/// Declares that this thread runs vCPU `cpu` (`None`: no vCPU).
pub fn set_current(cpu: Option<usize>) {
    CURRENT.with(|c| c.set(cpu));
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_thread_has_its_own() {
        super::set_current(Some(3));
        let other = std::thread::spawn(super::current).join().unwrap();
        assert_eq!((super::current(), other), (Some(3), None));
        super::set_current(None);
    }
}
