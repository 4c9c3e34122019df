//! What `/proc/PID/*` tells about a process: memory maps, the auxiliary
//! vector, thread ids, and from them the load bias of the main executable.
//!
//! Every reader is bounded (file size, line count, entry count) and every
//! parser treats its input as hostile: malformed text is an error naming the
//! line, never a panic.

use nix::unistd::Pid;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use upstare_dwarf::{FileOffset, LinkAddr, LoadBias, RuntimeAddr};

/// `/proc/PID/maps` files larger than this are refused.
pub const MAX_MAPS_BYTES: u64 = 64 << 20;
/// At most this many mappings are parsed.
pub const MAX_MAPS_LINES: usize = 1 << 20;
/// `/proc/PID/auxv` larger than this is refused (the real one is < 1 KiB).
pub const MAX_AUXV_BYTES: u64 = 64 << 10;
/// At most this many threads are listed.
pub const MAX_TASKS: usize = 1 << 16;
/// `/proc/TID/status` larger than this is refused (the real one is < 2 KiB).
pub const MAX_STATUS_BYTES: u64 = 64 << 10;
/// Page size on x86-64 Linux.
pub const PAGE_SIZE: u64 = 4096;

/// `AT_PHDR`: runtime address of the executable's program headers.
pub const AT_PHDR: u64 = 3;
/// `AT_BASE`: load address of the program interpreter.
pub const AT_BASE: u64 = 7;
/// `AT_ENTRY`: runtime address of the executable's entry point.
pub const AT_ENTRY: u64 = 9;

/// Why reading or parsing a `/proc` file failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("pid {pid}: cannot read {path}: {source}")]
    Io {
        pid: i32,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("pid {pid}: {path} is larger than {cap} bytes")]
    TooLarge { pid: i32, path: String, cap: u64 },
    #[error("maps line {line}: {reason}: {text:?}")]
    BadMapsLine {
        line: usize,
        reason: &'static str,
        /// The start of the offending line.
        text: String,
    },
    #[error("maps: more than {cap} lines")]
    TooManyMaps { cap: usize },
    #[error("auxv: {reason} ({len} bytes)")]
    BadAuxv { reason: &'static str, len: usize },
    #[error("auxv has no entry {key}")]
    NoAuxvEntry { key: u64 },
    #[error("pid {pid}: more than {cap} threads")]
    TooManyTasks { pid: i32, cap: usize },
    #[error("thread {tid}: status has no readable {field} line")]
    BadStatus { tid: Pid, field: &'static str },
    #[error("pid {pid}: no mapping of {exe} at file offset {offset}")]
    NoExeMapping {
        pid: i32,
        exe: PathBuf,
        offset: FileOffset,
    },
}

/// The text of `/proc/PID/task/TID/status` (bounded by
/// [`MAX_STATUS_BYTES`]), read with plain reads: a /proc file has no size
/// to ask for first.
pub fn read_task_status(pid: Pid, tid: Pid) -> Result<String, ProcError> {
    let bytes = read_capped(pid, &format!("task/{tid}/status"), MAX_STATUS_BYTES)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Initial buffer for reading a `/proc` file.
const PROC_READ_START: u64 = 64 << 10;

fn read_capped(pid: Pid, name: &str, cap: u64) -> Result<Vec<u8>, ProcError> {
    let path = format!("/proc/{pid}/{name}");
    let io_err = |source| ProcError::Io {
        pid: pid.as_raw(),
        path: path.clone(),
        source,
    };
    let f = File::open(&path).map_err(io_err)?;
    // /proc files report no size: room for a typical one up front, so
    // that it is read in a few large reads rather than many growing ones.
    let mut out = Vec::with_capacity(cap.saturating_add(1).min(PROC_READ_START) as usize);
    f.take(cap + 1).read_to_end(&mut out).map_err(io_err)?;
    if out.len() as u64 > cap {
        return Err(ProcError::TooLarge {
            pid: pid.as_raw(),
            path,
            cap,
        });
    }
    Ok(out)
}

/// Permissions of one mapping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Perms {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    /// `s` (shared) rather than `p` (private, copy-on-write).
    pub shared: bool,
}

/// What backs a mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapPath {
    /// No name: anonymous memory.
    Anonymous,
    /// A file, as the kernel printed it (newlines appear escaped as `\012`).
    File(PathBuf),
    /// A kernel pseudo-name such as `[heap]`, `[stack]`, `[vdso]`.
    Pseudo(String),
}

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryMap {
    pub start: RuntimeAddr,
    /// Exclusive.
    pub end: RuntimeAddr,
    pub perms: Perms,
    /// File offset of `start`.
    pub offset: FileOffset,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    pub path: MapPath,
    /// The kernel marked the file ` (deleted)` (the suffix is not in `path`).
    pub deleted: bool,
}

