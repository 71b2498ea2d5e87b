//! x86-64 4-level page tables in guest-physical memory: the format of both
//! the logical tables (what Linux would have) and the shadow tables (what a
//! CPU's TLB holds, docs/design.md §4).

use std::sync::atomic::{AtomicU64, Ordering};

use cowlab_abi::layout::PAGE_SIZE;

use super::frame::{FrameAllocator, OutOfFrames};
use super::phys::PhysMem;

/// Page-table entry bits (Intel SDM Vol. 3, §4.5).
pub mod bits {
    pub const PRESENT: u64 = 1 << 0;
    pub const WRITABLE: u64 = 1 << 1;
    pub const USER: u64 = 1 << 2;
    pub const ACCESSED: u64 = 1 << 5;
    pub const DIRTY: u64 = 1 << 6;
    /// In a PDPTE or PDE: maps a 1 GiB or 2 MiB page.
    pub const HUGE: u64 = 1 << 7;
    pub const GLOBAL: u64 = 1 << 8;
    pub const NO_EXECUTE: u64 = 1 << 63;
    /// The physical-address field of an entry.
    pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
}

/// Entries per table.
pub const ENTRIES: u64 = 512;

/// First PML4 slot of the kernel part (shared by every address space).
pub const KERNEL_PML4_START: u64 = index(cowlab_abi::layout::KERNEL_BASE, 4);

/// Index of `va` in the table of `level` (4 = PML4 … 1 = PT).
pub const fn index(va: u64, level: u32) -> u64 {
    (va >> (12 + 9 * (level - 1))) & (ENTRIES - 1)
}

/// Bits given to non-leaf entries: permissions are decided at the leaf.
const TABLE_BITS: u64 = bits::PRESENT | bits::WRITABLE | bits::USER;

/// The entry slot for `va` at `level` in the table at `table_pa`.
fn slot<M: PhysMem + ?Sized>(mem: &M, table_pa: u64, va: u64, level: u32) -> &AtomicU64 {
    mem.word(table_pa + index(va, level) * 8)
}

/// The leaf slot for `va` under `root` if every table above it exists.
pub fn existing_leaf_slot<M: PhysMem + ?Sized>(mem: &M, root: u64, va: u64) -> Option<&AtomicU64> {
    let mut table = root;
    for level in (2..=4).rev() {
        let e = slot(mem, table, va, level).load(Ordering::Acquire);
        if e & bits::PRESENT == 0 || e & bits::HUGE != 0 {
            return None;
        }
        table = e & bits::ADDR_MASK;
    }
    Some(slot(mem, table, va, 1))
}

/// Calls `f(va, slot)` for every leaf slot under `root` in `[start, end)`
/// whose value is nonzero, skipping absent tables.
pub fn for_each_leaf<M: PhysMem + ?Sized>(
    mem: &M,
    root: u64,
    start: u64,
    end: u64,
    f: &mut dyn FnMut(u64, &AtomicU64),
) {
    fn walk<M: PhysMem + ?Sized>(
        mem: &M,
        table: u64,
        level: u32,
        base: u64,
        start: u64,
        end: u64,
        f: &mut dyn FnMut(u64, &AtomicU64),
    ) {
        let span = 1u64 << (12 + 9 * (level - 1));
        for i in 0..ENTRIES {
            let lo = base + i * span;
            let hi = lo + span;
            if hi <= start || lo >= end {
                continue;
            }
            let entry = mem.word(table + i * 8);
            let e = entry.load(Ordering::Acquire);
            if level == 1 {
                if e != 0 {
                    f(lo, entry);
                }
            } else if e & bits::PRESENT != 0 && e & bits::HUGE == 0 {
                walk(mem, e & bits::ADDR_MASK, level - 1, lo, start, end, f);
            }
        }
    }
    walk(mem, root, 4, 0, start, end.min(KERNEL_PML4_START << 39), f);
}

/// The leaf (4 KiB) entry mapping `va` under `root`, if every level is present.
pub fn lookup<M: PhysMem + ?Sized>(mem: &M, root: u64, va: u64) -> Option<u64> {
    let pte = existing_leaf_slot(mem, root, va)?.load(Ordering::Acquire);
    (pte & bits::PRESENT != 0).then_some(pte)
}

