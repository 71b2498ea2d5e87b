//! Focused scenarios under the checker: the shapes of the races that were
//! bugs here or in Linux, each alone on one page, so that shuttle finds a
//! bad interleaving in hundreds of executions rather than millions
//! (docs/reliability.md). They reuse the harness's world.

use std::sync::atomic::Ordering as StdOrdering;
use std::sync::Arc;

use cowlab_abi::layout::PAGE_SIZE;

use super::harness::*;
use super::mm_struct::{prot, Machine, Mm};
use super::pagetable::{bits, ENTRIES, KERNEL_PML4_START};
use super::phys::testing::VecMem;
use super::phys::PhysMem;
use super::sync::AtomicU64;
use super::verify::{verify_no_leaks, verify_pages};
use crate::policy::Policy;

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

/// 57efa1fe5957's shape: CPU 0 write-pins the page through GUP-fast while
/// CPU 1 forks; the child lives on. Then CPU 0 stores to the page through
/// its page table: the pin must see the store (the page fork left the
/// parent is the pinned one) whenever fork copies pinned pages and
/// GUP-fast checks `write_protect_seq`. Returns whether it did.
fn gup_fast_fork_race(policy: Policy) -> bool {
    let (world, mm) = one_page_world(policy, 2, false);
    let (mut seq, mut expected) = (0, Expected::new());
    world.store(&mm, 0, 0, &mut seq, &mut expected);
    let pinner = {
        let (w, mm) = (Arc::clone(&world), Arc::clone(&mm));
        shuttle::thread::spawn(move || {
            let flags = super::gup::GupFlags {
                write: true,
                pin: true,
                longterm: true,
            };
            mm.get_user_pages_fast(w.region, flags, 0)
                .expect("a write pin of a mapped page")
        })
    };
    let forker = {
        let mm = Arc::clone(&mm);
        shuttle::thread::spawn(move || mm.dup_mmap(Some(1)).expect("fork"))
    };
    let pin = pinner.join().expect("the pinner");
    let kid = forker.join().expect("the forker");
    world.store(&mm, 0, 0, &mut seq, &mut expected);
    let stored = expected.get(&0).expect("stored").0;
    let seen = world.m.dma_read(pin, 0).expect("the pin");
    assert_clean(&verify_pages(&world.m, &[&mm, &kid]), "after the race");
    drop(kid);
    finish(world, mm, 2);
    seen == stored
}

/// Whether `policy` keeps a GUP-fast write pin coherent across a fork.
fn pin_survives_fork(p: &Policy) -> bool {
    p.gup_fast_fork_seqcount && p.fork_copy_pinned
}

#[test]
fn pct_schedules_of_the_gup_fast_fork_race() {
    for (name, policy) in presets() {
        eprintln!(
            "shuttle pct depth 3, gup-fast/fork race, {name}: {} schedules",
            budget()
        );
        let coherent = pin_survives_fork(&policy);
        shuttle::check_pct(
            move || {
                let seen = gup_fast_fork_race(policy);
                assert!(
                    seen || !coherent,
                    "the GUP-fast pin lost the parent's store (execution {})",
                    EXECUTIONS.load(StdOrdering::Relaxed)
                );
            },
            budget(),
            3,
        );
    }
}

/// Without the seqcount the checker finds the race: the pinned page is
/// the one fork shared, and the parent's store goes to its copy.
#[test]
fn the_gup_fast_fork_race_is_found_without_the_seqcount() {
    // Counted, not panicked on: a panic inside an execution unwinds
    // through shuttle's teardown, which now and then panics again
    // ("Tried to get ExecutionState … NotSet") and hid the message this
    // test looked for (1 run in ~10).
    let diverged = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = Arc::clone(&diverged);
    shuttle::check_random(
        move || {
            let p = Policy {
                gup_fast_fork_seqcount: false,
                ..Policy::MAINLINE
            };
            if !gup_fast_fork_race(p) {
                seen.fetch_add(1, StdOrdering::Relaxed);
            }
        },
        2000,
    );
    assert!(
        diverged.load(StdOrdering::Relaxed) > 0,
        "no schedule lost the pin"
    );
}

