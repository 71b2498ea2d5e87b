//! The host's limits: VM start, exit and #PF forward round trips, first
//! touch (with and without a trace), TLB fill, mprotect with shootdowns,
//! native stores, kick and IPI round trips, each from real vCPUs running
//! the built-in benchmark programs; and the floors two of them are
//! compared with in the same run: the bare doorbell (`bench-doorbell`) for
//! the hypercall, the minimal-stub fault forward (`bench-touch-minimal`)
//! for the first-touch fault.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cowlab_abi::Program;

use super::{config, us, BenchOptions, Measurement};
use crate::kvm::{Error, Event, Vm, VmConfig};

/// Runs `program(iters)` and returns the time between its marks 1 and 2
/// divided by `iters`, plus the VM's boot time.
fn marked_round(opts: &BenchOptions, program: Program) -> Result<(f64, Option<f64>), Error> {
    marked(config(opts, program, opts.iters), opts.iters)
}

/// Runs `config` and returns the time between its marks 1 and 2 divided
/// by `ops`, plus the VM's boot time.
fn marked(config: VmConfig, ops: u64) -> Result<(f64, Option<f64>), Error> {
    let (marks, boot) = marks(config)?;
    Ok((between(&marks, 1, 2)? / ops as f64, boot))
}

/// Runs `config` to its end; the times of its marks, and its boot time.
pub(super) fn marks(config: VmConfig) -> Result<(BTreeMap<u64, Instant>, Option<f64>), Error> {
    let program = config.program;
    let mut vm = Vm::new(&config)?;
    let mut marks = BTreeMap::new();
    let report = vm.wait(Some(Duration::from_secs(300)), |e| {
        if let Event::Mark { n, at, .. } = e {
            marks.insert(*n, *at);
        }
    });
    let problems = report.problems();
    if !problems.is_empty() {
        return Err(Error::Run(format!(
            "benchmark {}: {}",
            program.name(),
            problems.join("; ")
        )));
    }
    if marks.is_empty() {
        return Err(Error::Run(format!(
            "benchmark {} reported no marks",
            program.name()
        )));
    }
    Ok((marks, report.boot_time.map(us)))
}

/// Microseconds from mark `a` to mark `b`.
pub(super) fn between(marks: &BTreeMap<u64, Instant>, a: u64, b: u64) -> Result<f64, Error> {
    match (marks.get(&a), marks.get(&b)) {
        (Some(s), Some(e)) => Ok(us(*e - *s)),
        _ => Err(Error::Run(format!("benchmark marks {a} and {b} missing"))),
    }
}

/// Kicks a spinning vCPU up to 2000 times with `send` and times each round
/// trip: until `answered` picks the answer out of the events, or until
/// `send` returns if `answered` is `None`. The vCPU gets 200 µs to re-enter
/// its program between kicks, so each kick finds it running there.
fn kick_round(
    opts: &BenchOptions,
    send: impl Fn(&Vm) -> bool,
    answered: Option<fn(&Event) -> Option<Instant>>,
) -> Result<Vec<f64>, Error> {
    let mut vm = Vm::new(&config(opts, Program::Spin, 0))?;
    let timeout = Duration::from_secs(10);
    while !matches!(vm.next_event(timeout), Some(Event::Booted { .. }) | None) {}
    let mut samples = Vec::new();
    for i in 0..opts.iters.min(2000) {
        std::thread::sleep(Duration::from_micros(200));
        let t0 = Instant::now();
        send(&vm);
        let Some(answered) = answered else {
            samples.push(us(t0.elapsed()));
            continue;
        };
        loop {
            match vm.next_event(timeout) {
                Some(e) => {
                    if let Some(at) = answered(&e) {
                        samples.push(us(at - t0));
                        break;
                    }
                    if matches!(e, Event::Ended(_)) {
                        return Err(Error::Run(
                            "the spinning vCPU ended during the kick benchmark".into(),
                        ));
                    }
                }
                None => {
                    return Err(Error::Run(format!(
                        "a kicked vCPU did not answer within 10 s (kick {i})"
                    )))
                }
            }
        }
    }
    vm.stop_spinning(0);
    let report = vm.wait(Some(timeout), |_| {});
    if report.exit_code() != 0 {
        return Err(Error::Run(format!(
            "kick benchmark: {}",
            report.problems().join("; ")
        )));
    }
    Ok(samples)
}

