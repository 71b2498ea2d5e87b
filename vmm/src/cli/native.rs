//! `cowlab run TEST --native`, `cowlab suite NAME --native` and `cowlab
//! diff TEST|SUITE`: litmus tests on the host kernel (docs/native.md), and
//! side by side with the `mainline` model.

use std::sync::Arc;
use std::time::Duration;

use super::output::{error, out};
use super::run::{litmus_source, RunOptions};
use super::suite::suite_tests;
use crate::kvm::exit_code;
use crate::litmus::ast::Verdict;
use crate::litmus::{self, builtin, Compiled, LitmusResult};
use crate::native::{self, NativeError, NativeOptions};
use crate::policy::Policy;

/// The policy the model side of `cowlab diff` runs, and whose `expect`
/// line a native run is checked against.
const MODEL_POLICY: &str = native::runner::EXPECT_POLICY;

/// Runs of a test in `suite --native` and `diff` unless `--runs` or its
/// own `runs` line says.
const DEFAULT_RUNS: u64 = 10;

/// A native result as litmus7-style text: labelled with the host kernel
/// instead of a policy; its expectation is the `mainline` one.
pub fn native_text(r: &LitmusResult) -> String {
    let label = &r.policy_name;
    r.text()
        .replacen(
            &format!("(policy {label})"),
            &format!("(native, {label})"),
            1,
        )
        .replacen(
            &format!("Expect {label} "),
            &format!("Expect {MODEL_POLICY} (on the {label} kernel) "),
            1,
        )
        .replace("Unreachable (", "Not run (")
}

/// A native result as JSON: the host kernel instead of the knobs.
pub fn native_json(r: &LitmusResult) -> serde_json::Value {
    let mut v = r.json();
    if let Some(o) = v.as_object_mut() {
        o.remove("knobs");
        o.remove("unreachable");
        o.insert("native".into(), true.into());
        o.insert("expect_policy".into(), MODEL_POLICY.into());
        o.insert(
            "not_run".into(),
            r.unreachable
                .iter()
                .map(|(w, n)| serde_json::json!({"reason": w, "runs": n}))
                .collect::<Vec<_>>()
                .into(),
        );
    }
    v
}

/// What `--native` cannot be combined with, if `opts` has any of it.
fn native_conflict(opts: &RunOptions) -> Option<&'static str> {
    [
        (!opts.inject.is_empty(), "--inject"),
        (opts.schedule.is_some(), "--schedule"),
        (opts.chaos.is_some(), "--chaos"),
        (opts.control.is_some(), "--control"),
        (opts.trace.is_some(), "--trace"),
        (opts.policy != MODEL_POLICY, "--policy"),
        (!opts.set.is_empty(), "--set"),
        (opts.guest.is_some(), "--guest"),
        (opts.check, "--check"),
        (opts.stats, "--stats"),
    ]
    .into_iter()
    .find_map(|(set, flag)| set.then_some(flag))
}

/// A test, read and compiled, with its source.
fn load(what: &str) -> Result<(Arc<Compiled>, String), i32> {
    let src = litmus_source(what).map_err(|e| {
        error(&e);
        e.exit_code()
    })?;
    let compiled = litmus::load(&src).map_err(|e| {
        error(format_args!("{what}:{e}"));
        exit_code::USAGE
    })?;
    Ok((Arc::new(compiled), src))
}

/// `cowlab run TEST --native`.
pub fn run(opts: &RunOptions) -> i32 {
    if let Some(flag) = native_conflict(opts) {
        error(format_args!(
            "--native runs the test on the host kernel as written: it does not take {flag}"
        ));
        return exit_code::USAGE;
    }
    if cowlab_abi::Program::from_name(&opts.program).is_some() {
        error(format_args!(
            "--native runs litmus tests; '{}' is a guest program",
            opts.program
        ));
        return exit_code::USAGE;
    }
    let (compiled, src) = match load(&opts.program) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let native_opts = NativeOptions {
        runs: opts.runs.or(compiled.test.runs).unwrap_or(100).max(1),
        timeout: opts.timeout,
        progress: true,
    };
    match native::run_native(&compiled, &src, &native_opts) {
        Ok(r) => {
            if opts.json {
                out(format_args!("{}\n", native_json(&r)));
            } else {
                out(native_text(&r));
            }
            r.exit_code()
        }
        Err(e) => {
            error(&e);
            e.exit_code()
        }
    }
}

