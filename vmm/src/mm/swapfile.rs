//! The swap device: swap entries in PTEs, the per-slot swap count
//! (`swap_map`), the swap cache (slot → page) and the written contents.
//! Models the parts of mm/swapfile.c and mm/swap_state.c that anonymous
//! memory uses, for one in-VMM swap device.
//!
//! Counting follows Linux: every swap PTE holds one count of its slot
//! (`swap_map[offset]`); the swap cache holds one more flag on the slot
//! (`SWAP_HAS_CACHE`) and one reference on the page. A slot is free once
//! neither counts nor a cached page hold it. Reclaim writes the page's
//! contents to the slot before freeing the page (`swap_writepage()`); a
//! swap-in reads them back into a fresh page that enters the swap cache
//! (the device is not `SWP_SYNCHRONOUS_IO`: the swap cache is never
//! bypassed, as for a disk).

use cowlab_abi::layout::PAGE_SIZE;

use super::page::Frames;
use super::pagetable::bits;
use super::phys::PhysMem;
use super::sync::{Mutex, MutexGuard, Ordering};

/// Software PTE bit (x86 bit 11, ignored by hardware) of a non-present
/// PTE: a swap entry, whose offset is in the address field. Linux encodes
/// `swp_entry_t` in non-present PTEs (`__swp_entry_to_pte()`); a distinct
/// marker bit is enough here.
pub const PTE_SWAP: u64 = 1 << 11;

/// In a swap PTE: the page was `PageAnonExclusive` when it was unmapped.
/// Models `_PAGE_SWP_EXCLUSIVE` / pte_swp_exclusive() (1493a1913e34
/// "mm/swap: remember PG_anon_exclusive via a swp pte bit", v5.19).
pub const PTE_SWP_EXCLUSIVE: u64 = 1 << 3;

/// In a swap PTE: the uffd-wp marker carried across the swap-out (Linux's
/// `_PAGE_SWP_UFFD_WP`; here the same bit as the present PTE's).
pub const PTE_SWP_UFFD_WP: u64 = super::memory::PTE_UFFD_WP;

/// Most slots the device has (a fixed-size swap file).
pub const SWAP_SLOTS: u64 = 1 << 16;

/// Whether `pte` is a swap entry. Models include/linux/swapops.h:is_swap_pte()
/// for the entries the model makes (no migration or marker entries).
pub fn is_swap_pte(pte: u64) -> bool {
    pte & bits::PRESENT == 0 && pte & PTE_SWAP != 0
}

/// The slot of a swap PTE. Models swp_offset(pte_to_swp_entry()).
pub fn swp_offset(pte: u64) -> u64 {
    (pte & bits::ADDR_MASK) / PAGE_SIZE
}

/// Whether a swap PTE says the page was exclusive. Models pte_swp_exclusive().
pub fn pte_swp_exclusive(pte: u64) -> bool {
    pte & PTE_SWP_EXCLUSIVE != 0
}

/// The swap PTE for `offset`. Models swp_entry_to_pte() (+ pte_swp_mkexclusive(),
/// pte_swp_mkuffd_wp()).
pub fn swp_entry_to_pte(offset: u64, exclusive: bool, uffd_wp: bool) -> u64 {
    let mut pte = (offset * PAGE_SIZE) | PTE_SWAP;
    if exclusive {
        pte |= PTE_SWP_EXCLUSIVE;
    }
    if uffd_wp {
        pte |= PTE_SWP_UFFD_WP;
    }
    pte
}

/// One slot: `swap_map[offset]` (count and `SWAP_HAS_CACHE`), the swap
/// cache entry, and what was written to it.
#[derive(Debug, Default)]
struct Slot {
    in_use: bool,
    /// Swap PTEs that hold this slot (`swap_count(swap_map[offset])`).
    count: u32,
    /// The page in the swap cache for this slot (0: none): `SWAP_HAS_CACHE`.
    cache: u64,
    /// The contents written by reclaim (`swap_writepage()`), if any.
    data: Option<Box<[u64]>>,
}

/// One slot as `mm_verify` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotState {
    pub offset: u64,
    pub count: u32,
    /// The page in the swap cache, if any.
    pub cache: Option<u64>,
    pub written: bool,
}

#[derive(Debug, Default)]
struct State {
    /// By offset; offset 0 is never used (Linux's swap header page).
    slots: Vec<Slot>,
    free: Vec<u64>,
}

impl State {
    fn slot(&mut self, offset: u64) -> &mut Slot {
        let s = &mut self.slots[offset as usize];
        debug_assert!(s.in_use, "swap slot {offset} is free");
        s
    }

    /// Frees the slot if neither a count nor the cache holds it.
    fn maybe_free(&mut self, offset: u64) {
        let s = self.slot(offset);
        if s.count == 0 && s.cache == 0 {
            *s = Slot::default();
            self.free.push(offset);
        }
    }
}

