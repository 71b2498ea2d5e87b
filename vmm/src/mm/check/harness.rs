//! The checker's harness: 2–3 CPUs of one process and the children they
//! fork do random sequences of loads and stores, fork, munmap,
//! MADV_DONTNEED, mprotect (with and without a deferred flush), FOLL_PIN
//! and FOLL_GET references (through GUP-fast or the slow path) with "DMA", userfaultfd write-protect and
//! unprotect, and TLB flushes, on a few pages, under one preset. Shuttle
//! chooses the interleaving. After every execution:
//!
//! - `mm_verify` (every page's refcount and mapcount against the PTEs,
//!   pins and references; no writable TLB entry without a writable PTE
//!   unless a flush is pending), and after the last address space is gone,
//!   no leak and no double free;
//! - the semantic oracle: under a preset that has fixed every race that
//!   loses a store ([`stores_may_be_lost`]), every load by a thread of a
//!   word only it writes returns its last store (or zero if an
//!   `MADV_DONTNEED` or `munmap` of that page overlapped the store).
//!
//! A failure panics; shuttle prints the schedule, which `replay` (see
//! docs/reliability.md) runs again.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering as StdOrdering;
use std::sync::Arc;

use cowlab_abi::layout::PAGE_SIZE;
use shuttle::rand::Rng;

use super::fault::{Access, FaultError};
use super::gup::GupFlags;
use super::mm_struct::{prot, Machine, Mm};
use super::pagetable::{bits, ENTRIES, KERNEL_PML4_START};
use super::phys::testing::VecMem;
use super::phys::PhysMem;
use super::sync::{AtomicU64, Ordering};
use super::tlb::{self, ShadowTlb};
use super::verify::{verify_no_leaks, verify_pages, verify_tlbs};
use crate::policy::{CowReuse, FaultLock, Policy, PRESETS};

/// Guest-physical memory of one execution, and the frame pool in it.
pub(super) const MEM: u64 = 2 << 20;
pub(super) const POOL_START: u64 = 0x1000;
/// Pages in the shared region.
pub(super) const PAGES: u64 = 2;
/// Word of a page that "DMA" through a write pin stores to (no thread
/// owns it).
pub(super) const DMA_WORD: u64 = 500;
/// Threads of the process at the start, and operations per thread.
pub(super) const MAX_CPUS: usize = 3;
pub(super) const OPS: usize = 7;
/// Children forked per execution, and operations per child.
pub(super) const MAX_FORKS: u64 = 3;
pub(super) const CHILD_OPS: usize = 2;

/// The operations a thread draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Store,
    Load,
    Fork,
    DontNeed,
    Munmap,
    Mprotect,
    Gup,
    Unpin,
    UffdWp,
    Flush,
    /// MADV_PAGEOUT of the page: the contents must survive the round trip.
    Pageout,
}

/// Mixes of operations (weights), one drawn per execution: every kind
/// together, and mixes dense in what makes each seed race (COW faults
/// racing fork and the child's exit; pins; uffd-wp; zaps), so that a
/// bounded number of schedules reaches deep interleavings of each.
pub(super) const MIXES: &[&[(Op, u32)]] = &[
    &[
        (Op::Store, 30),
        (Op::Load, 20),
        (Op::Fork, 10),
        (Op::DontNeed, 5),
        (Op::Munmap, 2),
        (Op::Mprotect, 6),
        (Op::Gup, 8),
        (Op::Unpin, 6),
        (Op::UffdWp, 7),
        (Op::Flush, 6),
        (Op::Pageout, 5),
    ],
    &[(Op::Store, 55), (Op::Load, 20), (Op::Fork, 25)],
    &[
        (Op::Store, 40),
        (Op::Load, 15),
        (Op::Fork, 15),
        (Op::Gup, 20),
        (Op::Unpin, 10),
    ],
    &[
        (Op::Store, 45),
        (Op::Load, 15),
        (Op::Fork, 15),
        (Op::UffdWp, 15),
        (Op::Mprotect, 10),
    ],
    &[
        (Op::Store, 40),
        (Op::Load, 20),
        (Op::Fork, 15),
        (Op::DontNeed, 15),
        (Op::Munmap, 10),
    ],
    &[
        (Op::Store, 35),
        (Op::Load, 20),
        (Op::Fork, 15),
        (Op::Pageout, 20),
        (Op::Gup, 10),
        (Op::Unpin, 5),
    ],
];

