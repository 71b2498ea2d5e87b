//! The search strategies of `cowlab explore`: which parked vCPU goes at
//! each decision of a run ([`Guide`], the [`Chooser`] a run is given), and
//! across runs, which interleaving comes next ([`Dfs`], [`pct_guide`]).
//!
//! - DFS: stateless depth-first search over the decisions with a
//!   preemption bound (CHESS, Musuvathi & Qadeer, PLDI'07/OSDI'08): every
//!   interleaving with at most K preemptions, each run replaying a prefix
//!   of choices and then running non-preemptively. Sleep sets (Godefroid
//!   1996) skip the reorderings of transitions that cannot interact.
//! - PCT (Burckhardt et al., ASPLOS'10): random distinct thread priorities
//!   and D−1 priority change points per run; a bug of depth D is found in
//!   one run with probability ≥ 1/(n·k^(D−1)) for n threads and k steps.

use std::collections::{BTreeMap, BTreeSet};

use crate::hooks::{Chooser, Decision, Parked};

/// A small seeded generator (splitmix64): runs are reproducible from the
/// seed and the run's index alone, whichever shard makes them.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `1..=n`.
    pub fn range1(&mut self, n: u64) -> u64 {
        1 + self.next_u64() % n.max(1)
    }
}

/// PCT's per-run state: thread priorities and change points.
#[derive(Debug, Clone)]
pub struct Pct {
    rng: Rng,
    /// Priority of each vCPU seen so far (higher goes first).
    priority: BTreeMap<usize, u64>,
    /// Decision numbers (1-based) at which the running thread's priority
    /// drops to a value below every initial one.
    change_points: Vec<u64>,
}

impl Pct {
    /// Run `run` of a PCT search with `seed`: D−1 change points among the
    /// first `steps` decisions.
    pub fn new(seed: u64, run: u64, depth: u32, steps: u64) -> Pct {
        let mut rng = Rng::new(seed ^ run.wrapping_mul(0xa076_1d64_78bd_642f));
        let change_points = (1..depth).map(|_| rng.range1(steps)).collect();
        Pct {
            rng,
            priority: BTreeMap::new(),
            change_points,
        }
    }

    fn choose(&mut self, log: &[Decision], enabled: &[Parked]) -> usize {
        if enabled.len() < 2 {
            return 0;
        }
        // Steps are counted as k is: the decisions with a choice.
        let step = log.iter().filter(|d| d.enabled.len() > 1).count() as u64 + 1;
        let low = self.change_points.len() as u64 + 1;
        for (i, cp) in self.change_points.iter().enumerate() {
            if *cp == step {
                if let Some(prev) = log.last().map(|d| d.chosen) {
                    // Below every initial priority (those are > low).
                    self.priority.insert(prev, low - 1 - i as u64);
                }
            }
        }
        for p in enabled {
            if !self.priority.contains_key(&p.cpu) {
                let r = low + 1 + (self.rng.next_u64() >> 8);
                self.priority.insert(p.cpu, r);
            }
        }
        (0..enabled.len())
            .max_by_key(|i| self.priority[&enabled[*i].cpu])
            .unwrap_or(0)
    }
}

/// The chooser of one run: replays `prefix` (vCPU ids), then PCT or, by
/// default, runs non-preemptively (the vCPU that went last goes on while it
/// can, else the lowest).
#[derive(Debug, Clone)]
pub struct Guide {
    pub prefix: Vec<usize>,
    pub pct: Option<Pct>,
    /// The first decision at which the prefix's vCPU was not enabled.
    pub diverged: Option<usize>,
}

impl Guide {
    pub fn new(prefix: Vec<usize>, pct: Option<Pct>) -> Guide {
        Guide {
            prefix,
            pct,
            diverged: None,
        }
    }
}

/// The non-preemptive choice: the vCPU that went last, if it can go on.
pub fn default_choice(log: &[Decision], enabled: &[Parked]) -> usize {
    log.last()
        .and_then(|d| enabled.iter().position(|p| p.cpu == d.chosen))
        .unwrap_or(0)
}

