//! Swap: MADV_PAGEOUT, do_swap_page, fork of a swap entry, zap of one,
//! and the swap counts mm_verify checks, under the policies that changed
//! the reuse rules.

use super::*;
use crate::mm::swapfile::{is_swap_pte, pte_swp_exclusive, swp_offset};

fn machine_with(policy: Policy) -> Arc<Machine> {
    let mem: Arc<dyn PhysMem> = Arc::new(VecMem::new(MEM));
    let kernel = [0u64; (ENTRIES - KERNEL_PML4_START) as usize];
    Arc::new(Machine::new(mem, 0x10_0000, MEM, kernel, policy).unwrap())
}

fn preset(name: &str) -> Policy {
    Policy::preset(name).unwrap()
}

/// The raw logical PTE of `a` (present or not).
fn raw_pte(mm: &Mm, a: u64) -> u64 {
    let m = mm.machine();
    pagetable::existing_leaf_slot(&*m.mem, mm.pgd, a).map_or(0, |s| s.load(Ordering::Acquire))
}

fn clean(m: &Machine, mms: &[&Mm]) {
    let v = verify_pages(m, mms);
    assert!(v.is_empty(), "{v:#?}");
}

/// A one-page region written with `value` and paged out.
fn swapped_page(mm: &Mm, value: u64) -> u64 {
    let a = mm.mmap(None, PAGE_SIZE, RW).unwrap();
    access(mm, 0, a, Some(value)).unwrap();
    let frames_before = mm.machine().frames.free_count();
    mm.madvise_pageout(a, PAGE_SIZE, Some(0)).unwrap();
    assert!(is_swap_pte(raw_pte(mm, a)), "paged out");
    assert_eq!(
        mm.machine().frames.free_count(),
        frames_before + 1,
        "the page was written and freed"
    );
    a
}

#[test]
fn pageout_then_read_and_write_faults_bring_the_contents_back() {
    for p in ["mainline", "linux-6.4", "linux-5.10", "linux-5.7"] {
        let m = machine_with(preset(p));
        let mm = Mm::new(&m).unwrap();
        attach(&mm, 0);
        let a = swapped_page(&mm, 0x5a);
        let pte = raw_pte(&mm, a);
        // 1493a1913e34: the exclusive bit only where PageAnonExclusive is used.
        assert_eq!(pte_swp_exclusive(pte), m.policy.anon_exclusive, "{p}");
        assert_eq!(m.swap.swap_count(swp_offset(pte)), 1);
        clean(&m, &[&mm]);
        // The stale TLB entry went with the pageout's flush: a read faults.
        assert_eq!(access(&mm, 0, a, None), Ok(0x5a), "{p}");
        let pte = pagetable::lookup(&*m.mem, mm.pgd, a).unwrap();
        // c18160dba5ff (v6.11): an exclusive page is mapped writable at once.
        assert_eq!(pte & bits::WRITABLE != 0, p == "mainline", "{p}");
        clean(&m, &[&mm]);
        assert_eq!(access(&mm, 0, a, Some(0x77)), Ok(0x77));
        let frame = pagetable::lookup(&*m.mem, mm.pgd, a).unwrap() & bits::ADDR_MASK;
        // An exclusive page is reused where it is, in the swap cache (its
        // slot kept by SWAP_HAS_CACHE); 5.10 copies a page the swap cache
        // holds (no 53a05ad9f21d), 5.7's reuse_swap_page() takes it out.
        let cached = m.frames.page(frame).swapcache().is_some();
        assert_eq!(cached, m.policy.anon_exclusive, "{p}");
        assert_eq!(
            m.frames.page(frame).refcount(),
            1 + i64::from(cached),
            "{p}"
        );
        clean(&m, &[&mm]);
        // Out again, then a write fault first.
        mm.madvise_pageout(a, PAGE_SIZE, Some(0)).unwrap();
        assert!(is_swap_pte(raw_pte(&mm, a)));
        assert_eq!(access(&mm, 0, a, Some(0x78)), Ok(0x78));
        assert_eq!(access(&mm, 0, a, None), Ok(0x78));
        assert!(m.swap.snapshot().is_empty(), "{p}: the slot was freed");
        clean(&m, &[&mm]);
        detach(&mm, 0);
        drop(mm);
        assert_eq!(verify_no_leaks(&m), vec![]);
    }
}

