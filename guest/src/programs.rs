//! The built-in programs (`cowlab_abi::Program`). They run at CPL 3 as the
//! threads of one process and use the memory-manager calls of the VMM.

use core::arch::asm;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicU64, Ordering};

use cowlab_abi::layout::{DOORBELL_VA, PAGE_SIZE, USER_END, USER_MIN_ADDR};
use cowlab_abi::{prot, Hypercall, Program, MADV_DONTNEED, MPROTECT_DEFER_FLUSH};

use crate::rt::{self, area_read, hypercall, println};

/// Pages `hello` touches when no argument is given.
const HELLO_DEFAULT_PAGES: u64 = 16;

/// Entry of every vCPU, at CPL 3 on its user stack: runs the program the
/// VMM selected; never returns.
#[no_mangle]
pub extern "C" fn _start() -> ! {
    let program = Program::from_u64(area_read!(program));
    // A litmus thread does not announce itself: nothing reads a litmus
    // run's boot time, and the exit cost ~50 µs of every thread of every run.
    if program != Some(Program::Litmus) {
        hypercall(Hypercall::Booted, [0; 4]);
    }
    let id = area_read!(vcpu_id);
    let arg = area_read!(arg);
    match program {
        Some(Program::Hello) => hello(id, if arg == 0 { HELLO_DEFAULT_PAGES } else { arg }),
        Some(Program::Touch) => {
            let base = map(arg.max(1));
            println!("touch: {} pages at {base:#x}", arg.max(1));
            touch(base, arg);
        }
        Some(Program::DivZero) => divide_by_zero(),
        Some(Program::TripleFault) => triple_fault(),
        Some(Program::Loop) => loop {
            core::hint::spin_loop();
        },
        Some(Program::Segv) => {
            // SAFETY: a deliberate read of address 8, which is never mapped.
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
        Some(Program::BenchDoorbell) => bench(|| {
            for _ in 0..arg {
                // SAFETY: the doorbell page is mapped for the whole run; the
                // write is an exit the VMM answers (a Nop) before we go on.
                unsafe { write_volatile(DOORBELL_VA as *mut u32, Hypercall::Nop as u32) };
            }
        }),
        // The VMM gave this program the minimal #PF stub (FloorStubs).
        Some(Program::BenchTouch | Program::BenchTouchMinimal) => {
            let base = map(arg.max(1));
            bench(|| touch(base, arg))
        }
        Some(Program::BenchStore) => {
            let word = map(1) as *mut u64;
            // SAFETY: our own mapping; faulted in before the first mark so
            // the loop measures stores only.
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
        Some(Program::MmThreads) if arg >= USER_MIN_ADDR => mm_threads_worker(arg),
        Some(Program::MmThreads) => mm_threads(if arg == 0 { 2 } else { arg }),
        Some(Program::MprotectRo) => mprotect_ro(),
        Some(Program::MunmapAccess) => munmap_access(),
        Some(Program::MadviseZero) => madvise_zero(),
        Some(Program::BenchRefill) => {
            let base = map(arg.max(1));
            touch(base, arg);
            bench(|| {
                for p in 0..arg {
                    read(base, p, 0);
                }
            })
        }
        Some(Program::BenchShootdown) if (USER_MIN_ADDR..USER_END).contains(&arg) => wait_for(arg),
        Some(Program::BenchShootdown) => bench_shootdown(arg & 0xffff_ffff, arg >> 48),
        Some(Program::BenchFork) => bench_fork(arg.max(1)),
        Some(Program::ForkCow) => fork_cow(),
        Some(Program::Litmus) => crate::litmus::run(arg),
        Some(Program::CowVmsplice) => cow_vmsplice(),
        Some(Program::UffdWp) if arg >= USER_MIN_ADDR => uffd_handler(arg),
        Some(Program::UffdWp) => uffd_wp(),
        Some(Program::PinCoherent) => pin_coherent(),
        Some(Program::StaleTlb) if arg >= USER_MIN_ADDR => stale_tlb_writer(arg),
        Some(Program::StaleTlb) => stale_tlb(arg),
        None => rt::fail(format_args!(
            "vcpu {id}: unknown program {}",
            area_read!(program)
        )),
    }
    rt::exit(0)
}

/// Maps `pages` read-write pages, or fails the program.
fn map(pages: u64) -> u64 {
    match rt::mmap(pages * PAGE_SIZE, prot::READ | prot::WRITE) {
        Ok(addr) => addr,
        Err(e) => rt::fail(format_args!("mmap of {pages} pages failed: {e}")),
    }
}

/// Reads word `word` of page `page` at `base`.
fn read(base: u64, page: u64, word: u64) -> u64 {
    // SAFETY: callers only pass addresses of their own mappings; a wrong
    // one faults and the VMM reports it.
    unsafe { read_volatile((base + page * PAGE_SIZE + word * 8) as *const u64) }
}

/// Writes word `word` of page `page` at `base`.
fn write(base: u64, page: u64, word: u64, v: u64) {
    // SAFETY: as for `read`.
    unsafe { write_volatile((base + page * PAGE_SIZE + word * 8) as *mut u64, v) }
}

/// A word of shared memory used as an atomic.
fn atomic(addr: u64) -> &'static AtomicU64 {
    // SAFETY: an aligned word of a mapping that lives until the program
    // exits; all accesses to it are atomic.
    unsafe { &*(addr as *const AtomicU64) }
}

/// Spins until the word at `addr` is nonzero.
fn wait_for(addr: u64) {
    while atomic(addr).load(Ordering::Acquire) == 0 {
        core::hint::spin_loop();
    }
}

/// The value `hello` stores in page `page` of vCPU `id`.
fn pattern(id: u64, page: u64) -> u64 {
    0xc0ff_ee00_0000_0000 ^ (id << 32) ^ page
}

/// Maps `pages` fresh pages, checks they read as zero, writes a pattern at
/// both ends of each, reads everything back and prints one line.
fn hello(id: u64, pages: u64) {
    let base = map(pages);
    let last = PAGE_SIZE / 8 - 1;
    for p in 0..pages {
        for w in [0, last] {
            let before = read(base, p, w);
            if before != 0 {
                rt::fail(format_args!(
                    "vcpu {id}: fresh page {p} word {w} reads {before:#x}, not 0"
                ));
            }
            write(base, p, w, pattern(id, p) ^ w);
        }
    }
    for p in 0..pages {
        for w in [0, last] {
            let got = read(base, p, w);
            if got != pattern(id, p) ^ w {
                rt::fail(format_args!(
                    "vcpu {id}: page {p} word {w} reads {got:#x}, wrote {:#x}",
                    pattern(id, p) ^ w
                ));
            }
        }
    }
    println!("hello from vcpu {id}: {pages} fresh pages at {base:#x} read as zero, written and read back");
}

/// Writes one word to each of `pages` pages at `base`.
fn touch(base: u64, pages: u64) {
    for p in 0..pages {
        write(base, p, 0, p + 1);
    }
}

/// Spawns `n` threads running `hello` while this one keeps running.
fn spawn(id: u64, n: u64) {
    for _ in 0..n {
        let Some(child) = rt::spawn(Program::Hello, 0) else {
            rt::fail(format_args!("vcpu {id}: spawn refused"));
        };
        println!("vcpu {id} spawned vcpu {child}");
    }
}

/// Pages each `mm-threads` worker owns, and increments per worker.
const WORKER_PAGES: u64 = 8;
const WORKER_INCREMENTS: u64 = 10_000;

/// The main thread of `mm-threads`: page 0 of the region holds the shared
/// counter, then each worker's pages.
fn mm_threads(n: u64) {
    let base = map(1 + n * WORKER_PAGES);
    let mut ids = [0u64; 16];
    let n = n.min(ids.len() as u64);
    for i in 0..n {
        ids[i as usize] = rt::spawn(Program::MmThreads, base + 1 + i)
            .unwrap_or_else(|| rt::fail(format_args!("spawn of worker {i} refused")));
    }
    for (i, id) in ids.iter().take(n as usize).enumerate() {
        if rt::join(*id) != Some(0) {
            rt::fail(format_args!("worker {i} (vcpu {id}) did not exit cleanly"));
        }
    }
    let total = atomic(base).load(Ordering::Acquire);
    if total != n * WORKER_INCREMENTS {
        rt::fail(format_args!(
            "shared counter is {total}, expected {}",
            n * WORKER_INCREMENTS
        ));
    }
    for i in 0..n {
        for p in 0..WORKER_PAGES {
            let page = 1 + i * WORKER_PAGES + p;
            if read(base, page, 0) != (i << 8) | p || read(base, page, 511) != !((i << 8) | p) {
                rt::fail(format_args!("worker {i} page {p} holds the wrong data"));
            }
        }
    }
    println!(
        "mm-threads: {n} threads, {} private pages and a shared counter of {total}: ok",
        n * WORKER_PAGES
    );
}

/// A worker of `mm-threads`: writes its pages, bumps the shared counter.
fn mm_threads_worker(arg: u64) {
    let base = arg & !(PAGE_SIZE - 1);
    let i = (arg & (PAGE_SIZE - 1)) - 1;
    for p in 0..WORKER_PAGES {
        let page = 1 + i * WORKER_PAGES + p;
        write(base, page, 0, (i << 8) | p);
        write(base, page, 511, !((i << 8) | p));
        for _ in 0..WORKER_INCREMENTS / WORKER_PAGES {
            atomic(base).fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// Write, mprotect(PROT_READ), read, write: the last write is a SIGSEGV.
fn mprotect_ro() {
    let page = map(1);
    write(page, 0, 0, 7);
    if let Err(e) = rt::mprotect(page, PAGE_SIZE, prot::READ, 0) {
        rt::fail(format_args!("mprotect failed: {e}"));
    }
    let v = read(page, 0, 0);
    println!("mprotect-ro: page {page:#x} reads {v} after mprotect(PROT_READ); writing it");
    write(page, 0, 0, 8);
    rt::fail(format_args!("a write to a read-only page succeeded"));
}

/// Write, munmap, read: a SIGSEGV.
fn munmap_access() {
    let page = map(1);
    write(page, 0, 0, 7);
    if let Err(e) = rt::munmap(page, PAGE_SIZE) {
        rt::fail(format_args!("munmap failed: {e}"));
    }
    println!("munmap-access: unmapped {page:#x}; reading it");
    let v = read(page, 0, 0);
    rt::fail(format_args!("a read of an unmapped page returned {v}"));
}

/// Pages written, dropped with MADV_DONTNEED, read back as zero.
fn madvise_zero() {
    let pages = 4;
    let base = map(pages);
    for p in 0..pages {
        write(base, p, 0, 0x1234 + p);
        write(base, p, 511, 0x5678 + p);
    }
    if let Err(e) = rt::madvise(base, pages * PAGE_SIZE, MADV_DONTNEED) {
        rt::fail(format_args!("madvise failed: {e}"));
    }
    for p in 0..pages {
        let (a, b) = (read(base, p, 0), read(base, p, 511));
        if a != 0 || b != 0 {
            rt::fail(format_args!(
                "page {p} reads {a:#x}/{b:#x} after MADV_DONTNEED"
            ));
        }
    }
    println!("madvise-zero: {pages} pages read back as zero after MADV_DONTNEED");
}

/// Spins until shared word `i` is nonzero.
fn await_shared(i: u64) {
    while rt::shared_word(i).load(Ordering::Acquire) == 0 {
        core::hint::spin_loop();
    }
}

/// Basic COW after fork (selftests/mm/cow.c): the child keeps the old
/// contents after the parent writes, and the parent never sees the child's
/// write.
fn fork_cow() {
    let page = map(1);
    write(page, 0, 0, 0x11);
    let child = match rt::fork() {
        Ok(child) => child,
        Err(e) => rt::fail(format_args!("fork failed: {e}")),
    };
    if child == 0 {
        await_shared(0);
        let v = read(page, 0, 0);
        if v != 0x11 {
            rt::fail(format_args!(
                "child sees {v:#x}: the parent's write leaked into the child"
            ));
        }
        write(page, 0, 0, 0x22);
        rt::shared_word(1).store(1, Ordering::Release);
        println!("fork-cow child: kept {v:#x} after the parent's write, wrote 0x22");
        return;
    }
    write(page, 0, 0, 0x33);
    rt::shared_word(0).store(1, Ordering::Release);
    await_shared(1);
    let v = read(page, 0, 0);
    if v != 0x33 {
        rt::fail(format_args!(
            "parent sees {v:#x}: the child's write leaked into the parent"
        ));
    }
    if rt::join(child) != Some(0) {
        rt::fail(format_args!("the child (vcpu {child}) failed"));
    }
    write(page, 0, 0, 0x44);
    println!("fork-cow parent: child {child} exited, parent kept {v:#x} and wrote again");
}

/// Fails the program with `what` if `r` is an error.
fn check<T>(r: Result<T, i64>, what: &str) -> T {
    r.unwrap_or_else(|e| rt::fail(format_args!("{what} failed: {e}")))
}

/// cow.c "vmsplice() + unmap in child": what the child's vmsplice reference
/// sees after the parent writes its side of the COW page. vmsplice takes
/// ordinary references (FOLL_GET: vmsplice_to_pipe() → iov_iter_get_pages2()
/// → get_user_pages_fast()), not pins, and without FOLL_WRITE.
fn cow_vmsplice() {
    let page = map(1);
    write(page, 0, 0, 0x11);
    let child = check(rt::fork(), "fork");
    if child == 0 {
        // Flags 0: FOLL_GET (no gup::PIN) without FOLL_WRITE, as vmsplice.
        let reference = check(rt::pin(page, 0), "vmsplice (FOLL_GET)");
        check(rt::munmap(page, PAGE_SIZE), "munmap");
        rt::shared_word(0).store(1, Ordering::Release);
        await_shared(1);
        let v = rt::dma_read(reference, 0);
        check(rt::unpin(reference), "put_page");
        println!("cow-vmsplice: the child's reference reads {v:#x} after the parent wrote 0x22");
        return;
    }
    await_shared(0);
    write(page, 0, 0, 0x22);
    rt::shared_word(1).store(1, Ordering::Release);
    if rt::join(child) != Some(0) {
        rt::fail(format_args!("the child failed"));
    }
}

/// A write to a uffd-wp page waits until the handler thread unprotects it.
fn uffd_wp() {
    let page = map(1);
    write(page, 0, 0, 1);
    check(rt::uffd_register(page, PAGE_SIZE), "uffd register");
    check(rt::uffd_wp(page, PAGE_SIZE, true), "uffd protect");
    let Some(handler) = rt::spawn(Program::UffdWp, page) else {
        rt::fail(format_args!("spawn refused"));
    };
    write(page, 0, 0, 2);
    if rt::join(handler) != Some(0) || read(page, 0, 0) != 2 {
        rt::fail(format_args!("the write did not complete after the handler"));
    }
    println!("uffd-wp: the write to {page:#x} waited for the handler and then landed");
}

/// The handler thread of `uffd-wp`: one event, then unprotect.
fn uffd_handler(page: u64) {
    let fault = rt::uffd_wait();
    if fault != page {
        rt::fail(format_args!("wp fault at {fault:#x}, expected {page:#x}"));
    }
    println!("uffd-wp handler: write-protect fault at {fault:#x}; unprotecting");
    check(rt::uffd_wp(page, PAGE_SIZE, false), "uffd unprotect");
}

/// cow.c "R/O-mapping a page registered as iouring fixed buffer".
fn pin_coherent() {
    use cowlab_abi::gup::{LONGTERM, PIN, WRITE};
    let page = map(1);
    write(page, 0, 0, 1);
    let pin = check(rt::pin(page, WRITE | PIN | LONGTERM), "write pin");
    check(rt::dma_write(pin, 8, 0x77), "dma write");
    if read(page, 0, 1) != 0x77 {
        rt::fail(format_args!("the page does not see the DMA write"));
    }
    check(rt::mprotect(page, PAGE_SIZE, prot::READ, 0), "mprotect R");
    check(
        rt::mprotect(page, PAGE_SIZE, prot::READ | prot::WRITE, 0),
        "mprotect RW",
    );
    write(page, 0, 0, 0x88);
    let v = rt::dma_read(pin, 0);
    check(rt::unpin(pin), "unpin");
    if v != 0x88 {
        rt::fail(format_args!(
            "the pin reads {v:#x}, the page holds 0x88: not coherent"
        ));
    }
    println!("pin-coherent: the pin and the page agree across mprotect (0x88)");
}

/// Flags of `stale-tlb`, words of the second page of its region.
const READY: u64 = 0;
const GO: u64 = 1;
const WROTE: u64 = 2;
const GO_AGAIN: u64 = 3;

/// The main thread of `stale-tlb`; `mode` 0 withholds the flush.
fn stale_tlb(mode: u64) {
    let base = map(2);
    let flag = |w: u64| base + PAGE_SIZE + w * 8;
    write(base, 0, 0, 1);
    let Some(writer) = rt::spawn(Program::StaleTlb, base | 1 | (mode << 1)) else {
        rt::fail(format_args!("spawn refused"));
    };
    wait_for(flag(READY));
    let flags = if mode == 0 { MPROTECT_DEFER_FLUSH } else { 0 };
    if let Err(e) = rt::mprotect(base, PAGE_SIZE, prot::READ, flags) {
        rt::fail(format_args!("mprotect failed: {e}"));
    }
    atomic(flag(GO)).store(1, Ordering::Release);
    if mode == 0 {
        wait_for(flag(WROTE));
        println!(
            "stale-tlb: after mprotect(PROT_READ) without a flush, the page holds {:#x}",
            read(base, 0, 0)
        );
        if let Err(e) = rt::flush_tlb(base, PAGE_SIZE) {
            rt::fail(format_args!("flush failed: {e}"));
        }
        atomic(flag(GO_AGAIN)).store(1, Ordering::Release);
    }
    if rt::join(writer).is_some() {
        rt::fail(format_args!(
            "the writer survived a write to a read-only page"
        ));
    }
    println!(
        "stale-tlb: after the flush the writer's write faulted; the page holds {:#x}",
        read(base, 0, 0)
    );
}

/// The writer thread of `stale-tlb`.
fn stale_tlb_writer(arg: u64) {
    let base = arg & !(PAGE_SIZE - 1);
    let mode = (arg >> 1) & 1;
    let flag = |w: u64| base + PAGE_SIZE + w * 8;
    write(base, 0, 0, 2);
    atomic(flag(READY)).store(1, Ordering::Release);
    wait_for(flag(GO));
    write(base, 0, 0, 0xbad1);
    atomic(flag(WROTE)).store(1, Ordering::Release);
    if mode == 0 {
        wait_for(flag(GO_AGAIN));
        write(base, 0, 0, 0xbad2);
    }
    rt::fail(format_args!(
        "a write to a read-only page succeeded after its flush"
    ));
}

/// `rounds` of write-protect + unprotect of a page, each write-protect a
/// shootdown to `others` spinning threads of this process.
fn bench_shootdown(rounds: u64, others: u64) {
    let base = map(1);
    let stop = base + 8;
    write(base, 0, 0, 1);
    let mut ids = [0u64; 4];
    for id in ids.iter_mut().take(others.min(4) as usize) {
        *id = rt::spawn(Program::BenchShootdown, stop)
            .unwrap_or_else(|| rt::fail(format_args!("spawn refused")));
    }
    bench(|| {
        for _ in 0..rounds {
            if rt::mprotect(base, PAGE_SIZE, prot::READ, 0).is_err()
                || rt::mprotect(base, PAGE_SIZE, prot::READ | prot::WRITE, 0).is_err()
            {
                rt::fail(format_args!("mprotect failed"));
            }
        }
    });
    atomic(stop).store(1, Ordering::Release);
    for id in ids.iter().take(others.min(4) as usize) {
        rt::join(*id);
    }
}

/// Touches `pages` pages between marks 5 and 6 (first-touch faults);
/// forks between marks 1 and 2; then, while the
/// child waits, writes each page once between marks 3 and 4 (each a COW
/// fault: the page is shared with the child). The child waits for the
/// parent to end in the VMM (`join`), not spinning: on a host with two
/// cores a spinning child took one from the parent's faults, which doubled
/// the mean COW fault on a loaded machine (the native baseline's child
/// sleeps in `pause()`).
fn bench_fork(pages: u64) {
    let base = map(pages);
    let parent = area_read!(vcpu_id);
    hypercall(Hypercall::Mark, [5, 0, 0, 0]);
    touch(base, pages);
    hypercall(Hypercall::Mark, [6, 0, 0, 0]);
    hypercall(Hypercall::Mark, [1, 0, 0, 0]);
    let child = check(rt::fork(), "fork");
    if child == 0 {
        if rt::join(parent) != Some(0) {
            rt::fail(format_args!("the parent (vcpu {parent}) failed"));
        }
        return;
    }
    hypercall(Hypercall::Mark, [2, 0, 0, 0]);
    hypercall(Hypercall::Mark, [3, 0, 0, 0]);
    for p in 0..pages {
        write(base, p, 1, p);
    }
    hypercall(Hypercall::Mark, [4, 0, 0, 0]);
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
            fixup = const cowlab_abi::area_offset::FIXUP_RIP,
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
    // SAFETY: the runtime service makes the #UD undeliverable; it never returns.
    unsafe { asm!("int {v}", v = const cowlab_abi::TRIPLE_FAULT_VECTOR, options(nomem, nostack)) };
}
