//! `mremap`: shrink, grow and move anonymous private mappings, the pages
//! moving with their PTEs. Models mm/mremap.c (Linux 6.18: `do_mremap()`,
//! `mremap_to()`, `mremap_at()`, `move_vma()`, `move_page_tables()`,
//! `move_ptes()`).

use super::sync::Ordering;
use cowlab_abi::layout::{PAGE_SIZE, USER_END, USER_MIN_ADDR};
use cowlab_abi::mremap as flags;

use super::memory::{PTE_PROTNONE, PTE_UFFD_WP};
use super::mm_struct::{Mm, Vma};
use super::mmap::MmError;
use super::pagetable::{self, bits};
use crate::hooks::Point;

/// Bytes one leaf page table maps (`PMD_SIZE`): `move_page_tables()`
/// moves at most this much per `move_ptes()` call.
const PMD_SIZE: u64 = 512 * PAGE_SIZE;

/// What `mremap` was asked to do, after the argument checks. Models
/// mm/mremap.c:`struct vma_remap_struct` (the user-provided part).
#[derive(Debug, Clone, Copy)]
struct Remap {
    addr: u64,
    old_len: u64,
    new_len: u64,
    flags: u64,
    new_addr: u64,
}

impl Remap {
    fn has(&self, flag: u64) -> bool {
        self.flags & flag != 0
    }

    /// Whether the mapping goes to another address whatever the lengths.
    /// Models mm/mremap.c:vrm_implies_new_addr().
    fn implies_new_addr(&self) -> bool {
        self.has(flags::FIXED) || self.has(flags::DONTUNMAP)
    }
}

/// `len` rounded up to whole pages, or EINVAL on overflow.
fn page_align(len: u64) -> Result<u64, MmError> {
    len.checked_next_multiple_of(PAGE_SIZE)
        .ok_or(MmError::Inval)
}

impl Mm {
    /// `mremap(addr, old_len, new_len, flags, new_addr)` of anonymous
    /// private memory; returns the mapping's (maybe new) address.
    ///
    /// - shrinking unmaps the tail; the same size without a move does
    ///   nothing;
    /// - growing extends the VMA in place if the range after it is free,
    ///   else, with `MREMAP_MAYMOVE`, moves the mapping to a free range
    ///   (its PTEs, hence its pages, go along: see [`Mm::move_vma`]),
    ///   else fails with ENOMEM;
    /// - `MREMAP_FIXED` (with `MREMAP_MAYMOVE`) moves to `new_addr`,
    ///   unmapping whatever was there; `MREMAP_DONTUNMAP` (with
    ///   `MREMAP_MAYMOVE`, same size) moves the pages but leaves the old
    ///   VMA mapped and empty.
    ///
    /// Errors as Linux: EINVAL for bad flags, a misaligned `addr` or
    /// `new_addr`, a zero length (`old_len` 0 duplicates only shared
    /// mappings) or overlapping ranges; EFAULT if `addr` is not in a VMA or
    /// the old range leaves it (a move across several VMAs, new in 6.17, is
    /// not modelled); ENOMEM if growth has no room and may not move.
    /// Models mm/mremap.c:do_mremap() → check_mremap_params(),
    /// check_prep_vma(), mremap_to() / mremap_at().
    ///
    /// Lock contract: takes `mmap_lock` for write for the whole call
    /// (VMAs it replaces or creates stay write-locked until then).
    pub fn mremap(
        &self,
        addr: u64,
        old_len: u64,
        new_len: u64,
        remap_flags: u64,
        new_addr: u64,
        cpu: Option<usize>,
    ) -> Result<u64, MmError> {
        // check_mremap_params()
        let r = Remap {
            addr,
            old_len: page_align(old_len)?,
            new_len: page_align(new_len)?,
            flags: remap_flags,
            new_addr,
        };
        if r.flags & !flags::ALL != 0
            || !addr.is_multiple_of(PAGE_SIZE)
            || (r.has(flags::FIXED) && !r.has(flags::MAYMOVE))
            || (r.has(flags::DONTUNMAP) && (!r.has(flags::MAYMOVE) || r.old_len != r.new_len))
            || r.new_len == 0
        {
            return Err(MmError::Inval);
        }
        let _mmap = self.mmap_write_lock_for("mremap");
        // check_prep_vma()
        let vma = self.vma_lookup(addr).ok_or(MmError::Fault)?;
        if r.old_len == 0 {
            return Err(MmError::Inval);
        }
        if r.old_len > vma.end - addr {
            return Err(MmError::Fault);
        }
        if r.implies_new_addr() {
            self.mremap_to(r, &vma, cpu)
        } else {
            self.mremap_at(r, &vma, cpu)
        }
    }

