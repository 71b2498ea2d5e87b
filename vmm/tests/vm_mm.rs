//! The memory manager on real vCPUs: threads writing disjoint and shared
//! pages, mprotect, munmap, MADV_DONTNEED, a stale TLB entry, tlb_capacity.
//! Every run is checked by `mm_verify` (`common::vm::run`).

mod common;

use common::vm::{hex_after, line, run};
use cowlab::kvm::{exit_code, Outcome, VmConfig};
use cowlab::mm::Access;
use cowlab_abi::Program;

fn program(program: Program, arg: u64) -> VmConfig {
    VmConfig {
        program,
        arg,
        ..VmConfig::default()
    }
}

#[test]
fn threads_write_their_own_pages_and_shared_words() {
    let report = run(program(Program::MmThreads, 3));
    assert_eq!(report.exit_code(), exit_code::OK, "{:?}", report.problems());
    assert_eq!(report.vcpus.len(), 4);
    assert!(line(&report, 0, "mm-threads: 3 threads").ends_with("shared counter of 30000: ok"));
}

#[test]
fn several_initial_vcpus_are_threads_of_one_process() {
    let report = run(VmConfig {
        vcpus: 3,
        ..program(Program::Hello, 4)
    });
    assert_eq!(report.exit_code(), exit_code::OK, "{:?}", report.problems());
    let bases: Vec<u64> = (0..3)
        .map(|id| hex_after(line(&report, id, "hello from"), "pages at "))
        .collect();
    assert!(
        bases[0] != bases[1] && bases[1] != bases[2],
        "one address space, distinct mappings: {bases:x?}"
    );
}

#[test]
fn a_write_after_mprotect_read_only_is_a_segv_at_that_address() {
    let report = run(program(Program::MprotectRo, 0));
    assert_eq!(report.exit_code(), exit_code::FAILED);
    let page = hex_after(line(&report, 0, "mprotect-ro:"), "page ");
    assert!(line(&report, 0, "mprotect-ro:").contains("reads 7"));
    assert_eq!(
        report.vcpus[0].outcome,
        Outcome::Segv {
            addr: page,
            access: Access::Write,
            rip: rip_of(&report.vcpus[0].outcome)
        }
    );
}

#[test]
fn an_access_after_munmap_is_a_segv() {
    let report = run(program(Program::MunmapAccess, 0));
    assert_eq!(report.exit_code(), exit_code::FAILED);
    let page = hex_after(line(&report, 0, "munmap-access:"), "unmapped ");
    assert!(
        matches!(report.vcpus[0].outcome, Outcome::Segv { addr, access: Access::Read, .. } if addr == page)
    );
}

#[test]
fn madvise_dontneed_pages_read_back_as_zero() {
    let report = run(program(Program::MadviseZero, 0));
    assert_eq!(report.exit_code(), exit_code::OK, "{:?}", report.problems());
    line(&report, 0, "madvise-zero: 4 pages read back as zero");
}

#[test]
fn a_write_lands_through_a_stale_tlb_entry_only_while_the_flush_is_withheld() {
    // Flush withheld: the other CPU's writable entry survives the logical
    // write-protect and its store lands; after the flush its store faults.
    let report = run(program(Program::StaleTlb, 0));
    let stale = line(
        &report,
        0,
        "stale-tlb: after mprotect(PROT_READ) without a flush",
    );
    assert!(stale.ends_with("0xbad1"), "{stale}");
    assert!(line(&report, 0, "stale-tlb: after the flush").ends_with("0xbad1"));
    assert_eq!(report.vcpus[0].outcome, Outcome::Exited(0));
    assert!(
        matches!(
            report.vcpus[1].outcome,
            Outcome::Segv {
                access: Access::Write,
                ..
            }
        ),
        "{}",
        report.vcpus[1].outcome
    );

    // Flushed at once: the very first store after mprotect faults.
    let report = run(program(Program::StaleTlb, 1));
    assert!(line(&report, 0, "stale-tlb: after the flush").ends_with("0x2"));
    assert_eq!(report.vcpus[0].outcome, Outcome::Exited(0));
    assert!(matches!(
        report.vcpus[1].outcome,
        Outcome::Segv {
            access: Access::Write,
            ..
        }
    ));
}

#[test]
fn a_tiny_tlb_evicts_and_refaults_but_stays_correct() {
    let pages = 64;
    let policy = cowlab::policy::Policy {
        tlb_capacity: Some(4),
        ..Default::default()
    };
    let report = run(VmConfig {
        policy,
        ..program(Program::Hello, pages)
    });
    assert_eq!(report.exit_code(), exit_code::OK, "{:?}", report.problems());
    // hello touches every page twice, the second time after 60 others:
    // with room for 4 translations those are misses again.
    assert!(
        report.vcpus[0].faults > 2 * pages,
        "faults: {}",
        report.vcpus[0].faults
    );
}

