//! The built-in guest programs, by name and number.

/// A program every vCPU of a run executes, selected by `VcpuArea::program`.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// Touch `arg` fresh user pages (default 16), check them, print one line.
    Hello = 1,
    /// Touch `arg` fresh user pages silently (counts forwarded faults).
    Touch = 2,
    /// Divide by zero (#DE): the run must report a guest crash.
    DivZero = 3,
    /// Load an empty IDT and raise an exception: the vCPU triple-faults.
    TripleFault = 4,
    /// Spin forever without exits: the watchdog must fire.
    Loop = 5,
    /// Read address 0: a SIGSEGV-like outcome.
    Segv = 6,
    /// Spawn `arg` vCPUs running `Hello` while this one runs, then exit.
    Spawn = 7,
    /// Spin until the VMM sets `VcpuArea::stop` (kick and IPI benchmarks).
    Spin = 8,
    /// `arg` `Nop` hypercalls between two marks (exit round trip).
    BenchPio = 9,
    /// `arg` unresolvable faults resumed through `fixup_rip` between two
    /// marks (#PF forward round trip).
    BenchFault = 10,
    /// Write one word to each of `arg` fresh pages between two marks
    /// (first-touch demand-zero fault).
    BenchTouch = 11,
    /// Report a failed self-check (exit status 1).
    Fail = 12,
    /// `arg` stores to one word of a user page between two marks (native
    /// execution speed of program code).
    BenchStore = 13,
    /// Maps a region, spawns `arg` threads (default 2) that write their own
    /// pages and count in shared words, joins them and checks everything.
    MmThreads = 14,
    /// Writes a page, mprotects it read-only, reads it, then writes it: the
    /// write must end the thread with a SIGSEGV at that address.
    MprotectRo = 15,
    /// Writes a page, munmaps it, reads it: a SIGSEGV at that address.
    MunmapAccess = 16,
    /// Writes pages, madvise(MADV_DONTNEED)s them and checks they read zero.
    MadviseZero = 17,
    /// Two threads; a write-protect whose TLB flush is withheld (`arg` 0) or
    /// done at once (`arg` 1) while the other thread holds a writable TLB
    /// entry: with the flush withheld its write lands through the stale
    /// entry; after the flush its next write is a SIGSEGV.
    StaleTlb = 18,
    /// `arg` pages written once, then read once more each between two
    /// marks; run with `tlb_capacity` 1, every read is a TLB fill.
    BenchRefill = 19,
    /// `arg & 0xffff_ffff` rounds of mprotect(PROT_READ) + mprotect(RW) of
    /// one page between two marks, with `arg >> 48` other threads spinning
    /// (the first mprotect shoots their TLBs down).
    BenchShootdown = 20,
    /// Basic COW after fork: parent and child each write their side of a
    /// shared page; neither sees the other's write.
    ForkCow = 21,
    /// cow.c "vmsplice() + unmap in child": the child vmsplices a page it
    /// shares COW with its parent (a read reference, FOLL_GET) and unmaps
    /// it; the parent writes; the reference must still read the old
    /// contents. Prints what it reads.
    CowVmsplice = 22,
    /// A userfaultfd-wp round trip: a write to a protected page waits for a
    /// handler thread that reads the event and unprotects.
    UffdWp = 23,
    /// cow.c "R/O-mapping a page registered as iouring fixed buffer": a
    /// long-term write pin stays coherent with the page across mprotect.
    PinCoherent = 24,
    /// A thread of a litmus test: runs the bytecode at `LITMUS_PHYS` from
    /// pc `arg`.
    Litmus = 25,
    /// Touches `arg` pages between marks 5 and 6, forks between marks 1 and 2 (fork's cost with
    /// that much memory), then writes each page once between marks 3 and
    /// 4 while the child waits (copy-on-write faults in the parent).
    BenchFork = 26,
    /// `arg` bare doorbell writes (the MMIO write alone: no arguments, no
    /// result) between two marks: the floor of `BenchPio`.
    BenchDoorbell = 27,
    /// `BenchTouch` with the minimal #PF stub (`FloorStubs`): the floor of
    /// a forwarded fault that installs a page.
    BenchTouchMinimal = 28,
}

