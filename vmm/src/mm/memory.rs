//! The fault path, top-down as in mm/memory.c: the hardware walk (TLB
//! fill), then `do_user_addr_fault` → `handle_mm_fault` → `handle_pte_fault`
//! → `do_anonymous_page` / `do_wp_page` → `wp_page_reuse` / `wp_page_copy`;
//! and `zap_page_range`, which unmaps.

use super::sync::{preempt, Ordering};

use cowlab_abi::layout::{PAGE_SIZE, USER_END, USER_MIN_ADDR};

use super::fault::{Access, FaultError, FaultFlags, VmFault};
use super::mm_struct::{Mm, PtlGuard, Vma};
use super::pagetable::{self, bits};
use super::swapfile::{is_swap_pte, swp_offset};
use super::tlb::{self, user_pte};
use crate::hooks::Point;
use crate::policy::{CowReuse, FaultLock};
use crate::trace::{Kind, Resolution};

/// Software PTE bit (x86 bit 9, ignored by hardware): a PROT_NONE mapping,
/// kept with its frame but not present. Models `_PAGE_PROTNONE`.
pub const PTE_PROTNONE: u64 = 1 << 9;

/// Software PTE bit (x86 bit 10): write-protected by userfaultfd. Models
/// `_PAGE_UFFD_WP`.
pub const PTE_UFFD_WP: u64 = 1 << 10;

/// A reference on the page a COW fault copies, taken by do_wp_page()
/// under the PTL (made only by `Mm::get_old_page`, which takes the
/// [`PtlGuard`]); wp_page_copy() consumes it and drops the reference.
#[must_use]
#[derive(Debug)]
pub(crate) struct OldPageRef {
    frame: u64,
}

/// Whether a present logical PTE lets `access` through (what the hardware
/// walker checks).
fn pte_permits(pte: u64, access: Access) -> bool {
    pte & bits::PRESENT != 0
        && match access {
            Access::Read => true,
            Access::Write => pte & bits::WRITABLE != 0,
            Access::Fetch => false,
        }
}

/// Models arch/x86/mm/fault.c:access_error().
fn access_error(vma: &Vma, access: Access) -> bool {
    match access {
        Access::Read => !vma.readable(),
        Access::Write => !vma.writable(),
        Access::Fetch => true,
    }
}

/// A leaf PTE for an anonymous page, writable if `write`.
fn mk_pte(frame: u64, write: bool) -> u64 {
    user_pte(frame, write)
}

impl Mm {
    /// A user-mode fault of CPU `cpu` at `addr`: the hardware walk (a TLB
    /// fill) if the logical PTE allows the access, else a page fault, then
    /// the walk again. Models the x86 page walk + arch/x86/mm/fault.c.
    ///
    /// Lock contract: called with no mm lock held; returns with none held
    /// (a userfaultfd wait in between holds none either).
    pub fn handle_user_fault(
        &self,
        cpu: usize,
        addr: u64,
        access: Access,
    ) -> Result<(), FaultError> {
        let mut first = true;
        loop {
            if self.tlb_fill(cpu, addr, access)? {
                if first {
                    self.resolved(addr, Resolution::Fill);
                }
                return Ok(());
            }
            first = false;
            match self.do_user_addr_fault(addr, access, cpu) {
                Err(FaultError::Userfault(page)) => self.handle_userfault(page)?,
                r => r?,
            }
        }
    }

