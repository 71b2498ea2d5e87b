//! The verdict of runs: whether `exists` holds in a run's final state,
//! the histogram key of a state, and the observation over many runs
//! against the test's `expect` line (litmus7's Never/Sometimes/Always).
//! No VM here: each function takes states and counts, so each is tested
//! with made-up ones below.

use std::collections::BTreeMap;

use super::ast::{CmpOp, Cond, Expect, Status, Value, Verdict};

/// How one thread of one run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThreadEnd {
    Ok([u64; cowlab_abi::bytecode::NR_REGS]),
    Status(Status, &'static str),
}

/// The threads of one run, by name.
pub type RunState = BTreeMap<String, ThreadEnd>;

fn value(state: &RunState, v: &Value) -> Option<u64> {
    match v {
        Value::Imm(n) => Some(*n),
        Value::Reg { thread, reg } => match state.get(thread)? {
            ThreadEnd::Ok(regs) => Some(regs[*reg as usize]),
            ThreadEnd::Status(..) => None,
        },
    }
}

/// Whether `cond` holds in `state`. A register of a thread that did not
/// finish has no value: comparisons with it are false. (Recursive only
/// through '(' and '~', whose depth the parser limits.)
pub fn holds(cond: &Cond, state: &RunState) -> bool {
    match cond {
        Cond::True => true,
        Cond::And(terms) => terms.iter().all(|c| holds(c, state)),
        Cond::Or(terms) => terms.iter().any(|c| holds(c, state)),
        Cond::Not(a) => !holds(a, state),
        Cond::Status { thread, status } => match (state.get(thread), status) {
            (Some(ThreadEnd::Ok(_)), Status::Ok) => true,
            (Some(ThreadEnd::Status(s, _)), want) => s == want,
            _ => false,
        },
        Cond::Cmp(l, op, r) => match (value(state, l), value(state, r)) {
            (Some(l), Some(r)) => match op {
                CmpOp::Eq => l == r,
                CmpOp::Ne => l != r,
                CmpOp::Lt => l < r,
                CmpOp::Le => l <= r,
                CmpOp::Gt => l > r,
                CmpOp::Ge => l >= r,
            },
            _ => false,
        },
    }
}

/// The (thread, register) pairs and threads the condition names, in order.
fn named(cond: &Cond, regs: &mut Vec<(String, u8)>, threads: &mut Vec<String>) {
    let add_thread = |t: &String, threads: &mut Vec<String>| {
        if !threads.contains(t) {
            threads.push(t.clone());
        }
    };
    match cond {
        Cond::And(terms) | Cond::Or(terms) => {
            for c in terms {
                named(c, regs, threads);
            }
        }
        Cond::Not(a) => named(a, regs, threads),
        Cond::Status { thread, .. } => add_thread(thread, threads),
        Cond::Cmp(l, _, r) => {
            for v in [l, r] {
                if let Value::Reg { thread, reg } = v {
                    add_thread(thread, threads);
                    if !regs.contains(&(thread.clone(), *reg)) {
                        regs.push((thread.clone(), *reg));
                    }
                }
            }
        }
        Cond::True => {}
    }
}

/// The histogram key of a state: the named registers, or the way a
/// named thread ended if it did not finish.
pub fn key(cond: &Cond, state: &RunState) -> String {
    let (mut regs, mut threads) = (Vec::new(), Vec::new());
    named(cond, &mut regs, &mut threads);
    let mut parts = Vec::new();
    for t in &threads {
        match state.get(t) {
            Some(ThreadEnd::Ok(r)) => {
                for (_, reg) in regs.iter().filter(|(th, _)| th == t) {
                    parts.push(format!("{t}:r{reg}={}", fmt_value(r[*reg as usize])));
                }
                if !regs.iter().any(|(th, _)| th == t) {
                    parts.push(format!("{t}:ok"));
                }
            }
            Some(ThreadEnd::Status(_, what)) => parts.push(format!("{t}:{what}")),
            None => parts.push(format!("{t}:absent")),
        }
    }
    parts.join("; ") + ";"
}

/// Small numbers in decimal, the rest (addresses, patterns) in hex.
fn fmt_value(v: u64) -> String {
    if v >= 16 {
        format!("{v:#x}")
    } else {
        v.to_string()
    }
}

