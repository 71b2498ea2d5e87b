//! Loading a guest ELF (docs/design.md §3): a static x86-64 executable whose
//! PT_LOAD segments have physical addresses inside the image area of the
//! kernel region and virtual addresses in the kernel half.

use cowlab_abi::layout::{kernel_va, IMAGE_PHYS, VCPU_AREAS_PHYS};

use super::error::ImageError;

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

fn u16_at(b: &[u8], at: usize) -> Result<u16, ImageError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes(s.try_into().expect("2 bytes")))
        .ok_or(ImageError::Truncated(at))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, ImageError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .ok_or(ImageError::Truncated(at))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, ImageError> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
        .ok_or(ImageError::Truncated(at))
}

/// Parses and checks a guest ELF; every error says what is wrong.
pub fn parse(elf: &[u8]) -> Result<Image, ImageError> {
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err(ImageError::NotElf);
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err(ImageError::NotElf64);
    }
    if u16_at(elf, 16)? != ET_EXEC || u16_at(elf, 18)? != EM_X86_64 {
        return Err(ImageError::NotStaticX86_64);
    }
    let entry = u64_at(elf, 24)?;
    let phoff = u64_at(elf, 32)? as usize;
    let phentsize = u16_at(elf, 54)? as usize;
    let phnum = u16_at(elf, 56)? as usize;
    if phentsize < 56 {
        return Err(ImageError::ProgramHeaderSize(phentsize));
    }
    let mut segments = Vec::new();
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i * phentsize)
            .ok_or(ImageError::ProgramHeaderOverflow)?;
        if u32_at(elf, ph)? != PT_LOAD {
            continue;
        }
        let offset = u64_at(elf, ph + 8)? as usize;
        let vaddr = u64_at(elf, ph + 16)?;
        let pa = u64_at(elf, ph + 24)?;
        let file_size = u64_at(elf, ph + 32)? as usize;
        let mem_size = u64_at(elf, ph + 40)?;
        let end = pa
            .checked_add(mem_size)
            .ok_or(ImageError::SegmentSizeOverflow)?;
        if pa < IMAGE_PHYS || end > VCPU_AREAS_PHYS || (file_size as u64) > mem_size {
            return Err(ImageError::SegmentOutsideImage {
                pa,
                end,
                start: IMAGE_PHYS,
                limit: VCPU_AREAS_PHYS,
            });
        }
        if vaddr != kernel_va(pa) {
            return Err(ImageError::SegmentVirtual { vaddr, pa });
        }
        let file_end = offset.checked_add(file_size).filter(|e| *e <= elf.len());
        let file_end = file_end.ok_or(ImageError::SegmentPastEnd(i))?;
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
        return Err(ImageError::EntryOutside(entry));
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
        assert!(parse(&bad).unwrap_err().to_string().contains("entry point"));
    }
}
