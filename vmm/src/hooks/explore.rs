//! Exploration mode (docs/exploration.md): the hooks become the scheduler.
//!
//! Every point a vCPU hits parks it. Once every live vCPU is at rest —
//! parked, asleep on a lock or a join it noted ([`Hooks::set_blocked`]),
//! ended, or spinning — a [`Chooser`] picks one parked vCPU that may go
//! (one waiting in a litmus `await` only once its event is signalled), and
//! only that one runs, to its next point. A run is then a sequence of
//! [`Decision`]s: the interleaving, at the granularity of points, that a
//! search strategy chose (CHESS's model: threads run one at a time between
//! scheduling points). The log of decisions is what the strategies
//! backtrack over and what a witness is minimized from.
//!
//! Lock contract: the explorer's state is behind `Hooks::explore`; the
//! chooser is called with it held, and must not call back into the hooks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{lock, Hooks};

/// The name prefix of the guest hook that `litmus::compile` puts before
/// every `await` when compiling for exploration: `await:WORD:EVENT`.
pub const AWAIT_HOOK: &str = "await:";

/// A vCPU waiting at a point for the explorer's go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parked {
    pub cpu: usize,
    pub point: String,
    pub addr: Option<u64>,
}

impl Parked {
    /// The shared word a vCPU parked before an `await` waits for.
    pub fn await_word(&self) -> Option<u64> {
        await_word(&self.point)
    }
}

/// The shared word the hook `point` before an `await` names, if it is one
/// (`guest:await:WORD:EVENT`).
pub fn await_word(point: &str) -> Option<u64> {
    let rest = point.strip_prefix("guest:")?.strip_prefix(AWAIT_HOOK)?;
    rest.split(':').next()?.parse().ok()
}

/// One scheduling decision of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The parked vCPUs that could go, by vCPU id.
    pub enabled: Vec<Parked>,
    /// The vCPU that went.
    pub chosen: usize,
    /// Whether the vCPU that went before this decision entered the guest
    /// on its way here (its step ran guest code no point marks).
    pub prev_entered_guest: bool,
}

/// Picks which parked vCPU goes next.
pub trait Chooser: Send {
    /// `enabled` is non-empty and sorted by vCPU; `log` is the run so far.
    /// Returns an index into `enabled`.
    fn choose(&mut self, log: &[Decision], enabled: &[Parked]) -> usize;
}

/// A chooser shared between the explorer and whoever set it up.
#[derive(Clone)]
pub struct ChooserSlot(pub Arc<Mutex<dyn Chooser>>);

impl std::fmt::Debug for ChooserSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChooserSlot")
    }
}

/// Whether a shared word (a litmus event) is set: the VM reads guest memory.
pub type WordReader = Arc<dyn Fn(u64) -> bool + Send + Sync>;

/// Whether a lock a parked vCPU waits for is free now (asked only while
/// every vCPU is at rest, so trying it and letting it go disturbs nobody).
pub type LockFree = Arc<dyn Fn() -> bool + Send + Sync>;

/// The prefix of the explorer's scheduling points where a vCPU waits for
/// a lock (`lock:mmap_lock`, …): not points of rules or schedules.
pub const LOCK_POINT: &str = "lock:";

/// At most this many decisions per run; the rest runs free (a test that
/// loops forever must still end by its watchdog, not fill memory).
pub const DECISION_LIMIT: usize = 5_000;

/// A runnable vCPU that used this much CPU since the last decision without
/// reaching a point is spinning (a `poll` loop): it is taken as at rest.
const SPIN: Duration = Duration::from_millis(20);

/// A vCPU asleep outside any wait it noted is taken as at rest once it has
/// slept this long (a wait the VMM does not note).
const UNNOTED_SLEEP: Duration = Duration::from_millis(20);

pub(super) struct Explore {
    chooser: ChooserSlot,
    words: WordReader,
    /// The test's regions: page-level points elsewhere do not park.
    shared: Vec<(u64, u64)>,
    parked: BTreeMap<usize, Parked>,
    /// vCPUs being created or running, not ended.
    live: BTreeSet<usize>,
    /// The vCPU that went last, and whether it entered the guest since.
    running: Option<usize>,
    entered_guest: bool,
    log: Vec<Decision>,
    /// Since the last decision: each running vCPU's CPU time when first
    /// seen running (spin detection), and since when each unnoted sleeper
    /// was seen asleep.
    cpu_at_decision: BTreeMap<usize, Duration>,
    asleep_since: BTreeMap<usize, Instant>,
    /// The locks the vCPUs parked at a [`LOCK_POINT`] wait for.
    locks: BTreeMap<usize, LockFree>,
    /// Past [`DECISION_LIMIT`]: everyone runs free.
    free: bool,
    /// Since when every vCPU has been at rest with none enabled.
    stuck_since: Option<Instant>,
}

impl std::fmt::Debug for Explore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Explore")
            .field("parked", &self.parked)
            .field("live", &self.live)
            .field("decisions", &self.log.len())
            .finish()
    }
}

