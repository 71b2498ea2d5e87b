//! What goes back to a client: the greeting and the error responses, in
//! QMP's shape.

use serde_json::{json, Value};

use crate::control::{printable, ControlError};

/// The greeting a client gets on connecting.
pub(crate) fn greeting() -> Value {
    json!({
        "QMP": {
            "version": { "cowlab": env!("CARGO_PKG_VERSION") },
            "capabilities": [],
        }
    })
}

/// A failed command: QMP's error class and a description.
#[derive(Debug)]
pub(crate) struct CmdError {
    pub(super) class: &'static str,
    pub(super) desc: String,
}

pub(crate) fn generic(desc: impl Into<String>) -> CmdError {
    CmdError {
        class: "GenericError",
        desc: desc.into(),
    }
}

impl CmdError {
    /// The error response, with `id` echoed if the request had one. The
    /// description is made printable here, where every one is sent: the
    /// messages of the commands (a bad rule, an unknown knob) quote what
    /// the client sent, and none may carry its control characters on.
    pub(crate) fn response(&self, id: Option<Value>) -> Value {
        let desc = printable(&self.desc);
        let mut out = json!({ "error": { "class": self.class, "desc": desc } });
        if let Some(id) = id {
            out["id"] = id;
        }
        out
    }
}

/// A refusal of the controller's is a `GenericError` worded as its Display.
impl From<ControlError> for CmdError {
    fn from(e: ControlError) -> Self {
        generic(e.to_string())
    }
}
