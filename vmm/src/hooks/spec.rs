//! The text forms of rules and schedules, shared by `--inject`,
//! `--schedule`, litmus files and the control socket.
//!
//! - rule: `ACTION@POINT[/FILTER]…` with ACTION `delay=US`, `pause`,
//!   `count`, `fail` or `panic`, and FILTER `vN` (a vCPU), `hit=N` (only
//!   the Nth matching hit), `hits=A-B`, `addr=START-END` (hex or decimal),
//!   `run=N`, `runs=A-B` (only in those runs of a litmus test);
//! - schedule: `vN@POINT < vM@POINT < …`.

use std::fmt;

use super::is_point;

/// A rule or a schedule that does not parse; the messages are what
/// `--inject`, `--schedule`, litmus files and the control socket report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error(
        "unknown injection point '{0}' (see `cowlab list points`; guest hooks are guest:NAME)"
    )]
    UnknownPoint(String),
    #[error("a rule is ACTION@POINT[/FILTER]..., not '{0}'")]
    NotARule(String),
    #[error("unknown action '{0}' (delay=US, pause, count, fail or panic)")]
    UnknownAction(String),
    #[error("bad hit range '{0}'")]
    BadHitRange(String),
    #[error("bad address range '{0}'")]
    BadAddrRange(String),
    #[error("runs are counted from 1, in '{0}'")]
    RunZero(String),
    #[error("bad run range '{0}'")]
    BadRunRange(String),
    #[error("unknown filter '{0}' (vN, hit=N, hits=A-B, addr=START-END, run=N, runs=A-B)")]
    UnknownFilter(String),
    #[error("a schedule orders at least two steps: vN@POINT < vM@POINT")]
    OneStep,
    #[error("a schedule step is vN@POINT, not '{0}'")]
    NotAStep(String),
    #[error("a schedule step names a vCPU as vN, not '{0}'")]
    BadStepVcpu(String),
    #[error("bad address range in '{0}'")]
    BadStepAddrRange(String),
    #[error("hits are counted from 1, in '{0}'")]
    HitZero(String),
    #[error("unknown step filter '{filter}' in '{step}' (addr=START-END, hit=N)")]
    UnknownStepFilter { filter: String, step: String },
}

impl From<SpecError> for String {
    fn from(e: SpecError) -> String {
        e.to_string()
    }
}

/// What a rule does at its point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Wait this many microseconds.
    Delay(u64),
    /// Stop until resumed (a breakpoint).
    Pause,
    /// Only count.
    Count,
    /// Make the operation fail (allocations).
    Fail,
    /// Panic the vCPU thread that hits it: for testing cowlab's own error
    /// handling (the run ends in an `error` state, the others go on).
    Panic,
}

/// A rule at a point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub point: String,
    pub action: Action,
    pub vcpu: Option<usize>,
    /// Inclusive range of matching hits the action applies to (1-based).
    pub hits: Option<(u64, u64)>,
    pub addr: Option<(u64, u64)>,
    /// Inclusive range of the runs (1-based) of a litmus test the rule is
    /// armed in; every run if `None`.
    pub runs: Option<(u64, u64)>,
}

impl Rule {
    pub(super) fn matches_target(&self, run: u64, cpu: Option<usize>, addr: Option<u64>) -> bool {
        self.runs.is_none_or(|(lo, hi)| run >= lo && run <= hi)
            && self.vcpu.is_none_or(|v| cpu == Some(v))
            && self
                .addr
                .is_none_or(|(lo, hi)| addr.is_some_and(|a| a >= lo && a < hi))
    }

    pub(super) fn matches_hit(&self, n: u64) -> bool {
        self.hits.is_none_or(|(lo, hi)| n >= lo && n <= hi)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.action {
            Action::Delay(us) => write!(f, "delay={us}")?,
            Action::Pause => write!(f, "pause")?,
            Action::Count => write!(f, "count")?,
            Action::Fail => write!(f, "fail")?,
            Action::Panic => write!(f, "panic")?,
        }
        write!(f, "@{}", self.point)?;
        if let Some(v) = self.vcpu {
            write!(f, "/v{v}")?;
        }
        match self.hits {
            Some((a, b)) if a == b => write!(f, "/hit={a}")?,
            Some((a, b)) => write!(f, "/hits={a}-{b}")?,
            None => {}
        }
        if let Some((lo, hi)) = self.addr {
            write!(f, "/addr={lo:#x}-{hi:#x}")?;
        }
        match self.runs {
            Some((a, b)) if a == b => write!(f, "/run={a}")?,
            Some((a, b)) => write!(f, "/runs={a}-{b}")?,
            None => {}
        }
        Ok(())
    }
}

