//! The calls that change an address space: `mmap`, `munmap`, `mprotect`,
//! `madvise(MADV_DONTNEED)`, and the teardown at exit. Models mm/mmap.c,
//! mm/mprotect.c and mm/madvise.c for anonymous private memory.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use cowlab_abi::layout::{PAGE_SIZE, USER_END, USER_MIN_ADDR};

use super::memory::{PTE_PROTNONE, PTE_UFFD_WP};
use super::mm_struct::{prot, Mm, Vma};
use super::pagetable::{self, bits};
use super::swapfile::is_swap_pte;
use crate::hooks::Point;

/// Why a call failed, as the errno Linux returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MmError {
    /// EINVAL: misaligned, empty or out-of-range arguments.
    #[error("invalid argument")]
    Inval,
    /// ENOMEM: no room for the mapping, or the range is not all mapped.
    #[error("out of memory or range not mapped")]
    NoMem,
    /// EINTR: a wait was ended by the VM stopping the thread.
    #[error("interrupted")]
    Interrupted,
    /// EFAULT: no VMA where one is needed (mremap's old range).
    #[error("bad address")]
    Fault,
}

impl MmError {
    /// The negative errno a guest sees.
    pub fn errno(self) -> i64 {
        match self {
            MmError::Inval => -22,
            MmError::NoMem => -12,
            MmError::Interrupted => -4,
            MmError::Fault => -14,
        }
    }
}

/// Gap left between consecutive mappings, so neighbours never merge.
const GUARD_GAP: u64 = PAGE_SIZE;

pub(crate) fn page_range(addr: u64, len: u64) -> Result<(u64, u64), MmError> {
    if !addr.is_multiple_of(PAGE_SIZE) || len == 0 {
        return Err(MmError::Inval);
    }
    let end = addr
        .checked_add(
            len.checked_next_multiple_of(PAGE_SIZE)
                .ok_or(MmError::Inval)?,
        )
        .ok_or(MmError::Inval)?;
    if addr < USER_MIN_ADDR || end > USER_END {
        return Err(MmError::Inval);
    }
    Ok((addr, end))
}

impl Mm {
    /// Maps `len` bytes of anonymous private memory with `prot`, at `addr`
    /// if given (it must be free), else top-down below the last mapping.
    /// Models mm/mmap.c:do_mmap() for MAP_PRIVATE|MAP_ANONYMOUS
    /// (with MAP_FIXED_NOREPLACE when `addr` is given).
    pub fn mmap(&self, addr: Option<u64>, len: u64, prot_bits: u32) -> Result<u64, MmError> {
        if len == 0 || prot_bits & !prot::ALL != 0 {
            return Err(MmError::Inval);
        }
        let len = len
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or(MmError::NoMem)?;
        let _mmap = self.mmap_write_lock();
        let start = match addr {
            Some(a) => {
                let (start, end) = page_range(a, len)?;
                if !self.vmas_in(start, end).is_empty() {
                    return Err(MmError::NoMem);
                }
                start
            }
            None => self.get_unmapped_area(len)?,
        };
        let vma = Vma::new(start, start + len, prot_bits);
        self.vmas
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(start, vma);
        Ok(start)
    }

    /// A free range of `len` bytes below the lowest top-down mapping.
    /// Models mm/mmap.c:get_unmapped_area() (top-down, no reuse of holes).
    pub(crate) fn get_unmapped_area(&self, len: u64) -> Result<u64, MmError> {
        let base = self.mmap_base.load(Ordering::Acquire);
        let start = base
            .checked_sub(len)
            .filter(|s| *s >= USER_MIN_ADDR)
            .ok_or(MmError::NoMem)?;
        if !self.vmas_in(start, base).is_empty() {
            return Err(MmError::NoMem);
        }
        self.mmap_base.store(start - GUARD_GAP, Ordering::Release);
        Ok(start)
    }

