//! The exists clause: or := and ('\\/' and)*; and := unary ('/\\' unary)*.

use super::lexer::*;
use super::{ParseError, R};
use crate::litmus::ast::*;

impl Parser<'_> {
    // The exists clause: or := and ('\/' and)*; and := unary ('/\' unary)*.
    // A chain is read in a loop into one n-ary node (no recursion per
    // term); only '(' and '~' recurse, each a level of [`MAX_NESTING`].
    pub(super) fn cond(&mut self) -> R<Cond> {
        let mut terms = vec![self.cond_and()?];
        loop {
            self.skip_all();
            if self.peek() == Some(b'\\') && self.peek2() == Some(b'/') {
                self.bump();
                self.bump();
                terms.push(self.cond_and()?);
            } else {
                return Ok(chain(terms, Cond::Or));
            }
        }
    }

    pub(super) fn cond_and(&mut self) -> R<Cond> {
        let mut terms = vec![self.cond_unary()?];
        loop {
            self.skip_all();
            if self.peek() == Some(b'/') && self.peek2() == Some(b'\\') {
                self.bump();
                self.bump();
                terms.push(self.cond_unary()?);
            } else {
                return Ok(chain(terms, Cond::And));
            }
        }
    }

    pub(super) fn cond_unary(&mut self) -> R<Cond> {
        self.skip_all();
        if self.peek() == Some(b'~') {
            self.enter()?;
            self.bump();
            let c = self.cond_unary();
            self.leave();
            return Ok(Cond::Not(Box::new(c?)));
        }
        if self.peek() == Some(b'(') {
            self.enter()?;
            self.bump();
            let c = self.cond().and_then(|c| {
                self.skip_all();
                self.punct(b')').map(|()| c)
            });
            self.leave();
            return c;
        }
        self.comparison()
    }

    /// `true`, `T:status` or `VALUE CMP VALUE`: the conditions without
    /// parts (apart from [`Self::cond_unary`] to keep its frame small).
    pub(super) fn comparison(&mut self) -> R<Cond> {
        if self.peek_word().as_deref() == Some("true") {
            self.word("true")?;
            return Ok(Cond::True);
        }
        let lhs = match self.atom()? {
            Atom::Value(v) => v,
            Atom::Status(thread, status) => return Ok(Cond::Status { thread, status }),
        };
        self.skip_blank();
        let op = match (self.peek(), self.peek2()) {
            (Some(b'='), Some(b'=')) => (CmpOp::Eq, 2),
            (Some(b'='), _) => (CmpOp::Eq, 1),
            (Some(b'!'), Some(b'=')) => (CmpOp::Ne, 2),
            (Some(b'<'), Some(b'=')) => (CmpOp::Le, 2),
            (Some(b'>'), Some(b'=')) => (CmpOp::Ge, 2),
            (Some(b'<'), _) => (CmpOp::Lt, 1),
            (Some(b'>'), _) => (CmpOp::Gt, 1),
            _ => return self.expected("a comparison (=, !=, <, <=, >, >=)"),
        };
        for _ in 0..op.1 {
            self.bump();
        }
        match self.atom()? {
            Atom::Value(rhs) => Ok(Cond::Cmp(lhs, op.0, rhs)),
            Atom::Status(..) => {
                self.err("a thread status (segv, oom, crashed, ok) cannot be compared")
            }
        }
    }

    /// `T:rN`, a number, or `T:status`.
    pub(super) fn atom(&mut self) -> R<Atom> {
        let (w, pos) = self.word("a thread register (P0:r1) or a number")?;
        if w.as_bytes()[0].is_ascii_digit() {
            return parse_number(&w)
                .map(|n| Atom::Value(Value::Imm(n)))
                .ok_or(ParseError {
                    pos,
                    msg: format!("expected a number, found '{w}'"),
                });
        }
        if !is_thread_name(&w) {
            return Err(ParseError {
                pos,
                msg: format!("expected a thread register (P0:r1) or a number, found '{w}'"),
            });
        }
        self.punct(b':')?;
        let (what, wpos) = self.word("a register or a status (segv, oom, crashed, ok)")?;
        let status = match what.as_str() {
            "segv" => Status::Segv,
            "oom" => Status::Oom,
            "crashed" => Status::Crashed,
            "ok" => Status::Ok,
            _ => {
                return Ok(Atom::Value(Value::Reg {
                    thread: w,
                    reg: parse_reg(&what, wpos)?,
                }))
            }
        };
        Ok(Atom::Status(w, status))
    }
}

/// What an operand of the exists clause can be: a value to compare, or a
/// status atom (`P1:segv`), which is a condition by itself.
pub(super) enum Atom {
    Value(Value),
    Status(String, Status),
}

/// One term as itself, more as the n-ary `node` (`Cond::And`, `Cond::Or`).
pub(super) fn chain(mut terms: Vec<Cond>, node: fn(Vec<Cond>) -> Cond) -> Cond {
    match terms.pop() {
        Some(only) if terms.is_empty() => only,
        Some(last) => {
            terms.push(last);
            node(terms)
        }
        None => Cond::True,
    }
}
