//! get_user_pages: references (FOLL_GET) and pins (FOLL_PIN) on the pages
//! behind user addresses, and "DMA" through them. Either is a handle the
//! guest keeps: reading through a reference models vmsplice → pipe read
//! (vmsplice takes FOLL_GET references), reading or writing through a
//! FOLL_PIN|FOLL_LONGTERM pin models io_uring fixed-buffer I/O. Models
//! mm/gup.c.

use super::sync::Ordering;
// The table of handles: a plain lock even under the checker (nothing
// inside it can wait or yield).
use std::sync::{Mutex, MutexGuard};

use cowlab_abi::layout::PAGE_SIZE;

use super::fault::{FaultError, FaultFlags};
use super::mm_struct::{Machine, Mm};
use super::pagetable::{self, bits};
use crate::hooks::Point;
use crate::policy::GupReadCow;
use crate::trace::Kind;

/// How a page is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GupFlags {
    /// FOLL_WRITE: the holder will write the page.
    pub write: bool,
    /// FOLL_PIN (else FOLL_GET).
    pub pin: bool,
    /// FOLL_LONGTERM.
    pub longterm: bool,
}

/// A reference or pin the guest holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    pub frame: u64,
    pub flags: GupFlags,
}

/// The pins of all guests, by handle.
#[derive(Debug, Default)]
pub struct Pins(Mutex<Vec<Option<Pin>>>);

impl Pins {
    fn lock(&self) -> MutexGuard<'_, Vec<Option<Pin>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, pin: Pin) -> u64 {
        let mut pins = self.lock();
        pins.push(Some(pin));
        pins.len() as u64 - 1
    }

    /// The pin behind `handle`.
    pub fn get(&self, handle: u64) -> Option<Pin> {
        *self.lock().get(handle as usize)?
    }

    fn take(&self, handle: u64) -> Option<Pin> {
        self.lock().get_mut(handle as usize)?.take()
    }

    /// The pins held now.
    pub fn snapshot(&self) -> Vec<Pin> {
        self.lock().iter().flatten().copied().collect()
    }

    /// Takes every pin still held (at the end of a run).
    pub fn drain(&self) -> Vec<Pin> {
        self.lock().iter_mut().filter_map(Option::take).collect()
    }
}

/// Whether a read-only pin of this PTE must first unshare the page: the
/// slow path faults with FAULT_FLAG_UNSHARE, GUP-fast gives up (both from
/// a7f226604170 "mm/gup: trigger FAULT_FLAG_UNSHARE when R/O-pinning a
/// possibly shared anonymous page", v5.19, with c89357e27f20). Models
/// mm/internal.h:gup_must_unshare().
fn gup_must_unshare(m: &Machine, pte: u64, flags: GupFlags) -> bool {
    let frame = pte & bits::ADDR_MASK;
    flags.pin
        && !flags.write
        && m.policy.anon_exclusive
        && m.policy.gup_read_cow == GupReadCow::Unshare
        && m.frames.is_normal(frame)
        && !m.frames.page(frame).anon_exclusive()
}

