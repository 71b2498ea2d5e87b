//! A child process that a failing test cannot leave behind: killed and
//! reaped when its guard is dropped (a panic unwinds through the drop), and
//! waited for only within a deadline.

use std::io::Read;
use std::process::{Child, Output};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Owns a running child; kills it on drop unless it was waited for.
pub struct Running {
    child: Option<Child>,
    what: String,
}

impl Running {
    /// Guards `child`; `what` names it in panics.
    pub fn new(child: Child, what: impl Into<String>) -> Running {
        Running {
            child: Some(child),
            what: what.into(),
        }
    }

    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("not waited for yet")
    }

    /// Waits for the child to end within `limit` and returns its output
    /// (an output not piped reads as empty). Waits on its output closing
    /// (not by polling), then for its exit; still running at `limit`, it is
    /// killed and the test fails.
    pub fn output_within(self, limit: Duration) -> Output {
        let what = self.what.clone();
        self.try_output_within(limit)
            .unwrap_or_else(|| panic!("{what} still running after {limit:?}: killed"))
    }

    /// [`Running::output_within`] for a caller that counts hangs rather
    /// than failing on the first, and for outputs that are not all piped
    /// (one not piped reads as empty): `None` if the child was still
    /// running after `limit` (it is then killed and reaped). Waits on the
    /// piped outputs closing; then (or with none piped) on the exit,
    /// polled, as a child may close its outputs and go on.
    pub fn try_output_within(mut self, limit: Duration) -> Option<Output> {
        let until = Instant::now() + limit;
        let mut child = self.child.take().expect("not waited for yet");
        let (tx, rx) = mpsc::channel();
        let mut pipes = 0;
        let mut read = |which: usize, pipe: Option<Box<dyn Read + Send>>| {
            if let Some(mut p) = pipe {
                pipes += 1;
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut b = Vec::new();
                    let _ = p.read_to_end(&mut b);
                    let _ = tx.send((which, b));
                });
            }
        };
        read(
            0,
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        read(
            1,
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let mut outputs = [Vec::new(), Vec::new()];
        for _ in 0..pipes {
            let left = until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((which, b)) => outputs[which] = b,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
            }
        }
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for the child") {
                break status;
            }
            if Instant::now() >= until {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let [stdout, stderr] = outputs;
        Some(Output {
            status,
            stdout,
            stderr,
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
