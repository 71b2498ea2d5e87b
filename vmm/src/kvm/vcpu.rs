//! One vCPU and the host thread that runs it: boot state, the `KVM_RUN`
//! loop and requests from other threads (stop, ping, park at the gate, TLB
//! flush by injected interrupt). What an exit means is decided in
//! [`super::exit`]; hypercalls and forwarded page faults are carried out in
//! [`super::hypercall`]; the per-vCPU area is read through
//! [`super::area::Mailbox`].

use std::mem::offset_of;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::{kvm_fpu, kvm_vcpu_events};
use kvm_ioctls::SyncReg;

use cowlab_abi::layout::{kernel_va, user_stack_top, vcpu_area_phys, USER_STACK_SIZE};
use cowlab_abi::{fault_result, Program, VcpuArea, FLUSH_VECTOR};

use super::area::Mailbox;
use super::error::VcpuError;
use super::exit::{Action, Exit, ExitHandler};
use super::report::{Outcome, VcpuReport};
use super::shared::Shared;
use super::shell::LeasedVcpu;
use super::shootdown::{request, VcpuCtl};
use super::vm::Event;
use super::{arch, kick};
use crate::mm::{mmap, verify_tlbs, Mm, ShadowTlb};
use crate::trace::{ExitReason, Kind};

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
pub(super) enum StubExit {
    PageFault,
    FlushAck,
}

/// What to do after handling an exit.
pub(super) enum Flow {
    Continue,
    End(Outcome),
}

/// A vCPU being run by its thread. It is CPU `id` of the memory manager,
/// running a thread of address space `mm`.
pub(crate) struct Vcpu {
    pub(super) id: usize,
    pub(super) program: Program,
    pub(super) fd: LeasedVcpu,
    pub(super) shared: Arc<Shared>,
    pub(super) mm: Arc<Mm>,
    pub(super) ctl: Arc<VcpuCtl>,
    pub(super) events: Sender<Event>,
    /// Its per-vCPU area (mailbox).
    pub(super) area: Mailbox,
    /// Generation of the flush whose interrupt was injected, until acked.
    pub(super) injected_flush: Option<u64>,
    /// `KVM_RUN` has returned at least once: `kvm_run.s.regs` holds the
    /// special registers and events of the last exit.
    pub(super) synced: bool,
    /// The current exit comes from a CPL-0 stub whose reply can carry a flush.
    pub(super) stub_exit: Option<StubExit>,
    /// Why the thread dies, once the VMM decided it does; it ends when the
    /// guest reports back from `killed`.
    pub(super) killed: Option<Outcome>,
    pub(super) faults: u64,
    pub(super) exits: u64,
    pub(super) fault_addrs: Vec<u64>,
}

impl Vcpu {
    /// Creates vCPU `id` running `program(arg)` as a thread of `mm`, in long
    /// mode at the program's entry, with its stack mapped and its TLB empty.
    ///
    /// Takes its fd from the VM's shell (`KVM_CREATE_VCPU` and
    /// `KVM_SET_CPUID2` the first time, see [`super::shell`]); wraps
    /// `KVM_SET_SREGS`, `KVM_SET_REGS` and `KVM_SET_FPU`.
    pub(crate) fn new(
        shared: Arc<Shared>,
        id: usize,
        program: Program,
        start: Start,
        mm: Arc<Mm>,
        ctl: Arc<VcpuCtl>,
    ) -> Result<Self, VcpuError> {
        let (fd, created_sregs) = shared.shell.vcpu(id)?;
        let area_pa = vcpu_area_phys(id);
        let area_va = kernel_va(area_pa);
        let machine = mm.machine();
        let tlb = ShadowTlb::new(
            &*machine.mem,
            machine.frames.pool(),
            &machine.kernel_pml4,
            id as u64 + 1,
        )
        .map_err(|_| VcpuError::NoShadowFrame)?;
        let root = tlb.root();
        machine.tlbs.insert(id, tlb);
        let arg = match start {
            // Boot vCPUs: the VM mapped every stack before starting any of
            // them, so no thread takes mmap_lock before its first instruction.
            Start::Program(arg) => arg,
            Start::Thread(arg) => {
                mmap::map_stack(&mm, user_stack_top(id), USER_STACK_SIZE)
                    .map_err(|source| VcpuError::Stack { id, source })?;
                arg
            }
            // The forking thread's stack was copied with its address space.
            Start::Forked(_) => 0,
        };
        mm.attach_cpu(id);
        if matches!(start, Start::Program(_)) && program == Program::Litmus {
            // The top stack page the VM populated for it (`Vm::new`): in
            // its TLB before its first push, as a TLB may cache any valid
            // translation. No hook point: this runs on the creating thread.
            let _ = mm.preload_tlb(id, user_stack_top(id) - 8);
        }
        let area = Mailbox::new(Arc::clone(&shared.mem), area_pa);
        area.init(id, shared.nr_vcpus, program, arg, &shared.boot_header)?;

        fd.set_sregs(&arch::sregs(created_sregs, area_va, root))
            .map_err(VcpuError::SetSregs)?;
        let regs = match start {
            Start::Program(_) | Start::Thread(_) => {
                arch::regs(shared.image.entry, user_stack_top(id))
            }
            Start::Forked(regs) => *regs,
        };
        fd.set_regs(&regs).map_err(VcpuError::SetRegs)?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fd.set_fpu(&fpu).map_err(VcpuError::SetFpu)?;
        // A reused fd may still carry an injection the last run marked for
        // an entry that never came: it must not reach this run.
        let mut fd = fd;
        fd.clear_sync_dirty_reg(SyncReg::VcpuEvents);

        let events = shared.events();
        Ok(Vcpu {
            id,
            program,
            fd,
            shared,
            mm,
            ctl,
            events,
            area,
            injected_flush: None,
            synced: false,
            stub_exit: None,
            killed: None,
            faults: 0,
            exits: 0,
            fault_addrs: Vec::new(),
        })
    }

