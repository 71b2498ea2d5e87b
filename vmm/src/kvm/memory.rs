//! Guest-physical memory: one anonymous mapping registered with KVM, and
//! the [`PhysMem`] view the memory manager uses. With the vCPU layer, the
//! only place that holds `unsafe`.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use cowlab_abi::layout::{PAGE_SIZE, SHARED_PAGE_PHYS};

use super::error::MemoryError;
use crate::mm::PhysMem;

/// Guest memory starting at guest-physical 0.
#[derive(Debug)]
pub struct GuestMem {
    mem: GuestMemoryMmap,
    size: u64,
    host: *mut u8,
    /// Held for writing while frames are briefly read-only (`bounce`), for
    /// reading by the VMM's own stores to data frames a TLB may map (DMA
    /// through a pin): such a store must not land in that instant.
    bouncing: std::sync::RwLock<()>,
}

// SAFETY: `host` points into the mapping owned by `mem`, which lives as long
// as `self`; all accesses through it are bounds-checked and either atomic
// (page-table words) or copies of whole frames the caller owns.
unsafe impl Send for GuestMem {}
// SAFETY: as above.
unsafe impl Sync for GuestMem {}

impl GuestMem {
    /// Whether word `i` of the page every process shares (a litmus event;
    /// `i` taken modulo the page's 512 words) is set.
    pub(crate) fn event_set(&self, i: u64) -> bool {
        self.read_obj::<u64>(SHARED_PAGE_PHYS + (i % 512) * 8)
            .is_some_and(|w| w != 0)
    }

