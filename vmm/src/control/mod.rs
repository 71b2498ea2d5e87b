//! The control socket (docs/control.md): a person or a script drives a
//! running VM over a stream of JSON values in QMP's shape. [`Controller`] is
//! the state the socket and the runner share across the runs of one
//! command; [`server`] speaks the protocol, [`client`] is `cowlab ctl`.

pub mod client;
mod error;
pub(crate) mod protocol;
pub mod server;
pub(crate) mod stream;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

pub use crate::kvm::{Attachment, Gate};
pub use error::{ControlError, ServerError};
pub use server::Server;

use crate::hooks::{HookEvent, Observer, Rule};
use crate::kvm::{self, Event, Outcome, RunObserver, VcpuReport, VmConfig, VmHandle};
use crate::policy::{Policy, PolicyError};
use crate::trace::{Recorder, RUN_END_OTHER};

/// A trace started over the socket.
struct SocketTrace {
    rec: Arc<Recorder>,
    file: String,
    /// A run is begun in it and not yet ended.
    open: bool,
}

/// Where the command is.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// What runs (a test or program name) and under which policy.
    what: String,
    policy: String,
    /// The run under way (1-based) of `runs`; 0 before the first.
    run: u64,
    runs: u64,
    finished: bool,
}

/// A client's outgoing line queue; lines past its bound are dropped (a
/// slow client loses events, never stalls a vCPU).
pub(crate) type ClientTx = SyncSender<String>;

/// The state the control socket and the runner share.
pub struct Controller {
    /// This controller, for the observer it hands each VM.
    me: std::sync::Weak<Controller>,
    gate: Arc<Gate>,
    current: Mutex<Option<VmHandle>>,
    progress: Mutex<Progress>,
    rules: Mutex<BTreeMap<u64, Rule>>,
    next_rule: AtomicU64,
    /// `set-knob` overrides, applied to every run that starts after them.
    knobs: Mutex<Vec<(String, String)>>,
    clients: Mutex<Vec<ClientTx>>,
    quit: AtomicBool,
    /// `trace-start`'s recorder, until `trace-stop`.
    trace: Mutex<Option<SocketTrace>>,
    /// The command records a trace of its own (`--trace`).
    cli_trace: AtomicBool,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("progress", &*lock(&self.progress))
            .finish_non_exhaustive()
    }
}

