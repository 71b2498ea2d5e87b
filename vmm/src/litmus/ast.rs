//! A litmus test as written (docs/litmus.md has the grammar).

/// Where something is in the source: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl std::fmt::Display for Pos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// Access rights of a region or mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prot {
    None,
    Read,
    ReadWrite,
}

impl Prot {
    /// `PROT_*` bits.
    pub fn bits(self) -> u32 {
        match self {
            Prot::None => 0,
            Prot::Read => 1,
            Prot::ReadWrite => 3,
        }
    }
}

/// `region NAME PAGES PROT [populate]` in the init section: anonymous
/// memory the VMM maps in the first process before any thread runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub name: String,
    pub pages: u64,
    pub prot: Prot,
    pub populate: bool,
    pub pos: Pos,
}

/// The advice of `madvise A PAGES [ADVICE]` (default `dontneed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Advice {
    /// `MADV_DONTNEED`: drop the pages; they read back as zero.
    #[default]
    DontNeed,
    /// `MADV_PAGEOUT`: reclaim the pages (to swap, for anonymous memory).
    PageOut,
    /// `MADV_DONTFORK`: a child does not inherit the range.
    DontFork,
    /// `MADV_DOFORK`: undo `MADV_DONTFORK`.
    DoFork,
}

impl Advice {
    /// The word a litmus test writes for it.
    pub const NAMES: [(&'static str, Advice); 4] = [
        ("dontneed", Advice::DontNeed),
        ("pageout", Advice::PageOut),
        ("dontfork", Advice::DontFork),
        ("dofork", Advice::DoFork),
    ];

    /// Its index in `cowlab_abi::MADV_BY_CODE` (the bytecode's `c` field).
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// A value: a register, a number, or a region's base address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operand {
    Reg(u8),
    Imm(u64),
    Region(String, Pos),
}

/// A memory word: `NAME[i]` (word i of a region) or `*(rN + off)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mem {
    Region {
        name: String,
        index: Operand,
        pos: Pos,
    },
    Deref {
        reg: u8,
        offset: u64,
    },
}

/// Binary operators of assignments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    And,
    Or,
    Xor,
    Eq,
    Ne,
    Lt,
}

/// The right-hand side of `rN = …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Operand(Operand),
    Binary(Operand, BinOp, Operand),
    Load(Mem),
}

/// `pin` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PinFlags {
    pub write: bool,
    pub longterm: bool,
    /// FOLL_GET instead of FOLL_PIN (`get` instead of `pin`).
    pub get: bool,
    /// GUP-fast first (`fast`): get_user_pages_fast() /
    /// pin_user_pages_fast() instead of the slow path alone.
    pub fast: bool,
}

/// One statement, with where it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stmt {
    pub kind: StmtKind,
    pub pos: Pos,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StmtKind {
    Assign {
        dst: u8,
        expr: Expr,
    },
    Store {
        mem: Mem,
        value: Operand,
    },
    Loop {
        count: u64,
        body: Vec<Stmt>,
    },
    LoopUntil {
        event: String,
        body: Vec<Stmt>,
    },
    Signal(String),
    Await(String),
    Fill {
        region: String,
        value: Operand,
    },
    Compare {
        dst: u8,
        region: String,
        value: Operand,
    },
    Mmap {
        dst: u8,
        pages: u64,
        prot: Prot,
    },
    Munmap {
        addr: Operand,
        pages: u64,
    },
    Mprotect {
        addr: Operand,
        pages: u64,
        prot: Prot,
    },
    Madvise {
        addr: Operand,
        pages: u64,
        advice: Advice,
    },
    /// `rN = mremap A OLD NEW [maymove] [fixed B] [dontunmap]`.
    Mremap {
        dst: u8,
        addr: Operand,
        old_pages: u64,
        new_pages: u64,
        maymove: bool,
        /// MREMAP_FIXED's `new_addr`.
        fixed: Option<Operand>,
        dontunmap: bool,
    },
    Fork {
        dst: Option<u8>,
        child: String,
    },
    Wait {
        dst: Option<u8>,
        target: WaitTarget,
    },
    Exit(u64),
    Spawn {
        dst: Option<u8>,
        thread: String,
    },
    Pin {
        dst: u8,
        addr: Operand,
        flags: PinFlags,
    },
    Unpin(u8),
    DmaRead {
        dst: u8,
        pin: u8,
        offset: u64,
    },
    DmaWrite {
        pin: u8,
        offset: u64,
        value: Operand,
    },
    UffdRegister {
        addr: Operand,
        pages: u64,
    },
    UffdWp {
        addr: Operand,
        pages: u64,
        on: bool,
    },
    UffdResolve {
        dst: Option<u8>,
    },
    Hook(String),
    Pause(u64),
}

