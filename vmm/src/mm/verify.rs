//! `mm_verify`: the invariants of docs/design.md §5, checked when the guests are
//! quiescent (after a run, or before an address space is torn down).
//! A violation names the frame and the addresses, and never panics.

use super::sync::Ordering;
use std::collections::BTreeMap;

use super::memory::PTE_PROTNONE;
use super::mm_struct::{Machine, Mm};
use super::page::GUP_PIN_COUNTING_BIAS;
use super::pagetable::{self, bits};
use super::swapfile::{is_swap_pte, swp_offset};
use super::tlb;

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks the address spaces `mms` (every live one) against the frames and
/// the TLBs of `cpus` (CPU number, its mm):
/// - each page's mapcount is the number of PTEs mapping it, and its
///   refcount that plus its pins;
/// - a writable PTE maps an exclusive anonymous page;
/// - no page is in use without a mapping or a pin (a leak), or a swap PTE
///   holding the slot whose swap cache it is in; its refcount counts the
///   swap cache's reference;
/// - swap counts match the swap PTEs, and the swap cache is consistent;
/// - unless a flush is pending, no CPU's TLB entry is more permissive than
///   the logical PTE (after a completed flush no stale entry remains).
pub fn mm_verify(m: &Machine, mms: &[&Mm], cpus: &[(usize, &Mm)]) -> Vec<Violation> {
    let mut out = verify_pages(m, mms);
    out.extend(verify_tlbs(m, cpus));
    out
}

/// The page-count invariants of [`mm_verify`], for every live address space.
pub fn verify_pages(m: &Machine, mms: &[&Mm]) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut mappings: BTreeMap<u64, Vec<(usize, u64)>> = BTreeMap::new();
    // Swap PTEs by slot.
    let mut swap_ptes: BTreeMap<u64, Vec<(usize, u64)>> = BTreeMap::new();
    for mm in mms {
        pagetable::for_each_leaf(&*m.mem, mm.pgd, 0, u64::MAX, &mut |va, slot| {
            let pte = slot.load(Ordering::Acquire);
            if is_swap_pte(pte) {
                swap_ptes
                    .entry(swp_offset(pte))
                    .or_default()
                    .push((mm.id, va));
                return;
            }
            if pte & (bits::PRESENT | PTE_PROTNONE) == 0 {
                return;
            }
            let frame = pte & bits::ADDR_MASK;
            if !m.frames.is_normal(frame) {
                if frame != m.frames.zero_page() {
                    out.push(Violation(format!(
                        "mm {}: {va:#x} maps {frame:#x}, not a pool frame",
                        mm.id
                    )));
                } else if pte & bits::WRITABLE != 0 {
                    out.push(Violation(format!(
                        "mm {}: {va:#x} maps the zero page writable",
                        mm.id
                    )));
                }
                return;
            }
            if pte & bits::WRITABLE != 0 && !m.frames.page(frame).anon_exclusive() {
                out.push(Violation(format!(
                    "mm {}: {va:#x} maps frame {frame:#x} writable but it is not PageAnonExclusive",
                    mm.id
                )));
            }
            mappings.entry(frame).or_default().push((mm.id, va));
        });
    }
    // References taken by get_user_pages (FOLL_GET) are counted nowhere
    // else: the pin table has them.
    let mut gets: BTreeMap<u64, i64> = BTreeMap::new();
    for pin in m.pins.snapshot().into_iter().filter(|p| !p.flags.pin) {
        *gets.entry(pin.frame).or_default() += 1;
    }
    for (frame, page) in m.frames.in_use() {
        let maps = mappings.remove(&frame).unwrap_or_default();
        let gets = gets.get(&frame).copied().unwrap_or(0);
        let where_ = maps
            .iter()
            .map(|(mm, va)| format!("mm {mm} {va:#x}"))
            .collect::<Vec<_>>()
            .join(", ");
        if page.mapcount() != maps.len() as i64 {
            out.push(Violation(format!(
                "frame {frame:#x}: mapcount {} but {} PTEs map it [{where_}]",
                page.mapcount(),
                maps.len()
            )));
        }
        let cached = i64::from(page.swapcache().is_some());
        let expected = maps.len() as i64 + page.pincount() * GUP_PIN_COUNTING_BIAS + gets + cached;
        if page.refcount() != expected {
            out.push(Violation(format!(
                "frame {frame:#x}: refcount {} but {} mappings, {} pins, {gets} references and {cached} swap cache [{where_}]",
                page.refcount(),
                maps.len(),
                page.pincount()
            )));
        }
        // A page in the swap cache belongs to its slot while a swap PTE
        // holds the slot; unmapped and unreferenced otherwise, it should
        // have left the cache (free_swap_cache(), free_swap_and_cache()).
        let held_by_slot = page
            .swapcache()
            .is_some_and(|s| swap_ptes.get(&s).is_some_and(|v| !v.is_empty()));
        if maps.is_empty() && page.pincount() == 0 && gets == 0 && !held_by_slot {
            out.push(Violation(format!(
                "frame {frame:#x}: in use (refcount {}) but unmapped: leaked",
                page.refcount()
            )));
        }
    }
    for (frame, maps) in mappings {
        out.push(Violation(format!(
            "frame {frame:#x}: mapped at {maps:x?} but free"
        )));
    }
    out.extend(verify_swap(m, swap_ptes));
    out
}

