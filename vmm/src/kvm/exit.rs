//! Decoding a `KVM_RUN` exit into what the VMM does with it.

/// An exit copied out of `kvm_run`, so the vCPU can be used while handling it.
pub(super) enum Exit {
    Hypercall(u32),
    PortIo(u16),
    Mmio(u64),
    Shutdown,
    IrqWindowOpen,
    Interrupted,
    /// `KVM_RUN` failed with EFAULT: the guest touched a frame while
    /// [`PhysMem::revoke`] had its host page read-only for a moment.
    Revoked,
    Other(String),
}

/// Consecutive EFAULT exits after which the frame is taken as really gone.
pub(super) const MAX_REVOKED_RETRIES: u32 = 10_000;
