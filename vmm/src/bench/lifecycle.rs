//! A VM's life around a run, created or reused ([`crate::kvm`]'s shell):
//! the time to the program's first exit and the whole run, creation or
//! reset and teardown included, alternating between a new VM and the
//! reused one so that both see the same machine.

use std::time::{Duration, Instant};

use cowlab_abi::Program;

use super::{config, us, BenchOptions, Measurement};
use crate::kvm::{Error, Vm, VmConfig};

/// Boots per round and kind.
const BOOTS: usize = 20;

/// One run of `hello` on 2 vCPUs (one page each): its start (to the
/// first exit) and its whole life (`Vm::new` to the VM dropped), µs.
fn one(opts: &BenchOptions, reuse: bool) -> Result<(f64, f64), Error> {
    let config = VmConfig {
        vcpus: 2,
        reuse,
        ..config(opts, Program::Hello, 1)
    };
    let t0 = Instant::now();
    let mut vm = Vm::new(&config)?;
    if vm.reused() != reuse {
        return Err(Error::Run(format!(
            "VM lifecycle: asked for a {} VM, got the other",
            if reuse { "reused" } else { "new" }
        )));
    }
    let report = vm.wait(Some(Duration::from_secs(30)), |_| {});
    drop(vm);
    let whole = us(t0.elapsed());
    if report.exit_code() != 0 {
        return Err(Error::Run(format!(
            "VM lifecycle: {}",
            report.problems().join("; ")
        )));
    }
    let start = report
        .boot_time
        .map(us)
        .ok_or_else(|| Error::Run("VM lifecycle: the program never started".into()))?;
    Ok((start, whole))
}

/// Measures VM creation against reuse.
pub fn vm_lifecycle(opts: &BenchOptions) -> Result<Vec<Measurement>, Error> {
    let mut rows: [Vec<f64>; 4] = Default::default();
    // The first reuse needs a VM left by a run.
    one(opts, false)?;
    for _ in 0..opts.rounds {
        for _ in 0..BOOTS {
            let (start, whole) = one(opts, false)?;
            rows[0].push(start);
            rows[2].push(whole);
            let (start, whole) = one(opts, true)?;
            rows[1].push(start);
            rows[3].push(whole);
        }
    }
    let [create, reuse, create_run, reuse_run] = rows;
    let named = [
        (
            "vm_create_start",
            "a new 2-vCPU VM (KVM_CREATE_VM, memslot, vCPUs, CPUID) to the program's first exit",
            create,
        ),
        (
            "vm_reuse_start",
            "the last run's VM, reset, to the program's first exit",
            reuse,
        ),
        (
            "vm_create_run",
            "a whole short run (hello, 2 vCPUs) on a new VM, its teardown included",
            create_run,
        ),
        (
            "vm_reuse_run",
            "the same run on the reused VM, its reset (memslot deleted and re-added, memory discarded) included",
            reuse_run,
        ),
    ];
    Ok(super::measurements(named))
}
