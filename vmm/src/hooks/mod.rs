//! Injection points, rules, schedules and chaos (DESIGN.md §8).
//!
//! The memory manager and the VMM call [`Hooks::hit`] at named points. With
//! nothing set the call is one relaxed load. Rules act at points (delay,
//! pause, count, fail, panic), filtered by vCPU, address, hit number and
//! run; a
//! schedule orders (vCPU, point) events across vCPUs and, when it cannot
//! be satisfied, says where each thread was blocked; chaos adds seeded
//! random delays.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::trace::LockKind;

mod points;
mod spec;

pub use points::{is_point, Point, POINTS};

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

/// A rule and its counters.
#[derive(Debug)]
struct Armed {
    rule: Rule,
    /// Who added it (a control-socket rule id), to remove it by.
    tag: Option<u64>,
    /// Hits that matched the point and filters so far.
    matched: AtomicU64,
    /// Hits the action was applied to.
    acted: AtomicU64,
}

#[derive(Debug, Default)]
struct Schedule {
    steps: Vec<Step>,
    /// Per step, the hits so far that matched its vCPU, point and address.
    counts: Vec<u64>,
    next: usize,
    /// Set when the schedule was found unsatisfiable; waiters go free.
    aborted: bool,
    last_progress: Option<Instant>,
    /// Since when every live vCPU has been blocked (a deadlock, if it lasts).
    all_blocked_since: Option<Instant>,
    unreachable: Option<String>,
}

/// Seeded random delays, reproducible per vCPU.
#[derive(Debug)]
struct Chaos {
    seed: u64,
    max_delay: Duration,
    rngs: Mutex<BTreeMap<usize, u64>>,
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
    blocked: Mutex<BTreeMap<usize, String>>,
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
    /// The trace recorder, if the run is traced: every hit is an event.
    pub trace: crate::trace::TraceSlot,
    /// Which run of a litmus test this VM is (1-based; 0 is taken as 1),
    /// for rules' `run=` filter.
    run: AtomicU64,
}

/// A hit by a vCPU, as recorded for [`witness_schedule`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointHit {
    pub cpu: usize,
    pub point: String,
    pub addr: Option<u64>,
}

#[derive(Debug, Default)]
struct Recording {
    hits: Vec<PointHit>,
    /// More than [`RECORD_LIMIT`] hits: the order is incomplete.
    overflow: bool,
}

/// At most this many hits are recorded per run.
const RECORD_LIMIT: usize = 20_000;

/// How long a schedule may make no progress while a thread waits on it
/// before it is declared unsatisfiable.
const STALL: Duration = Duration::from_millis(400);

/// How long a vCPU about to take a step waits for the one that took the
/// step before to come to rest (see [`Hooks::settle`]).
const SETTLE: Duration = Duration::from_millis(2);

/// How long every live vCPU must stay blocked (on the schedule or on a lock
/// held by a blocked one) before that is taken as a deadlock. Only covers
/// the moment between a lock's release and its waiter's wake-up.
const DEADLOCK: Duration = Duration::from_millis(20);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The last stretch of a delay is spun, not slept, so that a short delay
/// (one widening a race window) ends when it should, not when the
/// scheduler wakes the thread.
const SPIN_TAIL: Duration = Duration::from_millis(1);

impl Hooks {
    pub fn new() -> Self {
        Self::default()
    }

    fn refresh_active(&self) {
        let active = !lock(&self.rules).is_empty()
            || !lock(&self.schedule).steps.is_empty()
            || lock(&self.chaos).is_some();
        self.active.store(active, Ordering::Release);
    }

    /// Whether any rule, schedule or chaos is armed.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

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

