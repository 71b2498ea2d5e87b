//! fork, GUP pins and the reuse rule under the policies that changed them.

use super::*;

fn machine_with(policy: Policy) -> Arc<Machine> {
    let mem: Arc<dyn PhysMem> = Arc::new(VecMem::new(MEM));
    let kernel = [0u64; (ENTRIES - KERNEL_PML4_START) as usize];
    Arc::new(Machine::new(mem, 0x10_0000, MEM, kernel, policy).unwrap())
}

fn frame_of(mm: &Mm, a: u64) -> u64 {
    pagetable::lookup(&*mm.machine().mem, mm.pgd, a).unwrap() & bits::ADDR_MASK
}

#[test]
fn fork_copies_a_pinned_exclusive_page_at_once_when_the_policy_says_so() {
    for (copy_pinned, shared) in [(true, false), (false, true)] {
        let m = machine_with(Policy {
            fork_copy_pinned: copy_pinned,
            ..Policy::MAINLINE
        });
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
        let child = parent.dup_mmap(Some(0)).unwrap();
        assert_eq!(
            frame_of(&parent, a) == frame_of(&child, a),
            shared,
            "copy_pinned={copy_pinned}"
        );
        if !shared {
            // The parent's PTE stays writable: no COW for the pinned page.
            assert_ne!(
                pagetable::lookup(&*m.mem, parent.pgd, a).unwrap() & bits::WRITABLE,
                0
            );
        }
        let v = verify_pages(&m, &[&parent, &child]);
        assert!(v.is_empty(), "{v:#?}");
        assert!(m.unpin_user_page(pin));
        detach(&parent, 0);
        drop((parent, child));
        assert_eq!(verify_no_leaks(&m), vec![]);
    }
}

#[test]
fn reuse_by_mapcount_ignores_a_pin_and_by_refcount_does_not() {
    for (reuse, kept_frame) in [
        (crate::policy::CowReuse::Mapcount, true),
        (crate::policy::CowReuse::Refcount, false),
    ] {
        let policy = Policy {
            cow_reuse: reuse,
            anon_exclusive: false,
            gup_read_cow: crate::policy::GupReadCow::None,
            ..Policy::MAINLINE
        };
        let m = machine_with(policy);
        let mm = Mm::new(&m).unwrap();
        attach(&mm, 0);
        let a = mm.mmap(None, PAGE_SIZE, RW).unwrap();
        access(&mm, 0, a, Some(1)).unwrap();
        mm.mprotect(a, PAGE_SIZE, prot::READ, false, Some(0))
            .unwrap();
        mm.mprotect(a, PAGE_SIZE, RW, false, Some(0)).unwrap();
        let before = frame_of(&mm, a);
        let pin = mm
            .get_user_page(
                a,
                gup::GupFlags {
                    pin: true,
                    ..Default::default()
                },
                0,
            )
            .unwrap();
        access(&mm, 0, a, Some(2)).unwrap();
        assert_eq!(frame_of(&mm, a) == before, kept_frame, "{reuse:?}");
        // What the pin sees: the new value only if the page was reused.
        let expect = if kept_frame { 2 } else { 1 };
        assert_eq!(m.dma_read(pin, 0), Some(expect));
        m.unpin_user_page(pin);
    }
}

#[test]
fn a_read_pin_unshares_a_shared_page_under_mainline() {
    let m = machine();
    let parent = Mm::new(&m).unwrap();
    attach(&parent, 0);
    let a = parent.mmap(None, PAGE_SIZE, RW).unwrap();
    access(&parent, 0, a, Some(3)).unwrap();
    let child = parent.dup_mmap(Some(0)).unwrap();
    attach(&child, 1);
    let shared = frame_of(&child, a);
    let pin = child
        .get_user_page(
            a,
            gup::GupFlags {
                pin: true,
                ..Default::default()
            },
            1,
        )
        .unwrap();
    let own = frame_of(&child, a);
    assert_ne!(own, shared, "unshared");
    assert_eq!(
        pagetable::lookup(&*m.mem, child.pgd, a).unwrap() & bits::WRITABLE,
        0,
        "still read-only"
    );
    assert!(m.frames.page(own).anon_exclusive());
    assert_eq!(m.dma_read(pin, 0), Some(3));
    access(&parent, 0, a, Some(4)).unwrap();
    assert_eq!(
        m.dma_read(pin, 0),
        Some(3),
        "the parent's write stays on its side"
    );
    let v = verify_pages(&m, &[&parent, &child]);
    assert!(v.is_empty(), "{v:#?}");
    m.unpin_user_page(pin);
}

#[test]
fn the_coherent_fork_proposal_write_protects_the_pinned_page_first() {
    let m = machine_with(Policy {
        fork_wrprotect_pinned: true,
        ..Policy::MAINLINE
    });
    let parent = Mm::new(&m).unwrap();
    attach(&parent, 0);
    let a = parent.mmap(None, PAGE_SIZE, RW).unwrap();
    access(&parent, 0, a, Some(5)).unwrap();
    let pin = parent
        .get_user_page(
            a,
            gup::GupFlags {
                write: true,
                pin: true,
                longterm: true,
            },
            0,
        )
        .unwrap();
    let child = parent.dup_mmap(Some(0)).unwrap();
    let pte = pagetable::lookup(&*m.mem, parent.pgd, a).unwrap();
    assert_eq!(pte & bits::WRITABLE, 0, "write-protected for the copy");
    assert_ne!(
        frame_of(&child, a),
        frame_of(&parent, a),
        "still copied, not shared"
    );
    // The parent's next write reuses its exclusive page: no copy.
    let frame = frame_of(&parent, a);
    access(&parent, 0, a, Some(6)).unwrap();
    assert_eq!(frame_of(&parent, a), frame);
    assert_eq!(m.dma_read(pin, 0), Some(6));
    m.unpin_user_page(pin);
}
