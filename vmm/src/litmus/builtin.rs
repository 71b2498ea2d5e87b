//! The built-in litmus tests (`tests/litmus/*.litmus`), embedded in the
//! binary and runnable by name.

/// Name, source and the suites a test belongs to.
pub const TESTS: &[(&str, &str, &[&str])] = &[
    (
        "cow-fork-basic",
        include_str!("../../../tests/litmus/cow-fork-basic.litmus"),
        &["basic", "cow"],
    ),
    (
        "cow-vmsplice-unmap",
        include_str!("../../../tests/litmus/cow-vmsplice-unmap.litmus"),
        &["basic", "cow"],
    ),
    (
        "threads-counter",
        include_str!("../../../tests/litmus/threads-counter.litmus"),
        &["basic"],
    ),
    (
        "munmap-segv",
        include_str!("../../../tests/litmus/munmap-segv.litmus"),
        &["basic"],
    ),
    (
        "madvise-dontneed-zero",
        include_str!("../../../tests/litmus/madvise-dontneed-zero.litmus"),
        &["basic"],
    ),
    (
        "madvise-dontfork",
        include_str!("../../../tests/litmus/madvise-dontfork.litmus"),
        &["basic", "madvise"],
    ),
    (
        "dontfork-pinned",
        include_str!("../../../tests/litmus/dontfork-pinned.litmus"),
        &["basic", "madvise"],
    ),
    (
        "mremap-move",
        include_str!("../../../tests/litmus/mremap-move.litmus"),
        &["basic", "mremap"],
    ),
    (
        "mremap-resize",
        include_str!("../../../tests/litmus/mremap-resize.litmus"),
        &["basic", "mremap"],
    ),
    (
        "mremap-fixed",
        include_str!("../../../tests/litmus/mremap-fixed.litmus"),
        &["mremap"],
    ),
    (
        "mremap-pinned",
        include_str!("../../../tests/litmus/mremap-pinned.litmus"),
        &["mremap"],
    ),
    (
        "mremap-stale-tlb",
        include_str!("../../../tests/litmus/mremap-stale-tlb.litmus"),
        &["mremap"],
    ),
    (
        "fork-vma-lock",
        include_str!("../../../tests/litmus/fork-vma-lock.litmus"),
        &["seeds"],
    ),
    (
        "uffd-wp-handler",
        include_str!("../../../tests/litmus/uffd-wp-handler.litmus"),
        &["basic"],
    ),
    (
        "cow-fork-mprotect",
        include_str!("../../../tests/litmus/cow-fork-mprotect.litmus"),
        &["cow"],
    ),
    (
        "cow-vmsplice-unmap-mprotect",
        include_str!("../../../tests/litmus/cow-vmsplice-unmap-mprotect.litmus"),
        &["cow"],
    ),
    (
        "cow-vmsplice-before-fork",
        include_str!("../../../tests/litmus/cow-vmsplice-before-fork.litmus"),
        &["cow"],
    ),
    (
        "cow-vmsplice-parent-unmap",
        include_str!("../../../tests/litmus/cow-vmsplice-parent-unmap.litmus"),
        &["cow"],
    ),
    (
        "cow-iouring-ro-mapping",
        include_str!("../../../tests/litmus/cow-iouring-ro-mapping.litmus"),
        &["cow"],
    ),
    (
        "cow-iouring-fork",
        include_str!("../../../tests/litmus/cow-iouring-fork.litmus"),
        &["cow"],
    ),
    (
        "cow-ro-pin-shared",
        include_str!("../../../tests/litmus/cow-ro-pin-shared.litmus"),
        &["cow"],
    ),
    (
        "cow-ro-pin-previously-shared",
        include_str!("../../../tests/litmus/cow-ro-pin-previously-shared.litmus"),
        &["cow"],
    ),
    (
        "cow-ro-pin-exclusive",
        include_str!("../../../tests/litmus/cow-ro-pin-exclusive.litmus"),
        &["cow"],
    ),
    (
        "cow-swap-fork-basic",
        include_str!("../../../tests/litmus/cow-swap-fork-basic.litmus"),
        &["cow", "swap"],
    ),
    (
        "cow-swap-fork-mprotect",
        include_str!("../../../tests/litmus/cow-swap-fork-mprotect.litmus"),
        &["cow", "swap"],
    ),
    (
        "cow-swap-vmsplice-unmap",
        include_str!("../../../tests/litmus/cow-swap-vmsplice-unmap.litmus"),
        &["cow", "swap"],
    ),
    (
        "cow-swap-vmsplice-unmap-mprotect",
        include_str!("../../../tests/litmus/cow-swap-vmsplice-unmap-mprotect.litmus"),
        &["cow", "swap"],
    ),
    (
        "cow-swap-vmsplice-before-fork",
        include_str!("../../../tests/litmus/cow-swap-vmsplice-before-fork.litmus"),
        &["cow", "swap"],
    ),
    (
        "cow-swap-vmsplice-parent-unmap",
        include_str!("../../../tests/litmus/cow-swap-vmsplice-parent-unmap.litmus"),
        &["cow", "swap"],
    ),
    (
        "cow-swap-iouring-ro-mapping",
        include_str!("../../../tests/litmus/cow-swap-iouring-ro-mapping.litmus"),
        &["cow", "swap"],
    ),
    (
        "cow-swap-iouring-fork",
        include_str!("../../../tests/litmus/cow-swap-iouring-fork.litmus"),
        &["cow", "swap"],
    ),
    (
        "cow-swap-ro-pin-shared",
        include_str!("../../../tests/litmus/cow-swap-ro-pin-shared.litmus"),
        &["cow", "swap"],
    ),
    (
        "cow-swap-ro-pin-previously-shared",
        include_str!("../../../tests/litmus/cow-swap-ro-pin-previously-shared.litmus"),
        &["cow", "swap"],
    ),
    (
        "cow-swap-ro-pin-exclusive",
        include_str!("../../../tests/litmus/cow-swap-ro-pin-exclusive.litmus"),
        &["cow", "swap"],
    ),
    (
        "cow-ro-fast-pin-shared",
        include_str!("../../../tests/litmus/cow-ro-fast-pin-shared.litmus"),
        &["cow"],
    ),
    (
        "cow-ro-fast-pin-previously-shared",
        include_str!("../../../tests/litmus/cow-ro-fast-pin-previously-shared.litmus"),
        &["cow"],
    ),
    (
        "cow-ro-fast-pin-exclusive",
        include_str!("../../../tests/litmus/cow-ro-fast-pin-exclusive.litmus"),
        &["cow"],
    ),
    (
        "cow-swap-ro-fast-pin-shared",
        include_str!("../../../tests/litmus/cow-swap-ro-fast-pin-shared.litmus"),
        &["cow", "swap"],
    ),
    (
        "cow-swap-ro-fast-pin-previously-shared",
        include_str!("../../../tests/litmus/cow-swap-ro-fast-pin-previously-shared.litmus"),
        &["cow", "swap"],
    ),
    (
        "cow-swap-ro-fast-pin-exclusive",
        include_str!("../../../tests/litmus/cow-swap-ro-fast-pin-exclusive.litmus"),
        &["cow", "swap"],
    ),
    (
        "fork-vma-lock-free",
        include_str!("../../../tests/litmus/fork-vma-lock-free.litmus"),
        &["seeds"],
    ),
    (
        "uffd-wp-cow-copy",
        include_str!("../../../tests/litmus/uffd-wp-cow-copy.litmus"),
        &["seeds"],
    ),
    (
        "uffd-wp-cow-copy-free",
        include_str!("../../../tests/litmus/uffd-wp-cow-copy-free.litmus"),
        &["seeds"],
    ),
    (
        "fork-pinned-tearing",
        include_str!("../../../tests/litmus/fork-pinned-tearing.litmus"),
        &["seeds"],
    ),
    (
        "fork-pinned-tearing-free",
        include_str!("../../../tests/litmus/fork-pinned-tearing-free.litmus"),
        &["seeds"],
    ),
    (
        "gup-read-wrong-side",
        include_str!("../../../tests/litmus/gup-read-wrong-side.litmus"),
        &["seeds"],
    ),
    (
        "gup-read-wrong-side-free",
        include_str!("../../../tests/litmus/gup-read-wrong-side-free.litmus"),
        &["seeds"],
    ),
    (
        "wp-copy-reuse-aba",
        include_str!("../../../tests/litmus/wp-copy-reuse-aba.litmus"),
        &["seeds"],
    ),
    (
        "wp-copy-reuse-aba-free",
        include_str!("../../../tests/litmus/wp-copy-reuse-aba-free.litmus"),
        &["seeds"],
    ),
    (
        "gup-fast-fork",
        include_str!("../../../tests/litmus/gup-fast-fork.litmus"),
        &["seeds"],
    ),
    (
        "fork-vma-lock-bare",
        include_str!("../../../tests/litmus/fork-vma-lock-bare.litmus"),
        &["bare"],
    ),
    (
        "uffd-wp-cow-copy-bare",
        include_str!("../../../tests/litmus/uffd-wp-cow-copy-bare.litmus"),
        &["bare"],
    ),
    (
        "fork-pinned-tearing-bare",
        include_str!("../../../tests/litmus/fork-pinned-tearing-bare.litmus"),
        &["bare"],
    ),
    (
        "gup-read-wrong-side-bare",
        include_str!("../../../tests/litmus/gup-read-wrong-side-bare.litmus"),
        &["bare"],
    ),
    (
        "gup-fast-fork-bare",
        include_str!("../../../tests/litmus/gup-fast-fork-bare.litmus"),
        &["bare"],
    ),
    (
        "wp-copy-reuse-aba-bare",
        include_str!("../../../tests/litmus/wp-copy-reuse-aba-bare.litmus"),
        &["bare"],
    ),
];

/// The source of built-in test `name`.
pub fn source(name: &str) -> Option<&'static str> {
    TESTS.iter().find(|t| t.0 == name).map(|t| t.1)
}

/// The tests of suite `suite` ("all" for every one).
pub fn suite(suite: &str) -> Vec<(&'static str, &'static str)> {
    TESTS
        .iter()
        .filter(|t| suite == "all" || t.2.contains(&suite))
        .map(|t| (t.0, t.1))
        .collect()
}

/// Every suite name.
pub fn suites() -> Vec<&'static str> {
    let mut s: Vec<&str> = TESTS.iter().flat_map(|t| t.2.iter().copied()).collect();
    s.push("all");
    s.sort();
    s.dedup();
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_builtin_parses_and_compiles() {
        for (name, src, _) in super::TESTS {
            let c = crate::litmus::load(src).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(&c.test.name, name, "the file's header names the test");
        }
    }
}
