//! The run's process: a tree-walking interpreter of the litmus AST on the
//! host kernel. `cowlab __native-run` (started by [`super::runner`], in a
//! process group of its own) maps the test's regions at the addresses the
//! compiler placed them at, starts the `P` blocks as threads, and each
//! statement becomes the system call docs/native.md names. Threads
//! publish how they ended in the shared results area; a SIGSEGV ends only
//! the faulting thread (`sys::install_segv_handler`).

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use cowlab_abi::bytecode::NR_REGS;

use super::shared::{self, Area};
use super::sys::{self, AreaMap, FixedBuffer, Refused, SplicedPage, PAGE_SIZE};
use crate::litmus::ast::*;

type Regs = [u64; NR_REGS];

/// What the run's threads share, read-only once the run starts.
struct Ctx {
    test: Test,
    map: &'static AreaMap,
    /// Region name → (address, pages).
    regions: BTreeMap<String, (u64, u64)>,
    events: BTreeMap<String, usize>,
    blocks: BTreeMap<String, usize>,
}

impl Ctx {
    fn area(&self) -> &Area {
        self.map.area()
    }
}

static CTX: OnceLock<Ctx> = OnceLock::new();
/// The `P` threads wait for this, so they start together.
static GO: AtomicBool = AtomicBool::new(false);

/// A pin or reference a thread took (`pin`, `get`).
enum Handle {
    Spliced(SplicedPage),
    Fixed(Box<FixedBuffer>),
}

/// What one process owns: its userfaultfd and its handles. Its lock is
/// held across `fork`, so a child never inherits it locked by a thread it
/// does not have.
struct Proc {
    pid: i32,
    uffd: Option<OwnedFd>,
    handles: Vec<Option<Handle>>,
}

static PROC: Mutex<Proc> = Mutex::new(Proc {
    pid: 0,
    uffd: None,
    handles: Vec::new(),
});

fn proc_state() -> MutexGuard<'static, Proc> {
    let mut p = PROC.lock().unwrap_or_else(|e| e.into_inner());
    let pid = sys::getpid();
    if p.pid != pid {
        // A forked child: the userfaultfd belongs to the parent's mm.
        p.pid = pid;
        p.uffd = None;
    }
    p
}

fn neg(errno: i32) -> u64 {
    (-(errno as i64)) as u64
}

