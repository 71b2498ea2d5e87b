//! `cowlab ctl`: sends one command to a control socket and prints the
//! answer, or (`watch`) prints the events as they come.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::printable;
use crate::kvm::exit_code;

/// Why `cowlab ctl` could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("argument '{0}' is not KEY=VALUE")]
    NotKeyValue(String),
    #[error("argument '{0}' has no key")]
    NoKey(String),
    #[error("argument '{0}' given twice")]
    Twice(String),
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("{0}: {1}")]
    Socket(String, std::io::Error),
    /// The socket answered its greeting with an error (e.g. busy).
    #[error("{0}: {1}")]
    Refused(String, String),
    #[error("{0}: not a cowlab control socket (greeting {1})")]
    NotControl(String, Value),
    #[error("the control socket closed")]
    Closed,
    #[error("bad line from the socket: {0}")]
    BadLine(serde_json::Error),
    #[error("reading the control socket: {0}")]
    Read(std::io::Error),
}

impl ClientError {
    /// Bad arguments are the user's (2); the rest is the socket's (3).
    fn exit_code(&self) -> i32 {
        match self {
            ClientError::NotKeyValue(_) | ClientError::NoKey(_) | ClientError::Twice(_) => {
                exit_code::USAGE
            }
            _ => exit_code::VM_ERROR,
        }
    }
}

/// `KEY=VALUE` arguments as a JSON object: a VALUE that parses as JSON (a
/// number, `true`, a quoted string) is taken as such, anything else as a
/// string.
pub fn parse_args(args: &[String]) -> Result<Map<String, Value>, ClientError> {
    let mut map = Map::new();
    for a in args {
        let Some((k, v)) = a.split_once('=') else {
            return Err(ClientError::NotKeyValue(a.clone()));
        };
        if k.is_empty() {
            return Err(ClientError::NoKey(a.clone()));
        }
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        if map.insert(k.to_string(), value).is_some() {
            return Err(ClientError::Twice(printable(k).into_owned()));
        }
    }
    Ok(map)
}

fn connect(socket: &Path) -> Result<(UnixStream, BufReader<UnixStream>), ClientError> {
    let shown = || socket.display().to_string();
    let stream = UnixStream::connect(socket).map_err(|e| ClientError::Connect(shown(), e))?;
    let mut reader = BufReader::new(
        stream
            .try_clone()
            .map_err(|e| ClientError::Socket(shown(), e))?,
    );
    let greeting = read_json(&mut reader)?;
    if let Some(desc) = greeting["error"]["desc"].as_str() {
        return Err(ClientError::Refused(shown(), desc.to_string()));
    }
    if greeting.get("QMP").is_none() {
        return Err(ClientError::NotControl(shown(), greeting));
    }
    Ok((stream, reader))
}

fn read_json(reader: &mut impl BufRead) -> Result<Value, ClientError> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => Err(ClientError::Closed),
        Ok(_) => serde_json::from_str(&line).map_err(ClientError::BadLine),
        Err(e) => Err(ClientError::Read(e)),
    }
}

/// Runs `cowlab ctl`; returns the exit status.
pub fn ctl(socket: &Path, command: &str, args: &[String]) -> i32 {
    let fail = |msg: String, code: i32| {
        eprintln!("cowlab: {msg}");
        code
    };
    let arguments = match parse_args(args) {
        Ok(a) => a,
        Err(e) => return fail(e.to_string(), e.exit_code()),
    };
    let (mut stream, mut reader) = match connect(socket) {
        Ok(c) => c,
        Err(e) => return fail(e.to_string(), e.exit_code()),
    };
    if command == "watch" {
        return watch(&mut reader);
    }
    let request = json!({ "execute": command, "arguments": arguments, "id": 1 });
    if let Err(e) = writeln!(stream, "{request}") {
        return fail(
            format!("writing the control socket: {e}"),
            exit_code::VM_ERROR,
        );
    }
    // Events may come before the answer; the answer carries our id.
    loop {
        let v = match read_json(&mut reader) {
            Ok(v) => v,
            Err(e) => return fail(e.to_string(), e.exit_code()),
        };
        if v.get("event").is_some() {
            continue;
        }
        if let Some(r) = v.get("return") {
            let text = serde_json::to_string_pretty(r).unwrap_or_default();
            let mut out = std::io::stdout().lock();
            return match writeln!(out, "{text}").and_then(|()| out.flush()) {
                // A closed pipe (`| head`): the reader wanted no more.
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    fail(format!("cannot write to stdout: {e}"), exit_code::VM_ERROR)
                }
                _ => exit_code::OK,
            };
        }
        let class = v["error"]["class"].as_str().unwrap_or("GenericError");
        let desc = v["error"]["desc"].as_str().unwrap_or("no description");
        // The server's text may quote what was sent: no raw control
        // characters reach the terminal.
        return fail(
            format!(
                "{}: {}: {}",
                printable(command),
                printable(class),
                printable(desc)
            ),
            exit_code::FAILED,
        );
    }
}

/// Prints each event line until the socket closes.
fn watch(reader: &mut impl BufRead) -> i32 {
    let mut out = std::io::stdout().lock();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return exit_code::OK,
            Ok(_) => match out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return exit_code::OK,
                Err(e) => {
                    eprintln!("cowlab: cannot write to stdout: {e}");
                    return exit_code::VM_ERROR;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_value_arguments_become_json() {
        let a = parse_args(&[
            "vcpu=1".into(),
            "rule=pause@fork:enter".into(),
            "x=\"2\"".into(),
        ])
        .unwrap();
        assert_eq!(a["vcpu"], 1);
        assert_eq!(a["rule"], "pause@fork:enter");
        assert_eq!(a["x"], "2");
        assert!(parse_args(&["novalue".into()]).is_err());
        let twice = parse_args(&["vcpu=1".into(), "vcpu=2".into()]).unwrap_err();
        assert!(twice.to_string().contains("'vcpu' given twice"), "{twice}");
        assert!(parse_args(&["=1".into()]).is_err());
    }
}
