//! cowlab driven by the QEMU project's own QMP client library, `qemu.qmp`
//! (tests/qmp/session.py), with its async `QMPClient` and its legacy sync
//! `QEMUMonitorProtocol`: connect and negotiate capabilities, query-status,
//! stop, cont, error replies, events, disconnect.
//!
//! The library comes from PyPI, pinned by hash in tests/qmp/requirements.txt,
//! into a virtualenv that the first test run makes under target/
//! (`CARGO_TARGET_TMPDIR`/qmp-venv, with `python3 -m venv` and pip) and
//! later runs reuse while requirements.txt is unchanged. So
//! `cargo test --workspace --locked` needs python3 with its venv module
//! and, the first time, the package registry; without them these tests
//! fail (they never skip), saying what is missing.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod common;

use common::{text, Running};

const REQUIREMENTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/qmp/requirements.txt");
const SESSION: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/qmp/session.py");

/// Runs `cmd` to its end within `limit` (killed and failed otherwise) and
/// fails, with its output, unless it succeeds.
fn run_ok(cmd: &mut Command, what: &str, hint: &str, limit: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start it: {e}; {hint}"));
    let out = Running::new(child, what).output_within(limit);
    assert!(
        out.status.success(),
        "{what}: {}; {hint}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// Whether `python` imports both APIs the session uses.
fn has_qmp(python: &Path) -> bool {
    Command::new(python)
        .args([
            "-c",
            "import qemu.qmp, qemu.qmp.legacy; print(qemu.qmp.QMPClient)",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The virtualenv's python, with qemu.qmp: made once, then reused.
fn qmp_python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(make_venv)
}

fn make_venv() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(tmp).unwrap();
    let dir = tmp.join("qmp-venv");
    let python = dir.join("bin").join("python3");
    let stamp = dir.join("cowlab-requirements.txt");
    let wanted = std::fs::read_to_string(REQUIREMENTS).expect("tests/qmp/requirements.txt");
    // Test binaries may run side by side (two `cargo test`s): one makes
    // the virtualenv while the others wait for it.
    let lock = File::create(tmp.join("qmp-venv.lock")).unwrap();
    // SAFETY: flock on a descriptor this function owns; released when
    // `lock` is closed.
    let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(locked, 0, "flock: {}", std::io::Error::last_os_error());
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) && has_qmp(&python) {
        return python;
    }
    let _ = std::fs::remove_dir_all(&dir);
    run_ok(
        Command::new("python3").arg("-m").arg("venv").arg(&dir),
        "python3 -m venv",
        "the tests need python3 with its venv module (Debian: apt-get install python3-venv)",
        Duration::from_secs(120),
    );
    run_ok(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--require-hashes",
                "-r",
                REQUIREMENTS,
            ])
            .env("PIP_NO_CACHE_DIR", "1"),
        "pip install -r tests/qmp/requirements.txt",
        "it needs the package registry (PyPI) the first time",
        Duration::from_secs(300),
    );
    assert!(
        has_qmp(&python),
        "qemu.qmp does not import after pip install"
    );
    std::fs::write(&stamp, wanted).unwrap();
    python
}

/// Runs tests/qmp/session.py MODE against a fresh
/// `cowlab run hello --vcpus 2 --wait --control SOCKET`.
fn session(mode: &str) {
    let python = qmp_python();
    let sock = std::env::temp_dir().join(format!("cowlab-qmp-{}-{mode}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(env!("CARGO_BIN_EXE_cowlab"))
        .args(["run", "hello", "--vcpus", "2", "--wait", "--control"])
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cowlab");
    let mut cowlab = Running::new(child, "cowlab run hello --wait");
    let until = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < until, "no socket at {}", sock.display());
        if let Some(status) = cowlab.child().try_wait().unwrap() {
            panic!("cowlab ended ({status}) before its socket appeared");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = run_ok(
        Command::new(python)
            .arg(SESSION)
            .arg(mode)
            .arg(&sock)
            .env("PYTHONDONTWRITEBYTECODE", "1"),
        &format!("session.py {mode}"),
        "cowlab is killed",
        Duration::from_secs(120),
    );
    assert!(
        text(&out.stdout).ends_with("session passed\n"),
        "{}",
        text(&out.stdout)
    );
    let out = cowlab.output_within(Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.matches("hello from vcpu").count(), 2, "{stdout}");
    assert!(!sock.exists(), "the socket is removed");
}

#[test]
fn the_async_qmp_client_drives_a_run() {
    session("async");
}

#[test]
fn the_legacy_sync_qmp_client_drives_a_run() {
    session("legacy");
}
