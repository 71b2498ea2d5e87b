//! Reusing a VM between runs: the part of a VM that outlives one run (the
//! KVM VM fd, its guest memory and its vCPU fds, a [`Shell`]), and how it
//! is made as good as new for the next.
//!
//! Creating a VM costs more than a short litmus run: `KVM_CREATE_VM`, one
//! `KVM_CREATE_VCPU` + `KVM_SET_CPUID2` per vCPU (in a nested VM each
//! CPUID the host executes traps), and closing it all again (KVM toggles
//! static keys, which patch kernel text on every CPU). A run on a reused
//! shell must be indistinguishable from one in a fresh VM, so between runs:
//!
//! - **Translations**: the memslot is deleted and added again. Deleting
//!   a memslot makes KVM drop every shadow page and translation it built
//!   from it (`kvm_arch_flush_shadow_memslot`). Less is not enough here:
//!   discarding memory alone (`MADV_DONTNEED`, whose MMU-notifier
//!   invalidation zaps KVM's translations of every page in the range) let
//!   vCPUs of the next run see the last run's memory: measured with
//!   `cowlab run fork-vma-lock --policy linux-6.4 --runs 300`, 19 of 300
//!   runs went wrong on PVM (a thread never saw an event another thread
//!   had signalled, or saw one signalled in the previous run); with the
//!   memslot deleted, 0 of 300. Rewriting page tables in place with
//!   neither is worse (HOST-FLOORS.md: 100 of 101 runs used the previous
//!   run's translations). The price is ~0.4 ms per reset at 256 MiB (the
//!   slot's reverse maps are freed and allocated again).
//! - **Memory**: all of guest memory is discarded (`MADV_DONTNEED`, while
//!   the slot is deleted): the next access of any page reads zeroes, as
//!   in a fresh mapping (litmus events live there too); the next boot
//!   loads the image and tables again.
//! - **vCPUs**: KVM cannot create a vCPU id twice in one VM, so the fds
//!   are kept. A returned vCPU first completes any I/O KVM still holds for
//!   it (`KVM_RUN` with `immediate_exit`); a reused one gets the special
//!   registers KVM reported when it was created (CR2, CR8 and APIC base
//!   as new), then general, FPU and event state are set as for a new one
//!   (no exception or interrupt pending).
//!
//! - **Threads**: each run starts new host threads for its vCPUs. Keeping
//!   one thread per vCPU id across runs was tried (it would spare thread
//!   creation, and on kernels before 6.11 the `synchronize_rcu` KVM does
//!   when a vCPU is run by a new thread): on PVM it brought back runs in
//!   which a vCPU and the VMM saw different memory for the same page
//!   (`cowlab run wp-copy-reuse-aba --policy linux-5.8 --runs 200`: 97
//!   runs `unreachable`, a fork child "faulting" at the program's entry
//!   on a stack it never had, i.e. its mailbox read stale), memslot
//!   deletion notwithstanding; with a new thread per run, 0 of 300 under
//!   two CPU hogs. Not understood further (PVM appears to flush a vCPU's
//!   hardware translations when it moves to another thread, and not all
//!   of them otherwise).
//!
//! A shell is only reused if its run ended cleanly: every vCPU thread
//! joined with its fd given back, no vCPU thread panicked, no reset
//! failed. Anything else and it is closed like any VM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, CpuId};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use super::boot::{check_kvm, supported_cpuid};
use super::error::{Error, VcpuError};
use super::memory::GuestMem;
use super::VmConfig;
use crate::mm::PhysMem;

/// Whether VMs are reused by default (`VmConfig::default().reuse`); the
/// CLI's `--fresh-vms` turns it off for a whole command.
static REUSE_BY_DEFAULT: AtomicBool = AtomicBool::new(true);

/// Sets whether [`VmConfig::default`] reuses VMs.
pub fn set_reuse_by_default(reuse: bool) {
    REUSE_BY_DEFAULT.store(reuse, Ordering::Relaxed);
}

/// Whether [`VmConfig::default`] reuses VMs.
pub fn reuse_by_default() -> bool {
    REUSE_BY_DEFAULT.load(Ordering::Relaxed)
}

/// The idle shells of this process, oldest first: at most
/// [`IDLE_SHELLS`] (of different kinds, or threads running VMs side by
/// side), each with its memory discarded.
static IDLE: Mutex<Vec<Arc<Shell>>> = Mutex::new(Vec::new());

/// How many idle shells a process keeps.
const IDLE_SHELLS: usize = 4;