    /// A resize at the same address, or a move to wherever there is room.
    /// Models mm/mremap.c:mremap_at() (shrink_vma(), vma_expandable(),
    /// expand_vma_in_place(), expand_vma() → mremap_to()).
    /// Lock contract: `mmap_lock` held for write.
    fn mremap_at(&self, r: Remap, vma: &Vma, cpu: Option<usize>) -> Result<u64, MmError> {
        let end = r.addr + r.old_len;
        if r.new_len <= r.old_len {
            if r.new_len < r.old_len {
                self.unmap_locked(r.addr + r.new_len, end, cpu);
            }
            return Ok(r.addr);
        }
        let new_end = r.addr.checked_add(r.new_len).filter(|e| *e <= USER_END);
        if let Some(new_end) = new_end.filter(|_| end == vma.end) {
            if self.vmas_in(end, new_end).is_empty() {
                // expand_vma_in_place(): the VMA grows; its pages stay.
                self.replace_vmas_with(vma.start, vma.end, |v, lo, _| Some(v.dup_at(lo, new_end)));
                return Ok(r.addr);
            }
        }
        if !r.has(flags::MAYMOVE) {
            return Err(MmError::NoMem);
        }
        let new_addr = self.get_unmapped_area(r.new_len)?;
        self.move_vma(Remap { new_addr, ..r }, vma, cpu)
    }

    /// A move to `new_addr` (MREMAP_FIXED) or to a free range
    /// (MREMAP_DONTUNMAP alone). Models mm/mremap.c:mremap_to().
    /// Lock contract: `mmap_lock` held for write.
    fn mremap_to(&self, mut r: Remap, vma: &Vma, cpu: Option<usize>) -> Result<u64, MmError> {
        if r.has(flags::FIXED) {
            let fits = r.new_addr.is_multiple_of(PAGE_SIZE)
                && r.new_addr >= USER_MIN_ADDR
                && r.new_addr
                    .checked_add(r.new_len)
                    .is_some_and(|e| e <= USER_END);
            // vrm_overlaps() (its sums cannot overflow once `fits`)
            let overlaps = || r.addr < r.new_addr + r.new_len && r.new_addr < r.addr + r.old_len;
            if !fits || overlaps() {
                return Err(MmError::Inval);
            }
            self.unmap_locked(r.new_addr, r.new_addr + r.new_len, cpu);
        } else {
            r.new_addr = self.get_unmapped_area(r.new_len)?;
        }
        if r.new_len < r.old_len {
            // shrink_vma(): the tail goes first, the rest moves.
            self.unmap_locked(r.addr + r.new_len, r.addr + r.old_len, cpu);
            r.old_len = r.new_len;
        }
        self.move_vma(r, vma, cpu)
    }

    /// `[start, end)` unmapped: `munmap` without taking `mmap_lock`.
    /// Models mm/vma.c:do_vmi_munmap(). Lock contract: `mmap_lock` held
    /// for write.
    fn unmap_locked(&self, start: u64, end: u64, cpu: Option<usize>) {
        self.replace_vmas(start, end, |_| None);
        self.zap_page_range(start, end, cpu);
    }

    /// Moves `[addr, addr + old_len)` of `vma` to a new VMA at `new_addr`
    /// of `new_len` bytes: the new VMA takes the old one's flags (but not
    /// its uffd-wp registration: cowlab's userfaultfd has no
    /// UFFD_FEATURE_EVENT_REMAP, so `mremap_userfaultfd_prep()` drops it),
    /// the PTEs move ([`Mm::move_page_tables`]), then the old range is
    /// unmapped, now empty of pages, unless MREMAP_DONTUNMAP keeps its VMA.
    /// Refcounts, mapcounts and PageAnonExclusive do not change: the same
    /// pages, mapped once each, at another address. Models
    /// mm/mremap.c:move_vma() (vma_start_write(), copy_vma(),
    /// move_page_tables(), then do_vmi_munmap() of the old range).
    ///
    /// Lock contract: `mmap_lock` held for write; the old VMA is
    /// write-locked first, so faults holding its per-VMA lock finish and
    /// later ones fall back to `mmap_lock` and wait; the new VMA is
    /// write-locked from birth (vma_link()).
    fn move_vma(&self, r: Remap, vma: &Vma, cpu: Option<usize>) -> Result<u64, MmError> {
        vma.vma_start_write(self);
        let (old_end, new_end) = (r.addr + r.old_len, r.new_addr + r.new_len);
        // The new leaf tables before any PTE moves (alloc_new_pmd() and
        // pte_alloc() for each extent): out of frames, nothing has moved.
        {
            let m = &self.m;
            let _ptl = self.ptl();
            let first = r.new_addr & !(PMD_SIZE - 1);
            for at in (first..r.new_addr + r.old_len).step_by(PMD_SIZE as usize) {
                pagetable::leaf_table(&*m.mem, m.frames.pool(), self.pgd, at)
                    .map_err(|_| MmError::NoMem)?;
            }
        }
        let new_vma = Vma::build(r.new_addr, new_end, vma.prot, false, vma.dontcopy);
        self.vmas
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(r.new_addr, new_vma.born_write_locked(self));
        self.move_page_tables(vma, r.addr, r.new_addr, r.old_len, cpu);
        if !r.has(flags::DONTUNMAP) {
            self.unmap_locked(r.addr, old_end, cpu);
        }
        Ok(r.new_addr)
    }