impl MemoryMap {
    /// Whether `addr` lies inside this mapping.
    pub fn contains(&self, addr: RuntimeAddr) -> bool {
        self.start <= addr && addr < self.end
    }
    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.end.0 - self.start.0
    }
    /// Whether the mapping is empty (never true for kernel output).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The file path, if file-backed.
    pub fn file(&self) -> Option<&Path> {
        match &self.path {
            MapPath::File(p) => Some(p),
            _ => None,
        }
    }
}

/// Split off the first whitespace-separated token.
fn token(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start_matches([' ', '\t']);
    if s.is_empty() {
        return None;
    }
    let end = s.find([' ', '\t']).unwrap_or(s.len());
    Some((&s[..end], &s[end..]))
}

fn parse_map_line(line: &str) -> Result<MemoryMap, &'static str> {
    let (range, rest) = token(line).ok_or("empty line")?;
    let (perms, rest) = token(rest).ok_or("missing permissions")?;
    let (offset, rest) = token(rest).ok_or("missing offset")?;
    let (dev, rest) = token(rest).ok_or("missing device")?;
    let (inode, rest) = token(rest).ok_or("missing inode")?;

    let (start, end) = range.split_once('-').ok_or("address range without '-'")?;
    let start = u64::from_str_radix(start, 16).map_err(|_| "bad start address")?;
    let end = u64::from_str_radix(end, 16).map_err(|_| "bad end address")?;
    if end < start {
        return Err("end address below start address");
    }
    let p = perms.as_bytes();
    if p.len() != 4 {
        return Err("permissions are not 4 characters");
    }
    let flag = |c: u8, yes: u8| match c {
        b'-' => Ok(false),
        c if c == yes => Ok(true),
        _ => Err("bad permission character"),
    };
    let perms = Perms {
        read: flag(p[0], b'r')?,
        write: flag(p[1], b'w')?,
        exec: flag(p[2], b'x')?,
        shared: match p[3] {
            b's' => true,
            b'p' => false,
            _ => return Err("bad sharing flag"),
        },
    };
    let offset = u64::from_str_radix(offset, 16).map_err(|_| "bad offset")?;
    let (maj, min) = dev.split_once(':').ok_or("device without ':'")?;
    let dev_major = u32::from_str_radix(maj, 16).map_err(|_| "bad device major")?;
    let dev_minor = u32::from_str_radix(min, 16).map_err(|_| "bad device minor")?;
    let inode = inode.parse::<u64>().map_err(|_| "bad inode")?;

    let name = rest.trim_start_matches([' ', '\t']);
    let (name, deleted) = match name.strip_suffix(" (deleted)") {
        Some(n) => (n, true),
        None => (name, false),
    };
    let path = if name.is_empty() {
        MapPath::Anonymous
    } else if name.starts_with('[') && name.ends_with(']') {
        MapPath::Pseudo(name.to_string())
    } else {
        MapPath::File(PathBuf::from(name))
    };
    Ok(MemoryMap {
        start: RuntimeAddr(start),
        end: RuntimeAddr(end),
        perms,
        offset: FileOffset(offset),
        dev_major,
        dev_minor,
        inode,
        path,
        deleted,
    })
}

/// Parse the text of a `/proc/PID/maps` file. Blank lines are skipped; any
/// other malformed line is an error naming it (1-based).
pub fn parse_maps(text: &str) -> Result<Vec<MemoryMap>, ProcError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if out.len() >= MAX_MAPS_LINES {
            return Err(ProcError::TooManyMaps {
                cap: MAX_MAPS_LINES,
            });
        }
        let m = parse_map_line(line).map_err(|reason| ProcError::BadMapsLine {
            line: i + 1,
            reason,
            text: line.chars().take(80).collect(),
        })?;
        out.push(m);
    }
    Ok(out)
}

