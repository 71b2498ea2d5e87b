//! Litmus runs per second: a fresh VM per run, as `cowlab run` does.

use std::sync::Arc;

use super::{us, BenchOptions, Measurement, Stat};
use crate::kvm::Error;
use crate::litmus;
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
