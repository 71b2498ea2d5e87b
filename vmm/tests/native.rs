//! Litmus tests on the host kernel (docs/native.md): `cowlab run
//! --native`, `cowlab suite --native` and `cowlab diff`. Native runs need a
//! Linux host with userfaultfd and io_uring; the swap test needs root.

mod common;

use std::time::Duration;

use common::{cowlab, cowlab_json, cowlab_within, litmus_json, text};

/// Every state of a result's histogram, with its count.
fn histogram(v: &serde_json::Value) -> Vec<(String, u64)> {
    v["histogram"]
        .as_array()
        .unwrap_or_else(|| panic!("no histogram: {v}"))
        .iter()
        .map(|h| {
            (
                h["state"].as_str().unwrap_or_default().to_string(),
                h["count"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

fn states(v: &serde_json::Value) -> Vec<String> {
    histogram(v).into_iter().map(|(s, _)| s).collect()
}

#[test]
fn diff_all_agrees_and_every_refusal_has_a_reason() {
    let out = cowlab_within(
        &["diff", "all", "--runs", "3", "--json"],
        Duration::from_secs(900),
    );
    let v = common::json_of("diff all", &out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "a disagreement or a failure: {}",
        serde_json::to_string_pretty(&v).unwrap_or_default()
    );
    let rows = v["rows"].as_array().expect("rows");
    assert!(rows.len() >= 25, "every built-in test has a row: {v}");
    let (mut ran, mut refused) = (0, 0);
    for r in rows {
        let test = r["test"].as_str().unwrap_or_default();
        if r["native"]["refused"] == true {
            refused += 1;
            let why = r["native"]["reason"].as_str().unwrap_or_default();
            assert!(why.len() > 20, "{test} is refused without a reason: {r}");
            assert!(r["agreement"].is_null(), "{r}");
        } else {
            ran += 1;
            let a = r["agreement"].as_str().unwrap_or_default();
            assert!(a == "yes" || a == "unconfirmed", "{test}: {r}");
        }
    }
    assert!(ran >= 15, "the cow, basic and bare tests run natively: {v}");
    assert!(refused >= 10, "the scheduled and injected ones do not: {v}");
    for t in [
        "cow-fork-basic",
        "munmap-segv",
        "cow-iouring-fork",
        "uffd-wp-handler",
    ] {
        let row = rows.iter().find(|r| r["test"] == t).expect(t);
        assert_eq!(row["agreement"], "yes", "{row}");
    }
}

#[test]
fn a_test_with_a_schedule_or_injection_is_refused_with_one_clear_line() {
    for (test, why) in [
        ("fork-vma-lock", "it has a schedule"),
        ("wp-copy-reuse-aba", "it has a schedule"),
        (
            "fork-vma-lock-free",
            "it injects `delay=6000@fork:before_flush`",
        ),
        ("cow-ro-pin-shared", "R/O FOLL_PIN | FOLL_LONGTERM"),
    ] {
        let out = cowlab(&["run", test, "--native"]);
        assert_eq!(out.status.code(), Some(2), "{test}: {}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!("{test} cannot run natively: ")) && err.contains(why),
            "{test}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn native_flags_that_do_not_apply_are_usage_errors() {
    for args in [
        &["run", "cow-fork-basic", "--native", "--schedule", "none"][..],
        &["run", "cow-fork-basic", "--native", "--policy", "linux-5.7"],
        &[
            "run",
            "cow-fork-basic",
            "--native",
            "--inject",
            "count@fault:enter",
        ],
        &["run", "hello", "--native"],
    ] {
        let out = cowlab(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            text(&out.stderr).contains("--native"),
            "{}",
            text(&out.stderr)
        );
    }
}

#[test]
fn a_segfault_ends_only_its_thread_and_reports_segv() {
    let (code, v) = cowlab_json(&["run", "munmap-segv", "--native", "--runs", "3"]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(histogram(&v), vec![("P0:segv;".to_string(), 3)], "{v}");
    // The other thread of the process and the parent of a crashing child
    // go on.
    let src = "cowlab segv-one-thread
{ region buf 1 rw populate }
P0 {
  r1 = fork C0
  munmap buf 1
  signal unmapped
  r2 = buf[0]
}
P1 {
  await unmapped
  r1 = 5
  r3 = 7
}
C0 {
  r5 = mmap 1 r
  *(r5 + 0) = 1
}
exists (P0:segv /\\ P1:r1 = 5 /\\ C0:segv)
expect mainline Always
";
    let (code, v) = litmus_json("segv-one-thread", src, &["--native", "--runs", "3"]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["observation"], "Always", "{v}");
}

#[test]
fn native_histograms_are_the_models() {
    for test in [
        "cow-fork-basic",
        "cow-vmsplice-unmap",
        "cow-iouring-fork",
        "madvise-dontneed-zero",
        "threads-counter",
        "uffd-wp-handler",
    ] {
        let (mc, model) = cowlab_json(&["run", test, "--runs", "3"]);
        let (nc, native) = cowlab_json(&["run", test, "--runs", "3", "--native"]);
        assert_eq!((mc, nc), (Some(0), Some(0)), "{test}: {model} {native}");
        assert_eq!(states(&model), states(&native), "{test}");
        assert_eq!(native["native"], true);
        assert!(native["policy"]
            .as_str()
            .unwrap_or_default()
            .starts_with("host "));
    }
}

#[test]
fn pins_and_references_reach_the_real_page() {
    // Positive controls for the syscall mapping: a device write through
    // the io_uring fixed buffer lands in the process's page and a device
    // read sees the process's write; a vmspliced exclusive page is the
    // page the process goes on writing (no fork, so no COW).
    let src = "cowlab native-pin-controls
{ region buf 1 rw populate
  region b2 1 rw populate }
P0 {
  r1 = pin buf write longterm
  dma_write r1 8 0x55
  r2 = buf[1]
  buf[2] = 0x77
  r3 = dma_read r1 16
  unpin r1
  b2[0] = 1
  r4 = get b2
  b2[0] = 2
  r5 = dma_read r4 0
  r6 = dma_read r4 0
  unpin r4
}
exists (P0:r2 = 0x55 /\\ P0:r3 = 0x77 /\\ P0:r5 = 2 /\\ P0:r6 = 2)
expect mainline Always
";
    let (code, v) = litmus_json("native-pin-controls", src, &["--native", "--runs", "2"]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["observation"], "Always", "{v}");
}

#[test]
fn a_run_past_its_deadline_is_killed_and_stuck() {
    let src = "cowlab native-hang
{ region buf 1 rw }
P0 {
  r1 = fork C0
  await never
}
C0 {
  await never
}
exists (P0:ok)
";
    let path =
        std::env::temp_dir().join(format!("cowlab-{}-native-hang.litmus", std::process::id()));
    std::fs::write(&path, src).unwrap();
    let out = cowlab_within(
        &[
            "run",
            path.to_str().unwrap(),
            "--native",
            "--runs",
            "1",
            "--timeout",
            "0.5",
            "--json",
        ],
        Duration::from_secs(60),
    );
    let _ = std::fs::remove_file(&path);
    let v = common::json_of("native-hang", &out);
    assert_eq!(v["stuck"], 1, "{v}");
    assert_eq!(
        states(&v),
        vec!["P0:stuck;".to_string()],
        "the threads still running at the deadline are stuck: {v}"
    );
}

#[test]
fn pageout_goes_to_swap_or_the_run_is_not_an_outcome() {
    // SAFETY: a plain system call.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: swapon needs root");
        return;
    }
    let leaked_before = leaked_swap_files();
    let src = "cowlab native-pageout
{ region buf 1 rw }
P0 {
  fill buf 0x1234
  madvise buf 1 pageout
  r1 = cmp buf 0x1234
}
exists (P0:r1 = 1)
expect mainline Always
";
    let (code, v) = litmus_json("native-pageout", src, &["--native", "--runs", "2"]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["observation"], "Always", "{v}");
    // A page mapped by two processes is not paged out: the run is not
    // run, never an outcome.
    let shared = "cowlab native-pageout-shared
{ region buf 1 rw }
P0 {
  fill buf 0x1234
  r2 = fork C0
  madvise buf 1 pageout
  r1 = cmp buf 0x1234
  signal done
  wait r2
}
C0 {
  await done
}
exists (P0:r1 = 1)
";
    let (code, v) = litmus_json(
        "native-pageout-shared",
        shared,
        &["--native", "--runs", "2"],
    );
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["runs"], 0, "{v}");
    let why = v["not_run"][0]["reason"].as_str().unwrap_or_default();
    assert!(why.contains("MADV_PAGEOUT did not work"), "{v}");
    let leaked: Vec<_> = leaked_swap_files()
        .into_iter()
        .filter(|f| !leaked_before.contains(f))
        .collect();
    assert_eq!(
        leaked,
        Vec::<String>::new(),
        "a swap file outlived its cowlab"
    );
}

/// Active swap areas that are a cowlab's temporary file (`cowlab-swap-PID`)
/// whose process has ended: a cleanup that did not happen. Other tests
/// (and other cowlabs on the host) may have their own live ones.
fn leaked_swap_files() -> Vec<String> {
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    swaps
        .lines()
        .skip(1)
        .filter_map(|l| {
            let path = l.split_whitespace().next()?;
            let (_, rest) = path.split_once("cowlab-swap-")?;
            let pid = rest.split('/').next()?;
            (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then(|| path.to_string())
        })
        .collect()
}

#[test]
fn suite_native_lists_refusals_with_reasons() {
    let (code, v) = cowlab_json(&["suite", "seeds", "--native", "--runs", "1"]);
    assert_eq!(code, Some(0), "{v}");
    for r in v["results"].as_array().expect("results") {
        assert_eq!(
            r["refused"], true,
            "every seed test has a schedule or injection: {r}"
        );
        assert!(!r["reason"].as_str().unwrap_or_default().is_empty(), "{r}");
    }
}

#[test]
fn a_disagreement_exits_1_and_prints_both_histograms() {
    // The model's first mmap lands just under its MMAP_BASE (below
    // 0x7e00_0000_0000); the host's, with or without ASLR, above it.
    let src = "cowlab native-mmap-address
{ region buf 1 rw }
P0 {
  r1 = mmap 1 rw
  r2 = r1 < 0x7e0000000000
}
exists (P0:r2 = 1)
";
    let path = std::env::temp_dir().join(format!(
        "cowlab-{}-native-mmap-address.litmus",
        std::process::id()
    ));
    std::fs::write(&path, src).unwrap();
    let out = cowlab_within(
        &["diff", path.to_str().unwrap(), "--runs", "2"],
        Duration::from_secs(120),
    );
    let _ = std::fs::remove_file(&path);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout} {}", text(&out.stderr));
    assert!(
        stdout.contains("Always 2/2") && stdout.contains("Never 0/2"),
        "{stdout}"
    );
    assert!(stdout.contains("NO"), "{stdout}");
    assert!(
        stdout.contains("native-mmap-address: model 2     *>P0:r2=1;")
            && stdout.contains("native-mmap-address: native 2     :>P0:r2=0;"),
        "{stdout}"
    );
}
