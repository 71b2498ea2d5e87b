//! Where vCPUs wait in the hooks: blocked (for reports), parked by a
//! `pause` rule until resumed, held by a delay; and the end of a run,
//! which lets every one of them go.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{lock, Hooks};
use crate::trace::LockKind;

/// The last stretch of a delay is spun, not slept, so that a short delay
/// (one widening a race window) ends when it should, not when the
/// scheduler wakes the thread.
pub(super) const SPIN_TAIL: Duration = Duration::from_millis(1);

/// The explorer's scheduling point where a noted wait ended (not a point
/// of rules or schedules).
pub const WAKE: &str = "wake";

/// The explorer's scheduling point before a vCPU first runs.
pub const START: &str = "start";

/// Why a vCPU waits, noted by the vCPU's own thread before it sleeps.
#[derive(Debug, Clone)]
pub(super) struct Blocked {
    /// As an `unreachable` report says it.
    pub(super) why: String,
    /// For a schedule step: its index (blocked only while the schedule has
    /// not reached it).
    pub(super) step: Option<usize>,
    /// Asleep in a litmus `await` ([`Hooks::set_awaiting_event`]): part of
    /// a deadlock if every vCPU waits, but not a wait on the schedule, so
    /// never what makes a schedule stall.
    pub(super) event: bool,
}

impl Hooks {
    /// Notes that the calling thread runs vCPU `cpu` (called once by each
    /// vCPU thread as it starts), so that the schedule can ask the kernel
    /// about it ([`threads`](super::threads)).
    pub fn thread_started(&self, cpu: usize) {
        if let Some(tid) = super::threads::current_tid() {
            lock(&self.tids).insert(cpu, tid);
        }
        // Explored, a new vCPU parks before it first runs: from their
        // start on, threads run one at a time.
        self.explore_step(cpu, START, None);
    }

    /// Notes that vCPU `cpu`'s thread has ended.
    pub fn set_ended(&self, cpu: usize) {
        lock(&self.ended).insert(cpu);
        self.explore_ended(cpu);
    }

    /// Whether `cpu` is stopped where nothing it does can race with others:
    /// waiting at a point or for a lock, paused, or ended.
    pub(super) fn at_rest(&self, cpu: usize) -> bool {
        lock(&self.blocked).contains_key(&cpu)
            || lock(&self.paused).contains_key(&cpu)
            || lock(&self.ended).contains(&cpu)
    }

    /// Notes that vCPU `cpu` is blocked (`Some(why)`: on a lock, say) or
    /// not any more. Called by the vCPU's own thread.
    pub fn set_blocked(&self, cpu: usize, why: Option<String>) {
        self.note_blocked(
            cpu,
            why.map(|why| Blocked {
                why,
                step: None,
                event: false,
            }),
        );
    }

    /// Notes that vCPU `cpu` sleeps until a litmus event is signalled
    /// (`Some(why)`), or not any more. Called by the vCPU's own thread.
    pub fn set_awaiting_event(&self, cpu: usize, why: Option<String>) {
        self.note_blocked(
            cpu,
            why.map(|why| Blocked {
                why,
                step: None,
                event: true,
            }),
        );
    }

    pub(super) fn note_blocked(&self, cpu: usize, blocked: Option<Blocked>) {
        let mut b = lock(&self.blocked);
        let woke = match blocked {
            Some(w) => {
                b.insert(cpu, w);
                false
            }
            None => b.remove(&cpu).is_some_and(|w| w.step.is_none()),
        };
        drop(b);
        self.explore_poke();
        if woke {
            // Explored, a thread whose wait ended (a lock another released)
            // parks before it goes on: the one that released it runs alone
            // to its next point, and who goes next is the explorer's choice.
            self.explore_step(cpu, WAKE, None);
        }
    }

    /// Called by the runner while a run goes on with the number of `live`
    /// vCPUs: if every one has been asleep in a litmus `await` for
    /// [`super::schedule::DEADLOCK`], nothing can ever signal them (events
    /// are set only by the test's own threads), so the run cannot end:
    /// says what each waits for. Only under a schedule do awaits sleep.
    pub fn event_deadlock(&self, live: usize) -> Option<String> {
        let notes = lock(&self.blocked).clone();
        let sleepers: Vec<&Blocked> = notes.values().filter(|b| b.event).collect();
        let all_asleep = live > 0
            && sleepers.len() >= live
            && notes.iter().filter(|(_, b)| b.event).all(|(cpu, _)| {
                let tid = lock(&self.tids).get(cpu).copied();
                tid.and_then(super::threads::sample)
                    .is_some_and(|x| x.asleep)
            });
        let mut since = lock(&self.events_stuck_since);
        if !all_asleep {
            *since = None;
            return None;
        }
        let t = *since.get_or_insert_with(Instant::now);
        (t.elapsed() > super::schedule::DEADLOCK).then(|| {
            let why: Vec<&str> = sleepers.iter().map(|b| b.why.as_str()).collect();
            format!("{}: nothing is left to signal", why.join("; "))
        })
    }

    /// Holds the calling thread for `d` (a `delay=` rule, chaos), or until
    /// the run ends ([`Hooks::release_all`]: the watchdog, a `quit`, the VM
    /// dropped), whichever comes first. Beyond [`SPIN_TAIL`] it sleeps on a
    /// condvar that `release_all` wakes, so a delay longer than the
    /// watchdog neither burns a CPU nor keeps its vCPU from being stopped;
    /// the rest it spins. A delay too long for the clock lasts until the
    /// run ends.
    pub(super) fn delay(&self, d: Duration) {
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

    pub(super) fn pause(&self, cpu: Option<usize>, point: &str) {
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
        lock(&self.blocked)
            .iter()
            .map(|(c, b)| (*c, b.why.clone()))
            .collect()
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

    /// Whether the run is ending and every waiter was let go.
    pub fn released(&self) -> bool {
        self.released.load(Ordering::Acquire)
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
        drop(lock(&self.explore));
        self.explored.notify_all();
    }
}
