//! Fuzz harness for the three parsers of untrusted input
//! (docs/reliability.md, "Hostile input"):
//!
//! - `litmus`: a litmus source text through `parse` + `compile`
//!   (`litmus::load`), seeded from `tests/litmus/*.litmus` and the
//!   built-in tests;
//! - `control`: a client's byte stream through the control socket's
//!   framer (`control/stream.rs`) and each value it delimits through the
//!   request parser and its commands (`control/protocol.rs`), seeded from
//!   real requests (what `qemu.qmp` and `cowlab ctl` send);
//! - `trace`: a trace file's bytes through `read_trace`
//!   (`trace/format.rs`) and, if it reads, both exports, seeded from real
//!   traces (`vmm/tests/corpus/trace/`) and one record of every kind.
//!
//! Inputs are generated with proptest on the stable toolchain: a seed, then
//! up to a few mutations of it (bit flips, bytes set, truncations, ranges
//! deleted or duplicated, grammar snippets or random bytes inserted, an
//! integer of 1–8 bytes overwritten, a piece of another seed spliced in).
//! A failure is shrunk to the fewest, smallest mutations and printed. Each
//! input runs on a worker thread with the default 2 MiB stack; the harness
//! asserts that it does not panic (`catch_unwind`), that it returns within
//! [`LIMIT`] (a worker that does not is abandoned and the case reported as
//! a hang), and each target's own properties (round trips where a writer
//! exists).
//!
//! `cargo test` runs [`DEFAULT_CASES`] inputs per target;
//! `COWLAB_FUZZ_CASES=100000 cargo test --release -p cowlab --lib fuzz --
//! --nocapture` runs the long pass, `COWLAB_FUZZ_SEED=N` another sequence.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// Inputs per target in `cargo test`: a few seconds in a debug build.
const DEFAULT_CASES: u32 = 3_000;

/// The longest one input may take before it counts as a hang. Every
/// target's inputs are at most a few tens of KiB and take well under a
/// millisecond in a release build; this is generous for a debug build on
/// a loaded machine.
const LIMIT: Duration = Duration::from_secs(2);

fn cases() -> u32 {
    std::env::var("COWLAB_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

fn runner(target: &str) -> TestRunner {
    let seed: u64 = std::env::var("COWLAB_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x636f_776c_6162);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    for (i, b) in target.bytes().take(24).enumerate() {
        bytes[8 + i] = b;
    }
    let config = Config {
        cases: cases(),
        // Nothing written next to the sources; a failure prints its input.
        failure_persistence: None,
        max_shrink_iters: 2_000,
        ..Config::default()
    };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes))
}

// ---------------------------------------------------------------------
// Mutations

/// One change to a seed; positions are fractions of its length, so that
/// shrinking keeps them meaningful.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Set(Index, u8),
    Truncate(Index),
    Delete(Index, u8),
    Duplicate(Index, u8),
    Insert(Index, Vec<u8>),
    /// An integer of `width` bytes (1, 2, 4 or 8), little-endian.
    Int(Index, u8, u64),
    /// Bytes `from..from+len` of seed `seed`, inserted at `at`.
    Splice(Index, Index, Index, u8),
}

