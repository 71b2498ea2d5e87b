//! Litmus runs per second: a fresh VM per run, as `cowlab run` does; and
//! interleavings per second of a search, as `cowlab explore` makes them.

use std::sync::Arc;

use super::{us, BenchOptions, Measurement, Stat};
use crate::kvm::Error;
use crate::litmus::{
    self, explore, explore::ExploreError, explore::ExploreOptions, explore::Strategy,
};
use crate::policy::Policy;

/// Litmus throughput: a fresh VM per run, as `cowlab run` does. The time
/// per run of threads-counter (two threads, no fork) and of each seed test
/// (forced, under the preset with the bug), in rounds of `litmus_runs`.
pub fn litmus_rates(opts: &BenchOptions) -> Result<Vec<Measurement>, Error> {
    let mut tests: Vec<(&'static str, String)> = vec![("threads-counter", "mainline".into())];
    for (name, src, suites) in litmus::builtin::TESTS {
        if suites.contains(&"seeds") && !name.ends_with("-free") {
            let policy = litmus::parse(src)
                .ok()
                .and_then(|t| t.expects.first().map(|e| e.policy.clone()))
                .unwrap_or_else(|| "mainline".into());
            tests.push((name, policy));
        }
    }
    let mut rows = Vec::new();
    for (name, policy_name) in tests {
        let src = litmus::builtin::source(name).expect("a built-in test");
        let compiled = Arc::new(litmus::load(src).map_err(|e| Error::Run(format!("{name}: {e}")))?);
        let policy = Policy::preset(&policy_name).unwrap_or(Policy::MAINLINE);
        let mut per_run = Vec::new();
        for _ in 0..opts.native_rounds.max(1) {
            let run_opts =
                litmus::RunOptions::plain(opts.litmus_runs, &policy_name, policy, &opts.kvm_path);
            let r = litmus::run_test(&compiled, &run_opts)?;
            // A timing with runs in error is not a measurement.
            if let Some(msg) = r.errors.keys().next() {
                return Err(Error::Run(format!("litmus {name}: {msg}")));
            }
            per_run.push(us(r.elapsed) / r.runs.max(1) as f64);
        }
        if let Some(stat) = Stat::of(per_run) {
            rows.push(Measurement {
                name: format!("litmus {name}"),
                what: "time per run (fresh VM, threads, checks); runs/s = 1e6 / median",
                stat,
            });
        }
    }
    Ok(rows)
}

/// The searches timed by [`explore_rates`]: a bare test, the preset with
/// its bug, and the forced test whose runs/s it is compared with.
pub const EXPLORED: &[(&str, &str, &str)] = &[("fork-vma-lock-bare", "linux-6.4", "fork-vma-lock")];

/// The search timed: PCT, depth 3, seed 1 (the same interleavings every
/// round).
pub const EXPLORE_STRATEGY: Strategy = Strategy::Pct { depth: 3 };
pub const EXPLORE_SEED: u64 = 1;

/// Exploration throughput (`cowlab explore`, docs/exploration.md): the
/// time per interleaving of a PCT search of each [`EXPLORED`] test, a
/// fresh VM per interleaving, with a fixed budget of `litmus_runs`
/// interleavings per round, going on past witnesses and minimizing
/// nothing, so that every round searches the same interleavings.
pub fn explore_rates(opts: &BenchOptions) -> Result<Vec<Measurement>, Error> {
    let mut rows = Vec::new();
    for (name, policy_name, _) in EXPLORED {
        let src = litmus::builtin::source(name).expect("a built-in test");
        let bad = |e: litmus::ParseError| Error::Run(format!("{name}: {e}"));
        let test = litmus::parse(src).map_err(bad)?;
        let explored = Arc::new(litmus::compile_for_explore(&test).map_err(bad)?);
        let normal = Arc::new(litmus::compile(&test).map_err(bad)?);
        let policy = Policy::preset(policy_name).unwrap_or(Policy::MAINLINE);
        let mut explore_opts =
            ExploreOptions::new(EXPLORE_STRATEGY, policy_name, policy, &opts.kvm_path);
        explore_opts.seed = EXPLORE_SEED;
        explore_opts.budget = Some(opts.litmus_runs.max(1));
        explore_opts.keep_going = true;
        explore_opts.minimize = false;
        let mut per_run = Vec::new();
        for _ in 0..opts.native_rounds.max(1) {
            let r = explore::explore(&explored, &normal, &explore_opts).map_err(|e| match e {
                ExploreError::Vm(e) => e,
                e => Error::Run(format!("explore {name}: {e}")),
            })?;
            // A timing with runs in error (or hung) is not a measurement.
            if let Some(msg) = r.errors.keys().next() {
                return Err(Error::Run(format!("explore {name}: {msg}")));
            }
            if r.stuck > 0 {
                return Err(Error::Run(format!(
                    "explore {name}: {} runs hit the watchdog",
                    r.stuck
                )));
            }
            // Every VM the search booted (the probe too) in its time.
            per_run.push(r.search_ms as f64 * 1e3 / r.made.max(1) as f64);
        }
        if let Some(stat) = Stat::of(per_run) {
            rows.push(Measurement {
                name: format!("explore {name}"),
                what: "time per interleaving (PCT, fresh VM, the explorer deciding at every point); interleavings/s = 1e6 / median",
                stat,
            });
        }
    }
    Ok(rows)
}
