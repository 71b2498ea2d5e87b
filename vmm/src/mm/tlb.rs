//! Per-vCPU shadow page tables: the TLB model (docs/design.md §4).
//!
//! The table in a vCPU's CR3 is its shadow table. Its kernel part points at
//! the shared, permanent kernel mapping; its user part holds exactly the
//! translations that CPU's TLB holds, filled one page at a time on misses
//! from the logical page table of its `mm`, and removed only by flushes
//! (or by eviction when `tlb_capacity` is set). A write-protect in the
//! logical table therefore leaves other CPUs' writable entries in place
//! until a flush reaches them: that is the staleness the seeds are about.
//!
//! Removing an entry also makes the hardware forget it
//! ([`PhysMem::revoke`]); the CPU's own hardware flush (interrupt, CR3
//! reload, acknowledgement) is asked of a [`CpuFlusher`], which the KVM
//! layer implements with vCPU kicks and unit tests with host threads.

use std::collections::BTreeSet;
use std::sync::Arc;

use std::sync::RwLock;

use super::sync::{Mutex, MutexGuard, Ordering};

use cowlab_abi::layout::PAGE_SIZE;

use super::frame::{FrameAllocator, OutOfFrames};
use super::pagetable::{self, bits, ENTRIES, KERNEL_PML4_START};
use super::phys::PhysMem;

/// Makes a CPU's hardware TLB forget what its shadow table no longer holds.
pub trait CpuFlusher: Send + Sync {
    /// Flushes `cpu`'s hardware TLB and waits for its acknowledgement, like
    /// the IPI of `flush_tlb_multi()`. `initiator` is the CPU asking, or
    /// `None` for a VMM thread; a CPU's own flush is local and never waits.
    fn flush_cpu(&self, cpu: usize, initiator: Option<usize>);
}

/// A flusher for CPUs whose hardware never caches anything beyond the
/// shadow tables (host threads in unit tests).
#[derive(Debug, Default)]
pub struct NoHardware;

impl CpuFlusher for NoHardware {
    fn flush_cpu(&self, _cpu: usize, _initiator: Option<usize>) {}
}

/// One CPU's TLB, as a shadow page table.
#[derive(Debug)]
pub struct ShadowTlb {
    root: u64,
    /// Pages with a translation, for range flushes and random eviction.
    entries: BTreeSet<u64>,
    fills: u64,
    evictions: u64,
    /// State of the eviction RNG (xorshift64).
    rng: u64,
}

impl ShadowTlb {
    /// An empty TLB whose kernel part is `kernel_pml4` (the PML4 slots from
    /// [`KERNEL_PML4_START`] up, shared by every address space).
    pub fn new<M: PhysMem + ?Sized>(
        mem: &M,
        frames: &FrameAllocator,
        kernel_pml4: &[u64; (ENTRIES - KERNEL_PML4_START) as usize],
        seed: u64,
    ) -> Result<Self, OutOfFrames> {
        let root = frames.alloc()?;
        mem.zero_frame(root);
        for (i, e) in kernel_pml4.iter().enumerate() {
            mem.word(root + (KERNEL_PML4_START + i as u64) * 8)
                .store(*e, Ordering::Release);
        }
        Ok(ShadowTlb {
            root,
            entries: BTreeSet::new(),
            fills: 0,
            evictions: 0,
            rng: seed | 1,
        })
    }

    /// Guest-physical address of the PML4 (the vCPU's CR3).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Number of fills since creation.
    pub fn fills(&self) -> u64 {
        self.fills
    }