fn mutation(snippets: &'static [&'static [u8]]) -> impl Strategy<Value = Mutation> {
    let interesting = prop_oneof![
        Just(0u64),
        Just(1),
        Just(7),
        Just(8),
        Just(16),
        Just(0x7f),
        Just(0xff),
        Just(0xffff),
        Just(0x10_0000),
        Just(0x10_0001),
        Just(u32::MAX as u64),
        Just(u64::MAX),
        Just(1 << 63),
        any::<u64>(),
    ];
    prop_oneof![
        1 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), 1u8..64).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => (any::<Index>(), 1u8..64).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
        3 => (any::<Index>(), prop::sample::select(snippets)).prop_map(|(i, s)| Mutation::Insert(i, s.to_vec())),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8)).prop_map(|(i, s)| Mutation::Insert(i, s)),
        1 => (any::<Index>(), prop::sample::select(&[1u8, 2, 4, 8][..]), interesting).prop_map(|(i, w, v)| Mutation::Int(i, w, v)),
        1 => (any::<Index>(), any::<Index>(), any::<Index>(), 1u8..255).prop_map(|(s, f, a, n)| Mutation::Splice(s, f, a, n)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation, seeds: &[Vec<u8>]) {
    let at = |i: &Index, len: usize| if len == 0 { 0 } else { i.index(len) };
    let len = bytes.len();
    match m {
        Mutation::Flip(i, b) if len > 0 => bytes[at(i, len)] ^= 1 << b,
        Mutation::Set(i, b) if len > 0 => bytes[at(i, len)] = *b,
        Mutation::Truncate(i) => bytes.truncate(at(i, len)),
        Mutation::Delete(i, n) => {
            let a = at(i, len);
            bytes.drain(a..(a + *n as usize).min(len));
        }
        Mutation::Duplicate(i, n) => {
            let a = at(i, len);
            let piece = bytes[a..(a + *n as usize).min(len)].to_vec();
            bytes.splice(a..a, piece);
        }
        Mutation::Insert(i, s) => {
            let a = at(i, len + 1);
            bytes.splice(a..a, s.iter().copied());
        }
        Mutation::Int(i, w, v) => {
            let w = *w as usize;
            if len >= w {
                let a = at(i, len - w + 1);
                bytes[a..a + w].copy_from_slice(&v.to_le_bytes()[..w]);
            }
        }
        Mutation::Splice(s, f, a, n) => {
            let other = &seeds[s.index(seeds.len())];
            let from = at(f, other.len());
            let piece = &other[from..(from + *n as usize).min(other.len())];
            let a = at(a, len + 1);
            bytes.splice(a..a, piece.iter().copied());
        }
        Mutation::Flip(..) | Mutation::Set(..) => {}
    }
}

/// A seed and the mutations made to it.
fn input(
    seeds: &'static [Vec<u8>],
    snippets: &'static [&'static [u8]],
    max_mutations: usize,
) -> impl Strategy<Value = Vec<u8>> {
    (
        any::<Index>(),
        prop::collection::vec(mutation(snippets), 0..=max_mutations),
    )
        .prop_map(move |(seed, muts)| {
            let mut bytes = seeds[seed.index(seeds.len())].clone();
            for m in &muts {
                apply(&mut bytes, m, seeds);
            }
            bytes
        })
}

// ---------------------------------------------------------------------
// The driver: one worker thread per target, a deadline per input.

/// An input's answer, or the message of the panic it caused.
type Reply<O> = Result<O, Panicked>;

/// A panic's message (`panic!`'s payload as text).
struct Panicked(String);

struct Worker<O> {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Reply<O>>,
}

impl<O: Send + 'static> Worker<O> {
    fn new(name: &str, f: fn(&[u8]) -> O) -> Self {
        let (tx, in_rx) = channel::<Vec<u8>>();
        let (out_tx, rx) = channel();
        std::thread::Builder::new()
            .name(format!("fuzz-{name}"))
            .spawn(move || {
                for input in in_rx {
                    let r = catch_unwind(AssertUnwindSafe(|| f(&input))).map_err(|p| {
                        p.downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .map_or_else(|| Panicked("a panic".into()), Panicked)
                    });
                    if out_tx.send(r).is_err() {
                        break;
                    }
                }
            })
            .expect("a worker thread");
        Worker { tx, rx }
    }
}

/// What a target's pass found.
#[derive(Debug, Default)]
struct Tally {
    inputs: u64,
    /// Inputs the target accepted (a test compiled, a trace read, a
    /// request answered with `return`); the others were refused.
    accepted: u64,
    panics: u64,
    hangs: u64,
    slowest: Duration,
    slowest_len: usize,
    bytes: u64,
}

