//! `cowlab suite`: every test of a suite under every policy its `expect`
//! lines name, as a table or JSON.
//!
//! A cell is one of two kinds ([`Outcome`]): the tests of the "bare" suite
//! (the seed races with their schedules removed) are explored, their
//! interleavings searched for a witness (`litmus::explore`; docs/
//! scenarios.md, "The bare variants"); every other test is run as
//! written, forced by its schedule or free-running.

use std::sync::Arc;

use super::output::{error, out};
use crate::kvm::{exit_code, Error};
use crate::litmus::ast::Verdict;
use crate::litmus::explore::{self, ExploreError, ExploreOptions, ExploreResult, Strategy};
use crate::litmus::{self, builtin, Compiled};
use crate::policy::Policy;

/// The suite whose tests a suite explores rather than runs.
const EXPLORED_SUITE: &str = "bare";

/// The search of an explored cell: PCT with two change points, seed 1.
const EXPLORE_STRATEGY: Strategy = Strategy::Pct { depth: 3 };
const EXPLORE_SEED: u64 = 1;

/// Interleavings an explored cell searches (unless `--runs` says): a cell
/// expected to have a witness stops at the first, so its budget only
/// bounds the search for it; a cell expected `Never` runs all of its.
const EXPLORE_BUDGET_WITNESS: u64 = 2000;
const EXPLORE_BUDGET_NEVER: u64 = 300;

/// A test of a suite, compiled for the way the suite runs it.
enum Prepared {
    /// Run as written: forced by its schedule, or free-running.
    Runs(Arc<Compiled>),
    /// Explored: compiled for exploration, and normally (which minimizing
    /// would replay schedules on).
    Explore {
        explored: Arc<Compiled>,
        normal: Arc<Compiled>,
    },
}

impl Prepared {
    /// Parses and compiles built-in `test`: explored if it belongs to the
    /// "bare" suite, else run.
    fn load(test: &str, src: &str) -> Result<Prepared, litmus::ParseError> {
        if !is_explored(test) {
            return Ok(Prepared::Runs(Arc::new(litmus::load(src)?)));
        }
        let parsed = litmus::parse(src)?;
        Ok(Prepared::Explore {
            explored: Arc::new(litmus::compile_for_explore(&parsed)?),
            normal: Arc::new(litmus::compile(&parsed)?),
        })
    }

    /// The test as compiled normally (its name and `expect` lines).
    fn compiled(&self) -> &Compiled {
        match self {
            Prepared::Runs(c) => c,
            Prepared::Explore { normal, .. } => normal,
        }
    }

    /// The cell of `expect`'s policy: runs (`--runs`, else the test's
    /// `runs` line, else 10; a free-running `Sometimes` goes on to its
    /// `max`) or a search (`--runs`, else the budget for the verdict).
    fn run(
        &self,
        expect: &litmus::ast::Expect,
        policy: Policy,
        runs: Option<u64>,
        kvm_path: &str,
    ) -> Result<Outcome, Error> {
        match self {
            Prepared::Runs(compiled) => {
                let run_opts = litmus::RunOptions {
                    // A free-running race is rare on a loaded machine: a
                    // cell expected `Sometimes` goes on until it has its
                    // witness (`runs N max M`), unless `--runs` says how
                    // many.
                    until_witness: match (runs, expect.verdict) {
                        (None, Verdict::Sometimes) => compiled.test.max_runs,
                        _ => None,
                    },
                    ..litmus::RunOptions::plain(
                        runs.or(compiled.test.runs).unwrap_or(10),
                        &expect.policy,
                        policy,
                        kvm_path,
                    )
                };
                litmus::run_test(compiled, &run_opts).map(Outcome::Runs)
            }
            Prepared::Explore { explored, normal } => {
                let mut opts =
                    ExploreOptions::new(EXPLORE_STRATEGY, &expect.policy, policy, kvm_path);
                opts.seed = EXPLORE_SEED;
                opts.budget = Some(runs.unwrap_or(explore_budget(expect.verdict)));
                // The verdict needs one witness; minimizing its schedule
                // replays it many times and changes no cell of the table
                // (`cowlab explore` does it).
                opts.keep_going = false;
                opts.minimize = false;
                match explore::explore(explored, normal, &opts) {
                    Ok(r) => Ok(Outcome::Explored(r)),
                    Err(ExploreError::Vm(e)) => Err(e),
                    Err(e @ (ExploreError::NoPoints(_) | ExploreError::ProbeStuck(_))) => {
                        Err(Error::Run(e.to_string()))
                    }
                }
            }
        }
    }
}

