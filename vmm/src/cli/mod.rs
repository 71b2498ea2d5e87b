//! The CLI's commands, behind argument parsing (`main.rs`): they print what
//! the user sees and return the process exit status (docs/design.md §12:
//! 0 ok, 1 an expectation not met, 2 a usage or input error, 3 a VM, run
//! or output error; [`finish`] makes a failed output 3).
//!
//! - [`output`]: `cowlab: …` lines, stdout and its write errors, input
//!   files read within a size limit.
//! - [`run`]: `cowlab run` (a program or a litmus test).
//! - [`suite`], [`soak`]: `cowlab suite`, `cowlab soak`.
//! - [`trace`]: `cowlab trace show|export`.
//! - [`list`]: `cowlab list …`.
//! - [`bench`]: `cowlab bench` and `cowlab native-baseline`.
//! - [`explore`]: `cowlab explore` and `cowlab explore merge`.
//! - [`native`]: `cowlab run --native`, `cowlab suite --native`, `cowlab
//!   diff`: litmus tests on the host kernel (docs/native.md).
//!
//! Errors: the layers below return their own typed errors, which a command
//! prints and turns into an exit status; what the CLI itself refuses (an
//! unreadable input, an unknown test or policy, a bad `--set`) is a
//! [`CliError`] (thiserror, as in every layer, not `anyhow`: each variant
//! is one message the tests read, and its exit status is known), never a
//! bare `String`.

pub mod bench;
mod error;
pub mod explore;
pub mod list;
pub mod native;
pub mod output;
pub mod run;
pub mod soak;
pub mod suite;
pub mod trace;

pub use bench::{bench, native_baseline};
pub use error::{CliError, ReadError};
pub use explore::{explore, merge as explore_merge, parse_shard, ExploreArgs};
pub use list::{list_points, list_policies, list_programs, list_tests, program_names};
pub use native::diff;
pub use output::{error, finish, out, MAX_GUEST_ELF, MAX_LITMUS_FILE, MAX_TRACE_FILE};
pub use run::{make_policy, run, RunOptions};
pub use soak::{soak, SoakOptions};
pub use suite::suite;
pub use trace::{trace_export, trace_show};

/// `--fresh-vms`: every run of this command boots a new KVM VM instead of
/// reusing the previous run's, reset (docs/performance.md, "VM reuse").
pub fn fresh_vms(fresh: bool) {
    crate::kvm::set_reuse_by_default(!fresh);
}
