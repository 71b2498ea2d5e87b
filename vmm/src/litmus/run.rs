//! Running a litmus test many times and reporting like litmus7: the
//! histogram of final states, the witnesses of `exists`, the observation
//! and whether the `expect` line for the policy holds.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cowlab_abi::Program;

use super::ast::Status;
use super::compile::Compiled;
pub use super::result::{LitmusResult, WitnessOrder};
pub use super::verdict::{holds, RunState, ThreadEnd};
use super::verdict::{key, observe};
use crate::hooks::{Rule, Step};
use crate::kvm::{Error, Outcome, RunObserver, RunReport, Vm, VmConfig};
use crate::policy::Policy;
use crate::trace::{Kind, Recorder};

/// How to run a test.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub runs: u64,
    /// The preset name (for `expect` lines) and the policy (preset + `--set`).
    pub policy_name: String,
    pub policy: Policy,
    /// The `--set knob=value` settings in `policy`, as written: a preset so
    /// changed is no preset an `expect` line names, so none is checked,
    /// and a replay must set them again.
    pub sets: Vec<String>,
    /// Watchdog per run.
    pub timeout: Duration,
    pub kvm_path: String,
    /// Draw a progress bar on stderr (only if it is a terminal).
    pub progress: bool,
    /// Rules added to the test's own, a schedule replacing its own, and a
    /// chaos seed (run i uses seed + i).
    pub rules: Vec<Rule>,
    pub schedule: Option<Vec<Step>>,
    pub chaos: Option<u64>,
    /// Who drives the runs from outside (the control socket's controller,
    /// if `--control`).
    pub control: Option<Arc<dyn RunObserver>>,
    /// Record a trace (`--trace`): the recorder, and whether to keep only
    /// the runs that satisfied `exists` (`--trace-witnesses-only`).
    pub trace: Option<(Arc<Recorder>, bool)>,
    /// Start no run after this (a time budget): fewer runs are made.
    pub deadline: Option<Instant>,
    /// Go on past `runs` while no run has satisfied `exists`, up to this
    /// many runs in all (a suite cell expected `Sometimes`: `runs N max M`).
    pub until_witness: Option<u64>,
}

impl RunOptions {
    /// `runs` plain runs under `policy_name`: a 30 s watchdog, no progress
    /// bar, no rules or schedule of the caller's, no chaos, socket, trace
    /// or budget. Callers change what they need with `..`.
    pub fn plain(runs: u64, policy_name: &str, policy: Policy, kvm_path: &str) -> RunOptions {
        RunOptions {
            runs: runs.max(1),
            policy_name: policy_name.to_string(),
            policy,
            sets: Vec::new(),
            timeout: Duration::from_secs(30),
            kvm_path: kvm_path.to_string(),
            progress: false,
            rules: Vec::new(),
            schedule: None,
            chaos: None,
            control: None,
            trace: None,
            deadline: None,
            until_witness: None,
        }
    }
}

/// One run's threads from the VM report.
pub(crate) fn run_state(test: &Compiled, report: &RunReport) -> RunState {
    let mut state = RunState::new();
    for v in &report.vcpus {
        let base = test
            .names
            .get(&v.litmus_pc)
            .cloned()
            .unwrap_or_else(|| format!("vcpu{}", v.id));
        let mut name = base.clone();
        let mut n = 2;
        while state.contains_key(&name) {
            name = format!("{base}#{n}");
            n += 1;
        }
        let end = match (&v.outcome, v.regs) {
            (Outcome::Exited(_), Some(regs)) => ThreadEnd::Ok(regs),
            (Outcome::Segv { .. }, _) => ThreadEnd::Status(Status::Segv, "segv"),
            (Outcome::Oom { .. }, _) => ThreadEnd::Status(Status::Oom, "oom"),
            (Outcome::Stopped { .. }, _) => ThreadEnd::Status(Status::Crashed, "stuck"),
            _ => ThreadEnd::Status(Status::Crashed, "crashed"),
        };
        state.insert(name, end);
    }
    state
}

/// Why a run ended in an error, if it did: the first VMM error (or panic)
/// of a vCPU, else the first `mm_verify` violation (then `true`).
pub fn run_error(report: &RunReport) -> Option<(String, bool)> {
    report
        .vcpus
        .iter()
        .find_map(|v| match &v.outcome {
            Outcome::Error(e) => Some((format!("vcpu {}: {e}", v.id), false)),
            _ => None,
        })
        .or_else(|| {
            let v = report.violations.first()?;
            Some((format!("mm_verify: {v}"), true))
        })
}

