//! A VM: KVM file descriptors, guest memory, the guest image and the vCPU
//! threads, plus the event stream the controlling thread watches.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmm_sys_util::signal::Killable;

use cowlab_abi::layout::{
    kernel_va, user_stack_top, IMAGE_PHYS, KERNEL_REGION_SIZE, LITMUS_PHYS, LITMUS_SIZE,
    MAX_MEM_SIZE, MAX_VCPUS, USER_STACK_SIZE,
};
use cowlab_abi::{bytecode, BootHeader, Program, BOOT_HEADER_MAGIC};

use super::control::{request, KvmFlusher, VcpuCtl};
use super::loader::{self, Image};
use super::memory::GuestMem;
use super::vcpu::{Outcome, Start, Vcpu, VcpuReport};
use super::{arch, kick, Attachment, BootPlan, Error, Gate, GUEST_ELF};
use crate::hooks::{self, Rule, Step};
use crate::mm::{mm_verify, mmap, verify_no_leaks, Machine, Mm, PhysMem};
use crate::policy::Policy;

/// Smallest guest memory accepted: the kernel region plus 16 MiB of frames.
pub const MIN_MEM_MIB: u64 = (KERNEL_REGION_SIZE >> 20) + 16;

/// The longest delay chaos mode injects at a point.
pub const CHAOS_MAX_DELAY: Duration = Duration::from_micros(200);

/// How often `wait` checks whether the schedule can still be satisfied.
const SCHEDULE_CHECK: Duration = Duration::from_millis(10);

/// How long stopped vCPUs get to leave `KVM_RUN` after a timeout.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// vCPUs started at boot (each runs `program`).
    pub vcpus: usize,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    pub program: Program,
    /// The program's argument (0 = its default).
    pub arg: u64,
    /// Another guest ELF built like `guest/` (default: the built-in one).
    pub guest_elf: Option<Vec<u8>>,
    /// Keep the address of every forwarded fault in the reports.
    pub record_faults: bool,
    /// Run `mm_verify` when vCPUs and the run end (`--check`).
    pub check: bool,
    /// The kernel behaviour to model (`--policy`, `--set`).
    pub policy: Policy,
    /// A boot plan to run instead of `program` (a compiled litmus test):
    /// its regions are mapped and its threads started (`vcpus` and `arg`
    /// are ignored).
    pub plan: Option<Arc<BootPlan>>,
    /// Injection rules, a schedule to enforce, a chaos seed (DESIGN.md §8).
    pub rules: Vec<Rule>,
    pub schedule: Vec<Step>,
    pub chaos: Option<u64>,
    /// The control socket's hold on the VM: its stop gate, its rules, its
    /// observer of rules acting.
    pub control: Option<Attachment>,
    /// The KVM device.
    pub kvm_path: String,
    /// Record a trace of the run (docs/trace-format.md).
    pub trace: Option<Arc<crate::trace::Recorder>>,
    /// Which run (1-based) of a litmus test this is, for rules' `run=`
    /// filter.
    pub run: u64,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            vcpus: 1,
            mem_mib: 256,
            program: Program::Hello,
            arg: 0,
            guest_elf: None,
            record_faults: false,
            check: true,
            policy: Policy::MAINLINE,
            plan: None,
            rules: Vec::new(),
            schedule: Vec::new(),
            chaos: None,
            control: None,
            kvm_path: "/dev/kvm".into(),
            trace: None,
            run: 1,
        }
    }
}

/// Something a vCPU thread reports to the controlling thread.
#[derive(Debug, Clone)]
pub enum Event {
    /// vCPU `id` was created to run `program` (by `parent`, or at boot).
    Spawned {
        id: usize,
        program: Program,
        parent: Option<usize>,
    },
    /// vCPU `id` made its first exit (the runtime is up).
    Booted { id: usize, at: Instant },
    /// A console line.
    Console { id: usize, line: String },
    /// A benchmark mark.
    Mark { id: usize, n: u64, at: Instant },
    /// Answer to a [`request::PING`] kick.
    Pong { id: usize, at: Instant },
    /// A [`request::FLUSH`] completed: the guest reloaded CR3.
    FlushAcked { id: usize, at: Instant },
    /// vCPU thread ended.
    Ended(Box<VcpuReport>),
    /// vCPU `id` parked (`true`) by the control gate, or left it (`false`).
    Parked { id: usize, parked: bool },
}

struct VcpuSlot {
    ctl: Arc<VcpuCtl>,
    thread: JoinHandle<()>,
}

