//! Litmus tests (docs/design.md §7): the language (`docs/litmus.md`), its
//! parser and compiler to guest bytecode, the runner and litmus7-style
//! verdicts, and the built-in tests.

pub mod ast;
pub mod builtin;
pub mod compile;
pub mod explore;
#[cfg(test)]
pub(crate) mod hostile;
pub mod parse;
pub mod result;
pub mod run;
pub mod soak;
pub mod verdict;

pub use compile::{compile, compile_for_explore, compile_for_schedule, Compiled};
pub use parse::{parse, ParseError};
pub use run::{run_test, LitmusResult, RunOptions};

/// Parses and compiles a test.
pub fn load(src: &str) -> Result<Compiled, ParseError> {
    compile(&parse(src)?)
}