/// The observation of `positive` witnesses and `negative` other runs that
/// finished (runs in error are neither), and whether it meets the last
/// `expect` line for `policy`. With no run finished (`quit` before the
/// first, a spent time budget) nothing is checked.
pub fn observe(
    expects: &[Expect],
    policy: &str,
    positive: u64,
    negative: u64,
) -> (Verdict, Option<(Verdict, bool)>) {
    let observation = match (positive, negative) {
        (0, _) => Verdict::Never,
        (_, 0) => Verdict::Always,
        _ => Verdict::Sometimes,
    };
    let expectation = expects
        .iter()
        .rev()
        .find(|e| e.policy == policy)
        .filter(|_| positive + negative > 0)
        .map(|e| (e.verdict, e.verdict.admits(observation)));
    (observation, expectation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::litmus::ast::Pos;
    use crate::litmus::parse;

    /// The exists clause of a one-thread test with condition `cond`.
    fn exists(cond: &str) -> Cond {
        parse(&format!("cowlab t\nP0 {{ }}\nC0 {{ }}\nexists ({cond})\n"))
            .unwrap()
            .exists
    }

    fn regs(r1: u64, r2: u64) -> ThreadEnd {
        let mut r = [0; cowlab_abi::bytecode::NR_REGS];
        (r[1], r[2]) = (r1, r2);
        ThreadEnd::Ok(r)
    }

    fn state(ends: &[(&str, ThreadEnd)]) -> RunState {
        ends.iter()
            .map(|(t, e)| (t.to_string(), e.clone()))
            .collect()
    }

    #[test]
    fn a_register_of_a_thread_that_did_not_finish_has_no_value() {
        let c = exists("P0:r1 = 0 \\/ P0:r1 != 0");
        assert!(holds(&c, &state(&[("P0", regs(0, 0))])));
        let crashed = ThreadEnd::Status(Status::Crashed, "stuck");
        assert!(!holds(&c, &state(&[("P0", crashed.clone())])));
        assert!(holds(&exists("~(P0:r1 = 0)"), &state(&[("P0", crashed)])));
        assert!(!holds(&c, &state(&[])), "an absent thread");
    }

    #[test]
    fn status_atoms_and_comparisons_combine() {
        let s = state(&[
            ("P0", regs(1, 20)),
            ("C0", ThreadEnd::Status(Status::Segv, "segv")),
        ]);
        assert!(holds(&exists("P0:r1 = 1 /\\ P0:r2 > 16 /\\ C0:segv"), &s));
        assert!(!holds(&exists("P0:r1 = 1 /\\ C0:ok"), &s));
        assert!(holds(
            &exists("P0:r2 >= 20 /\\ P0:r2 <= 20 /\\ P0:r1 < P0:r2"),
            &s
        ));
    }

    #[test]
    fn the_key_names_registers_in_order_and_how_unfinished_threads_ended() {
        let c = exists("P0:r2 = 1 /\\ P0:r1 = 0 /\\ C0:r1 = 3");
        let s = state(&[
            ("P0", regs(0, 0x1000)),
            ("C0", ThreadEnd::Status(Status::Oom, "oom")),
        ]);
        assert_eq!(key(&c, &s), "P0:r2=0x1000; P0:r1=0; C0:oom;");
        assert_eq!(
            key(&c, &state(&[("P0", regs(0, 1))])),
            "P0:r2=1; P0:r1=0; C0:absent;"
        );
        assert_eq!(
            key(&exists("C0:ok"), &state(&[("C0", regs(0, 0))])),
            "C0:ok;"
        );
    }

    fn expect(policy: &str, verdict: Verdict) -> Expect {
        Expect {
            policy: policy.into(),
            verdict,
            pos: Pos { line: 1, col: 1 },
        }
    }

    #[test]
    fn the_observation_meets_the_last_expect_line_of_the_policy() {
        use Verdict::*;
        let expects = [
            expect("linux-6.4", Never),
            expect("mainline", Never),
            expect("linux-6.4", Sometimes),
        ];
        assert_eq!(
            observe(&expects, "linux-6.4", 0, 5),
            (Never, Some((Sometimes, false)))
        );
        assert_eq!(
            observe(&expects, "linux-6.4", 2, 3),
            (Sometimes, Some((Sometimes, true)))
        );
        // Sometimes admits Always (every run a witness).
        assert_eq!(
            observe(&expects, "linux-6.4", 5, 0),
            (Always, Some((Sometimes, true)))
        );
        assert_eq!(
            observe(&expects, "mainline", 1, 9),
            (Sometimes, Some((Never, false)))
        );
        assert_eq!(observe(&expects, "linux-5.7", 1, 9), (Sometimes, None));
        // No run finished: nothing to check.
        assert_eq!(observe(&expects, "mainline", 0, 0).1, None);
    }
}