/// Executions started by this process, for failure messages ("after N").
pub(super) static EXECUTIONS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// Panics with the violations and the number of executions so far.
pub(super) fn assert_clean(v: &[super::verify::Violation], when: &str) {
    assert!(
        v.is_empty(),
        "mm_verify {when} (execution {} of this process): {v:#?}",
        EXECUTIONS.load(StdOrdering::Relaxed)
    );
}

/// Draws an operation from `mix`.
pub(super) fn draw(rng: &mut impl Rng, mix: &[(Op, u32)]) -> Op {
    let total: u32 = mix.iter().map(|(_, w)| w).sum();
    let mut x = rng.gen_range(0..total);
    for (op, w) in mix {
        if x < *w {
            return *op;
        }
        x -= w;
    }
    unreachable!("x < total")
}

/// Why stores may legitimately be lost under `p`: a race it has not fixed.
/// Models the history the seeds record (docs/scenarios.md).
pub fn stores_may_be_lost(p: &Policy) -> Option<&'static str> {
    if p.fault_lock == FaultLock::Vma && !p.fork_lock_vmas {
        return Some("per-VMA-lock faults race fork (seed 000, fixed by fb49c455323f)");
    }
    if !p.uffd_wp_flush_before_copy {
        return Some("uffd-wp deferred flush before a COW copy (seed 001, fixed by 6ce64428d620)");
    }
    if p.cow_reuse == CowReuse::Mapcount {
        return Some(
            "mapcount reuse after a COW copy's pte_same (seed 004, fixed by 09854ba94c6a)",
        );
    }
    None
}

/// What every thread shares in one execution.
pub(super) struct World {
    pub(super) m: Arc<Machine>,
    pub(super) region: u64,
    /// Per page: `MADV_DONTNEED`/`munmap` calls started and finished (a
    /// store that began after `finished` reached n cannot have been
    /// zapped by the first n).
    pub(super) zaps_started: Vec<AtomicU64>,
    pub(super) zaps_finished: Vec<AtomicU64>,
    pub(super) next_cpu: AtomicU64,
    pub(super) forks: AtomicU64,
    /// The children's threads, for the end of the execution to join.
    pub(super) children: std::sync::Mutex<Vec<shuttle::thread::JoinHandle<()>>>,
    /// Whether the semantic oracle applies.
    pub(super) oracle: bool,
    /// The operations' weights in this execution.
    pub(super) mix: &'static [(Op, u32)],
}

/// A thread's view of its own words: page → (last value stored, the
/// page's finished-zap count when that store began).
pub(super) type Expected = BTreeMap<u64, (u64, u64)>;

impl World {
    pub(super) fn page(&self, i: u64) -> u64 {
        self.region + i * PAGE_SIZE
    }

    /// One access by `cpu`: a load, or a store of `value`, through its
    /// TLB (under the TLB lock, so a shootdown waits for it, as for an
    /// IPI); a miss or permission fault goes to `handle_user_fault`.
    pub(super) fn access(
        &self,
        mm: &Mm,
        cpu: usize,
        addr: u64,
        value: Option<u64>,
    ) -> Result<u64, FaultError> {
        let m = &self.m;
        loop {
            {
                let t = m.tlbs.get(cpu).expect("attached");
                let t = tlb::lock(&t);
                if let Some(pte) = t.lookup(&*m.mem, addr) {
                    let pa = (pte & bits::ADDR_MASK) + (addr & (PAGE_SIZE - 1) & !7);
                    match value {
                        None => return Ok(m.mem.word(pa).load(StdOrdering::SeqCst)),
                        Some(v) if pte & bits::WRITABLE != 0 => {
                            m.mem.word(pa).store(v, StdOrdering::SeqCst);
                            return Ok(v);
                        }
                        Some(_) => {}
                    }
                }
            }
            let kind = if value.is_some() {
                Access::Write
            } else {
                Access::Read
            };
            mm.handle_user_fault(cpu, addr, kind)?;
        }
    }

