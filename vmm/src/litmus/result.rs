//! The result of many runs of a litmus test, as litmus7 prints it (the
//! histogram, the witnesses, the observation against `expect`) and as JSON,
//! with the lines that replay a witness or an error.

use std::collections::BTreeMap;
use std::time::Duration;

use super::ast::Verdict;
use crate::kvm::exit_code;
use crate::policy::Policy;

/// The result of many runs.
#[derive(Debug, Clone)]
pub struct LitmusResult {
    pub test: String,
    pub policy_name: String,
    pub policy: Policy,
    pub runs: u64,
    /// State → (count, satisfies `exists`).
    pub histogram: BTreeMap<String, (u64, bool)>,
    pub positive: u64,
    pub negative: u64,
    pub observation: Verdict,
    /// The `expect` line for this policy, if any, and whether it held.
    pub expectation: Option<(Verdict, bool)>,
    pub condition: String,
    pub elapsed: Duration,
    /// Runs whose schedule could not be satisfied, by reason.
    pub unreachable: BTreeMap<String, u64>,
    /// Runs that ended in an error (a VMM error or panic in a vCPU thread,
    /// an `mm_verify` violation, a VM that could not start), by message.
    /// Such a run has no final state: it is neither positive nor negative.
    pub errors: BTreeMap<String, u64>,
    /// With chaos: the seeds of the runs that ended in an error.
    pub error_seeds: Vec<u64>,
    /// Of the runs in error, those whose error is an `mm_verify` violation
    /// (no vCPU failed first).
    pub violations: u64,
    /// Runs the watchdog ended (some thread `stuck`), and its timeout.
    pub stuck: u64,
    /// With chaos: the seeds of the runs the watchdog ended.
    pub stuck_seeds: Vec<u64>,
    /// Of the stuck runs, those ended at once because every thread slept in
    /// an `await` nothing could signal (under a schedule), and why the
    /// first was.
    pub deadlocked: u64,
    pub deadlock: Option<String>,
    pub timeout: Duration,
    /// The schedule enforced, as text, if any.
    pub schedule: Option<String>,
    /// With chaos: the seeds of the runs that satisfied `exists`.
    pub witness_seeds: Vec<u64>,
    /// With chaos and no schedule: the order in which a witness reached
    /// the points, as a schedule, and how well it replays.
    pub witness_schedule: Option<WitnessOrder>,
    /// The flags besides `--chaos` and `--schedule` that a replay needs.
    pub replay_flags: String,
    /// The test's own schedule was turned off (`--schedule none`).
    pub schedule_off: bool,
    /// Each rule, as written, with its matched and acted hits summed over
    /// the runs.
    pub rules: BTreeMap<String, (u64, u64)>,
}

/// A witness's order of points, replayed as a schedule.
#[derive(Debug, Clone)]
pub struct WitnessOrder {
    /// The chaos seed of the witness (its delays are replayed too).
    pub seed: u64,
    pub schedule: String,
    /// Replays made, and how many gave a witness again.
    pub replays: u64,
    pub reproduced: u64,
}

impl LitmusResult {
    /// litmus7's text shape.
    pub fn text(&self) -> String {
        let mut out = format!("Test {} (policy {})\n", self.test, self.policy_name);
        out += &format!("Histogram ({} states)\n", self.histogram.len());
        for (state, (n, witness)) in &self.histogram {
            out += &format!("{n:<8}{}>{state}\n", if *witness { "*" } else { ":" });
        }
        for (why, n) in &self.unreachable {
            out += &format!("Unreachable ({n} runs): {why}\n");
        }
        for (msg, n) in &self.errors {
            out += &format!("Error ({n} runs): {msg}\n");
        }
        let watchdog = self.stuck.saturating_sub(self.deadlocked);
        if watchdog > 0 {
            out += &format!(
                "Stuck ({watchdog} runs): the watchdog stopped them after {:.1}s\n",
                self.timeout.as_secs_f64()
            );
        }
        if let (n @ 1.., Some(why)) = (self.deadlocked, &self.deadlock) {
            out += &format!("Stuck ({n} runs): {why}; stopped at once\n");
        }
        out += if self.positive > 0 { "Ok\n" } else { "No\n" };
        out += &format!(
            "Witnesses\nPositive: {}, Negative: {}",
            self.positive, self.negative
        );
        out += &match self.errored() {
            0 => "\n".to_string(),
            n => format!(", Errors: {n}\n"),
        };
        out += &format!("Condition exists {}\n", self.condition);
        out += &format!(
            "Observation {} {} {} {}\n",
            self.test,
            self.observation.as_str(),
            self.positive,
            self.negative
        );
        if self.runs == 0 {
            out += "No run finished: no expectation was checked\n";
        }
        if let Some((want, met)) = self.expectation {
            out += &format!(
                "Expect {} {}: {}\n",
                self.policy_name,
                want.as_str(),
                if met { "met" } else { "NOT met" }
            );
        }
        for (rule, (matched, acted)) in &self.rules {
            out += &format!("Rule {rule}: matched {matched}, acted {acted}\n");
        }
        if self.positive > 0 {
            if let Some(s) = &self.schedule {
                out += &format!("Replay: --schedule '{s}' (forces it in every run)\n");
            } else if let Some(seed) = self.witness_seeds.first() {
                out += &self.chaos_replay(*seed);
            }
        }
        if let Some(seed) = self.error_seeds.first() {
            out += &format!(
                "Error replay: --chaos {seed} --runs 1 {}{}\n",
                self.replay_flags,
                if self.schedule_off {
                    " --schedule none"
                } else {
                    ""
                }
            );
        }
        out += &format!("Time {} {:.2}\n", self.test, self.elapsed.as_secs_f64());
        out
    }

