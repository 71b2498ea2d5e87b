//! What to boot ([`VmConfig`]) and how its rules, schedule, chaos and
//! observer are armed in the VM's hooks.

use std::sync::Arc;
use std::time::Duration;

use cowlab_abi::layout::KERNEL_REGION_SIZE;
use cowlab_abi::Program;

use super::{Attachment, BootPlan};
use crate::hooks::{self, Rule, Step};
use crate::policy::Policy;

/// Smallest guest memory accepted: the kernel region plus 16 MiB of frames.
pub const MIN_MEM_MIB: u64 = (KERNEL_REGION_SIZE >> 20) + 16;

/// The longest delay chaos mode injects at a point.
pub const CHAOS_MAX_DELAY: Duration = Duration::from_micros(200);

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
    /// Injection rules, a schedule to enforce, a chaos seed (docs/design.md §8).
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
    /// Explore: every point parks its vCPU and this chooser decides who
    /// goes next (docs/exploration.md); replaces the schedule.
    pub explore: Option<hooks::ChooserSlot>,
    /// Run on the VM an earlier run of this process left, reset, when
    /// there is one of the same kind (`super::shell`); `false`: a new VM
    /// (`--fresh-vms`).
    pub reuse: bool,
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
            explore: None,
            reuse: super::shell::reuse_by_default(),
        }
    }
}

/// Installs the rules, schedule, chaos, explorer and observer of
/// `config`; the explorer reads litmus events through `words`.
pub(super) fn arm_hooks(hooks: &hooks::Hooks, config: &VmConfig, words: hooks::WordReader) {
    hooks.set_run(config.run);
    if let Some(t) = &config.trace {
        hooks.trace.set(Arc::clone(t));
    }
    for rule in &config.rules {
        hooks.add_rule(rule.clone());
    }
    if let Some(chooser) = &config.explore {
        let shared = config.plan.as_ref().map_or_else(Vec::new, |p| {
            p.regions
                .iter()
                .map(|r| (r.addr, r.addr + r.pages * cowlab_abi::layout::PAGE_SIZE))
                .collect()
        });
        hooks.set_explore(chooser.clone(), words, shared);
    } else if !config.schedule.is_empty() {
        // With a plan compiled with await hooks, a vCPU spinning in an
        // unsatisfied `await` counts as at rest between steps.
        hooks.set_schedule_with_words(config.schedule.clone(), Some(words));
    }
    if let Some(seed) = config.chaos {
        hooks.set_chaos(seed, CHAOS_MAX_DELAY);
        if config.schedule.is_empty() && config.explore.is_none() {
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
