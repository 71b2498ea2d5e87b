//! The results area of a native run: one `MAP_SHARED` mapping of a memfd
//! that cowlab creates, the run's processes inherit (it is their stdin)
//! and map, so every thread of every forked process publishes its end
//! there, and cowlab reads it even after killing the run. It also carries
//! the events of `signal`/`await` (words visible across fork) and the
//! test's source.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicU8, Ordering};

use cowlab_abi::bytecode::NR_REGS;

/// "cowlabNR" little-endian: a header cowlab wrote.
pub const MAGIC: u64 = 0x524e_6261_6c77_6f63;
/// Events of a test (as the compiler's limit).
pub const MAX_EVENTS: usize = cowlab_abi::bytecode::SLEEPERS_WORD as usize;
/// Threads and processes of one run, in all.
pub const MAX_SLOTS: usize = 256;
/// Bytes of a message (an error, the reason a run was not run).
pub const MSG: usize = 512;

/// Slot states.
pub const FREE: u32 = 0;
pub const RUNNING: u32 = 1;
pub const DONE: u32 = super::sys::STATE_DONE;
/// A fork or spawn that failed: the slot has no thread.
pub const NEVER: u32 = 3;

/// Slot statuses (valid once DONE).
pub const OK: u32 = 0;
pub const SEGV: u32 = super::sys::STATUS_SEGV;
pub const CRASHED: u32 = super::sys::STATUS_CRASHED;

/// One thread of the run: which block it runs, in which process, and how
/// it ended.
#[repr(C)]
pub struct Slot {
    pub state: AtomicU32,
    pub status: AtomicU32,
    /// Index of its block in `Test::threads`.
    pub block: AtomicU32,
    /// The process it runs in, set by the thread itself.
    pub pid: AtomicI32,
    /// 1 if it is the first thread of a forked process (`wait` reaps it).
    pub forked: AtomicU32,
    pub _pad: AtomicU32,
    /// `exit N`'s N (0 at the end of the block).
    pub code: AtomicU64,
    pub regs: [AtomicU64; NR_REGS],
}

/// A message written once (the first writer wins).
#[repr(C)]
pub struct Message {
    claimed: AtomicU32,
    len: AtomicU32,
    bytes: [AtomicU8; MSG],
}

impl Message {
    /// Writes `text` (cut to `MSG` bytes) unless a message is there.
    pub fn set(&self, text: &str) {
        if self
            .claimed
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let mut end = text.len().min(MSG);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        for (b, c) in self.bytes.iter().zip(&text.as_bytes()[..end]) {
            b.store(*c, Ordering::Relaxed);
        }
        self.len.store(end as u32, Ordering::Release);
    }

    pub fn get(&self) -> Option<String> {
        let len = (self.len.load(Ordering::Acquire) as usize).min(MSG);
        if len == 0 {
            return None;
        }
        let bytes: Vec<u8> = self.bytes[..len]
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// The header of the area; the test's source follows it.
#[repr(C)]
pub struct Area {
    pub magic: AtomicU64,
    pub src_len: AtomicU64,
    pub slots_used: AtomicU32,
    pub _pad: AtomicU32,
    /// Why the run could not be made (a setup failure in the run).
    pub error: Message,
    /// Why the run is not an outcome (MADV_PAGEOUT did not swap).
    pub not_run: Message,
    pub events: [AtomicU64; MAX_EVENTS],
    pub slots: [Slot; MAX_SLOTS],
}

/// Bytes of the area for a source of `src_len` bytes.
pub fn area_len(src_len: usize) -> usize {
    std::mem::size_of::<Area>() + src_len
}

impl Area {
    /// A slot for a new thread of block `block` in process `pid` (-1 for
    /// a process not yet forked), marked running; `None` when all are
    /// taken.
    pub fn alloc(&self, block: usize, pid: i32) -> Option<usize> {
        let i = self.slots_used.fetch_add(1, Ordering::AcqRel) as usize;
        if i >= MAX_SLOTS {
            self.slots_used.store(MAX_SLOTS as u32, Ordering::Release);
            return None;
        }
        let s = &self.slots[i];
        s.block.store(block as u32, Ordering::Relaxed);
        s.pid.store(pid, Ordering::Relaxed);
        s.state.store(RUNNING, Ordering::Release);
        Some(i)
    }

    /// The slots in use.
    pub fn used(&self) -> usize {
        (self.slots_used.load(Ordering::Acquire) as usize).min(MAX_SLOTS)
    }

    /// Whether every thread of the run (or, with `pid`, of that process)
    /// has ended.
    pub fn all_done(&self, pid: Option<i32>) -> bool {
        self.slots[..self.used()].iter().all(|s| {
            let st = s.state.load(Ordering::Acquire);
            st == DONE || st == NEVER || pid.is_some_and(|p| s.pid.load(Ordering::Acquire) != p)
        })
    }
}