    /// Replaces the VMAs overlapping `[start, end)` by pieces split at
    /// `start` and `end`, with `f` giving the pieces inside their
    /// protection and uffd-wp registration (`None` removes them). The
    /// replaced VMAs are write-locked and detached, so faults that hold
    /// them finish first; the new pieces are write-locked from birth, so
    /// faults on the range fall back to `mmap_lock` and wait until the
    /// caller's whole change (e.g. mprotect's PTE rewrite and flush) is
    /// done, as Linux's VMA write locks last until mmap_write_unlock().
    /// Lock contract: caller holds `mmap_lock` for write. Models
    /// mm/vma.c:vma_prepare() + split_vma() + the maple-tree update.
    pub(crate) fn replace_vmas(
        &self,
        start: u64,
        end: u64,
        f: impl Fn(&Vma) -> Option<(u32, bool)>,
    ) {
        self.replace_vmas_with(start, end, |v, lo, hi| {
            f(v).map(|(p, uffd_wp)| Vma::build(lo, hi, p, uffd_wp, v.dontcopy))
        });
    }

    /// [`Mm::replace_vmas`] with `f` building the piece of each old VMA
    /// inside `[start, end)` (given the old VMA and the piece's bounds),
    /// so any flag may change. The pieces outside keep every flag.
    /// Lock contract: caller holds `mmap_lock` for write.
    pub(crate) fn replace_vmas_with(
        &self,
        start: u64,
        end: u64,
        f: impl Fn(&Vma, u64, u64) -> Option<Arc<Vma>>,
    ) {
        let old = self.vmas_in(start, end);
        for vma in &old {
            vma.start_write_and_detach(self);
        }
        let mut tree = self.vmas.write().unwrap_or_else(|e| e.into_inner());
        for vma in old {
            tree.remove(&vma.start);
            if vma.start < start {
                let piece = vma.dup_at(vma.start, start);
                tree.insert(vma.start, piece.born_write_locked(self));
            }
            if vma.end > end {
                let piece = vma.dup_at(end, vma.end);
                tree.insert(end, piece.born_write_locked(self));
            }
            let (lo, hi) = (vma.start.max(start), vma.end.min(end));
            if let Some(piece) = f(&vma, lo, hi) {
                tree.insert(lo, piece.born_write_locked(self));
            }
        }
    }

    /// Unmaps `[addr, addr + len)`: the VMAs go, the pages are zapped and
    /// flushed from every CPU, then freed. Models mm/mmap.c:do_vmi_munmap().
    /// Lock contract: takes `mmap_lock` for write (the VMAs stay
    /// write-locked until it is released).
    pub fn munmap(&self, addr: u64, len: u64, cpu: Option<usize>) -> Result<(), MmError> {
        let (start, end) = page_range(addr, len)?;
        let _mmap = self.mmap_write_lock();
        self.replace_vmas(start, end, |_| None);
        self.zap_page_range(start, end, cpu);
        Ok(())
    }

    /// Changes the protection of `[addr, addr + len)`, which must be mapped.
    /// Write-protecting or revoking access changes the PTEs and flushes the
    /// range — unless `defer_flush`, which leaves `tlb_flush_pending` raised
    /// and the CPUs' entries as they are until [`Mm::flush_deferred`]: the
    /// window the deferred flushes of uffd-wp and fork open. Adding write
    /// maps exclusive anonymous pages writable at once
    /// (`can_change_pte_writable`) and leaves the others read-only (the next
    /// write fault reuses or copies).
    /// Models mm/mprotect.c:do_mprotect_pkey() → change_protection().
    ///
    /// Lock contract: takes `mmap_lock` for write; the new VMAs stay
    /// write-locked until it is released, so faults on the range wait for
    /// the PTE rewrite and its flush; `tlb_flush_pending` is raised before
    /// the first PTE changes.
    pub fn mprotect(
        &self,
        addr: u64,
        len: u64,
        prot_bits: u32,
        defer_flush: bool,
        cpu: Option<usize>,
    ) -> Result<(), MmError> {
        let (start, end) = page_range(addr, len)?;
        if prot_bits & !prot::ALL != 0 {
            return Err(MmError::Inval);
        }
        let _mmap = self.mmap_write_lock();
        if !self.covered(start, end) {
            return Err(MmError::NoMem);
        }
        self.replace_vmas(start, end, |v| Some((prot_bits, v.uffd_wp)));
        self.inc_tlb_flush_pending();
        let downgraded = self.change_protection(start, end, prot_bits);
        let _ = self
            .m
            .hooks
            .at(Point::MprotectAfterChange, cpu, Some(start));
        if defer_flush {
            return Ok(());
        }
        if downgraded {
            self.flush_tlb_range(start, end, cpu);
        }
        self.dec_tlb_flush_pending();
        Ok(())
    }

