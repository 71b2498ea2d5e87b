//! cowlab's side of a native run: each run is a process of its own
//! (`cowlab __native-run`, re-executed, in a new process group) so that a
//! crashing or looping test cannot take cowlab down; a deadline kills the
//! whole group; the threads' ends are read from the shared results area
//! and counted into the same histogram and verdict as a model run.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use super::refuse;
use super::shared::{self, area_len};
use super::swap::SwapFile;
use super::sys::{self, AreaMap};
use crate::kvm::exit_code;
use crate::litmus::ast::Status;
use crate::litmus::verdict::{holds, key, observe, RunState, ThreadEnd};
use crate::litmus::{Compiled, LitmusResult};
use crate::policy::Policy;

/// The hidden subcommand a run's process is started with.
pub const RUN_SUBCOMMAND: &str = "__native-run";

/// The `expect` line a native run is checked against: the host runs a
/// recent kernel, which the `mainline` preset models.
pub const EXPECT_POLICY: &str = "mainline";

/// Options of native runs.
#[derive(Debug, Clone)]
pub struct NativeOptions {
    pub runs: u64,
    /// The deadline of one run (`None`: none).
    pub timeout: Option<Duration>,
    /// Show `run i/N` on stderr.
    pub progress: bool,
}

/// Why a test did not run natively.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    /// The test asks for what the host cannot do (exit 2).
    #[error("{test} cannot run natively: {why}")]
    Refused { test: String, why: String },
    /// A run could not be started (exit 3).
    #[error("native run of {test}: {why}")]
    Start { test: String, why: String },
}

impl NativeError {
    pub fn exit_code(&self) -> i32 {
        match self {
            NativeError::Refused { .. } => exit_code::USAGE,
            NativeError::Start { .. } => exit_code::VM_ERROR,
        }
    }

    /// The reason alone (for a table's note).
    pub fn reason(&self) -> &str {
        match self {
            NativeError::Refused { why, .. } | NativeError::Start { why, .. } => why,
        }
    }
}

/// The label of native results: the host kernel's release.
pub fn host_label() -> String {
    format!("host {}", sys::kernel_release())
}

/// Whether `test` can run natively, and if not why.
pub fn refusal(test: &crate::litmus::ast::Test) -> Option<String> {
    refuse::check(test).err()
}

/// The process group of the run in progress, for the Ctrl-C handler.
static RUNNING_GROUP: AtomicI32 = AtomicI32::new(0);
/// Set by the Ctrl-C handler: the run it killed is no outcome, and cowlab
/// is about to exit.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// On Ctrl-C: the run in progress is killed, the swap file (if cowlab
/// made one) removed, and cowlab exits 130.
fn handle_interrupts() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Another command's handler may be installed already: then the
        // group dies with its session leader's terminal anyway.
        let _ = ctrlc::set_handler(|| {
            INTERRUPTED.store(true, Ordering::Release);
            sys::kill_group(RUNNING_GROUP.load(Ordering::Acquire));
            super::swap::cleanup_on_interrupt();
            std::process::exit(130);
        });
    });
}

/// Runs `compiled` (whose source is `src`) `opts.runs` times on the host
/// kernel.
pub fn run_native(
    compiled: &Compiled,
    src: &str,
    opts: &NativeOptions,
) -> Result<LitmusResult, NativeError> {
    let test = &compiled.test;
    let refused = |why: String| NativeError::Refused {
        test: test.name.clone(),
        why,
    };
    let needs = refuse::check(test).map_err(refused)?;
    handle_interrupts();
    let _swap = if needs.swap {
        SwapFile::ensure().map_err(|e| {
            refused(format!(
                "it pages out (madvise … pageout), the host has no swap and \
                 none could be enabled: {e}"
            ))
        })?
    } else {
        None
    };
    let exe = std::env::current_exe().map_err(|e| NativeError::Start {
        test: test.name.clone(),
        why: format!("cannot find cowlab's own executable: {e}"),
    })?;
    let start = Instant::now();
    let mut histogram = std::collections::BTreeMap::new();
    let mut errors = std::collections::BTreeMap::new();
    let mut not_run = std::collections::BTreeMap::new();
    let (mut positive, mut negative, mut stuck, mut done) = (0, 0, 0, 0);
    let mut last_draw = Instant::now();
    for i in 0..opts.runs {
        if opts.progress && last_draw.elapsed() > Duration::from_millis(100) {
            eprint!("\r{} native run {}/{}", test.name, i + 1, opts.runs);
            last_draw = Instant::now();
        }
        let run = one_run(&exe, compiled, src, opts.timeout).map_err(|why| NativeError::Start {
            test: test.name.clone(),
            why,
        })?;
        done += 1;
        if let Some(e) = run.error {
            *errors.entry(e).or_insert(0u64) += 1;
            histogram
                .entry("error;".to_string())
                .or_insert((0, false))
                .0 += 1;
            continue;
        }
        if let Some(why) = run.not_run {
            *not_run.entry(why).or_insert(0u64) += 1;
            done -= 1;
            continue;
        }
        stuck += u64::from(run.stuck);
        let witness = holds(&test.exists, &run.state);
        let entry = histogram
            .entry(key(&test.exists, &run.state))
            .or_insert((0, witness));
        entry.0 += 1;
        if witness {
            positive += 1;
        } else {
            negative += 1;
        }
    }
    if opts.progress {
        eprint!("\r\x1b[K");
    }
    let (observation, expectation) = observe(&test.expects, EXPECT_POLICY, positive, negative);
    Ok(LitmusResult {
        test: test.name.clone(),
        policy_name: host_label(),
        policy: Policy::default(),
        runs: done,
        histogram,
        positive,
        negative,
        observation,
        expectation,
        condition: test.exists_src.clone(),
        elapsed: start.elapsed(),
        unreachable: not_run,
        errors,
        error_seeds: Vec::new(),
        violations: 0,
        stuck,
        stuck_seeds: Vec::new(),
        deadlocked: 0,
        deadlock: None,
        timeout: opts.timeout.unwrap_or(Duration::ZERO),
        schedule: None,
        witness_seeds: Vec::new(),
        witness_schedule: None,
        replay_flags: String::new(),
        schedule_off: false,
        rules: std::collections::BTreeMap::new(),
    })
}

