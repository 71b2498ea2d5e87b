//! Injection points, rules, schedules and chaos (docs/design.md §8).
//!
//! The memory manager and the VMM call [`Hooks::hit`] (the mm:
//! [`Hooks::at`]) at named points. With nothing set the call is one
//! relaxed load. Rules act at points (delay, pause, count, fail, panic),
//! filtered by vCPU, address, hit number and run; a schedule orders
//! (vCPU, point) events across vCPUs and, when it cannot be satisfied,
//! says where each thread was blocked; chaos adds seeded random delays.
//!
//! - `points`: the points ([`Point`]), declared once;
//! - `spec`: the text forms of rules and schedules;
//! - `rules`: arming, removing and counting rules;
//! - `schedule`: enforcing a schedule, its `unreachable` report, the
//!   recorded order and [`witness_schedule`];
//! - `park`: blocked and paused vCPUs, delays, the end of a run;
//! - `chaos`: seeded random delays;
//! - `explore`: exploration, where every point parks its vCPU and a
//!   chooser decides who goes next;
//! - this file: [`Hooks`] and [`Hooks::hit`], which applies all of them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

mod chaos;
mod explore;
mod park;
mod points;
mod rules;
mod schedule;
mod spec;
#[cfg(test)]
mod tests;
mod threads;

pub use explore::{
    await_word, Chooser, ChooserSlot, Decision, LockFree, Parked, WordReader, AWAIT_HOOK,
    DECISION_LIMIT, LOCK_POINT,
};
pub use park::{START, WAKE};
pub use points::{is_point, Point, POINTS};
pub use schedule::{witness_schedule, PointHit};

use chaos::Chaos;
use park::Blocked;
use rules::Armed;
use schedule::{Recording, Schedule};

pub use spec::{parse_rule, parse_schedule, parse_step, Action, Rule, SpecError, Step};

/// What a rule asked of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// Fail the operation (an allocation).
    Fail,
}

/// A rule acted at a point: what an observer (the control socket) is told.
#[derive(Debug, Clone)]
pub struct HookEvent {
    pub point: String,
    pub cpu: Option<usize>,
    pub addr: Option<u64>,
    /// The rule that acted, as written.
    pub rule: String,
}

/// Receives every [`HookEvent`]; must not block.
pub type Observer = std::sync::Arc<dyn Fn(HookEvent) + Send + Sync>;

#[derive(Default)]
struct ObserverSlot(Mutex<Option<Observer>>);

impl std::fmt::Debug for ObserverSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ObserverSlot")
    }
}

