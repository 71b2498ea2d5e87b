//! The memory manager of the guests (DESIGN.md §5). Pure Rust over a
//! physical-memory abstraction ([`PhysMem`]); it knows nothing about KVM, so
//! host threads can drive it in unit tests.
//!
//! What is here so far: the frame pool, x86-64 page-table manipulation, the
//! per-vCPU shadow page tables that model TLBs (§4), and a demand-zero
//! address space. The Linux-style model (VMAs, COW, fork, GUP) replaces the
//! demand-zero space in the next step.

pub mod demand;
pub mod frame;
pub mod pagetable;
pub mod phys;
pub mod tlb;

pub use demand::{Access, DemandZero, FaultError};
pub use frame::{FrameAllocator, OutOfFrames};
pub use phys::PhysMem;
pub use tlb::ShadowTlb;