    /// The address of `cpu`'s own word in page `i`.
    pub(super) fn own_word(&self, i: u64, cpu: usize) -> u64 {
        self.page(i) + cpu as u64 * 8
    }

    /// Stores the next value into `cpu`'s word of page `i`.
    pub(super) fn store(
        &self,
        mm: &Mm,
        cpu: usize,
        i: u64,
        seq: &mut u64,
        expected: &mut Expected,
    ) {
        *seq += 1;
        let value = (cpu as u64) << 32 | *seq;
        let epoch = self.zaps_finished[i as usize].load(Ordering::SeqCst);
        if self
            .access(mm, cpu, self.own_word(i, cpu), Some(value))
            .is_ok()
        {
            expected.insert(i, (value, epoch));
        }
    }

    /// Loads `cpu`'s word of page `i` and checks it against its last store.
    pub(super) fn load(&self, mm: &Mm, cpu: usize, i: u64, expected: &Expected, what: &str) {
        let Ok(got) = self.access(mm, cpu, self.own_word(i, cpu), None) else {
            return;
        };
        let zapped_since =
            |epoch: u64| self.zaps_started[i as usize].load(Ordering::SeqCst) > epoch;
        let ok = match expected.get(&i) {
            None => got == 0 || zapped_since(0),
            Some(&(v, epoch)) => got == v || (got == 0 && zapped_since(epoch)),
        };
        if self.oracle && !ok {
            panic!(
                "lost store: {what} cpu {cpu} read {got:#x} from page {i} but stored {:#x?} last \
                 (execution {} of this process, policy {:?})",
                expected.get(&i).map(|e| e.0),
                EXECUTIONS.load(StdOrdering::Relaxed),
                self.m.policy
            );
        }
    }

    /// Registers CPU `cpu` with an empty TLB running `mm`.
    pub(super) fn attach(&self, mm: &Mm, cpu: usize) {
        let m = &self.m;
        let t = ShadowTlb::new(&*m.mem, m.frames.pool(), &m.kernel_pml4, cpu as u64 + 1)
            .expect("frames for a TLB");
        m.tlbs.insert(cpu, t);
        mm.attach_cpu(cpu);
    }

    pub(super) fn detach(&self, mm: &Mm, cpu: usize) {
        let m = &self.m;
        mm.detach_cpu(cpu);
        if let Some(t) = m.tlbs.remove(cpu) {
            t.release(&*m.mem, m.frames.pool());
        }
    }

    /// `mm_verify`'s TLB check for `cpu`, with no PTE change half done.
    pub(super) fn check_tlb(&self, mm: &Mm, cpu: usize) {
        let _ptl = mm.ptl();
        assert_clean(&verify_tlbs(&self.m, &[(cpu, mm)]), "of a child's TLB");
    }

