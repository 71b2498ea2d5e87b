//! cowlab: a KVM micro-VM whose VMM is the memory manager of its guests.
//!
//! - [`kvm`]: VM, vCPU threads, boot, exits, kicks, interrupt injection.
//! - [`mm`]: the memory-manager model (frames, page tables, shadow TLBs).
//! - [`bench`]: measurements of the host's limits.
//! - [`cli`]: the commands of the `cowlab` binary, behind its argument parsing.

pub mod bench;
pub mod cli;
pub mod control;
pub mod cpu;
#[cfg(test)]
mod fuzz;
pub mod hooks;
pub mod kvm;
pub mod litmus;
pub mod mm;
pub mod native;
pub mod policy;
pub mod trace;
