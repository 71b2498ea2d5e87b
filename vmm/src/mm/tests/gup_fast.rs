//! GUP-fast (`Mm::get_user_pages_fast`): when the lockless walk takes the
//! page, when it leaves it to the slow path, and the fork race that
//! `write_protect_seq` closes (57efa1fe5957).

use std::time::{Duration, Instant};

use super::*;
use crate::hooks::parse_rule;
use crate::policy::GupReadCow;

fn machine_with(policy: Policy) -> Arc<Machine> {
    let mem: Arc<dyn PhysMem> = Arc::new(VecMem::new(MEM));
    let kernel = [0u64; (ENTRIES - KERNEL_PML4_START) as usize];
    Arc::new(Machine::new(mem, 0x10_0000, MEM, kernel, policy).unwrap())
}

fn pte_of(mm: &Mm, a: u64) -> u64 {
    pagetable::lookup(&*mm.machine().mem, mm.pgd, a).unwrap_or(0)
}

const R_PIN: gup::GupFlags = gup::GupFlags {
    write: false,
    pin: true,
    longterm: true,
};
const W_PIN: gup::GupFlags = gup::GupFlags {
    write: true,
    pin: true,
    longterm: false,
};

/// Waits (with a deadline, never a fixed sleep) until vCPU `cpu` is
/// paused at `point`.
fn until_paused(m: &Machine, cpu: usize, point: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.hooks.paused().get(&cpu).map(String::as_str) != Some(point) {
        assert!(Instant::now() < deadline, "v{cpu} never paused at {point}");
        thread::yield_now();
    }
}

/// Counts the hits of `point` while `f` runs.
fn hits_of(m: &Machine, point: &str, f: impl FnOnce()) -> u64 {
    let rule = m
        .hooks
        .add_rule(parse_rule(&format!("count@{point}")).unwrap());
    f();
    let n = m.hooks.rule_counts()[rule].1;
    m.hooks.remove_rules(None);
    n
}

#[test]
fn a_writable_exclusive_page_is_pinned_by_the_lockless_walk() {
    let m = machine_with(Policy::MAINLINE);
    let mm = Mm::new(&m).unwrap();
    attach(&mm, 0);
    let a = mm.mmap(None, PAGE_SIZE, RW).unwrap();
    access(&mm, 0, a, Some(7)).unwrap();
    let frame = pte_of(&mm, a) & bits::ADDR_MASK;
    let mut pin = 0;
    let walked = hits_of(&m, "gup_fast:before_recheck", || {
        pin = mm.get_user_pages_fast(a, W_PIN, 0).unwrap();
    });
    assert_eq!(walked, 1, "the fast path took it");
    assert_eq!(m.pins.get(pin).unwrap().frame, frame);
    assert_eq!(m.frames.page(frame).pincount(), 1);
    assert_clean(&mm, &[0]);
    assert!(m.unpin_user_page(pin));
    detach(&mm, 0);
}

#[test]
fn a_non_present_pte_falls_back_to_the_slow_path_which_faults_it_in() {
    let m = machine_with(Policy::MAINLINE);
    let mm = Mm::new(&m).unwrap();
    attach(&mm, 0);
    let a = mm.mmap(None, PAGE_SIZE, RW).unwrap();
    let mut pin = 0;
    let walked = hits_of(&m, "gup_fast:after_walk", || {
        pin = mm.get_user_pages_fast(a, W_PIN, 0).unwrap();
    });
    assert_eq!(walked, 0, "no usable PTE: the walk gives up at once");
    let pte = pte_of(&mm, a);
    assert_ne!(pte & bits::WRITABLE, 0, "the slow path's write fault");
    assert_eq!(m.pins.get(pin).unwrap().frame, pte & bits::ADDR_MASK);
    // A read-only PTE for a write pin: the same.
    mm.mprotect(a, PAGE_SIZE, prot::READ, false, Some(0))
        .unwrap();
    assert_eq!(
        mm.get_user_pages_fast(a, W_PIN, 0),
        Err(FaultError::Segv),
        "the slow path checks the VMA"
    );
    assert_clean(&mm, &[0]);
    assert!(m.unpin_user_page(pin));
    detach(&mm, 0);
}

