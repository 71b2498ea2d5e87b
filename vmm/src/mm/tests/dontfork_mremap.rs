//! `madvise(MADV_DONTFORK/MADV_DOFORK)` (VM_DONTCOPY and fork) and `mremap`.

use super::*;

fn machine_with(policy: Policy) -> Arc<Machine> {
    let mem: Arc<dyn PhysMem> = Arc::new(VecMem::new(MEM));
    let kernel = [0u64; (ENTRIES - KERNEL_PML4_START) as usize];
    Arc::new(Machine::new(mem, 0x10_0000, MEM, kernel, policy).unwrap())
}

fn frame_of(mm: &Mm, a: u64) -> u64 {
    pagetable::lookup(&*mm.machine().mem, mm.pgd, a).unwrap() & bits::ADDR_MASK
}

/// `(start, end, dontcopy)` of every VMA.
fn vmas(mm: &Mm) -> Vec<(u64, u64, bool)> {
    mm.vmas_in(0, u64::MAX)
        .iter()
        .map(|v| (v.start, v.end, v.dontcopy))
        .collect()
}

#[test]
fn dontfork_splits_the_vma_at_the_range_ends_and_dofork_clears_the_flag() {
    let m = machine();
    let mm = Mm::new(&m).unwrap();
    let a = mm.mmap(None, 4 * PAGE_SIZE, RW).unwrap();
    let p = PAGE_SIZE;
    mm.madvise_dontfork(a + p, 2 * p, true).unwrap();
    assert_eq!(
        vmas(&mm),
        [
            (a, a + p, false),
            (a + p, a + 3 * p, true),
            (a + 3 * p, a + 4 * p, false)
        ]
    );
    // A later split (mprotect) keeps VM_DONTCOPY on both sides.
    mm.mprotect(a + 2 * p, p, prot::READ, false, None).unwrap();
    assert_eq!(
        vmas(&mm),
        [
            (a, a + p, false),
            (a + p, a + 2 * p, true),
            (a + 2 * p, a + 3 * p, true),
            (a + 3 * p, a + 4 * p, false)
        ]
    );
    mm.madvise_dontfork(a + 2 * p, p, false).unwrap();
    assert_eq!(vmas(&mm)[2], (a + 2 * p, a + 3 * p, false));
    // Holes: the mapped part changes, the call fails with ENOMEM.
    assert_eq!(
        mm.madvise_dontfork(a + 3 * p, 4 * p, true),
        Err(MmError::NoMem)
    );
    assert_eq!(vmas(&mm)[3], (a + 3 * p, a + 4 * p, true));
    assert_eq!(mm.madvise_dontfork(a + 1, p, true), Err(MmError::Inval));
    assert_eq!(
        mm.madvise_dontfork(a + 64 * p, p, true),
        Err(MmError::NoMem)
    );
}