    /// Number of entries evicted for capacity.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Number of translations held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no translation is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Installs `pte` for the page of `va` (a TLB fill); with `capacity`,
    /// then evicts random entries so at most `capacity` remain; returns
    /// the pages evicted.
    pub fn fill<M: PhysMem + ?Sized>(
        &mut self,
        mem: &M,
        frames: &FrameAllocator,
        va: u64,
        pte: u64,
        capacity: Option<usize>,
    ) -> Result<Vec<u64>, OutOfFrames> {
        let page = va & !(PAGE_SIZE - 1);
        debug_assert!(
            page < (KERNEL_PML4_START << 39),
            "fill of a kernel address {va:#x}"
        );
        let slot = pagetable::leaf_slot(mem, frames, self.root, page)?;
        let old = slot.swap(pte, Ordering::AcqRel);
        if old & bits::PRESENT != 0 && (old ^ pte) & (bits::ADDR_MASK | bits::WRITABLE) != 0 {
            // Replacing a translation is removing one first.
            mem.revoke(old & bits::ADDR_MASK);
        }
        self.entries.insert(page);
        self.fills += 1;
        let mut evicted = Vec::new();
        if let Some(cap) = capacity {
            while self.entries.len() > cap.max(1) {
                let victim = self.random_entry_except(page);
                self.remove(mem, victim);
                self.evictions += 1;
                evicted.push(victim);
            }
        }
        Ok(evicted)
    }

    /// Caches, besides `page` (just filled), the other pages of its
    /// naturally aligned group of `group` pages whose translation
    /// `translation` gives (a user PTE, or `None` if the logical table
    /// does not permit caching one; it is asked only about pages it then
    /// caches). Never replaces an
    /// entry the TLB holds (a stale entry stays as stale as it was), never
    /// evicts: with `capacity`, it stops when the TLB is full. Returns each
    /// page cached with the entry installed.
    ///
    /// A TLB may cache any translation the page tables permit, touched or
    /// not; this models that caching, as PVM's own refault prefetches the
    /// aligned group of 8 around a fault (/work/shared/HOST-FLOORS.md). It
    /// is not Linux's fault-around (`do_fault_around()` /
    /// `filemap_map_pages()`, `fault_around_bytes`), which maps page-cache
    /// pages into the *page table* on file faults; for anonymous memory
    /// Linux faults around nothing.
    pub fn fill_around<M: PhysMem + ?Sized>(
        &mut self,
        mem: &M,
        frames: &FrameAllocator,
        page: u64,
        group: u64,
        capacity: Option<usize>,
        mut translation: impl FnMut(u64) -> Option<u64>,
    ) -> Result<Vec<(u64, u64)>, OutOfFrames> {
        let mut filled = Vec::new();
        if group <= 1 {
            return Ok(filled);
        }
        let first = page & !(group * PAGE_SIZE - 1);
        for n in (0..group).map(|i| first + i * PAGE_SIZE) {
            if capacity.is_some_and(|cap| self.entries.len() >= cap.max(1)) {
                break;
            }
            if n == page || self.entries.contains(&n) {
                continue;
            }
            let Some(pte) = translation(n) else {
                continue;
            };
            let slot = pagetable::leaf_slot(mem, frames, self.root, n)?;
            let old = slot.swap(pte, Ordering::AcqRel);
            if old & bits::PRESENT != 0 {
                // Not in `entries` yet present: cannot happen, but a
                // translation replaced is a translation removed.
                mem.revoke(old & bits::ADDR_MASK);
            }
            self.entries.insert(n);
            self.fills += 1;
            filled.push((n, pte));
        }
        Ok(filled)
    }

    fn random_entry_except(&mut self, keep: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let others = self.entries.len() - 1;
        let n = (self.rng % others as u64) as usize;
        *self
            .entries
            .iter()
            .filter(|p| **p != keep)
            .nth(n)
            .expect("n < others")
    }

    /// The translation this TLB holds for `va`, if any.
    pub fn lookup<M: PhysMem + ?Sized>(&self, mem: &M, va: u64) -> Option<u64> {
        pagetable::lookup(mem, self.root, va & !(PAGE_SIZE - 1))
    }

    fn remove<M: PhysMem + ?Sized>(&mut self, mem: &M, page: u64) {
        if let Some(slot) = pagetable::existing_leaf_slot(mem, self.root, page) {
            let old = slot.swap(0, Ordering::AcqRel);
            if old & bits::PRESENT != 0 {
                mem.revoke(old & bits::ADDR_MASK);
            }
        }
        self.entries.remove(&page);
    }

