//! The guest runtime: exception stubs, hypercalls, console and the few libc
//! symbols the compiler expects.
//!
//! The program runs at CPL 3, natively. The only CPL-0 code is the assembly
//! stubs below, which the VMM's IDT points at; they touch only `rax`/`rdx`
//! (saved and restored, except on the way to `killed`) and their own IST
//! stacks, so they never clobber the interrupted thread's
//! SSE state and never fault on a user page. (On this host, PVM emulates
//! CPL-0 code instruction by instruction and cannot emulate SSE, so the
//! stubs must stay plain integer assembly.)

use core::arch::{asm, global_asm};
use core::fmt;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::Ordering;

use cowlab_abi::bytecode::SLEEPERS_WORD;
use cowlab_abi::event;
use cowlab_abi::layout::DOORBELL_VA;
use cowlab_abi::{
    area_offset as off, fault_result, Hypercall, VcpuArea, BOOT_HEADER_MAGIC, CONSOLE_LEN,
    FAULT_PORT, FLOOR_STUBS_MAGIC, HYPERCALL_PORT,
};

// Exception stubs. Vectors 8, 10-14, 17, 21, 29 and 30 push an error code;
// the others get a 0 pushed so every frame looks the same to `exc_common`.
global_asm!(
    r#"
    .section .text
    .macro EXC_NOERR i
    exc_stub_\i:
        push 0
        push \i
        jmp exc_common
    .endm
    .macro EXC_ERR i
    exc_stub_\i:
        push \i
        jmp exc_common
    .endm
    .irp i, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
        EXC_NOERR \i
    .endr
    .irp i, 8,10,11,12,13,14,17,21,29,30
        EXC_ERR \i
    .endr

    // Unhandled exception: report vector, error code, RIP, RSP and CR2 and
    // never return. Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS.
    exc_common:
        mov rax, [rsp]
        mov gs:[{crash_vector}], rax
        mov rax, [rsp + 8]
        mov gs:[{crash_error}], rax
        mov rax, [rsp + 16]
        mov gs:[{crash_rip}], rax
        mov rax, [rsp + 40]
        mov gs:[{crash_rsp}], rax
        mov rax, cr2
        mov gs:[{crash_cr2}], rax
        mov dx, {port}
        mov eax, {hc_crash}
        out dx, eax
        // Leave the stub for the killed routine at CPL 3 (never resumed
        // here otherwise). Frame after the two pushes: RIP, CS, RFLAGS, RSP, SS.
        add rsp, 16
    4:  mov rax, gs:[{kill_rip}]
        mov [rsp], rax
        mov qword ptr [rsp + 8], {user_cs}
        mov rax, gs:[{kill_rsp}]
        mov [rsp + 24], rax
        mov qword ptr [rsp + 32], {user_ss}
        iretq

    // Page fault: one exit, nothing else on the common path. The VMM reads
    // CR2 from the exit's registers and the error code and RIP from this
    // frame (layout::area::PF_FRAME), and answers in `fault.result`: 0
    // retries the access at once; anything else takes the slow path below.
    // Every emulated instruction costs ~0.5 µs here (docs/performance.md).
    // Stack: error code, RIP, CS, RFLAGS, RSP, SS.
    .global pf_stub
    pf_stub:
        out {fault_port}, al
        cmp qword ptr gs:[{fault_result}], 0
        jne 6f
        add rsp, 8
        iretq
    // Slow path: reload CR3 if a flush came with the reply, then retry,
    // resume at the fixup or leave for `killed`.
    6:  push rax
        test qword ptr gs:[{fault_result}], {flush}
        jz 1f
        mov rax, cr3
        mov cr3, rax
    1:  mov rax, gs:[{fault_result}]
        and rax, 0xff
        cmp rax, {fixup}
        je 2f
        cmp rax, {kill}
        jne 3f
        pop rax
        add rsp, 8
        jmp 4b
    2:  mov rax, gs:[{fixup_rip}]
        mov [rsp + 16], rax
        mov qword ptr gs:[{fixup_rip}], 0
    3:  pop rax
        add rsp, 8
        iretq

    // The smallest #PF stub that works (FloorStubs): the floor the stub
    // above is measured against. Only the bench-touch-minimal program
    // runs with it.
    pf_minimal_stub:
        out {fault_port}, al
        add rsp, 8
        iretq

    // TLB-flush interrupt: drop every non-global translation, then ack.
    .global flush_stub
    // A flush that arrives while we are here is answered through
    // `flush_again` (interrupts stay off in the stub): reload CR3 once more.
    flush_stub:
        push rax
        push rdx
        mov rax, cr3
        mov cr3, rax
        mov dx, {port}
        mov eax, {hc_flush_ack}
        out dx, eax
        cmp qword ptr gs:[{flush_again}], 0
        je 1f
        mov qword ptr gs:[{flush_again}], 0
        mov rax, cr3
        mov cr3, rax
    1:  pop rdx
        pop rax
        iretq

    // Runtime service for the triple-fault program: mark the #UD, #GP and
    // #DF gates of this vCPU's IDT not present, then raise #UD: its delivery
    // raises #GP, that one #DF, and the vCPU shuts down.
    .global triple_fault_stub
    triple_fault_stub:
        mov qword ptr gs:[{idt} + 6 * 16], 0
        mov qword ptr gs:[{idt} + 8 * 16], 0
        mov qword ptr gs:[{idt} + 13 * 16], 0
        ud2

    // The prebuilt libcore references the unwinder's personality routine
    // from its unwind tables even under panic=abort; nothing ever calls it.
    .global rust_eh_personality
    rust_eh_personality:
        ud2

    // The BootHeader (cowlab_abi), from which the VMM builds the IDT.
    .section .boot_header, "a"
    .balign 8
        .quad {magic}
        .quad pf_stub
        .quad flush_stub
        .quad triple_fault_stub
    .irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad exc_stub_\i
    .endr
        .quad cowlab_killed
    // FloorStubs, right after the BootHeader.
        .quad {floor_magic}
        .quad pf_minimal_stub
    .section .text
    "#,
    magic = const BOOT_HEADER_MAGIC,
    idt = const cowlab_abi::layout::area::IDT,
    crash_vector = const off::CRASH_VECTOR,
    crash_error = const off::CRASH_ERROR,
    crash_rip = const off::CRASH_RIP,
    crash_rsp = const off::CRASH_RSP,
    crash_cr2 = const off::CRASH_CR2,
    fault_result = const off::FAULT_RESULT,
    fixup_rip = const off::FIXUP_RIP,
    kill_rip = const off::KILL_RIP,
    kill_rsp = const off::KILL_RSP,
    kill = const fault_result::KILL,
    user_cs = const cowlab_abi::layout::selector::USER_CODE,
    user_ss = const cowlab_abi::layout::selector::USER_DATA,
    flush_again = const off::FLUSH_AGAIN,
    port = const HYPERCALL_PORT,
    hc_crash = const Hypercall::Crash as u32,
    fault_port = const FAULT_PORT,
    floor_magic = const FLOOR_STUBS_MAGIC,
    hc_flush_ack = const Hypercall::FlushAck as u32,
    flush = const fault_result::FLUSH_TLB,
    fixup = const fault_result::FIXUP,
);

