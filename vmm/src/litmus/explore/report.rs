//! The text `cowlab explore` prints for a result.

use std::fmt::Write;

use super::{ExploreResult, Strategy};

/// The report: what was searched, the answer, the histogram and the
/// minimized schedule of a witness.
pub fn text(r: &ExploreResult) -> String {
    let mut out = String::new();
    let how = match r.strategy {
        Strategy::Dfs { bound } => format!("dfs, at most {bound} preemptions"),
        Strategy::Pct { depth } => format!("pct, depth {depth}, seed {}", r.seed),
    };
    let shards = if r.shard_count > 1 {
        let list: Vec<String> = r.shards.iter().map(u64::to_string).collect();
        format!(", shard {}/{}", list.join(","), r.shard_count)
    } else {
        String::new()
    };
    let _ = writeln!(out, "Explore {} under {} ({how}{shards})", r.test, r.policy);
    let secs = r.search_ms as f64 / 1000.0;
    let rate = r.made as f64 / secs.max(1e-3);
    match (&r.witness, r.strategy) {
        (Some(w), _) => {
            let _ = writeln!(
                out,
                "Witness in run {} of the search ({} runs, {secs:.1} s, {rate:.1} interleavings/s): {}",
                w.run + 1,
                r.runs,
                w.state
            );
        }
        (None, Strategy::Dfs { bound }) if r.exhausted => {
            let _ = writeln!(
                out,
                "No witness in all {} interleavings with ≤ {bound} preemptions ({secs:.1} s, {rate:.1} interleavings/s)",
                r.runs
            );
        }
        (None, Strategy::Dfs { .. }) => {
            let _ = writeln!(
                out,
                "No witness in {} interleavings; the space was not exhausted (budget or time) ({secs:.1} s)",
                r.runs
            );
        }
        (None, Strategy::Pct { depth }) => {
            let _ = writeln!(
                out,
                "No witness in {} runs ({secs:.1} s, {rate:.1} interleavings/s); a depth-{depth} bug would be found with probability ≥ {:.4} (per run ≥ 1/(n·k^{}) = {:.2e}, n = {} threads, k = {} steps)",
                r.runs,
                r.pct_found().unwrap_or(0.0),
                depth.saturating_sub(1),
                r.pct_per_run().unwrap_or(0.0),
                r.threads,
                r.steps
            );
        }
    }
    if r.interrupted {
        let _ = writeln!(
            out,
            "Interrupted (Ctrl-C): the search ended early; these are its results so far"
        );
    }
    if r.diverged > 0 {
        let _ = writeln!(
            out,
            "Warning: {} runs did not follow their replayed prefix (a thread reached a different point): the search is not exhaustive for them",
            r.diverged
        );
    }
    let _ = writeln!(out, "States ({} runs):", r.runs);
    for (state, n) in &r.histogram {
        let mark = if r.witness.as_ref().is_some_and(|w| &w.state == state) {
            " <- witness"
        } else {
            ""
        };
        let _ = writeln!(out, "{n:>8}  {state}{mark}");
    }
    if let (n @ 1.., Some(why)) = (r.deadlocks, &r.deadlock) {
        let _ = writeln!(
            out,
            "Deadlock: {n} runs ended with every thread waiting, none able to go (e.g. {why})"
        );
    }
    if r.stuck > 0 {
        let _ = writeln!(out, "Stuck: {} runs hit the watchdog", r.stuck);
    }
    for (e, n) in &r.errors {
        let _ = writeln!(out, "Error ({n} runs): {e}");
    }
    if let Some(w) = &r.witness {
        match &w.minimized {
            Some(steps) => {
                let _ = writeln!(
                    out,
                    "Minimized schedule ({} steps from {}, reproduced {}/{}; {:.1} s in all):",
                    steps.len(),
                    w.schedule.len(),
                    w.reproduced,
                    w.replays,
                    r.elapsed_ms as f64 / 1000.0
                );
                out += &schedule_block(steps);
            }
            None => {
                let why = if w.minimize_tried {
                    "as a forced schedule it did not reproduce the witness, so it was not minimized"
                } else {
                    "not minimized"
                };
                let _ = writeln!(out, "The interleaving ({} steps; {why}):", w.schedule.len());
                out += &schedule_block(&w.schedule);
            }
        }
    }
    match (&r.expected, r.met) {
        (Some(e), Some(true)) => {
            let _ = writeln!(out, "Expected {e} under {}: met", r.policy);
        }
        (Some(e), Some(false)) => {
            let _ = writeln!(out, "Expected {e} under {}: NOT met", r.policy);
        }
        _ => {}
    }
    out
}

/// Steps as a `schedule { … }` block to paste into the test.
pub fn schedule_block(steps: &[String]) -> String {
    let mut out = String::from("schedule {\n  ");
    let mut line = 2;
    for (i, s) in steps.iter().enumerate() {
        let piece = if i == 0 { s.clone() } else { format!(" < {s}") };
        if line + piece.len() > 78 && i > 0 {
            out += "\n  <";
            out += &piece[2..];
            line = 2 + piece.len() - 1;
        } else {
            out += &piece;
            line += piece.len();
        }
    }
    out += "\n}\n";
    out
}
