//! One vCPU and the host thread that runs it: boot state, the `KVM_RUN`
//! loop, hypercalls (the memory-manager calls among them), forwarded page
//! faults and requests from other threads (stop, ping, TLB flush by
//! injected interrupt).

use std::mem::offset_of;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::kvm_fpu;
use kvm_ioctls::{VcpuExit, VcpuFd};

use cowlab_abi::layout::{
    area, kernel_va, user_stack_top, vcpu_area_phys, DOORBELL_PHYS, USER_END, USER_STACK_SIZE,
};
use cowlab_abi::{
    fault_result, gup, Hypercall, Program, VcpuArea, CONSOLE_LEN, FLUSH_VECTOR, HYPERCALL_PORT,
    MADV_DONTNEED, MPROTECT_DEFER_FLUSH,
};

use super::arch;
use super::control::{request, VcpuCtl};
use super::kick;
use super::vm::{Event, Shared};
use crate::mm::{mmap, verify_tlbs, Access, FaultError, GupFlags, Mm, MmError, PhysMem, ShadowTlb};
use crate::trace::{ExitReason, FaultAccess, FaultResult, Kind};

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

/// An exit copied out of `kvm_run`, so the vCPU can be used while handling it.
enum Exit {
    Hypercall(u32),
    PortIo(u16),
    Mmio(u64),
    Shutdown,
    IrqWindowOpen,
    Interrupted,
    /// `KVM_RUN` failed with EFAULT: the guest touched a frame while
    /// [`PhysMem::revoke`] had its host page read-only for a moment.
    Revoked,
    Other(String),
}

/// Consecutive EFAULT exits after which the frame is taken as really gone.
const MAX_REVOKED_RETRIES: u32 = 10_000;

/// How a new vCPU starts.
pub(crate) enum Start {
    /// At its program's entry with this argument, on the stack the VM
    /// mapped before starting any vCPU (boot vCPUs).
    Program(u64),
    /// Like `Program`, but spawned by a running guest: maps its own stack
    /// (clone()'s child stack is an mmap like any other).
    Thread(u64),
    /// As a copy of the forking vCPU, whose registers these are; `fork`
    /// returns 0 in it.
    Forked(Box<kvm_bindings::kvm_regs>),
}

/// The CPL-0 stubs that exit and then resume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StubExit {
    PageFault,
    FlushAck,
}

/// What to do after handling an exit.
enum Flow {
    Continue,
    End(Outcome),
}

/// A vCPU being run by its thread. It is CPU `id` of the memory manager,
/// running a thread of address space `mm`.
pub(crate) struct Vcpu {
    id: usize,
    program: Program,
    fd: VcpuFd,
    shared: Arc<Shared>,
    mm: Arc<Mm>,
    ctl: Arc<VcpuCtl>,
    events: Sender<Event>,
    area_pa: u64,
    /// Generation of the flush whose interrupt was injected, until acked.
    injected_flush: Option<u64>,
    /// The current exit comes from a CPL-0 stub whose reply can carry a flush.
    stub_exit: Option<StubExit>,
    /// Why the thread dies, once the VMM decided it does; it ends when the
    /// guest reports back from `killed`.
    killed: Option<Outcome>,
    faults: u64,
    exits: u64,
    fault_addrs: Vec<u64>,
}

type KvmResult<T> = Result<T, String>;

fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> String {
    move |e| format!("{op}: {e}")
}

