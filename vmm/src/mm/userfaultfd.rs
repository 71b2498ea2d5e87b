//! userfaultfd write-protect: registration, protect / unprotect with a
//! deferred TLB flush, and wp faults handed to a handler thread. Models
//! mm/userfaultfd.c (mwriteprotect_range) and fs/userfaultfd.c
//! (handle_userfault, the read() of events).

use super::swapfile::{is_swap_pte, PTE_SWP_UFFD_WP};
use super::sync::{Condvar, Mutex, MutexGuard, Ordering};
use std::collections::VecDeque;

use cowlab_abi::layout::PAGE_SIZE;

use super::fault::FaultError;
use super::memory::PTE_UFFD_WP;
use super::mm_struct::Mm;
use super::mmap::MmError;
use super::pagetable::{self, bits};
use crate::hooks::Point;

/// How often a thread sleeping in userfaultfd checks whether the VM is
/// stopping it.
const STOP_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// The userfaultfd context of an mm: pending wp-fault events.
#[derive(Debug, Default)]
pub struct Uffd {
    /// Faulting pages not yet read by the handler.
    events: Mutex<VecDeque<u64>>,
    /// Signalled when an event arrives or a page is unprotected.
    changed: Condvar,
}

impl Mm {
    /// Registers `[addr, addr + len)` (mapped) for write-protect faults.
    /// Models fs/userfaultfd.c:userfaultfd_register() with
    /// UFFDIO_REGISTER_MODE_WP.
    pub fn uffd_register(&self, addr: u64, len: u64) -> Result<(), MmError> {
        let (start, end) = super::mmap::page_range(addr, len)?;
        let _mmap = self.mmap_write_lock();
        if !self.covered(start, end) {
            return Err(MmError::NoMem);
        }
        self.replace_vmas(start, end, |v| Some((v.prot, true)));
        Ok(())
    }

    /// Write-protects (`protect`) or unprotects `[addr, addr + len)`, under
    /// `mmap_lock` held for read: `tlb_flush_pending` goes up before the
    /// PTEs change and down after the one flush at the end, so until then
    /// other CPUs may keep writable entries. Unprotecting wakes the threads
    /// waiting on those pages. Models mm/userfaultfd.c:mwriteprotect_range().
    ///
    /// Lock contract: takes `mmap_lock` for read, and the PTL for the PTE
    /// changes; the flush runs without the PTL.
    pub fn mwriteprotect_range(
        &self,
        addr: u64,
        len: u64,
        protect: bool,
        cpu: Option<usize>,
    ) -> Result<(), MmError> {
        let (start, end) = super::mmap::page_range(addr, len)?;
        let m = &self.m;
        let _mmap = self.mmap_read_lock();
        if !self.covered(start, end) || self.vmas_in(start, end).iter().any(|v| !v.uffd_wp()) {
            return Err(MmError::NoMem);
        }
        self.inc_tlb_flush_pending();
        {
            let ptl = self.ptl();
            pagetable::for_each_leaf(&*m.mem, self.pgd, start, end, &mut |va, slot| {
                let pte = slot.load(Ordering::Acquire);
                if is_swap_pte(pte) {
                    // The marker travels with the swap entry
                    // (pte_swp_mkuffd_wp()), restored at swap-in.
                    let new = if protect {
                        pte | PTE_SWP_UFFD_WP
                    } else {
                        pte & !PTE_SWP_UFFD_WP
                    };
                    self.set_pte(&ptl, va, slot, new);
                    return;
                }
                if pte & bits::PRESENT == 0 {
                    return;
                }
                let new = if protect {
                    (pte & !bits::WRITABLE) | PTE_UFFD_WP
                } else {
                    pte & !PTE_UFFD_WP
                };
                self.set_pte(&ptl, va, slot, new);
            });
        }
        let _ = m.hooks.at(Point::UffdAfterWrprotect, cpu, Some(start));
        if protect {
            self.flush_tlb_range(start, end, cpu);
        }
        self.dec_tlb_flush_pending();
        if !protect {
            self.uffd_wake();
        }
        Ok(())
    }

    /// Wakes every thread waiting in [`Mm::handle_userfault`] to look at
    /// its PTE again: after an unprotect (UFFDIO_WRITEPROTECT wakes the
    /// range), and after a zap, whose UFFD_EVENT_REMOVE / UNMAP a handler
    /// answers with UFFDIO_WAKE (fs/userfaultfd.c:userfaultfd_remove()).
    /// Under the events lock: a waiter checks its PTE and goes to sleep
    /// under it, so a wake-up cannot fall between the two (as
    /// handle_userfault() sets its task state before the last check).
    pub(crate) fn uffd_wake(&self) {
        let _events = self.uffd.events.lock().unwrap_or_else(|e| e.into_inner());
        self.uffd.changed.notify_all();
    }

    /// Hands the wp fault at `page` to the handler and waits, with no lock
    /// held, until the page is no longer write-protected or the VM stops
    /// the thread. Models fs/userfaultfd.c:handle_userfault() (VM_FAULT_RETRY).
    pub(crate) fn handle_userfault(&self, page: u64) -> Result<(), FaultError> {
        let mut events = self.uffd.events.lock().unwrap_or_else(|e| e.into_inner());
        events.push_back(page);
        self.uffd.changed.notify_all();
        // The queue's lock is let go within the wait, before the note ends.
        self.uffd_waiting("waits for a userfaultfd handler", move || {
            while self.uffd_wp_pending(page) {
                if self.m.stopping() {
                    return Err(FaultError::Interrupted);
                }
                events = self.uffd_sleep(events);
            }
            Ok(())
        })
    }

    /// One interruptible sleep on the userfaultfd wait queue: wakes on an
    /// event, an unprotect, or after a tick to notice the VM stopping.
    fn uffd_sleep<'a>(
        &self,
        events: MutexGuard<'a, VecDeque<u64>>,
    ) -> MutexGuard<'a, VecDeque<u64>> {
        self.uffd
            .changed
            .wait_timeout(events, STOP_POLL)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    /// Runs `wait` (a loop of [`Mm::uffd_sleep`]s) with a note that this
    /// thread's vCPU waits on the userfaultfd (for `unreachable` reports
    /// and the explorer).
    fn uffd_waiting<T>(&self, what: &str, wait: impl FnOnce() -> T) -> T {
        let cpu = crate::cpu::current();
        if let Some(c) = cpu {
            self.m.hooks.set_blocked(c, Some(format!("v{c} {what}")));
        }
        let r = wait();
        if let Some(c) = cpu {
            self.m.hooks.set_blocked(c, None);
        }
        r
    }

    fn uffd_wp_pending(&self, page: u64) -> bool {
        pagetable::lookup(&*self.m.mem, self.pgd, page).is_some_and(|pte| pte & PTE_UFFD_WP != 0)
            && self.vma_lookup(page).is_some_and(|v| v.uffd_wp())
    }

    /// The next wp fault, waiting for one; `None` if the VM stops the
    /// thread first. Models reading a UFFD_EVENT_PAGEFAULT message (with
    /// UFFD_PAGEFAULT_FLAG_WP).
    pub fn uffd_wait(&self) -> Option<u64> {
        let mut events = self.uffd.events.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(page) = events.pop_front() {
            return Some(page & !(PAGE_SIZE - 1));
        }
        self.uffd_waiting("waits for a userfaultfd event", move || loop {
            if let Some(page) = events.pop_front() {
                return Some(page & !(PAGE_SIZE - 1));
            }
            if self.m.stopping() {
                return None;
            }
            events = self.uffd_sleep(events);
        })
    }
}
