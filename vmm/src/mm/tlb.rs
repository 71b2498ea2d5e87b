//! Per-vCPU shadow page tables: the TLB model (DESIGN.md §4).
//!
//! The table in a vCPU's CR3 is its shadow table. Its kernel half points at
//! the shared, permanent kernel mapping; its user half holds exactly the
//! translations the CPU's TLB holds, filled one page at a time on misses.

use std::sync::atomic::Ordering;

use cowlab_abi::layout::PAGE_SIZE;

use super::frame::{FrameAllocator, OutOfFrames};
use super::pagetable::{self, bits, ENTRIES, KERNEL_PML4_START};
use super::phys::PhysMem;

/// One CPU's TLB, as a shadow page table.
#[derive(Debug)]
pub struct ShadowTlb {
    root: u64,
    fills: u64,
}

impl ShadowTlb {
    /// An empty TLB whose kernel half is `kernel_pml4` (the PML4 slots from
    /// 256 up, shared by every address space).
    pub fn new<M: PhysMem + ?Sized>(
        mem: &M,
        frames: &FrameAllocator,
        kernel_pml4: &[u64; (ENTRIES - KERNEL_PML4_START) as usize],
    ) -> Result<Self, OutOfFrames> {
        let root = frames.alloc()?;
        mem.zero_frame(root);
        for (i, e) in kernel_pml4.iter().enumerate() {
            mem.word(root + (KERNEL_PML4_START + i as u64) * 8)
                .store(*e, Ordering::Release);
        }
        Ok(ShadowTlb { root, fills: 0 })
    }

    /// Guest-physical address of the PML4 (the vCPU's CR3).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Number of fills since creation.
    pub fn fills(&self) -> u64 {
        self.fills
    }

    /// Installs the translation `pte` for the page of `va` (a TLB fill).
    pub fn fill<M: PhysMem + ?Sized>(
        &mut self,
        mem: &M,
        frames: &FrameAllocator,
        va: u64,
        pte: u64,
    ) -> Result<(), OutOfFrames> {
        debug_assert!(
            va < (KERNEL_PML4_START << 39),
            "fill of a kernel address {va:#x}"
        );
        pagetable::leaf_slot(mem, frames, self.root, va)?.store(pte, Ordering::Release);
        self.fills += 1;
        Ok(())
    }

    /// The translation this TLB holds for `va`, if any.
    pub fn lookup<M: PhysMem + ?Sized>(&self, mem: &M, va: u64) -> Option<u64> {
        pagetable::lookup(mem, self.root, va & !(PAGE_SIZE - 1))
    }

    /// Drops every user-part translation (a full flush of non-global
    /// entries) and makes the hardware forget the frames they mapped.
    pub fn flush_all<M: PhysMem + ?Sized>(&mut self, mem: &M, frames: &FrameAllocator) {
        pagetable::free_user_tables(mem, frames, self.root, &mut |frame| mem.revoke(frame));
    }

    /// Frees the whole table, root included.
    pub fn release<M: PhysMem + ?Sized>(mut self, mem: &M, frames: &FrameAllocator) {
        self.flush_all(mem, frames);
        for i in KERNEL_PML4_START..ENTRIES {
            mem.word(self.root + i * 8).store(0, Ordering::Release);
        }
        frames.free(self.root);
    }
}

/// A user-half leaf entry for a data page at `frame`.
pub fn user_pte(frame: u64, writable: bool) -> u64 {
    let w = if writable {
        bits::WRITABLE | bits::DIRTY
    } else {
        0
    };
    frame | bits::PRESENT | bits::USER | bits::ACCESSED | bits::NO_EXECUTE | w
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::phys::testing::VecMem;

    #[test]
    fn fill_flush_release_keeps_the_kernel_half_and_leaks_nothing() {
        let mem = VecMem::new(1 << 20);
        let frames = FrameAllocator::new(0x1000, 1 << 20);
        let mut kernel = [0u64; (ENTRIES - KERNEL_PML4_START) as usize];
        kernel[0] = 0x5000 | bits::PRESENT;
        let start = frames.free_count();

        let mut tlb = ShadowTlb::new(&mem, &frames, &kernel).unwrap();
        tlb.fill(&mem, &frames, 0x1234_5000, user_pte(0x9000, true))
            .unwrap();
        assert_eq!(
            tlb.lookup(&mem, 0x1234_5abc).map(|e| e & bits::ADDR_MASK),
            Some(0x9000)
        );
        assert_eq!(tlb.fills(), 1);

        tlb.flush_all(&mem, &frames);
        assert_eq!(tlb.lookup(&mem, 0x1234_5000), None);
        assert_eq!(
            mem.word(tlb.root() + KERNEL_PML4_START * 8)
                .load(Ordering::Relaxed),
            0x5000 | bits::PRESENT
        );

        tlb.release(&mem, &frames);
        assert_eq!(frames.free_count(), start);
    }
}
