//! From a parsed test to bytecode (`cowlab_abi::bytecode`), the regions to
//! map, and the threads to start; with the checks that need the whole test
//! (unknown regions, children, events).

use std::collections::BTreeMap;
use std::sync::Arc;

use cowlab_abi::bytecode::{Insn, Op, LOOP_COUNTERS, SCRATCH};
use cowlab_abi::gup;
use cowlab_abi::layout::{LITMUS_SIZE, PAGE_SIZE};

use super::ast::*;
use super::parse::{ParseError, MAX_USER_REG};
use crate::hooks::{parse_rule, parse_step, Rule, Step};
use crate::kvm::{BootPlan, PlanRegion};
use names::{check_exists, region_filter, thread_step};

mod names;

/// Where the first region is mapped; the others follow with a guard page.
pub const REGION_BASE: u64 = 0x10_0000_0000;

/// Where the regions must end, each with the guard page after it: the top
/// of the `mmap` area, below the thread stacks ([`crate::mm::mm_struct::MMAP_BASE`]).
pub const REGION_END: u64 = crate::mm::mm_struct::MMAP_BASE;

/// Most pages the regions of a test may have in all, with one guard page
/// each (0x7df0_0000_0000 bytes, about 126 TiB).
pub const MAX_REGION_PAGES: u64 = (REGION_END - REGION_BASE) / PAGE_SIZE;

/// Most events a test may name: the words of the shared page but the last
/// (`bytecode::SLEEPERS_WORD`).
const MAX_EVENTS: usize = cowlab_abi::bytecode::SLEEPERS_WORD as usize;

/// A region placed in the address space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedRegion {
    pub name: String,
    pub addr: u64,
    pub pages: u64,
    pub prot: Prot,
    pub populate: bool,
}

/// A compiled test, ready to load into a VM.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub test: Test,
    pub code: Vec<Insn>,
    pub regions: Vec<PlacedRegion>,
    /// The initial threads (P*) and the pc each starts at.
    pub initial: Vec<(String, u64)>,
    /// Thread names by start pc (initial threads, fork children, spawned).
    pub names: BTreeMap<u64, String>,
    /// Hook names by id.
    pub hooks: Vec<String>,
    /// The test's `inject` rules and `schedule`.
    pub rules: Vec<Rule>,
    pub schedule: Vec<Step>,
    /// What the VM loads and starts: the code, regions, initial threads'
    /// pcs and hook names above, as the kvm layer takes them.
    pub plan: Arc<BootPlan>,
}

fn error<T>(pos: Pos, msg: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError {
        pos,
        msg: msg.into(),
    })
}

struct Compiler<'t> {
    test: &'t Test,
    code: Vec<Insn>,
    regions: BTreeMap<&'t str, PlacedRegion>,
    events: BTreeMap<String, u64>,
    hooks: Vec<String>,
    /// Jumps to thread starts to patch: (insn index, thread name, pos).
    fixups: Vec<(usize, String, Pos)>,
    /// Per thread being compiled: next hidden register (downwards), and
    /// the registers holding fork results by child name.
    next_hidden: u8,
    children: BTreeMap<String, u8>,
    /// For exploration: a hook before every `await`, so the explorer knows
    /// which event a waiting thread needs (hooks::AWAIT_HOOK).
    await_hooks: bool,
    /// Under a schedule: `await`s that sleep in the VMM after a short spin
    /// (`bytecode::AWAIT_MAY_SLEEP`).
    sleeping_awaits: bool,
}

impl<'t> Compiler<'t> {
    fn emit(&mut self, op: Op, a: u8, b: u8, c: u8, imm: u64) -> usize {
        self.code.push(Insn::new(op, a, b, c, imm));
        self.code.len() - 1
    }

    fn hidden(&mut self, pos: Pos) -> Result<u8, ParseError> {
        if self.next_hidden <= MAX_USER_REG {
            return error(
                pos,
                "too many nested loops, forks and waits for the hidden registers (r10 to r14)",
            );
        }
        let r = self.next_hidden;
        self.next_hidden -= 1;
        Ok(r)
    }

    fn region(&self, name: &str, pos: Pos) -> Result<&PlacedRegion, ParseError> {
        self.regions.get(name).map_or_else(
            || {
                let known: Vec<&str> = self.regions.keys().copied().collect();
                error(
                    pos,
                    format!(
                        "unknown region '{name}' (regions: {})",
                        if known.is_empty() {
                            "none".into()
                        } else {
                            known.join(", ")
                        }
                    ),
                )
            },
            Ok,
        )
    }

