//! `cowlab explore` (docs/exploration.md): searching the interleavings of a
//! litmus test for a witness of its `exists` clause, with nobody writing a
//! schedule.
//!
//! Each run boots a fresh VM with the test compiled for exploration (a
//! hook before every `await`) and the hooks in exploration mode
//! (`hooks::explore`): every point parks its vCPU and the run's
//! [`strategy::Guide`] picks who goes. Runs are stateless: a run replays a
//! prefix of decisions from the start. On a witness the interleaving is
//! turned into a `schedule { … }` block and minimized by replaying it as a
//! forced schedule ([`minimize`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cowlab_abi::Program;
use serde::{Deserialize, Serialize};

use super::compile::Compiled;
use super::run::{holds, run_error, run_state};
use super::verdict::key;
use crate::hooks::{ChooserSlot, Decision};
use crate::kvm::{Error, RunReport, Vm, VmConfig};
use crate::policy::Policy;

pub mod minimize;
pub mod report;
pub mod strategy;

use strategy::{Dfs, Guide, Pct};

/// How to search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "strategy")]
pub enum Strategy {
    /// Every interleaving with at most `bound` preemptions.
    Dfs { bound: u32 },
    /// Random priorities with `depth` − 1 change points per run.
    Pct { depth: u32 },
}

/// Called after every run with the result so far, and once more with
/// `true` when the search is over (before a witness is minimized).
pub type Progress = Arc<dyn Fn(&ExploreResult, bool) + Send + Sync>;

/// What `cowlab explore` was asked.
#[derive(Clone)]
pub struct ExploreOptions {
    pub strategy: Strategy,
    pub policy_name: String,
    pub policy: Policy,
    pub kvm_path: String,
    /// Watchdog per run.
    pub timeout: Duration,
    /// Runs in all (over every shard); `None`: until exhausted (dfs).
    pub budget: Option<u64>,
    /// Start no run after this long.
    pub time: Option<Duration>,
    pub seed: u64,
    /// This process's shard: (index from 0, count).
    pub shard: (u64, u64),
    /// Go on after the first witness (to count them).
    pub keep_going: bool,
    /// Minimize the first witness's schedule.
    pub minimize: bool,
    /// Called after every run with the result so far (a progress bar).
    pub progress: Option<Progress>,
    /// Set from outside (Ctrl-C) to end the search after the current run,
    /// as `time` does: the result so far is reported.
    pub stop: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl std::fmt::Debug for ExploreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExploreOptions")
            .field("strategy", &self.strategy)
            .field("policy", &self.policy_name)
            .field("budget", &self.budget)
            .field("seed", &self.seed)
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}

impl ExploreOptions {
    /// A search of `strategy` under `policy_name`: a 10 s watchdog per run,
    /// seed 1, one shard, stop at the first witness and minimize it.
    pub fn new(strategy: Strategy, policy_name: &str, policy: Policy, kvm_path: &str) -> Self {
        ExploreOptions {
            strategy,
            policy_name: policy_name.to_string(),
            policy,
            kvm_path: kvm_path.to_string(),
            timeout: Duration::from_secs(10),
            budget: None,
            time: None,
            seed: 1,
            shard: (0, 1),
            keep_going: false,
            minimize: true,
            progress: None,
            stop: None,
        }
    }
}

/// A witness: the run that found it and its interleaving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Witness {
    /// The run's index in the whole search (0-based, over every shard).
    pub run: u64,
    /// Its final state.
    pub state: String,
    /// The interleaving as a schedule (litmus syntax), every decision kept.
    pub schedule: Vec<String>,
    /// Minimized (steps removed while the witness persists), if asked.
    pub minimized: Option<Vec<String>>,
    /// Minimizing was asked (and, with `minimized` empty, failed).
    #[serde(default)]
    pub minimize_tried: bool,
    /// Replays of the minimized schedule, and how many gave the witness.
    pub replays: u64,
    pub reproduced: u64,
}

