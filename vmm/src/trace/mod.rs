//! Traces: what the VMM and the memory model did, per vCPU, with
//! nanosecond timestamps, in the binary format of docs/trace-format.md.
//!
//! - [`Recorder`]: appends events while runs go on and writes each run to
//!   the file when it ends (or drops it, for `--trace-witnesses-only`);
//! - [`format`]: the record layout, encoding and a decoder that names the
//!   offset of anything it cannot read;
//! - [`export`]: readable text (`cowlab trace show`) and Chrome Trace Event
//!   JSON (`cowlab trace export --format chrome`).

pub mod codes;
pub mod export;
pub mod format;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub use codes::{ExitReason, FaultAccess, FaultResult, LockKind, Resolution, RunEnd};
pub use format::{read_trace, Kind, Record, TraceError, VMM_TRACK};

/// Collects events and writes them to a trace file: as they come, or, to
/// keep only some runs (`--trace-witnesses-only`), a whole run at a time.
pub struct Recorder {
    start: Instant,
    enabled: AtomicBool,
    /// Records not yet written, encoded: the current run's, if whole runs
    /// are kept in memory, else at most about [`SPILL`] bytes.
    buf: Mutex<Vec<u8>>,
    out: Mutex<Box<dyn Write + Send>>,
    /// The first write that failed while records were spilled: reported by
    /// the next `end_run` (a later write that succeeds does not make the
    /// file whole again).
    failed: Mutex<Option<std::io::Error>>,
    /// Whole runs stay in memory until `end_run` decides to keep them.
    whole_runs: AtomicBool,
}

/// Without whole runs, the buffer is written out past this size.
const SPILL: usize = 1 << 20;

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

impl Recorder {
    /// Creates `path` (replacing it) and writes the header.
    pub fn create(path: &Path) -> std::io::Result<Arc<Self>> {
        let mut out = BufWriter::new(File::create(path)?);
        out.write_all(&format::header())?;
        Ok(Self::with_output(Box::new(out)))
    }

    /// A recorder whose events go nowhere (to measure recording itself).
    pub fn discarding() -> Arc<Self> {
        Self::with_output(Box::new(std::io::sink()))
    }

    fn with_output(out: Box<dyn Write + Send>) -> Arc<Self> {
        Arc::new(Recorder {
            start: Instant::now(),
            enabled: AtomicBool::new(true),
            buf: Mutex::new(Vec::with_capacity(1 << 16)),
            out: Mutex::new(out),
            failed: Mutex::new(None),
            whole_runs: AtomicBool::new(false),
        })
    }

    /// Keep each run in memory until its end says whether to write it
    /// (`--trace-witnesses-only`); otherwise records are written as they
    /// accumulate.
    pub fn keep_whole_runs(&self) {
        self.whole_runs.store(true, Ordering::Relaxed);
    }

    /// Whether events are recorded now (`trace-stop` pauses it).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Records an event on the current thread's track (its vCPU, or the
    /// VMM's).
    pub fn emit(&self, kind: Kind, words: &[u64], text: &str) {
        let track = crate::cpu::current().map_or(VMM_TRACK, |c| c.min(0xfffe) as u16);
        self.emit_on(track, kind, words, text);
    }

    /// Records an event on `track`.
    pub fn emit_on(&self, track: u16, kind: Kind, words: &[u64], text: &str) {
        if !self.enabled() {
            return;
        }
        let ts = self.start.elapsed().as_nanos() as u64;
        let mut buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        format::encode(&mut buf, kind, track, ts, words, text);
        if buf.len() > SPILL && !self.whole_runs.load(Ordering::Relaxed) {
            let records = std::mem::take(&mut *buf);
            // A write error is reported at `end_run`.
            let written = self
                .out
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_all(&records);
            if let Err(e) = written {
                self.failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(e);
            }
        }
    }

    /// Starts run `index` (1-based) of `label` (test and policy).
    pub fn begin_run(&self, index: u64, label: &str) {
        self.buf.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.emit_on(VMM_TRACK, Kind::RunBegin, &[index], label);
    }

    /// Ends the run with its outcome (see [`Kind::RunEnd`]) and final
    /// state, and writes it to the file — unless `keep` is false.
    pub fn end_run(&self, outcome: u64, state: &str, keep: bool) -> std::io::Result<()> {
        self.emit_on(VMM_TRACK, Kind::RunEnd, &[outcome], state);
        let records = std::mem::take(&mut *self.buf.lock().unwrap_or_else(|e| e.into_inner()));
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = self.failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(e);
        }
        if keep {
            out.write_all(&records)?;
        }
        out.flush()
    }
}

/// How a run ended, as `RunEnd`'s word codes it (docs/trace-format.md):
/// `witness` is `None` for a program run (it has no `exists`).
pub fn run_end_code(unreachable: bool, witness: Option<bool>) -> u64 {
    match (unreachable, witness) {
        (true, _) => RunEnd::Unreachable,
        (false, Some(true)) => RunEnd::Witness,
        (false, Some(false)) => RunEnd::NoWitness,
        (false, None) => RunEnd::Other,
    }
    .code()
}

/// `RunEnd` of a program run, or of a run cut short.
pub const RUN_END_OTHER: u64 = RunEnd::Other.code();

/// `RunEnd` of a litmus run that ended in an error (a VMM error or panic,
/// an `mm_verify` violation): its text is `error: MESSAGE`.
pub const RUN_END_ERROR: u64 = RunEnd::Error.code();

/// The recorder of a VM, if tracing: cheap to ask on every event.
#[derive(Debug, Default)]
pub struct TraceSlot(std::sync::OnceLock<Arc<Recorder>>);

impl TraceSlot {
    /// Attaches `recorder`; false if the VM already had one (a VM keeps
    /// the first recorder it is given).
    pub fn set(&self, recorder: Arc<Recorder>) -> bool {
        self.0.set(recorder).is_ok()
    }

    /// The recorder, if one is attached and recording.
    #[inline]
    pub fn get(&self) -> Option<&Recorder> {
        self.0.get().map(|r| &**r).filter(|r| r.enabled())
    }
}