    /// How many runs ended in an error.
    pub fn errored(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The CLI's exit status: 3 if any run ended in an error (whatever the
    /// verdict), else 1 if the expectation did not hold, else 0.
    pub fn exit_code(&self) -> i32 {
        if !self.errors.is_empty() {
            exit_code::VM_ERROR
        } else if self.met() {
            exit_code::OK
        } else {
            exit_code::FAILED
        }
    }

    /// How to replay the first chaos witness (seed `seed`): its order of
    /// points as a schedule, with the seed's delays; or, if the order was
    /// not kept, the seed alone.
    fn chaos_replay(&self, seed: u64) -> String {
        let more: Vec<String> = self
            .witness_seeds
            .iter()
            .skip(1)
            .take(4)
            .map(|s| s.to_string())
            .collect();
        let more = if more.is_empty() {
            String::new()
        } else {
            format!(" (other witnesses: seeds {})", more.join(", "))
        };
        match &self.witness_schedule {
            Some(w) if w.reproduced > 0 => format!(
                "Replay: --schedule '{}' --chaos {} --runs 1 {} (seed {}'s order of points: reproduced it in {}/{} replays)\n",
                w.schedule, w.seed, self.replay_flags, w.seed, w.reproduced, w.replays
            ),
            other => format!(
                "Replay: --chaos {seed} --runs 1 {}{} (replays the injected delays; timing outside them still varies{}){more}\n",
                self.replay_flags,
                if self.schedule_off { " --schedule none" } else { "" },
                match other {
                    Some(w) => format!(
                        "; no witness's order of points reproduced it in {} replays",
                        w.replays
                    ),
                    None => String::new(),
                }
            ),
        }
    }

    /// The same as one JSON object.
    pub fn json(&self) -> serde_json::Value {
        let knobs: serde_json::Map<String, serde_json::Value> = crate::policy::KNOBS
            .iter()
            .zip(self.policy.values())
            .map(|((k, _, _), v)| (k.to_string(), v.into()))
            .collect();
        let histogram: Vec<serde_json::Value> = self
            .histogram
            .iter()
            .map(|(s, (n, w))| serde_json::json!({"state": s, "count": n, "witness": w}))
            .collect();
        serde_json::json!({
            "test": self.test,
            "policy": self.policy_name,
            "knobs": knobs,
            "runs": self.runs,
            "histogram": histogram,
            "condition": self.condition,
            "observation": self.observation.as_str(),
            "positive": self.positive,
            "negative": self.negative,
            "expectation": self.expectation.map(|(v, met)| serde_json::json!({"verdict": v.as_str(), "met": met})),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "unreachable": self.unreachable.iter().map(|(w, n)| serde_json::json!({"reason": w, "runs": n})).collect::<Vec<_>>(),
            "errors": self.errors,
            "error_seeds": self.error_seeds,
            "violations": self.violations,
            "stuck": self.stuck,
            "stuck_seeds": self.stuck_seeds,
            "deadlocked": self.deadlocked,
            "deadlock": self.deadlock,
            "timeout_s": self.timeout.as_secs_f64(),
            "schedule": self.schedule,
            "witness_seeds": self.witness_seeds,
            "witness_schedule": self.witness_schedule.as_ref().map(|w| serde_json::json!({
                "schedule": w.schedule, "seed": w.seed, "replays": w.replays, "reproduced": w.reproduced,
            })),
            "rules": self.rules.iter().map(|(r, (m, a))| serde_json::json!({"rule": r, "matched": m, "acted": a})).collect::<Vec<_>>(),
        })
    }

    /// Whether the expectation for this policy (if any) held.
    pub fn met(&self) -> bool {
        self.expectation.is_none_or(|(_, met)| met)
    }
}
