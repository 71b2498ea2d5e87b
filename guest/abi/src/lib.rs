//! The contract between the cowlab guest and the VMM, defined once.
//!
//! Everything both sides must agree on lives here: the guest-physical and
//! guest-virtual memory layout, the per-vCPU area (mailboxes read and written
//! by both sides), the hypercall numbers carried by port I/O, the interrupt
//! vector of the TLB-flush IPI and the built-in guest programs.
//!
//! A hypercall is one exit carrying `Hypercall as u32`; its arguments and
//! result travel through the calling vCPU's [`VcpuArea`]. The CPL-0 stubs
//! exit with `out dx, eax` to [`HYPERCALL_PORT`] (the #PF stub with a bare
//! `out` to [`FAULT_PORT`]); the program, at CPL 3,
//! writes the number to the doorbell page ([`layout::DOORBELL_VA`], an
//! MMIO page): on this host (PVM) port I/O from CPL 3 raises #GP in the
//! guest instead of exiting, while an MMIO write exits directly.
#![no_std]

pub mod bytecode;
pub mod event;
pub mod layout;
pub mod program;

pub use program::Program;

/// The I/O port the CPL-0 stubs write a hypercall number to.
pub const HYPERCALL_PORT: u16 = 0x0c0;

/// The I/O port of the #PF stub's exit ([`Hypercall::PageFault`]): any
/// `out` to it, whatever its size and data (the stub does `out imm8, al`,
/// which needs no register of its own). Below 0x100 so the immediate form
/// reaches it.
pub const FAULT_PORT: u16 = 0x0c1;

/// Interrupt vector of the TLB-flush IPI (docs/design.md §4). Its handler reloads
/// CR3 and acknowledges with [`Hypercall::FlushAck`].
pub const FLUSH_VECTOR: u8 = 0xf0;

/// Hypercall numbers (`eax` of the `out` to [`HYPERCALL_PORT`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypercall {
    /// First exit of every vCPU but a litmus thread's: its program has started.
    Booted = 1,
    /// Print `hcall.args[0]` bytes of `console` as one line.
    Console = 2,
    /// The thread ends with status `hcall.args[0]` (0 = success).
    Exit = 3,
    /// A #PF, forwarded by the #PF stub's `out` to [`FAULT_PORT`] (never
    /// through the doorbell): the VMM reads CR2 from the vCPU's special
    /// registers, which `KVM_RUN` copies out with every exit
    /// (`KVM_SYNC_X86_SREGS`), and the error code and RIP from the
    /// exception frame on the #PF IST stack
    /// ([`layout::area::PF_FRAME`]); it answers in `fault.result`.
    PageFault = 4,
    /// An exception the runtime does not handle: `crash` is valid. Never resumed.
    Crash = 5,
    /// The flush interrupt handler reloaded CR3.
    FlushAck = 6,
    /// Does nothing; measures the exit round trip.
    Nop = 7,
    /// Benchmark marker `hcall.args[0]`; the VMM timestamps it.
    Mark = 8,
    /// Start a new vCPU in this address space running program `hcall.args[0]`
    /// with argument `hcall.args[1]`; `hcall.ret` = its vCPU id or `u64::MAX`.
    Spawn = 9,
    /// A guest self-check failed; `console` holds a message of `hcall.args[0]`
    /// bytes. The thread ends with status 1.
    Fail = 10,
    /// `mmap(args[0] (0 = anywhere), args[1] bytes, args[2] = PROT_*)`,
    /// anonymous private; `ret` = the address or a negative errno.
    Mmap = 11,
    /// `munmap(args[0], args[1])`; `ret` = 0 or a negative errno.
    Munmap = 12,
    /// `mprotect(args[0], args[1], args[2] = PROT_*)`; `args[3]` bit 0 =
    /// [`MPROTECT_DEFER_FLUSH`]. `ret` = 0 or a negative errno.
    Mprotect = 13,
    /// `madvise(args[0], args[1], args[2] = MADV_*)`; `ret` = 0 or a negative errno.
    Madvise = 14,
    /// Performs the TLB flush of `[args[0], args[0] + args[1])` that a
    /// deferred `mprotect` left pending.
    FlushTlb = 15,
    /// A killed thread has left the stubs (see [`fault_result::KILL`]); the
    /// VMM ends it with the outcome it recorded.
    Killed = 18,
    /// `pin_user_pages()`/`get_user_pages()` of the page at `args[0]` with
    /// `args[1]` = [`gup`] flags; `ret` = a pin handle or a negative errno.
    Pin = 19,
    /// Releases pin handle `args[0]`; `ret` = 0 or a negative errno.
    Unpin = 20,
    /// "DMA" read of the word at byte `args[1]` of pin `args[0]`: `ret`.
    DmaRead = 21,
    /// "DMA" write of `args[2]` to the word at byte `args[1]` of pin `args[0]`.
    DmaWrite = 22,
    /// Registers `[args[0], args[0] + args[1])` for userfaultfd write-protect.
    UffdRegister = 23,
    /// Write-protects (`args[2]` = 1) or unprotects (0) `[args[0], args[0] + args[1])`.
    UffdWp = 24,
    /// Waits for a userfaultfd wp fault; `ret` = the faulting page.
    UffdWait = 25,
    /// A guest hook point (`hook NAME` in a litmus test) with id `args[0]`.
    Hook = 26,
    /// `mremap(args[0], args[1] old bytes, args[2] new bytes, flags,
    /// new_addr)` with `args[3]` = `new_addr | flags` ([`mremap`] flags in
    /// the low 12 bits: `new_addr` is page-aligned, the guest checks);
    /// `ret` = the mapping's address or a negative errno.
    Mremap = 27,
    /// Sleeps until the shared event word `args[0]` is nonzero (or the
    /// thread is stopped). The guest counts itself in
    /// [`bytecode::SLEEPERS_WORD`] and checks the word again before it
    /// calls, so a [`Hypercall::WakeEvents`] cannot be missed.
    AwaitEvent = 28,
    /// A shared event word was set while [`bytecode::SLEEPERS_WORD`] was
    /// nonzero: wake every [`Hypercall::AwaitEvent`] sleeper to look again.
    WakeEvents = 29,
    /// Waits until vCPU `args[0]` has ended; `ret` = its exit status, or
    /// `u64::MAX` if it did not exit normally (crash, SIGSEGV, OOM).
    Join = 16,
    /// `fork()`: a copy-on-write copy of this process with a copy of this
    /// thread; `ret` = the child's vCPU id in the parent, 0 in the child,
    /// or a negative errno.
    Fork = 17,
}