/// What one run gave.
struct Run {
    state: RunState,
    /// The run could not be made (its setup failed).
    error: Option<String>,
    /// The run is not an outcome (cow.c's skip: MADV_PAGEOUT did not work).
    not_run: Option<String>,
    /// The deadline killed it.
    stuck: bool,
}

/// One run in a new process group; `Err` only if no process could start.
fn one_run(
    exe: &std::path::Path,
    compiled: &Compiled,
    src: &str,
    timeout: Option<Duration>,
) -> Result<Run, String> {
    let file = sys::memfd("cowlab-native-run", area_len(src.len()) as u64)
        .map_err(|e| format!("cannot create the results area: {e}"))?;
    let mut map =
        AreaMap::map(file.as_raw_fd()).map_err(|e| format!("cannot map the results area: {e}"))?;
    map.set_tail(src.as_bytes());
    map.area()
        .src_len
        .store(src.len() as u64, Ordering::Release);
    map.area().magic.store(shared::MAGIC, Ordering::Release);
    let mut child = Command::new(exe)
        .arg(RUN_SUBCOMMAND)
        .stdin(Stdio::from(file))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let pgid = child.id() as i32;
    RUNNING_GROUP.store(pgid, Ordering::Release);
    let ended = match sys::pidfd_open(pgid) {
        Ok(fd) => {
            let ms = timeout.map_or(-1, |t| t.as_millis().clamp(1, i32::MAX as u128) as i32);
            sys::wait_pidfd(fd.as_raw_fd(), ms)
        }
        Err(_) => child.wait().is_ok(),
    };
    // The whole run: stragglers it left, or everything at the deadline.
    sys::kill_group(pgid);
    let status = child.wait();
    RUNNING_GROUP.store(0, Ordering::Release);
    while INTERRUPTED.load(Ordering::Acquire) {
        // The handler cleans up and exits the process: nothing of this
        // run is reported.
        std::thread::park();
    }
    let area = map.area();
    let error = area.error.get().or_else(|| match status {
        Ok(s) if ended && !s.success() && s.code() != Some(0) => {
            Some(format!("the run's process ended with {s}"))
        }
        _ => None,
    });
    let mut state = RunState::new();
    for s in &area.slots[..area.used()] {
        let st = s.state.load(Ordering::Acquire);
        if st == shared::NEVER || st == shared::FREE {
            continue;
        }
        let block = s.block.load(Ordering::Acquire) as usize;
        let Some(t) = compiled.test.threads.get(block) else {
            continue;
        };
        let end = match (st, s.status.load(Ordering::Acquire)) {
            (shared::DONE, shared::OK) => {
                let mut regs = [0; cowlab_abi::bytecode::NR_REGS];
                for (r, w) in regs.iter_mut().zip(&s.regs) {
                    *r = w.load(Ordering::Acquire);
                }
                ThreadEnd::Ok(regs)
            }
            (shared::DONE, shared::SEGV) => ThreadEnd::Status(Status::Segv, "segv"),
            (shared::DONE, shared::CRASHED) | (shared::DONE, _) => {
                ThreadEnd::Status(Status::Crashed, "crashed")
            }
            _ if !ended => ThreadEnd::Status(Status::Crashed, "stuck"),
            _ => ThreadEnd::Status(Status::Crashed, "crashed"),
        };
        let mut name = t.name.clone();
        let mut n = 2;
        while state.contains_key(&name) {
            name = format!("{}#{n}", t.name);
            n += 1;
        }
        state.insert(name, end);
    }
    Ok(Run {
        state,
        error,
        not_run: area.not_run.get(),
        stuck: !ended,
    })
}
