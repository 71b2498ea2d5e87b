//! The state a VM shares with its vCPU threads ([`Shared`]): the KVM VM
//! fd, guest memory, the address spaces, the vCPU slots and the event
//! channel; starting a vCPU thread, and noting a vCPU thread's panic.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;

use vmm_sys_util::signal::Killable;

use cowlab_abi::layout::MAX_VCPUS;
use cowlab_abi::{BootHeader, Program};

use super::error::SpawnError;
use super::loader::Image;
use super::memory::GuestMem;
use super::report::{Outcome, VcpuReport};
use super::shell::Shell;
use super::shootdown::{request, VcpuCtl};
use super::vcpu::{Start, Vcpu};
use super::vm::Event;
use super::{kick, Gate};
use crate::mm::{Machine, Mm};

pub(super) struct VcpuSlot {
    pub(super) ctl: Arc<VcpuCtl>,
    pub(super) thread: JoinHandle<()>,
}

/// State shared by the VM and all its vCPU threads.
pub(crate) struct Shared {
    /// The KVM VM and its vCPU fds, which may outlive this run.
    pub(crate) shell: Arc<Shell>,
    pub(crate) mem: Arc<GuestMem>,
    pub(crate) machine: Arc<Machine>,
    /// The address spaces (processes), alive until the run ends.
    pub(super) processes: Mutex<Vec<Arc<Mm>>>,
    pub(crate) image: Image,
    pub(crate) boot_header: BootHeader,
    pub(crate) nr_vcpus: usize,
    pub(crate) record_faults: bool,
    pub(crate) check: bool,
    /// Guest hook point names (`guest:NAME`) by id, from the litmus test.
    pub(super) hook_names: Vec<String>,
    /// Stops vCPUs from outside (the control socket).
    pub(crate) gate: Option<Arc<Gate>>,
    pub(super) vcpus: Mutex<Vec<VcpuSlot>>,
    pub(super) events: Mutex<Sender<Event>>,
    /// vCPUs whose thread panicked, with the message and where (noted by
    /// the panic hook before the thread unwinds).
    pub(super) panics: Mutex<BTreeMap<usize, String>>,
    /// Threads asleep in a litmus `await` ([`Hypercall::AwaitEvent`]).
    ///
    /// [`Hypercall::AwaitEvent`]: cowlab_abi::Hypercall::AwaitEvent
    pub(super) event_sleep: crate::mm::event_sleep::EventSleep,
}

impl Shared {
    /// Whether the control socket holds a vCPU (parked by `stop`, or at a
    /// `pause` rule it can `cont`): such a wait is neither a hang nor a
    /// deadlock. A stop asked for a vCPU that is not parked holds nothing.
    pub(super) fn held_from_outside(&self) -> bool {
        self.gate
            .as_ref()
            .is_some_and(|g| !g.parked().is_empty() || !self.machine.hooks.paused().is_empty())
    }

    pub(crate) fn events(&self) -> Sender<Event> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn slots(&self) -> MutexGuard<'_, Vec<VcpuSlot>> {
        self.vcpus.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any vCPU thread panicked.
    pub(super) fn any_panic(&self) -> bool {
        !lock(&self.panics).is_empty()
    }

    /// Why vCPU `id`'s thread panicked, if it did.
    pub(super) fn panic_of(&self, id: usize) -> Option<String> {
        lock(&self.panics).get(&id).cloned()
    }

    /// After a vCPU thread panicked, the address spaces may be half
    /// changed: they are not checked, only torn down (the locks the panic
    /// poisoned are taken over by the mm's lock helpers), under
    /// `catch_unwind`, so that a teardown that trips on the damage leaks
    /// what is left instead of aborting the command. Returns whether a
    /// vCPU had panicked.
    pub(super) fn release_processes_if_panicked(&self) -> bool {
        if lock(&self.panics).is_empty() {
            return false;
        }
        let processes = std::mem::take(&mut *lock(&self.processes));
        let _ = std::panic::catch_unwind(AssertUnwindSafe(move || drop(processes)));
        true
    }