/// Points about one page (as opposed to a range, a flush or a guest hook).
const PAGE_POINTS: &[&str] = &[
    "fault:",
    "alloc_page",
    "do_anonymous_page:",
    "do_wp_page:",
    "wp_page_copy:",
    "fork:after_wrprotect",
    "fork:before_copy_page",
    "fork:after_copy_page",
];

/// How long every vCPU must be at rest with none that may go before a
/// run is declared deadlocked (a shootdown's initiator polls for the
/// acknowledgement of a parked target every 200 µs: not a deadlock).
const DEADLOCK: Duration = Duration::from_millis(30);

impl Explore {
    /// Whether parked `p` may go: not waiting for an event still unset or
    /// a lock still held.
    fn enabled(&self, p: &Parked) -> bool {
        p.await_word().is_none_or(|w| (self.words)(w))
            && self.locks.get(&p.cpu).is_none_or(|free| free())
    }

    /// Whether a hit at `point` about `addr` is a scheduling point.
    fn schedules(&self, point: &str, addr: Option<u64>) -> bool {
        if point == "alloc_page" {
            // Right after fault:enter, before do_anonymous_page:after_alloc.
            return false;
        }
        let private = addr.is_some_and(|a| !self.shared.iter().any(|(lo, hi)| a >= *lo && a < *hi));
        !(private && PAGE_POINTS.iter().any(|p| point.starts_with(p)))
    }
}

impl Hooks {
    /// Turns exploration on: from now on every point parks its vCPU and
    /// `chooser` decides who goes; `words` says whether an event is set.
    ///
    /// Page-level points (a fault, a copy, fork write-protecting a PTE, an
    /// allocation) on pages outside `shared` (the test's regions: what is
    /// left is each thread's own stack) are not scheduling points: the
    /// explorer does not interleave threads there.
    pub fn set_explore(&self, chooser: ChooserSlot, words: WordReader, shared: Vec<(u64, u64)>) {
        *lock(&self.explore) = Some(Explore {
            chooser,
            words,
            shared,
            parked: BTreeMap::new(),
            live: BTreeSet::new(),
            running: None,
            entered_guest: false,
            log: Vec::new(),
            cpu_at_decision: BTreeMap::new(),
            asleep_since: BTreeMap::new(),
            locks: BTreeMap::new(),
            free: false,
            stuck_since: None,
        });
        self.explore_armed.store(true, Ordering::Release);
        self.refresh_active();
    }

    /// Whether exploration is on.
    pub fn exploring(&self) -> bool {
        lock(&self.explore).is_some()
    }

    /// The decisions of the run, if it was explored.
    pub fn take_decisions(&self) -> Option<Vec<Decision>> {
        lock(&self.explore)
            .as_mut()
            .map(|e| std::mem::take(&mut e.log))
    }

    /// vCPU `cpu` is being created (by its parent's thread, before its own
    /// starts): the explorer waits for it before deciding.
    pub fn vcpu_spawning(&self, cpu: usize) {
        if !self.explore_armed.load(Ordering::Relaxed) {
            return;
        }
        if let Some(e) = lock(&self.explore).as_mut() {
            e.live.insert(cpu);
        }
    }

    /// vCPU `cpu` is about to enter the guest.
    pub fn entering_guest(&self, cpu: usize) {
        if !self.explore_armed.load(Ordering::Relaxed) {
            return;
        }
        if let Some(e) = lock(&self.explore).as_mut() {
            if e.running == Some(cpu) {
                e.entered_guest = true;
            }
        }
    }

    pub(super) fn explore_ended(&self, cpu: usize) {
        if let Some(e) = lock(&self.explore).as_mut() {
            e.live.remove(&cpu);
            e.parked.remove(&cpu);
        }
        self.explored.notify_all();
    }

    /// Explored, vCPU `cpu` found `what` held: it parks until the lock is
    /// free and the explorer lets it go, so that who takes a lock next is
    /// a decision, not a race between woken waiters. Returns `false` when
    /// not exploring (any more): the caller then waits as usual.
    pub fn explore_lock_wait(&self, cpu: usize, what: &str, free: LockFree) -> bool {
        if !self.explore_armed.load(Ordering::Relaxed) {
            return false;
        }
        {
            let mut guard = lock(&self.explore);
            match guard.as_mut() {
                Some(e) if !e.free && !self.released.load(Ordering::Acquire) => {
                    e.locks.insert(cpu, free);
                }
                _ => return false,
            }
        }
        self.explore_step(cpu, &format!("{LOCK_POINT}{what}"), None);
        let mut guard = lock(&self.explore);
        let going = guard
            .as_mut()
            .map(|e| {
                e.locks.remove(&cpu);
                !e.free
            })
            .unwrap_or(false);
        going && !self.released.load(Ordering::Acquire)
    }

    /// Wakes a decider: a vCPU noted a wait.
    pub(super) fn explore_poke(&self) {
        self.explored.notify_all();
    }

