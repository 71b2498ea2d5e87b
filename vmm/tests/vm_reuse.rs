//! A run on a reused VM (the last run's KVM VM, memory and vCPU fds,
//! reset: `kvm::shell`) is indistinguishable from a run on a fresh VM:
//! the same faults at the same addresses, the same console, the same end.
//! A translation KVM kept from the previous run would show here as a
//! missing fault (the access would not trap), memory not reset as a fresh
//! page that does not read zero (the programs check that themselves).

mod common;

use std::collections::BTreeMap;

use common::vm::{assert_verified, require_kvm, TIMEOUT};
use cowlab::kvm::{Outcome, RunReport, Vm, VmConfig};
use cowlab_abi::Program;

/// Guest memory no other test binary's VMs use, so the idle VM this
/// process keeps is this test's.
const MEM_MIB: u64 = 72;

/// The same for the litmus test, which runs beside the other.
const LITMUS_MEM_MIB: u64 = 76;

/// What a run did, as far as the guest and the memory manager can tell.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    outcomes: Vec<(usize, Outcome)>,
    console: Vec<(usize, String)>,
    /// Sorted addresses of each vCPU's forwarded faults.
    faults: BTreeMap<usize, Vec<u64>>,
    user_pages: usize,
}

fn seen(report: &RunReport) -> Seen {
    Seen {
        outcomes: report
            .vcpus
            .iter()
            .map(|v| (v.id, v.outcome.clone()))
            .collect(),
        console: report.console.clone(),
        faults: report
            .vcpus
            .iter()
            .map(|v| {
                let mut a = v.fault_addrs.clone();
                a.sort_unstable();
                (v.id, a)
            })
            .collect(),
        user_pages: report.user_pages,
    }
}

/// Boots `program(arg)` on a fresh VM or the reused one; returns whether
/// it was reused and what the run did.
fn boot(program: Program, arg: u64, reuse: bool) -> (bool, Seen) {
    let mut vm = Vm::new(&VmConfig {
        program,
        arg,
        mem_mib: MEM_MIB,
        record_faults: true,
        check: true,
        reuse,
        ..VmConfig::default()
    })
    .expect("VM creation");
    let reused = vm.reused();
    let report = vm.wait(TIMEOUT, |_| {});
    assert_verified(&report);
    assert!(report.timed_out.is_none(), "{program:?} timed out");
    (reused, seen(&report))
}

#[test]
fn a_run_on_a_reused_vm_is_the_run_on_a_fresh_one() {
    require_kvm();
    // One vCPU each: their faults do not depend on timing.
    for (program, arg) in [
        (Program::Hello, 48),
        (Program::Touch, 200),
        (Program::MadviseZero, 0),
        (Program::MprotectRo, 0),
        (Program::MunmapAccess, 0),
    ] {
        let (reused, fresh) = boot(program, arg, false);
        assert!(!reused, "--fresh-vms must boot a new VM");
        assert!(
            fresh.faults.values().any(|f| !f.is_empty()),
            "{program:?} takes faults"
        );
        for round in 0..3 {
            let (reused, again) = boot(program, arg, true);
            assert!(
                reused,
                "{program:?} round {round}: the last VM was not reused"
            );
            assert_eq!(again, fresh, "{program:?} round {round} on a reused VM");
        }
    }
    // Several vCPUs: which of them faults where depends on timing, how
    // each ends and what it prints does not.
    for (program, arg) in [
        (Program::StaleTlb, 0),
        (Program::StaleTlb, 1),
        (Program::ForkCow, 0),
        (Program::MmThreads, 3),
    ] {
        let (_, fresh) = boot(program, arg, false);
        for round in 0..3 {
            let (reused, again) = boot(program, arg, true);
            assert!(
                reused,
                "{program:?} round {round}: the last VM was not reused"
            );
            assert_eq!(
                (&again.outcomes, &again.console),
                (&fresh.outcomes, &fresh.console),
                "{program:?} round {round} on a reused VM"
            );
        }
    }
}

/// Boots a litmus test (on the reused VM) with a watchdog of `timeout`.
fn boot_litmus(src: &str, timeout: std::time::Duration) -> (bool, RunReport) {
    let test = cowlab::litmus::load(src).expect("the test compiles");
    let mut vm = Vm::new(&VmConfig {
        program: Program::Litmus,
        plan: Some(std::sync::Arc::clone(&test.plan)),
        mem_mib: LITMUS_MEM_MIB,
        check: true,
        ..VmConfig::default()
    })
    .expect("VM creation");
    let reused = vm.reused();
    let report = vm.wait(Some(timeout), |_| {});
    assert_verified(&report);
    (reused, report)
}

/// Litmus events live in guest memory (the shared page): one signalled in
/// a run must not be seen as signalled by the next run's `await`.
#[test]
fn an_event_signalled_in_one_run_is_not_signalled_in_the_next() {
    require_kvm();
    let signal =
        "cowlab reuse-signal\n{ region buf 1 rw }\nP0 { r1 = 1\n signal e }\nexists (P0:r1 == 2)\n";
    let wait =
        "cowlab reuse-await\n{ region buf 1 rw }\nP0 { await e\n r1 = 1 }\nexists (P0:r1 == 1)\n";
    for round in 0..3 {
        let (_, report) = boot_litmus(signal, TIMEOUT.unwrap());
        assert!(
            report.timed_out.is_none(),
            "round {round}: the signal run ends"
        );
        // Nobody signals `e` in this run: it can only wait until the
        // watchdog stops it.
        let (reused, report) = boot_litmus(wait, std::time::Duration::from_millis(300));
        assert!(reused, "round {round}: the last VM was not reused");
        assert!(
            report.timed_out.is_some(),
            "round {round}: `await e` went on without a signal in its own run: {:?}",
            report.vcpus
        );
    }
}

/// A forced race on reused VMs, run after run: every run must reproduce it
/// (its schedule forces it) and none may hang. With guest memory reset by
/// `MADV_DONTNEED` alone (no memslot deletion), 19 of 300 runs here went
/// wrong on PVM: a vCPU saw the previous run's event words.
#[test]
fn a_forced_race_reproduces_in_every_run_on_reused_vms() {
    require_kvm();
    let (code, json) = common::cowlab_json(&[
        "run",
        "fork-vma-lock",
        "--policy",
        "linux-6.4",
        "--runs",
        "300",
    ]);
    assert_eq!(
        (json["positive"].as_u64(), json["stuck"].as_u64()),
        (Some(300), Some(0)),
        "{json}"
    );
    assert_eq!(code, Some(0), "{json}");
}
