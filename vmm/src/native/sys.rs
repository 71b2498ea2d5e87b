//! The native runner's system-call layer: the only `unsafe` of
//! `crate::native`. Each function is one Linux interface a litmus statement
//! maps to (docs/native.md): anonymous mappings, the test's own loads and
//! stores, fork, futex-free waiting, vmsplice into a pipe (FOLL_GET),
//! io_uring fixed buffers (FOLL_PIN | FOLL_LONGTERM), userfaultfd
//! write-protect, /proc/self/pagemap, and the SIGSEGV handler that ends
//! only the faulting thread.

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU32, Ordering};

pub const PAGE_SIZE: u64 = 4096;

/// Why a pin, a reference or a userfaultfd was not taken.
#[derive(Debug)]
pub enum Refused {
    /// The kernel refused this page (EFAULT, ENOMEM, …): `-errno`, a
    /// result the test sees in its register, as in the model.
    Errno(u64),
    /// The mechanism itself is not available (io_uring disabled, no
    /// userfaultfd, out of descriptors): no outcome of the test, the run
    /// is in error.
    Unavailable(String),
}

fn unavailable(what: &str) -> impl Fn(io::Error) -> Refused + '_ {
    move |e| Refused::Unavailable(format!("{what}: {e}"))
}

/// `-errno` of the last failed call, as a litmus register holds it.
fn neg_errno() -> u64 {
    (-(io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EINVAL) as i64)) as u64
}

fn check(r: libc::c_long) -> Result<libc::c_long, u64> {
    if r < 0 {
        Err(neg_errno())
    } else {
        Ok(r)
    }
}

/// `mmap(addr, len, prot, MAP_PRIVATE | MAP_ANONYMOUS | flags)`: the
/// address, or `-errno`.
pub fn mmap_anon(addr: u64, len: u64, prot: u32, flags: i32) -> Result<u64, u64> {
    // SAFETY: a new anonymous mapping; MAP_FIXED_NOREPLACE (the only fixed
    // flag callers pass) never replaces an existing one.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len as usize,
            prot as i32,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(neg_errno())
    } else {
        Ok(p as u64)
    }
}

/// `mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)`.
pub fn mmap_shared(fd: RawFd, len: usize) -> io::Result<*mut u8> {
    // SAFETY: a new shared mapping of a file the caller owns; nothing is
    // replaced.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p.cast())
    }
}

/// `munmap(addr, len)`: 0 or `-errno`. A test may unmap its own memory;
/// its later accesses fault and end the thread (the point of munmap-segv).
pub fn munmap(addr: u64, len: u64) -> u64 {
    // SAFETY: the test's own address range; cowlab's memory is never at
    // a test address (regions are placed at fixed addresses far from the
    // heap, and `mmap` results are the test's).
    let r = unsafe { libc::munmap(addr as *mut libc::c_void, len as usize) };
    if r < 0 {
        neg_errno()
    } else {
        0
    }
}

/// `mprotect(addr, len, prot)`: 0 or `-errno`.
pub fn mprotect(addr: u64, len: u64, prot: u32) -> u64 {
    // SAFETY: as for `munmap`: the test's own range.
    let r = unsafe { libc::mprotect(addr as *mut libc::c_void, len as usize, prot as i32) };
    if r < 0 {
        neg_errno()
    } else {
        0
    }
}

/// `mremap(old, old_len, new_len, flags, new_addr)`: the mapping's new
/// address or `-errno`. `flags` are Linux's `MREMAP_*` bits.
pub fn mremap(old: u64, old_len: u64, new_len: u64, flags: i32, new_addr: u64) -> u64 {
    // SAFETY: as for `munmap`: the test's own ranges (a run is its own
    // process, so a test that moves memory it does not own hurts only
    // itself).
    let r = unsafe {
        libc::mremap(
            old as *mut libc::c_void,
            old_len as usize,
            new_len as usize,
            flags,
            new_addr as *mut libc::c_void,
        )
    };
    if r == libc::MAP_FAILED {
        neg_errno()
    } else {
        r as u64
    }
}

/// `madvise(addr, len, advice)`: 0 or `-errno`.
pub fn madvise(addr: u64, len: u64, advice: i32) -> u64 {
    // SAFETY: as for `munmap`: the test's own range.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, advice) };
    if r < 0 {
        neg_errno()
    } else {
        0
    }
}