#[test]
fn tlb_fault_around_fills_neighbours_and_mm_verify_stays_clean() {
    // mm-threads: after joining its 2 workers, vCPU 0 reads the 16 pages
    // they wrote, present in the page table but not in its TLB. With
    // fault-around, each read fault's fill also caches the group's other
    // present pages, so vCPU 0 fills more pages than it faults and faults
    // less; without, every fault is one fill.
    let faults_and_fills = |group| {
        let policy = cowlab::policy::Policy {
            tlb_fault_around: cowlab::policy::FaultAround::pages(group).unwrap(),
            ..Default::default()
        };
        // `run` checks mm_verify (TLB entries against PTEs) at the end.
        let report = run(VmConfig {
            policy,
            ..program(Program::MmThreads, 0)
        });
        assert_eq!(report.exit_code(), exit_code::OK, "{:?}", report.problems());
        let v0 = &report.vcpus[0];
        (v0.faults, v0.fills)
    };
    let (faults_off, fills_off) = faults_and_fills(1);
    assert_eq!(fills_off, faults_off, "without fault-around");
    let (faults_on, fills_on) = faults_and_fills(8);
    assert!(
        fills_on >= faults_on + 8 && faults_on + 8 <= faults_off,
        "with fault-around: {faults_on} faults, {fills_on} fills; without: {faults_off} faults"
    );
}

#[test]
fn running_out_of_guest_frames_is_an_oom_outcome() {
    let frames = (cowlab::kvm::MIN_MEM_MIB << 20) / cowlab_abi::layout::PAGE_SIZE;
    let report = run(VmConfig {
        mem_mib: cowlab::kvm::MIN_MEM_MIB,
        ..program(Program::Touch, frames)
    });
    assert_eq!(report.exit_code(), exit_code::FAILED);
    assert!(
        matches!(report.vcpus[0].outcome, Outcome::Oom { .. }),
        "{}",
        report.vcpus[0].outcome
    );
}

fn rip_of(o: &Outcome) -> u64 {
    match o {
        Outcome::Segv { rip, .. } => *rip,
        _ => 0,
    }
}

#[test]
fn fork_shares_pages_copy_on_write_and_no_write_leaks_across() {
    let report = run(program(Program::ForkCow, 0));
    assert_eq!(report.exit_code(), exit_code::OK, "{:?}", report.problems());
    assert_eq!(report.vcpus.len(), 2, "the parent and its forked child");
    assert!(line(&report, 1, "fork-cow child:").contains("kept 0x11"));
    assert!(line(&report, 0, "fork-cow parent:").contains("parent kept 0x33"));
    // Both sides wrote the shared page: each took a COW fault.
    assert!(report.vcpus.iter().all(|v| v.faults >= 2));
}

fn with_policy(program: Program, preset: &str) -> VmConfig {
    let policy = cowlab::policy::Policy::preset(preset).expect("a preset");
    VmConfig {
        program,
        policy,
        ..VmConfig::default()
    }
}

#[test]
fn a_vmsplice_reference_reads_the_wrong_side_of_cow_only_before_v5_8() {
    // CVE-2020-29374 (seed 003): the child vmsplices the COW-shared page (a
    // read reference, FOLL_GET) and unmaps it; the parent writes. Without a
    // COW break on read GUP (v5.8) and with mapcount-based reuse, the parent
    // reuses the referenced page and the reference sees the parent's write;
    // from v5.9 the reference keeps the refcount above 1 and the parent
    // copies.
    for (preset, seen) in [
        ("linux-5.7", "0x22"),
        ("linux-5.8", "0x11"),
        ("linux-5.10", "0x11"),
        ("mainline", "0x11"),
    ] {
        let report = run(with_policy(Program::CowVmsplice, preset));
        assert_eq!(
            report.exit_code(),
            exit_code::OK,
            "{preset}: {:?}",
            report.problems()
        );
        let l = line(&report, 1, "cow-vmsplice:");
        assert!(
            l.contains(&format!("reference reads {seen} ")),
            "{preset}: {l}"
        );
    }
}

#[test]
fn basic_cow_after_fork_holds_under_every_preset() {
    for preset in ["linux-5.7", "linux-5.10", "linux-6.4", "mainline"] {
        let report = run(with_policy(Program::ForkCow, preset));
        assert_eq!(
            report.exit_code(),
            exit_code::OK,
            "{preset}: {:?}",
            report.problems()
        );
    }
}

#[test]
fn a_uffd_wp_fault_waits_for_the_handler_thread() {
    let report = run(program(Program::UffdWp, 0));
    assert_eq!(report.exit_code(), exit_code::OK, "{:?}", report.problems());
    let page = hex_after(line(&report, 1, "uffd-wp handler:"), "fault at ");
    assert_eq!(hex_after(line(&report, 0, "uffd-wp:"), "write to "), page);
}

#[test]
fn a_longterm_write_pin_stays_coherent_across_mprotect() {
    let report = run(program(Program::PinCoherent, 0));
    assert_eq!(report.exit_code(), exit_code::OK, "{:?}", report.problems());
    line(&report, 0, "pin-coherent: the pin and the page agree");
}

/// The TLBs of ended threads are kept until the last thread ends
/// (`Tlbs::retire`), but only up to a budget of frames: 30 threads one
/// after another, each caching 2048 translations 2 MiB apart (a shadow
/// leaf table each), must not run a 64 MiB guest out of frames. Without
/// the budget the 30th thread found no frame for its shadow table.
#[test]
fn threads_that_ended_do_not_keep_their_tlbs_past_a_budget() {
    let src = "cowlab tlb-budget\n{ region big 1048576 rw }\nP0 {\n  loop 30 {\n    r1 = spawn T0\n    r4 = wait r1\n    r5 = r5 + r4\n  }\n  r9 = 1\n}\nT0 {\n  r2 = 0\n  loop 2048 { r3 = big[r2]; r2 = r2 + 262144 }\n}\nexists (P0:r9 = 1 /\\ P0:r5 = 0)\n";
    let (code, v) = common::litmus_json("tlb-budget", src, &["--runs", "1", "--mem-mib", "64"]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["positive"], 1, "{v}");
}
