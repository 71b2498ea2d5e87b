//! Helpers for the integration tests, which boot real KVM VMs.

/// Fails loudly (never skips) when KVM is not usable here.
pub fn require_kvm() {
    let path = std::env::var("COWLAB_KVM").unwrap_or_else(|_| "/dev/kvm".into());
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
    {
        panic!("these tests boot real VMs and need KVM, but {path} cannot be opened: {e}");
    }
}
