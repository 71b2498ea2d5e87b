//! Swapping anonymous pages out and in: MADV_PAGEOUT's reclaim
//! (mm/madvise.c → mm/vmscan.c:shrink_folio_list() → mm/rmap.c:
//! try_to_unmap_one()) and the swap-in fault (mm/memory.c:do_swap_page()),
//! over the swap device of [`super::swapfile`].

use super::sync::Ordering;

use super::fault::{FaultError, FaultFlags, VmFault};
use super::fork::folio_maybe_dma_pinned;
use super::memory::PTE_UFFD_WP;
use super::mm_struct::Mm;
use super::mmap::{page_range, MmError};
use super::pagetable::{self, bits};
use super::swapfile::{pte_swp_exclusive, swp_entry_to_pte, swp_offset, PTE_SWP_UFFD_WP};
use super::tlb::user_pte;
use crate::policy::SwapinReuse;
use crate::trace::{Kind, Resolution};

impl Mm {
    /// Pages out the anonymous pages of `[addr, addr + len)` that are
    /// mapped only here: each goes to the swap cache, its PTE becomes a
    /// swap entry (flushed from every CPU), and, if nobody else holds it,
    /// it is written to its slot and freed. Models mm/madvise.c:
    /// madvise_pageout() → madvise_cold_or_pageout_pte_range() (which skips
    /// pages mapped more than once, `folio_mapcount() != 1`, since
    /// 1a4e58cce84e "mm: introduce MADV_PAGEOUT", v5.4) → mm/vmscan.c:
    /// reclaim_pages().
    ///
    /// Lock contract: takes `mmap_lock` for read (faults run concurrently);
    /// isolates the pages (one reference each) under the PTL, then
    /// reclaims each with no lock held but what [`Mm::try_to_unmap_one`]
    /// takes.
    pub fn madvise_pageout(&self, addr: u64, len: u64, cpu: Option<usize>) -> Result<(), MmError> {
        let (start, end) = page_range(addr, len)?;
        let m = &self.m;
        let _mmap = self.mmap_read_lock();
        if !self.covered(start, end) {
            return Err(MmError::NoMem);
        }
        let mut isolated = Vec::new();
        {
            let _ptl = self.ptl();
            pagetable::for_each_leaf(&*m.mem, self.pgd, start, end, &mut |va, slot| {
                let pte = slot.load(Ordering::Acquire);
                let frame = pte & bits::ADDR_MASK;
                if pte & bits::PRESENT == 0
                    || !m.frames.is_normal(frame)
                    || m.frames.page(frame).mapcount() != 1
                    || !m.frames.page(frame).isolate_lru()
                {
                    return;
                }
                // folio_isolate_lru(): reclaim's own reference.
                m.frames.get_page(frame);
                isolated.push((va, frame));
            });
        }
        for (va, frame) in isolated {
            self.shrink_folio(va, frame, cpu);
            m.frames.page(frame).putback_lru();
            m.frames.put_page(frame);
        }
        Ok(())
    }

    /// Reclaims one isolated anonymous page mapped (at most) at `va` here.
    /// Models the anonymous path of mm/vmscan.c:shrink_folio_list(): a
    /// maybe-pinned page is not added to the swap cache (`pageout_skip_pinned`,
    /// feb889fb40fa, v5.11); add_to_swap(); try_to_unmap(); then pageout()
    /// and __remove_mapping() if nobody else holds it.
    ///
    /// Lock contract: called with `mmap_lock` held for read and the
    /// caller's isolation reference on `frame`, without the PTL; holds the
    /// page lock (trylock: a locked page is skipped) across add_to_swap(),
    /// try_to_unmap() and pageout(), as Linux does, so no fault or zap can
    /// take the page out of the swap cache in between.
    fn shrink_folio(&self, va: u64, frame: u64, cpu: Option<usize>) {
        let page = self.m.frames.page(frame);
        // folio_trylock(): the swap cache may change only under the lock.
        if !page.trylock() {
            return;
        }
        self.shrink_locked_folio(va, frame, cpu);
        page.unlock();
    }