/// State shared by the VM and all its vCPU threads.
pub(crate) struct Shared {
    pub(crate) vm: VmFd,
    pub(crate) cpuid: CpuId,
    pub(crate) mem: Arc<GuestMem>,
    pub(crate) machine: Arc<Machine>,
    /// The address spaces (processes), alive until the run ends.
    processes: Mutex<Vec<Arc<Mm>>>,
    pub(crate) image: Image,
    pub(crate) boot_header: BootHeader,
    pub(crate) nr_vcpus: usize,
    pub(crate) record_faults: bool,
    pub(crate) check: bool,
    /// Guest hook point names (`guest:NAME`) by id, from the litmus test.
    hook_names: Vec<String>,
    /// Stops vCPUs from outside (the control socket).
    pub(crate) gate: Option<Arc<Gate>>,
    vcpus: Mutex<Vec<VcpuSlot>>,
    events: Mutex<Sender<Event>>,
    /// vCPUs whose thread panicked, with the message and where (noted by
    /// the panic hook before the thread unwinds).
    panics: Mutex<BTreeMap<usize, String>>,
}

impl Shared {
    /// Whether the control socket holds a vCPU (parked by `stop`, or at a
    /// `pause` rule it can `cont`): such a wait is neither a hang nor a
    /// deadlock. A stop asked for a vCPU that is not parked holds nothing.
    fn held_from_outside(&self) -> bool {
        self.gate
            .as_ref()
            .is_some_and(|g| !g.parked().is_empty() || !self.machine.hooks.paused().is_empty())
    }

    pub(crate) fn events(&self) -> Sender<Event> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn slots(&self) -> MutexGuard<'_, Vec<VcpuSlot>> {
        self.vcpus.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why vCPU `id`'s thread panicked, if it did.
    fn panic_of(&self, id: usize) -> Option<String> {
        lock(&self.panics).get(&id).cloned()
    }

    /// After a vCPU thread panicked, the address spaces may be half
    /// changed: they are not checked, only torn down (the locks the panic
    /// poisoned are taken over by the mm's lock helpers), under
    /// `catch_unwind`, so that a teardown that trips on the damage leaks
    /// what is left instead of aborting the command. Returns whether a
    /// vCPU had panicked.
    fn release_processes_if_panicked(&self) -> bool {
        if lock(&self.panics).is_empty() {
            return false;
        }
        let processes = std::mem::take(&mut *lock(&self.processes));
        let _ = std::panic::catch_unwind(AssertUnwindSafe(move || drop(processes)));
        true
    }

