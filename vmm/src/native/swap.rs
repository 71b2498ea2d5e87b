//! Swap for `madvise … pageout`: anonymous pages can only be paged out to
//! swap. If /proc/swaps lists none, a swap file is made for the native
//! run (in a temporary directory: written out in full, `mkswap`,
//! swapon(2)) and taken away again (swapoff(2), deleted) when the
//! [`SwapFile`] is dropped, and on Ctrl-C ([`cleanup_on_interrupt`]).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::sys;

/// The swap file's size: room for the pages of any test, small enough to
/// write out at once.
const SWAP_BYTES: usize = 64 << 20;

/// The swap file in use, for the Ctrl-C handler.
static ACTIVE: Mutex<Option<PathBuf>> = Mutex::new(None);

/// A swap file enabled for a native run; disabled and deleted on drop.
#[derive(Debug)]
pub struct SwapFile {
    dir: PathBuf,
    file: PathBuf,
}

/// The directory name every temporary swap file of cowlab lives in,
/// before the owning process's id.
pub const TEMP_SWAP_PREFIX: &str = "cowlab-swap-";

/// Whether /proc/swaps lists an area of the host's own. Another cowlab's
/// temporary swap file does not count: that cowlab turns it off when it
/// ends, perhaps in the middle of this run (and then this run's pageouts
/// would find no swap), so every cowlab that pages out without host swap
/// enables its own.
pub fn host_has_swap() -> bool {
    std::fs::read_to_string("/proc/swaps").is_ok_and(|s| {
        s.lines()
            .skip(1)
            .any(|l| !l.trim().is_empty() && !l.contains(TEMP_SWAP_PREFIX))
    })
}

impl SwapFile {
    /// Swap for a run that pages out: `None` if the host has some, else a
    /// new swap file, or why there can be none.
    pub fn ensure() -> Result<Option<SwapFile>, String> {
        if host_has_swap() {
            return Ok(None);
        }
        let dir = std::env::temp_dir().join(format!("{TEMP_SWAP_PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        // From here on, drop cleans up whatever was made.
        let swap = SwapFile {
            file: dir.join("swapfile"),
            dir,
        };
        swap.enable()?;
        Ok(Some(swap))
    }

    fn enable(&self) -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let f = &self.file;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(f)
            .map_err(|e| format!("cannot create {}: {e}", f.display()))?;
        // No holes: swapon refuses a sparse file.
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..SWAP_BYTES / zeros.len() {
            file.write_all(&zeros)
                .map_err(|e| format!("cannot write {}: {e}", f.display()))?;
        }
        file.sync_all()
            .map_err(|e| format!("cannot write {}: {e}", f.display()))?;
        drop(file);
        let out = std::process::Command::new("mkswap")
            .arg(f)
            .output()
            .map_err(|e| format!("cannot run mkswap: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mkswap {} failed: {}",
                f.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        *ACTIVE.lock().unwrap_or_else(|e| e.into_inner()) = Some(f.clone());
        sys::swapon(f, true).map_err(|e| {
            *ACTIVE.lock().unwrap_or_else(|e| e.into_inner()) = None;
            format!("swapon {}: {e}", f.display())
        })
    }

    pub fn path(&self) -> &Path {
        &self.file
    }
}

impl Drop for SwapFile {
    fn drop(&mut self) {
        // Under the lock, so that a Ctrl-C meanwhile waits for this.
        let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
        if active.take().is_some() {
            if let Err(e) = sys::swapon(&self.file, false) {
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "cowlab: swapoff {}: {e} (turn it off and remove it by hand)",
                    self.file.display()
                );
            }
        }
        let _ = std::fs::remove_file(&self.file);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// On Ctrl-C: the swap file in use, if any, is turned off and deleted.
/// The lock stays held: the process exits next, and nothing else may
/// start a swap file meanwhile.
pub fn cleanup_on_interrupt() {
    let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = active.take() {
        let _ = sys::swapon(&f, false);
        let _ = std::fs::remove_file(&f);
        if let Some(d) = f.parent() {
            let _ = std::fs::remove_dir(d);
        }
    }
    std::mem::forget(active);
}
