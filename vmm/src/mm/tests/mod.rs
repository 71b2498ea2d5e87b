//! The memory manager driven by host threads, each playing a CPU with a
//! software TLB: an access looks its translation up in the CPU's shadow
//! table and performs the load or store on the frame, under the CPU's TLB
//! lock (so a shootdown waits for an access in flight, as for an IPI ack);
//! a miss or a permission fault goes to `handle_user_fault`, as on KVM.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use cowlab_abi::layout::PAGE_SIZE;

use super::gup;
use super::pagetable::{bits, ENTRIES, KERNEL_PML4_START};
use super::phys::testing::VecMem;
use super::tlb::{self, ShadowTlb};
use super::verify::{verify_no_leaks, verify_pages, verify_tlbs};
use super::*;
use crate::policy::Policy;

const MEM: u64 = 16 << 20;
const RW: u32 = prot::READ | prot::WRITE;

fn machine() -> Arc<Machine> {
    let mem: Arc<dyn PhysMem> = Arc::new(VecMem::new(MEM));
    let kernel = [0u64; (ENTRIES - KERNEL_PML4_START) as usize];
    Arc::new(Machine::new(mem, 0x10_0000, MEM, kernel, Policy::MAINLINE).unwrap())
}

/// Registers CPU `cpu` with an empty TLB running `mm`.
fn attach(mm: &Mm, cpu: usize) {
    let m = mm.machine();
    let t = ShadowTlb::new(&*m.mem, m.frames.pool(), &m.kernel_pml4, cpu as u64 + 1).unwrap();
    m.tlbs.insert(cpu, t);
    mm.attach_cpu(cpu);
}

fn detach(mm: &Mm, cpu: usize) {
    let m = mm.machine();
    mm.detach_cpu(cpu);
    m.tlbs
        .remove(cpu)
        .unwrap()
        .release(&*m.mem, m.frames.pool());
}

