//! The lexical layer of the parser: a cursor over the source with its
//! line and column, words, numbers, punctuation and the nesting limit.

use super::{shown_char, ParseError, MAX_NESTING, R};
use crate::litmus::ast::*;

pub(super) struct Parser<'s> {
    pub(super) src: &'s [u8],
    pub(super) at: usize,
    line: usize,
    col: usize,
    /// How many levels of nesting are open ([`MAX_NESTING`]).
    depth: usize,
}

pub(super) fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

impl<'s> Parser<'s> {
    pub(super) fn new(src: &'s str) -> Self {
        Parser {
            src: src.as_bytes(),
            at: 0,
            line: 1,
            col: 1,
            depth: 0,
        }
    }

    pub(super) fn pos(&self) -> Pos {
        Pos {
            line: self.line,
            col: self.col,
        }
    }

    pub(super) fn err<T>(&self, msg: impl Into<String>) -> R<T> {
        Err(ParseError {
            pos: self.pos(),
            msg: msg.into(),
        })
    }

    pub(super) fn peek(&self) -> Option<u8> {
        self.src.get(self.at).copied()
    }

    pub(super) fn peek2(&self) -> Option<u8> {
        self.src.get(self.at + 1).copied()
    }

    pub(super) fn bump(&mut self) -> Option<u8> {
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
    pub(super) fn skip_blank(&mut self) {
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
    pub(super) fn skip_all(&mut self) {
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
    pub(super) fn describe_next(&self) -> String {
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
    pub(super) fn enter(&mut self) -> R<()> {
        if self.depth >= MAX_NESTING {
            return self.err(format!(
                "nesting deeper than {MAX_NESTING} levels (parentheses, '~' and blocks)"
            ));
        }
        self.depth += 1;
        Ok(())
    }

    pub(super) fn leave(&mut self) {
        self.depth -= 1;
    }

    pub(super) fn expected<T>(&self, what: &str) -> R<T> {
        self.err(format!("expected {what}, found {}", self.describe_next()))
    }

    /// Consumes `c` (after blanks) or fails saying it was expected.
    pub(super) fn punct(&mut self, c: u8) -> R<()> {
        self.skip_blank();
        if self.peek() == Some(c) {
            self.bump();
            Ok(())
        } else {
            self.expected(&format!("'{}'", c as char))
        }
    }

    pub(super) fn try_punct(&mut self, c: u8) -> bool {
        self.skip_blank();
        if self.peek() == Some(c) {
            self.bump();
            true
        } else {
            false
        }
    }

    /// A word: letters, digits and `_`.
    pub(super) fn word(&mut self, what: &str) -> R<(String, Pos)> {
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
    pub(super) fn peek_word(&mut self) -> Option<String> {
        self.skip_blank();
        let end = self.src[self.at..]
            .iter()
            .position(|c| !is_word(*c))
            .map_or(self.src.len(), |n| self.at + n);
        (end > self.at).then(|| String::from_utf8_lossy(&self.src[self.at..end]).into_owned())
    }

    pub(super) fn keyword(&mut self, kw: &str) -> R<()> {
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
    pub(super) fn raw(&mut self, what: &str) -> R<(String, Pos)> {
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

    pub(super) fn number(&mut self, what: &str) -> R<u64> {
        let (w, pos) = self.word(what)?;
        parse_number(&w).ok_or(ParseError {
            pos,
            msg: format!("expected {what}, found '{w}'"),
        })
    }

    /// The end of a statement: ';', a newline, or a closing '}' (not consumed).
    pub(super) fn end_of_stmt(&mut self) -> R<()> {
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
    pub(super) fn string(&mut self) -> R<String> {
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

pub(super) fn parse_number(w: &str) -> Option<u64> {
    let w = w.replace('_', "");
    if let Some(hex) = w.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()
    } else {
        w.parse().ok()
    }
}

/// `rN` with N in 0..=9 (the rest belong to the compiler).
pub(super) fn parse_reg(w: &str, pos: Pos) -> R<u8> {
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

pub(super) fn is_reg(w: &str) -> bool {
    w.len() >= 2 && w.starts_with('r') && w[1..].bytes().all(|c| c.is_ascii_digit())
}

pub(super) fn is_thread_name(w: &str) -> bool {
    w.len() >= 2
        && matches!(w.as_bytes()[0], b'P' | b'C' | b'T')
        && w[1..].bytes().all(|c| c.is_ascii_digit())
}
