//! The machine (physical memory, frames, TLBs) and the address spaces on it:
//! `struct mm_struct` and `struct vm_area_struct`.
//!
//! Locking, as in Linux 6.4+ (docs/design.md §5):
//! - `mmap_lock` (rw): VMA-tree changes hold it for write; faults that fall
//!   back from the per-VMA lock hold it for read.
//! - the VMA tree itself is read without `mmap_lock` by `lock_vma_under_rcu`
//!   (an `RwLock` read stands for the RCU read-side section);
//! - per-VMA lock (`vm_lock`): faults read-lock it; `vma_start_write`
//!   write-locks it (and marks the VMA detached when it leaves the tree);
//! - page-table lock: one per mm (Linux splits it per leaf table; one lock
//!   is a coarser, still correct, model of it).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, TryLockError};

use crate::hooks::LockFree;

use super::sync::{
    AtomicBool, AtomicU64, AtomicUsize, Mutex, MutexGuard, Ordering, RwLock, RwLockReadGuard,
    RwLockWriteGuard,
};

use cowlab_abi::layout::PAGE_SIZE;

use super::frame::OutOfFrames;
use super::gup::Pins;
use super::page::Frames;
use super::pagetable::{ENTRIES, KERNEL_PML4_START};
use super::phys::{PhysMem, Word};
use super::swapfile::SwapInfo;
use super::tlb::{CpuFlusher, NoHardware, Tlbs};
use super::userfaultfd::Uffd;
use crate::hooks::{Hooks, Point};
use crate::policy::Policy;
use crate::trace::{Kind, LockKind};

/// `PROT_*` bits of a VMA.
pub mod prot {
    pub const READ: u32 = 1;
    pub const WRITE: u32 = 2;
    pub const EXEC: u32 = 4;
    pub const ALL: u32 = READ | WRITE | EXEC;
}

/// Everything address spaces share: memory, frames, the CPUs' TLBs.
pub struct Machine {
    pub mem: Arc<dyn PhysMem>,
    pub frames: Frames,
    pub tlbs: Tlbs,
    /// Pins and references held by the guests (get_user_pages).
    pub pins: Pins,
    /// The swap device, its swap counts and swap cache (MADV_PAGEOUT).
    pub swap: SwapInfo,
    /// Injection points, rules, schedules, chaos.
    pub hooks: Hooks,
    flusher: OnceLock<Arc<dyn CpuFlusher>>,
    /// The kernel behaviour modelled (docs/design.md §6).
    pub policy: Policy,
    /// The kernel part of every shadow table.
    pub kernel_pml4: [u64; (ENTRIES - KERNEL_PML4_START) as usize],
    next_mm_id: AtomicUsize,
    /// The VM is stopping every thread: sleeps in the mm give up.
    stopping: AtomicBool,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("frames", &self.frames)
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// A machine whose frame pool is `[start, end)` of `mem`.
    pub fn new(
        mem: Arc<dyn PhysMem>,
        start: u64,
        end: u64,
        kernel_pml4: [u64; (ENTRIES - KERNEL_PML4_START) as usize],
        policy: Policy,
    ) -> Result<Self, OutOfFrames> {
        let frames = Frames::new(&*mem, start, end)?;
        Ok(Machine {
            mem,
            frames,
            tlbs: Tlbs::new(),
            pins: Pins::default(),
            swap: SwapInfo::default(),
            hooks: Hooks::new(),
            flusher: OnceLock::new(),
            policy,
            kernel_pml4,
            next_mm_id: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
        })
    }

    /// Installs the CPU flusher (once; the KVM layer's, or none for host threads).
    pub fn set_flusher(&self, flusher: Arc<dyn CpuFlusher>) {
        let _ = self.flusher.set(flusher);
    }

