//! What other threads see of a vCPU, and the TLB shootdown protocol built
//! on it (docs/design.md §4).
//!
//! A remote flush: the initiator has already removed the target's shadow
//! entries (so the hardware forgot them); it then asks the target's own
//! hardware flush — the flush interrupt, whose guest handler reloads CR3 and
//! acknowledges — and waits for the acknowledgement, as `flush_tlb_multi()`
//! waits for its IPIs. A target that is not in guest mode (in the VMM,
//! perhaps waiting for a lock the initiator holds) cannot take an
//! interrupt: the initiator acknowledges for it and queues the hardware
//! flush for its next entry, as Linux avoids the same deadlock by spinning
//! with interrupts enabled.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use super::shared::Shared;
use crate::mm::CpuFlusher;
use crate::trace::Kind;

/// Requests other threads post to a vCPU (bits of its request word) before
/// kicking it.
pub mod request {
    /// End the thread (watchdog, VM teardown).
    pub const STOP: u32 = 1 << 0;
    /// Answer with `Event::Pong` (kick round-trip benchmark).
    pub const PING: u32 = 1 << 1;
    /// A TLB flush is waiting (see [`super::VcpuCtl::flush_req`]).
    pub const FLUSH: u32 = 1 << 2;
    /// Look at the control gate (a `stop` from the control socket).
    pub const PARK: u32 = 1 << 3;
}

/// How long an initiator sleeps between checks of an unacknowledged target.
const ACK_POLL: Duration = Duration::from_micros(200);

/// The shared state of one vCPU.
#[derive(Debug, Default)]
pub(crate) struct VcpuCtl {
    pub(crate) requests: AtomicU32,
    /// Between `KVM_RUN` entry and return.
    pub(crate) in_guest: AtomicBool,
    /// Flushes asked for, and the newest one acknowledged.
    pub(crate) flush_req: AtomicU64,
    pub(crate) flush_ack: AtomicU64,
    /// Make the guest reload CR3 before it runs again (a local flush, or a
    /// remote one acknowledged on its behalf).
    pub(crate) hw_flush: AtomicBool,
    /// The exit status once the thread ended (`u64::MAX`: not a clean exit).
    ended: Mutex<Option<u64>>,
    changed: Condvar,
}

impl VcpuCtl {
    /// Wakes threads waiting for an ack or for the end of this vCPU.
    pub(crate) fn notify(&self) {
        let _guard = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        self.changed.notify_all();
    }

    /// Records the thread's end with `status` and wakes its joiners.
    pub(crate) fn mark_ended(&self, status: u64) {
        *self.ended.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
        self.changed.notify_all();
    }

    /// Waits for the thread's end; its status.
    /// `None` if `give_up()` first (the waiter is being stopped).
    pub(crate) fn wait_ended(&self, give_up: impl Fn() -> bool) -> Option<u64> {
        let mut ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(status) = *ended {
                return Some(status);
            }
            if give_up() {
                return None;
            }
            ended = self
                .changed
                .wait_timeout(ended, Duration::from_millis(10))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Whether the thread ended.
    pub(crate) fn has_ended(&self) -> bool {
        self.ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Acknowledges flushes up to `generation` and wakes their initiators,
    /// if that acknowledges anything new. A vCPU's own (local) flush
    /// acknowledges nothing new: waking then only woke this vCPU's joiners
    /// (they share the condition variable), about 15 µs of every COW fault
    /// while another thread waited in `join` for this one.
    pub(crate) fn ack(&self, generation: u64) {
        if self.flush_ack.fetch_max(generation, Ordering::AcqRel) < generation {
            self.notify();
        }
    }

    /// Waits for the acknowledgement of flush `generation`, acknowledging
    /// it for the vCPU if it is not in guest mode, and kicking it again
    /// (`kick`) each time [`ACK_POLL`] passes without an answer: a vCPU
    /// that was in a stub, interrupts off, delivers on its next entry.
    ///
    /// The target wakes us at each of its exits (so that we can acknowledge
    /// for it while it is out of guest mode); such a wake-up is not a lost
    /// kick and must not kick again. It did once: each kick's exit woke the
    /// initiator, which kicked again, and the target re-entered only to be
    /// interrupted in the middle of its (emulated) flush stub: one
    /// shootdown of a vCPU spinning in `await` took up to 16 exits and
    /// ~0.9 ms (`cowlab run wp-copy-reuse-aba --trace`).
    fn wait_ack(&self, generation: u64, kick: impl Fn()) {
        let mut ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        let mut kicked = Instant::now();
        loop {
            if self.flush_ack.load(Ordering::Acquire) >= generation || ended.is_some() {
                return;
            }
            if !self.in_guest.load(Ordering::SeqCst) {
                self.hw_flush.store(true, Ordering::SeqCst);
                self.flush_ack.fetch_max(generation, Ordering::AcqRel);
                return;
            }
            let mut since = kicked.elapsed();
            if since >= ACK_POLL {
                kick();
                kicked = Instant::now();
                since = Duration::ZERO;
            }
            ended = self
                .changed
                .wait_timeout(ended, ACK_POLL - since)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The KVM layer's [`CpuFlusher`]: flush interrupts to vCPUs.
#[derive(Debug)]
pub(crate) struct KvmFlusher {
    pub(crate) shared: Weak<Shared>,
}

impl CpuFlusher for KvmFlusher {
    fn flush_cpu(&self, cpu: usize, initiator: Option<usize>) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let Some(ctl) = shared.ctl(cpu) else { return };
        if initiator == Some(cpu) {
            // A CPU's own flush is local: done before it re-enters the guest.
            ctl.hw_flush.store(true, Ordering::SeqCst);
            return;
        }
        if ctl.has_ended() {
            return;
        }
        let generation = ctl.flush_req.fetch_add(1, Ordering::AcqRel) + 1;
        let trace = shared.machine.hooks.trace.get();
        if let Some(t) = trace {
            t.emit(Kind::IpiSend, &[cpu as u64, generation], "");
        }
        if ctl.in_guest.load(Ordering::SeqCst) {
            shared.request(cpu, request::FLUSH);
        }
        ctl.wait_ack(generation, || {
            shared.request(cpu, request::FLUSH);
        });
        if let Some(t) = trace {
            // On the target's track, when the initiator sees the ack.
            t.emit_on(cpu as u16, Kind::IpiAck, &[cpu as u64, generation], "");
        }
    }
}
