//! Go executables: which Go built them (`.go.buildinfo`), where their functions are (the
//! `.gopclntab` function table, which stripping keeps), and where `crypto/tls` is probed.
//!
//! Go does TLS in Go, so there is no library to probe: the uprobes go on
//! `crypto/tls.(*Conn).Read` and `Write` in the executable itself. Never uretprobes: Go moves
//! goroutine stacks and walks them, and a rewritten return address crashes the service. `Read`
//! is probed where it copies the plaintext out (its `runtime.memmove` call), or, where the code
//! does not prove that site, at its entry and every `ret`.

use iced_x86::Register;

use super::{elf::ElfFile, probe_site};

/// Register-ABI Go (1.17+) passes the receiver and the slice in RAX, RBX, RCX and keeps the
/// running goroutine in R14: the probes need all four as the function received them.
const ARGUMENT_REGISTERS: [Register; 4] =
    [Register::RAX, Register::RBX, Register::RCX, Register::R14];
pub const TLS_READ: &str = "crypto/tls.(*Conn).Read";
pub const TLS_WRITE: &str = "crypto/tls.(*Conn).Write";
const MEMMOVE: &str = "runtime.memmove";
/// The closure `runtime.newproc` (the `go` statement) runs on the system stack: it calls
/// `newproc1(fn, callergp, ...)`, then `runqput(pp, newg, ...)`.
pub const NEWPROC_CLOSURE: &str = "runtime.newproc.func1";
const NEWPROC1: &str = "runtime.newproc1";
const RUNQPUT: &str = "runtime.runqput";
pub const ROUND_TRIP: &str = "net/http.(*persistConn).roundTrip";
pub const READ_LOOP: &str = "net/http.(*persistConn).readLoop";
pub const WRITE_LOOP: &str = "net/http.(*persistConn).writeLoop";

/// Where the socket's fd sits, from a `*tls.Conn`: the data word of its first field (the
/// `net.Conn` interface), the `*netFD` in that `*net.TCPConn`, and `pfd.Sysfd` in the
/// `netFD`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GoLayout {
    pub conn_data: u16,
    pub net_fd: u16,
    pub sysfd: u16,
}

impl GoLayout {
    /// The layout packed into a uprobe's attach cookie with the receiver's stack slot of the
    /// read copy site (0 for other sites), as the kernel programs unpack it.
    pub fn cookie(&self, receiver_slot: u16) -> u64 {
        apitoolkit_common::go_probe_cookie([self.conn_data, self.net_fd, self.sysfd, receiver_slot])
    }
}

/// Struct layouts by Go minor version (1.x), each range read from the Go sources of those
/// versions (crypto/tls/conn.go `Conn.conn`, net/net.go `conn.fd`, net/fd_posix.go
/// `netFD.pfd`, internal/poll/fd_unix.go `FD.Sysfd` after the 16-byte `fdMutex`): 1.17.13,
/// 1.18, 1.19.8 (also its DWARF), 1.20.2, 1.21.13, 1.22.12, 1.23.5, 1.24.4, 1.25.12, 1.26.10,
/// 1.27.3. A newer Go is refused until its sources are checked.
const LAYOUTS: [(std::ops::RangeInclusive<u32>, GoLayout); 1] = [(
    17..=27,
    GoLayout {
        conn_data: 8,
        net_fd: 0,
        sysfd: 16,
    },
)];

/// A Go toolchain version, e.g. `go1.19.8`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoVersion {
    pub text: String,
    pub minor: u32,
}

impl GoVersion {
    fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("go1.")?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        Some(Self {
            text: text.to_owned(),
            minor: digits.parse().ok()?,
        })
    }
}

