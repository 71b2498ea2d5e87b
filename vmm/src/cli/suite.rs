//! `cowlab suite`: every test of a suite under every policy its `expect`
//! lines name, as a table or JSON.

use std::sync::Arc;

use super::output::{error, out};
use crate::kvm::{exit_code, Error};
use crate::litmus::{self, builtin};
use crate::policy::Policy;

/// One cell of `cowlab suite`: test, policy, and its result or why it
/// could not run at all.
type SuiteCell = (String, String, Result<litmus::LitmusResult, Error>);

/// `cowlab suite NAME`: every test of the suite under every policy its
/// `expect` lines name; a table of observations, expected or not. A cell
/// in error does not stop the others.
pub fn suite(name: &str, runs: Option<u64>, json: bool, kvm_path: &str) -> i32 {
    let tests = builtin::suite(name);
    if tests.is_empty() {
        error(format_args!(
            "unknown suite '{name}' (suites: {})",
            builtin::suites().join(", ")
        ));
        return exit_code::USAGE;
    }
    let mut cells: Vec<SuiteCell> = Vec::new();
    for (test, src) in tests {
        let compiled = match litmus::load(src) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                error(format_args!("{test}: {e}"));
                return exit_code::USAGE;
            }
        };
        for expect in &compiled.test.expects {
            let Some(policy) = Policy::preset(&expect.policy) else {
                error(format_args!(
                    "{test}: expect names unknown policy '{}'",
                    expect.policy
                ));
                return exit_code::USAGE;
            };
            let run_opts = litmus::RunOptions {
                // A free-running race is rare on a loaded machine: a cell
                // expected `Sometimes` goes on until it has its witness
                // (`runs N max M`), unless `--runs` says how many.
                until_witness: match (runs, expect.verdict) {
                    (None, litmus::ast::Verdict::Sometimes) => compiled.test.max_runs,
                    _ => None,
                },
                ..litmus::RunOptions::plain(
                    runs.or(compiled.test.runs).unwrap_or(10),
                    &expect.policy,
                    policy,
                    kvm_path,
                )
            };
            let result = match litmus::run_test(&compiled, &run_opts) {
                Ok(r) => Ok(r),
                // Without KVM no cell can run: one line says so.
                Err(e) if e.kvm_unusable() => {
                    error(&e);
                    return e.exit_code();
                }
                Err(e) => Err(e),
            };
            cells.push((test.to_string(), expect.policy.clone(), result));
        }
    }
    let (text, code) = suite_report(name, &cells, json);
    out(text);
    code
}