/// `cowlab __native-run`: one run of the test whose source and results
/// area are on stdin. Never returns; the exit status only says whether
/// the run could start (the area says the rest).
pub fn run_process() -> ! {
    let map = match AreaMap::map(0) {
        Ok(m) => m.leak(),
        Err(e) => {
            eprintln!("cowlab __native-run: stdin is not a results area: {e}");
            sys::exit_process(3)
        }
    };
    let area = map.area();
    if area.magic.load(Ordering::Acquire) != shared::MAGIC {
        eprintln!("cowlab __native-run: stdin is not a results area");
        sys::exit_process(3)
    }
    if let Err(e) = setup(map) {
        area.error.set(&e);
        sys::exit_process(3)
    }
    let Some(ctx) = CTX.get() else {
        sys::exit_process(3)
    };
    let pid = sys::getpid();
    proc_state().pid = pid;
    for (block, t) in ctx.test.threads.iter().enumerate() {
        if !t.name.starts_with('P') {
            continue;
        }
        let Some(slot) = area.alloc(block, pid) else {
            area.error.set("too many threads");
            sys::exit_process(3)
        };
        let started = std::thread::Builder::new()
            .name(t.name.clone())
            .spawn(move || {
                while !GO.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                run_thread(ctx, slot, block, [0; NR_REGS]);
            });
        if let Err(e) = started {
            area.error
                .set(&format!("cannot start thread {}: {e}", t.name));
            sys::exit_process(3)
        }
    }
    GO.store(true, Ordering::Release);
    while !area.all_done(None) {
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    sys::exit_process(0)
}

/// Parses the source, maps the regions, installs the SIGSEGV handler.
fn setup(map: &'static AreaMap) -> Result<(), String> {
    let area = map.area();
    let len = area.src_len.load(Ordering::Acquire) as usize;
    let src = map
        .tail()
        .get(..len)
        .ok_or("the source does not fit the results area")?;
    let src = std::str::from_utf8(src).map_err(|e| format!("the source is not UTF-8: {e}"))?;
    let compiled = crate::litmus::load(src).map_err(|e| format!("the test: {e}"))?;
    let test = compiled.test;
    if let Err(why) = super::refuse::check(&test) {
        return Err(format!("refused: {why}"));
    }
    let mut regions = BTreeMap::new();
    for r in &compiled.regions {
        let flags = libc::MAP_FIXED_NOREPLACE | if r.populate { libc::MAP_POPULATE } else { 0 };
        let len = r.pages * PAGE_SIZE;
        let got = sys::mmap_anon(r.addr, len, r.prot.bits(), flags).map_err(|e| {
            format!(
                "cannot map region {} at {:#x}: errno {}",
                r.name,
                r.addr,
                -(e as i64)
            )
        })?;
        if got != r.addr {
            return Err(format!(
                "region {} landed at {got:#x}, not {:#x}",
                r.name, r.addr
            ));
        }
        regions.insert(r.name.clone(), (r.addr, r.pages));
    }
    let mut events = BTreeMap::new();
    for t in &test.threads {
        collect_events(&t.body, &mut events);
    }
    if events.len() > shared::MAX_EVENTS {
        return Err(format!("more than {} events", shared::MAX_EVENTS));
    }
    let blocks = test
        .threads
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    sys::install_segv_handler().map_err(|e| format!("cannot handle SIGSEGV: {e}"))?;
    CTX.set(Ctx {
        test,
        map,
        regions,
        events,
        blocks,
    })
    .map_err(|_| "set up twice".to_string())
}

fn collect_events(body: &[Stmt], events: &mut BTreeMap<String, usize>) {
    for s in body {
        match &s.kind {
            StmtKind::Signal(e) | StmtKind::Await(e) => {
                let n = events.len();
                events.entry(e.clone()).or_insert(n);
            }
            StmtKind::LoopUntil { event, body } => {
                let n = events.len();
                events.entry(event.clone()).or_insert(n);
                collect_events(body, events);
            }
            StmtKind::Loop { body, .. } => collect_events(body, events),
            _ => {}
        }
    }
}

/// How a block's statements went on.
enum Flow {
    Next,
    /// `exit N`.
    Exit(u64),
}

/// One thread: its registers and the children it forked, by block.
struct Thread {
    regs: Regs,
    children: BTreeMap<String, u64>,
}

/// Runs block `block` in slot `slot` and publishes how it ended.
fn run_thread(ctx: &'static Ctx, slot: usize, block: usize, regs: Regs) {
    let s = &ctx.area().slots[slot];
    sys::set_segv_target(sys::SegvTarget {
        state: &s.state,
        status: &s.status,
    });
    let mut t = Thread {
        regs,
        children: BTreeMap::new(),
    };
    let body = &ctx.test.threads[block].body;
    let flow = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| exec(ctx, body, &mut t)));
    let code = match flow {
        Ok(Flow::Next) => 0,
        Ok(Flow::Exit(n)) => n,
        Err(_) => {
            // A bug of cowlab's, not an outcome of the test: the run is
            // in error (the panic message is on stderr).
            ctx.area().error.set("a native test thread panicked");
            s.status.store(shared::CRASHED, Ordering::Relaxed);
            s.state.store(shared::DONE, Ordering::Release);
            return;
        }
    };
    for (w, v) in s.regs.iter().zip(t.regs) {
        w.store(v, Ordering::Relaxed);
    }
    s.code.store(code, Ordering::Relaxed);
    s.status.store(shared::OK, Ordering::Relaxed);
    s.state.store(shared::DONE, Ordering::Release);
}

/// Waits a moment in a spin-wait: a spin, then the CPU to others (the
/// host may have fewer CPUs than the test has threads).
fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

fn operand(ctx: &Ctx, t: &Thread, o: &Operand) -> u64 {
    match o {
        Operand::Reg(r) => t.regs[*r as usize],
        Operand::Imm(v) => *v,
        Operand::Region(name, _) => ctx.regions.get(name).map_or(0, |r| r.0),
    }
}

fn address(ctx: &Ctx, t: &Thread, m: &Mem) -> u64 {
    match m {
        Mem::Region { name, index, .. } => {
            let base = ctx.regions.get(name).map_or(0, |r| r.0);
            base.wrapping_add(operand(ctx, t, index).wrapping_mul(8))
        }
        Mem::Deref { reg, offset } => t.regs[*reg as usize].wrapping_add(*offset),
    }
}

fn region(ctx: &Ctx, name: &str) -> (u64, u64) {
    ctx.regions.get(name).copied().unwrap_or((0, 0))
}

