//! Measurements of what the host makes possible (DESIGN.md §4): VM start,
//! exit round trip, #PF forward round trip, first-touch fault, kick and
//! interrupt-injection round trips. Each number comes from real vCPUs
//! running the built-in benchmark programs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cowlab_abi::Program;

use crate::kvm::{Error, Event, Vm, VmConfig};
use crate::litmus;
use crate::policy::Policy;

/// How much to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Rounds per measurement (each round is a fresh VM).
    pub rounds: usize,
    /// Operations per round.
    pub iters: u64,
    pub kvm_path: String,
    /// Sizes (MiB) of touched memory for the fork / COW / first-touch
    /// comparison with native Linux.
    pub sizes_mib: Vec<u64>,
    /// Rounds of that comparison (each a cowlab VM and a native process).
    pub native_rounds: usize,
    /// Runs per round of each litmus test timed.
    pub litmus_runs: u64,
}

/// The largest `--sizes` entry, in MiB: its cowlab round needs twice as
/// much guest memory and 128 MiB more, within the largest guest memory.
pub const MAX_SIZE_MIB: u64 = ((cowlab_abi::layout::MAX_MEM_SIZE >> 20) - 128) / 2;

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            rounds: 5,
            iters: 20_000,
            kvm_path: "/dev/kvm".into(),
            sizes_mib: vec![16, 64, 256],
            native_rounds: 3,
            litmus_runs: 50,
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
    pub name: String,
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
    let (marks, boot) = marks(config)?;
    Ok((between(&marks, 1, 2)? / ops as f64, boot))
}

/// Runs `config` to its end; the times of its marks, and its boot time.
fn marks(config: VmConfig) -> Result<(BTreeMap<u64, Instant>, Option<f64>), Error> {
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
fn between(marks: &BTreeMap<u64, Instant>, a: u64, b: u64) -> Result<f64, Error> {
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
    let pio = per_op(Program::BenchPio)?;
    let fault = per_op(Program::BenchFault)?;
    // First-touch faults without and with a trace recorded, alternating.
    let (mut touch, mut traced) = (Vec::new(), Vec::new());
    for _ in 0..opts.rounds {
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
            Stat::of(samples).map(|stat| Measurement {
                name: name.to_string(),
                what,
                stat,
            })
        })
        .collect())
}

/// One workload measured in cowlab and natively, in the same run.
#[derive(Debug, Clone)]
pub struct Versus {
    pub name: String,
    pub what: &'static str,
    pub cowlab: Stat,
    pub native: Stat,
}

impl Versus {
    /// cowlab's median over native's.
    pub fn ratio(&self) -> f64 {
        self.cowlab.median_us / self.native.median_us
    }
}

/// The native baseline (tools/, `cowlab_tools::measure`), run in a fresh
/// single-threaded process: this binary again, as `cowlab native-baseline
/// MIB` (fork must not copy cowlab's threads). Per page, in µs: first
/// touch, fork, COW fault.
fn native_round(mib: u64) -> Result<[f64; 3], Error> {
    let exe =
        std::env::current_exe().map_err(|e| Error::Run(format!("cannot find cowlab: {e}")))?;
    let out = std::process::Command::new(&exe)
        .args(["native-baseline", &mib.to_string()])
        .output()
        .map_err(|e| Error::Run(format!("{}: {e}", exe.display())))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let why = err.lines().next().unwrap_or("no message");
        return Err(Error::Run(format!("the native baseline failed: {why}")));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::Run(format!("the native baseline printed no JSON: {e}")))?;
    let get = |k: &str| {
        v[k].as_f64()
            .map(|ns| ns / 1000.0)
            .ok_or_else(|| Error::Run(format!("the native baseline has no {k}")))
    };
    Ok([
        get("first_touch_ns")?,
        get("fork_ns_per_page")?,
        get("cow_fault_ns")?,
    ])
}

