//! The CLI's commands, behind argument parsing: they print what the user
//! sees and return the process exit status (DESIGN.md §12).

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cowlab_abi::program::PROGRAMS;
use cowlab_abi::Program;

use crate::bench::{self, BenchOptions};
use crate::control::{printable, Controller, Server};
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
}

/// The path of `--trace`, to name it in messages.
fn path_of(p: &Option<std::path::PathBuf>) -> std::path::Display<'_> {
    p.as_deref().unwrap_or(Path::new("")).display()
}

/// Creates the trace file of `--trace`, if given.
fn recorder(opts: &RunOptions) -> Result<Option<Arc<trace::Recorder>>, String> {
    opts.trace
        .as_ref()
        .map(|p| trace::Recorder::create(p).map_err(|e| format!("--trace {}: {e}", p.display())))
        .transpose()
}

/// The policy and injection settings of `opts`, parsed.
type Setup = (Policy, Vec<hooks::Rule>, Option<Vec<hooks::Step>>);

fn policy_and_injection(opts: &RunOptions) -> Result<Setup, String> {
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

/// Prints `cowlab: MSG` on stderr (if stderr itself cannot be written,
/// there is no one to tell: the exit status still says it). Always one
/// line: messages quote arguments, file names and file contents, so
/// control characters (a newline, an escape sequence) are written as
/// `\u{…}` here, whatever the message.
pub fn error(msg: impl std::fmt::Display) {
    say(format_args!("cowlab: {}", printable(&msg.to_string())));
}

/// Prints a line on stderr, never panicking (unlike `eprintln!`).
fn say(line: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// What became of stdout (and other outputs): see [`finish`].
static OUTPUT: AtomicU8 = AtomicU8::new(OUTPUT_OK);
const OUTPUT_OK: u8 = 0;
/// The reader went away (a closed pipe: `| head`): nothing more is
/// printed, quietly.
const OUTPUT_CLOSED: u8 = 1;
/// A write failed (a full disk, an I/O error): said once, exit 3.
const OUTPUT_FAILED: u8 = 2;

/// Prints to stdout, flushed, so that a write error is seen here: a closed
/// pipe ends the output quietly, any other failure is reported once and
/// makes the exit status 3 ([`finish`]). Never panics (unlike `println!`).
pub fn out(text: impl std::fmt::Display) {
    if OUTPUT.load(Ordering::Relaxed) != OUTPUT_OK {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    let written = write!(stdout, "{text}").and_then(|()| stdout.flush());
    drop(stdout);
    stdout_written(written);
}

/// Notes the outcome of writing to stdout (see [`out`]).
fn stdout_written(result: std::io::Result<()>) {
    match result {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            let _ = OUTPUT.compare_exchange(
                OUTPUT_OK,
                OUTPUT_CLOSED,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        Err(e) => output_failed(format_args!("cannot write to stdout: {e}")),
    }
}

/// Reports that an output could not be written (once: later failures,
/// consequences of the first, are not repeated) and makes the exit
/// status 3.
fn output_failed(msg: impl std::fmt::Display) {
    if OUTPUT.swap(OUTPUT_FAILED, Ordering::Relaxed) != OUTPUT_FAILED {
        error(msg);
    }
}

/// The exit status of a command that returned `code`: at least 3 if an
/// output could not be written (README: exit status).
pub fn finish(code: i32) -> i32 {
    if OUTPUT.load(Ordering::Relaxed) == OUTPUT_FAILED {
        code.max(exit_code::VM_ERROR)
    } else {
        code
    }
}

/// The largest guest ELF `--guest` takes (the built-in one is well under
/// 1 MiB).
pub const MAX_GUEST_ELF: u64 = 64 << 20;
/// The largest litmus file read.
pub const MAX_LITMUS_FILE: u64 = 16 << 20;
/// The largest trace file `cowlab trace` reads (about 100,000 litmus runs).
pub const MAX_TRACE_FILE: u64 = 1 << 30;

/// Reads input file `path` whole, refusing one of more than `limit` bytes
/// before reading it (and, should it grow while read, after `limit`
/// bytes), a directory, a device (`/dev/zero` would be read until memory
/// ran out), and, unless `pipes`, anything but a regular file. Errors
/// are the message to print.
fn read_input(path: &Path, limit: u64, pipes: bool) -> Result<Vec<u8>, String> {
    let cannot = |e: &dyn std::fmt::Display| format!("cannot read {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(|e| cannot(&e))?;
    let meta = file.metadata().map_err(|e| cannot(&e))?;
    let kind = meta.file_type();
    if !(kind.is_file() || pipes && std::os::unix::fs::FileTypeExt::is_fifo(&kind)) {
        let what = if kind.is_dir() {
            "a directory"
        } else if pipes {
            "not a regular file or a pipe"
        } else {
            "not a regular file"
        };
        return Err(cannot(&what));
    }
    let too_big = || {
        cannot(&format_args!(
            "larger than the limit of {} MiB",
            limit >> 20
        ))
    };
    if meta.len() > limit {
        return Err(too_big());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| cannot(&e))?;
    if bytes.len() as u64 > limit {
        return Err(too_big());
    }
    Ok(bytes)
}

/// Names of the built-in programs, for error messages.
pub fn program_names() -> String {
    PROGRAMS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
}

/// `cowlab run WHAT`: a built-in program, a built-in litmus test, or a
/// litmus file; with `--control`, a control socket serves it meanwhile.
pub fn run(opts: &RunOptions) -> i32 {
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
pub fn make_policy(name: &str, set: &[String]) -> Result<Policy, String> {
    let mut policy = Policy::preset(name).ok_or_else(|| {
        format!(
            "unknown policy '{name}' (presets: {})",
            Policy::preset_names()
        )
    })?;
    for s in set {
        let (knob, value) = s
            .split_once('=')
            .ok_or_else(|| format!("--set takes knob=value, not '{s}'"))?;
        policy.set(knob.trim(), value.trim())?;
    }
    Ok(policy)
}

/// `cowlab list policies`: presets × knobs with their commits.
pub fn list_policies() -> i32 {
    out(crate::policy::PolicyTable);
    exit_code::OK
}

/// The source of litmus test `what`: a built-in name or a file.
fn litmus_source(what: &str) -> Result<String, String> {
    if let Some(src) = builtin::source(what) {
        return Ok(src.to_string());
    }
    let path = std::path::Path::new(what);
    if path.exists() || what.ends_with(".litmus") {
        let bytes = read_input(path, MAX_LITMUS_FILE, true)?;
        return String::from_utf8(bytes)
            .map_err(|e| format!("cannot read {what}: not UTF-8 text ({e})"));
    }
    Err(format!(
        "unknown program or test '{what}' (programs: {}; tests: {}; or a .litmus file)",
        program_names(),
        builtin::TESTS
            .iter()
            .map(|t| t.0)
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// `cowlab run TEST`: a litmus test, `--runs` times.
fn run_litmus(opts: &RunOptions, ctl: Option<&Arc<Controller>>) -> i32 {
    let src = match litmus_source(&opts.program) {
        Ok(src) => src,
        Err(e) => {
            error(e);
            return exit_code::USAGE;
        }
    };
    let compiled = match litmus::load(&src) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            error(format_args!("{}:{e}", opts.program));
            return exit_code::USAGE;
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

/// `cowlab list tests`.
pub fn list_tests() -> i32 {
    for (name, src, suites) in builtin::TESTS {
        let first = litmus::parse(src)
            .ok()
            .and_then(|t| t.description)
            .unwrap_or_default();
        let first = first.lines().next().unwrap_or("").to_string();
        out(format_args!("{name:<24} [{}] {first}\n", suites.join(",")));
    }
    exit_code::OK
}

/// One cell of `cowlab suite`: test, policy, and its result or why it
/// could not run at all.
type SuiteCell = (String, String, Result<litmus::LitmusResult, String>);

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
                runs: runs.or(compiled.test.runs).unwrap_or(10).max(1),
                policy_name: expect.policy.clone(),
                policy,
                timeout: Duration::from_secs(30),
                kvm_path: kvm_path.to_string(),
                progress: false,
                rules: Vec::new(),
                schedule: None,
                chaos: None,
                control: None,
                trace: None,
                deadline: None,
                // A free-running race is rare on a loaded machine: a cell
                // expected `Sometimes` goes on until it has its witness
                // (`runs N max M`), unless `--runs` says how many.
                until_witness: match (runs, expect.verdict) {
                    (None, litmus::ast::Verdict::Sometimes) => compiled.test.max_runs,
                    _ => None,
                },
            };
            let result = match litmus::run_test(&compiled, &run_opts) {
                Ok(r) => Ok(r),
                // Without KVM no cell can run: one line says so.
                Err(e) if e.kvm_unusable() => {
                    error(&e);
                    return e.exit_code();
                }
                Err(e) => Err(e.to_string()),
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
                Some(serde_json::json!({"test": t, "policy": p, "error": e}))
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

/// Options of `cowlab soak`.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// `--test NAME` (repeatable; built-in names or files): default every
    /// built-in `*-free` test.
    pub tests: Vec<String>,
    pub runs: u64,
    /// `--seed S` (one batch from S) or `--seeds K` (K batches, seeds from
    /// the clock).
    pub seed: Option<u64>,
    pub seeds: u64,
    pub time: Option<Duration>,
    pub timeout: Duration,
    pub inject: Vec<String>,
    pub json: bool,
    pub kvm_path: String,
}

/// `K` first seeds for `cowlab soak --seeds K`, from the clock (printed, so
/// any run can be replayed).
fn clock_seeds(k: u64) -> Vec<u64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // splitmix64: batches far apart, so their runs' seeds do not overlap.
    (0..k)
        .map(|i| {
            let mut z = now.wrapping_add((i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) >> 1
        })
        .collect()
}

/// `cowlab soak`: every `*-free` test (or the `--test`s) under each preset
/// its `expect` lines say `Never` for, with chaos; a row per cell.
pub fn soak(opts: &SoakOptions) -> i32 {
    let names: Vec<String> = if opts.tests.is_empty() {
        builtin::TESTS
            .iter()
            .filter(|t| t.0.ends_with("-free"))
            .map(|t| t.0.to_string())
            .collect()
    } else {
        opts.tests.clone()
    };
    let mut cells = Vec::new();
    for name in &names {
        let compiled = match litmus_source(name).and_then(|src| {
            litmus::load(&src)
                .map(Arc::new)
                .map_err(|e| format!("{name}:{e}"))
        }) {
            Ok(c) => c,
            Err(e) => {
                error(e);
                return exit_code::USAGE;
            }
        };
        match litmus::soak::never_cells(&compiled) {
            c if c.is_empty() => {
                error(format_args!(
                    "{name} expects Never under no preset: nothing to soak"
                ));
                return exit_code::USAGE;
            }
            c => cells.extend(c),
        }
    }
    let rules = match opts
        .inject
        .iter()
        .map(|r| hooks::parse_rule(r))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(r) => r,
        Err(e) => {
            error(e);
            return exit_code::USAGE;
        }
    };
    let seeds = match opts.seed {
        Some(s) => vec![s],
        None => clock_seeds(opts.seeds.max(1)),
    };
    let soak_opts = litmus::soak::SoakOptions {
        runs: opts.runs.max(1),
        seeds: seeds.clone(),
        timeout: opts.timeout,
        time: opts.time,
        kvm_path: opts.kvm_path.clone(),
        rules,
    };
    let seed_list: Vec<String> = seeds.iter().map(u64::to_string).collect();
    if !opts.json {
        out(format_args!(
            "Soak: {} cell{}, {} runs each from chaos seed {} (run i: seed + i){}\n",
            cells.len(),
            if cells.len() == 1 { "" } else { "s" },
            soak_opts.runs.saturating_mul(seeds.len() as u64),
            seed_list.join(", "),
            opts.time
                .map(|t| format!(", at most {:.0} s", t.as_secs_f64()))
                .unwrap_or_default()
        ));
        out(litmus::soak::header());
    }
    let json = opts.json;
    let reports = match litmus::soak::soak(&cells, &soak_opts, |r| {
        if !json {
            out(litmus::soak::row(r));
        }
    }) {
        Ok(r) => r,
        Err(e) => {
            error(&e);
            return e.exit_code();
        }
    };
    let (total, code) = litmus::soak::verdict(&reports);
    if json {
        let v = serde_json::json!({
            "seeds": seeds,
            "runs_per_seed": soak_opts.runs,
            "time_s": opts.time.map(|t| t.as_secs_f64()),
            "cells": reports.iter().map(|r| r.json()).collect::<Vec<_>>(),
            "total": total.json(),
            "ok": code == exit_code::OK,
        });
        out(format_args!("{v}\n"));
    } else {
        out(litmus::soak::row(&total));
        for r in &reports {
            out(litmus::soak::details(r));
        }
        let asked = soak_opts
            .runs
            .saturating_mul(seeds.len() as u64)
            .saturating_mul(reports.len() as u64);
        if total.runs < asked {
            out(format_args!(
                "The time budget ran out: {} of {asked} runs made.\n",
                total.runs
            ));
        }
    }
    code
}

/// `cowlab list points`: the injection points.
pub fn list_points() -> i32 {
    for (name, what) in hooks::POINTS {
        out(format_args!("{name:<32} {what}\n"));
    }
    out("guest:NAME                       a litmus test's `hook NAME`\n");
    exit_code::OK
}

/// `cowlab list programs`.
pub fn list_programs() -> i32 {
    for (name, _, what) in PROGRAMS {
        out(format_args!(
            "{name:<16} {what}
"
        ));
    }
    exit_code::OK
}

/// `cowlab bench`: the host limits, as a table or JSON.
pub fn bench(opts: &BenchOptions, json: bool) -> i32 {
    match bench::run_all(opts) {
        Ok(report) => {
            if json {
                out(format_args!("{}\n", report.json(opts)));
            } else {
                out(report.text());
            }
            exit_code::OK
        }
        Err(e) => {
            error(&e);
            e.exit_code()
        }
    }
}

/// Reads trace `file`, or says why not (with the offset) and exits 2.
fn load_trace(file: &std::path::Path) -> Result<Vec<trace::Record>, i32> {
    let data = read_input(file, MAX_TRACE_FILE, true).map_err(|e| {
        error(e);
        exit_code::USAGE
    })?;
    trace::read_trace(&data).map_err(|e| {
        error(format_args!("{}: {e}", file.display()));
        exit_code::USAGE
    })
}

/// `cowlab trace show FILE [--vcpu N] [--kind K]...`.
pub fn trace_show(file: &std::path::Path, vcpu: Option<u16>, kinds: &[String]) -> i32 {
    let mut wanted = Vec::new();
    for k in kinds {
        match trace::Kind::ALL
            .iter()
            .find(|x| x.name().eq_ignore_ascii_case(k))
        {
            Some(x) => wanted.push(*x),
            None => {
                let all: Vec<&str> = trace::Kind::ALL.iter().map(|k| k.name()).collect();
                error(format_args!(
                    "unknown event kind '{k}' (kinds: {})",
                    all.join(", ")
                ));
                return exit_code::USAGE;
            }
        }
    }
    match load_trace(file) {
        Ok(records) => {
            let stdout = std::io::stdout();
            let mut w = std::io::BufWriter::new(stdout.lock());
            // A closed pipe (`| head`) ends the listing; it is not an error.
            stdout_written(trace::export::show(&records, vcpu, &wanted, &mut w));
            exit_code::OK
        }
        Err(code) => code,
    }
}

/// `cowlab trace export FILE --format chrome -o OUT`.
pub fn trace_export(file: &std::path::Path, format: &str, dest: &std::path::Path) -> i32 {
    if format != "chrome" {
        error(format_args!(
            "unknown trace format '{format}' (formats: chrome)"
        ));
        return exit_code::USAGE;
    }
    let records = match load_trace(file) {
        Ok(r) => r,
        Err(code) => return code,
    };
    // A path that cannot be created is a usage error (2); a write that
    // fails (a full disk) is 3, as for every output.
    let file = match std::fs::File::create(dest) {
        Ok(f) => f,
        Err(e) => {
            error(format_args!("cannot create {}: {e}", dest.display()));
            return exit_code::USAGE;
        }
    };
    let mut w = std::io::BufWriter::new(file);
    match trace::export::chrome(&records, &mut w) {
        Ok(()) => exit_code::OK,
        Err(e) => {
            output_failed(format_args!("cannot write {}: {e}", dest.display()));
            exit_code::VM_ERROR
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::litmus::ast::Verdict;

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

    fn cell(r: Result<litmus::LitmusResult, String>) -> SuiteCell {
        let test = r.as_ref().map_or("broken".into(), |r| r.test.clone());
        (test, "mainline".into(), r)
    }

    #[test]
    fn a_suite_cell_in_error_keeps_the_others_and_exits_3() {
        let cells = [
            cell(Ok(result("good", 5, 0))),
            cell(Ok(result("lossy", 3, 2))),
            cell(Err("cannot start the VM: KVM_CREATE_VM failed".into())),
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