    /// The id of hook `name`, numbered in order of first use.
    fn hook_id(&mut self, name: &str) -> u64 {
        let id = match self.hooks.iter().position(|h| h == name) {
            Some(i) => i,
            None => {
                self.hooks.push(name.to_string());
                self.hooks.len() - 1
            }
        };
        id as u64
    }

    fn event(&mut self, name: &str, pos: Pos) -> Result<u64, ParseError> {
        let n = self.events.len() as u64;
        let id = *self.events.entry(name.to_string()).or_insert(n);
        if self.events.len() > MAX_EVENTS {
            return error(pos, format!("more than {MAX_EVENTS} events"));
        }
        Ok(id)
    }

    /// Puts `o` in a register: itself, or `scratch` loaded with it.
    fn operand(&mut self, o: &Operand, scratch: u8) -> Result<u8, ParseError> {
        Ok(match o {
            Operand::Reg(r) => *r,
            Operand::Imm(v) => {
                self.emit(Op::Li, scratch, 0, 0, *v);
                scratch
            }
            Operand::Region(name, pos) => {
                let addr = self.region(name, *pos)?.addr;
                self.emit(Op::Li, scratch, 0, 0, addr);
                scratch
            }
        })
    }

    /// Puts `o` in a register other than SCRATCH: itself, or a hidden
    /// register used only by the next instruction.
    fn temp(&mut self, o: &Operand, pos: Pos) -> Result<u8, ParseError> {
        match o {
            Operand::Reg(r) => Ok(*r),
            other => {
                let tmp = self.hidden(pos)?;
                self.next_hidden += 1;
                self.operand(other, tmp)
            }
        }
    }

    /// A memory word as (base register, byte offset); may use SCRATCH.
    fn mem(&mut self, m: &Mem) -> Result<(u8, u64), ParseError> {
        match m {
            Mem::Deref { reg, offset } => Ok((*reg, *offset)),
            Mem::Region { name, index, pos } => {
                let r = self.region(name, *pos)?.clone();
                match index {
                    Operand::Imm(i) => {
                        // No overflow: placed regions are below REGION_END.
                        let words = r.pages * (PAGE_SIZE / 8);
                        if *i >= words {
                            return error(
                                *pos,
                                format!("word {i} is outside region '{name}' ({words} words)"),
                            );
                        }
                        self.emit(Op::Li, SCRATCH, 0, 0, r.addr);
                        Ok((SCRATCH, i * 8))
                    }
                    Operand::Reg(i) => {
                        // SCRATCH = base + 8 * i
                        self.emit(Op::Li, SCRATCH, 0, 0, 8);
                        self.emit(Op::Mul, SCRATCH, *i, SCRATCH, 0);
                        self.emit(Op::Addi, SCRATCH, SCRATCH, 0, r.addr);
                        Ok((SCRATCH, 0))
                    }
                    Operand::Region(..) => {
                        error(*pos, "a region index must be a number or a register")
                    }
                }
            }
        }
    }

    fn thread_ref(&mut self, name: &str, pos: Pos, insn: usize) -> Result<(), ParseError> {
        if !self.test.threads.iter().any(|t| t.name == name) {
            return error(pos, format!("no block for thread '{name}'"));
        }
        self.fixups.push((insn, name.to_string(), pos));
        Ok(())
    }

    fn body(&mut self, body: &[Stmt]) -> Result<(), ParseError> {
        body.iter().try_for_each(|s| self.stmt(s))
    }