/// The tests `what` names: a suite's, or one test (built-in or a file).
fn targets(what: &str) -> Result<Vec<(String, Arc<Compiled>, String)>, i32> {
    let suite = builtin::suite(what);
    if suite.is_empty() {
        let (c, src) = load(what)?;
        return Ok(vec![(c.test.name.clone(), c, src)]);
    }
    suite
        .into_iter()
        .map(|(name, src)| {
            let c = litmus::load(src).map_err(|e| {
                error(format_args!("{name}:{e}"));
                exit_code::USAGE
            })?;
            Ok((name.to_string(), Arc::new(c), src.to_string()))
        })
        .collect()
}

/// How a native verdict compares with the model's (docs/native.md,
/// "Agreement").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agreement {
    /// The same verdict class, or a model `Sometimes` that hit every
    /// native run (a race is allowed to win every time).
    Agree,
    /// The model says `Sometimes` and no native run showed it: real
    /// timing may never open the window in N runs; not a disagreement,
    /// not a confirmation.
    Unconfirmed,
    Disagree,
}

impl Agreement {
    pub fn of(model: Verdict, native: Verdict) -> Agreement {
        if model.admits(native) {
            Agreement::Agree
        } else if model == Verdict::Sometimes && native == Verdict::Never {
            Agreement::Unconfirmed
        } else {
            Agreement::Disagree
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Agreement::Agree => "yes",
            Agreement::Unconfirmed => "unconfirmed",
            Agreement::Disagree => "NO",
        }
    }
}

/// One row of `cowlab diff`.
struct DiffRow {
    test: String,
    model: Option<Result<LitmusResult, String>>,
    native: Result<LitmusResult, NativeError>,
}

impl DiffRow {
    /// The agreement, when both sides have a verdict from runs without
    /// errors.
    fn agreement(&self) -> Option<Agreement> {
        let (Some(Ok(m)), Ok(n)) = (&self.model, &self.native) else {
            return None;
        };
        if m.errored() > 0 || n.errored() > 0 || m.runs == 0 || n.runs == 0 {
            return None;
        }
        Some(Agreement::of(m.observation, n.observation))
    }

    /// Why the row has no agreement, if it has none.
    fn note(&self) -> Option<String> {
        if self.agreement().is_some() {
            return None;
        }
        Some(match (&self.model, &self.native) {
            (_, Err(NativeError::Refused { why, .. })) => format!("not run natively: {why}"),
            (_, Err(e)) => format!("native: {e}"),
            (Some(Err(e)), _) => format!("model: {e}"),
            (Some(Ok(m)), _) if m.errored() > 0 => format!(
                "model: errors in {} runs: {}",
                m.errored(),
                m.errors.keys().next().map_or("", String::as_str)
            ),
            (_, Ok(n)) if n.errored() > 0 => format!(
                "native: errors in {} runs: {}",
                n.errored(),
                n.errors.keys().next().map_or("", String::as_str)
            ),
            (_, Ok(n)) if n.runs == 0 => format!(
                "no native run is an outcome: {}",
                n.unreachable.keys().next().map_or("", String::as_str)
            ),
            _ => "no verdict".into(),
        })
    }

    /// Whether something failed (not a refusal): exit 3.
    fn failed(&self) -> bool {
        matches!(self.native, Err(NativeError::Start { .. }))
            || matches!(&self.model, Some(Err(_)))
            || matches!(&self.model, Some(Ok(m)) if m.errored() > 0)
            || matches!(&self.native, Ok(n) if n.errored() > 0)
    }
}

fn cell(r: &LitmusResult) -> String {
    format!("{} {}/{}", r.observation.as_str(), r.positive, r.runs)
}

