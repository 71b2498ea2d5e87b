//! The hypercall table: what the VMM does for each call a guest makes
//! through the doorbell, the memory-manager calls and forwarded page
//! faults among them.

use std::mem::offset_of;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use cowlab_abi::layout::USER_END;
use cowlab_abi::{
    fault_result, gup, Hypercall, Program, VcpuArea, MADV_DOFORK, MADV_DONTFORK, MADV_DONTNEED,
    MADV_PAGEOUT, MPROTECT_DEFER_FLUSH,
};

use super::report::Outcome;
use super::shared::Shared;
use super::shootdown::request;
use super::vcpu::{Flow, Start, StubExit, Vcpu};
use super::vm::Event;
use crate::mm::{Access, FaultError, GupFlags, MmError};
use crate::trace::{FaultAccess, FaultResult, Kind};

impl Vcpu {
    /// Carries out hypercall `call`, its arguments in the mailbox; its
    /// result (if it has one) goes back in `hcall.ret`.
    pub(super) fn hypercall(&mut self, call: Hypercall) -> Flow {
        let ret = match call {
            Hypercall::Booted => {
                let _ = self.events.send(Event::Booted {
                    id: self.id,
                    at: Instant::now(),
                });
                return Flow::Continue;
            }
            Hypercall::Console => {
                let line = self.area.console_line();
                let _ = self.events.send(Event::Console { id: self.id, line });
                return Flow::Continue;
            }
            Hypercall::Exit => return Flow::End(Outcome::Exited(self.area.arg(0))),
            Hypercall::Fail => return Flow::End(Outcome::Failed(self.area.console_line())),
            Hypercall::PageFault => return self.page_fault(),
            Hypercall::Crash => {
                // The stub goes on to `killed` at CPL 3, which ends us.
                self.killed = Some(self.area.crash());
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
                let name = self.shared.hook_name(self.area.arg(0));
                let _ = self.mm.machine().hooks.hit(&name, Some(self.id), None);
                return Flow::Continue;
            }
            Hypercall::AwaitEvent => {
                self.await_event(self.area.arg(0));
                0
            }
            Hypercall::WakeEvents => {
                self.shared.event_sleep.wake();
                0
            }
            Hypercall::Mark => {
                let _ = self.events.send(Event::Mark {
                    id: self.id,
                    n: self.area.arg(0),
                    at: Instant::now(),
                });
                return Flow::Continue;
            }
            Hypercall::Spawn => match Program::from_u64(self.area.arg(0)) {
                Some(program) => {
                    let start = Start::Thread(self.area.arg(1));
                    Shared::spawn(&self.shared, program, start, Arc::clone(&self.mm))
                        .map_or(u64::MAX, |id| id as u64)
                }
                None => u64::MAX,
            },
            Hypercall::Fork => self.fork(),
            Hypercall::Join => match self.shared.ctl(self.area.arg(0) as usize) {
                // Stopped while waiting: the request loop ends the thread.
                Some(ctl) if self.area.arg(0) as usize != self.id => {
                    let hooks = &self.shared.machine.hooks;
                    let why = format!("v{} waits for v{} to end", self.id, self.area.arg(0));
                    hooks.set_blocked(self.id, Some(why));
                    let status = ctl
                        .wait_ended(|| {
                            self.ctl.requests.load(Ordering::Acquire) & request::STOP != 0
                                || self.shared.machine.stopping()
                        })
                        .unwrap_or(MmError::Interrupted.errno() as u64);
                    hooks.set_blocked(self.id, None);
                    status
                }
                _ => u64::MAX,
            },
            Hypercall::Mmap => {
                let hint = Some(self.area.arg(0)).filter(|a| *a != 0);
                errno(
                    self.mm
                        .mmap(hint, self.area.arg(1), self.area.arg(2) as u32),
                )
            }
            Hypercall::Munmap => errno(
                self.mm
                    .munmap(self.area.arg(0), self.area.arg(1), Some(self.id))
                    .map(|_| 0),
            ),
            Hypercall::Mprotect => {
                let defer = self.area.arg(3) & MPROTECT_DEFER_FLUSH != 0;
                let r = self.mm.mprotect(
                    self.area.arg(0),
                    self.area.arg(1),
                    self.area.arg(2) as u32,
                    defer,
                    Some(self.id),
                );
                errno(r.map(|_| 0))
            }
            Hypercall::Madvise if self.area.arg(2) == MADV_DONTNEED => errno(
                self.mm
                    .madvise_dontneed(self.area.arg(0), self.area.arg(1), Some(self.id))
                    .map(|_| 0),
            ),
            Hypercall::Madvise if self.area.arg(2) == MADV_PAGEOUT => errno(
                self.mm
                    .madvise_pageout(self.area.arg(0), self.area.arg(1), Some(self.id))
                    .map(|_| 0),
            ),
            Hypercall::Madvise if matches!(self.area.arg(2), MADV_DONTFORK | MADV_DOFORK) => {
                let dontfork = self.area.arg(2) == MADV_DONTFORK;
                errno(
                    self.mm
                        .madvise_dontfork(self.area.arg(0), self.area.arg(1), dontfork)
                        .map(|_| 0),
                )
            }
            Hypercall::Madvise => MmError::Inval.errno() as u64,
            Hypercall::Mremap => {
                let packed = self.area.arg(3);
                let page_mask = cowlab_abi::layout::PAGE_SIZE - 1;
                errno(self.mm.mremap(
                    self.area.arg(0),
                    self.area.arg(1),
                    self.area.arg(2),
                    packed & page_mask,
                    packed & !page_mask,
                    Some(self.id),
                ))
            }
            Hypercall::Pin => {
                let f = self.area.arg(1);
                let flags = GupFlags {
                    write: f & gup::WRITE != 0,
                    pin: f & gup::PIN != 0,
                    longterm: f & gup::LONGTERM != 0,
                };
                let r = if f & gup::FAST != 0 {
                    self.mm
                        .get_user_pages_fast(self.area.arg(0), flags, self.id)
                } else {
                    self.mm.get_user_page(self.area.arg(0), flags, self.id)
                };
                match r {
                    Ok(handle) => handle,
                    Err(FaultError::Oom) => MmError::NoMem.errno() as u64,
                    Err(_) => -14i64 as u64, // EFAULT
                }
            }
            Hypercall::Unpin => {
                let m = self.mm.machine();
                if m.unpin_user_page(self.area.arg(0)) {
                    0
                } else {
                    MmError::Inval.errno() as u64
                }
            }
            Hypercall::DmaRead => {
                let m = self.mm.machine();
                m.dma_read(self.area.arg(0), self.area.arg(1))
                    .unwrap_or(MmError::Inval.errno() as u64)
            }
            Hypercall::DmaWrite => {
                let m = self.mm.machine();
                m.dma_write(self.area.arg(0), self.area.arg(1), self.area.arg(2))
                    .map_or(MmError::Inval.errno() as u64, |()| 0)
            }
            Hypercall::UffdRegister => errno(
                self.mm
                    .uffd_register(self.area.arg(0), self.area.arg(1))
                    .map(|_| 0),
            ),
            Hypercall::UffdWp => {
                let protect = self.area.arg(2) != 0;
                errno(
                    self.mm
                        .mwriteprotect_range(
                            self.area.arg(0),
                            self.area.arg(1),
                            protect,
                            Some(self.id),
                        )
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
                    .flush_deferred(self.area.arg(0), self.area.arg(1), Some(self.id))
                    .map(|_| 0),
            ),
        };
        self.area.write(offset_of!(VcpuArea, hcall.ret), ret);
        Flow::Continue
    }

    /// A litmus `await` under a schedule that spun without seeing its
    /// event: sleeps until shared event word `word` is set, or the thread
    /// is stopped (the request loop then ends it). Noted as blocked, so
    /// that the schedule counts this vCPU as at rest (no settle time) and,
    /// if every vCPU waits, as deadlocked.
    fn await_event(&self, word: u64) {
        let hooks = &self.shared.machine.hooks;
        let event = self.shared.event_name(word);
        hooks.set_awaiting_event(self.id, Some(format!("v{} awaits {event}", self.id)));
        let mem = &self.shared.mem;
        self.shared.event_sleep.sleep_until(
            || mem.event_set(word),
            || {
                self.ctl.requests.load(Ordering::Acquire) & request::STOP != 0
                    || self.shared.machine.stopping()
                    || hooks.released()
            },
            Some(crate::mm::event_sleep::EventSleep::POLL),
        );
        hooks.set_awaiting_event(self.id, None);
    }

    /// Forks the process: a copy-on-write copy of the address space, and a
    /// new vCPU that is a copy of this one and runs in it. Returns the
    /// child's vCPU id (the child sees 0), or a negative errno. The child
    /// starts from this vCPU's `KVM_GET_REGS`.
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
        // CR2 as `KVM_RUN` copied it out with this exit (`KVM_SYNC_X86_SREGS`,
        // see `Vcpu::run_loop`): no `KVM_GET_SREGS` on the fault path.
        let fault = self.area.fault(self.fd.sync_regs().sregs.cr2);
        let access = Access::from_error_code(fault.error_code);
        let addr = fault.addr;
        self.faults += 1;
        if self.shared.record_faults {
            self.fault_addrs.push(addr);
        }
        let result = match fault.kernel_crash() {
            Some(crash) => Err(crash),
            None => {
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
                fault_reply(r, &fault, access, || self.area.fixup_armed())
            }
        };
        // A dead thread leaves the stub for `killed` (see fault_result::KILL).
        let reply = result.unwrap_or_else(|outcome| {
            self.killed = Some(outcome);
            fault_result::KILL
        });
        self.area.write(offset_of!(VcpuArea, fault.result), reply);
        self.stub_exit = Some(StubExit::PageFault);
        Flow::Continue
    }
}

