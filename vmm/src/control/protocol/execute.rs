//! Running a parsed request against the [`Controller`].

use serde_json::{json, Value};

use super::request::{
    args, CapabilitiesArgs, InjectArgs, NoArgs, Request, SetKnobArgs, TraceStartArgs, UninjectArgs,
    VcpuArgs,
};
use super::response::{generic, CmdError};
use crate::control::{lock, printable, Controller};
use crate::hooks::{self, POINTS};
use crate::kvm::VcpuState;

/// The commands, with one line each (`query-commands`).
pub(crate) const COMMANDS: &[(&str, &str)] = &[
    ("qmp_capabilities", "accepted for QMP clients; does nothing"),
    ("query-commands", "the commands"),
    (
        "query-status",
        "what runs, the run under way, and each vCPU's state",
    ),
    ("stop", "stop the VM, or vCPU 'vcpu', at its next exit"),
    (
        "cont",
        "let the VM, or vCPU 'vcpu', run again (also ends pause rules)",
    ),
    (
        "inject",
        "add 'rule' (ACTION@POINT[/filters]) now and to later runs",
    ),
    ("uninject", "remove the rule with 'id'"),
    ("query-rules", "the rules added here, by id"),
    (
        "set-knob",
        "set policy 'knob' to 'value' from the next run on",
    ),
    ("query-points", "the injection points"),
    (
        "trace-start",
        "record a trace into 'file' (docs/trace-format.md) from now on",
    ),
    ("trace-stop", "end the trace started by trace-start"),
    ("quit", "end the run under way and start no other"),
];

/// Runs one request. Its arguments are read in full before anything is
/// done, so a bad request never changes the VM.
pub(super) fn execute(ctl: &Controller, request: Request) -> Result<Value, CmdError> {
    let name = request.execute.as_str();
    let map = request.arguments.unwrap_or_default().0;
    let result = match name {
        "qmp_capabilities" => {
            let a: CapabilitiesArgs = args(map)?;
            if let Some(c) = a.enable.iter().flatten().next() {
                return Err(generic(format!(
                    "capability '{}' is not available",
                    printable(c)
                )));
            }
            json!({})
        }
        "query-commands" => {
            let NoArgs {} = args(map)?;
            COMMANDS
                .iter()
                .map(|(n, d)| json!({ "name": n, "description": d }))
                .collect()
        }
        "query-status" => {
            let NoArgs {} = args(map)?;
            query_status(ctl)
        }
        "stop" => {
            let vcpu = args::<VcpuArgs>(map)?.vcpu.map(|v| v.0);
            ctl.gate.stop(vcpu);
            if let Some(vm) = ctl.current() {
                vm.kick_all();
            }
            json!({})
        }
        "cont" => {
            let vcpu = args::<VcpuArgs>(map)?.vcpu.map(|v| v.0);
            ctl.gate.cont(vcpu);
            if let Some(vm) = ctl.current() {
                vm.with_hooks(|h| h.resume(vcpu));
            }
            json!({})
        }
        "inject" => {
            let a: InjectArgs = args(map)?;
            let rule = hooks::parse_rule(&a.rule).map_err(generic)?;
            let id = ctl
                .next_rule
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            // Held while the VM gets it, so `attach` sees it once.
            let mut rules = lock(&ctl.rules);
            rules.insert(id, rule.clone());
            if let Some(vm) = ctl.current() {
                vm.with_hooks(|h| h.add_tagged_rule(rule, Some(id)));
            }
            drop(rules);
            json!({ "id": id })
        }
        "uninject" => {
            let id = args::<UninjectArgs>(map)?.id.0;
            let mut rules = lock(&ctl.rules);
            if rules.remove(&id).is_none() {
                return Err(generic(format!("no rule with id {id}")));
            }
            if let Some(vm) = ctl.current() {
                vm.with_hooks(|h| h.remove_tagged(id));
            }
            drop(rules);
            json!({})
        }
        "query-rules" => {
            let NoArgs {} = args(map)?;
            lock(&ctl.rules)
                .iter()
                .map(|(id, r)| json!({ "id": id, "rule": r.to_string() }))
                .collect()
        }
        "set-knob" => {
            let a: SetKnobArgs = args(map)?;
            let value = a.value.0;
            Controller::check_knob(&a.knob, &value).map_err(generic)?;
            lock(&ctl.knobs).push((a.knob, value));
            json!({ "applies": "from the next run" })
        }
        "trace-start" => {
            let a: TraceStartArgs = args(map)?;
            ctl.trace_start(&a.file)?
        }
        "trace-stop" => {
            let NoArgs {} = args(map)?;
            ctl.trace_stop()?
        }
        "query-points" => {
            let NoArgs {} = args(map)?;
            POINTS
                .iter()
                .map(|(n, d)| json!({ "name": n, "description": d }))
                .collect()
        }
        "quit" => {
            let NoArgs {} = args(map)?;
            ctl.quit();
            json!({})
        }
        _ => {
            return Err(CmdError {
                class: "CommandNotFound",
                desc: format!("the command {} has not been found", printable(name)),
            })
        }
    };
    Ok(result)
}