/// The same three in cowlab: the `bench-fork` program (marks 5-6 touch,
/// 1-2 fork, 3-4 COW writes), per page in µs.
fn cowlab_round(opts: &BenchOptions, mib: u64) -> Result<[f64; 3], Error> {
    let pages = mib * 256;
    let config = VmConfig {
        // The touched memory, the COW copies, page tables, stacks.
        mem_mib: (2 * mib + 128).max(256),
        ..config(opts, Program::BenchFork, pages)
    };
    let (m, _) = marks(config)?;
    let per = |a, b| between(&m, a, b).map(|t| t / pages as f64);
    Ok([per(5, 6)?, per(1, 2)?, per(3, 4)?])
}

/// Fork, COW fault and first touch per page with N MiB touched, cowlab
/// against native Linux, alternating rounds.
pub fn versus_native(opts: &BenchOptions) -> Result<Vec<Versus>, Error> {
    let mut rows = Vec::new();
    for &mib in &opts.sizes_mib {
        let mut c: [Vec<f64>; 3] = Default::default();
        let mut n: [Vec<f64>; 3] = Default::default();
        for _ in 0..opts.native_rounds.max(1) {
            for (v, x) in c.iter_mut().zip(cowlab_round(opts, mib)?) {
                v.push(x);
            }
            for (v, x) in n.iter_mut().zip(native_round(mib)?) {
                v.push(x);
            }
        }
        let whats = [
            (
                "first_touch",
                "first write to a fresh anonymous page, per page",
            ),
            ("fork", "fork() of the process, per touched page"),
            (
                "cow_fault",
                "write to a page shared with the child after fork, per page",
            ),
        ];
        for ((name, what), (cv, nv)) in whats.into_iter().zip(c.into_iter().zip(n)) {
            if let (Some(cowlab), Some(native)) = (Stat::of(cv), Stat::of(nv)) {
                rows.push(Versus {
                    name: format!("{name}_{mib}MiB"),
                    what,
                    cowlab,
                    native,
                });
            }
        }
    }
    Ok(rows)
}