/// The leaf slot for `va` under `root`, allocating (zeroed) intermediate
/// tables on the way down.
pub fn leaf_slot<'m, M: PhysMem + ?Sized>(
    mem: &'m M,
    frames: &FrameAllocator,
    root: u64,
    va: u64,
) -> Result<&'m AtomicU64, OutOfFrames> {
    Ok(slot(mem, leaf_table(mem, frames, root, va)?, va, 1))
}

/// The leaf table (PT) covering `va` under `root`, allocating (zeroed)
/// intermediate tables on the way down: its slot for any `va'` in the
/// same 2 MiB is `leaf_table_slot(mem, table, va')`.
pub fn leaf_table<M: PhysMem + ?Sized>(
    mem: &M,
    frames: &FrameAllocator,
    root: u64,
    va: u64,
) -> Result<u64, OutOfFrames> {
    let mut table = root;
    for level in (2..=4).rev() {
        let entry = slot(mem, table, va, level);
        let e = entry.load(Ordering::Acquire);
        table = if e & bits::PRESENT != 0 {
            e & bits::ADDR_MASK
        } else {
            let new = frames.alloc()?;
            mem.zero_frame(new);
            entry.store(new | TABLE_BITS, Ordering::Release);
            new
        };
    }
    Ok(table)
}

/// The slot for `va` in the leaf table at `table` (from [`leaf_table`]).
pub fn leaf_table_slot<M: PhysMem + ?Sized>(mem: &M, table: u64, va: u64) -> &AtomicU64 {
    slot(mem, table, va, 1)
}

/// Frees every user-part table below `root`, clears its user-part slots and
/// calls `leaf` with the frame of every present leaf entry it removed. The
/// kernel-part slots (shared tables) are left alone.
pub fn free_user_tables<M: PhysMem + ?Sized>(
    mem: &M,
    frames: &FrameAllocator,
    root: u64,
    leaf: &mut dyn FnMut(u64),
) {
    fn free_level<M: PhysMem + ?Sized>(
        mem: &M,
        frames: &FrameAllocator,
        table: u64,
        level: u32,
        leaf: &mut dyn FnMut(u64),
    ) {
        for i in 0..ENTRIES {
            let e = mem.word(table + i * 8).swap(0, Ordering::AcqRel);
            if e & bits::PRESENT == 0 {
                continue;
            }
            let child = e & bits::ADDR_MASK;
            if level == 1 {
                leaf(child);
            } else {
                free_level(mem, frames, child, level - 1, leaf);
                frames.free(child);
            }
        }
    }
    for i in 0..KERNEL_PML4_START {
        let e = mem.word(root + i * 8).swap(0, Ordering::AcqRel);
        if e & bits::PRESENT != 0 {
            let pdpt = e & bits::ADDR_MASK;
            free_level(mem, frames, pdpt, 3, leaf);
            frames.free(pdpt);
        }
    }
}

/// How many user-part tables hang below `root` (the root not counted).
pub fn count_user_tables<M: PhysMem + ?Sized>(mem: &M, root: u64) -> usize {
    fn count_level<M: PhysMem + ?Sized>(mem: &M, table: u64, level: u32) -> usize {
        if level == 1 {
            return 0;
        }
        (0..ENTRIES)
            .map(|i| mem.word(table + i * 8).load(Ordering::Acquire))
            .filter(|e| e & bits::PRESENT != 0)
            .map(|e| 1 + count_level(mem, e & bits::ADDR_MASK, level - 1))
            .sum()
    }
    (0..KERNEL_PML4_START)
        .map(|i| mem.word(root + i * 8).load(Ordering::Acquire))
        .filter(|e| e & bits::PRESENT != 0)
        .map(|e| 1 + count_level(mem, e & bits::ADDR_MASK, 3))
        .sum()
}

/// Base of the page containing `va`.
pub const fn page_base(va: u64) -> u64 {
    va & !(PAGE_SIZE - 1)
}
