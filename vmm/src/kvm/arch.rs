//! x86-64 boot state as small pure functions: the kernel-half page tables,
//! the GDT and TSS of a vCPU, and its initial special and general registers.
//! The vCPU starts directly in 64-bit long mode (no real-mode trampoline).

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use cowlab_abi::layout::{
    area, ist, selector, DOORBELL_PHYS, DOORBELL_VA, GDT_ENTRIES, KERNEL_BASE, KERNEL_PT_PHYS,
    KERNEL_REGION_SIZE,
};
use cowlab_abi::{BootHeader, FLUSH_VECTOR, TRIPLE_FAULT_VECTOR};

use crate::mm::pagetable::{bits, index, ENTRIES, KERNEL_PML4_START};

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_PGE: u64 = 1 << 7;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

/// Size of a large page mapping the kernel region.
const LARGE_PAGE: u64 = 2 << 20;

/// Bits of every kernel-part entry.
const TABLE: u64 = bits::PRESENT | bits::WRITABLE | bits::USER;

/// Physical addresses of the kernel-part PDPT, PD and the PT of the doorbell.
const KERNEL_PDPT: u64 = KERNEL_PT_PHYS;
const KERNEL_PD: u64 = KERNEL_PT_PHYS + 0x1000;
const DOORBELL_PT: u64 = KERNEL_PT_PHYS + 0x2000;

/// Kernel-part table entries to write into guest memory, as
/// `(physical address, value)`: `KERNEL_BASE + pa → pa` for the kernel
/// region, with global 2 MiB pages (a CR3 reload keeps them, like Linux's
/// kernel mappings). They carry the U/S bit: the program runs at CPL 3 and
/// executes its code and reaches its mailboxes there.
pub fn kernel_table_writes() -> Vec<(u64, u64)> {
    let mut writes = vec![(KERNEL_PDPT + index(KERNEL_BASE, 3) * 8, KERNEL_PD | TABLE)];
    for i in 0..KERNEL_REGION_SIZE / LARGE_PAGE {
        let pa = i * LARGE_PAGE;
        let flags = TABLE | bits::HUGE | bits::GLOBAL | bits::ACCESSED | bits::DIRTY;
        writes.push((KERNEL_PD + (index(KERNEL_BASE, 2) + i) * 8, pa | flags));
    }
    writes.push((KERNEL_PD + index(DOORBELL_VA, 2) * 8, DOORBELL_PT | TABLE));
    writes.push((
        DOORBELL_PT + index(DOORBELL_VA, 1) * 8,
        DOORBELL_PHYS | TABLE | bits::NO_EXECUTE,
    ));
    writes
}

/// The kernel-half PML4 slots (256..512) every shadow table starts with.
pub fn kernel_pml4() -> [u64; (ENTRIES - KERNEL_PML4_START) as usize] {
    let mut slots = [0; (ENTRIES - KERNEL_PML4_START) as usize];
    slots[(index(KERNEL_BASE, 4) - KERNEL_PML4_START) as usize] = KERNEL_PDPT | TABLE;
    slots
}

/// Size in bytes of a 64-bit TSS.
const TSS_SIZE: u64 = 104;
/// Byte offset of RSP0 in the TSS.
const TSS_RSP0: usize = 4;
/// Byte offset of IST1 in the TSS.
const TSS_IST1: usize = 36;
/// Byte offset of the I/O-map base in the TSS.
const TSS_IOMAP_BASE: usize = 102;

/// The GDT of a vCPU whose area starts at virtual address `area_va`: null,
/// runtime code and data (DPL 0), program code and data (DPL 3), and the
/// two-slot TSS descriptor.
pub fn gdt(area_va: u64) -> [u64; GDT_ENTRIES] {
    let tss = area_va + area::TSS;
    let limit = TSS_SIZE - 1;
    let tss_low = (limit & 0xffff)
        | ((tss & 0xff_ffff) << 16)
        | (0x89 << 40) // present, available 64-bit TSS
        | (((limit >> 16) & 0xf) << 48)
        | (((tss >> 24) & 0xff) << 56);
    [
        0,
        0x00af_9b00_0000_ffff, // code: present, DPL 0, L=1
        0x00cf_9300_0000_ffff, // data: present, DPL 0, writable
        0x00af_fb00_0000_ffff, // code: present, DPL 3, L=1
        0x00cf_f300_0000_ffff, // data: present, DPL 3, writable
        tss_low,
        tss >> 32,
    ]
}

/// The TSS of a vCPU: every vector uses an IST stack, RSP0 is the boot stack.
pub fn tss(area_va: u64) -> [u8; TSS_SIZE as usize] {
    let mut t = [0u8; TSS_SIZE as usize];
    t[TSS_RSP0..TSS_RSP0 + 8].copy_from_slice(&(area_va + area::BOOT_STACK_TOP).to_le_bytes());
    for (i, top) in area::IST_TOPS.iter().enumerate() {
        let at = TSS_IST1 + i * 8;
        t[at..at + 8].copy_from_slice(&(area_va + top).to_le_bytes());
    }
    t[TSS_IOMAP_BASE..TSS_IOMAP_BASE + 2].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes());
    t
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: (selector & 3) as u8,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    }
}