/// Litmus throughput: a fresh VM per run, as `cowlab run` does. The time
/// per run of threads-counter (two threads, no fork) and of each seed test
/// (forced, under the preset with the bug), in rounds of `litmus_runs`.
pub fn litmus_rates(opts: &BenchOptions) -> Result<Vec<Measurement>, Error> {
    let mut tests: Vec<(&'static str, String)> = vec![("threads-counter", "mainline".into())];
    for (name, src, suites) in litmus::builtin::TESTS {
        if suites.contains(&"seeds") && !name.ends_with("-free") {
            let policy = litmus::parse(src)
                .ok()
                .and_then(|t| t.expects.first().map(|e| e.policy.clone()))
                .unwrap_or_else(|| "mainline".into());
            tests.push((name, policy));
        }
    }
    let mut rows = Vec::new();
    for (name, policy_name) in tests {
        let src = litmus::builtin::source(name).expect("a built-in test");
        let compiled = Arc::new(litmus::load(src).map_err(|e| Error::Run(format!("{name}: {e}")))?);
        let policy = Policy::preset(&policy_name).unwrap_or(Policy::MAINLINE);
        let mut per_run = Vec::new();
        for _ in 0..opts.native_rounds.max(1) {
            let run_opts = litmus::RunOptions {
                runs: opts.litmus_runs.max(1),
                policy_name: policy_name.clone(),
                policy,
                timeout: Duration::from_secs(30),
                kvm_path: opts.kvm_path.clone(),
                progress: false,
                rules: Vec::new(),
                schedule: None,
                chaos: None,
                control: None,
                trace: None,
                deadline: None,
                until_witness: None,
            };
            let r = litmus::run_test(&compiled, &run_opts)?;
            // A timing with runs in error is not a measurement.
            if let Some(msg) = r.errors.keys().next() {
                return Err(Error::Run(format!("litmus {name}: {msg}")));
            }
            per_run.push(us(r.elapsed) / r.runs.max(1) as f64);
        }
        if let Some(stat) = Stat::of(per_run) {
            rows.push(Measurement {
                name: format!("litmus {name}"),
                what: "time per run (fresh VM, threads, checks); runs/s = 1e6 / median",
                stat,
            });
        }
    }
    Ok(rows)
}

/// The comparison with native Linux as a text table.
pub fn versus_table(rows: &[Versus]) -> String {
    let mut out = format!(
        "{:<22} {:>10} {:>16} {:>10} {:>16} {:>8}  what\n",
        "vs native", "cowlab µs", "(min–max)", "native µs", "(min–max)", "ratio"
    );
    for v in rows {
        out += &format!(
            "{:<22} {:>10.3} {:>16} {:>10.3} {:>16} {:>7.1}×  {}\n",
            v.name,
            v.cowlab.median_us,
            format!("{:.3}–{:.3}", v.cowlab.min_us, v.cowlab.max_us),
            v.native.median_us,
            format!("{:.3}–{:.3}", v.native.min_us, v.native.max_us),
            v.ratio(),
            v.what
        );
    }
    out
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

/// Everything one `cowlab bench` measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub limits: Vec<Measurement>,
    pub versus: Vec<Versus>,
    pub litmus: Vec<Measurement>,
}

impl Report {
    fn limit(&self, name: &str) -> Option<f64> {
        self.limits
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.stat.median_us)
    }

    /// cowlab's fault costs over the #PF forward round trip (the exit no
    /// fault can avoid), and the trace's cost over the untraced fault.
    pub fn ratios(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        if let Some(fwd) = self.limit("pf_forward_round_trip") {
            for name in ["first_touch_fault", "tlb_fill_fault"] {
                if let Some(x) = self.limit(name) {
                    out.push((format!("{name} / pf_forward_round_trip"), x / fwd));
                }
            }
            for v in self
                .versus
                .iter()
                .filter(|v| v.name.starts_with("cow_fault"))
            {
                out.push((
                    format!("{} / pf_forward_round_trip", v.name),
                    v.cowlab.median_us / fwd,
                ));
            }
        }
        if let (Some(t), Some(u)) = (
            self.limit("first_touch_traced"),
            self.limit("first_touch_fault"),
        ) {
            out.push((
                "first_touch_traced / first_touch_fault (trace overhead)".into(),
                t / u,
            ));
        }
        out
    }

    pub fn text(&self) -> String {
        let mut out = table(&self.limits);
        out += "\n";
        out += &versus_table(&self.versus);
        out += "\n";
        for (name, r) in self.ratios() {
            out += &format!("{name:<58} {r:>6.2}×\n");
        }
        out += "\n";
        for m in &self.litmus {
            out += &format!(
                "{:<36} {:>8.1} runs/s  ({:.0}–{:.0} µs per run)\n",
                m.name,
                1e6 / m.stat.median_us,
                m.stat.min_us,
                m.stat.max_us
            );
        }
        out
    }

    pub fn json(&self, opts: &BenchOptions) -> serde_json::Value {
        let limits: serde_json::Map<String, serde_json::Value> = self
            .limits
            .iter()
            .map(|m| (m.name.to_string(), m.stat.json()))
            .collect();
        let versus: Vec<serde_json::Value> = self
            .versus
            .iter()
            .map(|v| serde_json::json!({"name": v.name, "what": v.what, "cowlab": v.cowlab.json(), "native": v.native.json(), "ratio": v.ratio()}))
            .collect();
        let ratios: serde_json::Map<String, serde_json::Value> = self
            .ratios()
            .into_iter()
            .map(|(k, v)| (k, v.into()))
            .collect();
        let litmus: Vec<serde_json::Value> = self
            .litmus
            .iter()
            .map(|m| serde_json::json!({"test": m.name.trim_start_matches("litmus "), "runs_per_s": 1e6 / m.stat.median_us, "per_run": m.stat.json()}))
            .collect();
        serde_json::json!({
            "rounds": opts.rounds, "iters": opts.iters, "sizes_mib": opts.sizes_mib,
            "native_rounds": opts.native_rounds, "litmus_runs": opts.litmus_runs,
            "host_limits": limits, "versus_native": versus, "ratios": ratios, "litmus": litmus,
        })
    }
}

/// Runs every measurement.
pub fn run_all(opts: &BenchOptions) -> Result<Report, Error> {
    Ok(Report {
        limits: host_limits(opts)?,
        versus: versus_native(opts)?,
        litmus: litmus_rates(opts)?,
    })
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