impl Vcpu {
    /// Creates vCPU `id` running `program(arg)` as a thread of `mm`, in long
    /// mode at the program's entry, with its stack mapped and its TLB empty.
    pub(crate) fn new(
        shared: Arc<Shared>,
        id: usize,
        program: Program,
        start: Start,
        mm: Arc<Mm>,
        ctl: Arc<VcpuCtl>,
    ) -> KvmResult<Self> {
        let fd = shared
            .vm
            .create_vcpu(id as u64)
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(&shared.cpuid)
            .map_err(kvm_err("KVM_SET_CPUID2"))?;
        let area_pa = vcpu_area_phys(id);
        let area_va = kernel_va(area_pa);
        let machine = mm.machine();
        let tlb = ShadowTlb::new(
            &*machine.mem,
            machine.frames.pool(),
            &machine.kernel_pml4,
            id as u64 + 1,
        )
        .map_err(|_| "no guest frame left for a shadow page table".to_string())?;
        let root = tlb.root();
        machine.tlbs.insert(id, tlb);
        let arg = match start {
            // Boot vCPUs: the VM mapped every stack before starting any of
            // them, so no thread takes mmap_lock before its first instruction.
            Start::Program(arg) => arg,
            Start::Thread(arg) => {
                mmap::map_stack(&mm, user_stack_top(id), USER_STACK_SIZE)
                    .map_err(|e| format!("cannot map the stack of vcpu {id}: {e}"))?;
                arg
            }
            // The forking thread's stack was copied with its address space.
            Start::Forked(_) => 0,
        };
        mm.attach_cpu(id);
        init_area(&shared, id, area_pa, program, arg)?;

        let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        fd.set_sregs(&arch::sregs(sregs, area_va, root))
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        let regs = match start {
            Start::Program(_) | Start::Thread(_) => {
                arch::regs(shared.image.entry, user_stack_top(id))
            }
            Start::Forked(regs) => *regs,
        };
        fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fd.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;

        let events = shared.events();
        Ok(Vcpu {
            id,
            program,
            fd,
            shared,
            mm,
            ctl,
            events,
            area_pa,
            injected_flush: None,
            stub_exit: None,
            killed: None,
            faults: 0,
            exits: 0,
            fault_addrs: Vec::new(),
        })
    }

    /// Runs the vCPU until its program ends; returns its report. On the
    /// way out the CPU leaves its mm and its TLB is checked and freed.
    pub(crate) fn run(mut self) -> VcpuReport {
        let exit_flag = &mut self.fd.get_kvm_run().immediate_exit as *mut u8;
        let guard = kick::register_immediate_exit(exit_flag);
        let outcome = self.run_loop();
        drop(guard);
        self.ctl.in_guest.store(false, Ordering::SeqCst);
        let violations = self.verify_tlb();
        let machine = Arc::clone(self.mm.machine());
        self.mm.detach_cpu(self.id);
        let fills = match machine.tlbs.remove(self.id) {
            Some(tlb) => {
                let fills = tlb.fills();
                tlb.release(&*machine.mem, machine.frames.pool());
                fills
            }
            None => 0,
        };
        self.mm.mmput();
        let litmus_pc = self.area_read(offset_of!(VcpuArea, litmus_pc));
        let regs = (self.area_read(offset_of!(VcpuArea, regs_valid)) == 1)
            .then(|| std::array::from_fn(|i| self.area_read(offset_of!(VcpuArea, regs) + i * 8)));
        VcpuReport {
            id: self.id,
            program: self.program,
            outcome,
            faults: self.faults,
            fills,
            exits: self.exits,
            fault_addrs: std::mem::take(&mut self.fault_addrs),
            violations,
            litmus_pc,
            regs,
        }
    }

    /// `mm_verify`'s TLB check for this CPU, under the page-table lock so
    /// no PTE change is half done.
    fn verify_tlb(&self) -> Vec<String> {
        if !self.shared.check {
            return Vec::new();
        }
        let _ptl = self.mm.ptl();
        verify_tlbs(self.mm.machine(), &[(self.id, &self.mm)])
            .into_iter()
            .map(|v| v.0)
            .collect()
    }