    fn stmt(&mut self, s: &Stmt) -> Result<(), ParseError> {
        let pos = s.pos;
        match &s.kind {
            StmtKind::Assign { dst, expr } => match expr {
                Expr::Operand(o) => {
                    let r = self.operand(o, *dst)?;
                    if r != *dst {
                        self.emit(Op::Mov, *dst, r, 0, 0);
                    }
                }
                Expr::Binary(l, op, r) => {
                    let lr = self.operand(l, SCRATCH)?;
                    let op = match op {
                        BinOp::Add => Op::Add,
                        BinOp::Sub => Op::Sub,
                        BinOp::Mul => Op::Mul,
                        BinOp::Div => Op::Div,
                        BinOp::Rem => Op::Rem,
                        BinOp::And => Op::And,
                        BinOp::Or => Op::Or,
                        BinOp::Xor => Op::Xor,
                        BinOp::Eq => Op::Eq,
                        BinOp::Ne => Op::Ne,
                        BinOp::Lt => Op::Lt,
                    };
                    if let (Op::Add, Operand::Imm(v)) = (op, r) {
                        self.emit(Op::Addi, *dst, lr, 0, *v);
                    } else {
                        let rr = self.temp(r, pos)?;
                        self.emit(op, *dst, lr, rr, 0);
                    }
                }
                Expr::Load(m) => {
                    let (base, off) = self.mem(m)?;
                    self.emit(Op::Load, *dst, base, 0, off);
                }
            },
            StmtKind::Store { mem, value } => {
                let (base, off) = self.mem(mem)?;
                // The value must not clobber SCRATCH when the address is in it.
                let v = self.temp(value, pos)?;
                self.emit(Op::Store, v, base, 0, off);
            }
            StmtKind::Loop { count, body } => {
                let counter = self.hidden(pos)?;
                self.emit(Op::Li, counter, 0, 0, *count);
                let skip = self.emit(Op::Jz, counter, 0, 0, 0);
                let top = self.code.len();
                self.body(body)?;
                self.emit(Op::Addi, counter, counter, 0, u64::MAX);
                self.emit(Op::Jnz, counter, 0, 0, top as u64);
                self.code[skip].imm = self.code.len() as u64;
                self.next_hidden += 1;
            }
            StmtKind::LoopUntil { event, body } => {
                let ev = self.event(event, pos)?;
                let flag = self.hidden(pos)?;
                let top = self.code.len();
                self.emit(Op::Poll, flag, 0, 0, ev);
                let exit = self.emit(Op::Jnz, flag, 0, 0, 0);
                self.body(body)?;
                self.emit(Op::Jmp, 0, 0, 0, top as u64);
                self.code[exit].imm = self.code.len() as u64;
                self.next_hidden += 1;
            }
            StmtKind::Signal(e) => {
                let ev = self.event(e, pos)?;
                self.emit(Op::Signal, 0, 0, 0, ev);
            }
            StmtKind::Await(e) => {
                let ev = self.event(e, pos)?;
                if self.await_hooks {
                    let id = self.hook_id(&format!("{}{ev}:{e}", crate::hooks::AWAIT_HOOK));
                    self.emit(Op::Hook, 0, 0, 0, id);
                }
                let c = if self.sleeping_awaits {
                    cowlab_abi::bytecode::AWAIT_MAY_SLEEP
                } else {
                    0
                };
                self.emit(Op::Await, 0, 0, c, ev);
            }
            StmtKind::Fill { region, value } => {
                let r = self.region(region, pos)?.clone();
                let v = self.temp(value, pos)?;
                self.emit(Op::Li, SCRATCH, 0, 0, r.addr);
                self.emit(Op::Fill, v, SCRATCH, 0, r.pages);
            }
            StmtKind::Compare { dst, region, value } => {
                let r = self.region(region, pos)?.clone();
                let v = self.operand(value, *dst)?;
                self.emit(Op::Li, SCRATCH, 0, 0, r.addr);
                self.emit(Op::Cmp, *dst, SCRATCH, v, r.pages);
            }
            StmtKind::Mmap { dst, pages, prot } => {
                self.emit(Op::Mmap, *dst, 0, prot.bits() as u8, *pages);
            }
            StmtKind::Munmap { addr, pages } => {
                let a = self.operand(addr, SCRATCH)?;
                self.emit(Op::Munmap, a, SCRATCH, 0, *pages);
            }
            StmtKind::Mprotect { addr, pages, prot } => {
                let a = self.operand(addr, SCRATCH)?;
                self.emit(Op::Mprotect, a, SCRATCH, prot.bits() as u8, *pages);
            }
            StmtKind::Madvise {
                addr,
                pages,
                advice,
            } => {
                let a = self.operand(addr, SCRATCH)?;
                self.emit(Op::Madvise, a, SCRATCH, advice.code(), *pages);
            }
            StmtKind::Mremap {
                dst,
                addr,
                old_pages,
                new_pages,
                maymove,
                fixed,
                dontunmap,
            } => {
                use cowlab_abi::bytecode::mremap_imm;
                use cowlab_abi::mremap as f;
                if *old_pages > mremap_imm::MAX_PAGES || *new_pages > mremap_imm::MAX_PAGES {
                    return error(
                        pos,
                        format!("mremap takes at most {} pages", mremap_imm::MAX_PAGES),
                    );
                }
                let new_addr = match fixed {
                    Some(b) => self.temp(b, pos)?,
                    None => 0,
                };
                let a = self.operand(addr, SCRATCH)?;
                let flag = |on: bool, bit: u64| if on { bit } else { 0 };
                let flags = flag(*maymove, f::MAYMOVE)
                    | flag(fixed.is_some(), f::FIXED)
                    | flag(*dontunmap, f::DONTUNMAP);
                let imm = mremap_imm::pack(*old_pages, *new_pages, flags);
                self.emit(Op::Mremap, a, *dst, new_addr, imm);
            }
            StmtKind::Fork { dst, child } => {
                if !child.starts_with('C') {
                    return error(pos, format!("fork starts a C block, not '{child}'"));
                }
                let r = match dst {
                    Some(r) => *r,
                    None => self.hidden(pos)?,
                };
                self.children.insert(child.clone(), r);
                let at = self.emit(Op::Fork, r, 0, 0, 0);
                self.thread_ref(child, pos, at)?;
            }
            StmtKind::Wait { dst, target } => {
                let who = match target {
                    WaitTarget::Reg(r) => *r,
                    WaitTarget::Child(c) => match self.children.get(c) {
                        Some(r) => *r,
                        None => {
                            return error(
                                pos,
                                format!("wait {c}: this thread has not forked {c} before"),
                            )
                        }
                    },
                };
                let d = dst.unwrap_or(SCRATCH);
                self.emit(Op::Wait, d, who, 0, 0);
            }
            StmtKind::Exit(status) => {
                self.emit(Op::Exit, 0, 0, 0, *status);
            }
            StmtKind::Spawn { dst, thread } => {
                let r = dst.unwrap_or(SCRATCH);
                let at = self.emit(Op::Spawn, r, 0, 0, 0);
                self.thread_ref(thread, pos, at)?;
            }
            StmtKind::Pin { dst, addr, flags } => {
                let a = self.operand(addr, SCRATCH)?;
                let mut f = 0;
                if flags.write {
                    f |= gup::WRITE;
                }
                if !flags.get {
                    f |= gup::PIN;
                }
                if flags.longterm {
                    f |= gup::LONGTERM;
                }
                if flags.fast {
                    f |= gup::FAST;
                }
                self.emit(Op::Pin, *dst, a, f as u8, 0);
            }
            StmtKind::Unpin(r) => {
                self.emit(Op::Unpin, *r, 0, 0, 0);
            }
            StmtKind::DmaRead { dst, pin, offset } => {
                self.emit(Op::DmaRead, *dst, *pin, 0, *offset);
            }
            StmtKind::DmaWrite { pin, offset, value } => {
                let v = self.operand(value, SCRATCH)?;
                self.emit(Op::DmaWrite, v, *pin, 0, *offset);
            }
            StmtKind::UffdRegister { addr, pages } => {
                let a = self.operand(addr, SCRATCH)?;
                self.emit(Op::UffdRegister, a, 0, 0, *pages);
            }
            StmtKind::UffdWp { addr, pages, on } => {
                let a = self.operand(addr, SCRATCH)?;
                self.emit(Op::UffdWp, a, 0, u8::from(*on), *pages);
            }
            StmtKind::UffdResolve { dst } => {
                self.emit(Op::UffdResolve, dst.unwrap_or(SCRATCH), 0, 0, 0);
            }
            StmtKind::Hook(name) => {
                let id = self.hook_id(name);
                self.emit(Op::Hook, 0, 0, 0, id);
            }
            StmtKind::Pause(n) => {
                self.emit(Op::Pause, 0, 0, 0, *n);
            }
        }
        Ok(())
    }
}