/// Read and parse `/proc/PID/maps`.
pub fn read_maps(pid: Pid) -> Result<Vec<MemoryMap>, ProcError> {
    let bytes = read_capped(pid, "maps", MAX_MAPS_BYTES)?;
    parse_maps(&String::from_utf8_lossy(&bytes))
}

/// Parse the bytes of `/proc/PID/auxv` (pairs of native u64 key and value,
/// ended by `AT_NULL`) into `(key, value)` pairs without the terminator.
pub fn parse_auxv(bytes: &[u8]) -> Result<Vec<(u64, u64)>, ProcError> {
    if !bytes.len().is_multiple_of(16) {
        return Err(ProcError::BadAuxv {
            reason: "length is not a multiple of 16",
            len: bytes.len(),
        });
    }
    let mut out = Vec::new();
    for pair in bytes.chunks_exact(16) {
        let (k, v) = pair.split_at(8);
        let key = u64::from_ne_bytes(k.try_into().unwrap_or([0; 8]));
        let val = u64::from_ne_bytes(v.try_into().unwrap_or([0; 8]));
        if key == 0 {
            return Ok(out);
        }
        out.push((key, val));
    }
    Err(ProcError::BadAuxv {
        reason: "no AT_NULL terminator",
        len: bytes.len(),
    })
}

/// Read and parse `/proc/PID/auxv`. Valid from the exec stop on.
pub fn read_auxv(pid: Pid) -> Result<Vec<(u64, u64)>, ProcError> {
    parse_auxv(&read_capped(pid, "auxv", MAX_AUXV_BYTES)?)
}

/// The value of auxv entry `key`.
pub fn auxv_value(auxv: &[(u64, u64)], key: u64) -> Result<u64, ProcError> {
    auxv.iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| *v)
        .ok_or(ProcError::NoAuxvEntry { key })
}

/// Load bias of the main executable: runtime entry (`AT_ENTRY`) minus the
/// ELF header's `e_entry`. Zero for a non-PIE executable.
pub fn load_bias_from_auxv(auxv: &[(u64, u64)], e_entry: LinkAddr) -> Result<LoadBias, ProcError> {
    let at_entry = auxv_value(auxv, AT_ENTRY)?;
    Ok(LoadBias(at_entry.wrapping_sub(e_entry.0)))
}

/// Load bias of the image of `file` from the maps: the mapping of `file` at
/// the page-aligned file offset of one of its `PT_LOAD` segments (`p_offset`,
/// `p_vaddr`) starts at the bias plus the page-aligned `p_vaddr`.
/// `file` is compared to the mapped path as the kernel prints it (use the
/// target of `/proc/PID/exe` for the main executable).
pub fn load_bias_from_maps(
    pid: Pid,
    maps: &[MemoryMap],
    file: &Path,
    p_offset: FileOffset,
    p_vaddr: LinkAddr,
) -> Result<LoadBias, ProcError> {
    let page_off = p_offset.0 & !(PAGE_SIZE - 1);
    let page_vaddr = p_vaddr.0 & !(PAGE_SIZE - 1);
    maps.iter()
        .find(|m| m.file() == Some(file) && m.offset.0 == page_off)
        .map(|m| LoadBias(m.start.0.wrapping_sub(page_vaddr)))
        .ok_or_else(|| ProcError::NoExeMapping {
            pid: pid.as_raw(),
            exe: file.to_path_buf(),
            offset: FileOffset(page_off),
        })
}

/// Target of `/proc/PID/exe`.
pub fn exe_path(pid: Pid) -> Result<PathBuf, ProcError> {
    let path = format!("/proc/{pid}/exe");
    std::fs::read_link(&path).map_err(|source| ProcError::Io {
        pid: pid.as_raw(),
        path,
        source,
    })
}