/// One access by CPU `cpu`: a load (`value` None) or a store.
fn access(mm: &Mm, cpu: usize, addr: u64, value: Option<u64>) -> Result<u64, FaultError> {
    let m = mm.machine();
    loop {
        {
            let t = m.tlbs.get(cpu).expect("attached");
            let t = tlb::lock(&t);
            if let Some(pte) = t.lookup(&*m.mem, addr) {
                let pa = (pte & bits::ADDR_MASK) + (addr & (PAGE_SIZE - 1) & !7);
                match value {
                    None => return Ok(m.mem.word(pa).load(Ordering::SeqCst)),
                    Some(v) if pte & bits::WRITABLE != 0 => {
                        m.mem.word(pa).store(v, Ordering::SeqCst);
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

fn assert_clean(mm: &Mm, cpus: &[usize]) {
    let m = mm.machine();
    let mut v = verify_pages(m, &[mm]);
    let pairs: Vec<(usize, &Mm)> = cpus.iter().map(|c| (*c, mm)).collect();
    v.extend(verify_tlbs(m, &pairs));
    assert!(v.is_empty(), "{v:#?}");
}

#[test]
fn read_maps_the_zero_page_and_write_gets_an_exclusive_copy() {
    let m = machine();
    let mm = Mm::new(&m).unwrap();
    attach(&mm, 0);
    let a = mm.mmap(None, PAGE_SIZE, RW).unwrap();
    assert_eq!(access(&mm, 0, a, None), Ok(0));
    let pte = pagetable::lookup(&*m.mem, mm.pgd, a).unwrap();
    assert_eq!(pte & bits::ADDR_MASK, m.frames.zero_page());
    assert_eq!(access(&mm, 0, a + 8, Some(5)), Ok(5));
    let pte = pagetable::lookup(&*m.mem, mm.pgd, a).unwrap();
    let frame = pte & bits::ADDR_MASK;
    assert_ne!(frame, m.frames.zero_page());
    assert!(m.frames.page(frame).anon_exclusive());
    assert_eq!(
        (
            m.frames.page(frame).refcount(),
            m.frames.page(frame).mapcount()
        ),
        (1, 1)
    );
    assert_eq!(access(&mm, 0, a, None), Ok(0));
    assert_clean(&mm, &[0]);
    detach(&mm, 0);
    drop(mm);
    assert_eq!(verify_no_leaks(&m), vec![]);
}

#[test]
fn accesses_outside_vmas_or_against_protection_are_segv() {
    let m = machine();
    let mm = Mm::new(&m).unwrap();
    attach(&mm, 0);
    let a = mm.mmap(None, PAGE_SIZE, prot::READ).unwrap();
    assert_eq!(access(&mm, 0, a, None), Ok(0));
    assert_eq!(access(&mm, 0, a, Some(1)), Err(FaultError::Segv));
    assert_eq!(access(&mm, 0, a + PAGE_SIZE, None), Err(FaultError::Segv));
    assert_eq!(access(&mm, 0, 8, None), Err(FaultError::Segv));
    let none = mm.mmap(None, PAGE_SIZE, 0).unwrap();
    assert_eq!(access(&mm, 0, none, None), Err(FaultError::Segv));
    assert_eq!(mm.mmap(None, 0, RW), Err(MmError::Inval));
    assert_eq!(mm.munmap(a + 1, PAGE_SIZE, Some(0)), Err(MmError::Inval));
    assert_eq!(
        mm.mprotect(a - 16 * PAGE_SIZE, PAGE_SIZE, RW, false, Some(0)),
        Err(MmError::NoMem)
    );
    detach(&mm, 0);
}

#[test]
fn running_out_of_frames_is_oom_not_a_panic() {
    let m = machine();
    let mm = Mm::new(&m).unwrap();
    attach(&mm, 0);
    let pages = MEM / PAGE_SIZE;
    let a = mm.mmap(None, pages * PAGE_SIZE, RW).unwrap();
    let mut result = Ok(0);
    for p in 0..pages {
        result = access(&mm, 0, a + p * PAGE_SIZE, Some(p));
        if result.is_err() {
            break;
        }
    }
    assert_eq!(result, Err(FaultError::Oom));
    assert_clean(&mm, &[0]);
    detach(&mm, 0);
    drop(mm);
    assert_eq!(verify_no_leaks(&m), vec![]);
}

#[test]
fn concurrent_faults_on_shared_and_disjoint_pages() {
    let m = machine();
    let mm = Mm::new(&m).unwrap();
    let threads = 4usize;
    let pages = 64u64;
    let a = mm.mmap(None, pages * PAGE_SIZE, RW).unwrap();
    for cpu in 0..threads {
        attach(&mm, cpu);
    }
    let start = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|cpu| {
            let (mm, start) = (Arc::clone(&mm), Arc::clone(&start));
            thread::spawn(move || {
                start.wait();
                for p in 0..pages {
                    // Word `cpu` of every page: all threads fault every page.
                    access(
                        &mm,
                        cpu,
                        a + p * PAGE_SIZE + cpu as u64 * 8,
                        Some(p << 8 | cpu as u64),
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for p in 0..pages {
        for cpu in 0..threads {
            assert_eq!(
                access(&mm, 0, a + p * PAGE_SIZE + cpu as u64 * 8, None),
                Ok(p << 8 | cpu as u64)
            );
        }
    }
    assert_clean(&mm, &(0..threads).collect::<Vec<_>>());
    assert_eq!(m.frames.in_use().count() as u64, pages);
    for cpu in 0..threads {
        detach(&mm, cpu);
    }
    drop(mm);
    assert_eq!(verify_no_leaks(&m), vec![]);
}

#[test]
fn munmap_racing_faults_never_leaks_or_corrupts() {
    for round in 0..20 {
        let m = machine();
        let mm = Mm::new(&m).unwrap();
        let pages = 32u64;
        let a = mm.mmap(None, pages * PAGE_SIZE, RW).unwrap();
        attach(&mm, 0);
        attach(&mm, 1);
        let progress = Arc::new(AtomicU64::new(0));
        let writer = {
            let (mm, progress) = (Arc::clone(&mm), Arc::clone(&progress));
            // Writes until the unmap reaches it; the result is its SIGSEGV.
            thread::spawn(move || loop {
                for p in 0..pages {
                    if let Err(e) = access(&mm, 1, a + p * PAGE_SIZE, Some(p)) {
                        return e;
                    }
                    progress.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        while progress.load(Ordering::Relaxed) < round * 7 {
            thread::yield_now();
        }
        mm.munmap(a, pages * PAGE_SIZE, Some(0)).unwrap();
        assert_eq!(writer.join().unwrap(), FaultError::Segv, "round {round}");
        assert_eq!(access(&mm, 0, a, None), Err(FaultError::Segv));
        assert_clean(&mm, &[0, 1]);
        assert_eq!(
            m.frames.in_use().count(),
            0,
            "round {round}: pages survived munmap"
        );
        detach(&mm, 0);
        detach(&mm, 1);
        drop(mm);
        assert_eq!(verify_no_leaks(&m), vec![]);
    }
}

#[test]
fn no_store_lands_after_mprotect_read_only_returns() {
    let m = machine();
    let mm = Mm::new(&m).unwrap();
    let a = mm.mmap(None, PAGE_SIZE, RW).unwrap();
    let writers = 3usize;
    for cpu in 0..=writers {
        attach(&mm, cpu);
    }
    let protected = Arc::new(AtomicBool::new(false));
    let late_stores = Arc::new(AtomicU64::new(0));
    // Writers that have stored at least once (the mprotect waits for all).
    let writing = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (1..=writers)
        .map(|cpu| {
            let (mm, protected, late, writing) = (
                Arc::clone(&mm),
                Arc::clone(&protected),
                Arc::clone(&late_stores),
                Arc::clone(&writing),
            );
            thread::spawn(move || {
                let mut i = 0u64;
                loop {
                    // Read the flag first: a store that succeeds after it was
                    // seen set started after mprotect returned.
                    let after = protected.load(Ordering::SeqCst);
                    match access(&mm, cpu, a, Some((cpu as u64) << 32 | i)) {
                        Ok(_) if after => {
                            late.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(_) => {
                            if i == 0 {
                                writing.fetch_add(1, Ordering::SeqCst);
                            }
                            i += 1;
                        }
                        Err(FaultError::Segv) => return i,
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while writing.load(Ordering::SeqCst) < writers as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "writers did not start"
        );
        thread::yield_now();
    }
    mm.mprotect(a, PAGE_SIZE, prot::READ, false, Some(0))
        .unwrap();
    let value = access(&mm, 0, a, None).unwrap();
    protected.store(true, Ordering::SeqCst);
    for h in handles {
        assert!(
            h.join().unwrap() > 0,
            "a writer never wrote before the mprotect"
        );
    }
    assert_eq!(
        late_stores.load(Ordering::SeqCst),
        0,
        "a store landed after mprotect returned"
    );
    assert_eq!(access(&mm, 0, a, None), Ok(value));
    assert_clean(&mm, &(0..=writers).collect::<Vec<_>>());
}

#[test]
fn a_withheld_flush_leaves_a_stale_writable_entry_until_flushed() {
    let m = machine();
    let mm = Mm::new(&m).unwrap();
    let a = mm.mmap(None, PAGE_SIZE, RW).unwrap();
    attach(&mm, 0);
    attach(&mm, 1);
    access(&mm, 1, a, Some(1)).unwrap();
    mm.mprotect(a, PAGE_SIZE, prot::READ, true, Some(0))
        .unwrap();
    assert!(mm.mm_tlb_flush_pending());
    // CPU 1 still holds the writable translation: its store lands.
    assert_eq!(access(&mm, 1, a, Some(0xbad1)), Ok(0xbad1));
    assert_eq!(access(&mm, 0, a, None), Ok(0xbad1));
    mm.flush_deferred(a, PAGE_SIZE, Some(0)).unwrap();
    assert!(!mm.mm_tlb_flush_pending());
    assert_eq!(access(&mm, 1, a, Some(0xbad2)), Err(FaultError::Segv));
    assert_eq!(access(&mm, 0, a, None), Ok(0xbad1));
    assert_clean(&mm, &[0, 1]);
}

#[test]
fn wp_page_copy_gives_each_side_its_own_page() {
    // A page shared read-only by two address spaces (as fork would leave
    // it): a write copies it, the other side keeps the old contents.
    let m = machine();
    let parent = Mm::new(&m).unwrap();
    let child = Mm::new(&m).unwrap();
    attach(&parent, 0);
    attach(&child, 1);
    let a = parent.mmap(None, PAGE_SIZE, RW).unwrap();
    child.mmap(Some(a), PAGE_SIZE, RW).unwrap();
    access(&parent, 0, a, Some(7)).unwrap();
    // Share the page: what copy_present_pte() does (next issue).
    let frame = pagetable::lookup(&*m.mem, parent.pgd, a).unwrap() & bits::ADDR_MASK;
    {
        let _ptl = parent.ptl();
        let slot = pagetable::leaf_slot(&*m.mem, m.frames.pool(), parent.pgd, a).unwrap();
        slot.fetch_and(!bits::WRITABLE, Ordering::AcqRel);
        let cslot = pagetable::leaf_slot(&*m.mem, m.frames.pool(), child.pgd, a).unwrap();
        cslot.store(slot.load(Ordering::Acquire), Ordering::Release);
        m.frames.get_page(frame);
        m.frames.dup_rmap(frame);
        m.frames.page(frame).clear_anon_exclusive();
    }
    parent.flush_tlb_page(a, Some(0));
    assert_eq!(access(&child, 1, a, None), Ok(7));
    assert_eq!(access(&child, 1, a, Some(8)), Ok(8));
    assert_eq!(access(&parent, 0, a, None), Ok(7));
    // The parent's page is now its alone again: reused, not copied.
    assert_eq!(access(&parent, 0, a, Some(9)), Ok(9));
    let after = pagetable::lookup(&*m.mem, parent.pgd, a).unwrap() & bits::ADDR_MASK;
    assert_eq!(after, frame);
    assert_eq!(access(&child, 1, a, None), Ok(8));
    let v: Vec<_> = verify_pages(&m, &[&parent, &child]);
    assert!(v.is_empty(), "{v:#?}");
    detach(&parent, 0);
    detach(&child, 1);
    drop((parent, child));
    assert_eq!(verify_no_leaks(&m), vec![]);
}

#[test]
fn madvise_dontneed_and_tlb_capacity() {
    let m = Arc::new({
        let mem: Arc<dyn PhysMem> = Arc::new(VecMem::new(MEM));
        let kernel = [0u64; (ENTRIES - KERNEL_PML4_START) as usize];
        let policy = Policy {
            tlb_capacity: Some(2),
            ..Policy::MAINLINE
        };
        Machine::new(mem, 0x10_0000, MEM, kernel, policy).unwrap()
    });
    let mm = Mm::new(&m).unwrap();
    attach(&mm, 0);
    let a = mm.mmap(None, 8 * PAGE_SIZE, RW).unwrap();
    for p in 0..8 {
        access(&mm, 0, a + p * PAGE_SIZE, Some(p + 1)).unwrap();
    }
    assert!(tlb::lock(&m.tlbs.get(0).unwrap()).len() <= 2);
    for p in 0..8 {
        assert_eq!(access(&mm, 0, a + p * PAGE_SIZE, None), Ok(p + 1));
    }
    mm.madvise_dontneed(a, 8 * PAGE_SIZE, Some(0)).unwrap();
    for p in 0..8 {
        assert_eq!(access(&mm, 0, a + p * PAGE_SIZE, None), Ok(0));
    }
    assert_clean(&mm, &[0]);
}

/// A machine whose TLB fills cache the aligned group of `group` pages.
fn machine_with_fault_around(group: u32) -> Arc<Machine> {
    let mem: Arc<dyn PhysMem> = Arc::new(VecMem::new(MEM));
    let kernel = [0u64; (ENTRIES - KERNEL_PML4_START) as usize];
    let policy = Policy {
        tlb_fault_around: crate::policy::FaultAround::pages(group).unwrap(),
        ..Policy::MAINLINE
    };
    Arc::new(Machine::new(mem, 0x10_0000, MEM, kernel, policy).unwrap())
}

#[test]
fn fault_around_fills_present_neighbours_and_shootdowns_still_reach_them() {
    for (group, want) in [(1u32, 1usize), (8, 7)] {
        let m = machine_with_fault_around(group);
        let mm = Mm::new(&m).unwrap();
        attach(&mm, 0);
        attach(&mm, 1);
        // 8-page aligned, so the group is pages 0..8 of the mapping.
        let a = mm.mmap(None, 24 * PAGE_SIZE, RW).unwrap();
        let a = (a + 8 * PAGE_SIZE - 1) & !(8 * PAGE_SIZE - 1);
        // CPU 0 writes pages 0..7 (page 7 stays not present). A first
        // touch has no present neighbours to cache beyond those written.
        for p in 0..7 {
            access(&mm, 0, a + p * PAGE_SIZE, Some(p + 1)).unwrap();
        }
        let fills = |cpu| tlb::lock(&m.tlbs.get(cpu).unwrap()).fills();
        let held = |cpu, p: u64| {
            tlb::lock(&m.tlbs.get(cpu).unwrap())
                .lookup(&*m.mem, a + p * PAGE_SIZE)
                .is_some()
        };
        // CPU 1 reads page 3: one fill, and with fault-around the other
        // present pages of the group, writable as their PTEs are.
        let before = fills(1);
        assert_eq!(access(&mm, 1, a + 3 * PAGE_SIZE, None), Ok(4));
        assert_eq!((fills(1) - before) as usize, want, "group {group}");
        assert_eq!(held(1, 6), group > 1);
        assert!(!held(1, 7), "page 7 is not present");
        // Every entry CPU 1 holds matches its PTE.
        assert_clean(&mm, &[0, 1]);
        // Its neighbours need no fault: a write through a cached writable
        // entry lands without one.
        let before = fills(1);
        access(&mm, 1, a + 6 * PAGE_SIZE, Some(70)).unwrap();
        assert_eq!(fills(1) - before, u64::from(group == 1));
        // A write-protect of page 5, which CPU 1 never touched, must still
        // reach CPU 1's cached entry.
        assert_eq!(held(1, 5), group > 1);
        mm.mprotect(a + 5 * PAGE_SIZE, PAGE_SIZE, prot::READ, false, Some(0))
            .unwrap();
        assert!(!held(1, 5));
        assert_eq!(
            access(&mm, 1, a + 5 * PAGE_SIZE, Some(9)),
            Err(FaultError::Segv)
        );
        // A write fault caches only neighbours it could write: not page 5,
        // now read-only.
        attach(&mm, 2);
        access(&mm, 2, a + 4 * PAGE_SIZE, Some(40)).unwrap();
        assert_eq!(held(2, 6), group > 1);
        assert!(!held(2, 5));
        assert_clean(&mm, &[0, 1, 2]);
        detach(&mm, 2);
        detach(&mm, 0);
        detach(&mm, 1);
        drop(mm);
        assert_eq!(verify_no_leaks(&m), vec![]);
    }
}

#[test]
fn dup_mmap_write_protects_both_sides_and_counts_the_sharing() {
    let m = machine();
    let parent = Mm::new(&m).unwrap();
    attach(&parent, 0);
    let a = parent.mmap(None, 2 * PAGE_SIZE, RW).unwrap();
    access(&parent, 0, a, Some(7)).unwrap();
    access(&parent, 0, a + PAGE_SIZE, None).unwrap(); // the zero page
    let child = parent.dup_mmap(Some(0)).unwrap();
    attach(&child, 1);
    let frame = pagetable::lookup(&*m.mem, parent.pgd, a).unwrap() & bits::ADDR_MASK;
    let page = m.frames.page(frame);
    assert_eq!(
        (page.refcount(), page.mapcount(), page.anon_exclusive()),
        (2, 2, false)
    );
    for mm in [&parent, &child] {
        let pte = pagetable::lookup(&*m.mem, mm.pgd, a).unwrap();
        assert_eq!(
            pte & (bits::ADDR_MASK | bits::WRITABLE),
            frame,
            "shared and read-only"
        );
    }
    // The parent's TLB was flushed at the end of dup_mmap.
    assert_eq!(tlb::lock(&m.tlbs.get(0).unwrap()).lookup(&*m.mem, a), None);
    assert_eq!(child.vma_list(), parent.vma_list());
    assert_eq!(access(&child, 1, a, None), Ok(7));
    assert_eq!(access(&child, 1, a, Some(8)), Ok(8));
    assert_eq!(access(&parent, 0, a, None), Ok(7));
    assert_eq!(access(&child, 1, a + PAGE_SIZE, None), Ok(0));
    let v = verify_pages(&m, &[&parent, &child]);
    assert!(v.is_empty(), "{v:#?}");
    detach(&child, 1);
    child.exit_mmap();
    // The child is gone: the parent's page is its alone and is reused.
    assert_eq!(access(&parent, 0, a, Some(9)), Ok(9));
    assert_eq!(
        pagetable::lookup(&*m.mem, parent.pgd, a).unwrap() & bits::ADDR_MASK,
        frame
    );
    detach(&parent, 0);
    drop((parent, child));
    assert_eq!(verify_no_leaks(&m), vec![]);
}

/// fork copies PTEs in batches and caches the child's leaf table: across
/// leaf-table boundaries, with holes and zero-page entries, every child
/// PTE is the parent's (same frame, read-only), at the same address.
#[test]
fn dup_mmap_copies_every_pte_across_leaf_tables() {
    let m = machine();
    let parent = Mm::new(&m).unwrap();
    attach(&parent, 0);
    let pages = 1100; // more than two leaf tables, from wherever mmap puts it
    let a = parent.mmap(None, pages * PAGE_SIZE, RW).unwrap();
    for p in 0..pages {
        let va = a + p * PAGE_SIZE;
        if p % 3 == 0 {
            access(&parent, 0, va, Some(p)).unwrap();
        } else if p % 7 == 0 {
            access(&parent, 0, va, None).unwrap();
        }
    }
    let child = parent.dup_mmap(Some(0)).unwrap();
    for p in 0..pages {
        let va = a + p * PAGE_SIZE;
        let (pp, cp) = (
            pagetable::lookup(&*m.mem, parent.pgd, va),
            pagetable::lookup(&*m.mem, child.pgd, va),
        );
        assert_eq!(pp, cp, "page {p}: the child's PTE is the parent's");
        match pp {
            Some(pte) if p % 3 == 0 => {
                assert_eq!(pte & bits::WRITABLE, 0, "page {p}: write-protected");
                let page = m.frames.page(pte & bits::ADDR_MASK);
                assert_eq!((page.refcount(), page.mapcount()), (2, 2), "page {p}");
            }
            Some(pte) => assert_eq!(pte & bits::ADDR_MASK, m.frames.zero_page(), "page {p}"),
            None => assert!(p % 3 != 0 && p % 7 != 0, "page {p} lost"),
        }
    }
    attach(&child, 1);
    assert_eq!(access(&child, 1, a + 999 * PAGE_SIZE, None), Ok(999));
    let v = verify_pages(&m, &[&parent, &child]);
    assert!(v.is_empty(), "{v:#?}");
    detach(&child, 1);
    child.exit_mmap();
    detach(&parent, 0);
    drop((parent, child));
    assert_eq!(verify_no_leaks(&m), vec![]);
}

/// PTE writes take a `&PtlGuard`; one of another mm's PTL is caught.
#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "another mm's PTL")]
fn a_pte_write_needs_its_own_mms_ptl() {
    let m = machine();
    let (a, b) = (Mm::new(&m).unwrap(), Mm::new(&m).unwrap());
    let addr = a.mmap(None, PAGE_SIZE, RW).unwrap();
    let slot = super::pagetable::leaf_slot(&*m.mem, m.frames.pool(), a.pgd, addr).unwrap();
    let ptl = b.ptl();
    a.set_pte(&ptl, addr, slot, 0);
}

mod dontfork_mremap;
mod fork_gup;
mod gup_fast;
mod swap;
mod units;
