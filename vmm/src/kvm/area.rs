//! The per-vCPU area (`cowlab_abi::VcpuArea`): the pages the guest and the
//! VMM share for one vCPU. Its mailbox carries hypercall arguments and
//! results, forwarded faults and their replies, console text and crash
//! reports; the VMM writes its identity, GDT, IDT and TSS at creation.

use std::mem::offset_of;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use cowlab_abi::layout::{
    area, kernel_va, user_stack_top, IMAGE_PHYS, VCPU_AREAS_PHYS, VCPU_AREA_SIZE,
};
use cowlab_abi::{BootHeader, FloorStubs, Program, VcpuArea, CONSOLE_LEN, FLOOR_STUBS_MAGIC};

use super::arch;
use super::error::VcpuError;
use super::hypercall::ForwardedFault;
use super::memory::GuestMem;
use super::report::Outcome;
use crate::mm::PhysMem;

/// One vCPU's area in guest memory, as the VMM reads and writes it.
#[derive(Debug, Clone)]
pub(crate) struct Mailbox {
    mem: Arc<GuestMem>,
    /// Guest-physical address of the area.
    pa: u64,
}

impl Mailbox {
    /// The area at guest-physical `pa` of `mem`.
    pub(crate) fn new(mem: Arc<GuestMem>, pa: u64) -> Self {
        Mailbox { mem, pa }
    }

    /// The word at `offset` (a field of [`VcpuArea`]).
    pub(crate) fn read(&self, offset: usize) -> u64 {
        self.mem
            .word(self.pa + offset as u64)
            .load(Ordering::Acquire)
    }

    /// Stores `v` at `offset` (a field of [`VcpuArea`]).
    pub(crate) fn write(&self, offset: usize, v: u64) {
        self.mem
            .word(self.pa + offset as u64)
            .store(v, Ordering::Release)
    }

    /// Hypercall argument `i`.
    pub(crate) fn arg(&self, i: usize) -> u64 {
        self.read(offset_of!(VcpuArea, hcall.args) + i * 8)
    }

