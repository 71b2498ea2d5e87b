//! Kernel behaviour as knobs, and presets that name kernel releases
//! (docs/design.md §6). Each knob's doc names the commit that changed the
//! behaviour; `docs/policies.md` has the table, and `cowlab list policies`
//! prints it.

use std::fmt;

/// Under which lock a page fault runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultLock {
    /// `mmap_lock` held for read (before v6.4 on x86).
    Mmap,
    /// The faulting VMA's per-VMA lock, `lock_vma_under_rcu()`
    /// (0bff0aaea03e "x86/mm: try VMA lock-based page fault handling first", v6.4).
    Vma,
}

/// When `do_wp_page()` may reuse a page instead of copying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CowReuse {
    /// The page is mapped once (`reuse_swap_page()`, before v5.9): extra
    /// references such as GUP pins do not prevent reuse.
    Mapcount,
    /// Nobody else holds a reference (09854ba94c6a "mm: do_wp_page()
    /// simplification", v5.9).
    Refcount,
}

/// What a read-only GUP (FOLL_GET reference or FOLL_PIN pin) of a shared
/// anonymous page does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GupReadCow {
    /// Takes the shared page as it is (before v5.8, and v5.9 to v5.18:
    /// a308c71bf1e6 removed the forced COW break).
    None,
    /// Breaks COW as for a write, for references and pins alike
    /// (17839856fd58 "gup: document and work around 'COW can break either
    /// way' issue", v5.8).
    Break,
    /// Unshares it for a pin: a private copy mapped read-only (c89357e27f20
    /// FAULT_FLAG_UNSHARE, with 6c287605fd56 PageAnonExclusive, v5.19). A
    /// FOLL_GET reference (vmsplice) still takes the shared page:
    /// `gup_must_unshare()` is for FOLL_PIN only.
    Unshare,
}

/// How `do_swap_page()` decides that a swapped-in page is ours alone and
/// may be mapped writable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapinReuse {
    /// On a write fault, `reuse_swap_page()`: the page's mapcount plus its
    /// slot's swap count (the faulting PTE's included) is 1. Blind to GUP
    /// references, as mapcount COW reuse was (before v5.18).
    Swapcount,
    /// The swap PTE's exclusive bit (with `anon_exclusive`), or refcount 1
    /// after trying to drop the swap cache on a write fault (c145e0b47c77
    /// "mm: streamline COW logic in do_swap_page()", v5.18).
    Refcount,
}

/// A knob's type: how `--set` spells its values and how they print.
pub trait KnobValue: Sized {
    /// The values, as `cowlab list policies` lists them (`mmap|vma`).
    const VALUES: &'static str;
    /// The values, as an error names them (`mmap or vma`).
    const EXPECTED: &'static str;
    fn parse(value: &str) -> Option<Self>;
    fn show(&self) -> String;
}

/// `KnobValue` for an enum whose variants are spelt as the strings given.
macro_rules! choices {
    ($ty:ident { $($variant:ident = $name:literal),+ $(,)? }, $expected:expr) => {
        impl KnobValue for $ty {
            const VALUES: &'static str = join_bar!($($name),+);
            const EXPECTED: &'static str = $expected;
            fn parse(value: &str) -> Option<Self> {
                match value {
                    $($name => Some($ty::$variant),)+
                    _ => None,
                }
            }
            fn show(&self) -> String {
                match self {
                    $($ty::$variant => $name,)+
                }
                .into()
            }
        }
    };
}

macro_rules! join_bar {
    ($first:literal $(, $rest:literal)*) => {
        concat!($first $(, "|", $rest)*)
    };
}

choices!(FaultLock { Mmap = "mmap", Vma = "vma" }, "mmap or vma");
choices!(CowReuse { Mapcount = "mapcount", Refcount = "refcount" }, "mapcount or refcount");
choices!(
    SwapinReuse { Swapcount = "swapcount", Refcount = "refcount" },
    "swapcount or refcount"
);
choices!(
    GupReadCow { None = "none", Break = "break", Unshare = "unshare" },
    "none, break or unshare"
);