/// Whether process `pid` resolves paths as the updater does: the same root
/// directory (device and inode) and the same mount namespace. False when
/// either differs or cannot be read (a chrooted or namespaced process, or
/// one the updater may not inspect), so that a caller falls back to what
/// needs no path lookup in the process.
pub fn shares_root(pid: Pid) -> bool {
    use std::os::unix::fs::MetadataExt;
    let same =
        |theirs: String, ours: &str| match (std::fs::metadata(theirs), std::fs::metadata(ours)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
    same(format!("/proc/{pid}/root"), "/")
        && same(format!("/proc/{pid}/ns/mnt"), "/proc/self/ns/mnt")
}

/// Most processes [`descendants`] lists.
pub const MAX_DESCENDANTS: usize = 4096;

/// The processes descended from `pid` (children of each of its threads,
/// from `/proc/PID/task/TID/children`, recursively), parents before their
/// children, at most [`MAX_DESCENDANTS`]. A process that ends while it is
/// read is skipped.
pub fn descendants(pid: Pid) -> Vec<Pid> {
    let mut out: Vec<Pid> = Vec::new();
    let mut next = 0usize;
    let mut parent = pid;
    loop {
        for tid in list_tasks(parent).unwrap_or_default() {
            let Ok(text) = std::fs::read_to_string(format!("/proc/{parent}/task/{tid}/children"))
            else {
                continue;
            };
            for child in text
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok())
            {
                let child = Pid::from_raw(child);
                if child != pid && !out.contains(&child) && out.len() < MAX_DESCENDANTS {
                    out.push(child);
                }
            }
        }
        // Each process is visited once: this ends after out.len() rounds.
        match out.get(next) {
            Some(&p) => {
                parent = p;
                next += 1;
            }
            None => return out,
        }
    }
}

/// Whether process `pid` has ended (gone, or a zombie not yet reaped).
pub fn has_ended(pid: Pid) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(text) => text
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

/// Signals pending on thread `tid` alone (the `SigPnd` line of
/// `/proc/TID/status`; those pending on its whole process are not
/// included), as a mask with bit `sig - 1` set for each.
pub fn thread_pending_signals(tid: Pid) -> Result<u64, ProcError> {
    let bytes = read_capped(tid, "status", MAX_STATUS_BYTES)?;
    parse_pending(&String::from_utf8_lossy(&bytes), tid)
}

fn parse_pending(status: &str, tid: Pid) -> Result<u64, ProcError> {
    const FIELD: &str = "SigPnd";
    status
        .lines()
        .find_map(|l| l.strip_prefix(FIELD)?.strip_prefix(':'))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or(ProcError::BadStatus { tid, field: FIELD })
}

/// A thread's seccomp state: the `Seccomp` and `Seccomp_filters` lines of
/// `/proc/TID/status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seccomp {
    /// 0 none, 1 strict, 2 filter.
    pub mode: u8,
    /// How many filters are attached (kernels before 5.9 do not say).
    pub filters: Option<u32>,
}

impl Seccomp {
    /// Whether a thread in state `self` is restricted beyond `base` (the
    /// updater's own state, which every process of a container inherits
    /// alike): strict mode, or a filter the updater does not run under.
    /// With the filter counts unknown, filter mode in both is taken as the
    /// same inherited filter.
    pub fn restricts_beyond(self, base: Seccomp) -> bool {
        match (self.mode, base.mode) {
            (0, _) => false,
            (1, _) => true,
            (_, 2) => matches!((self.filters, base.filters), (Some(a), Some(b)) if a > b),
            _ => true,
        }
    }
}

fn parse_seccomp(status: &str, tid: Pid) -> Result<Seccomp, ProcError> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    // A kernel without seccomp has no line: no filter.
    let mode = match field("Seccomp") {
        None => 0,
        Some(v) => v.parse::<u8>().map_err(|_| ProcError::BadStatus {
            tid,
            field: "Seccomp",
        })?,
    };
    let filters = field("Seccomp_filters").and_then(|v| v.parse::<u32>().ok());
    Ok(Seccomp { mode, filters })
}

/// The seccomp state of thread `tid` (`/proc/self` for the updater).
pub fn seccomp(tid: Pid) -> Result<Seccomp, ProcError> {
    let bytes = read_capped(tid, "status", MAX_STATUS_BYTES)?;
    parse_seccomp(&String::from_utf8_lossy(&bytes), tid)
}