/// What makes two VMs interchangeable.
#[derive(Debug, Clone)]
struct Key {
    kvm_path: String,
    mem_mib: u64,
    guest_elf: Option<Vec<u8>>,
}

impl Key {
    fn of(config: &VmConfig) -> Key {
        Key {
            kvm_path: config.kvm_path.clone(),
            mem_mib: config.mem_mib,
            guest_elf: config.guest_elf.clone(),
        }
    }

    /// Whether a VM made for this key fits `config` (no copy of a custom
    /// guest image is made to ask).
    fn fits(&self, config: &VmConfig) -> bool {
        self.kvm_path == config.kvm_path
            && self.mem_mib == config.mem_mib
            && self.guest_elf == config.guest_elf
    }
}

/// A vCPU of the shell: its fd while no run uses it, and the special
/// registers KVM gave it when it was created.
struct VcpuEntry {
    fd: Option<VcpuFd>,
    sregs: kvm_sregs,
}

/// The KVM VM, its guest memory and its vCPUs, kept from one run to the
/// next (see the module doc for what is reset).
pub(crate) struct Shell {
    key: Key,
    pub(crate) vm: VmFd,
    pub(crate) mem: Arc<GuestMem>,
    pub(crate) cpuid: CpuId,
    /// By vCPU id; `None` for an id never created.
    vcpus: Mutex<Vec<Option<VcpuEntry>>>,
    /// Something went wrong that a reset may not undo: never reuse.
    spoiled: AtomicBool,
    /// This shell came from an earlier run (for the bench and tests).
    reused: bool,
}

impl Shell {
    /// A shell for `config`: the idle one if it fits and `config.reuse`,
    /// else a new VM.
    ///
    /// Wraps `KVM_CREATE_VM` and `KVM_SET_USER_MEMORY_REGION` (one slot:
    /// all of guest memory), after the device checks of `check_kvm`.
    pub(crate) fn obtain(config: &VmConfig) -> Result<Arc<Shell>, Error> {
        if config.reuse {
            let mut idle = lock(&IDLE);
            // The newest of its kind that nothing else holds any more (the
            // last run's state may still be letting go of it).
            let found = idle
                .iter()
                .rposition(|s| s.key.fits(config) && Arc::strong_count(s) == 1);
            if let Some(mut shell) = found.map(|i| idle.remove(i)) {
                drop(idle);
                if let Some(s) = Arc::get_mut(&mut shell) {
                    s.reused = true;
                    return Ok(shell);
                }
            }
        }
        Shell::create(Key::of(config))
    }

    fn create(key: Key) -> Result<Arc<Shell>, Error> {
        let path = std::ffi::CString::new(key.kvm_path.clone())
            .map_err(|_| Error::Config("KVM device path contains a NUL byte".into()))?;
        let kvm = Kvm::new_with_path(&path).map_err(|source| Error::KvmUnavailable {
            path: key.kvm_path.clone(),
            source,
        })?;
        check_kvm(&kvm, &key.kvm_path)?;
        let vm = kvm.create_vm().map_err(Error::CreateVm)?;
        let mem = Arc::new(GuestMem::new(key.mem_mib << 20)?);
        let cpuid = supported_cpuid(&kvm, &key.kvm_path)?;
        let shell = Shell {
            key,
            vm,
            mem,
            cpuid,
            vcpus: Mutex::new(Vec::new()),
            spoiled: AtomicBool::new(false),
            reused: false,
        };
        shell.set_slot(shell.mem.size())?;
        Ok(Arc::new(shell))
    }

    /// Whether this shell ran an earlier run.
    pub(crate) fn reused(&self) -> bool {
        self.reused
    }

    /// Resets the VM between two runs: deletes the memslot (KVM drops
    /// every shadow page and translation built from it), discards guest
    /// memory and adds the slot again. See the module doc.
    /// Wraps `KVM_SET_USER_MEMORY_REGION` (twice).
    fn reset(&self) -> Result<(), Error> {
        self.set_slot(0)?;
        let discarded = self.mem.discard();
        self.set_slot(self.mem.size())?;
        discarded.map_err(|e| Error::Run(format!("cannot reset guest memory: {e}")))
    }

