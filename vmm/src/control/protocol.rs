//! The control protocol: one request line in, one response line out.
//! Requests are `{"execute": NAME, "arguments": {...}, "id": ANY}`;
//! responses `{"return": ...}` or `{"error": {"class", "desc"}}`, with the
//! request's `id` echoed. Shaped after QEMU's QMP.

use serde_json::{json, Map, Value};

use cowlab_abi::layout::MAX_VCPUS;

use super::{lock, Controller};
use crate::hooks::{self, POINTS};
use crate::kvm::VcpuState;

/// The greeting a client gets on connecting.
pub(crate) fn greeting() -> Value {
    json!({
        "QMP": {
            "version": { "cowlab": env!("CARGO_PKG_VERSION") },
            "capabilities": [],
        }
    })
}

/// A failed command: QMP's error class and a description.
#[derive(Debug)]
pub(crate) struct CmdError {
    class: &'static str,
    desc: String,
}

fn generic(desc: impl Into<String>) -> CmdError {
    CmdError {
        class: "GenericError",
        desc: desc.into(),
    }
}

/// The response to one request line.
pub(crate) fn respond(ctl: &Controller, line: &[u8]) -> Value {
    let (id, result) = match parse(line) {
        Ok((id, name, args)) => (id, execute(ctl, &name, &args)),
        Err((id, e)) => (id, Err(e)),
    };
    let mut out = match result {
        Ok(v) => json!({ "return": v }),
        Err(e) => json!({ "error": { "class": e.class, "desc": e.desc } }),
    };
    if let Some(id) = id {
        out["id"] = id;
    }
    out
}

type Request = (Option<Value>, String, Map<String, Value>);

fn parse(line: &[u8]) -> Result<Request, (Option<Value>, CmdError)> {
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| (None, generic(format!("malformed JSON: {e}"))))?;
    let Value::Object(mut obj) = value else {
        return Err((None, generic("a request is a JSON object")));
    };
    let id = obj.remove("id");
    let name = match obj.remove("execute") {
        Some(Value::String(s)) => s,
        Some(_) => return Err((id, generic("'execute' must be a string"))),
        None => return Err((id, generic("a request needs 'execute'"))),
    };
    let args = match obj.remove("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err((id, generic("'arguments' must be an object"))),
    };
    if let Some(k) = obj.keys().next() {
        return Err((id, generic(format!("unknown member '{k}'"))));
    }
    Ok((id, name, args))
}

/// The arguments of one command, checked as they are read.
struct Args<'a> {
    map: &'a Map<String, Value>,
    used: Vec<&'static str>,
}

impl<'a> Args<'a> {
    fn new(map: &'a Map<String, Value>) -> Self {
        Args {
            map,
            used: Vec::new(),
        }
    }

    fn str(&mut self, name: &'static str) -> Result<Option<&'a str>, CmdError> {
        self.used.push(name);
        match self.map.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(generic(format!("parameter '{name}' expects a string"))),
        }
    }

    /// A string, number or boolean, as text (knob values: `64`, `true`).
    fn scalar(&mut self, name: &'static str) -> Result<Option<String>, CmdError> {
        self.used.push(name);
        match self.map.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(Some(v.to_string())),
            Some(_) => Err(generic(format!(
                "parameter '{name}' expects a string, number or boolean"
            ))),
        }
    }

    fn uint(&mut self, name: &'static str) -> Result<Option<u64>, CmdError> {
        self.used.push(name);
        match self.map.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| generic(format!("parameter '{name}' expects an unsigned integer"))),
        }
    }

    fn vcpu(&mut self) -> Result<Option<usize>, CmdError> {
        match self.uint("vcpu")? {
            Some(v) if v >= MAX_VCPUS as u64 => Err(generic(format!(
                "parameter 'vcpu' must be below {MAX_VCPUS}"
            ))),
            v => Ok(v.map(|v| v as usize)),
        }
    }

    fn required<T>(v: Option<T>, name: &str) -> Result<T, CmdError> {
        v.ok_or_else(|| generic(format!("parameter '{name}' is missing")))
    }

    /// Fails on any argument the command did not read.
    fn done(self) -> Result<(), CmdError> {
        match self.map.keys().find(|k| !self.used.contains(&k.as_str())) {
            Some(k) => Err(generic(format!("unexpected parameter '{k}'"))),
            None => Ok(()),
        }
    }
}

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

