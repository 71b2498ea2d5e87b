//! The trace file format (docs/trace-format.md): a 16-byte header, then
//! records of a 16-byte header (kind, track, payload length, timestamp)
//! and a payload of little-endian 64-bit words, then, for some kinds, a
//! UTF-8 text.

use std::fmt;

/// The file starts with these 8 bytes.
pub const MAGIC: &[u8; 8] = b"COWTRACE";
/// The format version after the magic (u16).
pub const VERSION: u16 = 1;
/// The track of events not made on a vCPU's thread.
pub const VMM_TRACK: u16 = 0xffff;

const HEADER_LEN: usize = 16;
const RECORD_HEADER_LEN: usize = 16;
/// A record's payload may not be larger (a corrupt length is caught).
const MAX_PAYLOAD: usize = 1 << 20;

macro_rules! kinds {
    ($($name:ident = $code:literal, $words:literal, $text:literal, $doc:literal;)*) => {
        /// What a record is. Each kind has a fixed number of words and may
        /// carry a text.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Kind {
            $(#[doc = $doc] $name = $code,)*
        }

        impl Kind {
            pub fn from_code(code: u8) -> Option<Kind> {
                match code {
                    $($code => Some(Kind::$name),)*
                    _ => None,
                }
            }

            /// The number of payload words.
            pub fn words(self) -> usize {
                match self {
                    $(Kind::$name => $words,)*
                }
            }

            /// Whether a text follows the words.
            pub fn has_text(self) -> bool {
                match self {
                    $(Kind::$name => $text,)*
                }
            }

            /// The name `cowlab trace show --kind` takes.
            pub fn name(self) -> &'static str {
                match self {
                    $(Kind::$name => stringify!($name),)*
                }
            }

            pub const ALL: &'static [Kind] = &[$(Kind::$name,)*];
        }
    };
}

kinds! {
    RunBegin = 1, 1, true, "a run starts: [index]; text: test and policy";
    RunEnd = 2, 1, true, "a run ends: [0 no witness, 1 witness, 2 unreachable, 3 not a litmus run or cut short, 4 error]; text: final state";
    Exit = 3, 2, false, "the vCPU left the guest: [reason, detail] (1 hypercall nr, 2 interrupted, 3 memory revoked, 4 other)";
    Resume = 4, 0, false, "the vCPU enters the guest again";
    Fault = 5, 2, false, "a forwarded page fault: [address, access 0 read 1 write 2 exec]";
    FaultEnd = 6, 2, false, "the fault is handled: [address, 0 ok 1 segv 2 oom 3 interrupted/other]";
    Resolve = 7, 2, false, "how the mm resolved it: [address, 1 fill 2 anon 3 zero page 4 reuse 5 copy 6 unshare 7 userfault]";
    Fill = 8, 2, false, "a shadow (TLB) entry installed: [page, entry]";
    Evict = 9, 1, false, "a shadow entry dropped by capacity: [page]";
    FlushBegin = 10, 2, false, "flush_tlb_range starts: [start, end]";
    FlushEnd = 11, 1, false, "flush_tlb_range finished, every CPU acknowledged: [start]";
    IpiSend = 12, 2, false, "a shootdown request to a CPU: [target, generation]";
    IpiAck = 13, 2, false, "the target acknowledged (on its track, when the initiator saw it): [target, generation]";
    Pte = 14, 4, false, "a logical PTE changed: [mm, page, old, new]";
    Copy = 15, 3, false, "a page copied: [page, source frame, destination frame]";
    Pin = 16, 3, false, "GUP took a reference or pin: [page, frame, 1 pin 0 get]";
    Unpin = 17, 1, false, "a pin or reference released: [frame]";
    Point = 18, 1, true, "an injection point hit: [address or 2^64-1]; text: the point";
    Rule = 19, 1, true, "a rule acted: [address or 2^64-1]; text: the rule";
    LockWait = 20, 1, true, "waiting: [1 mmap_lock 2 VMA lock 3 PTL 4 a schedule's earlier step 5 a pause rule]; text: the holder, or what is awaited";
    LockDone = 21, 1, false, "got the lock waited for: [lock]";
    Regs = 22, 10, false, "a litmus thread's final registers r0-r9";
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Byte offset in the file.
    pub offset: usize,
    pub kind: Kind,
    pub track: u16,
    /// Nanoseconds since the recorder started.
    pub ts: u64,
    pub words: Vec<u64>,
    pub text: String,
}

/// A file that cannot be read as a trace, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceError {
    pub offset: usize,
    pub msg: String,
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "offset {}: {}", self.offset, self.msg)
    }
}

/// The file header.
pub fn header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h
}