/// The swap device (`struct swap_info_struct` with its `swap_map`, and the
/// swap cache's address space). Its lock (Linux: the swap cluster locks
/// and the swap cache's xarray lock) nests inside the PTL; page counts
/// change under it, so it is the model's lock (a scheduling point under
/// the checker), not a plain one.
#[derive(Debug)]
pub struct SwapInfo {
    state: Mutex<State>,
}

impl Default for SwapInfo {
    fn default() -> Self {
        SwapInfo {
            state: Mutex::new(State::default()),
        }
    }
}

impl SwapInfo {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the map inconsistent
        // beyond what mm_verify reports.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The swap count of `offset` (0 for a free slot). Models
    /// mm/swapfile.c:__swap_count().
    pub fn swap_count(&self, offset: u64) -> u32 {
        let st = self.lock();
        st.slots
            .get(offset as usize)
            .filter(|s| s.in_use)
            .map_or(0, |s| s.count)
    }

    /// Gives `pa` a new slot and puts it in that slot's swap cache (one
    /// more reference on the page); `None` if the device is full. Models
    /// mm/swap_state.c:add_to_swap() (folio_alloc_swap() +
    /// add_to_swap_cache()).
    pub fn add_to_swap(&self, frames: &Frames, pa: u64) -> Option<u64> {
        let mut st = self.lock();
        if let Some(offset) = frames.page(pa).swapcache() {
            // Already there (the caller's check raced with another add).
            return Some(offset);
        }
        let offset = match st.free.pop() {
            Some(o) => o,
            None if (st.slots.len() as u64) < SWAP_SLOTS => {
                if st.slots.is_empty() {
                    st.slots.push(Slot::default());
                }
                st.slots.push(Slot::default());
                st.slots.len() as u64 - 1
            }
            None => return None,
        };
        let s = &mut st.slots[offset as usize];
        s.in_use = true;
        s.cache = pa;
        frames.get_page(pa);
        frames.page(pa).set_swapcache(Some(offset));
        Some(offset)
    }

    /// The page in the swap cache of `offset`, with a reference for the
    /// caller. Models mm/swap_state.c:swap_cache_get_folio().
    pub fn swap_cache_get_folio(&self, frames: &Frames, offset: u64) -> Option<u64> {
        let st = self.lock();
        let s = st.slots.get(offset as usize).filter(|s| s.in_use)?;
        (s.cache != 0).then(|| {
            frames.get_page(s.cache);
            s.cache
        })
    }

    /// Whether `offset` has a page in the swap cache (a hint: it may change
    /// as soon as the lock is dropped).
    pub fn cached(&self, offset: u64) -> bool {
        let st = self.lock();
        st.slots
            .get(offset as usize)
            .is_some_and(|s| s.in_use && s.cache != 0)
    }

    /// Reads slot `offset` into the fresh page `new` and adds it to the
    /// swap cache, unless another fault did first: then `new` is dropped
    /// and that page returned, with a reference for the caller. `None`
    /// if the slot was freed meanwhile (the caller's PTE changed). Models
    /// mm/swap_state.c:__read_swap_cache_async() (add_to_swap_cache() +
    /// swap_read_folio()).
    pub fn swapin(&self, mem: &dyn PhysMem, frames: &Frames, offset: u64, new: u64) -> Option<u64> {
        let mut st = self.lock();
        let s = st.slots.get_mut(offset as usize).filter(|s| s.in_use)?;
        if s.cache != 0 {
            frames.get_page(s.cache);
            let pa = s.cache;
            drop(st);
            frames.put_page(new);
            return Some(pa);
        }
        match &s.data {
            Some(data) => {
                for (i, w) in data.iter().enumerate() {
                    mem.word(new + i as u64 * 8).store(*w, Ordering::Relaxed);
                }
            }
            None => {
                // A counted slot with neither contents nor a cached page:
                // mm_verify reports it; the page reads as zeroes.
                debug_assert!(false, "swap slot {offset} has no contents");
                mem.zero_frame(new);
            }
        }
        s.cache = new;
        frames.get_page(new);
        frames.page(new).set_swapcache(Some(offset));
        Some(new)
    }

    /// One more swap PTE holds `offset`. Models mm/swapfile.c:swap_duplicate().
    pub fn swap_duplicate(&self, offset: u64) {
        self.lock().slot(offset).count += 1;
    }

    /// A swap PTE of `offset` is gone (its page was swapped in); the slot
    /// is freed if nothing else holds it. Models mm/swapfile.c:swap_free().
    pub fn swap_free(&self, offset: u64) {
        let mut st = self.lock();
        let s = st.slot(offset);
        debug_assert!(s.count > 0, "swap_free of slot {offset} with count 0");
        s.count = s.count.saturating_sub(1);
        st.maybe_free(offset);
    }