fn binop(op: BinOp, l: u64, r: u64) -> u64 {
    match op {
        BinOp::Add => l.wrapping_add(r),
        BinOp::Sub => l.wrapping_sub(r),
        BinOp::Mul => l.wrapping_mul(r),
        BinOp::Div => l.checked_div(r).unwrap_or(0),
        BinOp::Rem => l.checked_rem(r).unwrap_or(0),
        BinOp::And => l & r,
        BinOp::Or => l | r,
        BinOp::Xor => l ^ r,
        BinOp::Eq => u64::from(l == r),
        BinOp::Ne => u64::from(l != r),
        BinOp::Lt => u64::from(l < r),
    }
}

fn set(t: &mut Thread, dst: Option<u8>, v: u64) {
    if let Some(d) = dst {
        t.regs[d as usize] = v;
    }
}

fn exec(ctx: &'static Ctx, body: &[Stmt], t: &mut Thread) -> Flow {
    for s in body {
        if let Flow::Exit(n) = stmt(ctx, s, t) {
            return Flow::Exit(n);
        }
    }
    Flow::Next
}

fn stmt(ctx: &'static Ctx, s: &Stmt, t: &mut Thread) -> Flow {
    let area = ctx.area();
    match &s.kind {
        StmtKind::Assign { dst, expr } => {
            let v = match expr {
                Expr::Operand(o) => operand(ctx, t, o),
                Expr::Binary(l, op, r) => binop(*op, operand(ctx, t, l), operand(ctx, t, r)),
                Expr::Load(m) => sys::load(address(ctx, t, m)),
            };
            t.regs[*dst as usize] = v;
        }
        StmtKind::Store { mem, value } => {
            let v = operand(ctx, t, value);
            sys::store(address(ctx, t, mem), v);
        }
        StmtKind::Loop { count, body } => {
            for _ in 0..*count {
                if let Flow::Exit(n) = exec(ctx, body, t) {
                    return Flow::Exit(n);
                }
            }
        }
        StmtKind::LoopUntil { event, body } => {
            let ev = &area.events[ctx.events[event]];
            while ev.load(Ordering::Acquire) == 0 {
                if let Flow::Exit(n) = exec(ctx, body, t) {
                    return Flow::Exit(n);
                }
            }
        }
        StmtKind::Signal(e) => area.events[ctx.events[e]].store(1, Ordering::Release),
        StmtKind::Await(e) => {
            let ev = &area.events[ctx.events[e]];
            let mut spins = 0;
            while ev.load(Ordering::Acquire) == 0 {
                backoff(&mut spins);
            }
        }
        StmtKind::Fill { region: r, value } => {
            let v = operand(ctx, t, value);
            let (base, pages) = region(ctx, r);
            for w in 0..pages * PAGE_SIZE / 8 {
                sys::store(base + w * 8, v);
            }
        }
        StmtKind::Compare {
            dst,
            region: r,
            value,
        } => {
            let v = operand(ctx, t, value);
            let (base, pages) = region(ctx, r);
            let all = (0..pages * PAGE_SIZE / 8).all(|w| sys::load(base + w * 8) == v);
            t.regs[*dst as usize] = u64::from(all);
        }
        StmtKind::Mmap { dst, pages, prot } => {
            let r = sys::mmap_anon(0, pages.saturating_mul(PAGE_SIZE), prot.bits(), 0);
            t.regs[*dst as usize] = r.unwrap_or_else(|e| e);
        }
        StmtKind::Munmap { addr, pages } => {
            sys::munmap(operand(ctx, t, addr), pages.saturating_mul(PAGE_SIZE));
        }
        StmtKind::Mprotect { addr, pages, prot } => {
            sys::mprotect(
                operand(ctx, t, addr),
                pages.saturating_mul(PAGE_SIZE),
                prot.bits(),
            );
        }
        StmtKind::Madvise {
            addr,
            pages,
            advice,
        } => madvise(ctx, operand(ctx, t, addr), *pages, *advice),
        StmtKind::Mremap {
            dst,
            addr,
            old_pages,
            new_pages,
            maymove,
            fixed,
            dontunmap,
        } => {
            let mut flags = 0;
            for (on, bit) in [
                (*maymove, libc::MREMAP_MAYMOVE),
                (fixed.is_some(), libc::MREMAP_FIXED),
                (*dontunmap, libc::MREMAP_DONTUNMAP),
            ] {
                if on {
                    flags |= bit;
                }
            }
            let new_addr = fixed.as_ref().map_or(0, |b| operand(ctx, t, b));
            t.regs[*dst as usize] = sys::mremap(
                operand(ctx, t, addr),
                old_pages.saturating_mul(PAGE_SIZE),
                new_pages.saturating_mul(PAGE_SIZE),
                flags,
                new_addr,
            );
        }
        StmtKind::Fork { dst, child } => fork(ctx, t, *dst, child),
        StmtKind::Wait { dst, target } => {
            let h = match target {
                WaitTarget::Reg(r) => t.regs[*r as usize],
                WaitTarget::Child(c) => t.children.get(c).copied().unwrap_or(0),
            };
            let v = wait(area, h);
            set(t, *dst, v);
        }
        StmtKind::Exit(n) => return Flow::Exit(*n),
        StmtKind::Spawn { dst, thread } => {
            let v = spawn(ctx, thread);
            set(t, *dst, v);
        }
        StmtKind::Pin { dst, addr, flags } => {
            let page = operand(ctx, t, addr) & !(PAGE_SIZE - 1);
            let taken = if flags.get {
                SplicedPage::new(page).map(Handle::Spliced)
            } else {
                FixedBuffer::new(page).map(|f| Handle::Fixed(Box::new(f)))
            };
            t.regs[*dst as usize] = match taken {
                Ok(h) => {
                    let mut p = proc_state();
                    p.handles.push(Some(h));
                    p.handles.len() as u64
                }
                Err(Refused::Errno(e)) => e,
                Err(Refused::Unavailable(why)) => {
                    area.error.set(&why);
                    u64::MAX
                }
            };
        }
        StmtKind::Unpin(r) => {
            let h = t.regs[*r as usize];
            let taken = {
                let mut p = proc_state();
                (h as usize)
                    .checked_sub(1)
                    .and_then(|i| p.handles.get_mut(i))
                    .and_then(Option::take)
            };
            drop(taken);
        }
        StmtKind::DmaRead { dst, pin, offset } => {
            let h = t.regs[*pin as usize];
            let v = with_handle(h, |handle| match handle {
                Handle::Spliced(s) => s.read_word(*offset),
                Handle::Fixed(f) => f.read_word(*offset),
            });
            t.regs[*dst as usize] = v.unwrap_or(u64::MAX);
        }
        StmtKind::DmaWrite { pin, offset, value } => {
            let h = t.regs[*pin as usize];
            let v = operand(ctx, t, value);
            let _ = with_handle(h, |handle| match handle {
                Handle::Spliced(_) => neg(libc::EPERM),
                Handle::Fixed(f) => f.write_word(*offset, v),
            });
        }
        StmtKind::UffdRegister { addr, pages } => {
            let a = operand(ctx, t, addr);
            let mut p = proc_state();
            if p.uffd.is_none() {
                match sys::userfaultfd() {
                    Ok(fd) => p.uffd = Some(fd),
                    Err(Refused::Unavailable(why)) => area.error.set(&why),
                    Err(Refused::Errno(_)) => {}
                }
            }
            if let Some(fd) = &p.uffd {
                sys::uffd_register(fd.as_raw_fd(), a, pages.saturating_mul(PAGE_SIZE));
            }
        }
        StmtKind::UffdWp { addr, pages, on } => {
            let a = operand(ctx, t, addr);
            if let Some(fd) = uffd() {
                sys::uffd_writeprotect(fd, a, pages.saturating_mul(PAGE_SIZE), *on);
            }
        }
        StmtKind::UffdResolve { dst } => {
            let page = match uffd() {
                Some(fd) => match sys::uffd_read_fault(fd) {
                    Ok(addr) => {
                        let page = addr & !(PAGE_SIZE - 1);
                        sys::uffd_writeprotect(fd, page, PAGE_SIZE, false);
                        page
                    }
                    Err(e) => e,
                },
                None => neg(libc::EINVAL),
            };
            set(t, *dst, page);
        }
        // Without a schedule or an injection rule, a hook point is where
        // nothing happens, in the model as here.
        StmtKind::Hook(_) => {}
        StmtKind::Pause(n) => {
            for _ in 0..*n {
                std::hint::spin_loop();
            }
        }
    }
    Flow::Next
}

