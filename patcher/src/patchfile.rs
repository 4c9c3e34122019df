//! The PATCH file: an update plan plus the identity of the two versions it
//! was made for, so that `upstare-apply --pid PID PATCH` can refuse a
//! process that does not run OLD. This module is the single encoder and the
//! single decoder.
//!
//! Layout:
//! ```text
//!   magic "UPSTPTCH" | version u16 LE | reserved u16 | payload length u32 LE
//!   | SHA-256 of the payload (32 bytes) | payload
//! ```
//! The payload is a [`Patch`] in the postcard format. The checksum makes a
//! corrupted file an error instead of a different, still decodable plan
//! (a flipped bit in an index would otherwise map a variable elsewhere).
//! The decoder never panics on hostile bytes and never allocates more than
//! the input can justify (postcard reads sequences element by element, serde
//! caps pre-allocation, the whole file is capped at [`MAX_PATCH_SIZE`]).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use upstare_dwarf::fdt::FrameTables;

use crate::plan::UpdatePlan;
use crate::review::{NeedsUser, Review};

/// First bytes of a PATCH file.
pub const MAGIC: &[u8; 8] = b"UPSTPTCH";
/// Format version written by this encoder and the only one this decoder
/// reads.
pub const VERSION: u16 = 5;
/// Larger PATCH files are refused before any parsing.
pub const MAX_PATCH_SIZE: usize = 256 << 20;
/// Largest binary hashed when identifying a version (a bound on what a
/// mapped or named file can make us read).
pub const MAX_BINARY_SIZE: u64 = 4 << 30;
const HEADER_LEN: usize = 48;

/// What identifies one version: the GNU build id its tables record (empty
/// when the binary has none) and the SHA-256 of the whole instrumented file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageIdentity {
    pub build_id: Vec<u8>,
    pub sha256: [u8; 32],
}

/// An update plan and the two versions it was made for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patch {
    /// The version a process must run for this PATCH to apply.
    pub old: ImageIdentity,
    /// The version it updates to, and where it was (canonical path).
    pub new: ImageIdentity,
    pub new_path: PathBuf,
    pub plan: UpdatePlan,
    /// What the plan could not decide without the user; a PATCH with any is
    /// incomplete and is refused by `upstare-apply`.
    pub needs_user: Vec<NeedsUser>,
    /// The SPEC's C transformers, compiled (with their hash).
    pub transformers: Option<crate::transformer::TransformerObject>,
}

/// Why bytes are not a PATCH.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{len} bytes is too short for a PATCH file")]
    TooShort { len: usize },
    #[error("{len} bytes exceeds the PATCH size limit of {MAX_PATCH_SIZE}")]
    TooLarge { len: usize },
    #[error("not a PATCH file (bad magic)")]
    BadMagic,
    #[error("PATCH format version {version} is not supported (this upstare reads {VERSION})")]
    UnsupportedVersion { version: u16 },
    #[error("reserved header field is {value}, expected 0")]
    Reserved { value: u16 },
    #[error("the header declares {declared} payload bytes, the file has {actual}")]
    LengthMismatch { declared: u64, actual: u64 },
    #[error("the payload does not match its checksum (the file is corrupt)")]
    Checksum,
    #[error("corrupt payload: {why}")]
    Corrupt { why: String },
}

/// Why a PATCH could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("cannot encode the PATCH: {why}")]
    Encode { why: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: DecodeError,
    },
    #[error("{0}")]
    Input(#[from] crate::input::InputError),
    #[error("{path}: no readable upstare tables: {why}")]
    Tables { path: PathBuf, why: String },
    #[error("{0}")]
    Spec(#[from] crate::SpecError),
    #[error("{0}")]
    Build(#[from] crate::transformer::BuildError),
}

impl ImageIdentity {
    /// The identity of an instrumented binary, from its bytes and tables.
    pub fn of_bytes(bytes: &[u8], tables: &FrameTables) -> ImageIdentity {
        ImageIdentity {
            build_id: tables.binary.build_id.clone(),
            sha256: Sha256::digest(bytes).into(),
        }
    }

    /// The identity of a binary read from `r` (at most [`MAX_BINARY_SIZE`]
    /// bytes), with the build id its tables record.
    pub fn of_reader(mut r: impl Read, build_id: &[u8]) -> std::io::Result<ImageIdentity> {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut total: u64 = 0;
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total = total.saturating_add(n as u64);
            if total > MAX_BINARY_SIZE {
                return Err(std::io::Error::other(format!(
                    "larger than {MAX_BINARY_SIZE} bytes"
                )));
            }
            h.update(buf.get(..n).unwrap_or_default());
        }
        Ok(ImageIdentity {
            build_id: build_id.to_vec(),
            sha256: h.finalize().into(),
        })
    }

    /// Why `actual` is not this version, or `None` when it is. The content
    /// hash decides; a build id that differs is named first because it says
    /// more (another build, not just another instrumentation).
    pub fn mismatch(&self, actual: &ImageIdentity) -> Option<String> {
        if !self.build_id.is_empty()
            && !actual.build_id.is_empty()
            && self.build_id != actual.build_id
        {
            return Some(format!(
                "build id {} where {} was expected",
                hex(&actual.build_id),
                hex(&self.build_id)
            ));
        }
        (self.sha256 != actual.sha256).then(|| {
            format!(
                "content sha256 {} where {} was expected",
                hex(&actual.sha256),
                hex(&self.sha256)
            )
        })
    }

    /// The SHA-256 in hexadecimal.
    pub fn sha256_hex(&self) -> String {
        hex(&self.sha256)
    }

    /// The build id in hexadecimal (empty when there is none).
    pub fn build_id_hex(&self) -> String {
        hex(&self.build_id)
    }
}

/// Lowercase hexadecimal of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Patch {
    /// Whether nothing needs the user.
    pub fn is_complete(&self) -> bool {
        self.needs_user.is_empty()
    }
}

