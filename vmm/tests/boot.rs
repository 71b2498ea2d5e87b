//! Boots real KVM VMs running the built-in guest programs.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::vm::{assert_verified, hex_after, line, require_kvm, TIMEOUT};
use cowlab::kvm::{exit_code, Event, Outcome, RunReport, Vm, VmConfig};
use cowlab_abi::layout::{user_stack_top, PAGE_SIZE, USER_STACK_SIZE};
use cowlab_abi::Program;

fn run(program: Program, vcpus: usize, arg: u64) -> RunReport {
    run_with(VmConfig {
        program,
        vcpus,
        arg,
        ..VmConfig::default()
    })
}

fn run_with(config: VmConfig) -> RunReport {
    common::vm::run(config)
}

#[test]
fn hello_prints_one_line_per_vcpu_and_succeeds() {
    let report = run(Program::Hello, 4, 0);
    assert_eq!(report.exit_code(), exit_code::OK, "{:?}", report.problems());
    assert_eq!(report.vcpus.len(), 4);
    for id in 0..4 {
        let lines: Vec<_> = report.console.iter().filter(|(v, _)| *v == id).collect();
        assert_eq!(lines.len(), 1, "vcpu {id}: {lines:?}");
        assert!(
            lines[0]
                .1
                .starts_with(&format!("hello from vcpu {id}: 16 fresh pages")),
            "{}",
            lines[0].1
        );
        assert!(report.vcpu(id).unwrap().faults >= 16);
    }
    assert!(report.boot_time.is_some());
}

#[test]
fn vcpus_run_in_parallel() {
    require_kvm();
    let n = 3;
    let mut vm = Vm::new(&VmConfig {
        program: Program::Spin,
        vcpus: n,
        ..VmConfig::default()
    })
    .unwrap();
    let mut booted = 0;
    while booted < n {
        match vm.next_event(Duration::from_secs(10)) {
            Some(Event::Booted { .. }) => booted += 1,
            Some(Event::Ended(r)) => panic!(
                "vcpu {} ended while others had not booted: {}",
                r.id, r.outcome
            ),
            Some(_) => {}
            None => panic!("only {booted} of {n} vCPUs booted"),
        }
    }
    // Every vCPU is spinning in the guest at once.
    assert_eq!(vm.live().len(), n);
    for id in 0..n {
        vm.stop_spinning(id);
    }
    let report = vm.wait(TIMEOUT, |_| {});
    assert_eq!(report.exit_code(), exit_code::OK, "{:?}", report.problems());
    assert_verified(&report);
}

#[test]
fn every_touched_page_is_forwarded_exactly_once() {
    let pages = 100;
    let report = run_with(VmConfig {
        program: Program::Touch,
        vcpus: 2,
        arg: pages,
        record_faults: true,
        ..VmConfig::default()
    });
    assert_eq!(report.exit_code(), exit_code::OK, "{:?}", report.problems());
    for v in &report.vcpus {
        let base = hex_after(line(&report, v.id, "touch:"), "at ");
        let region = base..base + pages * PAGE_SIZE;
        let mut per_page: BTreeMap<u64, usize> = BTreeMap::new();
        for a in v.fault_addrs.iter().filter(|a| region.contains(a)) {
            *per_page.entry(a / PAGE_SIZE).or_default() += 1;
        }
        assert_eq!(
            per_page.len() as u64,
            pages,
            "vcpu {}: distinct pages faulted",
            v.id
        );
        assert!(
            per_page.values().all(|n| *n == 1),
            "vcpu {}: a page faulted twice",
            v.id
        );
        // The only other faults are on this thread's own stack.
        let stack = user_stack_top(v.id) - USER_STACK_SIZE..user_stack_top(v.id);
        let others: Vec<_> = v
            .fault_addrs
            .iter()
            .filter(|a| !region.contains(a) && !stack.contains(a))
            .collect();
        assert!(
            others.is_empty(),
            "vcpu {}: unexpected faults at {others:x?}",
            v.id
        );
        assert_eq!(v.faults as usize, v.fault_addrs.len());
        // Every fault here ends in a fill; fault-around (tlb_fault_around,
        // default 8) adds the present pages of an aligned group this
        // thread shares with the other one's pages (the two mmaps are
        // neighbours): at most 7 for each of the region's two ends.
        assert!(
            v.fills >= v.faults && v.fills - v.faults <= 14,
            "vcpu {}: {} fills for {} faults",
            v.id,
            v.fills,
            v.faults
        );
    }
    // exit_mmap() at the last thread's exit freed every page.
    assert_eq!(report.user_pages, 0);
    assert_verified(&report);
}

#[test]
fn divide_by_zero_is_reported_as_a_crash() {
    let report = run(Program::DivZero, 1, 0);
    assert_eq!(report.exit_code(), exit_code::VM_ERROR);
    match report.vcpus[0].outcome {
        Outcome::Crashed { vector, rip, .. } => {
            assert_eq!(vector, 0);
            assert!(
                rip >= cowlab_abi::layout::KERNEL_BASE,
                "RIP {rip:#x} is in the guest image"
            );
        }
        ref o => panic!("expected a crash, got {o}"),
    }
    assert!(
        report.problems()[0].contains("#DE divide error"),
        "{:?}",
        report.problems()
    );
}

#[test]
fn triple_fault_is_reported_not_hung() {
    let report = run(Program::TripleFault, 1, 0);
    assert_eq!(report.exit_code(), exit_code::VM_ERROR);
    assert!(report.timed_out.is_none());
    // Standard KVM shuts the vCPU down. PVM (this host) delivers the #UD
    // through the gates it loaded with the IDT and ignores the program's
    // later changes to them, so there the #UD is what gets reported.
    match report.vcpus[0].outcome {
        Outcome::TripleFault { .. } => {}
        Outcome::Crashed { vector: 6, .. } => {}
        ref o => panic!("expected a triple fault or the #UD that precedes it, got {o}"),
    }
}

