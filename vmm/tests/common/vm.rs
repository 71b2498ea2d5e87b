//! Booting real KVM VMs through the library (no binary): the helpers of
//! boot.rs and vm_mm.rs.

use std::time::Duration;

use cowlab::kvm::{RunReport, Vm, VmConfig};

/// Watchdog for test runs.
pub const TIMEOUT: Option<Duration> = Some(Duration::from_secs(30));

/// Fails loudly (never skips) when KVM is not usable here.
pub fn require_kvm() {
    let path = std::env::var("COWLAB_KVM").unwrap_or_else(|_| "/dev/kvm".into());
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
    {
        panic!("these tests boot real VMs and need KVM, but {path} cannot be opened: {e}");
    }
}

/// Boots `config` (with `mm_verify` on), waits for the end, and asserts
/// that `mm_verify` found nothing: every test run is checked.
pub fn run(config: VmConfig) -> RunReport {
    require_kvm();
    let mut vm = Vm::new(&VmConfig {
        check: true,
        ..config
    })
    .expect("VM creation");
    let report = vm.wait(TIMEOUT, |_| {});
    assert_verified(&report);
    report
}

/// Asserts that `mm_verify` ran clean on `report`'s run.
pub fn assert_verified(report: &RunReport) {
    assert!(
        report.violations.is_empty(),
        "mm_verify: {:#?}",
        report.violations
    );
}

/// The first console line of vCPU `id` starting with `prefix`.
pub fn line<'r>(report: &'r RunReport, id: usize, prefix: &str) -> &'r str {
    report
        .console
        .iter()
        .find(|(v, l)| *v == id && l.starts_with(prefix))
        .map(|(_, l)| l.as_str())
        .unwrap_or_else(|| {
            panic!(
                "vcpu {id} printed no line starting with {prefix:?}: {:?}",
                report.console
            )
        })
}

/// The hexadecimal number after `key` in `text` (e.g. "at 0x7dff…").
pub fn hex_after(text: &str, key: &str) -> u64 {
    let rest = &text[text
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?} in {text:?}"))
        + key.len()..];
    let digits: String = rest
        .trim_start_matches("0x")
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect();
    u64::from_str_radix(&digits, 16)
        .unwrap_or_else(|_| panic!("no number after {key:?} in {text:?}"))
}
