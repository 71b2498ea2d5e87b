//! Litmus bytecode: what the VMM compiles a litmus test to and the guest
//! interpreter executes, with real loads and stores through the MMU.
//!
//! An instruction is two 64-bit words: `op | a << 8 | b << 16 | c << 24`
//! and an immediate. Registers are `r0`–`r15` of the executing thread.
//! Memory operands are `*(r[b] + imm)`: named regions are constants the
//! compiler loads into the scratch register [`SCRATCH`].
//!
//! The program lives in guest memory at [`crate::layout::LITMUS_PHYS`]:
//! a [`Header`], then the instructions.

/// Registers per thread.
pub const NR_REGS: usize = 16;

/// The register the compiler uses for addresses; tests may not name it.
pub const SCRATCH: u8 = 15;

/// The first register the compiler uses for loop counters, downwards.
pub const LOOP_COUNTERS: u8 = 14;

/// "LTMS": marks a loaded program.
pub const MAGIC: u64 = u64::from_le_bytes(*b"LTMSv001");

/// Start of the program image.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Header {
    pub magic: u64,
    /// Number of instructions after the header.
    pub len: u64,
}

/// One instruction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Insn {
    pub word: u64,
    pub imm: u64,
}

impl Insn {
    pub const fn new(op: Op, a: u8, b: u8, c: u8, imm: u64) -> Insn {
        Insn {
            word: op as u64 | (a as u64) << 8 | (b as u64) << 16 | (c as u64) << 24,
            imm,
        }
    }
    pub const fn op(self) -> u8 {
        self.word as u8
    }
    pub const fn a(self) -> usize {
        (self.word >> 8) as u8 as usize & (NR_REGS - 1)
    }
    pub const fn b(self) -> usize {
        (self.word >> 16) as u8 as usize & (NR_REGS - 1)
    }
    pub const fn c(self) -> usize {
        (self.word >> 24) as u8 as usize & (NR_REGS - 1)
    }
}

/// The shared word (of the page every process shares, the others being
/// event words) that counts the threads asleep in the VMM in an
/// [`Op::Await`]: a [`Op::Signal`] that sees it nonzero wakes them.
pub const SLEEPERS_WORD: u64 = 511;

/// [`Op::Await`]'s c field: once the event has not come after a short spin,
/// sleep in the VMM ([`crate::Hypercall::AwaitEvent`]) instead of spinning
/// on. Set for runs under a schedule, where a spinning thread would only
/// take a host CPU from the thread the schedule waits for.
pub const AWAIT_MAY_SLEEP: u8 = 1;

