//! Reading a trace: one line per record (`cowlab trace show`) or Chrome
//! Trace Event JSON for ui.perfetto.dev (`cowlab trace export`).

use std::collections::BTreeMap;

use std::io::Write;

use serde_json::{json, Value};

use super::codes::{ExitReason, FaultAccess, FaultResult, LockKind, Resolution, RunEnd};
use super::format::{Kind, Record, VMM_TRACK};

/// Slices begun and not yet ended, by (run, track, kind of slice): their
/// start and name.
type OpenSlices = BTreeMap<(u64, u16, u8), Vec<(u64, String)>>;

fn track_name(track: u16) -> String {
    if track == VMM_TRACK {
        "vmm".into()
    } else {
        format!("v{track}")
    }
}

fn access(a: u64) -> &'static str {
    FaultAccess::from_code(a).map_or("exec", FaultAccess::label)
}

fn resolution(r: u64) -> &'static str {
    Resolution::from_code(r).map_or("?", Resolution::label)
}

fn fault_result(r: u64) -> &'static str {
    FaultResult::from_code(r).map_or("interrupted", FaultResult::label)
}

fn lock(l: u64) -> &'static str {
    LockKind::from_code(l).map_or("pause", LockKind::label)
}

fn addr(a: u64) -> String {
    if a == u64::MAX {
        "-".into()
    } else {
        format!("{a:#x}")
    }
}

fn exit_reason(w: &[u64]) -> String {
    match ExitReason::from_code(w[0]) {
        Some(ExitReason::Hypercall) => match cowlab_abi::Hypercall::from_u32(w[1] as u32) {
            Some(h) => format!("{h:?}"),
            None => format!("hypercall {}", w[1]),
        },
        Some(r) => r.label().into(),
        None => ExitReason::Other.label().into(),
    }
}

