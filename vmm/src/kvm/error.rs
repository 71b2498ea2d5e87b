//! The kvm layer's errors, typed: one variant per failing KVM ioctl (as
//! Firecracker's `arch::x86_64::vcpu` does), and one per other way a VM,
//! a vCPU, the guest image or guest memory cannot be set up. The messages
//! are the CLI's.

use crate::mm::MmError;

use super::report::exit_code;

/// Why a VM could not be created or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {path}: {source} (cowlab needs KVM: is the kvm module loaded, and may this user read and write {path}?)")]
    KvmUnavailable {
        path: String,
        source: kvm_ioctls::Error,
    },
    /// The path opened, but is not a KVM device cowlab can use.
    #[error("{path} is not a usable KVM device: {why}")]
    KvmUnusable { path: String, why: String },
    /// `KVM_CREATE_VM`.
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(kvm_ioctls::Error),
    /// `KVM_SET_USER_MEMORY_REGION`.
    #[error("KVM_SET_USER_MEMORY_REGION failed: {0}")]
    SetUserMemoryRegion(kvm_ioctls::Error),
    /// `KVM_GET_SUPPORTED_CPUID`.
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    GetSupportedCpuid(kvm_ioctls::Error),
    /// The kick signal's handler (`sigaction`).
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(vmm_sys_util::errno::Error),
    /// A boot vCPU could not be started.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("{0}")]
    Config(String),
    #[error("guest image: {0}")]
    Image(#[from] ImageError),
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    /// A run did not go as a measurement or driver needed.
    #[error("{0}")]
    Run(String),
}

impl Error {
    /// Whether no VM can be made with this KVM device at all (so no later
    /// run can do better).
    pub fn kvm_unusable(&self) -> bool {
        matches!(
            self,
            Error::KvmUnavailable { .. } | Error::KvmUnusable { .. }
        )
    }

    /// The CLI's exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            // The kick handler and the boot vCPUs' threads were reported
            // as configuration errors before these had variants: kept.
            Error::Config(_) | Error::Image(_) | Error::KickHandler(_) | Error::Spawn(_) => {
                exit_code::USAGE
            }
            _ => exit_code::VM_ERROR,
        }
    }
}

/// Why a guest ELF or its boot header cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("ELF truncated at offset {0}")]
    Truncated(usize),
    #[error("not an ELF file")]
    NotElf,
    #[error("not a little-endian 64-bit ELF")]
    NotElf64,
    #[error("not a static x86-64 executable (link with -static -no-pie)")]
    NotStaticX86_64,
    #[error("program header size {0} is too small")]
    ProgramHeaderSize(usize),
    #[error("program header offset overflows")]
    ProgramHeaderOverflow,
    #[error("segment size overflows")]
    SegmentSizeOverflow,
    #[error(
        "segment at physical {pa:#x}..{end:#x} is outside the image area {start:#x}..{limit:#x}"
    )]
    SegmentOutsideImage {
        pa: u64,
        end: u64,
        start: u64,
        limit: u64,
    },
    #[error("segment virtual {vaddr:#x} is not KERNEL_BASE + {pa:#x} (use guest/link.ld)")]
    SegmentVirtual { vaddr: u64, pa: u64 },
    #[error("segment {0} extends past the end of the file")]
    SegmentPastEnd(usize),
    #[error("entry point {0:#x} is not inside a loaded segment")]
    EntryOutside(u64),
    #[error("segment at {0:#x} outside guest memory")]
    SegmentOutsideMemory(u64),
    #[error("no cowlab boot header at physical {0:#x} (build the guest like guest/, with guest/link.ld)")]
    NoBootHeader(u64),
    #[error("boot header names {0:#x}, outside the image")]
    StubOutside(u64),
}

/// Why guest memory cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("guest memory has no host address: {0}")]
    NoHostAddress(vm_memory::GuestMemoryError),
    #[error("no frame for the zero page")]
    NoZeroPage,
    #[error("no frame for a page table")]
    NoPageTable,
}

/// Why a vCPU thread could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("at most {0} vCPUs")]
    TooMany(usize),
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
}

/// Why a vCPU could not be set up or run: the VMM error its thread ends
/// in (`Outcome::Error` holds the message).
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// `KVM_CREATE_VCPU`.
    #[error("KVM_CREATE_VCPU: {0}")]
    CreateVcpu(kvm_ioctls::Error),
    /// `KVM_SET_CPUID2`.
    #[error("KVM_SET_CPUID2: {0}")]
    SetCpuid2(kvm_ioctls::Error),
    /// `KVM_GET_SREGS`.
    #[error("KVM_GET_SREGS: {0}")]
    GetSregs(kvm_ioctls::Error),
    /// `KVM_SET_SREGS`.
    #[error("KVM_SET_SREGS: {0}")]
    SetSregs(kvm_ioctls::Error),
    /// `KVM_SET_REGS`.
    #[error("KVM_SET_REGS: {0}")]
    SetRegs(kvm_ioctls::Error),
    /// `KVM_SET_FPU`.
    #[error("KVM_SET_FPU: {0}")]
    SetFpu(kvm_ioctls::Error),
    /// `KVM_GET_VCPU_EVENTS`.
    #[error("KVM_GET_VCPU_EVENTS: {0}")]
    GetVcpuEvents(kvm_ioctls::Error),
    /// `KVM_SET_VCPU_EVENTS`.
    #[error("KVM_SET_VCPU_EVENTS: {0}")]
    SetVcpuEvents(kvm_ioctls::Error),
    /// `KVM_RUN` failed other than by a signal or a revoked frame.
    #[error("KVM_RUN: {0}")]
    Run(kvm_ioctls::Error),
    #[error("no guest frame left for a shadow page table")]
    NoShadowFrame,
    #[error("cannot map the stack of vcpu {id}: {source}")]
    Stack { id: usize, source: MmError },
    #[error("vCPU area outside memory")]
    AreaOutsideMemory,
    #[error("TSS outside memory")]
    TssOutsideMemory,
    #[error("the guest image has no minimal #PF stub (FloorStubs)")]
    NoFloorStubs,
}