/// Measures the host's limits.
pub fn host_limits(opts: &BenchOptions) -> Result<Vec<Measurement>, Error> {
    let mut boot = Vec::new();
    let mut per_op = |program| -> Result<Vec<f64>, Error> {
        let mut v = Vec::new();
        for _ in 0..opts.rounds {
            let (op, b) = marked_round(opts, program)?;
            v.push(op);
            boot.extend(b);
        }
        Ok(v)
    };
    // Each figure and its floor alternate, round by round, so both see the
    // same load.
    let (mut pio, mut doorbell) = (Vec::new(), Vec::new());
    for _ in 0..opts.rounds {
        doorbell.push(marked_round(opts, Program::BenchDoorbell)?.0);
        pio.push(marked_round(opts, Program::BenchPio)?.0);
    }
    let fault = per_op(Program::BenchFault)?;
    // First-touch faults through the minimal stub, through cowlab's stub,
    // and through cowlab's stub with a trace recorded, alternating.
    let (mut minimal, mut touch, mut traced) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..opts.rounds {
        minimal.push(marked_round(opts, Program::BenchTouchMinimal)?.0);
        touch.push(marked_round(opts, Program::BenchTouch)?.0);
        // Recorded as for a file, the bytes then thrown away.
        let recorder = crate::trace::Recorder::discarding();
        recorder.begin_run(1, "bench-touch");
        let config = VmConfig {
            trace: Some(std::sync::Arc::clone(&recorder)),
            ..config(opts, Program::BenchTouch, opts.iters)
        };
        traced.push(marked(config, opts.iters)?.0);
        let _ = recorder.end_run(0, "", false);
    }
    let store = per_op(Program::BenchStore)?;
    let mut refill = Vec::new();
    let mut shootdown: [Vec<f64>; 3] = Default::default();
    // The guest reads the round count from the argument's low 32 bits.
    let rounds = (opts.iters / 20).clamp(1, u64::from(u32::MAX));
    for _ in 0..opts.rounds {
        let tiny_tlb = VmConfig {
            policy: crate::policy::Policy {
                tlb_capacity: Some(1),
                ..Default::default()
            },
            ..config(opts, Program::BenchRefill, opts.iters)
        };
        refill.push(marked(tiny_tlb, opts.iters)?.0);
        for (others, samples) in shootdown.iter_mut().enumerate() {
            let arg = (others as u64) << 48 | rounds;
            samples.push(marked(config(opts, Program::BenchShootdown, arg), rounds)?.0);
        }
    }
    let [sd0, sd1, sd2] = shootdown;
    let mut kick = Vec::new();
    let mut ipi = Vec::new();
    for _ in 0..opts.rounds {
        kick.extend(kick_round(
            opts,
            |vm| vm.ping(0),
            Some(|e| match e {
                Event::Pong { at, .. } => Some(*at),
                _ => None,
            }),
        )?);
        ipi.extend(kick_round(opts, |vm| vm.flush_tlb(0), None)?);
    }
    let rows = [
        (
            "vm_start",
            "Vm::new to the program's first exit (Booted hypercall) of the benchmark programs: the VM reused from the run before (vm_create_start: a new one)",
            boot,
        ),
        (
            "doorbell_floor",
            "floor of a hypercall: the doorbell MMIO write alone (no arguments, no result) → VMM → program",
            doorbell,
        ),
        (
            "exit_round_trip",
            "hypercall round trip from the program (doorbell MMIO write → VMM → program)",
            pio,
        ),
        (
            "pf_forward_round_trip",
            "#PF → stub → exit → VMM decision → iretq (no mapping)",
            fault,
        ),
        (
            "pf_minimal_forward",
            "floor of a fault: first touch through the minimal #PF stub (out; add rsp,8; iretq) + demand-zero frame + shadow fill",
            minimal,
        ),
        (
            "first_touch_fault",
            "first write to a fresh page: forward + demand-zero frame + shadow fill",
            touch,
        ),
        (
            "first_touch_traced",
            "the same while --trace records every event (trace overhead: ratio to first_touch_fault)",
            traced,
        ),
        (
            "tlb_fill_fault",
            "a read that misses the TLB while the logical PTE allows it: forward + walk + fill (tlb_capacity 1)",
            refill,
        ),
        (
            "mprotect_pair_0",
            "mprotect(PROT_READ) + mprotect(RW) of a page, no other thread: two exits, PTE changes, local flush",
            sd0,
        ),
        (
            "mprotect_pair_1",
            "the same with 1 other thread spinning in the guest: + a shootdown to 1 vCPU (IPI, ack)",
            sd1,
        ),
        (
            "mprotect_pair_2",
            "the same with 2 other threads spinning: + a shootdown to 2 vCPUs",
            sd2,
        ),
        (
            "store",
            "one store by program code to mapped user memory (native execution)",
            store,
        ),
        (
            "kick_round_trip",
            "signal + immediate_exit until the vCPU thread is out of KVM_RUN",
            kick,
        ),
        (
            "ipi_round_trip",
            "VMM-initiated shootdown of a vCPU in its program: flush, kick, injected interrupt, CR3 reload, ack exit, initiator wakes",
            ipi,
        ),
    ];
    Ok(super::measurements(rows))
}
