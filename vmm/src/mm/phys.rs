//! Access to guest-physical memory, as the memory manager sees it.

use std::sync::atomic::{AtomicU64, Ordering};

/// A word of guest-physical memory (a PTE, or data). Always a `std`
/// atomic: the KVM layer maps it onto the guest's memory.
pub type Word = AtomicU64;

/// Guest-physical memory. Page-table entries are read and written as atomic
/// 64-bit words because a vCPU's hardware walker reads them concurrently.
pub trait PhysMem: Send + Sync {
    /// Size of guest-physical memory in bytes.
    fn size(&self) -> u64;

    /// The 8-byte-aligned word at `pa`.
    ///
    /// Panics if `pa` is misaligned or outside memory: callers only pass
    /// addresses of frames they own, so that would be a VMM bug.
    fn word(&self, pa: u64) -> &AtomicU64;

    /// Fills the 4 KiB frame at `pa` with zeroes.
    fn zero_frame(&self, pa: u64);

    /// Copies the 4 KiB frame at `src` to `dst`.
    fn copy_frame(&self, dst: u64, src: u64);

    /// Reads `buf.len()` bytes at `pa`; `None` if the range is outside memory.
    fn read(&self, pa: u64, buf: &mut [u8]) -> Option<()>;

    /// Writes `buf` at `pa`; `None` if the range is outside memory.
    fn write(&self, pa: u64, buf: &[u8]) -> Option<()>;

    /// Makes the hardware forget every translation it caches to `frame`.
    ///
    /// The shadow tables are guest memory that the VMM, not the guest,
    /// writes; a hypervisor that shadows guest page tables (as PVM does)
    /// never sees those writes, so removing or downgrading a shadow entry
    /// must also make it drop what it built from the old entry. Adding
    /// entries needs nothing: a miss always re-walks the tables.
    fn revoke(&self, frame: u64);

    /// A store by the VMM to a data frame that a TLB may map (DMA through
    /// a pin): it must not race with [`PhysMem::revoke`] making the frame
    /// briefly read-only on the host.
    fn store_data(&self, pa: u64, value: u64) {
        self.word(pa).store(value, Ordering::SeqCst);
    }

    /// [`PhysMem::revoke`] for many frames at once (a flush of many
    /// entries); an implementation may merge neighbouring frames.
    fn revoke_frames(&self, frames: &mut Vec<u64>) {
        for f in frames.iter() {
            self.revoke(*f);
        }
    }
}

/// Host memory standing in for guest-physical memory in unit tests.
#[cfg(test)]
pub mod testing {
    use super::PhysMem;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A word of guest-physical memory (a PTE, or data). Always a `std`
    /// atomic: the KVM layer maps it onto the guest's memory.
    pub type Word = AtomicU64;

    /// `size` bytes of zeroed words.
    pub struct VecMem(Vec<AtomicU64>);

    impl VecMem {
        pub fn new(size: u64) -> Self {
            VecMem((0..size / 8).map(|_| AtomicU64::new(0)).collect())
        }
    }

    impl PhysMem for VecMem {
        fn size(&self) -> u64 {
            self.0.len() as u64 * 8
        }
        fn word(&self, pa: u64) -> &AtomicU64 {
            assert!(pa.is_multiple_of(8));
            &self.0[(pa / 8) as usize]
        }
        fn zero_frame(&self, pa: u64) {
            (0..512).for_each(|i| self.word(pa + i * 8).store(0, Ordering::Relaxed));
        }
        fn copy_frame(&self, dst: u64, src: u64) {
            for i in 0..512 {
                let v = self.word(src + i * 8).load(Ordering::Relaxed);
                self.word(dst + i * 8).store(v, Ordering::Relaxed);
            }
        }
        fn read(&self, pa: u64, buf: &mut [u8]) -> Option<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                let a = pa + i as u64;
                let w = self.0.get((a / 8) as usize)?.load(Ordering::Relaxed);
                *b = w.to_le_bytes()[(a % 8) as usize];
            }
            Some(())
        }
        fn revoke(&self, _frame: u64) {}
        fn write(&self, pa: u64, buf: &[u8]) -> Option<()> {
            for (i, b) in buf.iter().enumerate() {
                let a = pa + i as u64;
                let word = self.0.get((a / 8) as usize)?;
                let mut bytes = word.load(Ordering::Relaxed).to_le_bytes();
                bytes[(a % 8) as usize] = *b;
                word.store(u64::from_le_bytes(bytes), Ordering::Relaxed);
            }
            Some(())
        }
    }
}
