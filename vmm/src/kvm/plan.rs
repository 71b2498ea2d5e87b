//! A boot plan: a guest program described as data, which the VM loads and
//! starts without knowing where it came from (a litmus test compiles to
//! one, `litmus::Compiled::plan`).

use cowlab_abi::bytecode::Insn;

/// What to load and start instead of a built-in program: bytecode for the
/// guest's interpreter, the regions it works on, its boot threads and the
/// names of its hook points. The vCPUs run [`cowlab_abi::Program::Litmus`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootPlan {
    /// The interpreter's program, loaded at `LITMUS_PHYS` after its header.
    pub code: Vec<Insn>,
    /// Regions mapped (and populated) in the first process before any
    /// vCPU runs.
    pub regions: Vec<PlanRegion>,
    /// The pc each boot thread starts at: one vCPU each, ids 0, 1, … in
    /// this order.
    pub threads: Vec<u64>,
    /// Guest hook point names (`guest:NAME`) by hook id.
    pub hooks: Vec<String>,
}

/// A region of a [`BootPlan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanRegion {
    /// For messages.
    pub name: String,
    pub addr: u64,
    pub pages: u64,
    /// `PROT_*` bits.
    pub prot: u32,
    /// Fault every page in at load (MAP_POPULATE).
    pub populate: bool,
}
