//! The one helper module of the integration tests (docs/design.md §11):
//! run the binary within a deadline and read its output, run a litmus
//! source from a temporary file (this file); guard every child process so
//! that a failing test kills it (`child`); boot a VM through the library
//! with `mm_verify` on (`vm`).
#![allow(dead_code)] // each test file uses its own subset

use std::process::{Command, Output};

mod child;
pub mod sinks;
pub mod vm;
#[allow(unused_imports)] // not every test file starts children
pub use child::Running;

/// Runs `cowlab ARGS` to completion.
pub fn cowlab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cowlab"))
        .args(args)
        .output()
        .expect("run cowlab")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Writes `src` to a litmus file named after `name` and runs `cowlab run`
/// on it with `extra` flags.
pub fn run_litmus_src(name: &str, src: &str, extra: &[&str]) -> Output {
    let path = std::env::temp_dir().join(format!("cowlab-{}-{name}.litmus", std::process::id()));
    std::fs::write(&path, src).unwrap();
    let mut args = vec!["run", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = cowlab(&args);
    let _ = std::fs::remove_file(&path);
    out
}

/// Parses `out`'s stdout as the one JSON object it must be (`what` names
/// the command in the panic).
pub fn json_of(what: &str, out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: not one JSON object ({e}): stdout {:?} stderr {:?}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })
}

/// Runs `cowlab ARGS --json`: the exit status and the one JSON object.
pub fn cowlab_json(args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut args = args.to_vec();
    args.push("--json");
    let out = cowlab(&args);
    (out.status.code(), json_of(&format!("{args:?}"), &out))
}

/// [`run_litmus_src`] with `--json`: the exit status and the JSON object.
pub fn litmus_json(name: &str, src: &str, extra: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut extra = extra.to_vec();
    extra.push("--json");
    let out = run_litmus_src(name, src, &extra);
    (out.status.code(), json_of(name, &out))
}

/// Runs `cowlab ARGS` to completion within `limit`; if it is still running
/// then, kills it and fails (a hang is a failure, not a wait). Waits on its
/// output closing, not by polling.
pub fn cowlab_within(args: &[&str], limit: std::time::Duration) -> Output {
    use std::process::Stdio;
    let child = Command::new(env!("CARGO_BIN_EXE_cowlab"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cowlab");
    Running::new(child, format!("cowlab {args:?}")).output_within(limit)
}
