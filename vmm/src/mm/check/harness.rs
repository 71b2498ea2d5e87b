//! The checker's harness: 2–3 CPUs of one process and the children they
//! fork do random sequences of loads and stores, fork, munmap,
//! MADV_DONTNEED, mprotect (with and without a deferred flush), FOLL_PIN
//! and FOLL_GET references with "DMA", userfaultfd write-protect and
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
const MEM: u64 = 2 << 20;
const POOL_START: u64 = 0x1000;
/// Pages in the shared region.
const PAGES: u64 = 2;
/// Word of a page that "DMA" through a write pin stores to (no thread
/// owns it).
const DMA_WORD: u64 = 500;
/// Threads of the process at the start, and operations per thread.
const MAX_CPUS: usize = 3;
const OPS: usize = 7;
/// Children forked per execution, and operations per child.
const MAX_FORKS: u64 = 3;
const CHILD_OPS: usize = 2;

/// The operations a thread draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
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
}

/// Mixes of operations (weights), one drawn per execution: every kind
/// together, and mixes dense in what makes each seed race (COW faults
/// racing fork and the child's exit; pins; uffd-wp; zaps), so that a
/// bounded number of schedules reaches deep interleavings of each.
const MIXES: &[&[(Op, u32)]] = &[
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
];

/// Executions started by this process, for failure messages ("after N").
static EXECUTIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Panics with the violations and the number of executions so far.
fn assert_clean(v: &[super::verify::Violation], when: &str) {
    assert!(
        v.is_empty(),
        "mm_verify {when} (execution {} of this process): {v:#?}",
        EXECUTIONS.load(StdOrdering::Relaxed)
    );
}

