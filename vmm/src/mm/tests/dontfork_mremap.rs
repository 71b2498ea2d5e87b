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