    /// Wakes every thread sleeping in the mm (userfaultfd waits) for good:
    /// the VM is stopping them, as a fatal signal would.
    pub fn stop_sleepers(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Whether [`Machine::stop_sleepers`] was called.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub(crate) fn flusher(&self) -> &dyn CpuFlusher {
        self.flusher.get().map_or(&NoHardware, |f| &**f)
    }
}

/// A VMA: `[start, end)` with protection `prot`. Immutable once in the tree;
/// changes replace it.
#[derive(Debug)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub prot: u32,
    /// `VM_UFFD_WP`: registered for userfaultfd write-protect faults.
    pub uffd_wp: bool,
    /// `VM_DONTCOPY` (`madvise(MADV_DONTFORK)`): fork leaves this VMA out
    /// of the child (kernel/fork.c:dup_mmap()).
    pub dontcopy: bool,
    vm_lock: Arc<RwLock<()>>,
    /// `vma->vm_lock_seq`: equal to the mm's `mm_lock_seq` while the VMA is
    /// write-locked (until `mmap_lock` is released for write).
    vm_lock_seq: AtomicU64,
    detached: AtomicBool,
}

impl Vma {
    pub fn new(start: u64, end: u64, prot: u32) -> Arc<Vma> {
        Vma::with_flags(start, end, prot, false)
    }

    /// A VMA with the uffd-wp registration `uffd_wp`.
    pub fn with_flags(start: u64, end: u64, prot: u32, uffd_wp: bool) -> Arc<Vma> {
        Vma::build(start, end, prot, uffd_wp, false)
    }

    /// A VMA with every flag given.
    pub(crate) fn build(
        start: u64,
        end: u64,
        prot: u32,
        uffd_wp: bool,
        dontcopy: bool,
    ) -> Arc<Vma> {
        Arc::new(Vma {
            start,
            end,
            prot,
            uffd_wp,
            dontcopy,
            vm_lock: Arc::new(RwLock::new(())),
            vm_lock_seq: AtomicU64::new(u64::MAX),
            detached: AtomicBool::new(false),
        })
    }

    /// A VMA over `[start, end)` with this one's flags (protection,
    /// `VM_UFFD_WP`, `VM_DONTCOPY`): a piece of it after a split, or its
    /// copy at another place. Models mm/vma.c:vm_area_dup() (flags only).
    pub fn dup_at(&self, start: u64, end: u64) -> Arc<Vma> {
        self.with_dontcopy_at(start, end, self.dontcopy)
    }

    /// [`Vma::dup_at`] with `VM_DONTCOPY` set to `dontcopy`.
    pub fn with_dontcopy_at(&self, start: u64, end: u64, dontcopy: bool) -> Arc<Vma> {
        Vma::build(start, end, self.prot, self.uffd_wp, dontcopy)
    }

    /// Models include/linux/userfaultfd_k.h:userfaultfd_wp().
    pub fn uffd_wp(&self) -> bool {
        self.uffd_wp
    }

    pub fn readable(&self) -> bool {
        self.prot & (prot::READ | prot::WRITE) != 0
    }

    pub fn writable(&self) -> bool {
        self.prot & prot::WRITE != 0
    }

