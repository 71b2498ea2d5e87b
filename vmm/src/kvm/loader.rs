//! Loading a guest ELF (DESIGN.md §3): a static x86-64 executable whose
//! PT_LOAD segments have physical addresses inside the image area of the
//! kernel region and virtual addresses in the kernel half.

use cowlab_abi::layout::{kernel_va, IMAGE_PHYS, VCPU_AREAS_PHYS};

/// A PT_LOAD segment: `file` bytes of the ELF at `pa`, then zeroes up to `mem_size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub pa: u64,
    pub file: std::ops::Range<usize>,
    pub mem_size: u64,
}

/// What the VMM needs from a guest ELF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub entry: u64,
    pub segments: Vec<Segment>,
}

const PT_LOAD: u32 = 1;
const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;

fn u16_at(b: &[u8], at: usize) -> Result<u16, String> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes(s.try_into().expect("2 bytes")))
        .ok_or_else(|| format!("ELF truncated at offset {at}"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, String> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .ok_or_else(|| format!("ELF truncated at offset {at}"))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, String> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
        .ok_or_else(|| format!("ELF truncated at offset {at}"))
}

/// Parses and checks a guest ELF; every error says what is wrong.
pub fn parse(elf: &[u8]) -> Result<Image, String> {
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file".into());
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("not a little-endian 64-bit ELF".into());
    }
    if u16_at(elf, 16)? != ET_EXEC || u16_at(elf, 18)? != EM_X86_64 {
        return Err("not a static x86-64 executable (link with -static -no-pie)".into());
    }
    let entry = u64_at(elf, 24)?;
    let phoff = u64_at(elf, 32)? as usize;
    let phentsize = u16_at(elf, 54)? as usize;
    let phnum = u16_at(elf, 56)? as usize;
    if phentsize < 56 {
        return Err(format!("program header size {phentsize} is too small"));
    }
    let mut segments = Vec::new();
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i * phentsize)
            .ok_or("program header offset overflows")?;
        if u32_at(elf, ph)? != PT_LOAD {
            continue;
        }
        let offset = u64_at(elf, ph + 8)? as usize;
        let vaddr = u64_at(elf, ph + 16)?;
        let pa = u64_at(elf, ph + 24)?;
        let file_size = u64_at(elf, ph + 32)? as usize;
        let mem_size = u64_at(elf, ph + 40)?;
        let end = pa.checked_add(mem_size).ok_or("segment size overflows")?;
        if pa < IMAGE_PHYS || end > VCPU_AREAS_PHYS || (file_size as u64) > mem_size {
            return Err(format!(
                "segment at physical {pa:#x}..{end:#x} is outside the image area {IMAGE_PHYS:#x}..{VCPU_AREAS_PHYS:#x}"
            ));
        }
        if vaddr != kernel_va(pa) {
            return Err(format!(
                "segment virtual {vaddr:#x} is not KERNEL_BASE + {pa:#x} (use guest/link.ld)"
            ));
        }
        let file_end = offset.checked_add(file_size).filter(|e| *e <= elf.len());
        let file_end =
            file_end.ok_or_else(|| format!("segment {i} extends past the end of the file"))?;
        segments.push(Segment {
            pa,
            file: offset..file_end,
            mem_size,
        });
    }
    let inside = segments
        .iter()
        .any(|s| (kernel_va(s.pa)..kernel_va(s.pa) + s.mem_size).contains(&entry));
    if !inside {
        return Err(format!(
            "entry point {entry:#x} is not inside a loaded segment"
        ));
    }
    Ok(Image { entry, segments })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_guest_parses() {
        let image = parse(crate::kvm::GUEST_ELF).unwrap();
        assert!(!image.segments.is_empty());
        assert!(image.entry >= kernel_va(IMAGE_PHYS));
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        assert!(parse(b"").is_err());
        assert!(parse(b"MZ\x90\x00").is_err());
        let elf = crate::kvm::GUEST_ELF;
        for cut in [5, 20, 40, 64, 100, 200] {
            assert!(parse(&elf[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = elf.to_vec();
        bad[24..32].copy_from_slice(&0u64.to_le_bytes());
        assert!(parse(&bad).unwrap_err().contains("entry point"));
    }
}