/// Runs `test` `opts.runs` times. A run that ends in an error (see
/// [`run_error`]) is counted as the state `error;` with its message and the
/// other runs go on; only a VM that cannot be created for the first run
/// (KVM missing, say), a bad control-socket setting, or a trace that cannot
/// be written, fails the whole command.
pub fn run_test(test: &Arc<Compiled>, opts: &RunOptions) -> Result<LitmusResult, Error> {
    let start = Instant::now();
    let mut histogram: BTreeMap<String, (u64, bool)> = BTreeMap::new();
    let show_progress = opts.progress && opts.runs >= 50 && std::io::stderr().is_terminal();
    let mut last_draw = Instant::now();
    let mut unreachable: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let (mut error_seeds, mut stuck, mut violations) = (Vec::new(), 0, 0);
    let mut stuck_seeds = Vec::new();
    let (mut deadlocked, mut deadlock) = (0, None);
    let mut witness_seeds = Vec::new();
    let mut orders = Vec::new();
    if test.test.schedule_required && opts.schedule.is_some() {
        return Err(Error::Config(format!(
            "{}: its exists clause is a witness only under its own schedule \
             ('schedule required'), so --schedule cannot remove or replace it",
            test.test.name
        )));
    }
    let schedule = opts
        .schedule
        .clone()
        .unwrap_or_else(|| test.schedule.clone());
    // Forced, the test runs with a hook before every `await`, so that a
    // thread spinning in an unsatisfied `await` counts as at rest between
    // steps (hooks::Hooks::set_schedule_with_words) rather than being
    // given a settle time of CPU first; and its awaits sleep in the VMM
    // after a short spin, leaving the host's CPUs to the threads the
    // schedule waits for.
    let with_await_hooks;
    let test = if schedule.is_empty() {
        test
    } else {
        with_await_hooks = Arc::new(
            super::compile_for_schedule(&test.test)
                .map_err(|e| Error::Config(format!("cannot compile {}: {e}", test.test.name)))?,
        );
        &with_await_hooks
    };
    let rules: Vec<Rule> = test.rules.iter().chain(&opts.rules).cloned().collect();
    let mut done = 0;
    let mut rule_totals: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    if let Some(ctl) = &opts.control {
        ctl.begin(&test.test.name, &opts.policy_name, opts.runs);
    }
    let mut witnesses = 0u64;
    let most = opts.until_witness.unwrap_or(0).max(opts.runs);
    for i in 0..most {
        if i >= opts.runs && witnesses > 0 {
            break;
        }
        if opts.control.as_ref().is_some_and(|c| c.quit_requested())
            || opts.deadline.is_some_and(|d| Instant::now() >= d)
        {
            break;
        }
        let seed = opts.chaos.map(|s| s.wrapping_add(i));
        if let Some((t, _)) = &opts.trace {
            t.begin_run(i + 1, &format!("{} ({})", test.test.name, opts.policy_name));
        }
        let report = match one_run(test, opts, &rules, &schedule, seed, i + 1, true) {
            Ok(report) => report,
            // Nothing ran yet: the command cannot run VMs at all.
            Err(e) if done == 0 => return Err(e),
            Err(e @ Error::Config(_)) => return Err(e),
            Err(e) => {
                // A VM that could not start is this run's error.
                let msg = format!("cannot start the VM: {e}");
                if let Some((t, _)) = &opts.trace {
                    t.end_run(crate::trace::RUN_END_ERROR, &msg, true)
                        .map_err(|e| Error::Run(format!("--trace: {e}")))?;
                }
                if let Some(ctl) = &opts.control {
                    let outcome = format!("error: {msg}");
                    ctl.detach(i + 1, &outcome, crate::trace::RUN_END_ERROR);
                }
                *errors.entry(msg).or_default() += 1;
                error_seeds.extend(seed);
                histogram.entry("error;".into()).or_insert((0, false)).0 += 1;
                done += 1;
                continue;
            }
        };
        if opts.control.as_ref().is_some_and(|c| c.quit_requested()) {
            // Cut short by `quit`: its threads were stopped, not finished.
            if let Some(ctl) = &opts.control {
                ctl.detach(i + 1, "quit", crate::trace::RUN_END_OTHER);
            }
            break;
        }
        done += 1;
        for (rule, matched, acted) in &report.rule_counts {
            let t = rule_totals.entry(rule.clone()).or_default();
            t.0 += matched;
            t.1 += acted;
        }
        if report.timed_out.is_some() {
            stuck += 1;
            stuck_seeds.extend(seed);
            if let Some(why) = &report.deadlock {
                deadlocked += 1;
                deadlock.get_or_insert_with(|| why.clone());
            }
        }
        let (error, violation) = match run_error(&report) {
            Some((e, v)) => (Some(e), v),
            None => (None, false),
        };
        let state = run_state(test, &report);
        let state_key = match &error {
            Some(_) => "error;".to_string(),
            None => key(&test.test.exists, &state),
        };
        let witness =
            error.is_none() && report.unreachable.is_none() && holds(&test.test.exists, &state);
        // The run's end as a trace's RunEnd codes it.
        let end = match &error {
            Some(_) => crate::trace::RUN_END_ERROR,
            None => crate::trace::run_end_code(report.unreachable.is_some(), Some(witness)),
        };
        let outcome = match (&error, &report.unreachable) {
            (Some(e), _) => format!("error: {e}"),
            (None, Some(_)) => "unreachable".into(),
            (None, None) => state_key.clone(),
        };
        if let Some((t, witnesses_only)) = &opts.trace {
            trace_regs(t, &report);
            let text = if error.is_some() {
                &outcome
            } else {
                &state_key
            };
            t.end_run(end, text, witness || !witnesses_only)
                .map_err(|e| Error::Run(format!("--trace: {e}")))?;
        }
        if let Some(ctl) = &opts.control {
            if let Some(t) = ctl.open_trace() {
                trace_regs(&t, &report);
            }
            ctl.detach(i + 1, &outcome, end);
        }
        if let Some(e) = error {
            // No final state to speak of, and never a witness: the others
            // go on.
            *errors.entry(e).or_default() += 1;
            error_seeds.extend(seed);
            violations += u64::from(violation);
            histogram.entry(state_key).or_insert((0, false)).0 += 1;
            continue;
        }
        if let Some(why) = &report.unreachable {
            *unreachable.entry(why.clone()).or_default() += 1;
            histogram
                .entry("unreachable;".into())
                .or_insert((0, false))
                .0 += 1;
            continue;
        }
        let entry = histogram.entry(state_key).or_insert((0, witness));
        entry.0 += 1;
        witnesses += u64::from(witness);
        if let (true, Some(seed)) = (witness, seed) {
            if let Some(order) = report.hit_order.as_deref() {
                if orders.len() < WITNESS_ORDERS {
                    orders.extend(crate::hooks::witness_schedule(order).map(|s| (i + 1, seed, s)));
                }
            }
            witness_seeds.push(seed);
        }
        if show_progress && last_draw.elapsed() > Duration::from_millis(100) {
            eprint!("\r{} run {}/{}", test.test.name, i + 1, opts.runs);
            last_draw = Instant::now();
        }
    }
    if show_progress {
        eprint!("\r\x1b[K");
    }
    let witness_schedule = if opts.control.as_ref().is_some_and(|c| c.quit_requested()) {
        None
    } else {
        verified_order(test, opts, &rules, orders)
    };
    let positive = histogram.values().filter(|(_, w)| *w).map(|(n, _)| n).sum();
    let errored: u64 = errors.values().sum();
    let negative = done - positive - errored;
    let judged_as = if opts.sets.is_empty() {
        opts.policy_name.as_str()
    } else {
        ""
    };
    let (observation, expectation) = observe(&test.test.expects, judged_as, positive, negative);
    Ok(LitmusResult {
        test: test.test.name.clone(),
        policy_name: std::iter::once(opts.policy_name.clone())
            .chain(opts.sets.iter().map(|k| format!("--set {k}")))
            .collect::<Vec<_>>()
            .join(" "),
        policy: opts.policy,
        runs: done,
        histogram,
        positive,
        negative,
        observation,
        expectation,
        condition: test.test.exists_src.clone(),
        elapsed: start.elapsed(),
        unreachable,
        errors,
        error_seeds,
        violations,
        stuck,
        stuck_seeds,
        deadlocked,
        deadlock,
        timeout: opts.timeout,
        schedule: (!schedule.is_empty()).then(|| join_steps(&schedule)),
        witness_seeds,
        witness_schedule,
        replay_flags: replay_flags(opts),
        schedule_off: schedule.is_empty() && !test.schedule.is_empty(),
        rules: rule_totals,
    })
}