/// Places the regions from [`REGION_BASE`], one guard page apart, each
/// with checked arithmetic: they must end by [`REGION_END`].
fn place_regions(test: &Test) -> Result<BTreeMap<&str, PlacedRegion>, ParseError> {
    let mut regions = BTreeMap::new();
    let mut next = REGION_BASE;
    for r in &test.regions {
        if regions.contains_key(r.name.as_str()) {
            return error(r.pos, format!("region '{}' is defined twice", r.name));
        }
        let end = r
            .pages
            .checked_add(1)
            .and_then(|p| p.checked_mul(PAGE_SIZE))
            .and_then(|len| next.checked_add(len))
            .filter(|end| *end <= REGION_END);
        let Some(end) = end else {
            let before = (next - REGION_BASE) / PAGE_SIZE;
            return error(
                r.pos,
                format!(
                    "region '{}' of {} pages does not fit: a test's regions have at most \
                     {MAX_REGION_PAGES} pages in all, counting a guard page after each{}",
                    r.name,
                    r.pages,
                    if before > 0 {
                        format!(" ({before} before this one)")
                    } else {
                        String::new()
                    }
                ),
            );
        };
        let placed = PlacedRegion {
            name: r.name.clone(),
            addr: next,
            pages: r.pages,
            prot: r.prot,
            populate: r.populate,
        };
        next = end;
        regions.insert(r.name.as_str(), placed);
    }
    Ok(regions)
}

