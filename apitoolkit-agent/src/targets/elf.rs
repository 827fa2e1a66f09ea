//! What the agent needs from an executable or shared library on disk: whether it is a Go
//! binary, and the file offsets of exported functions (where uprobes attach).

use std::{fs::File, io, path::Path};

use memmap2::Mmap;
use object::{Object, ObjectSection, ObjectSymbol, SectionKind};

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a readable ELF file: {0}")]
    Parse(#[from] object::Error),
}

pub struct ElfFile {
    map: Mmap,
}

impl ElfFile {
    pub fn open(path: &Path) -> Result<Self, ElfError> {
        let file = File::open(path)?;
        // SAFETY: read-only private mapping; a file truncated underneath us can only make the
        // parser see garbage or fault, and binaries in use are not truncated in place.
        let map = unsafe { Mmap::map(&file) }?;
        object::File::parse(&*map)?;
        Ok(Self { map })
    }

    fn parsed(&self) -> object::File<'_> {
        object::File::parse(&*self.map).expect("parsed when opened")
    }

    /// Go binaries carry their build information in this section (Go 1.13+).
    pub fn is_go(&self) -> bool {
        self.section(".go.buildinfo").is_some()
    }

    /// Whether the machine code is x86-64, the only code the probe sites are decoded as.
    pub fn is_x86_64(&self) -> bool {
        self.parsed().architecture() == object::Architecture::X86_64
    }

    /// The contents and virtual address of the first section named `name` or ending in it (a
    /// PIE Go binary keeps `.gopclntab` as `.data.rel.ro.gopclntab`).
    pub fn section(&self, name: &str) -> Option<(u64, &[u8])> {
        let file = self.parsed();
        let section = file
            .sections()
            .find(|section| section.name().is_ok_and(|found| found.ends_with(name)))?;
        let (start, size) = section.file_range()?;
        let bytes = self
            .map
            .get(start as usize..start.checked_add(size)? as usize)?;
        Some((section.address(), bytes))
    }

    /// `len` bytes of file-backed data at virtual `address`, within one section.
    pub fn data(&self, address: u64, len: usize) -> Option<&[u8]> {
        self.parsed().sections().find_map(|section| {
            let (start, size) = section.file_range()?;
            if section.address() == 0 {
                return None; // not loaded (symbols, debug information)
            }
            let skip = address.checked_sub(section.address())?;
            let end = skip.checked_add(len as u64)?;
            if end > size {
                return None;
            }
            self.map
                .get(start.checked_add(skip)? as usize..start.checked_add(end)? as usize)
        })
    }

    /// The virtual address of the symbol `name` (symbol table only: stripped files have none).
    pub fn symbol_address(&self, name: &str) -> Option<u64> {
        self.parsed()
            .symbols()
            .find(|symbol| symbol.name() == Ok(name))
            .map(|symbol| symbol.address())
    }

    /// Whether a system linker linked the file (it has the C runtime's `.init` section, which
    /// Go's own linker never writes): code of its own may then precede Go's text.
    pub fn externally_linked(&self) -> bool {
        self.parsed().section_by_name(".init").is_some()
    }

    /// The virtual address of the executable section `.text`.
    pub fn text_address(&self) -> Option<u64> {
        self.parsed()
            .section_by_name(".text")
            .map(|section| section.address())
    }

    /// The virtual address the byte at file `offset` is loaded at.
    pub fn address_of(&self, offset: u64) -> Option<u64> {
        self.parsed().sections().find_map(|section| {
            let (start, size) = section.file_range()?;
            (offset >= start && offset < start + size).then(|| section.address() + (offset - start))
        })
    }

    /// Up to `len` bytes of machine code at virtual `address`, with their file offset: only
    /// inside an executable section, never past its end.
    pub fn code(&self, address: u64, len: usize) -> Option<(u64, &[u8])> {
        let file = self.parsed();
        let section = file.sections().find(|section| {
            section.kind() == SectionKind::Text
                && address >= section.address()
                && address < section.address() + section.size()
        })?;
        let (start, size) = section.file_range()?;
        let offset = start + (address - section.address());
        let end = (offset + len as u64).min(start + size);
        let bytes = self.map.get(offset as usize..end as usize)?;
        Some((offset, bytes))
    }

    /// File offsets of those of `names` the file defines, in the order of `names`.
    pub fn function_offsets<'n>(&self, names: &[&'n str]) -> Vec<(&'n str, u64)> {
        let file = self.parsed();
        let mut found: Vec<Option<u64>> = vec![None; names.len()];
        for symbol in file.dynamic_symbols().chain(file.symbols()) {
            if !symbol.is_definition() {
                continue;
            }
            let Ok(name) = symbol.name() else {
                continue;
            };
            let Some(index) = names.iter().position(|wanted| *wanted == name) else {
                continue;
            };
            if found[index].is_some() {
                continue;
            }
            // The kernel wants offsets in the file, not virtual addresses.
            found[index] = symbol
                .section_index()
                .and_then(|section| file.section_by_index(section).ok())
                .and_then(|section| {
                    let (file_offset, _) = section.file_range()?;
                    Some(symbol.address() - section.address() + file_offset)
                });
        }
        names
            .iter()
            .zip(found)
            .filter_map(|(name, offset)| offset.map(|offset| (*name, offset)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_exported_functions_of_libc_and_knows_it_is_not_go() {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let libc = maps
            .lines()
            .filter_map(|line| line.split_whitespace().nth(5))
            .find(|path| path.contains("libc.so"))
            .expect("the test binary links libc dynamically");
        let elf = ElfFile::open(Path::new(libc)).unwrap();
        let offsets = elf.function_offsets(&["write", "no_such_function_here", "read"]);
        let names: Vec<_> = offsets.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, ["write", "read"]);
        assert!(offsets.iter().all(|(_, offset)| *offset > 0));
        assert!(!elf.is_go());
    }

    #[test]
    fn a_non_elf_file_is_an_error() {
        assert!(matches!(
            ElfFile::open(Path::new("/proc/self/cmdline")),
            Err(ElfError::Parse(_) | ElfError::Io(_))
        ));
    }
}