/// A test's load of the word at `addr`.
pub fn load(addr: u64) -> u64 {
    // SAFETY: a test's own memory access: a fault is the point, and the
    // SIGSEGV handler turns it into the thread's `segv` end.
    unsafe { std::ptr::read_volatile(addr as *const u64) }
}

/// A test's store of `value` at `addr`.
pub fn store(addr: u64, value: u64) {
    // SAFETY: as for `load`.
    unsafe { std::ptr::write_volatile(addr as *mut u64, value) }
}

/// `fork()`: 0 in the child, the child's pid in the parent, or `-errno`.
pub fn fork() -> Result<i32, u64> {
    // SAFETY: glibc's fork resets its own locks (malloc) in the child; the
    // child only runs the interpreter of its block and `_exit`s, and the
    // locks of cowlab's own state are held across the fork by the caller.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        Err(neg_errno())
    } else {
        Ok(pid)
    }
}

/// `waitpid(pid, 0)`: whether it was reaped.
pub fn waitpid(pid: i32) -> bool {
    let mut status = 0;
    loop {
        // SAFETY: a plain system call on our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if r == pid {
            return true;
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return false;
        }
    }
}

/// Ends the process now, without running destructors or atexit handlers
/// (a forked child, or the run's first process when its threads are done).
pub fn exit_process(code: i32) -> ! {
    // SAFETY: _exit never returns and touches no Rust state.
    unsafe { libc::_exit(code) }
}

pub fn getpid() -> i32 {
    // SAFETY: a plain system call.
    unsafe { libc::getpid() }
}

/// The shared words of one thread's end (`super::shared::Slot`), as the
/// SIGSEGV handler publishes it.
pub struct SegvTarget {
    pub state: *const AtomicU32,
    pub status: *const AtomicU32,
}

thread_local! {
    /// This thread's slot words, or null for cowlab's own threads.
    static SEGV_TARGET: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

/// Makes a SIGSEGV (or SIGBUS) in this thread end it with `status`
/// published at `target`.
pub fn set_segv_target(target: SegvTarget) {
    SEGV_TARGET.with(|t| t.set((target.state as usize, target.status as usize)));
}

/// The thread's end as `segv_handler` writes it.
pub const STATUS_SEGV: u32 = 1;
pub const STATUS_CRASHED: u32 = 2;
pub const STATE_DONE: u32 = 2;

extern "C" fn segv_handler(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let (state, status) = SEGV_TARGET.with(|t| t.get());
    if state == 0 {
        // Not a test thread: cowlab itself crashed; die as it would have.
        // SAFETY: restoring the default action and returning re-raises
        // the fault, which now kills the process.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
        return;
    }
    let code = if sig == libc::SIGSEGV {
        STATUS_SEGV
    } else {
        STATUS_CRASHED
    };
    // SAFETY: the slot lives in the shared results mapping, mapped for the
    // life of the process; atomics are async-signal-safe.
    unsafe {
        (*(status as *const AtomicU32)).store(code, Ordering::Release);
        (*(state as *const AtomicU32)).store(STATE_DONE, Ordering::Release);
    }
    // SAFETY: the raw exit system call ends only this thread (not
    // exit_group); its stack and thread-locals are left behind, which the
    // end of the process reclaims.
    unsafe { libc::syscall(libc::SYS_exit, 0) };
}

/// Installs `segv_handler` for SIGSEGV and SIGBUS.
pub fn install_segv_handler() -> io::Result<()> {
    for sig in [libc::SIGSEGV, libc::SIGBUS] {
        // SAFETY: a zeroed sigaction is valid; the handler is
        // async-signal-safe (atomics and a system call).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = segv_handler as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// `memfd_create(name)` sized `len`.
pub fn memfd(name: &str, len: u64) -> io::Result<File> {
    let cname =
        std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a plain system call with a valid C string.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    Ok(file)
}

/// A `get`: the page at `page`, vmspliced into a pipe, which holds a
/// reference to it (vmsplice_to_pipe → iov_iter_get_pages2 →
/// get_user_pages_fast, FOLL_GET) until the pipe is closed.
pub struct SplicedPage {
    read: OwnedFd,
    _write: OwnedFd,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), u64> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } as libc::c_long)?;
    // SAFETY: two new descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl SplicedPage {
    /// vmsplice(2) of the page at `page`: the handle, or `-errno`
    /// (EFAULT for an unmapped page).
    pub fn new(page: u64) -> Result<SplicedPage, Refused> {
        let (read, write) = pipe()
            .map_err(|_| Refused::Unavailable(format!("pipe2: {}", io::Error::last_os_error())))?;
        let iov = libc::iovec {
            iov_base: page as *mut libc::c_void,
            iov_len: PAGE_SIZE as usize,
        };
        // SAFETY: the kernel reads the iovec; the page is the test's and
        // the kernel checks it (EFAULT).
        let n = check(unsafe { libc::vmsplice(write.as_raw_fd(), &iov, 1, 0) } as libc::c_long)
            .map_err(Refused::Errno)?;
        if n as u64 != PAGE_SIZE {
            return Err(Refused::Errno((-(libc::EFAULT as i64)) as u64));
        }
        Ok(SplicedPage {
            read,
            _write: write,
        })
    }

    /// The word at byte `offset` of the page as the pipe would hand it on:
    /// tee(2) duplicates the pipe's buffer (the same page reference) into
    /// a scratch pipe, which is read, so the handle can be read again.
    pub fn read_word(&self, offset: u64) -> u64 {
        let Ok((sr, sw)) = pipe() else {
            return u64::MAX;
        };
        // SAFETY: plain system calls on descriptors we own.
        let n = unsafe { libc::tee(self.read.as_raw_fd(), sw.as_raw_fd(), PAGE_SIZE as usize, 0) };
        if n as u64 != PAGE_SIZE {
            return u64::MAX;
        }
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let mut got = 0;
        while got < page.len() {
            // SAFETY: reads into the rest of `page`.
            let r = unsafe {
                libc::read(
                    sr.as_raw_fd(),
                    page[got..].as_mut_ptr().cast(),
                    page.len() - got,
                )
            };
            if r <= 0 {
                return u64::MAX;
            }
            got += r as usize;
        }
        word_at(&page, offset)
    }
}