/// Why a Go executable's crypto/tls is left alone.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GoTlsRefusal {
    #[error("not an x86-64 executable")]
    NotX86,
    #[error("no readable Go version in .go.buildinfo")]
    NoVersion,
    #[error("{0}: crypto/tls is probed for Go 1.17 to 1.27 (register ABI, struct layouts checked)")]
    UnsupportedVersion(String),
    #[error("no readable .gopclntab function table")]
    NoFunctionTable,
    /// The program does not link crypto/tls: nothing to probe, and nothing lost.
    #[error("does not use crypto/tls")]
    NoTls,
    #[error("{0}: its machine code does not decode as expected, not probed")]
    UnverifiedCode(&'static str),
}

/// Where the crypto/tls uprobes of one Go executable go (file offsets).
#[derive(Debug, PartialEq, Eq)]
pub struct GoTlsPlan {
    pub version: GoVersion,
    pub layout: GoLayout,
    pub read: ReadSites,
    /// `Write`'s entry site: the bytes are taken there, before they are encrypted.
    pub write_entry: u64,
    /// Where goroutine creation and net/http client calls are probed, or why they are not
    /// (outgoing calls then get no `parent_id`).
    pub links: Result<GoLinkSites, GoLinkRefusal>,
}

/// Where `Read`'s plaintext is taken (file offsets).
#[derive(Debug, PartialEq, Eq)]
pub enum ReadSites {
    /// Its one `call runtime.memmove`, which copies the plaintext into the caller's buffer
    /// (emulated), with the receiver's stack slot there as an offset from RSP.
    Copy { call: u64, receiver_slot: u16 },
    /// Its entry site (emulated) and every `ret` (single-stepped: the kernel does not emulate
    /// `ret`), where the code does not prove the copy site.
    EntryAndReturns { entry: u64, returns: Vec<u64> },
}

/// Sites (file offsets) that let outgoing calls be linked to the request being served.
#[derive(Debug, PartialEq, Eq)]
pub struct GoLinkSites {
    /// The calls of `newproc1` and `runqput` in [`NEWPROC_CLOSURE`] (emulated: `call`).
    pub newproc1_call: u64,
    pub runqput_call: u64,
    /// The entry sites of `(*persistConn).roundTrip`, and of its `readLoop` and `writeLoop`;
    /// `None` when the program has no net/http client.
    pub client: Option<ClientSites>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct ClientSites {
    pub round_trip: u64,
    pub loops: [u64; 2],
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GoLinkRefusal {
    #[error("goroutine links need Go 1.18+ (newproc1 took other arguments before)")]
    OldGo,
    #[error("{0}: not found or its machine code does not decode as expected")]
    Unverified(&'static str),
}

/// The Go version recorded in `.go.buildinfo`: inline since Go 1.18 (flag bit 2: a varint
/// length and the string at offset 32), before that behind two pointers to string headers.
pub fn version(elf: &ElfFile) -> Option<GoVersion> {
    let (_, info) = elf.section(".go.buildinfo")?;
    if info.get(..14)? != b"\xff Go buildinf:" {
        return None;
    }
    let pointer_size = usize::from(*info.get(14)?);
    let flags = *info.get(15)?;
    let text = if flags & 2 != 0 {
        let (length, used) = uvarint(info.get(32..)?)?;
        let start = 32 + used;
        info.get(start..start.checked_add(usize::try_from(length).ok()?)?)?
            .to_vec()
    } else {
        let header = word(info, 16, pointer_size)?;
        let string = elf.data(header, 2 * pointer_size)?;
        let (data, length) = (
            word(string, 0, pointer_size)?,
            word(string, pointer_size, pointer_size)?,
        );
        elf.data(data, usize::try_from(length).ok()?)?.to_vec()
    };
    GoVersion::parse(std::str::from_utf8(&text).ok()?)
}

fn uvarint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (index, byte) in bytes.iter().take(10).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return Some((value, index + 1));
        }
    }
    None
}

/// The little-endian word of `size` bytes (4 or 8) at `offset`.
fn word(bytes: &[u8], offset: usize, size: usize) -> Option<u64> {
    let bytes = bytes.get(offset..offset.checked_add(size)?)?;
    match size {
        4 => Some(u64::from(u32::from_le_bytes(bytes.try_into().ok()?))),
        8 => Some(u64::from_le_bytes(bytes.try_into().ok()?)),
        _ => None,
    }
}

