//! fork: the child's address space as a copy-on-write copy of the parent's.
//! Models kernel/fork.c:dup_mmap() and mm/memory.c:copy_page_range() →
//! copy_pte_range() → copy_present_pte() / copy_present_page().

use super::sync::Ordering;
use std::sync::Arc;

use cowlab_abi::layout::USER_END;

use super::fault::FaultError;
use super::memory::PTE_PROTNONE;
use super::mm_struct::{Mm, PtlGuard, Vma};
use super::page::GUP_PIN_COUNTING_BIAS;
use super::pagetable::{self, bits};
use super::phys::Word;
use super::swapfile::{is_swap_pte, swp_offset, PTE_SWP_EXCLUSIVE, PTE_SWP_UFFD_WP};
use super::tlb::user_pte;
use crate::hooks::Point;

impl Mm {
    /// A new address space for a child of this one: every VMA copied
    /// except those with `VM_DONTCOPY` (`madvise(MADV_DONTFORK)`), every
    /// private anonymous page shared copy-on-write (write-protected in both)
    /// or, if it may be pinned, copied now. The parent's VMAs are
    /// write-locked for the whole copy when `fork_lock_vmas` (fb49c455323f,
    /// v6.5), and the parent's TLB is flushed only at the end, as in Linux: until then
    /// other CPUs may still write through their old writable entries.
    /// Models kernel/fork.c:dup_mmap().
    ///
    /// Lock contract: takes the parent's `mmap_lock` for write (and, with
    /// `fork_lock_vmas`, write-locks every parent VMA until it is
    /// released) for the whole copy and the final flush.
    pub fn dup_mmap(self: &Arc<Self>, cpu: Option<usize>) -> Result<Arc<Mm>, FaultError> {
        let child = Mm::new(&self.m)?;
        let _mmap = self.mmap_write_lock_for("fork");
        let vmas = self.vmas_in(0, u64::MAX);
        // vma_start_write() on every parent VMA: faults under per-VMA locks
        // finish first, and new ones fall back to mmap_lock and wait until
        // fork releases it.
        if self.m.policy.fork_lock_vmas {
            for v in &vmas {
                v.vma_start_write(self);
            }
        }
        let _ = self.m.hooks.at(Point::ForkEnter, cpu, None);
        self.fork_flush_deferred.fetch_add(1, Ordering::AcqRel);
        // VM_DONTCOPY (MADV_DONTFORK): the child gets nothing there, so
        // its accesses fault SIGSEGV, and the parent's PTEs, pages and
        // pins are left alone.
        let copied = vmas.iter().filter(|vma| !vma.dontcopy);
        let result = copied.clone().try_for_each(|vma| {
            child
                .vmas
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(vma.start, Vma::new(vma.start, vma.end, vma.prot));
            self.copy_page_range(&child, vma, cpu)
        });
        child
            .mmap_base
            .store(self.mmap_base.load(Ordering::Acquire), Ordering::Release);
        let _ = self.m.hooks.at(Point::ForkBeforeFlush, cpu, None);
        self.flush_tlb_mm(cpu);
        self.fork_flush_deferred.fetch_sub(1, Ordering::AcqRel);
        let _ = self.m.hooks.at(Point::ForkAfterFlush, cpu, None);
        result.map(|()| child)
    }

