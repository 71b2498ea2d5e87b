//! Names the compiler resolves after parsing: a schedule's threads and
//! regions (to vCPUs and page ranges), and the threads `exists` names.

use std::collections::BTreeMap;

use cowlab_abi::layout::PAGE_SIZE;

use super::{error, PlacedRegion};
use crate::litmus::ast::*;
use crate::litmus::parse::ParseError;

/// Rewrites `Pn@` in a schedule step to `vK@` where Pn is the K-th initial
/// thread (initial threads run on vCPUs 0, 1, … in order; children get the
/// next vCPU ids in the order they are created).
pub(super) fn thread_step(
    step: &str,
    test: &Test,
    regions: &BTreeMap<&str, PlacedRegion>,
    pos: Pos,
) -> Result<String, ParseError> {
    let Some((who, point)) = step.split_once('@') else {
        return error(pos, format!("a schedule step is Pn@POINT, not '{step}'"));
    };
    let v = if who.starts_with('P') {
        let idx = test
            .threads
            .iter()
            .filter(|t| t.name.starts_with('P'))
            .position(|t| t.name == who);
        match idx {
            Some(i) => format!("v{i}"),
            None => {
                return error(
                    pos,
                    format!("schedule names thread {who}, which has no block"),
                )
            }
        }
    } else if who.starts_with('C') {
        return error(
            pos,
            format!(
                "schedule names child {who}: name it by its vCPU (vN: initial threads \
                 first, then children in the order they are created)"
            ),
        );
    } else {
        who.to_string()
    };
    Ok(format!("{v}@{}", region_filter(point, regions, pos)?))
}

/// `POINT[REGION]` → `POINT/addr=START-END` for the region's pages.
pub(super) fn region_filter(
    point: &str,
    regions: &BTreeMap<&str, PlacedRegion>,
    pos: Pos,
) -> Result<String, ParseError> {
    let Some((p, rest)) = point.split_once('[') else {
        return Ok(point.to_string());
    };
    // POINT[REGION] may be followed by filters: POINT[REGION]/hit=N.
    let Some((name, filters)) = rest
        .split_once(']')
        .filter(|(_, f)| f.is_empty() || f.starts_with('/'))
    else {
        return error(pos, format!("expected POINT[REGION], found '{point}'"));
    };
    match regions.get(name) {
        // No overflow: placed regions end below REGION_END.
        Some(r) => Ok(format!(
            "{p}/addr={:#x}-{:#x}{filters}",
            r.addr,
            r.addr + r.pages * PAGE_SIZE
        )),
        None => error(pos, format!("unknown region '{name}' in '{point}'")),
    }
}

/// Every thread the exists clause names must exist.
pub(super) fn check_exists(cond: &Cond, test: &Test) -> Result<(), ParseError> {
    let known = |t: &str| test.threads.iter().any(|th| th.name == t);
    let pos = Pos { line: 1, col: 1 };
    match cond {
        Cond::And(terms) | Cond::Or(terms) => terms.iter().try_for_each(|c| check_exists(c, test)),
        Cond::Not(a) => check_exists(a, test),
        Cond::Status { thread, .. } if !known(thread) => error(
            pos,
            format!("exists names thread {thread}, which has no block"),
        ),
        Cond::Cmp(l, _, r) => [l, r].iter().try_for_each(|v| match v {
            Value::Reg { thread, .. } if !known(thread) => error(
                pos,
                format!("exists names thread {thread}, which has no block"),
            ),
            _ => Ok(()),
        }),
        _ => Ok(()),
    }
}
