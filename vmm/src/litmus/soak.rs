//! `cowlab soak`: many chaos runs of litmus tests under the presets whose
//! `expect` line says `Never` (by default every built-in `*-free` test),
//! counting what must not happen there: false witnesses, `mm_verify`
//! violations, errors and stuck runs. Each (test, preset) cell is
//! [`run_test`] with a chaos seed; nothing here runs a VM itself.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ast::Verdict;
use super::compile::Compiled;
use super::run::{run_test, RunOptions};
use crate::hooks::Rule;
use crate::kvm::{exit_code, Error};
use crate::policy::Policy;

/// How to soak.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// Runs per cell and seed.
    pub runs: u64,
    /// The first chaos seed of each batch of `runs` (run i of a batch uses
    /// seed + i): one batch per seed, in every cell.
    pub seeds: Vec<u64>,
    /// Watchdog per run.
    pub timeout: Duration,
    /// A time budget for the whole soak, shared out evenly among the cells
    /// (what one leaves goes to the next); without it every cell makes all
    /// its runs.
    pub time: Option<Duration>,
    pub kvm_path: String,
    /// Rules added to each test's own (`--inject`).
    pub rules: Vec<Rule>,
}

/// A test under a preset where it expects `Never`.
#[derive(Debug, Clone)]
pub struct Cell {
    pub test: Arc<Compiled>,
    pub policy_name: String,
    pub policy: Policy,
}

/// The presets under which `test` expects `Never` (the last `expect` line
/// for a preset is the one that counts, as in `cowlab run`), as cells.
/// Every name is a preset: the parser refuses an `expect` line that names
/// anything else.
pub fn never_cells(test: &Arc<Compiled>) -> Vec<Cell> {
    let mut last: BTreeMap<&str, (usize, Verdict)> = BTreeMap::new();
    for (i, e) in test.test.expects.iter().enumerate() {
        last.insert(&e.policy, (i, e.verdict));
    }
    let mut never: Vec<(usize, &str)> = last
        .iter()
        .filter(|(_, (_, v))| *v == Verdict::Never)
        .map(|(p, (i, _))| (*i, *p))
        .collect();
    // In the order of the test's expect lines.
    never.sort();
    never
        .into_iter()
        .filter_map(|(_, name)| {
            Some(Cell {
                test: Arc::clone(test),
                policy_name: name.to_string(),
                policy: Policy::preset(name)?,
            })
        })
        .collect()
}

/// What the soak of one cell found.
#[derive(Debug, Clone, Default)]
pub struct CellReport {
    pub test: String,
    pub policy_name: String,
    /// Runs made (fewer than asked if the time budget ran out).
    pub runs: u64,
    /// Runs satisfying `exists` under a preset that expects `Never`.
    pub false_witnesses: u64,
    pub witness_seeds: Vec<u64>,
    /// Runs ended by an `mm_verify` violation.
    pub violations: u64,
    /// Runs in error, by message (violations included).
    pub errors: BTreeMap<String, u64>,
    pub error_seeds: Vec<u64>,
    /// Runs the watchdog ended, and their chaos seeds.
    pub stuck: u64,
    pub stuck_seeds: Vec<u64>,
    /// A batch that could not run at all, and why.
    pub failed: Option<String>,
    pub elapsed: Duration,
    /// The flags a replay needs besides `--chaos` and `--runs`.
    pub replay_flags: String,
}

impl CellReport {
    /// Runs in error other than violations.
    pub fn other_errors(&self) -> u64 {
        self.errors.values().sum::<u64>() - self.violations
    }

    /// Whether nothing that must not happen happened.
    pub fn clean(&self) -> bool {
        self.false_witnesses == 0
            && self.errors.is_empty()
            && self.stuck == 0
            && self.failed.is_none()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "test": self.test,
            "policy": self.policy_name,
            "runs": self.runs,
            "false_witnesses": self.false_witnesses,
            "witness_seeds": self.witness_seeds,
            "violations": self.violations,
            "errors": self.errors,
            "error_seeds": self.error_seeds,
            "stuck": self.stuck,
            "stuck_seeds": self.stuck_seeds,
            "failed": self.failed,
            "elapsed_s": self.elapsed.as_secs_f64(),
        })
    }
}

