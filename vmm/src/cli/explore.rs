//! `cowlab explore TEST` and `cowlab explore merge FILE…`
//! (docs/exploration.md): search a litmus test's interleavings for a
//! witness, print the answer, the histogram and a minimized schedule; or
//! combine the JSON results of shards.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cowlab_abi::program::PROGRAMS;
use indicatif::{ProgressBar, ProgressStyle};

use super::error::CliError;
use super::output::{error, out, read_input, say, MAX_TRACE_FILE};
use super::run::{litmus_source, make_policy};
use crate::kvm::exit_code;
use crate::litmus::explore::{self, ExploreOptions, ExploreResult, Strategy};
use crate::litmus::{self, builtin};

/// Options of `cowlab explore`.
#[derive(Debug, Clone)]
pub struct ExploreArgs {
    pub test: String,
    pub policy: String,
    pub set: Vec<String>,
    pub strategy: Strategy,
    pub budget: Option<u64>,
    pub time: Option<Duration>,
    pub seed: u64,
    pub shard: (u64, u64),
    pub timeout: Duration,
    pub json: bool,
    pub keep_going: bool,
    pub minimize: bool,
    pub kvm_path: String,
}

/// Parses `--shard I/N` (I from 0 to N−1).
pub fn parse_shard(text: &str) -> Result<(u64, u64), String> {
    let bad = || {
        format!(
            "--shard takes I/N with 0 <= I < N <= 1000000 (e.g. 0/4), not '{}'",
            text.escape_debug()
        )
    };
    let (i, n) = text.split_once('/').ok_or_else(bad)?;
    let (i, n): (u64, u64) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if n == 0 || i >= n || n > 1_000_000 {
        return Err(bad());
    }
    Ok((i, n))
}

/// The test compiled twice: for exploration, and normally (for replays).
type Pair = (Arc<litmus::Compiled>, Arc<litmus::Compiled>);

fn load_pair(name: &str) -> Result<Pair, CliError> {
    let src = litmus_source(name)?;
    let fail = |source| CliError::Litmus {
        name: name.to_string(),
        source,
    };
    let test = litmus::parse(&src).map_err(fail)?;
    let explored = litmus::compile_for_explore(&test).map_err(fail)?;
    let normal = litmus::compile(&test).map_err(fail)?;
    Ok((Arc::new(explored), Arc::new(normal)))
}

/// Why `cowlab explore WHAT` cannot take `what`: the message `cowlab run`
/// gives lists the guest programs too, which explore does not run (and
/// said "unknown" of `hello`, a name it listed).
fn unknown_test(what: &str) -> String {
    let tests = super::list::test_names();
    if PROGRAMS.iter().any(|p| p.0 == what) {
        format!(
            "'{what}' is a guest program, not a litmus test: explore searches the \
             interleavings of a test (tests: {tests}; or a .litmus file)"
        )
    } else {
        format!("unknown litmus test '{what}' (tests: {tests}; or a .litmus file)")
    }
}

