//! A VM: KVM file descriptors, guest memory, the guest image and the vCPU
//! threads, plus the event stream the controlling thread watches.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cowlab_abi::layout::{
    user_stack_top, KERNEL_REGION_SIZE, MAX_MEM_SIZE, MAX_VCPUS, PAGE_SIZE, USER_STACK_SIZE,
};
use cowlab_abi::Program;

use super::boot::{load_image, load_plan, read_boot_header};
use super::config::{arm_hooks, VmConfig, MIN_MEM_MIB};
use super::error::{Error, MemoryError};
use super::handle::VmHandle;
use super::loader;
use super::report::{Outcome, RunReport, VcpuReport};
use super::shared::{install_panic_hook, Shared};
use super::shell::Shell;
use super::shootdown::{request, KvmFlusher};
use super::vcpu::Start;
use super::{arch, kick, GUEST_ELF};
use crate::mm::{mm_verify, mmap, verify_no_leaks, Machine, Mm, PhysMem};

/// How often `wait` checks whether the schedule can still be satisfied.
const SCHEDULE_CHECK: Duration = Duration::from_millis(10);

/// How long stopped vCPUs get to leave `KVM_RUN` after a timeout.
const STOP_GRACE: Duration = Duration::from_secs(2);

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

impl Vm {
    /// Creates the VM (or takes the one an earlier run left, reset, if
    /// `config.reuse`: [`super::shell`]), loads the guest and starts
    /// `config.vcpus` vCPUs (or the boot plan's threads).
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

        kick::install_handler()?;
        install_panic_hook();
        let shell = Shell::obtain(config)?;
        let mem = Arc::clone(&shell.mem);
        let size = mem.size();
        load_image(
            &mem,
            &image,
            config.guest_elf.as_deref().unwrap_or(GUEST_ELF),
        )?;
        let boot_header = read_boot_header(&mem, &image)?;
        for (pa, v) in arch::kernel_table_writes() {
            mem.word(pa).store(v, Ordering::Relaxed);
        }

        let phys: Arc<dyn PhysMem> = Arc::clone(&mem) as Arc<dyn PhysMem>;
        let machine = Machine::new(
            phys,
            KERNEL_REGION_SIZE,
            size,
            arch::kernel_pml4(),
            config.policy,
        )
        .map_err(|_| Error::Memory(MemoryError::NoZeroPage))?;
        let machine = Arc::new(machine);
        let mm = Mm::new(&machine).map_err(|_| Error::Memory(MemoryError::NoPageTable))?;
        let (tx, rx) = channel();
        let shared = Arc::new(Shared {
            shell,
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
            event_sleep: Default::default(),
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
            if config.plan.is_some() {
                // A litmus thread's first instruction pushes on its stack:
                // its top page is faulted in here, and cached in the
                // thread's TLB as it starts (`Vcpu::new`), which spares
                // every thread of every run that first exit. Private to the
                // thread, the page is in no test's outcome.
                let top = user_stack_top(id) - PAGE_SIZE;
                mm.populate(top, PAGE_SIZE).map_err(|e| {
                    Error::Config(format!("cannot populate the stack of vcpu {id}: {e:?}"))
                })?;
            }
        }
        if let Some(plan) = &config.plan {
            load_plan(&vm.shared.mem, &mm, plan)?;
        }
        // Armed after the loader populated the regions: setup is not part
        // of any vCPU's run, so no rule or schedule step can match it.
        let mem = Arc::clone(&vm.shared.mem);
        let words: crate::hooks::WordReader = Arc::new(move |i| mem.event_set(i));
        arm_hooks(&machine.hooks, config, words);
        // Explored, no decision is made before every boot vCPU has reached
        // its first point (they get ids 0, 1, … in order).
        for id in 0..boot_vcpus {
            machine.hooks.vcpu_spawning(id);
        }
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
        spawned?;
        Ok(vm)
    }

    /// A handle the control socket keeps while the VM runs.
    pub fn handle(&self) -> VmHandle {
        VmHandle(Arc::downgrade(&self.shared))
    }

    /// Whether this VM ran an earlier run of this process (reset since).
    pub fn reused(&self) -> bool {
        self.shared.shell.reused()
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
        let mut deadlock = None;
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
                    shared.stop_all();
                    deadline = Some(Instant::now() + STOP_GRACE);
                }
                None => {}
            }
            if unreachable.is_none() && !shared.held_from_outside() {
                unreachable = hooks.check_schedule(self.live.len());
            }
            if timed_out.is_none() && deadlock.is_none() {
                // Explored: nothing can move any more; end it as the
                // watchdog would, without waiting for it.
                // Under a schedule: every thread asleep in `await`.
                deadlock = hooks.explore_deadlock().or_else(|| {
                    (!shared.held_from_outside())
                        .then(|| hooks.event_deadlock(self.live.len()))
                        .flatten()
                });
                if deadlock.is_some() {
                    stuck = self.live.iter().copied().collect();
                    shared.stop_all();
                    deadline = Some(Instant::now() + STOP_GRACE);
                    timed_out = Some(start.elapsed());
                }
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
        if self.live.is_empty() {
            // Every vCPU has ended: none runs in this VM again before its
            // memslot is deleted (reuse) or it is closed.
            let machine = &self.shared.machine;
            machine
                .tlbs
                .release_retired(&*machine.mem, machine.frames.pool());
        }
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
            decisions: hooks.take_decisions(),
            deadlock,
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

fn record(e: &Event, console: &mut Vec<(usize, String)>) {
    if let Event::Console { id, line } = e {
        console.push((*id, line.clone()));
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shared.stop_all();
        // Join the threads that have finished; one stuck in KVM is left
        // behind rather than hanging the caller.
        let deadline = Instant::now() + STOP_GRACE;
        while !self.live.is_empty() && Instant::now() < deadline {
            self.next_event(Duration::from_millis(50));
        }
        let slots = std::mem::take(&mut *self.shared.slots());
        let mut joined = true;
        for (id, slot) in slots.into_iter().enumerate() {
            joined &= !self.live.contains(&id) && slot.thread.join().is_ok();
        }
        // Every vCPU thread is gone with its fd given back: the next run
        // may use this VM, reset (a panic leaves it to be closed).
        let clean = joined && !self.shared.any_panic();
        Shell::recycle(Arc::clone(&self.shared.shell), clean);
        // An address space a panic left behind is torn down carefully,
        // whichever thread drops the VM's state last.
        self.shared.release_processes_if_panicked();
    }
}
