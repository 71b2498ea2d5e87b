//! The `cowlab` binary as a user runs it: output and exit codes.

mod common;

use std::process::Command;

use common::{cowlab, run_litmus_src, text};

#[test]
fn hello_on_two_vcpus_prints_two_lines_and_exits_0() {
    let out = cowlab(&["run", "hello", "--vcpus", "2"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(
        stdout.contains("hello from vcpu 0") && stdout.contains("hello from vcpu 1"),
        "{stdout}"
    );
}

#[test]
fn unknown_program_exits_2_and_lists_the_programs() {
    let out = cowlab(&["run", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("unknown program or test 'nope'") && err.contains("hello"),
        "{err}"
    );
    assert!(
        err.contains("cow-fork-basic"),
        "the built-in tests are listed too: {err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn bad_flags_exit_2() {
    for args in [
        &["run", "hello", "--bogus"][..],
        &["run", "hello", "--vcpus", "many"],
        &["run", "hello", "--vcpus", "0"],
        &["run", "hello", "--mem-mib", "1"],
        &["run", "hello", "--timeout", "-1"],
        &["frobnicate"],
    ] {
        let out = cowlab(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn missing_kvm_is_one_clear_line_and_exit_3() {
    let out = Command::new(env!("CARGO_BIN_EXE_cowlab"))
        .args(["run", "hello"])
        .env("COWLAB_KVM", "/nonexistent/kvm")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot open /nonexistent/kvm") && err.contains("KVM"),
        "{err}"
    );
}

#[test]
fn a_crash_exits_3_with_vector_rip_and_cr2() {
    let out = cowlab(&["run", "divzero"]);
    assert_eq!(out.status.code(), Some(3));
    let err = text(&out.stderr);
    assert!(
        err.contains("vector 0") && err.contains("RIP 0x7f80") && err.contains("CR2"),
        "{err}"
    );
}

#[test]
fn the_watchdog_exits_3_and_names_the_stuck_vcpus() {
    let out = cowlab(&["run", "loop", "--vcpus", "2", "--timeout", "0.5"]);
    assert_eq!(out.status.code(), Some(3));
    let err = text(&out.stderr);
    assert!(
        err.contains("timeout after 0.5s: vcpu 0, vcpu 1 still running"),
        "{err}"
    );
}

#[test]
fn a_bad_guest_elf_exits_2() {
    let path = std::env::temp_dir().join(format!("cowlab-not-elf-{}", std::process::id()));
    std::fs::write(&path, b"not an elf").unwrap();
    let out = cowlab(&["run", "hello", "--guest", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("not an ELF"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn policies_are_listed_and_bad_names_or_values_exit_2() {
    let out = cowlab(&["list", "policies"]);
    assert_eq!(out.status.code(), Some(0));
    let table = text(&out.stdout);
    for name in [
        "mainline",
        "linux-6.4",
        "linux-5.7",
        "proposal-fork-coherent",
        "fb49c455323f",
        "cow_reuse",
    ] {
        assert!(table.contains(name), "{name} missing from:\n{table}");
    }
    let out = cowlab(&["run", "hello", "--policy", "linux-2.6"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("presets: mainline, linux-6.4"),
        "{}",
        text(&out.stderr)
    );
    let out = cowlab(&["run", "hello", "--set", "cow_reuse=sometimes"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("mapcount or refcount"));
    let out = cowlab(&["run", "hello", "--set", "nonsense"]);
    assert_eq!(out.status.code(), Some(2));
    let out = cowlab(&[
        "run",
        "hello",
        "--policy",
        "linux-5.7",
        "--set",
        "tlb_capacity=4",
        "--check",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn a_litmus_file_runs_and_prints_the_litmus7_shape() {
    let src = "cowlab add\n{ region buf 1 rw }\nP0 {\n  r1 = 2\n  r2 = r1 + 3\n  buf[5] = r2\n  r3 = buf[5]\n}\nexists (P0:r3 = 5)\nexpect mainline Always\n";
    let out = run_litmus_src("add", src, &["--runs", "3"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("3       *>P0:r3=5;"), "{stdout}");
    assert!(stdout.contains("Observation add Always 3 0"), "{stdout}");
    assert!(stdout.contains("Expect mainline Always: met"), "{stdout}");
}

#[test]
fn an_unmet_expectation_exits_1_and_json_says_so() {
    let src = "cowlab wrong\nP0 { r1 = 1 }\nexists (P0:r1 = 1)\nexpect mainline Never\n";
    let out = run_litmus_src("wrong", src, &["--runs", "2", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["observation"], "Always");
    assert_eq!(v["expectation"]["met"], false);
    assert_eq!(v["runs"], 2);
    assert_eq!(v["knobs"]["cow_reuse"], "refcount");
    assert_eq!(v["histogram"][0]["count"], 2);
}

#[test]
fn malformed_litmus_files_give_one_precise_error_and_exit_2() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "no-header",
            "P0 { r1 = 1 }\nexists (P0:r1 = 1)\n",
            "1:1: expected the header line 'cowlab NAME'",
        ),
        (
            "no-name",
            "cowlab\nP0 { }\nexists (true)\n",
            "1:7: expected a test name",
        ),
        (
            "bad-register",
            "cowlab t\nP0 { r12 = 1 }\nexists (true)\n",
            "2:6: register r12 is not available",
        ),
        (
            "unclosed-block",
            "cowlab t\nP0 { r1 = 1\n",
            "expected '}' to close the block",
        ),
        (
            "unknown-statement",
            "cowlab t\nP0 { frobnicate }\nexists (true)\n",
            "2:6: expected a statement, found 'frobnicate'",
        ),
        (
            "unknown-region",
            "cowlab t\nP0 { r1 = buf[0] }\nexists (true)\n",
            "2:11: unknown region 'buf' (regions: none)",
        ),
        (
            "region-index",
            "cowlab t\n{ region buf 1 rw }\nP0 { r1 = buf[600] }\nexists (true)\n",
            "3:11: word 600 is outside region 'buf'",
        ),
        (
            "bad-prot",
            "cowlab t\n{ region buf 1 rx }\nP0 { }\nexists (true)\n",
            "2:16: expected a protection (rw, r or none), found 'rx'",
        ),
        (
            "no-exists",
            "cowlab t\nP0 { r1 = 1 }\n",
            "expected an 'exists (…)' clause",
        ),
        (
            "bad-verdict",
            "cowlab t\nP0 { }\nexists (true)\nexpect mainline Often\n",
            "4:17: expected Never, Sometimes or Always, found 'Often'",
        ),
        (
            "no-child-block",
            "cowlab t\nP0 { fork C3 }\nexists (true)\n",
            "2:6: no block for thread 'C3'",
        ),
        (
            "wait-unforked",
            "cowlab t\nP0 { wait C0 }\nC0 { }\nexists (true)\n",
            "2:6: wait C0: this thread has not forked C0 before",
        ),
        (
            "exists-unknown-thread",
            "cowlab t\nP0 { }\nexists (P7:r1 = 1)\n",
            "exists names thread P7",
        ),
        (
            "bad-comparison",
            "cowlab t\nP0 { }\nexists (P0:r1 ? 1)\n",
            "3:15: expected a comparison",
        ),
        (
            "duplicate-thread",
            "cowlab t\nP0 { }\nP0 { }\nexists (true)\n",
            "3:1: thread P0 is defined twice",
        ),
        (
            "runs-zero",
            "cowlab t\nruns 0\nP0 { }\nexists (true)\n",
            "'runs' needs at least 1",
        ),
        (
            "runs-twice",
            "cowlab t\nruns 5\nruns 6\nP0 { }\nexists (true)\n",
            "a test has one 'runs' line",
        ),
        (
            "runs-not-a-number",
            "cowlab t\nruns many\nP0 { }\nexists (true)\n",
            "2:6: expected a number of runs",
        ),
        (
            "no-initial-thread",
            "cowlab t\nC0 { }\nexists (true)\n",
            "at least one initial thread",
        ),
        (
            "unterminated-description",
            "cowlab t\n\"about\n",
            "2:1: unterminated description",
        ),
        (
            "missing-separator",
            "cowlab t\nP0 { r1 = 1 r2 = 2 }\nexists (true)\n",
            "2:13: expected ';', a new line or '}'",
        ),
    ];
    for (name, src, want) in cases {
        let out = run_litmus_src(name, src, &["--runs", "1"]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert_eq!(err.lines().count(), 1, "{name}: one line: {err}");
        assert!(err.contains(want), "{name}: expected {want:?} in {err:?}");
    }
}

/// The shapes of ../shared/repro/make-deep-nesting.py and the region
/// reproducers, and the other hostile inputs of issue 14 that reach the
/// litmus front end: one clean line on stderr and exit 2, no abort.
#[test]
fn hostile_litmus_files_give_one_clean_line_and_exit_2() {
    let head = "cowlab t\n{ region buf 1 rw }\n";
    let deep_parens = format!(
        "{head}P0 {{ r1 = 1 }}\nexists {}P0:r1 = 1{}\n",
        "(".repeat(20_000),
        ")".repeat(20_000)
    );
    let deep_not = format!(
        "{head}P0 {{ r1 = 1 }}\nexists {}P0:r1 = 1\n",
        "~".repeat(25_000)
    );
    let deep_loops = format!(
        "{head}P0 {{ {}r1 = 1{} }}\nexists (P0:r1 = 1)\n",
        "loop 2 { ".repeat(12_000),
        " }".repeat(12_000)
    );
    let cases: &[(&str, &str, &str)] = &[
        ("deep-parens", &deep_parens, "4:72: nesting deeper than 64 levels"),
        ("deep-not", &deep_not, "4:72: nesting deeper than 64 levels"),
        ("deep-loops", &deep_loops, "3:580: nesting deeper than 64 levels"),
        (
            "region-pages-overflow",
            "cowlab t\n{ region buf 4503599627370496 rw }\nP0 { buf[0] = 1\n r1 = buf[0] }\nexists (P0:r1 = 1)",
            "2:3: region 'buf' of 4503599627370496 pages does not fit",
        ),
        (
            "regions-sum-overflow",
            "cowlab t\n{ region a 9223372036854775807 rw\n region b 9223372036854775807 rw }\nP0 { r1 = 1 }\nexists (P0:r1 = 1)",
            "2:3: region 'a' of 9223372036854775807 pages does not fit",
        ),
        (
            "unknown-preset",
            "cowlab t\nP0 { }\nexists (true)\nexpect linux-1.0 Never\n",
            "4:8: unknown policy 'linux-1.0' (presets: mainline, ",
        ),
        (
            "control-character",
            "cowlab t\nP0 { r1 = 1\u{1b}[2J }\nexists (true)\n",
            "2:12: character '\\u{1b}' is not allowed",
        ),
        (
            "bidi-override",
            "cowlab t\nP0 { }\nexists (true) # \u{202e}\n",
            "3:17: character '\\u{202e}' is not allowed",
        ),
        (
            // The BOM is skipped: the error is at the column a reader sees.
            "bom-then-error",
            "\u{feff}cowlab t\nP0 { é }\nexists (true)\n",
            "2:6: expected a statement, found 'é'",
        ),
    ];
    for (name, src, want) in cases {
        let out = run_litmus_src(name, src, &["--runs", "1"]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert_eq!(err.lines().count(), 1, "{name}: one line: {err}");
        assert!(err.contains(want), "{name}: expected {want:?} in {err:?}");
        assert!(
            !err.trim_end()
                .chars()
                .any(|c| c.is_control() || c == '\u{202e}'),
            "{name}: raw control characters in {err:?}"
        );
    }
    // A chain of 60,000 terms (the one that overflowed in Cond::clone) is
    // a valid test: it runs.
    let chain = format!(
        "{head}P0 {{ r1 = 1 }}\nexists ({})\n",
        vec!["P0:r1 = 1"; 60_000].join(" /\\ ")
    );
    let out = run_litmus_src("deep-and-chain", &chain, &["--runs", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Observation t Always 1 0"));
}

#[test]
fn builtin_tests_are_listed_and_the_basic_suite_meets_its_expectations() {
    let out = cowlab(&["list", "tests"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("cow-vmsplice-unmap"));
    // (suites seeds and cow, with their own run counts, are tests/suites.rs)
    let out = cowlab(&["suite", "basic", "--runs", "2", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["all_met"], true);
    assert!(v["results"].as_array().unwrap().len() >= 6);
    let out = cowlab(&["suite", "nosuch"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_examples_in_docs_litmus_md_run_as_written() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/litmus.md")).unwrap();
    let blocks: Vec<&str> = doc
        .split("```")
        .skip(1)
        .step_by(2)
        .filter(|b| b.trim_start().starts_with("cowlab "))
        .collect();
    assert!(blocks.len() >= 3, "the doc has its examples");
    for (i, src) in blocks.iter().enumerate() {
        let out = run_litmus_src(&format!("doc{i}"), src, &["--runs", "2"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "example {i}:\n{src}\n{}",
            text(&out.stderr)
        );
    }
}

#[test]
fn bench_json_has_the_native_comparison_the_ratios_and_litmus_rates() {
    // Tiny sizes: this checks the shape, not the numbers (timings are
    // never asserted).
    let out = cowlab(&[
        "bench",
        "--json",
        "--rounds",
        "1",
        "--iters",
        "50",
        "--sizes",
        "1",
        "--native-rounds",
        "1",
        "--litmus-runs",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in [
        "pf_forward_round_trip",
        "first_touch_fault",
        "first_touch_traced",
        "vm_start",
    ] {
        assert!(
            v["host_limits"][k]["median_us"].as_f64().unwrap() > 0.0,
            "{k}: {v}"
        );
    }
    let names: Vec<&str> = v["versus_native"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["first_touch_1MiB", "fork_1MiB", "cow_fault_1MiB"]);
    for r in v["versus_native"].as_array().unwrap() {
        assert!(r["native"]["median_us"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["ratio"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(
        v["ratios"]["first_touch_fault / pf_forward_round_trip"].is_f64(),
        "{v}"
    );
    let tests: Vec<&str> = v["litmus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["test"].as_str().unwrap())
        .collect();
    assert!(
        tests.contains(&"threads-counter") && tests.contains(&"fork-vma-lock"),
        "{tests:?}"
    );
    // The search of fork-vma-lock-bare, in interleavings/s and against
    // fork-vma-lock's forced runs/s.
    let explore = v["litmus"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["mode"] == "explore")
        .unwrap_or_else(|| panic!("no explore timing: {v}"));
    assert_eq!(explore["test"], "fork-vma-lock-bare", "{explore}");
    assert_eq!(explore["policy"], "linux-6.4", "{explore}");
    assert!(
        explore["interleavings_per_s"].as_f64().unwrap() > 0.0,
        "{explore}"
    );
    assert!(
        explore["vs_forced_runs_per_s"].as_f64().unwrap() > 0.0,
        "{explore}"
    );
    let out = cowlab(&["bench", "--sizes", "x"]);
    assert_eq!(out.status.code(), Some(2));
}