    /// Performs a flush that `mprotect(..., defer_flush)` left pending.
    pub fn flush_deferred(&self, addr: u64, len: u64, cpu: Option<usize>) -> Result<(), MmError> {
        let (start, end) = page_range(addr, len)?;
        self.flush_tlb_range(start, end, cpu);
        if self.tlb_flush_pending.load(Ordering::Acquire) > 0 {
            self.dec_tlb_flush_pending();
        }
        Ok(())
    }

    /// Rewrites the PTEs of `[start, end)` for `prot_bits`; true if any
    /// lost a permission. Models mm/mprotect.c:change_pte_range().
    /// Lock contract: called with `mmap_lock` held for write; takes the PTL.
    fn change_protection(&self, start: u64, end: u64, prot_bits: u32) -> bool {
        let m = &self.m;
        let accessible = prot_bits & (prot::READ | prot::WRITE) != 0;
        let mut downgraded = false;
        let ptl = self.ptl();
        pagetable::for_each_leaf(&*m.mem, self.pgd, start, end, &mut |va, slot| {
            let old = slot.load(Ordering::Acquire);
            if is_swap_pte(old) {
                // change_pte_range() leaves a plain swap entry alone.
                return;
            }
            let mut new = if accessible {
                (old & !PTE_PROTNONE) | bits::PRESENT
            } else {
                (old & !bits::PRESENT) | PTE_PROTNONE
            };
            if prot_bits & prot::WRITE == 0 {
                new &= !bits::WRITABLE;
            } else if self.can_change_pte_writable(new) {
                new |= bits::WRITABLE;
            }
            downgraded |= (old & bits::PRESENT != 0 && new & bits::PRESENT == 0)
                || (old & bits::WRITABLE != 0 && new & bits::WRITABLE == 0);
            self.set_pte(&ptl, va, slot, new);
        });
        downgraded
    }

    /// Whether mprotect may map a present PTE writable at once instead of
    /// leaving it to a write fault: a PTE of an exclusive anonymous page
    /// without the uffd-wp marker. Needs PageAnonExclusive, so only with
    /// `anon_exclusive`. Models mm/mprotect.c:can_change_pte_writable()
    /// for private anonymous memory: 64fe24a3e05e (v6.0) also required the
    /// PTE dirty; "mm/mprotect: allow clean exclusive anon pages to be
    /// writable" (N. Amit, v6.2; commit id not checked here) dropped that.
    fn can_change_pte_writable(&self, pte: u64) -> bool {
        let m = &self.m;
        let frame = pte & bits::ADDR_MASK;
        m.policy.anon_exclusive
            && pte & PTE_UFFD_WP == 0
            && pte & bits::PRESENT != 0
            && frame != m.frames.zero_page()
            && m.frames.page(frame).anon_exclusive()
    }

    /// Whether VMAs cover all of `[start, end)`.
    pub(crate) fn covered(&self, start: u64, end: u64) -> bool {
        let mut at = start;
        for vma in self.vmas_in(start, end) {
            if vma.start > at {
                return false;
            }
            at = vma.end;
        }
        at >= end
    }