impl KnobValue for bool {
    const VALUES: &'static str = "on|off";
    const EXPECTED: &'static str = "on or off";
    fn parse(value: &str) -> Option<Self> {
        match value {
            "on" | "true" | "1" | "yes" => Some(true),
            "off" | "false" | "0" | "no" => Some(false),
            _ => None,
        }
    }
    fn show(&self) -> String {
        if *self { "on" } else { "off" }.into()
    }
}

/// A capacity: a number of entries, or `None` for no limit.
impl KnobValue for Option<usize> {
    const VALUES: &'static str = "N|unlimited";
    const EXPECTED: &'static str = "a number >= 1 or unlimited";
    fn parse(value: &str) -> Option<Self> {
        match value {
            "unlimited" => Some(None),
            n => n.parse::<usize>().ok().filter(|&n| n > 0).map(Some),
        }
    }
    fn show(&self) -> String {
        self.map_or("unlimited".into(), |n| n.to_string())
    }
}

/// How many pages a TLB fill caches at once: the naturally aligned group
/// of this many pages around the faulting page (1: the faulting page only).
/// A power of two, at most 512 (one page table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultAround(u32);

impl FaultAround {
    /// The faulting page only.
    pub const OFF: FaultAround = FaultAround(1);
    /// The aligned group of 8: what PVM's own refault prefetches.
    pub const GROUP_OF_8: FaultAround = FaultAround(8);

    /// A group of `pages` pages, if it is a power of two of at most 512.
    pub const fn pages(pages: u32) -> Option<FaultAround> {
        if pages.is_power_of_two() && pages <= 512 {
            Some(FaultAround(pages))
        } else {
            None
        }
    }

    /// The group's size in pages.
    pub fn get(self) -> u64 {
        u64::from(self.0)
    }
}

impl KnobValue for FaultAround {
    const VALUES: &'static str = "1|2|4|8|16|32|64|128|256|512";
    const EXPECTED: &'static str = "a power of two from 1 (off) to 512";
    fn parse(value: &str) -> Option<Self> {
        FaultAround::pages(value.parse().ok()?)
    }
    fn show(&self) -> String {
        self.0.to_string()
    }
}

/// A `--set` that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("knob {knob} takes {expected}, not '{value}'")]
    BadValue {
        knob: &'static str,
        expected: &'static str,
        value: String,
    },
    #[error(
        "unknown knob '{0}' (knobs: {names})",
        names = KNOBS.iter().map(|k| k.0).collect::<Vec<_>>().join(", ")
    )]
    UnknownKnob(String),
}

impl From<PolicyError> for String {
    fn from(e: PolicyError) -> String {
        e.to_string()
    }
}