/// Appends one record to `buf`.
pub fn encode(buf: &mut Vec<u8>, kind: Kind, track: u16, ts: u64, words: &[u64], text: &str) {
    debug_assert_eq!(words.len(), kind.words(), "{kind:?}");
    let text = if kind.has_text() {
        text.as_bytes()
    } else {
        &[]
    };
    let len = words.len() * 8 + text.len();
    buf.push(kind as u8);
    buf.push(0);
    buf.extend_from_slice(&track.to_le_bytes());
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    buf.extend_from_slice(&ts.to_le_bytes());
    for w in words {
        buf.extend_from_slice(&w.to_le_bytes());
    }
    buf.extend_from_slice(text);
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

/// Decodes a whole trace file.
pub fn read_trace(data: &[u8]) -> Result<Vec<Record>, TraceError> {
    let err = |offset: usize, msg: String| Err(TraceError { offset, msg });
    if data.len() < HEADER_LEN {
        return err(
            0,
            format!("truncated header ({} bytes, need {HEADER_LEN})", data.len()),
        );
    }
    if &data[..8] != MAGIC {
        return err(0, "not a cowlab trace (no COWTRACE magic)".into());
    }
    let version = u16::from_le_bytes([data[8], data[9]]);
    if version != VERSION {
        return err(
            8,
            format!("format version {version}, this cowlab reads {VERSION}"),
        );
    }
    let mut records = Vec::new();
    let mut at = HEADER_LEN;
    while at < data.len() {
        let rest = &data[at..];
        if rest.len() < RECORD_HEADER_LEN {
            return err(
                at,
                format!(
                    "truncated record header ({} of {RECORD_HEADER_LEN} bytes)",
                    rest.len()
                ),
            );
        }
        let Some(kind) = Kind::from_code(rest[0]) else {
            return err(at, format!("unknown record kind {}", rest[0]));
        };
        let track = u16::from_le_bytes([rest[2], rest[3]]);
        let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        let ts = le_u64(&rest[8..16]);
        let need = kind.words() * 8;
        if len < need || (!kind.has_text() && len != need) || len > MAX_PAYLOAD {
            return err(
                at,
                format!("{} record with a payload of {len} bytes", kind.name()),
            );
        }
        let payload = &rest[RECORD_HEADER_LEN..];
        if payload.len() < len {
            return err(
                at,
                format!(
                    "truncated {} record ({} of {len} payload bytes)",
                    kind.name(),
                    payload.len()
                ),
            );
        }
        let words = payload[..need].chunks(8).map(le_u64).collect();
        let Ok(text) = std::str::from_utf8(&payload[need..len]) else {
            return err(
                at + RECORD_HEADER_LEN + need,
                format!("{} record text is not UTF-8", kind.name()),
            );
        };
        records.push(Record {
            offset: at,
            kind,
            track,
            ts,
            words,
            text: text.to_string(),
        });
        at += RECORD_HEADER_LEN + len;
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut b = header().to_vec();
        encode(&mut b, Kind::RunBegin, VMM_TRACK, 1, &[1], "t@mainline");
        encode(&mut b, Kind::Fault, 0, 2, &[0x1000, 1], "");
        encode(&mut b, Kind::Point, 0, 3, &[0x1000], "fault:enter");
        encode(&mut b, Kind::RunEnd, VMM_TRACK, 4, &[1], "P0:r1=1;");
        b
    }

    #[test]
    fn records_round_trip() {
        let r = read_trace(&sample()).unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!((r[1].kind, r[1].track, r[1].ts), (Kind::Fault, 0, 2));
        assert_eq!(r[1].words, [0x1000, 1]);
        assert_eq!(r[2].text, "fault:enter");
        assert_eq!(r[3].offset, r[2].offset + 16 + 8 + "fault:enter".len());
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_with_its_offset() {
        let good = sample();
        for cut in 0..good.len() {
            if cut == 16 {
                continue; // the header alone is an empty trace
            }
            let is_boundary = read_trace(&good).unwrap().iter().any(|r| r.offset == cut);
            let res = read_trace(&good[..cut]);
            if is_boundary {
                assert!(res.is_ok(), "cut at a record boundary {cut}");
            } else {
                let e = res.unwrap_err();
                assert!(e.offset <= cut, "cut {cut}: {e}");
            }
        }
        let mut bad = good.clone();
        bad[16] = 200;
        assert_eq!(
            read_trace(&bad).unwrap_err().to_string(),
            "offset 16: unknown record kind 200"
        );
        let mut bad = good.clone();
        bad[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_trace(&bad).unwrap_err().msg.contains("payload of"));
        let mut bad = good;
        bad[0] = b'X';
        assert_eq!(read_trace(&bad).unwrap_err().offset, 0);
    }
}
