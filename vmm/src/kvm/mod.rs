//! The KVM side of cowlab: the VM, vCPU threads, long-mode boot, exits,
//! kicks and interrupt injection. Knows nothing about copy-on-write; page
//! faults are handed to [`crate::mm`]. Nor does it know litmus or the
//! control socket: it boots a [`BootPlan`], parks vCPUs at a [`Gate`], and
//! runners talk to a driver through [`RunObserver`].
//!
//! - `vm`: creating a VM and waiting for its run; `config` what to boot;
//!   `boot` its memory set up; `shared` the state its vCPU threads share;
//!   `handle` the control socket's hold on it; `report` how runs end;
//!   `shell` what outlives a run when VMs are reused.
//! - `vcpu`: one vCPU's thread and `KVM_RUN` loop; `exit` decoding an
//!   exit and deciding what to do; `hypercall` the hypercall table;
//!   `area` the per-vCPU area (mailbox); `arch` long-mode state.
//! - `shootdown`: other threads' requests to a vCPU and TLB shootdowns;
//!   `kick` the signal that gets a vCPU out of `KVM_RUN`.
//! - `gate`, `attach`: what an outside driver hands a VM.

mod arch;
mod area;
mod attach;
mod boot;
mod config;
mod error;
mod exit;
mod gate;
mod handle;
mod hypercall;
mod kick;
mod loader;
mod memory;
mod plan;
mod report;
mod shared;
mod shell;
mod shootdown;
mod vcpu;
mod vm;

pub use attach::{Attachment, RunObserver};
pub use config::{VmConfig, CHAOS_MAX_DELAY, MIN_MEM_MIB};
pub use error::{Error, ImageError, MemoryError, SpawnError, VcpuError};
pub use gate::Gate;
pub use handle::{VcpuState, VmHandle};
pub use memory::GuestMem;
pub use plan::{BootPlan, PlanRegion};
pub use report::{exit_code, vector_name, Outcome, RunReport, VcpuReport};
pub use shell::{reuse_by_default, set_reuse_by_default};
pub use shootdown::request;
pub use vm::{Event, Vm};

/// The built-in guest, built by `build.rs` from `guest/`.
pub static GUEST_ELF: &[u8] = include_bytes!(env!("COWLAB_GUEST_ELF"));
