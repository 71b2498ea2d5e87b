//! What a native run cannot honour: the checks made before any process
//! starts, each with the reason the user reads (docs/native.md, "What is
//! refused").

use crate::litmus::ast::{Advice, PinFlags, Stmt, StmtKind, Test};

/// What a test that can run natively needs of the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// `madvise … pageout`: swap, for anonymous pages to go anywhere.
    pub swap: bool,
}

/// Whether `test` can run on the host kernel, and what it needs; else the
/// reason it cannot.
pub fn check(test: &Test) -> Result<Needs, String> {
    if test.schedule.is_some() {
        return Err("it has a schedule: the host kernel cannot be made to stop \
                    its threads at cowlab's points in a given order (run it \
                    free with `--schedule none` in the model, or use its \
                    -free/-bare variant)"
            .into());
    }
    if let Some((rule, pos)) = test.injects.first() {
        return Err(format!(
            "it injects `{rule}` (line {}): the host kernel has no cowlab \
             injection points",
            pos.line
        ));
    }
    let mut needs = Needs::default();
    for t in &test.threads {
        walk(&t.body, &mut needs)?;
    }
    Ok(needs)
}

fn walk(body: &[Stmt], needs: &mut Needs) -> Result<(), String> {
    for s in body {
        match &s.kind {
            StmtKind::Loop { body, .. } | StmtKind::LoopUntil { body, .. } => walk(body, needs)?,
            StmtKind::Pin { flags, .. } => {
                pin_way(*flags).map_err(|why| format!("line {}: {why}", s.pos.line))?;
            }
            StmtKind::Madvise {
                advice: Advice::PageOut,
                ..
            } => needs.swap = true,
            _ => {}
        }
    }
    Ok(())
}

/// How the host takes a pin or reference with `flags`, or why it cannot
/// from user space.
pub fn pin_way(flags: PinFlags) -> Result<&'static str, String> {
    let name = || {
        let mut s = String::from(if flags.get { "get" } else { "pin" });
        if flags.write {
            s += " write";
        }
        if flags.longterm {
            s += " longterm";
        }
        s
    };
    let gup_test = "the kernel offers it to user space only through \
                    gup_test (CONFIG_GUP_TEST, /sys/kernel/debug/gup_test), \
                    which cowlab does not drive";
    match (flags.get, flags.write, flags.longterm) {
        (true, false, _) => Ok("vmsplice"),
        (false, true, true) => Ok("io_uring"),
        (true, true, _) => Err(format!(
            "`{}` (FOLL_GET | FOLL_WRITE): no system call takes a writable \
             reference of a user page and hands it back; {gup_test}",
            name()
        )),
        (false, false, true) => Err(format!(
            "`{}` (a R/O FOLL_PIN | FOLL_LONGTERM pin): io_uring and every \
             other user-space pinner pins writable; {gup_test}",
            name()
        )),
        (false, _, false) => Err(format!(
            "`{}` (a short-term FOLL_PIN held across statements): O_DIRECT \
             pins only for the length of one I/O; {gup_test}",
            name()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::litmus::builtin;

    fn check_builtin(name: &str) -> Result<Needs, String> {
        let src = builtin::source(name).unwrap_or_else(|| panic!("{name}"));
        check(&crate::litmus::parse(src).unwrap_or_else(|e| panic!("{name}: {e}")))
    }

    #[test]
    fn schedules_injections_and_pins_without_a_user_interface_are_refused() {
        for (name, why) in [
            ("fork-vma-lock", "it has a schedule"),
            ("gup-read-wrong-side-free", "it injects"),
            ("cow-ro-pin-exclusive", "R/O FOLL_PIN | FOLL_LONGTERM"),
            ("fork-pinned-tearing-bare", "short-term FOLL_PIN"),
        ] {
            let e = check_builtin(name).expect_err(name);
            assert!(e.contains(why), "{name}: {e}");
        }
    }

    #[test]
    fn plain_tests_hooks_gets_and_io_uring_pins_run() {
        for name in [
            "cow-fork-basic",
            "cow-vmsplice-unmap",
            "cow-iouring-fork",
            "uffd-wp-handler",
            "gup-read-wrong-side-bare",
            "wp-copy-reuse-aba-bare",
        ] {
            assert_eq!(check_builtin(name), Ok(Needs::default()), "{name}");
        }
    }

    #[test]
    fn pageout_needs_swap() {
        let t = crate::litmus::parse(
            "cowlab t\n{ region buf 1 rw }\nP0 {\n  loop 2 { madvise buf 1 pageout }\n}\nexists (P0:ok)\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(check(&t), Ok(Needs { swap: true }));
    }

    #[test]
    fn every_pin_kind_has_a_way_or_a_reason() {
        for get in [false, true] {
            for write in [false, true] {
                for (longterm, fast) in [(false, false), (true, false), (false, true), (true, true)]
                {
                    let f = PinFlags {
                        get,
                        write,
                        longterm,
                        fast,
                    };
                    match pin_way(f) {
                        Ok(way) => assert!(
                            (get && !write) || (!get && write && longterm),
                            "{f:?}: {way}"
                        ),
                        Err(why) => assert!(why.contains("gup_test"), "{f:?}: {why}"),
                    }
                }
            }
        }
    }
}
