//! `cowlab-native`: the native-Linux baselines cowlab's benchmarks compare
//! against, measured on this machine in the same run (docs/design.md §11).
//!
//! - first-touch anonymous fault, per page;
//! - fork of a process with N MiB of touched anonymous memory, per page;
//! - copy-on-write write fault in the parent after fork, per page.
//!
//! [`measure`] runs them in this process; the `cowlab-native MIB` binary
//! prints one JSON object: `{"pages": N, "first_touch_ns": …,
//! "fork_ns_per_page": …, "cow_fault_ns": …}`. `cowlab bench` runs the same
//! in a fresh single-threaded process of its own.

use std::time::Instant;

const PAGE: usize = 4096;

/// An anonymous private mapping, unmapped on drop.
struct Anon {
    ptr: *mut u8,
    len: usize,
}

impl Anon {
    fn new(len: usize) -> Result<Anon, String> {
        // SAFETY: a fresh anonymous mapping; checked for failure below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!(
                "mmap of {} MiB: {}",
                len >> 20,
                std::io::Error::last_os_error()
            ));
        }
        Ok(Anon {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Writes one byte to every page.
    fn touch(&self, value: u8) {
        for off in (0..self.len).step_by(PAGE) {
            // SAFETY: `off < len`, inside the mapping.
            unsafe { std::ptr::write_volatile(self.ptr.add(off), value) };
        }
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: the mapping created in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Nanoseconds per page of `f` over `pages` pages.
fn per_page(pages: usize, f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_nanos() as f64 / pages as f64
}

/// Per-page costs of a native process on this host, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Baseline {
    pub pages: usize,
    pub first_touch_ns: f64,
    pub fork_ns_per_page: f64,
    pub cow_fault_ns: f64,
}

impl Baseline {
    pub fn json(&self) -> String {
        format!(
            "{{\"pages\": {}, \"first_touch_ns\": {:.1}, \"fork_ns_per_page\": {:.1}, \"cow_fault_ns\": {:.1}}}",
            self.pages, self.first_touch_ns, self.fork_ns_per_page, self.cow_fault_ns
        )
    }
}

/// The most [`measure`] takes, in MiB (1 TiB): it touches the memory
/// twice (once more after fork), and the host decides whether it has it.
pub const MAX_MIB: usize = 1 << 20;

/// Touches `mib` MiB of fresh anonymous memory, forks (the child waits to
/// be killed), then writes every page again in the parent (COW faults).
/// Call it from a single-threaded process: fork copies only the caller.
/// An error if `mib` is 0 or above [`MAX_MIB`], or the host refuses the
/// mapping or the fork.
pub fn measure(mib: usize) -> Result<Baseline, String> {
    if !(1..=MAX_MIB).contains(&mib) {
        return Err(format!("takes 1 to {MAX_MIB} MiB, not {mib}"));
    }
    let pages = mib * (1 << 20) / PAGE;
    let mem = Anon::new(pages * PAGE)?;

    let first_touch = per_page(pages, || mem.touch(1));

    let mut child = 0;
    let fork = per_page(pages, || {
        // SAFETY: the child only sleeps in a pipe-less wait for its parent
        // to kill it; it touches nothing.
        child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: async-signal-safe calls only. The child dies with its
            // parent, so a killed benchmark leaves nothing behind.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                libc::pause();
                libc::_exit(0);
            }
        }
    });
    if child < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    let cow = per_page(pages, || mem.touch(2));
    // SAFETY: our own child.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        libc::waitpid(child, std::ptr::null_mut(), 0);
    }
    Ok(Baseline {
        pages,
        first_touch_ns: first_touch,
        fork_ns_per_page: fork,
        cow_fault_ns: cow,
    })
}