/// The hooks of one VM.
#[derive(Debug, Default)]
pub struct Hooks {
    active: AtomicBool,
    rules: Mutex<Vec<std::sync::Arc<Armed>>>,
    schedule: Mutex<Schedule>,
    /// Schedule progress (waited on with `schedule` held).
    changed: Condvar,
    /// Pauses lifted (waited on with `paused` held: a condvar serves one
    /// mutex).
    unpaused: Condvar,
    chaos: Mutex<Option<std::sync::Arc<Chaos>>>,
    /// Where each vCPU is blocked, for `unreachable` reports.
    blocked: Mutex<BTreeMap<usize, Blocked>>,
    /// Each vCPU's OS thread (`threads`), to ask the kernel whether a
    /// "blocked" vCPU really sleeps.
    tids: Mutex<BTreeMap<usize, u32>>,
    /// vCPUs whose threads have ended.
    ended: Mutex<std::collections::BTreeSet<usize>>,
    /// vCPUs parked by a `pause` rule (or all, `usize::MAX`), until resumed.
    paused: Mutex<BTreeMap<usize, String>>,
    /// Everything waiting here goes free (the run is ending).
    released: AtomicBool,
    /// Wakes `delay=` rules when the run ends (waited on with `delaying`).
    release: Condvar,
    delaying: Mutex<()>,
    observer: ObserverSlot,
    /// With [`Hooks::record_order`]: every hit by a vCPU, in order.
    order: Mutex<Option<Recording>>,
    /// Exploration: the explorer's state, and its wake-ups (waited on with
    /// `explore` held).
    explore: Mutex<Option<explore::Explore>>,
    explored: Condvar,
    /// Whether `explore` is set: the vCPU entry, start, lock-wait and wake
    /// paths look at this one relaxed load, not the mutex, when not
    /// exploring (a run with rules or chaos is `active` too).
    explore_armed: AtomicBool,
    /// The trace recorder, if the run is traced: every hit is an event.
    pub trace: crate::trace::TraceSlot,
    /// Which run of a litmus test this VM is (1-based; 0 is taken as 1),
    /// for rules' `run=` filter.
    run: AtomicU64,
    /// Since when every live vCPU has been asleep in a litmus `await`
    /// ([`Hooks::event_deadlock`]).
    events_stuck_since: Mutex<Option<std::time::Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hooks {
    pub fn new() -> Self {
        Self::default()
    }

    fn refresh_active(&self) {
        let active = !lock(&self.rules).is_empty()
            || !lock(&self.schedule).steps.is_empty()
            || lock(&self.chaos).is_some()
            || lock(&self.explore).is_some();
        self.active.store(active, Ordering::Release);
    }

    /// Whether any rule, schedule or chaos is armed.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Tells `observer` about every rule that acts from now on.
    pub fn set_observer(&self, observer: Option<Observer>) {
        *lock(&self.observer.0) = observer;
    }

    /// vCPU `cpu` reached the mm's or the VMM's `point` (about `addr`): see
    /// [`Hooks::hit`].
    #[inline]
    pub fn at(&self, point: Point, cpu: Option<usize>, addr: Option<u64>) -> Result<(), Injected> {
        self.hit(point.name(), cpu, addr)
    }

    /// vCPU `cpu` reached `point` (about `addr`). Applies the rules, the
    /// schedule and chaos; may block, delay, or ask the caller to fail.
    pub fn hit(&self, point: &str, cpu: Option<usize>, addr: Option<u64>) -> Result<(), Injected> {
        if let Some(t) = self.trace.get() {
            t.emit(
                crate::trace::Kind::Point,
                &[addr.unwrap_or(u64::MAX)],
                point,
            );
        }
        if !self.active.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.hit_slow(point, cpu, addr)
    }

    fn hit_slow(&self, point: &str, cpu: Option<usize>, addr: Option<u64>) -> Result<(), Injected> {
        let rules: Vec<_> = lock(&self.rules)
            .iter()
            .filter(|r| r.rule.point == point)
            .cloned()
            .collect();
        let mut result = Ok(());
        let run = self.run.load(Ordering::Relaxed).max(1);
        for r in rules {
            if !r.rule.matches_target(run, cpu, addr) {
                continue;
            }
            let n = r.matched.fetch_add(1, Ordering::AcqRel) + 1;
            if !r.rule.matches_hit(n) {
                continue;
            }
            r.acted.fetch_add(1, Ordering::AcqRel);
            if let Some(t) = self.trace.get() {
                t.emit(
                    crate::trace::Kind::Rule,
                    &[addr.unwrap_or(u64::MAX)],
                    &r.rule.to_string(),
                );
            }
            if let Some(observe) = lock(&self.observer.0).clone() {
                observe(HookEvent {
                    point: point.to_string(),
                    cpu,
                    addr,
                    rule: r.rule.to_string(),
                });
            }
            match r.rule.action {
                Action::Delay(us) => self.delay(Duration::from_micros(us)),
                Action::Count => {}
                Action::Fail => result = Err(Injected::Fail),
                Action::Pause => self.pause(cpu, point),
                // Only a vCPU thread panics: the VMM catches it there and
                // ends the run in an error (a rule can also act on the
                // controlling thread, which must not die).
                Action::Panic if crate::cpu::current().is_some() => {
                    panic!("injected panic at {point} ({})", r.rule)
                }
                Action::Panic => {}
            }
        }
        if let Some(cpu) = cpu {
            self.record(cpu, point, addr);
            self.schedule_step(cpu, point, addr);
            self.chaos_delay(cpu);
            self.explore_step(cpu, point, addr);
        }
        result
    }
}