/// Runs `target` on [`cases`] inputs of `strategy`: no panic, no input
/// longer than [`LIMIT`], and whatever the target asserts itself. Returns
/// the tally; fails the test with the shrunk input if any case failed.
fn drive<S>(name: &str, strategy: S, target: fn(&[u8]) -> bool) -> Tally
where
    S: Strategy<Value = Vec<u8>>,
{
    let worker = RefCell::new(Worker::new(name, target));
    let tally = RefCell::new(Tally::default());
    let started = Instant::now();
    let result = runner(name).run(&strategy, |bytes: Vec<u8>| {
        let len = bytes.len();
        let t0 = Instant::now();
        worker
            .borrow()
            .tx
            .send(bytes.clone())
            .expect("the worker is alive");
        let reply = worker.borrow().rx.recv_timeout(LIMIT);
        let took = t0.elapsed();
        let mut t = tally.borrow_mut();
        t.inputs += 1;
        t.bytes += len as u64;
        if took > t.slowest {
            (t.slowest, t.slowest_len) = (took, len);
        }
        match reply {
            Ok(Ok(accepted)) => {
                t.accepted += u64::from(accepted);
                Ok(())
            }
            Ok(Err(Panicked(msg))) => {
                t.panics += 1;
                Err(TestCaseError::fail(format!("panicked: {msg}")))
            }
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                t.hangs += 1;
                // The stuck thread is left behind; the next input gets a
                // fresh one.
                *worker.borrow_mut() = Worker::new(name, target);
                Err(TestCaseError::fail(format!("no answer within {LIMIT:?}")))
            }
        }
    });
    let t = tally.into_inner();
    eprintln!(
        "fuzz {name}: {} inputs ({} accepted, {} refused; {:.1} KiB), {} panics, {} hangs, \
         slowest {:.1?} ({} bytes), {:.1?} in all",
        t.inputs,
        t.accepted,
        t.inputs - t.accepted,
        t.bytes as f64 / 1024.0,
        t.panics,
        t.hangs,
        t.slowest,
        t.slowest_len,
        started.elapsed()
    );
    if let Err(e) = result {
        panic!("fuzz {name}: {e}");
    }
    t
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn leak<T>(v: Vec<T>) -> &'static [T] {
    Box::leak(v.into_boxed_slice())
}

// ---------------------------------------------------------------------
// Target 1: litmus parse + compile.

/// Whether a message can go to a terminal as it is (hostile.rs's rule).
fn clean(msg: &str) -> bool {
    !msg.chars().any(|c| {
        c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
    })
}

fn litmus_target(bytes: &[u8]) -> bool {
    use crate::litmus::run::{holds, ThreadEnd};
    let src = String::from_utf8_lossy(bytes);
    match crate::litmus::load(&src) {
        Ok(c) => {
            // Everything done later with an accepted test: clone, compare,
            // print, evaluate its `exists` against a final state.
            let test = c.test.clone();
            assert_eq!(test, c.test);
            assert!(!format!("{c:?}").is_empty());
            let state: BTreeMap<String, ThreadEnd> = test
                .threads
                .iter()
                .map(|t| {
                    (
                        t.name.clone(),
                        ThreadEnd::Ok([1; cowlab_abi::bytecode::NR_REGS]),
                    )
                })
                .collect();
            let _ = holds(&test.exists, &state);
            // The same text gives the same test.
            assert_eq!(crate::litmus::load(&src).map(|d| d.test).ok(), Some(test));
            true
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(clean(&msg), "an unclean message: {msg:?}");
            false
        }
    }
}

fn litmus_seeds() -> Vec<Vec<u8>> {
    let dir = root().join("../tests/litmus");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "litmus"))
        .collect();
    files.sort();
    let mut seeds: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(
        seeds.len() >= 20,
        "{} seeds in {}",
        seeds.len(),
        dir.display()
    );
    seeds.extend(
        crate::litmus::builtin::TESTS
            .iter()
            .map(|(_, src, _)| src.as_bytes().to_vec()),
    );
    seeds
}

#[test]
fn litmus_parse_and_compile() {
    let seeds = leak(litmus_seeds());
    let snippets = leak(
        crate::litmus::hostile::SNIPPETS
            .iter()
            .map(|s| s.as_bytes())
            .collect(),
    );
    // Every seed is a valid test.
    for s in seeds {
        assert!(litmus_target(s), "{}", String::from_utf8_lossy(s));
    }
    let t = drive("litmus", input(seeds, snippets, 4), litmus_target);
    assert!(t.accepted > 0 && t.accepted < t.inputs, "{t:?}");
}

// ---------------------------------------------------------------------
// Target 2: the control stream and requests.

