//! What the user sees: `cowlab: …` lines on stderr, output on stdout that
//! survives a closed pipe and reports a failed write once (exit 3), and
//! input files read whole within a size limit.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};

use super::error::{CliError, ReadError};
use crate::control::printable;
use crate::kvm::exit_code;

/// Prints `cowlab: MSG` on stderr (if stderr itself cannot be written,
/// there is no one to tell: the exit status still says it). Always one
/// line: messages quote arguments, file names and file contents, so
/// control characters (a newline, an escape sequence) are written as
/// `\u{…}` here, whatever the message.
pub fn error(msg: impl std::fmt::Display) {
    say(format_args!("cowlab: {}", printable(&msg.to_string())));
}

/// Prints a line on stderr, never panicking (unlike `eprintln!`).
pub(super) fn say(line: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// What became of stdout (and other outputs): see [`finish`].
static OUTPUT: AtomicU8 = AtomicU8::new(OUTPUT_OK);
const OUTPUT_OK: u8 = 0;
/// The reader went away (a closed pipe: `| head`): nothing more is
/// printed, quietly.
const OUTPUT_CLOSED: u8 = 1;
/// A write failed (a full disk, an I/O error): said once, exit 3.
const OUTPUT_FAILED: u8 = 2;

/// Prints to stdout, flushed, so that a write error is seen here: a closed
/// pipe ends the output quietly, any other failure is reported once and
/// makes the exit status 3 ([`finish`]). Never panics (unlike `println!`).
pub fn out(text: impl std::fmt::Display) {
    if OUTPUT.load(Ordering::Relaxed) != OUTPUT_OK {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    let written = write!(stdout, "{text}").and_then(|()| stdout.flush());
    drop(stdout);
    stdout_written(written);
}

/// Notes the outcome of writing to stdout (see [`out`]).
pub(super) fn stdout_written(result: std::io::Result<()>) {
    match result {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            let _ = OUTPUT.compare_exchange(
                OUTPUT_OK,
                OUTPUT_CLOSED,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        Err(e) => output_failed(format_args!("cannot write to stdout: {e}")),
    }
}

/// Reports that an output could not be written (once: later failures,
/// consequences of the first, are not repeated) and makes the exit
/// status 3.
pub(super) fn output_failed(msg: impl std::fmt::Display) {
    if OUTPUT.swap(OUTPUT_FAILED, Ordering::Relaxed) != OUTPUT_FAILED {
        error(msg);
    }
}

/// The exit status of a command that returned `code`: at least 3 if an
/// output could not be written (README: exit status).
pub fn finish(code: i32) -> i32 {
    if OUTPUT.load(Ordering::Relaxed) == OUTPUT_FAILED {
        code.max(exit_code::VM_ERROR)
    } else {
        code
    }
}

/// The largest guest ELF `--guest` takes (the built-in one is well under
/// 1 MiB).
pub const MAX_GUEST_ELF: u64 = 64 << 20;
/// The largest litmus file read.
pub const MAX_LITMUS_FILE: u64 = 16 << 20;
/// The largest trace file `cowlab trace` reads (about 100,000 litmus runs).
pub const MAX_TRACE_FILE: u64 = 1 << 30;

/// Reads input file `path` whole, refusing one of more than `limit` bytes
/// before reading it (and, should it grow while read, after `limit`
/// bytes), a directory, a device (`/dev/zero` would be read until memory
/// ran out), and, unless `pipes`, anything but a regular file.
pub(super) fn read_input(path: &Path, limit: u64, pipes: bool) -> Result<Vec<u8>, CliError> {
    let cannot = |why: ReadError| CliError::Read {
        path: path.to_path_buf(),
        why,
    };
    let file = std::fs::File::open(path).map_err(|e| cannot(ReadError::Io(e)))?;
    let meta = file.metadata().map_err(|e| cannot(ReadError::Io(e)))?;
    let kind = meta.file_type();
    if !(kind.is_file() || pipes && std::os::unix::fs::FileTypeExt::is_fifo(&kind)) {
        let what = if kind.is_dir() {
            ReadError::Directory
        } else if pipes {
            ReadError::NotFileOrPipe
        } else {
            ReadError::NotFile
        };
        return Err(cannot(what));
    }
    let too_big = || cannot(ReadError::TooLarge { limit });
    if meta.len() > limit {
        return Err(too_big());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| cannot(ReadError::Io(e)))?;
    if bytes.len() as u64 > limit {
        return Err(too_big());
    }
    Ok(bytes)
}