/// The result of a search (of one shard, or merged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExploreResult {
    pub test: String,
    pub policy: String,
    #[serde(flatten)]
    pub strategy: Strategy,
    pub seed: u64,
    /// The shards this result covers (indices) out of `shard_count`.
    pub shards: Vec<u64>,
    pub shard_count: u64,
    pub budget: Option<u64>,
    /// Runs this result counts (a shard's own).
    pub runs: u64,
    /// Runs made in all (a DFS shard also replays prefixes it shares).
    pub made: u64,
    /// Final states and how many runs ended in each (`stuck;`, `error;`
    /// included).
    pub histogram: BTreeMap<String, u64>,
    pub witnesses: u64,
    /// Runs the watchdog ended.
    pub stuck: u64,
    /// Runs where every thread waited with none able to go, and where
    /// they waited in the first.
    pub deadlocks: u64,
    pub deadlock: Option<String>,
    pub errors: BTreeMap<String, u64>,
    /// The first witness (lowest run index).
    pub witness: Option<Witness>,
    /// DFS: every interleaving within the bound was run.
    pub exhausted: bool,
    /// Ended early by Ctrl-C.
    #[serde(default)]
    pub interrupted: bool,
    /// DFS: runs whose replay did not follow their prefix.
    pub diverged: u64,
    /// PCT: the threads (n) and decisions (k) of the probe run, for the
    /// bound.
    pub threads: u64,
    pub steps: u64,
    /// Decisions made per run, largest.
    pub max_decisions: u64,
    /// The search's time (runs only), and in all (with minimizing).
    pub search_ms: u64,
    pub elapsed_ms: u64,
    /// The expectation for the policy, and whether the result meets it.
    pub expected: Option<String>,
    pub met: Option<bool>,
}

impl ExploreResult {
    /// PCT's per-run probability of hitting a given bug of depth `d`.
    pub fn pct_per_run(&self) -> Option<f64> {
        match self.strategy {
            Strategy::Pct { depth } => {
                let k = self.steps.max(1) as f64;
                Some(1.0 / (self.threads.max(1) as f64 * k.powi(depth as i32 - 1)))
            }
            Strategy::Dfs { .. } => None,
        }
    }

    /// PCT: the probability that `runs` runs find a given depth-d bug.
    pub fn pct_found(&self) -> Option<f64> {
        let p = self.pct_per_run()?;
        Some(1.0 - (1.0 - p).powf(self.runs as f64))
    }
}