/// Whether a suite explores built-in `test` rather than running it.
fn is_explored(test: &str) -> bool {
    builtin::TESTS
        .iter()
        .any(|(name, _, suites)| *name == test && suites.contains(&EXPLORED_SUITE))
}

/// The budget of an explored cell expecting `verdict`.
fn explore_budget(verdict: Verdict) -> u64 {
    match verdict {
        Verdict::Never => EXPLORE_BUDGET_NEVER,
        Verdict::Sometimes | Verdict::Always => EXPLORE_BUDGET_WITNESS,
    }
}

/// What one cell gave: plain runs, or a search of the interleavings.
#[derive(Debug)]
enum Outcome {
    Runs(litmus::LitmusResult),
    Explored(ExploreResult),
}

impl Outcome {
    /// The observation: a search says `Sometimes` if it found a witness,
    /// else `Never` (it cannot show `Always`).
    fn observation(&self) -> &'static str {
        match self {
            Outcome::Runs(r) => r.observation.as_str(),
            Outcome::Explored(r) if r.witnesses > 0 => Verdict::Sometimes.as_str(),
            Outcome::Explored(_) => Verdict::Never.as_str(),
        }
    }

    /// The expected verdict, if the test has one for the policy.
    fn expected(&self) -> Option<&str> {
        match self {
            Outcome::Runs(r) => r.expectation.map(|(v, _)| v.as_str()),
            Outcome::Explored(r) => r.expected.as_deref(),
        }
    }

    /// Whether the expectation (if any) held.
    fn met(&self) -> bool {
        match self {
            Outcome::Runs(r) => r.met(),
            Outcome::Explored(r) => r.met.unwrap_or(true),
        }
    }

    /// Runs (interleavings) with a witness.
    fn positive(&self) -> u64 {
        match self {
            Outcome::Runs(r) => r.positive,
            Outcome::Explored(r) => r.witnesses,
        }
    }

    /// Runs that ended without a witness and without an error; for a
    /// search, runs ending in a deadlock of the test's threads are here
    /// (an interleaving where every thread waits is an outcome of the test,
    /// not of cowlab: see [`Outcome::errors`]).
    fn negative(&self) -> u64 {
        match self {
            Outcome::Runs(r) => r.negative,
            Outcome::Explored(r) => r.runs.saturating_sub(r.witnesses + self.errors()),
        }
    }

    /// Runs in error: for a search, those ending in an error and those the
    /// watchdog ended (the explorer, which decides who runs, saw no
    /// deadlock in them: something in cowlab hung). Deadlocks are not
    /// counted: the test's threads really cannot go on in that order
    /// (uffd-wp-cow-copy-bare's write fault waits for an unprotect that
    /// already came).
    fn errors(&self) -> u64 {
        match self {
            Outcome::Runs(r) => r.errored(),
            Outcome::Explored(r) => r.errors.values().sum::<u64>() + r.stuck,
        }
    }

    /// The cell in the suite's JSON: the plain result or the search's
    /// (`ExploreResult`), each with its `mode`.
    fn json(&self) -> serde_json::Value {
        let (mode, value) = match self {
            Outcome::Runs(r) => ("runs", r.json()),
            Outcome::Explored(r) => (
                "explore",
                serde_json::to_value(r).unwrap_or_else(|e| {
                    serde_json::json!({
                        "test": r.test, "policy": r.policy,
                        "error": format!("cannot write the result as JSON: {e}"),
                    })
                }),
            ),
        };
        let mut value = value;
        if let Some(obj) = value.as_object_mut() {
            obj.insert("mode".into(), mode.into());
        }
        value
    }

    /// What the table cannot say, a line each: why a schedule could not
    /// happen, errors, stuck runs; for a search, what it searched and
    /// found, and its deadlocks.
    fn notes(&self) -> String {
        match self {
            Outcome::Runs(r) => run_notes(r),
            Outcome::Explored(r) => explore_notes(r),
        }
    }
}