fn execute(ctl: &Controller, name: &str, args: &Map<String, Value>) -> Result<Value, CmdError> {
    let mut a = Args::new(args);
    let result = match name {
        "qmp_capabilities" => json!({}),
        "query-commands" => COMMANDS
            .iter()
            .map(|(n, d)| json!({ "name": n, "description": d }))
            .collect(),
        "query-status" => query_status(ctl),
        "stop" => {
            let vcpu = a.vcpu()?;
            ctl.gate.stop(vcpu);
            if let Some(vm) = ctl.current() {
                vm.kick_all();
            }
            json!({})
        }
        "cont" => {
            let vcpu = a.vcpu()?;
            ctl.gate.cont(vcpu);
            if let Some(vm) = ctl.current() {
                vm.with_hooks(|h| h.resume(vcpu));
            }
            json!({})
        }
        "inject" => {
            let text = Args::required(a.str("rule")?, "rule")?;
            let rule = hooks::parse_rule(text).map_err(generic)?;
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
            let id = Args::required(a.uint("id")?, "id")?;
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
        "query-rules" => lock(&ctl.rules)
            .iter()
            .map(|(id, r)| json!({ "id": id, "rule": r.to_string() }))
            .collect(),
        "set-knob" => {
            let knob = Args::required(a.str("knob")?, "knob")?;
            let value = Args::required(a.scalar("value")?, "value")?;
            let value = value.as_str();
            Controller::check_knob(knob, value).map_err(generic)?;
            lock(&ctl.knobs).push((knob.to_string(), value.to_string()));
            json!({ "applies": "from the next run" })
        }
        "trace-start" => {
            let file = Args::required(a.str("file")?, "file")?;
            ctl.trace_start(file).map_err(generic)?
        }
        "trace-stop" => ctl.trace_stop().map_err(generic)?,
        "query-points" => POINTS
            .iter()
            .map(|(n, d)| json!({ "name": n, "description": d }))
            .collect(),
        "quit" => {
            ctl.quit();
            json!({})
        }
        _ => {
            return Err(CmdError {
                class: "CommandNotFound",
                desc: format!("the command {name} has not been found"),
            })
        }
    };
    a.done()?;
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
    use super::*;

    fn ask(ctl: &Controller, line: &str) -> Value {
        respond(ctl, line.as_bytes())
    }

    fn error_desc(v: &Value) -> String {
        v["error"]["desc"].as_str().unwrap_or_default().to_string()
    }

    #[test]
    fn malformed_requests_get_errors() {
        let ctl = Controller::new(false);
        for (line, want) in [
            ("{not json", "malformed JSON"),
            ("[1,2]", "JSON object"),
            (r#"{"id": 7}"#, "needs 'execute'"),
            (r#"{"execute": 3}"#, "must be a string"),
            (
                r#"{"execute": "stop", "arguments": []}"#,
                "must be an object",
            ),
            (
                r#"{"execute": "stop", "arguments": {"vcpu": "one"}}"#,
                "unsigned integer",
            ),
            (
                r#"{"execute": "stop", "arguments": {"vcpu": 100000}}"#,
                "must be below",
            ),
            (
                r#"{"execute": "stop", "arguments": {"cpu": 1}}"#,
                "unexpected parameter 'cpu'",
            ),
            (r#"{"execute": "inject"}"#, "'rule' is missing"),
            (
                r#"{"execute": "inject", "arguments": {"rule": "explode@nowhere"}}"#,
                "",
            ),
            (
                r#"{"execute": "set-knob", "arguments": {"knob": "no_such", "value": "on"}}"#,
                "",
            ),
            (
                r#"{"execute": "uninject", "arguments": {"id": 99}}"#,
                "no rule with id 99",
            ),
        ] {
            let r = ask(&ctl, line);
            assert_eq!(r["error"]["class"], "GenericError", "{line}: {r}");
            assert!(error_desc(&r).contains(want), "{line}: {r}");
        }
        let r = ask(&ctl, r#"{"execute": "frobnicate", "id": "x"}"#);
        assert_eq!(r["error"]["class"], "CommandNotFound");
        assert_eq!(r["id"], "x");
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
