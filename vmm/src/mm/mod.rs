//! The memory manager of the guests (docs/design.md §5): Linux's anonymous
//! memory, modelled in pure Rust over a physical-memory abstraction
//! ([`PhysMem`]) and a CPU-flush interface ([`CpuFlusher`]). It knows
//! nothing about KVM, so host threads drive it in unit tests.
//!
//! `docs/mm.md` maps every modelled Linux function to its place here.

pub mod event_sleep;
pub mod fault;
pub mod fork;
pub mod frame;
pub mod gup;
pub mod memory;
pub mod mm_struct;
pub mod mmap;
pub mod mremap;
pub mod page;
pub mod pagetable;
pub mod phys;
pub mod swap;
pub mod swapfile;
pub mod sync;
pub mod tlb;
pub mod userfaultfd;
pub mod verify;

// The model again, on the concurrency checker's primitives (check/mod.rs
// says why a second copy): the duplicate modules are the point.
#[cfg(test)]
#[allow(dead_code, unused_imports, clippy::duplicate_mod)]
mod check;
#[cfg(test)]
mod tests;

pub use fault::{Access, FaultError};
pub use frame::{FrameAllocator, OutOfFrames};
pub use gup::{GupFlags, Pin};
pub use mm_struct::{prot, Machine, Mm, Vma};
pub use mmap::MmError;
pub use phys::PhysMem;
pub use tlb::{CpuFlusher, ShadowTlb};
pub use verify::{mm_verify, verify_no_leaks, verify_pages, verify_tlbs, Violation};