/// The errors of a search.
#[derive(Debug, thiserror::Error)]
pub enum ExploreError {
    #[error("{0}")]
    Vm(#[from] Error),
    #[error("cannot explore {0}: it has no thread that hits a point")]
    NoPoints(String),
    #[error("the first run did not end within --timeout {0} s: give it longer")]
    ProbeStuck(f64),
}

/// One explored run.
struct Explored {
    report: RunReport,
    decisions: Vec<Decision>,
}

/// Boots one VM running `test` (compiled for exploration) with `guide`.
fn explored_run(
    test: &Arc<Compiled>,
    opts: &ExploreOptions,
    guide: Guide,
    run: u64,
) -> Result<Explored, Error> {
    let guide: Arc<Mutex<dyn crate::hooks::Chooser>> = Arc::new(Mutex::new(guide));
    let config = VmConfig {
        program: Program::Litmus,
        policy: opts.policy,
        plan: Some(Arc::clone(&test.plan)),
        check: true,
        rules: test.rules.clone(),
        kvm_path: opts.kvm_path.clone(),
        run: run + 1,
        explore: Some(ChooserSlot(guide.clone())),
        ..VmConfig::default()
    };
    let mut vm = Vm::new(&config)?;
    let report = vm.wait(Some(opts.timeout), |_| {});
    drop(vm);
    let decisions = report.decisions.clone().unwrap_or_default();
    Ok(Explored { report, decisions })
}

/// Runs of the non-preemptive probe PCT takes its n and k from.
const PROBES: u64 = 3;

/// Counts a run whose VM could not start as an error.
fn vm_error(result: &mut ExploreResult, e: &Error) {
    *result
        .errors
        .entry(format!("cannot start the VM: {e}"))
        .or_default() += 1;
    *result.histogram.entry("error;".into()).or_default() += 1;
}

/// How one run ended, for the histogram.
enum RunEnd {
    Witness(String),
    Other(String),
    Deadlock(String),
    Stuck,
    Error(String),
}

fn classify(test: &Compiled, report: &RunReport) -> RunEnd {
    if let Some((e, _)) = run_error(report) {
        return RunEnd::Error(e);
    }
    if let Some(why) = &report.deadlock {
        return RunEnd::Deadlock(why.clone());
    }
    if report.timed_out.is_some() {
        return RunEnd::Stuck;
    }
    let state = run_state(test, report);
    let k = key(&test.test.exists, &state);
    if holds(&test.test.exists, &state) {
        RunEnd::Witness(k)
    } else {
        RunEnd::Other(k)
    }
}

/// Searches `test` (compiled with [`super::compile_for_explore`]) for a
/// witness; `replay` is the same test compiled normally, which minimization
/// replays schedules on.
pub fn explore(
    test: &Arc<Compiled>,
    replay: &Arc<Compiled>,
    opts: &ExploreOptions,
) -> Result<ExploreResult, ExploreError> {
    let start = Instant::now();
    let (shard, shards) = opts.shard;
    // The probe: the non-preemptive run every shard makes first, which
    // gives PCT its n and k (the same for every shard).
    let probe = explored_run(test, opts, Guide::new(Vec::new(), None), 0)?;
    if probe.report.timed_out.is_some() && probe.report.deadlock.is_none() {
        return Err(ExploreError::ProbeStuck(opts.timeout.as_secs_f64()));
    }
    // Only the vCPUs' starts: there is nothing to interleave.
    let starts_only = probe
        .decisions
        .iter()
        .all(|d| d.enabled.iter().all(|p| p.point == crate::hooks::START));
    if starts_only {
        return Err(ExploreError::NoPoints(test.test.name.clone()));
    }
    // PCT's n and k: the threads, and the decisions with a choice to make,
    // of the non-preemptive run; the most of a few, as a thread that takes
    // a lock a little later makes a run with fewer choices.
    let mut probes = vec![probe.decisions.clone()];
    if matches!(opts.strategy, Strategy::Pct { .. }) {
        for i in 1..PROBES {
            probes.extend(
                explored_run(test, opts, Guide::new(Vec::new(), None), i).map(|p| p.decisions),
            );
        }
    }
    let threads = probes
        .iter()
        .map(|log| {
            log.iter()
                .flat_map(|d| d.enabled.iter().map(|p| p.cpu))
                .collect::<std::collections::BTreeSet<_>>()
                .len() as u64
        })
        .max()
        .unwrap_or(1);
    let steps = probes
        .iter()
        .map(|log| log.iter().filter(|d| d.enabled.len() > 1).count() as u64)
        .max()
        .unwrap_or(1)
        .max(1);
    let mut result = ExploreResult {
        test: test.test.name.clone(),
        policy: opts.policy_name.clone(),
        strategy: opts.strategy,
        seed: opts.seed,
        shards: vec![shard],
        shard_count: shards,
        budget: opts.budget,
        runs: 0,
        made: probes.len() as u64,
        histogram: BTreeMap::new(),
        witnesses: 0,
        stuck: 0,
        deadlocks: 0,
        deadlock: None,
        errors: BTreeMap::new(),
        witness: None,
        exhausted: false,
        interrupted: false,
        diverged: 0,
        threads,
        steps,
        max_decisions: probe.decisions.len() as u64,
        search_ms: 0,
        elapsed_ms: 0,
        expected: None,
        met: None,
    };
    let mut dfs = match opts.strategy {
        Strategy::Dfs { bound } => Some(Dfs::new(bound, opts.shard)),
        Strategy::Pct { .. } => None,
    };
    let mut first: Option<(u64, Vec<Decision>, String)> = None;
    // PCT: run r of the whole search belongs to shard r mod N.
    let mut r = shard;
    // The probe is DFS's first run: recorded, and counted by its owner.
    let mut pending = Some(probe);
    loop {
        let stopped = opts
            .stop
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed));
        if stopped {
            result.interrupted = true;
        }
        if stopped
            || opts.time.is_some_and(|t| start.elapsed() >= t)
            || opts.budget.is_some_and(|b| match &dfs {
                Some(_) => result.runs >= b.div_ceil(shards),
                None => r >= b,
            })
        {
            break;
        }
        let (index, run) = match (&mut dfs, opts.strategy) {
            (Some(dfs), _) => {
                let Some(prefix) = dfs.next_prefix() else {
                    result.exhausted = true;
                    break;
                };
                let run = match pending.take() {
                    Some(p) => p,
                    None => {
                        result.made += 1;
                        match explored_run(test, opts, Guide::new(prefix, None), result.made) {
                            Ok(run) => run,
                            Err(e) => {
                                // Without its decisions the search cannot
                                // go on from here: it ends, counted.
                                result.runs += 1;
                                vm_error(&mut result, &e);
                                break;
                            }
                        }
                    }
                };
                dfs.record(&run.decisions);
                result.diverged = dfs.diverged;
                if !dfs.counts(&run.decisions) {
                    continue;
                }
                (result.made - 1, run)
            }
            (None, Strategy::Pct { depth }) => {
                pending = None;
                let pct = Pct::new(opts.seed, r, depth, steps);
                result.made += 1;
                r += shards;
                match explored_run(test, opts, Guide::new(Vec::new(), Some(pct)), r - shards) {
                    Ok(run) => (r - shards, run),
                    Err(e) => {
                        // This run's VM did not start: counted, the others go on.
                        result.runs += 1;
                        vm_error(&mut result, &e);
                        continue;
                    }
                }
            }
            (None, Strategy::Dfs { .. }) => unreachable!("dfs has its stack"),
        };
        if std::env::var_os("COWLAB_EXPLORE_DEBUG").is_some() {
            let steps: Vec<String> = run
                .decisions
                .iter()
                .map(|d| {
                    let p = d.enabled.iter().find(|p| p.cpu == d.chosen);
                    format!(
                        "v{}@{}{}{}",
                        d.chosen,
                        p.map_or("?", |p| p.point.as_str()),
                        p.and_then(|p| p.addr)
                            .map_or(String::new(), |a| format!("[{a:#x}]")),
                        if d.enabled.len() > 1 {
                            format!("/{}", d.enabled.len())
                        } else {
                            String::new()
                        }
                    )
                })
                .collect();
            eprintln!("run {index}: {}", steps.join(" "));
        }
        result.runs += 1;
        result.max_decisions = result.max_decisions.max(run.decisions.len() as u64);
        let state = match classify(test, &run.report) {
            RunEnd::Witness(k) => {
                result.witnesses += 1;
                if first.as_ref().is_none_or(|(i, _, _)| index < *i) {
                    first = Some((index, run.decisions.clone(), k.clone()));
                }
                k
            }
            RunEnd::Other(k) => k,
            RunEnd::Deadlock(why) => {
                result.deadlocks += 1;
                result.deadlock.get_or_insert(why);
                "deadlock;".into()
            }
            RunEnd::Stuck => {
                result.stuck += 1;
                "stuck;".into()
            }
            RunEnd::Error(e) => {
                *result.errors.entry(e).or_default() += 1;
                "error;".into()
            }
        };
        *result.histogram.entry(state).or_default() += 1;
        result.search_ms = start.elapsed().as_millis() as u64;
        if let Some(p) = &opts.progress {
            p(&result, false);
        }
        if first.is_some() && !opts.keep_going {
            break;
        }
    }
    result.search_ms = start.elapsed().as_millis() as u64;
    if let Some(p) = &opts.progress {
        p(&result, true);
    }
    if let Some((run, decisions, state)) = first {
        let schedule = minimize::schedule_of(test, &decisions);
        let shown = minimize::stretches(&schedule);
        let mut witness = Witness {
            run,
            state,
            schedule: shown.iter().map(|s| s.text.clone()).collect(),
            minimized: None,
            minimize_tried: opts.minimize,
            replays: 0,
            reproduced: 0,
        };
        if opts.minimize && !result.interrupted {
            let m = minimize::minimize(replay, opts, schedule);
            witness.minimized = m.steps.map(|s| s.iter().map(|s| s.text.clone()).collect());
            witness.replays = m.replays;
            witness.reproduced = m.reproduced;
        }
        result.witness = Some(witness);
    }
    result.elapsed_ms = start.elapsed().as_millis() as u64;
    judge(&mut result, &test.test.expects);
    Ok(result)
}