#[test]
fn fork_leaves_dontcopy_vmas_out_of_the_child() {
    let m = machine();
    let parent = Mm::new(&m).unwrap();
    attach(&parent, 0);
    let a = parent.mmap(None, 2 * PAGE_SIZE, RW).unwrap();
    access(&parent, 0, a, Some(1)).unwrap();
    access(&parent, 0, a + PAGE_SIZE, Some(2)).unwrap();
    parent
        .madvise_dontfork(a + PAGE_SIZE, PAGE_SIZE, true)
        .unwrap();
    let kept = frame_of(&parent, a + PAGE_SIZE);
    let child = parent.dup_mmap(Some(0)).unwrap();
    attach(&child, 1);
    assert_eq!(vmas(&child), [(a, a + PAGE_SIZE, false)]);
    assert_eq!(access(&child, 1, a, None), Ok(1));
    assert_eq!(
        access(&child, 1, a + PAGE_SIZE, None),
        Err(FaultError::Segv)
    );
    // The parent's page was never shared: still exclusive, still writable.
    let page = m.frames.page(kept);
    assert_eq!((page.refcount(), page.mapcount()), (1, 1));
    assert!(page.anon_exclusive());
    assert_ne!(
        pagetable::lookup(&*m.mem, parent.pgd, a + PAGE_SIZE).unwrap() & bits::WRITABLE,
        0
    );
    assert_eq!(access(&parent, 0, a + PAGE_SIZE, Some(3)), Ok(3));
    assert_eq!(frame_of(&parent, a + PAGE_SIZE), kept);
    // After MADV_DOFORK a second child inherits the range.
    parent
        .madvise_dontfork(a + PAGE_SIZE, PAGE_SIZE, false)
        .unwrap();
    let second = parent.dup_mmap(Some(0)).unwrap();
    attach(&second, 2);
    assert_eq!(access(&second, 2, a + PAGE_SIZE, None), Ok(3));
    let v = verify_pages(&m, &[&parent, &child, &second]);
    assert!(v.is_empty(), "{v:#?}");
    for (mm, cpu) in [(&parent, 0), (&child, 1), (&second, 2)] {
        detach(mm, cpu);
    }
    drop((parent, child, second));
    assert_eq!(verify_no_leaks(&m), vec![]);
}

#[test]
fn a_dontfork_pinned_page_stays_the_parents_under_every_preset() {
    for (name, _) in crate::policy::PRESETS {
        let m = machine_with(Policy::preset(name).unwrap());
        let parent = Mm::new(&m).unwrap();
        attach(&parent, 0);
        let a = parent.mmap(None, PAGE_SIZE, RW).unwrap();
        access(&parent, 0, a, Some(5)).unwrap();
        let flags = gup::GupFlags {
            write: true,
            pin: true,
            longterm: true,
        };
        let pin = parent.get_user_page(a, flags, 0).unwrap();
        parent.madvise_dontfork(a, PAGE_SIZE, true).unwrap();
        let child = parent.dup_mmap(Some(0)).unwrap();
        access(&parent, 0, a, Some(6)).unwrap();
        assert_eq!(m.dma_read(pin, 0), Some(6), "{name}");
        let v = verify_pages(&m, &[&parent, &child]);
        assert!(v.is_empty(), "{name}: {v:#?}");
        assert!(m.unpin_user_page(pin));
        detach(&parent, 0);
        drop((parent, child));
        assert_eq!(verify_no_leaks(&m), vec![], "{name}");
    }
}

/// The frames mapped at `pages` pages from `a`.
fn frames_at(mm: &Mm, a: u64, pages: u64) -> Vec<u64> {
    (0..pages)
        .map(|p| frame_of(mm, a + p * PAGE_SIZE))
        .collect()
}

