//! Measurements of what the host makes possible (DESIGN.md §4): VM start,
//! exit round trip, #PF forward round trip, first-touch fault, kick and
//! interrupt-injection round trips. Each number comes from real vCPUs
//! running the built-in benchmark programs.

use std::time::{Duration, Instant};

use cowlab_abi::Program;

use crate::kvm::{Error, Event, Vm, VmConfig};

/// How much to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Rounds per measurement (each round is a fresh VM).
    pub rounds: usize,
    /// Operations per round.
    pub iters: u64,
    pub kvm_path: String,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            rounds: 5,
            iters: 20_000,
            kvm_path: "/dev/kvm".into(),
        }
    }
}

/// Median and range of a set of samples, in microseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Stat {
    pub median_us: f64,
    pub min_us: f64,
    pub max_us: f64,
    pub samples: usize,
}

impl Stat {
    /// Statistics of `samples` (microseconds); `None` if there are none.
    pub fn of(mut samples: Vec<f64>) -> Option<Stat> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let median = if n % 2 == 1 {
            samples[n / 2]
        } else {
            (samples[n / 2 - 1] + samples[n / 2]) / 2.0
        };
        Some(Stat {
            median_us: median,
            min_us: samples[0],
            max_us: samples[n - 1],
            samples: n,
        })
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "median_us": self.median_us, "min_us": self.min_us,
            "max_us": self.max_us, "samples": self.samples,
        })
    }
}

/// One measured quantity.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub name: &'static str,
    pub what: &'static str,
    pub stat: Stat,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn config(opts: &BenchOptions, program: Program, arg: u64) -> VmConfig {
    VmConfig {
        program,
        arg,
        mem_mib: 512,
        kvm_path: opts.kvm_path.clone(),
        ..VmConfig::default()
    }
}

/// Runs `program(iters)` and returns the time between its marks 1 and 2
/// divided by `iters`, plus the VM's boot time.
fn marked_round(opts: &BenchOptions, program: Program) -> Result<(f64, Option<f64>), Error> {
    marked(config(opts, program, opts.iters), opts.iters)
}

/// Runs `config` and returns the time between its marks 1 and 2 divided
/// by `ops`, plus the VM's boot time.
fn marked(config: VmConfig, ops: u64) -> Result<(f64, Option<f64>), Error> {
    let program = config.program;
    let mut vm = Vm::new(&config)?;
    let (mut start, mut end) = (None, None);
    let report = vm.wait(Some(Duration::from_secs(60)), |e| {
        if let Event::Mark { n, at, .. } = e {
            match n {
                1 => start = Some(*at),
                2 => end = Some(*at),
                _ => {}
            }
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
    let (Some(s), Some(e)) = (start, end) else {
        return Err(Error::Run(format!(
            "benchmark {} reported no marks",
            program.name()
        )));
    };
    Ok((us(e - s) / ops as f64, report.boot_time.map(us)))
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
    let pio = per_op(Program::BenchPio)?;
    let fault = per_op(Program::BenchFault)?;
    // First-touch faults without and with a trace recorded, alternating.
    let (mut touch, mut traced) = (Vec::new(), Vec::new());
    let trace_file =
        std::env::temp_dir().join(format!("cowlab-bench-{}.trace", std::process::id()));
    for _ in 0..opts.rounds {
        touch.push(marked_round(opts, Program::BenchTouch)?.0);
        let recorder = crate::trace::Recorder::create(&trace_file)
            .map_err(|e| Error::Run(format!("{}: {e}", trace_file.display())))?;
        recorder.begin_run(1, "bench-touch");
        let config = VmConfig {
            trace: Some(std::sync::Arc::clone(&recorder)),
            ..config(opts, Program::BenchTouch, opts.iters)
        };
        traced.push(marked(config, opts.iters)?.0);
        let _ = recorder.end_run(0, "", false);
    }
    let _ = std::fs::remove_file(&trace_file);
    let store = per_op(Program::BenchStore)?;
    let mut refill = Vec::new();
    let mut shootdown: [Vec<f64>; 3] = Default::default();
    let rounds = (opts.iters / 20).max(1);
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
            "VM creation to the program's first exit (Booted hypercall)",
            boot,
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
    Ok(rows
        .into_iter()
        .filter_map(|(name, what, samples)| {
            Stat::of(samples).map(|stat| Measurement { name, what, stat })
        })
        .collect())
}

/// The measurements as a text table.
pub fn table(rows: &[Measurement]) -> String {
    let mut out = format!(
        "{:<24} {:>10} {:>10} {:>10} {:>8}  what\n",
        "limit", "median µs", "min µs", "max µs", "samples"
    );
    // Sub-microsecond numbers (native execution) need more digits.
    let num = |us: f64| {
        if us < 1.0 {
            format!("{us:.5}")
        } else {
            format!("{us:.2}")
        }
    };
    for m in rows {
        out += &format!(
            "{:<24} {:>10} {:>10} {:>10} {:>8}  {}\n",
            m.name,
            num(m.stat.median_us),
            num(m.stat.min_us),
            num(m.stat.max_us),
            m.stat.samples,
            m.what
        );
    }
    out
}

/// The measurements as one JSON object.
pub fn json(rows: &[Measurement], opts: &BenchOptions) -> serde_json::Value {
    let limits: serde_json::Map<String, serde_json::Value> = rows
        .iter()
        .map(|m| (m.name.to_string(), m.stat.json()))
        .collect();
    serde_json::json!({ "rounds": opts.rounds, "iters": opts.iters, "host_limits": limits })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_median_and_range() {
        let s = Stat::of(vec![3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!(
            (s.median_us, s.min_us, s.max_us, s.samples),
            (2.5, 1.0, 10.0, 4)
        );
        assert_eq!(Stat::of(vec![]), None);
    }
}
