//! The unit tests of the model's building blocks, kept out of their files
//! (which the checker's copy of the model compiles too).

/// The unit tests of `frame.rs` (kept out of the file, which the
/// checker's copy of the model compiles too).
mod frame_unit {
    #![allow(unused_imports)]
    use crate::mm::frame::*;
    use crate::mm::frame::{FrameAllocator, OutOfFrames};
    use crate::mm::pagetable::{bits, ENTRIES, KERNEL_PML4_START};
    use crate::mm::phys::PhysMem;
    use cowlab_abi::layout::PAGE_SIZE;
    use std::sync::atomic::Ordering;

    #[test]
    fn hands_out_every_frame_once_then_fails() {
        let pool = FrameAllocator::new(0x1000, 0x4000);
        let mut got: Vec<u64> = (0..3).map(|_| pool.alloc().unwrap()).collect();
        assert_eq!(pool.alloc(), Err(OutOfFrames));
        got.sort();
        assert_eq!(got, vec![0x1000, 0x2000, 0x3000]);
        pool.free(0x2000);
        assert_eq!(pool.alloc(), Ok(0x2000));
        pool.free(0x3000);
        pool.free(0x3000);
        assert_eq!(pool.double_frees(), (1, Some(0x3000)));
        assert_eq!(pool.free_count(), 1, "never on the list twice");
    }
}

/// The unit tests of `page.rs` (kept out of the file, which the
/// checker's copy of the model compiles too).
mod page_unit {
    #![allow(unused_imports)]
    use crate::mm::frame::{FrameAllocator, OutOfFrames};
    use crate::mm::page::*;
    use crate::mm::pagetable::{bits, ENTRIES, KERNEL_PML4_START};
    use crate::mm::phys::testing::VecMem;
    use crate::mm::phys::PhysMem;
    use cowlab_abi::layout::PAGE_SIZE;
    use std::sync::atomic::Ordering;

    #[test]
    fn refcount_frees_at_zero_and_zero_page_is_never_counted() {
        let mem = VecMem::new(1 << 16);
        let frames = Frames::new(&mem, 0x1000, 1 << 16).unwrap();
        let free = frames.free_count();
        let pa = frames.alloc_zeroed(&mem).unwrap();
        frames.get_page(pa);
        frames.put_page(pa);
        assert_eq!(frames.free_count(), free - 1);
        frames.put_page(pa);
        assert_eq!(frames.free_count(), free);
        let zero = frames.zero_page();
        frames.get_page(zero);
        frames.put_page(zero);
        assert_eq!(frames.page(zero).refcount(), 0);
        assert_eq!(frames.in_use().count(), 0);
    }
}

/// The unit tests of `pagetable.rs` (kept out of the file, which the
/// checker's copy of the model compiles too).
mod pagetable_unit {
    #![allow(unused_imports)]
    use crate::mm::frame::{FrameAllocator, OutOfFrames};
    use crate::mm::pagetable::*;
    use crate::mm::pagetable::{bits, ENTRIES, KERNEL_PML4_START};
    use crate::mm::phys::testing::VecMem;
    use crate::mm::phys::PhysMem;
    use cowlab_abi::layout::PAGE_SIZE;
    use std::sync::atomic::Ordering;

    #[test]
    fn install_lookup_and_free_round_trip() {
        let mem = VecMem::new(1 << 20);
        let frames = FrameAllocator::new(0x1000, 1 << 20);
        let root = frames.alloc().unwrap();
        mem.zero_frame(root);
        let before = frames.free_count();

        let va = 0x7eff_1234_5000;
        assert_eq!(lookup(&mem, root, va), None);
        leaf_slot(&mem, &frames, root, va)
            .unwrap()
            .store(0xabc000 | bits::PRESENT, Ordering::Release);
        assert_eq!(lookup(&mem, root, va), Some(0xabc000 | bits::PRESENT));
        assert_eq!(lookup(&mem, root, va + PAGE_SIZE), None);
        assert_eq!(before - frames.free_count(), 3, "PDPT, PD and PT allocated");

        let mut leaves = Vec::new();
        free_user_tables(&mem, &frames, root, &mut |f| leaves.push(f));
        assert_eq!(leaves, vec![0xabc000]);
        assert_eq!(frames.free_count(), before);
        assert_eq!(lookup(&mem, root, va), None);
    }

    #[test]
    fn for_each_leaf_visits_only_the_range() {
        let mem = VecMem::new(1 << 20);
        let frames = FrameAllocator::new(0x1000, 1 << 20);
        let root = frames.alloc().unwrap();
        mem.zero_frame(root);
        for va in [0x1000_0000u64, 0x1000_1000, 0x2000_0000, 0x7e00_0000_0000] {
            leaf_slot(&mem, &frames, root, va)
                .unwrap()
                .store(va | bits::PRESENT, Ordering::Release);
        }
        let mut seen = Vec::new();
        for_each_leaf(&mem, root, 0x1000_1000, 0x7e00_0000_1000, &mut |va, s| {
            assert_eq!(s.load(Ordering::Relaxed) & bits::ADDR_MASK, va);
            seen.push(va)
        });
        assert_eq!(seen, vec![0x1000_1000, 0x2000_0000, 0x7e00_0000_0000]);
    }