    /// Starts a new vCPU running `program(arg)` as a thread of `mm`, from
    /// any thread, while the others run. Returns its id.
    pub(crate) fn spawn(
        this: &Arc<Self>,
        program: Program,
        start: Start,
        mm: Arc<Mm>,
    ) -> Result<usize, String> {
        let mut slots = this.slots();
        let id = slots.len();
        if id >= MAX_VCPUS {
            return Err(format!("at most {MAX_VCPUS} vCPUs"));
        }
        let parent = current_vcpu();
        let events = this.events();
        // Sent before the thread exists, so the controller counts it as live
        // before it can see this vCPU (or its parent) end.
        let _ = events.send(Event::Spawned {
            id,
            program,
            parent,
        });
        let ctl = Arc::new(VcpuCtl::default());
        // A vCPU forked while the VM is being stopped (a fork that a delay
        // held past the watchdog) is stopped before it first enters the
        // guest: whoever stops the VM sets `stopping` first and then stops
        // every slot, so under the slots lock either it sees this one or
        // this one sees `stopping`.
        if this.machine.stopping() {
            ctl.requests.fetch_or(request::STOP, Ordering::AcqRel);
        }
        // The new thread holds the mm from now: a sibling that exits before
        // it starts must not tear the address space down under it (clone()
        // takes the reference in the parent, in copy_mm()). Only the vCPU
        // keeps a strong pointer, so the mm is gone when the thread reports
        // its end.
        mm.mmget();
        let weak_mm = Arc::downgrade(&mm);
        let unspawned_mm = Arc::downgrade(&mm);
        let (shared, thread_ctl) = (Arc::clone(this), Arc::clone(&ctl));
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                CURRENT_VCPU.with(|c| c.set(Some(id)));
                VCPU_SHARED.with(|s| *s.borrow_mut() = Arc::downgrade(&shared));
                hooks::set_current_cpu(Some(id));
                let vcpu_ctl = Arc::clone(&thread_ctl);
                let vcpu_shared = Arc::clone(&shared);
                let ran = std::panic::catch_unwind(AssertUnwindSafe(move || {
                    match Vcpu::new(vcpu_shared, id, program, start, mm, vcpu_ctl) {
                        Ok(vcpu) => vcpu.run(),
                        Err(e) => {
                            if let Some(mm) = weak_mm.upgrade() {
                                mm.mmput();
                            }
                            VcpuReport::failed(id, program, Outcome::Error(e))
                        }
                    }
                }));
                // A panic (a bug in the VMM or the mm model, or a `panic`
                // rule) ends this vCPU in an error, like any VMM error, and
                // the process goes on. The locks it held were released as
                // it unwound (poisoned), and its address space may be half
                // changed: the VM is not torn down (see `teardown`).
                let report = ran.unwrap_or_else(|payload| {
                    thread_ctl.in_guest.store(false, Ordering::SeqCst);
                    let why = shared
                        .panic_of(id)
                        .unwrap_or_else(|| payload_text(&*payload));
                    VcpuReport::failed(id, program, Outcome::Error(format!("panicked: {why}")))
                });
                thread_ctl.mark_ended(report.join_status());
                shared.machine.hooks.set_ended(id);
                let _ = events.send(Event::Ended(Box::new(report)));
            })
            .map_err(|e| {
                if let Some(mm) = unspawned_mm.upgrade() {
                    mm.mmput();
                }
                format!("cannot start a vCPU thread: {e}")
            })?;
        slots.push(VcpuSlot { ctl, thread });
        Ok(id)
    }

    /// The injection point of guest hook `id`.
    pub(crate) fn hook_name(&self, id: u64) -> String {
        match self.hook_names.get(id as usize) {
            Some(n) => format!("guest:{n}"),
            None => format!("guest:{id}"),
        }
    }

    /// Registers a new address space (a forked child).
    pub(crate) fn add_process(&self, mm: Arc<Mm>) {
        self.processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(mm);
    }

    /// The shared state of vCPU `id`.
    pub(crate) fn ctl(&self, id: usize) -> Option<Arc<VcpuCtl>> {
        self.slots().get(id).map(|s| Arc::clone(&s.ctl))
    }

    /// Posts `bits` to vCPU `id` and kicks it out of the guest. False if
    /// there is no such vCPU.
    pub(crate) fn request(&self, id: usize, bits: u32) -> bool {
        let slots = self.slots();
        let Some(slot) = slots.get(id) else {
            return false;
        };
        slot.ctl.requests.fetch_or(bits, Ordering::AcqRel);
        // A thread that already ended cannot be signalled; nothing to do then.
        let _ = slot.thread.kill(kick::kick_signal());
        true
    }
}

thread_local! {
    static CURRENT_VCPU: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    /// The VM of this vCPU thread, for the panic hook.
    static VCPU_SHARED: std::cell::RefCell<Weak<Shared>> = const { std::cell::RefCell::new(Weak::new()) };
}

/// Installs (once per process) a panic hook that notes a vCPU thread's
/// panic, with where it happened, in its VM before the thread unwinds (so
/// the run's report has it even if the unwinding blocks), instead of
/// printing it. Other threads' panics, and every panic with
/// `RUST_BACKTRACE` set, go to the previous hook as well.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(id) = current_vcpu() {
                let mut why = payload_text(info.payload());
                if let Some(l) = info.location() {
                    why += &format!(" (at {}:{})", l.file(), l.line());
                }
                if let Some(shared) = VCPU_SHARED.with(|s| s.borrow().upgrade()) {
                    lock(&shared.panics).entry(id).or_insert(why);
                }
                if std::env::var_os("RUST_BACKTRACE").is_none() {
                    return;
                }
            }
            previous(info);
        }));
    });
}

/// A panic's message.
fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn current_vcpu() -> Option<usize> {
    CURRENT_VCPU.with(|c| c.get())
}

/// How a run ended, for every vCPU that took part.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// One report per vCPU, by id.
    pub vcpus: Vec<VcpuReport>,
    /// Console lines in the order they arrived.
    pub console: Vec<(usize, String)>,
    /// The watchdog fired after this long.
    pub timed_out: Option<Duration>,
    /// vCPUs still running when the watchdog fired.
    pub stuck: Vec<usize>,
    /// VM creation to the first guest exit.
    pub boot_time: Option<Duration>,
    /// VM creation to the end of the run.
    pub wall: Duration,
    /// Pages still in use when the run ended (0 once every process has
    /// exited: its last thread's exit tears its address space down).
    pub user_pages: usize,
    /// Broken memory-manager invariants (`mm_verify`), if checked.
    pub violations: Vec<String>,
    /// The schedule could not be satisfied: where each thread was blocked.
    pub unreachable: Option<String>,
    /// Each rule with how often it matched and acted.
    pub rule_counts: Vec<(String, u64, u64)>,
    /// With chaos and no schedule: every point hit by a vCPU, in order.
    pub hit_order: Option<Vec<hooks::PointHit>>,
}