/// One event of a schedule: vCPU `vcpu` reaches `point` (about an address
/// in `addr`, if given), the `hit`-th time it does so (any time, if not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub vcpu: usize,
    pub point: String,
    pub addr: Option<(u64, u64)>,
    pub hit: Option<u64>,
}

impl Step {
    /// Whether a hit is one this step counts (its vCPU, point and address).
    pub(super) fn matches(&self, cpu: usize, point: &str, addr: Option<u64>) -> bool {
        self.vcpu == cpu
            && self.point == point
            && self
                .addr
                .is_none_or(|(lo, hi)| addr.is_some_and(|a| a >= lo && a < hi))
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}@{}", self.vcpu, self.point)?;
        if let Some((lo, hi)) = self.addr {
            write!(f, "/addr={lo:#x}-{hi:#x}")?;
        }
        if let Some(n) = self.hit {
            write!(f, "/hit={n}")?;
        }
        Ok(())
    }
}

fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

fn vcpu(s: &str) -> Option<usize> {
    s.strip_prefix('v')?.parse().ok()
}

fn point(p: &str) -> Result<String, SpecError> {
    if is_point(p) {
        Ok(p.to_string())
    } else {
        Err(SpecError::UnknownPoint(p.to_string()))
    }
}

/// Parses a rule (`delay=200@wp_page_copy:after_copy/v1/hit=1`).
pub fn parse_rule(s: &str) -> Result<Rule, SpecError> {
    let s = s.trim();
    let (action, rest) = s
        .split_once('@')
        .ok_or_else(|| SpecError::NotARule(s.to_string()))?;
    let action = match action {
        "pause" => Action::Pause,
        "count" => Action::Count,
        "fail" => Action::Fail,
        "panic" => Action::Panic,
        a => match a.strip_prefix("delay=").and_then(number) {
            Some(us) => Action::Delay(us),
            None => return Err(SpecError::UnknownAction(a.to_string())),
        },
    };
    let mut parts = rest.split('/');
    let point = point(parts.next().unwrap_or(""))?;
    let mut rule = Rule {
        point,
        action,
        vcpu: None,
        hits: None,
        addr: None,
        runs: None,
    };
    for filter in parts {
        if let Some(v) = vcpu(filter) {
            rule.vcpu = Some(v);
        } else if let Some(n) = filter.strip_prefix("hit=").and_then(number) {
            rule.hits = Some((n, n));
        } else if let Some((a, b)) = filter.strip_prefix("hits=").and_then(|r| r.split_once('-')) {
            let (a, b) = number(a)
                .zip(number(b))
                .ok_or_else(|| SpecError::BadHitRange(filter.to_string()))?;
            rule.hits = Some((a, b));
        } else if let Some((a, b)) = filter.strip_prefix("addr=").and_then(|r| r.split_once('-')) {
            let (a, b) = number(a)
                .zip(number(b))
                .ok_or_else(|| SpecError::BadAddrRange(filter.to_string()))?;
            rule.addr = Some((a, b));
        } else if let Some(n) = filter.strip_prefix("run=").and_then(number) {
            if n == 0 {
                return Err(SpecError::RunZero(filter.to_string()));
            }
            rule.runs = Some((n, n));
        } else if let Some((a, b)) = filter.strip_prefix("runs=").and_then(|r| r.split_once('-')) {
            let (a, b) = number(a)
                .zip(number(b))
                .ok_or_else(|| SpecError::BadRunRange(filter.to_string()))?;
            rule.runs = Some((a, b));
        } else {
            return Err(SpecError::UnknownFilter(filter.to_string()));
        }
    }
    Ok(rule)
}

/// Parses a schedule (`v1@fork:after_wrprotect < v2@do_wp_page:enter`).
pub fn parse_schedule(s: &str) -> Result<Vec<Step>, SpecError> {
    let steps = s
        .split('<')
        .map(parse_step)
        .collect::<Result<Vec<_>, _>>()?;
    if steps.len() < 2 {
        return Err(SpecError::OneStep);
    }
    Ok(steps)
}

