//! Measurements of what the host makes possible (docs/performance.md,
//! `cowlab bench`; docs/design.md §11): VM start, exit round trip, #PF
//! forward round trip, first-touch fault, kick and interrupt-injection
//! round trips. Each number comes from real vCPUs running the built-in
//! benchmark programs.
//!
//! - [`floors`]: the host's limits ([`host_limits`]); [`lifecycle`]: a
//!   VM created against one reused ([`vm_lifecycle`]).
//! - [`native`]: cowlab against native Linux ([`versus_native`]).
//! - [`litmus`]: litmus runs per second ([`litmus_rates`]) and
//!   interleavings per second of a search ([`explore_rates`]).
//! - here: the options, statistics, tables and the JSON report.

use std::time::Duration;

use cowlab_abi::Program;

use crate::kvm::{Error, VmConfig};

pub mod floors;
pub mod lifecycle;
pub mod litmus;
pub mod native;

pub use floors::host_limits;
pub use lifecycle::vm_lifecycle;
pub use litmus::{explore_rates, litmus_rates};
pub use native::{versus_native, versus_table, Versus};

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
    /// Runs per round of each litmus test timed, and the budget
    /// (interleavings) per round of each search timed.
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

/// Named sample sets as measurements (a set without samples is left out).
fn measurements<const N: usize>(rows: [(&str, &'static str, Vec<f64>); N]) -> Vec<Measurement> {
    rows.into_iter()
        .filter_map(|(name, what, samples)| {
            Stat::of(samples).map(|stat| Measurement {
                name: name.to_string(),
                what,
                stat,
            })
        })
        .collect()
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

/// Figures and the floors `cowlab bench` measures them against (issue 17:
/// each within 1.1× of its floor; reported, never asserted).
pub const FLOORS: [(&str, &str); 2] = [
    ("exit_round_trip", "doorbell_floor"),
    ("first_touch_fault", "pf_minimal_forward"),
];

/// Everything one `cowlab bench` measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub limits: Vec<Measurement>,
    pub versus: Vec<Versus>,
    pub litmus: Vec<Measurement>,
    /// Time per interleaving of the searches of [`litmus::EXPLORED`].
    pub explore: Vec<Measurement>,
}

impl Report {
    fn limit(&self, name: &str) -> Option<f64> {
        self.limits
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.stat.median_us)
    }

    /// A search's interleavings/s over the forced runs/s of the test it
    /// is the bare form of (`None` if either was not measured).
    pub fn explore_vs_forced(&self, m: &Measurement) -> Option<f64> {
        let (_, _, forced) = litmus::EXPLORED
            .iter()
            .find(|(name, _, _)| m.name == format!("explore {name}"))?;
        let forced = self
            .litmus
            .iter()
            .find(|l| l.name == format!("litmus {forced}"))?;
        Some(forced.stat.median_us / m.stat.median_us)
    }

    /// Each figure over its floor measured in the same run (the targets:
    /// ≤ 1.1×), cowlab's fault costs over the #PF forward round trip (the
    /// exit no fault can avoid), and the trace's cost over the untraced
    /// fault.
    pub fn ratios(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for (figure, floor) in FLOORS {
            if let (Some(x), Some(f)) = (self.limit(figure), self.limit(floor)) {
                out.push((format!("{figure} / {floor} (target ≤ 1.1×)"), x / f));
            }
        }
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
        for (new, reused) in [
            ("vm_create_start", "vm_reuse_start"),
            ("vm_create_run", "vm_reuse_run"),
        ] {
            if let (Some(n), Some(r)) = (self.limit(new), self.limit(reused)) {
                out.push((format!("{reused} / {new}"), r / n));
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
        for m in &self.explore {
            if let Some(r) = self.explore_vs_forced(m) {
                out.push((format!("{} interleavings/s / forced runs/s", m.name), r));
            }
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
        for m in &self.explore {
            let vs = self
                .explore_vs_forced(m)
                .map_or(String::new(), |r| format!("; {r:.2}× the forced runs/s"));
            out += &format!(
                "{:<36} {:>8.1} interleavings/s  ({:.0}–{:.0} µs per interleaving{vs})\n",
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
        let mut litmus: Vec<serde_json::Value> = self
            .litmus
            .iter()
            .map(|m| serde_json::json!({"test": m.name.trim_start_matches("litmus "), "mode": "runs", "runs_per_s": 1e6 / m.stat.median_us, "per_run": m.stat.json()}))
            .collect();
        for m in &self.explore {
            let test = m.name.trim_start_matches("explore ");
            let policy = litmus::EXPLORED
                .iter()
                .find(|(name, _, _)| *name == test)
                .map(|(_, policy, _)| *policy);
            litmus.push(serde_json::json!({
                "test": test, "mode": "explore", "policy": policy,
                "search": litmus::EXPLORE_STRATEGY, "seed": litmus::EXPLORE_SEED,
                "budget": opts.litmus_runs,
                "interleavings_per_s": 1e6 / m.stat.median_us,
                "per_interleaving": m.stat.json(),
                "vs_forced_runs_per_s": self.explore_vs_forced(m),
            }));
        }
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
        limits: {
            let mut limits = host_limits(opts)?;
            limits.extend(vm_lifecycle(opts)?);
            limits
        },
        versus: versus_native(opts)?,
        litmus: litmus_rates(opts)?,
        explore: explore_rates(opts)?,
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

    fn row(name: &str, median_us: f64) -> Measurement {
        Measurement {
            name: name.into(),
            what: "",
            stat: Stat::of(vec![median_us]).unwrap(),
        }
    }

    #[test]
    fn figures_are_shown_as_ratios_to_their_floors() {
        let report = Report {
            limits: vec![
                row("doorbell_floor", 50.0),
                row("exit_round_trip", 55.0),
                row("pf_minimal_forward", 80.0),
                row("first_touch_fault", 100.0),
            ],
            versus: Vec::new(),
            litmus: Vec::new(),
            explore: Vec::new(),
        };
        let ratios = report.ratios();
        let get = |name: &str| ratios.iter().find(|(n, _)| n == name).map(|(_, r)| *r);
        assert_eq!(
            get("exit_round_trip / doorbell_floor (target ≤ 1.1×)"),
            Some(1.1)
        );
        assert_eq!(
            get("first_touch_fault / pf_minimal_forward (target ≤ 1.1×)"),
            Some(1.25)
        );
        let text = report.text();
        assert!(
            text.contains("first_touch_fault / pf_minimal_forward (target ≤ 1.1×)")
                && text.contains("1.25×"),
            "{text}"
        );
        // Without its floor a figure gets no ratio.
        let alone = Report {
            limits: vec![row("exit_round_trip", 55.0)],
            ..report
        };
        assert!(alone.ratios().is_empty(), "{:?}", alone.ratios());
    }

    #[test]
    fn the_explore_rate_is_shown_against_the_forced_runs() {
        let report = Report {
            limits: Vec::new(),
            versus: Vec::new(),
            litmus: vec![row("litmus fork-vma-lock", 10_000.0)],
            explore: vec![row("explore fork-vma-lock-bare", 20_000.0)],
        };
        let text = report.text();
        assert!(
            text.lines().any(|l| l.starts_with("explore fork-vma-lock-bare ")
                && l.ends_with(" 50.0 interleavings/s  (20000–20000 µs per interleaving; 0.50× the forced runs/s)")),
            "{text}"
        );
        let v = report.json(&BenchOptions::default());
        let e = &v["litmus"][1];
        assert_eq!(e["test"], "fork-vma-lock-bare", "{v}");
        assert_eq!(e["mode"], "explore", "{v}");
        assert_eq!(e["policy"], "linux-6.4", "{v}");
        assert_eq!(e["search"]["strategy"], "pct", "{v}");
        assert_eq!(e["search"]["depth"], 3, "{v}");
        assert_eq!(e["interleavings_per_s"], 50.0, "{v}");
        assert_eq!(e["vs_forced_runs_per_s"], 0.5, "{v}");
        assert_eq!(v["litmus"][0]["mode"], "runs", "{v}");
        assert_eq!(
            v["ratios"]["explore fork-vma-lock-bare interleavings/s / forced runs/s"], 0.5,
            "{v}"
        );
        // Without the forced timing there is no ratio.
        let alone = Report {
            litmus: Vec::new(),
            ..report
        };
        assert_eq!(
            alone.json(&BenchOptions::default())["litmus"][0]["vs_forced_runs_per_s"],
            serde_json::Value::Null
        );
    }
}