/// Exit status of the CLI (DESIGN.md §12).
pub mod exit_code {
    /// Everything went as expected.
    pub const OK: i32 = 0;
    /// The guest reported failure (or an expectation did not hold).
    pub const FAILED: i32 = 1;
    /// Usage or input error.
    pub const USAGE: i32 = 2;
    /// VM or internal error: guest crash, timeout, KVM failure.
    pub const VM_ERROR: i32 = 3;
}

impl RunReport {
    /// The CLI's exit status for this run.
    pub fn exit_code(&self) -> i32 {
        let vm_error = self.timed_out.is_some()
            || !self.violations.is_empty()
            || self.vcpus.iter().any(|v| {
                matches!(
                    v.outcome,
                    Outcome::Crashed { .. }
                        | Outcome::TripleFault { .. }
                        | Outcome::Stopped { .. }
                        | Outcome::Error(_)
                )
            });
        if vm_error {
            exit_code::VM_ERROR
        } else if self.vcpus.iter().all(|v| v.outcome == Outcome::Exited(0)) {
            exit_code::OK
        } else {
            exit_code::FAILED
        }
    }

    /// One line per thing that went wrong.
    pub fn problems(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(t) = self.timed_out {
            let stuck: Vec<String> = self.stuck.iter().map(|id| format!("vcpu {id}")).collect();
            lines.push(format!(
                "timeout after {:.1}s: {} still running",
                t.as_secs_f64(),
                stuck.join(", ")
            ));
        }
        for v in &self.vcpus {
            if v.outcome != Outcome::Exited(0) {
                lines.push(format!(
                    "vcpu {} ({}): {}",
                    v.id,
                    v.program.name(),
                    v.outcome
                ));
            }
        }
        lines.extend(self.violations.iter().map(|v| format!("mm_verify: {v}")));
        lines
    }

    /// The report of vCPU `id`.
    pub fn vcpu(&self, id: usize) -> Option<&VcpuReport> {
        self.vcpus.iter().find(|v| v.id == id)
    }
}

/// A running VM.
pub struct Vm {
    shared: Arc<Shared>,
    events: Receiver<Event>,
    created: Instant,
    boot_time: Option<Duration>,
    live: BTreeSet<usize>,
    programs: BTreeMap<usize, Program>,
    ended: BTreeMap<usize, VcpuReport>,
}