    fn run_loop(&mut self) -> Outcome {
        let mut revoked_streak = 0u32;
        loop {
            if let Flow::End(outcome) = self.service_requests() {
                return outcome;
            }
            self.ctl.in_guest.store(true, Ordering::SeqCst);
            if let Err(e) = self.deliver_flush() {
                return Outcome::Error(e);
            }
            if let Some(t) = self.trace() {
                t.emit(Kind::Resume, &[], "");
            }
            let exit = self.enter();
            self.ctl.in_guest.store(false, Ordering::SeqCst);
            if let Some(t) = self.trace() {
                let (reason, detail) = match &exit {
                    Ok(Exit::Hypercall(nr)) => (ExitReason::Hypercall, *nr as u64),
                    Ok(Exit::IrqWindowOpen) | Ok(Exit::Interrupted) => (ExitReason::Interrupted, 0),
                    Ok(Exit::Revoked) => (ExitReason::Revoked, 0),
                    _ => (ExitReason::Other, 0),
                };
                t.emit(Kind::Exit, &[reason.code(), detail], "");
            }
            if self.ctl.flush_req.load(Ordering::Acquire)
                > self.ctl.flush_ack.load(Ordering::Acquire)
            {
                // An initiator may be waiting to acknowledge for us.
                self.ctl.notify();
            }
            self.exits += 1;
            // Only the exit right after a stub's exit may piggyback a flush on it.
            self.stub_exit = None;
            if !matches!(exit, Ok(Exit::Revoked)) {
                revoked_streak = 0;
            }
            let flow = match exit {
                Ok(Exit::Hypercall(nr)) => self.hypercall(nr),
                Ok(Exit::PortIo(port)) => Flow::End(Outcome::Error(format!(
                    "guest accessed I/O port {port:#x}; hypercalls use {HYPERCALL_PORT:#x}"
                ))),
                Ok(Exit::Mmio(addr)) => Flow::End(Outcome::Error(format!(
                    "guest accessed MMIO at {addr:#x}; the doorbell is {DOORBELL_PHYS:#x}"
                ))),
                Ok(Exit::Shutdown) => Flow::End(Outcome::TripleFault { rip: self.rip() }),
                Ok(Exit::IrqWindowOpen) | Ok(Exit::Interrupted) => Flow::Continue,
                Ok(Exit::Revoked) => {
                    revoked_streak += 1;
                    if revoked_streak > MAX_REVOKED_RETRIES {
                        return Outcome::Error(format!(
                            "KVM_RUN: guest memory stayed inaccessible (EFAULT) at RIP {:#x}",
                            self.rip()
                        ));
                    }
                    std::thread::yield_now();
                    continue;
                }
                Ok(Exit::Other(what)) => {
                    Flow::End(Outcome::Error(format!("unexpected exit: {what}")))
                }
                Err(e) => Flow::End(Outcome::Error(e)),
            };
            if let Flow::End(outcome) = flow {
                return outcome;
            }
        }
    }