/// Operations. `ra`, `rb`, `rc` are the registers in fields a, b, c.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Stop this thread: its registers are the outcome.
    Halt = 0,
    /// ra = imm
    Li = 1,
    /// ra = rb
    Mov = 2,
    /// ra = rb + rc
    Add = 3,
    /// ra = rb - rc
    Sub = 4,
    /// ra = rb * rc
    Mul = 5,
    /// ra = rb & rc
    And = 6,
    /// ra = rb | rc
    Or = 7,
    /// ra = rb ^ rc
    Xor = 8,
    /// ra = rb + imm
    Addi = 9,
    /// ra = *(rb + imm)
    Load = 10,
    /// *(rb + imm) = ra
    Store = 11,
    /// pc = imm
    Jmp = 12,
    /// if ra == 0 { pc = imm }
    Jz = 13,
    /// if ra != 0 { pc = imm }
    Jnz = 14,
    /// ra = (rb == rc), (rb != rc), (rb < rc) as 0 or 1
    Eq = 15,
    Ne = 16,
    Lt = 17,
    /// Every word of the `imm` pages at rb set to ra.
    Fill = 18,
    /// ra = 1 if every word of the `imm` pages at rb equals rc, else 0.
    Cmp = 19,
    /// Shared event word imm set to 1; if a thread sleeps on an event
    /// ([`SLEEPERS_WORD`]), the VMM is asked to wake the sleepers.
    Signal = 20,
    /// Wait until shared event word imm is nonzero: spin, or with
    /// [`AWAIT_MAY_SLEEP`] in c, spin a little and then sleep in the VMM.
    Await = 21,
    /// ra = shared event word imm.
    Poll = 22,
    /// ra = mmap(imm pages, prot rb-field... prot in c) ; c = PROT_* bits.
    Mmap = 23,
    /// munmap(ra, imm pages) → rb = result.
    Munmap = 24,
    /// mprotect(ra, imm pages, prot c) → rb = result.
    Mprotect = 25,
    /// madvise(ra, imm pages, MADV_DONTNEED) → rb = result.
    Madvise = 26,
    /// ra = fork(); the child continues at pc = imm with ra = 0.
    Fork = 27,
    /// ra = exit status of thread rb (wait / join).
    Wait = 28,
    /// The thread ends now with exit status imm.
    Exit = 29,
    /// ra = id of a new thread of this process starting at pc = imm.
    Spawn = 30,
    /// ra = pin handle of the page at rb, with gup flags c.
    Pin = 31,
    /// unpin(ra).
    Unpin = 32,
    /// ra = dma word at byte imm of pin rb.
    DmaRead = 33,
    /// dma word at byte imm of pin rb = ra.
    DmaWrite = 34,
    /// uffd register ra, imm pages.
    UffdRegister = 35,
    /// uffd write-protect (c = 1) or unprotect (c = 0) ra, imm pages.
    UffdWp = 36,
    /// Wait for a uffd wp fault, unprotect that page; ra = its address.
    UffdResolve = 37,
    /// Guest hook point imm (for injection points).
    Hook = 38,
    /// ra = rb / rc (0 if rc is 0); ra = rb % rc likewise.
    Div = 39,
    Rem = 40,
    /// Pause: spin-loop hint, imm times.
    Pause = 41,
    /// rb = mremap(ra, old pages, new pages, flags, new_addr = rc): the
    /// pages and flags are packed in imm ([`mremap_imm`]).
    Mremap = 42,
}

/// Bits of [`Op::Mremap`]'s immediate: old pages in bits 0–29, new pages
/// in bits 30–59, `MREMAP_*` flags (`crate::mremap`) from bit 60.
pub mod mremap_imm {
    /// Most pages either length may have.
    pub const MAX_PAGES: u64 = (1 << 30) - 1;
    pub const NEW_SHIFT: u32 = 30;
    pub const FLAGS_SHIFT: u32 = 60;

    /// Packs the operands.
    pub const fn pack(old_pages: u64, new_pages: u64, flags: u64) -> u64 {
        (old_pages & MAX_PAGES) | (new_pages & MAX_PAGES) << NEW_SHIFT | flags << FLAGS_SHIFT
    }

    /// `(old pages, new pages, flags)`.
    pub const fn unpack(imm: u64) -> (u64, u64, u64) {
        (
            imm & MAX_PAGES,
            imm >> NEW_SHIFT & MAX_PAGES,
            imm >> FLAGS_SHIFT,
        )
    }
}

impl Op {
    /// Decodes an opcode.
    pub const fn from_u8(v: u8) -> Option<Op> {
        if (v as usize) < OPS.len() {
            Some(OPS[v as usize])
        } else {
            None
        }
    }
}

// OPS[i] is the operation numbered i.
const _: () = {
    let mut i = 0;
    while i < OPS.len() {
        assert!(OPS[i] as usize == i);
        i += 1;
    }
};

const OPS: [Op; 43] = [
    Op::Halt,
    Op::Li,
    Op::Mov,
    Op::Add,
    Op::Sub,
    Op::Mul,
    Op::And,
    Op::Or,
    Op::Xor,
    Op::Addi,
    Op::Load,
    Op::Store,
    Op::Jmp,
    Op::Jz,
    Op::Jnz,
    Op::Eq,
    Op::Ne,
    Op::Lt,
    Op::Fill,
    Op::Cmp,
    Op::Signal,
    Op::Await,
    Op::Poll,
    Op::Mmap,
    Op::Munmap,
    Op::Mprotect,
    Op::Madvise,
    Op::Fork,
    Op::Wait,
    Op::Exit,
    Op::Spawn,
    Op::Pin,
    Op::Unpin,
    Op::DmaRead,
    Op::DmaWrite,
    Op::UffdRegister,
    Op::UffdWp,
    Op::UffdResolve,
    Op::Hook,
    Op::Div,
    Op::Rem,
    Op::Pause,
    Op::Mremap,
];