    /// Runs the vCPU until its program ends; returns its report. On the
    /// way out the CPU leaves its mm and its TLB is checked and freed.
    /// Registers `kvm_run.immediate_exit` (of the `KVM_RUN` mapping) for the
    /// kick signal meanwhile.
    pub(crate) fn run(mut self) -> VcpuReport {
        let exit_flag = &mut self.fd.get_kvm_run().immediate_exit as *mut u8;
        let guard = kick::register_immediate_exit(exit_flag);
        let outcome = self.run_loop();
        drop(guard);
        self.ctl.in_guest.store(false, Ordering::SeqCst);
        let violations = self.verify_tlb();
        let machine = Arc::clone(self.mm.machine());
        self.mm.detach_cpu(self.id);
        // Kept whole until every vCPU has ended (`Tlbs::retire`): freed
        // now, its frames would have to be revoked from KVM first.
        let fills = match machine.tlbs.remove(self.id) {
            Some(tlb) => {
                let fills = tlb.fills();
                machine
                    .tlbs
                    .retire(tlb, &*machine.mem, machine.frames.pool());
                fills
            }
            None => 0,
        };
        self.mm.mmput();
        let litmus_pc = self.area.read(offset_of!(VcpuArea, litmus_pc));
        let regs = (self.area.read(offset_of!(VcpuArea, regs_valid)) == 1)
            .then(|| std::array::from_fn(|i| self.area.read(offset_of!(VcpuArea, regs) + i * 8)));
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
        let mut handler = ExitHandler::default();
        // Every exit brings the special registers and the event state: a
        // forwarded #PF reads CR2 from them, and a flush interrupt is
        // injected through them, instead of costing a KVM_GET_SREGS, a
        // KVM_GET_VCPU_EVENTS and a KVM_SET_VCPU_EVENTS (~7 µs each here).
        self.fd.set_sync_valid_reg(SyncReg::SystemRegister);
        self.fd.set_sync_valid_reg(SyncReg::VcpuEvents);
        loop {
            if let Flow::End(outcome) = self.service_requests() {
                return outcome;
            }
            self.ctl.in_guest.store(true, Ordering::SeqCst);
            if let Err(e) = self.deliver_flush() {
                return Outcome::Error(e.to_string());
            }
            if let Some(t) = self.trace() {
                t.emit(Kind::Resume, &[], "");
            }
            let exit = self.enter();
            self.ctl.in_guest.store(false, Ordering::SeqCst);
            if let Some(t) = self.trace() {
                let (reason, detail) = exit
                    .as_ref()
                    .map_or((ExitReason::Other, 0), Exit::trace_code);
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
            let exit = match exit {
                Ok(exit) => exit,
                Err(e) => return Outcome::Error(e.to_string()),
            };
            let flow = match handler.decide(&exit) {
                Action::Hypercall(call) => self.hypercall(call),
                Action::Resume => Flow::Continue,
                Action::Retry => {
                    std::thread::yield_now();
                    Flow::Continue
                }
                Action::RevokedTooLong => Flow::End(Outcome::Error(format!(
                    "KVM_RUN: guest memory stayed inaccessible (EFAULT) at RIP {:#x}",
                    self.rip()
                ))),
                Action::TripleFault => Flow::End(Outcome::TripleFault { rip: self.rip() }),
                Action::InternalError => Flow::End(Outcome::Error(format!(
                    "unexpected exit: {}",
                    self.internal_error()
                ))),
                Action::Fail(why) => Flow::End(Outcome::Error(why)),
            };
            if let Flow::End(outcome) = flow {
                return outcome;
            }
        }
    }

    /// One `KVM_RUN` (the ioctl), with the exit copied out.
    fn enter(&mut self) -> Result<Exit, VcpuError> {
        self.shared.machine.hooks.entering_guest(self.id);
        let exit = Exit::decode(self.fd.run());
        self.fd.set_kvm_immediate_exit(0);
        // Whatever KVM_RUN returned, it copied the registers out on its way.
        self.synced = true;
        exit
    }

    /// Describes a `KVM_EXIT_INTERNAL_ERROR` (suberror and data words), read
    /// from the `kvm_run` structure `KVM_RUN` filled in.
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
    ///
    /// Injects with `KVM_GET_VCPU_EVENTS` / `KVM_SET_VCPU_EVENTS`.
    fn deliver_flush(&mut self) -> Result<(), VcpuError> {
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
                let result = self.area.read(offset_of!(VcpuArea, fault.result));
                self.area.write(
                    offset_of!(VcpuArea, fault.result),
                    result | fault_result::FLUSH_TLB,
                );
            }
            Some(StubExit::FlushAck) => self.area.write(offset_of!(VcpuArea, flush_again), 1),
            None => {
                if self.cpl()? != 3 {
                    return Ok(());
                }
                let mut events = self.events()?;
                events.interrupt.injected = 1;
                events.interrupt.nr = FLUSH_VECTOR;
                events.interrupt.soft = 0;
                self.set_events(events)?;
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
    ///
    /// See [`Self::events`] and [`Self::cpl`] for what it asks KVM.
    fn injected_flush_lost(&self) -> Result<bool, VcpuError> {
        if self.events()?.interrupt.injected != 0 {
            return Ok(false);
        }
        Ok(self.cpl()? == 3)
    }

    /// The vCPU's current privilege level: `cs.dpl` of the special
    /// registers KVM copied out at the last exit (`kvm_run.s.regs.sregs`),
    /// or of `KVM_GET_SREGS` before the first.
    fn cpl(&self) -> Result<u8, VcpuError> {
        if self.synced {
            return Ok(self.fd.sync_regs().sregs.cs.dpl);
        }
        Ok(self.fd.get_sregs().map_err(VcpuError::GetSregs)?.cs.dpl)
    }

    /// The vCPU's event state: as KVM copied it out at the last exit
    /// (`kvm_run.s.regs.events`), or `KVM_GET_VCPU_EVENTS` before the first.
    fn events(&self) -> Result<kvm_vcpu_events, VcpuError> {
        if self.synced {
            return Ok(self.fd.sync_regs().events);
        }
        self.fd.get_vcpu_events().map_err(VcpuError::GetVcpuEvents)
    }

    /// Sets the event state for the next entry: through `kvm_run.s.regs`
    /// (marked dirty, KVM applies it as `KVM_SET_VCPU_EVENTS` would) once
    /// KVM has filled it in, else `KVM_SET_VCPU_EVENTS`.
    fn set_events(&mut self, events: kvm_vcpu_events) -> Result<(), VcpuError> {
        if self.synced {
            self.fd.sync_regs_mut().events = events;
            self.fd.set_sync_dirty_reg(SyncReg::VcpuEvents);
            return Ok(());
        }
        self.fd
            .set_vcpu_events(&events)
            .map_err(VcpuError::SetVcpuEvents)
    }

    /// The run's trace recorder, if it is traced.
    pub(super) fn trace(&self) -> Option<&crate::trace::Recorder> {
        self.shared.machine.hooks.trace.get()
    }
    /// The vCPU's RIP (`KVM_GET_REGS`), 0 if KVM cannot say.
    fn rip(&self) -> u64 {
        self.fd.get_regs().map_or(0, |r| r.rip)
    }
}