    /// Drops the translations of `[start, end)`; returns how many it held.
    /// Every entry is cleared first, then their frames are revoked in one
    /// batch (neighbouring frames together).
    ///
    /// Costs O(k log n) for k of the n entries held (O(n) when most go):
    /// a single page's flush (every COW fault's `ptep_clear_flush`) must
    /// not pay for the whole TLB. Cutting the range out with two
    /// `split_off`s and an `append` did: `append` rebuilds the whole tree
    /// whenever entries lie above the range (the stack's do), so a COW
    /// fault's flush grew with the pages held (a median 22 µs over the
    /// first 4 500 COW faults of a 256 MiB fork, 383 µs over faults
    /// 31 400–35 900: docs/performance.md).
    pub fn flush_range<M: PhysMem + ?Sized>(&mut self, mem: &M, start: u64, end: u64) -> usize {
        if start >= end {
            return 0;
        }
        let pages: Vec<u64> = self.entries.range(start..end).copied().collect();
        if pages.len() == self.entries.len() {
            self.entries.clear();
        } else if pages.len() <= self.entries.len() / 4 {
            for page in &pages {
                self.entries.remove(page);
            }
        } else {
            self.entries.retain(|p| !(start..end).contains(p));
        }
        let mut frames = Vec::with_capacity(pages.len());
        for page in &pages {
            if let Some(slot) = pagetable::existing_leaf_slot(mem, self.root, *page) {
                let old = slot.swap(0, Ordering::AcqRel);
                if old & bits::PRESENT != 0 {
                    frames.push(old & bits::ADDR_MASK);
                }
            }
        }
        mem.revoke_frames(&mut frames);
        pages.len()
    }

    /// Drops every user translation (a full flush of non-global entries).
    pub fn flush_all<M: PhysMem + ?Sized>(&mut self, mem: &M) -> usize {
        self.flush_range(mem, 0, u64::MAX)
    }

    /// Frees the whole table, root included.
    pub fn release<M: PhysMem + ?Sized>(mut self, mem: &M, frames: &FrameAllocator) {
        self.flush_all(mem);
        pagetable::free_user_tables(mem, frames, self.root, &mut |f| mem.revoke(f));
        self.free_root(mem, frames);
    }

    /// Frees the whole table, root included, without revoking anything:
    /// only for a TLB no CPU will load again before the hardware forgets
    /// everything anyway (see [`Tlbs::retire`]).
    fn release_unrevoked<M: PhysMem + ?Sized>(mut self, mem: &M, frames: &FrameAllocator) {
        self.entries.clear();
        pagetable::free_user_tables(mem, frames, self.root, &mut |_| {});
        self.free_root(mem, frames);
    }

    fn free_root<M: PhysMem + ?Sized>(&self, mem: &M, frames: &FrameAllocator) {
        for i in KERNEL_PML4_START..ENTRIES {
            mem.word(self.root + i * 8).store(0, Ordering::Release);
        }
        frames.free(self.root);
    }
}

/// The TLBs of all CPUs, by CPU number.
#[derive(Debug, Default)]
pub struct Tlbs {
    cpus: RwLock<Vec<Option<Arc<Mutex<ShadowTlb>>>>>,
    /// The TLBs of CPUs whose thread has ended, kept whole until the
    /// machine stops ([`Tlbs::retire`]).
    retired: Mutex<Retired>,
}

/// Retired TLBs and the frames they keep out of the pool.
#[derive(Debug, Default)]
struct Retired {
    tlbs: Vec<ShadowTlb>,
    frames: usize,
}

/// At most this many frames (1 MiB) are kept out of the pool by retired
/// TLBs; a TLB that would exceed it is released at once, revoking.
const RETIRED_FRAMES_MAX: usize = 256;