impl Mm {
    /// Takes the page at `addr`, faulting it in, breaking or unsharing COW
    /// as the flags and the policy ask; returns a pin handle. Models
    /// mm/gup.c:__get_user_pages() (follow_page_pte() + faultin_page()) for
    /// one page, and pin_user_pages() / get_user_pages().
    ///
    /// Lock contract: takes `mmap_lock` for read for each attempt; the
    /// reference or pin is taken under the PTL, while the PTE that maps
    /// the page is known (follow_page_pte() → try_grab_folio()); a fault
    /// is taken without the PTL and the walk retried. Returns with no lock
    /// held.
    pub fn get_user_page(&self, addr: u64, flags: GupFlags, cpu: usize) -> Result<u64, FaultError> {
        let m = &self.m;
        let page = addr & !(PAGE_SIZE - 1);
        if flags.pin {
            // MMF_HAS_PINNED is set before any page is pinned
            // (__get_user_pages_locked(): mm_set_has_pinned_flag()), so a
            // fork that sees a pinned page also sees the flag.
            self.has_pinned.store(true, Ordering::Release);
        }
        loop {
            let _mmap = self.mmap_read_lock();
            let vma = self.vma_lookup(page).ok_or(FaultError::Segv)?;
            if (flags.write && !vma.writable()) || !vma.readable() {
                return Err(FaultError::Segv);
            }
            let ptl = self.ptl();
            let pte = pagetable::lookup(&*m.mem, self.pgd, page).unwrap_or(0);
            let cow_shared = pte & bits::WRITABLE == 0 && vma.writable();
            // What faultin_page() would be asked for, if anything.
            let fault = if pte & bits::PRESENT == 0 {
                Some(if flags.write {
                    FaultFlags::WRITE
                } else {
                    FaultFlags::READ
                })
            } else if flags.write && pte & bits::WRITABLE == 0 {
                Some(FaultFlags::WRITE)
            } else if gup_must_unshare(m, pte, flags) {
                Some(FaultFlags::UNSHARE)
            } else if !flags.write && cow_shared && m.policy.gup_read_cow == GupReadCow::Break {
                // 17839856fd58: a read-only GUP (FOLL_GET or FOLL_PIN) of a COW
                // page breaks COW like a write.
                Some(FaultFlags::WRITE)
            } else {
                None
            };
            if let Some(fault_flags) = fault {
                drop(ptl);
                self.handle_mm_fault(&vma, page, fault_flags, cpu)?;
                continue;
            }
            let frame = pte & bits::ADDR_MASK;
            if m.frames.is_normal(frame) {
                if flags.pin {
                    m.frames.pin_page(frame);
                } else {
                    m.frames.get_page(frame);
                }
            }
            drop(ptl);
            if let Some(t) = self.trace() {
                t.emit(Kind::Pin, &[page, frame, flags.pin as u64], "");
            }
            let _ = m.hooks.at(Point::GupAfterGrab, Some(cpu), Some(page));
            return Ok(m.pins.insert(Pin { frame, flags }));
        }
    }
}

/// Whether GUP-fast may take the page this PTE maps without the slow
/// path: present (not PROT_NONE), a user page, writable if the access
/// writes, and not special (the zero page is `pte_special()` on x86).
/// Under `gup_read_cow = break` (v5.8) every lookup counts as a write:
/// 17839856fd58 passed `gup_flags | FOLL_WRITE` to the fast walk so that
/// read-only PTEs fall back to the slow path, which breaks COW; a308c71bf1e6
/// (v5.9) removed that again. Models the checks of
/// mm/gup.c:gup_fast_pte_range() before try_grab_folio_fast()
/// (pte_protnone(), pte_access_permitted(), pte_special()).
fn gup_fast_pte_allows(m: &Machine, pte: u64, flags: GupFlags) -> bool {
    let write = flags.write || m.policy.gup_read_cow == GupReadCow::Break;
    pte & bits::PRESENT != 0
        && pte & bits::USER != 0
        && (!write || pte & bits::WRITABLE != 0)
        && m.frames.is_normal(pte & bits::ADDR_MASK)
}

impl Mm {
    /// Takes the page at `addr` like [`Mm::get_user_page`], first trying
    /// the lockless walk ([`Mm::gup_fast`]) and falling back to the slow
    /// path when it gives up. Models mm/gup.c:get_user_pages_fast() and
    /// pin_user_pages_fast() → gup_fast_fallback() for one page.
    ///
    /// Lock contract: the fast attempt takes no mm lock; the fallback
    /// takes `mmap_lock` for read as [`Mm::get_user_page`] does. Returns
    /// with no lock held.
    pub fn get_user_pages_fast(
        &self,
        addr: u64,
        flags: GupFlags,
        cpu: usize,
    ) -> Result<u64, FaultError> {
        if flags.pin {
            // gup_fast_fallback(): mm_set_has_pinned_flag() before the
            // lockless walk, so fork's maybe-pinned check can see it.
            self.has_pinned.store(true, Ordering::SeqCst);
        }
        if let Some(handle) = self.gup_fast(addr, flags, cpu) {
            return Ok(handle);
        }
        self.get_user_page(addr, flags, cpu)
    }