/// The `.gopclntab` header formats (runtime/symtab.go `pcHeader`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum TableFormat {
    /// Go 1.16 and 1.17: function entries as absolute addresses.
    Go116,
    /// Go 1.18+: entries as 32-bit offsets from the start of the text.
    Go118,
}

/// Virtual address ranges `[entry, end)` of the functions `names`, in their order; `None` when
/// the table cannot be read.
pub fn function_ranges<'n>(elf: &ElfFile, names: &[&'n str]) -> Option<Vec<(&'n str, u64, u64)>> {
    let (_, table) = elf.section(".gopclntab")?;
    let format = match word(table, 0, 4)? {
        0xffff_fffa => TableFormat::Go116,
        0xffff_fff0 | 0xffff_fff1 => TableFormat::Go118,
        _ => return None,
    };
    let size = usize::from(*table.get(7)?);
    let header = |index: usize| -> Option<usize> {
        usize::try_from(word(table, 8 + index * size, size)?).ok()
    };
    let functions = header(0)?;
    let (text_start, names_at, functab_at) = match format {
        TableFormat::Go116 => (0, header(2)?, header(6)?),
        // Go 1.26+ writes 0 there (the runtime takes `runtime.text`), and so may an external
        // linker's PIE; the `.text` start is `runtime.text` only when Go's own linker laid it
        // out (a system linker may put C code first), else the table is not read.
        TableFormat::Go118 => {
            let start = word(table, 8 + 2 * size, size).filter(|start| *start != 0);
            let start = start
                .or_else(|| elf.symbol_address("runtime.text"))
                .or_else(|| {
                    (!elf.externally_linked())
                        .then(|| elf.text_address())
                        .flatten()
                })?;
            (start, header(3)?, header(7)?)
        }
    };
    let functab = table.get(functab_at..)?;
    let (entry_size, field) = match format {
        TableFormat::Go116 => (2 * size, size),
        TableFormat::Go118 => (8, 4),
    };
    let entry = |index: usize| -> Option<u64> {
        let value = word(functab, index * entry_size, field)?;
        Some(if format == TableFormat::Go118 {
            text_start + value
        } else {
            value
        })
    };
    let name_of = |index: usize| -> Option<&[u8]> {
        let func_at = usize::try_from(word(functab, index * entry_size + field, field)?).ok()?;
        // `_func` starts with the entry (a uintptr before 1.18, a u32 since), then `nameOff`.
        let name_offset = word(functab, func_at + field, 4)?;
        let name = table.get(names_at.checked_add(usize::try_from(name_offset).ok()?)?..)?;
        name.split(|byte| *byte == 0).next()
    };
    let mut found: Vec<Option<(u64, u64)>> = vec![None; names.len()];
    for index in 0..functions {
        let name = name_of(index)?;
        if let Some(wanted) = names.iter().position(|wanted| wanted.as_bytes() == name) {
            found[wanted] = Some((entry(index)?, entry(index + 1)?));
        }
    }
    Some(
        names
            .iter()
            .zip(found)
            .filter_map(|(name, range)| range.map(|(entry, end)| (*name, entry, end)))
            .collect(),
    )
}

/// The struct layout of `version`, if its sources were checked.
fn layout(version: &GoVersion) -> Result<GoLayout, GoTlsRefusal> {
    LAYOUTS
        .iter()
        .find(|(minors, _)| minors.contains(&version.minor))
        .map(|(_, layout)| *layout)
        .ok_or_else(|| GoTlsRefusal::UnsupportedVersion(version.text.clone()))
}