/// Whom `wait` waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitTarget {
    Reg(u8),
    Child(String),
}

/// A thread block: `P0 { … }` (an initial thread), `C0 { … }` (the body of
/// a child created by `fork C0`), `T0 { … }` (a thread created by `spawn T0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thread {
    pub name: String,
    pub body: Vec<Stmt>,
    pub pos: Pos,
}

/// How a thread ended, as the exists clause can name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Exited normally (`T:ok`).
    Ok,
    /// Killed by a segmentation fault (`T:segv`).
    Segv,
    /// Out of memory (`T:oom`).
    Oom,
    /// Crashed or failed otherwise (`T:crashed`).
    Crashed,
}

/// A value in the exists clause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `T:rN`, the final value of a thread's register.
    Reg {
        thread: String,
        reg: u8,
    },
    Imm(u64),
}

/// Comparisons of the exists clause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// The condition of the exists clause. A chain `a /\ b /\ c` is one
/// `And` of every term (and `\/` one `Or`), not a nest of pairs, so a long
/// chain is as deep as a short one; nesting (`(`, `~`) is limited by the
/// parser ([`super::parse::MAX_NESTING`]), so every recursive walk of a
/// condition (derived `Clone`, `Drop`, `Debug`, `PartialEq`, `holds`) is
/// bounded in depth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// Two or more terms, all of which must hold.
    And(Vec<Cond>),
    /// Two or more terms, one of which must hold.
    Or(Vec<Cond>),
    Not(Box<Cond>),
    Cmp(Value, CmpOp, Value),
    Status {
        thread: String,
        status: Status,
    },
    True,
}

/// The observation a run of many gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Never,
    Sometimes,
    Always,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Never => "Never",
            Verdict::Sometimes => "Sometimes",
            Verdict::Always => "Always",
        }
    }

    /// Whether an observation meets this expectation. `Sometimes` means
    /// "can happen": met by any run that satisfied `exists` (litmus7's
    /// "Ok"), so a race that hits every run still meets it.
    pub fn admits(self, observed: Verdict) -> bool {
        self == observed || (self == Verdict::Sometimes && observed == Verdict::Always)
    }
}

/// `expect POLICY VERDICT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    pub policy: String,
    pub verdict: Verdict,
    pub pos: Pos,
}

/// A whole test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Test {
    pub name: String,
    pub description: Option<String>,
    pub regions: Vec<Region>,
    pub threads: Vec<Thread>,
    pub exists: Cond,
    /// The exists clause as written, for the output.
    pub exists_src: String,
    pub expects: Vec<Expect>,
    /// `schedule { … }`: each step as written (thread Pn or vCPU vN) with
    /// its position, and the section's.
    pub schedule: Option<(Vec<(String, Pos)>, Pos)>,
    /// `schedule required { … }`: the exists clause is a bug witness only
    /// under this schedule (free-running, it can hold legally), so the
    /// schedule may not be removed or replaced, and the test not explored.
    pub schedule_required: bool,
    /// `inject RULE` lines.
    pub injects: Vec<(String, Pos)>,
    /// `runs N`: how many runs a suite makes of it (a rare race needs more).
    pub runs: Option<u64>,
    /// `runs N max M`: a suite cell expected `Sometimes` that has seen no
    /// witness after N runs goes on, up to M runs in all.
    pub max_runs: Option<u64>,
}