/// Sets the expectation for the policy and whether the search meets it: a
/// witness refutes `Never`; `Sometimes` and `Always` need one (a search
/// can show that an interleaving exists, not that every one is a witness).
pub fn judge(result: &mut ExploreResult, expects: &[super::ast::Expect]) {
    let Some(e) = expects.iter().rev().find(|e| e.policy == result.policy) else {
        return;
    };
    if (result.shards.len() as u64) < result.shard_count && result.witnesses == 0 {
        // Part of a search: only a witness says anything (merge the rest).
        result.expected = Some(e.verdict.as_str().to_string());
        return;
    }
    result.expected = Some(e.verdict.as_str().to_string());
    result.met = match (e.verdict, result.witnesses > 0) {
        (super::ast::Verdict::Never, found) => Some(!found),
        (_, true) => Some(true),
        (_, false) => Some(false),
    };
}

/// The errors of merging shard results.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MergeError {
    #[error("nothing to merge")]
    Empty,
    #[error("results of different searches: {0}")]
    Different(String),
    #[error("shard {0} appears twice")]
    Twice(u64),
}

/// Combines the results of shards of one search (same test, policy,
/// strategy, seed, shard count and budget).
pub fn merge(
    parts: Vec<ExploreResult>,
    expects: Option<&[super::ast::Expect]>,
) -> Result<ExploreResult, MergeError> {
    let mut parts = parts.into_iter();
    let mut m = parts.next().ok_or(MergeError::Empty)?;
    for p in parts {
        let same = |what: &str, a: String, b: String| {
            if a == b {
                Ok(())
            } else {
                Err(MergeError::Different(format!("{what} {a} vs {b}")))
            }
        };
        same("test", m.test.clone(), p.test.clone())?;
        same("policy", m.policy.clone(), p.policy.clone())?;
        same(
            "strategy",
            format!("{:?}", m.strategy),
            format!("{:?}", p.strategy),
        )?;
        same("seed", m.seed.to_string(), p.seed.to_string())?;
        same(
            "shard count",
            m.shard_count.to_string(),
            p.shard_count.to_string(),
        )?;
        same(
            "budget",
            format!("{:?}", m.budget),
            format!("{:?}", p.budget),
        )?;
        if let Some(s) = p.shards.iter().find(|s| m.shards.contains(s)) {
            return Err(MergeError::Twice(*s));
        }
        m.shards.extend(&p.shards);
        m.runs = m.runs.saturating_add(p.runs);
        m.made = m.made.saturating_add(p.made);
        for (k, n) in p.histogram {
            let e = m.histogram.entry(k).or_default();
            *e = e.saturating_add(n);
        }
        for (k, n) in p.errors {
            let e = m.errors.entry(k).or_default();
            *e = e.saturating_add(n);
        }
        m.witnesses = m.witnesses.saturating_add(p.witnesses);
        m.stuck = m.stuck.saturating_add(p.stuck);
        m.deadlocks = m.deadlocks.saturating_add(p.deadlocks);
        if m.deadlock.is_none() {
            m.deadlock = p.deadlock;
        }
        m.diverged = m.diverged.saturating_add(p.diverged);
        m.exhausted &= p.exhausted;
        m.interrupted |= p.interrupted;
        m.max_decisions = m.max_decisions.max(p.max_decisions);
        m.elapsed_ms = m.elapsed_ms.max(p.elapsed_ms);
        m.search_ms = m.search_ms.max(p.search_ms);
        if let Some(w) = p.witness {
            if m.witness.as_ref().is_none_or(|mw| w.run < mw.run) {
                m.witness = Some(w);
            }
        }
    }
    m.shards.sort_unstable();
    // The expectation, judged again over the whole.
    m.met = None;
    m.expected = None;
    if let Some(expects) = expects {
        judge(&mut m, expects);
    }
    Ok(m)
}
