//! The codes that trace records carry in their words, each declared once:
//! the number written to the file (docs/trace-format.md, which must not
//! change) and the word `cowlab trace show` prints for it. A new code is
//! one line of its [`codes!`] list; emitters name codes by variant, so a
//! number cannot be mistyped.

macro_rules! codes {
    ($(
        $(#[$meta:meta])*
        $name:ident {
            $($(#[$vmeta:meta])* $variant:ident = $code:literal, $label:literal;)*
        }
    )*) => {$(
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $code,)*
        }

        impl $name {
            /// Every code, in file order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The number in the trace file.
            pub const fn code(self) -> u64 {
                self as u64
            }

            pub const fn from_code(code: u64) -> Option<Self> {
                match code {
                    $($code => Some($name::$variant),)*
                    _ => None,
                }
            }

            /// How `cowlab trace show` prints it.
            pub const fn label(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)*
                }
            }
        }
    )*};
}

codes! {
    /// `RunEnd`'s word: how a run ended.
    RunEnd {
        NoWitness = 0, "no witness";
        Witness = 1, "witness";
        Unreachable = 2, "unreachable";
        /// A program run (no `exists`), or a run cut short.
        Other = 3, "ended";
        /// A VMM error or panic, an `mm_verify` violation: the text is
        /// `error: MESSAGE`.
        Error = 4, "error";
    }

    /// `Exit`'s first word: why the vCPU left the guest.
    ExitReason {
        /// The second word is the hypercall number.
        Hypercall = 1, "hypercall";
        Interrupted = 2, "interrupted";
        Revoked = 3, "memory revoked";
        Other = 4, "other";
    }

    /// `Fault`'s second word: the access that faulted.
    FaultAccess {
        Read = 0, "read";
        Write = 1, "write";
        Exec = 2, "exec";
    }

    /// `FaultEnd`'s second word: how the fault ended.
    FaultResult {
        Ok = 0, "ok";
        Segv = 1, "segv";
        Oom = 2, "oom";
        Interrupted = 3, "interrupted";
    }

    /// `Resolve`'s second word: how the mm resolved a fault.
    Resolution {
        /// The walk found the access allowed: a TLB fill only.
        Fill = 1, "fill";
        /// do_anonymous_page() mapped a fresh page.
        Anon = 2, "anon";
        /// do_anonymous_page() mapped the shared zero page.
        ZeroPage = 3, "zero page";
        /// wp_page_reuse(): the page was ours alone.
        Reuse = 4, "reuse";
        /// wp_page_copy() mapped a copy.
        Copy = 5, "copy";
        /// An unshare fault (FAULT_FLAG_UNSHARE) left a page of our own.
        Unshare = 6, "unshare";
        /// A uffd-wp page: the fault waits for the handler.
        Userfault = 7, "userfault";
        /// do_swap_page() mapped the page of a swap entry.
        SwapIn = 8, "swap-in";
    }

    /// `LockWait`'s and `LockDone`'s word: what is waited for.
    LockKind {
        MmapLock = 1, "mmap_lock";
        VmaLock = 2, "VMA lock";
        Ptl = 3, "PTL";
        /// A schedule's earlier step (the text says which).
        Schedule = 4, "schedule";
        /// A `pause` rule (the text is the point).
        Pause = 5, "pause";
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers are the file format: docs/trace-format.md lists them.
    #[test]
    fn codes_match_the_documented_format() {
        let doc = include_str!("../../../docs/trace-format.md");
        let resolve = "1 fill 2 anon 3 zero page 4 reuse 5 copy 6 unshare 7 userfault 8 swap-in";
        let listed: Vec<String> = Resolution::ALL
            .iter()
            .map(|r| format!("{} {}", r.code(), r.label()))
            .collect();
        assert_eq!(listed.join(" "), resolve);
        assert!(doc.contains(resolve));
        assert!(
            doc.contains("1 mmap_lock 2 VMA lock 3 PTL 4 a schedule's earlier step 5 a pause rule")
        );
        assert!(doc.contains("1 hypercall nr, 2 interrupted, 3 memory revoked, 4 other"));
        assert_eq!(
            LockKind::ALL.iter().map(|l| l.code()).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(
            RunEnd::ALL.iter().map(|l| l.code()).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        assert_eq!(ExitReason::from_code(3), Some(ExitReason::Revoked));
        assert_eq!(FaultResult::from_code(9), None);
    }
}
