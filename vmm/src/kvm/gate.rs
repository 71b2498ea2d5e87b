//! Stopping and resuming vCPUs from outside the guest: the control
//! socket's `stop` / `cont`, and `--wait`. A stopped vCPU parks in its
//! thread outside `KVM_RUN`, where TLB flush initiators acknowledge for it
//! (as for any thread not in guest mode), so stopping one vCPU never
//! blocks the others' shootdowns.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How often a parked vCPU checks whether its VM is being torn down.
const PARK_POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Default)]
struct State {
    /// The whole VM is stopped.
    all: bool,
    /// These vCPUs are stopped.
    cpus: BTreeSet<usize>,
    /// These vCPUs were continued on their own while the VM is stopped.
    exempt: BTreeSet<usize>,
    /// vCPUs parked right now.
    parked: BTreeSet<usize>,
    /// `quit`: no vCPU of any VM behind this gate enters the guest again,
    /// whatever `cont` says; parked ones leave the park to end.
    quit: bool,
}

/// Which vCPUs must stay out of the guest.
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<State>,
    changed: Condvar,
    /// `State::quit`, readable without the lock on every guest entry.
    quitting: AtomicBool,
}

impl Gate {
    /// A gate that starts with the whole VM stopped if `stopped` (`--wait`).
    pub fn new(stopped: bool) -> Self {
        let gate = Gate::default();
        gate.lock().all = stopped;
        gate
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops vCPU `cpu`, or the whole VM.
    pub fn stop(&self, cpu: Option<usize>) {
        let mut s = self.lock();
        match cpu {
            Some(c) => {
                s.cpus.insert(c);
                s.exempt.remove(&c);
            }
            None => {
                s.all = true;
                s.exempt.clear();
            }
        }
    }

    /// Lets vCPU `cpu` run again (even while the VM is stopped), or every
    /// vCPU (clearing per-vCPU stops too).
    pub fn cont(&self, cpu: Option<usize>) {
        let mut s = self.lock();
        match cpu {
            Some(c) => {
                s.cpus.remove(&c);
                s.exempt.insert(c);
            }
            None => {
                s.all = false;
                s.cpus.clear();
                s.exempt.clear();
            }
        }
        drop(s);
        self.changed.notify_all();
    }

    /// `quit`: from now on every vCPU behind this gate ends at its next
    /// look at the gate ([`Gate::quitting`]) instead of entering the guest,
    /// and parked ones are woken to end. Never undone.
    pub fn quit(&self) {
        let mut s = self.lock();
        s.quit = true;
        self.quitting.store(true, Ordering::SeqCst);
        drop(s);
        self.changed.notify_all();
    }

    /// Whether `quit` was asked: a vCPU must end rather than enter the guest.
    pub fn quitting(&self) -> bool {
        self.quitting.load(Ordering::SeqCst)
    }

    fn stopped_in(s: &State, cpu: usize) -> bool {
        (s.all && !s.exempt.contains(&cpu)) || s.cpus.contains(&cpu)
    }

    /// Whether vCPU `cpu` must stay out of the guest.
    pub fn is_stopped(&self, cpu: usize) -> bool {
        Self::stopped_in(&self.lock(), cpu)
    }

    /// Whether anything is stopped (the run's watchdog and schedule stall
    /// detection do not count such time).
    pub fn any_stopped(&self) -> bool {
        let s = self.lock();
        s.all || !s.cpus.is_empty()
    }

    /// Whether the whole VM is stopped.
    pub fn all_stopped(&self) -> bool {
        self.lock().all
    }

    /// The vCPUs parked right now.
    pub fn parked(&self) -> BTreeSet<usize> {
        self.lock().parked.clone()
    }

    /// Parks the calling vCPU thread while `cpu` is stopped, or until
    /// `give_up()` (the VM is ending) or `quit`. `on_change(true)` runs when
    /// it parks and `on_change(false)` when it leaves. Returns whether it
    /// parked.
    pub fn park(
        &self,
        cpu: usize,
        give_up: impl Fn() -> bool,
        mut on_change: impl FnMut(bool),
    ) -> bool {
        let mut s = self.lock();
        if !Self::stopped_in(&s, cpu) || s.quit || give_up() {
            return false;
        }
        s.parked.insert(cpu);
        drop(s);
        on_change(true);
        let mut s = self.lock();
        while Self::stopped_in(&s, cpu) && !s.quit && !give_up() {
            s = self
                .changed
                .wait_timeout(s, PARK_POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        s.parked.remove(&cpu);
        drop(s);
        on_change(false);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_stopped_cpu_parks_until_continued_and_others_pass() {
        let gate = Arc::new(Gate::new(false));
        gate.stop(Some(1));
        assert!(!gate.park(0, || false, |_| {}));
        let g = Arc::clone(&gate);
        let t = std::thread::spawn(move || g.park(1, || false, |_| {}));
        while gate.parked().is_empty() {
            std::thread::yield_now();
        }
        assert!(gate.parked().contains(&1));
        gate.cont(Some(1));
        assert!(t.join().unwrap());
        assert!(gate.parked().is_empty());
    }

    #[test]
    fn a_whole_vm_stop_releases_on_give_up() {
        let gate = Arc::new(Gate::new(true));
        assert!(gate.all_stopped());
        let ending = Arc::new(AtomicBool::new(false));
        let (g, e) = (Arc::clone(&gate), Arc::clone(&ending));
        let t = std::thread::spawn(move || g.park(3, || e.load(Ordering::Acquire), |_| {}));
        while gate.parked().is_empty() {
            std::thread::yield_now();
        }
        ending.store(true, Ordering::Release);
        assert!(t.join().unwrap());
        assert!(gate.all_stopped(), "giving up does not continue the VM");
    }

    #[test]
    fn quit_wakes_the_parked_and_no_cont_undoes_it() {
        let gate = Arc::new(Gate::new(true));
        let g = Arc::clone(&gate);
        let t = std::thread::spawn(move || g.park(0, || false, |_| {}));
        while gate.parked().is_empty() {
            std::thread::yield_now();
        }
        gate.quit();
        assert!(t.join().unwrap(), "woken by quit");
        gate.cont(None);
        assert!(gate.quitting(), "cont does not undo quit");
        assert!(!gate.park(1, || false, |_| {}), "nothing parks after quit");
    }

    #[test]
    fn one_cpu_can_run_while_the_vm_is_stopped() {
        let gate = Gate::new(true);
        gate.cont(Some(0));
        assert!(!gate.is_stopped(0));
        assert!(gate.is_stopped(1));
        gate.stop(Some(0));
        assert!(gate.is_stopped(0));
        gate.cont(None);
        assert!(!gate.is_stopped(0) && !gate.is_stopped(1));
        assert!(!gate.any_stopped());
    }
}
