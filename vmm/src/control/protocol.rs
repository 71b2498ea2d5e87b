//! The control protocol: one request (a JSON value) in, one response out.
//! Requests are `{"execute": NAME, "arguments": {...}, "id": ANY}`;
//! responses `{"return": ...}` or `{"error": {"class", "desc"}}`, with the
//! request's `id` echoed. Shaped after QEMU's QMP.
//!
//! A request is read into a JSON tree that refuses duplicate keys at any
//! depth ([`Unique`]; serde_json alone keeps the last), then its members and
//! each command's arguments into typed structs (serde derive,
//! `deny_unknown_fields`) through [`Fields`], which words the errors as QMP
//! does: `parameter 'rule' is missing`, `unexpected parameter 'cpu'`,
//! `parameter 'vcpu': invalid type: …, expected …`.

use std::fmt;

use serde::de::{self, DeserializeOwned, IntoDeserializer, MapAccess, Unexpected, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Map, Number, Value};

use cowlab_abi::layout::MAX_VCPUS;

use super::{lock, printable, Controller};
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

pub(crate) fn generic(desc: impl Into<String>) -> CmdError {
    CmdError {
        class: "GenericError",
        desc: desc.into(),
    }
}

impl CmdError {
    /// The error response, with `id` echoed if the request had one. The
    /// description is made printable here, where every one is sent: the
    /// messages of the commands (a bad rule, an unknown knob) quote what
    /// the client sent, and none may carry its control characters on.
    pub(crate) fn response(&self, id: Option<Value>) -> Value {
        let desc = printable(&self.desc);
        let mut out = json!({ "error": { "class": self.class, "desc": desc } });
        if let Some(id) = id {
            out["id"] = id;
        }
        out
    }
}

/// The response to one request: `value` is the bytes of one JSON value.
pub(crate) fn respond(ctl: &Controller, value: &[u8]) -> Value {
    let (id, result) = match parse(value) {
        Ok((id, request)) => (id, execute(ctl, request)),
        Err((id, e)) => (id, Err(e)),
    };
    match result {
        Ok(v) => {
            let mut out = json!({ "return": v });
            if let Some(id) = id {
                out["id"] = id;
            }
            out
        }
        Err(e) => e.response(id),
    }
}

/// A request's members besides `id` (which is taken out first, so that
/// every error about the others can echo it).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    execute: String,
    /// Absent or `null`: no arguments.
    #[serde(default)]
    arguments: Option<Object>,
}

/// A JSON object (`arguments`), named so in errors.
#[derive(Debug, Default)]
struct Object(Map<String, Value>);

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Object;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Object, A::Error> {
                let mut out = Map::new();
                while let Some((k, v)) = m.next_entry()? {
                    out.insert(k, v);
                }
                Ok(Object(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn parse(bytes: &[u8]) -> Result<(Option<Value>, Request), (Option<Value>, CmdError)> {
    let Unique(value) = serde_json::from_slice(bytes).map_err(|e| (None, json_error(&e)))?;
    let Value::Object(mut obj) = value else {
        return Err((None, generic("a request is a JSON object")));
    };
    let id = obj.remove("id");
    match fields::<Request>(obj, "member") {
        Ok(r) => Ok((id, r)),
        Err(e) => Err((id, e)),
    }
}

/// A request that is not JSON (`malformed JSON: …`) or repeats a key.
pub(crate) fn json_error(e: &serde_json::Error) -> CmdError {
    match e.classify() {
        // Custom errors of [`Unique`]: a duplicate key.
        serde_json::error::Category::Data => generic(e.to_string()),
        _ => generic(format!("malformed JSON: {e}")),
    }
}

/// A JSON value whose objects have no duplicate keys, at any depth: read
/// with it, `{"execute": "stop", "execute": "cont"}` is an error where
/// serde_json's own `Value` keeps the last.
pub(crate) struct Unique(pub(crate) Value);

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor).map(Unique)
    }
}

struct UniqueVisitor;