/// [`Outcome::notes`] of plain runs.
fn run_notes(r: &litmus::LitmusResult) -> String {
    let mut text = String::new();
    // Why a schedule could not happen is the answer under a fixed policy.
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
    text
}

/// [`Outcome::notes`] of a search.
fn explore_notes(r: &ExploreResult) -> String {
    let how = match r.strategy {
        Strategy::Pct { depth } => format!("pct, depth {depth}, seed {}", r.seed),
        Strategy::Dfs { bound } => format!("dfs, at most {bound} preemptions"),
    };
    let budget = r.budget.map_or(String::new(), |b| format!(", budget {b}"));
    let secs = r.search_ms as f64 / 1000.0;
    let mut text = format!(
        "{} under {}: explored {} interleavings ({how}{budget}, {secs:.1} s): ",
        r.test, r.policy, r.runs
    );
    match (&r.witness, r.strategy) {
        (Some(w), _) => {
            text += &format!(
                "witness in run {}: {} (`cowlab explore {} --policy {}` minimizes its schedule)\n",
                w.run + 1,
                w.state,
                r.test,
                r.policy
            );
        }
        (None, Strategy::Pct { depth }) => {
            text += &format!(
                "no witness; a depth-{depth} bug would have been found with probability >= {:.2}\n",
                r.pct_found().unwrap_or(0.0)
            );
        }
        (None, Strategy::Dfs { .. }) => text += "no witness\n",
    }
    if r.deadlocks > 0 {
        text += &format!(
            "{} under {}: deadlock in {} of {} runs (every thread waiting, none able to go; counted as negative){}\n",
            r.test,
            r.policy,
            r.deadlocks,
            r.runs,
            r.deadlock
                .as_ref()
                .map_or(String::new(), |why| format!(": e.g. {why}"))
        );
    }
    for (msg, n) in &r.errors {
        text += &format!(
            "{} under {}: error in {n} of {} runs: {msg}\n",
            r.test, r.policy, r.runs
        );
    }
    if r.stuck > 0 {
        text += &format!(
            "{} under {}: stuck in {} of {} runs (the watchdog stopped them)\n",
            r.test, r.policy, r.stuck, r.runs
        );
    }
    text
}

/// One cell of `cowlab suite`: test, policy, and what it gave or why it
/// could not run at all.
#[derive(Debug)]
struct SuiteCell {
    test: String,
    policy: String,
    outcome: Result<Outcome, Error>,
}

