//! The `cowlab` binary as a user runs it: output and exit codes.

use std::process::{Command, Output};

fn cowlab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cowlab"))
        .args(args)
        .output()
        .expect("run cowlab")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

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
        err.contains("unknown program 'nope'") && err.contains("hello"),
        "{err}"
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