/// Where to probe `crypto/tls` in a Go executable, or why not.
pub fn plan(elf: &ElfFile) -> Result<GoTlsPlan, GoTlsRefusal> {
    if !elf.is_x86_64() {
        return Err(GoTlsRefusal::NotX86);
    }
    let version = version(elf).ok_or(GoTlsRefusal::NoVersion)?;
    let layout = layout(&version)?;
    let ranges = function_ranges(elf, &[TLS_READ, TLS_WRITE, MEMMOVE])
        .ok_or(GoTlsRefusal::NoFunctionTable)?;
    let [
        (_, read_at, read_end),
        (_, write_at, write_end),
        (_, memmove, _),
    ] = ranges[..]
    else {
        return Err(GoTlsRefusal::NoTls);
    };
    let code = |name, entry: u64, end: u64| {
        function_code(elf, entry, end).ok_or(GoTlsRefusal::UnverifiedCode(name))
    };
    let (read_offset, read_code) = code(TLS_READ, read_at, read_end)?;
    let (write_offset, write_code) = code(TLS_WRITE, write_at, write_end)?;
    let entry_site = |name, offset, code: &[u8], address| {
        probe_site::go_stack_check_jump(code, address, &ARGUMENT_REGISTERS)
            .map(|site| offset + site)
            .ok_or(GoTlsRefusal::UnverifiedCode(name))
    };
    let read = read_sites(read_offset, read_code, read_at, memmove)?;
    let links = if version.minor < 18 {
        Err(GoLinkRefusal::OldGo)
    } else {
        link_sites(elf)
    };
    Ok(GoTlsPlan {
        links,
        layout,
        read,
        write_entry: entry_site(TLS_WRITE, write_offset, write_code, write_at)?,
        version,
    })
}

/// Where to take `Read`'s plaintext, given its code (at file `offset`, address `at`) and the
/// address of `runtime.memmove`: the copy site where the code proves it, else entry and returns.
fn read_sites(offset: u64, code: &[u8], at: u64, memmove: u64) -> Result<ReadSites, GoTlsRefusal> {
    let copy_site = probe_site::only_call_to(code, at, memmove).zip(
        probe_site::spilled_argument_slot(code, at, Register::RAX)
            .and_then(|slot| u16::try_from(slot).ok()),
    );
    if let Some((call, receiver_slot)) = copy_site {
        return Ok(ReadSites::Copy {
            call: offset + call,
            receiver_slot,
        });
    }
    let unverified = GoTlsRefusal::UnverifiedCode(TLS_READ);
    let entry =
        probe_site::go_stack_check_jump(code, at, &ARGUMENT_REGISTERS).ok_or(unverified.clone())?;
    let returns = probe_site::returns(code, at).ok_or(unverified)?;
    Ok(ReadSites::EntryAndReturns {
        entry: offset + entry,
        returns: returns.into_iter().map(|site| offset + site).collect(),
    })
}

/// The machine code of the whole function `[entry, end)`, with its file offset.
fn function_code(elf: &ElfFile, entry: u64, end: u64) -> Option<(u64, &[u8])> {
    let length = usize::try_from(end.checked_sub(entry)?).ok()?;
    elf.code(entry, length)
        .filter(|(_, code)| code.len() == length && length > 0)
}

