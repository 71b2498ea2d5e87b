//! `struct page` for the frame pool: order-0 folios only.
//!
//! Counting follows Linux: every PTE that maps a normal page holds one
//! reference (`refcount`) and one mapping (`mapcount`, 0-based here where
//! Linux's `_mapcount` starts at -1); a FOLL_PIN pin adds
//! [`GUP_PIN_COUNTING_BIAS`] to `refcount`, as Linux does for small folios
//! (so `folio_maybe_dma_pinned()` can false-positive), and is also counted
//! exactly in `pincount` for `mm_verify`. The shared zero page is never counted (`vm_normal_page()`
//! returns NULL for it).

use super::sync::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use cowlab_abi::layout::PAGE_SIZE;

use super::frame::{FrameAllocator, OutOfFrames};
use super::phys::PhysMem;

/// What a FOLL_PIN adds to the refcount of a small folio
/// (include/linux/mm.h:GUP_PIN_COUNTING_BIAS).
pub const GUP_PIN_COUNTING_BIAS: i64 = 1024;

/// Metadata of one frame.
#[derive(Debug, Default)]
pub struct Page {
    refcount: AtomicI64,
    mapcount: AtomicI64,
    pincount: AtomicI64,
    /// `PageAnonExclusive`: this anonymous page is mapped by one process
    /// only and may be written without copying (6c287605fd56, v5.19).
    anon_exclusive: AtomicBool,
    /// The swap slot whose swap cache holds this page (`folio->swap` with
    /// `PG_swapcache`); 0 when it is in no swap cache (slot 0 is never
    /// handed out, as Linux's swap header page).
    swap: AtomicU64,
    /// Taken off the LRU by reclaim (`!PG_lru` after folio_isolate_lru()):
    /// one reclaimer at a time.
    isolated: AtomicBool,
    /// `PG_locked`: held by reclaim from add_to_swap() to the page's
    /// removal, and by whoever adds it to or removes it from the swap cache.
    locked: AtomicBool,
}