fn query_status(ctl: &Controller) -> Value {
    let p = lock(&ctl.progress).clone();
    let vcpus = ctl.current().and_then(|vm| vm.vcpus());
    // Paused: every vCPU still alive is held (parked or at a breakpoint).
    let held = |s: &VcpuState| matches!(s, VcpuState::Stopped | VcpuState::PausedAt(_));
    let status = match &vcpus {
        _ if p.finished => "finished",
        Some(v) if v.iter().any(held) && v.iter().all(|s| held(s) || *s == VcpuState::Ended) => {
            "paused"
        }
        Some(_) => "running",
        None if ctl.gate.all_stopped() => "paused",
        None => "idle",
    };
    let vcpus: Vec<Value> = vcpus
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(id, s)| match s {
            VcpuState::Running => json!({ "id": id, "state": "running" }),
            VcpuState::Stopped => json!({ "id": id, "state": "stopped" }),
            VcpuState::PausedAt(p) => json!({ "id": id, "state": "paused", "point": p }),
            VcpuState::Ended => json!({ "id": id, "state": "ended" }),
            VcpuState::Blocked(why) => json!({ "id": id, "state": "blocked", "why": why }),
        })
        .collect();
    json!({
        "status": status,
        "running": status == "running",
        "what": p.what,
        "policy": p.policy,
        "run": p.run,
        "runs": p.runs,
        "vcpus": vcpus,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::{ask, error_desc};
    use crate::control::{lock, Controller};

    #[test]
    fn a_bad_argument_changes_nothing_even_beside_good_ones() {
        let ctl = Controller::new(false);
        let r = ask(
            &ctl,
            r#"{"execute": "stop", "arguments": {"vcpu": 1, "cpu": 2}}"#,
        );
        assert!(error_desc(&r).contains("unexpected parameter 'cpu'"), "{r}");
        assert!(!ctl.gate.any_stopped(), "the stop was not done");
        let r = ask(
            &ctl,
            r#"{"execute": "inject", "arguments": {"rule": "count@fork:enter", "x": 1}}"#,
        );
        assert!(r.get("error").is_some(), "{r}");
        assert!(lock(&ctl.rules).is_empty(), "no rule was added");
        let r = ask(&ctl, r#"{"execute": "quit", "arguments": {"now": true}}"#);
        assert!(r.get("error").is_some(), "{r}");
        assert!(!ctl.quit_requested());
    }

    #[test]
    fn well_formed_requests_are_answered() {
        let ctl = Controller::new(false);
        for (line, want) in [
            (
                r#"{"execute": "qmp_capabilities"}"#,
                json!({ "return": {} }),
            ),
            (
                r#"{"execute": "qmp_capabilities", "arguments": {}, "id": "__qmp#00001"}"#,
                json!({ "return": {}, "id": "__qmp#00001" }),
            ),
            (
                r#"{"execute": "qmp_capabilities", "arguments": {"enable": []}}"#,
                json!({ "return": {} }),
            ),
            (
                r#"{"execute": "stop", "arguments": null, "id": 3}"#,
                json!({ "return": {}, "id": 3 }),
            ),
            (
                r#"{"execute": "cont", "arguments": {"vcpu": 1}}"#,
                json!({ "return": {} }),
            ),
            (
                r#"{"execute": "set-knob", "arguments": {"knob": "tlb_capacity", "value": 64}}"#,
                json!({ "return": { "applies": "from the next run" } }),
            ),
        ] {
            assert_eq!(ask(&ctl, line), want, "{line}");
        }
        assert_eq!(
            lock(&ctl.knobs).as_slice(),
            [("tlb_capacity".to_string(), "64".to_string())]
        );
    }

    #[test]
    fn rules_and_knobs_are_kept_for_later_runs() {
        let ctl = Controller::new(true);
        let r = ask(
            &ctl,
            r#"{"execute": "inject", "arguments": {"rule": "count@fault:fill/v1"}, "id": 1}"#,
        );
        let id = r["return"]["id"].as_u64().expect("an id");
        assert_eq!(r["id"], 1);
        let rules = ask(&ctl, r#"{"execute": "query-rules"}"#);
        assert_eq!(rules["return"][0]["id"], id);
        let r = ask(
            &ctl,
            r#"{"execute": "set-knob", "arguments": {"knob": "fork_lock_vmas", "value": "off"}}"#,
        );
        assert!(r.get("return").is_some(), "{r}");
        let mut config = crate::kvm::VmConfig::default();
        assert!(config.policy.fork_lock_vmas);
        Controller::new(false).configure(&mut config).unwrap();
        assert!(config.policy.fork_lock_vmas, "another controller's knobs");
        ctl.configure(&mut config).unwrap();
        assert!(!config.policy.fork_lock_vmas);
        let attached = config.control.unwrap();
        assert_eq!(attached.rules.len(), 1);
        assert!(attached.gate.all_stopped(), "--wait starts stopped");
        let r = ask(
            &ctl,
            &format!(r#"{{"execute": "uninject", "arguments": {{"id": {id}}}}}"#),
        );
        assert!(r.get("return").is_some(), "{r}");
        let status = ask(&ctl, r#"{"execute": "query-status"}"#);
        assert_eq!(status["return"]["status"], "paused");
    }
}