/// Each thread's final registers, on its vCPU's track.
fn trace_regs(t: &Recorder, report: &RunReport) {
    for v in &report.vcpus {
        if let Some(regs) = v.regs {
            t.emit_on(v.id as u16, Kind::Regs, &regs[..10], "");
        }
    }
}

/// One VM run of `test`: run `run` (1-based) of the command, which the
/// control socket and the trace see if `counted` (a witness's replay is not).
fn one_run(
    test: &Arc<Compiled>,
    opts: &RunOptions,
    rules: &[Rule],
    schedule: &[Step],
    chaos: Option<u64>,
    run: u64,
    counted: bool,
) -> Result<RunReport, Error> {
    let control = opts.control.as_ref().filter(|_| counted);
    let mut config = VmConfig {
        program: Program::Litmus,
        policy: opts.policy,
        plan: Some(Arc::clone(&test.plan)),
        check: true,
        rules: rules.to_vec(),
        schedule: schedule.to_vec(),
        chaos,
        kvm_path: opts.kvm_path.clone(),
        // The verification replays of a witness's order are not traced.
        trace: opts
            .trace
            .as_ref()
            .filter(|_| counted)
            .map(|(t, _)| Arc::clone(t)),
        run,
        ..VmConfig::default()
    };
    if let Some(ctl) = control {
        ctl.configure(&mut config)?;
    }
    let mut vm = Vm::new(&config)?;
    if let (Some(ctl), Some(attached)) = (control, &config.control) {
        ctl.attach(vm.handle(), attached, run);
    }
    let report = vm.wait(Some(opts.timeout), |e| {
        if let Some(ctl) = control {
            ctl.vm_event(e);
        }
    });
    drop(vm);
    Ok(report)
}

