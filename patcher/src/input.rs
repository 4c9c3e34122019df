//! Reading an input file (NEW, PATCH, SPEC) safely: it must be a regular
//! file no larger than a cap, and it is read completely or not at all.
//!
//! Why: `upstare-apply` reads its inputs before it touches the target, and
//! an input that is a FIFO (opening it blocks until a writer comes), a
//! character device such as `/dev/zero` (endless) or a huge sparse file
//! must be refused at once instead of hanging or growing the updater.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why an input file was not read.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{path}: cannot read: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: is {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path}: {size} bytes is larger than the limit of {cap} bytes")]
    TooLarge { path: PathBuf, size: u64, cap: u64 },
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: changed while it was read ({expected} bytes expected, {read} read)")]
    Changed {
        path: PathBuf,
        expected: u64,
        read: u64,
    },
}

/// What kind of non-regular file `t` is, in words.
fn kind(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a plain file"
    }
}

/// `O_NONBLOCK` on x86-64 Linux: opening a FIFO with it never waits for a
/// writer (the file type is checked right after, through the descriptor).
const O_NONBLOCK: i32 = 0o4000;

/// Reads the whole regular file at `path`, refusing anything else and
/// anything larger than `cap` bytes before reading a byte of it.
pub fn read_regular(path: &Path, cap: u64) -> Result<Vec<u8>, InputError> {
    let p = || path.to_path_buf();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(path)
        .map_err(|source| InputError::Open { path: p(), source })?;
    // The type and size of what was opened, not of what the path names now.
    let meta = f
        .metadata()
        .map_err(|source| InputError::Read { path: p(), source })?;
    if !meta.file_type().is_file() {
        return Err(InputError::NotRegular {
            path: p(),
            kind: kind(meta.file_type()),
        });
    }
    let size = meta.len();
    if size > cap {
        return Err(InputError::TooLarge {
            path: p(),
            size,
            cap,
        });
    }
    read_exactly(f, path, size)
}

/// Reads `size` bytes of `f`, failing if the file has more or fewer (it was
/// changed while read).
fn read_exactly(f: File, path: &Path, size: u64) -> Result<Vec<u8>, InputError> {
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    f.take(size.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|source| InputError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 != size {
        return Err(InputError::Changed {
            path: path.to_path_buf(),
            expected: size,
            read: bytes.len() as u64,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_devices_fifos_and_large_files_without_reading() {
        let dir = upstare_testkit::TempDir::new("input");
        let zero = read_regular(Path::new("/dev/zero"), 1 << 20).expect_err("device");
        assert!(zero.to_string().contains("character device"), "{zero}");
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        // Would block forever if opened without O_NONBLOCK.
        let e = read_regular(&fifo, 1 << 20).expect_err("fifo");
        assert!(e.to_string().contains("a FIFO"), "{e}");
        let big = dir.join("big");
        File::create(&big)
            .and_then(|f| f.set_len(10 << 30))
            .expect("sparse");
        let e = read_regular(&big, 1 << 20).expect_err("big");
        assert!(e.to_string().contains("10737418240 bytes"), "{e}");
        let e = read_regular(dir.path(), 1 << 20).expect_err("dir");
        assert!(e.to_string().contains("a directory"), "{e}");
        let ok = dir.join("ok");
        std::fs::write(&ok, b"hello").expect("write");
        assert_eq!(read_regular(&ok, 5).expect("read"), b"hello");
        assert!(read_regular(&ok, 4).is_err());
    }
}