/// A #PF the guest's stub forwarded, as it left it in the mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ForwardedFault {
    /// CR2.
    pub(super) addr: u64,
    pub(super) error_code: u64,
    pub(super) rip: u64,
}

impl ForwardedFault {
    /// A fault on a kernel address is a crash of the guest, not a fault
    /// for the memory manager.
    fn kernel_crash(&self) -> Option<Outcome> {
        (self.addr >= USER_END).then_some(Outcome::Crashed {
            vector: 14,
            error_code: self.error_code,
            rip: self.rip,
            cr2: self.addr,
            rsp: 0,
        })
    }
}

/// The stub's reply (a `fault_result` word) to a user fault the memory
/// manager answered with `r`, or the outcome the thread dies of.
/// `fixup_armed` says whether the guest set a fixup for a faulting access
/// it expects (asked only on SIGSEGV).
fn fault_reply(
    r: Result<(), FaultError>,
    fault: &ForwardedFault,
    access: Access,
    fixup_armed: impl FnOnce() -> bool,
) -> Result<u64, Outcome> {
    let addr = fault.addr;
    match r {
        Ok(()) => Ok(fault_result::RETRY),
        Err(FaultError::Segv) if fixup_armed() => Ok(fault_result::FIXUP),
        Err(FaultError::Segv) => Err(Outcome::Segv {
            addr,
            access,
            rip: fault.rip,
        }),
        Err(FaultError::Oom) => Err(Outcome::Oom { addr }),
        // The stop request ends the thread before it re-enters.
        Err(FaultError::Interrupted) => Ok(fault_result::RETRY),
        Err(FaultError::Userfault(_)) => {
            Err(Outcome::Error("a userfault escaped the fault path".into()))
        }
    }
}

