//! Schedules: the order of (vCPU, point) events that [`Hooks::hit`]
//! enforces, the report when it cannot be satisfied, and the recorded
//! order of a free run that [`witness_schedule`] turns into a schedule.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use super::threads::{self, Sample};
use super::{lock, Blocked, Hooks, Step};
use crate::trace::LockKind;

#[derive(Debug, Default)]
pub(super) struct Schedule {
    pub(super) steps: Vec<Step>,
    /// Per step, the hits so far that matched its vCPU, point and address.
    pub(super) counts: Vec<u64>,
    pub(super) next: usize,
    /// Set when the schedule was found unsatisfiable; waiters go free.
    pub(super) aborted: bool,
    pub(super) last_progress: Option<Instant>,
    /// The CPU time each vCPU had used at `last_progress` (the instant
    /// they were sampled at, to notice new progress).
    pub(super) progress_cpu: Option<(Instant, BTreeMap<usize, std::time::Duration>)>,
    /// Since when every live vCPU has been blocked (a deadlock, if it lasts).
    pub(super) all_blocked_since: Option<Instant>,
    pub(super) unreachable: Option<String>,
    /// Says whether a litmus event word is set (guest memory).
    pub(super) words: Option<Words>,
    /// vCPUs whose last point was the hook before an `await`, with the
    /// event word they wait for (tests compiled with await hooks).
    pub(super) awaiting: BTreeMap<usize, u64>,
}

/// A hit by a vCPU, as recorded for [`witness_schedule`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointHit {
    pub cpu: usize,
    pub point: String,
    pub addr: Option<u64>,
}

#[derive(Debug, Default)]
pub(super) struct Recording {
    pub(super) hits: Vec<PointHit>,
    /// More than [`RECORD_LIMIT`] hits: the order is incomplete.
    pub(super) overflow: bool,
}

/// At most this many hits are recorded per run.
pub(super) const RECORD_LIMIT: usize = 20_000;

/// How long a schedule may make no progress while a thread waits on it
/// before it is declared unsatisfiable.
pub(super) const STALL: Duration = Duration::from_millis(400);

/// How long a vCPU about to take a step waits for the one that took the
/// step before to come to rest (see [`Hooks::settle`]).
pub(super) const SETTLE: Duration = Duration::from_millis(2);

/// How long every live vCPU must stay blocked (on the schedule or on a lock
/// held by a blocked one) before that is taken as a deadlock. Only covers
/// the moment between a lock's release and its waiter's wake-up.
pub(super) const DEADLOCK: Duration = Duration::from_millis(20);

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

impl Hooks {
    /// Sets the schedule to enforce.
    pub fn set_schedule(&self, steps: Vec<Step>) {
        self.set_schedule_with_words(steps, None);
    }

