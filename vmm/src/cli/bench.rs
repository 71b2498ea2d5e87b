//! `cowlab bench` and its hidden helper `cowlab native-baseline`.

use super::output::{error, out};
use crate::bench::{self, BenchOptions};
use crate::kvm::exit_code;

/// `cowlab bench`: the host limits, as a table or JSON.
pub fn bench(opts: &BenchOptions, json: bool) -> i32 {
    match bench::run_all(opts) {
        Ok(report) => {
            if json {
                out(format_args!("{}\n", report.json(opts)));
            } else {
                out(report.text());
            }
            exit_code::OK
        }
        Err(e) => {
            error(&e);
            e.exit_code()
        }
    }
}

/// `cowlab native-baseline MIB`: the native-Linux baseline of `cowlab
/// bench` (tools/), measured in this fresh process, as one JSON object.
pub fn native_baseline(mib: usize) -> i32 {
    match cowlab_tools::measure(mib.max(1)) {
        Ok(b) => {
            out(format_args!("{}\n", b.json()));
            exit_code::OK
        }
        Err(e) => {
            error(format_args!("native-baseline: {e}"));
            exit_code::VM_ERROR
        }
    }
}