    /// Drops the pages of `[addr, addr + len)`, which must be mapped: the
    /// next touch sees zeroes. Models mm/madvise.c:madvise_dontneed_single_vma().
    /// Lock contract: takes `mmap_lock` for read only: faults run
    /// concurrently, and zap_page_range()'s PTL and reference discipline
    /// is what keeps them safe.
    pub fn madvise_dontneed(&self, addr: u64, len: u64, cpu: Option<usize>) -> Result<(), MmError> {
        let (start, end) = page_range(addr, len)?;
        let _mmap = self.mmap_read_lock();
        if !self.covered(start, end) {
            return Err(MmError::NoMem);
        }
        self.zap_page_range(start, end, cpu);
        Ok(())
    }

    /// `madvise(MADV_DONTFORK)` (`dontfork`) or `madvise(MADV_DOFORK)`:
    /// sets or clears `VM_DONTCOPY` on the VMAs of `[addr, addr + len)`,
    /// splitting them at the range's ends; fork then leaves the range out
    /// of the child (see [`Mm::dup_mmap`]). PTEs and TLBs are untouched.
    /// As Linux, the mapped parts of a range with holes are changed and
    /// the call still fails with ENOMEM. Models mm/madvise.c:
    /// madvise_walk_vmas() → madvise_vma_behavior() → madvise_update_vma().
    ///
    /// Lock contract: takes `mmap_lock` for write (madvise_need_mmap_write()
    /// is true for both advices: the VMA flags change); the new VMAs stay
    /// write-locked until it is released.
    pub fn madvise_dontfork(&self, addr: u64, len: u64, dontfork: bool) -> Result<(), MmError> {
        let (start, end) = page_range(addr, len)?;
        let _mmap = self.mmap_write_lock();
        let covered = self.covered(start, end);
        if self.vmas_in(start, end).is_empty() {
            return Err(MmError::NoMem);
        }
        self.replace_vmas_with(start, end, |v, lo, hi| {
            Some(v.with_dontcopy_at(lo, hi, dontfork))
        });
        if covered {
            Ok(())
        } else {
            Err(MmError::NoMem)
        }
    }

    /// Faults in every page of `[addr, addr + len)` for writing, as
    /// MAP_POPULATE does. Models mm/gup.c:populate_vma_page_range().
    pub fn populate(&self, addr: u64, len: u64) -> Result<(), super::fault::FaultError> {
        let (start, end) = page_range(addr, len).map_err(|_| super::fault::FaultError::Segv)?;
        let _mmap = self.mmap_read_lock();
        for page in (start..end).step_by(PAGE_SIZE as usize) {
            let vma = self
                .vma_lookup(page)
                .ok_or(super::fault::FaultError::Segv)?;
            let flags = if vma.writable() {
                super::fault::FaultFlags::WRITE
            } else {
                super::fault::FaultFlags::READ
            };
            self.handle_mm_fault(&vma, page, flags, 0)?;
        }
        Ok(())
    }

    /// Tears the address space down after its last thread: every page
    /// unmapped, every page table freed. Models mm/mmap.c:exit_mmap().
    pub fn exit_mmap(&self) {
        let _mmap = self.mmap_write_lock();
        self.replace_vmas(0, u64::MAX, |_| None);
        self.zap_page_range(0, USER_END, None);
        let m = &self.m;
        let _ptl = self.ptl();
        pagetable::free_user_tables(&*m.mem, m.frames.pool(), self.pgd, &mut |_| {});
    }
}

impl Drop for Mm {
    fn drop(&mut self) {
        self.exit_mmap();
        self.m.frames.pool().free(self.pgd);
    }
}

/// Makes a thread stack for CPU `cpu`: a VMA below its stack top.
pub fn map_stack(mm: &Arc<Mm>, top: u64, size: u64) -> Result<(), MmError> {
    mm.mmap(Some(top - size), size, prot::READ | prot::WRITE)
        .map(|_| ())
}
