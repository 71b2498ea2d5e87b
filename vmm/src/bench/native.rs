//! cowlab against native Linux: first touch, fork and COW fault per page,
//! in a cowlab VM and in a fresh native process, alternating rounds.

use cowlab_abi::Program;

use super::floors::{between, marks};
use super::{config, BenchOptions, Stat};
use crate::kvm::{Error, VmConfig};

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
