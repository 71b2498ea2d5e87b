//! Traces as a user records and reads them (docs/trace-format.md): the
//! events match what the run did, runs are delimited, witnesses can be
//! kept alone, the Chrome export has its tracks and flows, and a damaged
//! file is refused with the offset.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Output;

use common::{cowlab, json_of, text};
use cowlab::trace::{read_trace, Kind, Record};
use serde_json::Value;

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("cowlab-trace-{}-{name}", std::process::id()))
}

fn load(path: &PathBuf) -> Vec<Record> {
    read_trace(&std::fs::read(path).unwrap()).unwrap()
}

/// `cowlab run fork-vma-lock --policy POLICY --runs RUNS --trace PATH EXTRA…`.
fn trace_fvl(path: &str, policy: &str, runs: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "run",
        "fork-vma-lock",
        "--policy",
        policy,
        "--runs",
        runs,
        "--trace",
        path,
    ];
    args.extend_from_slice(extra);
    cowlab(&args)
}

/// How many records of `kind` each track has.
fn per_track(records: &[Record], kind: Kind) -> BTreeMap<u16, usize> {
    let mut m = BTreeMap::new();
    for r in records.iter().filter(|r| r.kind == kind) {
        *m.entry(r.track).or_default() += 1;
    }
    m
}

