//! A child process that a failing test cannot leave behind: killed and
//! reaped when its guard is dropped (a panic unwinds through the drop), and
//! waited for only within a deadline.

use std::io::Read;
use std::process::{Child, Output};
use std::sync::mpsc;
use std::time::Duration;

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
    /// (stderr must be piped; stdout, if not piped, is empty). Waits on its
    /// output closing, not by polling; still running then, it is killed and
    /// the test fails.
    pub fn output_within(mut self, limit: Duration) -> Output {
        let mut child = self.child.take().expect("not waited for yet");
        let err = child.stderr.take().expect("stderr piped");
        let stdout = child.stdout.take().map(read_all);
        let stderr = read_all(err);
        let Ok(out) = stdout.as_ref().unwrap_or(&stderr).recv_timeout(limit) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} still running after {limit:?}: killed", self.what);
        };
        let status = child.wait().expect("wait for the child");
        let (stdout, stderr) = match stdout {
            Some(_) => (out, stderr.recv().unwrap_or_default()),
            None => (Vec::new(), out),
        };
        Output {
            status,
            stdout,
            stderr,
        }
    }
}

/// Reads `r` to its end on a thread; the bytes arrive on the channel.
fn read_all(mut r: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = r.read_to_end(&mut b);
        let _ = tx.send(b);
    });
    rx
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
