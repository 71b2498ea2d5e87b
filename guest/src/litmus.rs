//! The litmus interpreter: executes the bytecode the VMM loaded at
//! `LITMUS_PHYS` with real loads and stores, at CPL 3.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::Ordering;

use cowlab_abi::bytecode::{Header, Insn, Op, AWAIT_MAY_SLEEP, MAGIC, NR_REGS};
use cowlab_abi::layout::{kernel_va, LITMUS_PHYS, PAGE_SIZE};
use cowlab_abi::{gup, prot, Program, MADV_BY_CODE};

use crate::rt::{self, area};

/// The program's instructions.
fn code() -> &'static [Insn] {
    let header = kernel_va(LITMUS_PHYS) as *const Header;
    // SAFETY: the VMM wrote a header and `len` instructions there before
    // any thread started; they are never written again.
    unsafe {
        let h = read_volatile(header);
        if h.magic != MAGIC {
            rt::fail(format_args!("no litmus program loaded"));
        }
        core::slice::from_raw_parts(header.add(1) as *const Insn, h.len as usize)
    }
}

/// Publishes the registers and ends the thread with `status`.
fn finish(regs: &[u64; NR_REGS], status: u64) -> ! {
    let a = area();
    // SAFETY: this vCPU's area; the VMM reads it after the thread ends.
    unsafe {
        write_volatile(core::ptr::addr_of_mut!((*a).regs), *regs);
        write_volatile(core::ptr::addr_of_mut!((*a).regs_valid), 1);
    }
    rt::exit(status)
}

fn note_start(pc: u64) {
    // SAFETY: this vCPU's area, a plain word.
    unsafe { write_volatile(core::ptr::addr_of_mut!((*area()).litmus_pc), pc) };
}

fn prot_of(bits: usize) -> u64 {
    (bits as u64) & (prot::READ | prot::WRITE)
}

fn res(r: Result<u64, i64>) -> u64 {
    r.unwrap_or_else(|e| e as u64)
}

