//! Setting a VM's memory up before any vCPU runs: the KVM device check,
//! the guest image and its boot header, the boot plan's code and regions.

use std::sync::atomic::Ordering;
use std::sync::Mutex;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

use cowlab_abi::layout::{kernel_va, IMAGE_PHYS, LITMUS_PHYS, LITMUS_SIZE};
use cowlab_abi::{bytecode, BootHeader, BOOT_HEADER_MAGIC};

use super::error::{Error, ImageError};
use super::loader::Image;
use super::memory::GuestMem;
use super::BootPlan;
use crate::mm::{Mm, PhysMem};

/// Whether the device opened at `path` is a KVM cowlab can use: it
/// answers `KVM_GET_API_VERSION` with the stable API (12) and has
/// `KVM_CAP_IMMEDIATE_EXIT` and `KVM_CAP_SYNC_REGS` (special registers and
/// events). Anything else (`/dev/null`, a file) is
/// [`Error::KvmUnusable`], naming the path and what failed.
pub(super) fn check_kvm(kvm: &Kvm, path: &str) -> Result<(), Error> {
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
    // The fault path reads CR2 from the registers KVM copies out on every
    // exit (`kvm_run.s.regs.sregs`), and flush interrupts are injected
    // through `kvm_run.s.regs.events`, instead of asking with ioctls.
    let wanted = kvm_bindings::KVM_SYNC_X86_SREGS | kvm_bindings::KVM_SYNC_X86_EVENTS;
    let synced = kvm.check_extension_int(Cap::SyncRegs);
    if synced <= 0 || (synced as u32) & wanted != wanted {
        return Err(unusable(format!(
            "its KVM_CAP_SYNC_REGS ({synced:#x}) lacks special registers and events"
        )));
    }
    Ok(())
}

/// `KVM_GET_SUPPORTED_CPUID` of the device at `path`, asked once per
/// process: in a nested VM every CPUID the host kernel executes for it
/// traps, and it was ~11 % of a small litmus test's runs (perf).
pub(super) fn supported_cpuid(kvm: &Kvm, path: &str) -> Result<CpuId, Error> {
    static CACHE: Mutex<Vec<(String, CpuId)>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, c)) = cache.iter().find(|(p, _)| p == path) {
        return Ok(c.clone());
    }
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::GetSupportedCpuid)?;
    cache.push((path.to_string(), cpuid.clone()));
    Ok(cpuid)
}

/// Loads a boot plan: its bytecode at `LITMUS_PHYS`, its regions mapped
/// (and populated) in the first process.
pub(super) fn load_plan(mem: &GuestMem, mm: &Mm, plan: &BootPlan) -> Result<(), Error> {
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
pub(super) fn load_image(mem: &GuestMem, image: &Image, elf: &[u8]) -> Result<(), Error> {
    for seg in &image.segments {
        mem.write(seg.pa, &elf[seg.file.clone()])
            .ok_or(Error::Image(ImageError::SegmentOutsideMemory(seg.pa)))?;
    }
    Ok(())
}

/// Reads and checks the guest's boot header at `IMAGE_PHYS`: every stub it
/// names must lie inside a loaded segment.
pub(super) fn read_boot_header(mem: &GuestMem, image: &Image) -> Result<BootHeader, Error> {
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
        return Err(ImageError::NoBootHeader(IMAGE_PHYS).into());
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
        return Err(ImageError::StubOutside(bad).into());
    }
    Ok(header)
}