    /// One thread: `ops` random operations by `cpu` in `mm`; `child` for a
    /// forked child's thread.
    pub(super) fn thread(self: &Arc<Self>, mm: &Arc<Mm>, cpu: usize, ops: usize, child: bool) {
        let mut rng = shuttle::rand::thread_rng();
        let mut expected = Expected::new();
        let mut seq = 0;
        let mut handles: Vec<u64> = Vec::new();
        let what = if child { "child" } else { "parent" };
        for _ in 0..ops {
            let i = rng.gen_range(0..PAGES);
            let page = self.page(i);
            let op = draw(&mut rng, self.mix);
            if std::env::var_os("COWLAB_DEBUG").is_some() {
                eprintln!("cpu {cpu}: {op:?} page {i}");
            }
            match op {
                Op::Store => self.store(mm, cpu, i, &mut seq, &mut expected),
                Op::Load => self.load(mm, cpu, i, &expected, what),
                Op::Fork if !child && self.forks.fetch_add(1, Ordering::SeqCst) < MAX_FORKS => {
                    let Ok(kid) = mm.dup_mmap(Some(cpu)) else {
                        continue;
                    };
                    let kid_cpu = self.next_cpu.fetch_add(1, Ordering::SeqCst) as usize;
                    // The child's thread runs its own CPU (words of its own).
                    let w = Arc::clone(self);
                    kid.mmget();
                    self.attach(&kid, kid_cpu);
                    let t = shuttle::thread::spawn(move || {
                        let ops = shuttle::rand::thread_rng().gen_range(0..=CHILD_OPS);
                        w.thread(&kid, kid_cpu, ops, true);
                        w.check_tlb(&kid, kid_cpu);
                        w.detach(&kid, kid_cpu);
                        kid.mmput();
                    });
                    self.children.lock().expect("children").push(t);
                }
                Op::Fork => {}
                Op::DontNeed => {
                    self.zaps_started[i as usize].fetch_add(1, Ordering::SeqCst);
                    let _ = mm.madvise_dontneed(page, PAGE_SIZE, Some(cpu));
                    self.zaps_finished[i as usize].fetch_add(1, Ordering::SeqCst);
                }
                Op::Munmap => {
                    self.zaps_started[i as usize].fetch_add(1, Ordering::SeqCst);
                    let _ = mm.munmap(page, PAGE_SIZE, Some(cpu));
                    self.zaps_finished[i as usize].fetch_add(1, Ordering::SeqCst);
                    // Mapped again, empty (not registered for uffd-wp).
                    let _ = mm.mmap(Some(page), PAGE_SIZE, prot::READ | prot::WRITE);
                }
                Op::Mprotect => {
                    let defer = rng.gen_bool(0.5);
                    if mm
                        .mprotect(page, PAGE_SIZE, prot::READ, defer, Some(cpu))
                        .is_ok()
                    {
                        if defer {
                            let _ = mm.flush_deferred(page, PAGE_SIZE, Some(cpu));
                        }
                        let _ = mm.mprotect(
                            page,
                            PAGE_SIZE,
                            prot::READ | prot::WRITE,
                            false,
                            Some(cpu),
                        );
                    }
                }
                Op::Gup => {
                    let flags = GupFlags {
                        write: rng.gen_bool(0.5),
                        pin: rng.gen_bool(0.5),
                        longterm: false,
                    };
                    // GUP-fast (falling back to the slow path) or the slow
                    // path alone.
                    let taken = if rng.gen_bool(0.5) {
                        mm.get_user_pages_fast(page, flags, cpu)
                    } else {
                        mm.get_user_page(page, flags, cpu)
                    };
                    if let Ok(h) = taken {
                        if flags.write {
                            let _ = self.m.dma_write(h, DMA_WORD * 8, seq);
                        } else {
                            let _ = self.m.dma_read(h, cpu as u64 * 8);
                        }
                        handles.push(h);
                    }
                }
                Op::Unpin => {
                    if let Some(h) = handles.pop() {
                        self.m.unpin_user_page(h);
                    }
                }
                Op::UffdWp if !child => {
                    // A handler's protect and later unprotect: writers in
                    // between wait in handle_userfault().
                    if mm
                        .mwriteprotect_range(page, PAGE_SIZE, true, Some(cpu))
                        .is_ok()
                    {
                        let _ = mm.mwriteprotect_range(page, PAGE_SIZE, false, Some(cpu));
                    }
                }
                Op::UffdWp => {}
                Op::Flush => mm.flush_tlb_mm(Some(cpu)),
                Op::Pageout => {
                    let _ = mm.madvise_pageout(page, PAGE_SIZE, Some(cpu));
                }
            }
        }
        for h in handles {
            self.m.unpin_user_page(h);
        }
    }
}