    /// Copies the PTEs of `vma` into `child` under both PTLs, held across
    /// a batch of PTEs as Linux holds them: within one leaf table, and
    /// dropped whenever 32 units of progress are done (a present PTE counts
    /// 8, as in Linux, where the locks may be dropped there if someone
    /// waits; here they always are, so other threads' faults can run
    /// wherever they can run in Linux). The child's leaf table is looked
    /// up (or allocated) once per table, not once per PTE. While hooks are
    /// armed (a schedule, rules, chaos, exploration), the PTLs are taken
    /// around each PTE instead, so `fork:after_wrprotect` is reached with
    /// none held and faults can be placed between any two copies.
    /// Models mm/memory.c:copy_page_range() → copy_pte_range().
    ///
    /// Lock contract: called with the parent's `mmap_lock` held for write;
    /// takes the parent's then the child's PTL around each batch of PTEs
    /// (each PTE while hooks are armed) and drops both before returning.
    /// With `gup_fast_fork_seqcount`, the parent's `write_protect_seq` is
    /// odd for the whole copy (GUP-fast, which takes neither lock, reads
    /// it instead).
    fn copy_page_range(&self, child: &Mm, vma: &Vma, cpu: Option<usize>) -> Result<(), FaultError> {
        /// copy_pte_range()'s `progress` threshold and a present PTE's share.
        const PROGRESS_BREAK: u32 = 32;
        const PROGRESS_PER_PTE: u32 = 8;
        let m = &self.m;
        // raw_write_seqcount_begin(&src_mm->write_protect_seq) for a COW
        // mapping (every VMA here is private anonymous): a GUP-fast pin
        // that overlaps this copy sees the count change and backs off
        // (57efa1fe5957). Write-locking the parent's `mmap_lock`
        // serializes the writers.
        let seq = m
            .policy
            .gup_fast_fork_seqcount
            .then(|| WriteProtectSeq::begin(self));
        let mut result = Ok(());
        let mut held: Option<(PtlGuard<'_>, PtlGuard<'_>)> = None;
        let mut progress = 0;
        // The child's leaf table for the 2 MiB at `.0` (va >> 21), if known.
        let mut dst_table: Option<(u64, u64)> = None;
        pagetable::for_each_leaf(
            &*m.mem,
            self.pgd,
            vma.start,
            vma.end.min(USER_END),
            &mut |va, src| {
                let pte = src.load(Ordering::Acquire);
                if result.is_err()
                    || (pte & (bits::PRESENT | PTE_PROTNONE) == 0 && !is_swap_pte(pte))
                {
                    return;
                }
                let table_of_va = va >> 21;
                if progress >= PROGRESS_BREAK || dst_table.is_some_and(|(t, _)| t != table_of_va) {
                    // The end of a batch, or of the leaf table
                    // (copy_pmd_range() calls copy_pte_range() per table).
                    held = None;
                    progress = 0;
                }
                let ptls = held.get_or_insert_with(|| (self.ptl(), child.ptl()));
                let ptls = (&ptls.0, &ptls.1);
                let was = src.load(Ordering::Acquire);
                let dst = match dst_table {
                    Some((t, table)) if t == table_of_va => Ok(table),
                    _ => pagetable::leaf_table(&*m.mem, m.frames.pool(), child.pgd, va)
                        .inspect(|table| dst_table = Some((table_of_va, *table))),
                };
                result = dst
                    .map(|table| pagetable::leaf_table_slot(&*m.mem, table, va))
                    .map_err(FaultError::from)
                    .and_then(|dst| {
                        if is_swap_pte(was) {
                            self.copy_nonpresent_pte(ptls, child, va, src, dst);
                            Ok(())
                        } else {
                            self.copy_present_pte(ptls, child, vma, va, src, dst, cpu)
                        }
                    });
                let wrprotected =
                    was & bits::WRITABLE != 0 && src.load(Ordering::Acquire) & bits::WRITABLE == 0;
                progress += PROGRESS_PER_PTE;
                if m.hooks.active() {
                    held = None;
                    progress = 0;
                }
                if wrprotected {
                    let _ = m.hooks.at(Point::ForkAfterWrprotect, cpu, Some(va));
                }
            },
        );
        drop(held);
        drop(seq);
        result
    }

    /// Copies one present PTE: shares the page copy-on-write, or copies it
    /// when it is exclusive and maybe pinned. Models
    /// mm/memory.c:copy_present_pte().
    ///
    /// Lock contract: called with both PTLs held (`ptls`: the parent's,
    /// the child's; returns with them held): the reference and the rmap
    /// are taken while the parent's PTE, which holds them, cannot change.
    #[allow(clippy::too_many_arguments)]
    fn copy_present_pte(
        &self,
        ptls: (&PtlGuard<'_>, &PtlGuard<'_>),
        child: &Mm,
        vma: &Vma,
        va: u64,
        src: &Word,
        dst: &Word,
        cpu: Option<usize>,
    ) -> Result<(), FaultError> {
        let m = &self.m;
        let pte = src.load(Ordering::Acquire);
        let frame = pte & bits::ADDR_MASK;
        if !m.frames.is_normal(frame) {
            // The zero page: nothing to count, read-only already.
            child.set_pte(ptls.1, va, dst, pte);
            return Ok(());
        }
        let page = m.frames.page(frame);
        let policy = &m.policy;
        // With PageAnonExclusive, folio_try_dup_anon_rmap_pte() refuses an
        // exclusive maybe-pinned page; before it, page_needs_cow_for_dma().
        let maybe_pinned =
            self.has_pinned.load(Ordering::Acquire) && folio_maybe_dma_pinned(page.refcount());
        if policy.fork_copy_pinned
            && maybe_pinned
            && (!policy.anon_exclusive || page.anon_exclusive())
        {
            return self.copy_present_page(ptls, child, vma, va, src, dst, cpu);
        }
        m.frames.get_page(frame);
        m.frames.dup_rmap(frame);
        page.clear_anon_exclusive();
        // A private writable mapping: write-protect both sides (COW).
        let shared = pte & !bits::WRITABLE;
        if pte & bits::WRITABLE != 0 {
            // The page was found not maybe-pinned and is now shared; a
            // GUP-fast pin taken from here to the write-protect below is
            // what write_protect_seq catches.
            let _ = m.hooks.at(Point::ForkBeforeWrprotect, cpu, Some(va));
            self.set_pte(ptls.0, va, src, shared);
        }
        child.set_pte(ptls.1, va, dst, shared);
        Ok(())
    }