/// Compiles `test`.
pub fn compile(test: &Test) -> Result<Compiled, ParseError> {
    compile_with(test, false, false)
}

/// Compiles `test` for `cowlab explore`: as [`compile`], with a guest hook
/// `await:WORD:EVENT` before every `await` (docs/exploration.md).
pub fn compile_for_explore(test: &Test) -> Result<Compiled, ParseError> {
    compile_with(test, true, false)
}

/// Compiles `test` to run under a schedule: as [`compile_for_explore`],
/// and every `await` sleeps in the VMM once a short spin has not seen its
/// event (docs/performance.md, "Awaits under a schedule"). Free-running
/// tests keep spinning awaits: their timing is part of what they test.
pub fn compile_for_schedule(test: &Test) -> Result<Compiled, ParseError> {
    compile_with(test, true, true)
}

fn compile_with(
    test: &Test,
    await_hooks: bool,
    sleeping_awaits: bool,
) -> Result<Compiled, ParseError> {
    let regions = place_regions(test)?;
    let mut c = Compiler {
        test,
        code: Vec::new(),
        regions,
        events: BTreeMap::new(),
        hooks: Vec::new(),
        fixups: Vec::new(),
        next_hidden: LOOP_COUNTERS,
        children: BTreeMap::new(),
        await_hooks,
        sleeping_awaits,
    };
    let mut starts = BTreeMap::new();
    for t in &test.threads {
        starts.insert(t.name.clone(), c.code.len() as u64);
        c.next_hidden = LOOP_COUNTERS;
        c.children.clear();
        c.body(&t.body)?;
        c.emit(Op::Halt, 0, 0, 0, 0);
    }
    for (at, name, _) in std::mem::take(&mut c.fixups) {
        c.code[at].imm = starts[&name];
    }
    check_exists(&test.exists, test)?;
    let max = ((LITMUS_SIZE - 16) / 16) as usize;
    if c.code.len() > max {
        return error(
            Pos { line: 1, col: 1 },
            format!(
                "the test compiles to {} instructions; at most {max} fit",
                c.code.len()
            ),
        );
    }
    let initial: Vec<(String, u64)> = test
        .threads
        .iter()
        .filter(|t| t.name.starts_with('P'))
        .map(|t| (t.name.clone(), starts[&t.name]))
        .collect();
    let names = starts.iter().map(|(n, pc)| (*pc, n.clone())).collect();
    let rules = test
        .injects
        .iter()
        .map(|(r, pos)| {
            let (head, filters) = r.split_once('/').map_or((r.as_str(), ""), |(h, f)| (h, f));
            let (action, point) = head.split_once('@').unwrap_or((head, ""));
            let point = region_filter(point, &c.regions, *pos)?;
            let text = if filters.is_empty() {
                format!("{action}@{point}")
            } else {
                format!("{action}@{point}/{filters}")
            };
            parse_rule(&text).or_else(|e| error(*pos, e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let schedule = match &test.schedule {
        Some((steps, pos)) => {
            let steps = steps
                .iter()
                .map(|(s, at)| {
                    let step = thread_step(s, test, &c.regions, *at)?;
                    parse_step(&step).or_else(|e| error(*at, e))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if steps.len() < 2 {
                return error(
                    *pos,
                    "a schedule orders at least two steps: Pn@POINT < Pm@POINT",
                );
            }
            steps
        }
        None => Vec::new(),
    };
    let regions: Vec<PlacedRegion> = c.regions.into_values().collect();
    let plan = Arc::new(BootPlan {
        code: c.code.clone(),
        regions: regions
            .iter()
            .map(|r| PlanRegion {
                name: r.name.clone(),
                addr: r.addr,
                pages: r.pages,
                prot: r.prot.bits(),
                populate: r.populate,
            })
            .collect(),
        threads: initial.iter().map(|(_, pc)| *pc).collect(),
        hooks: c.hooks.clone(),
    });
    Ok(Compiled {
        test: test.clone(),
        code: c.code,
        regions,
        initial,
        names,
        hooks: c.hooks,
        rules,
        schedule,
        plan,
    })
}

#[cfg(test)]
mod tests;