/// The command line of process `pid` as `ps` shows it (arguments joined
/// by spaces; a server's process title, such as sshd's `sshd: [net]`),
/// at most 200 characters; empty when it cannot be read.
pub fn command_line(pid: Pid) -> String {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let text: String = String::from_utf8_lossy(&bytes)
        .split('\0')
        .filter(|a| !a.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    text.chars().take(200).collect()
}

/// Thread ids of process `pid`, from `/proc/PID/task`, sorted.
pub fn list_tasks(pid: Pid) -> Result<Vec<Pid>, ProcError> {
    let path = format!("/proc/{pid}/task");
    let io_err = |source| ProcError::Io {
        pid: pid.as_raw(),
        path: path.clone(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&path).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        if let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        {
            if out.len() >= MAX_TASKS {
                return Err(ProcError::TooManyTasks {
                    pid: pid.as_raw(),
                    cap: MAX_TASKS,
                });
            }
            out.push(Pid::from_raw(tid));
        }
    }
    out.sort();
    Ok(out)
}

/// At most this many file descriptors are looked at for epoll instances.
pub const MAX_FDS: usize = 1 << 16;
/// At most this many epoll registrations are read in all.
pub const MAX_EPOLL_REGISTRATIONS: usize = 1 << 18;
/// `/proc/PID/fdinfo/FD` of an epoll instance larger than this is refused
/// (about 100 bytes a registration).
pub const MAX_FDINFO_BYTES: u64 = 64 << 20;

/// One file registered with an epoll instance of the process, as
/// `/proc/PID/fdinfo/EPFD` shows it: the kernel keeps `data` and hands it
/// back with every event, so a pointer stored there lives outside the
/// process's memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpollRegistration {
    /// The epoll instance's descriptor.
    pub epfd: i32,
    /// The registered descriptor (as it was registered).
    pub tfd: i32,
    /// The event mask (`EPOLLIN`, `EPOLLET`...).
    pub events: u32,
    /// The user data (`epoll_event.data`).
    pub data: u64,
    /// The registered file's inode and device (`ino`, `sdev`): the
    /// descriptor `tfd` may since name another file.
    pub ino: u64,
    pub sdev: u64,
}

/// The registrations of one epoll instance's fdinfo text (`tfd:` lines).
fn parse_epoll_fdinfo(epfd: i32, text: &str) -> Vec<EpollRegistration> {
    let field = |words: &[&str], key: &str| -> Option<String> {
        let i = words.iter().position(|w| w.starts_with(key))?;
        let inline = &words[i][key.len()..];
        if inline.is_empty() {
            words.get(i + 1).map(|w| w.to_string())
        } else {
            Some(inline.to_string())
        }
    };
    text.lines()
        .filter(|l| l.starts_with("tfd:"))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            Some(EpollRegistration {
                epfd,
                tfd: field(&words, "tfd:")?.parse().ok()?,
                events: u32::from_str_radix(&field(&words, "events:")?, 16).ok()?,
                data: u64::from_str_radix(&field(&words, "data:")?, 16).ok()?,
                ino: u64::from_str_radix(&field(&words, "ino:")?, 16).ok()?,
                sdev: u64::from_str_radix(&field(&words, "sdev:")?, 16).ok()?,
            })
        })
        .collect()
}

