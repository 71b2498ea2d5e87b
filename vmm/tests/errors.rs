//! No run loses the others: a vCPU thread that panics (here by a `panic`
//! rule, made for this) or a VMM error ends its own run in the `error`
//! state; the other runs, the histogram and the JSON are still there, and
//! the command exits 3.

mod common;

use std::time::Duration;

use common::{cowlab_within, json_of, text};

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

/// fork-vma-lock under linux-6.4 is a witness in every run; P1 (vCPU 1),
/// which no other thread waits for, panics at its `hook go` in runs 2
/// and 3.
const PANIC_IN_RUNS_2_3: &[&str] = &[
    "run",
    "fork-vma-lock",
    "--policy",
    "linux-6.4",
    "--runs",
    "5",
    "--inject",
    "panic@guest:go/runs=2-3",
];

const PANIC_MSG: &str = "vcpu 1: panicked: injected panic at guest:go (panic@guest:go/runs=2-3)";

#[test]
fn runs_in_error_are_counted_and_the_others_kept() {
    let out = cowlab_within(PANIC_IN_RUNS_2_3, LIMIT);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}{}", text(&out.stderr));
    for line in [
        "Histogram (2 states)\n",
        "3       *>P0:r2=1;\n",
        "2       :>error;\n",
        "Positive: 3, Negative: 0, Errors: 2\n",
        // The verdict of the runs that finished holds; the exit status
        // still says that runs were lost.
        "Expect linux-6.4 Always: met\n",
        "Rule panic@guest:go/runs=2-3: matched 2, acted 2\n",
    ] {
        assert!(stdout.contains(line), "{line:?} in\n{stdout}");
    }
    let errors: Vec<&str> = stdout.lines().filter(|l| l.starts_with("Error")).collect();
    assert_eq!(errors.len(), 1, "one line per distinct message: {stdout}");
    assert!(
        errors[0].starts_with(&format!("Error (2 runs): {PANIC_MSG} (at ")),
        "{stdout}"
    );
}

#[test]
fn the_json_has_the_errors_by_message() {
    let mut args = PANIC_IN_RUNS_2_3.to_vec();
    args.push("--json");
    let out = cowlab_within(&args, LIMIT);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let v = json_of("run --json", &out);
    assert_eq!(v["runs"], 5, "{v}");
    assert_eq!(
        (v["positive"].as_u64(), v["negative"].as_u64()),
        (Some(3), Some(0))
    );
    let errors = v["errors"].as_object().unwrap();
    assert_eq!(errors.len(), 1, "{v}");
    let (msg, n) = errors.iter().next().unwrap();
    assert!(msg.starts_with(PANIC_MSG), "{msg}");
    assert_eq!(n, 2);
    let error_state = v["histogram"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["state"] == "error;")
        .unwrap_or_else(|| panic!("no error state: {v}"));
    assert_eq!(error_state["count"], 2);
    assert_eq!(error_state["witness"], false);
    assert_eq!(v["expectation"]["met"], true);
    assert_eq!(v["stuck"], 0);
}

#[test]
fn a_panic_holding_mmap_lock_neither_hangs_nor_loses_the_run() {
    // P2 panics in fork holding mmap_lock for write (its guard poisons the
    // lock as it unwinds): that address space is left alone. P0 then
    // waits forever for `forked`: the watchdog ends it, and the run is
    // counted in error and as stuck.
    let out = cowlab_within(
        &[
            "run",
            "fork-vma-lock",
            "--policy",
            "linux-6.4",
            "--runs",
            "3",
            "--timeout",
            "1",
            "--inject",
            "panic@fork:enter/run=2",
            "--json",
        ],
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let v = json_of("run --json", &out);
    assert_eq!(
        (v["runs"].as_u64(), v["positive"].as_u64()),
        (Some(3), Some(2))
    );
    assert_eq!(v["stuck"], 1, "{v}");
    let errors = v["errors"].as_object().unwrap();
    assert_eq!(errors.len(), 1, "{v}");
    assert!(
        errors.keys().all(|m| m.starts_with(
            "vcpu 2: panicked: injected panic at fork:enter (panic@fork:enter/run=2)"
        )),
        "{v}"
    );
}