    /// Read-locks the VMA unless it is write-locked or detached: a fault
    /// then falls back to `mmap_lock`. Models include/linux/mm.h:
    /// vma_start_read() (the sequence check, a trylock, the check again).
    pub(crate) fn start_read(&self, mm: &Mm) -> Option<RwLockReadGuard<'_, ()>> {
        let locked = || self.vm_lock_seq.load(Ordering::Acquire) == mm.mm_lock_seq();
        if locked() {
            return None;
        }
        let guard = self.vm_lock.try_read().ok()?;
        (!locked() && !self.detached.load(Ordering::Acquire)).then_some(guard)
    }

    /// Write-locks the VMA until `mm`'s `mmap_lock` is released for write:
    /// waits for the faults that hold it for read, and makes later ones
    /// fall back to `mmap_lock`. Lock contract: `mmap_lock` held for write.
    /// Models include/linux/mm.h:vma_start_write() (the lock ends in
    /// mmap_write_unlock() → vma_end_write_all()); traces a wait for the
    /// VMA's readers.
    pub(crate) fn vma_start_write(&self, mm: &Mm) {
        let seq = mm.mm_lock_seq();
        if self.vm_lock_seq.load(Ordering::Acquire) == seq {
            return;
        }
        let trace = mm.trace();
        let try_write = || match self.vm_lock.try_write() {
            Ok(g) => Some(g),
            // A panic while the lock was held poisoned it: the guard is
            // ours (matching it with `Err(_)` would keep it alive across
            // the blocking write() below, which would wait for itself).
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        let vm_lock = Arc::clone(&self.vm_lock);
        let free: LockFree = Arc::new(move || vm_lock.try_write().is_ok());
        let _drain = match mm.explored_lock(LockKind::VmaLock, try_write, free) {
            Some(g) => g,
            None => {
                if let Some(t) = trace {
                    t.emit(
                        Kind::LockWait,
                        &[LockKind::VmaLock.code()],
                        &format!("faults in [{:#x}, {:#x})", self.start, self.end),
                    );
                }
                let cpu = crate::cpu::current();
                if let Some(c) = cpu {
                    let why = format!("v{c} waits for the faults under a VMA lock");
                    mm.m.hooks.set_blocked(c, Some(why));
                }
                let g = self.vm_lock.write().unwrap_or_else(|e| e.into_inner());
                if let Some(c) = cpu {
                    mm.m.hooks.set_blocked(c, None);
                }
                if let Some(t) = trace {
                    t.emit(Kind::LockDone, &[LockKind::VmaLock.code()], "");
                }
                g
            }
        };
        self.vm_lock_seq.store(seq, Ordering::Release);
    }

    /// A VMA that `mm`'s writer is creating: write-locked from the start,
    /// as the pieces of a split are (vma_prepare()). Caller holds
    /// `mmap_lock` for write.
    pub(crate) fn born_write_locked(self: Arc<Self>, mm: &Mm) -> Arc<Self> {
        self.vm_lock_seq.store(mm.mm_lock_seq(), Ordering::Release);
        self
    }

    /// Write-locks the VMA and marks it detached (it is leaving the tree).
    /// Models include/linux/mm.h:vma_start_write() + vma_mark_detached().
    pub(crate) fn start_write_and_detach(&self, mm: &Mm) {
        self.vma_start_write(mm);
        self.detached.store(true, Ordering::Release);
    }
}

/// `mmap_lock` held for write. Dropping it ends every VMA write lock taken
/// under it, then releases the lock. Models mmap_write_unlock() →
/// vma_end_write_all().
pub(crate) struct MmapWriteGuard<'a> {
    mm_lock_seq: &'a AtomicU64,
    _lock: Held<'a, RwLockWriteGuard<'a, ()>>,
}

impl Drop for MmapWriteGuard<'_> {
    fn drop(&mut self) {
        self.mm_lock_seq.fetch_add(1, Ordering::AcqRel);
    }
}

/// An address space. Models `struct mm_struct`.
pub struct Mm {
    pub id: usize,
    pub(crate) m: Arc<Machine>,
    /// Root of the logical page table (`mm->pgd`).
    pub(crate) pgd: u64,
    pub(crate) mmap_lock: Arc<RwLock<()>>,
    /// `mm->mm_lock_seq`: bumped when `mmap_lock` is released for write,
    /// which ends every VMA write lock taken under it.
    mm_lock_seq: AtomicU64,
    pub(crate) vmas: RwLock<BTreeMap<u64, Arc<Vma>>>,
    ptl: Arc<Mutex<()>>,
    /// `mm->tlb_flush_pending`: flushes promised but not done.
    pub(crate) tlb_flush_pending: AtomicU64,
    /// A fork is between its first write-protect and its final
    /// `flush_tlb_mm`: Linux defers the parent's flush to the end of
    /// dup_mmap() without raising `tlb_flush_pending`, so stale writable
    /// entries are expected meanwhile. Bookkeeping for `mm_verify` only.
    pub(crate) fork_flush_deferred: AtomicU64,
    /// An mremap moved present PTEs and dropped the PTLs with the old
    /// range's flush still owed (`mremap_flush_under_ptl` off: kernels
    /// before eb66ae030829), without raising `tlb_flush_pending`: stale
    /// entries are what that kernel leaves meanwhile. Bookkeeping for
    /// `mm_verify` only.
    pub(crate) mremap_flush_deferred: AtomicU64,
    /// `mm_cpumask(mm)`: CPUs that may hold translations of this mm.
    pub(crate) cpumask: AtomicU64,
    /// Where the next `mmap` without a hint goes (top-down); under `mmap_lock`.
    pub(crate) mmap_base: AtomicU64,
    /// Threads running in this mm (`mm->mm_users`).
    users: AtomicUsize,
    /// `MMF_HAS_PINNED`: a page of this mm was ever FOLL_PIN-ned.
    pub(crate) has_pinned: AtomicBool,
    /// `mm->write_protect_seq`: odd while a fork's `copy_page_range()`
    /// may be write-protecting this mm's PTEs (when
    /// `gup_fast_fork_seqcount`); GUP-fast pins retry on a change.
    pub(crate) write_protect_seq: AtomicU64,
    /// The userfaultfd of this mm (one per mm here).
    pub(crate) uffd: Uffd,
    /// Who holds `mmap_lock` for write and the PTL, for wait reports.
    mmap_writer: Holder,
    ptl_holder: Holder,
}