impl Hypercall {
    /// Decodes a hypercall number written by the guest.
    pub const fn from_u32(nr: u32) -> Option<Self> {
        Some(match nr {
            1 => Self::Booted,
            2 => Self::Console,
            3 => Self::Exit,
            4 => Self::PageFault,
            5 => Self::Crash,
            6 => Self::FlushAck,
            7 => Self::Nop,
            8 => Self::Mark,
            9 => Self::Spawn,
            10 => Self::Fail,
            11 => Self::Mmap,
            12 => Self::Munmap,
            13 => Self::Mprotect,
            14 => Self::Madvise,
            15 => Self::FlushTlb,
            16 => Self::Join,
            17 => Self::Fork,
            18 => Self::Killed,
            19 => Self::Pin,
            20 => Self::Unpin,
            21 => Self::DmaRead,
            22 => Self::DmaWrite,
            23 => Self::UffdRegister,
            24 => Self::UffdWp,
            25 => Self::UffdWait,
            26 => Self::Hook,
            27 => Self::Mremap,
            28 => Self::AwaitEvent,
            29 => Self::WakeEvents,
            _ => return None,
        })
    }
}

/// `PROT_*` for [`Hypercall::Mmap`] and [`Hypercall::Mprotect`].
pub mod prot {
    pub const NONE: u64 = 0;
    pub const READ: u64 = 1;
    pub const WRITE: u64 = 2;
}

/// Flags of [`Hypercall::Pin`].
pub mod gup {
    /// FOLL_WRITE.
    pub const WRITE: u64 = 1;
    /// FOLL_PIN (else FOLL_GET).
    pub const PIN: u64 = 2;
    /// FOLL_LONGTERM.
    pub const LONGTERM: u64 = 4;
    /// GUP-fast first: get_user_pages_fast() / pin_user_pages_fast() (the
    /// lockless walk, falling back to the slow path), else
    /// get_user_pages() / pin_user_pages().
    pub const FAST: u64 = 8;
}

/// `MADV_DONTNEED` for [`Hypercall::Madvise`].
pub const MADV_DONTNEED: u64 = 4;
/// `MADV_DONTFORK` for [`Hypercall::Madvise`] (Linux's uapi number).
pub const MADV_DONTFORK: u64 = 10;
/// `MADV_DOFORK` for [`Hypercall::Madvise`].
pub const MADV_DOFORK: u64 = 11;
/// `MADV_PAGEOUT` for [`Hypercall::Madvise`].
pub const MADV_PAGEOUT: u64 = 21;

