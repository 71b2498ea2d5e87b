//! The vCPUs' OS threads as the kernel sees them: asleep or runnable, and
//! the CPU time each has used (`/proc/self/task/TID/{stat,schedstat}`).
//!
//! A schedule's deadlock and stall detection ([`Hooks::check_schedule`])
//! asks these rather than the clock alone. On a loaded host a vCPU that
//! was woken (its step came, the lock it waited for was released) can wait
//! a long time for a CPU: its note says "blocked" still, but the kernel
//! already counts it runnable. Taking it for blocked made a forced
//! schedule `unreachable` in about one run in a thousand with two CPU hogs
//! running (docs/reliability.md).
//!
//! [`Hooks::check_schedule`]: super::Hooks::check_schedule

use std::cell::Cell;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::time::Duration;

thread_local! {
    static TID: Cell<Option<u32>> = const { Cell::new(None) };
}

/// The calling thread's kernel id (from `/proc/thread-self`), if `/proc`
/// says.
pub(super) fn current_tid() -> Option<u32> {
    if let Some(t) = TID.with(Cell::get) {
        return Some(t);
    }
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    let tid = link.file_name()?.to_str()?.parse().ok()?;
    TID.with(|c| c.set(Some(tid)));
    Some(tid)
}

/// What the kernel says about a thread of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Sample {
    /// Sleeping (waiting on a futex, a condvar, I/O), not runnable: state
    /// `S` or `D`; an ended thread counts as asleep.
    pub asleep: bool,
    /// CPU time used so far (guest time included: a vCPU in KVM_RUN counts).
    pub cpu: Duration,
}

/// Open `stat` and `schedstat` files of the threads sampled lately: a
/// search samples every vCPU thread at each of its decisions, and opening,
/// sizing, reading and closing two files each time was most of its system
/// calls (69 540 `openat` in a 300-run search); a kept file is read again
/// from offset 0 with one `pread`.
static OPEN: Mutex<Vec<(u32, File, File)>> = Mutex::new(Vec::new());

/// How many threads' files are kept open.
const KEPT: usize = 64;

/// Reads all of a `/proc` file from its start into `buf`.
fn read_from_start(f: &File, buf: &mut [u8]) -> Option<usize> {
    match f.read_at(buf, 0) {
        Ok(n) if n > 0 && n < buf.len() => Some(n),
        _ => None,
    }
}

/// The kernel's view of thread `tid`; `None` if `/proc` cannot say (then
/// the caller falls back on its own notes).
pub(super) fn sample(tid: u32) -> Option<Sample> {
    let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    let (mut stat, mut sched) = ([0u8; 1024], [0u8; 256]);
    let mut read = |stat_f: &File, sched_f: &File| {
        Some((
            read_from_start(stat_f, &mut stat)?,
            read_from_start(sched_f, &mut sched)?,
        ))
    };
    // A kept file of a thread that ended reads nothing, even if a new
    // thread got its id since: then the files are opened again by path.
    let mut lens = None;
    if let Some(i) = open.iter().position(|(t, _, _)| *t == tid) {
        lens = read(&open[i].1, &open[i].2);
        if lens.is_none() {
            open.swap_remove(i);
        }
    }
    if lens.is_none() {
        let dir = format!("/proc/self/task/{tid}");
        let files = File::open(format!("{dir}/stat"))
            .and_then(|st| Ok((st, File::open(format!("{dir}/schedstat"))?)));
        let Ok((stat_f, sched_f)) = files else {
            // Gone: the thread ended.
            return Some(Sample {
                asleep: true,
                cpu: Duration::ZERO,
            });
        };
        lens = read(&stat_f, &sched_f);
        if open.len() >= KEPT {
            open.remove(0);
        }
        open.push((tid, stat_f, sched_f));
    }
    drop(open);
    let (n, m) = lens?;
    let stat = std::str::from_utf8(&stat[..n]).ok()?;
    // "TID (COMM) STATE …": COMM may hold spaces and parentheses.
    let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
    let asleep = matches!(state, "S" | "D" | "Z" | "X" | "I");
    let ns: u64 = std::str::from_utf8(&sched[..m])
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(Sample {
        asleep,
        cpu: Duration::from_nanos(ns),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_thread_waiting_on_a_channel_is_asleep_and_a_spinning_one_is_not() {
        let (tx, rx) = mpsc::channel::<()>();
        let (tid_tx, tid_rx) = mpsc::channel();
        let sleeper = std::thread::spawn(move || {
            tid_tx.send(current_tid()).unwrap();
            let _ = rx.recv();
        });
        let tid = tid_rx.recv().unwrap().expect("/proc/thread-self");
        // Asleep once it waits: poll with a deadline, it may not be yet.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !sample(tid).expect("a sample").asleep {
            assert!(std::time::Instant::now() < deadline, "never asleep");
            std::thread::yield_now();
        }
        drop(tx);
        sleeper.join().unwrap();
        // The calling thread is running: not asleep, and it has used CPU.
        let me = sample(current_tid().unwrap()).unwrap();
        assert!(!me.asleep);
        assert!(me.cpu > Duration::ZERO);
    }
}
