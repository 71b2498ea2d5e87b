//! A witness's interleaving as a `schedule { … }` block, and its
//! minimization: steps are removed while replaying the schedule (as a
//! forced schedule, on the test compiled normally) still gives the witness
//! every time.

use std::sync::Arc;

use super::ExploreOptions;
use crate::hooks::{parse_step, Decision, Step, AWAIT_HOOK, LOCK_POINT, START, WAKE};
use crate::litmus::compile::Compiled;
use crate::litmus::run::{run_test, RunOptions};

const PAGE: u64 = 4096;

/// A step of a schedule, and how a litmus file writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedStep {
    pub step: Step,
    pub text: String,
    /// Its address is in one of the test's regions (or it has none).
    pub in_region: bool,
}

/// Replays a candidate must reproduce the witness in, all of them, to be
/// taken while minimizing.
const TRIES: u64 = 5;

/// Replays of the final schedule, reported.
const FINAL_REPLAYS: u64 = 10;

/// At most this many candidate schedules are tried.
const MAX_CANDIDATES: usize = 200;

/// The interleaving of `decisions` as schedule steps, one per decision,
/// each named by region (or page) and hit number so that no other hit can
/// take its place. The hooks before `await`s (which only an explored build
/// has) and the explorer's own `start`, `wake` and `lock:` points are left
/// out.
pub fn schedule_of(test: &Compiled, decisions: &[Decision]) -> Vec<SchedStep> {
    let boot = test
        .test
        .threads
        .iter()
        .filter(|t| t.name.starts_with('P'))
        .count();
    let mut hits: std::collections::BTreeMap<(usize, String, (u64, u64)), u64> = Default::default();
    let mut all: Vec<SchedStep> = Vec::new();
    for d in decisions {
        let Some(p) = d.enabled.iter().find(|p| p.cpu == d.chosen) else {
            continue;
        };
        if p.point == WAKE
            || p.point == START
            || p.point.starts_with(LOCK_POINT)
            || p.point
                .strip_prefix("guest:")
                .is_some_and(|h| h.starts_with(AWAIT_HOOK))
        {
            continue;
        }
        let region = p.addr.and_then(|a| {
            test.regions
                .iter()
                .find(|r| a >= r.addr && a < r.addr + r.pages * PAGE)
        });
        let range = match (p.addr, region) {
            (_, Some(r)) => Some((r.addr, r.addr + r.pages * PAGE)),
            (Some(a), None) => Some((a & !(PAGE - 1), (a & !(PAGE - 1)) + PAGE)),
            (None, None) => None,
        };
        let n = hits
            .entry((p.cpu, p.point.clone(), range.unwrap_or((0, 0))))
            .or_default();
        *n += 1;
        let who = if p.cpu < boot {
            format!("P{}", p.cpu)
        } else {
            format!("v{}", p.cpu)
        };
        let mut text = format!("{who}@{}", p.point);
        match (region, range) {
            (Some(r), _) => text += &format!("[{}]", r.name),
            (None, Some((lo, hi))) => text += &format!("/addr={lo:#x}-{hi:#x}"),
            (None, None) => {}
        }
        if *n > 1 {
            text += &format!("/hit={n}");
        }
        all.push(SchedStep {
            step: Step {
                vcpu: p.cpu,
                point: p.point.clone(),
                addr: range,
                hit: Some(*n),
            },
            text,
            in_region: p.addr.is_none() || region.is_some(),
        });
    }
    all
}

/// `steps` with only the first and last step of each stretch of one vCPU,
/// and every guest hook (the test put it there to bracket an access that
/// no other point marks).
pub fn stretches(steps: &[SchedStep]) -> Vec<SchedStep> {
    let mut keep = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        let first = i == 0 || steps[i - 1].step.vcpu != s.step.vcpu;
        let last = i + 1 == steps.len() || steps[i + 1].step.vcpu != s.step.vcpu;
        if first || last || s.step.point.starts_with("guest:") {
            keep.push(s.clone());
        }
    }
    keep
}

/// The outcome of [`minimize`].
#[derive(Debug, Clone)]
pub struct Minimized {
    /// `None` if not even the whole schedule reproduced the witness.
    pub steps: Option<Vec<SchedStep>>,
    pub replays: u64,
    pub reproduced: u64,
}

/// How many of `runs` replays of `steps` gave a witness.
fn replay(test: &Arc<Compiled>, opts: &ExploreOptions, steps: &[SchedStep], runs: u64) -> u64 {
    if steps.len() < 2 {
        return 0;
    }
    let mut o = RunOptions::plain(runs, &opts.policy_name, opts.policy, &opts.kvm_path);
    o.timeout = opts.timeout;
    o.schedule = Some(steps.iter().map(|s| s.step.clone()).collect());
    run_test(test, &o).map_or(0, |r| r.positive)
}

/// Removes steps of `steps` while every one of [`TRIES`] replays still
/// gives the witness: starting from the first that reproduces it of the
/// [`stretches`] without the steps outside the test's regions, the
/// stretches, every step without those, and every step; then one step at
/// a time from the end, until no step can go.
pub fn minimize(test: &Arc<Compiled>, opts: &ExploreOptions, steps: Vec<SchedStep>) -> Minimized {
    // One replay at a time: most candidates fail at the first.
    let holds = |s: &[SchedStep]| (0..TRIES).all(|_| replay(test, opts, s, 1) == 1);
    let mut tried = 4;
    // Steps on pages outside the regions (a thread's own stack, which a
    // replay may not fault or flush the same way) are left out first.
    let inside =
        |s: &[SchedStep]| -> Vec<SchedStep> { s.iter().filter(|s| s.in_region).cloned().collect() };
    let short = stretches(&steps);
    let candidates = [inside(&short), short, inside(&steps), steps];
    let Some(mut best) = candidates.into_iter().find(|c| holds(c)) else {
        return Minimized {
            steps: None,
            replays: 0,
            reproduced: 0,
        };
    };
    let mut changed = true;
    while changed && tried < MAX_CANDIDATES {
        changed = false;
        let mut i = best.len();
        while i > 0 && tried < MAX_CANDIDATES {
            i -= 1;
            let mut candidate = best.clone();
            candidate.remove(i);
            tried += 1;
            if holds(&candidate) {
                best = candidate;
                changed = true;
            }
        }
    }
    let reproduced = replay(test, opts, &best, FINAL_REPLAYS);
    Minimized {
        steps: Some(best),
        replays: FINAL_REPLAYS,
        reproduced,
    }
}

/// Parses a schedule step as printed by [`schedule_of`], resolving
/// `[region]` against `test` (for tests of this module and of callers).
pub fn parse_printed(test: &Compiled, text: &str) -> Option<Step> {
    let (who, rest) = text.split_once('@')?;
    let vcpu: usize = match who.strip_prefix('P') {
        Some(n) => n.parse().ok()?,
        None => who.strip_prefix('v')?.parse().ok()?,
    };
    let resolved = match rest.split_once('[') {
        Some((p, tail)) => {
            let (name, filters) = tail.split_once(']')?;
            let r = test.regions.iter().find(|r| r.name == name)?;
            format!(
                "{p}/addr={:#x}-{:#x}{filters}",
                r.addr,
                r.addr + r.pages * PAGE
            )
        }
        None => rest.to_string(),
    };
    parse_step(&format!("v{vcpu}@{resolved}")).ok()
}