/// This process's userfaultfd, if it has one. The descriptor stays open:
/// only `uffd_register` (under the lock) creates it, and nothing closes
/// it while the process lives.
fn uffd() -> Option<i32> {
    proc_state().uffd.as_ref().map(|fd| fd.as_raw_fd())
}

/// Runs `f` on handle `h` of this process; `None` if there is none.
fn with_handle(h: u64, f: impl FnOnce(&mut Handle) -> u64) -> Option<u64> {
    let mut p = proc_state();
    let i = (h as usize).checked_sub(1)?;
    p.handles.get_mut(i)?.as_mut().map(f)
}

fn madvise(ctx: &Ctx, addr: u64, pages: u64, advice: Advice) {
    let len = pages.saturating_mul(PAGE_SIZE);
    let code = match advice {
        Advice::DontNeed => libc::MADV_DONTNEED,
        Advice::PageOut => libc::MADV_PAGEOUT,
        Advice::DontFork => libc::MADV_DONTFORK,
        Advice::DoFork => libc::MADV_DOFORK,
    };
    if advice != Advice::PageOut {
        sys::madvise(addr, len, code);
        return;
    }
    // cow.c's check: a page present before MADV_PAGEOUT must be a swap
    // entry after it, or the run did not do what the test says.
    let before = sys::pagemap(addr, pages).unwrap_or_default();
    let r = sys::madvise(addr, len, code);
    let after = sys::pagemap(addr, pages).unwrap_or_default();
    if r != 0 {
        ctx.area()
            .not_run
            .set(&format!("MADV_PAGEOUT failed (errno {})", -(r as i64)));
        return;
    }
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        if b & sys::PM_PRESENT != 0 && a & sys::PM_SWAP == 0 {
            ctx.area().not_run.set(&format!(
                "MADV_PAGEOUT did not work: page {i} at {:#x} is not swapped out (/proc/self/pagemap)",
                addr + i as u64 * PAGE_SIZE
            ));
            return;
        }
    }
}

