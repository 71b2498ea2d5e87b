//! The litmus front end (parse + compile) against hostile input: every
//! malformed test gets one message (a `ParseError`, exit status 2 from the
//! CLI), and nothing panics, aborts or overflows the stack — also when an
//! accepted test is cloned, dropped, printed or evaluated.

use std::collections::BTreeMap;

use super::ast::Cond;
use super::parse::MAX_NESTING;
use super::run::{holds, ThreadEnd};
use super::{load, parse, ParseError};

const HEAD: &str = "cowlab t\n{ region buf 1 rw }\n";

fn err(src: &str) -> ParseError {
    match load(src) {
        Ok(_) => panic!("accepted: {:.200}", src),
        Err(e) => e,
    }
}

fn assert_err(src: &str, want: &str) -> ParseError {
    let e = err(src);
    assert!(
        e.to_string().contains(want),
        "expected {want:?} in {:?}",
        e.to_string()
    );
    e
}

// The shapes of ../shared/repro/make-deep-nesting.py.

fn deep_parens(n: usize) -> String {
    format!(
        "{HEAD}P0 {{ r1 = 1 }}\nexists {}P0:r1 = 1{}\n",
        "(".repeat(n),
        ")".repeat(n)
    )
}

fn deep_not(n: usize) -> String {
    format!("{HEAD}P0 {{ r1 = 1 }}\nexists {}P0:r1 = 1\n", "~".repeat(n))
}

fn chain(n: usize, op: &str) -> String {
    format!(
        "{HEAD}P0 {{ r1 = 1 }}\nexists ({})\n",
        vec!["P0:r1 = 1"; n].join(op)
    )
}

fn deep_loops(n: usize) -> String {
    format!(
        "{HEAD}P0 {{ {}r1 = 1{} }}\nexists (P0:r1 = 1)\n",
        "loop 2 { ".repeat(n),
        " }".repeat(n)
    )
}

/// A final state where P0 ended normally with r1 = 1.
fn state() -> BTreeMap<String, ThreadEnd> {
    let mut regs = [0; cowlab_abi::bytecode::NR_REGS];
    regs[1] = 1;
    BTreeMap::from([("P0".to_string(), ThreadEnd::Ok(regs))])
}

#[test]
fn deep_nesting_is_one_message_at_the_first_level_too_many() {
    // 4:8 is the first '(' after "exists ": one too many is at 4:(8 + MAX).
    let e = assert_err(
        &deep_parens(20_000),
        &format!("nesting deeper than {MAX_NESTING} levels"),
    );
    assert_eq!((e.pos.line, e.pos.col), (4, 8 + MAX_NESTING));
    let e = assert_err(
        &deep_not(25_000),
        &format!("nesting deeper than {MAX_NESTING} levels"),
    );
    assert_eq!((e.pos.line, e.pos.col), (4, 8 + MAX_NESTING));
    // A thread's block is the first level; its loops the others.
    let e = assert_err(
        &deep_loops(12_000),
        &format!("nesting deeper than {MAX_NESTING} levels"),
    );
    // "P0 { " then "loop 2 { " each: loop MAX's '{' is one level too many.
    assert_eq!((e.pos.line, e.pos.col), (3, 9 * MAX_NESTING + 4));
    assert_err(
        &format!(
            "{HEAD}P0 {{ r1 = 1 }}\nexists {}P0:r1 = 1\n",
            "~(".repeat(200)
        ),
        &format!("nesting deeper than {MAX_NESTING} levels"),
    );
}