impl Chooser for Guide {
    fn choose(&mut self, log: &[Decision], enabled: &[Parked]) -> usize {
        let at = log.len();
        if let (Some(cpu), None) = (self.prefix.get(at), self.diverged) {
            match enabled.iter().position(|p| p.cpu == *cpu) {
                Some(i) => return i,
                None => self.diverged = Some(at),
            }
        }
        match &mut self.pct {
            Some(pct) => pct.choose(log, enabled),
            None => default_choice(log, enabled),
        }
    }
}

/// What a transition (a vCPU going from one point to its next) may touch,
/// for sleep sets: `None` if anything (it ran guest code, started or ended
/// without an address, or at a point taken under `mmap_lock` for write);
/// else the page tables (2 MiB, one page-table lock each) of its points.
pub type Footprint = Option<BTreeSet<u64>>;

/// Points at which the thread holds `mmap_lock` for write or works on a
/// range (fork, mprotect, munmap, uffd-wp, TLB flushes): never independent.
fn range_point(point: &str) -> bool {
    ["fork:", "mprotect:", "munmap:", "uffd:", "tlb:", "guest:"]
        .iter()
        .any(|p| point.starts_with(p))
}

/// The footprint of the transition decision `k` of `log` let go.
pub fn footprint(log: &[Decision], k: usize) -> Footprint {
    let d = &log[k];
    let start = d.enabled.iter().find(|p| p.cpu == d.chosen)?;
    let next = log.get(k + 1)?;
    if next.prev_entered_guest {
        return None;
    }
    let end = next.enabled.iter().find(|p| p.cpu == d.chosen)?;
    let mut tables = BTreeSet::new();
    for p in [start, end] {
        if range_point(&p.point) {
            return None;
        }
        tables.insert(p.addr? >> 21);
    }
    Some(tables)
}

/// Whether two transitions commute: both footprints known and disjoint.
pub fn independent(a: &Footprint, b: &Footprint) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.is_disjoint(b),
        _ => false,
    }
}

/// One decision of the DFS stack.
#[derive(Debug, Clone)]
struct Node {
    enabled: Vec<usize>,
    chosen: usize,
    /// Preemptions before this decision.
    preemptions: u32,
    /// The vCPU that went at the decision before.
    prev: Option<usize>,
    /// Alternatives taken from here, with their transitions' footprints.
    tried: BTreeMap<usize, Footprint>,
    /// vCPUs asleep here: their transitions from here were explored in a
    /// sibling and commute with everything taken since.
    sleep: BTreeMap<usize, Footprint>,
}

impl Node {
    fn preempts(&self, cpu: usize) -> bool {
        self.prev
            .is_some_and(|p| p != cpu && self.enabled.contains(&p))
    }
}

/// Stateless DFS with a preemption bound and sleep sets, partitioned into
/// `shards` (this one being `shard`).
#[derive(Debug)]
pub struct Dfs {
    bound: u32,
    stack: Vec<Node>,
    /// The prefix of the next run; `None` once the space is exhausted.
    next: Option<Vec<usize>>,
    shard: (u64, u64),
    /// Runs whose replay did not follow their prefix.
    pub diverged: u64,
}

/// The branching decisions a run's shard is decided by.
const SPLIT_BASE: usize = 1;

impl Dfs {
    pub fn new(bound: u32, shard: (u64, u64)) -> Dfs {
        Dfs {
            bound,
            stack: Vec::new(),
            next: Some(Vec::new()),
            shard,
            diverged: 0,
        }
    }

    /// The prefix to replay in the next run, `None` when exhausted.
    pub fn next_prefix(&self) -> Option<Vec<usize>> {
        self.next.clone()
    }

    /// How many branching decisions decide the shard of a run.
    fn split(&self) -> usize {
        SPLIT_BASE + (64 - self.shard.1.saturating_sub(1).leading_zeros()) as usize
    }

