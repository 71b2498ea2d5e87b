//! The litmus parser: source text to [`Test`], with errors that say where
//! (line:column) and what was expected.

use super::ast::*;

/// A syntax or meaning error at a place in the source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{pos}: {msg}")]
pub struct ParseError {
    pub pos: Pos,
    pub msg: String,
}

type R<T> = Result<T, ParseError>;

/// How deeply a test may nest: parentheses and `~` in the exists clause,
/// and blocks (a thread's block is level 1, each `loop` in it one more;
/// only 5 loops nest anyway, for the hidden registers). Deeper input is
/// refused with a message rather than parsed by a recursion that could
/// overflow the stack; chains (`a /\ b /\ c …`) are flat and not limited
/// by it. A level takes at most ~4 KiB of stack in a debug build (~1 KiB
/// optimised), so 64 levels stay far inside a 2 MiB test thread and the
/// CLI's 8 MiB main thread; written tests nest 3 or 4 levels.
pub const MAX_NESTING: usize = 64;

/// `c` as a message shows it: itself if it is printable, else escaped
/// (`\u{1b}`, `\u{feff}`, `\n`), so that a message never carries raw
/// control or invisible characters from the input to a terminal.
pub fn shown_char(c: char) -> String {
    match c {
        '\'' | '"' | '\\' => c.to_string(),
        c => c.escape_debug().to_string(),
    }
}

/// `s` as a message shows it ([`shown_char`] for each character).
pub fn shown(s: &str) -> String {
    s.chars().map(shown_char).collect()
}