    /// The hardware walk of CPU `cpu`: if the logical table allows `access`
    /// at `addr`, install its translation in the CPU's TLB. The walk and the
    /// install happen under the CPU's TLB lock, so they are atomic with
    /// respect to shootdowns, as a walk is within one instruction.
    ///
    /// With the `tlb_fault_around` knob above 1, the same walk also caches
    /// the other pages of the aligned group whose logical PTE permits
    /// `access`
    /// ([`ShadowTlb::fill_around`](super::tlb::ShadowTlb::fill_around)):
    /// a TLB-caching model, not Linux's `do_fault_around()` (which maps
    /// page-cache pages of file VMAs; anonymous faults map one page). A
    /// neighbour is cached with the logical PTE's permission as it is at
    /// the fill, under the same lock, so the shootdown rule below holds
    /// for it too; but a CPU can now hold, and later use stale, a
    /// translation of a page it never touched.
    ///
    /// Lock contract: takes only the CPU's TLB lock, never the PTL (the
    /// hardware walker does not take it); every PTE change that removes a
    /// permission is followed by a flush, which takes the TLB lock, so a
    /// fill either precedes the flush (and is flushed) or sees the change.
    pub fn tlb_fill(&self, cpu: usize, addr: u64, access: Access) -> Result<bool, FaultError> {
        let Some(tlb) = self.m.tlbs.get(cpu) else {
            return Ok(false);
        };
        let mut tlb = tlb::lock(&tlb);
        let page = addr & !(PAGE_SIZE - 1);
        let Some(pte) = pagetable::lookup(&*self.m.mem, self.pgd, page) else {
            return Ok(false);
        };
        if !pte_permits(pte, access) {
            return Ok(false);
        }
        let frame = pte & bits::ADDR_MASK;
        let evicted = tlb.fill(
            &*self.m.mem,
            self.m.frames.pool(),
            page,
            user_pte(frame, pte & bits::WRITABLE != 0),
            self.m.policy.tlb_capacity,
        )?;
        let mem = &*self.m.mem;
        // The logical PTE of each neighbour cached, for the trace.
        let mut around = Vec::new();
        tlb.fill_around(
            mem,
            self.m.frames.pool(),
            page,
            self.m.policy.tlb_fault_around.get(),
            self.m.policy.tlb_capacity,
            |n| {
                // Only neighbours the faulting access could use as they are:
                // after a write fault, a read-only (say COW-shared)
                // neighbour would mostly be replaced by its own write fault,
                // and replacing an entry costs a revoke.
                let pte =
                    pagetable::lookup(mem, self.pgd, n).filter(|pte| pte_permits(*pte, access))?;
                around.push((n, pte));
                let frame = pte & bits::ADDR_MASK;
                Some(user_pte(frame, pte & bits::WRITABLE != 0))
            },
        )?;
        drop(tlb);
        if let Some(t) = self.trace() {
            t.emit(Kind::Fill, &[page, pte], "");
            for victim in evicted {
                t.emit(Kind::Evict, &[victim], "");
            }
            for (n, pte) in around {
                t.emit(Kind::Fill, &[n, pte], "");
            }
        }
        let _ = self.m.hooks.at(Point::FaultFill, Some(cpu), Some(page));
        Ok(true)
    }

    /// Caches the translation of `addr` in CPU `cpu`'s TLB before the CPU
    /// first runs, as the VM's loader does for a litmus thread's top stack
    /// page: a write-permitting PTE's single entry, with no hook point and
    /// no trace record (like `populate`'s faults, which come before the
    /// hooks are armed), so that no rule or schedule step can match it and
    /// nothing waits in it on the thread creating the CPU. Returns whether
    /// it cached anything.
    ///
    /// Lock contract: as [`Self::tlb_fill`] (the CPU's TLB lock only).
    pub fn preload_tlb(&self, cpu: usize, addr: u64) -> Result<bool, FaultError> {
        let Some(tlb) = self.m.tlbs.get(cpu) else {
            return Ok(false);
        };
        let mut tlb = tlb::lock(&tlb);
        let page = addr & !(PAGE_SIZE - 1);
        let Some(pte) = pagetable::lookup(&*self.m.mem, self.pgd, page)
            .filter(|pte| pte_permits(*pte, Access::Write))
        else {
            return Ok(false);
        };
        let frame = pte & bits::ADDR_MASK;
        tlb.fill(
            &*self.m.mem,
            self.m.frames.pool(),
            page,
            user_pte(frame, true),
            self.m.policy.tlb_capacity,
        )?;
        Ok(true)
    }

    /// A fresh data page for `addr`, unless a `fail@alloc_page` rule says
    /// no; zeroed or a copy of `from`. Models the allocation of
    /// do_anonymous_page() and wp_page_copy() (vma_alloc_zeroed_movable_folio(),
    /// folio_prealloc() + __wp_page_copy_user()).
    ///
    /// Lock contract: called without the PTL (an allocation may sleep);
    /// a copy's source is kept alive by the caller's reference on it.
    pub(super) fn alloc_data_page(
        &self,
        cpu: usize,
        addr: u64,
        from: Option<u64>,
    ) -> Result<u64, FaultError> {
        let m = &self.m;
        if m.hooks.at(Point::AllocPage, Some(cpu), Some(addr)).is_err() {
            return Err(FaultError::Oom);
        }
        match from {
            Some(src) if src != m.frames.zero_page() => {
                let new = m.frames.alloc_uninit()?;
                m.mem.copy_frame(new, src);
                Ok(new)
            }
            _ => Ok(m.frames.alloc_zeroed(&*m.mem)?),
        }
    }