impl Page {
    pub fn refcount(&self) -> i64 {
        self.refcount.load(Ordering::Acquire)
    }
    pub fn mapcount(&self) -> i64 {
        self.mapcount.load(Ordering::Acquire)
    }
    pub fn pincount(&self) -> i64 {
        self.pincount.load(Ordering::Acquire)
    }
    pub fn anon_exclusive(&self) -> bool {
        self.anon_exclusive.load(Ordering::Acquire)
    }
    /// The swap slot whose swap cache holds this page, if any. Models
    /// folio_test_swapcache() + `folio->swap`.
    pub fn swapcache(&self) -> Option<u64> {
        Some(self.swap.load(Ordering::Acquire)).filter(|s| *s != 0)
    }
    /// Enters (`Some`) or leaves (`None`) the swap cache of a slot; only
    /// the swap device calls this, under its lock.
    pub(crate) fn set_swapcache(&self, slot: Option<u64>) {
        self.swap.store(slot.unwrap_or(0), Ordering::Release)
    }
    /// Takes the page for reclaim; false if another reclaimer has it.
    /// Models mm/vmscan.c:folio_isolate_lru().
    pub fn isolate_lru(&self) -> bool {
        self.isolated
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
    /// Locks the page unless it is locked. Models folio_trylock().
    pub fn trylock(&self) -> bool {
        self.locked
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
    /// Models folio_unlock().
    pub fn unlock(&self) {
        self.locked.store(false, Ordering::Release)
    }
    /// Gives the page back after reclaim. Models folio_putback_lru().
    pub fn putback_lru(&self) {
        self.isolated.store(false, Ordering::Release)
    }
    /// Models include/linux/page-flags.h:SetPageAnonExclusive().
    pub fn set_anon_exclusive(&self) {
        self.anon_exclusive.store(true, Ordering::Release)
    }
    /// Models include/linux/page-flags.h:ClearPageAnonExclusive().
    pub fn clear_anon_exclusive(&self) {
        self.anon_exclusive.store(false, Ordering::Release)
    }
}

/// The frame pool with a [`Page`] per frame and the shared zero page.
#[derive(Debug)]
pub struct Frames {
    pool: FrameAllocator,
    base: u64,
    pages: Vec<Page>,
    zero_page: u64,
}

impl Frames {
    /// Frames `[start, end)`; the first becomes the shared zero page.
    pub fn new<M: PhysMem + ?Sized>(mem: &M, start: u64, end: u64) -> Result<Self, OutOfFrames> {
        let pool = FrameAllocator::new(start, end);
        let zero_page = pool.alloc()?;
        mem.zero_frame(zero_page);
        let pages = (start..end)
            .step_by(PAGE_SIZE as usize)
            .map(|_| Page::default())
            .collect();
        Ok(Frames {
            pool,
            base: start,
            pages,
            zero_page,
        })
    }

    /// The allocator, for page-table pages (which have no `Page` counts).
    pub fn pool(&self) -> &FrameAllocator {
        &self.pool
    }

    /// The shared zero page (include/linux/pgtable.h:ZERO_PAGE()).
    pub fn zero_page(&self) -> u64 {
        self.zero_page
    }

    /// Whether `pa` is a frame of the pool (and not the zero page).
    pub fn is_normal(&self, pa: u64) -> bool {
        self.pool.contains(pa) && pa != self.zero_page
    }

    /// The `Page` of frame `pa`.
    pub fn page(&self, pa: u64) -> &Page {
        &self.pages[((pa - self.base) / PAGE_SIZE) as usize]
    }

    /// A zeroed page with one reference. Models mm/page_alloc.c:alloc_pages()
    /// with __GFP_ZERO.
    pub fn alloc_zeroed<M: PhysMem + ?Sized>(&self, mem: &M) -> Result<u64, OutOfFrames> {
        let pa = self.alloc_uninit()?;
        mem.zero_frame(pa);
        Ok(pa)
    }

    /// A page with one reference and undefined contents.
    pub fn alloc_uninit(&self) -> Result<u64, OutOfFrames> {
        let pa = self.pool.alloc()?;
        let page = self.page(pa);
        debug_assert_eq!(page.refcount(), 0, "allocated a page in use: {pa:#x}");
        page.refcount.store(1, Ordering::Release);
        page.mapcount.store(0, Ordering::Release);
        page.pincount.store(0, Ordering::Release);
        page.anon_exclusive.store(false, Ordering::Release);
        page.swap.store(0, Ordering::Release);
        page.isolated.store(false, Ordering::Release);
        page.locked.store(false, Ordering::Release);
        Ok(pa)
    }

    /// Takes a reference. Models include/linux/mm.h:get_page().
    pub fn get_page(&self, pa: u64) {
        if self.is_normal(pa) {
            self.page(pa).refcount.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Drops a reference; frees the page when it was the last one. Models
    /// include/linux/mm.h:put_page().
    pub fn put_page(&self, pa: u64) {
        if !self.is_normal(pa) {
            return;
        }
        let old = self.page(pa).refcount.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(old > 0, "put_page of a free page {pa:#x}");
        if old == 1 {
            self.page(pa).anon_exclusive.store(false, Ordering::Release);
            self.pool.free(pa);
        }
    }

    /// Pins a page (FOLL_PIN): [`GUP_PIN_COUNTING_BIAS`] references and
    /// one exact pin. Models mm/gup.c:try_grab_folio() for FOLL_PIN.
    pub fn pin_page(&self, pa: u64) {
        let page = self.page(pa);
        page.refcount
            .fetch_add(GUP_PIN_COUNTING_BIAS, Ordering::AcqRel);
        page.pincount.fetch_add(1, Ordering::AcqRel);
    }

    /// Takes a reference (FOLL_GET) or a pin (FOLL_PIN) on a page found
    /// without any lock, which may be on its way to being freed: fails,
    /// taking nothing, once its refcount has fallen to 0. SeqCst, a full
    /// barrier as the atomic add is on x86, before GUP-fast re-reads the
    /// PTE and `write_protect_seq`. Models mm/gup.c:try_grab_folio_fast()
    /// (try_get_folio(): folio_ref_try_add()).
    pub fn try_grab_page(&self, pa: u64, pin: bool) -> bool {
        let page = self.page(pa);
        let add = if pin { GUP_PIN_COUNTING_BIAS } else { 1 };
        let mut old = page.refcount.load(Ordering::Acquire);
        loop {
            if old <= 0 {
                return false;
            }
            match page.refcount.compare_exchange_weak(
                old,
                old + add,
                Ordering::SeqCst,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => old = now,
            }
        }
        if pin {
            page.pincount.fetch_add(1, Ordering::AcqRel);
        }
        true
    }

    /// Drops a pin; frees the page when nothing else holds it. Models
    /// mm/gup.c:unpin_user_page().
    pub fn unpin_page(&self, pa: u64) {
        let page = self.page(pa);
        page.pincount.fetch_sub(1, Ordering::AcqRel);
        let old = page
            .refcount
            .fetch_sub(GUP_PIN_COUNTING_BIAS, Ordering::AcqRel);
        if old == GUP_PIN_COUNTING_BIAS {
            page.anon_exclusive.store(false, Ordering::Release);
            self.pool.free(pa);
        }
    }

    /// A PTE now maps `pa`: the new anonymous, exclusive mapping of a fresh
    /// page. Models mm/rmap.c:folio_add_new_anon_rmap().
    pub fn add_new_anon_rmap(&self, pa: u64) {
        let page = self.page(pa);
        page.mapcount.store(1, Ordering::Release);
        page.set_anon_exclusive();
    }

    /// One more PTE maps `pa`. Models mm/rmap.c:folio_dup_file_rmap() /
    /// folio_try_dup_anon_rmap() (fork).
    pub fn dup_rmap(&self, pa: u64) {
        if self.is_normal(pa) {
            self.page(pa).mapcount.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// A PTE stopped mapping `pa`. Models mm/rmap.c:folio_remove_rmap_pte().
    pub fn remove_rmap(&self, pa: u64) {
        if self.is_normal(pa) {
            let old = self.page(pa).mapcount.fetch_sub(1, Ordering::AcqRel);
            debug_assert!(old > 0, "remove_rmap of an unmapped page {pa:#x}");
        }
    }

    /// Frames free in the pool.
    pub fn free_count(&self) -> usize {
        self.pool.free_count()
    }

    /// Frames in the pool (the zero page included).
    pub fn total(&self) -> usize {
        self.pool.total()
    }

    /// Every normal page with a nonzero refcount, for `mm_verify`.
    pub fn in_use(&self) -> impl Iterator<Item = (u64, &Page)> {
        self.pages
            .iter()
            .enumerate()
            .map(|(i, p)| (self.base + i as u64 * PAGE_SIZE, p))
            .filter(|(pa, p)| *pa != self.zero_page && p.refcount() != 0)
    }
}