fn word_at(page: &[u8], offset: u64) -> u64 {
    let o = offset as usize;
    match page.get(o..o.saturating_add(8)) {
        Some(b) if b.len() == 8 => u64::from_ne_bytes(b.try_into().unwrap_or([0xff; 8])),
        _ => u64::MAX,
    }
}

/// A `pin … write longterm`: the page registered as an io_uring fixed
/// buffer (io_sqe_buffers_register → pin_user_pages with FOLL_WRITE |
/// FOLL_PIN | FOLL_LONGTERM), the "device" being a memfd that fixed
/// reads and writes move the pinned page's bytes to and from.
pub struct FixedBuffer {
    ring: io_uring::IoUring,
    page: u64,
    file: File,
}

impl FixedBuffer {
    /// Registers the page at `page`: the handle, or `-errno`.
    pub fn new(page: u64) -> Result<FixedBuffer, Refused> {
        let errno =
            |e: io::Error| Refused::Errno((-(e.raw_os_error().unwrap_or(libc::EIO) as i64)) as u64);
        let ring = io_uring::IoUring::new(4).map_err(unavailable("io_uring_setup"))?;
        let iov = libc::iovec {
            iov_base: page as *mut libc::c_void,
            iov_len: PAGE_SIZE as usize,
        };
        // SAFETY: the kernel pins the page behind the iovec (checking it);
        // it stays registered until `Drop` unregisters it.
        unsafe { ring.submitter().register_buffers(&[iov]) }.map_err(errno)?;
        let file = memfd("cowlab-dma", PAGE_SIZE).map_err(unavailable("memfd_create"))?;
        Ok(FixedBuffer { ring, page, file })
    }