/// Who holds a lock (a vCPU or the VMM) and in what.
type Holder = Mutex<Option<(Option<usize>, &'static str)>>;

/// A lock guard that forgets its holder when dropped (if it noted one).
pub(crate) struct Held<'a, G> {
    _guard: G,
    holder: Option<&'a Holder>,
}

impl<G> Drop for Held<'_, G> {
    fn drop(&mut self) {
        if let Some(h) = self.holder {
            *h.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }
}

/// This mm's page-table lock, held. A function that must run under the
/// PTL takes `&PtlGuard`, so it cannot be called without it. Models the
/// `spinlock_t *ptl` that pte_offset_map_lock() returns locked.
pub(crate) struct PtlGuard<'a> {
    /// The lock held (to tell one mm's PTL from another's).
    lock: &'a Mutex<()>,
    _held: Held<'a, MutexGuard<'a, ()>>,
}

impl std::fmt::Debug for PtlGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PtlGuard")
    }
}

impl std::fmt::Debug for Mm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mm")
            .field("id", &self.id)
            .field("pgd", &self.pgd)
            .finish_non_exhaustive()
    }
}

/// Top of the `mmap` area (below the thread stacks).
pub const MMAP_BASE: u64 = 0x7e00_0000_0000;

impl Mm {
    /// A new, empty address space. Models kernel/fork.c:mm_alloc().
    pub fn new(m: &Arc<Machine>) -> Result<Arc<Mm>, OutOfFrames> {
        let pgd = m.frames.pool().alloc()?;
        m.mem.zero_frame(pgd);
        Ok(Arc::new(Mm {
            id: m.next_mm_id.fetch_add(1, Ordering::Relaxed),
            m: Arc::clone(m),
            pgd,
            mmap_lock: Arc::new(RwLock::new(())),
            mm_lock_seq: AtomicU64::new(0),
            vmas: RwLock::new(BTreeMap::new()),
            ptl: Arc::new(Mutex::new(())),
            tlb_flush_pending: AtomicU64::new(0),
            fork_flush_deferred: AtomicU64::new(0),
            mremap_flush_deferred: AtomicU64::new(0),
            cpumask: AtomicU64::new(0),
            mmap_base: AtomicU64::new(MMAP_BASE),
            users: AtomicUsize::new(0),
            has_pinned: AtomicBool::new(false),
            write_protect_seq: AtomicU64::new(0),
            uffd: Uffd::default(),
            mmap_writer: Mutex::new(None),
            ptl_holder: Mutex::new(None),
        }))
    }

    pub fn machine(&self) -> &Arc<Machine> {
        &self.m
    }

    /// Notes where this thread's vCPU waits for `lock` (held, if noted, by
    /// `holder`) for `unreachable` reports and the trace, runs `wait`, and
    /// clears the note.
    fn waiting<T>(&self, lock: LockKind, holder: &Holder, wait: impl FnOnce() -> T) -> T {
        let cpu = crate::cpu::current();
        let held_by = self.holder(holder);
        if let Some(t) = self.trace() {
            t.emit(
                Kind::LockWait,
                &[lock.code()],
                held_by.as_deref().unwrap_or(""),
            );
        }
        if let Some(c) = cpu {
            let by = held_by.map_or(String::new(), |h| format!(" held by {h}"));
            let name = match lock {
                LockKind::Ptl => "the page-table lock",
                other => other.label(),
            };
            self.m
                .hooks
                .set_blocked(c, Some(format!("v{c} waits for {name}{by}")));
        }
        let r = wait();
        if let Some(c) = cpu {
            self.m.hooks.set_blocked(c, None);
        }
        if let Some(t) = self.trace() {
            t.emit(Kind::LockDone, &[lock.code()], "");
        }
        r
    }

