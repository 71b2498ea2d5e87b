//! `cowlab trace show` and `cowlab trace export`: a trace file read back.

use super::output::{error, output_failed, read_input, stdout_written, MAX_TRACE_FILE};
use crate::kvm::exit_code;
use crate::trace;

/// Reads trace `file`, or says why not (with the offset) and exits 2.
fn load_trace(file: &std::path::Path) -> Result<Vec<trace::Record>, i32> {
    let data = read_input(file, MAX_TRACE_FILE, true).map_err(|e| {
        error(e);
        exit_code::USAGE
    })?;
    trace::read_trace(&data).map_err(|e| {
        error(format_args!("{}: {e}", file.display()));
        exit_code::USAGE
    })
}

/// `cowlab trace show FILE [--vcpu N] [--kind K]...`.
pub fn trace_show(file: &std::path::Path, vcpu: Option<u16>, kinds: &[String]) -> i32 {
    let mut wanted = Vec::new();
    for k in kinds {
        match trace::Kind::ALL
            .iter()
            .find(|x| x.name().eq_ignore_ascii_case(k))
        {
            Some(x) => wanted.push(*x),
            None => {
                let all: Vec<&str> = trace::Kind::ALL.iter().map(|k| k.name()).collect();
                error(format_args!(
                    "unknown event kind '{k}' (kinds: {})",
                    all.join(", ")
                ));
                return exit_code::USAGE;
            }
        }
    }
    match load_trace(file) {
        Ok(records) => {
            let stdout = std::io::stdout();
            let mut w = std::io::BufWriter::new(stdout.lock());
            // A closed pipe (`| head`) ends the listing; it is not an error.
            stdout_written(trace::export::show(&records, vcpu, &wanted, &mut w));
            exit_code::OK
        }
        Err(code) => code,
    }
}

/// `cowlab trace export FILE --format chrome -o OUT`.
pub fn trace_export(file: &std::path::Path, format: &str, dest: &std::path::Path) -> i32 {
    if format != "chrome" {
        error(format_args!(
            "unknown trace format '{format}' (formats: chrome)"
        ));
        return exit_code::USAGE;
    }
    let records = match load_trace(file) {
        Ok(r) => r,
        Err(code) => return code,
    };
    // A path that cannot be created is a usage error (2); a write that
    // fails (a full disk) is 3, as for every output.
    let file = match std::fs::File::create(dest) {
        Ok(f) => f,
        Err(e) => {
            error(format_args!("cannot create {}: {e}", dest.display()));
            return exit_code::USAGE;
        }
    };
    let mut w = std::io::BufWriter::new(file);
    match trace::export::chrome(&records, &mut w) {
        Ok(()) => exit_code::OK,
        Err(e) => {
            output_failed(format_args!("cannot write {}: {e}", dest.display()));
            exit_code::VM_ERROR
        }
    }
}
