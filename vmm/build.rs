//! Builds the freestanding guest (`guest/`) for the host triple and hands its
//! ELF to the VMM through `COWLAB_GUEST_ELF` (docs/design.md §3).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Flags that make a host-triple build freestanding and place it in the
/// kernel half (`guest/link.ld`).
fn guest_rustflags(link_script: &Path) -> Vec<String> {
    [
        "-C",
        "relocation-model=static",
        "-C",
        "code-model=large",
        "-C",
        "link-arg=-nostdlib",
        "-C",
        "link-arg=-static",
        "-C",
        "link-arg=-no-pie",
        "-C",
        "link-arg=-Wl,--build-id=none",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "-C".to_string(),
        format!("link-arg=-T{}", link_script.display()),
    ])
    // The guest's own cargo does not watch the linker script; a flag that
    // changes with it makes cargo relink when it changes.
    .chain([
        "-C".to_string(),
        format!(
            "link-arg=-Wl,--defsym=__cowlab_link_script={:#x}",
            fnv1a(link_script)
        ),
    ])
    .collect()
}

/// FNV-1a hash of a file's bytes (0 if unreadable; the link then fails loudly).
fn fnv1a(path: &Path) -> u64 {
    std::fs::read(path)
        .unwrap_or_default()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        })
        >> 1
}

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let guest_dir = manifest_dir.join("..").join("guest");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let target_dir = out_dir.join("guest-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());

    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir)
        .args(["build", "--release", "--locked", "--target-dir"])
        .arg(&target_dir)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            guest_rustflags(&guest_dir.join("link.ld")).join("\x1f"),
        );
    // The outer build's settings must not leak into the guest's.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key == "RUSTFLAGS"
            || key == "RUSTC_WRAPPER"
            || key == "RUSTC_WORKSPACE_WRAPPER"
            || key.starts_with("CARGO_TARGET_")
            || key.starts_with("CARGO_BUILD_")
            || key.starts_with("CARGO_PROFILE_")
            || key.starts_with("CARGO_CFG_")
            || key.starts_with("CARGO_FEATURE_")
        {
            cmd.env_remove(key.as_ref());
        }
    }
    let status = cmd.status().expect("failed to run cargo for the guest");
    assert!(status.success(), "building the guest failed");

    let elf = target_dir.join("release").join("cowlab-guest");
    println!("cargo:rustc-env=COWLAB_GUEST_ELF={}", elf.display());
    for path in [
        "src",
        "abi/src",
        "abi/Cargo.toml",
        "Cargo.toml",
        "Cargo.lock",
        "link.ld",
    ] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(path).display());
    }
}
