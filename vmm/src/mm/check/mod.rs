//! The mm model under a concurrency checker made for Rust (shuttle).
//!
//! This module compiles the model's own source files a second time
//! (`#[path]`), with [`sync`] exporting shuttle's locks, condition
//! variable and atomics instead of `std`'s. Shuttle then runs the model's
//! threads one at a time and chooses, at every lock, atomic and explicit
//! `preempt()` point, which thread goes next: randomly, or with PCT's
//! priority changes, reproducibly from a printed schedule.
//!
//! A second copy rather than a cargo feature: `cargo test --workspace`
//! unifies features, so a feature turned on for the checker would also put
//! shuttle's primitives under the KVM layer's tests, which run outside
//! shuttle. The copy exists only in the test build.
//!
//! The harness ([`harness`]) and how to run it are described in
//! docs/reliability.md.

pub mod sync;

#[path = "../event_sleep.rs"]
pub mod event_sleep;
#[path = "../fault.rs"]
pub mod fault;
#[path = "../fork.rs"]
pub mod fork;
#[path = "../frame.rs"]
pub mod frame;
#[path = "../gup.rs"]
pub mod gup;
#[path = "../memory.rs"]
pub mod memory;
#[path = "../mm_struct.rs"]
pub mod mm_struct;
#[path = "../mmap.rs"]
pub mod mmap;
#[path = "../mremap.rs"]
pub mod mremap;
#[path = "../page.rs"]
pub mod page;
#[path = "../pagetable.rs"]
pub mod pagetable;
#[path = "../phys.rs"]
pub mod phys;
#[path = "../swap.rs"]
pub mod swap;
#[path = "../swapfile.rs"]
pub mod swapfile;
#[path = "../tlb.rs"]
pub mod tlb;
#[path = "../userfaultfd.rs"]
pub mod userfaultfd;
#[path = "../verify.rs"]
pub mod verify;

mod harness;
mod races;