    /// [`Mm::shrink_folio`] with the page locked: nobody else can take it
    /// out of the swap cache, so its slot stays its own.
    fn shrink_locked_folio(&self, va: u64, frame: u64, cpu: Option<usize>) {
        let m = &self.m;
        let page = m.frames.page(frame);
        let offset = match page.swapcache() {
            Some(offset) => offset,
            None => {
                if m.policy.pageout_skip_pinned && folio_maybe_dma_pinned(page.refcount()) {
                    return;
                }
                let Some(offset) = m.swap.add_to_swap(&m.frames, frame) else {
                    return;
                };
                offset
            }
        };
        self.try_to_unmap_one(va, frame, offset, cpu);
        // Unmapped (by us, or by a zap meanwhile): write it out and free it.
        if page.mapcount() == 0 && !m.swap.pageout(&*m.mem, &m.frames, frame) {
            // Someone else still holds it (a pin, a pipe, a zap about to
            // drop its reference): it stays, unwritten, in the swap cache
            // for its swap PTE. If no swap PTE names the slot (a zap took
            // the mapping meanwhile), Linux leaves it for a later reclaim
            // pass; the model has none, so it leaves the cache now.
            m.swap.folio_free_swap(&m.frames, frame);
        }
    }

    /// Replaces the PTE at `va` that maps `frame` by a swap entry for slot
    /// `offset` (with the exclusive bit if the page was `PageAnonExclusive`)
    /// and flushes it from every CPU of this mm; false if the PTE no longer
    /// maps the page, or if the page is exclusive and may be pinned, which
    /// cannot be shared with the swap cache (folio_try_share_anon_rmap_pte()
    /// fails; 6c287605fd56, v5.19). Models mm/rmap.c:try_to_unmap_one()
    /// for an anonymous page.
    ///
    /// Lock contract: takes the PTL; changes the PTE and flushes under it
    /// (ptep_clear_flush()), then drops the mapping's rmap and reference;
    /// the caller's isolation reference keeps the page.
    fn try_to_unmap_one(&self, va: u64, frame: u64, offset: u64, cpu: Option<usize>) -> bool {
        let m = &self.m;
        let ptl = self.ptl();
        let Some(slot) = pagetable::existing_leaf_slot(&*m.mem, self.pgd, va) else {
            return false;
        };
        let pte = slot.load(Ordering::Acquire);
        if pte & bits::PRESENT == 0 || pte & bits::ADDR_MASK != frame {
            return false;
        }
        let page = m.frames.page(frame);
        let exclusive = m.policy.anon_exclusive && page.anon_exclusive();
        if exclusive && folio_maybe_dma_pinned(page.refcount()) {
            return false;
        }
        m.swap.swap_duplicate(offset);
        page.clear_anon_exclusive();
        let swp = swp_entry_to_pte(offset, exclusive, pte & PTE_UFFD_WP != 0);
        self.set_pte(&ptl, va, slot, swp);
        self.flush_tlb_page(va, cpu);
        m.frames.remove_rmap(frame);
        m.frames.put_page(frame);
        true
    }

    /// Whether a page about to be mapped (or mapped once) is ours alone by
    /// its mapcount plus the swap count of its slot; if exactly one and the
    /// page is in the swap cache, it leaves the cache. Blind to other
    /// references (GUP). Models mm/swapfile.c:reuse_swap_page(), used by
    /// do_swap_page() until c145e0b47c77 (v5.18) and by do_wp_page()
    /// before 09854ba94c6a (v5.9).
    ///
    /// Lock contract: called with the PTL and the page lock held.
    pub(super) fn reuse_swap_page(&self, frame: u64) -> bool {
        let m = &self.m;
        let page = m.frames.page(frame);
        let swapcount = page.swapcache().map_or(0, |s| m.swap.swap_count(s));
        let count = page.mapcount() + i64::from(swapcount);
        if count == 1 && page.swapcache().is_some() {
            // delete_from_swap_cache(): nobody else can map it again.
            // The count that remains is the faulting PTE's own, freed by
            // its swap_free() just after; the cache goes now.
            m.swap.delete_from_swap_cache(&m.frames, frame);
        }
        count <= 1
    }

