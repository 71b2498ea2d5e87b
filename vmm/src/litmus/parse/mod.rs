//! The litmus parser: source text to [`Test`], with errors that say where
//! (line:column) and what was expected. `lexer` reads words, numbers and
//! punctuation with positions; `stmt` the thread blocks and regions;
//! `cond` the exists clause; this file the test's items.

mod cond;
mod lexer;
mod stmt;

use super::ast::*;
use lexer::is_thread_name;
use lexer::Parser;
pub use lexer::MAX_USER_REG;

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
    let mut schedule_required = false;
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
            if p.peek_word().as_deref() == Some("required") {
                p.word("required")?;
                schedule_required = true;
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
        schedule_required,
        injects,
        runs,
        max_runs,
    })
}

#[cfg(test)]
mod tests {
    use super::parse;
    use crate::litmus::ast::*;

    #[test]
    fn madvise_takes_an_optional_advice_word() {
        let t = parse(
            "cowlab adv\n{ region buf 2 rw }\n\
             P0 {\n  madvise buf 2\n  madvise buf 1 pageout\n  madvise buf 2 dontfork\n\
             madvise buf 2 dofork\n  madvise buf 1 dontneed\n}\n\
             exists (P0:r1 = 1)\n",
        )
        .unwrap();
        let advice: Vec<_> = t.threads[0]
            .body
            .iter()
            .map(|s| match &s.kind {
                StmtKind::Madvise { advice, .. } => *advice,
                k => panic!("not a madvise: {k:?}"),
            })
            .collect();
        use Advice::*;
        assert_eq!(advice, [DontNeed, PageOut, DontFork, DoFork, DontNeed]);
    }

    #[test]
    fn pin_and_get_take_their_gup_path_fast_or_slow() {
        let t = parse(
            "cowlab gup\n{ region buf 1 rw }\n\
             P0 {\n  r1 = pin buf\n  r2 = pin buf write fast longterm\n\
             r3 = get buf\n  r4 = get buf slow write\n}\n\
             exists (P0:r1 = 1)\n",
        )
        .unwrap();
        let flags: Vec<_> = t.threads[0]
            .body
            .iter()
            .map(|s| match &s.kind {
                StmtKind::Pin { flags, .. } => (flags.get, flags.write, flags.fast),
                k => panic!("not a pin: {k:?}"),
            })
            .collect();
        assert_eq!(
            flags,
            [
                (false, false, false),
                (false, true, true),
                (true, false, true),
                (true, true, false)
            ]
        );
        let e = parse("cowlab t\nP0 {\n  r1 = get 0 slow fast\n}\nexists (true)\n").unwrap_err();
        assert_eq!((e.pos.line, e.pos.col), (3, 19), "{e}");
        assert_eq!(e.msg, "'fast' contradicts 'slow': a get takes one path");
    }

    #[test]
    fn mremap_takes_lengths_and_flags_in_any_order_each_once() {
        let src = |body: &str| {
            format!("cowlab m\n{{ region a 1 rw; region b 2 rw }}\nP0 {{\n  {body}\n}}\nexists (P0:r1 = 1)\n")
        };
        let t = parse(&src(
            "r1 = mremap a 1 2 fixed b maymove\n  r2 = mremap r1 2 1",
        ))
        .unwrap();
        let kinds: Vec<_> = t.threads[0].body.iter().map(|s| s.kind.clone()).collect();
        assert_eq!(
            kinds[0],
            StmtKind::Mremap {
                dst: 1,
                addr: Operand::Region("a".into(), Pos { line: 4, col: 15 }),
                old_pages: 1,
                new_pages: 2,
                maymove: true,
                fixed: Some(Operand::Region("b".into(), Pos { line: 4, col: 27 })),
                dontunmap: false,
            }
        );
        assert!(matches!(
            kinds[1],
            StmtKind::Mremap {
                dst: 2,
                addr: Operand::Reg(1),
                maymove: false,
                fixed: None,
                dontunmap: false,
                ..
            }
        ));
        let e = parse(&src("r1 = mremap a 1 1 maymove dontunmap maymove")).unwrap_err();
        assert_eq!(e.to_string(), "4:39: 'maymove' given twice");
        let e = parse(&src("r1 = mremap a 1")).unwrap_err();
        assert!(e.to_string().contains("expected a number of pages"), "{e}");
        let e = parse(&src("r1 = mremap a 1 1 fixed")).unwrap_err();
        assert!(
            e.to_string()
                .contains("expected a register, a number or a region"),
            "{e}"
        );
    }

    #[test]
    fn a_test_reads_into_its_regions_threads_and_items() {
        let t = parse(
            "cowlab two \"About.\"\n{ region buf 2 rw populate; region ro 1 r }\n\
             P0 {\n  buf[8] = 2; r1 = buf[0]\n  loop 3 { hook h }\n}\n\
             exists (P0:r1 = 1 \\/ ~P0:segv)\nexpect mainline Never\n",
        )
        .unwrap();
        assert_eq!(
            (t.name.as_str(), t.description.as_deref()),
            ("two", Some("About."))
        );
        let r: Vec<_> = t
            .regions
            .iter()
            .map(|r| (&r.name[..], r.pages, r.prot, r.populate))
            .collect();
        assert_eq!(
            r,
            [
                ("buf", 2, Prot::ReadWrite, true),
                ("ro", 1, Prot::Read, false)
            ]
        );
        let body = &t.threads[0].body;
        assert!(matches!(
            &body[0].kind,
            StmtKind::Store {
                value: Operand::Imm(2),
                ..
            }
        ));
        assert!(matches!(&body[1].kind, StmtKind::Assign { dst: 1, .. }));
        assert!(matches!(&body[2].kind, StmtKind::Loop { count: 3, body } if body.len() == 1));
        assert!(matches!(&t.exists, Cond::Or(terms) if terms.len() == 2));
        assert_eq!(t.expects[0].verdict, Verdict::Never);
        assert_eq!(t.exists_src, "(P0:r1 = 1 \\/ ~P0:segv)");
    }

    #[test]
    fn errors_say_where_and_what_was_expected() {
        let e = parse("cowlab t\nP0 {\n  r1 = = 2\n}\nexists (true)\n").unwrap_err();
        assert_eq!((e.pos.line, e.pos.col), (3, 8), "{e}");
        let e = parse("cowlab t\nP0 { r11 = 1 }\nexists (true)\n").unwrap_err();
        assert!(e.msg.contains("tests use r0 to r"), "{e}");
        let deep = format!(
            "cowlab t\nP0 {{ }}\nexists {}true{}\n",
            "(".repeat(100),
            ")".repeat(100)
        );
        assert!(parse(&deep).unwrap_err().msg.contains("nest"));
    }

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
