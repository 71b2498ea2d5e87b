//! Splits a client's byte stream into JSON values, as QEMU's JSON stream
//! parser does: values may come back to back with no newline between
//! them (`qemu.qmp` sends them so), or spread over several lines.
//!
//! A scanner follows strings, escapes and bracket depth byte by byte
//! (constant work per byte) to find where each value ends; only then is
//! the value parsed, once, by serde_json (`protocol::respond`). Each value
//! is held in a buffer of at most [`MAX_REQUEST`] bytes. Input that cannot
//! be JSON gets one error, and the rest of its line is dropped: the next
//! newline is where reading starts afresh.
//!
//! Errors are found as early as the scanner can: a control character (or
//! `0xFE`/`0xFF`, never in UTF-8) where JSON allows none at once (sending
//! one is QMP's way to reset a server's parser), a stray `}`, `]`, `,` or
//! `:` at once, a bad word (`garbage`) where it ends, and anything else at
//! the end of the line it is on, where the unfinished value is tried with
//! serde_json (only if the line added something but whitespace, so the
//! work stays bounded by the lines of one capped value).

/// The longest request: from its first byte to its last.
pub const MAX_REQUEST: usize = 64 * 1024;

/// What the stream holds next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Item {
    /// The bytes of one complete JSON value (or of one JSON-shaped value
    /// the scanner delimited: serde_json may still find it malformed).
    Value(Vec<u8>),
    /// Not JSON: the error's text. The rest of its line was dropped.
    Error(String),
    /// A value longer than [`MAX_REQUEST`]: the connection is to be closed.
    TooLong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Between values.
    Idle,
    /// After an error: dropping bytes up to the next newline.
    Skip,
    /// In an object or array (`depth` deep), or in a string in one.
    Container,
    /// In a string at the top level.
    Str,
    /// In a bare word at the top level (a number, `true`, or garbage).
    Word,
    /// After [`Item::TooLong`]: nothing more is read.
    Closed,
}

/// The scanner; feed it what the socket gives with [`Framer::push`].
#[derive(Debug)]
pub(crate) struct Framer {
    mode: Mode,
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// Something but whitespace came since the last try at a line's end.
    dirty: bool,
    max: usize,
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// A byte no JSON text has outside a string (whitespace aside), nor inside
/// one: control characters, and bytes that never occur in UTF-8.
fn never_valid(b: u8) -> bool {
    (b < 0x20 && !is_space(b)) || b >= 0xfe
}

/// A byte a JSON string never holds raw: a control character (escape it),
/// or one that never occurs in UTF-8.
fn bad_in_string(b: u8) -> bool {
    !(0x20..0xfe).contains(&b)
}

/// Ends a bare word.
fn is_delimiter(b: u8) -> bool {
    is_space(b) || matches!(b, b'{' | b'}' | b'[' | b']' | b',' | b':' | b'"') || never_valid(b)
}

/// serde_json's description of what is wrong with `bytes`, or `fallback`
/// if it finds nothing wrong (yet).
fn describe(bytes: &[u8], fallback: impl FnOnce() -> String) -> String {
    match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
        Err(e) if !e.is_eof() => format!("malformed JSON: {e}"),
        _ => fallback(),
    }
}

impl Framer {
    pub(crate) fn new() -> Self {
        Self::with_limit(MAX_REQUEST)
    }

    /// A framer whose values may be at most `max` bytes long.
    pub(crate) fn with_limit(max: usize) -> Self {
        Framer {
            mode: Mode::Idle,
            buf: Vec::new(),
            depth: 0,
            in_string: false,
            escaped: false,
            dirty: false,
            max,
        }
    }