    #[test]
    fn out_of_frames_is_an_error() {
        let mem = VecMem::new(0x3000);
        let frames = FrameAllocator::new(0x1000, 0x3000);
        let root = frames.alloc().unwrap();
        mem.zero_frame(root);
        assert_eq!(
            leaf_slot(&mem, &frames, root, 0x1000).err(),
            Some(OutOfFrames)
        );
    }
}

/// The unit tests of `tlb.rs` (kept out of the file, which the
/// checker's copy of the model compiles too).
mod tlb_unit {
    #![allow(unused_imports)]
    use crate::mm::frame::{FrameAllocator, OutOfFrames};
    use crate::mm::pagetable::{bits, ENTRIES, KERNEL_PML4_START};
    use crate::mm::phys::testing::VecMem;
    use crate::mm::phys::PhysMem;
    use crate::mm::tlb::*;
    use cowlab_abi::layout::PAGE_SIZE;
    use std::sync::atomic::Ordering;

    fn setup() -> (VecMem, FrameAllocator, ShadowTlb) {
        let mem = VecMem::new(1 << 20);
        let frames = FrameAllocator::new(0x1000, 1 << 20);
        let mut kernel = [0u64; (ENTRIES - KERNEL_PML4_START) as usize];
        kernel[0] = 0x5000 | bits::PRESENT;
        let tlb = ShadowTlb::new(&mem, &frames, &kernel, 1).unwrap();
        (mem, frames, tlb)
    }

    #[test]
    fn fill_flush_release_keeps_the_kernel_part_and_leaks_nothing() {
        let (mem, frames, mut tlb) = setup();
        let start = frames.free_count() + 1; // the root
        tlb.fill(&mem, &frames, 0x1234_5000, user_pte(0x9000, true), None)
            .unwrap();
        assert_eq!(
            tlb.lookup(&mem, 0x1234_5abc).map(|e| e & bits::ADDR_MASK),
            Some(0x9000)
        );
        assert_eq!((tlb.fills(), tlb.len()), (1, 1));
        assert_eq!(tlb.flush_range(&mem, 0, 0x1234_5000), 0);
        assert_eq!(tlb.flush_all(&mem), 1);
        assert_eq!(tlb.lookup(&mem, 0x1234_5000), None);
        assert_eq!(
            mem.word(tlb.root() + KERNEL_PML4_START * 8)
                .load(Ordering::Relaxed),
            0x5000 | bits::PRESENT
        );
        tlb.release(&mem, &frames);
        assert_eq!(frames.free_count(), start);
    }

    /// [`VecMem`] that records every frame revoked.
    struct RevokeLog(VecMem, std::sync::Mutex<Vec<u64>>);

    impl PhysMem for RevokeLog {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn word(&self, pa: u64) -> &std::sync::atomic::AtomicU64 {
            self.0.word(pa)
        }
        fn zero_frame(&self, pa: u64) {
            self.0.zero_frame(pa)
        }
        fn copy_frame(&self, dst: u64, src: u64) {
            self.0.copy_frame(dst, src)
        }
        fn read(&self, pa: u64, buf: &mut [u8]) -> Option<()> {
            self.0.read(pa, buf)
        }
        fn write(&self, pa: u64, buf: &[u8]) -> Option<()> {
            self.0.write(pa, buf)
        }
        fn revoke(&self, frame: u64) {
            self.1.lock().unwrap().push(frame);
        }
    }

