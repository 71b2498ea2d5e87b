//! The pool of 4 KiB guest frames that data pages and page-table pages come from.

use std::sync::Mutex;

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
    free: Mutex<Vec<u64>>,
}

impl FrameAllocator {
    /// A pool of every frame in `[start, end)` (both page-aligned).
    pub fn new(start: u64, end: u64) -> Self {
        assert!(start.is_multiple_of(PAGE_SIZE) && end.is_multiple_of(PAGE_SIZE) && start <= end);
        // Hand out low frames first: pop() takes from the back.
        let free = (start / PAGE_SIZE..end / PAGE_SIZE)
            .rev()
            .map(|pfn| pfn * PAGE_SIZE)
            .collect();
        FrameAllocator {
            start,
            end,
            free: Mutex::new(free),
        }
    }

    /// Takes a frame; its contents are unspecified.
    pub fn alloc(&self) -> Result<u64, OutOfFrames> {
        self.lock().pop().ok_or(OutOfFrames)
    }

    /// Returns a frame to the pool.
    pub fn free(&self, pa: u64) {
        debug_assert!(self.contains(pa), "freeing foreign frame {pa:#x}");
        self.lock().push(pa);
    }

    /// Whether `pa` is a frame of this pool.
    pub fn contains(&self, pa: u64) -> bool {
        pa >= self.start && pa < self.end && pa.is_multiple_of(PAGE_SIZE)
    }

    /// Frames currently free.
    pub fn free_count(&self) -> usize {
        self.lock().len()
    }

    /// Frames in the pool.
    pub fn total(&self) -> usize {
        ((self.end - self.start) / PAGE_SIZE) as usize
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        // A panic while holding this lock cannot leave the Vec inconsistent.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_every_frame_once_then_fails() {
        let pool = FrameAllocator::new(0x1000, 0x4000);
        let mut got: Vec<u64> = (0..3).map(|_| pool.alloc().unwrap()).collect();
        assert_eq!(pool.alloc(), Err(OutOfFrames));
        got.sort();
        assert_eq!(got, vec![0x1000, 0x2000, 0x3000]);
        pool.free(0x2000);
        assert_eq!(pool.alloc(), Ok(0x2000));
    }
}