    /// Finds and locks the VMA, checks the access, handles the fault.
    /// Models arch/x86/mm/fault.c:do_user_addr_fault().
    ///
    /// Lock contract: called with no mm lock held; holds the VMA (its
    /// per-VMA read lock, or `mmap_lock` for read when that fails) for the
    /// whole of handle_mm_fault(); returns with both released.
    fn do_user_addr_fault(&self, addr: u64, access: Access, cpu: usize) -> Result<(), FaultError> {
        if !(USER_MIN_ADDR..USER_END).contains(&addr) {
            return Err(FaultError::Segv);
        }
        let _ = self.m.hooks.at(Point::FaultEnter, Some(cpu), Some(addr));
        let per_vma = self.m.policy.fault_lock == FaultLock::Vma;
        if let Some(vma) = per_vma.then(|| self.lock_vma_under_rcu(addr)).flatten() {
            let Some(_vma_read) = vma.start_read(self) else {
                return self.fault_under_mmap_lock(addr, access, cpu);
            };
            if access_error(&vma, access) {
                return Err(FaultError::Segv);
            }
            return self.handle_mm_fault(&vma, addr, FaultFlags::from_access(access), cpu);
        }
        self.fault_under_mmap_lock(addr, access, cpu)
    }

    /// The VMA for `addr` without `mmap_lock`. Models
    /// mm/memory.c:lock_vma_under_rcu() (its lock is taken by the caller).
    ///
    /// Lock contract: called with no mm lock held; takes only the VMA
    /// tree's read lock (standing for RCU) for the lookup.
    fn lock_vma_under_rcu(&self, addr: u64) -> Option<std::sync::Arc<Vma>> {
        self.vma_lookup(addr)
    }

    /// The fallback: the fault under `mmap_lock` held for read. Models the
    /// `lock_mmap:` path of arch/x86/mm/fault.c:do_user_addr_fault().
    ///
    /// Lock contract: called with no mm lock held; holds `mmap_lock` for
    /// read across handle_mm_fault(); returns with it released.
    fn fault_under_mmap_lock(
        &self,
        addr: u64,
        access: Access,
        cpu: usize,
    ) -> Result<(), FaultError> {
        let _mmap = self.mmap_read_lock();
        let vma = self.vma_lookup(addr).ok_or(FaultError::Segv)?;
        if access_error(&vma, access) {
            return Err(FaultError::Segv);
        }
        self.handle_mm_fault(&vma, addr, FaultFlags::from_access(access), cpu)
    }

    /// Walks (allocating) to the leaf PTE of `addr`, reads it and hands the
    /// fault to [`Mm::handle_pte_fault`]. Models mm/memory.c:
    /// handle_mm_fault() → __handle_mm_fault() (the table levels are
    /// allocated under the PTL here; Linux takes a lock per level).
    ///
    /// Lock contract: called with the VMA held (per-VMA read lock or
    /// `mmap_lock` for read), without the PTL; takes the PTL only to
    /// allocate the table levels; returns with the PTL released.
    pub(crate) fn handle_mm_fault(
        &self,
        vma: &Vma,
        addr: u64,
        flags: FaultFlags,
        cpu: usize,
    ) -> Result<(), FaultError> {
        let address = addr & !(PAGE_SIZE - 1);
        let pte = {
            let _ptl = self.ptl();
            pagetable::leaf_slot(&*self.m.mem, self.m.frames.pool(), self.pgd, address)?
        };
        // Read without the PTL, as Linux reads `vmf->orig_pte`: whatever
        // it finds is rechecked under the lock before anything is changed.
        preempt();
        let orig_pte = pte.load(Ordering::Acquire);
        self.handle_pte_fault(&VmFault {
            vma,
            address,
            flags,
            cpu,
            pte,
            orig_pte,
        })
    }

    /// Dispatches on the PTE read without the lock: a swap entry → swap-in,
    /// none → first touch,
    /// present but read-only for a write or an unshare → COW. Models
    /// mm/memory.c:handle_pte_fault().
    ///
    /// Lock contract: called with the VMA held, without the PTL (so
    /// `vmf.orig_pte` may already be stale: each handler rechecks it under
    /// the PTL); returns with the PTL released.
    fn handle_pte_fault(&self, vmf: &VmFault<'_>) -> Result<(), FaultError> {
        if is_swap_pte(vmf.orig_pte) {
            return self.do_swap_page(vmf);
        }
        if vmf.orig_pte & (bits::PRESENT | PTE_PROTNONE) == 0 {
            return self.do_anonymous_page(vmf);
        }
        if (vmf.flags.write || vmf.flags.unshare) && vmf.orig_pte & bits::WRITABLE == 0 {
            return self.do_wp_page(vmf);
        }
        // Another CPU resolved it first: the caller's walk will succeed.
        Ok(())
    }