    /// GUP-fast for one page: `None` when the slow path must take it.
    /// Samples `write_protect_seq` first (a FOLL_PIN, with
    /// `gup_fast_fork_seqcount`; odd: a fork is write-protecting, give
    /// up), walks the page table with no lock, grabs the page
    /// ([`Frames::try_grab_page`](super::page::Frames::try_grab_page)),
    /// re-reads the PTE and gives the page back if it changed, gives it
    /// back if a read-only pin must unshare it (v5.19), and finally, for
    /// a pin, gives it back if the count moved: a fork ran meanwhile and
    /// may have write-protected and shared the page after deciding it was
    /// not pinned (57efa1fe5957). Models mm/gup.c:gup_fast() (formerly
    /// lockless_pages_from_mm(), earlier internal_get_user_pages_fast())
    /// → gup_fast_pte_range().
    ///
    /// Lock contract: no mm lock, no PTL. The walk, grab and re-read run
    /// under this CPU's TLB lock, which stands for Linux's
    /// local_irq_save(): a TLB shootdown removes a CPU's entries under
    /// that lock, so one that reaches this CPU waits until the walk ends
    /// before it is acknowledged, as the IPI waits for interrupts to be
    /// enabled (what keeps page tables freed after a shootdown from being
    /// freed under the walk). Points `gup_fast:after_walk` and
    /// `gup_fast:before_recheck` are hit with it held.
    fn gup_fast(&self, addr: u64, flags: GupFlags, cpu: usize) -> Option<u64> {
        let m = &self.m;
        let page = addr & !(PAGE_SIZE - 1);
        let seq = if flags.pin && m.policy.gup_fast_fork_seqcount {
            // raw_read_seqcount(): no waiting for an odd count.
            let seq = self.write_protect_seq.load(Ordering::SeqCst);
            if seq & 1 != 0 {
                return None;
            }
            Some(seq)
        } else {
            None
        };
        let put = |frame: u64| {
            if flags.pin {
                m.frames.unpin_page(frame);
            } else {
                m.frames.put_page(frame);
            }
        };
        let frame = {
            let tlb = m.tlbs.get(cpu);
            let _irqs_off = tlb.as_deref().map(super::tlb::lock);
            let ptep = pagetable::existing_leaf_slot(&*m.mem, self.pgd, page)?;
            let pte = ptep.load(Ordering::Acquire);
            if !gup_fast_pte_allows(m, pte, flags) {
                return None;
            }
            let _ = m.hooks.at(Point::GupFastAfterWalk, Some(cpu), Some(page));
            let frame = pte & bits::ADDR_MASK;
            if !m.frames.try_grab_page(frame, flags.pin) {
                return None;
            }
            let _ = m
                .hooks
                .at(Point::GupFastBeforeRecheck, Some(cpu), Some(page));
            // pte_val(pte) != pte_val(ptep_get(ptep)): unmapped, replaced
            // or write-protected since the walk.
            if ptep.load(Ordering::SeqCst) != pte
                || (pte & bits::WRITABLE == 0 && gup_must_unshare(m, pte, flags))
            {
                put(frame);
                return None;
            }
            frame
        };
        // read_seqcount_retry(), after local_irq_restore().
        if seq.is_some_and(|seq| self.write_protect_seq.load(Ordering::SeqCst) != seq) {
            put(frame);
            return None;
        }
        if let Some(t) = self.trace() {
            t.emit(Kind::Pin, &[page, frame, flags.pin as u64], "");
        }
        let _ = m.hooks.at(Point::GupAfterGrab, Some(cpu), Some(page));
        Some(m.pins.insert(Pin { frame, flags }))
    }
}

impl Machine {
    /// Drops the pin or reference `handle`. Models mm/gup.c:unpin_user_page()
    /// and put_page().
    pub fn unpin_user_page(&self, handle: u64) -> bool {
        let Some(pin) = self.pins.take(handle) else {
            return false;
        };
        self.release_pin(pin);
        true
    }

    fn release_pin(&self, pin: Pin) {
        if let Some(t) = self.hooks.trace.get() {
            t.emit(Kind::Unpin, &[pin.frame], "");
        }
        if !self.frames.is_normal(pin.frame) {
            return;
        }
        if pin.flags.pin {
            self.frames.unpin_page(pin.frame);
        } else {
            self.frames.put_page(pin.frame);
        }
    }

    /// Releases every pin still held (the end of a run).
    pub fn unpin_all(&self) {
        for pin in self.pins.drain() {
            self.release_pin(pin);
        }
    }

    /// "DMA": reads the word at byte `offset` of the pinned frame.
    pub fn dma_read(&self, handle: u64, offset: u64) -> Option<u64> {
        let pin = self.pins.get(handle)?;
        (offset < PAGE_SIZE).then(|| {
            self.mem
                .word(pin.frame + (offset & !7))
                .load(Ordering::SeqCst)
        })
    }

    /// "DMA": writes the word at byte `offset` of the pinned frame (a write
    /// pin only).
    pub fn dma_write(&self, handle: u64, offset: u64, value: u64) -> Option<()> {
        let pin = self.pins.get(handle)?;
        (offset < PAGE_SIZE && pin.flags.write)
            .then(|| self.mem.store_data(pin.frame + (offset & !7), value))
    }
}
