//! A `KVM_RUN` exit, decoded ([`Exit::decode`]), and what the VMM does
//! about it ([`ExitHandler::decide`]): pure functions of the exit's data,
//! so unit tests can feed them fabricated exits without booting a guest.

use cowlab_abi::layout::DOORBELL_PHYS;
use cowlab_abi::{Hypercall, FAULT_PORT, HYPERCALL_PORT};
use kvm_ioctls::VcpuExit;

use super::error::VcpuError;
use crate::trace::ExitReason;

/// Consecutive EFAULT exits after which the frame is taken as really gone.
pub(super) const MAX_REVOKED_RETRIES: u32 = 10_000;

/// An exit copied out of `kvm_run`, so the vCPU can be used while handling it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Exit {
    /// A doorbell ring: a 4-byte `out` to [`HYPERCALL_PORT`] or a 4-byte
    /// MMIO write to [`DOORBELL_PHYS`], carrying the hypercall number.
    Hypercall(u32),
    /// The #PF stub's exit: an `out` of any size to [`FAULT_PORT`]; the
    /// fault is in CR2 and the stub's exception frame.
    PageFault,
    /// Any other port I/O (`KVM_EXIT_IO`).
    PortIo(u16),
    /// Any other MMIO (`KVM_EXIT_MMIO`).
    Mmio(u64),
    /// `KVM_EXIT_SHUTDOWN`: a triple fault.
    Shutdown,
    /// `KVM_EXIT_IRQ_WINDOW_OPEN`.
    IrqWindowOpen,
    /// `KVM_EXIT_INTR`, or `KVM_RUN` failed with EINTR/EAGAIN: a kick.
    Interrupted,
    /// `KVM_RUN` failed with EFAULT: the guest touched a frame while
    /// `PhysMem::revoke` had its host page read-only for a moment.
    Revoked,
    /// `KVM_EXIT_INTERNAL_ERROR`; the vCPU describes it from `kvm_run`.
    InternalError,
    /// Anything else, described.
    Other(String),
}

/// The hypercall number a doorbell write carries, if `data` is one.
fn doorbell(data: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(data.try_into().ok()?))
}

impl Exit {
    /// Decodes what `KVM_RUN` returned. Errors other than a kick (EINTR,
    /// EAGAIN) or a revoked frame (EFAULT) are the vCPU's end.
    pub(super) fn decode(run: Result<VcpuExit<'_>, kvm_ioctls::Error>) -> Result<Exit, VcpuError> {
        Ok(match run {
            Ok(VcpuExit::IoOut(HYPERCALL_PORT, data)) if doorbell(data).is_some() => {
                Exit::Hypercall(doorbell(data).unwrap_or_default())
            }
            Ok(VcpuExit::MmioWrite(DOORBELL_PHYS, data)) if doorbell(data).is_some() => {
                Exit::Hypercall(doorbell(data).unwrap_or_default())
            }
            Ok(VcpuExit::IoOut(FAULT_PORT, _)) => Exit::PageFault,
            Ok(VcpuExit::IoOut(port, _)) | Ok(VcpuExit::IoIn(port, _)) => Exit::PortIo(port),
            Ok(VcpuExit::MmioWrite(addr, _)) | Ok(VcpuExit::MmioRead(addr, _)) => Exit::Mmio(addr),
            Ok(VcpuExit::Shutdown) => Exit::Shutdown,
            Ok(VcpuExit::IrqWindowOpen) => Exit::IrqWindowOpen,
            Ok(VcpuExit::Intr) => Exit::Interrupted,
            Ok(VcpuExit::Hlt) => Exit::Other("HLT".into()),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                Exit::Other(format!("entry failed (reason {reason:#x}, cpu {cpu})"))
            }
            Ok(VcpuExit::InternalError) => Exit::InternalError,
            Ok(other) => Exit::Other(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Interrupted,
            Err(e) if e.errno() == libc::EFAULT => Exit::Revoked,
            Err(e) => return Err(VcpuError::Run(e)),
        })
    }

