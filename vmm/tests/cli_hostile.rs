//! Hostile command lines (issue 14): each gets one `cowlab: …` line on
//! stderr and the documented exit status (README: 2 usage or input, 3 a
//! VM, KVM or output failure); nothing panics, hangs or reads without end.
//! Every command runs under a deadline and is killed if it outlives it.

mod common;

use std::io::Read;
use std::os::unix::ffi::OsStringExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::sinks::{closed_pipe, dev_full};
use common::{cowlab_within, json_of, text};

/// Every command here finishes in seconds; one still running after this
/// is a hang (killed, and the test fails).
const LIMIT: Duration = Duration::from_secs(60);

/// Asserts that `err` is one clear line: `cowlab: …` containing `want`.
fn one_line(what: &str, err: &str, want: &str) {
    assert_eq!(err.lines().count(), 1, "{what}: one line: {err:?}");
    assert!(
        err.starts_with("cowlab: ") && !err.contains("panicked"),
        "{what}: {err:?}"
    );
    assert!(err.contains(want), "{what}: {want:?} in {err:?}");
}

/// Runs `cowlab ARGS` and checks its status and one line of stderr.
fn refused(args: &[&str], status: i32, want: &str) {
    let out = cowlab_within(args, LIMIT);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(status), "{args:?}: {err}");
    one_line(&format!("{args:?}"), &err, want);
}

/// Runs `cowlab ARGS` with `stdout` as its standard output, within
/// [`LIMIT`] (killed if not): its status and stderr.
fn with_stdout(args: &[&str], stdout: Stdio) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cowlab"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cowlab");
    let mut err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        let _ = tx.send(b);
    });
    let Ok(stderr) = rx.recv_timeout(LIMIT) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("cowlab {args:?} still running after {LIMIT:?}: killed");
    };
    let status = child.wait().expect("wait for cowlab");
    (status.code(), text(&stderr))
}

/// A temporary path for this test process.
fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("cowlab-hostile-{}-{name}", std::process::id()))
}

#[test]
fn timeouts_out_of_range_are_refused_not_panics() {
    for t in [
        "1e300",
        "1e19",
        "18446744073709551615",
        "NaN",
        "inf",
        "-1",
        "0.0001",
        "soon",
    ] {
        refused(
            &["run", "hello", "--timeout", t],
            2,
            &format!("--timeout takes 0 (no watchdog) or 0.001 to 1000000 seconds, not '{t}'"),
        );
    }
    refused(
        &["soak", "--time", "1e300"],
        2,
        "--time takes 0.001 to 1000000 seconds, not '1e300'",
    );
    refused(
        &["soak", "--timeout", "0"],
        2,
        "--timeout takes 0.001 to 1000000 seconds",
    );
    refused(
        &["soak", "--seeds", "18446744073709551615"],
        2,
        "--seeds takes 1 to 1000000 batches",
    );
    // 0 is still no watchdog, and the maximum is taken.
    for t in ["0", "1000000"] {
        let out = cowlab_within(&["run", "hello", "--timeout", t], LIMIT);
        assert_eq!(out.status.code(), Some(0), "{t}: {}", text(&out.stderr));
    }
}

#[test]
fn runs_zero_is_refused_as_a_files_runs_0_is() {
    for args in [
        &["run", "cow-fork-basic", "--runs", "0"][..],
        &["suite", "basic", "--runs", "0"],
        &["soak", "--runs", "0"],
    ] {
        refused(args, 2, "--runs needs at least 1");
    }
}