    /// First touch of an anonymous page: the shared zero page for a read,
    /// a fresh exclusive page for a write. Models mm/memory.c:do_anonymous_page().
    ///
    /// Lock contract: called with the VMA held, without the PTL; allocates
    /// without it, installs under it if the PTE is still none (else drops
    /// the new page), and returns with it released.
    fn do_anonymous_page(&self, vmf: &VmFault<'_>) -> Result<(), FaultError> {
        let m = &self.m;
        let page = vmf.address;
        if !vmf.flags.write {
            let ptl = self.ptl();
            if vmf.pte_none(&ptl) {
                self.set_pte(&ptl, page, vmf.pte, mk_pte(m.frames.zero_page(), false));
                self.resolved(page, Resolution::ZeroPage);
            }
            return Ok(());
        }
        let new = self.alloc_data_page(vmf.cpu, page, None)?;
        let _ = m
            .hooks
            .at(Point::DoAnonymousPageAfterAlloc, Some(vmf.cpu), Some(page));
        let ptl = self.ptl();
        if !vmf.pte_none(&ptl) {
            m.frames.put_page(new);
            return Ok(());
        }
        m.frames.add_new_anon_rmap(new);
        self.set_pte(&ptl, page, vmf.pte, mk_pte(new, vmf.vma.writable()));
        self.resolved(page, Resolution::Anon);
        Ok(())
    }

    /// A write to a present, read-only PTE (or an unshare request): reuse
    /// the page if it is ours alone, else copy it. Models
    /// mm/memory.c:do_wp_page().
    ///
    /// Lock contract: called with the VMA held, without the PTL; takes the
    /// PTL and gives up if the PTE is no longer `vmf.orig_pte` (pte_same).
    /// Reuse happens under the PTL; for a copy, the reference on the old
    /// page is taken under the PTL ([`OldPageRef`] can only be made with
    /// the PTL held), which is then released before wp_page_copy() (Linux:
    /// folio_get() before pte_unmap_unlock()). Returns with the PTL
    /// released.
    pub(super) fn do_wp_page(&self, vmf: &VmFault<'_>) -> Result<(), FaultError> {
        let m = &self.m;
        let policy = &m.policy;
        let (page, unshare) = (vmf.address, vmf.flags.unshare);
        let ptl = self.ptl();
        if !vmf.pte_same(&ptl) {
            return Ok(());
        }
        let _ = m.hooks.at(Point::DoWpPageEnter, Some(vmf.cpu), Some(page));
        if !unshare && vmf.vma.uffd_wp() && vmf.orig_pte & PTE_UFFD_WP != 0 {
            self.resolved(page, Resolution::Userfault);
            return Err(FaultError::Userfault(page));
        }
        if policy.uffd_wp_flush_before_copy && vmf.vma.uffd_wp() && self.mm_tlb_flush_pending() {
            // 6ce64428d620: uffd-wp can defer flushes; a stale writable
            // entry must not survive into the copy below.
            self.flush_tlb_page(page, Some(vmf.cpu));
        }
        let frame = vmf.frame();
        let reused = if unshare {
            Resolution::Unshare
        } else {
            Resolution::Reuse
        };
        if frame != m.frames.zero_page() {
            let p = m.frames.page(frame);
            if policy.anon_exclusive && p.anon_exclusive() {
                // Ours alone: an unshare has nothing to do, a write reuses.
                if !unshare {
                    self.wp_page_reuse(vmf, &ptl);
                }
                self.resolved(page, reused);
                return Ok(());
            }
            if self.can_reuse(frame) {
                // Ours alone after all: mark it so; an unshare is then done
                // (the PTE stays read-only), a write reuses.
                p.set_anon_exclusive();
                if !unshare {
                    self.wp_page_reuse(vmf, &ptl);
                }
                self.resolved(page, reused);
                return Ok(());
            }
        } else if unshare {
            // The zero page is never unshared (it is not anonymous).
            return Ok(());
        }
        // We must copy. The reference on the old page is taken while the
        // PTL still guarantees that the PTE maps it (folio_get() before
        // pte_unmap_unlock()): once the lock is dropped, another CPU's
        // fault, a zap or the child's exit may drop every other reference,
        // and the page would be freed and reused under the copy.
        let old = self.get_old_page(vmf, &ptl);
        drop(ptl);
        self.wp_page_copy(vmf, old)
    }

