//! A demand-zero address space: every user page in range is a private zeroed
//! frame, allocated on first touch and shared by all threads of the VM.
//! This is the stand-in for Linux's anonymous memory until the VMA-based
//! model arrives.

use std::collections::HashMap;
use std::sync::Mutex;

use cowlab_abi::layout::{PAGE_SIZE, USER_END, USER_MIN_ADDR};
use cowlab_abi::pf_error;

use super::frame::{FrameAllocator, OutOfFrames};
use super::phys::PhysMem;
use super::tlb::user_pte;

/// The kind of access that faulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Fetch,
}

impl Access {
    /// Decodes the access from an x86 #PF error code.
    pub fn from_error_code(code: u64) -> Self {
        if code & pf_error::FETCH != 0 {
            Access::Fetch
        } else if code & pf_error::WRITE != 0 {
            Access::Write
        } else {
            Access::Read
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Fetch => "exec",
        }
    }
}

/// A fault the address space cannot resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    /// No mapping allows this access (the thread gets a SIGSEGV).
    #[error("segmentation fault")]
    Segv,
    /// No frame was left for the page or its tables.
    #[error("out of memory")]
    Oom,
}

impl From<OutOfFrames> for FaultError {
    fn from(_: OutOfFrames) -> Self {
        FaultError::Oom
    }
}

/// User pages of the VM, by page base.
#[derive(Debug, Default)]
pub struct DemandZero {
    pages: Mutex<HashMap<u64, u64>>,
}

impl DemandZero {
    pub fn new() -> Self {
        Self::default()
    }

    /// Resolves a user fault at `va`; returns the leaf entry a TLB may cache.
    pub fn handle_fault<M: PhysMem + ?Sized>(
        &self,
        mem: &M,
        frames: &FrameAllocator,
        va: u64,
        access: Access,
    ) -> Result<u64, FaultError> {
        if !(USER_MIN_ADDR..USER_END).contains(&va) || access == Access::Fetch {
            return Err(FaultError::Segv);
        }
        let base = va & !(PAGE_SIZE - 1);
        let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        let frame = match pages.get(&base) {
            Some(f) => *f,
            None => {
                let f = frames.alloc()?;
                mem.zero_frame(f);
                pages.insert(base, f);
                f
            }
        };
        Ok(user_pte(frame, true))
    }

    /// Number of user pages allocated so far.
    pub fn pages(&self) -> usize {
        self.pages.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::pagetable::bits;
    use crate::mm::phys::testing::VecMem;

    #[test]
    fn same_page_same_frame_and_out_of_range_is_segv() {
        let mem = VecMem::new(1 << 16);
        let frames = FrameAllocator::new(0x1000, 1 << 16);
        let space = DemandZero::new();
        let a = space
            .handle_fault(&mem, &frames, 0x40_0008, Access::Write)
            .unwrap();
        let b = space
            .handle_fault(&mem, &frames, 0x40_0ff8, Access::Read)
            .unwrap();
        assert_eq!(a & bits::ADDR_MASK, b & bits::ADDR_MASK);
        assert_eq!(space.pages(), 1);
        assert_eq!(
            space.handle_fault(&mem, &frames, 8, Access::Read),
            Err(FaultError::Segv)
        );
        assert_eq!(
            space.handle_fault(&mem, &frames, 0x40_0000, Access::Fetch),
            Err(FaultError::Segv)
        );
        assert_eq!(
            space.handle_fault(&mem, &frames, USER_END, Access::Read),
            Err(FaultError::Segv)
        );
    }

    #[test]
    fn exhausting_frames_is_oom() {
        let mem = VecMem::new(0x3000);
        let frames = FrameAllocator::new(0x1000, 0x3000);
        let space = DemandZero::new();
        for i in 0..2 {
            space
                .handle_fault(&mem, &frames, 0x40_0000 + i * PAGE_SIZE, Access::Write)
                .unwrap();
        }
        assert_eq!(
            space.handle_fault(&mem, &frames, 0x50_0000, Access::Write),
            Err(FaultError::Oom)
        );
    }
}