    /// Each way `flush_range` removes entries (a few of many, most of
    /// them, all) drops exactly the range's translations, keeps the
    /// others (below and above it), and revokes exactly the frames the
    /// dropped entries mapped.
    #[test]
    fn flush_range_drops_exactly_the_range_and_revokes_its_frames() {
        let mem = RevokeLog(VecMem::new(1 << 22), Default::default());
        let frames = FrameAllocator::new(0x1000, 1 << 20);
        let kernel = [0u64; (ENTRIES - KERNEL_PML4_START) as usize];
        let mut tlb = ShadowTlb::new(&mem, &frames, &kernel, 1).unwrap();
        let base = 0x40_0000u64;
        // 64 pages, page i → frame 0x10_0000 + i pages; one far above.
        let frame_of = |i: u64| 0x10_0000 + i * PAGE_SIZE;
        for i in 0..64 {
            tlb.fill(
                &mem,
                &frames,
                base + i * PAGE_SIZE,
                user_pte(frame_of(i), true),
                None,
            )
            .unwrap();
        }
        let stack = 0x7eff_ffff_f000;
        tlb.fill(&mem, &frames, stack, user_pte(0x30_0000, true), None)
            .unwrap();
        let held = |tlb: &ShadowTlb, i: u64| tlb.lookup(&mem, base + i * PAGE_SIZE).is_some();
        let take_log = || std::mem::take(&mut *mem.1.lock().unwrap());

        // A few of many: one page in the middle.
        assert_eq!(
            tlb.flush_range(&mem, base + 10 * PAGE_SIZE, base + 11 * PAGE_SIZE),
            1
        );
        assert_eq!(take_log(), vec![frame_of(10)]);
        assert!((0..64).all(|i| held(&tlb, i) == (i != 10)));
        assert_eq!(tlb.len(), 64);

        // Most of them: pages 0..48 (10 already gone).
        assert_eq!(tlb.flush_range(&mem, base, base + 48 * PAGE_SIZE), 47);
        let mut log = take_log();
        log.sort_unstable();
        let want: Vec<u64> = (0..48).filter(|i| *i != 10).map(frame_of).collect();
        assert_eq!(log, want);
        assert!((0..64).all(|i| held(&tlb, i) == (i >= 48)));
        assert!(tlb.lookup(&mem, stack).is_some());
        assert_eq!(tlb.len(), 17);

        // An empty or reversed range drops nothing.
        assert_eq!(
            tlb.flush_range(&mem, base + 50 * PAGE_SIZE, base + 50 * PAGE_SIZE),
            0
        );
        assert_eq!(tlb.flush_range(&mem, stack, base), 0);
        assert!(take_log().is_empty());

        // All of them.
        assert_eq!(tlb.flush_all(&mem), 17);
        let mut log = take_log();
        log.sort_unstable();
        let mut want: Vec<u64> = (48..64).map(frame_of).collect();
        want.push(0x30_0000);
        assert_eq!(log, want);
        assert!(tlb.is_empty() && tlb.lookup(&mem, stack).is_none());
        assert!((0..64).all(|i| !held(&tlb, i)));
    }

    #[test]
    fn fill_around_caches_the_aligned_groups_valid_neighbours_and_keeps_held_entries() {
        let (mem, frames, mut tlb) = setup();
        let base = 0x40_0000; // 8-page aligned
        let at = |i: u64| base + i * PAGE_SIZE;
        tlb.fill(&mem, &frames, at(5), user_pte(0x9000, true), None)
            .unwrap();
        // An entry the TLB already holds (perhaps stale) is not replaced.
        tlb.fill(&mem, &frames, at(1), user_pte(0xa000, true), None)
            .unwrap();
        // The logical table has every page but 2 present, read-only.
        let around = tlb
            .fill_around(&mem, &frames, at(5), 8, None, |n| {
                (n != at(2)).then_some(user_pte(0xb000, false))
            })
            .unwrap();
        let pages: Vec<u64> = around.iter().map(|(n, _)| (n - base) / PAGE_SIZE).collect();
        assert_eq!(pages, [0, 3, 4, 6, 7]);
        assert_eq!(tlb.lookup(&mem, at(1)), Some(user_pte(0xa000, true)));
        assert_eq!(tlb.lookup(&mem, at(5)), Some(user_pte(0x9000, true)));
        assert_eq!(tlb.lookup(&mem, at(6)), Some(user_pte(0xb000, false)));
        assert_eq!(tlb.lookup(&mem, at(2)), None);
        assert_eq!(tlb.lookup(&mem, at(8)), None, "outside the group");
        assert_eq!((tlb.fills(), tlb.len()), (7, 7));
        // A group of 1 is the faulting page only.
        let none = tlb
            .fill_around(&mem, &frames, at(9), 1, None, |_| {
                Some(user_pte(0xb000, false))
            })
            .unwrap();
        assert!(none.is_empty());
        assert_eq!(tlb.flush_all(&mem), 7);
    }

    #[test]
    fn fill_around_stops_at_capacity_and_never_evicts() {
        let (mem, frames, mut tlb) = setup();
        let page = 0x40_0000 + 3 * PAGE_SIZE;
        tlb.fill(&mem, &frames, page, user_pte(0x9000, true), Some(3))
            .unwrap();
        let around = tlb
            .fill_around(&mem, &frames, page, 16, Some(3), |_| {
                Some(user_pte(0xb000, true))
            })
            .unwrap();
        assert_eq!(around.len(), 2);
        assert_eq!((tlb.len(), tlb.evictions()), (3, 0));
        assert!(tlb.lookup(&mem, page).is_some());
    }

    #[test]
    fn capacity_evicts_others_and_keeps_the_new_entry() {
        let (mem, frames, mut tlb) = setup();
        for i in 0..20u64 {
            tlb.fill(
                &mem,
                &frames,
                0x40_0000 + i * PAGE_SIZE,
                user_pte(0x9000, false),
                Some(4),
            )
            .unwrap();
            assert!(tlb.lookup(&mem, 0x40_0000 + i * PAGE_SIZE).is_some());
        }
        assert_eq!(tlb.len(), 4);
        assert_eq!(tlb.evictions(), 16);
    }
}