    /// The trace recorder, if this run is traced.
    #[inline]
    pub(crate) fn trace(&self) -> Option<&crate::trace::Recorder> {
        self.m.hooks.trace.get()
    }

    /// Sets a logical PTE, tracing the change; returns the old value.
    ///
    /// Lock contract: the caller holds this mm's page-table lock (`ptl`;
    /// every writer of logical PTEs does, TLB fills only read them), so a
    /// load and a store are enough.
    pub(crate) fn set_pte(&self, ptl: &PtlGuard<'_>, va: u64, slot: &Word, new: u64) -> u64 {
        debug_assert!(std::ptr::eq(ptl.lock, &*self.ptl), "another mm's PTL");
        // Other CPUs' walks and accesses do not take the PTL: under the
        // checker, they may run between two PTE changes.
        super::sync::preempt();
        let old = slot.load(Ordering::Acquire);
        slot.store(new, Ordering::Release);
        if old != new {
            if let Some(t) = self.trace() {
                t.emit(Kind::Pte, &[self.id as u64, va, old, new], "");
            }
        }
        old
    }

    /// `guard`, noting its holder in `slot` while hooks are armed (only a
    /// schedule's `unreachable` report reads it; the fault path otherwise
    /// pays nothing for it).
    fn hold<'a, G>(&self, guard: G, slot: &'a Holder, what: &'static str) -> Held<'a, G> {
        let holder = self.m.hooks.active().then(|| {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some((crate::cpu::current(), what));
            slot
        });
        Held {
            _guard: guard,
            holder,
        }
    }