    /// Starts a new vCPU running `program(arg)` as a thread of `mm`, from
    /// any thread, while the others run. Returns its id.
    pub(crate) fn spawn(
        this: &Arc<Self>,
        program: Program,
        start: Start,
        mm: Arc<Mm>,
    ) -> Result<usize, SpawnError> {
        let mut slots = this.slots();
        let id = slots.len();
        if id >= MAX_VCPUS {
            return Err(SpawnError::TooMany(MAX_VCPUS));
        }
        let parent = current_vcpu();
        let events = this.events();
        // Sent before the thread exists, so the controller counts it as live
        // before it can see this vCPU (or its parent) end.
        let _ = events.send(Event::Spawned {
            id,
            program,
            parent,
        });
        this.machine.hooks.vcpu_spawning(id);
        let ctl = Arc::new(VcpuCtl::default());
        // A vCPU forked while the VM is being stopped (a fork that a delay
        // held past the watchdog) is stopped before it first enters the
        // guest: whoever stops the VM sets `stopping` first and then stops
        // every slot, so under the slots lock either it sees this one or
        // this one sees `stopping`.
        if this.machine.stopping() {
            ctl.requests.fetch_or(request::STOP, Ordering::AcqRel);
        }
        // The new thread holds the mm from now: a sibling that exits before
        // it starts must not tear the address space down under it (clone()
        // takes the reference in the parent, in copy_mm()). Only the vCPU
        // keeps a strong pointer, so the mm is gone when the thread reports
        // its end.
        mm.mmget();
        let weak_mm = Arc::downgrade(&mm);
        let unspawned_mm = Arc::downgrade(&mm);
        let (shared, thread_ctl) = (Arc::clone(this), Arc::clone(&ctl));
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                VCPU_SHARED.with(|s| *s.borrow_mut() = Arc::downgrade(&shared));
                crate::cpu::set_current(Some(id));
                shared.machine.hooks.thread_started(id);
                let vcpu_ctl = Arc::clone(&thread_ctl);
                let vcpu_shared = Arc::clone(&shared);
                let ran = std::panic::catch_unwind(AssertUnwindSafe(move || {
                    match Vcpu::new(vcpu_shared, id, program, start, mm, vcpu_ctl) {
                        Ok(vcpu) => vcpu.run(),
                        Err(e) => {
                            if let Some(mm) = weak_mm.upgrade() {
                                mm.mmput();
                            }
                            VcpuReport::failed(id, program, Outcome::Error(e.to_string()))
                        }
                    }
                }));
                // A panic (a bug in the VMM or the mm model, or a `panic`
                // rule) ends this vCPU in an error, like any VMM error, and
                // the process goes on. The locks it held were released as
                // it unwound (poisoned), and its address space may be half
                // changed: the VM is not torn down (see `teardown`).
                let report = ran.unwrap_or_else(|payload| {
                    thread_ctl.in_guest.store(false, Ordering::SeqCst);
                    let why = shared
                        .panic_of(id)
                        .unwrap_or_else(|| payload_text(&*payload));
                    VcpuReport::failed(id, program, Outcome::Error(format!("panicked: {why}")))
                });
                thread_ctl.mark_ended(report.join_status());
                shared.machine.hooks.set_ended(id);
                let _ = events.send(Event::Ended(Box::new(report)));
            })
            .map_err(|e| {
                if let Some(mm) = unspawned_mm.upgrade() {
                    mm.mmput();
                }
                SpawnError::Thread(e)
            })?;
        slots.push(VcpuSlot { ctl, thread });
        Ok(id)
    }

    /// The injection point of guest hook `id`.
    pub(crate) fn hook_name(&self, id: u64) -> String {
        match self.hook_names.get(id as usize) {
            Some(n) => format!("guest:{n}"),
            None => format!("guest:{id}"),
        }
    }

    /// Event word `word` as a report names it: by the litmus event it is
    /// (from the hook before its `await`), else by number.
    pub(crate) fn event_name(&self, word: u64) -> String {
        self.hook_names
            .iter()
            .find(|n| crate::hooks::await_word(&format!("guest:{n}")) == Some(word))
            .and_then(|n| n.rsplit(':').next())
            .map_or_else(|| format!("event word {word}"), |e| format!("event {e}"))
    }

    /// Registers a new address space (a forked child).
    pub(crate) fn add_process(&self, mm: Arc<Mm>) {
        self.processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(mm);
    }

    /// The shared state of vCPU `id`.
    pub(crate) fn ctl(&self, id: usize) -> Option<Arc<VcpuCtl>> {
        self.slots().get(id).map(|s| Arc::clone(&s.ctl))
    }

    /// Ends the run: every vCPU is stopped and every waiter goes free.
    ///
    /// In this order: `stopping` first (a vCPU forked from now on starts
    /// stopped, see [`Self::spawn`]), then `STOP` to every slot (not only
    /// the live ones seen so far: a vCPU being forked now is not among
    /// them yet), and only then the hooks' waiters are let go. Released
    /// first, a thread held by a rule could finish its program before its
    /// `STOP` was posted and end as if no watchdog had fired.
    pub(super) fn stop_all(&self) {
        self.machine.stop_sleepers();
        let count = self.slots().len();
        for id in 0..count {
            self.request(id, request::STOP);
        }
        self.machine.hooks.release_all();
    }

    /// Posts `bits` to vCPU `id` and kicks it out of `KVM_RUN` (the kick
    /// signal, see [`super::kick`]). False if there is no such vCPU.
    pub(crate) fn request(&self, id: usize, bits: u32) -> bool {
        let slots = self.slots();
        let Some(slot) = slots.get(id) else {
            return false;
        };
        slot.ctl.requests.fetch_or(bits, Ordering::AcqRel);
        // A thread that already ended cannot be signalled; nothing to do then.
        let _ = slot.thread.kill(kick::kick_signal());
        true
    }
}

thread_local! {
    /// The VM of this vCPU thread, for the panic hook.
    static VCPU_SHARED: std::cell::RefCell<Weak<Shared>> = const { std::cell::RefCell::new(Weak::new()) };
}

/// Installs (once per process) a panic hook that notes a vCPU thread's
/// panic, with where it happened, in its VM before the thread unwinds (so
/// the run's report has it even if the unwinding blocks), instead of
/// printing it. Other threads' panics, and every panic with
/// `RUST_BACKTRACE` set, go to the previous hook as well.
pub(super) fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(id) = current_vcpu() {
                let mut why = payload_text(info.payload());
                if let Some(l) = info.location() {
                    why += &format!(" (at {}:{})", l.file(), l.line());
                }
                if let Some(shared) = VCPU_SHARED.with(|s| s.borrow().upgrade()) {
                    lock(&shared.panics).entry(id).or_insert(why);
                }
                if std::env::var_os("RUST_BACKTRACE").is_none() {
                    return;
                }
            }
            previous(info);
        }));
    });
}

/// A panic's message.
pub(super) fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The vCPU this thread runs, if it is a vCPU thread: [`crate::cpu`],
/// the one owner of that fact, set when the thread starts.
pub(super) fn current_vcpu() -> Option<usize> {
    crate::cpu::current()
}
