//! Finding the instrumented image a process runs: the one file mapped
//! executable that carries a `.upstare` section, with its exact bias, text
//! and span checked against every mapping of the file. The other objects
//! the process maps are in [`super::libraries`].

use super::elf::{page_down, page_up, ElfError, ElfSummary, Segment};
use super::libraries::{biases_of_mapping, exec_files, open_mapped, same_file, OpenError};
use crate::engine::state::Image;
use crate::target::procfs::{self, MemoryMap, ProcError};
use nix::unistd::Pid;
use object::ReadRef;
use std::ops::Range;
use std::path::{Path, PathBuf};
use upstare_dwarf::fdt::{self, FrameTables};
use upstare_dwarf::{FileOffset, LinkAddr, LoadBias, RuntimeAddr};

/// Why the running image could not be found or read.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Elf(#[from] ElfError),
    #[error(
        "process {pid} runs {exe} which has no .upstare section: instrument it with upstare-rewrite"
    )]
    NoImage { pid: i32, exe: PathBuf },
    #[error("process {pid} has {} executable mappings of files with a .upstare section ({}): expected exactly one", paths.len(), list_paths(paths))]
    Ambiguous { pid: i32, paths: Vec<PathBuf> },
    #[error("{path}: {reason}")]
    Tables { path: PathBuf, reason: String },
    #[error("{path}: the mapping at {start} (file offset {offset}) lies in no PT_LOAD segment")]
    NoSegment {
        path: PathBuf,
        start: RuntimeAddr,
        offset: FileOffset,
    },
    #[error("{path}: inconsistent load bias: {detail}")]
    Bias { path: PathBuf, detail: String },
}