fn control_target(bytes: &[u8]) -> bool {
    use crate::control::protocol::respond;
    use crate::control::stream::{Framer, Item};
    // The first byte says where the stream is split into reads.
    let (&step, stream) = bytes.split_first().unwrap_or((&0, &[]));
    let whole = Framer::new().push(stream);
    let mut f = Framer::new();
    let mut split = Vec::new();
    for piece in stream.chunks(1 + usize::from(step)) {
        split.extend(f.push(piece));
    }
    assert_eq!(whole, split, "how the stream is read changed its items");
    // One controller per connection; no file is ever created (trace-start
    // is refused as when --trace is given: its arguments are still read).
    let ctl = crate::control::Controller::new(false);
    ctl.set_cli_trace();
    let mut answered = false;
    for item in whole {
        let Item::Value(v) = item else { continue };
        // A delimited value, sent alone, is delimited the same.
        let mut alone = v.clone();
        alone.push(b'\n');
        assert_eq!(Framer::new().push(&alone), [Item::Value(v.clone())]);
        let r = respond(&ctl, &v);
        let obj = r.as_object().expect("a response is an object");
        assert!(
            obj.contains_key("return") != obj.contains_key("error"),
            "{r}"
        );
        assert!(obj
            .keys()
            .all(|k| ["return", "error", "id"].contains(&k.as_str())));
        if let Some(e) = obj.get("error") {
            assert!(e["class"].is_string() && e["desc"].is_string(), "{r}");
        } else {
            answered = true;
        }
        // What is sent reads back as the same value.
        let text = serde_json::to_string(&r).unwrap();
        assert!(!text.contains('\n'));
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), r);
    }
    answered
}

/// Real requests: what `qemu.qmp` sends (compact, no newline, its ids),
/// what `cowlab ctl` and the docs send, every command with its arguments,
/// and the malformed ones of the protocol's tests.
const REQUESTS: &[&str] = &[
    r#"{"execute":"qmp_capabilities","arguments":{},"id":"__qmp#00000"}"#,
    r#"{"execute":"query-status","id":"__qmp#00001"}"#,
    r#"{"execute": "qmp_capabilities"}"#,
    r#"{"execute": "qmp_capabilities", "arguments": {"enable": []}}"#,
    r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#,
    r#"{"execute": "query-commands"}"#,
    r#"{"execute": "query-status"}"#,
    r#"{"execute": "stop"}"#,
    r#"{"execute": "stop", "arguments": {"vcpu": 1}, "id": 3}"#,
    r#"{"execute": "cont", "arguments": {"vcpu": 0}}"#,
    r#"{"execute": "cont", "arguments": null}"#,
    r#"{"execute": "inject", "arguments": {"rule": "pause@fork:after-copy"}, "id": 7}"#,
    r#"{"execute": "inject", "arguments": {"rule": "delay=5ms@fault:fill/v1"}}"#,
    r#"{"execute": "inject", "arguments": {"rule": "count@fault:enter[buf]"}}"#,
    r#"{"execute": "uninject", "arguments": {"id": 1}}"#,
    r#"{"execute": "query-rules"}"#,
    r#"{"execute": "set-knob", "arguments": {"knob": "fork_lock_vmas", "value": "off"}}"#,
    r#"{"execute": "set-knob", "arguments": {"knob": "tlb_capacity", "value": 64}}"#,
    r#"{"execute": "query-points"}"#,
    r#"{"execute": "trace-start", "arguments": {"file": "run.trace"}}"#,
    r#"{"execute": "trace-stop"}"#,
    r#"{"execute": "quit"}"#,
    "{\n  \"execute\":\n  \"stop\"\n}",
    r#"{"execute": "stop", "execute": "cont"}"#,
    r#"{"execute": "stop", "arguments": {"vcpu": 100000}}"#,
    r#"{"execute": "uninject", "arguments": {"id": -1}}"#,
    r#"{"execute": "frobnicate", "id": "x"}"#,
    r#"[1, 2.5e300, -0, "\u001b[2J", true, null]"#,
    "\x01\n",
];