/// Characters a test may not contain: control characters other than tab,
/// new line and carriage return, and invisible ones that can make text
/// read differently from what it is (zero-width, bidirectional overrides,
/// a byte order mark after the start).
fn forbidden(c: char) -> bool {
    (c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
        || matches!(
            c,
            '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}'
        )
}

struct Parser<'s> {
    src: &'s [u8],
    at: usize,
    line: usize,
    col: usize,
    /// How many levels of nesting are open ([`MAX_NESTING`]).
    depth: usize,
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

impl<'s> Parser<'s> {
    fn new(src: &'s str) -> Self {
        Parser {
            src: src.as_bytes(),
            at: 0,
            line: 1,
            col: 1,
            depth: 0,
        }
    }

    fn pos(&self) -> Pos {
        Pos {
            line: self.line,
            col: self.col,
        }
    }

    fn err<T>(&self, msg: impl Into<String>) -> R<T> {
        Err(ParseError {
            pos: self.pos(),
            msg: msg.into(),
        })
    }

    fn peek(&self) -> Option<u8> {
        self.src.get(self.at).copied()
    }

    fn peek2(&self) -> Option<u8> {
        self.src.get(self.at + 1).copied()
    }

    fn bump(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.at += 1;
        if c == b'\n' {
            self.line += 1;
            self.col = 1;
        } else if c & 0xc0 != 0x80 {
            // Columns count characters: not UTF-8 continuation bytes.
            self.col += 1;
        }
        Some(c)
    }

    /// Skips spaces, tabs and comments (`#…` to the end of the line), not newlines.
    fn skip_blank(&mut self) {
        while let Some(c) = self.peek() {
            match c {
                b' ' | b'\t' | b'\r' => {
                    self.bump();
                }
                b'#' => {
                    while self.peek().is_some_and(|c| c != b'\n') {
                        self.bump();
                    }
                }
                _ => break,
            }
        }
    }

    /// Skips blanks, comments and newlines.
    fn skip_all(&mut self) {
        loop {
            self.skip_blank();
            if self.peek() == Some(b'\n') {
                self.bump();
            } else {
                break;
            }
        }
    }

    /// What the next token looks like, for messages.
    fn describe_next(&self) -> String {
        match self.peek() {
            None => "the end of the file".into(),
            Some(b'\n') => "the end of the line".into(),
            Some(c) if is_word(c) => {
                let end = self.src[self.at..]
                    .iter()
                    .position(|c| !is_word(*c))
                    .map_or(self.src.len(), |n| self.at + n);
                format!("'{}'", String::from_utf8_lossy(&self.src[self.at..end]))
            }
            Some(_) => {
                let c =
                    String::from_utf8_lossy(&self.src[self.at..self.src.len().min(self.at + 4)])
                        .chars()
                        .next()
                        .unwrap_or(char::REPLACEMENT_CHARACTER);
                format!("'{}'", shown_char(c))
            }
        }
    }

    /// Opens a level of nesting, or fails if that is one too many.
    fn enter(&mut self) -> R<()> {
        if self.depth >= MAX_NESTING {
            return self.err(format!(
                "nesting deeper than {MAX_NESTING} levels (parentheses, '~' and blocks)"
            ));
        }
        self.depth += 1;
        Ok(())
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    fn expected<T>(&self, what: &str) -> R<T> {
        self.err(format!("expected {what}, found {}", self.describe_next()))
    }

    /// Consumes `c` (after blanks) or fails saying it was expected.
    fn punct(&mut self, c: u8) -> R<()> {
        self.skip_blank();
        if self.peek() == Some(c) {
            self.bump();
            Ok(())
        } else {
            self.expected(&format!("'{}'", c as char))
        }
    }

    fn try_punct(&mut self, c: u8) -> bool {
        self.skip_blank();
        if self.peek() == Some(c) {
            self.bump();
            true
        } else {
            false
        }
    }

    /// A word: letters, digits and `_`.
    fn word(&mut self, what: &str) -> R<(String, Pos)> {
        self.skip_blank();
        let pos = self.pos();
        if !self.peek().is_some_and(is_word) {
            return self.expected(what);
        }
        let mut s = String::new();
        while let Some(c) = self.peek().filter(|c| is_word(*c)) {
            s.push(c as char);
            self.bump();
        }
        Ok((s, pos))
    }

    /// The next word without consuming it.
    fn peek_word(&mut self) -> Option<String> {
        self.skip_blank();
        let end = self.src[self.at..]
            .iter()
            .position(|c| !is_word(*c))
            .map_or(self.src.len(), |n| self.at + n);
        (end > self.at).then(|| String::from_utf8_lossy(&self.src[self.at..end]).into_owned())
    }

    fn keyword(&mut self, kw: &str) -> R<()> {
        match self.peek_word() {
            Some(w) if w == kw => {
                self.word(kw)?;
                Ok(())
            }
            _ => self.expected(&format!("'{kw}'")),
        }
    }

    /// A raw token up to the next blank (names of tests and policies may
    /// contain '-' and '.').
    fn raw(&mut self, what: &str) -> R<(String, Pos)> {
        self.skip_blank();
        let pos = self.pos();
        let from = self.at;
        while self
            .peek()
            .is_some_and(|c| !c.is_ascii_whitespace() && c != b'#')
        {
            self.bump();
        }
        if self.at == from {
            return self.expected(what);
        }
        // Ends at an ASCII byte or the end: whole UTF-8 characters.
        let s = String::from_utf8_lossy(&self.src[from..self.at]).into_owned();
        Ok((s, pos))
    }

    fn number(&mut self, what: &str) -> R<u64> {
        let (w, pos) = self.word(what)?;
        parse_number(&w).ok_or(ParseError {
            pos,
            msg: format!("expected {what}, found '{w}'"),
        })
    }

    /// The end of a statement: ';', a newline, or a closing '}' (not consumed).
    fn end_of_stmt(&mut self) -> R<()> {
        self.skip_blank();
        match self.peek() {
            Some(b';') | Some(b'\n') => {
                self.bump();
                Ok(())
            }
            Some(b'}') | None => Ok(()),
            _ => self.expected("';', a new line or '}' after the statement"),
        }
    }

    /// A description: `"…"`, may span lines (runs of blanks become one space).
    fn string(&mut self) -> R<String> {
        let start = self.pos();
        self.punct(b'"')?;
        // Bytes, not `c as char`: a non-ASCII character is several bytes.
        let mut s = Vec::new();
        loop {
            match self.bump() {
                Some(b'"') => return Ok(String::from_utf8_lossy(&s).into_owned()),
                None => {
                    return Err(ParseError {
                        pos: start,
                        msg: "unterminated description: expected a closing '\"'".into(),
                    })
                }
                Some(c) if c.is_ascii_whitespace() => {
                    if s.last() != Some(&b' ') {
                        s.push(b' ');
                    }
                }
                Some(c) => s.push(c),
            }
        }
    }
}

fn parse_number(w: &str) -> Option<u64> {
    let w = w.replace('_', "");
    if let Some(hex) = w.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()
    } else {
        w.parse().ok()
    }
}

/// `rN` with N in 0..=9 (the rest belong to the compiler).
fn parse_reg(w: &str, pos: Pos) -> R<u8> {
    let n = w.strip_prefix('r').and_then(|n| n.parse::<u8>().ok());
    match n {
        Some(n) if n <= MAX_USER_REG => Ok(n),
        Some(_) => Err(ParseError {
            pos,
            msg: format!("register {w} is not available: tests use r0 to r{MAX_USER_REG}"),
        }),
        None => Err(ParseError {
            pos,
            msg: format!("expected a register (r0 to r{MAX_USER_REG}), found '{w}'"),
        }),
    }
}

/// The highest register a test may name.
pub const MAX_USER_REG: u8 = 9;

fn is_reg(w: &str) -> bool {
    w.len() >= 2 && w.starts_with('r') && w[1..].bytes().all(|c| c.is_ascii_digit())
}

fn is_thread_name(w: &str) -> bool {
    w.len() >= 2
        && matches!(w.as_bytes()[0], b'P' | b'C' | b'T')
        && w[1..].bytes().all(|c| c.is_ascii_digit())
}

impl Parser<'_> {
    fn reg(&mut self) -> R<u8> {
        let (w, pos) = self.word("a register")?;
        parse_reg(&w, pos)
    }

    fn prot(&mut self) -> R<Prot> {
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

    /// A register, a number, or a region name.
    fn operand(&mut self) -> R<Operand> {
        let (w, pos) = self.word("a register, a number or a region")?;
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

    /// `NAME[i]` after the name, or `*(rN + off)` from the '*'.
    fn mem_after_name(&mut self, name: String, pos: Pos) -> R<Mem> {
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

    fn deref(&mut self) -> R<Mem> {
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

    fn binop(&mut self) -> Option<BinOp> {
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

    fn block(&mut self) -> R<Vec<Stmt>> {
        self.skip_blank();
        self.enter()?;
        let body = self.block_body();
        self.leave();
        body
    }

    fn block_body(&mut self) -> R<Vec<Stmt>> {
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
    fn loop_stmt(&mut self) -> R<Stmt> {
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
    fn assignment(&mut self, dst: u8, pos: Pos) -> R<StmtKind> {
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
                let mut flags = PinFlags {
                    get: w == "get",
                    ..Default::default()
                };
                while let Some(f) = self.peek_word() {
                    match f.as_str() {
                        "write" => flags.write = true,
                        "longterm" => flags.longterm = true,
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

    fn child(&mut self, what: &str, prefix: u8) -> R<String> {
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

    fn wait_target(&mut self) -> R<WaitTarget> {
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

    fn stmt(&mut self) -> R<Stmt> {
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
                    StmtKind::Madvise { addr, pages }
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

    fn region(&mut self) -> R<Region> {
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

    fn init(&mut self) -> R<Vec<Region>> {
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

    // The exists clause: or := and ('\/' and)*; and := unary ('/\' unary)*.
    // A chain is read in a loop into one n-ary node (no recursion per
    // term); only '(' and '~' recurse, each a level of [`MAX_NESTING`].
    fn cond(&mut self) -> R<Cond> {
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

    fn cond_and(&mut self) -> R<Cond> {
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

    fn cond_unary(&mut self) -> R<Cond> {
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
    fn comparison(&mut self) -> R<Cond> {
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
    fn atom(&mut self) -> R<Atom> {
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
enum Atom {
    Value(Value),
    Status(String, Status),
}

/// One term as itself, more as the n-ary `node` (`Cond::And`, `Cond::Or`).
fn chain(mut terms: Vec<Cond>, node: fn(Vec<Cond>) -> Cond) -> Cond {
    match terms.pop() {
        Some(only) if terms.is_empty() => only,
        Some(last) => {
            terms.push(last);
            node(terms)
        }
        None => Cond::True,
    }
}

fn operand_of(w: String, pos: Pos) -> R<Operand> {
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

/// The first character a test may not contain ([`forbidden`]), as an error
/// at its line and column.
fn check_chars(src: &str) -> R<()> {
    let mut pos = Pos { line: 1, col: 1 };
    for c in src.chars() {
        if forbidden(c) {
            return Err(ParseError {
                pos,
                msg: format!(
                    "character '{}' is not allowed: a test is text without control or \
                     invisible characters",
                    shown_char(c)
                ),
            });
        }
        if c == '\n' {
            pos = Pos {
                line: pos.line + 1,
                col: 1,
            };
        } else {
            pos.col += 1;
        }
    }
    Ok(())
}

/// Parses a litmus test. A leading byte order mark is skipped.
pub fn parse(src: &str) -> R<Test> {
    let src = src.strip_prefix('\u{feff}').unwrap_or(src);
    check_chars(src)?;
    let mut p = Parser::new(src);
    p.skip_all();
    let start = p.pos();
    match p.peek_word() {
        Some(w) if w == "cowlab" => {
            p.word("cowlab")?;
        }
        _ => return p.expected("the header line 'cowlab NAME'"),
    }
    let (name, _) = p.raw("a test name after 'cowlab'")?;
    p.skip_all();
    let description = if p.peek() == Some(b'"') {
        Some(p.string()?)
    } else {
        None
    };
    p.skip_all();
    let regions = if p.peek() == Some(b'{') {
        p.init()?
    } else {
        Vec::new()
    };
    let mut threads: Vec<Thread> = Vec::new();
    let mut exists = None;
    let mut exists_src = String::new();
    let mut expects = Vec::new();
    let mut schedule = None;
    let mut injects = Vec::new();
    let mut runs = None;
    let mut max_runs = None;
    loop {
        p.skip_all();
        let pos = p.pos();
        let Some(w) = p.peek_word() else {
            if p.peek().is_none() {
                break;
            }
            return p.expected(
                "a thread block (P0 { … }), 'exists', 'expect', 'schedule', 'inject' or 'runs'",
            );
        };
        if is_thread_name(&w) {
            if exists.is_some() {
                return p.err("thread blocks must come before 'exists'");
            }
            p.word("a thread")?;
            if threads.iter().any(|t| t.name == w) {
                return Err(ParseError {
                    pos,
                    msg: format!("thread {w} is defined twice"),
                });
            }
            let body = p.block()?;
            threads.push(Thread { name: w, body, pos });
        } else if w == "exists" {
            if exists.is_some() {
                return p.err("a test has one 'exists' clause");
            }
            p.word("exists")?;
            p.skip_all();
            let from = p.at;
            exists = Some(p.cond()?);
            exists_src = String::from_utf8_lossy(&p.src[from..p.at])
                .trim()
                .to_string();
        } else if w == "schedule" {
            p.word("schedule")?;
            if schedule.is_some() {
                return p.err("a test has one 'schedule' section");
            }
            p.punct(b'{')?;
            let at = p.pos();
            // Each step with where it starts, for errors that point at it.
            let mut steps = Vec::new();
            loop {
                while p.peek().is_some_and(|c| c.is_ascii_whitespace()) {
                    p.bump();
                }
                let (step_at, from) = (p.pos(), p.at);
                while p.peek().is_some_and(|c| c != b'}' && c != b'<') {
                    p.bump();
                }
                let text = String::from_utf8_lossy(&p.src[from..p.at])
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ");
                match p.peek() {
                    None => return p.expected("'}' to close the schedule"),
                    Some(b'<') => {
                        steps.push((text, step_at));
                        p.bump();
                    }
                    Some(_) => {
                        if !text.is_empty() || !steps.is_empty() {
                            steps.push((text, step_at));
                        }
                        p.bump();
                        break;
                    }
                }
            }
            schedule = Some((steps, at));
        } else if w == "runs" {
            p.word("runs")?;
            if runs.is_some() {
                return p.err("a test has one 'runs' line");
            }
            let n = p.number("a number of runs")?;
            if n == 0 {
                return p.err("'runs' needs at least 1");
            }
            runs = Some(n);
            if p.peek_word().as_deref() == Some("max") {
                p.word("max")?;
                let m = p.number("a largest number of runs")?;
                if m < n {
                    return p.err(format!(
                        "'runs {n} max {m}': the largest number is below {n}"
                    ));
                }
                max_runs = Some(m);
            }
        } else if w == "inject" {
            p.word("inject")?;
            let (rule, rpos) = p.raw("a rule (ACTION@POINT[/FILTER]...)")?;
            injects.push((rule, rpos));
        } else if w == "expect" {
            p.word("expect")?;
            let (policy, ppos) = p.raw("a policy name")?;
            if crate::policy::Policy::preset(&policy).is_none() {
                return Err(ParseError {
                    pos: ppos,
                    msg: format!(
                        "unknown policy '{}' (presets: {})",
                        shown(&policy),
                        crate::policy::Policy::preset_names()
                    ),
                });
            }
            let (v, vpos) = p.word("Never, Sometimes or Always")?;
            let verdict = match v.as_str() {
                "Never" => Verdict::Never,
                "Sometimes" => Verdict::Sometimes,
                "Always" => Verdict::Always,
                _ => {
                    return Err(ParseError {
                        pos: vpos,
                        msg: format!("expected Never, Sometimes or Always, found '{v}'"),
                    })
                }
            };
            expects.push(Expect {
                policy,
                verdict,
                pos,
            });
        } else {
            return p.expected(
                "a thread block (P0 { … }), 'exists', 'expect', 'schedule', 'inject' or 'runs'",
            );
        }
    }
    if !threads.iter().any(|t| t.name.starts_with('P')) {
        return Err(ParseError {
            pos: start,
            msg: "a test needs at least one initial thread (P0 { … })".into(),
        });
    }
    let Some(exists) = exists else {
        return Err(ParseError {
            pos: p.pos(),
            msg: "expected an 'exists (…)' clause".into(),
        });
    };
    Ok(Test {
        name,
        description,
        regions,
        threads,
        exists,
        exists_src,
        expects,
        schedule,
        injects,
        runs,
        max_runs,
    })
}

#[cfg(test)]
mod tests {
    use super::parse;

    const BODY: &str = "P0 { }\nexists (true)\n";

    #[test]
    fn runs_takes_an_optional_largest_count_for_a_rare_witness() {
        let t = parse(&format!("cowlab t\nruns 20 max 600\n{BODY}")).unwrap();
        assert_eq!((t.runs, t.max_runs), (Some(20), Some(600)));
        let t = parse(&format!("cowlab t\nruns 20\n{BODY}")).unwrap();
        assert_eq!((t.runs, t.max_runs), (Some(20), None));
        // The next line's first word is not taken for 'max'.
        let t = parse(&format!("cowlab t\nruns 3 # three\n{BODY}")).unwrap();
        assert_eq!(t.max_runs, None);
    }

    #[test]
    fn a_largest_count_below_the_first_is_refused() {
        let e = parse(&format!("cowlab t\nruns 20 max 5\n{BODY}")).unwrap_err();
        assert!(e.to_string().contains("below 20"), "{e}");
        let e = parse(&format!("cowlab t\nruns 20 max\n{BODY}")).unwrap_err();
        assert!(e.to_string().contains("a largest number of runs"), "{e}");
    }
}