    /// The shard a run with these decisions belongs to: a hash of its
    /// choices at its first [`Dfs::split`] branching decisions.
    pub fn owner(&self, choices: impl Iterator<Item = (usize, usize)>) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (_, cpu) in choices.filter(|(n, _)| *n > 1).take(self.split()) {
            h ^= cpu as u64 + 1;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h % self.shard.1.max(1)
    }

    /// Whether this shard counts a run whose decisions are `log`.
    pub fn counts(&self, log: &[Decision]) -> bool {
        self.shard.1 <= 1
            || self.owner(log.iter().map(|d| (d.enabled.len(), d.chosen))) == self.shard.0
    }

    /// Takes the decisions of the run just made and picks the next prefix.
    pub fn record(&mut self, log: &[Decision]) {
        let prefix = self.next.clone().unwrap_or_default();
        let enabled = |d: &Decision| d.enabled.iter().map(|p| p.cpu).collect::<Vec<_>>();
        // Where the run left the stack: the prefix, unless it diverged.
        let mut keep = prefix.len().min(log.len());
        for (j, node) in self.stack.iter().enumerate().take(keep) {
            if node.enabled != enabled(&log[j]) || node.chosen != log[j].chosen {
                keep = j;
                break;
            }
        }
        if keep < prefix.len() {
            self.diverged += 1;
            if std::env::var_os("COWLAB_EXPLORE_DEBUG").is_some() {
                let show = |d: &Decision| {
                    d.enabled
                        .iter()
                        .map(|p| format!("v{}@{}", p.cpu, p.point))
                        .collect::<Vec<_>>()
                        .join(",")
                };
                let want = self
                    .stack
                    .get(keep)
                    .map(|n| format!("{:?} chose v{}", n.enabled, n.chosen));
                eprintln!(
                    "diverged at {keep}/{}: wanted {want:?}, got [{}] chose v{}",
                    prefix.len(),
                    log.get(keep).map(show).unwrap_or_default(),
                    log.get(keep).map_or(usize::MAX, |d| d.chosen)
                );
            }
        }
        self.stack.truncate(keep);
        if let (Some(k), true) = (keep.checked_sub(1), keep <= log.len()) {
            // The transition taken at the last replayed decision: its
            // footprint, and the sleep set it leaves below.
            let fp = footprint(log, k);
            self.stack[k].tried.insert(log[k].chosen, fp);
        }
        for (j, d) in log.iter().enumerate().skip(keep) {
            let (prev, preemptions, sleep) = match j.checked_sub(1) {
                None => (None, 0, BTreeMap::new()),
                Some(p) => {
                    let parent = &self.stack[p];
                    let taken = footprint(log, p);
                    let sleep = parent
                        .sleep
                        .iter()
                        .chain(parent.tried.iter().filter(|(c, _)| **c != parent.chosen))
                        .filter(|(_, fp)| independent(fp, &taken))
                        .map(|(c, fp)| (*c, fp.clone()))
                        .collect();
                    let pre = parent.preemptions + u32::from(parent.preempts(parent.chosen));
                    (Some(parent.chosen), pre, sleep)
                }
            };
            let mut tried = BTreeMap::new();
            tried.insert(d.chosen, footprint(log, j));
            self.stack.push(Node {
                enabled: enabled(d),
                chosen: d.chosen,
                preemptions,
                prev,
                tried,
                sleep,
            });
        }
        self.next = self.backtrack();
    }