/// The swap invariants of [`mm_verify`]: each slot's swap count is the
/// number of swap PTEs that name it; a slot in use has a count or a page
/// in the swap cache, and its contents somewhere (written, or cached); the
/// swap cache and the pages agree on which page caches which slot.
fn verify_swap(m: &Machine, mut swap_ptes: BTreeMap<u64, Vec<(usize, u64)>>) -> Vec<Violation> {
    let mut out = Vec::new();
    for s in m.swap.snapshot() {
        let ptes = swap_ptes.remove(&s.offset).unwrap_or_default();
        if s.count as usize != ptes.len() {
            out.push(Violation(format!(
                "swap slot {}: swap count {} but {} swap PTEs name it {ptes:x?}",
                s.offset,
                s.count,
                ptes.len()
            )));
        }
        if s.count == 0 && s.cache.is_none() {
            out.push(Violation(format!(
                "swap slot {}: in use with no count and no swap cache page",
                s.offset
            )));
        }
        if s.count > 0 && s.cache.is_none() && !s.written {
            out.push(Violation(format!(
                "swap slot {}: {} swap PTEs but neither written nor cached",
                s.offset, s.count
            )));
        }
        if let Some(pa) = s.cache {
            let back = m.frames.page(pa).swapcache();
            if m.frames.page(pa).refcount() == 0 || back != Some(s.offset) {
                out.push(Violation(format!(
                    "swap slot {}: caches frame {pa:#x}, which says {back:?} (refcount {})",
                    s.offset,
                    m.frames.page(pa).refcount()
                )));
            }
        }
    }
    for (offset, ptes) in swap_ptes {
        out.push(Violation(format!(
            "swap slot {offset}: free but swap PTEs name it {ptes:x?}"
        )));
    }
    out
}

/// The TLB invariant of [`mm_verify`]: unless a flush is pending (or a
/// fork, or an mremap before eb66ae030829, deferred its flush), no entry
/// of `cpu`'s TLB is more permissive than its logical PTE in `mm`.
pub fn verify_tlbs(m: &Machine, cpus: &[(usize, &Mm)]) -> Vec<Violation> {
    let mut out = Vec::new();
    for (cpu, mm) in cpus {
        if mm.tlb_may_be_stale() {
            continue;
        }
        let Some(t) = m.tlbs.get(*cpu) else { continue };
        let t = tlb::lock(&t);
        pagetable::for_each_leaf(&*m.mem, t.root(), 0, u64::MAX, &mut |va, slot| {
            let shadow = slot.load(Ordering::Acquire);
            if shadow & bits::PRESENT == 0 {
                return;
            }
            let logical = pagetable::lookup(&*m.mem, mm.pgd, va).unwrap_or(0);
            let same_frame = logical & bits::ADDR_MASK == shadow & bits::ADDR_MASK;
            let too_permissive = logical & bits::PRESENT == 0
                || !same_frame
                || (shadow & bits::WRITABLE != 0 && logical & bits::WRITABLE == 0);
            if too_permissive {
                out.push(Violation(format!(
                    "cpu {cpu}: TLB entry {va:#x} → {shadow:#x} is stale (logical PTE {logical:#x}) with no flush pending"
                )));
            }
        });
    }
    out
}

/// After every address space is gone: every pool frame is free but the
/// zero page, and page tables of CPUs that are gone were returned.
pub fn verify_no_leaks(m: &Machine) -> Vec<Violation> {
    let in_use: Vec<u64> = m.frames.in_use().map(|(pa, _)| pa).collect();
    let mut out: Vec<Violation> = in_use
        .iter()
        .take(8)
        .map(|pa| {
            Violation(format!(
                "frame {pa:#x}: still in use after every address space exited"
            ))
        })
        .collect();
    if let (n @ 1.., Some(pa)) = m.frames.pool().double_frees() {
        out.push(Violation(format!(
            "{n} frees of frames that were free already (first {pa:#x}): a reference count went wrong"
        )));
    }
    let slots = m.swap.snapshot();
    if let Some(s) = slots.first() {
        out.push(Violation(format!(
            "{} swap slots still in use after every address space exited (first {s:?})",
            slots.len()
        )));
    }
    // Every frame but the zero page should be free again.
    let leaked = m.frames.total().saturating_sub(1 + m.frames.free_count());
    if leaked > 0 && out.is_empty() {
        out.push(Violation(format!(
            "{leaked} frames (page tables) not returned after every address space exited"
        )));
    }
    out
}
