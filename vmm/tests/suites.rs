//! The built-in suites as a user runs them (docs/scenarios.md): `cowlab
//! suite seeds` and `cowlab suite cow`, each with the run counts its tests
//! ask for, meet every expectation; the seed races reproduce under the
//! presets that had them and not under the presets that fixed them.

mod common;

use std::collections::BTreeMap;

use common::{cowlab, cowlab_json, text};
use serde_json::Value;

/// Runs `cowlab suite NAME --json`; the JSON and the cells by (test, policy).
fn suite(name: &str) -> (Value, BTreeMap<(String, String), Value>) {
    let (code, v) = cowlab_json(&["suite", name]);
    assert_eq!(code, Some(0), "suite {name}: {v}");
    assert_eq!(v["all_met"], true, "{v}");
    let cells = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let key = (
                r["test"].as_str().unwrap().to_string(),
                r["policy"].as_str().unwrap().to_string(),
            );
            (key, r.clone())
        })
        .collect();
    (v, cells)
}

fn cell<'a>(cells: &'a BTreeMap<(String, String), Value>, test: &str, policy: &str) -> &'a Value {
    cells
        .get(&(test.to_string(), policy.to_string()))
        .unwrap_or_else(|| panic!("no cell {test} × {policy} in {:?}", cells.keys()))
}

#[test]
fn the_seed_races_reproduce_under_the_buggy_presets_and_not_under_the_fixed_ones() {
    let (_, cells) = suite("seeds");
    // (test, preset with the bug, presets that fixed it or never had it)
    let seeds: [(&str, &str, &[&str]); 5] = [
        ("fork-vma-lock", "linux-6.4", &["mainline"]),
        ("uffd-wp-cow-copy", "linux-5.10", &["mainline"]),
        (
            "fork-pinned-tearing",
            "mainline",
            &["proposal-fork-coherent", "linux-5.7"],
        ),
        (
            "gup-read-wrong-side",
            "linux-5.7",
            &["linux-5.8", "linux-5.10", "mainline"],
        ),
        (
            "wp-copy-reuse-aba",
            "linux-5.8",
            &["linux-5.10", "mainline"],
        ),
    ];
    for (test, buggy, fixed) in seeds {
        for name in [test.to_string(), format!("{test}-free")] {
            let c = cell(&cells, &name, buggy);
            let runs = c["runs"].as_u64().unwrap();
            let positive = c["positive"].as_u64().unwrap();
            assert!(positive > 0, "{name} under {buggy}: {c}");
            if name == test {
                // The schedule forces it: every run.
                assert_eq!(positive, runs, "{name} under {buggy}: {c}");
                assert!(c["unreachable"].as_array().unwrap().is_empty(), "{c}");
            }
            for f in fixed {
                let c = cell(&cells, &name, f);
                assert_eq!(c["positive"], 0, "{name} under {f}: {c}");
                assert_eq!(c["observation"], "Never", "{c}");
            }
        }
    }
    // Where the fixed preset makes the forced interleaving impossible, the
    // reason names who waits for whom.
    let why = &cell(&cells, "fork-vma-lock", "mainline")["unreachable"];
    assert!(
        why.as_array().unwrap().iter().all(|u| u["reason"]
            .as_str()
            .unwrap()
            .contains("v1 waits for mmap_lock held by v2 in fork")),
        "{why}"
    );
    let why = &cell(&cells, "fork-pinned-tearing", "proposal-fork-coherent")["unreachable"];
    assert!(
        why.as_array().unwrap().iter().all(|u| u["reason"]
            .as_str()
            .unwrap()
            .contains("v0 waits for mmap_lock held by v1 in fork")),
        "{why}"
    );
}

#[test]
fn the_seeds_table_prints_each_cell_and_the_reasons() {
    let out = cowlab(&["suite", "seeds", "--runs", "3"]);
    let stdout = text(&out.stdout);
    // Three runs may miss the free-running races: only the forced ones are
    // checked here, by their lines.
    for line in [
        "fork-vma-lock            linux-6.4                Always     Always",
        "fork-vma-lock            mainline                 Never      Never",
        "uffd-wp-cow-copy         linux-5.10               Always     Always",
    ] {
        assert!(stdout.contains(line), "{line:?} in\n{stdout}");
    }
    // One line per distinct reason (v1 may block before or after its
    // `guest:go`), each naming the lock fork holds.
    let why: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("fork-vma-lock under mainline: unreachable in "))
        .collect();
    assert!(!why.is_empty(), "{stdout}");
    assert!(
        why.iter()
            .all(|l| l.contains("v1 waits for mmap_lock held by v2 in fork")),
        "{stdout}"
    );
    assert!(!stdout.contains("under linux-6.4: unreachable"), "{stdout}");
}

#[test]
fn the_cow_matrix_passes_under_mainline_and_fails_where_linux_did() {
    let (_, cells) = suite("cow");
    let tests: Vec<&String> = cells.keys().map(|(t, _)| t).collect();
    for t in [
        "cow-fork-basic",
        "cow-fork-mprotect",
        "cow-vmsplice-unmap",
        "cow-vmsplice-unmap-mprotect",
        "cow-vmsplice-before-fork",
        "cow-vmsplice-parent-unmap",
        "cow-iouring-ro-mapping",
        "cow-iouring-fork",
        "cow-ro-pin-shared",
        "cow-ro-pin-previously-shared",
        "cow-ro-pin-exclusive",
    ] {
        assert!(tests.iter().any(|x| *x == t), "{t} missing");
        assert_eq!(cell(&cells, t, "mainline")["observation"], "Never", "{t}");
    }
    // The historical failures, as Linux had them.
    for (t, p) in [
        ("cow-vmsplice-unmap", "linux-5.7"),
        ("cow-vmsplice-before-fork", "linux-5.8"),
        ("cow-iouring-fork", "linux-5.8"),
        ("cow-ro-pin-shared", "linux-5.10"),
        ("cow-iouring-ro-mapping", "linux-5.10"),
    ] {
        assert_eq!(cell(&cells, t, p)["observation"], "Always", "{t} × {p}");
    }
}

#[test]
fn no_false_positives_under_chaos_for_the_fixed_presets() {
    // The benchmark-style check (docs/scenarios.md) makes 10 000 runs of
    // each; CI makes 60, free-running with chaos delays at every point.
    for (test, policy) in [
        ("fork-vma-lock", "mainline"),
        ("uffd-wp-cow-copy", "mainline"),
        ("fork-pinned-tearing", "proposal-fork-coherent"),
        ("gup-read-wrong-side", "linux-5.8"),
        ("wp-copy-reuse-aba", "mainline"),
    ] {
        let (_, v) = cowlab_json(&[
            "run",
            test,
            "--policy",
            policy,
            "--schedule",
            "none",
            "--chaos",
            "11",
            "--runs",
            "60",
            "--timeout",
            "0.3",
        ]);
        assert_eq!(v["runs"], 60, "{v}");
        assert_eq!(v["positive"], 0, "{test} under {policy}: {v}");
    }
}