    /// [`Hooks::set_schedule`] for a test compiled with a hook before
    /// every `await` (`litmus::compile_for_explore`): `words` says
    /// whether an event is set, and a vCPU spinning in an `await` whose
    /// event is not set counts as at rest when the next step settles
    /// (it touches nothing but that word), instead of being given
    /// [`SETTLE`] of CPU time to come to rest first.
    pub fn set_schedule_with_words(&self, steps: Vec<Step>, words: Option<super::WordReader>) {
        *lock(&self.schedule) = Schedule {
            counts: vec![0; steps.len()],
            steps,
            words: words.map(Words),
            ..Schedule::default()
        };
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

    pub(super) fn record(&self, cpu: usize, point: &str, addr: Option<u64>) {
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

    pub(super) fn schedule_step(&self, cpu: usize, point: &str, addr: Option<u64>) {
        let mut s = lock(&self.schedule);
        if s.aborted || s.next >= s.steps.len() {
            return;
        }
        if s.words.is_some() {
            match super::explore::await_word(point) {
                Some(w) => s.awaiting.insert(cpu, w),
                None => s.awaiting.remove(&cpu),
            };
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
            self.note_blocked(
                cpu,
                Some(Blocked {
                    why: format!(
                        "v{cpu} waits at {point} (step {}) for step {}: {waiting_for}",
                        j + 1,
                        s.next + 1
                    ),
                    step: Some(j),
                    event: false,
                }),
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
    /// end), for at most [`SETTLE`] of its own CPU time. Steps are then
    /// taken one thread at a time, so what a thread does between two of its
    /// points does not race with the next thread's, and replaying a
    /// schedule gives the same accesses in the same order (unless a thread
    /// runs longer than SETTLE without reaching a point, e.g. spinning on
    /// `await`). CPU time, not the clock: on a loaded host the other thread
    /// may wait for a CPU far longer than SETTLE, and must still come to
    /// rest first.
    pub(super) fn settle<'a>(
        &'a self,
        mut s: MutexGuard<'a, Schedule>,
        j: usize,
        cpu: usize,
    ) -> MutexGuard<'a, Schedule> {
        let Some(prev) = j.checked_sub(1).map(|k| s.steps[k].vcpu) else {
            return s;
        };
        let start = Instant::now();
        let base = self.sample(prev);
        while prev != cpu
            && !s.aborted
            && !self.released.load(Ordering::Acquire)
            && !self.at_rest(prev)
            && !awaits_unset(&s, prev)
        {
            let mut poll = Duration::from_micros(20);
            if start.elapsed() >= SETTLE {
                // Has it had SETTLE of CPU since? Runnable without it, it
                // is starved, not spinning: wait on (asking less often).
                match (base, self.sample(prev)) {
                    (Some(b), Some(now)) if !now.asleep && now.cpu < b.cpu + SETTLE => {
                        poll = Duration::from_micros(200);
                    }
                    _ => break,
                }
            }
            s = self
                .changed
                .wait_timeout(s, poll)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        s
    }

    /// What the kernel says about vCPU `cpu`'s thread, if it can.
    fn sample(&self, cpu: usize) -> Option<Sample> {
        let tid = *lock(&self.tids).get(&cpu)?;
        threads::sample(tid)
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
        // Blocked means still waiting, as the kernel sees it: a vCPU whose
        // step has come or whose lock was released, but which has not had
        // a CPU since, is runnable, not blocked.
        // (The kernel is asked only when the notes alone would say so.)
        let notes = lock(&self.blocked).clone();
        let waiting: Vec<usize> = notes
            .iter()
            .filter(|(_, b)| b.step.is_none_or(|j| s.next < j))
            .map(|(cpu, _)| *cpu)
            .collect();
        let asleep = |cpus: &[usize]| {
            cpus.iter()
                .filter(|c| self.sample(**c).is_none_or(|x| x.asleep))
                .count()
        };
        let all_blocked = live > 0 && waiting.len() >= live && asleep(&waiting) >= live;
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
        // A thread asleep in `await` waits for another thread, not for the
        // schedule: one that computes on for longer than STALL before its
        // next step, while another sleeps in `await`, has not stalled it.
        let on_schedule: Vec<usize> = waiting
            .iter()
            .copied()
            .filter(|c| notes.get(c).is_some_and(|b| !b.event))
            .collect();
        let stalled = s.last_progress.is_some_and(|t| t.elapsed() > STALL)
            && !on_schedule.is_empty()
            && asleep(&on_schedule) > 0
            && !self.starved_since_progress(&mut s, &notes, live);
        if !(deadlocked || stalled || live == 0) {
            return None;
        }
        let mut why: Vec<String> = notes.into_values().map(|b| b.why).collect();
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

    /// Whether a vCPU that is neither blocked nor ended is runnable but has
    /// had less than [`STALL`] of CPU time since the schedule's last
    /// progress: it may yet take the next step, once it gets a CPU (a
    /// loaded host), so the schedule has not stalled. One that used that
    /// much CPU without a step is spinning (an `await` that nothing will
    /// satisfy, say); one asleep outside the hooks (waiting for a child)
    /// will not move either. A live vCPU whose thread has not started yet
    /// (a fork child being created on a loaded host) may yet take it too.
    fn starved_since_progress(
        &self,
        s: &mut Schedule,
        notes: &BTreeMap<usize, Blocked>,
        live: usize,
    ) -> bool {
        let Some(progress) = s.last_progress else {
            return false;
        };
        let tids = lock(&self.tids).clone();
        let ended = lock(&self.ended).clone();
        if tids.keys().filter(|c| !ended.contains(c)).count() < live {
            return true;
        }
        let now: BTreeMap<usize, Sample> = tids
            .iter()
            .filter(|(cpu, _)| !ended.contains(cpu) && !notes.contains_key(cpu))
            .filter_map(|(cpu, tid)| Some((*cpu, threads::sample(*tid)?)))
            .collect();
        if s.progress_cpu
            .as_ref()
            .is_none_or(|(at, _)| *at != progress)
        {
            // First look since that progress: CPU times from here on.
            let base = now.iter().map(|(c, x)| (*c, x.cpu)).collect();
            s.progress_cpu = Some((progress, base));
        }
        let base = &s.progress_cpu.as_ref().expect("set above").1;
        now.iter()
            .any(|(cpu, x)| !x.asleep && base.get(cpu).is_none_or(|b| x.cpu < *b + STALL))
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

    /// Why the schedule was unsatisfiable, if it was.
    pub fn unreachable(&self) -> Option<String> {
        lock(&self.schedule).unreachable.clone()
    }

    /// Whether every step happened.
    pub fn schedule_done(&self) -> bool {
        let s = lock(&self.schedule);
        s.next >= s.steps.len()
    }
}

/// Whether vCPU `cpu` is spinning in an `await` whose event is not set:
/// it touches nothing but that word until another thread sets it.
pub(super) fn awaits_unset(s: &Schedule, cpu: usize) -> bool {
    match (&s.words, s.awaiting.get(&cpu)) {
        (Some(words), Some(w)) => !(words.0)(*w),
        _ => false,
    }
}

/// A [`super::WordReader`] in a [`Schedule`].
pub(super) struct Words(super::WordReader);

impl std::fmt::Debug for Words {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Words")
    }
}
