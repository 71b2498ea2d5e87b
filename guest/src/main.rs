//! The cowlab guest: a freestanding image loaded in the kernel half of
//! every cowlab VM. Its programs (and the litmus interpreter) run at CPL 3
//! on user memory that the VMM maps on demand; only the stubs of `rt` run
//! at CPL 0 (docs/design.md §2–§3, docs/architecture.md).
#![no_std]
#![no_main]

mod litmus;
mod programs;
mod rt;