/// How many chaos witnesses' orders are kept to be tried as replays.
const WITNESS_ORDERS: usize = 8;

/// How many times each must reproduce the witness, in a row, to be taken.
const REPLAYS: u64 = 10;

/// Replays the recorded orders of the first chaos witnesses (with their
/// seeds) and keeps the first that reproduces a witness [`REPLAYS`] times in
/// a row, else the one that went on longest. An order fixes the interleaving at the
/// points, not the native accesses between them, so it is checked, not
/// trusted.
fn verified_order(
    test: &Arc<Compiled>,
    opts: &RunOptions,
    rules: &[Rule],
    orders: Vec<(u64, u64, Vec<Step>)>,
) -> Option<WitnessOrder> {
    let mut best: Option<WitnessOrder> = None;
    let quit = || opts.control.as_ref().is_some_and(|c| c.quit_requested());
    // Each (run, seed, order): replayed as that run (its `run=` rules).
    for (run, seed, steps) in orders {
        let (mut replays, mut reproduced) = (0, 0);
        while replays < REPLAYS && reproduced == replays && !quit() {
            replays += 1;
            // A replay that fails to run, or breaks an invariant, simply
            // did not reproduce: the histogram already collected stands.
            let Ok(report) = one_run(test, opts, rules, &steps, Some(seed), run, false) else {
                break;
            };
            if run_error(&report).is_none()
                && report.unreachable.is_none()
                && holds(&test.test.exists, &run_state(test, &report))
            {
                reproduced += 1;
            }
        }
        let order = WitnessOrder {
            seed,
            schedule: join_steps(&steps),
            replays,
            reproduced,
        };
        if best.as_ref().is_none_or(|b| reproduced > b.reproduced) {
            best = Some(order);
        }
        if reproduced == REPLAYS {
            break;
        }
    }
    best
}

pub(crate) fn join_steps(steps: &[Step]) -> String {
    steps
        .iter()
        .map(Step::to_string)
        .collect::<Vec<_>>()
        .join(" < ")
}

/// The flags that recreate this command's policy and rules for a replay.
fn replay_flags(opts: &RunOptions) -> String {
    let mut flags = format!("--policy {}", opts.policy_name);
    for k in &opts.sets {
        flags += &format!(" --set '{k}'");
    }
    for r in &opts.rules {
        flags += &format!(" --inject '{r}'");
    }
    flags
}