/// A R/O pin of a COW-shared page: v5.19's GUP-fast gives the page back
/// (gup_must_unshare()) and the slow path unshares; v5.10's pins the
/// shared page; v5.8's walks as for a write and falls back, breaking COW.
#[test]
fn a_ro_fast_pin_of_a_shared_page_unshares_pins_it_or_breaks_cow_per_policy() {
    for preset in ["mainline", "linux-5.10", "linux-5.8"] {
        let m = machine_with(Policy::preset(preset).unwrap());
        let parent = Mm::new(&m).unwrap();
        attach(&parent, 0);
        let a = parent.mmap(None, PAGE_SIZE, RW).unwrap();
        access(&parent, 0, a, Some(3)).unwrap();
        let child = parent.dup_mmap(Some(0)).unwrap();
        let shared = pte_of(&parent, a) & bits::ADDR_MASK;
        let mut pin = 0;
        let grabbed = hits_of(&m, "gup_fast:before_recheck", || {
            pin = parent.get_user_pages_fast(a, R_PIN, 0).unwrap();
        });
        let pinned = m.pins.get(pin).unwrap().frame;
        let now = pte_of(&parent, a);
        match m.policy.gup_read_cow {
            GupReadCow::Unshare => {
                assert_eq!(grabbed, 1, "{preset}: grabbed, then given back");
                assert_ne!(pinned, shared, "{preset}: unshared");
                assert_eq!(now & bits::WRITABLE, 0, "{preset}: unshare maps R/O");
                assert!(m.frames.page(pinned).anon_exclusive());
            }
            GupReadCow::None => {
                assert_eq!(grabbed, 1, "{preset}");
                assert_eq!(pinned, shared, "{preset}: the shared page");
            }
            GupReadCow::Break => {
                assert_eq!(grabbed, 0, "{preset}: R/O PTE, the walk wants W");
                assert_ne!(pinned, shared, "{preset}: COW broken");
                assert_ne!(now & bits::WRITABLE, 0, "{preset}");
            }
        }
        assert_eq!(
            pinned,
            now & bits::ADDR_MASK,
            "{preset}: the parent maps the pin"
        );
        let v = verify_pages(&m, &[&parent, &child]);
        assert!(v.is_empty(), "{preset}: {v:#?}");
        assert!(m.unpin_user_page(pin));
        detach(&parent, 0);
        drop((parent, child));
        assert_eq!(verify_no_leaks(&m), vec![]);
    }
}