/// `s` with control characters, the BOM, zero-width and bidirectional
/// formatting characters written as `\u{…}` escapes: text a client sent
/// (a key, a command name) is quoted in messages that reach a terminal.
/// (Also the command line's: `main.rs` quotes arguments with it.)
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    let odd = |c: char| {
        c.is_control()
            || matches!(c, '\u{feff}' | '\u{200b}'..='\u{200f}')
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(odd) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if odd(c) {
                format!("\\u{{{:x}}}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Controller {
    /// A controller; with `wait`, VMs start stopped until `cont`.
    pub fn new(wait: bool) -> Arc<Self> {
        Arc::new_cyclic(|me| Controller {
            me: me.clone(),
            gate: Arc::new(Gate::new(wait)),
            current: Mutex::new(None),
            progress: Mutex::new(Progress::default()),
            rules: Mutex::new(BTreeMap::new()),
            next_rule: AtomicU64::new(1),
            knobs: Mutex::new(Vec::new()),
            clients: Mutex::new(Vec::new()),
            quit: AtomicBool::new(false),
            trace: Mutex::new(None),
            cli_trace: AtomicBool::new(false),
        })
    }

    /// Names what the command runs, for `query-status`.
    pub fn begin(&self, what: &str, policy: &str, runs: u64) {
        *lock(&self.progress) = Progress {
            what: what.to_string(),
            policy: policy.to_string(),
            runs,
            ..Progress::default()
        };
    }

    /// Fills in the controller's part of a VM about to start: the gate, the
    /// socket's rules, the observer, and the `set-knob` overrides.
    pub fn configure(&self, config: &mut VmConfig) -> Result<(), ControlError> {
        for (knob, value) in lock(&self.knobs).iter() {
            config.policy.set(knob, value)?;
        }
        if config.trace.is_some() {
            self.cli_trace.store(true, Ordering::Release);
        } else if let Some(t) = &mut *lock(&self.trace) {
            // Begun before the VM exists, so its boot is in the run.
            let run = lock(&self.progress).run + 1;
            t.rec.begin_run(run, &self.run_label());
            t.open = true;
            config.trace = Some(Arc::clone(&t.rec));
        }
        let me = self.me.clone();
        let observer: Observer = Arc::new(move |e: HookEvent| {
            if let Some(c) = me.upgrade() {
                c.emit("POINT_HIT", hook_event_data(&e));
            }
        });
        config.control = Some(Attachment {
            gate: Arc::clone(&self.gate),
            rules: lock(&self.rules)
                .iter()
                .map(|(id, r)| (*id, r.clone()))
                .collect(),
            observer: Some(observer),
        });
        Ok(())
    }

    /// Run `run` (1-based) started in the VM behind `vm`, configured with
    /// `attached`: rules injected or removed since then are applied now.
    pub fn attach(&self, vm: VmHandle, attached: &Attachment, run: u64) {
        let rules = lock(&self.rules);
        vm.with_hooks(|h| {
            for (id, rule) in rules.iter() {
                if !attached.rules.iter().any(|(a, _)| a == id) {
                    h.add_tagged_rule(rule.clone(), Some(*id));
                }
            }
            for (id, _) in &attached.rules {
                if !rules.contains_key(id) {
                    h.remove_tagged(*id);
                }
            }
        });
        *lock(&self.current) = Some(vm.clone());
        drop(rules);
        lock(&self.progress).run = run;
        // A `quit` that found no VM to stop (it came while this one was
        // being made) is seen here: `quit` marks the gate before it looks
        // at `current`, this looks at the gate after setting `current`.
        if self.gate.quitting() {
            vm.stop_all();
        }
    }

    /// `quit`: no further run starts, no vCPU enters the guest again (the
    /// gate ends each at its next look, parked ones included), and the
    /// run under way is stopped, its pause and schedule waiters let go.
    /// Holds whenever it arrives, before the first VM exists too.
    fn quit(&self) {
        self.quit.store(true, Ordering::Release);
        self.gate.quit();
        if let Some(vm) = self.current() {
            vm.stop_all();
        }
    }

    fn run_label(&self) -> String {
        let p = lock(&self.progress);
        format!("{} ({})", p.what, p.policy)
    }

    /// `trace-start`: records from now on into `file` (this run, if its VM
    /// takes the recorder, and every later one). The file is created
    /// without holding the controller's lock, and only a regular file (or
    /// a new one) is accepted: opening a FIFO could block forever.
    fn trace_start(&self, file: &str) -> Result<Value, ControlError> {
        if self.cli_trace.load(Ordering::Acquire) {
            return Err(ControlError::CliTrace);
        }
        if let Some(t) = &*lock(&self.trace) {
            return Err(ControlError::TraceBusy(t.file.clone()));
        }
        let path = std::path::Path::new(file);
        if std::fs::symlink_metadata(path).is_ok_and(|m| !m.is_file()) {
            return Err(ControlError::NotARegularFile(file.to_string()));
        }
        let rec = Recorder::create(path).map_err(|source| ControlError::TraceFile {
            file: file.to_string(),
            source,
        })?;
        let mut trace = lock(&self.trace);
        if trace.is_some() {
            return Err(ControlError::TraceRace);
        }
        let now = match self.current() {
            Some(vm) => vm.with_hooks(|h| h.trace.set(Arc::clone(&rec))) == Some(true),
            None => false,
        };
        if now {
            let run = lock(&self.progress).run;
            rec.begin_run(run, &self.run_label());
        }
        *trace = Some(SocketTrace {
            rec,
            file: file.to_string(),
            open: now,
        });
        Ok(json!({ "file": file, "from": if now { "this run" } else { "the next run" } }))
    }

    /// `trace-stop`: ends the run under way in the trace (if it is in it)
    /// and closes the trace.
    fn trace_stop(&self) -> Result<Value, ControlError> {
        let Some(t) = lock(&self.trace).take() else {
            return Err(ControlError::NoTrace);
        };
        if t.open {
            t.rec
                .end_run(RUN_END_OTHER, "trace stopped", true)
                .map_err(|source| ControlError::TraceFile {
                    file: t.file.clone(),
                    source,
                })?;
        }
        t.rec.set_enabled(false);
        Ok(json!({ "file": t.file }))
    }

    /// The socket's trace recorder, if a run is begun in it.
    pub fn open_trace(&self) -> Option<Arc<Recorder>> {
        lock(&self.trace)
            .as_ref()
            .filter(|t| t.open)
            .map(|t| Arc::clone(&t.rec))
    }

    /// The command records a trace of its own (`--trace`): the socket's
    /// `trace-start` is refused.
    pub fn set_cli_trace(&self) {
        self.cli_trace.store(true, Ordering::Release);
    }

    /// Run `run` ended: `outcome` is its summary (`RUN_FINISHED` data),
    /// `end` its outcome as a trace's `RunEnd` codes it.
    pub fn detach(&self, run: u64, outcome: Value, end: u64) {
        *lock(&self.current) = None;
        if let Some(t) = &mut *lock(&self.trace) {
            if std::mem::take(&mut t.open) {
                let text = match &outcome {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                if let Err(e) = t.rec.end_run(end, &text, true) {
                    self.emit(
                        "TRACE_ERROR",
                        json!({ "file": t.file, "error": e.to_string() }),
                    );
                }
            }
        }
        self.emit("RUN_FINISHED", json!({ "run": run, "outcome": outcome }));
    }

    /// The whole command ended.
    pub fn finish(&self) {
        lock(&self.progress).finished = true;
        self.emit("SHUTDOWN", json!({}));
    }

    /// Whether a client asked to quit: the runner starts no further run.
    pub fn quit_requested(&self) -> bool {
        self.quit.load(Ordering::Acquire)
    }

    /// Forwards what a VM reports (`Vm::wait`'s events) to the clients.
    pub fn vm_event(&self, e: &Event) {
        match e {
            Event::Parked { id, parked: true } => self.emit("VCPU_STOPPED", json!({ "vcpu": id })),
            Event::Parked { id, parked: false } => self.emit("VCPU_RESUMED", json!({ "vcpu": id })),
            Event::Ended(report) => self.vcpu_ended(report),
            _ => {}
        }
    }

    fn vcpu_ended(&self, report: &VcpuReport) {
        let data = json!({ "vcpu": report.id, "outcome": report.outcome.to_string() });
        if matches!(
            report.outcome,
            Outcome::Segv { .. } | Outcome::Oom { .. } | Outcome::Crashed { .. }
        ) {
            self.emit("FAULT", data.clone());
        }
        self.emit("VCPU_ENDED", data);
    }

    /// Sends an asynchronous event to every client.
    pub(crate) fn emit(&self, name: &str, data: Value) {
        let line = event_line(name, data);
        lock(&self.clients).retain(|tx| match tx.try_send(line.clone()) {
            Ok(()) | Err(std::sync::mpsc::TrySendError::Full(_)) => true,
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => false,
        });
    }

    pub(crate) fn add_client(&self, tx: ClientTx) {
        lock(&self.clients).push(tx);
    }

    fn current(&self) -> Option<VmHandle> {
        lock(&self.current).clone()
    }

    /// Validates a knob override against a preset.
    fn check_knob(knob: &str, value: &str) -> Result<(), PolicyError> {
        let mut p = Policy::MAINLINE;
        p.set(knob, value)
    }
}

/// What the litmus runner reports and asks, answered by the controller.
impl RunObserver for Controller {
    fn begin(&self, what: &str, policy: &str, runs: u64) {
        Controller::begin(self, what, policy, runs)
    }

    fn quit_requested(&self) -> bool {
        Controller::quit_requested(self)
    }

    fn configure(&self, config: &mut VmConfig) -> Result<(), kvm::Error> {
        Controller::configure(self, config).map_err(|e| kvm::Error::Config(e.to_string()))
    }

    fn attach(&self, vm: VmHandle, attached: &Attachment, run: u64) {
        Controller::attach(self, vm, attached, run)
    }

    fn vm_event(&self, e: &Event) {
        Controller::vm_event(self, e)
    }

    fn detach(&self, run: u64, outcome: &str, end: u64) {
        Controller::detach(self, run, Value::String(outcome.to_string()), end)
    }

    fn open_trace(&self) -> Option<Arc<Recorder>> {
        Controller::open_trace(self)
    }
}

fn hook_event_data(e: &HookEvent) -> Value {
    json!({
        "point": e.point,
        "vcpu": e.cpu,
        "addr": e.addr.map(|a| format!("{a:#x}")),
        "rule": e.rule,
    })
}

/// One event line in QMP's shape.
fn event_line(name: &str, data: Value) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({
        "event": name,
        "data": data,
        "timestamp": { "seconds": now.as_secs(), "microseconds": now.subsec_micros() },
    })
    .to_string()
}
