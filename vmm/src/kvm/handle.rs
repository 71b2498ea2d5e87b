//! A weak hold on a running VM for the control socket ([`VmHandle`]).

use std::sync::Weak;

use super::shared::Shared;
use super::shootdown::request;
use crate::hooks;

/// A weak hold on a running VM, for the control socket: it can look at
/// the vCPUs and hooks, kick vCPUs to the control gate, and end the run.
#[derive(Clone)]
pub struct VmHandle(pub(super) Weak<Shared>);

/// What a vCPU is doing, as `query-status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuState {
    Running,
    /// Parked by the control gate (`stop`).
    Stopped,
    /// Held by a `pause` rule at this point.
    PausedAt(String),
    /// Waiting in the VMM: on a schedule step or a lock (why).
    Blocked(String),
    Ended,
}

impl VmHandle {
    /// The VM's vCPUs and what each is doing; `None` once the VM is gone.
    pub fn vcpus(&self) -> Option<Vec<VcpuState>> {
        let shared = self.0.upgrade()?;
        let paused = shared.machine.hooks.paused();
        let blocked = shared.machine.hooks.blocked();
        let parked = shared.gate.as_ref().map(|g| g.parked()).unwrap_or_default();
        let slots = shared.slots();
        Some(
            slots
                .iter()
                .enumerate()
                .map(|(id, slot)| {
                    if slot.ctl.has_ended() {
                        VcpuState::Ended
                    } else if let Some(p) = paused.get(&id) {
                        VcpuState::PausedAt(p.clone())
                    } else if parked.contains(&id) {
                        VcpuState::Stopped
                    } else if let Some(why) = blocked.get(&id) {
                        VcpuState::Blocked(why.clone())
                    } else {
                        VcpuState::Running
                    }
                })
                .collect(),
        )
    }

    /// Kicks every vCPU out of the guest so it looks at the control gate.
    pub fn kick_all(&self) {
        let Some(shared) = self.0.upgrade() else {
            return;
        };
        let count = shared.slots().len();
        for id in 0..count {
            shared.request(id, request::PARK);
        }
    }

    /// Runs `f` on the VM's hooks (rules, pauses), if the VM is still there.
    pub fn with_hooks<T>(&self, f: impl FnOnce(&hooks::Hooks) -> T) -> Option<T> {
        self.0.upgrade().map(|s| f(&s.machine.hooks))
    }

    /// Ends the run: every waiter goes free and every vCPU is stopped.
    pub fn stop_all(&self) {
        let Some(shared) = self.0.upgrade() else {
            return;
        };
        shared.stop_all();
    }
}