fn kvm_op(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

impl Vm {
    /// Creates the VM, loads the guest and starts `config.vcpus` vCPUs.
    pub fn new(config: &VmConfig) -> Result<Vm, Error> {
        let created = Instant::now();
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(Error::Config(format!(
                "--vcpus must be between 1 and {MAX_VCPUS}"
            )));
        }
        let max_mib = MAX_MEM_SIZE >> 20;
        if config.mem_mib < MIN_MEM_MIB || config.mem_mib > max_mib {
            return Err(Error::Config(format!(
                "--mem-mib must be between {MIN_MEM_MIB} and {max_mib}"
            )));
        }
        let image = loader::parse(config.guest_elf.as_deref().unwrap_or(GUEST_ELF))
            .map_err(Error::Image)?;

        let path = std::ffi::CString::new(config.kvm_path.clone())
            .map_err(|_| Error::Config("KVM device path contains a NUL byte".into()))?;
        let kvm = Kvm::new_with_path(&path).map_err(|source| Error::KvmUnavailable {
            path: config.kvm_path.clone(),
            source,
        })?;
        check_kvm(&kvm, &config.kvm_path)?;
        let vm = kvm.create_vm().map_err(kvm_op("KVM_CREATE_VM"))?;
        let size = config.mem_mib << 20;
        let mem = Arc::new(GuestMem::new(size).map_err(Error::Memory)?);
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: mem.host_base(),
            flags: 0,
        };
        // SAFETY: the region is the whole of `mem`, which lives in `Shared`
        // as long as the VM fd and every vCPU using it.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_op("KVM_SET_USER_MEMORY_REGION"))?;
        load_image(
            &mem,
            &image,
            config.guest_elf.as_deref().unwrap_or(GUEST_ELF),
        )?;
        let boot_header = read_boot_header(&mem, &image)?;
        for (pa, v) in arch::kernel_table_writes() {
            mem.word(pa).store(v, Ordering::Relaxed);
        }
        let cpuid = supported_cpuid(&kvm, &config.kvm_path)?;
        kick::install_handler().map_err(Error::Config)?;
        install_panic_hook();

        let phys: Arc<dyn PhysMem> = Arc::clone(&mem) as Arc<dyn PhysMem>;
        let machine = Machine::new(
            phys,
            KERNEL_REGION_SIZE,
            size,
            arch::kernel_pml4(),
            config.policy,
        )
        .map_err(|_| Error::Memory("no frame for the zero page".into()))?;
        let machine = Arc::new(machine);
        let mm =
            Mm::new(&machine).map_err(|_| Error::Memory("no frame for a page table".into()))?;
        let (tx, rx) = channel();
        let shared = Arc::new(Shared {
            vm,
            cpuid,
            mem,
            machine: Arc::clone(&machine),
            processes: Mutex::new(vec![Arc::clone(&mm)]),
            panics: Mutex::new(BTreeMap::new()),
            image,
            boot_header,
            nr_vcpus: config.vcpus,
            record_faults: config.record_faults,
            check: config.check,
            hook_names: config
                .plan
                .as_ref()
                .map_or_else(Vec::new, |p| p.hooks.clone()),
            gate: config.control.as_ref().map(|c| Arc::clone(&c.gate)),
            vcpus: Mutex::new(Vec::new()),
            events: Mutex::new(tx),
        });
        machine.set_flusher(Arc::new(KvmFlusher {
            shared: Arc::downgrade(&shared),
        }));
        let vm = Vm {
            shared,
            events: rx,
            created,
            boot_time: None,
            live: BTreeSet::new(),
            programs: BTreeMap::new(),
            ended: BTreeMap::new(),
        };
        let boot_vcpus = match &config.plan {
            Some(plan) => plan.threads.len(),
            None => config.vcpus,
        };
        for id in 0..boot_vcpus {
            mmap::map_stack(&mm, user_stack_top(id), USER_STACK_SIZE)
                .map_err(|e| Error::Config(format!("cannot map the stack of vcpu {id}: {e}")))?;
        }
        if let Some(plan) = &config.plan {
            load_plan(&vm.shared.mem, &mm, plan)?;
        }
        // Armed after the loader populated the regions: setup is not part
        // of any vCPU's run, so no rule or schedule step can match it.
        arm_hooks(&machine.hooks, config);
        // The boot vCPUs are threads of one process that exists before any
        // of them runs: hold the mm (mm_users) while starting them, or a
        // first vCPU that ends before the next is spawned tears the address
        // space (and the next one's stack) down under it.
        mm.mmget();
        let spawned = match &config.plan {
            Some(plan) => plan.threads.iter().try_for_each(|pc| {
                Shared::spawn(
                    &vm.shared,
                    Program::Litmus,
                    Start::Program(*pc),
                    Arc::clone(&mm),
                )
                .map(|_| ())
            }),
            None => (0..config.vcpus).try_for_each(|_| {
                Shared::spawn(
                    &vm.shared,
                    config.program,
                    Start::Program(config.arg),
                    Arc::clone(&mm),
                )
                .map(|_| ())
            }),
        };
        mm.mmput();
        spawned.map_err(Error::Config)?;
        Ok(vm)
    }

    /// A handle the control socket keeps while the VM runs.
    pub fn handle(&self) -> VmHandle {
        VmHandle(Arc::downgrade(&self.shared))
    }

    /// When the VM was created.
    pub fn created(&self) -> Instant {
        self.created
    }

    /// Posts request bits (see [`request`]) to vCPU `id` and kicks it.
    pub fn request(&self, id: usize, bits: u32) -> bool {
        self.shared.request(id, bits)
    }

    /// Asks vCPU `id` to answer a ping (kick round trip).
    pub fn ping(&self, id: usize) -> bool {
        self.request(id, request::PING)
    }

    /// Flushes vCPU `id`'s TLB (shadow entries and hardware) from this
    /// thread, as a VMM-initiated shootdown: returns once it is acknowledged.
    pub fn flush_tlb(&self, id: usize) -> bool {
        let machine = &self.shared.machine;
        let Some(tlb) = machine.tlbs.get(id) else {
            return false;
        };
        crate::mm::tlb::lock(&tlb).flush_all(&*machine.mem);
        machine.flusher().flush_cpu(id, None);
        true
    }

    /// Sets `VcpuArea::stop` of vCPU `id` (ends the `spin` program).
    pub fn stop_spinning(&self, id: usize) {
        let off = std::mem::offset_of!(cowlab_abi::VcpuArea, stop) as u64;
        self.shared
            .mem
            .word(cowlab_abi::layout::vcpu_area_phys(id) + off)
            .store(1, Ordering::Release);
    }

    /// vCPUs that have not ended.
    pub fn live(&self) -> &BTreeSet<usize> {
        &self.live
    }

    /// The next event, waiting at most `timeout`.
    pub fn next_event(&mut self, timeout: Duration) -> Option<Event> {
        let event = match self.events.recv_timeout(timeout) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => return None,
        };
        match &event {
            Event::Spawned { id, program, .. } => {
                self.live.insert(*id);
                self.programs.insert(*id, *program);
            }
            Event::Booted { at, .. } if self.boot_time.is_none() => {
                self.boot_time = Some(at.duration_since(self.created));
            }
            Event::Ended(report) => {
                self.live.remove(&report.id);
                self.ended.insert(report.id, (**report).clone());
            }
            _ => {}
        }
        Some(event)
    }

    /// Waits until every vCPU has ended, or until `timeout` (the watchdog),
    /// calling `on_event` for each event; returns the run's report.
    pub fn wait(
        &mut self,
        timeout: Option<Duration>,
        mut on_event: impl FnMut(&Event),
    ) -> RunReport {
        let start = Instant::now();
        let mut console = Vec::new();
        let mut timed_out = None;
        let mut stuck = Vec::new();
        let mut deadline = timeout.map(|t| start + t);
        // The vCPUs spawned at boot are announced by events already queued.
        while let Some(e) = self.next_event(Duration::ZERO) {
            record(&e, &mut console);
            on_event(&e);
        }
        let shared = Arc::clone(&self.shared);
        let hooks = &shared.machine.hooks;
        let mut unreachable = None;
        let mut tick = Instant::now();
        while !self.live.is_empty() {
            // Time with vCPUs stopped from outside counts for neither the
            // watchdog nor the schedule's stall detection.
            let now = Instant::now();
            if timed_out.is_none() && shared.held_from_outside() {
                deadline = deadline.map(|d| d + (now - tick));
                hooks.hold_progress();
            }
            tick = now;
            let until_deadline = deadline.map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(Instant::now())
            });
            match self.next_event(until_deadline.min(SCHEDULE_CHECK)) {
                Some(e) => {
                    record(&e, &mut console);
                    on_event(&e);
                }
                None if deadline.is_some_and(|d| Instant::now() >= d) => {
                    if timed_out.is_some() {
                        break;
                    }
                    timed_out = timeout;
                    stuck = self.live.iter().copied().collect();
                    hooks.release_all();
                    shared.machine.stop_sleepers();
                    // Every slot, not only the live ones seen so far: a
                    // vCPU being forked now is not among them yet.
                    let count = shared.slots().len();
                    for id in 0..count {
                        shared.request(id, request::STOP);
                    }
                    deadline = Some(Instant::now() + STOP_GRACE);
                }
                None => {}
            }
            if unreachable.is_none() && !shared.held_from_outside() {
                unreachable = hooks.check_schedule(self.live.len());
            }
        }
        if unreachable.is_none() && timed_out.is_none() {
            unreachable = hooks.check_schedule(0);
        }
        hooks.release_all();
        let mut vcpus: Vec<VcpuReport> = self.ended.values().cloned().collect();
        for id in &self.live {
            let outcome = Outcome::Error(match self.shared.panic_of(*id) {
                Some(why) => format!("panicked: {why}; its thread then blocked as it unwound"),
                None => "did not leave KVM_RUN after being stopped".into(),
            });
            vcpus.push(VcpuReport::failed(*id, self.programs[id], outcome));
        }
        vcpus.sort_by_key(|v| v.id);
        let user_pages = self.shared.machine.frames.in_use().count();
        let mut violations: Vec<String> = vcpus
            .iter()
            .flat_map(|v| v.violations.iter().cloned())
            .collect();
        if self.live.is_empty() {
            violations.extend(self.teardown());
        }
        RunReport {
            vcpus,
            console,
            timed_out,
            stuck,
            boot_time: self.boot_time,
            wall: self.created.elapsed(),
            user_pages,
            violations,
            unreachable,
            rule_counts: hooks.rule_counts(),
            hit_order: hooks.take_order(),
        }
    }

    /// After the last vCPU: checks the address spaces (`mm_verify`), tears
    /// them down (`exit_mmap`) and checks that no frame leaked.
    fn teardown(&self) -> Vec<String> {
        if self.shared.release_processes_if_panicked() {
            return Vec::new();
        }
        let processes = std::mem::take(
            &mut *self
                .shared
                .processes
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        let machine = &self.shared.machine;
        let mut out = Vec::new();
        if self.shared.check {
            let mms: Vec<&Mm> = processes.iter().map(|m| &**m).collect();
            out.extend(mm_verify(machine, &mms, &[]).into_iter().map(|v| v.0));
        }
        drop(processes);
        // What the guests still hold is released with the VM (a pipe or an
        // io_uring closing).
        machine.unpin_all();
        if self.shared.check && out.is_empty() {
            out.extend(verify_no_leaks(machine).into_iter().map(|v| v.0));
        }
        out
    }
}

