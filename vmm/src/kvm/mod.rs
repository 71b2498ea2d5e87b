//! The KVM side of cowlab: the VM, vCPU threads, long-mode boot, exits,
//! kicks and interrupt injection. Knows nothing about copy-on-write; page
//! faults are handed to [`crate::mm`].

mod arch;
mod attach;
mod control;
mod gate;
mod kick;
mod loader;
mod memory;
mod plan;
mod vcpu;
mod vm;

pub use attach::{Attachment, RunObserver};
pub use control::request;
pub use gate::Gate;
pub use memory::GuestMem;
pub use plan::{BootPlan, PlanRegion};
pub use vcpu::{vector_name, Outcome, VcpuReport};
pub use vm::{exit_code, Event, RunReport, VcpuState, Vm, VmConfig, VmHandle, MIN_MEM_MIB};

/// The built-in guest, built by `build.rs` from `guest/`.
pub static GUEST_ELF: &[u8] = include_bytes!(env!("COWLAB_GUEST_ELF"));

/// Why a VM could not be created or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {path}: {source} (cowlab needs KVM: is the kvm module loaded, and may this user read and write {path}?)")]
    KvmUnavailable {
        path: String,
        source: kvm_ioctls::Error,
    },
    /// The path opened, but is not a KVM device cowlab can use.
    #[error("{path} is not a usable KVM device: {why}")]
    KvmUnusable { path: String, why: String },
    #[error("{op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("guest image: {0}")]
    Image(String),
    #[error("guest memory: {0}")]
    Memory(String),
    /// A run did not go as a measurement or driver needed.
    #[error("{0}")]
    Run(String),
}

impl Error {
    /// Whether no VM can be made with this KVM device at all (so no later
    /// run can do better).
    pub fn kvm_unusable(&self) -> bool {
        matches!(
            self,
            Error::KvmUnavailable { .. } | Error::KvmUnusable { .. }
        )
    }

    /// The CLI's exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) | Error::Image(_) => exit_code::USAGE,
            _ => exit_code::VM_ERROR,
        }
    }
}