/// The descriptor numbers of process `pid` (at most [`MAX_FDS`]), sorted:
/// a directory listing, no call per descriptor.
pub fn fd_numbers(pid: Pid) -> Result<Vec<i32>, ProcError> {
    let path = format!("/proc/{pid}/fd");
    let io_err = |source| ProcError::Io {
        pid: pid.as_raw(),
        path: path.clone(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&path).map_err(io_err)?.take(MAX_FDS) {
        let entry = entry.map_err(io_err)?;
        if let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        {
            out.push(fd);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Whether descriptor `fd` of `pid` is an epoll instance (a closed one is
/// not).
pub fn is_epoll(pid: Pid, fd: i32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .is_ok_and(|t| t == Path::new("anon_inode:[eventpoll]"))
}

/// The descriptors of `pid` and which of them are epoll instances: one
/// call per descriptor, so made before the process is paused; in the pause
/// [`epoll_registrations`] looks again only at these and at descriptors
/// opened since.
#[derive(Clone, Debug, Default)]
pub struct FdScan {
    pub fds: Vec<i32>,
    pub epoll: Vec<i32>,
}

impl FdScan {
    /// The scan of `pid` now.
    pub fn of(pid: Pid) -> Result<FdScan, ProcError> {
        let fds = fd_numbers(pid)?;
        let epoll = fds
            .iter()
            .copied()
            .filter(|&fd| is_epoll(pid, fd))
            .collect();
        Ok(FdScan { fds, epoll })
    }
}

/// Every epoll registration of process `pid` (bounded by [`MAX_FDS`] and
/// [`MAX_EPOLL_REGISTRATIONS`]): its epoll instances are the descriptors
/// linking to `anon_inode:[eventpoll]`. With `before` (a scan made before
/// the pause) only its epoll instances and the descriptors not open then
/// are looked at: a descriptor number closed and reused for a new epoll
/// instance between the scan and the pause is missed.
pub fn epoll_registrations(
    pid: Pid,
    before: Option<&FdScan>,
) -> Result<Vec<EpollRegistration>, ProcError> {
    let now = fd_numbers(pid)?;
    let candidates: Vec<i32> = match before {
        Some(scan) => now
            .into_iter()
            .filter(|fd| {
                scan.epoll.binary_search(fd).is_ok() || scan.fds.binary_search(fd).is_err()
            })
            .collect(),
        None => now,
    };
    let mut out = Vec::new();
    for fd in candidates {
        // A descriptor closed meanwhile is simply not there.
        if !is_epoll(pid, fd) {
            continue;
        }
        let text = read_capped(pid, &format!("fdinfo/{fd}"), MAX_FDINFO_BYTES)?;
        out.extend(parse_epoll_fdinfo(fd, &String::from_utf8_lossy(&text)));
        if out.len() > MAX_EPOLL_REGISTRATIONS {
            out.truncate(MAX_EPOLL_REGISTRATIONS);
            break;
        }
    }
    out.sort_by_key(|r| (r.epfd, r.tfd));
    Ok(out)
}

/// The inode and device of what descriptor `fd` of `pid` names now, as
/// epoll's fdinfo gives them (`sdev` is the kernel's own `dev_t`, major
/// above 20 bits of minor, not `st_dev`'s encoding).
pub fn fd_identity(pid: Pid, fd: i32) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).ok()?;
    let dev = m.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    Some((m.ino(), (major << 20) | minor))
}

/// `/proc/PID/timers` larger than this is refused (about 80 bytes a timer).
pub const MAX_TIMERS_BYTES: u64 = 16 << 20;

/// The POSIX timers of process `pid` (`timer_create`) that signal it, as
/// `(timer id, sigev_value)`: the kernel keeps the value and hands it to
/// the handler with every expiry (`si_value`).
pub fn posix_timers(pid: Pid) -> Result<Vec<(i64, u64)>, ProcError> {
    let text = read_capped(pid, "timers", MAX_TIMERS_BYTES)?;
    Ok(parse_timers(&String::from_utf8_lossy(&text)))
}

/// `ID:` and `signal: SIG/VALUE` lines of `/proc/PID/timers`.
fn parse_timers(text: &str) -> Vec<(i64, u64)> {
    let mut out = Vec::new();
    let mut id = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("ID:") {
            id = v.trim().parse::<i64>().ok();
        } else if let (Some(v), Some(i)) = (line.strip_prefix("signal:"), id) {
            if let Some(value) = v
                .trim()
                .split_once('/')
                .and_then(|(_, val)| u64::from_str_radix(val.trim(), 16).ok())
            {
                out.push((i, value));
            }
            id = None;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_give_their_id_and_signal_value() {
        let text = "ID: 0\nsignal: 10/00005608e892803c\nnotify: signal/pid.5868\nClockID: 1\n\
                    ID: 3\nsignal: 14/0000000000000000\nnotify: thread/tid.7\nClockID: 0\n\
                    signal: 12/ff\n";
        assert_eq!(parse_timers(text), vec![(0, 0x5608_e892_803c), (3, 0)]);
    }

    #[test]
    fn epoll_fdinfo_lines_are_parsed_and_others_skipped() {
        let text = "pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1057\n\
                    tfd:        0 events:       19 data:     55d0c3a2b4c0  pos:0 ino:4 sdev:d\n\
                    tfd:       12 events: 80000001 data:                c  pos:0 ino:2a8c1 sdev:8\n\
                    tfd: garbage\n";
        let r = parse_epoll_fdinfo(5, text);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            EpollRegistration {
                epfd: 5,
                tfd: 0,
                events: 0x19,
                data: 0x55d0_c3a2_b4c0,
                ino: 4,
                sdev: 0xd,
            }
        );
        assert_eq!((r[1].tfd, r[1].events, r[1].data), (12, 0x8000_0001, 0xc));
    }

    #[test]
    fn pending_signals_come_from_the_thread_line() {
        let tid = Pid::from_raw(7);
        let status = "Name:\tx\nShdPnd:\t0000000000000100\nSigPnd:\t0000000000000010\n";
        assert_eq!(parse_pending(status, tid).unwrap(), 1 << 4);
        assert!(matches!(
            parse_pending("SigPnd:\tzz\n", tid),
            Err(ProcError::BadStatus { tid: t, .. }) if t.as_raw() == 7
        ));
        assert!(parse_pending("Name:\tx\n", tid).is_err());
        let own = thread_pending_signals(nix::unistd::getpid()).unwrap();
        assert_eq!(own & (1 << (nix::libc::SIGTRAP - 1)), 0);
    }

    #[test]
    fn seccomp_state_comes_from_status_and_compares_with_the_updaters() {
        let tid = Pid::from_raw(7);
        let s = |mode, filters| Seccomp { mode, filters };
        let st = "Name:\tsshd\nSeccomp:\t2\nSeccomp_filters:\t3\n";
        assert_eq!(parse_seccomp(st, tid).unwrap(), s(2, Some(3)));
        assert_eq!(parse_seccomp("Seccomp:\t0\n", tid).unwrap(), s(0, None));
        assert_eq!(parse_seccomp("Name:\tx\n", tid).unwrap(), s(0, None));
        assert!(parse_seccomp("Seccomp:\tx\n", tid).is_err());
        // sshd's pre-authentication child under an updater with no filter.
        assert!(s(2, Some(1)).restricts_beyond(s(0, Some(0))));
        // A container's filter, inherited by both alike.
        assert!(!s(2, Some(1)).restricts_beyond(s(2, Some(1))));
        // One more filter than the container's.
        assert!(s(2, Some(2)).restricts_beyond(s(2, Some(1))));
        assert!(s(1, None).restricts_beyond(s(0, None)));
        assert!(!s(0, Some(0)).restricts_beyond(s(2, Some(1))));
        assert!(!s(2, None).restricts_beyond(s(2, None)));
        let own = seccomp(nix::unistd::getpid()).unwrap();
        assert!(!own.restricts_beyond(own));
    }

    const SAMPLE: &str = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 1234                       /tmp/my prog
55d0c0a01000-55d0c0a02000 r-xp 00001000 08:01 1234                       /tmp/my prog
7f0000000000-7f0000021000 rw-p 00000000 00:00 0 
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
7f1000000000-7f1000001000 rw-s 00000000 00:05 99                         /dev/zero (deleted)
";

    #[test]
    fn parses_kernel_format() {
        let m = parse_maps(SAMPLE).unwrap();
        assert_eq!(m.len(), 5);
        assert_eq!(m[1].start, RuntimeAddr(0x55d0c0a01000));
        assert_eq!(m[1].offset, FileOffset(0x1000));
        assert!(m[1].perms.exec && m[1].perms.read && !m[1].perms.write);
        assert_eq!(m[1].file(), Some(Path::new("/tmp/my prog")));
        assert_eq!(m[1].inode, 1234);
        assert_eq!((m[1].dev_major, m[1].dev_minor), (8, 1));
        assert_eq!(m[2].path, MapPath::Anonymous);
        assert_eq!(m[3].path, MapPath::Pseudo("[stack]".into()));
        assert!(m[4].deleted && m[4].perms.shared);
        assert_eq!(m[4].file(), Some(Path::new("/dev/zero")));
        assert!(m[0].contains(RuntimeAddr(0x55d0c0a00fff)));
        assert!(!m[0].contains(RuntimeAddr(0x55d0c0a01000)));

        let bias = load_bias_from_maps(
            Pid::from_raw(1),
            &m,
            Path::new("/tmp/my prog"),
            FileOffset(0x1000),
            LinkAddr(0x1000),
        )
        .unwrap();
        assert_eq!(bias, LoadBias(0x55d0c0a00000));
        assert!(load_bias_from_maps(
            Pid::from_raw(1),
            &m,
            Path::new("/other"),
            FileOffset(0),
            LinkAddr(0)
        )
        .is_err());
    }

    #[test]
    fn hostile_maps_lines_are_errors_not_panics() {
        let bad = [
            "zz-10 r-xp 0 00:00 0",
            "10-zz r-xp 0 00:00 0",
            "20-10 r-xp 0 00:00 0",
            "10 r-xp 0 00:00 0",
            "10-20 r-x 0 00:00 0",
            "10-20 r-xq 0 00:00 0",
            "10-20 a-xp 0 00:00 0",
            "10-20 r-xp 0 0000 0",
            "10-20 r-xp 0 00:00 -1",
            "10-20 r-xp 0 00:00",
            "10-20 r-xp",
            "10-20 r-xp 10000000000000000 00:00 0",
            "ffffffffffffffffff-1 r-xp 0 00:00 0",
            "10-20 r\u{e9}xp 0 00:00 0",
        ];
        for (i, line) in bad.iter().enumerate() {
            let text = format!("10-20 r--p 0 00:00 0\n{line}\n");
            match parse_maps(&text) {
                Err(ProcError::BadMapsLine { line: 2, .. }) => {}
                other => panic!("case {i} {line:?}: {other:?}"),
            }
        }
        assert!(parse_maps("").unwrap().is_empty());
        assert!(parse_maps("\n\n").unwrap().is_empty());
    }

    #[test]
    fn mutated_maps_never_panic() {
        // Deterministic xorshift; mutate the sample with characters that
        // matter to the parser.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet = b"0123456789abcdefxz-: rwxps/[]()\n\t\xc3\xa9";
        let base = SAMPLE.as_bytes();
        let mut parsed = 0;
        for _ in 0..20_000 {
            let mut b = base.to_vec();
            for _ in 0..(next() % 6 + 1) {
                let i = (next() as usize) % b.len();
                match next() % 3 {
                    0 => b[i] = alphabet[(next() as usize) % alphabet.len()],
                    1 => {
                        b.remove(i);
                    }
                    _ => b.insert(i, alphabet[(next() as usize) % alphabet.len()]),
                }
            }
            if let Ok(m) = parse_maps(&String::from_utf8_lossy(&b)) {
                parsed += 1;
                assert!(m.iter().all(|m| m.start <= m.end));
            }
        }
        // Some mutations keep the text valid, most do not.
        assert!(parsed > 0 && parsed < 20_000, "{parsed}");
        for n in 0..64 {
            let _ = parse_auxv(&vec![0xffu8; n]);
        }
    }

    #[test]
    fn auxv_parsing() {
        let mut b = Vec::new();
        for (k, v) in [(AT_PHDR, 0x40u64), (AT_ENTRY, 0x5555_0000_1040), (0, 0)] {
            b.extend_from_slice(&k.to_ne_bytes());
            b.extend_from_slice(&v.to_ne_bytes());
        }
        let a = parse_auxv(&b).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(
            load_bias_from_auxv(&a, LinkAddr(0x1040)).unwrap(),
            LoadBias(0x5555_0000_0000)
        );
        assert!(matches!(
            auxv_value(&a, AT_BASE),
            Err(ProcError::NoAuxvEntry { key: AT_BASE })
        ));
        assert!(parse_auxv(&b[..b.len() - 16]).is_err());
        assert!(parse_auxv(&b[..7]).is_err());
        assert!(parse_auxv(&[]).is_err());
    }

    #[test]
    fn own_process() {
        let me = Pid::this();
        let maps = read_maps(me).unwrap();
        let exe = exe_path(me).unwrap();
        assert!(maps
            .iter()
            .any(|m| m.file() == Some(exe.as_path()) && m.perms.exec));
        let auxv = read_auxv(me).unwrap();
        assert!(auxv_value(&auxv, AT_ENTRY).is_ok());
        let tasks = list_tasks(me).unwrap();
        assert!(tasks.contains(&me));
    }
}
