//! Thread blocks, statements and the initial regions.

use super::lexer::*;
use super::{ParseError, R};
use crate::litmus::ast::*;

impl Parser<'_> {
    pub(super) fn reg(&mut self) -> R<u8> {
        let (w, pos) = self.word("a register")?;
        parse_reg(&w, pos)
    }

    pub(super) fn prot(&mut self) -> R<Prot> {
        let (w, pos) = self.word("a protection (rw, r or none)")?;
        match w.as_str() {
            "rw" => Ok(Prot::ReadWrite),
            "r" => Ok(Prot::Read),
            "none" => Ok(Prot::None),
            _ => Err(ParseError {
                pos,
                msg: format!("expected a protection (rw, r or none), found '{w}'"),
            }),
        }
    }

    /// The optional advice word after `madvise A PAGES` (else `dontneed`).
    fn advice(&mut self) -> Advice {
        let found = self.peek_word().and_then(|w| {
            Advice::NAMES
                .iter()
                .find(|(name, _)| *name == w)
                .map(|(_, a)| *a)
        });
        match found {
            Some(a) => {
                let _ = self.word("an advice");
                a
            }
            None => Advice::DontNeed,
        }
    }

    /// `A OLD NEW [maymove] [fixed B] [dontunmap]` after `rN = mremap`:
    /// the options in any order, each at most once.
    fn mremap(&mut self, dst: u8) -> R<StmtKind> {
        let addr = self.operand()?;
        let old_pages = self.number("a number of pages")?;
        let new_pages = self.number("a number of pages")?;
        let (mut maymove, mut fixed, mut dontunmap) = (false, None, false);
        while let Some(w) = self
            .peek_word()
            .filter(|w| ["maymove", "fixed", "dontunmap"].contains(&w.as_str()))
        {
            let (_, pos) = self.word("an mremap flag")?;
            let again = match w.as_str() {
                "maymove" => std::mem::replace(&mut maymove, true),
                "dontunmap" => std::mem::replace(&mut dontunmap, true),
                _ => fixed.replace(self.operand()?).is_some(),
            };
            if again {
                return Err(ParseError {
                    pos,
                    msg: format!("'{w}' given twice"),
                });
            }
        }
        Ok(StmtKind::Mremap {
            dst,
            addr,
            old_pages,
            new_pages,
            maymove,
            fixed,
            dontunmap,
        })
    }

    /// A register, a number, or a region name.
    pub(super) fn operand(&mut self) -> R<Operand> {
        let (w, pos) = self.word("a register, a number or a region")?;
        operand_of(w, pos)
    }

    /// `NAME[i]` after the name, or `*(rN + off)` from the '*'.
    pub(super) fn mem_after_name(&mut self, name: String, pos: Pos) -> R<Mem> {
        self.punct(b'[')?;
        let index = self.operand()?;
        if let Operand::Region(..) = index {
            return Err(ParseError {
                pos,
                msg: "a region index must be a number or a register".into(),
            });
        }
        self.punct(b']')?;
        Ok(Mem::Region { name, index, pos })
    }

    pub(super) fn deref(&mut self) -> R<Mem> {
        self.punct(b'*')?;
        self.punct(b'(')?;
        let reg = self.reg()?;
        let offset = if self.try_punct(b'+') {
            self.number("an offset in bytes")?
        } else {
            0
        };
        self.punct(b')')?;
        Ok(Mem::Deref { reg, offset })
    }

    pub(super) fn binop(&mut self) -> Option<BinOp> {
        self.skip_blank();
        let (op, len) = match (self.peek()?, self.peek2()) {
            (b'=', Some(b'=')) => (BinOp::Eq, 2),
            (b'!', Some(b'=')) => (BinOp::Ne, 2),
            (b'+', _) => (BinOp::Add, 1),
            (b'-', _) => (BinOp::Sub, 1),
            (b'*', _) => (BinOp::Mul, 1),
            (b'/', _) => (BinOp::Div, 1),
            (b'%', _) => (BinOp::Rem, 1),
            (b'&', _) => (BinOp::And, 1),
            (b'|', _) => (BinOp::Or, 1),
            (b'^', _) => (BinOp::Xor, 1),
            (b'<', _) => (BinOp::Lt, 1),
            _ => return None,
        };
        for _ in 0..len {
            self.bump();
        }
        Some(op)
    }

    pub(super) fn block(&mut self) -> R<Vec<Stmt>> {
        self.skip_blank();
        self.enter()?;
        let body = self.block_body();
        self.leave();
        body
    }

    pub(super) fn block_body(&mut self) -> R<Vec<Stmt>> {
        self.punct(b'{')?;
        let mut body = Vec::new();
        loop {
            self.skip_all();
            if self.try_punct(b'}') {
                return Ok(body);
            }
            if self.peek().is_none() {
                return self.expected("'}' to close the block");
            }
            let stmt = if self.peek_word().as_deref() == Some("loop") {
                self.loop_stmt()?
            } else {
                self.stmt()?
            };
            body.push(stmt);
            self.end_of_stmt()?;
        }
    }

    /// `loop N { … }` or `loop until EV { … }`: the one statement with a
    /// block, apart from [`Self::stmt`] so that nested loops recurse
    /// through small stack frames only.
    pub(super) fn loop_stmt(&mut self) -> R<Stmt> {
        self.skip_blank();
        let pos = self.pos();
        self.keyword("loop")?;
        let kind = if self.peek_word().as_deref() == Some("until") {
            self.word("until")?;
            let (event, _) = self.word("an event name")?;
            StmtKind::LoopUntil {
                event,
                body: self.block()?,
            }
        } else {
            let count = self.number("a loop count or 'until'")?;
            StmtKind::Loop {
                count,
                body: self.block()?,
            }
        };
        Ok(Stmt { kind, pos })
    }

    /// `rN = …`: an expression or a call that returns a value.
    pub(super) fn assignment(&mut self, dst: u8, pos: Pos) -> R<StmtKind> {
        self.punct(b'=')?;
        self.skip_blank();
        if self.peek() == Some(b'*') {
            return Ok(StmtKind::Assign {
                dst,
                expr: Expr::Load(self.deref()?),
            });
        }
        let call = self.peek_word().unwrap_or_default();
        let kind = match call.as_str() {
            "mmap" => {
                self.word("mmap")?;
                let pages = self.number("a number of pages")?;
                StmtKind::Mmap {
                    dst,
                    pages,
                    prot: self.prot()?,
                }
            }
            "mremap" => {
                self.word("mremap")?;
                self.mremap(dst)?
            }
            "fork" => {
                self.word("fork")?;
                StmtKind::Fork {
                    dst: Some(dst),
                    child: self.child("a child block (C0, C1, …)", b'C')?,
                }
            }
            "wait" => {
                self.word("wait")?;
                StmtKind::Wait {
                    dst: Some(dst),
                    target: self.wait_target()?,
                }
            }
            "spawn" => {
                self.word("spawn")?;
                StmtKind::Spawn {
                    dst: Some(dst),
                    thread: self.child("a thread block (T0, T1, …)", b'T')?,
                }
            }
            "pin" | "get" => {
                let (w, _) = self.word("pin")?;
                let addr = self.operand()?;
                // `get` is vmsplice's get_user_pages_fast() unless `slow`;
                // `pin` is pin_user_pages() unless `fast`.
                let mut flags = PinFlags {
                    get: w == "get",
                    fast: w == "get",
                    ..Default::default()
                };
                let mut path: Option<&str> = None;
                while let Some(f) = self.peek_word() {
                    match f.as_str() {
                        "write" => flags.write = true,
                        "longterm" => flags.longterm = true,
                        "fast" | "slow" => {
                            let (f, fpos) = self.word("a flag")?;
                            if let Some(other) = path.filter(|p| *p != f) {
                                return Err(ParseError {
                                    pos: fpos,
                                    msg: format!(
                                        "'{f}' contradicts '{other}': a {w} takes one path"
                                    ),
                                });
                            }
                            flags.fast = f == "fast";
                            path = Some(if flags.fast { "fast" } else { "slow" });
                            continue;
                        }
                        _ => break,
                    }
                    self.word("a flag")?;
                }
                StmtKind::Pin { dst, addr, flags }
            }
            "dma_read" => {
                self.word("dma_read")?;
                let pin = self.reg()?;
                StmtKind::DmaRead {
                    dst,
                    pin,
                    offset: self.number("a byte offset")?,
                }
            }
            "cmp" => {
                self.word("cmp")?;
                let (region, _) = self.word("a region")?;
                StmtKind::Compare {
                    dst,
                    region,
                    value: self.operand()?,
                }
            }
            "uffd_resolve" => {
                self.word("uffd_resolve")?;
                StmtKind::UffdResolve { dst: Some(dst) }
            }
            _ => {
                let (w, wpos) = self.word("a value, a memory word or a call")?;
                self.skip_blank();
                if self.peek() == Some(b'[') && !is_reg(&w) {
                    return Ok(StmtKind::Assign {
                        dst,
                        expr: Expr::Load(self.mem_after_name(w, wpos)?),
                    });
                }
                let lhs = operand_of(w, wpos)?;
                let expr = match self.binop() {
                    Some(op) => Expr::Binary(lhs, op, self.operand()?),
                    None => Expr::Operand(lhs),
                };
                StmtKind::Assign { dst, expr }
            }
        };
        let _ = pos;
        Ok(kind)
    }

    pub(super) fn child(&mut self, what: &str, prefix: u8) -> R<String> {
        let (w, pos) = self.word(what)?;
        if is_thread_name(&w) && w.as_bytes()[0] == prefix {
            Ok(w)
        } else {
            Err(ParseError {
                pos,
                msg: format!("expected {what}, found '{w}'"),
            })
        }
    }

    pub(super) fn wait_target(&mut self) -> R<WaitTarget> {
        let (w, pos) = self.word("a register or a child (C0, …)")?;
        if is_reg(&w) {
            parse_reg(&w, pos).map(WaitTarget::Reg)
        } else if is_thread_name(&w) {
            Ok(WaitTarget::Child(w))
        } else {
            Err(ParseError {
                pos,
                msg: format!("expected a register or a child (C0, …), found '{w}'"),
            })
        }
    }

    pub(super) fn stmt(&mut self) -> R<Stmt> {
        self.skip_blank();
        let pos = self.pos();
        if self.peek() == Some(b'*') {
            let mem = self.deref()?;
            self.punct(b'=')?;
            return Ok(Stmt {
                kind: StmtKind::Store {
                    mem,
                    value: self.operand()?,
                },
                pos,
            });
        }
        let (w, wpos) = self.word("a statement")?;
        if is_reg(&w) {
            let dst = parse_reg(&w, wpos)?;
            return Ok(Stmt {
                kind: self.assignment(dst, pos)?,
                pos,
            });
        }
        let kind = match w.as_str() {
            "signal" => StmtKind::Signal(self.word("an event name")?.0),
            "await" => StmtKind::Await(self.word("an event name")?.0),
            "fill" => {
                let (region, _) = self.word("a region")?;
                StmtKind::Fill {
                    region,
                    value: self.operand()?,
                }
            }
            "munmap" | "madvise" => {
                let addr = self.operand()?;
                let pages = self.number("a number of pages")?;
                if w == "munmap" {
                    StmtKind::Munmap { addr, pages }
                } else {
                    StmtKind::Madvise {
                        addr,
                        pages,
                        advice: self.advice(),
                    }
                }
            }
            "mprotect" => {
                let addr = self.operand()?;
                let pages = self.number("a number of pages")?;
                StmtKind::Mprotect {
                    addr,
                    pages,
                    prot: self.prot()?,
                }
            }
            "fork" => StmtKind::Fork {
                dst: None,
                child: self.child("a child block (C0, C1, …)", b'C')?,
            },
            "wait" => StmtKind::Wait {
                dst: None,
                target: self.wait_target()?,
            },
            "exit" => StmtKind::Exit(self.number("an exit status")?),
            "spawn" => StmtKind::Spawn {
                dst: None,
                thread: self.child("a thread block (T0, T1, …)", b'T')?,
            },
            "unpin" => StmtKind::Unpin(self.reg()?),
            "dma_write" => {
                let pin = self.reg()?;
                let offset = self.number("a byte offset")?;
                StmtKind::DmaWrite {
                    pin,
                    offset,
                    value: self.operand()?,
                }
            }
            "uffd_register" => {
                let addr = self.operand()?;
                StmtKind::UffdRegister {
                    addr,
                    pages: self.number("a number of pages")?,
                }
            }
            "uffd_wp" => {
                let addr = self.operand()?;
                let pages = self.number("a number of pages")?;
                let (onoff, opos) = self.word("on or off")?;
                let on = match onoff.as_str() {
                    "on" => true,
                    "off" => false,
                    _ => {
                        return Err(ParseError {
                            pos: opos,
                            msg: format!("expected on or off, found '{onoff}'"),
                        })
                    }
                };
                StmtKind::UffdWp { addr, pages, on }
            }
            "uffd_resolve" => StmtKind::UffdResolve { dst: None },
            "hook" => StmtKind::Hook(self.word("a hook name")?.0),
            "pause" => StmtKind::Pause(self.number("a number of spins")?),
            name => {
                self.skip_blank();
                if self.peek() != Some(b'[') {
                    return Err(ParseError {
                        pos: wpos,
                        msg: format!("expected a statement, found '{name}' (see docs/litmus.md for the statements)"),
                    });
                }
                let mem = self.mem_after_name(w.clone(), wpos)?;
                self.punct(b'=')?;
                StmtKind::Store {
                    mem,
                    value: self.operand()?,
                }
            }
        };
        Ok(Stmt { kind, pos })
    }

    pub(super) fn region(&mut self) -> R<Region> {
        let pos = self.pos();
        self.keyword("region")?;
        let (name, npos) = self.word("a region name")?;
        if is_reg(&name) || is_thread_name(&name) {
            return Err(ParseError {
                pos: npos,
                msg: format!("'{name}' cannot name a region (it is a register or a thread)"),
            });
        }
        let pages = self.number("a number of pages")?;
        if pages == 0 {
            return Err(ParseError {
                pos: npos,
                msg: format!("region {name} has no pages"),
            });
        }
        let prot = self.prot()?;
        let populate = if self.peek_word().as_deref() == Some("populate") {
            self.word("populate")?;
            true
        } else {
            false
        };
        Ok(Region {
            name,
            pages,
            prot,
            populate,
            pos,
        })
    }

    pub(super) fn init(&mut self) -> R<Vec<Region>> {
        self.punct(b'{')?;
        let mut regions = Vec::new();
        loop {
            self.skip_all();
            if self.try_punct(b'}') {
                return Ok(regions);
            }
            if self.peek().is_none() {
                return self.expected("'}' to close the init section");
            }
            regions.push(self.region()?);
            self.end_of_stmt()?;
        }
    }
}

pub(super) fn operand_of(w: String, pos: Pos) -> R<Operand> {
    if is_reg(&w) {
        return parse_reg(&w, pos).map(Operand::Reg);
    }
    if w.as_bytes()[0].is_ascii_digit() {
        return parse_number(&w).map(Operand::Imm).ok_or(ParseError {
            pos,
            msg: format!("expected a number, found '{w}'"),
        });
    }
    Ok(Operand::Region(w, pos))
}