/// `cowlab suite NAME`: every test of the suite under every policy its
/// `expect` lines name; a table of observations, expected or not. The
/// tests of the "bare" suite are explored, the others run. A cell in
/// error does not stop the others.
pub fn suite(name: &str, runs: Option<u64>, json: bool, kvm_path: &str) -> i32 {
    let Some(tests) = suite_tests(name) else {
        return exit_code::USAGE;
    };
    let mut cells: Vec<SuiteCell> = Vec::new();
    for (test, src) in tests {
        let prepared = match Prepared::load(test, src) {
            Ok(p) => p,
            Err(e) => {
                error(format_args!("{test}: {e}"));
                return exit_code::USAGE;
            }
        };
        for expect in &prepared.compiled().test.expects {
            let Some(policy) = Policy::preset(&expect.policy) else {
                error(format_args!(
                    "{test}: expect names unknown policy '{}'",
                    expect.policy
                ));
                return exit_code::USAGE;
            };
            let outcome = match prepared.run(expect, policy, runs, kvm_path) {
                // Without KVM no cell can run: one line says so.
                Err(e) if e.kvm_unusable() => {
                    error(&e);
                    return e.exit_code();
                }
                r => r,
            };
            cells.push(SuiteCell {
                test: test.to_string(),
                policy: expect.policy.clone(),
                outcome,
            });
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
        .all(|c| c.outcome.as_ref().is_ok_and(Outcome::met));
    let errors: u64 = cells
        .iter()
        .map(|c| c.outcome.as_ref().map_or(1, Outcome::errors))
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
            .filter_map(|c| c.outcome.as_ref().ok().map(Outcome::json))
            .collect();
        let failed: Vec<serde_json::Value> = cells
            .iter()
            .filter_map(|c| {
                let e = c.outcome.as_ref().err()?;
                Some(
                    serde_json::json!({"test": c.test, "policy": c.policy, "error": e.to_string()}),
                )
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
    for c in cells {
        let Ok(o) = &c.outcome else {
            text += &format!(
                "{:<24} {:<24} {:<10} {:<10} {:>9} {:>9} {:>7}  ERROR\n",
                c.test, c.policy, "-", "-", "-", "-", "-"
            );
            continue;
        };
        let status = match (o.met(), o.errors() > 0) {
            (true, false) => "ok",
            (false, false) => "NOT MET",
            (true, true) => "ERRORS",
            (false, true) => "NOT MET, ERRORS",
        };
        let mode = match o {
            Outcome::Runs(_) => "",
            Outcome::Explored(_) => " (explored)",
        };
        text += &format!(
            "{:<24} {:<24} {:<10} {:<10} {:>9} {:>9} {:>7}  {status}{mode}\n",
            c.test,
            c.policy,
            o.observation(),
            o.expected().unwrap_or("-"),
            o.positive(),
            o.negative(),
            o.errors(),
        );
    }
    // What the table cannot say is said under it.
    for c in cells {
        match &c.outcome {
            Ok(o) => text += &o.notes(),
            Err(e) => text += &format!("{} under {}: could not run: {e}\n", c.test, c.policy),
        }
    }
    (text, code)
}

/// The built-in tests of suite `name`, or `None` after one line naming
/// the suites there are (for `suite` and `suite --native`).
pub(super) fn suite_tests(name: &str) -> Option<Vec<(&'static str, &'static str)>> {
    let tests = builtin::suite(name);
    if tests.is_empty() {
        error(format_args!(
            "unknown suite '{name}' (suites: {})",
            builtin::suites().join(", ")
        ));
        return None;
    }
    Some(tests)
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
            deadlocked: 0,
            deadlock: None,
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
        SuiteCell {
            test,
            policy: "mainline".into(),
            outcome: r.map(Outcome::Runs),
        }
    }

    /// A search of `test` under mainline expecting `expected`: `witnesses`
    /// of `runs`, some stuck, in error and deadlocked.
    fn explored(
        test: &str,
        expected: Verdict,
        runs: u64,
        witnesses: u64,
        (stuck, errors, deadlocks): (u64, u64, u64),
    ) -> SuiteCell {
        let mut r = ExploreResult {
            test: test.into(),
            policy: "mainline".into(),
            strategy: EXPLORE_STRATEGY,
            seed: EXPLORE_SEED,
            shards: vec![0],
            shard_count: 1,
            budget: Some(explore_budget(expected)),
            runs,
            made: runs + 1,
            histogram: BTreeMap::new(),
            witnesses,
            stuck,
            deadlocks,
            deadlock: (deadlocks > 0).then(|| "v0 waits at guest:await:1:go".into()),
            errors: BTreeMap::new(),
            witness: (witnesses > 0).then(|| explore::Witness {
                run: runs - 1,
                state: "P0:r1=1;".into(),
                schedule: vec!["P0@guest:go".into()],
                minimized: None,
                minimize_tried: false,
                replays: 0,
                reproduced: 0,
            }),
            exhausted: false,
            interrupted: false,
            diverged: 0,
            threads: 2,
            steps: 4,
            max_decisions: 6,
            search_ms: 1500,
            elapsed_ms: 1500,
            expected: None,
            met: None,
        };
        if errors > 0 {
            r.errors.insert("vcpu 1: panicked: boom".into(), errors);
        }
        let expects = [litmus::ast::Expect {
            policy: "mainline".into(),
            verdict: expected,
            pos: litmus::ast::Pos::default(),
        }];
        explore::judge(&mut r, &expects);
        SuiteCell {
            test: test.into(),
            policy: "mainline".into(),
            outcome: Ok(Outcome::Explored(r)),
        }
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

    #[test]
    fn explored_cells_are_marked_and_count_stuck_runs_as_errors_but_not_deadlocks() {
        let cells = [
            explored("bare-bug", Verdict::Sometimes, 38, 1, (0, 0, 5)),
            explored("bare-fixed", Verdict::Never, 300, 0, (0, 0, 101)),
        ];
        let (text, code) = suite_report("bare", &cells, false);
        assert_eq!(code, exit_code::OK, "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[1].starts_with("bare-bug ") && lines[1].ends_with("  ok (explored)"),
            "{text}"
        );
        // Sometimes / Sometimes, 1 witness, 37 other runs (5 deadlocked).
        let cols: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            cols[..7],
            [
                "bare-bug",
                "mainline",
                "Sometimes",
                "Sometimes",
                "1",
                "37",
                "0"
            ],
            "{text}"
        );
        let cols: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            cols[..7],
            ["bare-fixed", "mainline", "Never", "Never", "0", "300", "0"],
            "{text}"
        );
        assert!(
            text.contains("bare-bug under mainline: explored 38 interleavings (pct, depth 3, seed 1, budget 2000, 1.5 s): witness in run 38: P0:r1=1;"),
            "{text}"
        );
        assert!(
            text.contains("bare-fixed under mainline: deadlock in 101 of 300 runs"),
            "{text}"
        );

        let (json, code) = suite_report("bare", &cells, true);
        assert_eq!(code, exit_code::OK);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["all_met"], true, "{v}");
        assert_eq!(v["results"][0]["mode"], "explore", "{v}");
        assert_eq!(v["results"][0]["witnesses"], 1, "{v}");
        assert_eq!(v["results"][0]["strategy"], "pct", "{v}");
        assert_eq!(v["results"][1]["deadlocks"], 101, "{v}");

        // A stuck run or one in error is an error of the suite.
        for (stuck, errors) in [(1, 0), (0, 2)] {
            let cells = [explored("bare", Verdict::Never, 300, 0, (stuck, errors, 0))];
            let (text, code) = suite_report("bare", &cells, false);
            assert_eq!(code, exit_code::VM_ERROR, "{text}");
            assert!(
                text.lines()
                    .nth(1)
                    .unwrap()
                    .ends_with("  ERRORS (explored)"),
                "{text}"
            );
        }
    }

    #[test]
    fn an_explored_cell_fails_on_a_witness_under_never_and_on_none_under_sometimes() {
        for cell in [
            explored("bare", Verdict::Never, 12, 1, (0, 0, 0)),
            explored("bare", Verdict::Sometimes, 2000, 0, (0, 0, 0)),
        ] {
            let (text, code) = suite_report("bare", &[cell], false);
            assert_eq!(code, exit_code::FAILED, "{text}");
            assert!(
                text.lines()
                    .nth(1)
                    .unwrap()
                    .ends_with("  NOT MET (explored)"),
                "{text}"
            );
        }
    }

    #[test]
    fn the_bare_suite_is_explored_with_budgets_by_verdict() {
        assert!(is_explored("fork-vma-lock-bare"));
        assert!(!is_explored("fork-vma-lock"));
        assert!(!is_explored("fork-vma-lock-free"));
        assert!(!is_explored("no-such-test"));
        assert_eq!(explore_budget(Verdict::Never), 300);
        assert_eq!(explore_budget(Verdict::Sometimes), 2000);
        assert_eq!(explore_budget(Verdict::Always), 2000);
        for (test, src) in builtin::suite(EXPLORED_SUITE) {
            match Prepared::load(test, src) {
                Ok(Prepared::Explore { .. }) => {}
                Ok(Prepared::Runs(_)) => panic!("{test} would be run, not explored"),
                Err(e) => panic!("{test}: {e}"),
            }
        }
    }
}
