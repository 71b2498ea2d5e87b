//! How a run ended: the reports of the VM ([`RunReport`]) and of each
//! vCPU ([`VcpuReport`], [`Outcome`]), and the CLI's exit status for them.

use std::time::Duration;

use cowlab_abi::Program;

use crate::hooks;
use crate::mm::Access;

/// How a run ended, for every vCPU that took part.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// One report per vCPU, by id.
    pub vcpus: Vec<VcpuReport>,
    /// Console lines in the order they arrived.
    pub console: Vec<(usize, String)>,
    /// The watchdog fired after this long.
    pub timed_out: Option<Duration>,
    /// vCPUs still running when the watchdog fired.
    pub stuck: Vec<usize>,
    /// VM creation to the first guest exit.
    pub boot_time: Option<Duration>,
    /// VM creation to the end of the run.
    pub wall: Duration,
    /// Pages still in use when the run ended (0 once every process has
    /// exited: its last thread's exit tears its address space down).
    pub user_pages: usize,
    /// Broken memory-manager invariants (`mm_verify`), if checked.
    pub violations: Vec<String>,
    /// The schedule could not be satisfied: where each thread was blocked.
    pub unreachable: Option<String>,
    /// Each rule with how often it matched and acted.
    pub rule_counts: Vec<(String, u64, u64)>,
    /// With chaos and no schedule: every point hit by a vCPU, in order.
    pub hit_order: Option<Vec<hooks::PointHit>>,
    /// When explored: the scheduling decisions, in order.
    pub decisions: Option<Vec<hooks::Decision>>,
    /// When explored: every vCPU waited with none able to go (where each
    /// waited); the run was then stopped as by the watchdog.
    pub deadlock: Option<String>,
}

/// Exit status of the CLI (docs/design.md §12).
pub mod exit_code {
    /// Everything went as expected.
    pub const OK: i32 = 0;
    /// The guest reported failure (or an expectation did not hold).
    pub const FAILED: i32 = 1;
    /// Usage or input error.
    pub const USAGE: i32 = 2;
    /// VM or internal error: guest crash, timeout, KVM failure.
    pub const VM_ERROR: i32 = 3;
}

impl RunReport {
    /// The CLI's exit status for this run.
    pub fn exit_code(&self) -> i32 {
        let vm_error = self.timed_out.is_some()
            || !self.violations.is_empty()
            || self.vcpus.iter().any(|v| {
                matches!(
                    v.outcome,
                    Outcome::Crashed { .. }
                        | Outcome::TripleFault { .. }
                        | Outcome::Stopped { .. }
                        | Outcome::Error(_)
                )
            });
        if vm_error {
            exit_code::VM_ERROR
        } else if self.vcpus.iter().all(|v| v.outcome == Outcome::Exited(0)) {
            exit_code::OK
        } else {
            exit_code::FAILED
        }
    }

    /// One line per thing that went wrong.
    pub fn problems(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(t) = self.timed_out {
            let stuck: Vec<String> = self.stuck.iter().map(|id| format!("vcpu {id}")).collect();
            lines.push(format!(
                "timeout after {:.1}s: {} still running",
                t.as_secs_f64(),
                stuck.join(", ")
            ));
        }
        for v in &self.vcpus {
            if v.outcome != Outcome::Exited(0) {
                lines.push(format!(
                    "vcpu {} ({}): {}",
                    v.id,
                    v.program.name(),
                    v.outcome
                ));
            }
        }
        lines.extend(self.violations.iter().map(|v| format!("mm_verify: {v}")));
        lines
    }

    /// The report of vCPU `id`.
    pub fn vcpu(&self, id: usize) -> Option<&VcpuReport> {
        self.vcpus.iter().find(|v| v.id == id)
    }
}