    /// The exit as a trace's `Exit` event codes it: (reason, detail).
    pub(super) fn trace_code(&self) -> (ExitReason, u64) {
        match self {
            Exit::Hypercall(nr) => (ExitReason::Hypercall, *nr as u64),
            Exit::PageFault => (ExitReason::Hypercall, Hypercall::PageFault as u64),
            Exit::IrqWindowOpen | Exit::Interrupted => (ExitReason::Interrupted, 0),
            Exit::Revoked => (ExitReason::Revoked, 0),
            _ => (ExitReason::Other, 0),
        }
    }
}

/// What the VMM does about an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Action {
    /// Carry out this hypercall (its arguments are in the mailbox).
    Hypercall(Hypercall),
    /// Nothing to do: service requests and enter the guest again.
    Resume,
    /// A frame is being revoked: yield, then enter again.
    Retry,
    /// Revoked for [`MAX_REVOKED_RETRIES`] exits in a row: the vCPU ends
    /// (the message needs its RIP).
    RevokedTooLong,
    /// The vCPU shut down: a triple fault at its RIP.
    TripleFault,
    /// `KVM_EXIT_INTERNAL_ERROR`: the vCPU ends, described from `kvm_run`.
    InternalError,
    /// The vCPU ends in this VMM error.
    Fail(String),
}

/// Decides what to do about each exit of one vCPU; remembers only how
/// many exits in a row found a frame revoked.
#[derive(Debug, Default)]
pub(super) struct ExitHandler {
    revoked_streak: u32,
}