    /// Moves the PTEs of `[old_addr, old_addr + len)` to `new_addr`, one
    /// leaf table's worth (an extent bounded by both sides' 2 MiB
    /// boundaries) per [`Mm::move_ptes`]. With `mremap_flush_under_ptl`
    /// off, the old range's TLB flush is done here, once, after every
    /// extent, with no PTL held: the kernels before eb66ae030829 (the
    /// `need_flush` of move_page_tables()). Models
    /// mm/mremap.c:move_page_tables() (PTE level only: no PMD or PUD moves,
    /// as for ranges that are not 2 MiB-aligned).
    ///
    /// Lock contract: `mmap_lock` held for write; each extent takes the
    /// PTLs in [`Mm::move_ptes`].
    fn move_page_tables(
        &self,
        vma: &Vma,
        old_addr: u64,
        new_addr: u64,
        len: u64,
        cpu: Option<usize>,
    ) {
        let mut moved = 0;
        // Extents whose flush is owed (`need_flush`).
        let mut owed = 0;
        while moved < len {
            let (old, new) = (old_addr + moved, new_addr + moved);
            // get_extent(): up to the next 2 MiB boundary on either side.
            let extent = (len - moved)
                .min(PMD_SIZE - (old & (PMD_SIZE - 1)))
                .min(PMD_SIZE - (new & (PMD_SIZE - 1)));
            owed += u64::from(self.move_ptes(vma, old, new, extent, cpu));
            moved += extent;
        }
        if owed > 0 {
            self.flush_tlb_range(old_addr, old_addr + len, cpu);
            self.mremap_flush_deferred.fetch_sub(owed, Ordering::AcqRel);
        }
    }

    /// Moves the PTEs of one extent under both page-table locks: each
    /// non-none old PTE is cleared and set at the new address unchanged,
    /// but for the uffd-wp bit (cleared, and a uffd-wp marker dropped, on
    /// a registered VMA: `need_clear_uffd_wp`). If a present PTE moved,
    /// the old extent's TLB entries are flushed before the locks are
    /// dropped (`mremap_flush_under_ptl`, eb66ae030829 "mremap: properly
    /// flush TLB before releasing the page", CVE-2018-18281): once the
    /// new PTL is free, anyone reaching the page through the new PTE
    /// (reclaim, migration, truncation in Linux) may free or reuse it,
    /// and a CPU's stale entry for the old address would then reach a
    /// page that is no longer this mapping's. Returns whether a flush is
    /// still owed (a present PTE moved and the flush is left to
    /// [`Mm::move_page_tables`]); it is noted in `mremap_flush_deferred`
    /// before the PTLs are dropped, for `mm_verify`. The injection point
    /// `mremap:after_move_ptes` is hit after the locks are dropped: with
    /// the knob off, inside the window. Models mm/mremap.c:move_ptes().
    ///
    /// Lock contract: called with `mmap_lock` held for write; takes the
    /// old and the new PTL (one lock per mm here) around the whole extent.
    /// The rmap locks (`take_rmap_locks()`, the anon_vma lock) are not
    /// modelled: nothing here walks the rmap (no reclaim or migration).
    fn move_ptes(
        &self,
        vma: &Vma,
        old_addr: u64,
        new_addr: u64,
        extent: u64,
        cpu: Option<usize>,
    ) -> bool {
        let m = &self.m;
        let old_end = old_addr + extent;
        let mut force_flush = false;
        {
            let ptl = self.ptl();
            // Allocated by move_vma: this only walks to it.
            let Ok(table) = pagetable::leaf_table(&*m.mem, m.frames.pool(), self.pgd, new_addr)
            else {
                return false;
            };
            pagetable::for_each_leaf(&*m.mem, self.pgd, old_addr, old_end, &mut |va, src| {
                let dst = pagetable::leaf_table_slot(&*m.mem, table, va - old_addr + new_addr);
                let pte = self.set_pte(&ptl, va, src, 0);
                force_flush |= pte & (bits::PRESENT | PTE_PROTNONE) != 0;
                let pte = if vma.uffd_wp {
                    let marker_only = pte & (bits::PRESENT | PTE_PROTNONE | bits::ADDR_MASK) == 0;
                    if marker_only {
                        return;
                    }
                    pte & !PTE_UFFD_WP
                } else {
                    pte
                };
                self.set_pte(&ptl, va - old_addr + new_addr, dst, pte);
            });
            if force_flush && m.policy.mremap_flush_under_ptl {
                self.flush_tlb_range(old_addr, old_end, cpu);
            } else if force_flush {
                self.mremap_flush_deferred.fetch_add(1, Ordering::AcqRel);
            }
        }
        let _ = m.hooks.at(Point::MremapAfterMovePtes, cpu, Some(old_addr));
        force_flush && !m.policy.mremap_flush_under_ptl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_align_rounds_up_and_refuses_overflow() {
        assert_eq!(page_align(1), Ok(PAGE_SIZE));
        assert_eq!(page_align(0), Ok(0));
        assert_eq!(page_align(u64::MAX), Err(MmError::Inval));
    }
}