/// Where goroutine creation and net/http client round trips are probed in a Go 1.18+ program.
fn link_sites(elf: &ElfFile) -> Result<GoLinkSites, GoLinkRefusal> {
    let names = [
        NEWPROC_CLOSURE,
        NEWPROC1,
        RUNQPUT,
        ROUND_TRIP,
        READ_LOOP,
        WRITE_LOOP,
    ];
    let ranges = function_ranges(elf, &names).unwrap_or_default();
    let range = |name| {
        ranges
            .iter()
            .find(|(found, ..)| *found == name)
            .map(|(_, entry, end)| (*entry, *end))
    };
    let unverified = GoLinkRefusal::Unverified;
    let (closure_at, closure_end) = range(NEWPROC_CLOSURE).ok_or(unverified(NEWPROC_CLOSURE))?;
    let (offset, closure) =
        function_code(elf, closure_at, closure_end).ok_or(unverified(NEWPROC_CLOSURE))?;
    let call_site = |callee| {
        let (target, _) = range(callee).ok_or(unverified(callee))?;
        probe_site::only_call_to(closure, closure_at, target)
            .map(|site| offset + site)
            .ok_or(unverified(callee))
    };
    let newproc1_call = call_site(NEWPROC1)?;
    let runqput_call = call_site(RUNQPUT)?;
    let client = match range(ROUND_TRIP) {
        None => None,
        Some(_) => {
            let entry = |name| {
                let (at, end) = range(name).ok_or(unverified(name))?;
                let (offset, code) = function_code(elf, at, end).ok_or(unverified(name))?;
                probe_site::go_stack_check_jump(code, at, &[Register::RAX, Register::R14])
                    .map(|site| offset + site)
                    .ok_or(unverified(name))
            };
            Some(ClientSites {
                round_trip: entry(ROUND_TRIP)?,
                loops: [entry(READ_LOOP)?, entry(WRITE_LOOP)?],
            })
        }
    };
    Ok(GoLinkSites {
        newproc1_call,
        runqput_call,
        client,
    })
}

#[cfg(test)]
mod tests {
    use std::{
        path::{Path, PathBuf},
        process::Command,
    };

    use super::*;