#[test]
fn watchdog_stops_a_looping_guest_and_names_it() {
    require_kvm();
    let config = VmConfig {
        program: Program::Loop,
        vcpus: 2,
        ..VmConfig::default()
    };
    let mut vm = Vm::new(&config).unwrap();
    let report = vm.wait(Some(Duration::from_millis(500)), |_| {});
    assert_eq!(report.exit_code(), exit_code::VM_ERROR);
    assert_eq!(report.stuck, vec![0, 1]);
    for v in &report.vcpus {
        assert!(
            matches!(v.outcome, Outcome::Stopped { rip } if rip >= cowlab_abi::layout::KERNEL_BASE),
            "{}",
            v.outcome
        );
    }
    assert!(
        report.problems()[0].contains("vcpu 0, vcpu 1"),
        "{:?}",
        report.problems()
    );
}

#[test]
fn a_null_read_is_a_segv_outcome() {
    let report = run(Program::Segv, 1, 0);
    assert_eq!(report.exit_code(), exit_code::FAILED);
    match report.vcpus[0].outcome {
        Outcome::Segv { addr, access, .. } => {
            assert_eq!(addr, 8);
            assert_eq!(access, cowlab::mm::Access::Read);
        }
        ref o => panic!("expected a segv, got {o}"),
    }
}

#[test]
fn a_failed_self_check_exits_1_with_its_message() {
    let report = run(Program::Fail, 1, 0);
    assert_eq!(report.exit_code(), exit_code::FAILED);
    assert!(
        matches!(&report.vcpus[0].outcome, Outcome::Failed(m) if m.contains("failed, as asked"))
    );
}

#[test]
fn vcpus_spawned_while_others_run_share_the_address_space() {
    let report = run(Program::Spawn, 1, 3);
    assert_eq!(report.exit_code(), exit_code::OK, "{:?}", report.problems());
    assert_eq!(report.vcpus.len(), 4);
    for child in 1..4 {
        assert!(report
            .console
            .iter()
            .any(|(v, l)| *v == 0 && l == &format!("vcpu 0 spawned vcpu {child}")));
        assert!(report
            .console
            .iter()
            .any(|(v, l)| *v == child && l.starts_with("hello from vcpu")));
    }
}

#[test]
fn flush_interrupt_empties_the_tlb_and_is_acknowledged() {
    require_kvm();
    let config = VmConfig {
        program: Program::Spin,
        record_faults: true,
        ..VmConfig::default()
    };
    let mut vm = Vm::new(&config).unwrap();
    while !matches!(
        vm.next_event(Duration::from_secs(10)),
        Some(Event::Booted { .. }) | None
    ) {}
    // Let the program reach its spin loop on the (now mapped) user stack.
    std::thread::sleep(Duration::from_millis(50));
    assert!(vm.flush_tlb(0));
    loop {
        match vm.next_event(Duration::from_secs(10)) {
            Some(Event::FlushAcked { id: 0, .. }) => break,
            Some(Event::Ended(r)) => panic!("ended before the flush ack: {}", r.outcome),
            Some(_) => {}
            None => panic!("no flush acknowledgement"),
        }
    }
    vm.stop_spinning(0);
    let report = vm.wait(TIMEOUT, |_| {});
    assert_eq!(report.exit_code(), exit_code::OK, "{:?}", report.problems());
    // The stack page was mapped before the flush and faulted in again after it.
    assert_verified(&report);
    let top_page = (user_stack_top(0) - 1) / PAGE_SIZE;
    let stack_faults = report.vcpus[0]
        .fault_addrs
        .iter()
        .filter(|a| *a / PAGE_SIZE == top_page)
        .count();
    assert_eq!(
        stack_faults, 2,
        "faults: {:x?}",
        report.vcpus[0].fault_addrs
    );
}

#[test]
fn back_to_back_shootdowns_to_a_spinning_vcpu_all_complete() {
    // Flushes arriving in every state of the target (in its program, in
    // the flush stub, between exits) are acknowledged one way or another:
    // none is lost and none hangs the initiator.
    require_kvm();
    let config = VmConfig {
        program: Program::Spin,
        ..VmConfig::default()
    };
    let mut vm = Vm::new(&config).unwrap();
    while !matches!(
        vm.next_event(Duration::from_secs(10)),
        Some(Event::Booted { .. }) | None
    ) {}
    let mut acked_by_guest = 0;
    for _ in 0..1000 {
        assert!(vm.flush_tlb(0));
        while let Some(e) = vm.next_event(Duration::ZERO) {
            acked_by_guest += usize::from(matches!(e, Event::FlushAcked { .. }));
        }
    }
    // On a loaded host the spinning vCPU may not have been in guest mode
    // for any of them (each is then acknowledged on its behalf): flush
    // until the interrupt path has been taken once, with a deadline.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut rest = Vec::new();
    while acked_by_guest == 0 && Instant::now() < deadline {
        assert!(vm.flush_tlb(0));
        while let Some(e) = vm.next_event(Duration::from_millis(10)) {
            acked_by_guest += usize::from(matches!(e, Event::FlushAcked { .. }));
            if rest.len() < 16 {
                rest.push(e);
            }
        }
    }
    assert!(
        acked_by_guest > 0,
        "no flush interrupt reached the guest in 60 s: {rest:?}"
    );
    vm.stop_spinning(0);
    let report = vm.wait(TIMEOUT, |_| {});
    assert_eq!(report.exit_code(), exit_code::OK, "{:?}", report.problems());
    assert_verified(&report);
}
