//! `cowlab run`: a built-in program, a built-in litmus test or a litmus
//! file, with its policy, injection rules, schedule, chaos, trace recorder
//! and, with `--control`, the control socket serving it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cowlab_abi::Program;

use super::error::CliError;
use super::output::{error, out, output_failed, read_input, say, MAX_GUEST_ELF, MAX_LITMUS_FILE};
use crate::control::{Controller, Server};
use crate::hooks;
use crate::kvm::{exit_code, Event, Vm, VmConfig};
use crate::litmus::{self, builtin};
use crate::policy::Policy;
use crate::trace;

/// Options of `cowlab run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub program: String,
    pub vcpus: usize,
    pub arg: u64,
    pub mem_mib: u64,
    pub timeout: Option<Duration>,
    pub guest: Option<std::path::PathBuf>,
    pub kvm_path: String,
    /// Print a per-vCPU summary (faults, fills, exits) at the end.
    pub stats: bool,
    /// Run `mm_verify` when vCPUs and the run end.
    pub check: bool,
    /// `--policy NAME` (default mainline).
    pub policy: String,
    /// `--set knob=value`, applied in order after the preset.
    pub set: Vec<String>,
    /// Litmus runs (`--runs`; default the test's `runs` line, else 100).
    pub runs: Option<u64>,
    /// One JSON object instead of text (litmus tests).
    pub json: bool,
    /// `--inject RULE`, `--schedule S`, `--chaos SEED`.
    pub inject: Vec<String>,
    pub schedule: Option<String>,
    pub chaos: Option<u64>,
    /// `--control PATH`: serve the control socket there; `--wait`: start
    /// stopped until its `cont`.
    pub control: Option<std::path::PathBuf>,
    pub wait: bool,
    /// `--trace FILE`, `--trace-witnesses-only`.
    pub trace: Option<std::path::PathBuf>,
    pub trace_witnesses_only: bool,
    /// `--native`: on the host kernel instead of the model (docs/native.md).
    pub native: bool,
}

/// The path of `--trace`, to name it in messages.
fn path_of(p: &Option<std::path::PathBuf>) -> std::path::Display<'_> {
    p.as_deref().unwrap_or(Path::new("")).display()
}

/// Creates the trace file of `--trace`, if given.
fn recorder(opts: &RunOptions) -> Result<Option<Arc<trace::Recorder>>, CliError> {
    opts.trace
        .as_ref()
        .map(|p| {
            trace::Recorder::create(p).map_err(|source| CliError::Trace {
                path: p.clone(),
                source,
            })
        })
        .transpose()
}

/// The policy and injection settings of `opts`, parsed.
type Setup = (Policy, Vec<hooks::Rule>, Option<Vec<hooks::Step>>);

fn policy_and_injection(opts: &RunOptions) -> Result<Setup, CliError> {
    let policy = make_policy(&opts.policy, &opts.set)?;
    let rules = opts
        .inject
        .iter()
        .map(|r| hooks::parse_rule(r))
        .collect::<Result<Vec<_>, _>>()?;
    // `--schedule none` runs a litmus test free, without its own schedule.
    let schedule = match opts.schedule.as_deref() {
        Some("none") => Some(Vec::new()),
        s => s.map(hooks::parse_schedule).transpose()?,
    };
    Ok((policy, rules, schedule))
}

/// `cowlab run WHAT`: a built-in program, a built-in litmus test, or a
/// litmus file; with `--control`, a control socket serves it meanwhile.
pub fn run(opts: &RunOptions) -> i32 {
    if opts.native {
        return super::native::run(opts);
    }
    let Some(path) = &opts.control else {
        if opts.wait {
            error("--wait needs --control PATH (something must send cont)");
            return exit_code::USAGE;
        }
        return run_with(opts, None);
    };
    let ctl = Controller::new(opts.wait);
    if opts.trace.is_some() {
        ctl.set_cli_trace();
    }
    let server = match Server::start(path, Arc::clone(&ctl)) {
        Ok(s) => s,
        Err(e) => {
            error(format_args!("--control {e}"));
            return exit_code::USAGE;
        }
    };
    let code = run_with(opts, Some(&ctl));
    ctl.finish();
    drop(server);
    code
}