/// The race of 57efa1fe5957: GUP-fast walks the writable PTE (v0, paused
/// before the grab), fork (v1) finds the page unpinned and pauses before
/// write-protecting it, GUP-fast grabs and re-reads the unchanged PTE,
/// then fork shares the page. Without the seqcount the pin is on the page
/// the child shares; with it GUP-fast sees the count move, unpins, and the
/// slow path (after fork) breaks COW, so the pin is the parent's own page.
#[test]
fn write_protect_seq_makes_a_racing_fast_pin_retry_after_fork() {
    for seqcount in [true, false] {
        let m = machine_with(Policy {
            gup_fast_fork_seqcount: seqcount,
            ..Policy::MAINLINE
        });
        let parent = Mm::new(&m).unwrap();
        attach(&parent, 0);
        attach(&parent, 1);
        let a = parent.mmap(None, PAGE_SIZE, RW).unwrap();
        access(&parent, 0, a, Some(1)).unwrap();
        let frame = pte_of(&parent, a) & bits::ADDR_MASK;
        m.hooks
            .add_rule(parse_rule("pause@gup_fast:after_walk/v0").unwrap());
        m.hooks
            .add_rule(parse_rule("pause@fork:before_wrprotect/v1").unwrap());
        let pinner = {
            let p = Arc::clone(&parent);
            thread::spawn(move || p.get_user_pages_fast(a, W_PIN, 0))
        };
        until_paused(&m, 0, "gup_fast:after_walk");
        let forker = {
            let p = Arc::clone(&parent);
            thread::spawn(move || p.dup_mmap(Some(1)))
        };
        until_paused(&m, 1, "fork:before_wrprotect");
        assert_eq!(
            m.frames.page(frame).pincount(),
            0,
            "fork decided before the grab"
        );
        m.hooks.resume(Some(0));
        if !seqcount {
            // The pin completes inside fork's window.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !pinner.is_finished() {
                assert!(Instant::now() < deadline, "the fast pin never returned");
                thread::yield_now();
            }
        }
        m.hooks.resume(Some(1));
        let child = forker.join().unwrap().unwrap();
        m.hooks.remove_rules(None);
        let pin = pinner.join().unwrap().unwrap();
        if !seqcount {
            assert_eq!(m.pins.get(pin).unwrap().frame, frame);
        }
        let pinned = m.pins.get(pin).unwrap().frame;
        let parents = pte_of(&parent, a) & bits::ADDR_MASK;
        let childs = pte_of(&child, a) & bits::ADDR_MASK;
        if seqcount {
            assert_eq!(pinned, parents, "the pin is the parent's page");
            assert_ne!(pinned, childs, "and not the child's");
        } else {
            assert_eq!(pinned, childs, "the bug: the pinned page is shared COW");
            assert_eq!(parents, childs);
            // The parent's next write copies it away from the pin.
            access(&parent, 0, a, Some(2)).unwrap();
            assert_ne!(pte_of(&parent, a) & bits::ADDR_MASK, pinned);
        }
        let v = verify_pages(&m, &[&parent, &child]);
        assert!(v.is_empty(), "seqcount={seqcount}: {v:#?}");
        m.unpin_all();
        detach(&parent, 0);
        detach(&parent, 1);
        drop((parent, child));
        assert_eq!(verify_no_leaks(&m), vec![], "seqcount={seqcount}");
    }
}

/// A write-protect between the walk and the grab is not the race: the
/// re-read after the grab sees the changed PTE and gives the page back.
/// The write-protect's shootdown reaches the walking CPU only after the
/// walk ends (its TLB lock stands for interrupts off), so mprotect cannot
/// return while the walk is held.
#[test]
fn a_pte_changed_under_the_walk_is_caught_by_the_reread_and_its_shootdown_waits() {
    let m = machine_with(Policy::MAINLINE);
    let mm = Mm::new(&m).unwrap();
    attach(&mm, 0);
    attach(&mm, 1);
    let a = mm.mmap(None, PAGE_SIZE, RW).unwrap();
    access(&mm, 0, a, Some(1)).unwrap();
    m.hooks
        .add_rule(parse_rule("pause@gup_fast:after_walk/v0").unwrap());
    let pinner = {
        let mm = Arc::clone(&mm);
        thread::spawn(move || mm.get_user_pages_fast(a, W_PIN, 0))
    };
    until_paused(&m, 0, "gup_fast:after_walk");
    let protector = {
        let mm = Arc::clone(&mm);
        thread::spawn(move || mm.mprotect(a, PAGE_SIZE, prot::READ, false, Some(1)))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while pte_of(&mm, a) & bits::WRITABLE != 0 {
        assert!(Instant::now() < deadline, "mprotect never changed the PTE");
        thread::yield_now();
    }
    assert!(
        !protector.is_finished(),
        "mprotect's shootdown went past a CPU with interrupts off"
    );
    m.hooks.remove_rules(None);
    m.hooks.resume(Some(0));
    protector.join().unwrap().unwrap();
    // The grab saw a R/O PTE on its re-read: the slow path refuses a
    // write pin of a read-only VMA.
    assert_eq!(pinner.join().unwrap(), Err(FaultError::Segv));
    let frame = pte_of(&mm, a) & bits::ADDR_MASK;
    assert_eq!(
        m.frames.page(frame).pincount(),
        0,
        "the grab was given back"
    );
    assert_clean(&mm, &[0, 1]);
    detach(&mm, 0);
    detach(&mm, 1);
}
