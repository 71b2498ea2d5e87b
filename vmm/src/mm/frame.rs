//! The pool of 4 KiB guest frames that data pages and page-table pages come from.

// A plain lock even under the checker: nothing inside it can wait or
// yield, so no interleaving happens within it.
use std::sync::{Mutex, MutexGuard};

use cowlab_abi::layout::PAGE_SIZE;

/// The guest ran out of frames: an OOM outcome for the faulting thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("out of guest frames")]
pub struct OutOfFrames;

/// A free list over the frames of `[start, end)`.
#[derive(Debug)]
pub struct FrameAllocator {
    start: u64,
    end: u64,
    free: Mutex<FreeList>,
}

#[derive(Debug)]
struct FreeList {
    list: Vec<u64>,
    /// By frame number from `start`: whether the frame is on `list`.
    is_free: Vec<bool>,
    /// Frames freed while already free (a bug elsewhere), the first one.
    double_frees: u64,
    first_double_free: Option<u64>,
}

impl FrameAllocator {
    /// A pool of every frame in `[start, end)` (both page-aligned).
    pub fn new(start: u64, end: u64) -> Self {
        assert!(start.is_multiple_of(PAGE_SIZE) && end.is_multiple_of(PAGE_SIZE) && start <= end);
        // Hand out low frames first: pop() takes from the back.
        let list: Vec<u64> = (start / PAGE_SIZE..end / PAGE_SIZE)
            .rev()
            .map(|pfn| pfn * PAGE_SIZE)
            .collect();
        let is_free = vec![true; list.len()];
        FrameAllocator {
            start,
            end,
            free: Mutex::new(FreeList {
                list,
                is_free,
                double_frees: 0,
                first_double_free: None,
            }),
        }
    }

    /// Takes a frame; its contents are unspecified.
    pub fn alloc(&self) -> Result<u64, OutOfFrames> {
        let mut f = self.lock();
        let pa = f.list.pop().ok_or(OutOfFrames)?;
        let i = ((pa - self.start) / PAGE_SIZE) as usize;
        f.is_free[i] = false;
        Ok(pa)
    }

    /// Returns a frame to the pool. A frame that is free already is not
    /// put on the list twice; it is counted (see [`FrameAllocator::double_frees`]).
    pub fn free(&self, pa: u64) {
        debug_assert!(self.contains(pa), "freeing foreign frame {pa:#x}");
        if !self.contains(pa) {
            return;
        }
        let mut f = self.lock();
        let i = ((pa - self.start) / PAGE_SIZE) as usize;
        if f.is_free[i] {
            f.double_frees += 1;
            f.first_double_free.get_or_insert(pa);
            return;
        }
        f.is_free[i] = true;
        f.list.push(pa);
    }

    /// How many frees found their frame free already, and the first such
    /// frame: a broken reference count elsewhere (`mm_verify` reports it).
    pub fn double_frees(&self) -> (u64, Option<u64>) {
        let f = self.lock();
        (f.double_frees, f.first_double_free)
    }

    /// Whether `pa` is a frame of this pool.
    pub fn contains(&self, pa: u64) -> bool {
        pa >= self.start && pa < self.end && pa.is_multiple_of(PAGE_SIZE)
    }

    /// Frames currently free.
    pub fn free_count(&self) -> usize {
        self.lock().list.len()
    }

    /// Frames in the pool.
    pub fn total(&self) -> usize {
        ((self.end - self.start) / PAGE_SIZE) as usize
    }

    fn lock(&self) -> MutexGuard<'_, FreeList> {
        // A panic while holding this lock cannot leave the list inconsistent.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}
