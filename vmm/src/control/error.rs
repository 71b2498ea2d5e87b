//! The control socket's errors. Their messages are what a client reads as
//! an error's `desc` (class `GenericError`) and what `cowlab run --control`
//! prints before it exits 2 (docs/control.md).

use std::path::PathBuf;

use crate::policy::PolicyError;

/// What the [`Controller`](super::Controller) refuses: a knob override
/// that does not apply, or a `trace-start`/`trace-stop` that cannot be done.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A `set-knob` override the policy does not take.
    #[error(transparent)]
    Knob(#[from] PolicyError),
    /// `trace-start` while the command records its own trace (`--trace`).
    #[error("this command records a trace already (--trace)")]
    CliTrace,
    /// `trace-start` while a trace started over the socket is recorded.
    #[error("a trace is being recorded into {0}; trace-stop first")]
    TraceBusy(String),
    /// `trace-start` into something that is not a regular file.
    #[error("{0}: not a regular file")]
    NotARegularFile(String),
    /// Creating or writing the trace file failed.
    #[error("{file}: {source}")]
    TraceFile {
        file: String,
        source: std::io::Error,
    },
    /// Another `trace-start` won the race while the file was created.
    #[error("another trace-start came first")]
    TraceRace,
    /// `trace-stop` without a trace.
    #[error("no trace is being recorded (trace-start FILE first)")]
    NoTrace,
}

/// Why the control socket cannot be served at a path.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A live socket is there.
    #[error("{}: another process is listening there", .0.display())]
    Listening(PathBuf),
    /// A file, a directory or anything else that is not a socket is there.
    #[error("{}: exists and is not a socket; not replacing it", .0.display())]
    NotASocket(PathBuf),
    /// A system call on the path (or the private directory it is bound in)
    /// failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The accept thread could not be started.
    #[error("cannot start the control thread: {0}")]
    Thread(std::io::Error),
}

impl ServerError {
    /// A failed call on `path`, for `map_err`.
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ServerError + '_ {
        move |source| ServerError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The messages are the ones clients, scripts and docs/control.md know:
    /// typed errors did not change a word of them.
    #[test]
    fn messages_are_worded_as_before() {
        let io = || std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let denied = io().to_string();
        let sock = || PathBuf::from("/tmp/l.sock");
        for (e, want) in [
            (
                ServerError::Listening(sock()).to_string(),
                "/tmp/l.sock: another process is listening there".to_string(),
            ),
            (
                ServerError::NotASocket(sock()).to_string(),
                "/tmp/l.sock: exists and is not a socket; not replacing it".to_string(),
            ),
            (
                ServerError::io(&sock())(io()).to_string(),
                format!("/tmp/l.sock: {denied}"),
            ),
            (
                ServerError::Thread(io()).to_string(),
                format!("cannot start the control thread: {denied}"),
            ),
            (
                ControlError::CliTrace.to_string(),
                "this command records a trace already (--trace)".to_string(),
            ),
            (
                ControlError::TraceBusy("t.trace".into()).to_string(),
                "a trace is being recorded into t.trace; trace-stop first".to_string(),
            ),
            (
                ControlError::NotARegularFile("/dev/null".into()).to_string(),
                "/dev/null: not a regular file".to_string(),
            ),
            (
                ControlError::TraceFile {
                    file: "t.trace".into(),
                    source: io(),
                }
                .to_string(),
                format!("t.trace: {denied}"),
            ),
            (
                ControlError::TraceRace.to_string(),
                "another trace-start came first".to_string(),
            ),
            (
                ControlError::NoTrace.to_string(),
                "no trace is being recorded (trace-start FILE first)".to_string(),
            ),
            (
                ControlError::from(PolicyError::UnknownKnob("x".into())).to_string(),
                PolicyError::UnknownKnob("x".into()).to_string(),
            ),
        ] {
            assert_eq!(e, want);
        }
    }
}