/// One schedule step: `vN@POINT[/addr=START-END][/hit=N]`.
pub fn parse_step(step: &str) -> Result<Step, SpecError> {
    let step = step.trim();
    let (v, p) = step
        .split_once('@')
        .ok_or_else(|| SpecError::NotAStep(step.to_string()))?;
    let vcpu = vcpu(v).ok_or_else(|| SpecError::BadStepVcpu(v.to_string()))?;
    let mut parts = p.split('/');
    let point = point(parts.next().unwrap_or_default())?;
    let (mut addr, mut hit) = (None, None);
    for filter in parts {
        if let Some(range) = filter.strip_prefix("addr=") {
            let (a, b) = range
                .split_once('-')
                .and_then(|(a, b)| number(a).zip(number(b)))
                .ok_or_else(|| SpecError::BadStepAddrRange(step.to_string()))?;
            addr = Some((a, b));
        } else if let Some(n) = filter.strip_prefix("hit=").and_then(number) {
            if n == 0 {
                return Err(SpecError::HitZero(step.to_string()));
            }
            hit = Some(n);
        } else {
            return Err(SpecError::UnknownStepFilter {
                filter: filter.to_string(),
                step: step.to_string(),
            });
        }
    }
    Ok(Step {
        vcpu,
        point,
        addr,
        hit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_round_trip_and_bad_ones_say_why() {
        for s in [
            "delay=200@wp_page_copy:after_copy/v1/hit=1",
            "pause@guest:x",
            "fail@alloc_page/hits=2-5",
            "count@fault:enter/addr=0x1000-0x2000",
            "panic@fork:enter/v2/hit=1/run=3",
            "fail@alloc_page/runs=2-4",
        ] {
            assert_eq!(parse_rule(s).unwrap().to_string(), s);
        }
        assert!(parse_rule("delay@fork:enter")
            .unwrap_err()
            .to_string()
            .contains("unknown action"));
        assert!(parse_rule("count@nowhere")
            .unwrap_err()
            .to_string()
            .contains("unknown injection point"));
        assert!(parse_rule("count@fork:enter/x9")
            .unwrap_err()
            .to_string()
            .contains("unknown filter"));
        assert!(parse_rule("fork:enter").is_err());
        assert!(parse_rule("panic@fork:enter/run=0")
            .unwrap_err()
            .to_string()
            .contains("counted from 1"));
        assert!(parse_rule("panic@fork:enter/runs=2")
            .unwrap_err()
            .to_string()
            .contains("unknown filter"));
    }

    #[test]
    fn schedules_parse() {
        let s = parse_schedule(
            "v1@fork:after_wrprotect < v2@wp_page_copy:after_copy < v1@fork:before_flush",
        )
        .unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[1],
            Step {
                vcpu: 2,
                point: "wp_page_copy:after_copy".into(),
                addr: None,
                hit: None,
            }
        );
        let s =
            parse_schedule("v0@fork:after_wrprotect/addr=0x1000-0x2000 < v1@fault:enter").unwrap();
        assert_eq!(s[0].addr, Some((0x1000, 0x2000)));
        assert_eq!(
            s[0].to_string(),
            "v0@fork:after_wrprotect/addr=0x1000-0x2000"
        );
        let s =
            parse_schedule("v0@fault:fill/addr=0x1000-0x2000/hit=3 < v1@guest:x/hit=2").unwrap();
        assert_eq!((s[0].hit, s[1].hit), (Some(3), Some(2)));
        assert_eq!(s[0].to_string(), "v0@fault:fill/addr=0x1000-0x2000/hit=3");
        assert!(parse_schedule("v0@guest:x/hit=0 < v1@guest:y")
            .unwrap_err()
            .to_string()
            .contains("counted from 1"));
        assert!(parse_schedule("v0@guest:x/v1 < v1@guest:y")
            .unwrap_err()
            .to_string()
            .contains("unknown step filter"));
        assert!(parse_schedule("v1@fork:enter").is_err());
        assert!(parse_schedule("P1@fork:enter < v0@fork:enter").is_err());
    }
}
