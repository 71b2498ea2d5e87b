//! What an outside driver (the control socket) hands a VM when it starts:
//! the gate that parks vCPUs, its rules and its observer of rules acting.
//! Defined here so that `kvm` needs nothing from the driver's module, and
//! the runner of many VMs ([`RunObserver`]) nothing from the driver either.

use std::sync::Arc;

use super::gate::Gate;
use super::{Error, Event, VmConfig, VmHandle};
use crate::hooks::{Observer, Rule};
use crate::trace::Recorder;

/// What a VM takes from the controller when it starts.
#[derive(Clone)]
pub struct Attachment {
    pub gate: Arc<Gate>,
    /// Rules added through the socket, by id.
    pub rules: Vec<(u64, Rule)>,
    pub observer: Option<Observer>,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

/// An outside driver of a command's runs (the control socket's
/// `Controller`) as a runner of many VMs sees it: the runner (litmus)
/// reports to it and asks it, the CLI wires the two together, and
/// neither knows the other.
pub trait RunObserver: Send + Sync + std::fmt::Debug {
    /// Names what the command runs (`what` under `policy`, `runs` times).
    fn begin(&self, what: &str, policy: &str, runs: u64);
    /// Whether the driver asked to quit: the runner starts no further run.
    fn quit_requested(&self) -> bool;
    /// Fills in the driver's part of a VM about to start: its
    /// [`Attachment`], its trace and its policy overrides.
    fn configure(&self, config: &mut VmConfig) -> Result<(), Error>;
    /// Run `run` (1-based) started in the VM behind `vm`, configured with
    /// `attached`.
    fn attach(&self, vm: VmHandle, attached: &Attachment, run: u64);
    /// Something the VM reported (`Vm::wait`'s events).
    fn vm_event(&self, e: &Event);
    /// Run `run` ended: `outcome` is its summary, `end` its outcome as a
    /// trace's `RunEnd` codes it.
    fn detach(&self, run: u64, outcome: &str, end: u64);
    /// The driver's trace recorder, if a run is begun in it.
    fn open_trace(&self) -> Option<Arc<Recorder>>;
}