#[test]
fn a_guest_elf_must_be_a_regular_file_under_64_mib() {
    refused(
        &["run", "hello", "--guest", "/dev/zero"],
        2,
        "--guest: cannot read /dev/zero: not a regular file",
    );
    let dir = std::env::temp_dir();
    refused(
        &["run", "hello", "--guest", dir.to_str().unwrap()],
        2,
        "a directory",
    );
    // Sparse: 65 MiB that take no disk.
    let big = temp("big.elf");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(65 << 20)
        .unwrap();
    let out = cowlab_within(&["run", "hello", "--guest", big.to_str().unwrap()], LIMIT);
    let _ = std::fs::remove_file(&big);
    assert_eq!(out.status.code(), Some(2));
    one_line(
        "65 MiB guest",
        &text(&out.stderr),
        "larger than the limit of 64 MiB",
    );
    // Other inputs are bounded too: a device is no trace or litmus file.
    refused(
        &["trace", "show", "/dev/zero"],
        2,
        "cannot read /dev/zero: not a regular file or a pipe",
    );
    refused(
        &["run", "/dev/zero"],
        2,
        "cannot read /dev/zero: not a regular file or a pipe",
    );
}

#[test]
fn a_device_that_is_not_kvm_is_exit_3_naming_it() {
    let want = "/dev/null is not a usable KVM device: KVM_GET_API_VERSION failed";
    for args in [
        &["run", "hello", "--kvm", "/dev/null"][..],
        &["run", "cow-fork-basic", "--runs", "2", "--kvm", "/dev/null"],
        &["suite", "basic", "--runs", "1", "--kvm", "/dev/null"],
    ] {
        refused(args, 3, want);
    }
}