impl<'de> Visitor<'de> for UniqueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Unique::deserialize(d).map(|u| u.0)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Unique(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "duplicate key '{}'",
                    printable(&key)
                )));
            }
            let Unique(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Reads the members of a JSON object into `T` (a struct deriving
/// `Deserialize` with `deny_unknown_fields`); errors name the `noun`
/// (`member`, `parameter`) and the key at fault.
fn fields<T: DeserializeOwned>(map: Map<String, Value>, noun: &str) -> Result<T, CmdError> {
    T::deserialize(Fields(map)).map_err(|e| {
        generic(match e {
            FieldError::Missing(k) => format!("{noun} '{k}' is missing"),
            FieldError::Unknown(k) => format!("unexpected {noun} '{}'", printable(&k)),
            FieldError::Value(k, msg) => format!("{noun} '{k}': {msg}"),
            FieldError::Other(msg) => msg,
        })
    })
}

/// An object's members, as a [`Deserializer`] whose errors say which key.
struct Fields(Map<String, Value>);

#[derive(Debug)]
enum FieldError {
    Missing(&'static str),
    Unknown(String),
    /// The value of this key did not fit (serde_json's description).
    Value(String, String),
    Other(String),
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            FieldError::Missing(k) => write!(f, "'{k}' is missing"),
            FieldError::Unknown(k) => write!(f, "unexpected '{}'", printable(k)),
            FieldError::Value(k, msg) => write!(f, "'{k}': {msg}"),
            FieldError::Other(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for FieldError {}

impl de::Error for FieldError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        FieldError::Other(msg.to_string())
    }
    fn missing_field(field: &'static str) -> Self {
        FieldError::Missing(field)
    }
    fn unknown_field(field: &str, _expected: &'static [&'static str]) -> Self {
        FieldError::Unknown(field.to_string())
    }
}

impl<'de> Deserializer<'de> for Fields {
    type Error = FieldError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        visitor.visit_map(FieldsAccess {
            iter: self.0.into_iter(),
            value: None,
        })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

struct FieldsAccess {
    iter: serde_json::map::IntoIter,
    value: Option<(String, Value)>,
}

impl<'de> MapAccess<'de> for FieldsAccess {
    type Error = FieldError;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, FieldError> {
        let Some((key, value)) = self.iter.next() else {
            return Ok(None);
        };
        let k = seed.deserialize(key.as_str().into_deserializer())?;
        self.value = Some((key, value));
        Ok(Some(k))
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, FieldError> {
        let (key, value) = self
            .value
            .take()
            .ok_or_else(|| FieldError::Other("a value without a key".into()))?;
        seed.deserialize(value)
            .map_err(|e| FieldError::Value(key, e.to_string()))
    }
}

/// An optional argument that, when given, must be a `T` (`null` is not
/// "absent": it is a value of the wrong type, as in QMP).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A vCPU number (below `MAX_VCPUS`).
#[derive(Debug, Clone, Copy)]
struct Vcpu(usize);

impl<'de> Deserialize<'de> for Vcpu {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Vcpu;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "an unsigned integer below {MAX_VCPUS}")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Vcpu, E> {
                match usize::try_from(v) {
                    Ok(n) if n < MAX_VCPUS => Ok(Vcpu(n)),
                    _ => Err(E::invalid_value(Unexpected::Unsigned(v), &self)),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Vcpu, E> {
                match u64::try_from(v) {
                    Ok(u) => self.visit_u64(u),
                    Err(_) => Err(E::invalid_value(Unexpected::Signed(v), &self)),
                }
            }
        }
        d.deserialize_u64(V)
    }
}

/// An unsigned integer (a rule id).
#[derive(Debug, Clone, Copy)]
struct Uint(u64);

impl<'de> Deserialize<'de> for Uint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Uint;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an unsigned integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Uint, E> {
                Ok(Uint(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Uint, E> {
                u64::try_from(v)
                    .map(Uint)
                    .map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
            }
        }
        d.deserialize_u64(V)
    }
}

/// A knob's value: a string, number or boolean, as text (`64`, `true`).
#[derive(Debug)]
struct KnobValue(String);

impl<'de> Deserialize<'de> for KnobValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KnobValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E>(self, v: &str) -> Result<KnobValue, E> {
                Ok(KnobValue(v.to_string()))
            }
            fn visit_bool<E>(self, v: bool) -> Result<KnobValue, E> {
                Ok(KnobValue(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<KnobValue, E> {
                Ok(KnobValue(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<KnobValue, E> {
                Ok(KnobValue(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<KnobValue, E> {
                Ok(KnobValue(
                    Number::from_f64(v).map_or_else(|| v.to_string(), |n| n.to_string()),
                ))
            }
        }
        d.deserialize_any(V)
    }
}

/// `qmp_capabilities`: QMP clients may ask to enable capabilities; this
/// server offers none.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CapabilitiesArgs {
    #[serde(default, deserialize_with = "present")]
    enable: Option<Vec<String>>,
}

/// Commands without arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

/// `stop`, `cont`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VcpuArgs {
    #[serde(default, deserialize_with = "present")]
    vcpu: Option<Vcpu>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InjectArgs {
    rule: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UninjectArgs {
    id: Uint,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetKnobArgs {
    knob: String,
    value: KnobValue,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TraceStartArgs {
    file: String,
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

/// A command's arguments as `T`.
fn args<T: DeserializeOwned>(map: Map<String, Value>) -> Result<T, CmdError> {
    fields(map, "parameter")
}

/// Runs one request. Its arguments are read in full before anything is
/// done, so a bad request never changes the VM.
fn execute(ctl: &Controller, request: Request) -> Result<Value, CmdError> {
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
            ctl.trace_start(&a.file).map_err(generic)?
        }
        "trace-stop" => {
            let NoArgs {} = args(map)?;
            ctl.trace_stop().map_err(generic)?
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
            ("{not json", "malformed JSON: key must be a string at line 1 column 2"),
            ("[1,2]", "a request is a JSON object"),
            (r#"{"id": 7}"#, "member 'execute' is missing"),
            (
                r#"{"execute": 3}"#,
                "member 'execute': invalid type: integer `3`, expected a string",
            ),
            (
                r#"{"execute": "stop", "arguments": []}"#,
                "member 'arguments': invalid type: sequence, expected an object",
            ),
            (
                r#"{"execute": "stop", "argument": {}}"#,
                "unexpected member 'argument'",
            ),
            (
                r#"{"execute": "stop", "arguments": {"vcpu": "one"}}"#,
                "parameter 'vcpu': invalid type: string \"one\", expected an unsigned integer below 64",
            ),
            (
                r#"{"execute": "stop", "arguments": {"vcpu": 100000}}"#,
                "parameter 'vcpu': invalid value: integer `100000`, expected an unsigned integer below 64",
            ),
            (
                r#"{"execute": "stop", "arguments": {"vcpu": null}}"#,
                "parameter 'vcpu': invalid type: null",
            ),
            (
                r#"{"execute": "stop", "arguments": {"cpu": 1}}"#,
                "unexpected parameter 'cpu'",
            ),
            (
                r#"{"execute": "query-status", "arguments": {"\u001b[2J": 1}}"#,
                "unexpected parameter '\\u{1b}[2J'",
            ),
            (
                "{\"execute\": \"stop\", \"arguments\": {\"\u{feff}vcpu\": 1}}",
                "unexpected parameter '\\u{feff}vcpu'",
            ),
            (r#"{"execute": "inject"}"#, "parameter 'rule' is missing"),
            (
                r#"{"execute": "inject", "arguments": {"rule": "explode@nowhere"}}"#,
                "",
            ),
            (
                r#"{"execute": "set-knob", "arguments": {"knob": "no_such", "value": "on"}}"#,
                "",
            ),
            (
                r#"{"execute": "set-knob", "arguments": {"knob": "tlb_capacity", "value": [1]}}"#,
                "parameter 'value': invalid type: sequence, expected a string, number or boolean",
            ),
            (
                r#"{"execute": "uninject", "arguments": {"id": 99}}"#,
                "no rule with id 99",
            ),
            (
                r#"{"execute": "uninject", "arguments": {"id": -1}}"#,
                "parameter 'id': invalid value: integer `-1`, expected an unsigned integer",
            ),
            (
                r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#,
                "capability 'oob' is not available",
            ),
            (
                r#"{"execute": "stop", "execute": "cont"}"#,
                "duplicate key 'execute' at line 1 column 29",
            ),
            (
                r#"{"execute": "stop", "arguments": {"vcpu": 1, "vcpu": 2}}"#,
                "duplicate key 'vcpu'",
            ),
            (
                r#"{"execute": "stop", "id": {"a": 1, "a": 1}}"#,
                "duplicate key 'a'",
            ),
            // A command's own message quoting what was sent (found by
            // tests/cli_fuzz.rs: the NUL went out raw).
            (
                r#"{"execute": "inject", "arguments": {"rule": "\u0000pause@fault:enter"}}"#,
                "unknown action '\\u{0}pause'",
            ),
            (
                r#"{"execute": "inject", "arguments": {"rule": "count@x\u001b[2J"}}"#,
                "unknown injection point 'x\\u{1b}[2J'",
            ),
            (
                r#"{"execute": "set-knob", "arguments": {"knob": "\u202etlb", "value": 1}}"#,
                "\\u{202e}tlb",
            ),
        ] {
            let r = ask(&ctl, line);
            assert_eq!(r["error"]["class"], "GenericError", "{line}: {r}");
            assert!(error_desc(&r).contains(want), "{line}: {r}");
        }
        let r = ask(&ctl, r#"{"execute": "frobnicate", "id": "x"}"#);
        assert_eq!(r["error"]["class"], "CommandNotFound");
        assert_eq!(error_desc(&r), "the command frobnicate has not been found");
        assert_eq!(r["id"], "x");
        // The id is echoed whatever else is wrong, `null` included.
        let r = ask(&ctl, r#"{"execute": 1, "id": null}"#);
        assert_eq!(r.get("id"), Some(&Value::Null), "{r}");
        let r = ask(&ctl, r#"{"execute": "stop", "bogus": 1, "id": [1]}"#);
        assert_eq!(r["id"], json!([1]), "{r}");
    }

    #[test]
    fn deep_nesting_is_refused_without_deep_recursion() {
        let ctl = Controller::new(false);
        for deep in [
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
            format!(
                r#"{{"execute": "stop", "id": {}1{}}}"#,
                r#"{"a":"#.repeat(30_000),
                "}".repeat(30_000)
            ),
        ] {
            let r = ask(&ctl, &deep);
            assert!(
                error_desc(&r).contains("recursion limit exceeded"),
                "{}",
                error_desc(&r)
            );
        }
        assert!(!ctl.gate.any_stopped());
    }

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
