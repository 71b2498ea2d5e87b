//! `cowlab list programs|policies|tests|points`: the built-in things.

use cowlab_abi::program::PROGRAMS;

use super::output::out;
use crate::hooks;
use crate::kvm::exit_code;
use crate::litmus::{self, builtin};

/// Names of the built-in programs, for error messages.
pub fn program_names() -> String {
    PROGRAMS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
}

/// Names of the built-in litmus tests, for error messages.
pub(super) fn test_names() -> String {
    builtin::TESTS
        .iter()
        .map(|t| t.0)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `cowlab list points`: the injection points.
pub fn list_points() -> i32 {
    for (name, what) in hooks::POINTS {
        out(format_args!("{name:<32} {what}\n"));
    }
    out("guest:NAME                       a litmus test's `hook NAME`\n");
    exit_code::OK
}

/// `cowlab list programs`.
pub fn list_programs() -> i32 {
    for (name, _, what) in PROGRAMS {
        out(format_args!(
            "{name:<16} {what}
"
        ));
    }
    exit_code::OK
}

/// `cowlab list policies`: presets × knobs with their commits.
pub fn list_policies() -> i32 {
    out(crate::policy::PolicyTable);
    exit_code::OK
}

/// `cowlab list tests`.
pub fn list_tests() -> i32 {
    for (name, src, suites) in builtin::TESTS {
        let first = litmus::parse(src)
            .ok()
            .and_then(|t| t.description)
            .unwrap_or_default();
        let first = first.lines().next().unwrap_or("").to_string();
        out(format_args!("{name:<24} [{}] {first}\n", suites.join(",")));
    }
    exit_code::OK
}
