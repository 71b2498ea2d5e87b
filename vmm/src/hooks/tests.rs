use super::*;
use std::sync::Arc;
use std::time::Instant;

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

/// The load bug of docs/reliability.md "Under load": a vCPU whose step has
/// come, but which has not run since (its note still says it waits), is
/// not blocked; nor is one the kernel has runnable. Neither makes the
/// schedule unreachable, however long it stays so.
#[test]
fn a_vcpu_whose_step_came_or_that_is_runnable_is_not_blocked() {
    let hooks = Hooks::new();
    hooks.set_schedule(parse_schedule("v1@guest:a < v0@guest:b < v1@guest:c").unwrap());
    // v0's note as it went to sleep waiting for step 1 to let it take step 2.
    hooks.note_blocked(
        0,
        Some(Blocked {
            why: "v0 waits at guest:b (step 2) for step 1".into(),
            step: Some(1),
            event: false,
        }),
    );
    // Step 1 happens: v0's turn has come, but v0 has not run yet.
    hooks.hit("guest:a", Some(1), None).unwrap();
    // v1 now sleeps on a lock (a note without a step), for real: its
    // thread is this one, registered, and it is running, so not asleep.
    hooks.thread_started(1);
    hooks.set_blocked(1, Some("v1 waits for mmap_lock".into()));
    let until = Instant::now() + 2 * schedule::STALL;
    while Instant::now() < until {
        assert_eq!(hooks.check_schedule(2), None);
        std::thread::yield_now();
    }
}

/// A chooser that always lets the highest vCPU go.
struct Highest;

impl Chooser for Highest {
    fn choose(&mut self, _: &[Decision], enabled: &[Parked]) -> usize {
        enabled.len() - 1
    }
}

/// Spawns explored "vCPU" threads running `body(cpu)` after registering as
/// vCPUs would (`vcpu_spawning`, `thread_started`, `set_ended`).
fn explored_threads(
    hooks: &Arc<Hooks>,
    n: usize,
    body: impl Fn(&Hooks, usize) + Send + Sync + 'static,
) -> Vec<std::thread::JoinHandle<()>> {
    let body = Arc::new(body);
    // All announced before any starts, as the VM does for its boot vCPUs.
    for cpu in 0..n {
        hooks.vcpu_spawning(cpu);
    }
    (0..n)
        .map(|cpu| {
            let (h, body) = (Arc::clone(hooks), Arc::clone(&body));
            std::thread::spawn(move || {
                h.thread_started(cpu);
                body(&h, cpu);
                h.set_ended(cpu);
            })
        })
        .collect()
}

#[test]
fn explored_threads_run_one_at_a_time_in_the_choosers_order() {
    let hooks = Arc::new(Hooks::new());
    let words: WordReader = Arc::new(|_| true);
    hooks.set_explore(
        ChooserSlot(Arc::new(Mutex::new(Highest))),
        words,
        Vec::new(),
    );
    let order = Arc::new(Mutex::new(Vec::new()));
    let o = Arc::clone(&order);
    let threads = explored_threads(&hooks, 2, move |h, cpu| {
        for step in ["a", "b"] {
            h.hit(&format!("guest:{step}"), Some(cpu), None).unwrap();
            // Between two points a thread runs alone: nobody else's entry
            // can come between these two.
            lock(&o).push(format!("{cpu}{step}"));
            std::thread::yield_now();
            lock(&o).push(format!("{cpu}{step}."));
        }
    });
    for t in threads {
        t.join().unwrap();
    }
    // Starts are no choice: v0's, then v1's; then both are parked at `a`
    // and v1 (highest) goes on to its end, then v0.
    assert_eq!(
        *lock(&order),
        ["1a", "1a.", "1b", "1b.", "0a", "0a.", "0b", "0b."]
    );
    let log = hooks.take_decisions().unwrap();
    let chosen: Vec<(usize, &str)> = log
        .iter()
        .map(|d| {
            let p = d.enabled.iter().find(|p| p.cpu == d.chosen).unwrap();
            (d.chosen, p.point.as_str())
        })
        .collect();
    assert_eq!(
        chosen,
        [
            (0, START),
            (1, START),
            (1, "guest:a"),
            (1, "guest:b"),
            (0, "guest:a"),
            (0, "guest:b")
        ]
    );
    assert_eq!(log[0].enabled.len(), 1, "a start is no choice");
    assert_eq!(log[2].enabled.len(), 2);
}

#[test]
fn an_explored_await_waits_for_its_event_and_a_stuck_run_is_a_deadlock() {
    let hooks = Arc::new(Hooks::new());
    let signalled = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&signalled);
    let words: WordReader = Arc::new(move |_| s.load(Ordering::Acquire));
    hooks.set_explore(
        ChooserSlot(Arc::new(Mutex::new(Highest))),
        words,
        Vec::new(),
    );
    let order = Arc::new(Mutex::new(Vec::new()));
    let (o, s) = (Arc::clone(&order), Arc::clone(&signalled));
    // v1 awaits event 0, which v0 signals: v1 is highest but may only go
    // once v0 has signalled.
    let threads = explored_threads(&hooks, 2, move |h, cpu| {
        if cpu == 1 {
            h.hit("guest:await:0:e", Some(1), None).unwrap();
            lock(&o).push("v1 after await");
        } else {
            h.hit("guest:signal", Some(0), None).unwrap();
            s.store(true, Ordering::Release);
            lock(&o).push("v0 signalled");
        }
    });
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(*lock(&order), ["v0 signalled", "v1 after await"]);

    // A thread awaiting an event nobody signals: a deadlock, said within a
    // deadline, and the run's end lets it go.
    let hooks = Arc::new(Hooks::new());
    let words: WordReader = Arc::new(|_| false);
    hooks.set_explore(
        ChooserSlot(Arc::new(Mutex::new(Highest))),
        words,
        Vec::new(),
    );
    let t = explored_threads(&hooks, 1, |h, cpu| {
        h.hit("guest:await:3:never", Some(cpu), None).unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let why = loop {
        if let Some(why) = hooks.explore_deadlock() {
            break why;
        }
        assert!(Instant::now() < deadline, "no deadlock reported");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(why.contains("v0 waits at guest:await:3:never"), "{why}");
    hooks.release_all();
    for t in t {
        t.join().unwrap();
    }
}

#[test]
fn a_vcpu_in_an_unsatisfied_await_counts_as_at_rest_between_steps() {
    let hooks = Hooks::new();
    let set = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&set);
    let words: WordReader = Arc::new(move |w| w == 3 && s.load(Ordering::Acquire));
    hooks.set_schedule_with_words(
        parse_schedule("v1@guest:b < v0@guest:a").unwrap(),
        Some(words),
    );
    // v0 goes on from its step to the hook before `await e` (word 3).
    hooks.hit("guest:await:3:e", Some(0), None).unwrap();
    let awaits = |h: &Hooks| schedule::awaits_unset(&lock(&h.schedule), 0);
    assert!(awaits(&hooks), "spinning on an unset event: at rest");
    set.store(true, Ordering::Release);
    assert!(!awaits(&hooks), "its event is set: it runs on");
    set.store(false, Ordering::Release);
    hooks.hit("guest:other", Some(0), None).unwrap();
    assert!(!awaits(&hooks), "past its await: it runs on");
}