#[test]
fn mremap_moves_the_ptes_with_counts_intact_and_flushes_the_old_range() {
    use cowlab_abi::mremap::{FIXED, MAYMOVE};
    let m = machine();
    let mm = Mm::new(&m).unwrap();
    attach(&mm, 0);
    attach(&mm, 1);
    let a = mm.mmap(None, 3 * PAGE_SIZE, RW).unwrap();
    let target = mm.mmap(None, 5 * PAGE_SIZE, RW).unwrap();
    for p in 0..3 {
        access(&mm, 0, a + p * PAGE_SIZE, Some(p + 1)).unwrap();
        // CPU 1 caches a writable translation of every page.
        access(&mm, 1, a + p * PAGE_SIZE, Some(p + 1)).unwrap();
    }
    access(&mm, 0, target + PAGE_SIZE, Some(0xdead)).unwrap();
    let before = frames_at(&mm, a, 3);
    let doomed = frame_of(&mm, target + PAGE_SIZE);
    // MREMAP_FIXED onto the first 3 pages of `target`, whose page goes.
    let new = target + PAGE_SIZE;
    assert_eq!(
        mm.mremap(
            a,
            3 * PAGE_SIZE,
            3 * PAGE_SIZE,
            MAYMOVE | FIXED,
            new,
            Some(0)
        ),
        Ok(new)
    );
    assert_eq!(frames_at(&mm, new, 3), before);
    for (p, frame) in before.iter().enumerate() {
        let page = m.frames.page(*frame);
        assert_eq!((page.refcount(), page.mapcount()), (1, 1), "page {p}");
        assert!(page.anon_exclusive());
        let va = a + p as u64 * PAGE_SIZE;
        assert_eq!(pagetable::lookup(&*m.mem, mm.pgd, va), None);
        for cpu in [0, 1] {
            let tlb = m.tlbs.get(cpu).unwrap();
            assert_eq!(tlb::lock(&tlb).lookup(&*m.mem, va), None, "cpu {cpu}");
        }
    }
    assert_eq!(
        m.frames.page(doomed).refcount(),
        0,
        "the target's page was freed"
    );
    for p in 0..3 {
        assert_eq!(access(&mm, 1, new + p * PAGE_SIZE, None), Ok(p + 1));
        assert_eq!(
            access(&mm, 1, a + p * PAGE_SIZE, None),
            Err(FaultError::Segv)
        );
    }
    assert_eq!(
        mm.vma_list().iter().map(|v| (v.0, v.1)).collect::<Vec<_>>(),
        [
            (target, new),
            (new, new + 3 * PAGE_SIZE),
            (new + 3 * PAGE_SIZE, target + 5 * PAGE_SIZE)
        ]
    );
    assert_clean(&mm, &[0, 1]);
    detach(&mm, 0);
    detach(&mm, 1);
    drop(mm);
    assert_eq!(verify_no_leaks(&m), vec![]);
}

#[test]
fn mremap_resizes_in_place_or_moves_and_refuses_bad_arguments() {
    use cowlab_abi::mremap::{DONTUNMAP, FIXED, MAYMOVE};
    let m = machine();
    let mm = Mm::new(&m).unwrap();
    attach(&mm, 0);
    let p = PAGE_SIZE;
    let _blocker = mm.mmap(None, p, RW).unwrap();
    let a = mm.mmap(None, 4 * p, RW).unwrap();
    for i in 0..4 {
        access(&mm, 0, a + i * p, Some(i + 1)).unwrap();
    }
    // Shrink: the tail's pages are freed.
    let tail = frame_of(&mm, a + 3 * p);
    assert_eq!(mm.mremap(a, 4 * p, 3 * p, 0, 0, Some(0)), Ok(a));
    assert_eq!(m.frames.page(tail).refcount(), 0);
    assert_eq!(access(&mm, 0, a + 3 * p, None), Err(FaultError::Segv));
    // Grow in place into the freed page (and the guard page after it).
    assert_eq!(mm.mremap(a, 3 * p, 5 * p, 0, 0, Some(0)), Ok(a));
    assert_eq!(access(&mm, 0, a + 4 * p, None), Ok(0));
    assert_eq!(access(&mm, 0, a + 2 * p, None), Ok(3));
    // No room further up: ENOMEM, or a move with MREMAP_MAYMOVE.
    assert_eq!(
        mm.mremap(a, 5 * p, 64 * p, 0, 0, Some(0)),
        Err(MmError::NoMem)
    );
    let moved = mm.mremap(a, 5 * p, 64 * p, MAYMOVE, 0, Some(0)).unwrap();
    assert_ne!(moved, a);
    assert_eq!(access(&mm, 0, moved + 2 * p, None), Ok(3));
    assert_eq!(access(&mm, 0, moved + 63 * p, None), Ok(0));
    // MREMAP_DONTUNMAP: the pages move, the old VMA stays, empty.
    let kept = mm
        .mremap(moved, p, p, MAYMOVE | DONTUNMAP, 0, Some(0))
        .unwrap();
    assert_eq!(access(&mm, 0, kept, None), Ok(1));
    assert_eq!(access(&mm, 0, moved, None), Ok(0));
    // Errors, as Linux gives them.
    let e = |r: Result<u64, MmError>| r.unwrap_err();
    assert_eq!(e(mm.mremap(moved + 1, p, p, 0, 0, None)), MmError::Inval);
    assert_eq!(
        e(mm.mremap(moved, p, p, FIXED, moved + 8 * p, None)),
        MmError::Inval
    );
    assert_eq!(
        e(mm.mremap(moved, p, 2 * p, MAYMOVE | DONTUNMAP, 0, None)),
        MmError::Inval
    );
    assert_eq!(e(mm.mremap(moved, p, p, 8, 0, None)), MmError::Inval);
    assert_eq!(e(mm.mremap(moved, p, 0, 0, 0, None)), MmError::Inval);
    assert_eq!(e(mm.mremap(moved, 0, p, 0, 0, None)), MmError::Inval);
    assert_eq!(
        e(mm.mremap(moved, 2 * p, 2 * p, MAYMOVE | FIXED, moved + p, None)),
        MmError::Inval
    );
    let far = !(p - 1);
    assert_eq!(
        e(mm.mremap(moved, p, p, MAYMOVE | FIXED, far, None)),
        MmError::Inval
    );
    assert_eq!(e(mm.mremap(a, p, p, 0, 0, None)), MmError::Fault);
    assert_eq!(
        e(mm.mremap(moved, 65 * p, 65 * p, 0, 0, None)),
        MmError::Fault
    );
    assert_eq!(e(mm.mremap(moved, u64::MAX, p, 0, 0, None)), MmError::Inval);
    assert_clean(&mm, &[0]);
    detach(&mm, 0);
    drop(mm);
    assert_eq!(verify_no_leaks(&m), vec![]);
}