/// A weak hold on a running VM, for the control socket: it can look at
/// the vCPUs and hooks, kick vCPUs to the control gate, and end the run.
#[derive(Clone)]
pub struct VmHandle(Weak<Shared>);

/// What a vCPU is doing, as `query-status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuState {
    Running,
    /// Parked by the control gate (`stop`).
    Stopped,
    /// Held by a `pause` rule at this point.
    PausedAt(String),
    /// Waiting in the VMM: on a schedule step or a lock (why).
    Blocked(String),
    Ended,
}

impl VmHandle {
    /// The VM's vCPUs and what each is doing; `None` once the VM is gone.
    pub fn vcpus(&self) -> Option<Vec<VcpuState>> {
        let shared = self.0.upgrade()?;
        let paused = shared.machine.hooks.paused();
        let blocked = shared.machine.hooks.blocked();
        let parked = shared.gate.as_ref().map(|g| g.parked()).unwrap_or_default();
        let slots = shared.slots();
        Some(
            slots
                .iter()
                .enumerate()
                .map(|(id, slot)| {
                    if slot.ctl.has_ended() {
                        VcpuState::Ended
                    } else if let Some(p) = paused.get(&id) {
                        VcpuState::PausedAt(p.clone())
                    } else if parked.contains(&id) {
                        VcpuState::Stopped
                    } else if let Some(why) = blocked.get(&id) {
                        VcpuState::Blocked(why.clone())
                    } else {
                        VcpuState::Running
                    }
                })
                .collect(),
        )
    }

