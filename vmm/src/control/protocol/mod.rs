//! The control protocol: one request (a JSON value) in, one response out.
//! Requests are `{"execute": NAME, "arguments": {...}, "id": ANY}`;
//! responses `{"return": ...}` or `{"error": {"class", "desc"}}`, with the
//! request's `id` echoed. Shaped after QEMU's QMP.
//!
//! A request is read into a JSON tree that refuses duplicate keys at any
//! depth ([`request::Unique`]; serde_json alone keeps the last), then its members and
//! each command's arguments into typed structs (serde derive,
//! `deny_unknown_fields`) through [`request::Fields`], which words the errors as QMP
//! does: `parameter 'rule' is missing`, `unexpected parameter 'cpu'`,
//! `parameter 'vcpu': invalid type: …, expected …`.
//!
//! `request.rs` reads a request into typed structs, `execute.rs` runs it
//! against the [`Controller`], `response.rs` words what goes back.

mod execute;
mod request;
mod response;

use serde_json::{json, Value};

use super::Controller;
use execute::execute;
use request::parse;

pub(crate) use response::{generic, greeting};

/// The response to one request: `value` is the bytes of one JSON value.
pub(crate) fn respond(ctl: &Controller, value: &[u8]) -> Value {
    let (id, result) = match parse(value) {
        Ok((id, request)) => (id, execute(ctl, request)),
        Err((id, e)) => (id, Err(e)),
    };
    match result {
        Ok(v) => {
            let mut out = json!({ "return": v });
            if let Some(id) = id {
                out["id"] = id;
            }
            out
        }
        Err(e) => e.response(id),
    }
}

#[cfg(test)]
fn ask(ctl: &Controller, line: &str) -> Value {
    respond(ctl, line.as_bytes())
}

#[cfg(test)]
fn error_desc(v: &Value) -> String {
    v["error"]["desc"].as_str().unwrap_or_default().to_string()
}