    /// Removes `pa` from the swap cache and drops the cache's reference
    /// (the caller holds the page lock and a reference). Models
    /// mm/swap_state.c:delete_from_swap_cache().
    pub fn delete_from_swap_cache(&self, frames: &Frames, pa: u64) {
        let mut st = self.lock();
        if frames.page(pa).swapcache().is_none() {
            return;
        }
        self.remove_from_cache(&mut st, frames, pa);
        drop(st);
        frames.put_page(pa);
    }

    /// Takes `pa` out of its slot's swap cache (the caller drops the
    /// cache's reference). Models __delete_from_swap_cache().
    fn remove_from_cache(&self, st: &mut State, frames: &Frames, pa: u64) {
        let Some(offset) = frames.page(pa).swapcache() else {
            return;
        };
        frames.page(pa).set_swapcache(None);
        st.slot(offset).cache = 0;
        st.maybe_free(offset);
    }

    /// Removes `pa` from the swap cache if no swap PTE holds its slot any
    /// more; true if it did. Models mm/swapfile.c:folio_free_swap()
    /// (try_to_free_swap() before v6.1). The caller holds the page lock
    /// and a reference besides the cache's.
    pub fn folio_free_swap(&self, frames: &Frames, pa: u64) -> bool {
        let mut st = self.lock();
        let Some(offset) = frames.page(pa).swapcache() else {
            return false;
        };
        if st.slot(offset).count != 0 {
            return false;
        }
        self.remove_from_cache(&mut st, frames, pa);
        drop(st);
        frames.put_page(pa);
        true
    }

    /// The page `pa` lost its last mapping here: drop it from the swap
    /// cache if it is unmapped everywhere and no swap PTE holds it. Models
    /// mm/swap_state.c:free_swap_cache() (from free_pages_and_swap_cache()
    /// and wp_page_copy()).
    ///
    /// The caller holds a reference (the page outlives the call); the page
    /// lock is tried, and a locked page (reclaim has it) is left alone.
    pub fn free_swap_cache(&self, frames: &Frames, pa: u64) {
        if !frames.is_normal(pa) {
            return;
        }
        let page = frames.page(pa);
        if page.swapcache().is_some() && page.mapcount() == 0 && page.trylock() {
            self.folio_free_swap(frames, pa);
            page.unlock();
        }
    }

    /// A swap PTE of `offset` was zapped: drop its count, and the cached
    /// page too if that was the last count and the page is mapped nowhere.
    /// Models mm/swapfile.c:free_swap_and_cache() (__try_to_reclaim_swap()
    /// with TTRS_UNMAPPED).
    pub fn free_swap_and_cache(&self, frames: &Frames, offset: u64) {
        let mut st = self.lock();
        let s = st.slot(offset);
        debug_assert!(s.count > 0, "zap of slot {offset} with count 0");
        s.count = s.count.saturating_sub(1);
        let (count, cache) = (s.count, s.cache);
        // __try_to_reclaim_swap(): folio_trylock(), else leave it to reclaim.
        if count == 0
            && cache != 0
            && frames.page(cache).mapcount() == 0
            && frames.page(cache).trylock()
        {
            self.remove_from_cache(&mut st, frames, cache);
            drop(st);
            frames.page(cache).unlock();
            frames.put_page(cache);
            return;
        }
        st.maybe_free(offset);
    }

    /// Writes out and frees a page reclaim has unmapped, if nobody but
    /// reclaim (`isolated`: its reference) and the swap cache holds it;
    /// true if it did (the caller's reference is then the last). Otherwise the page stays
    /// in the swap cache, unwritten. Models mm/vmscan.c:pageout()
    /// (is_page_cache_freeable() + swap_writepage()) and __remove_mapping()
    /// (folio_ref_freeze(folio, 1 + 1) + __delete_from_swap_cache()).
    pub fn pageout(&self, mem: &dyn PhysMem, frames: &Frames, pa: u64) -> bool {
        let mut st = self.lock();
        let page = frames.page(pa);
        let Some(offset) = page.swapcache() else {
            return false;
        };
        if page.mapcount() != 0 || page.refcount() != 2 {
            return false;
        }
        let data: Box<[u64]> = (0..PAGE_SIZE / 8)
            .map(|i| mem.word(pa + i * 8).load(Ordering::Relaxed))
            .collect();
        st.slot(offset).data = Some(data);
        self.remove_from_cache(&mut st, frames, pa);
        drop(st);
        // The cache's reference; reclaim's own goes with the caller's
        // putback, and frees the page.
        frames.put_page(pa);
        true
    }

    /// Every slot in use, for `mm_verify`.
    pub fn snapshot(&self) -> Vec<SlotState> {
        let st = self.lock();
        st.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.in_use)
            .map(|(i, s)| SlotState {
                offset: i as u64,
                count: s.count,
                cache: (s.cache != 0).then_some(s.cache),
                written: s.data.is_some(),
            })
            .collect()
    }
}
