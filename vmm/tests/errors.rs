//! A vCPU thread that panics (here by a `panic` rule, made for this) ends
//! in a VMM error at once: no hang, no lost message.

mod common;

use std::time::Duration;

use common::{cowlab_within, text};

/// Every command here finishes in seconds; one still running after this
/// is a hang (killed, and the test fails).
const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn a_panicking_vcpu_ends_a_program_run_in_an_error_not_a_hang() {
    let out = cowlab_within(
        &["run", "hello", "--inject", "panic@fault:enter/hit=1"],
        LIMIT,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("vcpu 0 (hello): VMM error: panicked: injected panic at fault:enter"),
        "{err}"
    );
    assert!(
        !err.contains("timeout"),
        "caught at once, not by the watchdog: {err}"
    );
}
