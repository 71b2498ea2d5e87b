//! The cowlab guest: a freestanding program that runs on every vCPU of a
//! cowlab VM, at CPL0 in the kernel half, touching user-half memory that the
//! VMM maps on demand (docs/design.md §2–§3).
#![no_std]
#![no_main]

mod litmus;
mod programs;
mod rt;