    /// The deepest decision with an untried alternative within the bound
    /// (and this shard's), made the last of the next prefix.
    fn backtrack(&mut self) -> Option<Vec<usize>> {
        let split = self.split();
        while let Some(depth) = self.stack.len().checked_sub(1) {
            let branching_before = self.stack[..depth]
                .iter()
                .filter(|n| n.enabled.len() > 1)
                .count();
            let node = &self.stack[depth];
            let alt = node.enabled.iter().copied().find(|c| {
                !node.tried.contains_key(c)
                    && !node.sleep.contains_key(c)
                    && node.preemptions + u32::from(node.preempts(*c)) <= self.bound
                    // Below the first `split` branching decisions, only
                    // the subtrees this shard owns.
                    && (self.shard.1 <= 1 || branching_before + 1 < split || {
                        let choices = self.stack[..depth]
                            .iter()
                            .map(|n| (n.enabled.len(), n.chosen))
                            .chain([(node.enabled.len(), *c)]);
                        self.owner(choices) == self.shard.0
                    })
            });
            match alt {
                Some(c) => {
                    let node = &mut self.stack[depth];
                    node.chosen = c;
                    // Its footprint is known once it ran (record()).
                    node.tried.insert(c, None);
                    return Some(self.stack.iter().map(|n| n.chosen).collect());
                }
                None => {
                    self.stack.pop();
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run of two threads, each with `n` points and nothing else: every
    /// decision has both enabled until one ends.
    fn run_two(n: usize, prefix: &[usize]) -> Vec<Decision> {
        let mut left = [n, n];
        let mut log: Vec<Decision> = Vec::new();
        let mut guide = Guide::new(prefix.to_vec(), None);
        while left.iter().any(|l| *l > 0) {
            let enabled: Vec<Parked> = (0..2)
                .filter(|c| left[*c] > 0)
                .map(|cpu| Parked {
                    cpu,
                    point: "guest:x".into(),
                    addr: None,
                })
                .collect();
            let i = guide.choose(&log, &enabled);
            let chosen = enabled[i].cpu;
            left[chosen] -= 1;
            log.push(Decision {
                enabled,
                chosen,
                prev_entered_guest: true,
            });
        }
        log
    }

    fn explore(n: usize, bound: u32, shard: (u64, u64)) -> (u64, BTreeSet<Vec<usize>>) {
        let mut dfs = Dfs::new(bound, shard);
        let mut runs = BTreeSet::new();
        let mut made = 0;
        while let Some(prefix) = dfs.next_prefix() {
            let log = run_two(n, &prefix);
            made += 1;
            if dfs.counts(&log) {
                runs.insert(log.iter().map(|d| d.chosen).collect());
            }
            dfs.record(&log);
            assert!(made < 10_000);
        }
        (made, runs)
    }

    #[test]
    fn dfs_enumerates_every_interleaving_within_the_bound_once() {
        // Two threads of 3 steps: C(6,3) = 20 interleavings in all.
        let (made, all) = explore(3, 100, (0, 1));
        assert_eq!((made, all.len()), (20, 20));
        // With no preemption: one thread runs to its end, then the other.
        let (_, none) = explore(3, 0, (0, 1));
        assert_eq!(none.len(), 2);
        // At most one preemption: switch once early (a,b…) — 2 + 2·2 + …
        let (_, one) = explore(3, 1, (0, 1));
        assert!(one.len() > 2 && one.len() < 20, "{}", one.len());
        for run in &one {
            let switches = run.windows(2).filter(|w| w[0] != w[1]).count();
            // A switch when the other ended is free: ≤ bound + 1 switches.
            assert!(switches <= 2, "{run:?}");
        }
    }

    #[test]
    fn shards_partition_the_space() {
        let (_, all) = explore(3, 100, (0, 1));
        let mut union = BTreeSet::new();
        let mut total = 0;
        for i in 0..3 {
            let (_, part) = explore(3, 100, (i, 3));
            total += part.len();
            union.extend(part);
        }
        assert_eq!(total, all.len(), "no run counted twice");
        assert_eq!(union, all);
    }

    #[test]
    fn pct_is_reproducible_from_seed_and_run() {
        let a = Pct::new(7, 3, 3, 20);
        let b = Pct::new(7, 3, 3, 20);
        assert_eq!(a.change_points, b.change_points);
        assert_eq!(a.change_points.len(), 2);
        assert!(a.change_points.iter().all(|c| (1..=20).contains(c)));
    }

    #[test]
    fn independent_transitions_need_known_disjoint_footprints() {
        let a: Footprint = Some([1].into());
        let b: Footprint = Some([2].into());
        assert!(independent(&a, &b));
        assert!(!independent(&a, &a));
        assert!(!independent(&a, &None));
    }
}