impl ExitHandler {
    /// What to do about `exit`.
    pub(super) fn decide(&mut self, exit: &Exit) -> Action {
        if *exit != Exit::Revoked {
            self.revoked_streak = 0;
        }
        match exit {
            Exit::PageFault => Action::Hypercall(Hypercall::PageFault),
            Exit::Hypercall(nr) => match Hypercall::from_u32(*nr) {
                // Its data (CR2, the frame) exist only in the #PF stub's exit.
                Some(Hypercall::PageFault) => {
                    Action::Fail(format!("hypercall {nr} (PageFault) outside the #PF stub"))
                }
                Some(call) => Action::Hypercall(call),
                None => Action::Fail(format!("unknown hypercall {nr}")),
            },
            Exit::PortIo(port) => Action::Fail(format!(
                "guest accessed I/O port {port:#x}; hypercalls use {HYPERCALL_PORT:#x}"
            )),
            Exit::Mmio(addr) => Action::Fail(format!(
                "guest accessed MMIO at {addr:#x}; the doorbell is {DOORBELL_PHYS:#x}"
            )),
            Exit::Shutdown => Action::TripleFault,
            Exit::IrqWindowOpen | Exit::Interrupted => Action::Resume,
            Exit::Revoked => {
                self.revoked_streak += 1;
                if self.revoked_streak > MAX_REVOKED_RETRIES {
                    Action::RevokedTooLong
                } else {
                    Action::Retry
                }
            }
            Exit::InternalError => Action::InternalError,
            Exit::Other(what) => Action::Fail(format!("unexpected exit: {what}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(run: Result<VcpuExit<'_>, kvm_ioctls::Error>) -> Action {
        let exit = Exit::decode(run).expect("an exit, not an error");
        ExitHandler::default().decide(&exit)
    }

    fn errno(e: i32) -> kvm_ioctls::Error {
        kvm_ioctls::Error::new(e)
    }

    #[test]
    fn a_doorbell_ring_of_each_kind_is_its_hypercall() {
        for nr in 0..64u32 {
            let data = nr.to_le_bytes();
            let want = match Hypercall::from_u32(nr) {
                Some(Hypercall::PageFault) => {
                    Action::Fail(format!("hypercall {nr} (PageFault) outside the #PF stub"))
                }
                Some(call) => Action::Hypercall(call),
                None => Action::Fail(format!("unknown hypercall {nr}")),
            };
            assert_eq!(decide(Ok(VcpuExit::IoOut(HYPERCALL_PORT, &data))), want);
            assert_eq!(
                decide(Ok(VcpuExit::MmioWrite(DOORBELL_PHYS, &data))),
                want,
                "MMIO doorbell {nr}"
            );
        }
        let exit = Exit::decode(Ok(VcpuExit::MmioWrite(DOORBELL_PHYS, &3u32.to_le_bytes())));
        assert_eq!(exit.unwrap(), Exit::Hypercall(3));
    }

    #[test]
    fn any_out_to_the_fault_port_is_the_page_fault_stubs_exit() {
        // The stub's `out imm8, al` carries one byte of whatever `al` held.
        for data in [&[0x5au8][..], &[0; 2], &u32::MAX.to_le_bytes()] {
            let exit = Exit::decode(Ok(VcpuExit::IoOut(FAULT_PORT, data))).unwrap();
            assert_eq!(exit, Exit::PageFault);
            assert_eq!(
                ExitHandler::default().decide(&exit),
                Action::Hypercall(Hypercall::PageFault)
            );
            assert_eq!(
                exit.trace_code(),
                (ExitReason::Hypercall, Hypercall::PageFault as u64)
            );
        }
        // A read from it is no fault.
        let mut buf = [0u8; 1];
        assert!(matches!(
            decide(Ok(VcpuExit::IoIn(FAULT_PORT, &mut buf))),
            Action::Fail(_)
        ));
    }

    #[test]
    fn an_unknown_hypercall_ends_the_vcpu() {
        let data = u32::MAX.to_le_bytes();
        assert_eq!(
            decide(Ok(VcpuExit::IoOut(HYPERCALL_PORT, &data))),
            Action::Fail(format!("unknown hypercall {}", u32::MAX))
        );
    }

    #[test]
    fn other_port_and_mmio_accesses_are_errors_naming_the_doorbell() {
        let mut buf = [0u8; 4];
        let Action::Fail(why) = decide(Ok(VcpuExit::IoIn(HYPERCALL_PORT, &mut buf))) else {
            panic!("an in from the hypercall port is no hypercall");
        };
        assert!(why.starts_with("guest accessed I/O port"), "{why}");
        // A doorbell write of the wrong size is not a ring.
        let Action::Fail(why) = decide(Ok(VcpuExit::MmioWrite(DOORBELL_PHYS, &[1u8; 8]))) else {
            panic!("an 8-byte doorbell write is no hypercall");
        };
        assert!(why.contains("the doorbell is"), "{why}");
        let Action::Fail(why) = decide(Ok(VcpuExit::MmioRead(DOORBELL_PHYS, &mut buf))) else {
            panic!("a doorbell read is no hypercall");
        };
        assert!(why.starts_with("guest accessed MMIO"), "{why}");
        assert!(matches!(
            decide(Ok(VcpuExit::IoOut(0x3f8, b"x"))),
            Action::Fail(_)
        ));
    }

    #[test]
    fn shutdown_is_a_triple_fault() {
        assert_eq!(decide(Ok(VcpuExit::Shutdown)), Action::TripleFault);
    }

    #[test]
    fn kicks_resume_and_hlt_ends() {
        assert_eq!(decide(Ok(VcpuExit::Intr)), Action::Resume);
        assert_eq!(decide(Ok(VcpuExit::IrqWindowOpen)), Action::Resume);
        assert_eq!(decide(Err(errno(libc::EINTR))), Action::Resume);
        assert_eq!(decide(Err(errno(libc::EAGAIN))), Action::Resume);
        assert_eq!(
            decide(Ok(VcpuExit::Hlt)),
            Action::Fail("unexpected exit: HLT".into())
        );
        assert_eq!(decide(Ok(VcpuExit::InternalError)), Action::InternalError);
    }

    #[test]
    fn a_failing_kvm_run_is_a_typed_error() {
        let e = Exit::decode(Err(errno(libc::EINVAL))).unwrap_err();
        assert!(matches!(e, VcpuError::Run(_)));
        assert!(e.to_string().starts_with("KVM_RUN: "), "{e}");
    }

    #[test]
    fn a_revoked_frame_is_retried_until_the_streak_is_too_long() {
        let mut h = ExitHandler::default();
        for _ in 0..MAX_REVOKED_RETRIES {
            assert_eq!(h.decide(&Exit::Revoked), Action::Retry);
        }
        // Any other exit breaks the streak.
        assert_eq!(h.decide(&Exit::Interrupted), Action::Resume);
        for _ in 0..MAX_REVOKED_RETRIES {
            assert_eq!(h.decide(&Exit::Revoked), Action::Retry);
        }
        assert_eq!(h.decide(&Exit::Revoked), Action::RevokedTooLong);
        let e = Exit::decode(Err(errno(libc::EFAULT))).unwrap();
        assert_eq!(e, Exit::Revoked);
    }
}