#[test]
fn nesting_at_the_limit_is_accepted_and_every_walk_of_it_is_shallow() {
    // Run where the stack is a quarter of a test thread's (2 MiB) and a
    // sixteenth of the CLI's main thread (8 MiB): the limit leaves margin
    // (parsing 64 loops takes ~260 KiB in a debug build).
    let walk = || {
        for (src, want) in [
            (deep_parens(MAX_NESTING), true),
            (deep_not(MAX_NESTING), MAX_NESTING.is_multiple_of(2)),
        ] {
            let c = load(&src).expect("at the limit");
            let cond = c.test.exists.clone();
            assert_eq!(format!("{cond:?}"), format!("{:?}", c.test.exists));
            assert_eq!(cond, c.test.exists);
            assert_eq!(holds(&cond, &state()), want);
            assert_eq!(super::verdict::key(&cond, &state()), "P0:r1=1;");
            drop(c);
        }
        assert_err(&deep_parens(MAX_NESTING + 1), "nesting deeper");
        // 255 loops in a block parse; the compiler then says how many fit.
        let t = parse(&deep_loops(MAX_NESTING - 1)).expect("at the limit");
        drop(t.clone());
        assert_err(&deep_loops(MAX_NESTING - 1), "too many nested loops");
    };
    std::thread::Builder::new()
        .stack_size(512 << 10)
        .spawn(walk)
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn a_long_chain_is_one_flat_node_not_a_deep_tree() {
    for (op, n) in [(" /\\ ", 60_000), (" \\/ ", 60_000)] {
        let src = chain(n, op);
        let c = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                let c = load(&src).expect("a flat chain is accepted");
                let cond = c.test.exists.clone();
                let terms = match &cond {
                    Cond::And(t) | Cond::Or(t) => t.len(),
                    other => panic!("not a chain: {other:?}"),
                };
                assert_eq!(terms, n);
                assert!(holds(&cond, &state()));
                assert!(format!("{cond:?}").len() > n);
                assert_eq!(super::verdict::key(&cond, &state()), "P0:r1=1;");
                c
            })
            .unwrap()
            .join()
            .unwrap();
        drop(c);
    }
    // Precedence holds in the flat form: /\ binds tighter than \/.
    let c = load(&format!(
        "{HEAD}P0 {{ r1 = 1 }}\nexists (P0:r1 = 2 /\\ P0:r1 = 1 \\/ P0:r1 = 1 /\\ true)\n"
    ))
    .unwrap();
    let Cond::Or(terms) = &c.test.exists else {
        panic!("{:?}", c.test.exists)
    };
    assert!(terms
        .iter()
        .all(|t| matches!(t, Cond::And(a) if a.len() == 2)));
    assert!(holds(&c.test.exists, &state()));
}

#[test]
fn region_sizes_that_overflow_or_do_not_fit_are_one_message() {
    use super::compile::{MAX_REGION_PAGES, REGION_BASE};
    // ../shared/repro/region-pages-overflow.litmus: 2^52 pages.
    assert_err(
        "cowlab t\n{ region buf 4503599627370496 rw }\nP0 { buf[0] = 1\n r1 = buf[0] }\nexists (P0:r1 = 1)",
        "region 'buf' of 4503599627370496 pages does not fit",
    );
    // ../shared/repro/regions-sum-overflow.litmus: two of 2^63 - 1.
    let e = assert_err(
        "cowlab t\n{ region a 9223372036854775807 rw\n region b 9223372036854775807 rw }\nP0 { r1 = 1 }\nexists (P0:r1 = 1)",
        "region 'a' of 9223372036854775807 pages does not fit",
    );
    assert_eq!((e.pos.line, e.pos.col), (2, 3));
    for pages in [u64::MAX, u64::MAX / 4096, u64::MAX / 4096 + 1, 1 << 60] {
        assert_err(
            &format!("cowlab t\n{{ region a {pages} rw }}\nP0 {{ }}\nexists (true)"),
            "does not fit",
        );
    }
    // The most that fits, in one region or two; one page more does not.
    let one = MAX_REGION_PAGES - 1;
    let c = load(&format!(
        "cowlab t\n{{ region a {one} rw }}\nP0 {{ r1 = a[{}] }}\nexists (true)",
        one * 512 - 1
    ))
    .expect("the largest region");
    assert_eq!(c.regions[0].addr, REGION_BASE);
    assert_err(
        &format!(
            "cowlab t\n{{ region a {one} rw }}\nP0 {{ r1 = a[{}] }}\nexists (true)",
            one * 512
        ),
        "outside region 'a'",
    );
    let half = MAX_REGION_PAGES / 2 - 1;
    let two =
        format!("cowlab t\n{{ region a {half} rw\n region b {half} rw }}\nP0 {{ }}\nexists (true)");
    load(&two).expect("two halves");
    let e = assert_err(
        &two.replace(&format!("b {half}"), &format!("b {}", half + 1)),
        &format!("region 'b' of {} pages does not fit", half + 1),
    );
    assert!(
        e.msg.ends_with(&format!("({} before this one)", half + 1)),
        "{e}"
    );
    // A schedule or rule naming a huge region is placed from the same map.
    let c = load(&format!(
        "cowlab t\n{{ region a {half} rw\n region b 1 rw }}\nP0 {{ }}\nexists (true)\ninject count@fault:enter[b]\n"
    ))
    .unwrap();
    let b = c.regions.iter().find(|r| r.name == "b").unwrap();
    assert_eq!(b.addr, REGION_BASE + (half + 1) * 4096);
    assert_eq!(c.rules[0].addr, Some((b.addr, b.addr + 4096)));
}