fn fork(ctx: &'static Ctx, t: &mut Thread, dst: Option<u8>, child: &str) {
    let area = ctx.area();
    let block = ctx.blocks[child];
    let Some(slot) = area.alloc(block, -1) else {
        set(t, dst, neg(libc::EAGAIN));
        return;
    };
    let s = &area.slots[slot];
    s.forked.store(1, Ordering::Relaxed);
    let guard = proc_state();
    match sys::fork() {
        Ok(0) => {
            drop(guard);
            let pid = sys::getpid();
            s.pid.store(pid, Ordering::Release);
            let mut regs = t.regs;
            if let Some(d) = dst {
                regs[d as usize] = 0;
            }
            run_thread(ctx, slot, block, regs);
            let mut spins = 0;
            while !area.all_done(Some(pid)) {
                backoff(&mut spins);
            }
            sys::exit_process(0)
        }
        Ok(pid) => {
            drop(guard);
            s.pid.store(pid, Ordering::Release);
            let h = slot as u64 + 1;
            t.children.insert(child.to_string(), h);
            set(t, dst, h);
        }
        Err(e) => {
            drop(guard);
            s.state.store(shared::NEVER, Ordering::Release);
            set(t, dst, e);
        }
    }
}

fn spawn(ctx: &'static Ctx, thread: &str) -> u64 {
    let area = ctx.area();
    let block = ctx.blocks[thread];
    let Some(slot) = area.alloc(block, sys::getpid()) else {
        return neg(libc::EAGAIN);
    };
    let started = std::thread::Builder::new()
        .name(thread.to_string())
        .spawn(move || run_thread(ctx, slot, block, [0; NR_REGS]));
    match started {
        Ok(_) => slot as u64 + 1,
        Err(_) => {
            area.slots[slot]
                .state
                .store(shared::NEVER, Ordering::Release);
            neg(libc::EAGAIN)
        }
    }
}

/// `wait`: until thread or child `h` ends (a child: until its process is
/// reaped, its memory gone); its exit status, or 2^64-1 if it did not
/// exit normally.
fn wait(area: &Area, h: u64) -> u64 {
    let Some(i) = (h as usize).checked_sub(1).filter(|i| *i < area.used()) else {
        return u64::MAX;
    };
    let s = &area.slots[i];
    let mut spins = 0;
    if s.forked.load(Ordering::Acquire) == 1 {
        let mut pid = s.pid.load(Ordering::Acquire);
        while pid <= 0 && s.state.load(Ordering::Acquire) == shared::RUNNING {
            backoff(&mut spins);
            pid = s.pid.load(Ordering::Acquire);
        }
        if pid > 0 {
            sys::waitpid(pid);
        }
    }
    while s.state.load(Ordering::Acquire) == shared::RUNNING {
        backoff(&mut spins);
    }
    match (
        s.state.load(Ordering::Acquire),
        s.status.load(Ordering::Acquire),
    ) {
        (shared::DONE, shared::OK) => s.code.load(Ordering::Acquire),
        _ => u64::MAX,
    }
}