#[test]
fn mremap_keeps_vm_dontcopy_and_drops_uffd_wp() {
    use cowlab_abi::mremap::MAYMOVE;
    let m = machine();
    let mm = Mm::new(&m).unwrap();
    attach(&mm, 0);
    let _blocker = mm.mmap(None, PAGE_SIZE, RW).unwrap();
    let a = mm.mmap(None, PAGE_SIZE, RW).unwrap();
    access(&mm, 0, a, Some(1)).unwrap();
    mm.madvise_dontfork(a, PAGE_SIZE, true).unwrap();
    mm.uffd_register(a, PAGE_SIZE).unwrap();
    mm.mwriteprotect_range(a, PAGE_SIZE, true, Some(0)).unwrap();
    // Three pages: one more than the guard page leaves room for.
    let new = mm
        .mremap(a, PAGE_SIZE, 3 * PAGE_SIZE, MAYMOVE, 0, Some(0))
        .unwrap();
    assert_ne!(new, a);
    let vma = mm.vma_lookup(new).unwrap();
    assert!(vma.dontcopy && !vma.uffd_wp());
    let pte = pagetable::lookup(&*m.mem, mm.pgd, new).unwrap();
    assert_eq!(pte & super::memory::PTE_UFFD_WP, 0);
    // No handler needed: the write faults and reuses the exclusive page.
    assert_eq!(access(&mm, 0, new, Some(2)), Ok(2));
    let child = mm.dup_mmap(Some(0)).unwrap();
    assert_eq!(child.vma_list().len(), 1, "only the blocker is copied");
    assert_clean(&mm, &[0]);
    detach(&mm, 0);
    drop((mm, child));
    assert_eq!(verify_no_leaks(&m), vec![]);
}

/// A flusher that notes, for each flush IPI, whether the mm's PTL was held.
struct PtlWitness {
    mm: std::sync::OnceLock<std::sync::Weak<Mm>>,
    under_ptl: std::sync::Mutex<Vec<bool>>,
}

