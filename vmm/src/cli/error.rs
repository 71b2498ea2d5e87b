//! The CLI's own errors: what a command's arguments or input files got
//! wrong. Each is a usage or input error (exit 2); its Display is the line
//! the user reads after `cowlab: `.

use std::path::PathBuf;

use super::list::{program_names, test_names};
use crate::hooks::SpecError;
use crate::kvm::exit_code;
use crate::litmus;
use crate::policy::{Policy, PolicyError};

/// Why a command could not start from what it was given.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// An input file that cannot be read whole (`read_input`).
    #[error("cannot read {}: {why}", path.display())]
    Read { path: PathBuf, why: ReadError },
    /// A litmus file that is not text.
    #[error("cannot read {what}: not UTF-8 text ({source})")]
    NotUtf8 {
        what: String,
        source: std::string::FromUtf8Error,
    },
    /// `cowlab run WHAT` names neither a program, a test nor a file.
    #[error(
        "unknown program or test '{what}' (programs: {}; tests: {}; or a .litmus file)",
        program_names(),
        test_names()
    )]
    UnknownTest { what: String },
    /// A litmus test that does not parse or compile.
    #[error("{name}:{source}")]
    Litmus {
        name: String,
        source: litmus::ParseError,
    },
    /// `--policy NAME` names no preset.
    #[error("unknown policy '{name}' (presets: {})", Policy::preset_names())]
    UnknownPolicy { name: String },
    /// A `--set` without `=`.
    #[error("--set takes knob=value, not '{0}'")]
    BadSet(String),
    /// A `--set knob=value` the policy refuses.
    #[error(transparent)]
    Knob(#[from] PolicyError),
    /// An `--inject` rule or a `--schedule` that does not parse.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The file of `--trace` cannot be created.
    #[error("--trace {}: {source}", path.display())]
    Trace {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl CliError {
    /// The exit status: every one is a usage or input error.
    pub fn exit_code(&self) -> i32 {
        exit_code::USAGE
    }
}

/// Why an input file is refused (after `cannot read PATH: `).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(std::io::Error),
    #[error("a directory")]
    Directory,
    #[error("not a regular file or a pipe")]
    NotFileOrPipe,
    #[error("not a regular file")]
    NotFile,
    #[error("larger than the limit of {} MiB", limit >> 20)]
    TooLarge { limit: u64 },
}
