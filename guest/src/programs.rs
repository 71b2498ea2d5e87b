//! The built-in programs (`cowlab_abi::Program`).

use core::arch::asm;
use core::ptr::{read_volatile, write_volatile};

use cowlab_abi::layout::PAGE_SIZE;
use cowlab_abi::program::touch_base;
use cowlab_abi::{area_offset, Hypercall, Program};

use crate::rt::{self, area_read, hypercall, println};

/// Pages `hello` touches when no argument is given.
const HELLO_DEFAULT_PAGES: u64 = 16;

/// Entry of every vCPU, at CPL 3 on its user stack: runs the program the
/// VMM selected; never returns.
#[no_mangle]
pub extern "C" fn _start() -> ! {
    hypercall(Hypercall::Booted, [0; 4]);
    let id = area_read!(vcpu_id);
    let arg = area_read!(arg);
    match Program::from_u64(area_read!(program)) {
        Some(Program::Hello) => hello(id, if arg == 0 { HELLO_DEFAULT_PAGES } else { arg }),
        Some(Program::Touch) => touch(id, arg),
        Some(Program::DivZero) => divide_by_zero(),
        Some(Program::TripleFault) => triple_fault(),
        Some(Program::Loop) => loop {
            core::hint::spin_loop();
        },
        Some(Program::Segv) => {
            // SAFETY: a deliberate read of address 0, which the VMM never maps.
            let v = unsafe { read_volatile(core::ptr::without_provenance::<u64>(8)) };
            rt::fail(format_args!("read of address 8 returned {v:#x}"))
        }
        Some(Program::Spawn) => spawn(id, arg),
        Some(Program::Spin) => {
            while area_read!(stop) == 0 {
                core::hint::spin_loop();
            }
        }
        Some(Program::BenchPio) => bench(|| {
            for _ in 0..arg {
                hypercall(Hypercall::Nop, [0; 4]);
            }
        }),
        Some(Program::BenchFault) => bench(|| {
            for _ in 0..arg {
                fault_with_fixup();
            }
        }),
        Some(Program::BenchTouch) => bench(|| touch(id, arg)),
        Some(Program::BenchStore) => {
            let word = word_addr(id, 0, 0);
            // SAFETY: user memory the VMM maps on demand; faulted in before
            // the first mark so the loop measures stores only.
            unsafe { write_volatile(word, 0) };
            bench(|| {
                for i in 0..arg {
                    // SAFETY: as above.
                    unsafe { write_volatile(word, i) };
                }
            })
        }
        Some(Program::Fail) => {
            rt::fail(format_args!("vcpu {id}: the fail program failed, as asked"))
        }
        None => rt::fail(format_args!(
            "vcpu {id}: unknown program {}",
            area_read!(program)
        )),
    }
    rt::exit(0)
}

/// Address of word `word` of page `page` in this vCPU's touch region.
fn word_addr(id: u64, page: u64, word: u64) -> *mut u64 {
    (touch_base(id) + page * PAGE_SIZE + word * 8) as *mut u64
}

/// The value `hello` stores in page `page` of vCPU `id`.
fn pattern(id: u64, page: u64) -> u64 {
    0xc0ff_ee00_0000_0000 ^ (id << 32) ^ page
}

/// Touches `pages` fresh pages: checks they read as zero, writes a pattern
/// at both ends of each, reads everything back and prints one line.
fn hello(id: u64, pages: u64) {
    for p in 0..pages {
        for w in [0, PAGE_SIZE / 8 - 1] {
            // SAFETY: user-half memory the VMM maps on demand; only this vCPU
            // uses its touch region.
            let before = unsafe { read_volatile(word_addr(id, p, w)) };
            if before != 0 {
                rt::fail(format_args!(
                    "vcpu {id}: fresh page {p} word {w} reads {before:#x}, not 0"
                ));
            }
            // SAFETY: as above.
            unsafe { write_volatile(word_addr(id, p, w), pattern(id, p) ^ w) };
        }
    }
    for p in 0..pages {
        for w in [0, PAGE_SIZE / 8 - 1] {
            // SAFETY: as above.
            let got = unsafe { read_volatile(word_addr(id, p, w)) };
            if got != pattern(id, p) ^ w {
                rt::fail(format_args!(
                    "vcpu {id}: page {p} word {w} reads {got:#x}, wrote {:#x}",
                    pattern(id, p) ^ w
                ));
            }
        }
    }
    println!(
        "hello from vcpu {id}: {pages} fresh pages at {:#x} read as zero, written and read back",
        touch_base(id)
    );
}

/// Writes one word to each of `pages` fresh pages.
fn touch(id: u64, pages: u64) {
    for p in 0..pages {
        // SAFETY: user-half memory the VMM maps on demand.
        unsafe { write_volatile(word_addr(id, p, 0), p + 1) };
    }
}

/// Spawns `n` vCPUs running `hello` while this one keeps running.
fn spawn(id: u64, n: u64) {
    for _ in 0..n {
        let child = hypercall(Hypercall::Spawn, [Program::Hello as u64, 0, 0, 0]);
        if child == u64::MAX {
            rt::fail(format_args!("vcpu {id}: spawn refused"));
        }
        println!("vcpu {id} spawned vcpu {child}");
    }
}

/// Times `f` between two marks the VMM timestamps.
fn bench(f: impl FnOnce()) {
    hypercall(Hypercall::Mark, [1, 0, 0, 0]);
    f();
    hypercall(Hypercall::Mark, [2, 0, 0, 0]);
}

/// Address below `USER_MIN_ADDR` that never maps.
const UNMAPPED: u64 = 0x1000;

/// Reads an address that never maps, with `fixup_rip` armed so the fault
/// resumes after the load (one #PF forward round trip).
fn fault_with_fixup() {
    // SAFETY: the load faults and the VMM answers FIXUP; the stub resumes at
    // label 2 with `rax` restored. Only `rax` is written.
    unsafe {
        asm!(
            "lea rax, [rip + 2f]",
            "mov gs:[{fixup}], rax",
            "mov rax, [{addr}]",
            "2:",
            fixup = const area_offset::FIXUP_RIP,
            addr = in(reg) UNMAPPED,
            out("rax") _,
            options(nostack),
        )
    }
}

fn divide_by_zero() {
    // SAFETY: raises #DE on purpose; the VMM ends the vCPU.
    unsafe {
        asm!("xor edx, edx", "xor ecx, ecx", "mov eax, 1", "div ecx", out("eax") _, out("edx") _, out("ecx") _, options(nomem, nostack));
    }
}

fn triple_fault() {
    // SAFETY: the runtime service empties the IDT and raises #UD: #GP, then
    // #DF, then a shutdown. It never returns.
    unsafe { asm!("int {v}", v = const cowlab_abi::TRIPLE_FAULT_VECTOR, options(nomem, nostack)) };
}