/// `cowlab diff TEST|SUITE`: the `mainline` model and the host kernel,
/// side by side. Exit 1 on a disagreement, 3 if a side could not run, 0
/// otherwise; tests that cannot run natively are listed with the reason.
pub fn diff(
    what: &str,
    runs: Option<u64>,
    timeout: Option<Duration>,
    json: bool,
    kvm_path: &str,
) -> i32 {
    let tests = match targets(what) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let Some(policy) = Policy::preset(MODEL_POLICY) else {
        error(format_args!("no preset '{MODEL_POLICY}'"));
        return exit_code::USAGE;
    };
    let mut rows = Vec::new();
    for (name, compiled, src) in tests {
        let n = runs.or(compiled.test.runs).unwrap_or(DEFAULT_RUNS).max(1);
        if let Some(why) = native::refusal(&compiled.test) {
            rows.push(DiffRow {
                test: name.clone(),
                model: None,
                native: Err(NativeError::Refused { test: name, why }),
            });
            continue;
        }
        let native = native::run_native(
            &compiled,
            &src,
            &NativeOptions {
                runs: n,
                timeout,
                progress: !json,
            },
        );
        let mut model_opts = litmus::RunOptions::plain(n, MODEL_POLICY, policy, kvm_path);
        model_opts.timeout = timeout.unwrap_or(Duration::from_secs(3600));
        let model = match litmus::run_test(&compiled, &model_opts) {
            Err(e) if e.kvm_unusable() => {
                error(&e);
                return e.exit_code();
            }
            r => r.map_err(|e| e.to_string()),
        };
        rows.push(DiffRow {
            test: name,
            model: Some(model),
            native,
        });
    }
    let disagree = rows
        .iter()
        .any(|r| r.agreement() == Some(Agreement::Disagree));
    let failed = rows.iter().any(DiffRow::failed);
    let code = if failed {
        exit_code::VM_ERROR
    } else if disagree {
        exit_code::FAILED
    } else {
        exit_code::OK
    };
    let host = native::host_label();
    if json {
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "test": r.test,
                    "model": r.model.as_ref().map(|m| match m {
                        Ok(m) => m.json(),
                        Err(e) => serde_json::json!({"error": e}),
                    }),
                    "native": match &r.native {
                        Ok(n) => native_json(n),
                        Err(e) => serde_json::json!({
                            "refused": matches!(e, NativeError::Refused { .. }),
                            "reason": e.reason(),
                        }),
                    },
                    "agreement": r.agreement().map(Agreement::as_str),
                    "note": r.note(),
                })
            })
            .collect();
        out(format_args!(
            "{}\n",
            serde_json::json!({
                "target": what, "model_policy": MODEL_POLICY, "host": host,
                "rows": rows, "disagreement": disagree, "failed": failed,
            })
        ));
        return code;
    }
    // The test column as wide as the longest name, so rows line up.
    let w = rows.iter().map(|r| r.test.len()).max().unwrap_or(0).max(30);
    let mut text = format!(
        "{:<w$} {:<20} {:<24} {}\n",
        "test",
        format!("model {MODEL_POLICY}"),
        host,
        "agree?"
    );
    for r in &rows {
        let model = match &r.model {
            Some(Ok(m)) => cell(m),
            Some(Err(_)) => "ERROR".into(),
            None => "-".into(),
        };
        let native = match &r.native {
            Ok(n) => cell(n),
            Err(NativeError::Refused { .. }) => "refused".into(),
            Err(_) => "ERROR".into(),
        };
        let agree = r.agreement().map_or("-", Agreement::as_str);
        text += &format!("{:<w$} {:<20} {:<24} {agree}\n", r.test, model, native);
    }
    for r in &rows {
        if let Some(note) = r.note() {
            text += &format!("{}: {note}\n", r.test);
        }
        if r.agreement() == Some(Agreement::Disagree) {
            for (side, res) in [
                ("model", r.model.as_ref().and_then(|m| m.as_ref().ok())),
                ("native", r.native.as_ref().ok()),
            ] {
                if let Some(res) = res {
                    for (state, (n, w)) in &res.histogram {
                        text += &format!(
                            "{}: {side} {n:<6}{}>{state}\n",
                            r.test,
                            if *w { "*" } else { ":" }
                        );
                    }
                }
            }
        }
    }
    out(text);
    code
}

