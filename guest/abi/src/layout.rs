//! Guest memory layout (docs/design.md §2).
//!
//! Guest-physical memory starts at 0. Its first [`KERNEL_REGION_SIZE`] bytes
//! are the kernel region: the VMM's page tables for the kernel part, the
//! guest image and the per-vCPU areas. The kernel region is mapped at
//! `KERNEL_BASE + pa` in every address space, permanently, with global 2 MiB
//! pages. Everything above it is the frame pool of the memory manager.
//!
//! On this host KVM is PVM, which runs guests inside the lower half of the
//! host's address space: a guest may only use `[0, 2^47)`, and code in the
//! upper half is only emulated, instruction by instruction. So the "kernel
//! half" of docs/design.md §2 is the last PML4 slot of the lower half
//! (`KERNEL_BASE..2^47`), and the user part is everything below it
//! (`USER_MIN_ADDR..USER_END`), empty at boot and filled on page faults.

/// Size of a base page / frame.
pub const PAGE_SIZE: u64 = 4096;

/// Virtual address of guest-physical 0: the start of the last PML4 slot of
/// the lower half (the guest is linked with `-C code-model=large`).
pub const KERNEL_BASE: u64 = 0x0000_7f80_0000_0000;

/// Size of the kernel region, mapped by 2 MiB pages.
pub const KERNEL_REGION_SIZE: u64 = 16 << 20;

/// Physical address of the VMM-built kernel-part page tables.
pub const KERNEL_PT_PHYS: u64 = 0x10_0000;

/// Guest-physical address of the hypercall doorbell: an MMIO page (no
/// memory behind it), so a write exits to the VMM.
pub const DOORBELL_PHYS: u64 = 0xff_0000_0000;

/// Where the doorbell is mapped: just after the kernel region.
pub const DOORBELL_VA: u64 = KERNEL_BASE + KERNEL_REGION_SIZE;

/// Guest memory must end below the doorbell.
pub const MAX_MEM_SIZE: u64 = DOORBELL_PHYS;

/// Physical address of the page shared by every process (in the kernel
/// region, so mapped identically everywhere and never copied on fork):
/// words for cross-process events.
pub const SHARED_PAGE_PHYS: u64 = KERNEL_PT_PHYS + 0x8000;

/// Physical address of the litmus program (bytecode), read by every thread.
pub const LITMUS_PHYS: u64 = KERNEL_PT_PHYS + 0x1_0000;

/// Room for the litmus program, up to the guest image.
pub const LITMUS_SIZE: u64 = IMAGE_PHYS - LITMUS_PHYS;

/// Physical address the guest image is linked to load at (`guest/link.ld`).
pub const IMAGE_PHYS: u64 = 0x20_0000;

/// Physical address of the first per-vCPU area; the image must end before it.
pub const VCPU_AREAS_PHYS: u64 = 0x80_0000;

/// Size of one per-vCPU area.
pub const VCPU_AREA_SIZE: u64 = 128 << 10;

/// Number of per-vCPU areas in the kernel region, so the most vCPUs a VM
/// can ever have (forks and spawns included).
pub const MAX_VCPUS: usize = ((KERNEL_REGION_SIZE - VCPU_AREAS_PHYS) / VCPU_AREA_SIZE) as usize;

/// Offsets inside a per-vCPU area.
pub mod area {
    /// The [`crate::VcpuArea`] structure (`GS.base`).
    pub const INFO: u64 = 0x0000;
    /// This vCPU's GDT (built by the VMM).
    pub const GDT: u64 = 0x1000;
    /// This vCPU's 64-bit TSS (built by the VMM).
    pub const TSS: u64 = 0x2000;
    /// This vCPU's IDT (built by the guest at boot).
    pub const IDT: u64 = 0x3000;
    /// Top of the boot stack, used until the thread switches to its user stack.
    pub const BOOT_STACK_TOP: u64 = 0x8000;
    /// Tops of the interrupt stacks, indexed by IST number - 1.
    pub const IST_TOPS: [u64; 4] = [0xc000, 0x1_0000, 0x1_4000, 0x1_8000];
    /// The #PF stub's exception frame while it waits in its exit: error
    /// code, RIP, CS, RFLAGS, RSP, SS, pushed by the CPU at the top of the
    /// #PF IST stack (16-byte aligned, so at a fixed place).
    pub const PF_FRAME: u64 = IST_TOPS[super::ist::PAGE_FAULT as usize - 1] - 6 * 8;
}

/// IST numbers (1-based, as in the IDT gate) of the interrupt stacks. Every
/// vector runs on an IST stack, so a fault on a copy-on-write user stack can
/// never turn into a double fault.
pub mod ist {
    /// Page faults.
    pub const PAGE_FAULT: u8 = 1;
    /// The TLB-flush interrupt.
    pub const FLUSH: u8 = 2;
    /// Double faults.
    pub const DOUBLE_FAULT: u8 = 3;
    /// Every other exception.
    pub const OTHER: u8 = 4;
}

/// GDT selectors set up by the VMM.
pub mod selector {
    /// Runtime (CPL 0) code and data.
    pub const KERNEL_CODE: u16 = 0x08;
    pub const KERNEL_DATA: u16 = 0x10;
    /// Program (CPL 3) code and data, RPL 3 included.
    pub const USER_CODE: u16 = 0x18 | 3;
    pub const USER_DATA: u16 = 0x20 | 3;
    pub const TSS: u16 = 0x28;
}

/// Number of 8-byte GDT slots (the TSS descriptor takes two).
pub const GDT_ENTRIES: usize = 7;

/// Lowest user address that can ever be mapped, like Linux's `mmap_min_addr`:
/// a NULL dereference always faults.
pub const USER_MIN_ADDR: u64 = 0x1_0000;

/// End of the user part: where the kernel slot begins.
pub const USER_END: u64 = KERNEL_BASE;

/// Top of vCPU 0's user stack; vCPU `n`'s is [`USER_STACK_STRIDE`] × n lower.
pub const USER_STACK_TOP: u64 = 0x0000_7f00_0000_0000;

/// Distance between the stacks of consecutive vCPUs.
pub const USER_STACK_STRIDE: u64 = 1 << 24;

/// Size of a thread's stack VMA (below its top).
pub const USER_STACK_SIZE: u64 = 1 << 20;

/// Virtual address of a guest-physical address in the kernel region.
pub const fn kernel_va(pa: u64) -> u64 {
    KERNEL_BASE + pa
}

/// Guest-physical address of vCPU `id`'s area.
pub const fn vcpu_area_phys(id: usize) -> u64 {
    VCPU_AREAS_PHYS + id as u64 * VCPU_AREA_SIZE
}

/// The user stack top of vCPU `id`.
pub const fn user_stack_top(id: usize) -> u64 {
    USER_STACK_TOP - id as u64 * USER_STACK_STRIDE
}