    /// One `KVM_RUN`, with the exit copied out.
    fn enter(&mut self) -> KvmResult<Exit> {
        let exit = match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) if port == HYPERCALL_PORT && data.len() == 4 => {
                Exit::Hypercall(u32::from_le_bytes([data[0], data[1], data[2], data[3]]))
            }
            Ok(VcpuExit::MmioWrite(addr, data)) if addr == DOORBELL_PHYS && data.len() == 4 => {
                Exit::Hypercall(u32::from_le_bytes([data[0], data[1], data[2], data[3]]))
            }
            Ok(VcpuExit::IoOut(port, _)) | Ok(VcpuExit::IoIn(port, _)) => Exit::PortIo(port),
            Ok(VcpuExit::MmioWrite(addr, _)) | Ok(VcpuExit::MmioRead(addr, _)) => Exit::Mmio(addr),
            Ok(VcpuExit::Shutdown) => Exit::Shutdown,
            Ok(VcpuExit::IrqWindowOpen) => Exit::IrqWindowOpen,
            Ok(VcpuExit::Intr) => Exit::Interrupted,
            Ok(VcpuExit::Hlt) => Exit::Other("HLT".into()),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                Exit::Other(format!("entry failed (reason {reason:#x}, cpu {cpu})"))
            }
            Ok(VcpuExit::InternalError) => Exit::Other(self.internal_error()),
            Ok(other) => Exit::Other(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Interrupted,
            Err(e) if e.errno() == libc::EFAULT => Exit::Revoked,
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        };
        self.fd.set_kvm_immediate_exit(0);
        Ok(exit)
    }

    /// Describes a `KVM_EXIT_INTERNAL_ERROR` (suberror and data words).
    fn internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal`
        // is the union member KVM filled in.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let rip = self.rip();
        format!(
            "KVM internal error, suberror {} at RIP {rip:#x}, data {:x?}",
            internal.suberror,
            &internal.data[..n]
        )
    }

    /// Handles the requests other threads posted; called before every entry.
    fn service_requests(&mut self) -> Flow {
        let reqs = self.ctl.requests.swap(0, Ordering::AcqRel);
        if reqs & request::STOP != 0 {
            return Flow::End(Outcome::Stopped { rip: self.rip() });
        }
        if reqs & request::PING != 0 {
            let _ = self.events.send(Event::Pong {
                id: self.id,
                at: Instant::now(),
            });
        }
        if let Some(gate) = &self.shared.gate {
            let (ctl, hooks) = (&self.ctl, &self.shared.machine.hooks);
            let (id, events) = (self.id, &self.events);
            gate.park(
                id,
                || ctl.requests.load(Ordering::Acquire) & request::STOP != 0 || hooks.released(),
                |parked| {
                    let _ = events.send(Event::Parked { id, parked });
                },
            );
            // `quit` holds whenever it came: before this VM was attached to
            // the controller too (a vCPU created after it never enters).
            if gate.quitting() {
                return Flow::End(Outcome::Stopped { rip: self.rip() });
            }
        }
        Flow::Continue
    }

    /// Makes the hardware TLB drop this vCPU's user translations if a flush
    /// is due. Called in guest mode's doorway (`in_guest` set).
    ///
    /// - Stopped in a stub's exit (#PF, flush ack): the stub's reply makes
    ///   it reload CR3 before returning; acknowledged now.
    /// - Running its program (CPL 3, interrupts always on): the flush
    ///   interrupt is injected; acknowledged by its handler.
    /// - Anywhere else at CPL 0 (a stub, interrupts off): left pending; the
    ///   initiator kicks again until it is delivered.
    fn deliver_flush(&mut self) -> KvmResult<()> {
        let wanted = self.ctl.flush_req.load(Ordering::Acquire);
        let remote = wanted > self.ctl.flush_ack.load(Ordering::Acquire);
        if self.injected_flush.is_some() && self.injected_flush_lost()? {
            // PVM occasionally drops an injected interrupt: inject again.
            self.injected_flush = None;
            self.ctl.hw_flush.store(true, Ordering::SeqCst);
        }
        if self.injected_flush.is_some() || !(remote || self.ctl.hw_flush.load(Ordering::SeqCst)) {
            return Ok(());
        }
        match self.stub_exit {
            Some(StubExit::PageFault) => {
                let result = self.area_read(offset_of!(VcpuArea, fault.result));
                self.area_write(
                    offset_of!(VcpuArea, fault.result),
                    result | fault_result::FLUSH_TLB,
                );
            }
            Some(StubExit::FlushAck) => self.area_write(offset_of!(VcpuArea, flush_again), 1),
            None => {
                if self.cpl()? != 3 {
                    return Ok(());
                }
                let mut events = self
                    .fd
                    .get_vcpu_events()
                    .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
                events.interrupt.injected = 1;
                events.interrupt.nr = FLUSH_VECTOR;
                events.interrupt.soft = 0;
                self.fd
                    .set_vcpu_events(&events)
                    .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
                self.ctl.hw_flush.store(false, Ordering::SeqCst);
                self.injected_flush = Some(wanted);
                return Ok(());
            }
        }
        self.ctl.hw_flush.store(false, Ordering::SeqCst);
        self.ctl.ack(wanted);
        Ok(())
    }

    /// Whether the flush interrupt we injected is gone without its
    /// acknowledgement: KVM holds no pending interrupt and the vCPU is back
    /// in its program (had it been delivered, the vCPU would be in the stub
    /// or we would have seen the ack).
    fn injected_flush_lost(&self) -> KvmResult<bool> {
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        if events.interrupt.injected != 0 {
            return Ok(false);
        }
        Ok(self.cpl()? == 3)
    }

    /// The vCPU's current privilege level.
    fn cpl(&self) -> KvmResult<u8> {
        Ok(self
            .fd
            .get_sregs()
            .map_err(kvm_err("KVM_GET_SREGS"))?
            .cs
            .dpl)
    }

    fn hypercall(&mut self, nr: u32) -> Flow {
        let Some(call) = Hypercall::from_u32(nr) else {
            return Flow::End(Outcome::Error(format!("unknown hypercall {nr}")));
        };
        let ret = match call {
            Hypercall::Booted => {
                let _ = self.events.send(Event::Booted {
                    id: self.id,
                    at: Instant::now(),
                });
                return Flow::Continue;
            }
            Hypercall::Console => {
                let line = self.console_line();
                let _ = self.events.send(Event::Console { id: self.id, line });
                return Flow::Continue;
            }
            Hypercall::Exit => return Flow::End(Outcome::Exited(self.arg(0))),
            Hypercall::Fail => return Flow::End(Outcome::Failed(self.console_line())),
            Hypercall::PageFault => return self.page_fault(),
            Hypercall::Crash => {
                // The stub goes on to `killed` at CPL 3, which ends us.
                self.killed = Some(self.crash());
                return Flow::Continue;
            }
            Hypercall::Killed => {
                let why = self.killed.take();
                return Flow::End(
                    why.unwrap_or_else(|| Outcome::Error("killed for no recorded reason".into())),
                );
            }
            Hypercall::FlushAck => {
                if let Some(generation) = self.injected_flush.take() {
                    self.ctl.ack(generation);
                }
                self.stub_exit = Some(StubExit::FlushAck);
                let _ = self.events.send(Event::FlushAcked {
                    id: self.id,
                    at: Instant::now(),
                });
                return Flow::Continue;
            }
            Hypercall::Nop => return Flow::Continue,
            Hypercall::Hook => {
                let name = self.shared.hook_name(self.arg(0));
                let _ = self.mm.machine().hooks.hit(&name, Some(self.id), None);
                return Flow::Continue;
            }
            Hypercall::Mark => {
                let _ = self.events.send(Event::Mark {
                    id: self.id,
                    n: self.arg(0),
                    at: Instant::now(),
                });
                return Flow::Continue;
            }
            Hypercall::Spawn => match Program::from_u64(self.arg(0)) {
                Some(program) => {
                    let start = Start::Thread(self.arg(1));
                    Shared::spawn(&self.shared, program, start, Arc::clone(&self.mm))
                        .map_or(u64::MAX, |id| id as u64)
                }
                None => u64::MAX,
            },
            Hypercall::Fork => self.fork(),
            Hypercall::Join => match self.shared.ctl(self.arg(0) as usize) {
                // Stopped while waiting: the request loop ends the thread.
                Some(ctl) if self.arg(0) as usize != self.id => ctl
                    .wait_ended(|| {
                        self.ctl.requests.load(Ordering::Acquire) & request::STOP != 0
                            || self.shared.machine.stopping()
                    })
                    .unwrap_or(MmError::Interrupted.errno() as u64),
                _ => u64::MAX,
            },
            Hypercall::Mmap => {
                let hint = Some(self.arg(0)).filter(|a| *a != 0);
                errno(self.mm.mmap(hint, self.arg(1), self.arg(2) as u32))
            }
            Hypercall::Munmap => errno(
                self.mm
                    .munmap(self.arg(0), self.arg(1), Some(self.id))
                    .map(|_| 0),
            ),
            Hypercall::Mprotect => {
                let defer = self.arg(3) & MPROTECT_DEFER_FLUSH != 0;
                let r = self.mm.mprotect(
                    self.arg(0),
                    self.arg(1),
                    self.arg(2) as u32,
                    defer,
                    Some(self.id),
                );
                errno(r.map(|_| 0))
            }
            Hypercall::Madvise if self.arg(2) == MADV_DONTNEED => errno(
                self.mm
                    .madvise_dontneed(self.arg(0), self.arg(1), Some(self.id))
                    .map(|_| 0),
            ),
            Hypercall::Madvise => MmError::Inval.errno() as u64,
            Hypercall::Pin => {
                let f = self.arg(1);
                let flags = GupFlags {
                    write: f & gup::WRITE != 0,
                    pin: f & gup::PIN != 0,
                    longterm: f & gup::LONGTERM != 0,
                };
                match self.mm.get_user_page(self.arg(0), flags, self.id) {
                    Ok(handle) => handle,
                    Err(FaultError::Oom) => MmError::NoMem.errno() as u64,
                    Err(_) => -14i64 as u64, // EFAULT
                }
            }
            Hypercall::Unpin => {
                let m = self.mm.machine();
                if m.unpin_user_page(self.arg(0)) {
                    0
                } else {
                    MmError::Inval.errno() as u64
                }
            }
            Hypercall::DmaRead => {
                let m = self.mm.machine();
                m.dma_read(self.arg(0), self.arg(1))
                    .unwrap_or(MmError::Inval.errno() as u64)
            }
            Hypercall::DmaWrite => {
                let m = self.mm.machine();
                m.dma_write(self.arg(0), self.arg(1), self.arg(2))
                    .map_or(MmError::Inval.errno() as u64, |()| 0)
            }
            Hypercall::UffdRegister => {
                errno(self.mm.uffd_register(self.arg(0), self.arg(1)).map(|_| 0))
            }
            Hypercall::UffdWp => {
                let protect = self.arg(2) != 0;
                errno(
                    self.mm
                        .mwriteprotect_range(self.arg(0), self.arg(1), protect, Some(self.id))
                        .map(|_| 0),
                )
            }
            // Stopped while waiting: the request loop ends the thread.
            Hypercall::UffdWait => self
                .mm
                .uffd_wait()
                .unwrap_or(MmError::Interrupted.errno() as u64),
            Hypercall::FlushTlb => errno(
                self.mm
                    .flush_deferred(self.arg(0), self.arg(1), Some(self.id))
                    .map(|_| 0),
            ),
        };
        self.area_write(offset_of!(VcpuArea, hcall.ret), ret);
        Flow::Continue
    }

    /// Forks the process: a copy-on-write copy of the address space, and a
    /// new vCPU that is a copy of this one and runs in it. Returns the
    /// child's vCPU id (the child sees 0), or a negative errno.
    fn fork(&mut self) -> u64 {
        let Ok(regs) = self.fd.get_regs() else {
            return MmError::Inval.errno() as u64;
        };
        let child = match self.mm.dup_mmap(Some(self.id)) {
            Ok(child) => child,
            Err(_) => return MmError::NoMem.errno() as u64,
        };
        self.shared.add_process(Arc::clone(&child));
        let start = Start::Forked(Box::new(regs));
        Shared::spawn(&self.shared, self.program, start, child)
            .map_or(MmError::NoMem.errno() as u64, |id| id as u64)
    }

    /// A forwarded #PF: the memory manager resolves it and fills this
    /// CPU's TLB, or the thread ends (SIGSEGV, OOM).
    fn page_fault(&mut self) -> Flow {
        let addr = self.area_read(offset_of!(VcpuArea, fault.cr2));
        let error_code = self.area_read(offset_of!(VcpuArea, fault.error_code));
        let rip = self.area_read(offset_of!(VcpuArea, fault.rip));
        let access = Access::from_error_code(error_code);
        self.faults += 1;
        if self.shared.record_faults {
            self.fault_addrs.push(addr);
        }
        let result = if addr >= USER_END {
            Err(Outcome::Crashed {
                vector: 14,
                error_code,
                rip,
                cr2: addr,
                rsp: 0,
            })
        } else {
            if let Some(t) = self.trace() {
                let a = match access {
                    Access::Read => FaultAccess::Read,
                    Access::Write => FaultAccess::Write,
                    Access::Fetch => FaultAccess::Exec,
                };
                t.emit(Kind::Fault, &[addr, a.code()], "");
            }
            let r = self.mm.handle_user_fault(self.id, addr, access);
            if let Some(t) = self.trace() {
                let code = match r {
                    Ok(()) => FaultResult::Ok,
                    Err(FaultError::Segv) => FaultResult::Segv,
                    Err(FaultError::Oom) => FaultResult::Oom,
                    Err(_) => FaultResult::Interrupted,
                };
                t.emit(Kind::FaultEnd, &[addr, code.code()], "");
            }
            match r {
                Ok(()) => Ok(fault_result::RETRY),
                Err(FaultError::Segv) if self.area_read(offset_of!(VcpuArea, fixup_rip)) != 0 => {
                    Ok(fault_result::FIXUP)
                }
                Err(FaultError::Segv) => Err(Outcome::Segv { addr, access, rip }),
                Err(FaultError::Oom) => Err(Outcome::Oom { addr }),
                // The stop request ends the thread before it re-enters.
                Err(FaultError::Interrupted) => Ok(fault_result::RETRY),
                Err(FaultError::Userfault(_)) => {
                    Err(Outcome::Error("a userfault escaped the fault path".into()))
                }
            }
        };
        // A dead thread leaves the stub for `killed` (see fault_result::KILL).
        let reply = result.unwrap_or_else(|outcome| {
            self.killed = Some(outcome);
            fault_result::KILL
        });
        self.area_write(offset_of!(VcpuArea, fault.result), reply);
        self.stub_exit = Some(StubExit::PageFault);
        Flow::Continue
    }

    /// The run's trace recorder, if it is traced.
    fn trace(&self) -> Option<&crate::trace::Recorder> {
        self.shared.machine.hooks.trace.get()
    }

    fn crash(&self) -> Outcome {
        Outcome::Crashed {
            vector: self.area_read(offset_of!(VcpuArea, crash.vector)),
            error_code: self.area_read(offset_of!(VcpuArea, crash.error_code)),
            rip: self.area_read(offset_of!(VcpuArea, crash.rip)),
            cr2: self.area_read(offset_of!(VcpuArea, crash.cr2)),
            rsp: self.area_read(offset_of!(VcpuArea, crash.rsp)),
        }
    }

    fn arg(&self, i: usize) -> u64 {
        self.area_read(offset_of!(VcpuArea, hcall.args) + i * 8)
    }

    fn console_line(&self) -> String {
        let len = (self.arg(0) as usize).min(CONSOLE_LEN);
        let mut buf = vec![0u8; len];
        let _ = self.shared.mem.read(
            self.area_pa + offset_of!(VcpuArea, console) as u64,
            &mut buf,
        );
        String::from_utf8_lossy(&buf).into_owned()
    }

    fn area_read(&self, offset: usize) -> u64 {
        self.shared
            .mem
            .word(self.area_pa + offset as u64)
            .load(Ordering::Acquire)
    }

    fn area_write(&self, offset: usize, v: u64) {
        self.shared
            .mem
            .word(self.area_pa + offset as u64)
            .store(v, Ordering::Release)
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map_or(0, |r| r.rip)
    }
}

/// A memory-manager result as the guest sees it: the value or `-errno`.
fn errno(r: Result<u64, MmError>) -> u64 {
    r.unwrap_or_else(|e| e.errno() as u64)
}

/// Writes the VMM-owned parts of a vCPU area: identity, program, GDT, TSS.
fn init_area(
    shared: &Shared,
    id: usize,
    area_pa: u64,
    program: Program,
    arg: u64,
) -> KvmResult<()> {
    let area_va = kernel_va(area_pa);
    let mem = &shared.mem;
    let zero = [0u8; 4096];
    for page in 0..(cowlab_abi::layout::VCPU_AREA_SIZE / 4096) {
        mem.write(area_pa + page * 4096, &zero)
            .ok_or("vCPU area outside memory")?;
    }
    let fields = [
        (offset_of!(VcpuArea, self_ptr), area_va),
        (offset_of!(VcpuArea, vcpu_id), id as u64),
        (offset_of!(VcpuArea, nr_vcpus), shared.nr_vcpus as u64),
        (offset_of!(VcpuArea, program), program as u64),
        (offset_of!(VcpuArea, arg), arg),
        (offset_of!(VcpuArea, user_stack_top), user_stack_top(id)),
        (offset_of!(VcpuArea, kill_rip), shared.boot_header.killed),
        (
            offset_of!(VcpuArea, kill_rsp),
            area_va + area::BOOT_STACK_TOP - 8,
        ),
    ];
    for (off, v) in fields {
        mem.word(area_pa + off as u64).store(v, Ordering::Relaxed);
    }
    for (i, e) in arch::gdt(area_va).iter().enumerate() {
        mem.word(area_pa + area::GDT + i as u64 * 8)
            .store(*e, Ordering::Relaxed);
    }
    for (i, [low, high]) in arch::idt(&shared.boot_header).into_iter().enumerate() {
        mem.word(area_pa + area::IDT + i as u64 * 16)
            .store(low, Ordering::Relaxed);
        mem.word(area_pa + area::IDT + i as u64 * 16 + 8)
            .store(high, Ordering::Relaxed);
    }
    mem.write(area_pa + area::TSS, &arch::tss(area_va))
        .ok_or("TSS outside memory")?;
    Ok(())
}