/// Draws an operation from `mix`.
fn draw(rng: &mut impl Rng, mix: &[(Op, u32)]) -> Op {
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
struct World {
    m: Arc<Machine>,
    region: u64,
    /// Per page: `MADV_DONTNEED`/`munmap` calls started and finished (a
    /// store that began after `finished` reached n cannot have been
    /// zapped by the first n).
    zaps_started: Vec<AtomicU64>,
    zaps_finished: Vec<AtomicU64>,
    next_cpu: AtomicU64,
    forks: AtomicU64,
    /// The children's threads, for the end of the execution to join.
    children: std::sync::Mutex<Vec<shuttle::thread::JoinHandle<()>>>,
    /// Whether the semantic oracle applies.
    oracle: bool,
    /// The operations' weights in this execution.
    mix: &'static [(Op, u32)],
}

/// A thread's view of its own words: page → (last value stored, the
/// page's finished-zap count when that store began).
type Expected = BTreeMap<u64, (u64, u64)>;

impl World {
    fn page(&self, i: u64) -> u64 {
        self.region + i * PAGE_SIZE
    }

    /// One access by `cpu`: a load, or a store of `value`, through its
    /// TLB (under the TLB lock, so a shootdown waits for it, as for an
    /// IPI); a miss or permission fault goes to `handle_user_fault`.
    fn access(
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
    fn own_word(&self, i: u64, cpu: usize) -> u64 {
        self.page(i) + cpu as u64 * 8
    }

    /// Stores the next value into `cpu`'s word of page `i`.
    fn store(&self, mm: &Mm, cpu: usize, i: u64, seq: &mut u64, expected: &mut Expected) {
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
    fn load(&self, mm: &Mm, cpu: usize, i: u64, expected: &Expected, what: &str) {
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
    fn attach(&self, mm: &Mm, cpu: usize) {
        let m = &self.m;
        let t = ShadowTlb::new(&*m.mem, m.frames.pool(), &m.kernel_pml4, cpu as u64 + 1)
            .expect("frames for a TLB");
        m.tlbs.insert(cpu, t);
        mm.attach_cpu(cpu);
    }

    fn detach(&self, mm: &Mm, cpu: usize) {
        let m = &self.m;
        mm.detach_cpu(cpu);
        if let Some(t) = m.tlbs.remove(cpu) {
            t.release(&*m.mem, m.frames.pool());
        }
    }

    /// `mm_verify`'s TLB check for `cpu`, with no PTE change half done.
    fn check_tlb(&self, mm: &Mm, cpu: usize) {
        let _ptl = mm.ptl();
        assert_clean(&verify_tlbs(&self.m, &[(cpu, mm)]), "of a child's TLB");
    }

    /// One thread: `ops` random operations by `cpu` in `mm`; `child` for a
    /// forked child's thread.
    fn thread(self: &Arc<Self>, mm: &Arc<Mm>, cpu: usize, ops: usize, child: bool) {
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
                    if let Ok(h) = mm.get_user_page(page, flags, cpu) {
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
            }
        }
        for h in handles {
            self.m.unpin_user_page(h);
        }
    }
}

/// One execution under `policy`: the process with `cpus` threads, then
/// the checks.
fn execution(policy: Policy) {
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
fn budget() -> usize {
    std::env::var("COWLAB_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150)
}

fn presets() -> impl Iterator<Item = (&'static str, Policy)> {
    PRESETS
        .iter()
        .map(|(name, _)| (*name, Policy::preset(name).expect("a preset")))
}

/// Random schedules: at every scheduling point, any runnable thread.
#[test]
fn random_schedules_keep_every_invariant_under_every_preset() {
    for (name, policy) in presets() {
        eprintln!("shuttle random, {name}: {} schedules", budget());
        shuttle::check_random(move || execution(policy), budget());
    }
}

/// PCT (Burckhardt et al., ASPLOS'10): priorities with 3 change points,
/// which finds depth-3 bugs with a bounded probability per schedule.
#[test]
fn pct_schedules_keep_every_invariant_under_every_preset() {
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
fn replay() {
    let schedule = std::env::var("COWLAB_REPLAY").expect("COWLAB_REPLAY holds a schedule");
    let name = std::env::var("COWLAB_PRESET").unwrap_or_else(|_| "mainline".into());
    let policy = Policy::preset(&name).expect("COWLAB_PRESET names a preset");
    shuttle::replay(move || execution(policy), schedule.trim());
}

/// A machine with one process and one mapped page, `cpus` CPUs attached.
fn one_page_world(policy: Policy, cpus: usize, oracle: bool) -> (Arc<World>, Arc<Mm>) {
    EXECUTIONS.fetch_add(1, StdOrdering::Relaxed);
    let mem: Arc<dyn PhysMem> = Arc::new(VecMem::new(MEM));
    let kernel = [0u64; (ENTRIES - KERNEL_PML4_START) as usize];
    let m = Arc::new(Machine::new(mem, POOL_START, MEM, kernel, policy).expect("a frame pool"));
    let mm = Mm::new(&m).expect("a pgd");
    let region = mm
        .mmap(None, PAGE_SIZE, prot::READ | prot::WRITE)
        .expect("the region");
    let world = Arc::new(World {
        m,
        region,
        zaps_started: vec![AtomicU64::new(0)],
        zaps_finished: vec![AtomicU64::new(0)],
        next_cpu: AtomicU64::new(cpus as u64),
        forks: AtomicU64::new(0),
        children: std::sync::Mutex::new(Vec::new()),
        oracle,
        mix: MIXES[1],
    });
    for cpu in 0..cpus {
        world.attach(&mm, cpu);
    }
    (world, mm)
}

/// The end of a focused scenario: `mm_verify`, teardown, no leak.
fn finish(world: Arc<World>, mm: Arc<Mm>, cpus: usize) {
    let m = Arc::clone(&world.m);
    assert_clean(&verify_pages(&m, &[&mm]), "after the threads");
    for cpu in 0..cpus {
        world.detach(&mm, cpu);
    }
    drop(world);
    drop(mm);
    m.unpin_all();
    assert_clean(&verify_no_leaks(&m), "after exit");
}

/// The shape of the bug behind ../shared/repro/mm-refcount.sh, alone:
/// two CPUs of the parent write a page shared with a child that exits
/// meanwhile.
fn cow_exit_race(policy: Policy) {
    let (world, mm) = one_page_world(policy, 2, stores_may_be_lost(&policy).is_none());
    let mut seq = 0;
    world.store(&mm, 0, 0, &mut seq, &mut Expected::new());
    let kid = mm.dup_mmap(Some(0)).expect("fork");
    world.attach(&kid, 2);
    kid.mmget();
    let w = Arc::clone(&world);
    let child = shuttle::thread::spawn(move || {
        w.detach(&kid, 2);
        kid.mmput();
    });
    let writers: Vec<_> = (0..2)
        .map(|cpu| {
            let (w, mm) = (Arc::clone(&world), Arc::clone(&mm));
            shuttle::thread::spawn(move || {
                let mut expected = Expected::new();
                let mut seq = 10;
                w.store(&mm, cpu, 0, &mut seq, &mut expected);
                w.load(&mm, cpu, 0, &expected, "parent");
            })
        })
        .collect();
    child.join().expect("the child");
    for t in writers {
        t.join().expect("a writer");
    }
    finish(world, mm, 2);
}

/// Seed 000's shape: CPU 0 keeps storing through its TLB entry while CPU
/// 1 forks and CPU 2 write-faults on the page fork is write-protecting.
/// Under a preset whose faults do not wait for fork (linux-6.4), CPU 2's
/// copy can miss a store CPU 0 makes before the copy's flush: a lost
/// store. `oracle` forces the lost-store check on whatever the preset.
fn fork_write_race(policy: Policy, oracle: bool) {
    let (world, mm) = one_page_world(policy, 3, oracle);
    let mut seq = 0;
    let mut expected = Expected::new();
    world.store(&mm, 0, 0, &mut seq, &mut expected);
    let storer = {
        let (w, mm) = (Arc::clone(&world), Arc::clone(&mm));
        shuttle::thread::spawn(move || {
            for _ in 0..2 {
                w.store(&mm, 0, 0, &mut seq, &mut expected);
            }
            expected
        })
    };
    let forker = {
        let (w, mm) = (Arc::clone(&world), Arc::clone(&mm));
        shuttle::thread::spawn(move || {
            if let Ok(kid) = mm.dup_mmap(Some(1)) {
                // The child exits at once; its pages go with it.
                drop(kid);
            }
            let _ = &w;
        })
    };
    let writer = {
        let (w, mm) = (Arc::clone(&world), Arc::clone(&mm));
        shuttle::thread::spawn(move || {
            let mut seq = 100;
            w.store(&mm, 2, 0, &mut seq, &mut Expected::new());
        })
    };
    let expected = storer.join().expect("the storer");
    forker.join().expect("the forker");
    writer.join().expect("the writer");
    // Every flush is done: CPU 0 now reads what the page tables map.
    world.load(&mm, 0, 0, &expected, "parent");
    finish(world, mm, 3);
}

#[test]
fn random_schedules_of_the_fork_write_race() {
    for (name, policy) in presets() {
        eprintln!(
            "shuttle random, fork/write race, {name}: {} schedules",
            budget()
        );
        let oracle = stores_may_be_lost(&policy).is_none();
        shuttle::check_random(move || fork_write_race(policy, oracle), budget());
    }
}

/// The oracle can fail: a store that the page no longer holds (as seed
/// 000 leaves it, written into a page that was then replaced) is reported.
#[test]
fn the_oracle_reports_a_store_the_page_lost() {
    let caught = std::panic::catch_unwind(|| {
        shuttle::check_random(
            || {
                let (world, mm) = one_page_world(Policy::MAINLINE, 1, true);
                let (mut seq, mut expected) = (0, Expected::new());
                world.store(&mm, 0, 0, &mut seq, &mut expected);
                // Undo the store behind the model's back.
                let pte = super::pagetable::lookup(&*world.m.mem, mm.pgd, world.region)
                    .expect("the page is mapped");
                let pa = (pte & bits::ADDR_MASK) + world.own_word(0, 0) - world.region;
                world.m.mem.word(pa).store(0x5eed, StdOrdering::SeqCst);
                world.load(&mm, 0, 0, &expected, "parent");
            },
            1,
        )
    });
    let err = caught.expect_err("the oracle let a lost store pass");
    let msg = err
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(msg.contains("lost store"), "another failure: {msg}");
}

#[test]
fn pct_schedules_of_the_cow_exit_race() {
    for (name, policy) in presets() {
        eprintln!(
            "shuttle pct depth 3, cow/exit race, {name}: {} schedules",
            budget()
        );
        shuttle::check_pct(move || cow_exit_race(policy), budget(), 3);
    }
}

#[test]
fn random_schedules_of_the_cow_exit_race() {
    for (name, policy) in presets() {
        eprintln!(
            "shuttle random, cow/exit race, {name}: {} schedules",
            budget()
        );
        shuttle::check_random(move || cow_exit_race(policy), budget());
    }
}