    /// Kicks every vCPU out of the guest so it looks at the control gate.
    pub fn kick_all(&self) {
        let Some(shared) = self.0.upgrade() else {
            return;
        };
        let count = shared.slots().len();
        for id in 0..count {
            shared.request(id, request::PARK);
        }
    }

    /// Runs `f` on the VM's hooks (rules, pauses), if the VM is still there.
    pub fn with_hooks<T>(&self, f: impl FnOnce(&hooks::Hooks) -> T) -> Option<T> {
        self.0.upgrade().map(|s| f(&s.machine.hooks))
    }

    /// Ends the run: every waiter goes free and every vCPU is stopped.
    pub fn stop_all(&self) {
        let Some(shared) = self.0.upgrade() else {
            return;
        };
        shared.machine.hooks.release_all();
        shared.machine.stop_sleepers();
        let count = shared.slots().len();
        for id in 0..count {
            shared.request(id, request::STOP);
        }
    }
}

/// Whether the device opened at `path` is a KVM cowlab can use: it
/// answers `KVM_GET_API_VERSION` with the stable API (12) and has
/// `KVM_CAP_IMMEDIATE_EXIT`. Anything else (`/dev/null`, a file) is
/// [`Error::KvmUnusable`], naming the path and what failed.
fn check_kvm(kvm: &Kvm, path: &str) -> Result<(), Error> {
    let unusable = |why: String| Error::KvmUnusable {
        path: path.to_string(),
        why,
    };
    let version = kvm.get_api_version();
    if version < 0 {
        let e = vmm_sys_util::errno::Error::last();
        return Err(unusable(format!("KVM_GET_API_VERSION failed: {e}")));
    }
    if version != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(unusable(format!(
            "KVM_GET_API_VERSION is {version}, not {}",
            kvm_bindings::KVM_API_VERSION
        )));
    }
    if !kvm.check_extension(Cap::ImmediateExit) {
        return Err(unusable("it lacks KVM_CAP_IMMEDIATE_EXIT".into()));
    }
    Ok(())
}

/// `KVM_GET_SUPPORTED_CPUID` of the device at `path`, asked once per
/// process: in a nested VM every CPUID the host kernel executes for it
/// traps, and it was ~11 % of a small litmus test's runs (perf).
fn supported_cpuid(kvm: &Kvm, path: &str) -> Result<CpuId, Error> {
    static CACHE: Mutex<Vec<(String, CpuId)>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, c)) = cache.iter().find(|(p, _)| p == path) {
        return Ok(c.clone());
    }
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_op("KVM_GET_SUPPORTED_CPUID"))?;
    cache.push((path.to_string(), cpuid.clone()));
    Ok(cpuid)
}

