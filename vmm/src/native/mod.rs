//! Litmus tests on the host kernel (docs/native.md): `cowlab run TEST
//! --native`, `cowlab suite NAME --native` and `cowlab diff` run a
//! schedule-free test as real threads and processes, each statement the
//! system call that does what the model models (fork(2), vmsplice(2) for
//! a FOLL_GET reference, an io_uring fixed buffer for a FOLL_PIN |
//! FOLL_LONGTERM pin, userfaultfd write-protect, …), and count the final
//! states into the same histogram and verdict as a model run.
//!
//! - [`refuse`]: what cannot run natively, and why.
//! - [`runner`]: cowlab's side: a process group per run, its deadline,
//!   the results read back.
//! - [`interp`]: the run's process: the interpreter of the AST.
//! - [`shared`]: the results area every process of a run maps.
//! - [`swap`]: a swap file for tests that page out.
//! - [`sys`]: the system calls, the module's only `unsafe`.
//!
//! Layering: cli → {native, litmus}; this module reuses the litmus AST,
//! compiler (for validation and region placement) and verdict code.

mod interp;
pub mod refuse;
pub mod runner;
mod shared;
pub mod swap;
mod sys;

pub use interp::run_process;
pub use runner::{host_label, refusal, run_native, NativeError, NativeOptions, RUN_SUBCOMMAND};