#[test]
fn fork_duplicates_the_swap_entry_and_clears_the_exclusive_bit() {
    let m = machine_with(Policy::MAINLINE);
    let parent = Mm::new(&m).unwrap();
    attach(&parent, 0);
    let a = swapped_page(&parent, 0x11);
    let slot = swp_offset(raw_pte(&parent, a));
    let child = parent.dup_mmap(Some(0)).unwrap();
    attach(&child, 1);
    assert_eq!(m.swap.swap_count(slot), 2);
    assert!(!pte_swp_exclusive(raw_pte(&parent, a)));
    assert!(!pte_swp_exclusive(raw_pte(&child, a)));
    clean(&m, &[&parent, &child]);
    // Each side swaps in the same page from the swap cache, and a write
    // copies it: neither sees the other's store.
    assert_eq!(access(&child, 1, a, None), Ok(0x11));
    assert_eq!(access(&parent, 0, a, Some(0x22)), Ok(0x22));
    assert_eq!(access(&child, 1, a, None), Ok(0x11));
    assert_eq!(access(&child, 1, a, Some(0x33)), Ok(0x33));
    assert_eq!(access(&parent, 0, a, None), Ok(0x22));
    clean(&m, &[&parent, &child]);
    assert!(m.swap.snapshot().is_empty(), "{:?}", m.swap.snapshot());
    detach(&child, 1);
    drop(child);
    detach(&parent, 0);
    drop(parent);
    assert_eq!(verify_no_leaks(&m), vec![]);
}

#[test]
fn exclusive_bit_decides_reuse_where_reuse_swap_page_was_blind_to_references() {
    // cow.c 'vmsplice() + unmap in parent after fork()', swapped out: the
    // parent's read reference is on the swap-cache page the child then
    // swaps in for a write. reuse_swap_page() (5.10) reuses it: the pipe
    // sees the child's write. Since c145e0b47c77 the reference forces a copy.
    for (p, leaks) in [
        ("mainline", false),
        ("linux-6.3", false),
        ("linux-5.10", true),
    ] {
        let m = machine_with(preset(p));
        let parent = Mm::new(&m).unwrap();
        attach(&parent, 0);
        let a = swapped_page(&parent, 0x0101);
        let child = parent.dup_mmap(Some(0)).unwrap();
        attach(&child, 1);
        let get = gup::GupFlags::default();
        let handle = parent.get_user_page(a, get, 0).unwrap();
        parent.munmap(a, PAGE_SIZE, Some(0)).unwrap();
        clean(&m, &[&parent, &child]);
        assert_eq!(access(&child, 1, a, Some(0xffff)), Ok(0xffff));
        let seen = m.dma_read(handle, 0).unwrap();
        assert_eq!(seen == 0xffff, leaks, "{p}: the pipe read {seen:#x}");
        clean(&m, &[&parent, &child]);
        assert!(m.unpin_user_page(handle));
        detach(&child, 1);
        drop(child);
        detach(&parent, 0);
        drop(parent);
        assert_eq!(verify_no_leaks(&m), vec![], "{p}");
    }
}

#[test]
fn pageout_refuses_a_pinned_page_and_keeps_it_mapped() {
    let m = machine_with(Policy::MAINLINE);
    let mm = Mm::new(&m).unwrap();
    attach(&mm, 0);
    let a = mm.mmap(None, PAGE_SIZE, RW).unwrap();
    access(&mm, 0, a, Some(9)).unwrap();
    let flags = gup::GupFlags {
        write: true,
        pin: true,
        longterm: true,
    };
    let pin = mm.get_user_page(a, flags, 0).unwrap();
    // feb889fb40fa: not even added to the swap cache.
    mm.madvise_pageout(a, PAGE_SIZE, Some(0)).unwrap();
    assert!(!is_swap_pte(raw_pte(&mm, a)));
    assert!(m.swap.snapshot().is_empty());
    // Without that check, try_to_unmap refuses the exclusive pinned page
    // (folio_try_share_anon_rmap_pte(), v5.19): mapped, in the swap cache.
    let m2 = machine_with(Policy {
        pageout_skip_pinned: false,
        ..Policy::MAINLINE
    });
    let mm2 = Mm::new(&m2).unwrap();
    attach(&mm2, 0);
    let b = mm2.mmap(None, PAGE_SIZE, RW).unwrap();
    access(&mm2, 0, b, Some(9)).unwrap();
    let pin2 = mm2.get_user_page(b, flags, 0).unwrap();
    mm2.madvise_pageout(b, PAGE_SIZE, Some(0)).unwrap();
    assert!(!is_swap_pte(raw_pte(&mm2, b)));
    assert_eq!(m2.swap.snapshot().len(), 1, "left in the swap cache");
    clean(&m2, &[&mm2]);
    // The pin and the page stay coherent.
    assert_eq!(access(&mm2, 0, b, Some(10)), Ok(10));
    assert_eq!(m2.dma_read(pin2, 0), Some(10));
    clean(&m2, &[&mm2]);
    // Before v5.19 (5.7: no skip, no exclusive flag) the pinned page is
    // unmapped but cannot be freed: it stays in the swap cache, and the
    // swap-in finds the pinned page again.
    let m3 = machine_with(preset("linux-5.7"));
    let mm3 = Mm::new(&m3).unwrap();
    attach(&mm3, 0);
    let c = mm3.mmap(None, PAGE_SIZE, RW).unwrap();
    access(&mm3, 0, c, Some(9)).unwrap();
    let pin3 = mm3.get_user_page(c, flags, 0).unwrap();
    mm3.madvise_pageout(c, PAGE_SIZE, Some(0)).unwrap();
    assert!(is_swap_pte(raw_pte(&mm3, c)));
    clean(&m3, &[&mm3]);
    assert_eq!(access(&mm3, 0, c, Some(11)), Ok(11));
    assert_eq!(m3.dma_read(pin3, 0), Some(11));
    clean(&m3, &[&mm3]);
    for (m, mm, pin) in [(&m, mm, pin), (&m2, mm2, pin2), (&m3, mm3, pin3)] {
        assert!(m.unpin_user_page(pin));
        detach(&mm, 0);
        drop(mm);
        assert_eq!(verify_no_leaks(m), vec![]);
    }
}

