//! Executing a datatype conversion of the plan on bytes: an OLD value (its
//! pointers already remapped) becomes a NEW value, written over a base (NEW's
//! initializer for a global, zero elsewhere) that parts of the NEW type the
//! conversion does not fill keep.
//!
//! Every offset and size comes from tables of files: each access is checked,
//! and an access outside either value is an error, never a panic.

use upstare_patcher::convert::{Conversion, IntKind, Part};

/// Why a value could not be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("value {value} does not fit {}", int_name(*to))]
    DoesNotFit { value: i128, to: IntKind },
    #[error("value {value} names no enumerator of the new version")]
    UnknownEnumerator { value: i64 },
    #[error("{why}")]
    Refused { why: String },
    #[error("the conversion reaches outside the value (bytes {start}..{end} of {len})")]
    OutOfBounds { start: u64, end: u64, len: usize },
}

fn int_name(k: IntKind) -> String {
    format!(
        "{}{}-bit integer",
        if k.signed {
            "a signed "
        } else {
            "an unsigned "
        },
        u32::from(k.size) * 8
    )
}

/// Converts `old` into `new` by `conv`.
pub fn convert(conv: &Conversion, old: &[u8], new: &mut [u8]) -> Result<(), ConvertError> {
    match conv {
        Conversion::Copy { size } => {
            let src = range(old, 0, *size)?;
            let dst = range_mut(new, 0, *size)?;
            dst.copy_from_slice(src);
            Ok(())
        }
        Conversion::Int { from, to } => {
            let v = read_int(old, *from)?;
            write_int(new, *to, v)
        }
        Conversion::Enum { from, to, values } => {
            let v = read_int(old, *from)?;
            let v64 =
                i64::try_from(v).map_err(|_| ConvertError::DoesNotFit { value: v, to: *to })?;
            let mapped = values
                .iter()
                .find(|(o, _)| *o == v64)
                .map(|(_, n)| *n)
                .ok_or(ConvertError::UnknownEnumerator { value: v64 })?;
            write_int(new, *to, i128::from(mapped))
        }
        Conversion::Float { from_size, to_size } => {
            let value = match from_size {
                4 => f64::from(f32::from_le_bytes(fixed(old)?)),
                8 => f64::from_le_bytes(fixed(old)?),
                _ => return Err(refused("floating-point size")),
            };
            match to_size {
                // Narrowing rounds, as a C assignment does.
                4 => range_mut(new, 0, 4)?.copy_from_slice(&(value as f32).to_le_bytes()),
                8 => range_mut(new, 0, 8)?.copy_from_slice(&value.to_le_bytes()),
                _ => return Err(refused("floating-point size")),
            }
            Ok(())
        }
        Conversion::Struct { parts } => {
            for part in parts {
                match part {
                    Part::Member {
                        old_offset,
                        new_offset,
                        conversion,
                        ..
                    } => {
                        let src = tail(old, *old_offset)?;
                        let dst = tail_mut(new, *new_offset)?;
                        convert(conversion, src, dst)?;
                    }
                    Part::Bits {
                        old_bit,
                        new_bit,
                        bits,
                        ..
                    } => move_bits(old, *old_bit, new, *new_bit, *bits)?,
                    Part::Value {
                        new_offset, bytes, ..
                    } => range_mut(new, *new_offset, bytes.len() as u64)?.copy_from_slice(bytes),
                }
            }
            Ok(())
        }
        Conversion::Array {
            count,
            old_stride,
            new_stride,
            element,
        } => {
            for i in 0..*count {
                let at = |stride: u64| {
                    i.checked_mul(stride).ok_or(ConvertError::OutOfBounds {
                        start: u64::MAX,
                        end: u64::MAX,
                        len: 0,
                    })
                };
                let src = tail(old, at(*old_stride)?)?;
                let dst = tail_mut(new, at(*new_stride)?)?;
                convert(element, src, dst)?;
            }
            Ok(())
        }
        Conversion::Refuse { why } => Err(refused(why)),
    }
}

fn refused(why: &str) -> ConvertError {
    ConvertError::Refused { why: why.into() }
}