/// Reads an instrumented binary: its tables and its identity.
pub fn load_binary(path: &Path) -> Result<(FrameTables, ImageIdentity), PatchError> {
    let (tables, id, _) = load_binary_bytes(path)?;
    Ok((tables, id))
}

/// [`load_binary`], keeping the file's bytes.
fn load_binary_bytes(path: &Path) -> Result<(FrameTables, ImageIdentity, Vec<u8>), PatchError> {
    let bytes = read_bounded(path, MAX_BINARY_SIZE)?;
    let tables = upstare_dwarf::read_tables(&bytes).map_err(|e| PatchError::Tables {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    let id = ImageIdentity::of_bytes(&bytes, &tables);
    Ok((tables, id, bytes))
}

/// The PATCH from instrumented binary `old` to `new` (default plan), and
/// its review; what needs the user is in both.
pub fn make_patch(old: &Path, new: &Path) -> Result<(Patch, Review), PatchError> {
    make_patch_with_spec(old, new, None)
}

/// [`make_patch`] with the user's overrides from the SPEC file at `spec`
/// (each key checked against both versions). The plan carries OLD's
/// initial values, so data the program never changed follows NEW.
pub fn make_patch_with_spec(
    old: &Path,
    new: &Path,
    spec: Option<&Path>,
) -> Result<(Patch, Review), PatchError> {
    let (old_tables, old_id, old_bytes) = load_binary_bytes(old)?;
    let (new_tables, new_id, _) = load_binary_bytes(new)?;
    let (mut plan, transformers) = match spec {
        Some(path) => {
            let spec = crate::Spec::read(path)?;
            spec.check(path, &old_tables, &new_tables)?;
            let object = crate::transformer::build(path, &spec, &old_tables, &new_tables)?;
            (
                crate::plan_with_spec(&old_tables, &new_tables, &spec),
                object,
            )
        }
        None => (crate::default_plan(&old_tables, &new_tables), None),
    };
    let initial = crate::initial::initial_values(old, &old_tables, &old_bytes).map_err(|e| {
        PatchError::Tables {
            path: old.to_path_buf(),
            why: e.to_string(),
        }
    })?;
    plan.attach_initial_values(initial);
    let review = crate::review::review(&old_tables, &new_tables, &plan);
    let new_path = std::fs::canonicalize(new).map_err(|source| PatchError::Io {
        path: new.to_path_buf(),
        source,
    })?;
    let patch = Patch {
        old: old_id,
        new: new_id,
        new_path,
        plan,
        needs_user: review.needs_user.clone(),
        transformers,
    };
    Ok((patch, review))
}

/// Encodes a PATCH.
pub fn encode(patch: &Patch) -> Result<Vec<u8>, PatchError> {
    let payload =
        postcard::to_allocvec(patch).map_err(|e| PatchError::Encode { why: e.to_string() })?;
    let total = payload.len().saturating_add(HEADER_LEN);
    if total > MAX_PATCH_SIZE {
        return Err(PatchError::Encode {
            why: format!("{total} bytes exceeds the limit of {MAX_PATCH_SIZE}"),
        });
    }
    let len = u32::try_from(payload.len()).map_err(|_| PatchError::Encode {
        why: format!("{total} bytes"),
    })?;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes PATCH bytes; never panics.
pub fn decode(bytes: &[u8]) -> Result<Patch, DecodeError> {
    if bytes.len() > MAX_PATCH_SIZE {
        return Err(DecodeError::TooLarge { len: bytes.len() });
    }
    let (header, payload) = bytes
        .split_at_checked(HEADER_LEN)
        .ok_or(DecodeError::TooShort { len: bytes.len() })?;
    let field = |r: std::ops::Range<usize>| header.get(r).unwrap_or_default();
    if field(0..8) != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = u16::from_le_bytes([header[8], header[9]]);
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion { version });
    }
    // Reserved for flags a later version may define: zero today, so that
    // every byte of the file is checked.
    let reserved = u16::from_le_bytes([header[10], header[11]]);
    if reserved != 0 {
        return Err(DecodeError::Reserved { value: reserved });
    }
    let declared = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    if u64::from(declared) != payload.len() as u64 {
        return Err(DecodeError::LengthMismatch {
            declared: u64::from(declared),
            actual: payload.len() as u64,
        });
    }
    if Sha256::digest(payload).as_slice() != field(16..48) {
        return Err(DecodeError::Checksum);
    }
    let (patch, rest): (Patch, &[u8]) = postcard::take_from_bytes(payload)
        .map_err(|e| DecodeError::Corrupt { why: e.to_string() })?;
    if !rest.is_empty() {
        return Err(DecodeError::Corrupt {
            why: format!("{} trailing bytes", rest.len()),
        });
    }
    if patch.transformers.as_ref().is_some_and(|t| !t.intact()) {
        return Err(DecodeError::Corrupt {
            why: "the transformer object does not match its hash".into(),
        });
    }
    Ok(patch)
}

/// Reads a regular file of at most `limit` bytes, whole (see
/// [`crate::input::read_regular`]).
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, PatchError> {
    // A FIFO or a device is refused without waiting on it.
    Ok(crate::input::read_regular(path, limit)?)
}

/// Reads and decodes the PATCH file at `path`.
pub fn read_patch(path: &Path) -> Result<Patch, PatchError> {
    let bytes = read_bounded(path, MAX_PATCH_SIZE as u64)?;
    decode(&bytes).map_err(|source| PatchError::Invalid {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `bytes` to `path` whole or not at all: a temporary file beside it,
/// synced, then renamed over it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PatchError> {
    let io = |source| PatchError::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        // Best effort: the temporary file is ours and must not stay behind.
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Encodes `patch` and writes it to `path` atomically.
pub fn write_patch(path: &Path, patch: &Patch) -> Result<(), PatchError> {
    write_atomic(path, &encode(patch)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Patch {
        Patch {
            old: ImageIdentity {
                build_id: vec![1, 2, 3],
                sha256: [7; 32],
            },
            new: ImageIdentity {
                build_id: vec![],
                sha256: [9; 32],
            },
            new_path: PathBuf::from("/tmp/v2.up"),
            plan: UpdatePlan {
                globals: Vec::new(),
                new_globals: vec![3, 4],
                new_global_values: vec![(3, vec![1, 0, 0, 0])],
                functions: Vec::new(),
                inactive: Vec::new(),
                changed_types: vec!["struct session".into()],
                warnings: vec!["global added is new".into()],
                transformers: Default::default(),
                unrelated: None,
                // A frame's heap array (format version 5).
                heap_arrays: vec![crate::heap_arrays::HeapArray {
                    key: "level.items".into(),
                    pointer: crate::heap_arrays::HeapSlot::Local {
                        function: "level".into(),
                        var: 1,
                    },
                    count: crate::heap_arrays::HeapSlot::Local {
                        function: "level".into(),
                        var: 0,
                    },
                    count_size: 8,
                    count_signed: false,
                }],
            },
            needs_user: Vec::new(),
            transformers: None,
        }
    }

    #[test]
    fn round_trip() {
        let p = sample();
        let bytes = encode(&p).unwrap();
        assert_eq!(decode(&bytes).unwrap(), p);
    }

    #[test]
    fn an_older_format_version_is_refused_by_number() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[8..10].copy_from_slice(&4u16.to_le_bytes());
        let e = decode(&bytes).unwrap_err().to_string();
        assert!(
            e.contains("version 4 is not supported") && e.contains("reads 5"),
            "{e}"
        );
    }

    #[test]
    fn every_truncation_and_flipped_byte_is_an_error() {
        let bytes = encode(&sample()).unwrap();
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "truncated to {n}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x5a;
            assert!(decode(&b).is_err(), "byte {i} flipped");
        }
    }

    #[test]
    fn identity_mismatch_names_what_differs() {
        let a = ImageIdentity {
            build_id: vec![0xab],
            sha256: [1; 32],
        };
        let mut b = a.clone();
        assert_eq!(a.mismatch(&b), None);
        b.sha256 = [2; 32];
        assert!(a.mismatch(&b).unwrap().contains("content sha256 0202"));
        b.build_id = vec![0xcd];
        assert!(a.mismatch(&b).unwrap().contains("build id cd where ab"));
    }
}