/// The `MADV_*` advice a litmus `madvise` names, by the small code the
/// bytecode carries in its `c` field (a register-sized field, 4 bits).
pub const MADV_BY_CODE: [u64; 4] = [MADV_DONTNEED, MADV_PAGEOUT, MADV_DONTFORK, MADV_DOFORK];

/// `MREMAP_*` flags of [`Hypercall::Mremap`] (Linux's uapi values).
pub mod mremap {
    /// MREMAP_MAYMOVE: the mapping may move to a new address.
    pub const MAYMOVE: u64 = 1;
    /// MREMAP_FIXED: move to exactly `new_addr` (unmapping what is there).
    pub const FIXED: u64 = 2;
    /// MREMAP_DONTUNMAP: move the pages but leave the old VMA mapped, empty.
    pub const DONTUNMAP: u64 = 4;
    /// Every flag.
    pub const ALL: u64 = MAYMOVE | FIXED | DONTUNMAP;
}

/// [`Hypercall::Mprotect`] flag: change the PTEs but leave the TLB flush
/// pending (until [`Hypercall::FlushTlb`]): the deferred flush of uffd-wp
/// and fork, made available to tests.
pub const MPROTECT_DEFER_FLUSH: u64 = 1;

/// Bits of the x86 #PF error code.
pub mod pf_error {
    /// The fault was a protection violation (the page was present).
    pub const PRESENT: u64 = 1 << 0;
    /// The access was a write.
    pub const WRITE: u64 = 1 << 1;
    /// The access was an instruction fetch.
    pub const FETCH: u64 = 1 << 4;
}

/// `fault.result` values: what the #PF stub does when the VMM returns.
/// Only 0 (a plain retry) takes the stub's fast path (`add rsp, 8; iretq`);
/// anything else takes its slow path.
pub mod fault_result {
    /// The translation was installed: retry the access. No `invlpg`: a #PF
    /// already invalidates the faulting address's TLB entries (Intel SDM
    /// vol. 3 §4.10.4.1), and the VMM's removals revoke the host's copies
    /// (docs/architecture.md §4).
    pub const RETRY: u64 = 0;
    /// Unresolvable, and the guest armed `fixup_rip`: resume there instead
    /// (a one-entry exception table, like Linux's `fixup_exception`).
    pub const FIXUP: u64 = 1;
    /// The thread is dead (SIGSEGV, OOM): return to `kill_rip` on
    /// `kill_rsp` at CPL 3, never to the faulting code. The vCPU then leaves
    /// guest mode from its program, not from inside a stub.
    pub const KILL: u64 = 2;
    /// Flag OR-ed into the result: reload CR3 before returning (a TLB flush
    /// queued for this vCPU while it was in the VMM).
    pub const FLUSH_TLB: u64 = 1 << 8;
}

/// The table at the start of the guest image (`IMAGE_PHYS`) from which the
/// VMM builds each vCPU's IDT: the guest's only CPL-0 code is these stubs.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootHeader {
    /// [`BOOT_HEADER_MAGIC`].
    pub magic: u64,
    /// The #PF stub (forwards the fault in one exit).
    pub page_fault: u64,
    /// The flush-interrupt stub ([`FLUSH_VECTOR`]).
    pub flush: u64,
    /// The triple-fault service, `int` [`TRIPLE_FAULT_VECTOR`] from CPL 3.
    pub triple_fault: u64,
    /// Stubs of exception vectors 0–31 (report a crash).
    pub exceptions: [u64; 32],
    /// Where a thread the VMM has killed goes, at CPL 3: it issues
    /// [`Hypercall::Killed`] (see [`fault_result::KILL`]).
    pub killed: u64,
}

/// "COWLAB01": identifies a [`BootHeader`] of this ABI version.
pub const BOOT_HEADER_MAGIC: u64 = u64::from_le_bytes(*b"COWLAB01");