/// Installs the rules, schedule, chaos and observer of `config`.
fn arm_hooks(hooks: &hooks::Hooks, config: &VmConfig) {
    hooks.set_run(config.run);
    if let Some(t) = &config.trace {
        hooks.trace.set(Arc::clone(t));
    }
    for rule in &config.rules {
        hooks.add_rule(rule.clone());
    }
    if !config.schedule.is_empty() {
        hooks.set_schedule(config.schedule.clone());
    }
    if let Some(seed) = config.chaos {
        hooks.set_chaos(seed, CHAOS_MAX_DELAY);
        if config.schedule.is_empty() {
            // A witness found by chaos is replayed by its order of points.
            hooks.record_order();
        }
    }
    if let Some(control) = &config.control {
        for (tag, rule) in &control.rules {
            hooks.add_tagged_rule(rule.clone(), Some(*tag));
        }
        hooks.set_observer(control.observer.clone());
    }
}

fn record(e: &Event, console: &mut Vec<(usize, String)>) {
    if let Event::Console { id, line } = e {
        console.push((*id, line.clone()));
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let count = self.shared.slots().len();
        self.shared.machine.hooks.release_all();
        self.shared.machine.stop_sleepers();
        for id in 0..count {
            self.shared.request(id, request::STOP);
        }
        // Join the threads that have finished; one stuck in KVM is left
        // behind rather than hanging the caller.
        let deadline = Instant::now() + STOP_GRACE;
        while !self.live.is_empty() && Instant::now() < deadline {
            self.next_event(Duration::from_millis(50));
        }
        let slots = std::mem::take(&mut *self.shared.slots());
        for (id, slot) in slots.into_iter().enumerate() {
            if !self.live.contains(&id) {
                let _ = slot.thread.join();
            }
        }
        // An address space a panic left behind is torn down carefully,
        // whichever thread drops the VM's state last.
        self.shared.release_processes_if_panicked();
    }
}

/// Loads a boot plan: its bytecode at `LITMUS_PHYS`, its regions mapped
/// (and populated) in the first process.
fn load_plan(mem: &GuestMem, mm: &Mm, plan: &BootPlan) -> Result<(), Error> {
    let header = [bytecode::MAGIC, plan.code.len() as u64];
    let words = header
        .iter()
        .copied()
        .chain(plan.code.iter().flat_map(|i| [i.word, i.imm]));
    for (i, w) in words.enumerate() {
        let pa = LITMUS_PHYS + i as u64 * 8;
        if pa >= LITMUS_PHYS + LITMUS_SIZE {
            return Err(Error::Config("the litmus program does not fit".into()));
        }
        mem.word(pa).store(w, Ordering::Relaxed);
    }
    for r in &plan.regions {
        let len = r.pages * cowlab_abi::layout::PAGE_SIZE;
        mm.mmap(Some(r.addr), len, r.prot)
            .map_err(|e| Error::Config(format!("cannot map region {}: {e}", r.name)))?;
        if r.populate {
            mm.populate(r.addr, len)
                .map_err(|e| Error::Config(format!("cannot populate region {}: {e}", r.name)))?;
        }
    }
    Ok(())
}

/// Copies the PT_LOAD segments of the guest into memory.
fn load_image(mem: &GuestMem, image: &Image, elf: &[u8]) -> Result<(), Error> {
    for seg in &image.segments {
        mem.write(seg.pa, &elf[seg.file.clone()]).ok_or_else(|| {
            Error::Image(format!("segment at {:#x} outside guest memory", seg.pa))
        })?;
    }
    Ok(())
}

/// Reads and checks the guest's boot header at `IMAGE_PHYS`: every stub it
/// names must lie inside a loaded segment.
fn read_boot_header(mem: &GuestMem, image: &Image) -> Result<BootHeader, Error> {
    let word = |i: u64| mem.word(IMAGE_PHYS + i * 8).load(Ordering::Relaxed);
    let mut exceptions = [0; 32];
    for (i, e) in exceptions.iter_mut().enumerate() {
        *e = word(4 + i as u64);
    }
    let header = BootHeader {
        magic: word(0),
        page_fault: word(1),
        flush: word(2),
        triple_fault: word(3),
        exceptions,
        killed: word(36),
    };
    if header.magic != BOOT_HEADER_MAGIC {
        return Err(Error::Image(format!(
            "no cowlab boot header at physical {IMAGE_PHYS:#x} (build the guest like guest/, with guest/link.ld)"
        )));
    }
    let inside = |va: u64| {
        image
            .segments
            .iter()
            .any(|s| (kernel_va(s.pa)..kernel_va(s.pa) + s.mem_size).contains(&va))
    };
    let stubs = [
        header.page_fault,
        header.flush,
        header.triple_fault,
        header.killed,
    ]
    .into_iter()
    .chain(header.exceptions);
    if let Some(bad) = stubs.into_iter().find(|va| !inside(*va)) {
        return Err(Error::Image(format!(
            "boot header names {bad:#x}, outside the image"
        )));
    }
    Ok(header)
}