/// This vCPU's [`VcpuArea`] (`GS.base`, set by the VMM).
pub fn area() -> *mut VcpuArea {
    let ptr: u64;
    // SAFETY: the VMM points GS.base at this vCPU's area, whose first field
    // is its own address; reading it has no side effect.
    unsafe { asm!("mov {}, gs:[0]", out(reg) ptr, options(nostack, readonly, preserves_flags)) };
    ptr as *mut VcpuArea
}

/// Reads a field of this vCPU's area that the VMM may change at any time.
macro_rules! area_read {
    ($($field:tt)+) => {
        // SAFETY: the area is mapped for the life of the vCPU and only
        // accessed with volatile operations.
        unsafe { ::core::ptr::read_volatile(::core::ptr::addr_of!((*$crate::rt::area()).$($field)+)) }
    };
}
pub(crate) use area_read;

/// Issues hypercall `nr` with `args`; returns `hcall.ret`.
pub fn hypercall(nr: Hypercall, args: [u64; 4]) -> u64 {
    let a = area();
    // SAFETY: the mailbox belongs to this vCPU; the doorbell write is the exit
    // the VMM answers before the guest continues, and volatile accesses are
    // not reordered with each other.
    unsafe {
        write_volatile(addr_of_mut!((*a).hcall.args), args);
        write_volatile(DOORBELL_VA as *mut u32, nr as u32);
        // Through GS again, not the pointer read before the exit: after a
        // fork the child resumes here with the parent's registers but its
        // own GS base.
        read_volatile(addr_of!((*area()).hcall.ret))
    }
}

/// A hypercall result as `Result`: negative values are `-errno`.
fn result(ret: u64) -> Result<u64, i64> {
    if (ret as i64) < 0 {
        Err(ret as i64)
    } else {
        Ok(ret)
    }
}

