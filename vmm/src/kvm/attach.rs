//! What an outside driver (the control socket) hands a VM when it starts:
//! the gate that parks vCPUs, its rules and its observer of rules acting.
//! Defined here so that `kvm` needs nothing from the driver's module.

use std::sync::Arc;

use super::gate::Gate;
use crate::hooks::{Observer, Rule};

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