    /// Takes a reference on the page `vmf.orig_pte` maps. Models the
    /// folio_get() of mm/memory.c:do_wp_page() before wp_page_copy().
    ///
    /// Lock contract: called with the PTL held (`_ptl`), after pte_same:
    /// the PTE then still holds its own reference, so the page cannot be
    /// freed before this one is taken.
    fn get_old_page(&self, vmf: &VmFault<'_>, _ptl: &PtlGuard<'_>) -> OldPageRef {
        let frame = vmf.frame();
        self.m.frames.get_page(frame);
        OldPageRef { frame }
    }

    /// Whether a shared-looking page is in fact only ours: by refcount
    /// (v5.9+, `wp_can_reuse_anon_folio()`; a page in the swap cache
    /// leaves it first if `cow_free_swapcache`) or by mapcount plus swap
    /// count (before, `reuse_swap_page()`, blind to GUP references).
    ///
    /// Lock contract: called with the PTL held by do_wp_page(), so the
    /// counts are those of a page the PTE still maps.
    fn can_reuse(&self, frame: u64) -> bool {
        let p = self.m.frames.page(frame);
        match self.m.policy.cow_reuse {
            CowReuse::Refcount => {
                // 53a05ad9f21d: the swap cache's own reference need not
                // force a copy; drop it if no swap PTE needs the page.
                // (wp_can_reuse_anon_folio(): only with the page lock,
                // else copy.)
                if self.m.policy.cow_free_swapcache
                    && p.swapcache().is_some()
                    && p.refcount() <= 2
                    && p.trylock()
                {
                    self.m.swap.folio_free_swap(&self.m.frames, frame);
                    p.unlock();
                }
                p.refcount() == 1
            }
            // reuse_swap_page(): mapcount + swap count, which is the
            // mapcount alone for a page outside the swap cache. A cached
            // page needs its lock (Linux waits for it; here a page that
            // reclaim holds is copied).
            CowReuse::Mapcount if p.swapcache().is_none() => p.mapcount() == 1,
            CowReuse::Mapcount => {
                if !p.trylock() {
                    return false;
                }
                let reuse = self.reuse_swap_page(frame);
                p.unlock();
                reuse
            }
        }
    }

    /// Makes the PTE writable in place. Models mm/memory.c:wp_page_reuse().
    ///
    /// Lock contract: called with the PTL held (`ptl`), after pte_same;
    /// returns with it held.
    fn wp_page_reuse(&self, vmf: &VmFault<'_>, ptl: &PtlGuard<'_>) {
        self.set_pte(
            ptl,
            vmf.address,
            vmf.pte,
            vmf.orig_pte | bits::WRITABLE | bits::DIRTY | bits::ACCESSED,
        );
    }

    /// Traces how the fault at `addr` was resolved (see `trace::Kind::Resolve`).
    fn resolved(&self, addr: u64, how: Resolution) {
        if let Some(t) = self.trace() {
            t.emit(Kind::Resolve, &[addr, how.code()], "");
        }
    }