/// A progress bar on stderr, if it is a terminal (indicatif draws nothing
/// otherwise): runs done, witnesses, rate, and for a budget what is left.
fn progress_bar(args: &ExploreArgs) -> Option<(ProgressBar, explore::Progress)> {
    let bar = match args.budget {
        Some(b) => ProgressBar::new(b.div_ceil(args.shard.1)),
        None => ProgressBar::no_length(),
    };
    if bar.is_hidden() || args.json {
        return None;
    }
    let style = ProgressStyle::with_template(
        "{spinner} {msg} {pos}/{len} interleavings [{elapsed_precise}] {per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    let b = bar.clone();
    let minimize = args.minimize;
    let update: explore::Progress = Arc::new(move |r: &ExploreResult, done: bool| {
        if done {
            b.finish_and_clear();
            if r.witnesses > 0 && minimize {
                say("minimizing the witness's schedule (replaying it as a forced schedule)…");
            }
            return;
        }
        b.set_position(r.runs);
        b.set_message(format!(
            "{} witnesses, {} stuck, {} errors,",
            r.witnesses,
            r.stuck,
            r.errors.values().sum::<u64>()
        ));
    });
    Some((bar, update))
}

/// `cowlab explore TEST`: exit 0 if the answer meets the test's `expect`
/// line for the policy (or it has none), 1 if not, 2 for bad input, 3 if
/// VMs cannot run.
pub fn explore(args: &ExploreArgs) -> i32 {
    let (test, normal) = match load_pair(&args.test) {
        Ok(p) => p,
        Err(CliError::UnknownTest { what }) => {
            error(unknown_test(&what));
            return exit_code::USAGE;
        }
        Err(e) => {
            error(&e);
            return e.exit_code();
        }
    };
    if normal.test.schedule_required {
        error(format!(
            "{}: its exists clause is a witness only under its own schedule \
             ('schedule required'): a search without it would report legal \
             outcomes as witnesses",
            normal.test.name
        ));
        return exit_code::USAGE;
    }
    let policy = match make_policy(&args.policy, &args.set) {
        Ok(p) => p,
        Err(e) => {
            error(&e);
            return e.exit_code();
        }
    };
    if !normal.schedule.is_empty() && !args.json {
        say(format_args!(
            "note: {} has a schedule; explore ignores it and searches every interleaving",
            args.test
        ));
    }
    let mut opts = ExploreOptions::new(args.strategy, &args.policy, policy, &args.kvm_path);
    opts.budget = args.budget;
    opts.time = args.time;
    opts.seed = args.seed;
    opts.shard = args.shard;
    opts.timeout = args.timeout;
    opts.keep_going = args.keep_going;
    opts.minimize = args.minimize;
    // Ctrl-C ends the search after the run under way, with its results
    // printed; a second one ends the process at once.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
    opts.stop = Some(stop);
    let bar = progress_bar(args);
    opts.progress = bar.as_ref().map(|(_, p)| Arc::clone(p));
    let result = explore::explore(&test, &normal, &opts);
    if let Some((bar, _)) = bar {
        bar.finish_and_clear();
    }
    match result {
        Ok(r) => print_result(&r, args.json),
        Err(e) => {
            error(format_args!("explore {}: {e}", args.test));
            match e {
                explore::ExploreError::NoPoints(_) | explore::ExploreError::ProbeStuck(_) => {
                    exit_code::USAGE
                }
                explore::ExploreError::Vm(_) => exit_code::VM_ERROR,
            }
        }
    }
}

fn print_result(r: &ExploreResult, json: bool) -> i32 {
    if json {
        match serde_json::to_string(r) {
            Ok(s) => out(s + "\n"),
            Err(e) => {
                error(format_args!("cannot write the result as JSON: {e}"));
                return exit_code::VM_ERROR;
            }
        }
    } else {
        out(explore::report::text(r));
    }
    match r.met {
        Some(false) => exit_code::FAILED,
        _ => exit_code::OK,
    }
}

/// `cowlab explore merge FILE…`: the shards' `--json` results combined,
/// judged against the test's `expect` line if it is a built-in test.
pub fn merge(files: &[PathBuf], json: bool) -> i32 {
    let mut parts = Vec::new();
    for f in files {
        let bytes = match read_input(f, MAX_TRACE_FILE, true) {
            Ok(b) => b,
            Err(e) => {
                error(&e);
                return e.exit_code();
            }
        };
        match serde_json::from_slice::<ExploreResult>(&bytes) {
            Ok(r) if r.shards.is_empty() || r.shards.iter().any(|s| *s >= r.shard_count) => {
                // explore writes shard I of N with I < N; merge took shard 7
                // of 2 and printed "shard 0,7/2".
                error(format_args!(
                    "{}: not a result of `cowlab explore --json` (shards {:?} of {}: \
                     each must be below the count)",
                    crate::control::printable(&f.display().to_string()),
                    r.shards,
                    r.shard_count
                ));
                return exit_code::USAGE;
            }
            Ok(r) => parts.push(r),
            Err(e) => {
                error(format_args!(
                    "{}: not a result of `cowlab explore --json` ({e})",
                    crate::control::printable(&f.display().to_string())
                ));
                return exit_code::USAGE;
            }
        }
    }
    let expects = parts
        .first()
        .and_then(|p| builtin::source(&p.test))
        .and_then(|src| litmus::parse(src).ok())
        .map(|t| t.expects);
    match explore::merge(parts, expects.as_deref()) {
        Ok(m) => print_result(&m, json),
        Err(e) => {
            error(format_args!("explore merge: {e}"));
            exit_code::USAGE
        }
    }
}