/// The suite's table (or JSON) and exit status: 3 if a cell could not run
/// or had runs in error, else 1 if an expectation failed, else 0.
fn suite_report(name: &str, cells: &[SuiteCell], json: bool) -> (String, i32) {
    let all_met = cells
        .iter()
        .all(|(_, _, r)| r.as_ref().is_ok_and(|r| r.met()));
    let errors: u64 = cells
        .iter()
        .map(|(_, _, r)| r.as_ref().map_or(1, |r| r.errored()))
        .sum();
    let code = if errors > 0 {
        exit_code::VM_ERROR
    } else if all_met {
        exit_code::OK
    } else {
        exit_code::FAILED
    };
    if json {
        let results: Vec<serde_json::Value> = cells
            .iter()
            .filter_map(|(_, _, r)| r.as_ref().ok().map(|r| r.json()))
            .collect();
        let failed: Vec<serde_json::Value> = cells
            .iter()
            .filter_map(|(t, p, r)| {
                let e = r.as_ref().err()?;
                Some(serde_json::json!({"test": t, "policy": p, "error": e.to_string()}))
            })
            .collect();
        let v = serde_json::json!({
            "suite": name, "results": results, "failed": failed,
            "all_met": all_met, "errors": errors,
        });
        return (format!("{v}\n"), code);
    }
    let mut text = format!(
        "{:<24} {:<24} {:<10} {:<10} {:>9} {:>9} {:>7}  {}\n",
        "test", "policy", "observed", "expected", "positive", "negative", "errors", ""
    );
    for (test, policy, r) in cells {
        let Ok(r) = r else {
            text += &format!(
                "{test:<24} {policy:<24} {:<10} {:<10} {:>9} {:>9} {:>7}  ERROR\n",
                "-", "-", "-", "-", "-"
            );
            continue;
        };
        let (want, met) = r.expectation.map_or(("-", true), |(v, m)| (v.as_str(), m));
        let status = match (met, r.errored() > 0) {
            (true, false) => "ok",
            (false, false) => "NOT MET",
            (true, true) => "ERRORS",
            (false, true) => "NOT MET, ERRORS",
        };
        text += &format!(
            "{:<24} {:<24} {:<10} {:<10} {:>9} {:>9} {:>7}  {status}\n",
            r.test,
            r.policy_name,
            r.observation.as_str(),
            want,
            r.positive,
            r.negative,
            r.errored(),
        );
    }
    // Why a schedule could not happen is the answer under a fixed policy;
    // what went wrong in a cell is said under the table.
    for (test, policy, r) in cells {
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                text += &format!("{test} under {policy}: could not run: {e}\n");
                continue;
            }
        };
        for (why, n) in &r.unreachable {
            text += &format!(
                "{} under {}: unreachable in {n} of {} runs: {why}\n",
                r.test, r.policy_name, r.runs
            );
        }
        for (msg, n) in &r.errors {
            text += &format!(
                "{} under {}: error in {n} of {} runs: {msg}\n",
                r.test, r.policy_name, r.runs
            );
        }
        if r.stuck > 0 {
            text += &format!(
                "{} under {}: stuck in {} of {} runs (the watchdog stopped them after {:.1}s)\n",
                r.test,
                r.policy_name,
                r.stuck,
                r.runs,
                r.timeout.as_secs_f64()
            );
        }
    }
    (text, code)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::litmus::ast::Verdict;
    use std::time::Duration;

    /// A suite cell's result: `positive` witnesses, and `errors` runs in
    /// error, of 5 runs, expecting `Always`.
    fn result(test: &str, positive: u64, errors: u64) -> litmus::LitmusResult {
        let mut histogram = BTreeMap::new();
        histogram.insert("P0:r1=1;".to_string(), (positive, true));
        let mut errs = BTreeMap::new();
        if errors > 0 {
            histogram.insert("error;".to_string(), (errors, false));
            errs.insert("vcpu 1: panicked: boom".to_string(), errors);
        }
        let negative = 5 - positive - errors;
        let observation = if negative == 0 {
            Verdict::Always
        } else {
            Verdict::Sometimes
        };
        litmus::LitmusResult {
            test: test.into(),
            policy_name: "mainline".into(),
            policy: Policy::MAINLINE,
            runs: 5,
            histogram,
            positive,
            negative,
            observation,
            expectation: Some((Verdict::Always, negative == 0)),
            condition: "(P0:r1 = 1)".into(),
            elapsed: Duration::ZERO,
            unreachable: BTreeMap::new(),
            errors: errs,
            error_seeds: Vec::new(),
            violations: 0,
            stuck: 0,
            stuck_seeds: Vec::new(),
            timeout: Duration::from_secs(30),
            schedule: None,
            witness_seeds: Vec::new(),
            witness_schedule: None,
            replay_flags: String::new(),
            schedule_off: false,
            rules: BTreeMap::new(),
        }
    }

    fn cell(r: Result<litmus::LitmusResult, Error>) -> SuiteCell {
        let test = r.as_ref().map_or("broken".into(), |r| r.test.clone());
        (test, "mainline".into(), r)
    }

    #[test]
    fn a_suite_cell_in_error_keeps_the_others_and_exits_3() {
        let cells = [
            cell(Ok(result("good", 5, 0))),
            cell(Ok(result("lossy", 3, 2))),
            cell(Err(Error::Run(
                "cannot start the VM: KVM_CREATE_VM failed".into(),
            ))),
        ];
        let (text, code) = suite_report("s", &cells, false);
        assert_eq!(code, exit_code::VM_ERROR, "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("errors"), "{text}");
        assert!(
            lines[1].starts_with("good ") && lines[1].ends_with("  ok"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("lossy ") && lines[2].ends_with("  ERRORS"),
            "{text}"
        );
        assert!(
            lines[3].starts_with("broken ") && lines[3].ends_with("  ERROR"),
            "{text}"
        );
        assert!(
            text.contains("lossy under mainline: error in 2 of 5 runs: vcpu 1: panicked: boom\n"),
            "{text}"
        );
        assert!(
            text.contains("broken under mainline: could not run: cannot start the VM"),
            "{text}"
        );

        let (json, code) = suite_report("s", &cells, true);
        assert_eq!(code, exit_code::VM_ERROR);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["results"].as_array().unwrap().len(), 2, "{v}");
        assert_eq!(v["results"][1]["errors"]["vcpu 1: panicked: boom"], 2);
        assert_eq!(v["failed"][0]["test"], "broken");
        assert_eq!(v["errors"], 3);
        assert_eq!(v["all_met"], false);
    }

    #[test]
    fn a_suite_without_errors_exits_on_its_expectations() {
        let (_, code) = suite_report("s", &[cell(Ok(result("good", 5, 0)))], false);
        assert_eq!(code, exit_code::OK);
        let (text, code) = suite_report("s", &[cell(Ok(result("miss", 4, 0)))], false);
        assert_eq!(code, exit_code::FAILED);
        assert!(text.lines().nth(1).unwrap().ends_with("NOT MET"), "{text}");
    }
}