    /// One fixed read or write of `len` bytes at byte `offset` of the
    /// page and of the file; the completion's result.
    fn fixed(&mut self, write: bool, offset: u64, len: u32) -> i32 {
        let fd = io_uring::types::Fd(self.file.as_raw_fd());
        let buf = (self.page + offset) as *mut u8;
        let entry = if write {
            io_uring::opcode::WriteFixed::new(fd, buf, len, 0)
                .offset(offset)
                .build()
        } else {
            io_uring::opcode::ReadFixed::new(fd, buf, len, 0)
                .offset(offset)
                .build()
        };
        // SAFETY: the buffer is within the registered (pinned) page; the
        // entry completes before this returns (submit_and_wait).
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            return -libc::EBUSY;
        }
        if let Err(e) = self.ring.submit_and_wait(1) {
            return -e.raw_os_error().unwrap_or(libc::EIO);
        }
        self.ring
            .completion()
            .next()
            .map_or(-libc::EIO, |c| c.result())
    }

    /// The device reads the pinned page (IORING_OP_WRITE_FIXED into the
    /// file, as cow.c's io_uring tests do), then the word at `offset` of
    /// what it read.
    pub fn read_word(&mut self, offset: u64) -> u64 {
        if self.fixed(true, 0, PAGE_SIZE as u32) != PAGE_SIZE as i32 {
            return u64::MAX;
        }
        let mut page = vec![0u8; PAGE_SIZE as usize];
        if self.file.read_exact_at(&mut page, 0).is_err() {
            return u64::MAX;
        }
        word_at(&page, offset)
    }

    /// The device writes `value` at `offset` of the pinned page: the word
    /// goes into the file, then IORING_OP_READ_FIXED moves it into the
    /// page, through the pin, not the page table.
    pub fn write_word(&mut self, offset: u64, value: u64) -> u64 {
        if offset.checked_add(8).is_none_or(|end| end > PAGE_SIZE) {
            return (-(libc::EINVAL as i64)) as u64;
        }
        if self
            .file
            .write_all_at(&value.to_ne_bytes(), offset)
            .is_err()
        {
            return (-(libc::EIO as i64)) as u64;
        }
        let r = self.fixed(false, offset, 8);
        if r == 8 {
            0
        } else {
            r as i64 as u64
        }
    }
}

impl Drop for FixedBuffer {
    fn drop(&mut self) {
        // unpin_user_pages(): the ring itself goes with its descriptor.
        let _ = self.ring.submitter().unregister_buffers();
    }
}

// userfaultfd(2) ABI (include/uapi/linux/userfaultfd.h).
const UFFD_API: u64 = 0xaa;
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xc018_aa06;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// A userfaultfd with write-protect faults (and, where the kernel has it,
/// write-protection of pages not yet faulted in). It handles faults from
/// the kernel too (a GUP of a protected page), as a program's own
/// userfaultfd does; where only root may have that
/// (vm.unprivileged_userfaultfd = 0), user-mode faults only.
pub fn userfaultfd() -> Result<OwnedFd, Refused> {
    let wp = UFFD_FEATURE_PAGEFAULT_FLAG_WP;
    open_uffd(wp | UFFD_FEATURE_WP_UNPOPULATED, 0)
        .or_else(|_| open_uffd(wp, 0))
        .or_else(|_| open_uffd(wp | UFFD_FEATURE_WP_UNPOPULATED, UFFD_USER_MODE_ONLY))
        .or_else(|_| open_uffd(wp, UFFD_USER_MODE_ONLY))
        .map_err(|e| {
            Refused::Unavailable(format!(
                "userfaultfd with write-protect faults: errno {}",
                -(e as i64)
            ))
        })
}

/// A new userfaultfd with `features` (a failed UFFDIO_API leaves a
/// descriptor unusable, so each try opens its own).
fn open_uffd(features: u64, mode: libc::c_int) -> Result<OwnedFd, u64> {
    // SAFETY: a plain system call.
    let fd = check(unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | mode) })?;
    // SAFETY: a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: the ioctl reads and writes `api`, of the size its number
    // encodes.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } as libc::c_long)?;
    Ok(fd)
}

/// UFFDIO_REGISTER with UFFDIO_REGISTER_MODE_WP: 0 or `-errno`.
pub fn uffd_register(fd: RawFd, start: u64, len: u64) -> u64 {
    let mut reg = UffdioRegister {
        range: UffdioRange { start, len },
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    // SAFETY: the ioctl reads and writes `reg`, of the size its number
    // encodes.
    match check(unsafe { libc::ioctl(fd, UFFDIO_REGISTER, &mut reg) } as libc::c_long) {
        Ok(_) => 0,
        Err(e) => e,
    }
}

/// UFFDIO_WRITEPROTECT on (mode WP) or off (which wakes the faulting
/// threads): 0 or `-errno`.
pub fn uffd_writeprotect(fd: RawFd, start: u64, len: u64, on: bool) -> u64 {
    let mut wp = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode: if on { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
    };
    // SAFETY: the ioctl reads `wp`, of the size its number encodes.
    match check(unsafe { libc::ioctl(fd, UFFDIO_WRITEPROTECT, &mut wp) } as libc::c_long) {
        Ok(_) => 0,
        Err(e) => e,
    }
}

/// Reads uffd_msg until a page fault: its address (blocking).
pub fn uffd_read_fault(fd: RawFd) -> Result<u64, u64> {
    loop {
        let mut msg = [0u8; 32];
        // SAFETY: reads one uffd_msg (32 bytes) into `msg`.
        let n = unsafe { libc::read(fd, msg.as_mut_ptr().cast(), msg.len()) };
        if n < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(neg_errno());
        }
        if n as usize == msg.len() && msg[0] == UFFD_EVENT_PAGEFAULT {
            let addr = u64::from_ne_bytes(msg[16..24].try_into().unwrap_or([0; 8]));
            return Ok(addr);
        }
    }
}