/// How a vCPU's thread ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The program called exit with this status.
    Exited(u64),
    /// The program reported a failed self-check.
    Failed(String),
    /// An access no mapping allows (the SIGSEGV of this model).
    Segv { addr: u64, access: Access, rip: u64 },
    /// No guest frame was left to resolve a fault.
    Oom { addr: u64 },
    /// An exception the runtime does not handle.
    Crashed {
        vector: u64,
        error_code: u64,
        rip: u64,
        cr2: u64,
        rsp: u64,
    },
    /// The vCPU shut down (triple fault).
    TripleFault { rip: u64 },
    /// Stopped from outside (watchdog or teardown) while at `rip`.
    Stopped { rip: u64 },
    /// KVM or the VMM failed.
    Error(String),
}

/// Names of the x86 exception vectors.
pub fn vector_name(vector: u64) -> &'static str {
    const NAMES: [&str; 22] = [
        "#DE divide error",
        "#DB debug",
        "NMI",
        "#BP breakpoint",
        "#OF overflow",
        "#BR bound range",
        "#UD invalid opcode",
        "#NM device not available",
        "#DF double fault",
        "coprocessor segment overrun",
        "#TS invalid TSS",
        "#NP segment not present",
        "#SS stack fault",
        "#GP general protection",
        "#PF page fault",
        "reserved",
        "#MF x87 error",
        "#AC alignment check",
        "#MC machine check",
        "#XM SIMD error",
        "#VE virtualization exception",
        "#CP control protection",
    ];
    NAMES.get(vector as usize).copied().unwrap_or("exception")
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Exited(0) => write!(f, "exited"),
            Outcome::Exited(s) => write!(f, "exited with status {s}"),
            Outcome::Failed(msg) => write!(f, "failed: {msg}"),
            Outcome::Segv { addr, access, rip } => {
                write!(f, "segmentation fault: {} at {addr:#x} (RIP {rip:#x})", access.as_str())
            }
            Outcome::Oom { addr } => write!(f, "out of memory faulting in {addr:#x}"),
            Outcome::Crashed { vector, error_code, rip, cr2, rsp } => write!(
                f,
                "crashed: vector {vector} ({}) at RIP {rip:#x}, CR2 {cr2:#x}, error code {error_code:#x}, RSP {rsp:#x}",
                vector_name(*vector)
            ),
            Outcome::TripleFault { rip } => write!(f, "triple fault (shutdown) at RIP {rip:#x}"),
            Outcome::Stopped { rip } => write!(f, "stopped at RIP {rip:#x}"),
            Outcome::Error(e) => write!(f, "VMM error: {e}"),
        }
    }
}

/// What a vCPU did, reported when its thread ends.
#[derive(Debug, Clone)]
pub struct VcpuReport {
    pub id: usize,
    pub program: Program,
    pub outcome: Outcome,
    /// Page faults forwarded to the VMM.
    pub faults: u64,
    /// Shadow-TLB fills.
    pub fills: u64,
    /// Exits to the VMM (all kinds).
    pub exits: u64,
    /// Addresses of forwarded faults, in order (only with `record_faults`).
    pub fault_addrs: Vec<u64>,
    /// TLB entries of this vCPU found stale when it ended (`mm_verify`).
    pub violations: Vec<String>,
    /// A litmus thread: the pc it started at, and its final registers if
    /// it finished (halt or exit).
    pub litmus_pc: u64,
    pub regs: Option<[u64; cowlab_abi::bytecode::NR_REGS]>,
}

impl VcpuReport {
    /// The report of a vCPU that never ran.
    pub(crate) fn failed(id: usize, program: Program, outcome: Outcome) -> Self {
        VcpuReport {
            id,
            program,
            outcome,
            faults: 0,
            fills: 0,
            exits: 0,
            fault_addrs: Vec::new(),
            violations: Vec::new(),
            litmus_pc: 0,
            regs: None,
        }
    }

    /// The status `join` returns for this vCPU.
    pub(crate) fn join_status(&self) -> u64 {
        match self.outcome {
            Outcome::Exited(status) => status,
            _ => u64::MAX,
        }
    }
}
