//! The compiler's unit tests: placement, names, what it refuses.

use crate::litmus::load;

const TWO: &str = "cowlab two\n{ region a 2 rw populate; region b 1 r }\n\
    P0 { hook go; a[0] = 1; fork C0 }\nP1 { hook go; r1 = b[0] }\nC0 { exit 0 }\n\
    exists (P1:r1 = 0)\nschedule { P1@guest:go < P0@wp_page_copy:after_copy[a] }\n";

#[test]
fn regions_are_placed_in_order_with_a_guard_page_between() {
    let c = load(TWO).unwrap();
    let r: Vec<_> = c
        .regions
        .iter()
        .map(|r| (&r.name[..], r.addr, r.pages))
        .collect();
    let base = super::REGION_BASE;
    assert_eq!(r, [("a", base, 2), ("b", base + 3 * 4096, 1)]);
    // The boot plan carries the same regions, and one pc per P thread.
    assert_eq!(c.plan.regions.len(), 2);
    assert_eq!(c.plan.regions[1].addr, base + 3 * 4096);
    assert_eq!(c.plan.threads.len(), 2);
    assert_eq!(c.plan.code, c.code);
}

#[test]
fn threads_hooks_and_schedule_steps_get_their_vcpus_and_pages() {
    let c = load(TWO).unwrap();
    // Initial threads by start pc, then the child.
    let names: Vec<_> = c.names.values().cloned().collect();
    assert!(["P0", "P1", "C0"]
        .iter()
        .all(|n| names.contains(&n.to_string())));
    assert_eq!(c.hooks, ["go"]);
    let steps: Vec<String> = c.schedule.iter().map(ToString::to_string).collect();
    let base = super::REGION_BASE;
    assert_eq!(
        steps,
        [
            "v1@guest:go".to_string(),
            format!(
                "v0@wp_page_copy:after_copy/addr={base:#x}-{:#x}",
                base + 2 * 4096
            ),
        ]
    );
}

#[test]
fn what_the_parser_cannot_see_is_refused_with_its_place() {
    let cases = [
        (
            "cowlab t\nP0 { r1 = q[0] }\nexists (true)\n",
            "unknown region",
        ),
        (
            "cowlab t\nP0 { fork C1 }\nexists (true)\n",
            "no block for thread 'C1'",
        ),
        (
            "cowlab t\nP0 { }\nexists (P3:r1 = 0)\n",
            "exists names thread P3",
        ),
        (
            "cowlab t\n{ region a 1 rw; region a 1 rw }\nP0 { }\nexists (true)\n",
            "region 'a' is defined twice",
        ),
        (
            "cowlab t\nP0 { }\nexists (true)\nschedule { C0@fork:enter < P0@fork:enter }\n",
            "name it by its vCPU",
        ),
    ];
    for (src, want) in cases {
        let e = load(src).unwrap_err();
        assert!(e.to_string().contains(want), "{src:?}: {e}");
    }
}

#[test]
fn mremap_packs_its_lengths_and_flags_and_keeps_both_addresses() {
    use cowlab_abi::bytecode::{mremap_imm, Op};
    use cowlab_abi::mremap::{FIXED, MAYMOVE};
    let c = load(
        "cowlab m\n{ region a 1 rw; region b 2 rw }\n\
         P0 { r1 = mremap a 1 2 maymove fixed b }\nexists (P0:r1 = 1)\n",
    )
    .unwrap();
    let at = c
        .code
        .iter()
        .position(|i| i.op() == Op::Mremap as u8)
        .unwrap();
    let insn = c.code[at];
    assert_eq!(mremap_imm::unpack(insn.imm), (1, 2, MAYMOVE | FIXED));
    assert_eq!(insn.b(), 1, "the result goes to r1");
    // a in the scratch register, b in another, both loaded just before.
    let loaded: Vec<_> = c.code[at - 2..at].iter().map(|i| (i.a(), i.imm)).collect();
    let base = super::REGION_BASE;
    assert!(loaded.contains(&(insn.a(), base)), "{loaded:?}");
    assert!(loaded.contains(&(insn.c(), base + 2 * 4096)), "{loaded:?}");
    assert_ne!(insn.a(), insn.c());
    let e = load(
        "cowlab m\n{ region a 1 rw }\nP0 { r1 = mremap a 1 2000000000 }\nexists (P0:r1 = 1)\n",
    )
    .unwrap_err();
    assert!(e.to_string().contains("mremap takes at most"), "{e}");
}