    /// Builds the e2e suite's Go server (or `source`, a main package's text, when given) with
    /// `flags`, into a temporary directory; Go's build cache makes repeats quick.
    fn go_build(name: &str, flags: &[&str], source: Option<&str>) -> PathBuf {
        let out = std::env::temp_dir().join("apitoolkit-go-tests");
        let package = match source {
            Some(source) => {
                let dir = out.join(format!("{name}-src"));
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join("main.go"), source).unwrap();
                std::fs::write(dir.join("go.mod"), "module example.test/plain\n\ngo 1.17\n")
                    .unwrap();
                dir
            }
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/apps/go_tls"),
        };
        let binary = out.join(name);
        let status = Command::new("go")
            .arg("build")
            .args(flags)
            .arg("-o")
            .arg(&binary)
            .arg(".")
            .current_dir(package)
            .status()
            .expect("the Go toolchain (cargo xtask setup installs it)");
        assert!(status.success(), "go build {flags:?}");
        binary
    }

    fn go_version() -> String {
        let output = Command::new("go")
            .args(["env", "GOVERSION"])
            .output()
            .unwrap();
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    /// The plan's sites are where the decoded code says: the `jbe` of the stack check, and
    /// every `ret` (0xc3) of `Read`.
    fn assert_sites(elf: &ElfFile, plan: &GoTlsPlan) {
        let byte_at = |offset: u64| {
            let address = elf.address_of(offset).unwrap();
            elf.code(address, 6).unwrap().1.to_vec()
        };
        let jbe = |entry: u64| assert_eq!(byte_at(entry)[..2], [0x0f, 0x86], "jbe at 0x{entry:x}");
        jbe(plan.write_entry);
        // Go 1.19 inlines bytes.Reader.Read into Read: one memmove call, the receiver spilled
        // at entry RSP + 8 under a 0x68-byte frame.
        let ReadSites::Copy {
            call,
            receiver_slot,
        } = plan.read
        else {
            panic!("{:?}", plan.read);
        };
        assert_eq!(byte_at(call)[0], 0xe8, "call rel32 at 0x{call:x}");
        assert_eq!(receiver_slot, 0x70);
        // Without the copy site (no memmove call found), the entry and every ret.
        let (_, read_at, read_end) = function_ranges(elf, &[TLS_READ]).unwrap()[0];
        let (offset, code) = function_code(elf, read_at, read_end).unwrap();
        let ReadSites::EntryAndReturns { entry, returns } =
            read_sites(offset, code, read_at, 0).unwrap()
        else {
            panic!("no memmove, no copy site");
        };
        jbe(entry);
        assert!(returns.len() >= 2);
        for site in returns {
            assert_eq!(byte_at(site)[0], 0xc3, "ret at 0x{site:x}");
        }
        let links = plan.links.as_ref().unwrap();
        for call in [links.newproc1_call, links.runqput_call] {
            assert_eq!(byte_at(call)[0], 0xe8, "call rel32 at 0x{call:x}");
        }
        let client = links
            .client
            .as_ref()
            .expect("the server calls out with net/http");
        for entry in [client.round_trip, client.loops[0], client.loops[1]] {
            assert_eq!(
                byte_at(entry)[..2],
                [0x0f, 0x86],
                "jbe rel32 at 0x{entry:x}"
            );
        }
    }

    #[test]
    fn plain_stripped_and_pie_builds_are_probed_at_verified_sites() {
        let plain = ElfFile::open(&go_build("server", &[], None)).unwrap();
        let stripped =
            ElfFile::open(&go_build("server-stripped", &["-ldflags=-s -w"], None)).unwrap();
        let pie = ElfFile::open(&go_build("server-pie", &["-buildmode=pie"], None)).unwrap();
        assert_eq!(stripped.symbol_address(TLS_READ), None, "stripped");
        assert!(!stripped.externally_linked(), "Go's own linker");

        let plans: Vec<GoTlsPlan> = [&plain, &stripped, &pie]
            .into_iter()
            .map(|elf| plan(elf).unwrap())
            .collect();
        for (elf, plan) in [&plain, &stripped, &pie].into_iter().zip(&plans) {
            assert_eq!(plan.version.text, go_version());
            assert_eq!(
                plan.layout,
                GoLayout {
                    conn_data: 8,
                    net_fd: 0,
                    sysfd: 16
                }
            );
            assert_sites(elf, plan);
        }
        // Stripping removes the symbols, not the code: the same sites.
        assert_eq!(plans[0], plans[1]);
        // The function table agrees with the symbol table where there is one.
        let ranges = function_ranges(&plain, &[TLS_WRITE, TLS_READ]).unwrap();
        for (name, entry, end) in ranges {
            assert_eq!(Some(entry), plain.symbol_address(name), "{name}");
            assert!(end > entry);
        }
    }

    #[test]
    fn a_go_program_without_crypto_tls_and_a_non_go_file_are_refused() {
        let source = "package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"hi\") }\n";
        let hello = ElfFile::open(&go_build("hello", &[], Some(source))).unwrap();
        assert_eq!(plan(&hello), Err(GoTlsRefusal::NoTls));
        // Goroutine creation is found in any Go program, the client only where it is linked.
        let links = link_sites(&hello).unwrap();
        assert_eq!(links.client, None);
        let rust = ElfFile::open(Path::new("/proc/self/exe")).unwrap();
        assert_eq!(plan(&rust), Err(GoTlsRefusal::NoVersion));
        assert!(rust.externally_linked(), "cc's crti.o brings .init");
    }

    #[test]
    fn versions_parse_and_only_checked_layouts_are_used() {
        let version = |text| GoVersion::parse(text).unwrap();
        assert_eq!(version("go1.19.8").minor, 19);
        assert_eq!(version("go1.27rc1").minor, 27);
        assert_eq!(GoVersion::parse("devel go1.28-abcdef"), None);
        assert!(layout(&version("go1.17")).is_ok());
        assert!(layout(&version("go1.27.3")).is_ok());
        assert_eq!(
            layout(&version("go1.16.15")),
            Err(GoTlsRefusal::UnsupportedVersion("go1.16.15".into()))
        );
        assert!(layout(&version("go1.28.0")).is_err(), "not checked yet");
        assert_eq!(uvarint(&[0x08]), Some((8, 1)));
        assert_eq!(uvarint(&[0x96, 0x01]), Some((150, 2)));
        assert_eq!(uvarint(&[0x80; 11]), None);
    }
}