/// The event's fields in words, without its kind and track.
pub fn describe(r: &Record) -> String {
    let w = &r.words;
    match r.kind {
        Kind::RunBegin => format!("run {} of {}", w[0], r.text),
        Kind::RunEnd => format!(
            "{}: {}",
            RunEnd::from_code(w[0]).map_or("?", RunEnd::label),
            r.text
        ),
        Kind::Exit => exit_reason(w),
        Kind::Resume => String::new(),
        Kind::Fault => format!("{:#x} {}", w[0], access(w[1])),
        Kind::FaultEnd => format!("{:#x} {}", w[0], fault_result(w[1])),
        Kind::Resolve => format!("{:#x} {}", w[0], resolution(w[1])),
        Kind::Fill => format!("{:#x} -> {:#x}", w[0], w[1]),
        Kind::Evict => format!("{:#x}", w[0]),
        Kind::FlushBegin => format!("[{:#x}, {:#x})", w[0], w[1]),
        Kind::FlushEnd => format!("{:#x}", w[0]),
        Kind::IpiSend | Kind::IpiAck => format!("to v{} #{}", w[0], w[1]),
        Kind::Pte => format!("mm{} {:#x}: {:#x} -> {:#x}", w[0], w[1], w[2], w[3]),
        Kind::Copy => format!("{:#x}: frame {:#x} -> {:#x}", w[0], w[1], w[2]),
        Kind::Pin => format!(
            "{:#x} frame {:#x} ({})",
            w[0],
            w[1],
            if w[2] == 1 { "pin" } else { "get" }
        ),
        Kind::Unpin => format!("frame {:#x}", w[0]),
        Kind::Point | Kind::Rule => format!("{} {}", r.text, addr(w[0])),
        // A schedule or a pause: the text says what is awaited.
        Kind::LockWait if w[0] >= LockKind::Schedule.code() => {
            format!("{}: {}", lock(w[0]), r.text)
        }
        Kind::LockWait => format!("{} held by {}", lock(w[0]), r.text),
        Kind::LockDone => lock(w[0]).to_string(),
        Kind::Regs => w
            .iter()
            .enumerate()
            .map(|(i, v)| format!("r{i}={v:#x}"))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// One line per record: time (µs since the start), track, kind, fields.
pub fn show(
    records: &[Record],
    vcpu: Option<u16>,
    kinds: &[Kind],
    out: &mut dyn Write,
) -> std::io::Result<()> {
    for r in records {
        let run_marker = matches!(r.kind, Kind::RunBegin | Kind::RunEnd);
        if !run_marker && vcpu.is_some_and(|v| v != r.track) {
            continue;
        }
        if !kinds.is_empty() && !run_marker && !kinds.contains(&r.kind) {
            continue;
        }
        writeln!(
            out,
            "{:>14.3} {:<4} {:<10} {}",
            r.ts as f64 / 1000.0,
            track_name(r.track),
            r.kind.name(),
            describe(r)
        )?;
    }
    out.flush()
}

/// Chrome Trace Event JSON: per run a process, per vCPU (and the VMM) a
/// thread with nested slices (exits, faults, flushes, lock waits) and
/// instants (points, fills, PTE changes, …); flows from each shootdown
/// request to its acknowledgement and from a copied page's source frame to
/// its destination (on the "frames" process, a track per frame).
pub fn chrome(records: &[Record], out: &mut dyn Write) -> std::io::Result<()> {
    let mut events = Events::new(out)?;
    let mut run = 0u64;
    let mut named: std::collections::BTreeSet<(u64, u16)> = Default::default();
    let mut frames_named: std::collections::BTreeSet<u64> = Default::default();
    // Open slices by (run, track, kind of slice): start ts and name.
    let mut open = OpenSlices::new();
    let mut flow_id = 0u64;
    let us = |ts: u64| ts as f64 / 1000.0;
    const FRAMES_PID: u64 = 0;
    let tid = |t: u16| if t == VMM_TRACK { 10_000 } else { t as u64 };
    for r in records {
        if r.kind == Kind::RunBegin {
            run = r.words[0];
            events.push(json!({"ph": "M", "name": "process_name", "pid": run,
                "args": {"name": format!("run {run}: {}", r.text)}}));
            events.push(json!({"ph": "M", "name": "process_sort_index", "pid": run, "args": {"sort_index": run}}));
        }
        if named.insert((run, r.track)) {
            let name = if r.track == VMM_TRACK {
                "VMM".to_string()
            } else {
                format!("vCPU {}", r.track)
            };
            events.push(json!({"ph": "M", "name": "thread_name", "pid": run, "tid": tid(r.track), "args": {"name": name}}));
        }
        let (pid, t, ts) = (run, tid(r.track), us(r.ts));
        let mut begin = |slot: u8, name: String| {
            open.entry((run, r.track, slot))
                .or_default()
                .push((r.ts, name));
        };
        let end = |open: &mut OpenSlices, events: &mut Events<'_>, slot: u8, suffix: String| {
            if let Some((start, name)) = open.get_mut(&(run, r.track, slot)).and_then(|v| v.pop()) {
                events.push(
                    json!({"ph": "X", "name": format!("{name}{suffix}"), "pid": pid, "tid": t,
                    "ts": us(start), "dur": us(r.ts.saturating_sub(start))}),
                );
            }
        };
        let instant = |events: &mut Events<'_>, name: String| {
            events.push(
                json!({"ph": "i", "s": "t", "name": name, "pid": pid, "tid": t, "ts": ts,
                "args": {"detail": describe(r)}}),
            );
        };
        match r.kind {
            Kind::Exit => begin(0, format!("exit: {}", exit_reason(&r.words))),
            Kind::Resume => end(&mut open, &mut events, 0, String::new()),
            Kind::Fault => begin(1, format!("fault {:#x} {}", r.words[0], access(r.words[1]))),
            Kind::FaultEnd => end(
                &mut open,
                &mut events,
                1,
                format!(" ({})", fault_result(r.words[1])),
            ),
            Kind::FlushBegin => begin(2, format!("flush [{:#x}, {:#x})", r.words[0], r.words[1])),
            Kind::FlushEnd => end(&mut open, &mut events, 2, String::new()),
            Kind::LockWait => begin(3, format!("wait {}", describe(r))),
            Kind::LockDone => end(&mut open, &mut events, 3, String::new()),
            Kind::IpiSend => {
                let id = format!("ipi-{run}-{}-{}", r.words[0], r.words[1]);
                events.push(json!({"ph": "X", "name": format!("IPI to v{}", r.words[0]), "pid": pid, "tid": t, "ts": ts, "dur": 0.5}));
                events.push(json!({"ph": "s", "name": "shootdown", "cat": "shootdown", "id": id, "pid": pid, "tid": t, "ts": ts}));
            }
            Kind::IpiAck => {
                let id = format!("ipi-{run}-{}-{}", r.words[0], r.words[1]);
                let target = tid(r.words[0] as u16);
                events.push(json!({"ph": "X", "name": format!("ack (by {})", track_name(r.track)), "pid": pid, "tid": target, "ts": ts, "dur": 0.5}));
                events.push(json!({"ph": "f", "bp": "e", "name": "shootdown", "cat": "shootdown", "id": id, "pid": pid, "tid": target, "ts": ts}));
            }
            Kind::Copy => {
                flow_id += 1;
                let (src, dst) = (r.words[1], r.words[2]);
                for f in [src, dst] {
                    if frames_named.insert(f) {
                        events.push(json!({"ph": "M", "name": "thread_name", "pid": FRAMES_PID, "tid": f >> 12,
                            "args": {"name": format!("frame {f:#x}")}}));
                    }
                }
                let id = format!("copy-{flow_id}");
                events.push(json!({"ph": "X", "name": format!("copied by {} (page {:#x})", track_name(r.track), r.words[0]),
                    "pid": FRAMES_PID, "tid": src >> 12, "ts": ts, "dur": 0.5}));
                events.push(json!({"ph": "s", "name": "copy", "cat": "copy", "id": id, "pid": FRAMES_PID, "tid": src >> 12, "ts": ts}));
                events.push(json!({"ph": "X", "name": format!("copy of {src:#x}"), "pid": FRAMES_PID, "tid": dst >> 12, "ts": ts, "dur": 0.5}));
                events.push(json!({"ph": "f", "bp": "e", "name": "copy", "cat": "copy", "id": id, "pid": FRAMES_PID, "tid": dst >> 12, "ts": ts}));
                instant(&mut events, format!("copy {:#x}", r.words[0]));
            }
            Kind::Point => instant(&mut events, r.text.clone()),
            Kind::Rule => instant(&mut events, format!("rule {}", r.text)),
            Kind::Resolve => instant(&mut events, resolution(r.words[1]).to_string()),
            Kind::RunEnd => events.push(
                json!({"ph": "i", "s": "p", "name": format!("end: {}", describe(r)),
                "pid": pid, "tid": t, "ts": ts}),
            ),
            Kind::RunBegin => {}
            other => instant(&mut events, other.name().to_lowercase()),
        }
    }
    if !frames_named.is_empty() {
        events.push(json!({"ph": "M", "name": "process_name", "pid": FRAMES_PID, "args": {"name": "frames"}}));
    }
    events.finish()
}

/// The `traceEvents` array, written event by event (a long trace would
/// not fit in memory as one JSON value). The first write error is kept
/// and returned by [`Events::finish`].
struct Events<'w> {
    out: &'w mut dyn Write,
    first: bool,
    error: Option<std::io::Error>,
}

impl<'w> Events<'w> {
    fn new(out: &'w mut dyn Write) -> std::io::Result<Self> {
        out.write_all(b"{\"displayTimeUnit\": \"ns\", \"traceEvents\": [\n")?;
        Ok(Events {
            out,
            first: true,
            error: None,
        })
    }

    fn push(&mut self, event: Value) {
        if self.error.is_some() {
            return;
        }
        let sep: &[u8] = if self.first { b"" } else { b",\n" };
        self.first = false;
        let r = self.out.write_all(sep).and_then(|()| {
            serde_json::to_writer(&mut *self.out, &event).map_err(std::io::Error::from)
        });
        if let Err(e) = r {
            self.error = Some(e);
        }
    }

    fn finish(self) -> std::io::Result<()> {
        if let Some(e) = self.error {
            return Err(e);
        }
        self.out.write_all(b"\n]}\n")?;
        self.out.flush()
    }
}