/// `cowlab suite NAME --native`: each test of the suite once, on the host
/// kernel, against its `mainline` expect line; tests that cannot run
/// natively are listed with the reason.
pub fn suite(name: &str, runs: Option<u64>, timeout: Option<Duration>, json: bool) -> i32 {
    let Some(tests) = suite_tests(name) else {
        return exit_code::USAGE;
    };
    let mut cells = Vec::new();
    for (test, src) in tests {
        let compiled = match litmus::load(src) {
            Ok(c) => c,
            Err(e) => {
                error(format_args!("{test}:{e}"));
                return exit_code::USAGE;
            }
        };
        let n = runs.or(compiled.test.runs).unwrap_or(DEFAULT_RUNS).max(1);
        let r = native::run_native(
            &compiled,
            src,
            &NativeOptions {
                runs: n,
                timeout,
                progress: !json,
            },
        );
        cells.push((test, r));
    }
    let failed = cells.iter().any(|(_, r)| match r {
        Ok(r) => r.errored() > 0,
        Err(e) => matches!(e, NativeError::Start { .. }),
    });
    let all_met = cells
        .iter()
        .all(|(_, r)| r.as_ref().map_or(true, LitmusResult::met));
    let code = if failed {
        exit_code::VM_ERROR
    } else if all_met {
        exit_code::OK
    } else {
        exit_code::FAILED
    };
    let host = native::host_label();
    if json {
        let results: Vec<serde_json::Value> = cells
            .iter()
            .map(|(t, r)| match r {
                Ok(r) => native_json(r),
                Err(e) => serde_json::json!({
                    "test": t,
                    "refused": matches!(e, NativeError::Refused { .. }),
                    "reason": e.reason(),
                }),
            })
            .collect();
        out(format_args!(
            "{}\n",
            serde_json::json!({"suite": name, "host": host, "results": results, "all_met": all_met})
        ));
        return code;
    }
    let mut text = format!(
        "{:<30} {:<24} {:<10} {:<10} {:>9} {:>9} {:>7}  {}\n",
        "test", "kernel", "observed", MODEL_POLICY, "positive", "negative", "errors", ""
    );
    for (t, r) in &cells {
        match r {
            Ok(r) => {
                let status = match (r.met(), r.errored() > 0) {
                    (true, false) => "ok",
                    (false, false) => "NOT MET",
                    (true, true) => "ERRORS",
                    (false, true) => "NOT MET, ERRORS",
                };
                text += &format!(
                    "{:<30} {:<24} {:<10} {:<10} {:>9} {:>9} {:>7}  {status}\n",
                    t,
                    host,
                    r.observation.as_str(),
                    r.expectation.map_or("-", |(v, _)| v.as_str()),
                    r.positive,
                    r.negative,
                    r.errored()
                );
            }
            Err(e) => {
                text += &format!(
                    "{:<30} {:<24} {:<10} {:<10} {:>9} {:>9} {:>7}  {}\n",
                    t,
                    host,
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    if matches!(e, NativeError::Refused { .. }) {
                        "refused"
                    } else {
                        "ERROR"
                    }
                );
            }
        }
    }
    for (t, r) in &cells {
        match r {
            Ok(r) => {
                for (why, n) in &r.unreachable {
                    text += &format!("{t}: {why} ({n} of the runs)\n");
                }
                for (msg, n) in &r.errors {
                    text += &format!("{t}: error in {n} runs: {msg}\n");
                }
            }
            Err(e) => text += &format!("{t}: {}\n", e.reason()),
        }
    }
    out(text);
    code
}

#[cfg(test)]
mod tests {
    use super::Agreement;
    use crate::litmus::ast::Verdict::*;

    #[test]
    fn agreement_is_the_verdict_class_and_a_sometimes_is_never_refuted_by_absence() {
        assert_eq!(Agreement::of(Never, Never), Agreement::Agree);
        assert_eq!(Agreement::of(Always, Always), Agreement::Agree);
        assert_eq!(Agreement::of(Sometimes, Sometimes), Agreement::Agree);
        assert_eq!(Agreement::of(Sometimes, Always), Agreement::Agree);
        assert_eq!(Agreement::of(Sometimes, Never), Agreement::Unconfirmed);
        for (m, n) in [
            (Never, Sometimes),
            (Never, Always),
            (Always, Never),
            (Always, Sometimes),
        ] {
            assert_eq!(Agreement::of(m, n), Agreement::Disagree, "{m:?} {n:?}");
        }
    }
}
