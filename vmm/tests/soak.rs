//! `cowlab soak`: a tiny soak as a user runs it, its table and exit status.

mod common;

use std::time::Duration;

use common::{cowlab, cowlab_within, json_of, text};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn a_tiny_soak_prints_a_row_per_cell_and_exits_0() {
    let out = cowlab_within(
        &[
            "soak",
            "--runs",
            "3",
            "--test",
            "fork-vma-lock-free",
            "--seed",
            "1",
        ],
        LIMIT,
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert!(
        lines[0].starts_with("Soak: 1 cell, 3 runs each from chaos seed 1"),
        "{stdout}"
    );
    let header: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "test",
            "policy",
            "runs",
            "witnesses",
            "violations",
            "errors",
            "stuck",
            "time"
        ]
    );
    // fork-vma-lock-free expects Never under mainline only.
    for (line, first) in [(lines[2], "fork-vma-lock-free"), (lines[3], "total")] {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[0], first, "{stdout}");
        let counts = if first == "total" {
            &cols[1..6]
        } else {
            assert_eq!(cols[1], "mainline", "{stdout}");
            &cols[2..7]
        };
        assert_eq!(counts, ["3", "0", "0", "0", "0"], "{stdout}");
        assert!(cols.last().unwrap().ends_with('s'), "{stdout}");
    }
}

#[test]
fn a_soak_with_a_run_in_error_says_so_and_exits_3() {
    // P2 panics at its first fork of run 2 (holding mmap_lock); the other
    // runs and threads go on.
    let out = cowlab_within(
        &[
            "soak",
            "--runs",
            "3",
            "--test",
            "fork-vma-lock-free",
            "--seed",
            "1",
            "--inject",
            "panic@fork:enter/hit=1/run=2",
            "--json",
        ],
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let v = json_of("soak --json", &out);
    assert_eq!(v["ok"], false);
    assert_eq!(v["seeds"], serde_json::json!([1]));
    let cells = v["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 1, "{v}");
    let c = &cells[0];
    assert_eq!(
        (c["test"].as_str(), c["policy"].as_str()),
        (Some("fork-vma-lock-free"), Some("mainline"))
    );
    assert_eq!(c["runs"], 3, "{c}");
    assert_eq!(
        (c["false_witnesses"].as_u64(), c["violations"].as_u64()),
        (Some(0), Some(0))
    );
    let errors = c["errors"].as_object().unwrap();
    assert_eq!(errors.len(), 1, "{c}");
    let (msg, n) = errors.iter().next().unwrap();
    assert!(
        msg.starts_with("vcpu 2: panicked: injected panic at fork:enter"),
        "{msg}"
    );
    assert_eq!(n, 1);
    assert_eq!(c["error_seeds"], serde_json::json!([2]), "run 2 of seed 1");
    assert_eq!(v["total"]["runs"], 3);
}

#[test]
fn bad_soak_input_is_one_line_and_exit_2() {
    for (args, want) in [
        (
            &["soak", "--test", "nosuch"][..],
            "unknown program or test 'nosuch'",
        ),
        (
            &["soak", "--test", "munmap-segv"],
            "munmap-segv expects Never under no preset: nothing to soak",
        ),
        (
            &[
                "soak",
                "--test",
                "fork-vma-lock-free",
                "--inject",
                "boom@fork:enter",
            ],
            "unknown action 'boom'",
        ),
        (
            &["soak", "--seed", "1", "--seeds", "2"],
            "cannot be used with",
        ),
        (
            &["soak", "--time", "0"],
            "--time takes 0.001 to 1000000 seconds, not '0'",
        ),
    ] {
        let out = cowlab(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {want:?} in {err}");
    }
}