    /// Copies the page and maps the copy: copy outside the PTL, `pte_same`
    /// recheck under it, `ptep_clear_flush`, new PTE, and the old page's
    /// rmap dropped only after the switch. Models mm/memory.c:wp_page_copy().
    ///
    /// Lock contract: called without the PTL, holding the VMA (its per-VMA
    /// lock or `mmap_lock` for read) and `old`, the reference on the old
    /// page that do_wp_page() took under the PTL; takes the PTL for the
    /// switch and returns with it released and the reference dropped.
    fn wp_page_copy(&self, vmf: &VmFault<'_>, old: OldPageRef) -> Result<(), FaultError> {
        let m = &self.m;
        let (page, cpu, unshare) = (vmf.address, vmf.cpu, vmf.flags.unshare);
        let old = old.frame;
        let _ = m
            .hooks
            .at(Point::WpPageCopyBeforeCopy, Some(cpu), Some(page));
        let new = match self.alloc_data_page(cpu, page, Some(old)) {
            Ok(new) => new,
            Err(e) => {
                m.frames.put_page(old);
                return Err(e);
            }
        };
        if let Some(t) = self.trace() {
            t.emit(Kind::Copy, &[page, old, new], "");
        }
        let _ = m
            .hooks
            .at(Point::WpPageCopyAfterCopy, Some(cpu), Some(page));
        let ptl = self.ptl();
        let recheck = m.policy.wp_copy_recheck_exclusive
            && !unshare
            && old != m.frames.zero_page()
            && m.frames.page(old).mapcount() == 1
            && m.frames.page(old).refcount() == 2;
        if !vmf.pte_same(&ptl) || recheck {
            // pte_same failed: someone else handled it. Or (seed 004's
            // suggestion) the page became ours alone meanwhile: reuse it.
            if recheck && vmf.pte_same(&ptl) {
                m.frames.page(old).set_anon_exclusive();
                self.wp_page_reuse(vmf, &ptl);
            }
            drop(ptl);
            m.frames.put_page(new);
            m.frames.put_page(old);
            return Ok(());
        }
        let _ = m
            .hooks
            .at(Point::WpPageCopyBeforeClearFlush, Some(cpu), Some(page));
        // ptep_clear_flush(): no CPU may keep the old translation.
        self.set_pte(&ptl, page, vmf.pte, 0);
        self.flush_tlb_page(page, Some(cpu));
        let _ = m
            .hooks
            .at(Point::WpPageCopyAfterClearFlush, Some(cpu), Some(page));
        m.frames.add_new_anon_rmap(new);
        // An unshared copy is mapped read-only, like the page it replaces,
        // and keeps its uffd-wp marker (wp_page_copy() does
        // pte_mkuffd_wp() on unshare): unsharing for a read pin must not
        // drop a write-protection.
        let uffd_wp = if unshare {
            vmf.orig_pte & PTE_UFFD_WP
        } else {
            0
        };
        self.set_pte(
            &ptl,
            page,
            vmf.pte,
            mk_pte(new, vmf.vma.writable() && !unshare) | uffd_wp,
        );
        self.resolved(
            page,
            if unshare {
                Resolution::Unshare
            } else {
                Resolution::Copy
            },
        );
        // The old rmap goes only now, after the switch (see the comment in
        // wp_page_copy() about another process reusing the page).
        if old != m.frames.zero_page() {
            m.frames.remove_rmap(old);
            // free_swap_cache(): unmapped now, it need not stay cached.
            m.swap.free_swap_cache(&m.frames, old);
            m.frames.put_page(old);
        }
        drop(ptl);
        m.frames.put_page(old);
        let _ = m
            .hooks
            .at(Point::WpPageCopyInstalled, Some(cpu), Some(page));
        Ok(())
    }

    /// Unmaps `[start, end)`: clears the PTEs under the PTL, flushes the
    /// range from every CPU, then drops the pages (after the flush, as
    /// mmu_gather does). A swap entry gives back its swap count
    /// (`free_swap_and_cache()`). Models mm/memory.c:zap_page_range_single() +
    /// tlb_finish_mmu().
    ///
    /// Lock contract: called with `mmap_lock` held (for write: munmap,
    /// exit; for read: MADV_DONTNEED, concurrently with faults); takes the
    /// PTL to clear the PTEs and drop their rmaps; flushes without it; the
    /// pages' references, kept by the gather list until then, are dropped
    /// only after the flush, so no TLB can reach a freed frame.
    pub(crate) fn zap_page_range(&self, start: u64, end: u64, initiator: Option<usize>) {
        let m = &self.m;
        // tlb_gather_mmu(): a flush is pending from the first cleared PTE.
        self.inc_tlb_flush_pending();
        let mut freed = Vec::new();
        {
            let ptl = self.ptl();
            pagetable::for_each_leaf(&*m.mem, self.pgd, start, end, &mut |va, slot| {
                let pte = self.set_pte(&ptl, va, slot, 0);
                if is_swap_pte(pte) {
                    m.swap.free_swap_and_cache(&m.frames, swp_offset(pte));
                    return;
                }
                let frame = pte & bits::ADDR_MASK;
                if m.frames.is_normal(frame) {
                    m.frames.remove_rmap(frame);
                    freed.push(frame);
                }
            });
        }
        // Threads waiting for a uffd-wp handler on these pages retry now.
        self.uffd_wake();
        let _ = m.hooks.at(Point::MunmapAfterZap, initiator, Some(start));
        self.flush_tlb_range(start, end, initiator);
        self.dec_tlb_flush_pending();
        for frame in freed {
            // free_pages_and_swap_cache(): an unmapped page leaves the swap cache.
            m.swap.free_swap_cache(&m.frames, frame);
            m.frames.put_page(frame);
        }
    }
}
