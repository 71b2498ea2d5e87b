//! The types of a page fault: the access, the flags, the context the
//! handlers of mm/memory.c pass down (`struct vm_fault`) and the errors.

use super::sync::Ordering;

use cowlab_abi::pf_error;

use super::frame::OutOfFrames;
use super::mm_struct::{PtlGuard, Vma};
use super::pagetable::bits;
use super::phys::Word;

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

/// A fault the memory manager cannot resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    /// No VMA allows this access: the thread gets a SIGSEGV.
    #[error("segmentation fault")]
    Segv,
    /// No frame was left for the page or its tables: VM_FAULT_OOM.
    #[error("out of memory")]
    Oom,
    /// A write hit a userfaultfd write-protected page: the thread waits,
    /// with no lock held, for the handler to resolve `addr`, then retries
    /// (VM_FAULT_RETRY from handle_userfault()).
    #[error("userfaultfd write-protect fault")]
    Userfault(u64),
    /// The VM is stopping the thread while it waits for the userfaultfd
    /// handler (the fatal signal that ends handle_userfault()'s sleep).
    #[error("stopped while waiting for a userfaultfd handler")]
    Interrupted,
}

impl From<OutOfFrames> for FaultError {
    fn from(_: OutOfFrames) -> Self {
        FaultError::Oom
    }
}

/// The `FAULT_FLAG_*` bits the model uses (include/linux/mm_types.h:
/// enum fault_flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FaultFlags {
    /// FAULT_FLAG_WRITE: the access writes.
    pub write: bool,
    /// FAULT_FLAG_UNSHARE: a read fault that must leave this process a
    /// page of its own, for a read-only pin (c89357e27f20).
    pub unshare: bool,
}

impl FaultFlags {
    pub const READ: FaultFlags = FaultFlags {
        write: false,
        unshare: false,
    };
    pub const WRITE: FaultFlags = FaultFlags {
        write: true,
        unshare: false,
    };
    pub const UNSHARE: FaultFlags = FaultFlags {
        write: false,
        unshare: true,
    };

    /// The flags of a user access (a fetch never gets this far: the VMA
    /// check refuses it).
    pub fn from_access(access: Access) -> FaultFlags {
        if access == Access::Write {
            FaultFlags::WRITE
        } else {
            FaultFlags::READ
        }
    }
}

/// One page fault as the handlers below see it, threaded from
/// handle_mm_fault() down to wp_page_copy(). Models
/// include/linux/mm.h:struct vm_fault (its `vma`, `address`, `flags`,
/// `pte` and `orig_pte`; `cpu` is the faulting vCPU, which Linux knows as
/// `current`).
#[derive(Debug)]
pub(crate) struct VmFault<'a> {
    /// `vmf->vma`, held (per-VMA read lock or `mmap_lock`) by the caller.
    pub vma: &'a Vma,
    /// `vmf->address`: the faulting address, page-aligned.
    pub address: u64,
    /// `vmf->flags`.
    pub flags: FaultFlags,
    pub cpu: usize,
    /// `vmf->pte`: the leaf PTE's slot.
    pub pte: &'a Word,
    /// `vmf->orig_pte`: the PTE as read without the PTL.
    pub orig_pte: u64,
}

impl VmFault<'_> {
    /// The frame `orig_pte` maps.
    pub(super) fn frame(&self) -> u64 {
        self.orig_pte & bits::ADDR_MASK
    }

    /// Whether the PTE is still `orig_pte`. Models pte_same(ptep_get(vmf->pte),
    /// vmf->orig_pte): only meaningful under the PTL, hence `_ptl`.
    pub(super) fn pte_same(&self, _ptl: &PtlGuard<'_>) -> bool {
        self.pte.load(Ordering::Acquire) == self.orig_pte
    }

    /// Whether the PTE is (still) none. Models pte_none(ptep_get(vmf->pte))
    /// under the PTL.
    pub(super) fn pte_none(&self, _ptl: &PtlGuard<'_>) -> bool {
        self.pte.load(Ordering::Acquire) == 0
    }
}