#[test]
fn a_trace_that_cannot_be_written_is_exit_3() {
    refused(
        &["run", "hello", "--trace", "/dev/full"],
        3,
        "--trace /dev/full: No space left on device",
    );
    refused(
        &[
            "run",
            "cow-fork-basic",
            "--runs",
            "2",
            "--trace",
            "/dev/full",
        ],
        3,
        "--trace: No space left on device",
    );
    let path = temp("export.trace");
    let p = path.to_str().unwrap();
    let out = cowlab_within(&["run", "hello", "--trace", p], LIMIT);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    refused(
        &["trace", "export", p, "-o", "/dev/full"],
        3,
        "cannot write /dev/full: No space left on device",
    );
    refused(
        &["trace", "export", p, "-o", "/nonexistent/dir/out.json"],
        2,
        "cannot create /nonexistent/dir/out.json",
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_full_stdout_is_exit_3_and_a_closed_pipe_ends_quietly() {
    let path = temp("show.trace");
    let p = path.to_str().unwrap();
    let out = cowlab_within(&["run", "hello", "--trace", p], LIMIT);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for args in [
        &["list", "tests"][..],
        &["run", "hello"],
        &["run", "cow-fork-basic", "--runs", "1"],
        &["run", "cow-fork-basic", "--runs", "1", "--json"],
        &["trace", "show", p],
    ] {
        let (status, err) = with_stdout(args, dev_full());
        assert_eq!(status, Some(3), "{args:?} > /dev/full: {err}");
        one_line(
            &format!("{args:?} > /dev/full"),
            &err,
            "cannot write to stdout: No space left on device",
        );
        // The reader went away: the output ends, the status is the
        // command's own, nothing is said.
        let (status, err) = with_stdout(args, closed_pipe());
        assert_eq!(status, Some(0), "{args:?} | (closed): {err}");
        assert_eq!(err, "", "{args:?} | (closed)");
    }
    let _ = std::fs::remove_file(&path);
}

/// `../shared/repro/delay-rule-unstoppable.litmus`: a delay of 100 s in
/// fork, with mmap_lock held, far beyond the watchdog.
const DELAY_FOREVER: &str = "cowlab lockforever
{ region buf 1 rw populate }
inject delay=100000000@fork:enter
P0 { r1 = fork C0 }
P1 { buf[0] = 1 }
C0 { exit 0 }
exists (P0:ok)
";

#[test]
fn the_watchdog_ends_a_delay_rule_and_keeps_every_run() {
    let path = temp("delay.litmus");
    std::fs::write(&path, DELAY_FOREVER).unwrap();
    let out = cowlab_within(
        &[
            "run",
            path.to_str().unwrap(),
            "--timeout",
            "1",
            "--runs",
            "2",
            "--json",
        ],
        LIMIT,
    );
    let _ = std::fs::remove_file(&path);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("KVM_RUN"), "{err}");
    let v = json_of("delay rule", &out);
    assert_eq!(v["runs"], 2, "{v}");
    assert_eq!(v["stuck"], 2, "{v}");
    assert_eq!(v["errors"], serde_json::json!({}), "{v}");
    assert_eq!(v["histogram"][0]["state"], "P0:stuck;", "{v}");
    assert_eq!(v["histogram"][0]["count"], 2, "{v}");

    // The fork goes on once the watchdog ends the delay: the child it
    // makes then (here one that would wait for its parent forever) is
    // stopped before it runs.
    let out = cowlab_within(
        &[
            "run",
            "cow-fork-basic",
            "--timeout",
            "1",
            "--runs",
            "2",
            "--inject",
            "delay=100000000@fork:enter",
            "--json",
        ],
        LIMIT,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let v = json_of("delay rule in cow-fork-basic", &out);
    assert_eq!(v["stuck"], 2, "{v}");
    assert_eq!(v["errors"], serde_json::json!({}), "{v}");
    assert_eq!(v["negative"], 2, "{v}");

    // A program run: the watchdog's own message, not a VMM error.
    let out = cowlab_within(
        &[
            "run",
            "hello",
            "--inject",
            "delay=100000000@fault:enter",
            "--timeout",
            "1",
        ],
        LIMIT,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("timeout after 1.0s: vcpu 0 still running") && !err.contains("KVM_RUN"),
        "{err}"
    );
}

/// Runs `cowlab ARGS` (any bytes) within [`LIMIT`] with stdout and stderr
/// as given (`None`: piped), and `limit_as` as its address-space limit:
/// its status, stdout and stderr.
fn raw(
    args: &[std::ffi::OsString],
    stdout: Option<Stdio>,
    stderr: Option<Stdio>,
    limit_as: Option<u64>,
) -> (Option<i32>, String, String) {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cowlab"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(stdout.unwrap_or(Stdio::piped()))
        .stderr(stderr.unwrap_or(Stdio::piped()))
        .env_remove("RUST_BACKTRACE");
    if let Some(bytes) = limit_as {
        let lim = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: bytes,
        };
        // SAFETY: setrlimit is async-signal-safe; `lim` is copied in.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_AS, &lim) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let child = common::Running::new(cmd.spawn().expect("run cowlab"), format!("{args:?}"));
    let out = child
        .try_output_within(LIMIT)
        .unwrap_or_else(|| panic!("cowlab {args:?} still running after {LIMIT:?}: killed"));
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

fn os(args: &[&str]) -> Vec<std::ffi::OsString> {
    args.iter().map(Into::into).collect()
}

/// clap's errors were several lines (the error, a tip, the usage, "For
/// more information"), printed the whole help for a missing subcommand,
/// and quoted arguments raw: an escape sequence reached the terminal.
/// Found by `cli_fuzz.rs`.
#[test]
fn argument_errors_are_one_line_with_arguments_escaped() {
    for (args, want) in [
        (&[][..], "'cowlab' requires a subcommand but one was not provided [subcommands: run, diff, trace, ctl, suite, soak, explore, list, bench, help] (usage: cowlab [OPTIONS] <COMMAND>)"),
        (&["list"], "'cowlab list' requires a subcommand"),
        (&["trace"], "[subcommands: show, export, help]"),
        (&["run"], "the following required arguments were not provided: <TEST|PROGRAM> (usage: cowlab run <TEST|PROGRAM>)"),
        (&["ctl"], "not provided: --socket <PATH>, <COMMAND> (usage:"),
        (&["run", "hello", "--foo"], "unexpected argument '--foo' found (to pass '--foo' as a value, use '-- --foo'; usage: cowlab run <TEST|PROGRAM>)"),
        (&["run", "hello", "--runs"], "a value is required for '--runs <RUNS>' but none was supplied"),
        (&["suit"], "unrecognized subcommand 'suit' (a similar subcommand exists: 'suite'; usage:"),
        (&["soak", "--seed", "1", "--seeds", "2"], "the argument '--seed <SEED>' cannot be used with '--seeds <K>'"),
        (&["run", "hello", "--runs", "\u{1}\u{1b}[31m"], "invalid value '\\u{1}\\u{1b}[31m' for '--runs <RUNS>'"),
        (&["a\nb"], "unrecognized subcommand 'a\\u{a}b'"),
    ] {
        refused(args, 2, want);
    }
    let (code, _, err) = raw(
        &[
            "run".into(),
            std::ffi::OsString::from_vec(b"hello\xff".to_vec()),
        ],
        None,
        None,
        None,
    );
    assert_eq!(code, Some(2));
    one_line(
        "invalid UTF-8",
        &err,
        "invalid UTF-8 was detected in one or more arguments",
    );
    // Help and version are output, not errors: stdout, exit 0; 3 if it
    // cannot be written, as any output.
    for args in [
        &["--help"][..],
        &["help", "run"],
        &["run", "--help"],
        &["--version"],
    ] {
        let out = cowlab_within(args, LIMIT);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(!out.stdout.is_empty() && out.stderr.is_empty(), "{args:?}");
        let (status, err) = with_stdout(args, dev_full());
        assert_eq!(status, Some(3), "{args:?} > /dev/full: {err}");
        one_line(&format!("{args:?}"), &err, "cannot write to stdout");
    }
}

/// Messages quoting an argument (a program name, a path) printed it raw:
/// a newline in it made two lines, an escape sequence reached the
/// terminal. `cli::error` now escapes whatever it prints.
#[test]
fn errors_quoting_arguments_stay_one_line() {
    refused(
        &["run", "a\nb\u{1b}[2J"],
        2,
        "unknown program or test 'a\\u{a}b\\u{1b}[2J'",
    );
    refused(
        &["run", "hello", "--guest", "\u{7}\u{8}"],
        2,
        "--guest: cannot read \\u{7}\\u{8}: No such file",
    );
    refused(
        &["--kvm", "x\ny", "run", "hello"],
        3,
        "cannot open x\\u{a}y",
    );
    refused(
        &["ctl", "--socket", "/nonexistent/\n", "query-status"],
        3,
        "cannot connect to /nonexistent/\\u{a}",
    );
}

/// `cowlab ctl` printed its errors with `eprintln!`, which panics when
/// stderr cannot be written: exit 101 instead of 3.
#[test]
fn ctl_with_a_full_stderr_still_exits_3() {
    let (code, _, _) = raw(
        &os(&["ctl", "--socket", "/nonexistent", "query-status"]),
        None,
        Some(dev_full()),
        None,
    );
    assert_eq!(code, Some(3));
}

/// `native-baseline MIB` (what `bench` runs for its native rounds)
/// multiplied MIB unchecked and asserted that mmap succeeded: a large MIB
/// (or a host that refuses the mapping) was a panic, exit 101.
#[test]
fn the_native_baseline_refuses_sizes_and_reports_a_refused_mapping() {
    for mib in ["18446744073709551615", "17592186044416", "1048577"] {
        refused(
            &["native-baseline", mib],
            2,
            &format!("native-baseline takes 1 to 1048576 MiB, not {mib}"),
        );
    }
    refused(
        &["bench", "--sizes", "16,522177"],
        2,
        "522177 is not in 1..=522176",
    );
    // A host that refuses the mapping: an address space of 1 GiB.
    let (code, out, err) = raw(&os(&["native-baseline", "2048"]), None, None, Some(1 << 30));
    assert_eq!(code, Some(3), "{out} {err}");
    one_line(
        "native-baseline 2048 in 1 GiB",
        &err,
        "native-baseline: mmap of 2048 MiB: Cannot allocate memory",
    );
}