#[test]
fn a_program_trace_counts_the_faults_fills_and_exits_the_run_reports() {
    let path = temp("hello");
    let out = cowlab(&[
        "run",
        "hello",
        "--vcpus",
        "2",
        "--stats",
        "--trace",
        path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let records = load(&path);
    let (faults, fills, exits) = (
        per_track(&records, Kind::Fault),
        per_track(&records, Kind::Fill),
        per_track(&records, Kind::Exit),
    );
    // --stats: "vcpu N: F faults, L fills, E exits"
    let stats = text(&out.stderr);
    let mut seen = 0;
    for line in stats.lines().filter(|l| l.starts_with("vcpu ")) {
        let n: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        let id = n[0] as u16;
        assert_eq!(faults.get(&id).copied(), Some(n[1] as usize), "{line}");
        assert_eq!(fills.get(&id).copied(), Some(n[2] as usize), "{line}");
        assert_eq!(exits.get(&id).copied(), Some(n[3] as usize), "{line}");
        seen += 1;
    }
    assert_eq!(seen, 2, "{stats}");
    // Every fault is closed, and said how it was resolved.
    assert_eq!(
        per_track(&records, Kind::FaultEnd),
        faults,
        "each Fault has its FaultEnd"
    );
    let resolves: usize = per_track(&records, Kind::Resolve).values().sum();
    assert!(resolves >= faults.values().sum::<usize>(), "{resolves}");
    assert_eq!(records.first().unwrap().kind, Kind::RunBegin);
    assert_eq!(records.last().unwrap().kind, Kind::RunEnd);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_litmus_trace_has_each_run_its_copies_shootdowns_and_final_registers() {
    let path = temp("fvl");
    let out = trace_fvl(
        path.to_str().unwrap(),
        "linux-6.4",
        "3",
        &["--inject", "count@tlb:before_shootdown", "--json"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: Value = json_of("fork-vma-lock --trace", &out);
    let records = load(&path);
    let begins: Vec<&Record> = records
        .iter()
        .filter(|r| r.kind == Kind::RunBegin)
        .collect();
    let ends: Vec<&Record> = records.iter().filter(|r| r.kind == Kind::RunEnd).collect();
    assert_eq!(
        begins.iter().map(|r| r.words[0]).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(
        ends.iter().all(|r| r.words[0] == 1 && r.text == "P0:r2=1;"),
        "witnesses"
    );
    // Shootdowns: one FlushBegin per tlb:before_shootdown the rule counted,
    // each IPI acknowledged.
    let counted = v["rules"][0]["matched"].as_u64().unwrap() as usize;
    let flushes = records
        .iter()
        .filter(|r| r.kind == Kind::FlushBegin)
        .count();
    assert_eq!(flushes, counted);
    let sends: Vec<(u64, u64)> = records
        .iter()
        .filter(|r| r.kind == Kind::IpiSend)
        .map(|r| (r.words[0], r.words[1]))
        .collect();
    let acks: Vec<(u64, u64)> = records
        .iter()
        .filter(|r| r.kind == Kind::IpiAck)
        .map(|r| (r.words[0], r.words[1]))
        .collect();
    assert!(!sends.is_empty());
    // (acknowledgements of concurrent shootdowns may come in another order)
    let (mut sends, mut acks) = (sends, acks);
    sends.sort();
    acks.sort();
    assert_eq!(sends, acks);
    // Each run: v1's copy of buf, and the parent's PTE switched to the copy.
    let copies: Vec<&Record> = records
        .iter()
        .filter(|r| r.kind == Kind::Copy && r.track == 1 && r.words[0] == 0x10_0000_0000)
        .collect();
    assert_eq!(copies.len(), 3);
    for c in &copies {
        let dst = c.words[2];
        assert!(
            records.iter().any(|r| r.kind == Kind::Pte
                && r.track == 1
                && r.words[1] == 0x10_0000_0000
                && r.words[3] & 0x000f_ffff_ffff_f000 == dst),
            "the copy {dst:#x} is mapped"
        );
    }
    // Final registers of every thread of every run: P0's r2 is 1.
    let p0_regs: Vec<&Record> = records
        .iter()
        .filter(|r| r.kind == Kind::Regs && r.track == 0)
        .collect();
    assert_eq!(p0_regs.len(), 3);
    assert!(p0_regs.iter().all(|r| r.words[2] == 1));
    let _ = std::fs::remove_file(&path);
}

#[test]
fn witnesses_only_keeps_just_the_runs_that_satisfied_exists() {
    let path = temp("wo");
    let p = path.to_str().unwrap();
    let run = |policy: &str| trace_fvl(p, policy, "2", &["--trace-witnesses-only"]);
    assert_eq!(run("mainline").status.code(), Some(0));
    assert!(
        load(&path).is_empty(),
        "no witness under mainline: header only"
    );
    assert_eq!(run("linux-6.4").status.code(), Some(0));
    let ends = load(&path)
        .into_iter()
        .filter(|r| r.kind == Kind::RunEnd)
        .count();
    assert_eq!(ends, 2);
    let out = cowlab(&["run", "hello", "--trace-witnesses-only"]);
    assert_eq!(out.status.code(), Some(2), "needs --trace");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn the_chrome_export_has_a_track_per_vcpu_slices_and_flows() {
    let path = temp("chrome");
    let json = temp("chrome.json");
    let out = trace_fvl(path.to_str().unwrap(), "linux-6.4", "1", &[]);
    assert_eq!(out.status.code(), Some(0));
    let out = cowlab(&[
        "trace",
        "export",
        path.to_str().unwrap(),
        "--format",
        "chrome",
        "-o",
        json.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let events = v["traceEvents"].as_array().unwrap();
    let names: Vec<&str> = events
        .iter()
        .filter(|e| e["ph"] == "M" && e["name"] == "thread_name")
        .map(|e| e["args"]["name"].as_str().unwrap())
        .collect();
    for t in ["vCPU 0", "vCPU 1", "vCPU 2", "vCPU 3"] {
        assert!(names.contains(&t), "{t} in {names:?}");
    }
    assert!(names.iter().any(|n| n.starts_with("frame ")), "{names:?}");
    let slices: Vec<&str> = events
        .iter()
        .filter(|e| e["ph"] == "X")
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        slices
            .iter()
            .any(|s| s.starts_with("fault 0x1000000000 write")),
        "{slices:?}"
    );
    assert!(
        slices.iter().any(|s| s.starts_with("flush [")),
        "{slices:?}"
    );
    // Flows: each start has its finish, for shootdowns and for copies.
    for cat in ["shootdown", "copy"] {
        let ids = |ph: &str| -> Vec<String> {
            let mut v: Vec<String> = events
                .iter()
                .filter(|e| e["ph"] == ph && e["cat"] == cat)
                .map(|e| e["id"].as_str().unwrap().to_string())
                .collect();
            v.sort();
            v
        };
        assert!(!ids("s").is_empty(), "{cat} flows");
        assert_eq!(ids("s"), ids("f"), "{cat}");
    }
    // Points are instants on their vCPU: the guest hooks of the seed.
    assert!(events
        .iter()
        .any(|e| e["ph"] == "i" && e["name"] == "guest:write" && e["tid"] == 0));
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&json);
}

#[test]
fn show_filters_by_vcpu_and_kind() {
    let path = temp("show");
    let p = path.to_str().unwrap();
    assert_eq!(trace_fvl(p, "linux-6.4", "1", &[]).status.code(), Some(0));
    let out = cowlab(&["trace", "show", p, "--vcpu", "1", "--kind", "copy"]);
    assert_eq!(out.status.code(), Some(0));
    let lines: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
    // The run's two boundaries and v1's copies: buf's, and perhaps its
    // stack's (shared with the child while the child lives).
    assert!(lines[0].contains("RunBegin"), "{lines:?}");
    assert!(lines.last().unwrap().contains("RunEnd"), "{lines:?}");
    let copies = &lines[1..lines.len() - 1];
    assert!(
        copies
            .iter()
            .all(|l| l.contains(" v1 ") && l.contains(" Copy ")),
        "{lines:?}"
    );
    assert!(
        copies.iter().any(|l| l.contains("0x1000000000: frame")),
        "{lines:?}"
    );
    let out = cowlab(&["trace", "show", p, "--kind", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unknown event kind 'nope'"));
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_damaged_trace_is_refused_with_its_offset() {
    let path = temp("good");
    let p = path.to_str().unwrap();
    assert_eq!(
        cowlab(&["run", "hello", "--trace", p]).status.code(),
        Some(0)
    );
    let good = std::fs::read(&path).unwrap();
    let bad = temp("bad");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (good[..good.len() - 3].to_vec(), "truncated"),
        (good[..20].to_vec(), "truncated record header"),
        (
            b"not a trace at all".to_vec(),
            "offset 0: not a cowlab trace",
        ),
        (
            {
                let mut b = good.clone();
                b[16] = 99;
                b
            },
            "offset 16: unknown record kind 99",
        ),
        (Vec::new(), "offset 0: truncated header"),
    ];
    for (bytes, want) in cases {
        std::fs::write(&bad, &bytes).unwrap();
        for cmd in [
            vec!["trace", "show", bad.to_str().unwrap()],
            vec!["trace", "export", bad.to_str().unwrap(), "-o", "/dev/null"],
        ] {
            let out = cowlab(&cmd);
            let err = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{want}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(err.contains(want), "{want:?} in {err:?}");
        }
    }
    let out = cowlab(&["trace", "show", "/nonexistent/trace"]);
    assert_eq!(out.status.code(), Some(2));
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&bad);
}