/// Declares every knob once: its field of [`Policy`] (with its doc), its
/// type (a [`KnobValue`]) and the commit that changed the behaviour. This
/// gives the struct, `--set` ([`Policy::set`]), the values in order
/// ([`Policy::values`]) and the table ([`KNOBS`]): a new knob is one entry.
macro_rules! knobs {
    ($($(#[$doc:meta])* $name:ident: $ty:ty, $commit:literal;)*) => {
        /// A set of kernel behaviours.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct Policy {
            $($(#[$doc])* pub $name: $ty,)*
        }

        /// Every knob: name, values, the commit that changed it.
        pub const KNOBS: &[(&str, &str, &str)] = &[
            $((stringify!($name), <$ty as KnobValue>::VALUES, $commit),)*
        ];

        impl Policy {
            /// Sets knob `name` from `value` (`--set name=value`).
            pub fn set(&mut self, name: &str, value: &str) -> Result<(), PolicyError> {
                match name {
                    $(stringify!($name) => {
                        self.$name = <$ty as KnobValue>::parse(value).ok_or_else(|| {
                            PolicyError::BadValue {
                                knob: stringify!($name),
                                expected: <$ty as KnobValue>::EXPECTED,
                                value: value.to_string(),
                            }
                        })?;
                    })*
                    _ => return Err(PolicyError::UnknownKnob(name.to_string())),
                }
                Ok(())
            }

            /// The value of every knob, in [`KNOBS`] order.
            pub fn values(&self) -> Vec<String> {
                vec![$(KnobValue::show(&self.$name),)*]
            }
        }
    };
}

knobs! {
    fault_lock: FaultLock, "0bff0aaea03e (v6.4): x86 faults under per-VMA locks";
    /// `dup_mmap()` write-locks every parent VMA (fb49c455323f "fork: lock
    /// VMAs of the parent process when forking", v6.5, stable 6.4.y).
    fork_lock_vmas: bool, "fb49c455323f (v6.5): dup_mmap write-locks the parent's VMAs";
    cow_reuse: CowReuse, "09854ba94c6a (v5.9): do_wp_page reuses by refcount";
    /// `PageAnonExclusive` and unsharing for R/O pins (6c287605fd56,
    /// c89357e27f20, v5.19).
    anon_exclusive: bool, "6c287605fd56, c89357e27f20 (v5.19): PageAnonExclusive, unshare faults";
    gup_read_cow: GupReadCow, "17839856fd58 (v5.8) break; a308c71bf1e6 (v5.9) none; v5.19 unshare";
    /// GUP-fast's FOLL_PIN path samples `mm->write_protect_seq` before its
    /// lockless walk and gives up (unpins, falls back to the slow path) if
    /// a fork's `copy_page_range()` ran meanwhile (57efa1fe5957 "mm/gup:
    /// prevent gup_fast from racing with COW during fork", v5.11).
    gup_fast_fork_seqcount: bool, "57efa1fe5957 (v5.11): GUP-fast pins retry on fork's write_protect_seq";
    /// fork copies maybe-pinned exclusive pages at once instead of sharing
    /// them (70e806e4e645 "mm: Do early cow for pinned pages during fork()
    /// for ptes").
    fork_copy_pinned: bool, "70e806e4e645: fork copies maybe-pinned anon pages early";
    /// fork write-protects a maybe-pinned page and flushes before copying
    /// it, so the child sees a coherent snapshot (J. Horn, 2025 proposal,
    /// not merged).
    fork_wrprotect_pinned: bool, "J. Horn 2025 proposal (not merged): wrprotect + flush before that copy";
    /// `do_wp_page()` flushes a pending TLB flush of a uffd-wp VMA before
    /// copying (6ce64428d620 "mm/userfaultfd: fix memory corruption due to
    /// writeprotect", v5.12, stable 5.9+).
    uffd_wp_flush_before_copy: bool, "6ce64428d620 (v5.12, stable 5.9+): flush a pending flush before COW copy";
    /// `wp_page_copy()` rechecks, under the PTL, that the page is still
    /// shared before installing the copy (suggested in seed 004, not merged).
    wp_copy_recheck_exclusive: bool, "seed 004 suggestion (not merged): recheck exclusivity in wp_page_copy";
    /// How `do_swap_page()` decides reuse: `reuse_swap_page()`'s mapcount
    /// + swap count, or the exclusive bit / refcount (c145e0b47c77 "mm:
    /// streamline COW logic in do_swap_page()", v5.18; the swap PTE's
    /// exclusive bit, 1493a1913e34, v5.19, is used with `anon_exclusive`).
    swapin_reuse: SwapinReuse, "c145e0b47c77 (v5.18): do_swap_page reuses by refcount, not reuse_swap_page()";
    /// `do_swap_page()` maps an exclusive page writable on a read fault too
    /// (c18160dba5ff "mm: swap: reuse exclusive folio directly instead of
    /// wp page faults", v6.11).
    swapin_map_writable: bool, "c18160dba5ff (v6.11): swap-in maps exclusive pages writable on read faults";
    /// `do_wp_page()` drops the swap cache's reference before deciding
    /// reuse by refcount (53a05ad9f21d "mm: optimize do_wp_page() for
    /// exclusive pages in the swapcache", v5.18); before, a page in the
    /// swap cache was always copied.
    cow_free_swapcache: bool, "53a05ad9f21d (v5.18): do_wp_page frees the swap cache before reuse";
    /// Reclaim does not add a maybe-pinned anonymous page to the swap
    /// cache (feb889fb40fa "mm: don't put pinned pages into the swap
    /// cache", v5.11).
    pageout_skip_pinned: bool, "feb889fb40fa (v5.11): reclaim leaves maybe-pinned anon pages alone";
    /// `move_ptes()` flushes the old range's TLB entries before it drops
    /// the page-table locks (eb66ae030829 "mremap: properly flush TLB
    /// before releasing the page", CVE-2018-18281, v4.19); off: after
    /// dropping them, as `move_page_tables()` did before (only clean PTEs
    /// from 5d1904204c99, v4.9; every PTE before that).
    mremap_flush_under_ptl: bool, "eb66ae030829 (v4.19): move_ptes flushes before dropping the PTLs";
    /// Most translations one TLB holds (None = unlimited).
    tlb_capacity: Option<usize>, "cowlab: a small TLB evicts random entries";
    /// A TLB fill also caches the neighbours whose logical PTE permits the
    /// faulting access, in the aligned group of this many pages (cowlab's TLB-caching model,
    /// see `Mm::tlb_fill`; not Linux's fault-around).
    tlb_fault_around: FaultAround, "cowlab: a fill caches the aligned group's valid neighbours (TLB model)";
}

/// The presets, newest first, with what each stands for.
pub const PRESETS: &[(&str, &str)] = &[
    ("mainline", "current Linux"),
    (
        "linux-6.4",
        "per-VMA-lock faults without fork locking the VMAs (seed 000)",
    ),
    ("linux-6.3", "faults under mmap_lock"),
    (
        "linux-5.10",
        "refcount reuse, no PageAnonExclusive, no uffd-wp flush before copy (seed 001)",
    ),
    (
        "linux-5.8",
        "mapcount reuse, read GUP (gets and pins) breaks COW",
    ),
    (
        "linux-5.7",
        "mapcount reuse, read GUP does not break COW (CVE-2020-29374, seed 003)",
    ),
    (
        "proposal-fork-coherent",
        "mainline + fork write-protects pinned pages before copying (seed 002)",
    ),
];

impl Policy {
    /// Current Linux.
    pub const MAINLINE: Policy = Policy {
        fault_lock: FaultLock::Vma,
        fork_lock_vmas: true,
        cow_reuse: CowReuse::Refcount,
        anon_exclusive: true,
        gup_read_cow: GupReadCow::Unshare,
        gup_fast_fork_seqcount: true,
        fork_copy_pinned: true,
        fork_wrprotect_pinned: false,
        uffd_wp_flush_before_copy: true,
        wp_copy_recheck_exclusive: false,
        swapin_reuse: SwapinReuse::Refcount,
        swapin_map_writable: true,
        cow_free_swapcache: true,
        pageout_skip_pinned: true,
        mremap_flush_under_ptl: true,
        tlb_capacity: None,
        tlb_fault_around: FaultAround::GROUP_OF_8,
    };

    /// The preset `name`, if there is one.
    pub fn preset(name: &str) -> Option<Policy> {
        let m = Policy::MAINLINE;
        let v5_10 = Policy {
            fault_lock: FaultLock::Mmap,
            fork_lock_vmas: false,
            anon_exclusive: false,
            gup_read_cow: GupReadCow::None,
            gup_fast_fork_seqcount: false,
            uffd_wp_flush_before_copy: false,
            swapin_reuse: SwapinReuse::Swapcount,
            swapin_map_writable: false,
            cow_free_swapcache: false,
            pageout_skip_pinned: false,
            ..m
        };
        Some(match name {
            "mainline" => m,
            "linux-6.4" => Policy {
                fork_lock_vmas: false,
                swapin_map_writable: false,
                ..m
            },
            "linux-6.3" => Policy {
                fault_lock: FaultLock::Mmap,
                fork_lock_vmas: false,
                swapin_map_writable: false,
                ..m
            },
            "linux-5.10" => v5_10,
            "linux-5.8" => Policy {
                cow_reuse: CowReuse::Mapcount,
                gup_read_cow: GupReadCow::Break,
                fork_copy_pinned: false,
                ..v5_10
            },
            "linux-5.7" => Policy {
                cow_reuse: CowReuse::Mapcount,
                gup_read_cow: GupReadCow::None,
                fork_copy_pinned: false,
                ..v5_10
            },
            "proposal-fork-coherent" => Policy {
                fork_wrprotect_pinned: true,
                ..m
            },
            _ => return None,
        })
    }

    /// Names of the presets, for error messages.
    pub fn preset_names() -> String {
        PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy::MAINLINE
    }
}

/// `cowlab list policies`: presets × knobs, then the knobs' commits.
pub struct PolicyTable;

impl fmt::Display for PolicyTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = |name: &str| name.len().max(10);
        write!(f, "{:<27}", "knob")?;
        for (name, _) in PRESETS {
            write!(f, " {name:<w$}", w = width(name))?;
        }
        writeln!(f)?;
        let columns: Vec<Vec<String>> = PRESETS
            .iter()
            .map(|(name, _)| Policy::preset(name).expect("a preset").values())
            .collect();
        for (i, (knob, _, _)) in KNOBS.iter().enumerate() {
            write!(f, "{knob:<27}")?;
            for (column, (name, _)) in columns.iter().zip(PRESETS) {
                write!(f, " {:<w$}", column[i], w = width(name))?;
            }
            writeln!(f)?;
        }
        writeln!(f)?;
        for (name, what) in PRESETS {
            writeln!(f, "{name:<23} {what}")?;
        }
        writeln!(f)?;
        for (knob, values, commit) in KNOBS {
            writeln!(f, "{knob:<27} {values:<19} {commit}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_exists_and_differs_where_history_says() {
        for (name, _) in PRESETS {
            assert!(Policy::preset(name).is_some(), "{name}");
        }
        let p = |n| Policy::preset(n).unwrap();
        assert!(p("mainline").fork_lock_vmas && !p("linux-6.4").fork_lock_vmas);
        assert_eq!(p("linux-6.4").fault_lock, FaultLock::Vma);
        assert_eq!(p("linux-6.3").fault_lock, FaultLock::Mmap);
        assert_eq!(p("linux-5.8").cow_reuse, CowReuse::Mapcount);
        assert_eq!(p("linux-5.8").gup_read_cow, GupReadCow::Break);
        assert_eq!(p("linux-5.7").gup_read_cow, GupReadCow::None);
        assert!(!p("linux-5.10").uffd_wp_flush_before_copy);
        assert!(p("linux-6.3").gup_fast_fork_seqcount && !p("linux-5.10").gup_fast_fork_seqcount);
        assert!(!p("linux-5.8").gup_fast_fork_seqcount && !p("linux-5.7").gup_fast_fork_seqcount);
        assert!(p("proposal-fork-coherent").fork_wrprotect_pinned);
        assert_eq!(p("linux-5.10").swapin_reuse, SwapinReuse::Swapcount);
        assert_eq!(p("linux-6.3").swapin_reuse, SwapinReuse::Refcount);
        assert!(p("mainline").swapin_map_writable && !p("linux-6.4").swapin_map_writable);
        for (name, _) in PRESETS {
            assert!(p(name).mremap_flush_under_ptl, "{name} is after v4.19");
        }
        assert_eq!(Policy::preset("linux-2.6"), None);
    }

    #[test]
    fn set_accepts_values_and_names_the_valid_ones() {
        let mut p = Policy::MAINLINE;
        p.set("cow_reuse", "mapcount").unwrap();
        p.set("tlb_capacity", "8").unwrap();
        p.set("fork_lock_vmas", "off").unwrap();
        assert_eq!(
            (p.cow_reuse, p.tlb_capacity, p.fork_lock_vmas),
            (CowReuse::Mapcount, Some(8), false)
        );
        assert_eq!(
            p.set("cow_reuse", "sometimes").unwrap_err().to_string(),
            "knob cow_reuse takes mapcount or refcount, not 'sometimes'"
        );
        assert_eq!(
            p.set("gup_read_cow", "x").unwrap_err().to_string(),
            "knob gup_read_cow takes none, break or unshare, not 'x'"
        );
        assert_eq!(
            p.set("tlb_capacity", "0").unwrap_err().to_string(),
            "knob tlb_capacity takes a number >= 1 or unlimited, not '0'"
        );
        assert_eq!(
            p.set("anon_exclusive", "maybe").unwrap_err().to_string(),
            "knob anon_exclusive takes on or off, not 'maybe'"
        );
        assert!(p
            .set("bogus", "1")
            .unwrap_err()
            .to_string()
            .starts_with("unknown knob 'bogus' (knobs: fault_lock, fork_lock_vmas, cow_reuse,"));
        assert_eq!(KNOBS[0].1, "mmap|vma");
        assert_eq!(KNOBS[4].1, "none|break|unshare");
        assert_eq!(p.values().len(), KNOBS.len());
    }
}