    /// Sets the memslot: all of guest memory at guest-physical 0, or
    /// (`size` 0) none. Wraps `KVM_SET_USER_MEMORY_REGION`.
    fn set_slot(&self, size: u64) -> Result<(), Error> {
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: self.mem.host_base(),
            flags: 0,
        };
        // SAFETY: the region is the whole of `mem` (or nothing: the slot
        // is deleted), which lives in this shell as long as the VM fd and
        // every vCPU that uses it.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(Error::SetUserMemoryRegion)
    }

    /// The fd of vCPU `id`, set up as a new vCPU (see the module doc), and
    /// the special registers KVM gave it when it was created.
    ///
    /// A new one wraps `KVM_CREATE_VCPU`, `KVM_SET_CPUID2` and
    /// `KVM_GET_SREGS`; a reused one `KVM_SET_VCPU_EVENTS`.
    pub(crate) fn vcpu(self: &Arc<Self>, id: usize) -> Result<(LeasedVcpu, kvm_sregs), VcpuError> {
        let mut vcpus = lock(&self.vcpus);
        if vcpus.len() <= id {
            vcpus.resize_with(id + 1, || None);
        }
        let (fd, sregs) = match &mut vcpus[id] {
            Some(entry) => {
                let Some(fd) = entry.fd.take() else {
                    // Still leased: a run uses ids once each.
                    return Err(VcpuError::CreateVcpu(kvm_ioctls::Error::new(libc::EBUSY)));
                };
                let reset = fd.set_vcpu_events(&kvm_vcpu_events::default());
                if let Err(e) = reset {
                    self.spoiled.store(true, Ordering::Relaxed);
                    return Err(VcpuError::SetVcpuEvents(e));
                }
                (fd, entry.sregs)
            }
            slot @ None => {
                let fd = self
                    .vm
                    .create_vcpu(id as u64)
                    .map_err(VcpuError::CreateVcpu)?;
                fd.set_cpuid2(&self.cpuid).map_err(VcpuError::SetCpuid2)?;
                let sregs = fd.get_sregs().map_err(VcpuError::GetSregs)?;
                *slot = Some(VcpuEntry { fd: None, sregs });
                (fd, sregs)
            }
        };
        let leased = LeasedVcpu {
            fd: Some(fd),
            id,
            shell: Arc::clone(self),
        };
        Ok((leased, sregs))
    }

    /// Takes vCPU `id`'s fd back after its run: KVM completes whatever
    /// I/O it still holds for it (`KVM_RUN` with `immediate_exit` set,
    /// which returns `EINTR` without entering the guest).
    fn give_back(&self, id: usize, mut fd: VcpuFd) {
        fd.set_kvm_immediate_exit(1);
        let completed = matches!(fd.run(), Err(e) if e.errno() == libc::EINTR);
        fd.set_kvm_immediate_exit(0);
        if !completed {
            self.spoiled.store(true, Ordering::Relaxed);
            return;
        }
        if let Some(Some(entry)) = lock(&self.vcpus).get_mut(id) {
            entry.fd = Some(fd);
        }
    }

    /// Offers the shell of a run that ended cleanly (`clean`: every vCPU
    /// thread joined, none panicked) for the next run: it is reset and
    /// kept among this process's idle shells.
    /// Otherwise it is closed.
    pub(crate) fn recycle(this: Arc<Shell>, clean: bool) {
        let whole = lock(&this.vcpus)
            .iter()
            .all(|e| e.as_ref().is_none_or(|e| e.fd.is_some()));
        if !clean || !whole || this.spoiled.load(Ordering::Relaxed) || this.reset().is_err() {
            return;
        }
        let mut idle = lock(&IDLE);
        idle.push(this);
        if idle.len() > IDLE_SHELLS {
            idle.remove(0);
        }
    }
}

/// A vCPU fd a run uses; given back to its [`Shell`] when dropped (after
/// the run, or as its thread unwinds: a panic leaves no shell reused, see
/// [`Shell::recycle`]).
pub(crate) struct LeasedVcpu {
    fd: Option<VcpuFd>,
    id: usize,
    shell: Arc<Shell>,
}

impl std::ops::Deref for LeasedVcpu {
    type Target = VcpuFd;
    fn deref(&self) -> &VcpuFd {
        self.fd
            .as_ref()
            .expect("a leased vCPU has its fd until dropped")
    }
}

impl std::ops::DerefMut for LeasedVcpu {
    fn deref_mut(&mut self) -> &mut VcpuFd {
        self.fd
            .as_mut()
            .expect("a leased vCPU has its fd until dropped")
    }
}

impl Drop for LeasedVcpu {
    fn drop(&mut self) {
        if let Some(fd) = self.fd.take() {
            self.shell.give_back(self.id, fd);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