    /// Copies a swap PTE: one more swap count on its slot
    /// (`swap_duplicate()`), and the exclusive bit cleared in both, since
    /// the page will be shared once swapped in (1493a1913e34, v5.19).
    /// Models mm/memory.c:copy_nonpresent_pte() for a swap entry.
    ///
    /// Lock contract: called with both PTLs held (`ptls`: the parent's,
    /// the child's; returns with them held), so the parent's swap PTE, which
    /// holds the slot, cannot be zapped or swapped in meanwhile.
    fn copy_nonpresent_pte(
        &self,
        ptls: (&PtlGuard<'_>, &PtlGuard<'_>),
        child: &Mm,
        va: u64,
        src: &Word,
        dst: &Word,
    ) {
        let pte = src.load(Ordering::Acquire);
        self.m.swap.swap_duplicate(swp_offset(pte));
        let shared = pte & !PTE_SWP_EXCLUSIVE;
        if pte != shared {
            self.set_pte(ptls.0, va, src, shared);
        }
        // The child does not inherit uffd-wp registration: no marker.
        child.set_pte(ptls.1, va, dst, shared & !PTE_SWP_UFFD_WP);
    }

    /// Gives the child its own copy of a maybe-pinned exclusive page, with a
    /// plain copy while the parent's threads may be writing it (seed 002)
    /// — unless `fork_wrprotect_pinned`, which write-protects the parent's
    /// PTE and flushes first, so writers fault and wait for the fork.
    /// Models mm/memory.c:copy_present_page().
    ///
    /// Lock contract: called with both PTLs held (`ptls`: the parent's,
    /// the child's; returns with them held), so the parent's page, mapped by the PTE, is not freed under the
    /// copy (Linux preallocates the page outside the locks and retries;
    /// allocating here never sleeps).
    #[allow(clippy::too_many_arguments)]
    fn copy_present_page(
        &self,
        ptls: (&PtlGuard<'_>, &PtlGuard<'_>),
        child: &Mm,
        vma: &Vma,
        va: u64,
        src: &Word,
        dst: &Word,
        cpu: Option<usize>,
    ) -> Result<(), FaultError> {
        let m = &self.m;
        let frame = src.load(Ordering::Acquire) & bits::ADDR_MASK;
        let new = m.frames.alloc_uninit()?;
        if m.policy.fork_wrprotect_pinned {
            self.set_pte(
                ptls.0,
                va,
                src,
                src.load(Ordering::Acquire) & !bits::WRITABLE,
            );
            self.flush_tlb_page(va, cpu);
        }
        let _ = m.hooks.at(Point::ForkBeforeCopyPage, cpu, Some(va));
        m.mem.copy_frame(new, frame);
        if let Some(t) = self.trace() {
            t.emit(crate::trace::Kind::Copy, &[va, frame, new], "");
        }
        let _ = m.hooks.at(Point::ForkAfterCopyPage, cpu, Some(va));
        m.frames.add_new_anon_rmap(new);
        child.set_pte(ptls.1, va, dst, user_pte(new, vma.writable()));
        Ok(())
    }
}

/// `raw_write_seqcount_begin()` .. `raw_write_seqcount_end()` on
/// `mm->write_protect_seq`: odd while held. Models the seqcount_t writer.
struct WriteProtectSeq<'a>(&'a super::sync::AtomicU64);

impl<'a> WriteProtectSeq<'a> {
    fn begin(mm: &'a Mm) -> Self {
        // SeqCst: the increment is ordered before fork's reads of the
        // refcounts, as GUP-fast's grab is before its re-read of the count.
        mm.write_protect_seq.fetch_add(1, Ordering::SeqCst);
        WriteProtectSeq(&mm.write_protect_seq)
    }
}

impl Drop for WriteProtectSeq<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Whether a small folio with this refcount may be pinned (false positives
/// allowed). Models include/linux/mm.h:folio_maybe_dma_pinned().
pub fn folio_maybe_dma_pinned(refcount: i64) -> bool {
    refcount >= GUP_PIN_COUNTING_BIAS
}