fn run_with(opts: &RunOptions, ctl: Option<&Arc<Controller>>) -> i32 {
    let Some(program) = Program::from_name(&opts.program) else {
        return run_litmus(opts, ctl);
    };
    let (policy, rules, schedule) = match policy_and_injection(opts) {
        Ok(x) => x,
        Err(e) => {
            error(e);
            return exit_code::USAGE;
        }
    };
    let guest_elf = match &opts.guest {
        Some(path) => match read_input(path, MAX_GUEST_ELF, false) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                error(format_args!("--guest: {e}"));
                return exit_code::USAGE;
            }
        },
        None => None,
    };
    let tracer = match recorder(opts) {
        Ok(t) => t,
        Err(e) => {
            error(e);
            return exit_code::USAGE;
        }
    };
    if let Some(t) = &tracer {
        t.begin_run(1, &format!("{} ({})", opts.program, opts.policy));
    }
    let mut config = VmConfig {
        vcpus: opts.vcpus,
        mem_mib: opts.mem_mib,
        program,
        arg: opts.arg,
        guest_elf,
        record_faults: false,
        check: opts.check,
        policy,
        plan: None,
        rules,
        schedule: schedule.unwrap_or_default(),
        chaos: opts.chaos,
        control: None,
        kvm_path: opts.kvm_path.clone(),
        trace: tracer.clone(),
        run: 1,
        explore: None,
        ..VmConfig::default()
    };
    if let Some(ctl) = ctl {
        ctl.begin(&opts.program, &opts.policy, 1);
        if let Err(e) = ctl.configure(&mut config) {
            error(e);
            return exit_code::USAGE;
        }
    }
    let mut vm = match Vm::new(&config) {
        Ok(vm) => vm,
        Err(e) => {
            error(&e);
            return e.exit_code();
        }
    };
    if let (Some(ctl), Some(attached)) = (ctl, &config.control) {
        ctl.attach(vm.handle(), attached, 1);
    }
    let report = vm.wait(opts.timeout, |e| {
        if let Event::Console { line, .. } = e {
            out(format_args!("{line}\n"));
        }
        if let Some(ctl) = ctl {
            ctl.vm_event(e);
        }
    });
    drop(vm);
    if let Some(ctl) = ctl {
        ctl.detach(
            1,
            serde_json::json!({ "exit_code": report.exit_code() }),
            trace::RUN_END_OTHER,
        );
    }
    if let Some(t) = &tracer {
        let state = format!("exit code {}", report.exit_code());
        let end = trace::run_end_code(report.unreachable.is_some(), None);
        if let Err(e) = t.end_run(end, &state, true) {
            output_failed(format_args!("--trace {}: {e}", path_of(&opts.trace)));
        }
    }
    if opts.stats {
        for v in &report.vcpus {
            say(format_args!(
                "vcpu {}: {} faults, {} fills, {} exits",
                v.id, v.faults, v.fills, v.exits
            ));
        }
        say(format_args!(
            "{} user pages, boot {:.2} ms, wall {:.2} ms",
            report.user_pages,
            report.boot_time.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
            report.wall.as_secs_f64() * 1e3
        ));
    }
    for line in report.problems() {
        error(line);
    }
    if opts.check && report.violations.is_empty() && report.timed_out.is_none() {
        error("mm_verify: no violations");
    }
    for (rule, matched, acted) in &report.rule_counts {
        error(format_args!(
            "rule {rule}: matched {matched}, acted {acted}"
        ));
    }
    match &report.unreachable {
        // The schedule asked for an interleaving this run could not have.
        Some(why) => {
            error(format_args!("schedule unreachable: {why}"));
            report.exit_code().max(exit_code::FAILED)
        }
        None => report.exit_code(),
    }
}

/// The preset `name` with the `knob=value` settings applied.
pub fn make_policy(name: &str, set: &[String]) -> Result<Policy, CliError> {
    let mut policy = Policy::preset(name).ok_or_else(|| CliError::UnknownPolicy {
        name: name.to_string(),
    })?;
    for s in set {
        let (knob, value) = s
            .split_once('=')
            .ok_or_else(|| CliError::BadSet(s.to_string()))?;
        policy.set(knob.trim(), value.trim())?;
    }
    Ok(policy)
}

/// The source of litmus test `what`: a built-in name or a file.
pub(super) fn litmus_source(what: &str) -> Result<String, CliError> {
    if let Some(src) = builtin::source(what) {
        return Ok(src.to_string());
    }
    let path = std::path::Path::new(what);
    if path.exists() || what.ends_with(".litmus") {
        let bytes = read_input(path, MAX_LITMUS_FILE, true)?;
        return String::from_utf8(bytes).map_err(|source| CliError::NotUtf8 {
            what: what.to_string(),
            source,
        });
    }
    Err(CliError::UnknownTest {
        what: what.to_string(),
    })
}

/// Litmus test `name` (a built-in name or a file), read and compiled.
pub(super) fn load_litmus(name: &str) -> Result<Arc<litmus::Compiled>, CliError> {
    let src = litmus_source(name)?;
    litmus::load(&src)
        .map(Arc::new)
        .map_err(|source| CliError::Litmus {
            name: name.to_string(),
            source,
        })
}

/// `cowlab run TEST`: a litmus test, `--runs` times.
fn run_litmus(opts: &RunOptions, ctl: Option<&Arc<Controller>>) -> i32 {
    let compiled = match load_litmus(&opts.program) {
        Ok(c) => c,
        Err(e) => {
            error(&e);
            return e.exit_code();
        }
    };
    let (policy, rules, schedule) = match policy_and_injection(opts) {
        Ok(x) => x,
        Err(e) => {
            error(e);
            return exit_code::USAGE;
        }
    };
    let trace = match recorder(opts) {
        Ok(t) => t.map(|t| {
            if opts.trace_witnesses_only {
                t.keep_whole_runs();
            }
            (t, opts.trace_witnesses_only)
        }),
        Err(e) => {
            error(e);
            return exit_code::USAGE;
        }
    };
    let run_opts = litmus::RunOptions {
        runs: opts.runs.or(compiled.test.runs).unwrap_or(100).max(1),
        policy_name: opts.policy.clone(),
        policy,
        sets: opts.set.clone(),
        timeout: opts.timeout.unwrap_or(Duration::from_secs(3600)),
        kvm_path: opts.kvm_path.clone(),
        progress: true,
        rules,
        schedule,
        chaos: opts.chaos,
        control: ctl.map(|c| Arc::clone(c) as Arc<dyn crate::kvm::RunObserver>),
        trace,
        deadline: None,
        until_witness: None,
    };
    match litmus::run_test(&compiled, &run_opts) {
        Ok(result) => {
            if opts.json {
                out(format_args!("{}\n", result.json()));
            } else {
                out(result.text());
            }
            result.exit_code()
        }
        Err(e) => {
            error(&e);
            e.exit_code()
        }
    }
}