/// Soaks `cells`, calling `done` with each cell's report as it is made.
/// Fails only if KVM cannot be opened (no cell could run).
pub fn soak(
    cells: &[Cell],
    opts: &SoakOptions,
    mut done: impl FnMut(&CellReport),
) -> Result<Vec<CellReport>, Error> {
    let start = Instant::now();
    let mut reports = Vec::new();
    for (j, cell) in cells.iter().enumerate() {
        // Cell j may run until its share of the budget, and what the cells
        // before it left.
        let deadline = opts
            .time
            .map(|t| start + t.mul_f64((j + 1) as f64 / cells.len() as f64));
        let mut report = CellReport {
            test: cell.test.test.name.clone(),
            policy_name: cell.policy_name.clone(),
            ..CellReport::default()
        };
        let cell_start = Instant::now();
        for seed in &opts.seeds {
            let run_opts = RunOptions {
                runs: opts.runs,
                policy_name: cell.policy_name.clone(),
                policy: cell.policy,
                sets: Vec::new(),
                timeout: opts.timeout,
                kvm_path: opts.kvm_path.clone(),
                // A cell may take minutes: `test run i/N` on a terminal.
                progress: true,
                rules: opts.rules.clone(),
                schedule: None,
                chaos: Some(*seed),
                control: None,
                trace: None,
                deadline,
                until_witness: None,
            };
            let r = match run_test(&cell.test, &run_opts) {
                Ok(r) => r,
                Err(e) if e.kvm_unusable() => return Err(e),
                Err(e) => {
                    report.failed.get_or_insert(e.to_string());
                    continue;
                }
            };
            report.runs += r.runs;
            report.false_witnesses += r.positive;
            report.witness_seeds.extend(&r.witness_seeds);
            report.violations += r.violations;
            for (msg, n) in &r.errors {
                *report.errors.entry(msg.clone()).or_default() += n;
            }
            report.error_seeds.extend(&r.error_seeds);
            report.stuck += r.stuck;
            report.stuck_seeds.extend(&r.stuck_seeds);
            report.replay_flags = r.replay_flags.clone();
            if r.schedule_off {
                report.replay_flags += " --schedule none";
            }
        }
        report.elapsed = cell_start.elapsed();
        done(&report);
        reports.push(report);
    }
    Ok(reports)
}

/// The totals row and the exit status: 3 if any run ended in an error, a
/// violation or stuck (or a cell could not run), else 1 if any false
/// witness, else 0.
pub fn verdict(reports: &[CellReport]) -> (CellReport, i32) {
    let mut total = CellReport {
        test: "total".into(),
        ..CellReport::default()
    };
    for r in reports {
        total.runs += r.runs;
        total.false_witnesses += r.false_witnesses;
        total.violations += r.violations;
        for (msg, n) in &r.errors {
            *total.errors.entry(msg.clone()).or_default() += n;
        }
        total.stuck += r.stuck;
        total.elapsed += r.elapsed;
        if total.failed.is_none() {
            total.failed.clone_from(&r.failed);
        }
    }
    let code = if !total.errors.is_empty() || total.stuck > 0 || total.failed.is_some() {
        exit_code::VM_ERROR
    } else if total.false_witnesses > 0 {
        exit_code::FAILED
    } else {
        exit_code::OK
    };
    (total, code)
}

/// The table's header.
pub fn header() -> String {
    format!(
        "{:<26} {:<24} {:>7} {:>10} {:>10} {:>7} {:>6} {:>9}\n",
        "test", "policy", "runs", "witnesses", "violations", "errors", "stuck", "time"
    )
}