fn list_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The load bias given by mapping `m` (an executable mapping: one segment
/// only is executable at any file page in practice).
fn bias_of_mapping(path: &Path, segs: &[Segment], m: &MemoryMap) -> Result<LoadBias, ImageError> {
    biases_of_mapping(segs, m)
        .first()
        .copied()
        .ok_or_else(|| ImageError::NoSegment {
            path: path.to_path_buf(),
            start: m.start,
            offset: m.offset,
        })
}

/// What a quick look at an exec-mapped file found.
struct Candidate {
    /// One mapping of the file (the first executable one).
    map: MemoryMap,
    tables: FrameTables,
    segs: Vec<Segment>,
}

/// Read the `.upstare` section of the file behind `m`, if it has one,
/// without reading the whole file (libc is large and has none).
fn probe(pid: Pid, m: &MemoryMap) -> Result<Option<Candidate>, ImageError> {
    let (f, path) = open_mapped(pid, m)?;
    let cache = object::ReadCache::new(f);
    let Ok(summary) = ElfSummary::parse(&path, &cache) else {
        // Not an ELF file we can read (a mapped data file): not an image.
        return Ok(None);
    };
    let Some((offset, size)) = summary.tables else {
        return Ok(None);
    };
    let tables_err = |reason: String| ImageError::Tables {
        path: path.clone(),
        reason,
    };
    if size > fdt::MAX_SECTION_SIZE as u64 {
        return Err(tables_err(format!(
            "section {} of {size} bytes exceeds the limit",
            fdt::SECTION_NAME,
        )));
    }
    let data = cache
        .read_bytes_at(offset, size)
        .map_err(|()| tables_err(format!("section {}: beyond the file", fdt::SECTION_NAME)))?;
    let section = fdt::decode(data).map_err(|e| tables_err(e.to_string()))?;
    upstare_dwarf::check_code(&cache, &section.code_digest)
        .map_err(|e| tables_err(e.to_string()))?;
    let tables = section.tables;
    Ok(Some(Candidate {
        map: m.clone(),
        tables,
        segs: summary.loads,
    }))
}

/// The whole file of the running image `image`, read as process `pid` maps
/// it (through `/proc/PID/map_files/` when possible, so a file replaced on
/// disk since is still read as mapped), bounded by the ELF size cap.
pub fn image_file_bytes(
    pid: Pid,
    maps: &[MemoryMap],
    image: &Image,
) -> Result<Vec<u8>, ImageError> {
    let m = exec_files(maps)
        .into_iter()
        .find(|m| m.file() == Some(image.path.as_path()))
        .ok_or_else(|| ImageError::NoImage {
            pid: pid.as_raw(),
            exe: image.path.clone(),
        })?;
    let (f, path) = open_mapped(pid, m)?;
    Ok(super::elf::read_bounded(f, &path)?)
}

/// Bias, text and span of a candidate, checked against every mapping of
/// its file.
fn locate(
    maps: &[MemoryMap],
    c: &Candidate,
) -> Result<(LoadBias, Range<RuntimeAddr>, Range<RuntimeAddr>), ImageError> {
    let path = c.map.file().map(Path::to_path_buf).unwrap_or_default();
    let bias_err = |detail: String| ImageError::Bias {
        path: path.clone(),
        detail,
    };
    let bias = bias_of_mapping(&path, &c.segs, &c.map)?;
    // This instance's span, from its segments and bias.
    let lo = c.segs.iter().map(|s| page_down(s.vaddr)).min();
    let hi = c
        .segs
        .iter()
        .map(|s| s.vaddr.checked_add(s.memsz).and_then(page_up))
        .collect::<Option<Vec<u64>>>()
        .and_then(|v| v.into_iter().max());
    let (Some(lo), Some(hi)) = (lo, hi) else {
        return Err(bias_err("no PT_LOAD segment, or one that overflows".into()));
    };
    let span = LinkAddr(lo).to_runtime(bias)..LinkAddr(hi).to_runtime(bias);
    let mut mine: Vec<&MemoryMap> = Vec::new();
    for m in maps.iter().filter(|m| same_file(m, &c.map)) {
        // Mappings past the file's segments (none expected) say nothing.
        let possible = biases_of_mapping(&c.segs, m);
        if possible.is_empty() || possible.contains(&bias) {
            mine.push(m);
            continue;
        }
        // Another instance of the same file, outside this one and never
        // executable: what an earlier update kept of a retired image (its
        // program headers, `.dynamic`, data a library uses), left when the
        // process was updated back to that very file.
        let outside = m.end <= span.start || span.end <= m.start;
        if outside && !m.perms.exec {
            continue;
        }
        return Err(bias_err(format!(
            "the executable mapping at {} implies bias {:#x}, the mapping at {} (file offset {}) implies {:#x}",
            c.map.start, bias.0, m.start, m.offset, possible[0].0
        )));
    }
    if !c.tables.binary.pie && bias.0 != 0 {
        return Err(bias_err(format!(
            "a non-PIE executable loaded with bias {:#x}",
            bias.0
        )));
    }
    let bin = &c.tables.binary;
    let text_start = bin.text_addr.to_runtime(bias);
    let text_end = text_start
        .0
        .checked_add(bin.text_size)
        .map(RuntimeAddr)
        .ok_or_else(|| bias_err(format!(".text at {text_start} overflows")))?;
    let text_mapped = mine
        .iter()
        .any(|m| m.perms.exec && m.start <= text_start && text_end <= m.end);
    if !text_mapped {
        return Err(bias_err(format!(
            ".text [{text_start}, {text_end}) is not inside one executable mapping of the file"
        )));
    }
    if span.start > span.end
        || mine
            .iter()
            .any(|m| m.start < span.start || m.end > span.end)
    {
        return Err(bias_err(format!(
            "its mappings do not fit the segments' span [{}, {})",
            span.start, span.end
        )));
    }
    Ok((bias, text_start..text_end, span))
}

/// The instrumented image process `pid` runs: the one file mapped
/// executable that carries a `.upstare` section (after an update the old
/// image is no longer executable, so the newest is the only candidate).
///
/// Its bias is exact for PIE and non-PIE alike: computed from the segment
/// that covers the file offset of its executable mapping. `text` is the
/// tables' `.text` range; `span` covers every segment (`.bss` included).
pub fn running_image(pid: Pid, maps: &[MemoryMap]) -> Result<Image, ImageError> {
    let mut found = Vec::new();
    let mut unreadable = Vec::new();
    for m in exec_files(maps) {
        match probe(pid, m) {
            Ok(Some(c)) => found.push(c),
            Ok(None) => {}
            // A corrupt .upstare section is the image, broken: say so.
            Err(e @ ImageError::Tables { .. }) => return Err(e),
            // Some other file we cannot read: only worth reporting if no
            // image is found.
            Err(e) => unreadable.push(e),
        }
    }
    if found.len() > 1 {
        return Err(ImageError::Ambiguous {
            pid: pid.as_raw(),
            paths: found
                .iter()
                .filter_map(|c| c.map.file().map(Path::to_path_buf))
                .collect(),
        });
    }
    let Some(c) = found.pop() else {
        if let Some(e) = unreadable.into_iter().next() {
            return Err(e);
        }
        let exe =
            procfs::exe_path(pid).unwrap_or_else(|_| PathBuf::from(format!("/proc/{pid}/exe")));
        return Err(ImageError::NoImage {
            pid: pid.as_raw(),
            exe,
        });
    };
    let (bias, text, span) = locate(maps, &c)?;
    Ok(Image {
        path: c.map.file().map(Path::to_path_buf).unwrap_or_default(),
        bias,
        tables: c.tables,
        text,
        span,
    })
}

/// The file process `pid` runs `image` from, exactly as mapped (through
/// `/proc/PID/map_files/`, so a file replaced on disk since is not read in
/// its place).
pub fn open_image_file(
    pid: Pid,
    maps: &[MemoryMap],
    image: &Image,
) -> Result<std::fs::File, ImageError> {
    let m = maps
        .iter()
        .find(|m| m.perms.exec && m.file() == Some(image.path.as_path()))
        .ok_or_else(|| ImageError::NoImage {
            pid: pid.as_raw(),
            exe: image.path.clone(),
        })?;
    Ok(open_mapped(pid, m)?.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::elf as E;

    fn map(start: u64, end: u64, perms: &str, offset: u64, path: &str) -> MemoryMap {
        let line = format!("{start:x}-{end:x} {perms} {offset:08x} 08:01 77 {path}\n");
        procfs::parse_maps(&line).unwrap().remove(0)
    }

    #[test]
    fn bias_of_a_mapping_no_segment_covers_is_an_error() {
        let p = Path::new("/x");
        let seg = |offset, vaddr, exec| Segment {
            offset,
            vaddr,
            filesz: 0x5f0,
            memsz: 0x5f0,
            flags: if exec {
                E::PF_R.0 | E::PF_X.0
            } else {
                E::PF_R.0
            },
        };
        let segs = [seg(0, 0x400000, false), seg(0x1000, 0x401000, true)];
        let text = map(0x401000, 0x402000, "r-xp", 0x1000, "/x");
        assert_eq!(bias_of_mapping(p, &segs, &text).unwrap(), LoadBias(0));
        let odd = map(0x900000, 0x901000, "r-xp", 0x9000, "/x");
        assert!(matches!(
            bias_of_mapping(p, &segs, &odd),
            Err(ImageError::NoSegment { .. })
        ));
    }

    #[test]
    fn a_process_without_tables_runs_no_image() {
        let me = Pid::this();
        let maps = procfs::read_maps(me).unwrap();
        // Not an image: the test binary has no .upstare section.
        let e = running_image(me, &maps).unwrap_err();
        assert!(
            e.to_string()
                .contains("no .upstare section: instrument it with upstare-rewrite"),
            "{e}"
        );
    }
}