/// A memory-manager result as the guest sees it: the value or `-errno`.
fn errno(r: Result<u64, MmError>) -> u64 {
    r.unwrap_or_else(|e| e.errno() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: ForwardedFault = ForwardedFault {
        addr: 0x1000_0000,
        error_code: 2,
        rip: 0x40_1000,
    };

    #[test]
    fn a_resolved_or_interrupted_fault_is_retried() {
        let reply = |r| fault_reply(r, &USER, Access::Write, || false);
        assert_eq!(reply(Ok(())), Ok(fault_result::RETRY));
        assert_eq!(reply(Err(FaultError::Interrupted)), Ok(fault_result::RETRY));
    }

    #[test]
    fn a_segv_goes_to_the_fixup_if_the_guest_armed_one() {
        let r = fault_reply(Err(FaultError::Segv), &USER, Access::Write, || true);
        assert_eq!(r, Ok(fault_result::FIXUP));
        let r = fault_reply(Err(FaultError::Segv), &USER, Access::Write, || false);
        assert_eq!(
            r,
            Err(Outcome::Segv {
                addr: USER.addr,
                access: Access::Write,
                rip: USER.rip
            })
        );
    }

    #[test]
    fn oom_and_an_escaped_userfault_kill_the_thread() {
        let no_fixup = || panic!("only a SIGSEGV asks for the fixup");
        let r = fault_reply(Err(FaultError::Oom), &USER, Access::Read, no_fixup);
        assert_eq!(r, Err(Outcome::Oom { addr: USER.addr }));
        let r = fault_reply(Err(FaultError::Userfault(1)), &USER, Access::Read, || false);
        assert!(matches!(r, Err(Outcome::Error(_))));
    }

    #[test]
    fn a_fault_on_a_kernel_address_is_a_crash() {
        assert_eq!(USER.kernel_crash(), None);
        let kernel = ForwardedFault {
            addr: USER_END,
            ..USER
        };
        assert_eq!(
            kernel.kernel_crash(),
            Some(Outcome::Crashed {
                vector: 14,
                error_code: 2,
                rip: USER.rip,
                cr2: USER_END,
                rsp: 0
            })
        );
    }
}