    /// vCPU `cpu` reached `point`: parks it until the chooser lets it go.
    pub(super) fn explore_step(&self, cpu: usize, point: &str, addr: Option<u64>) {
        if !self.explore_armed.load(Ordering::Relaxed) {
            return;
        }
        let mut guard = lock(&self.explore);
        match guard.as_mut() {
            Some(e) if !e.free && e.schedules(point, addr) => {
                e.live.insert(cpu);
                e.parked.insert(
                    cpu,
                    Parked {
                        cpu,
                        point: point.to_string(),
                        addr,
                    },
                );
            }
            _ => return,
        }
        self.explored.notify_all();
        let mut poll = Duration::from_micros(30);
        loop {
            if self.released.load(Ordering::Acquire) {
                break;
            }
            let Some(e) = guard.as_mut() else { break };
            if e.free || !e.parked.contains_key(&cpu) {
                break;
            }
            if self.decide(e) {
                self.explored.notify_all();
                poll = Duration::from_micros(30);
                continue;
            }
            guard = self
                .explored
                .wait_timeout(guard, poll)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            poll = (poll * 2).min(Duration::from_millis(2));
        }
        if let Some(e) = guard.as_mut() {
            e.parked.remove(&cpu);
        }
    }

    /// Called by the runner while a run goes on: if every live vCPU has
    /// been at rest for [`DEADLOCK`] with none that may go (each waits for
    /// an event nobody will signal, a lock, a child, a userfaultfd handler
    /// that is not there), the run can never end: says where each waits.
    pub fn explore_deadlock(&self) -> Option<String> {
        let mut guard = lock(&self.explore);
        let e = guard.as_mut().filter(|e| !e.free)?;
        if e.live.is_empty() || !self.all_at_rest(e) || e.parked.values().any(|p| e.enabled(p)) {
            e.stuck_since = None;
            return None;
        }
        let since = *e.stuck_since.get_or_insert_with(Instant::now);
        if since.elapsed() < DEADLOCK {
            return None;
        }
        let notes = lock(&self.blocked).clone();
        let why: Vec<String> = e
            .live
            .iter()
            .map(|c| match (e.parked.get(c), notes.get(c)) {
                (Some(p), _) => format!("v{c} waits at {}", p.point),
                (None, Some(b)) => b.why.clone(),
                (None, None) => format!("v{c} sleeps"),
            })
            .collect();
        Some(why.join("; "))
    }

    /// Whether every live vCPU that is not parked is at rest: asleep in a
    /// wait it noted (or one long enough), or spinning.
    fn all_at_rest(&self, e: &mut Explore) -> bool {
        let tids = lock(&self.tids).clone();
        let notes = lock(&self.blocked).clone();
        let now = Instant::now();
        for cpu in e.live.clone() {
            if e.parked.contains_key(&cpu) {
                continue;
            }
            let Some(sample) = tids.get(&cpu).and_then(|t| super::threads::sample(*t)) else {
                // Not started yet (or /proc cannot say): wait for it.
                return false;
            };
            if sample.asleep {
                if notes.contains_key(&cpu) {
                    continue;
                }
                let since = *e.asleep_since.entry(cpu).or_insert(now);
                if now.duration_since(since) >= UNNOTED_SLEEP {
                    continue;
                }
                return false;
            }
            e.asleep_since.remove(&cpu);
            // CPU time from when it was first seen running since the
            // decision (an underestimate: spinning is never taken early).
            let base = *e.cpu_at_decision.entry(cpu).or_insert(sample.cpu);
            if sample.cpu < base + SPIN {
                return false;
            }
        }
        true
    }

    /// If every live vCPU is at rest, lets one parked vCPU go. Returns
    /// whether it did.
    fn decide(&self, e: &mut Explore) -> bool {
        if !self.all_at_rest(e) {
            return false;
        }
        let mut enabled: Vec<Parked> = e
            .parked
            .values()
            .filter(|p| e.enabled(p))
            .cloned()
            .collect();
        // A vCPU's start — up to its first point it only sets itself up and
        // touches its own stack — commutes with every other transition:
        // starts go first, in id order, and are no choice.
        if let Some(first) = enabled.iter().position(|p| p.point == super::START) {
            enabled = vec![enabled.swap_remove(first)];
        }
        if enabled.is_empty() {
            return false;
        }
        let i = {
            let mut chooser = e.chooser.0.lock().unwrap_or_else(|p| p.into_inner());
            chooser.choose(&e.log, &enabled).min(enabled.len() - 1)
        };
        let chosen = enabled[i].cpu;
        e.log.push(Decision {
            enabled,
            chosen,
            prev_entered_guest: e.entered_guest,
        });
        e.parked.remove(&chosen);
        e.running = Some(chosen);
        e.entered_guest = false;
        e.asleep_since.clear();
        e.cpu_at_decision.clear();
        if e.log.len() >= DECISION_LIMIT {
            e.free = true;
        }
        true
    }
}