    /// Who holds the lock `h` notes, if noted: `v1 in fork`.
    fn holder(&self, h: &Holder) -> Option<String> {
        match *h.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((Some(c), what)) => Some(format!("v{c} in {what}")),
            Some((None, what)) => Some(format!("the VMM in {what}")),
            None => None,
        }
    }

    /// Explored, a lock found held: parks at the explorer's lock point
    /// until it is free and the explorer picks this vCPU, then takes it
    /// with `try_lock` (threads run one at a time, so it is free). `None`
    /// when not exploring: the caller waits as usual.
    fn explored_lock<G>(
        &self,
        kind: LockKind,
        try_lock: impl Fn() -> Option<G>,
        free: LockFree,
    ) -> Option<G> {
        let cpu = crate::cpu::current()?;
        if let Some(g) = try_lock() {
            return Some(g);
        }
        while self
            .m
            .hooks
            .explore_lock_wait(cpu, kind.label(), Arc::clone(&free))
        {
            if let Some(g) = try_lock() {
                return Some(g);
            }
        }
        None
    }

    pub(crate) fn mmap_read_lock(&self) -> RwLockReadGuard<'_, ()> {
        let try_read = || match self.mmap_lock.try_read() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        if let Some(g) = try_read() {
            return g;
        }
        let lock = Arc::clone(&self.mmap_lock);
        if let Some(g) = self.explored_lock(
            LockKind::MmapLock,
            try_read,
            Arc::new(move || lock.try_read().is_ok()),
        ) {
            return g;
        }
        self.waiting(LockKind::MmapLock, &self.mmap_writer, || {
            self.mmap_lock.read().unwrap_or_else(|e| e.into_inner())
        })
    }

    pub(crate) fn mmap_write_lock(&self) -> MmapWriteGuard<'_> {
        self.mmap_write_lock_for("an mm call")
    }

    /// The current `mm_lock_seq` (a VMA with this sequence is write-locked).
    fn mm_lock_seq(&self) -> u64 {
        self.mm_lock_seq.load(Ordering::Acquire)
    }

    /// `mmap_lock` for write, noting who holds it and why.
    pub(crate) fn mmap_write_lock_for(&self, what: &'static str) -> MmapWriteGuard<'_> {
        let try_write = || match self.mmap_lock.try_write() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        let lock = Arc::clone(&self.mmap_lock);
        let free: LockFree = Arc::new(move || lock.try_write().is_ok());
        let guard =
            match try_write().or_else(|| self.explored_lock(LockKind::MmapLock, try_write, free)) {
                Some(g) => g,
                None => self.waiting(LockKind::MmapLock, &self.mmap_writer, || {
                    self.mmap_lock.write().unwrap_or_else(|e| e.into_inner())
                }),
            };
        MmapWriteGuard {
            mm_lock_seq: &self.mm_lock_seq,
            _lock: self.hold(guard, &self.mmap_writer, what),
        }
    }

    /// Takes the page-table lock. Models `pte_offset_map_lock()`'s lock.
    pub(crate) fn ptl(&self) -> PtlGuard<'_> {
        let try_lock = || match self.ptl.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        let guard = match try_lock() {
            Some(g) => g,
            None => {
                let lock = Arc::clone(&self.ptl);
                let free: LockFree = Arc::new(move || lock.try_lock().is_ok());
                match self.explored_lock(LockKind::Ptl, try_lock, free) {
                    Some(g) => g,
                    None => self.waiting(LockKind::Ptl, &self.ptl_holder, || {
                        self.ptl.lock().unwrap_or_else(|e| e.into_inner())
                    }),
                }
            }
        };
        PtlGuard {
            lock: &self.ptl,
            _held: self.hold(guard, &self.ptl_holder, "a fault or an mm call"),
        }
    }

    /// Whether someone holds the page-table lock (tests of lock ordering).
    #[cfg(test)]
    pub(crate) fn ptl_is_locked(&self) -> bool {
        self.ptl.try_lock().is_err()
    }

    /// The VMA containing `addr`. Models mm/mmap.c:vma_lookup().
    pub(crate) fn vma_lookup(&self, addr: u64) -> Option<Arc<Vma>> {
        let vmas = self.vmas.read().unwrap_or_else(|e| e.into_inner());
        vmas.range(..=addr)
            .next_back()
            .map(|(_, v)| v)
            .filter(|v| addr < v.end)
            .cloned()
    }

    /// The VMAs overlapping `[start, end)`, in order.
    pub(crate) fn vmas_in(&self, start: u64, end: u64) -> Vec<Arc<Vma>> {
        let vmas = self.vmas.read().unwrap_or_else(|e| e.into_inner());
        let first = vmas.range(..=start).next_back().map_or(start, |(s, _)| *s);
        vmas.range(first..end)
            .map(|(_, v)| Arc::clone(v))
            .filter(|v| v.end > start)
            .collect()
    }

    /// Every VMA, in order.
    pub fn vma_list(&self) -> Vec<(u64, u64, u32)> {
        let vmas = self.vmas.read().unwrap_or_else(|e| e.into_inner());
        vmas.values().map(|v| (v.start, v.end, v.prot)).collect()
    }

    /// A thread starts running in this mm. Models mmget().
    pub fn mmget(&self) {
        self.users.fetch_add(1, Ordering::AcqRel);
    }

    /// A thread of this mm exited; the last one tears the address space
    /// down, so its pages' counts drop now (a parent's next write then
    /// reuses instead of copying). Models kernel/fork.c:mmput().
    pub fn mmput(&self) {
        if self.users.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.exit_mmap();
        }
    }

    /// CPU `cpu` runs this mm from now on. Models the `cpumask_set_cpu()` of
    /// arch/x86/mm/tlb.c:switch_mm_irqs_off().
    pub fn attach_cpu(&self, cpu: usize) {
        self.cpumask.fetch_or(1 << cpu, Ordering::AcqRel);
    }

    /// CPU `cpu` stopped running this mm (its thread exited).
    pub fn detach_cpu(&self, cpu: usize) {
        self.cpumask.fetch_and(!(1 << cpu), Ordering::AcqRel);
    }

    /// CPUs in `mm_cpumask`.
    pub fn cpus(&self) -> impl Iterator<Item = usize> {
        let mask = self.cpumask.load(Ordering::Acquire);
        (0..64).filter(move |c| mask & (1 << c) != 0)
    }

    /// Models include/linux/mm_types.h:inc_tlb_flush_pending().
    pub(crate) fn inc_tlb_flush_pending(&self) {
        self.tlb_flush_pending.fetch_add(1, Ordering::AcqRel);
    }

    /// Models include/linux/mm_types.h:dec_tlb_flush_pending().
    pub(crate) fn dec_tlb_flush_pending(&self) {
        self.tlb_flush_pending.fetch_sub(1, Ordering::AcqRel);
    }

    /// Models include/linux/mm_types.h:mm_tlb_flush_pending().
    pub fn mm_tlb_flush_pending(&self) -> bool {
        self.tlb_flush_pending.load(Ordering::Acquire) > 0
    }

    /// Whether a CPU may legitimately hold entries more permissive than the
    /// PTEs: a flush is pending or a fork has deferred its flush.
    pub fn tlb_may_be_stale(&self) -> bool {
        self.mm_tlb_flush_pending()
            || self.fork_flush_deferred.load(Ordering::Acquire) > 0
            || self.mremap_flush_deferred.load(Ordering::Acquire) > 0
    }

    /// Flushes `[start, end)` from every CPU in `mm_cpumask`: their shadow
    /// entries go (and the hardware forgets them), then each CPU flushes its
    /// own TLB and the initiator waits for the remote ones' acks. Models
    /// arch/x86/mm/tlb.c:flush_tlb_mm_range().
    pub fn flush_tlb_range(&self, start: u64, end: u64, initiator: Option<usize>) {
        if let Some(t) = self.trace() {
            t.emit(Kind::FlushBegin, &[start, end], "");
        }
        let _ = self
            .m
            .hooks
            .at(Point::TlbBeforeShootdown, initiator, Some(start));
        let cpus: Vec<usize> = self.cpus().collect();
        for cpu in &cpus {
            if let Some(tlb) = self.m.tlbs.get(*cpu) {
                self.shootdown_lock(&tlb, *cpu)
                    .flush_range(&*self.m.mem, start, end);
            }
        }
        let _ = self.m.hooks.at(Point::TlbBeforeIpi, initiator, Some(start));
        // Like Linux, every CPU in the mask gets the IPI, whatever it holds.
        for cpu in cpus {
            self.m.flusher().flush_cpu(cpu, initiator);
        }
        let _ = self.m.hooks.at(Point::TlbAfterAck, initiator, Some(start));
        if let Some(t) = self.trace() {
            t.emit(Kind::FlushEnd, &[start], "");
        }
    }

    /// CPU `target`'s TLB lock, for a shootdown. The target holds it only
    /// for a TLB fill or a GUP-fast walk (`Mm::gup_fast`, its interrupts
    /// off): the shootdown waits for either to end, as the IPI waits for
    /// the target to enable interrupts. Explored, a held lock is a lock
    /// point, so whether the walk ends first is the explorer's decision;
    /// under a schedule the wait is noted for `unreachable` reports.
    ///
    /// Lock contract: may be called with `mmap_lock` or the PTL held
    /// (neither is taken under a TLB lock).
    fn shootdown_lock<'t>(
        &self,
        tlb: &'t Arc<Mutex<super::tlb::ShadowTlb>>,
        target: usize,
    ) -> MutexGuard<'t, super::tlb::ShadowTlb> {
        let try_lock = || match tlb.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        if let Some(g) = try_lock() {
            return g;
        }
        let cpu = crate::cpu::current();
        if let Some(c) = cpu {
            let held = Arc::clone(tlb);
            let free: LockFree = Arc::new(move || held.try_lock().is_ok());
            while self
                .m
                .hooks
                .explore_lock_wait(c, "irqs_off", Arc::clone(&free))
            {
                if let Some(g) = try_lock() {
                    return g;
                }
            }
            self.m.hooks.set_blocked(
                c,
                Some(format!(
                    "v{c} waits for v{target}'s TLB (a fill, or a GUP-fast walk with interrupts off)"
                )),
            );
        }
        let g = super::tlb::lock(tlb);
        if let Some(c) = cpu {
            self.m.hooks.set_blocked(c, None);
        }
        g
    }

    /// Models include/linux/mm.h:flush_tlb_page().
    pub fn flush_tlb_page(&self, addr: u64, initiator: Option<usize>) {
        let page = addr & !(PAGE_SIZE - 1);
        self.flush_tlb_range(page, page + PAGE_SIZE, initiator);
    }

    /// Models include/linux/mm.h:flush_tlb_mm().
    pub fn flush_tlb_mm(&self, initiator: Option<usize>) {
        self.flush_tlb_range(0, u64::MAX, initiator);
    }
}