/// /proc/self/pagemap's entries (present bit 63, swapped bit 62) of the
/// `pages` pages from `addr`.
pub fn pagemap(addr: u64, pages: u64) -> io::Result<Vec<u64>> {
    let f = File::open("/proc/self/pagemap")?;
    let mut buf = vec![0u8; pages as usize * 8];
    f.read_exact_at(&mut buf, addr / PAGE_SIZE * 8)?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

pub const PM_PRESENT: u64 = 1 << 63;
pub const PM_SWAP: u64 = 1 << 62;

/// `swapon(path, 0)` / `swapoff(path)`.
pub fn swapon(path: &std::path::Path, on: bool) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: plain system calls with a valid C string.
    let r = unsafe {
        if on {
            libc::swapon(c.as_ptr(), 0)
        } else {
            libc::swapoff(c.as_ptr())
        }
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `kill(-pgid, SIGKILL)`: every process of a run.
pub fn kill_group(pgid: i32) {
    if pgid > 0 {
        // SAFETY: a plain system call; a group already gone is ESRCH.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
}

/// Waits until the process behind `pidfd` ends or `timeout_ms` pass
/// (negative: no limit); whether it ended.
pub fn wait_pidfd(pidfd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one pollfd.
        let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return r > 0;
    }
}

/// `pidfd_open(pid)`.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: a plain system call.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The host kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    // SAFETY: a zeroed utsname is valid for uname to fill.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname fills `u`.
    if unsafe { libc::uname(&mut u) } < 0 {
        return "unknown".into();
    }
    // SAFETY: uname NUL-terminates its fields.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// A mapping of a run's results area (`super::shared::Area`), unmapped
/// when dropped.
pub struct AreaMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the area is atomics only; the mapping lives until drop.
unsafe impl Send for AreaMap {}
// SAFETY: as for Send.
unsafe impl Sync for AreaMap {}

impl AreaMap {
    /// Maps the area in `fd` (which must hold at least a header).
    pub fn map(fd: RawFd) -> io::Result<AreaMap> {
        // SAFETY: a zeroed stat is valid for fstat to fill.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat fills `st`.
        if unsafe { libc::fstat(fd, &mut st) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let len = st.st_size as usize;
        if len < std::mem::size_of::<super::shared::Area>() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a native results area",
            ));
        }
        Ok(AreaMap {
            ptr: mmap_shared(fd, len)?,
            len,
        })
    }

    pub fn area(&self) -> &super::shared::Area {
        // SAFETY: the mapping is page-aligned, at least the header's size,
        // zero-filled at creation (a valid state of its atomics) and lives
        // as long as `self`.
        unsafe { &*(self.ptr as *const super::shared::Area) }
    }

    /// The bytes after the header.
    pub fn tail(&self) -> &[u8] {
        let head = std::mem::size_of::<super::shared::Area>();
        // SAFETY: within the mapping; only cowlab writes these bytes,
        // before the run starts.
        unsafe { std::slice::from_raw_parts(self.ptr.add(head), self.len - head) }
    }

    /// Writes `bytes` after the header (cowlab, before the run starts).
    pub fn set_tail(&mut self, bytes: &[u8]) {
        let head = std::mem::size_of::<super::shared::Area>();
        let n = bytes.len().min(self.len - head);
        // SAFETY: within the mapping, which no other process maps yet.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(head), n) };
    }

    /// Keeps the mapping for the life of the process (a run's process).
    pub fn leak(self) -> &'static AreaMap {
        Box::leak(Box::new(self))
    }
}

impl Drop for AreaMap {
    fn drop(&mut self) {
        // SAFETY: our own mapping; no reference to it outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