    /// Scans `bytes` (what one read gave) and returns the items completed
    /// in them, in order. After [`Item::TooLong`] it returns nothing more.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Vec<Item> {
        let mut out = Vec::new();
        for &b in bytes {
            self.byte(b, &mut out);
            if self.mode == Mode::Closed {
                break;
            }
        }
        out
    }

    fn start(&mut self, mode: Mode, b: u8) {
        self.mode = mode;
        self.buf.clear();
        self.buf.push(b);
        self.depth = usize::from(mode == Mode::Container);
        self.in_string = false;
        self.escaped = false;
        self.dirty = true;
    }

    /// Ends the value under way with an error; drops the rest of the line
    /// unless `b`, the byte at fault, ended it.
    fn fail(&mut self, b: u8, msg: String, out: &mut Vec<Item>) {
        out.push(Item::Error(msg));
        self.buf.clear();
        self.mode = if b == b'\n' { Mode::Idle } else { Mode::Skip };
    }

    fn complete(&mut self, out: &mut Vec<Item>) {
        out.push(Item::Value(std::mem::take(&mut self.buf)));
        self.mode = Mode::Idle;
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Item>) {
        match self.mode {
            Mode::Closed => {}
            Mode::Skip => {
                if b == b'\n' {
                    self.mode = Mode::Idle;
                }
            }
            Mode::Idle => self.idle(b, out),
            Mode::Word => {
                if is_delimiter(b) {
                    let word = std::mem::take(&mut self.buf);
                    self.mode = Mode::Idle;
                    match serde_json::from_slice::<serde::de::IgnoredAny>(&word) {
                        Ok(_) => out.push(Item::Value(word)),
                        Err(e) => {
                            self.fail(b' ', format!("malformed JSON: {e}"), out);
                            // The delimiter is the first byte skipped.
                            self.byte(b, out);
                            return;
                        }
                    }
                    // The delimiter may begin the next value.
                    self.byte(b, out);
                } else {
                    self.keep(b, out);
                }
            }
            Mode::Str => {
                if !self.keep(b, out) {
                    return;
                }
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.complete(out);
                } else if bad_in_string(b) {
                    let msg = describe(&self.buf, || Self::bad_byte(b));
                    self.fail(b, msg, out);
                }
            }
            Mode::Container => self.container(b, out),
        }
    }

    fn bad_byte(b: u8) -> String {
        format!("malformed JSON: byte {b:#04x} where JSON allows none")
    }

    /// Adds `b` to the value under way; false (and [`Item::TooLong`]) if
    /// that makes it too long.
    fn keep(&mut self, b: u8, out: &mut Vec<Item>) -> bool {
        if self.buf.len() >= self.max {
            out.push(Item::TooLong);
            self.buf = Vec::new();
            self.mode = Mode::Closed;
            return false;
        }
        self.buf.push(b);
        true
    }

    fn idle(&mut self, b: u8, out: &mut Vec<Item>) {
        match b {
            _ if is_space(b) => {}
            b'{' | b'[' => self.start(Mode::Container, b),
            b'"' => self.start(Mode::Str, b),
            b'}' | b']' | b',' | b':' => {
                self.fail(b, describe(&[b], || Self::bad_byte(b)), out);
            }
            _ if never_valid(b) => self.fail(b, Self::bad_byte(b), out),
            _ => self.start(Mode::Word, b),
        }
    }

    fn container(&mut self, b: u8, out: &mut Vec<Item>) {
        if !self.keep(b, out) {
            return;
        }
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
            } else if bad_in_string(b) {
                let msg = describe(&self.buf, || Self::bad_byte(b));
                self.fail(b, msg, out);
            }
            self.dirty = true;
            return;
        }
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => {
                self.depth -= 1;
                if self.depth == 0 {
                    self.complete(out);
                    return;
                }
            }
            b'\n' => {
                // A line ends inside the value: if what came so far is
                // already wrong, say so now rather than wait for more.
                if std::mem::take(&mut self.dirty) {
                    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&self.buf) {
                        if !e.is_eof() {
                            self.fail(b, format!("malformed JSON: {e}"), out);
                        }
                    }
                }
                return;
            }
            _ if never_valid(b) => {
                let msg = describe(&self.buf, || Self::bad_byte(b));
                self.fail(b, msg, out);
                return;
            }
            _ => {}
        }
        if !is_space(b) {
            self.dirty = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(chunks: &[&[u8]]) -> Vec<Item> {
        let mut f = Framer::new();
        chunks.iter().flat_map(|c| f.push(c)).collect()
    }

    fn value(s: &str) -> Item {
        Item::Value(s.as_bytes().to_vec())
    }

    fn is_error(i: &Item, want: &str) -> bool {
        matches!(i, Item::Error(e) if e.contains(want))
    }

    #[test]
    fn values_come_back_to_back_or_over_lines() {
        assert_eq!(
            items(&[br#"{"execute":"a"}{"execute":"b"}[1]"#]),
            [
                value(r#"{"execute":"a"}"#),
                value(r#"{"execute":"b"}"#),
                value("[1]")
            ]
        );
        // Split anywhere, even inside a string with escaped quotes and
        // brackets.
        let whole = br#"  {"execute": "x\"}{", "arguments": {"a": [1, {"b": "]"}]}}"#;
        for cut in 0..whole.len() {
            assert_eq!(
                items(&[&whole[..cut], &whole[cut..]]),
                [value(std::str::from_utf8(&whole[2..]).unwrap())],
                "cut at {cut}"
            );
        }
        assert_eq!(
            items(&[b"{\n  \"execute\":\n  \"quit\"\n}\n"]),
            [value("{\n  \"execute\":\n  \"quit\"\n}")]
        );
        // Top-level scalars are values (the protocol refuses them).
        assert_eq!(
            items(&[b"5 \"s\" true\n"]),
            [value("5"), value("\"s\""), value("true")]
        );
    }

    #[test]
    fn garbage_gets_one_error_and_its_line_is_dropped() {
        let got = items(&[b"garbage, more garbage\n{\"execute\":\"x\"}"]);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(is_error(&got[0], "expected value"), "{got:?}");
        assert_eq!(got[1], value(r#"{"execute":"x"}"#));
        let got = items(&[b"}{\"execute\":\"x\"}\n[2]"]);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(is_error(&got[0], "expected value"), "{got:?}");
        assert_eq!(got[1], value("[2]"));
        // Known wrong at the end of its line, before the value closes.
        let got = items(&[b"{\"execute\": nope\n", b"[3]"]);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(is_error(&got[0], "expected ident"), "{got:?}");
        assert_eq!(got[1], value("[3]"));
        // Still open and not wrong yet: a newline is only whitespace.
        assert!(items(&[b"{\"execute\":\n", b"\n"]).is_empty());
    }

    #[test]
    fn a_control_byte_resets_at_once() {
        // QMP's recipe: a control character (or 0xFF) ends whatever was
        // under way with an error; the newline after it starts afresh.
        for reset in [&b"\x01\n"[..], b"\xff\n"] {
            let mut f = Framer::new();
            assert!(f.push(b"{\"execute\": \"qu").is_empty());
            let got = f.push(reset);
            assert_eq!(got.len(), 1, "{got:?}");
            assert!(matches!(&got[0], Item::Error(_)), "{got:?}");
            assert_eq!(f.push(b"[4]"), [value("[4]")]);
        }
        // A raw newline inside a string is the error and its own reset.
        let got = items(&[b"{\"a\": \"x\n[5]"]);
        assert!(is_error(&got[0], "control character"), "{got:?}");
        assert_eq!(got[1..], [value("[5]")]);
        let got = items(&[b"\x00\x01\xff\n[6]"]);
        assert_eq!(got.len(), 2, "one error per line: {got:?}");
        assert_eq!(got[1], value("[6]"));
    }

    #[test]
    fn each_value_is_capped() {
        let mut f = Framer::with_limit(9);
        assert_eq!(
            f.push(b"[1,2,3]  [1,2,3,4]"),
            [value("[1,2,3]"), value("[1,2,3,4]")]
        );
        assert_eq!(f.push(b"[1,2,3,4,5"), [Item::TooLong], "the 10th byte");
        assert!(f.push(b"]\n[1]").is_empty(), "closed");
        let mut f = Framer::with_limit(8);
        assert_eq!(f.push(&[b'x'; 100]), [Item::TooLong]);
        // Whitespace between values is not held, however much.
        let mut f = Framer::with_limit(8);
        assert_eq!(f.push(&[b' '; 100]), []);
        assert_eq!(f.push(b"[7]"), [value("[7]")]);
        // Nor is skipped garbage.
        let mut f = Framer::with_limit(8);
        assert_eq!(f.push(b"}").len(), 1);
        assert_eq!(f.push(&[b'x'; 100]), []);
        assert_eq!(f.push(b"\n[8]"), [value("[8]")]);
    }

    /// Random input, JSON-ish and not, split at random places: the same
    /// items as when it comes whole, and nothing panics on them.
    #[test]
    fn how_input_is_split_never_matters() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let pieces: [&[u8]; 16] = [
            b"{",
            b"}",
            b"[",
            b"]",
            b"\"",
            b"\\",
            b":",
            b",",
            b"\n",
            b" ",
            b"\x01",
            b"\xff",
            b"\"execute\"",
            b"1",
            b"nul",
            b"\"quit\"",
        ];
        let ctl = crate::control::Controller::new(false);
        for _ in 0..2000 {
            let mut input = Vec::new();
            for _ in 0..rand(60) {
                input.extend_from_slice(pieces[rand(16) as usize]);
            }
            let whole = Framer::with_limit(64).push(&input);
            let mut f = Framer::with_limit(64);
            let mut split = Vec::new();
            let mut rest = &input[..];
            while !rest.is_empty() {
                let (a, b) = rest.split_at(1 + rand(rest.len() as u64) as usize);
                split.extend(f.push(a));
                rest = b;
            }
            assert_eq!(whole, split, "{:?}", String::from_utf8_lossy(&input));
            for item in whole {
                if let Item::Value(v) = item {
                    let r = super::super::protocol::respond(&ctl, &v);
                    assert!(r.get("error").is_some() || r.get("return").is_some());
                }
            }
        }
    }

    #[test]
    fn deep_nesting_is_only_a_counter_here() {
        let deep = format!("{}{}", "[".repeat(20000), "]".repeat(20000));
        assert_eq!(items(&[deep.as_bytes()]), [value(&deep)]);
    }
}