    /// Tells `observer` about every rule that acts from now on.
    pub fn set_observer(&self, observer: Option<Observer>) {
        *lock(&self.observer.0) = observer;
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

    /// Sets the schedule to enforce.
    pub fn set_schedule(&self, steps: Vec<Step>) {
        *lock(&self.schedule) = Schedule {
            counts: vec![0; steps.len()],
            steps,
            ..Schedule::default()
        };
        self.refresh_active();
    }

    /// Turns chaos on with `seed` (delays up to `max_delay`).
    pub fn set_chaos(&self, seed: u64, max_delay: Duration) {
        *lock(&self.chaos) = Some(std::sync::Arc::new(Chaos {
            seed,
            max_delay,
            rngs: Mutex::new(BTreeMap::new()),
        }));
        self.refresh_active();
    }

    /// Records the order of every hit from now on ([`Hooks::take_order`]).
    pub fn record_order(&self) {
        *lock(&self.order) = Some(Recording::default());
    }

    /// The hits recorded since [`Hooks::record_order`], in order; `None` if
    /// not recording or if there were too many to keep.
    pub fn take_order(&self) -> Option<Vec<PointHit>> {
        lock(&self.order)
            .take()
            .filter(|r| !r.overflow)
            .map(|r| r.hits)
    }

    /// Notes that vCPU `cpu`'s thread has ended.
    pub fn set_ended(&self, cpu: usize) {
        lock(&self.ended).insert(cpu);
    }

    /// Whether `cpu` is stopped where nothing it does can race with others:
    /// waiting at a point or for a lock, paused, or ended.
    fn at_rest(&self, cpu: usize) -> bool {
        lock(&self.blocked).contains_key(&cpu)
            || lock(&self.paused).contains_key(&cpu)
            || lock(&self.ended).contains(&cpu)
    }

    /// Notes that vCPU `cpu` is blocked (`Some(why)`) or not any more.
    pub fn set_blocked(&self, cpu: usize, why: Option<String>) {
        let mut b = lock(&self.blocked);
        match why {
            Some(w) => b.insert(cpu, w),
            None => b.remove(&cpu),
        };
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
        }
        result
    }

    fn record(&self, cpu: usize, point: &str, addr: Option<u64>) {
        let mut order = lock(&self.order);
        let Some(rec) = order.as_mut() else {
            return;
        };
        if rec.hits.len() >= RECORD_LIMIT {
            rec.overflow = true;
            return;
        }
        rec.hits.push(PointHit {
            cpu,
            point: point.to_string(),
            addr,
        });
    }

