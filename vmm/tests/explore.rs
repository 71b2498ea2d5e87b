//! `cowlab explore` and `cowlab explore merge` (issue 16): a witness's
//! minimized schedule forces the race when pasted into the test, DFS
//! exhausts a fixed preset's space without one, shards merge into one
//! search, and bad input gets one `cowlab: …` line and exit 2. Every
//! command runs under a deadline and is killed if it outlives it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use common::vm::require_kvm;
use common::{cowlab_within, json_of, text};

/// The seed race 002 without its schedule (suite "bare").
const TEARING: &str = "fork-pinned-tearing-bare";
const TEARING_SRC: &str = include_str!("../../tests/litmus/fork-pinned-tearing-bare.litmus");

/// A search here takes seconds in a debug build; one still running after
/// this is a hang (killed, and the test fails).
const LIMIT: Duration = Duration::from_secs(150);

/// A file under the temporary directory, removed when dropped (also when
/// a failing assertion unwinds).
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &[u8]) -> TempFile {
        let path =
            std::env::temp_dir().join(format!("cowlab-explore-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).expect("write a temporary file");
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("a UTF-8 temporary path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A temporary directory, removed with what is in it when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path =
            std::env::temp_dir().join(format!("cowlab-explore-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create a temporary directory");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `cowlab ARGS` (ending in `--json`) within [`LIMIT`]: its status
/// and the one JSON object it printed.
fn explore_json(args: &[&str]) -> (Option<i32>, Value, Output) {
    let out = cowlab_within(args, LIMIT);
    let v = json_of(&format!("{args:?}"), &out);
    (out.status.code(), v, out)
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {key:?} in {v}"))
}

/// The histogram's counts, summed.
fn histogram_total(v: &Value) -> u64 {
    v["histogram"]
        .as_object()
        .unwrap_or_else(|| panic!("no histogram in {v}"))
        .values()
        .map(|n| n.as_u64().expect("a count"))
        .sum()
}

/// Asserts that `out` is a refusal: exit 2, nothing on stdout, and one
/// line `cowlab: …` on stderr containing `want`.
fn refused(what: &str, out: &Output, want: &str) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{what}: {err}");
    assert!(
        out.stdout.is_empty(),
        "{what}: stdout {:?}",
        text(&out.stdout)
    );
    assert_eq!(err.lines().count(), 1, "{what}: one line: {err:?}");
    assert!(
        err.starts_with("cowlab: ") && !err.contains("panicked"),
        "{what}: {err:?}"
    );
    assert!(err.contains(want), "{what}: {want:?} in {err:?}");
}

#[test]
fn a_minimized_witness_pasted_into_the_test_forces_the_race() {
    require_kvm();
    let (code, v, out) = explore_json(&["explore", TEARING, "--policy", "mainline", "--json"]);
    // PCT draws its change points among the k branching decisions of the
    // probe run; a probe whose boot vCPUs did not all park at its first
    // decisions has a smaller k, and no change point then falls where
    // this race needs one.
    assert!(
        u(&v, "witnesses") >= 1,
        "no witness in {} runs (PCT's k from the probe run: {}, n: {}): {v}",
        u(&v, "runs"),
        u(&v, "steps"),
        u(&v, "threads")
    );
    assert_eq!(code, Some(0), "{}", text(&out.stderr));
    assert_eq!(v["met"], true, "expect mainline Sometimes: {v}");
    let w = &v["witness"];
    let steps: Vec<&str> = w["minimized"]
        .as_array()
        .unwrap_or_else(|| panic!("no minimized schedule: {w}"))
        .iter()
        .map(|s| s.as_str().expect("a step"))
        .collect();
    assert!(steps.len() >= 2, "a schedule orders two steps or more: {w}");
    assert!(
        steps.len() <= w["schedule"].as_array().map_or(0, Vec::len),
        "minimizing never adds steps: {w}"
    );
    assert!(
        u(w, "replays") > 0 && u(w, "reproduced") * 2 > u(w, "replays"),
        "the explorer's own replays: {w}"
    );
    // The block as the report prints it, after the test's own source.
    let src = format!("{TEARING_SRC}\nschedule {{\n  {}\n}}\n", steps.join(" < "));
    let file = TempFile::new("forced.litmus", src.as_bytes());
    let (code, run, out) = explore_json(&[
        "run",
        file.path(),
        "--policy",
        "mainline",
        "--runs",
        "10",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{src}\n{}", text(&out.stderr));
    let positive = u(&run, "positive");
    assert!(
        positive >= 8,
        "the forced schedule gave the witness in {positive} of 10 runs:\n{src}\n{run}"
    );
    assert!(
        run["schedule"].is_string(),
        "the file's schedule was used: {run}"
    );
    // The state it forces is the one the explorer found.
    let state = w["state"].as_str().expect("the witness's state");
    let forced: Vec<&str> = run["histogram"]
        .as_array()
        .unwrap_or_else(|| panic!("no histogram: {run}"))
        .iter()
        .filter(|e| e["witness"] == true)
        .map(|e| e["state"].as_str().expect("a state"))
        .collect();
    assert_eq!(forced, [state], "{run}");
}

#[test]
fn dfs_with_one_preemption_exhausts_linux_5_7_without_a_witness() {
    require_kvm();
    let (code, v, out) = explore_json(&[
        "explore",
        TEARING,
        "--policy",
        "linux-5.7",
        "--strategy",
        "dfs",
        "--bound",
        "1",
        "--json",
    ]);
    assert_eq!(
        code,
        Some(0),
        "expect linux-5.7 Never: {}",
        text(&out.stderr)
    );
    assert_eq!(v["strategy"], "dfs", "{v}");
    assert_eq!(v["exhausted"], true, "{v}");
    assert_eq!(u(&v, "witnesses"), 0, "{v}");
    assert!(v["witness"].is_null(), "{v}");
    assert_eq!(
        (v["expected"].as_str(), &v["met"]),
        (Some("Never"), &Value::Bool(true)),
        "{v}"
    );
    // Two non-preemptive runs at least (v0 first, v1 first), every run in
    // the histogram, none stuck or in error.
    let runs = u(&v, "runs");
    assert!(runs >= 2, "{v}");
    assert_eq!(histogram_total(&v), runs, "{v}");
    assert_eq!((u(&v, "stuck"), u(&v, "deadlocks")), (0, 0), "{v}");
    assert!(v["errors"].as_object().is_some_and(|e| e.is_empty()), "{v}");
}

/// The shard results of `cowlab explore ARGS --shard I/3 --json` (I = 0,
/// 1, 2), each written to a file of `dir`, and their merge.
fn three_shards(dir: &TempDir, args: &[&str]) -> (Vec<Value>, Option<i32>, Value) {
    let mut parts = Vec::new();
    let mut files = Vec::new();
    for i in 0..3 {
        let shard = format!("{i}/3");
        let mut a = args.to_vec();
        a.extend(["--shard", &shard, "--json"]);
        let out = cowlab_within(&a, LIMIT);
        let v = json_of(&format!("{a:?}"), &out);
        let code = out.status.code();
        assert!(matches!(code, Some(0 | 1)), "{a:?}: {}", text(&out.stderr));
        assert_eq!(
            code == Some(0),
            v["met"] != false,
            "{a:?}: exit {code:?}, {v}"
        );
        assert_eq!(
            (v["shards"].clone(), u(&v, "shard_count")),
            (serde_json::json!([i]), 3)
        );
        let file = dir.path().join(format!("shard{i}.json"));
        std::fs::write(&file, &out.stdout).expect("write a shard's result");
        files.push(file.to_str().expect("a UTF-8 path").to_string());
        parts.push(v);
    }
    let mut m = vec!["explore", "merge"];
    m.extend(files.iter().map(String::as_str));
    m.push("--json");
    let (code, merged, out) = explore_json(&m);
    assert!(matches!(code, Some(0 | 1)), "merge: {}", text(&out.stderr));
    assert_eq!(
        code == Some(0),
        merged["met"] != false,
        "merge: exit {code:?}, {merged}"
    );
    (parts, code, merged)
}

/// What a merge must be of any shards: the same search, every shard once,
/// the counts summed, the first witness the one of the lowest run.
fn check_merge(parts: &[Value], merged: &Value) {
    assert_eq!(merged["shards"], serde_json::json!([0, 1, 2]), "{merged}");
    assert_eq!(u(merged, "shard_count"), 3, "{merged}");
    for key in ["test", "policy", "strategy", "seed", "budget"] {
        assert_eq!(merged[key], parts[0][key], "{key}: {merged}");
    }
    for key in [
        "runs",
        "made",
        "witnesses",
        "stuck",
        "deadlocks",
        "diverged",
    ] {
        let sum: u64 = parts.iter().map(|p| u(p, key)).sum();
        assert_eq!(u(merged, key), sum, "{key}: {merged}");
    }
    let mut histogram = std::collections::BTreeMap::<String, u64>::new();
    for p in parts {
        for (k, n) in p["histogram"].as_object().expect("a histogram") {
            *histogram.entry(k.clone()).or_default() += n.as_u64().expect("a count");
        }
    }
    let got: std::collections::BTreeMap<String, u64> =
        serde_json::from_value(merged["histogram"].clone()).expect("a histogram");
    assert_eq!(got, histogram, "{merged}");
    assert_eq!(histogram_total(merged), u(merged, "runs"), "{merged}");
    let first = parts
        .iter()
        .filter(|p| !p["witness"].is_null())
        .min_by_key(|p| u(&p["witness"], "run"))
        .map(|p| p["witness"].clone())
        .unwrap_or(Value::Null);
    assert_eq!(merged["witness"], first, "{merged}");
    assert_eq!(
        merged["exhausted"],
        parts.iter().all(|p| p["exhausted"] == true),
        "{merged}"
    );
    // Judged again over the whole: a witness meets Sometimes.
    if merged["expected"] == "Sometimes" {
        assert_eq!(merged["met"], u(merged, "witnesses") > 0, "{merged}");
    }
}

#[test]
fn pct_shards_split_the_budget_and_merge_into_one_search() {
    require_kvm();
    let dir = TempDir::new("pct-shards");
    let search = [
        "explore",
        TEARING,
        "--policy",
        "mainline",
        "--budget",
        "60",
        "--seed",
        "7",
        "--keep-going",
        "--no-minimize",
    ];
    let (parts, _, merged) = three_shards(&dir, &search);
    check_merge(&parts, &merged);
    // Run r of the search is shard r mod 3's: 20 runs each, each after
    // its own 3 probe runs, and a shard's witnesses are its own runs.
    for (i, p) in parts.iter().enumerate() {
        assert_eq!((u(p, "runs"), u(p, "made")), (20, 23), "shard {i}: {p}");
        assert_eq!(histogram_total(p), 20, "shard {i}: {p}");
        if !p["witness"].is_null() {
            assert_eq!(u(&p["witness"], "run") % 3, i as u64, "shard {i}: {p}");
            assert!(p["witness"]["minimized"].is_null(), "--no-minimize: {p}");
        }
    }
    // One process making the whole search: the same runs in all.
    let mut one = search.to_vec();
    one.push("--json");
    let (code, single, out) = explore_json(&one);
    assert!(matches!(code, Some(0 | 1)), "{}", text(&out.stderr));
    assert_eq!(
        (u(&single, "runs"), u(&single, "made")),
        (60, 63),
        "{single}"
    );
    assert_eq!(u(&merged, "runs"), u(&single, "runs"), "{merged}");
    assert_eq!(single["shards"], serde_json::json!([0]), "{single}");
    assert_eq!(u(&single, "shard_count"), 1, "{single}");
    for key in [
        "test", "policy", "strategy", "depth", "seed", "budget", "threads",
    ] {
        assert_eq!(merged[key], single[key], "{key}: {merged} vs {single}");
    }
}

#[test]
fn dfs_shards_each_exhaust_their_part_and_merge_exhausted() {
    require_kvm();
    let dir = TempDir::new("dfs-shards");
    let search = [
        "explore",
        TEARING,
        "--policy",
        "linux-5.7",
        "--strategy",
        "dfs",
        "--bound",
        "1",
    ];
    let (parts, code, merged) = three_shards(&dir, &search);
    check_merge(&parts, &merged);
    for (i, p) in parts.iter().enumerate() {
        assert_eq!(p["exhausted"], true, "shard {i}: {p}");
        // Each shard makes the top of the tree too, counting only its own.
        assert!(u(p, "made") >= u(p, "runs"), "shard {i}: {p}");
    }
    assert_eq!(code, Some(0), "expect linux-5.7 Never: {merged}");
    assert_eq!(merged["exhausted"], true, "{merged}");
    assert_eq!(u(&merged, "witnesses"), 0, "{merged}");
    assert!(u(&merged, "runs") >= 2, "{merged}");
}

#[test]
fn bad_explore_arguments_exit_2_with_one_line_saying_why() {
    for (flags, want) in [
        (&["--shard", "3/2"][..], "--shard takes I/N"),
        (&["--shard", "x"], "--shard takes I/N"),
        (&["--shard", "0/0"], "--shard takes I/N"),
        (&["--shard", "1/1"], "--shard takes I/N"),
        (&["--shard", "-1/3"], "--shard takes I/N"),
        (&["--shard", "0/1000001"], "--shard takes I/N"),
        (&["--depth", "0"], "--depth"),
        (&["--depth", "65"], "--depth"),
        (&["--bound", "65"], "--bound"),
        (&["--budget", "0"], "--budget"),
        (&["--time", "-1"], "--time takes"),
        (&["--time", "0"], "--time takes"),
        (&["--time", "nan"], "--time takes"),
        (&["--timeout", "0"], "--timeout takes"),
        (&["--timeout", "-1"], "--timeout takes"),
        (&["--seed", "-1"], "--seed"),
        (&["--strategy", "bfs"], "--strategy"),
        (&["--policy", "linux-9.9"], "unknown policy 'linux-9.9'"),
        (&["--set", "nosuch=1"], "unknown knob 'nosuch'"),
    ] {
        let mut args = vec!["explore", TEARING];
        args.extend_from_slice(flags);
        let out = cowlab_within(&args, LIMIT);
        refused(&format!("{args:?}"), &out, want);
    }
    let out = cowlab_within(&["explore", "no-such-test"], LIMIT);
    refused("unknown test", &out, "unknown litmus test 'no-such-test'");
    // A guest program is not a litmus test.
    let out = cowlab_within(&["explore", "hello"], LIMIT);
    refused(
        "a program",
        &out,
        "'hello' is a guest program, not a litmus test",
    );
    let out = cowlab_within(&["explore", "/nonexistent/x.litmus"], LIMIT);
    refused("a missing file", &out, "cannot read /nonexistent/x.litmus");
    let bad = TempFile::new("bad.litmus", b"cowlab bad\nP0 { r1 = }\n");
    let out = cowlab_within(&["explore", bad.path()], LIMIT);
    refused("a malformed test", &out, bad.path());
}

#[test]
fn a_test_whose_threads_hit_no_point_cannot_be_explored() {
    require_kvm();
    let src = "cowlab no-points\n{ region buf 1 rw }\n\nP0 {\n  r1 = 1\n}\n\nP1 {\n  r2 = 2\n}\n\nexists (P0:r1 = 2)\n";
    let file = TempFile::new("no-points.litmus", src.as_bytes());
    let out = cowlab_within(&["explore", file.path()], LIMIT);
    refused("no points", &out, "it has no thread that hits a point");
}

#[test]
fn bad_merges_exit_2_with_one_line_saying_why() {
    require_kvm();
    let dir = TempDir::new("bad-merges");
    // Real results: shard 0 of a search, shard 1 of it with another seed,
    // and shard 1 of the same search of another test (one run each).
    let result = |name: &str, args: &[&str]| {
        let out = cowlab_within(args, LIMIT);
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "{args:?}: {}",
            text(&out.stderr)
        );
        json_of(name, &out);
        let path = dir.path().join(name);
        std::fs::write(&path, &out.stdout).expect("write a result");
        path.to_str().expect("a UTF-8 path").to_string()
    };
    let search = |test: &'static str, seed: &'static str, shard: &'static str| {
        [
            "explore",
            test,
            "--policy",
            "linux-5.7",
            "--budget",
            "2",
            "--seed",
            seed,
            "--shard",
            shard,
            "--json",
        ]
    };
    let a = result("a.json", &search(TEARING, "1", "0/2"));
    let seed9 = result("seed9.json", &search(TEARING, "9", "1/2"));
    let other = result("other.json", &search("fork-vma-lock-bare", "1", "1/2"));
    let not_json = dir.path().join("not.json");
    std::fs::write(&not_json, "Explore fork-pinned-tearing-bare\n").unwrap();
    let not_json = not_json.to_str().unwrap();
    let dir_path = dir.path().to_str().unwrap();
    // Shard 7 of a search in 2: merge took it and printed "shard 0,7/2".
    let mut v: Value = serde_json::from_slice(&std::fs::read(&a).unwrap()).unwrap();
    v["shards"] = serde_json::json!([7]);
    let forged = dir.path().join("forged.json");
    std::fs::write(&forged, v.to_string()).unwrap();
    let forged = forged.to_str().unwrap();
    for (files, want) in [
        (vec![not_json], "not a result of `cowlab explore --json`"),
        (
            vec![&a, not_json],
            "not a result of `cowlab explore --json`",
        ),
        (vec![&a, &other], "results of different searches: test"),
        (
            vec![&a, &seed9],
            "results of different searches: seed 1 vs 9",
        ),
        (vec![&a, &a], "shard 0 appears twice"),
        (
            vec![&a, forged],
            "shards [7] of 2: each must be below the count",
        ),
        (vec![dir_path], "a directory"),
        (vec!["/nonexistent.json"], "cannot read /nonexistent.json"),
        (vec![], "required"),
    ] {
        let mut args = vec!["explore", "merge"];
        args.extend(files.iter().map(|f| &**f));
        let out = cowlab_within(&args, LIMIT);
        refused(&format!("{args:?}"), &out, want);
    }
    // The one good merge among them: shard 0 alone (partial, judged).
    let out = cowlab_within(&["explore", "merge", &a, "--json"], LIMIT);
    let v = json_of("merge of one shard", &out);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(v["shards"], serde_json::json!([0]), "{v}");
}

/// Whether process `pid` has a handler for SIGINT (its `SigCgt` mask in
/// /proc), i.e. Ctrl-C will be caught rather than kill it.
fn catches_sigint(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (libc::SIGINT - 1)) != 0)
}

#[test]
fn ctrl_c_ends_a_search_with_its_results_so_far() {
    require_kvm();
    // A search that would go on for minutes: dfs over a fixed preset.
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_cowlab"))
        .args([
            "explore",
            "wp-copy-reuse-aba-bare",
            "--policy",
            "mainline",
            "--strategy",
            "dfs",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start cowlab");
    let pid = child.id();
    let running = common::Running::new(child, "explore interrupted");
    // The state to wait for: the handler is installed.
    let deadline = std::time::Instant::now() + LIMIT;
    while !catches_sigint(pid) {
        assert!(std::time::Instant::now() < deadline, "no SIGINT handler");
        std::thread::yield_now();
    }
    // Our own child, not yet waited for: its pid is not reused.
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success());
    let out = running.output_within(LIMIT);
    let v = json_of("interrupted explore", &out);
    assert_eq!(v["interrupted"], true, "{v}");
    assert_eq!(v["exhausted"], false, "{v}");
    assert_eq!(v["witnesses"], 0, "{v}");
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{}",
        text(&out.stderr)
    );
}