/// mremap moves the page under a writer on another CPU: every store that
/// succeeded through the old address, stale TLB entry or not, is in the
/// moved page; none is lost, nothing leaks, `mm_verify` is clean (the
/// window of `mremap_flush_under_ptl` off included).
fn mremap_write_race(policy: Policy) {
    use cowlab_abi::mremap::{FIXED, MAYMOVE};
    let (world, mm) = one_page_world(policy, 2, false);
    let target = mm
        .mmap(None, PAGE_SIZE, prot::READ | prot::WRITE)
        .expect("the target");
    let region = world.region;
    let writer = {
        let (w, mm) = (Arc::clone(&world), Arc::clone(&mm));
        shuttle::thread::spawn(move || {
            let mut last = 0;
            for v in 1..=3 {
                match w.access(&mm, 1, region, Some(v)) {
                    Ok(_) => last = v,
                    Err(_) => break,
                }
            }
            last
        })
    };
    let moved = mm.mremap(
        region,
        PAGE_SIZE,
        PAGE_SIZE,
        MAYMOVE | FIXED,
        target,
        Some(0),
    );
    assert_eq!(moved, Ok(target));
    let last = writer.join().expect("the writer");
    assert_eq!(
        world.access(&mm, 0, target, None),
        Ok(last),
        "a store through the old address was lost"
    );
    finish(world, mm, 2);
}

#[test]
fn random_schedules_of_the_mremap_write_race() {
    for under_ptl in [true, false] {
        let policy = Policy {
            mremap_flush_under_ptl: under_ptl,
            ..Policy::MAINLINE
        };
        eprintln!(
            "shuttle random, mremap/write race, mremap_flush_under_ptl={under_ptl}: {} schedules",
            budget()
        );
        shuttle::check_random(move || mremap_write_race(policy), budget());
    }
}

/// A shuttle atomic as a word of the guest's event protocol.
struct SharedWord(AtomicU64);

impl cowlab_abi::event::EventWord for SharedWord {
    fn load(&self, order: std::sync::atomic::Ordering) -> u64 {
        self.0.load(order)
    }
    fn store(&self, value: u64, order: std::sync::atomic::Ordering) {
        self.0.store(value, order)
    }
    fn fetch_add(&self, value: u64, order: std::sync::atomic::Ordering) -> u64 {
        self.0.fetch_add(value, order)
    }
    fn fetch_sub(&self, value: u64, order: std::sync::atomic::Ordering) -> u64 {
        self.0.fetch_sub(value, order)
    }
}

/// Litmus events that may sleep (`cowlab_abi::event`, the guest's half, run
/// as is, against [`super::event_sleep::EventSleep`], the VMM's): two
/// threads each sleep on an event the other signals after its own wait
/// began, a third on an event both wait for before signalling theirs.
/// The sleepers wait for a wake-up only (no poll), so a lost wake-up is a
/// deadlock, which shuttle reports; spinning once, they reach both the
/// spin and the sleep.
fn event_sleep_race() {
    use cowlab_abi::event;
    use std::sync::atomic::Ordering::SeqCst;
    let words: Arc<Vec<SharedWord>> =
        Arc::new((0..4).map(|_| SharedWord(AtomicU64::new(0))).collect());
    let vmm = Arc::new(super::event_sleep::EventSleep::default());
    const SLEEPERS: usize = 3;
    let waiter = |wait: usize, then: usize| {
        let (words, vmm) = (Arc::clone(&words), Arc::clone(&vmm));
        shuttle::thread::spawn(move || {
            let sleep = || vmm.sleep_until(|| words[wait].0.load(SeqCst) != 0, || false, None);
            event::await_sleeping(
                &words[wait],
                &words[SLEEPERS],
                1,
                shuttle::thread::yield_now,
                sleep,
            );
            event::signal(&words[then], &words[SLEEPERS], || vmm.wake());
        })
    };
    let threads = [waiter(0, 1), waiter(1, 2)];
    // The third thread starts the chain, then waits for its end.
    event::signal(&words[0], &words[SLEEPERS], || vmm.wake());
    let sleep = || vmm.sleep_until(|| words[2].0.load(SeqCst) != 0, || false, None);
    event::await_sleeping(
        &words[2],
        &words[SLEEPERS],
        1,
        shuttle::thread::yield_now,
        sleep,
    );
    for t in threads {
        t.join().expect("a waiter panicked");
    }
    assert_eq!(
        words[SLEEPERS].0.load(SeqCst),
        0,
        "a sleeper is still counted"
    );
}

#[test]
fn random_and_pct_schedules_of_event_sleeps_lose_no_wake_up() {
    eprintln!(
        "shuttle random + pct depth 3, event sleeps: {} schedules each",
        budget()
    );
    shuttle::check_random(event_sleep_race, budget());
    shuttle::check_pct(event_sleep_race, budget(), 3);
}