fn out_of_bounds(start: u64, len: u64, buf: usize) -> ConvertError {
    ConvertError::OutOfBounds {
        start,
        end: start.saturating_add(len),
        len: buf,
    }
}

fn bounds(buf: usize, start: u64, len: u64) -> Result<std::ops::Range<usize>, ConvertError> {
    let s = usize::try_from(start).map_err(|_| out_of_bounds(start, len, buf))?;
    let n = usize::try_from(len).map_err(|_| out_of_bounds(start, len, buf))?;
    let e = s
        .checked_add(n)
        .ok_or_else(|| out_of_bounds(start, len, buf))?;
    if e > buf {
        return Err(out_of_bounds(start, len, buf));
    }
    Ok(s..e)
}

fn range(buf: &[u8], start: u64, len: u64) -> Result<&[u8], ConvertError> {
    let r = bounds(buf.len(), start, len)?;
    Ok(&buf[r])
}

fn range_mut(buf: &mut [u8], start: u64, len: u64) -> Result<&mut [u8], ConvertError> {
    let r = bounds(buf.len(), start, len)?;
    Ok(&mut buf[r])
}

fn tail(buf: &[u8], start: u64) -> Result<&[u8], ConvertError> {
    let len = (buf.len() as u64).saturating_sub(start);
    range(buf, start, len)
}

fn tail_mut(buf: &mut [u8], start: u64) -> Result<&mut [u8], ConvertError> {
    let len = (buf.len() as u64).saturating_sub(start);
    range_mut(buf, start, len)
}

fn fixed<const N: usize>(buf: &[u8]) -> Result<[u8; N], ConvertError> {
    let mut a = [0u8; N];
    a.copy_from_slice(range(buf, 0, N as u64)?);
    Ok(a)
}

fn read_int(buf: &[u8], k: IntKind) -> Result<i128, ConvertError> {
    let bytes = range(buf, 0, u64::from(k.size))?;
    let mut wide = [0u8; 16];
    wide[..bytes.len()].copy_from_slice(bytes);
    let negative = k.signed && bytes.last().is_some_and(|b| b & 0x80 != 0);
    if negative {
        wide[bytes.len()..].fill(0xff);
    }
    Ok(i128::from_le_bytes(wide))
}

fn write_int(buf: &mut [u8], k: IntKind, v: i128) -> Result<(), ConvertError> {
    let bits = u32::from(k.size) * 8;
    let (min, max) = if k.signed {
        (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1)
    } else {
        (0, (1i128 << bits) - 1)
    };
    if v < min || v > max {
        return Err(ConvertError::DoesNotFit { value: v, to: k });
    }
    let bytes = v.to_le_bytes();
    range_mut(buf, 0, u64::from(k.size))?.copy_from_slice(&bytes[..usize::from(k.size)]);
    Ok(())
}

