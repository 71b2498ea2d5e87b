//! Every injection point of the memory manager and the VMM, declared once:
//! a new point is one line of [`points!`], and the mm names a point by its
//! [`Point`] variant, so a misspelt point does not compile. The names (what
//! `--inject`, `--schedule`, litmus files and the control socket take) are
//! the strings below; guest hook points are `guest:NAME`.

macro_rules! points {
    ($($variant:ident = $name:literal, $what:literal;)*) => {
        /// An injection point of the memory manager or the VMM.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Point {
            $(#[doc = $what] $variant,)*
        }

        impl Point {
            /// Every point, in the order `cowlab list points` shows them.
            pub const ALL: &'static [Point] = &[$(Point::$variant,)*];

            /// The point's name, as rules and schedules spell it.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Point::$variant => $name,)*
                }
            }

            /// What the point marks.
            pub const fn what(self) -> &'static str {
                match self {
                    $(Point::$variant => $what,)*
                }
            }
        }

        /// Every point with what it marks (`cowlab list points`,
        /// `query-points`).
        pub const POINTS: &[(&str, &str)] = &[$(($name, $what),)*];
    };
}

points! {
    FaultEnter = "fault:enter", "a page fault reaches the mm (do_user_addr_fault)";
    FaultFill = "fault:fill", "a TLB fill installs a translation";
    DoAnonymousPageAfterAlloc = "do_anonymous_page:after_alloc", "a fresh page was allocated, before the PTL";
    DoWpPageEnter = "do_wp_page:enter", "a write fault on a read-only PTE, under the PTL";
    WpPageCopyBeforeCopy = "wp_page_copy:before_copy", "reference taken, the copy not yet made (PTL dropped)";
    WpPageCopyAfterCopy = "wp_page_copy:after_copy", "the copy is made, before retaking the PTL";
    WpPageCopyBeforeClearFlush = "wp_page_copy:before_clear_flush", "PTL retaken, pte_same passed, before ptep_clear_flush";
    WpPageCopyAfterClearFlush = "wp_page_copy:after_clear_flush", "the old PTE cleared and flushed, before the new one";
    WpPageCopyInstalled = "wp_page_copy:installed", "the copy is mapped, the old rmap dropped";
    ForkEnter = "fork:enter", "dup_mmap holds mmap_lock (and the VMA locks, per policy)";
    ForkBeforeWrprotect = "fork:before_wrprotect", "copy_present_pte shares a writable PTE's page, not yet write-protected";
    ForkAfterWrprotect = "fork:after_wrprotect", "copy_present_pte write-protected a parent PTE";
    ForkBeforeCopyPage = "fork:before_copy_page", "copy_present_page is about to copy a pinned page";
    ForkAfterCopyPage = "fork:after_copy_page", "copy_present_page copied the page, before the child's PTE";
    ForkBeforeFlush = "fork:before_flush", "every PTE copied, the parent's TLB not yet flushed";
    ForkAfterFlush = "fork:after_flush", "the parent's TLB flushed, fork about to return";
    TlbBeforeShootdown = "tlb:before_shootdown", "flush_tlb_range starts";
    TlbBeforeIpi = "tlb:before_ipi", "the shadow entries are gone, the IPIs not yet sent";
    TlbAfterAck = "tlb:after_ack", "flush_tlb_range finished: every CPU acknowledged";
    GupAfterGrab = "gup:after_grab", "get_user_pages took its reference or pin";
    GupFastAfterWalk = "gup_fast:after_walk", "GUP-fast read a usable PTE locklessly (IRQs off), nothing grabbed";
    GupFastBeforeRecheck = "gup_fast:before_recheck", "GUP-fast grabbed the page, the PTE not yet re-read (IRQs off)";
    UffdAfterWrprotect = "uffd:after_wrprotect", "mwriteprotect_range changed the PTEs, before its flush";
    MprotectAfterChange = "mprotect:after_change", "mprotect changed the PTEs, before its flush";
    MunmapAfterZap = "munmap:after_zap", "zap_page_range cleared the PTEs, before its flush";
    MremapAfterMovePtes = "mremap:after_move_ptes", "move_ptes moved the PTEs and dropped the PTLs (the old range is flushed only if mremap_flush_under_ptl)";
    AllocPage = "alloc_page", "a data page is allocated (a 'fail' rule makes it fail)";
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether `name` is a known point or a guest hook point.
pub fn is_point(name: &str) -> bool {
    POINTS.iter().any(|p| p.0 == name) || name.strip_prefix("guest:").is_some_and(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_listed_in_order() {
        let names: std::collections::BTreeSet<_> = Point::ALL.iter().map(|p| p.name()).collect();
        assert_eq!(names.len(), Point::ALL.len());
        for (p, (name, what)) in Point::ALL.iter().zip(POINTS) {
            assert_eq!((p.name(), p.what()), (*name, *what));
            assert!(is_point(name));
        }
        assert_eq!(
            Point::WpPageCopyAfterCopy.to_string(),
            "wp_page_copy:after_copy"
        );
    }
}