impl Tlbs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers CPU `cpu`'s TLB.
    pub fn insert(&self, cpu: usize, tlb: ShadowTlb) -> Arc<Mutex<ShadowTlb>> {
        let tlb = Arc::new(Mutex::new(tlb));
        let mut cpus = self.cpus.write().unwrap_or_else(|e| e.into_inner());
        if cpus.len() <= cpu {
            cpus.resize(cpu + 1, None);
        }
        cpus[cpu] = Some(Arc::clone(&tlb));
        tlb
    }

    /// Unregisters CPU `cpu`'s TLB and returns it. A shootdown or fill
    /// that looked it up just before may still hold it: wait for those to
    /// finish (no new ones can find it), so the caller gets the only copy
    /// and can free its tables.
    pub fn remove(&self, cpu: usize) -> Option<ShadowTlb> {
        let mut tlb = self
            .cpus
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(cpu)?
            .take()?;
        loop {
            match Arc::try_unwrap(tlb) {
                Ok(t) => return Some(t.into_inner().unwrap_or_else(|e| e.into_inner())),
                Err(shared) => {
                    tlb = shared;
                    super::sync::yield_now();
                }
            }
        }
    }

    /// Keeps the TLB of a CPU whose thread has ended, tables and entries
    /// as they are, until [`Tlbs::release_retired`].
    ///
    /// Releasing it at once ([`ShadowTlb::release`]) must revoke every
    /// frame it maps (a protection bounce each run of frames, and
    /// `EFAULT` exits for every vCPU touching them meanwhile): its table
    /// frames would go back to the pool, and a hypervisor that shadows
    /// guest page tables by frame (KVM's shadow MMU shares shadow pages by
    /// guest frame and role) could then serve another CPU's new table from
    /// what it built for this one. Kept, its frames are in no other CPU's
    /// table and its root is loaded by no CPU (a CPU id is used once per
    /// machine), so what the hypervisor still holds for it can never be
    /// used. Bounded: at most [`RETIRED_FRAMES_MAX`] frames are kept so
    /// (a test whose threads each map much, one after another, must not
    /// run out of frames); a TLB beyond that is released at once.
    pub fn retire<M: PhysMem + ?Sized>(&self, tlb: ShadowTlb, mem: &M, frames: &FrameAllocator) {
        let kept = 1 + pagetable::count_user_tables(mem, tlb.root);
        let mut retired = lock_retired(&self.retired);
        if retired.frames + kept > RETIRED_FRAMES_MAX {
            drop(retired);
            tlb.release(mem, frames);
            return;
        }
        retired.frames += kept;
        retired.tlbs.push(tlb);
    }

    /// Frees the retired TLBs' tables, revoking nothing. Only once no CPU
    /// of the machine can run again before the hardware forgets every
    /// translation (the VM's memslot is deleted before its next run, or
    /// the VM is closed): when every vCPU has ended.
    pub fn release_retired<M: PhysMem + ?Sized>(&self, mem: &M, frames: &FrameAllocator) {
        let retired = std::mem::take(&mut *lock_retired(&self.retired));
        for tlb in retired.tlbs {
            tlb.release_unrevoked(mem, frames);
        }
    }

    /// CPU `cpu`'s TLB, if registered.
    pub fn get(&self, cpu: usize) -> Option<Arc<Mutex<ShadowTlb>>> {
        self.cpus
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(cpu)?
            .clone()
    }
}

fn lock_retired(m: &Mutex<Retired>) -> MutexGuard<'_, Retired> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Locks a TLB; a poisoned lock still guards a consistent table (every
/// change is one atomic entry store).
pub fn lock(tlb: &Mutex<ShadowTlb>) -> MutexGuard<'_, ShadowTlb> {
    tlb.lock().unwrap_or_else(|e| e.into_inner())
}

/// A user-part leaf entry for a data page at `frame`.
pub fn user_pte(frame: u64, writable: bool) -> u64 {
    let w = if writable {
        bits::WRITABLE | bits::DIRTY
    } else {
        0
    };
    frame | bits::PRESENT | bits::USER | bits::ACCESSED | bits::NO_EXECUTE | w
}