/// `mmap(NULL, len, prot, MAP_PRIVATE | MAP_ANONYMOUS)`.
pub fn mmap(len: u64, prot: u64) -> Result<u64, i64> {
    result(hypercall(Hypercall::Mmap, [0, len, prot, 0]))
}

/// `munmap(addr, len)`.
pub fn munmap(addr: u64, len: u64) -> Result<u64, i64> {
    result(hypercall(Hypercall::Munmap, [addr, len, 0, 0]))
}

/// `mprotect(addr, len, prot)`, with `flags` (`MPROTECT_DEFER_FLUSH`).
pub fn mprotect(addr: u64, len: u64, prot: u64, flags: u64) -> Result<u64, i64> {
    result(hypercall(Hypercall::Mprotect, [addr, len, prot, flags]))
}

/// `madvise(addr, len, advice)`.
pub fn madvise(addr: u64, len: u64, advice: u64) -> Result<u64, i64> {
    result(hypercall(Hypercall::Madvise, [addr, len, advice, 0]))
}

/// `mremap(addr, old_len, new_len, flags, new_addr)`. A `new_addr` that is
/// not page-aligned is EINVAL, as in Linux, checked here because the
/// hypercall carries the flags in its low bits.
pub fn mremap(
    addr: u64,
    old_len: u64,
    new_len: u64,
    flags: u64,
    new_addr: u64,
) -> Result<u64, i64> {
    const EINVAL: i64 = -22;
    use cowlab_abi::layout::PAGE_SIZE;
    if flags & cowlab_abi::mremap::FIXED != 0 && !new_addr.is_multiple_of(PAGE_SIZE) {
        return Err(EINVAL);
    }
    let packed = (new_addr & !(PAGE_SIZE - 1)) | (flags & (PAGE_SIZE - 1));
    result(hypercall(
        Hypercall::Mremap,
        [addr, old_len, new_len, packed],
    ))
}

/// Performs a TLB flush a deferred `mprotect` left pending.
pub fn flush_tlb(addr: u64, len: u64) -> Result<u64, i64> {
    result(hypercall(Hypercall::FlushTlb, [addr, len, 0, 0]))
}

/// Starts a thread (a vCPU in this address space) running `program(arg)`.
pub fn spawn(program: cowlab_abi::Program, arg: u64) -> Option<u64> {
    let id = hypercall(Hypercall::Spawn, [program as u64, arg, 0, 0]);
    (id != u64::MAX).then_some(id)
}

/// `fork()`: the child's vCPU id in the parent, 0 in the child.
pub fn fork() -> Result<u64, i64> {
    result(hypercall(Hypercall::Fork, [0; 4]))
}

/// Pins (or takes a reference on) the page at `addr`; a handle.
pub fn pin(addr: u64, flags: u64) -> Result<u64, i64> {
    result(hypercall(Hypercall::Pin, [addr, flags, 0, 0]))
}

/// Releases a pin handle.
pub fn unpin(handle: u64) -> Result<u64, i64> {
    result(hypercall(Hypercall::Unpin, [handle, 0, 0, 0]))
}

/// "DMA" read through a pin.
pub fn dma_read(handle: u64, offset: u64) -> u64 {
    hypercall(Hypercall::DmaRead, [handle, offset, 0, 0])
}

/// "DMA" write through a pin.
pub fn dma_write(handle: u64, offset: u64, value: u64) -> Result<u64, i64> {
    result(hypercall(Hypercall::DmaWrite, [handle, offset, value, 0]))
}

/// Registers a range for userfaultfd write-protect.
pub fn uffd_register(addr: u64, len: u64) -> Result<u64, i64> {
    result(hypercall(Hypercall::UffdRegister, [addr, len, 0, 0]))
}

/// Write-protects (`protect`) or unprotects a registered range.
pub fn uffd_wp(addr: u64, len: u64, protect: bool) -> Result<u64, i64> {
    result(hypercall(
        Hypercall::UffdWp,
        [addr, len, u64::from(protect), 0],
    ))
}

/// Waits for a userfaultfd wp fault; the faulting page.
pub fn uffd_wait() -> u64 {
    hypercall(Hypercall::UffdWait, [0; 4])
}

/// Word `i` of the page every process shares (cross-process events).
pub fn shared_word(i: u64) -> &'static core::sync::atomic::AtomicU64 {
    let va = cowlab_abi::layout::kernel_va(cowlab_abi::layout::SHARED_PAGE_PHYS) + (i % 512) * 8;
    // SAFETY: the shared page is mapped at this address in every address
    // space for the whole run and only accessed atomically.
    unsafe { &*(va as *const core::sync::atomic::AtomicU64) }
}