/// Name, program and one-line description of every built-in program.
pub const PROGRAMS: &[(&str, Program, &str)] = &[
    (
        "hello",
        Program::Hello,
        "every vCPU touches fresh user memory, checks it and prints a line",
    ),
    (
        "touch",
        Program::Touch,
        "every vCPU touches ARG fresh pages (fault-forwarding check)",
    ),
    (
        "divzero",
        Program::DivZero,
        "divides by zero: a guest crash",
    ),
    (
        "triple-fault",
        Program::TripleFault,
        "empties its IDT and faults: a triple fault",
    ),
    (
        "loop",
        Program::Loop,
        "spins forever without exits: the watchdog fires",
    ),
    (
        "segv",
        Program::Segv,
        "reads address 0: a SIGSEGV-like outcome",
    ),
    (
        "spawn",
        Program::Spawn,
        "vCPU 0 starts ARG more vCPUs running hello while it runs",
    ),
    (
        "spin",
        Program::Spin,
        "spins until the VMM stops it (kick benchmarks)",
    ),
    ("bench-pio", Program::BenchPio, "ARG hypercall round trips"),
    (
        "bench-fault",
        Program::BenchFault,
        "ARG #PF forward round trips",
    ),
    ("bench-touch", Program::BenchTouch, "ARG first-touch faults"),
    (
        "fail",
        Program::Fail,
        "reports a failed self-check (exit 1)",
    ),
    (
        "bench-store",
        Program::BenchStore,
        "ARG stores to user memory (native speed)",
    ),
    (
        "mm-threads",
        Program::MmThreads,
        "ARG threads write own and shared pages of one mapping",
    ),
    (
        "mprotect-ro",
        Program::MprotectRo,
        "write after mprotect(PROT_READ): a SIGSEGV",
    ),
    (
        "munmap-access",
        Program::MunmapAccess,
        "read after munmap: a SIGSEGV",
    ),
    (
        "madvise-zero",
        Program::MadviseZero,
        "MADV_DONTNEED pages read back as zero",
    ),
    (
        "stale-tlb",
        Program::StaleTlb,
        "a write through a stale TLB entry (ARG 0: flush withheld, 1: not)",
    ),
    (
        "fork-cow",
        Program::ForkCow,
        "fork: parent and child write a COW-shared page; no write leaks across",
    ),
    (
        "cow-vmsplice",
        Program::CowVmsplice,
        "child vmsplices (FOLL_GET) a COW page and unmaps it; the parent writes (CVE-2020-29374)",
    ),
    (
        "uffd-wp",
        Program::UffdWp,
        "a write to a uffd write-protected page waits for the handler thread",
    ),
    (
        "pin-coherent",
        Program::PinCoherent,
        "a long-term write pin stays coherent with the page across mprotect",
    ),
    (
        "litmus",
        Program::Litmus,
        "a litmus-test thread (used by `cowlab run TEST.litmus`)",
    ),
    (
        "bench-refill",
        Program::BenchRefill,
        "ARG TLB fills (with tlb_capacity 1)",
    ),
    (
        "bench-shootdown",
        Program::BenchShootdown,
        "mprotect rounds (ARG low 32 bits) with ARG>>48 spinning threads",
    ),
    (
        "bench-fork",
        Program::BenchFork,
        "fork of a process with ARG touched pages, then ARG COW faults",
    ),
    (
        "bench-doorbell",
        Program::BenchDoorbell,
        "ARG bare doorbell writes (hypercall floor)",
    ),
    (
        "bench-touch-minimal",
        Program::BenchTouchMinimal,
        "ARG first-touch faults through the minimal #PF stub (fault floor)",
    ),
];

impl Program {
    /// Decodes a program number.
    pub fn from_u64(id: u64) -> Option<Self> {
        PROGRAMS.iter().map(|p| p.1).find(|p| *p as u64 == id)
    }

    /// Looks a program up by its name.
    pub fn from_name(name: &str) -> Option<Self> {
        PROGRAMS.iter().find(|p| p.0 == name).map(|p| p.1)
    }

    /// The program's name.
    pub fn name(self) -> &'static str {
        PROGRAMS.iter().find(|p| p.1 == self).map_or("?", |p| p.0)
    }
}