/// One row of the table.
pub fn row(r: &CellReport) -> String {
    format!(
        "{:<26} {:<24} {:>7} {:>10} {:>10} {:>7} {:>6} {:>8.1}s\n",
        r.test,
        r.policy_name,
        r.runs,
        r.false_witnesses,
        r.violations,
        r.other_errors() + u64::from(r.failed.is_some()),
        r.stuck,
        r.elapsed.as_secs_f64()
    )
}

/// What went wrong in a cell, a line each, with how to replay it.
pub fn details(r: &CellReport) -> String {
    let mut out = String::new();
    let under = format!("{} under {}", r.test, r.policy_name);
    let replay = |seed: u64| {
        format!(
            "cowlab run {} --chaos {seed} --runs 1 {}",
            r.test, r.replay_flags
        )
    };
    if let Some(e) = &r.failed {
        out += &format!("{under}: could not run: {e}\n");
    }
    if let Some(seed) = r.witness_seeds.first() {
        let seeds: Vec<String> = r.witness_seeds.iter().take(5).map(u64::to_string).collect();
        out += &format!(
            "{under}: false witness in {} of {} runs (seeds {}); replay: {}\n",
            r.false_witnesses,
            r.runs,
            seeds.join(", "),
            replay(*seed)
        );
    }
    for (msg, n) in &r.errors {
        out += &format!("{under}: error in {n} of {} runs: {msg}\n", r.runs);
    }
    if let Some(seed) = r.error_seeds.first() {
        out += &format!("{under}: first error's replay: {}\n", replay(*seed));
    }
    if r.stuck > 0 {
        out += &format!(
            "{under}: stuck in {} of {} runs (the watchdog stopped them)\n",
            r.stuck, r.runs
        );
    }
    if let Some(seed) = r.stuck_seeds.first() {
        out += &format!("{under}: first stuck run's replay: {}\n", replay(*seed));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cells(src: &str) -> Vec<(String, String)> {
        let test = Arc::new(crate::litmus::load(src).unwrap());
        never_cells(&test)
            .into_iter()
            .map(|c| (c.test.test.name.clone(), c.policy_name))
            .collect()
    }

    #[test]
    fn a_test_is_soaked_where_its_own_expect_lines_say_never() {
        let src = "cowlab t\n{ region buf 1 rw }\nP0 {\n  r1 = buf[0]\n}\nexists (P0:r1 = 1)\n\
                   expect linux-5.7 Sometimes\nexpect mainline Never\nexpect linux-5.8 Never\n\
                   expect linux-5.10 Never\nexpect linux-5.10 Always\n";
        // The last line for a preset counts: linux-5.10 is not soaked.
        assert_eq!(
            cells(src),
            [
                ("t".into(), "mainline".into()),
                ("t".into(), "linux-5.8".into())
            ]
        );
        let free = crate::litmus::builtin::source("fork-pinned-tearing-free").unwrap();
        let policies: Vec<String> = cells(free).into_iter().map(|c| c.1).collect();
        assert!(!policies.contains(&"mainline".to_string()), "{policies:?}");
        assert!(policies.contains(&"linux-5.7".to_string()), "{policies:?}");
    }

    #[test]
    fn the_exit_status_puts_errors_before_false_witnesses() {
        let clean = CellReport {
            runs: 10,
            ..CellReport::default()
        };
        assert_eq!(verdict(std::slice::from_ref(&clean)).1, exit_code::OK);
        let witness = CellReport {
            false_witnesses: 1,
            ..clean.clone()
        };
        assert_eq!(
            verdict(&[clean.clone(), witness.clone()]).1,
            exit_code::FAILED
        );
        let stuck = CellReport {
            stuck: 1,
            ..clean.clone()
        };
        assert_eq!(verdict(&[witness.clone(), stuck]).1, exit_code::VM_ERROR);
        let mut error = clean.clone();
        error.errors.insert("mm_verify: x".into(), 2);
        error.violations = 2;
        let (total, code) = verdict(&[witness, error.clone()]);
        assert_eq!(code, exit_code::VM_ERROR);
        assert_eq!((total.violations, total.other_errors()), (2, 0));
        assert!(details(&error).contains("error in 2 of 10 runs: mm_verify: x"));
    }
}