    fn chaos_delay(&self, cpu: usize) {
        let Some(chaos) = lock(&self.chaos).clone() else {
            return;
        };
        let r = {
            let mut rngs = lock(&chaos.rngs);
            let s = rngs
                .entry(cpu)
                .or_insert(chaos.seed ^ (cpu as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            *s ^= *s << 13;
            *s ^= *s >> 7;
            *s ^= *s << 17;
            *s
        };
        // One hit in four waits a random while: windows widen, reproducibly.
        if r % 4 == 0 {
            let us = (r >> 8) % (chaos.max_delay.as_micros() as u64 + 1);
            self.delay(Duration::from_micros(us));
        }
    }

    /// Holds the calling thread for `d` (a `delay=` rule, chaos), or until
    /// the run ends ([`Hooks::release_all`]: the watchdog, a `quit`, the VM
    /// dropped), whichever comes first. Beyond [`SPIN_TAIL`] it sleeps on a
    /// condvar that `release_all` wakes, so a delay longer than the
    /// watchdog neither burns a CPU nor keeps its vCPU from being stopped;
    /// the rest it spins. A delay too long for the clock lasts until the
    /// run ends.
    fn delay(&self, d: Duration) {
        let until = Instant::now().checked_add(d);
        let mut guard = lock(&self.delaying);
        loop {
            if self.released.load(Ordering::Acquire) {
                return;
            }
            let left = until.map_or(Duration::MAX, |u| {
                u.saturating_duration_since(Instant::now())
            });
            if left <= SPIN_TAIL {
                break;
            }
            guard = self
                .release
                .wait_timeout(guard, (left - SPIN_TAIL).min(Duration::from_secs(3600)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(guard);
        let Some(until) = until else { return };
        while Instant::now() < until && !self.released.load(Ordering::Acquire) {
            std::hint::spin_loop();
        }
    }

    fn schedule_step(&self, cpu: usize, point: &str, addr: Option<u64>) {
        let mut s = lock(&self.schedule);
        if s.aborted || s.next >= s.steps.len() {
            return;
        }
        // Count the hit for every pending step it matches; it takes the first
        // whose hit number (if any) it is.
        let mut taken = None;
        for j in s.next..s.steps.len() {
            if s.steps[j].matches(cpu, point, addr) {
                s.counts[j] += 1;
                if taken.is_none() && s.steps[j].hit.is_none_or(|n| n == s.counts[j]) {
                    taken = Some(j);
                }
            }
        }
        let Some(j) = taken else {
            return;
        };
        s.last_progress.get_or_insert_with(Instant::now);
        let waits = s.next < j;
        if let (true, Some(t)) = (waits, self.trace.get()) {
            let what = format!(
                "step {} waits for step {}: {}",
                j + 1,
                s.next + 1,
                s.steps[s.next]
            );
            t.emit(
                crate::trace::Kind::LockWait,
                &[LockKind::Schedule.code()],
                &what,
            );
        }
        while s.next < j && !s.aborted && !self.released.load(Ordering::Acquire) {
            let waiting_for = s.steps[s.next].clone();
            self.set_blocked(
                cpu,
                Some(format!(
                    "v{cpu} waits at {point} (step {}) for step {}: {waiting_for}",
                    j + 1,
                    s.next + 1
                )),
            );
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        self.set_blocked(cpu, None);
        if let (true, Some(t)) = (waits, self.trace.get()) {
            t.emit(
                crate::trace::Kind::LockDone,
                &[LockKind::Schedule.code()],
                "",
            );
        }
        s = self.settle(s, j, cpu);
        if s.next == j && !s.aborted {
            s.next = j + 1;
            s.last_progress = Some(Instant::now());
            self.changed.notify_all();
        }
    }

    /// Before `cpu` takes step `j`: if another vCPU took the step before,
    /// lets it run on until it comes to rest (its next step, a lock, its
    /// end), for at most [`SETTLE`]. Steps are then taken one thread at a
    /// time, so what a thread does between two of its points does not race
    /// with the next thread's, and replaying a schedule gives the same
    /// accesses in the same order (unless a thread runs longer than SETTLE
    /// without reaching a point, e.g. spinning on `await`).
    fn settle<'a>(
        &'a self,
        mut s: MutexGuard<'a, Schedule>,
        j: usize,
        cpu: usize,
    ) -> MutexGuard<'a, Schedule> {
        let Some(prev) = j.checked_sub(1).map(|k| s.steps[k].vcpu) else {
            return s;
        };
        let until = Instant::now() + SETTLE;
        while prev != cpu
            && !s.aborted
            && !self.released.load(Ordering::Acquire)
            && !self.at_rest(prev)
            && Instant::now() < until
        {
            s = self
                .changed
                .wait_timeout(s, Duration::from_micros(20))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        s
    }

    fn pause(&self, cpu: Option<usize>, point: &str) {
        let key = cpu.unwrap_or(usize::MAX);
        lock(&self.paused).insert(key, point.to_string());
        if let Some(c) = cpu {
            self.set_blocked(c, Some(format!("v{c} paused at {point}")));
        }
        if let Some(t) = self.trace.get() {
            t.emit(
                crate::trace::Kind::LockWait,
                &[LockKind::Pause.code()],
                point,
            );
        }
        let mut paused = lock(&self.paused);
        while paused.contains_key(&key) && !self.released.load(Ordering::Acquire) {
            paused = self
                .unpaused
                .wait_timeout(paused, Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(paused);
        if let Some(t) = self.trace.get() {
            t.emit(crate::trace::Kind::LockDone, &[LockKind::Pause.code()], "");
        }
        if let Some(c) = cpu {
            self.set_blocked(c, None);
        }
    }

    /// The vCPUs waiting on a schedule step or a lock, with why.
    pub fn blocked(&self) -> BTreeMap<usize, String> {
        lock(&self.blocked).clone()
    }

    /// The vCPUs parked by `pause` rules, with their points.
    pub fn paused(&self) -> BTreeMap<usize, String> {
        lock(&self.paused).clone()
    }

    /// Lets vCPU `cpu` (or every one) go on from a `pause` rule.
    pub fn resume(&self, cpu: Option<usize>) {
        let mut paused = lock(&self.paused);
        match cpu {
            Some(c) => {
                paused.remove(&c);
            }
            None => paused.clear(),
        }
        drop(paused);
        self.unpaused.notify_all();
    }

    /// Called while a run goes on with the number of `live` vCPUs: if every
    /// one is blocked (a deadlock), or the schedule made no progress for a
    /// while with one waiting on it, or all ended with steps left, the
    /// schedule is unsatisfiable: say where each is blocked and let the
    /// waiters go.
    pub fn check_schedule(&self, live: usize) -> Option<String> {
        let mut s = lock(&self.schedule);
        if s.aborted || s.steps.is_empty() || s.next >= s.steps.len() {
            return None;
        }
        if !lock(&self.paused).is_empty() {
            // A breakpoint holds a thread: waiting for it is not a deadlock.
            s.all_blocked_since = None;
            if s.last_progress.is_some() {
                s.last_progress = Some(Instant::now());
            }
            return None;
        }
        let blocked = lock(&self.blocked).len();
        let all_blocked = live > 0 && blocked >= live;
        let deadlocked = match (all_blocked, s.all_blocked_since) {
            (false, _) => {
                s.all_blocked_since = None;
                false
            }
            (true, None) => {
                s.all_blocked_since = Some(Instant::now());
                false
            }
            (true, Some(t)) => t.elapsed() > DEADLOCK,
        };
        let stalled = s.last_progress.is_some_and(|t| t.elapsed() > STALL) && blocked > 0;
        if !(deadlocked || stalled || live == 0) {
            return None;
        }
        let mut why: Vec<String> = lock(&self.blocked).values().cloned().collect();
        if why.is_empty() {
            why.push(format!(
                "step {} ({}) never happened",
                s.next + 1,
                s.steps[s.next]
            ));
        }
        let report = why.join("; ");
        s.aborted = true;
        s.unreachable = Some(report.clone());
        self.changed.notify_all();
        Some(report)
    }

    /// Counts as progress of the schedule (vCPUs were stopped from outside:
    /// their standing still is not a stall).
    pub fn hold_progress(&self) {
        let mut s = lock(&self.schedule);
        if s.last_progress.is_some() {
            s.last_progress = Some(Instant::now());
        }
        s.all_blocked_since = None;
    }

    /// Whether the run is ending and every waiter was let go.
    pub fn released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    /// Why the schedule was unsatisfiable, if it was.
    pub fn unreachable(&self) -> Option<String> {
        lock(&self.schedule).unreachable.clone()
    }

    /// Whether every step happened.
    pub fn schedule_done(&self) -> bool {
        let s = lock(&self.schedule);
        s.next >= s.steps.len()
    }

    /// Frees every thread waiting in a pause or a schedule (end of run).
    pub fn release_all(&self) {
        self.released.store(true, Ordering::Release);
        lock(&self.schedule).aborted = true;
        self.changed.notify_all();
        // Under the lock, so a pause about to wait sees `released` first.
        drop(lock(&self.paused));
        self.unpaused.notify_all();
        drop(lock(&self.delaying));
        self.release.notify_all();
    }
}

/// A schedule that replays the interleaving `hits` recorded (in that
/// order): for each stretch of consecutive hits by one vCPU, its first and
/// last hit and every guest hook, each named by point, page and hit number,
/// so that no other hit can take its place. `None` if fewer than two vCPUs hit a point.
pub fn witness_schedule(hits: &[PointHit]) -> Option<Vec<Step>> {
    const PAGE: u64 = 4096;
    // Per hit, the step that names it: hit numbers count every hit the step
    // matches (by vCPU and point, and page if it has an address).
    let mut by_page: BTreeMap<(usize, &str, u64), u64> = BTreeMap::new();
    let mut by_point: BTreeMap<(usize, &str), u64> = BTreeMap::new();
    let steps: Vec<Step> = hits
        .iter()
        .map(|h| {
            let all = by_point.entry((h.cpu, &h.point)).or_default();
            *all += 1;
            let (addr, n) = match h.addr {
                Some(a) => {
                    let page = a & !(PAGE - 1);
                    let n = by_page.entry((h.cpu, &h.point, page)).or_default();
                    *n += 1;
                    (Some((page, page + PAGE)), *n)
                }
                None => (None, *all),
            };
            Step {
                vcpu: h.cpu,
                point: h.point.clone(),
                addr,
                hit: Some(n),
            }
        })
        .collect();
    let mut keep = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let first = i == 0 || steps[i - 1].vcpu != step.vcpu;
        let last = i + 1 == steps.len() || steps[i + 1].vcpu != step.vcpu;
        // A guest hook is kept wherever it is: the test put it there to
        // bracket an access that no other point marks.
        if first || last || step.point.starts_with("guest:") {
            keep.push(step.clone());
        }
    }
    let distinct = keep
        .iter()
        .map(|s| s.vcpu)
        .collect::<std::collections::BTreeSet<_>>();
    (distinct.len() >= 2).then_some(keep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_schedule_orders_two_threads() {
        let hooks = Arc::new(Hooks::new());
        hooks.set_schedule(parse_schedule("v1@guest:b < v0@guest:a").unwrap());
        let order = Arc::new(Mutex::new(Vec::new()));
        let t0 = {
            let (h, o) = (Arc::clone(&hooks), Arc::clone(&order));
            std::thread::spawn(move || {
                h.hit("guest:a", Some(0), None).unwrap();
                lock(&o).push("a");
            })
        };
        std::thread::sleep(Duration::from_millis(30));
        hooks.hit("guest:b", Some(1), None).unwrap();
        lock(&order).push("b");
        t0.join().unwrap();
        assert_eq!(*lock(&order), vec!["b", "a"]);
        assert!(hooks.schedule_done());
    }

    #[test]
    fn an_unsatisfiable_schedule_is_reported_and_frees_the_waiters() {
        let hooks = Arc::new(Hooks::new());
        hooks.set_schedule(parse_schedule("v0@guest:second < v0@guest:first").unwrap());
        let t = {
            let h = Arc::clone(&hooks);
            std::thread::spawn(move || h.hit("guest:first", Some(0), None))
        };
        let report = loop {
            if let Some(r) = hooks.check_schedule(1) {
                break r;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(report.contains("v0 waits at guest:first"), "{report}");
        t.join().unwrap().unwrap();
        assert!(hooks.unreachable().is_some());
    }

    #[test]
    fn rules_filter_by_vcpu_and_hit_and_fail_allocations() {
        let hooks = Hooks::new();
        hooks.add_rule(parse_rule("fail@alloc_page/v1/hit=2").unwrap());
        hooks.add_rule(parse_rule("count@alloc_page").unwrap());
        assert_eq!(hooks.hit("alloc_page", Some(1), None), Ok(()));
        assert_eq!(hooks.hit("alloc_page", Some(0), None), Ok(()));
        assert_eq!(hooks.hit("alloc_page", Some(1), None), Err(Injected::Fail));
        assert_eq!(hooks.hit("alloc_page", Some(1), None), Ok(()));
        let counts = hooks.rule_counts();
        assert_eq!((counts[0].1, counts[0].2), (3, 1));
        assert_eq!((counts[1].1, counts[1].2), (4, 4));
        assert_eq!(hooks.remove_rules(None), 2);
        assert!(!hooks.active.load(Ordering::Relaxed));
    }

    #[test]
    fn a_run_filter_arms_a_rule_in_those_runs_only() {
        let hooks = Hooks::new();
        hooks.add_rule(parse_rule("fail@alloc_page/runs=2-3").unwrap());
        assert_eq!(hooks.hit("alloc_page", Some(0), None), Ok(()), "run 1");
        hooks.set_run(3);
        assert_eq!(hooks.hit("alloc_page", Some(0), None), Err(Injected::Fail));
        hooks.set_run(4);
        assert_eq!(hooks.hit("alloc_page", Some(0), None), Ok(()));
        let counts = hooks.rule_counts();
        assert_eq!((counts[0].1, counts[0].2), (1, 1), "matched only in run 3");
    }

    #[test]
    fn chaos_is_reproducible_per_seed() {
        let delays = |seed| {
            let hooks = Hooks::new();
            hooks.set_chaos(seed, Duration::from_micros(50));
            let chaos = lock(&hooks.chaos).clone().unwrap();
            (0..20)
                .map(|_| {
                    hooks.chaos_delay(3);
                    *lock(&chaos.rngs).get(&3).unwrap()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(delays(7), delays(7));
        assert_ne!(delays(7), delays(8));
    }

    #[test]
    fn a_pause_holds_until_resumed() {
        let hooks = Arc::new(Hooks::new());
        hooks.add_rule(parse_rule("pause@guest:x/v2").unwrap());
        let t = {
            let h = Arc::clone(&hooks);
            std::thread::spawn(move || h.hit("guest:x", Some(2), None))
        };
        while hooks.paused().is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(hooks.paused().get(&2).map(String::as_str), Some("guest:x"));
        hooks.resume(Some(2));
        t.join().unwrap().unwrap();
    }

    #[test]
    fn a_step_with_a_hit_number_waits_for_that_hit() {
        let hooks = Arc::new(Hooks::new());
        hooks.set_schedule(parse_schedule("v0@guest:a/hit=2 < v1@guest:b").unwrap());
        // The first hit is not the step's: it goes on at once.
        hooks.hit("guest:a", Some(0), None).unwrap();
        assert!(!hooks.schedule_done());
        let t1 = {
            let h = Arc::clone(&hooks);
            std::thread::spawn(move || h.hit("guest:b", Some(1), None))
        };
        std::thread::sleep(Duration::from_millis(30));
        assert!(!t1.is_finished(), "v1 went before v0's second hit");
        hooks.hit("guest:a", Some(0), None).unwrap();
        t1.join().unwrap().unwrap();
        assert!(hooks.schedule_done());
    }

    fn hit(cpu: usize, point: &str, addr: Option<u64>) -> PointHit {
        PointHit {
            cpu,
            point: point.into(),
            addr,
        }
    }

    #[test]
    fn a_witness_schedule_keeps_the_ends_of_each_stretch() {
        let hits = [
            hit(0, "fault:fill", Some(0x1000)),
            hit(0, "fault:fill", Some(0x1008)),
            hit(0, "fault:fill", Some(0x1010)),
            hit(1, "guest:go", None),
            hit(1, "guest:gone", None),
            hit(1, "fault:fill", Some(0x1000)),
            hit(0, "fault:fill", Some(0x2000)),
            hit(0, "guest:a", None),
            hit(1, "guest:go", None),
        ];
        let steps: Vec<String> = witness_schedule(&hits)
            .unwrap()
            .iter()
            .map(Step::to_string)
            .collect();
        assert_eq!(
            steps,
            [
                "v0@fault:fill/addr=0x1000-0x2000/hit=1",
                "v0@fault:fill/addr=0x1000-0x2000/hit=3",
                "v1@guest:go/hit=1",
                "v1@guest:gone/hit=1",
                "v1@fault:fill/addr=0x1000-0x2000/hit=1",
                "v0@fault:fill/addr=0x2000-0x3000/hit=1",
                "v0@guest:a/hit=1",
                "v1@guest:go/hit=2",
            ]
        );
        assert!(
            witness_schedule(&hits[..3]).is_none(),
            "one vCPU: nothing to order"
        );
    }

    #[test]
    fn the_order_is_recorded_only_when_asked() {
        let hooks = Hooks::new();
        hooks.set_chaos(1, Duration::ZERO);
        hooks.hit("guest:x", Some(0), None).unwrap();
        assert!(hooks.take_order().is_none());
        hooks.record_order();
        hooks.hit("guest:x", Some(1), None).unwrap();
        hooks.hit("fault:fill", Some(0), Some(0x5000)).unwrap();
        let order = hooks.take_order().unwrap();
        assert_eq!(
            order,
            [hit(1, "guest:x", None), hit(0, "fault:fill", Some(0x5000))]
        );
    }

    #[test]
    fn a_delay_longer_than_the_run_ends_when_the_run_does() {
        let hooks = Arc::new(Hooks::new());
        // 100 s, and one too long for the clock: both end with the run.
        hooks.add_rule(parse_rule("delay=100000000@guest:slow/v0").unwrap());
        hooks.add_rule(parse_rule(&format!("delay={}@guest:slow/v1", u64::MAX)).unwrap());
        let start = Instant::now();
        let threads: Vec<_> = (0..2)
            .map(|cpu| {
                let h = Arc::clone(&hooks);
                std::thread::spawn(move || h.hit("guest:slow", Some(cpu), None))
            })
            .collect();
        while hooks.rule_counts().iter().any(|r| r.2 == 0) {
            std::thread::yield_now();
        }
        hooks.release_all();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        // Once the run is ending, a delay does not wait at all.
        hooks.hit("guest:slow", Some(0), None).unwrap();
    }

    #[test]
    fn a_short_delay_lasts_as_long_as_asked() {
        let hooks = Hooks::new();
        hooks.add_rule(parse_rule("delay=3000@guest:x").unwrap());
        let start = Instant::now();
        hooks.hit("guest:x", Some(0), None).unwrap();
        assert!(start.elapsed() >= Duration::from_micros(3000));
    }

    #[test]
    fn a_panic_rule_panics_a_vcpu_thread_only() {
        let hooks = Arc::new(Hooks::new());
        hooks.add_rule(parse_rule("panic@guest:boom").unwrap());
        // The controlling thread (no vCPU) goes on.
        assert_eq!(hooks.hit("guest:boom", None, None), Ok(()));
        let h = Arc::clone(&hooks);
        let t = std::thread::spawn(move || {
            crate::cpu::set_current(Some(1));
            h.hit("guest:boom", Some(1), None)
        });
        let msg = t.join().unwrap_err();
        let msg = msg.downcast_ref::<String>().unwrap();
        assert_eq!(msg, "injected panic at guest:boom (panic@guest:boom)");
    }
}