    /// Maps `size` bytes (a multiple of the page size) of zeroed memory.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)])
            .map_err(|source| MemoryError::Map { size, source })?;
        let host = mem
            .get_host_address(GuestAddress(0))
            .map_err(MemoryError::NoHostAddress)?;
        Ok(GuestMem {
            mem,
            size,
            host,
            bouncing: std::sync::RwLock::new(()),
        })
    }

    /// Host address of guest-physical 0 (for `KVM_SET_USER_MEMORY_REGION`).
    pub fn host_base(&self) -> u64 {
        self.host as u64
    }

    /// Reads a plain-old-data value at `pa` (e.g. a mailbox).
    pub fn read_obj<T: vm_memory::ByteValued>(&self, pa: u64) -> Option<T> {
        self.mem.read_obj(GuestAddress(pa)).ok()
    }

    /// Writes a plain-old-data value at `pa`.
    pub fn write_obj<T: vm_memory::ByteValued>(&self, pa: u64, v: T) -> Option<()> {
        self.mem.write_obj(v, GuestAddress(pa)).ok()
    }

    fn check_frame(&self, pa: u64) {
        assert!(
            pa.is_multiple_of(PAGE_SIZE) && pa + PAGE_SIZE <= self.size,
            "frame {pa:#x} outside guest memory"
        );
    }

    /// Discards all of guest memory (`MADV_DONTNEED`): every page reads
    /// as zero again, as in a fresh mapping, and its host memory is freed.
    /// Only while no vCPU runs and no KVM memslot covers it (a reused VM
    /// between two runs, `super::shell`).
    pub(super) fn discard(&self) -> std::io::Result<()> {
        // SAFETY: the range is exactly the private anonymous mapping owned
        // by `mem`; discarding its pages only makes them read as zero.
        // Nothing else accesses guest memory now: the run's vCPU threads
        // have ended and the memslot is deleted.
        let r = unsafe {
            libc::madvise(
                self.host.cast::<libc::c_void>(),
                self.size as usize,
                libc::MADV_DONTNEED,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Write-protects `[pa, pa + len)` of the host mapping and unprotects
    /// it again: the MMU notifier makes KVM zap every shadow entry it built
    /// to those frames, in every vCPU.
    fn bounce(&self, pa: u64, len: u64) {
        let _no_stores = self.bouncing.write().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the range is whole pages inside the mapping owned by
        // `mem` (the callers checked each frame); it is made read-only and
        // immediately writable again. The VMM's only stores to frames a TLB
        // may map are `store_data` (DMA through a pin), which waits on
        // `bouncing`, held here; page-table words and fresh frames are
        // never in a revoked range; the guest's own accesses in that
        // instant make KVM_RUN fail with EFAULT, which the vCPU retries.
        let ok = unsafe {
            let start = self.host.add(pa as usize).cast::<libc::c_void>();
            libc::mprotect(start, len as usize, libc::PROT_READ) == 0
                && libc::mprotect(start, len as usize, libc::PROT_READ | libc::PROT_WRITE) == 0
        };
        assert!(
            ok,
            "mprotect of guest frames [{pa:#x}, {:#x}) failed: {}",
            pa + len,
            std::io::Error::last_os_error()
        );
    }
}

impl PhysMem for GuestMem {
    fn size(&self) -> u64 {
        self.size
    }

    fn word(&self, pa: u64) -> &AtomicU64 {
        assert!(
            pa.is_multiple_of(8) && pa + 8 <= self.size,
            "word {pa:#x} outside guest memory"
        );
        // SAFETY: in bounds and 8-byte aligned (the mapping is page-aligned);
        // guest memory is shared with vCPUs, so it is only accessed as an
        // atomic here, never through a plain reference.
        unsafe { &*(self.host.add(pa as usize) as *const AtomicU64) }
    }

    fn zero_frame(&self, pa: u64) {
        self.check_frame(pa);
        // SAFETY: the frame is in bounds; the caller owns it, so no vCPU can
        // reach it through a TLB entry while it is being zeroed.
        unsafe { std::ptr::write_bytes(self.host.add(pa as usize), 0, PAGE_SIZE as usize) };
        std::sync::atomic::fence(Ordering::Release);
    }

    fn copy_frame(&self, dst: u64, src: u64) {
        self.check_frame(dst);
        self.check_frame(src);
        assert_ne!(dst, src, "copy of frame {src:#x} onto itself");
        // SAFETY: both frames are in bounds and distinct; `dst` is owned by
        // the caller. `src` may be written concurrently by a vCPU (that is
        // the race being modelled): the copy then sees a torn snapshot, as
        // Linux's copy does.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.host.add(src as usize),
                self.host.add(dst as usize),
                PAGE_SIZE as usize,
            )
        };
        std::sync::atomic::fence(Ordering::Release);
    }

    fn read(&self, pa: u64, buf: &mut [u8]) -> Option<()> {
        self.mem.read_slice(buf, GuestAddress(pa)).ok()
    }

    /// Write-protects the frame's host page and unprotects it again: the
    /// protection change goes through the MMU notifier, which makes KVM zap
    /// every shadow entry it built to this frame, in every vCPU. The next
    /// access re-walks the guest's (our shadow) tables.
    fn revoke(&self, frame: u64) {
        self.check_frame(frame);
        self.bounce(frame, PAGE_SIZE);
    }

    fn write(&self, pa: u64, buf: &[u8]) -> Option<()> {
        self.mem.write_slice(buf, GuestAddress(pa)).ok()
    }

    fn store_data(&self, pa: u64, value: u64) {
        let _not_bouncing = self.bouncing.read().unwrap_or_else(|e| e.into_inner());
        self.word(pa).store(value, Ordering::SeqCst);
    }

    /// Revokes runs of neighbouring frames with one protection bounce each.
    fn revoke_frames(&self, frames: &mut Vec<u64>) {
        frames.sort_unstable();
        frames.dedup();
        let mut i = 0;
        while i < frames.len() {
            let start = frames[i];
            self.check_frame(start);
            let mut end = start + PAGE_SIZE;
            i += 1;
            while i < frames.len() && frames[i] == end {
                self.check_frame(end);
                end += PAGE_SIZE;
                i += 1;
            }
            self.bounce(start, end - start);
        }
    }
}