    /// The console line of a `Console` or `Fail` hypercall: argument 0
    /// bytes (at most [`CONSOLE_LEN`]) of the console buffer.
    pub(crate) fn console_line(&self) -> String {
        let len = (self.arg(0) as usize).min(CONSOLE_LEN);
        let mut buf = vec![0u8; len];
        let _ = self
            .mem
            .read(self.pa + offset_of!(VcpuArea, console) as u64, &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// The #PF the stub forwarded (`PageFault`) at `cr2` (from the exit's
    /// special registers): the error code and RIP are in the exception
    /// frame the CPU pushed on the #PF IST stack, where the stub waits.
    pub(crate) fn fault(&self, cr2: u64) -> ForwardedFault {
        ForwardedFault {
            addr: cr2,
            error_code: self.read(area::PF_FRAME as usize),
            rip: self.read(area::PF_FRAME as usize + 8),
        }
    }

    /// Whether the guest armed a fixup for a fault it expects
    /// (`fixup_rip`): a SIGSEGV then resumes there instead of killing.
    pub(crate) fn fixup_armed(&self) -> bool {
        self.read(offset_of!(VcpuArea, fixup_rip)) != 0
    }

    /// The exception the guest's runtime reported with `Crash`.
    pub(crate) fn crash(&self) -> Outcome {
        Outcome::Crashed {
            vector: self.read(offset_of!(VcpuArea, crash.vector)),
            error_code: self.read(offset_of!(VcpuArea, crash.error_code)),
            rip: self.read(offset_of!(VcpuArea, crash.rip)),
            cr2: self.read(offset_of!(VcpuArea, crash.cr2)),
            rsp: self.read(offset_of!(VcpuArea, crash.rsp)),
        }
    }

    /// Writes the VMM-owned parts of the area of vCPU `id` of `nr_vcpus`,
    /// zeroed first: identity, program, GDT, IDT (from `boot_header`), TSS.
    pub(crate) fn init(
        &self,
        id: usize,
        nr_vcpus: usize,
        program: Program,
        arg: u64,
        boot_header: &BootHeader,
    ) -> Result<(), VcpuError> {
        let (mem, area_pa) = (&self.mem, self.pa);
        let area_va = kernel_va(area_pa);
        let zero = [0u8; 4096];
        for page in 0..(VCPU_AREA_SIZE / 4096) {
            mem.write(area_pa + page * 4096, &zero)
                .ok_or(VcpuError::AreaOutsideMemory)?;
        }
        let fields = [
            (offset_of!(VcpuArea, self_ptr), area_va),
            (offset_of!(VcpuArea, vcpu_id), id as u64),
            (offset_of!(VcpuArea, nr_vcpus), nr_vcpus as u64),
            (offset_of!(VcpuArea, program), program as u64),
            (offset_of!(VcpuArea, arg), arg),
            (offset_of!(VcpuArea, user_stack_top), user_stack_top(id)),
            (offset_of!(VcpuArea, kill_rip), boot_header.killed),
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
        let mut header = *boot_header;
        if program == Program::BenchTouchMinimal {
            header.page_fault = self.minimal_pf_stub()?;
        }
        for (i, [low, high]) in arch::idt(&header).into_iter().enumerate() {
            mem.word(area_pa + area::IDT + i as u64 * 16)
                .store(low, Ordering::Relaxed);
            mem.word(area_pa + area::IDT + i as u64 * 16 + 8)
                .store(high, Ordering::Relaxed);
        }
        mem.write(area_pa + area::TSS, &arch::tss(area_va))
            .ok_or(VcpuError::TssOutsideMemory)?;
        Ok(())
    }

    /// The minimal #PF stub of the image's [`FloorStubs`] (right after its
    /// boot header), for the fault-floor benchmark; it must lie in the
    /// image's part of the kernel region.
    fn minimal_pf_stub(&self) -> Result<u64, VcpuError> {
        let at = IMAGE_PHYS + size_of::<BootHeader>() as u64;
        let word = |i: u64| self.mem.word(at + i * 8).load(Ordering::Relaxed);
        let stubs = FloorStubs {
            magic: word(0),
            page_fault_minimal: word(1),
        };
        let image = kernel_va(IMAGE_PHYS)..kernel_va(VCPU_AREAS_PHYS);
        if stubs.magic != FLOOR_STUBS_MAGIC || !image.contains(&stubs.page_fault_minimal) {
            return Err(VcpuError::NoFloorStubs);
        }
        Ok(stubs.page_fault_minimal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mailbox in plain memory: no KVM, no guest.
    fn mailbox() -> Mailbox {
        Mailbox::new(Arc::new(GuestMem::new(1 << 20).unwrap()), 0x2000)
    }

    #[test]
    fn the_console_line_is_arg0_bytes_of_the_buffer_at_most_console_len() {
        let m = mailbox();
        let console = 0x2000 + offset_of!(VcpuArea, console) as u64;
        m.mem.write(console, b"hello, world").unwrap();
        m.write(offset_of!(VcpuArea, hcall.args), 5);
        assert_eq!(m.arg(0), 5);
        assert_eq!(m.console_line(), "hello");
        m.write(offset_of!(VcpuArea, hcall.args), u64::MAX);
        assert_eq!(m.console_line().len(), CONSOLE_LEN);
    }

    #[test]
    fn a_crash_report_and_a_forwarded_fault_are_read_from_their_fields() {
        let m = mailbox();
        m.write(offset_of!(VcpuArea, crash.vector), 13);
        m.write(offset_of!(VcpuArea, crash.rip), 0xdead);
        assert!(matches!(
            m.crash(),
            Outcome::Crashed {
                vector: 13,
                rip: 0xdead,
                ..
            }
        ));
        m.write(area::PF_FRAME as usize, 7);
        m.write(area::PF_FRAME as usize + 8, 0x40_1000);
        assert_eq!(
            m.fault(0x1234),
            ForwardedFault {
                addr: 0x1234,
                error_code: 7,
                rip: 0x40_1000
            }
        );
        assert!(!m.fixup_armed());
        m.write(offset_of!(VcpuArea, fixup_rip), 0x4000);
        assert!(m.fixup_armed());
    }
}
