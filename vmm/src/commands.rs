//! The CLI's commands, behind argument parsing: they print what the user
//! sees and return the process exit status (DESIGN.md §12).

use std::io::Write;
use std::time::Duration;

use cowlab_abi::program::PROGRAMS;
use cowlab_abi::Program;

use crate::bench::{self, BenchOptions};
use crate::kvm::{exit_code, Event, Vm, VmConfig};
use crate::policy::Policy;

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
}

fn error(msg: impl std::fmt::Display) {
    eprintln!("cowlab: {msg}");
}

/// Prints to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn out(text: impl std::fmt::Display) {
    let _ = write!(std::io::stdout().lock(), "{text}");
}

/// Names of the built-in programs, for error messages.
pub fn program_names() -> String {
    PROGRAMS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
}

/// `cowlab run PROGRAM`: boots a VM running a built-in program on every vCPU.
pub fn run(opts: &RunOptions) -> i32 {
    let Some(program) = Program::from_name(&opts.program) else {
        error(format_args!(
            "unknown program '{}' (built-in programs: {})",
            opts.program,
            program_names()
        ));
        return exit_code::USAGE;
    };
    let policy = match make_policy(&opts.policy, &opts.set) {
        Ok(p) => p,
        Err(e) => {
            error(e);
            return exit_code::USAGE;
        }
    };
    let guest_elf = match &opts.guest {
        Some(path) => match std::fs::read(path) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                error(format_args!("cannot read guest {}: {e}", path.display()));
                return exit_code::USAGE;
            }
        },
        None => None,
    };
    let config = VmConfig {
        vcpus: opts.vcpus,
        mem_mib: opts.mem_mib,
        program,
        arg: opts.arg,
        guest_elf,
        record_faults: false,
        check: opts.check,
        policy,
        kvm_path: opts.kvm_path.clone(),
    };
    let mut vm = match Vm::new(&config) {
        Ok(vm) => vm,
        Err(e) => {
            error(&e);
            return e.exit_code();
        }
    };
    let report = vm.wait(opts.timeout, |e| {
        if let Event::Console { line, .. } = e {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
        }
    });
    drop(vm);
    if opts.stats {
        for v in &report.vcpus {
            eprintln!(
                "vcpu {}: {} faults, {} fills, {} exits",
                v.id, v.faults, v.fills, v.exits
            );
        }
        eprintln!(
            "{} user pages, boot {:.2} ms, wall {:.2} ms",
            report.user_pages,
            report.boot_time.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
            report.wall.as_secs_f64() * 1e3
        );
    }
    for line in report.problems() {
        error(line);
    }
    if opts.check && report.violations.is_empty() && report.timed_out.is_none() {
        eprintln!("cowlab: mm_verify: no violations");
    }
    report.exit_code()
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
    match bench::host_limits(opts) {
        Ok(rows) => {
            if json {
                out(format_args!("{}\n", bench::json(&rows, opts)));
            } else {
                out(bench::table(&rows));
            }
            exit_code::OK
        }
        Err(e) => {
            error(&e);
            e.exit_code()
        }
    }
}