#[test]
fn an_expect_line_must_name_a_preset() {
    let e = assert_err(
        "cowlab t\nP0 { }\nexists (true)\nexpect linux-1.0 Never\n",
        "unknown policy 'linux-1.0' (presets: mainline, ",
    );
    assert_eq!((e.pos.line, e.pos.col), (4, 8));
    assert!(
        e.msg.contains(&crate::policy::Policy::preset_names()),
        "{e}"
    );
    for name in crate::policy::Policy::preset_names().split(", ") {
        load(&format!(
            "cowlab t\nP0 {{ }}\nexists (true)\nexpect {name} Never\n"
        ))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// Whether a message can go to a terminal as it is: one line, no control
/// or invisible characters.
fn clean(msg: &str) -> bool {
    !msg.chars().any(|c| {
        c.is_control() || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
    })
}

#[test]
fn control_and_invisible_characters_are_refused_and_shown_escaped() {
    for (bad, shown) in [
        ('\u{1b}', "\\u{1b}"),
        ('\0', "\\0"),
        ('\u{7f}', "\\u{7f}"),
        ('\u{85}', "\\u{85}"),
        ('\u{7}', "\\u{7}"),
        ('\u{c}', "\\u{c}"),
        ('\u{feff}', "\\u{feff}"),
        ('\u{202e}', "\\u{202e}"),
        ('\u{200b}', "\\u{200b}"),
    ] {
        // In the name, a statement, the exists clause, a comment ('@').
        for (src, line, col) in [
            ("cowlab t@\nP0 { r1 = 1 }\nexists (P0:r1 = 1)\n", 1, 9),
            ("cowlab t\nP0 { @r1 = 1 }\nexists (P0:r1 = 1)\n", 2, 6),
            ("cowlab t\nP0 { r1 = 1 }\nexists (@P0:r1 = 1)\n", 3, 9),
            (
                "cowlab t # a @ comment\nP0 { r1 = 1 }\nexists (P0:r1 = 1)\n",
                1,
                14,
            ),
        ] {
            let e = err(&src.replace('@', &bad.to_string()));
            let msg = e.to_string();
            assert!(clean(&msg), "{msg:?}");
            assert!(
                msg.contains(&format!("character '{shown}' is not allowed")),
                "{bad:?} in {src:?}: {msg:?}"
            );
            assert_eq!(
                (e.pos.line, e.pos.col),
                (line, col),
                "{bad:?} in {src:?}: {msg}"
            );
        }
    }
    // Tabs and CR LF line ends are text.
    let ok = "cowlab t\nP0 { r1 = 1 }\nexists (P0:r1 = 1)\n";
    load(&ok.replace('\n', "\r\n").replace(' ', "\t")).expect("tabs and CR LF");
}

#[test]
fn a_leading_byte_order_mark_is_skipped() {
    let src = "cowlab t\nP0 { r1 = 1 }\nexists (P0:r1 = 1)\n";
    let with = load(&format!("\u{feff}{src}")).expect("a BOM first is accepted");
    assert_eq!(with.test, load(src).unwrap().test);
    // Positions do not count it.
    let e = err("\u{feff}cowlab t\nP0 { frob }\nexists (true)\n");
    assert_eq!((e.pos.line, e.pos.col), (2, 6), "{e}");
    // Only one, and only first.
    assert_err(
        &format!("\u{feff}\u{feff}{src}"),
        "character '\\u{feff}' is not allowed",
    );
}

#[test]
fn non_ascii_text_is_kept_whole_and_columns_count_characters() {
    let c =
        load("cowlab tëst-α\n\"Gödel's   λ\ntest\"\nP0 { r1 = 1 }\nexists (P0:r1 = 1)\n").unwrap();
    assert_eq!(c.test.name, "tëst-α");
    assert_eq!(c.test.description.as_deref(), Some("Gödel's λ test"));
    // Found 'é' (not two Latin-1 characters), at the column a reader counts.
    let e = err("cowlab t\nP0 { r1 = 1; é }\nexists (true)\n");
    assert_eq!(e.to_string(), "2:14: expected a statement, found 'é'");
    let e = err("cowlab t\nP0 { r1 = ü }\nexists (true)\n");
    assert_eq!(
        e.to_string(),
        "2:11: expected a value, a memory word or a call, found 'ü'"
    );
    let e = err("cowlab ü\nP0 { r1 = 1 } ü\nexists (true)\n");
    assert!(e.to_string().starts_with("2:15: "), "{e}");
    // A policy with non-ASCII is shown as is (printable).
    assert_err(
        "cowlab t\nP0 { }\nexists (true)\nexpect mäinline Never\n",
        "unknown policy 'mäinline'",
    );
}

/// SplitMix64: a small deterministic generator, so a failure names the
/// exact input (file, case) that reproduces it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// In `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Text that the grammar treats specially, or that is too big, deep,
/// unknown or not plain text: what a mutation may insert.
pub(crate) const SNIPPETS: &[&str] = &[
    "(",
    ")",
    "{",
    "}",
    "[",
    "]",
    "~",
    "/\\",
    "\\/",
    ";",
    "\n",
    "#",
    "\"",
    "*",
    "=",
    "<",
    "@",
    ":",
    "0x",
    "_",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    "0xffffffffffffffff",
    "4503599627370496",
    "r9",
    "r10",
    "r15",
    "r255",
    "P0",
    "P99",
    "C0",
    "C9",
    "T0",
    "loop 2 {",
    "loop until e {",
    "((((((((",
    "~~~~~~~~",
    "exists",
    "expect",
    "schedule {",
    "inject",
    "runs",
    "region z 9223372036854775807 rw",
    "fork C0",
    "spawn T0",
    "wait C0",
    "wait r1",
    "P0:segv",
    "true",
    "expect linux-1.0 Never",
    "expect mainline",
    "\u{feff}",
    "\u{1b}[31m",
    "\0",
    "\u{202e}",
    "é",
    "λ",
    "\u{10ffff}",
    "\r",
    "\t",
];

/// One mutation of `src`: a bit flip, a byte replaced, a truncation, a
/// line duplicated, deleted or swapped, a token deleted or duplicated, or
/// a snippet inserted.
fn mutate(src: &mut Vec<u8>, rng: &mut Rng) {
    if src.is_empty() {
        src.extend_from_slice(SNIPPETS[rng.below(SNIPPETS.len())].as_bytes());
        return;
    }
    let at = rng.below(src.len());
    let lines = |src: &[u8]| -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        let mut from = 0;
        for (i, b) in src.iter().enumerate() {
            if *b == b'\n' {
                v.push((from, i + 1));
                from = i + 1;
            }
        }
        if from < src.len() {
            v.push((from, src.len()));
        }
        v
    };
    match rng.below(9) {
        0 => src[at] ^= 1 << rng.below(8),
        1 => {
            let special = b"(){}[]~/\\;\n#\"*=<@:0x9_rPCT \x00\x1b\xff\xc3";
            src[at] = special[rng.below(special.len())];
        }
        2 => src.truncate(at),
        3..=5 => {
            let l = lines(src);
            let (a, b) = l[rng.below(l.len())];
            match rng.below(3) {
                0 => {
                    let line = src[a..b].to_vec();
                    src.splice(a..a, line);
                }
                1 => {
                    src.drain(a..b);
                }
                _ => {
                    let (c, d) = l[rng.below(l.len())];
                    if d <= a {
                        let (x, y) = (src[c..d].to_vec(), src[a..b].to_vec());
                        src.splice(a..b, x);
                        src.splice(c..d, y);
                    }
                }
            }
        }
        6 | 7 => {
            // A token: a run of non-blanks around `at`.
            let blank = |b: u8| b.is_ascii_whitespace();
            let mut a = at;
            while a > 0 && !blank(src[a - 1]) {
                a -= 1;
            }
            let mut b = at;
            while b < src.len() && !blank(src[b]) {
                b += 1;
            }
            if rng.below(2) == 0 {
                src.drain(a..b);
            } else {
                let token = src[a..b].to_vec();
                src.splice(b..b, token.into_iter().chain([b' ']));
            }
        }
        _ => {
            let s = SNIPPETS[rng.below(SNIPPETS.len())].as_bytes();
            src.splice(at..at, s.iter().copied());
        }
    }
}

/// Every built-in test mutated [`CASES`] times (1 to 4 stacked mutations
/// each): parse + compile returns, never panics, and every message is one
/// clean line. Kept under a few seconds in a debug build.
#[test]
fn mutated_builtin_tests_never_panic_and_every_message_is_clean() {
    const CASES: usize = 1_600;
    let (mut accepted, mut refused) = (0usize, 0usize);
    let mut panics = Vec::new();
    let started = std::time::Instant::now();
    for (i, (name, src, _)) in super::builtin::TESTS.iter().enumerate() {
        let mut rng = Rng(0x636f_776c_6162 ^ i as u64);
        for case in 0..CASES {
            let mut bytes = src.as_bytes().to_vec();
            for _ in 0..1 + rng.below(4) {
                mutate(&mut bytes, &mut rng);
            }
            let text = String::from_utf8_lossy(&bytes).into_owned();
            match std::panic::catch_unwind(|| load(&text).map(|c| (c.test.clone(), c))) {
                Ok(Ok(_)) => accepted += 1,
                Ok(Err(e)) => {
                    refused += 1;
                    let msg = e.to_string();
                    assert!(clean(&msg), "{name} case {case}: {msg:?} for {text:?}");
                }
                Err(_) => panics.push(format!("{name} case {case}: {text:?}")),
            }
        }
    }
    eprintln!(
        "{} mutated tests: {accepted} accepted, {refused} refused, {} panics, in {:.1?}",
        accepted + refused + panics.len(),
        panics.len(),
        started.elapsed()
    );
    assert!(panics.is_empty(), "{}", panics.join("\n"));
    assert!(accepted > 0 && refused > accepted, "{accepted} {refused}");
}

#[test]
fn docs_litmus_md_states_the_limits_the_code_enforces() {
    let doc = include_str!("../../../docs/litmus.md");
    assert!(doc.contains(&format!("at most {MAX_NESTING} levels")));
    assert!(doc.contains(&format!("nesting deeper than {MAX_NESTING} levels")));
    let pages = super::compile::MAX_REGION_PAGES.to_string();
    let mut grouped = String::new();
    for (i, d) in pages.chars().enumerate() {
        if i > 0 && (pages.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(d);
    }
    assert!(
        doc.contains(&format!("{grouped} pages in all")),
        "{grouped}"
    );
    assert_eq!(super::compile::REGION_END, 0x7e00_0000_0000);
    assert!(doc.contains("must end by `0x7e00_0000_0000`"));
}