/// Copies `bits` bits from bit `from` of `old` to bit `to` of `new`
/// (little-endian bit order, as x86-64 lays out bitfields).
fn move_bits(
    old: &[u8],
    from: u64,
    new: &mut [u8],
    to: u64,
    bits: u64,
) -> Result<(), ConvertError> {
    for k in 0..bits {
        let (s, d) = (from.checked_add(k), to.checked_add(k));
        let (Some(s), Some(d)) = (s, d) else {
            return Err(out_of_bounds(from, bits, old.len()));
        };
        let bit = range(old, s / 8, 1)?[0] >> (s % 8) & 1;
        let byte = &mut range_mut(new, d / 8, 1)?[0];
        *byte = (*byte & !(1 << (d % 8))) | (bit << (d % 8));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const I32: IntKind = IntKind {
        size: 4,
        signed: true,
    };
    const I64: IntKind = IntKind {
        size: 8,
        signed: true,
    };
    const U16: IntKind = IntKind {
        size: 2,
        signed: false,
    };

    #[test]
    fn integers_widen_by_their_encoding_and_narrow_only_when_the_value_fits() {
        let mut out = [0u8; 8];
        convert(
            &Conversion::Int { from: I32, to: I64 },
            &(-5i32).to_le_bytes(),
            &mut out,
        )
        .unwrap();
        assert_eq!(i64::from_le_bytes(out), -5);
        let mut out = [0u8; 2];
        convert(
            &Conversion::Int { from: I64, to: U16 },
            &65535i64.to_le_bytes(),
            &mut out,
        )
        .unwrap();
        assert_eq!(u16::from_le_bytes(out), 65535);
        let e = convert(
            &Conversion::Int { from: I64, to: U16 },
            &(-1i64).to_le_bytes(),
            &mut out,
        );
        assert_eq!(e, Err(ConvertError::DoesNotFit { value: -1, to: U16 }));
        let e = convert(
            &Conversion::Int { from: I64, to: I32 },
            &(1i64 << 40).to_le_bytes(),
            &mut [0u8; 4],
        );
        assert!(matches!(e, Err(ConvertError::DoesNotFit { .. })), "{e:?}");
    }

    #[test]
    fn structs_move_members_and_keep_the_base_elsewhere() {
        // old { int a; int b; } -> new { long b; int c (new); int a; }
        let conv = Conversion::Struct {
            parts: vec![
                Part::Member {
                    name: "b".into(),
                    old_offset: 4,
                    old_size: 4,
                    new_offset: 0,
                    conversion: Conversion::Int { from: I32, to: I64 },
                },
                Part::Member {
                    name: "a".into(),
                    old_offset: 0,
                    old_size: 4,
                    new_offset: 12,
                    conversion: Conversion::Copy { size: 4 },
                },
            ],
        };
        let old = [7i32.to_le_bytes(), (-9i32).to_le_bytes()].concat();
        let mut new = [0xeeu8; 16];
        convert(&conv, &old, &mut new).unwrap();
        assert_eq!(i64::from_le_bytes(new[0..8].try_into().unwrap()), -9);
        assert_eq!(new[8..12], [0xee; 4], "the new member keeps the base");
        assert_eq!(i32::from_le_bytes(new[12..16].try_into().unwrap()), 7);
    }

    #[test]
    fn arrays_keep_the_common_prefix_and_enums_map_by_name() {
        let conv = Conversion::Array {
            count: 2,
            old_stride: 4,
            new_stride: 4,
            element: Box::new(Conversion::Enum {
                from: I32,
                to: I32,
                values: vec![(0, 1), (1, 0)],
            }),
        };
        let old = [0i32.to_le_bytes(), 1i32.to_le_bytes()].concat();
        let mut new = [0x55u8; 12];
        convert(&conv, &old, &mut new).unwrap();
        assert_eq!(new[0..4], 1i32.to_le_bytes());
        assert_eq!(new[4..8], 0i32.to_le_bytes());
        assert_eq!(new[8..12], [0x55; 4]);
        let e = convert(&conv, &[2, 0, 0, 0, 0, 0, 0, 0], &mut new);
        assert_eq!(e, Err(ConvertError::UnknownEnumerator { value: 2 }));
    }

    #[test]
    fn bitfields_move_bit_by_bit() {
        // 3 bits at bit 5 of byte 0 -> bit 1 of byte 1.
        let old = [0b1010_0000u8, 0];
        let mut new = [0u8, 0b1111_0001];
        move_bits(&old, 5, &mut new, 9, 3).unwrap();
        assert_eq!(new, [0, 0b1111_1011]);
    }

    #[test]
    fn hostile_offsets_are_errors_not_panics() {
        let conv = Conversion::Struct {
            parts: vec![Part::Member {
                name: "x".into(),
                old_offset: u64::MAX,
                old_size: 8,
                new_offset: 0,
                conversion: Conversion::Copy { size: 8 },
            }],
        };
        assert!(matches!(
            convert(&conv, &[0; 8], &mut [0; 8]),
            Err(ConvertError::OutOfBounds { .. })
        ));
        let conv = Conversion::Array {
            count: u64::MAX,
            old_stride: u64::MAX,
            new_stride: 1,
            element: Box::new(Conversion::Copy { size: 1 }),
        };
        assert!(convert(&conv, &[0; 8], &mut [0; 8]).is_err());
        let bits = move_bits(&[0; 2], u64::MAX - 1, &mut [0; 2], 0, 4);
        assert!(bits.is_err());
    }
}
