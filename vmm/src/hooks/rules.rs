//! Rules: armed at a point, filtered, counted ([`Hooks::add_rule`]); the
//! actions themselves are applied by [`Hooks::hit`].

use std::sync::atomic::{AtomicU64, Ordering};

use super::{lock, Hooks, Rule};

/// A rule and its counters.
#[derive(Debug)]
pub(super) struct Armed {
    pub(super) rule: Rule,
    /// Who added it (a control-socket rule id), to remove it by.
    pub(super) tag: Option<u64>,
    /// Hits that matched the point and filters so far.
    pub(super) matched: AtomicU64,
    /// Hits the action was applied to.
    pub(super) acted: AtomicU64,
}

impl Hooks {
    /// Adds a rule; returns its id.
    pub fn add_rule(&self, rule: Rule) -> usize {
        self.add_tagged_rule(rule, None)
    }

    /// Adds a rule that [`Hooks::remove_tagged`] can take out again.
    pub fn add_tagged_rule(&self, rule: Rule, tag: Option<u64>) -> usize {
        let mut rules = lock(&self.rules);
        rules.push(std::sync::Arc::new(Armed {
            rule,
            tag,
            matched: AtomicU64::new(0),
            acted: AtomicU64::new(0),
        }));
        let id = rules.len() - 1;
        drop(rules);
        self.refresh_active();
        id
    }

    /// Removes every rule at `point` (all rules if `None`); how many went.
    pub fn remove_rules(&self, point: Option<&str>) -> usize {
        let mut rules = lock(&self.rules);
        let before = rules.len();
        rules.retain(|r| point.is_some_and(|p| r.rule.point != p));
        let gone = before - rules.len();
        drop(rules);
        self.refresh_active();
        gone
    }

    /// Removes the rules added with `tag`; how many went.
    pub fn remove_tagged(&self, tag: u64) -> usize {
        let mut rules = lock(&self.rules);
        let before = rules.len();
        rules.retain(|r| r.tag != Some(tag));
        let gone = before - rules.len();
        drop(rules);
        self.refresh_active();
        gone
    }

    /// The rules with how often each matched and acted.
    pub fn rule_counts(&self) -> Vec<(String, u64, u64)> {
        lock(&self.rules)
            .iter()
            .map(|r| {
                (
                    r.rule.to_string(),
                    r.matched.load(Ordering::Acquire),
                    r.acted.load(Ordering::Acquire),
                )
            })
            .collect()
    }

    /// Sets which run (1-based) of a litmus test this VM is, for rules
    /// filtered by `run=`/`runs=`.
    pub fn set_run(&self, run: u64) {
        self.run.store(run, Ordering::Relaxed);
    }
}
