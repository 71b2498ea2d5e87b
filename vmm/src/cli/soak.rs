//! `cowlab soak`: the `*-free` litmus tests under chaos, a row per (test,
//! preset) of false witnesses, violations, errors and stuck runs.

use std::time::Duration;

use super::output::{error, out};
use super::run::load_litmus;
use crate::hooks;
use crate::kvm::exit_code;
use crate::litmus::{self, builtin};

/// Options of `cowlab soak`.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// `--test NAME` (repeatable; built-in names or files): default every
    /// built-in `*-free` test.
    pub tests: Vec<String>,
    pub runs: u64,
    /// `--seed S` (one batch from S) or `--seeds K` (K batches, seeds from
    /// the clock).
    pub seed: Option<u64>,
    pub seeds: u64,
    pub time: Option<Duration>,
    pub timeout: Duration,
    pub inject: Vec<String>,
    pub json: bool,
    pub kvm_path: String,
}

/// `K` first seeds for `cowlab soak --seeds K`, from the clock (printed, so
/// any run can be replayed).
fn clock_seeds(k: u64) -> Vec<u64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // splitmix64: batches far apart, so their runs' seeds do not overlap.
    (0..k)
        .map(|i| {
            let mut z = now.wrapping_add((i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) >> 1
        })
        .collect()
}

/// `cowlab soak`: every `*-free` test (or the `--test`s) under each preset
/// its `expect` lines say `Never` for, with chaos; a row per cell.
pub fn soak(opts: &SoakOptions) -> i32 {
    let names: Vec<String> = if opts.tests.is_empty() {
        builtin::TESTS
            .iter()
            .filter(|t| t.0.ends_with("-free"))
            .map(|t| t.0.to_string())
            .collect()
    } else {
        opts.tests.clone()
    };
    let mut cells = Vec::new();
    for name in &names {
        let compiled = match load_litmus(name) {
            Ok(c) => c,
            Err(e) => {
                error(&e);
                return e.exit_code();
            }
        };
        match litmus::soak::never_cells(&compiled) {
            c if c.is_empty() => {
                error(format_args!(
                    "{name} expects Never under no preset: nothing to soak"
                ));
                return exit_code::USAGE;
            }
            c => cells.extend(c),
        }
    }
    let rules = match opts
        .inject
        .iter()
        .map(|r| hooks::parse_rule(r))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(r) => r,
        Err(e) => {
            error(e);
            return exit_code::USAGE;
        }
    };
    let seeds = match opts.seed {
        Some(s) => vec![s],
        None => clock_seeds(opts.seeds.max(1)),
    };
    let soak_opts = litmus::soak::SoakOptions {
        runs: opts.runs.max(1),
        seeds: seeds.clone(),
        timeout: opts.timeout,
        time: opts.time,
        kvm_path: opts.kvm_path.clone(),
        rules,
    };
    let seed_list: Vec<String> = seeds.iter().map(u64::to_string).collect();
    if !opts.json {
        out(format_args!(
            "Soak: {} cell{}, {} runs each from chaos seed {} (run i: seed + i){}\n",
            cells.len(),
            if cells.len() == 1 { "" } else { "s" },
            soak_opts.runs.saturating_mul(seeds.len() as u64),
            seed_list.join(", "),
            opts.time
                .map(|t| format!(", at most {:.0} s", t.as_secs_f64()))
                .unwrap_or_default()
        ));
        out(litmus::soak::header());
    }
    let json = opts.json;
    let reports = match litmus::soak::soak(&cells, &soak_opts, |r| {
        if !json {
            out(litmus::soak::row(r));
        }
    }) {
        Ok(r) => r,
        Err(e) => {
            error(&e);
            return e.exit_code();
        }
    };
    let (total, code) = litmus::soak::verdict(&reports);
    if json {
        let v = serde_json::json!({
            "seeds": seeds,
            "runs_per_seed": soak_opts.runs,
            "time_s": opts.time.map(|t| t.as_secs_f64()),
            "cells": reports.iter().map(|r| r.json()).collect::<Vec<_>>(),
            "total": total.json(),
            "ok": code == exit_code::OK,
        });
        out(format_args!("{v}\n"));
    } else {
        out(litmus::soak::row(&total));
        for r in &reports {
            out(litmus::soak::details(r));
        }
        let asked = soak_opts
            .runs
            .saturating_mul(seeds.len() as u64)
            .saturating_mul(reports.len() as u64);
        if total.runs < asked {
            out(format_args!(
                "The time budget ran out: {} of {asked} runs made.\n",
                total.runs
            ));
        }
    }
    code
}