/// Long-mode special registers for a vCPU with area at `area_va` and page
/// table root `cr3`, starting from what KVM reported (`base`). The vCPU
/// starts at CPL 3, in its program; the IDT (in the area) leads to the
/// runtime's CPL-0 stubs.
pub fn sregs(base: kvm_sregs, area_va: u64, cr3: u64) -> kvm_sregs {
    let data = segment(selector::USER_DATA, 3, false);
    kvm_sregs {
        cs: segment(selector::USER_CODE, 11, true),
        ds: data,
        es: data,
        fs: data,
        ss: data,
        gs: kvm_segment {
            base: area_va,
            ..data
        },
        tr: kvm_segment {
            base: area_va + area::TSS,
            limit: (TSS_SIZE - 1) as u32,
            selector: selector::TSS,
            type_: 11, // busy 64-bit TSS
            present: 1,
            s: 0,
            ..Default::default()
        },
        ldt: kvm_segment::default(),
        gdt: kvm_bindings::kvm_dtable {
            base: area_va + area::GDT,
            limit: (GDT_ENTRIES * 8 - 1) as u16,
            ..Default::default()
        },
        idt: kvm_bindings::kvm_dtable {
            base: area_va + area::IDT,
            limit: (IDT_ENTRIES * 16 - 1) as u16,
            ..Default::default()
        },
        cr0: CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
        cr3,
        cr4: CR4_PAE | CR4_PGE | CR4_OSFXSR | CR4_OSXMMEXCPT,
        efer: EFER_LME | EFER_LMA | EFER_NXE,
        ..base
    }
}

/// RFLAGS of a program: IF and the fixed bit.
const USER_RFLAGS: u64 = 0x202;

/// General registers at the guest entry: the program's entry point on its
/// user stack, aligned as if called, interrupts on.
pub fn regs(entry: u64, user_stack_top: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: user_stack_top - 8,
        rflags: USER_RFLAGS,
        ..Default::default()
    }
}

/// Gates in the IDT.
pub const IDT_ENTRIES: usize = 256;

/// Vectors with a special stub.
const PF_VECTOR: usize = 14;
const DF_VECTOR: usize = 8;

/// One 16-byte 64-bit interrupt gate to `handler` on IST `ist`, callable
/// with `int n` from CPL `dpl` (IF is cleared on entry).
fn gate(handler: u64, ist: u8, dpl: u8) -> [u64; 2] {
    let low = (handler & 0xffff)
        | (u64::from(selector::KERNEL_CODE) << 16)
        | (u64::from(ist) << 32)
        | (u64::from(0x8e | (dpl << 5)) << 40)
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

/// The IDT built from the guest's boot header: every exception to its
/// stub, #PF and the flush interrupt to theirs, each vector on its IST
/// stack; every other vector not present.
pub fn idt(header: &BootHeader) -> Vec<[u64; 2]> {
    (0..IDT_ENTRIES)
        .map(|v| match v {
            PF_VECTOR => gate(header.page_fault, ist::PAGE_FAULT, 0),
            DF_VECTOR => gate(header.exceptions[v], ist::DOUBLE_FAULT, 0),
            v if v < 32 => gate(header.exceptions[v], ist::OTHER, 0),
            v if v == usize::from(FLUSH_VECTOR) => gate(header.flush, ist::FLUSH, 0),
            v if v == usize::from(TRIPLE_FAULT_VECTOR) => gate(header.triple_fault, ist::OTHER, 3),
            _ => [0, 0],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_tables_map_the_kernel_region_at_kernel_base() {
        let writes = kernel_table_writes();
        assert_eq!(writes.len(), 3 + (KERNEL_REGION_SIZE / LARGE_PAGE) as usize);
        assert_eq!(writes.last().unwrap().1 & bits::ADDR_MASK, DOORBELL_PHYS);
        // KERNEL_BASE is PML4 255, PDPT 0, PD 0.
        assert_eq!(kernel_pml4()[0] & bits::ADDR_MASK, KERNEL_PDPT);
        assert_eq!(writes[0].0, KERNEL_PDPT);
        assert_eq!(writes[1], (KERNEL_PD, 0x1e7)); // P, RW, U, A, D, PS, G
    }

    #[test]
    fn idt_gates_point_at_the_stubs() {
        let header = BootHeader {
            magic: 0,
            page_fault: 0x7f80_0020_1234,
            flush: 0x7f80_0020_5678,
            triple_fault: 0x7f80_0020_9abc,
            exceptions: [0x7f80_0020_0000; 32],
            killed: 0x7f80_0020_def0,
        };
        let idt = idt(&header);
        let target = |g: [u64; 2]| (g[0] & 0xffff) | ((g[0] >> 48) << 16) | (g[1] << 32);
        assert_eq!(target(idt[14]), header.page_fault);
        assert_eq!((idt[14][0] >> 32) & 7, u64::from(ist::PAGE_FAULT));
        assert_eq!(target(idt[0xf0]), header.flush);
        assert_eq!((idt[0x81][0] >> 45) & 3, 3, "DPL 3: callable with int");
        assert_eq!(idt[0x40], [0, 0], "unused vectors are not present");
    }

    #[test]
    fn tss_descriptor_encodes_the_base() {
        let va = 0x7f80_0080_0000;
        let g = gdt(va);
        let tss_va = va + area::TSS;
        let base = ((g[5] >> 16) & 0xff_ffff) | (((g[5] >> 56) & 0xff) << 24) | (g[6] << 32);
        assert_eq!(base, tss_va);
        let t = tss(va);
        assert_eq!(
            u64::from_le_bytes(t[36..44].try_into().unwrap()),
            va + area::IST_TOPS[0]
        );
    }
}