/// Stubs only the floor benchmarks use, right after the [`BootHeader`] in
/// the image (`IMAGE_PHYS + size_of::<BootHeader>()`), identified by
/// [`FLOOR_STUBS_MAGIC`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FloorStubs {
    /// [`FLOOR_STUBS_MAGIC`].
    pub magic: u64,
    /// The smallest #PF stub that forwards a fault and retries the access:
    /// `out` to [`FAULT_PORT`]; `add rsp, 8`; `iretq`. It ignores
    /// `fault.result` (no fixup, kill or piggybacked flush), so only
    /// [`Program::BenchTouchMinimal`] runs with it.
    pub page_fault_minimal: u64,
}

/// "COWFLOOR": identifies [`FloorStubs`].
pub const FLOOR_STUBS_MAGIC: u64 = u64::from_le_bytes(*b"COWFLOOR");

/// Software-interrupt vector, callable from CPL 3, that makes the vCPU
/// triple-fault (for the `triple-fault` program).
pub const TRIPLE_FAULT_VECTOR: u8 = 0x81;

/// Hypercall mailbox: arguments in, result out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HcallBox {
    pub args: [u64; 4],
    pub ret: u64,
}

/// Page-fault mailbox: the VMM's answer to a forwarded #PF. (The stub
/// writes nothing: CR2 comes with the exit's registers, the error code and
/// RIP from its exception frame.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FaultBox {
    /// One of [`fault_result`], written by the VMM.
    pub result: u64,
}

/// Crash mailbox, written by the unhandled-exception stub only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CrashBox {
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cr2: u64,
    pub rsp: u64,
}

/// Capacity of the console line buffer.
pub const CONSOLE_LEN: usize = 256;

/// The first page of each vCPU's area. The VMM fills the identity and program
/// fields before the vCPU starts; `GS.base` points here for the whole life
/// of the vCPU so assembly stubs reach their mailboxes with `gs:` offsets.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VcpuArea {
    /// Virtual address of this structure (the guest's `gs:0`).
    pub self_ptr: u64,
    pub vcpu_id: u64,
    /// Number of vCPUs the run started with.
    pub nr_vcpus: u64,
    /// [`Program`] id and its argument.
    pub program: u64,
    pub arg: u64,
    /// Top of this thread's stack, in the user half (demand-faulted).
    pub user_stack_top: u64,
    /// Nonzero: an unresolvable #PF resumes here (see [`fault_result::FIXUP`]).
    pub fixup_rip: u64,
    /// Written by the VMM when it wants a spinning guest to stop.
    pub stop: u64,
    /// Litmus interpreter: the pc the thread started at, and its final
    /// registers once `regs_valid` is 1.
    pub litmus_pc: u64,
    pub regs_valid: u64,
    pub regs: [u64; bytecode::NR_REGS],
    /// Where a killed thread resumes (the boot header's `killed`) and on
    /// which stack (the area's boot stack, always mapped).
    pub kill_rip: u64,
    pub kill_rsp: u64,
    /// Set by the VMM while the flush stub waits in its acknowledging exit:
    /// another flush arrived, reload CR3 again before returning.
    pub flush_again: u64,
    pub hcall: HcallBox,
    pub fault: FaultBox,
    pub crash: CrashBox,
    pub console: [u8; CONSOLE_LEN],
}

/// Byte offsets of [`VcpuArea`] fields, for the assembly stubs.
pub mod area_offset {
    use super::{CrashBox, FaultBox, VcpuArea};
    use core::mem::offset_of;

    pub const FIXUP_RIP: usize = offset_of!(VcpuArea, fixup_rip);
    pub const FLUSH_AGAIN: usize = offset_of!(VcpuArea, flush_again);
    pub const KILL_RIP: usize = offset_of!(VcpuArea, kill_rip);
    pub const KILL_RSP: usize = offset_of!(VcpuArea, kill_rsp);
    pub const FAULT_RESULT: usize = offset_of!(VcpuArea, fault) + offset_of!(FaultBox, result);
    pub const CRASH_VECTOR: usize = offset_of!(VcpuArea, crash) + offset_of!(CrashBox, vector);
    pub const CRASH_ERROR: usize = offset_of!(VcpuArea, crash) + offset_of!(CrashBox, error_code);
    pub const CRASH_RIP: usize = offset_of!(VcpuArea, crash) + offset_of!(CrashBox, rip);
    pub const CRASH_CR2: usize = offset_of!(VcpuArea, crash) + offset_of!(CrashBox, cr2);
    pub const CRASH_RSP: usize = offset_of!(VcpuArea, crash) + offset_of!(CrashBox, rsp);
}

const _: () = assert!(core::mem::size_of::<VcpuArea>() <= layout::PAGE_SIZE as usize);