/// How many spin-loop rounds an `await` that may sleep spins before it
/// sleeps in the VMM: about a hypercall's round trip (~40 µs here), so
/// that an event that comes soon costs no exit, and one that does not
/// costs at most twice what waiting for it ideally would.
const AWAIT_SPIN: u32 = 512;

/// Sets shared event word `i` and, if a thread sleeps in the VMM on an
/// event ([`await_event_sleeping`]), wakes the sleepers
/// (`cowlab_abi::event` has the protocol).
pub fn signal_event(i: u64) {
    event::signal(shared_word(i), shared_word(SLEEPERS_WORD), || {
        hypercall(Hypercall::WakeEvents, [i, 0, 0, 0]);
    });
}

/// Waits until shared event word `i` is set: spins.
pub fn await_event(i: u64) {
    while shared_word(i).load(Ordering::Acquire) == 0 {
        core::hint::spin_loop();
    }
}

/// Waits until shared event word `i` is set: spins [`AWAIT_SPIN`] rounds,
/// then sleeps in the VMM until a [`signal_event`] wakes it.
pub fn await_event_sleeping(i: u64) {
    event::await_sleeping(
        shared_word(i),
        shared_word(SLEEPERS_WORD),
        AWAIT_SPIN,
        core::hint::spin_loop,
        || {
            hypercall(Hypercall::AwaitEvent, [i, 0, 0, 0]);
        },
    );
}

/// Waits for thread `id`; its exit status, `None` if it died otherwise.
pub fn join(id: u64) -> Option<u64> {
    let status = hypercall(Hypercall::Join, [id, 0, 0, 0]);
    (status != u64::MAX).then_some(status)
}

/// Copies `msg` into the console buffer and issues `nr` with its length.
fn console_hypercall(nr: Hypercall, msg: &[u8]) {
    let len = msg.len().min(CONSOLE_LEN);
    let a = area();
    for (i, b) in msg[..len].iter().enumerate() {
        // SAFETY: `i < CONSOLE_LEN`, inside this vCPU's console buffer.
        unsafe { write_volatile(addr_of_mut!((*a).console[i]), *b) };
    }
    hypercall(nr, [len as u64, 0, 0, 0]);
}

/// A console line formatted on the stack, sent with one hypercall.
pub struct Line {
    buf: [u8; CONSOLE_LEN],
    len: usize,
}

impl Line {
    pub const fn new() -> Self {
        Line {
            buf: [0; CONSOLE_LEN],
            len: 0,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(CONSOLE_LEN - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Prints one line on the VMM's console.
pub fn print_line(args: fmt::Arguments<'_>) {
    let mut line = Line::new();
    let _ = fmt::write(&mut line, args);
    console_hypercall(Hypercall::Console, line.as_bytes());
}

/// Reports a failed self-check; the thread ends with status 1.
pub fn fail(args: fmt::Arguments<'_>) -> ! {
    let mut line = Line::new();
    let _ = fmt::write(&mut line, args);
    console_hypercall(Hypercall::Fail, line.as_bytes());
    halt_forever()
}

/// Ends this thread with `status`.
pub fn exit(status: u64) -> ! {
    hypercall(Hypercall::Exit, [status, 0, 0, 0]);
    halt_forever()
}

fn halt_forever() -> ! {
    // The VMM never resumes a vCPU after Exit/Fail.
    loop {
        core::hint::spin_loop();
    }
}

/// `println!` for the guest console.
macro_rules! println {
    ($($arg:tt)*) => { $crate::rt::print_line(format_args!($($arg)*)) };
}
pub(crate) use println;

/// Where the VMM sends a thread it killed: tell it we are out of the stubs.
#[no_mangle]
extern "C" fn cowlab_killed() -> ! {
    hypercall(Hypercall::Killed, [0; 4]);
    halt_forever()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    fail(format_args!("guest panic: {info}"))
}

// The symbols the compiler expects from libc. Written with string
// instructions so the compiler cannot turn them back into calls to
// themselves.

/// # Safety
/// As C's `memcpy`.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and disjoint.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// As C's `memmove`.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forward copy is correct when dst does not start inside src.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: backward copy with the direction flag, restored afterwards.
    unsafe {
        asm!(
            "std", "rep movsb", "cld",
            inout("rcx") n => _,
            inout("rdi") dst.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack),
        );
    }
    dst
}

/// # Safety
/// As C's `memset`.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// As C's `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller guarantees both ranges are valid for `n` bytes.
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

/// # Safety
/// As C's `bcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
