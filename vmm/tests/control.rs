//! The control socket as a client sees it: lifecycle, commands, events,
//! and bad input that must not disturb the VM.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{cowlab_within, text, Running};
use serde_json::{json, Value};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cowlab"))
}

/// A fresh socket path for test `name`.
fn sock(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("cowlab-ctl-{}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// Starts `cowlab ARGS --control PATH` and waits (20 s at most) for its
/// socket; the guard kills it if the test fails before [`finish`].
fn start(path: &Path, args: &[&str]) -> Running {
    let child = bin()
        .args(args)
        .arg("--control")
        .arg(path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cowlab");
    let mut child = Running::new(child, format!("cowlab {args:?}"));
    let until = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(Instant::now() < until, "no socket at {}", path.display());
        if let Some(status) = child.child().try_wait().unwrap() {
            panic!("cowlab {args:?} ended ({status}) before its socket appeared");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// The command's output once it ends (60 s at most, else it is killed).
fn finish(child: Running) -> Output {
    child.output_within(Duration::from_secs(60))
}

/// `cowlab ctl --socket PATH ARGS`, 30 s at most.
fn ctl(path: &Path, args: &[&str]) -> Output {
    let mut all = vec!["ctl", "--socket", path.to_str().unwrap()];
    all.extend_from_slice(args);
    cowlab_within(&all, Duration::from_secs(30))
}

/// A raw protocol client.
struct Client {
    out: UnixStream,
    input: BufReader<UnixStream>,
    events: Vec<Value>,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let out = UnixStream::connect(path).expect("connect");
        out.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let input = BufReader::new(out.try_clone().unwrap());
        let mut c = Client {
            out,
            input,
            events: Vec::new(),
        };
        let greeting = c.line().expect("a greeting");
        assert!(
            greeting["QMP"]["version"]["cowlab"].is_string(),
            "{greeting}"
        );
        c
    }

    fn line(&mut self) -> Option<Value> {
        let mut s = String::new();
        match self.input.read_line(&mut s) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&s).expect("every line is JSON")),
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        if let Err(e) = self.out.write_all(bytes) {
            // The server closed the connection: the command ended.
            let mut events = std::mem::take(&mut self.events);
            while let Some(v) = self.line() {
                events.push(v);
            }
            panic!(
                "sending {:?}: {e}; what the server sent meanwhile: {events:?}",
                text(bytes)
            );
        }
    }

    /// The next non-event line; events on the way are kept.
    fn reply(&mut self) -> Value {
        loop {
            let v = self.line().expect("a reply");
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    fn ask(&mut self, execute: &str, arguments: Value) -> Value {
        let req = json!({ "execute": execute, "arguments": arguments, "id": execute });
        self.send_raw(format!("{req}\n").as_bytes());
        let r = self.reply();
        assert_eq!(r["id"], execute, "{r}");
        r
    }

    /// Every event until the server closes the connection.
    fn drain(mut self) -> Vec<Value> {
        while let Some(v) = self.line() {
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
        self.events
    }
}

fn status(c: &mut Client) -> Value {
    c.ask("query-status", json!({}))["return"].clone()
}

/// Polls `query-status` until `ready` holds of it (10 s at most).
fn status_when(c: &mut Client, ready: impl Fn(&Value) -> bool) -> Value {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let st = status(c);
        if ready(&st) {
            return st;
        }
        assert!(Instant::now() < until, "{st}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn vcpu_states(st: &Value) -> Vec<String> {
    st["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["state"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_socket_is_private_and_gone_after_the_run() {
    let path = sock("lifecycle");
    let child = start(&path, &["run", "hello", "--vcpus", "2", "--wait"]);
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let out = ctl(&path, &["cont"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = finish(child);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 2);
    assert!(!path.exists(), "the socket is removed on exit");
}

#[test]
fn a_file_or_a_live_socket_is_never_replaced_but_a_stale_one_is() {
    let path = sock("occupied");
    std::fs::write(&path, "precious").unwrap();
    let out = cowlab_within(
        &["run", "hello", "--control", path.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    std::fs::remove_file(&path).unwrap();

    let live = UnixListener::bind(&path).unwrap();
    let out = cowlab_within(
        &["run", "hello", "--control", path.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("another process"));
    drop(live); // leaves a stale socket file behind
    assert!(path.exists());
    let out = cowlab_within(
        &["run", "hello", "--control", path.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn wait_holds_every_vcpu_and_cont_lets_one_or_all_go() {
    let path = sock("wait");
    let child = start(
        &path,
        &[
            "run",
            "fork-vma-lock",
            "--policy",
            "linux-6.4",
            "--runs",
            "1",
            "--wait",
        ],
    );
    let mut c = Client::connect(&path);
    // The socket is up before the run begins and before its boot vCPUs
    // park (before their first instruction): between the two a status
    // may say "running" or name no test yet.
    let st = status_when(&mut c, |st| {
        st["what"] == "fork-vma-lock" && vcpu_states(st) == ["stopped", "stopped", "stopped"]
    });
    assert_eq!(st["status"], "paused", "{st}");
    assert!(c.ask("cont", json!({ "vcpu": 0 }))["return"].is_object());
    // vCPU 0 leaves the park; the others stay in it.
    let st = status_when(&mut c, |st| vcpu_states(st)[0] != "stopped");
    let states = vcpu_states(&st);
    assert_eq!(&states[1..], ["stopped", "stopped"], "{st}");
    assert_eq!(st["run"], 1);
    drop(c);
    let out = ctl(&path, &["cont"]);
    assert_eq!(out.status.code(), Some(0));
    let out = finish(child);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Observation fork-vma-lock Always 1 0"));
}

#[test]
fn rules_injected_over_the_socket_act_and_events_follow_each_run() {
    let path = sock("events");
    let child = start(
        &path,
        &[
            "run",
            "fork-vma-lock",
            "--policy",
            "linux-6.4",
            "--runs",
            "2",
            "--wait",
        ],
    );
    let mut c = Client::connect(&path);
    let r = c.ask("inject", json!({ "rule": "count@fork:enter" }));
    assert!(r["return"]["id"].is_u64(), "{r}");
    let r = c.ask("query-rules", json!({}));
    assert_eq!(r["return"][0]["rule"], "count@fork:enter", "{r}");
    let points = c.ask("query-points", json!({}));
    assert!(points["return"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "fork:after_wrprotect"));
    c.ask("cont", json!({}));
    let events = c.drain();
    let named = |n: &str| events.iter().filter(|e| e["event"] == n).count();
    assert_eq!(named("POINT_HIT"), 2, "one fork per run: {events:?}");
    assert_eq!(named("RUN_FINISHED"), 2, "{events:?}");
    assert_eq!(named("SHUTDOWN"), 1, "{events:?}");
    assert!(named("VCPU_ENDED") >= 8, "4 threads per run: {events:?}");
    let hit = events.iter().find(|e| e["event"] == "POINT_HIT").unwrap();
    assert_eq!(hit["data"]["point"], "fork:enter");
    assert_eq!(hit["data"]["vcpu"], 2);
    assert!(hit["timestamp"]["seconds"].is_u64());
    assert_eq!(finish(child).status.code(), Some(0));
}

#[test]
fn set_knob_applies_from_the_next_run() {
    let path = sock("knob");
    let child = start(
        &path,
        &[
            "run",
            "fork-vma-lock",
            "--policy",
            "linux-6.4",
            "--runs",
            "2",
            "--wait",
            "--json",
        ],
    );
    // Run 1 already exists (held by --wait); run 2 locks the VMAs in fork.
    let out = ctl(&path, &["set-knob", "knob=fork_lock_vmas", "value=on"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("next run"));
    assert_eq!(ctl(&path, &["cont"]).status.code(), Some(0));
    let out = finish(child);
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON result");
    let text = v.to_string();
    assert!(text.contains("unreachable"), "run 2 is unreachable: {text}");
    assert_eq!(v["positive"], 1, "{text}");
}

#[test]
fn quit_ends_the_command_early() {
    let path = sock("quit");
    let child = start(
        &path,
        &[
            "run",
            "fork-vma-lock",
            "--policy",
            "linux-6.4",
            "--runs",
            "100000",
            "--wait",
        ],
    );
    let out = ctl(&path, &["quit"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = finish(child);
    let stdout = text(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("Observation"))
        .expect("a result");
    let runs: u64 = line
        .split_whitespace()
        .rev()
        .take(2)
        .map(|n| n.parse::<u64>().unwrap())
        .sum();
    assert!(runs < 100000, "{stdout}");
    // The runs that finished are the result; with none (quit while the
    // first was held by --wait) nothing was checked, and nothing failed.
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(!stdout.contains("NOT met"), "{stdout}");
    assert_eq!(runs == 0, stdout.contains("No run finished"), "{stdout}");
    assert!(!path.exists());
}

#[test]
fn bad_input_gets_errors_and_leaves_the_vm_alone() {
    let path = sock("robust");
    let child = start(
        &path,
        &[
            "run",
            "fork-vma-lock",
            "--policy",
            "linux-6.4",
            "--runs",
            "3",
            "--wait",
        ],
    );
    let mut c = Client::connect(&path);
    for (raw, class) in [
        // A value may span lines: this one is wrong only once it closes.
        ("{\"execute\": \n}\n", "GenericError"),
        ("garbage\n", "GenericError"),
        ("garbage, more garbage } {\n", "GenericError"),
        (
            "{\"execute\": \"stop\", \"execute\": \"cont\"}",
            "GenericError",
        ),
        (
            "{\"execute\": \"stop\", \"arguments\": {\"vcpu\": 1, \"cpu\": 1}}",
            "GenericError",
        ),
        ("[\"stop\"]\n", "GenericError"),
        ("{\"execute\": \"self-destruct\"}\n", "CommandNotFound"),
        (
            "{\"execute\": \"stop\", \"arguments\": {\"vcpu\": -1}}\n",
            "GenericError",
        ),
        (
            "{\"execute\": \"inject\", \"arguments\": {\"rule\": 5}}\n",
            "GenericError",
        ),
        (
            "{\"execute\": \"uninject\", \"arguments\": {\"id\": \"1\"}}\n",
            "GenericError",
        ),
        ("\u{0}\u{1}\u{ff}\n", "GenericError"),
    ] {
        c.send_raw(raw.as_bytes());
        let r = c.reply();
        assert_eq!(r["error"]["class"], class, "{raw:?}: {r}");
    }
    // Blank lines are ignored; the connection still works, with requests
    // back to back (no newline, as qemu.qmp sends them) or split anywhere.
    c.send_raw(b"\n\n");
    c.send_raw(br#"{"execute":"query-status","id":1}{"execute":"query-rules","id":2}[]{"exec"#);
    assert_eq!(c.reply()["id"], 1);
    assert_eq!(c.reply()["id"], 2);
    assert_eq!(c.reply()["error"]["desc"], "a request is a JSON object");
    c.send_raw(br#"ute":"query-status","id":3}"#);
    assert_eq!(c.reply()["id"], 3);
    // QMP's reset: a control character ends a half-sent request.
    c.send_raw(b"{\"execute\": \"sto");
    c.send_raw(b"\x01\n");
    assert_eq!(c.reply()["error"]["class"], "GenericError");
    // (paused once run 1's vCPUs have parked: they may still be starting)
    status_when(&mut c, |s| s["status"] == "paused");

    // An endless line: an error, then the connection is closed.
    let mut big = Client::connect(&path);
    let chunk = vec![b'x'; 80 * 1024];
    let _ = big.out.write_all(&chunk);
    let r = big.reply();
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("longer than"),
        "{r}"
    );
    assert!(big.line().is_none(), "closed after an over-long line");

    // A client that leaves in the middle of a line.
    let mut half = Client::connect(&path);
    half.send_raw(b"{\"execute\": \"qu");
    drop(half);

    // Several clients at once.
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let p = path.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&p);
                (0..20).all(|_| status(&mut c)["what"] == "fork-vma-lock")
            })
        })
        .collect();
    for t in threads {
        assert!(t.join().unwrap());
    }
    assert_eq!(
        status(&mut c)["status"],
        "paused",
        "no request started the VM"
    );
    c.ask("cont", json!({}));
    let out = finish(child);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("Observation fork-vma-lock Always 3 0"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn cowlab_ctl_reports_usage_connection_and_command_errors() {
    let path = sock("ctl-errors");
    let out = ctl(&path, &["query-status"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains("cannot connect"));
    let child = start(&path, &["run", "hello", "--wait"]);
    let out = ctl(&path, &["stop", "vcpu"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = ctl(&path, &["stop", "vcpu=first"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr).lines().count(), 1);
    assert!(text(&out.stderr).contains("GenericError"));
    let out = ctl(&path, &["query-status"]);
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["status"], "paused");
    assert_eq!(ctl(&path, &["cont"]).status.code(), Some(0));
    assert_eq!(finish(child).status.code(), Some(0));

    let out = cowlab_within(&["run", "hello", "--wait"], Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--wait needs --control"));
}

#[test]
fn a_pause_rule_is_a_breakpoint_that_cont_releases() {
    let path = sock("breakpoint");
    let child = start(
        &path,
        &[
            "run",
            "fork-vma-lock",
            "--policy",
            "linux-6.4",
            "--runs",
            "1",
            "--wait",
        ],
    );
    let mut c = Client::connect(&path);
    let r = c.ask("inject", json!({ "rule": "pause@fork:after_wrprotect/v2" }));
    let id = r["return"]["id"].as_u64().unwrap();
    c.ask("cont", json!({}));
    let st = status_when(&mut c, |st| st["vcpus"][2]["state"] == "paused");
    assert_eq!(st["vcpus"][2]["point"], "fork:after_wrprotect", "{st}");
    // Held at a breakpoint, the schedule waits rather than giving up.
    std::thread::sleep(Duration::from_millis(600));
    let st = status(&mut c);
    assert_eq!(st["vcpus"][2]["state"], "paused", "{st}");
    assert!(c.ask("uninject", json!({ "id": id }))["return"].is_object());
    c.ask("cont", json!({ "vcpu": 2 }));
    let events = c.drain();
    assert!(events
        .iter()
        .any(|e| e["event"] == "POINT_HIT" && e["data"]["point"] == "fork:after_wrprotect"));
    let out = finish(child);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("Observation fork-vma-lock Always 1 0"));
}

#[test]
fn a_stop_for_a_vcpu_the_run_lacks_holds_nothing() {
    // Only parked vCPUs suspend the watchdog and deadlock detection: the
    // mainline schedule is still found unreachable in every run.
    let path = sock("phantom");
    let child = start(
        &path,
        &[
            "run",
            "fork-vma-lock",
            "--policy",
            "mainline",
            "--runs",
            "3",
            "--wait",
            "--json",
        ],
    );
    let out = ctl(&path, &["stop", "vcpu=9"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = ctl(&path, &["set-knob", "knob=tlb_capacity", "value=64"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "numbers are knob values: {}",
        text(&out.stderr)
    );
    // Everything but the phantom vCPU 9 goes on.
    let r = ctl(&path, &["cont"]);
    assert_eq!(r.status.code(), Some(0));
    assert_eq!(ctl(&path, &["stop", "vcpu=9"]).status.code(), Some(0));
    let out = finish(child);
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON result");
    assert_eq!(v["runs"], 3, "{v}");
    assert_eq!(v["histogram"][0]["state"], "unreachable;", "{v}");
    assert_eq!(v["histogram"][0]["count"], 3, "{v}");
}

#[test]
fn query_status_says_why_a_vcpu_waits() {
    let path = sock("blocked");
    let child = start(
        &path,
        &[
            "run",
            "fork-vma-lock",
            "--policy",
            "linux-6.4",
            "--runs",
            "1",
            "--wait",
        ],
    );
    let mut c = Client::connect(&path);
    let id = c.ask(
        "inject",
        json!({ "rule": "pause@wp_page_copy:after_copy/v1" }),
    )["return"]["id"]
        .as_u64()
        .unwrap();
    c.ask("cont", json!({}));
    let st = status_when(&mut c, |st| {
        vcpu_states(st) == ["blocked", "paused", "blocked"]
    });
    let why = st["vcpus"][0]["why"].as_str().unwrap();
    assert!(why.contains("v0 waits at guest:write"), "{st}");
    c.ask("uninject", json!({ "id": id }));
    c.ask("cont", json!({}));
    drop(c);
    let out = finish(child);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
}

#[test]
fn trace_start_and_stop_record_the_runs_between_them() {
    let path = sock("trace");
    let file = std::env::temp_dir().join(format!("cowlab-ctl-{}-trace.bin", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let child = start(
        &path,
        &[
            "run",
            "fork-vma-lock",
            "--policy",
            "linux-6.4",
            "--runs",
            "3",
            "--wait",
            "--json",
        ],
    );
    let mut c = Client::connect(&path);
    // Run 1's VM exists (held by --wait): the trace starts with it.
    status_when(&mut c, |s| {
        s["run"] == 1 && s["vcpus"].as_array().is_some_and(|v| !v.is_empty())
    });
    let r = c.ask("trace-start", json!({ "file": file.to_str().unwrap() }));
    assert_eq!(r["return"]["from"], "this run", "{r}");
    // One trace at a time; a missing argument is an error.
    let r = c.ask("trace-start", json!({ "file": "/tmp/other" }));
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("trace-stop first"),
        "{r}"
    );
    let r = c.ask("trace-start", json!({}));
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    // Runs 1 and 2 recorded; stopped before run 3 (paused at its start).
    let r = c.ask("inject", json!({ "rule": "pause@fork:enter" }));
    let rule = r["return"]["id"].as_u64().unwrap();
    assert_eq!(c.ask("cont", json!({}))["return"], json!({}));
    let mut seen = 0;
    while seen < 3 {
        let st = status_when(&mut c, |s| {
            s["vcpus"].as_array().is_some_and(|v| {
                v.iter()
                    .any(|x| x["state"].as_str().unwrap_or("").starts_with("paused"))
            })
        });
        seen = st["run"].as_u64().unwrap();
        if seen == 3 {
            let r = c.ask("trace-stop", json!({}));
            assert!(r["return"]["file"].is_string(), "{r}");
            assert_eq!(
                c.ask("uninject", json!({ "id": rule }))["return"],
                json!({})
            );
        }
        assert_eq!(c.ask("cont", json!({}))["return"], json!({}));
    }
    let out = finish(child);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let records = cowlab::trace::read_trace(&std::fs::read(&file).unwrap()).unwrap();
    let begins: Vec<u64> = records
        .iter()
        .filter(|r| r.kind == cowlab::trace::Kind::RunBegin)
        .map(|r| r.words[0])
        .collect();
    assert_eq!(begins, [1, 2, 3], "run 3 began before the stop");
    let ends: Vec<&str> = records
        .iter()
        .filter(|r| r.kind == cowlab::trace::Kind::RunEnd)
        .map(|r| r.text.as_str())
        .collect();
    assert_eq!(ends, ["P0:r2=1;", "P0:r2=1;", "trace stopped"]);
    let r = ctl(&path, &["trace-stop"]);
    assert_ne!(r.status.code(), Some(0), "the run is over: no socket");
    let _ = std::fs::remove_file(&file);
}

#[test]
fn trace_start_refuses_a_fifo_and_never_writes_a_run_it_did_not_begin() {
    let path = sock("trace2");
    let dir = std::env::temp_dir();
    let pid = std::process::id();
    let (a, b, fifo) = (
        dir.join(format!("cowlab-ctl-{pid}-a.trace")),
        dir.join(format!("cowlab-ctl-{pid}-b.trace")),
        dir.join(format!("cowlab-ctl-{pid}.fifo")),
    );
    let _ = std::fs::remove_file(&fifo);
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let child = start(&path, &["run", "hello", "--wait"]);
    let mut c = Client::connect(&path);
    status_when(&mut c, |s| s["run"] == 1 && s["status"] == "paused");
    // Opening a FIFO could block the controller forever: refused at once.
    let r = c.ask("trace-start", json!({ "file": fifo.to_str().unwrap() }));
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("not a regular file"),
        "{r}"
    );
    let r = c.ask("trace-start", json!({ "file": a.to_str().unwrap() }));
    assert_eq!(r["return"]["from"], "this run", "{r}");
    assert!(c.ask("trace-stop", json!({}))["return"].is_object());
    // The VM keeps its first recorder: B starts with the next run, and
    // this command has no next run.
    let r = c.ask("trace-start", json!({ "file": b.to_str().unwrap() }));
    assert_eq!(r["return"]["from"], "the next run", "{r}");
    assert_eq!(c.ask("cont", json!({}))["return"], json!({}));
    let out = finish(child);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let read = |p: &PathBuf| cowlab::trace::read_trace(&std::fs::read(p).unwrap()).unwrap();
    let kinds: Vec<_> = read(&a).iter().map(|r| r.kind).collect();
    assert_eq!(kinds.first(), Some(&cowlab::trace::Kind::RunBegin));
    assert_eq!(kinds.last(), Some(&cowlab::trace::Kind::RunEnd));
    assert!(read(&b).is_empty(), "no lone RunEnd in B");
    for p in [&a, &b, &fifo] {
        let _ = std::fs::remove_file(p);
    }
}

/// `quit` before the run's VM is attached to the controller (the window of
/// ctl-quit-before-first-vm.py, where a `--wait` program then ran anyway),
/// forced both ways round through the library, as `cowlab run` drives it:
/// quit before the VM exists, and quit after its vCPUs exist (held by
/// `--wait`) but before the controller knows the VM.
#[test]
fn quit_before_the_vm_is_attached_still_stops_it() {
    use cowlab::control::{Controller, Server};
    use cowlab::kvm::{Outcome, Vm, VmConfig};
    use std::sync::Arc;

    for quit_first in [true, false] {
        let path = sock(&format!("quit-unattached-{quit_first}"));
        let ctl = Controller::new(true);
        let server = Server::start(&path, Arc::clone(&ctl)).unwrap();
        let mut c = Client::connect(&path);
        let quit = |c: &mut Client| assert_eq!(c.ask("quit", json!({}))["return"], json!({}));
        let mut config = VmConfig {
            vcpus: 2,
            program: cowlab_abi::Program::Hello,
            ..VmConfig::default()
        };
        ctl.begin("hello", "mainline", 1);
        if quit_first {
            quit(&mut c);
        }
        ctl.configure(&mut config).unwrap();
        let mut vm = Vm::new(&config).expect("a VM (needs /dev/kvm)");
        if !quit_first {
            quit(&mut c);
        }
        ctl.attach(vm.handle(), config.control.as_ref().unwrap(), 1);
        let report = vm.wait(Some(Duration::from_secs(30)), |e| ctl.vm_event(e));
        drop(vm);
        assert!(ctl.quit_requested());
        assert!(report.timed_out.is_none(), "quit_first={quit_first}");
        assert!(
            report.console.is_empty(),
            "quit_first={quit_first}: the program ran: {:?}",
            report.console
        );
        assert_eq!(report.vcpus.len(), 2);
        for v in &report.vcpus {
            assert!(
                matches!(v.outcome, Outcome::Stopped { .. }),
                "quit_first={quit_first}: vcpu {} {}",
                v.id,
                v.outcome
            );
            assert_eq!(v.exits, 0, "vcpu {} entered the guest after quit", v.id);
        }
        ctl.finish();
        drop(server);
        let events = c.drain();
        assert!(
            events.iter().any(|e| e["event"] == "SHUTDOWN"),
            "{events:?}"
        );
    }
}

/// The same through the CLI, as a user meets it: `quit` as the first
/// request after connecting to a `--wait` program.
#[test]
fn quit_as_the_first_request_stops_a_waiting_program() {
    let path = sock("quit-first");
    let child = start(&path, &["run", "hello", "--vcpus", "2", "--wait"]);
    let mut c = Client::connect(&path);
    c.send_raw(br#"{"execute":"quit","id":"q"}"#);
    assert_eq!(c.reply(), json!({ "return": {}, "id": "q" }));
    c.drain();
    let out = finish(child);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        !text(&out.stdout).contains("hello from"),
        "{}",
        text(&out.stdout)
    );
    let err = text(&out.stderr);
    assert_eq!(err.matches("stopped at RIP").count(), 2, "{err}");
}

/// `cowlab ctl` checks its own writes: an answer it cannot print is
/// exit 3 with one line, as for every other command (cli_hostile.rs).
#[test]
fn ctl_says_when_it_cannot_print_the_answer() {
    let path = sock("ctl-full");
    let child = start(&path, &["run", "hello", "--wait"]);
    let out = Running::new(
        bin()
            .args(["ctl", "--socket", path.to_str().unwrap(), "query-status"])
            .stdout(common::sinks::dev_full())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cowlab ctl"),
        "cowlab ctl query-status > /dev/full",
    )
    .output_within(Duration::from_secs(30));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot write to stdout: No space left"),
        "{err}"
    );
    assert_eq!(ctl(&path, &["cont"]).status.code(), Some(0));
    assert_eq!(finish(child).status.code(), Some(0));
}