    /// A fault on a swap PTE: find the page in the swap cache or read it
    /// from its slot, map it, free the PTE's swap count; map it writable
    /// if it is ours alone — before c145e0b47c77 (v5.18) by
    /// `reuse_swap_page()` on a write fault (mapcount + swap count,
    /// blind to GUP references), after it by refcount 1 once the swap
    /// cache is dropped, or at once if the swap PTE carries the exclusive
    /// bit (1493a1913e34, v5.19); on a read fault too since c18160dba5ff
    /// (v6.11, `swapin_map_writable`). A write that could not reuse then
    /// goes on to do_wp_page(). Models mm/memory.c:do_swap_page().
    ///
    /// Lock contract: called with the VMA held, without the PTL; allocates
    /// without it, then takes it and gives up if the PTE changed
    /// (pte_same); maps under it; calls do_wp_page() after releasing it.
    pub(super) fn do_swap_page(&self, vmf: &VmFault<'_>) -> Result<(), FaultError> {
        let m = &self.m;
        let policy = &m.policy;
        let entry = vmf.orig_pte;
        let offset = swp_offset(entry);
        let write = vmf.flags.write;
        // swapin_readahead(): the page is read without the PTL.
        let new = if m.swap.cached(offset) {
            None
        } else {
            Some(self.alloc_data_page(vmf.cpu, vmf.address, None)?)
        };
        let ptl = self.ptl();
        if !vmf.pte_same(&ptl) {
            drop(ptl);
            if let Some(new) = new {
                m.frames.put_page(new);
            }
            return Ok(());
        }
        let frame = match new {
            Some(new) => m.swap.swapin(&*m.mem, &m.frames, offset, new),
            None => m.swap.swap_cache_get_folio(&m.frames, offset),
        };
        let Some(frame) = frame else {
            // The cached page was freed between the hint and the lock:
            // fault again.
            return Ok(());
        };
        let page = m.frames.page(frame);
        // folio_lock_or_retry(): a page reclaim holds is waited for by
        // faulting again.
        if !page.trylock() {
            drop(ptl);
            m.frames.put_page(frame);
            super::sync::yield_now();
            return Ok(());
        }
        let uffd_wp = entry & PTE_SWP_UFFD_WP != 0 && vmf.vma.uffd_wp();
        let (exclusive, mut writable) = match policy.swapin_reuse {
            SwapinReuse::Swapcount => {
                let reuse = write && self.reuse_swap_page(frame);
                (reuse, reuse && vmf.vma.writable() && !uffd_wp)
            }
            SwapinReuse::Refcount => {
                let bit = policy.anon_exclusive && pte_swp_exclusive(entry);
                m.swap.swap_free(offset);
                // should_try_to_free_swap(): a writer hoping to be alone.
                if write && page.swapcache().is_some() && page.refcount() == 2 {
                    m.swap.folio_free_swap(&m.frames, frame);
                }
                let exclusive = bit || page.refcount() == 1;
                let may_write = write || policy.swapin_map_writable;
                (
                    exclusive,
                    exclusive && may_write && vmf.vma.writable() && !uffd_wp,
                )
            }
        };
        // The page's reference taken above is the new mapping's.
        m.frames.dup_rmap(frame);
        if exclusive {
            page.set_anon_exclusive();
        }
        if policy.swapin_reuse == SwapinReuse::Swapcount {
            m.swap.swap_free(offset);
        }
        writable &= vmf.vma.writable();
        let mut pte = user_pte(frame, writable);
        if writable && write {
            pte |= bits::DIRTY;
        }
        if uffd_wp {
            pte |= PTE_UFFD_WP;
        }
        self.set_pte(&ptl, vmf.address, vmf.pte, pte);
        page.unlock();
        if let Some(t) = self.trace() {
            t.emit(Kind::Resolve, &[vmf.address, Resolution::SwapIn.code()], "");
        }
        drop(ptl);
        if write && !writable {
            // The write goes on as a COW fault on the page just mapped.
            return self.do_wp_page(&VmFault {
                orig_pte: pte,
                flags: FaultFlags::WRITE,
                ..*vmf
            });
        }
        Ok(())
    }
}