/// Runs the thread that starts at `pc`.
pub fn run(start: u64) -> ! {
    let code = code();
    let mut regs = [0u64; NR_REGS];
    let mut pc = start as usize;
    note_start(start);
    loop {
        let Some(insn) = code.get(pc).copied() else {
            rt::fail(format_args!("litmus pc {pc} outside the program"));
        };
        pc += 1;
        let (a, b, c, imm) = (insn.a(), insn.b(), insn.c(), insn.imm);
        let Some(op) = Op::from_u8(insn.op()) else {
            rt::fail(format_args!(
                "bad litmus opcode {} at {}",
                insn.op(),
                pc - 1
            ));
        };
        match op {
            Op::Halt => finish(&regs, 0),
            Op::Li => regs[a] = imm,
            Op::Mov => regs[a] = regs[b],
            Op::Add => regs[a] = regs[b].wrapping_add(regs[c]),
            Op::Sub => regs[a] = regs[b].wrapping_sub(regs[c]),
            Op::Mul => regs[a] = regs[b].wrapping_mul(regs[c]),
            Op::And => regs[a] = regs[b] & regs[c],
            Op::Or => regs[a] = regs[b] | regs[c],
            Op::Xor => regs[a] = regs[b] ^ regs[c],
            Op::Div => regs[a] = regs[b].checked_div(regs[c]).unwrap_or(0),
            Op::Rem => regs[a] = regs[b].checked_rem(regs[c]).unwrap_or(0),
            Op::Addi => regs[a] = regs[b].wrapping_add(imm),
            // SAFETY: a test's own memory accesses: faults are the point,
            // and the VMM turns a bad one into a SIGSEGV outcome.
            Op::Load => regs[a] = unsafe { read_volatile(regs[b].wrapping_add(imm) as *const u64) },
            // SAFETY: as for Load.
            Op::Store => unsafe { write_volatile(regs[b].wrapping_add(imm) as *mut u64, regs[a]) },
            Op::Jmp => pc = imm as usize,
            Op::Jz if regs[a] == 0 => pc = imm as usize,
            Op::Jnz if regs[a] != 0 => pc = imm as usize,
            Op::Jz | Op::Jnz => {}
            Op::Eq => regs[a] = u64::from(regs[b] == regs[c]),
            Op::Ne => regs[a] = u64::from(regs[b] != regs[c]),
            Op::Lt => regs[a] = u64::from(regs[b] < regs[c]),
            Op::Fill => {
                for w in 0..imm * PAGE_SIZE / 8 {
                    // SAFETY: as for Store.
                    unsafe { write_volatile((regs[b] + w * 8) as *mut u64, regs[a]) };
                }
            }
            Op::Cmp => {
                let all = (0..imm * PAGE_SIZE / 8)
                    // SAFETY: as for Load.
                    .all(|w| unsafe { read_volatile((regs[b] + w * 8) as *const u64) } == regs[c]);
                regs[a] = u64::from(all);
            }
            Op::Signal => rt::signal_event(imm),
            Op::Await if c as u8 & AWAIT_MAY_SLEEP != 0 => rt::await_event_sleeping(imm),
            Op::Await => rt::await_event(imm),
            Op::Poll => regs[a] = rt::shared_word(imm).load(Ordering::Acquire),
            Op::Mmap => regs[a] = res(rt::mmap(imm * PAGE_SIZE, prot_of(c))),
            Op::Munmap => regs[b] = res(rt::munmap(regs[a], imm * PAGE_SIZE)),
            Op::Mprotect => regs[b] = res(rt::mprotect(regs[a], imm * PAGE_SIZE, prot_of(c), 0)),
            Op::Madvise => {
                let advice = MADV_BY_CODE.get(c).copied().unwrap_or(u64::MAX);
                regs[b] = res(rt::madvise(regs[a], imm * PAGE_SIZE, advice));
            }
            Op::Mremap => {
                let (old, new, flags) = cowlab_abi::bytecode::mremap_imm::unpack(imm);
                let r = rt::mremap(regs[a], old * PAGE_SIZE, new * PAGE_SIZE, flags, regs[c]);
                regs[b] = res(r);
            }
            Op::Fork => match rt::fork() {
                Ok(0) => {
                    regs[a] = 0;
                    pc = imm as usize;
                    note_start(imm);
                }
                r => regs[a] = res(r),
            },
            Op::Wait => regs[a] = rt::join(regs[b]).unwrap_or(u64::MAX),
            Op::Exit => finish(&regs, imm),
            Op::Spawn => regs[a] = rt::spawn(Program::Litmus, imm).unwrap_or(u64::MAX),
            Op::Pin => {
                regs[a] = res(rt::pin(
                    regs[b],
                    c as u64 & (gup::WRITE | gup::PIN | gup::LONGTERM | gup::FAST),
                ))
            }
            Op::Unpin => {
                let _ = rt::unpin(regs[a]);
            }
            Op::DmaRead => regs[a] = rt::dma_read(regs[b], imm),
            Op::DmaWrite => {
                let _ = rt::dma_write(regs[b], imm, regs[a]);
            }
            Op::UffdRegister => {
                let _ = rt::uffd_register(regs[a], imm * PAGE_SIZE);
            }
            Op::UffdWp => {
                let _ = rt::uffd_wp(regs[a], imm * PAGE_SIZE, c != 0);
            }
            Op::UffdResolve => {
                let page = rt::uffd_wait();
                let _ = rt::uffd_wp(page, PAGE_SIZE, false);
                regs[a] = page;
            }
            Op::Hook => {
                rt::hypercall(cowlab_abi::Hypercall::Hook, [imm, 0, 0, 0]);
            }
            Op::Pause => {
                for _ in 0..imm {
                    core::hint::spin_loop();
                }
            }
        }
    }
}
