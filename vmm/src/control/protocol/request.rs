//! A request's typed structs (serde derive, `deny_unknown_fields`) and
//! their parsing: a JSON tree without duplicate keys ([`Unique`]), then
//! its members and a command's arguments through [`Fields`], whose errors
//! are worded as QMP words them.

use std::fmt;

use serde::de::{self, DeserializeOwned, IntoDeserializer, MapAccess, Unexpected, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Number, Value};

use cowlab_abi::layout::MAX_VCPUS;

use super::response::{generic, CmdError};
use crate::control::printable;

/// A request's members besides `id` (which is taken out first, so that
/// every error about the others can echo it).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Request {
    pub(super) execute: String,
    /// Absent or `null`: no arguments.
    #[serde(default)]
    pub(super) arguments: Option<Object>,
}

/// A JSON object (`arguments`), named so in errors.
#[derive(Debug, Default)]
pub(super) struct Object(pub(super) Map<String, Value>);

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

pub(super) fn parse(bytes: &[u8]) -> Result<(Option<Value>, Request), (Option<Value>, CmdError)> {
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
pub(super) struct Vcpu(pub(super) usize);

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
pub(super) struct Uint(pub(super) u64);

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
pub(super) struct KnobValue(pub(super) String);

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
pub(super) struct CapabilitiesArgs {
    #[serde(default, deserialize_with = "present")]
    pub(super) enable: Option<Vec<String>>,
}

/// Commands without arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NoArgs {}

/// `stop`, `cont`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct VcpuArgs {
    #[serde(default, deserialize_with = "present")]
    pub(super) vcpu: Option<Vcpu>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InjectArgs {
    pub(super) rule: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UninjectArgs {
    pub(super) id: Uint,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SetKnobArgs {
    pub(super) knob: String,
    pub(super) value: KnobValue,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TraceStartArgs {
    pub(super) file: String,
}

/// A command's arguments as `T`.
pub(super) fn args<T: DeserializeOwned>(map: Map<String, Value>) -> Result<T, CmdError> {
    fields(map, "parameter")
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::super::{ask, error_desc};
    use crate::control::Controller;

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
}