/// One execution under `policy`: the process with `cpus` threads, then
/// the checks.
pub(super) fn execution(policy: Policy) {
    EXECUTIONS.fetch_add(1, StdOrdering::Relaxed);
    let mut rng = shuttle::rand::thread_rng();
    let cpus = rng.gen_range(2..=MAX_CPUS);
    let mem: Arc<dyn PhysMem> = Arc::new(VecMem::new(MEM));
    let kernel = [0u64; (ENTRIES - KERNEL_PML4_START) as usize];
    let m = Arc::new(Machine::new(mem, POOL_START, MEM, kernel, policy).expect("a frame pool"));
    let mm = Mm::new(&m).expect("a pgd");
    let region = mm
        .mmap(None, PAGES * PAGE_SIZE, prot::READ | prot::WRITE)
        .expect("the region");
    mm.uffd_register(region, PAGES * PAGE_SIZE)
        .expect("uffd-wp registration");
    let world = Arc::new(World {
        m: Arc::clone(&m),
        region,
        zaps_started: (0..PAGES).map(|_| AtomicU64::new(0)).collect(),
        zaps_finished: (0..PAGES).map(|_| AtomicU64::new(0)).collect(),
        next_cpu: AtomicU64::new(cpus as u64),
        forks: AtomicU64::new(0),
        children: std::sync::Mutex::new(Vec::new()),
        oracle: stores_may_be_lost(&policy).is_none(),
        mix: MIXES[rng.gen_range(0..MIXES.len())],
    });
    for cpu in 0..cpus {
        world.attach(&mm, cpu);
    }
    let threads: Vec<_> = (0..cpus)
        .map(|cpu| {
            let (w, mm) = (Arc::clone(&world), Arc::clone(&mm));
            let ops = shuttle::rand::thread_rng().gen_range(1..=OPS);
            shuttle::thread::spawn(move || w.thread(&mm, cpu, ops, false))
        })
        .collect();
    for t in threads {
        t.join().expect("a model thread panicked");
    }
    // Children run on: wait for them (each detaches its CPU and exits).
    loop {
        let Some(child) = world.children.lock().expect("children").pop() else {
            break;
        };
        child.join().expect("a child thread panicked");
    }
    let mut v = verify_pages(&m, &[&mm]);
    let pairs: Vec<(usize, &Mm)> = (0..cpus).map(|c| (c, &*mm)).collect();
    v.extend(verify_tlbs(&m, &pairs));
    assert_clean(&v, "after the threads");
    for cpu in 0..cpus {
        world.detach(&mm, cpu);
    }
    drop(world);
    drop(mm);
    m.unpin_all();
    assert_clean(&verify_no_leaks(&m), "after exit");
}

/// Schedules per preset and scheduler: `COWLAB_SCHEDULES` (a long run,
/// docs/reliability.md), else a budget that keeps `cargo test` short.
pub(super) fn budget() -> usize {
    std::env::var("COWLAB_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150)
}

pub(super) fn presets() -> impl Iterator<Item = (&'static str, Policy)> {
    PRESETS
        .iter()
        .map(|(name, _)| (*name, Policy::preset(name).expect("a preset")))
}

/// Random schedules: at every scheduling point, any runnable thread.
#[test]
pub(super) fn random_schedules_keep_every_invariant_under_every_preset() {
    for (name, policy) in presets() {
        eprintln!("shuttle random, {name}: {} schedules", budget());
        shuttle::check_random(move || execution(policy), budget());
    }
}

/// PCT (Burckhardt et al., ASPLOS'10): priorities with 3 change points,
/// which finds depth-3 bugs with a bounded probability per schedule.
#[test]
pub(super) fn pct_schedules_keep_every_invariant_under_every_preset() {
    for (name, policy) in presets() {
        eprintln!("shuttle pct depth 3, {name}: {} schedules", budget());
        shuttle::check_pct(move || execution(policy), budget(), 3);
    }
}

/// Replays a failing schedule: `COWLAB_REPLAY='<schedule>'
/// COWLAB_PRESET=<preset> cargo test --release -p cowlab --lib
/// mm::check::harness::replay -- --ignored --nocapture`.
#[test]
#[ignore = "replays the schedule in COWLAB_REPLAY"]
pub(super) fn replay() {
    let schedule = std::env::var("COWLAB_REPLAY").expect("COWLAB_REPLAY holds a schedule");
    let name = std::env::var("COWLAB_PRESET").unwrap_or_else(|_| "mainline".into());
    let policy = Policy::preset(&name).expect("COWLAB_PRESET names a preset");
    shuttle::replay(move || execution(policy), schedule.trim());
}