impl CpuFlusher for PtlWitness {
    fn flush_cpu(&self, _cpu: usize, _initiator: Option<usize>) {
        if let Some(mm) = self.mm.get().and_then(|w| w.upgrade()) {
            self.under_ptl.lock().unwrap().push(mm.ptl_is_locked());
        }
    }
}

#[test]
fn mremap_flushes_the_old_range_before_dropping_the_ptl_unless_the_knob_is_off() {
    use cowlab_abi::mremap::MAYMOVE;
    for under_ptl in [true, false] {
        let m = machine_with(Policy {
            mremap_flush_under_ptl: under_ptl,
            ..Policy::MAINLINE
        });
        let witness = Arc::new(PtlWitness {
            mm: std::sync::OnceLock::new(),
            under_ptl: std::sync::Mutex::new(Vec::new()),
        });
        m.set_flusher(Arc::clone(&witness) as Arc<dyn CpuFlusher>);
        let mm = Mm::new(&m).unwrap();
        let _ = witness.mm.set(Arc::downgrade(&mm));
        attach(&mm, 0);
        let _blocker = mm.mmap(None, PAGE_SIZE, RW).unwrap();
        let a = mm.mmap(None, 2 * PAGE_SIZE, RW).unwrap();
        access(&mm, 0, a, Some(7)).unwrap();
        let new = mm
            .mremap(a, 2 * PAGE_SIZE, 4 * PAGE_SIZE, MAYMOVE, 0, Some(0))
            .unwrap();
        assert_ne!(new, a);
        // The move's flush is the first; the unmap of the old range follows.
        let seen = witness.under_ptl.lock().unwrap().clone();
        assert_eq!(seen.first(), Some(&under_ptl), "{seen:?}");
        assert_eq!(access(&mm, 0, new, None), Ok(7));
        assert_clean(&mm, &[0]);
        detach(&mm, 0);
        drop(mm);
        assert_eq!(verify_no_leaks(&m), vec![]);
    }
}

#[test]
fn no_store_is_lost_when_mremap_moves_the_page_under_a_writer() {
    use cowlab_abi::mremap::MAYMOVE;
    for (round, under_ptl) in (0..20).zip([true, false].into_iter().cycle()) {
        let m = machine_with(Policy {
            mremap_flush_under_ptl: under_ptl,
            ..Policy::MAINLINE
        });
        let mm = Mm::new(&m).unwrap();
        attach(&mm, 0);
        attach(&mm, 1);
        let _blocker = mm.mmap(None, PAGE_SIZE, RW).unwrap();
        let a = mm.mmap(None, PAGE_SIZE, RW).unwrap();
        let progress = Arc::new(AtomicU64::new(0));
        let writer = {
            let (mm, progress) = (Arc::clone(&mm), Arc::clone(&progress));
            // Stores 1, 2, … until the move's unmap reaches it; returns
            // the last store that succeeded.
            thread::spawn(move || {
                let mut last = 0;
                loop {
                    match access(&mm, 1, a, Some(last + 1)) {
                        Ok(_) => last += 1,
                        Err(FaultError::Segv) => return last,
                        Err(e) => panic!("{e}"),
                    }
                    progress.store(last, Ordering::Relaxed);
                }
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while progress.load(Ordering::Relaxed) < 1 + round * 5 {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer did not start"
            );
            thread::yield_now();
        }
        let new = mm
            .mremap(a, PAGE_SIZE, 3 * PAGE_SIZE, MAYMOVE, 0, Some(0))
            .unwrap();
        let last = writer.join().unwrap();
        assert_eq!(
            access(&mm, 0, new, None),
            Ok(last),
            "round {round}: a store through the old address was lost"
        );
        assert_clean(&mm, &[0, 1]);
        detach(&mm, 0);
        detach(&mm, 1);
        drop(mm);
        assert_eq!(verify_no_leaks(&m), vec![]);
    }
}
