//! Reading ELF files from disk, bounded; parsing them is
//! [`upstare_dwarf::elf`]'s.

use std::io::Read;
use std::path::Path;

pub use upstare_dwarf::elf::*;

/// Read the ELF file at `path` whole, refusing one larger than
/// [`MAX_ELF_SIZE`] before allocating for it.
pub fn read_file(path: &Path) -> Result<Vec<u8>, ElfError> {
    let file = std::fs::File::open(path).map_err(|source| ElfError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    read_bounded(file, path)
}

/// Read an opened ELF file (named `path` in errors) whole, bounded by
/// [`MAX_ELF_SIZE`] whatever its size claims to be.
pub fn read_bounded(file: impl Read, path: &Path) -> Result<Vec<u8>, ElfError> {
    let mut out = Vec::new();
    file.take(MAX_ELF_SIZE + 1)
        .read_to_end(&mut out)
        .map_err(|source| ElfError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if out.len() as u64 > MAX_ELF_SIZE {
        return Err(ElfError::TooLarge {
            path: path.to_path_buf(),
            cap: MAX_ELF_SIZE,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounded() {
        let e = read_file(Path::new("/nonexistent/upstare")).unwrap_err();
        assert!(matches!(e, ElfError::Io { .. }), "{e}");
        // The cap holds whatever the reader yields (a small stand-in: the
        // real cap is 1 GiB, too much to allocate in a test).
        let short = std::io::repeat(0).take(100);
        assert_eq!(
            read_bounded(short, Path::new("zeros")).expect("read").len(),
            100
        );
    }
}