#[test]
fn munmap_and_dontneed_free_the_slot() {
    let m = machine_with(Policy::MAINLINE);
    let mm = Mm::new(&m).unwrap();
    attach(&mm, 0);
    let a = swapped_page(&mm, 1);
    let b = swapped_page(&mm, 2);
    assert_eq!(m.swap.snapshot().len(), 2);
    mm.madvise_dontneed(a, PAGE_SIZE, Some(0)).unwrap();
    assert_eq!(m.swap.snapshot().len(), 1);
    assert_eq!(access(&mm, 0, a, None), Ok(0), "DONTNEED: zeroes");
    mm.munmap(b, PAGE_SIZE, Some(0)).unwrap();
    assert!(m.swap.snapshot().is_empty());
    clean(&m, &[&mm]);
    // A page swapped in by a read stays in the swap cache; unmapping it
    // takes it out (free_pages_and_swap_cache()).
    let c = swapped_page(&mm, 3);
    assert_eq!(access(&mm, 0, c, None), Ok(3));
    assert_eq!(m.swap.snapshot().len(), 1, "cached after a read swap-in");
    clean(&m, &[&mm]);
    mm.munmap(c, PAGE_SIZE, Some(0)).unwrap();
    assert!(m.swap.snapshot().is_empty());
    clean(&m, &[&mm]);
    detach(&mm, 0);
    drop(mm);
    assert_eq!(verify_no_leaks(&m), vec![]);
}

#[test]
fn mm_verify_reports_a_wrong_swap_count() {
    let m = machine_with(Policy::MAINLINE);
    let mm = Mm::new(&m).unwrap();
    attach(&mm, 0);
    let a = swapped_page(&mm, 1);
    let slot = swp_offset(raw_pte(&mm, a));
    m.swap.swap_duplicate(slot);
    let v = verify_pages(&m, &[&mm]);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert!(v[0].0.contains("swap count 2 but 1 swap PTEs"), "{}", v[0]);
    m.swap.swap_free(slot);
    clean(&m, &[&mm]);
    // A swap PTE that names a free slot.
    {
        let slot_word = pagetable::existing_leaf_slot(&*m.mem, mm.pgd, a).unwrap();
        let pte = slot_word.load(Ordering::Acquire);
        slot_word.store(pte + 5 * PAGE_SIZE, Ordering::Release);
        let v = verify_pages(&m, &[&mm]);
        assert!(
            v.iter().any(|v| v.0.contains("free but swap PTEs name it")),
            "{v:#?}"
        );
        slot_word.store(pte, Ordering::Release);
    }
    clean(&m, &[&mm]);
    detach(&mm, 0);
    drop(mm);
    assert_eq!(verify_no_leaks(&m), vec![]);
}

#[test]
fn gup_faults_in_a_swapped_out_page() {
    let m = machine_with(Policy::MAINLINE);
    let mm = Mm::new(&m).unwrap();
    attach(&mm, 0);
    let a = swapped_page(&mm, 0x42);
    let pin = mm
        .get_user_page(
            a,
            gup::GupFlags {
                write: false,
                pin: true,
                longterm: true,
            },
            0,
        )
        .unwrap();
    assert_eq!(m.dma_read(pin, 0), Some(0x42));
    assert!(!is_swap_pte(raw_pte(&mm, a)));
    assert_eq!(access(&mm, 0, a, Some(0x43)), Ok(0x43));
    assert_eq!(m.dma_read(pin, 0), Some(0x43), "the R/O pin sees the write");
    clean(&m, &[&mm]);
    assert!(m.unpin_user_page(pin));
    detach(&mm, 0);
    drop(mm);
    assert_eq!(verify_no_leaks(&m), vec![]);
}