const JSON_SNIPPETS: &[&[u8]] = &[
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
    b"\r\n",
    b"\x00",
    b"\x01",
    b"\xff",
    b"\xc3",
    b"\\u0000",
    b"\\ud800",
    b"\"execute\"",
    b"\"arguments\"",
    b"\"id\"",
    b"\"vcpu\"",
    b"\"rule\"",
    b"null",
    b"true",
    b"-",
    b"1e400",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"64",
    b"63",
    b"0.5",
    b"\"quit\"",
    b"\"stop\"",
    b"\"inject\"",
    b"\"set-knob\"",
    b"\"trace-start\"",
    b"[[[[[[[[",
    b"]]]]]]]]",
    b"{\"a\":{\"a\":",
    b"\"\xef\xbb\xbf\"",
];

fn control_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = REQUESTS.iter().map(|r| r.as_bytes().to_vec()).collect();
    // Sessions: a client's whole conversation, back to back (as qemu.qmp)
    // and one per line (as cowlab ctl).
    let session = [0, 1, 7, 9, 11, 15, 16, 20, 21];
    seeds.push(session.iter().flat_map(|&i| REQUESTS[i].bytes()).collect());
    seeds.push(
        session
            .iter()
            .flat_map(|&i| REQUESTS[i].bytes().chain(*b"\n"))
            .collect(),
    );
    // The first byte of an input is how it is split into reads.
    for s in &mut seeds {
        s.insert(0, 0xff);
    }
    seeds
}

#[test]
fn control_stream_and_requests() {
    let seeds = leak(control_seeds());
    for s in seeds {
        control_target(s);
    }
    let t = drive("control", input(seeds, JSON_SNIPPETS, 6), control_target);
    assert!(t.accepted > 0 && t.accepted < t.inputs, "{t:?}");
}

// ---------------------------------------------------------------------
// Target 3: the trace reader.

fn trace_target(bytes: &[u8]) -> bool {
    use crate::trace::export;
    use crate::trace::format::{encode, header, read_trace};
    let records = match read_trace(bytes) {
        Ok(r) => r,
        Err(e) => {
            assert!(e.offset <= bytes.len(), "{e}");
            return false;
        }
    };
    // Written again, the records are the same bytes (but for the zero
    // bytes a reader skips: header 10..16 and each record's byte 1).
    let mut again = header().to_vec();
    for r in &records {
        encode(&mut again, r.kind, r.track, r.ts, &r.words, &r.text);
    }
    let mut want = bytes.to_vec();
    want[10..16].fill(0);
    for r in &records {
        want[r.offset + 1] = 0;
    }
    assert_eq!(again, want, "a trace read and written again differs");
    assert_eq!(read_trace(&again).as_ref(), Ok(&records));
    // Both exports of what was read.
    let mut out = Vec::new();
    export::show(&records, None, &[], &mut out).unwrap();
    out.clear();
    export::chrome(&records, &mut out).unwrap();
    serde_json::from_slice::<serde_json::Value>(&out).expect("chrome export is JSON");
    true
}

fn trace_seeds() -> Vec<Vec<u8>> {
    use crate::trace::format::{encode, header, Kind};
    let dir = root().join("tests/corpus/trace");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "trace"))
        .collect();
    files.sort();
    let mut seeds: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(
        seeds.len() >= 2,
        "{} traces in {}",
        seeds.len(),
        dir.display()
    );
    // One record of every kind (real traces lack some: Evict, Rule).
    let mut all = header().to_vec();
    for (i, &k) in Kind::ALL.iter().enumerate() {
        let words: Vec<u64> = (0..k.words() as u64)
            .map(|w| w * 0x1000 + i as u64)
            .collect();
        let track = if i % 3 == 0 {
            crate::trace::VMM_TRACK
        } else {
            i as u16 % 4
        };
        encode(&mut all, k, track, 1000 * i as u64, &words, "fault:enter λ");
    }
    seeds.push(all);
    seeds.push(header().to_vec());
    seeds
}

#[test]
fn trace_reader() {
    let seeds = leak(trace_seeds());
    for s in seeds {
        assert!(trace_target(s));
    }
    let t = drive(
        "trace",
        input(seeds, &[b"COWTRACE", b"\x01\x00"], 4),
        trace_target,
    );
    assert!(t.accepted > 0 && t.accepted < t.inputs, "{t:?}");
}
