//! Datatype conversions: how a value of an OLD type becomes a value of the
//! corresponding NEW type, decided from the two type tables alone.
//!
//! The default rules (DESIGN.md, "Default mapping"), the same for globals,
//! frames and heap objects:
//! - struct members by name, recursively; removed members dropped; moved or
//!   resized members re-laid out; new members keep the base value (NEW's
//!   initializer for a global, zero elsewhere);
//! - arrays: the common prefix converted element by element, the rest keeps
//!   the base value;
//! - integers widened by their encoding; narrowed or re-signed only when the
//!   value fits, checked when the conversion runs;
//! - enums by enumerator name;
//! - typedef chains and qualifiers compared by what they name;
//! - a change of meaning (integer ↔ pointer, scalar ↔ struct, a changed
//!   union, a pointer to a different type) is never guessed: the conversion
//!   is [`Conversion::Refuse`] with the reason.
//!
//! A conversion is plain data (serializable, part of the plan); the runtime
//! executes it on bytes. Pointers inside the old value are remapped before
//! the conversion runs, with OLD's type, so a conversion only moves bytes.

use serde::{Deserialize, Serialize};
use upstare_dwarf::model::{type_name, type_size, ArrayDim, BaseEncoding, Member, Type, TypeId};

use crate::spec::Spec;
use crate::types::TypeComparer;

/// Deepest nesting of aggregates converted (struct in array in struct ...);
/// pointers are not followed, so real types stay far below it.
const MAX_NESTING: u32 = 64;
/// Longest chain of typedefs and qualifiers followed (hostile tables may
/// hold cycles).
const MAX_TYPEDEF_CHAIN: u32 = 64;

/// How an OLD value becomes a NEW one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Conversion {
    /// Same layout and meaning: `size` bytes copied.
    Copy { size: u64 },
    /// An integer (or enum) resized or re-signed: sign- or zero-extended by
    /// the OLD encoding; a value that does not fit the NEW type is refused
    /// when the conversion runs.
    Int { from: IntKind, to: IntKind },
    /// An enum: each OLD value mapped to the NEW value of the enumerator of
    /// the same name; a value with no such enumerator is refused when the
    /// conversion runs.
    Enum {
        from: IntKind,
        to: IntKind,
        /// (OLD value, NEW value), one per enumerator name both have.
        values: Vec<(i64, i64)>,
    },
    /// A floating-point value resized (`float` ↔ `double`).
    Float { from_size: u8, to_size: u8 },
    /// A struct: each part of the NEW value from its OLD member, the rest
    /// keeps the base value.
    Struct { parts: Vec<Part> },
    /// An array: the first `count` elements converted, the rest keeps the
    /// base value.
    Array {
        count: u64,
        old_stride: u64,
        new_stride: u64,
        element: Box<Conversion>,
    },
    /// Not convertible by default.
    Refuse { why: String },
}

/// Size and signedness of an integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntKind {
    pub size: u8,
    pub signed: bool,
}

/// One member of a converted struct.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Part {
    /// Bytes at `new_offset` converted from bytes at `old_offset`.
    Member {
        name: String,
        old_offset: u64,
        /// Size of the OLD member (where pointers into it may point).
        old_size: u64,
        new_offset: u64,
        conversion: Conversion,
    },
    /// A new member the SPEC gives a value: these bytes at `new_offset`.
    Value {
        name: String,
        new_offset: u64,
        bytes: Vec<u8>,
    },
    /// A bitfield: `bits` bits moved from `old_bit` to `new_bit` (bit
    /// offsets from the start of the struct, little-endian).
    Bits {
        name: String,
        old_bit: u64,
        new_bit: u64,
        bits: u64,
    },
}

impl Conversion {
    /// Whether the value is copied unchanged.
    pub fn is_copy(&self) -> bool {
        matches!(self, Conversion::Copy { .. })
    }

    /// Where the byte at `old` of the OLD value is in the NEW value (for
    /// pointers into a converted object, which move with their member);
    /// `None` when that byte has no counterpart (a removed member, a
    /// dropped array element).
    pub fn map_offset(&self, old: u64) -> Option<u64> {
        match self {
            Conversion::Copy { size } => (old < *size).then_some(old),
            Conversion::Int { from, to } | Conversion::Enum { from, to, .. } => {
                (old < u64::from(from.size) && old < u64::from(to.size)).then_some(old)
            }
            Conversion::Float { from_size, .. } => (old == 0 && *from_size > 0).then_some(0),
            Conversion::Struct { parts } => parts.iter().find_map(|p| match p {
                Part::Member {
                    old_offset,
                    old_size,
                    new_offset,
                    conversion,
                    ..
                } if *old_offset <= old && old - old_offset < *old_size => conversion
                    .map_offset(old - old_offset)
                    .and_then(|o| new_offset.checked_add(o)),
                _ => None,
            }),
            Conversion::Array {
                count,
                old_stride,
                new_stride,
                element,
            } => {
                let i = old.checked_div(*old_stride)?;
                if i >= *count {
                    return None;
                }
                let inner = element.map_offset(old - i * old_stride)?;
                i.checked_mul(*new_stride)?.checked_add(inner)
            }
            Conversion::Refuse { .. } => None,
        }
    }

    /// The first reason this conversion (or a part of it) is refused.
    pub fn refusal(&self) -> Option<&str> {
        match self {
            Conversion::Refuse { why } => Some(why),
            Conversion::Struct { parts } => parts.iter().find_map(|p| match p {
                Part::Member { conversion, .. } => conversion.refusal(),
                Part::Bits { .. } | Part::Value { .. } => None,
            }),
            Conversion::Array { element, .. } => element.refusal(),
            _ => None,
        }
    }
}

/// A conversion and the changes it stands for, in words (`member flags
/// added at offset 16`, `length 65 → 68`), for the review and messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeChange {
    pub old_type: String,
    pub new_type: String,
    pub conversion: Conversion,
    pub changes: Vec<String>,
    /// NEW members that keep the base value (NEW's initializer for a
    /// global, zero elsewhere), by path (`s.limits.max`).
    pub new_members: Vec<String>,
}

/// Builds conversions between OLD's and NEW's types.
pub struct Converter<'a> {
    old: &'a [Type],
    new: &'a [Type],
    cmp: TypeComparer<'a>,
    /// The user's member renames and values.
    spec: Spec,
}

/// What a conversion is being built for: the path in words, and where the
/// changes are collected.
struct Ctx {
    changes: Vec<String>,
    new_members: Vec<String>,
}

impl<'a> Converter<'a> {
    pub fn new(old: &'a [Type], new: &'a [Type]) -> Self {
        Self::with_spec(old, new, &Spec::default())
    }

    /// A converter that follows the SPEC's member renames and values.
    pub fn with_spec(old: &'a [Type], new: &'a [Type], spec: &Spec) -> Self {
        Converter {
            old,
            new,
            cmp: TypeComparer::new(old, new),
            spec: Spec {
                rename: crate::spec::Renames {
                    members: spec.rename.members.clone(),
                    ..Default::default()
                },
                values: crate::spec::Values {
                    members: spec.values.members.clone(),
                    ..Default::default()
                },
                ..Spec::default()
            },
        }
    }

    /// NEW's types.
    pub fn new_types(&self) -> &'a [Type] {
        self.new
    }

    /// Whether the two types are the same (the comparer underneath).
    pub fn equal(&mut self, a: TypeId, b: TypeId) -> bool {
        self.cmp.equal(a, b)
    }

    /// The conversion of a value of OLD type `a` into NEW type `b`, with the
    /// changes in words; `what` names the value (`global table`) and
    /// prefixes member paths.
    pub fn change(&mut self, a: TypeId, b: TypeId, what: &str) -> TypeChange {
        let mut ctx = Ctx {
            changes: Vec::new(),
            new_members: Vec::new(),
        };
        let conversion = self.convert(a, b, what, 0, &mut ctx);
        TypeChange {
            old_type: type_name(self.old, a),
            new_type: type_name(self.new, b),
            conversion,
            changes: ctx.changes,
            new_members: ctx.new_members,
        }
    }

    fn convert(
        &mut self,
        a: TypeId,
        b: TypeId,
        path: &str,
        depth: u32,
        ctx: &mut Ctx,
    ) -> Conversion {
        if self.cmp.equal(a, b) {
            return match type_size(self.old, a) {
                Some(size) => Conversion::Copy { size },
                None => refuse(format!("{path}: {} has no size", type_name(self.old, a))),
            };
        }
        if depth > MAX_NESTING {
            return refuse(format!("{path}: nested too deeply"));
        }
        let (ra, rb) = (resolve(self.old, a), resolve(self.new, b));
        let (Some((ia, ta)), Some((ib, tb))) = (ra, rb) else {
            return refuse(format!("{path}: a type is missing from the tables"));
        };
        let (na, nb) = (type_name(self.old, a), type_name(self.new, b));
        match (ta, tb) {
            (Type::Base { encoding: ea, size: sa, .. }, Type::Base { encoding: eb, size: sb, .. }) => {
                match (int_kind(*ea, *sa), int_kind(*eb, *sb)) {
                    (Some(from), Some(to)) => {
                        ctx.changes.push(format!("{path}: {na} → {nb}"));
                        Conversion::Int { from, to }
                    }
                    _ if *ea == BaseEncoding::Float && *eb == BaseEncoding::Float => {
                        match (u8::try_from(*sa), u8::try_from(*sb)) {
                            (Ok(from_size @ (4 | 8)), Ok(to_size @ (4 | 8))) => {
                                ctx.changes.push(format!("{path}: {na} → {nb}"));
                                Conversion::Float { from_size, to_size }
                            }
                            _ => refuse(format!("{path}: {na} → {nb} (floating-point size)")),
                        }
                    }
                    _ => refuse(format!("{path}: {na} → {nb} changes the meaning of the value")),
                }
            }
            (
                Type::Enum { size: sa, enumerators: va, underlying: ua, .. },
                Type::Enum { size: sb, enumerators: vb, underlying: ub, .. },
            ) => {
                let (Some(from), Some(to)) = (
                    enum_kind(self.old, *sa, *ua, va),
                    enum_kind(self.new, *sb, *ub, vb),
                ) else {
                    return refuse(format!("{path}: {na} → {nb}: enum size"));
                };
                let mut values = Vec::new();
                for (name, v) in va {
                    match vb.iter().find(|(n, _)| n == name) {
                        Some((_, w)) => {
                            if v != w {
                                ctx.changes.push(format!("{path}: {name} {v} → {w}"));
                            }
                            values.push((*v, *w));
                        }
                        None => ctx.changes.push(format!("{path}: enumerator {name} removed")),
                    }
                }
                for (name, w) in vb {
                    if !va.iter().any(|(n, _)| n == name) {
                        ctx.changes.push(format!("{path}: enumerator {name} = {w} added"));
                    }
                }
                Conversion::Enum { from, to, values }
            }
            (Type::Pointer { pointee: pa }, Type::Pointer { pointee: pb }) => {
                if self.pointees_correspond(*pa, *pb) {
                    ctx.changes.push(format!("{path}: {na} → {nb} (points to the converted object)"));
                    Conversion::Copy { size: 8 }
                } else {
                    refuse(format!("{path}: {na} → {nb} points to a different type"))
                }
            }
            (
                Type::Struct { name: sa_name, members: ma, declaration: da, .. },
                Type::Struct { name: sb_name, members: mb, declaration: db, size: size_b },
            ) => {
                if sa_name != sb_name {
                    return refuse(format!("{path}: {na} → {nb} is another struct"));
                }
                if *da || *db {
                    return refuse(format!("{path}: {na} is only declared, its layout is unknown"));
                }
                let tag = format!("struct {}", sb_name.as_deref().unwrap_or(""));
                self.convert_struct(&tag, ma, mb, *size_b, path, depth, ctx)
            }
            (Type::Union { .. }, Type::Union { .. }) => {
                refuse(format!("{path}: {na} → {nb}: a union whose members changed (which member is live is unknown)"))
            }
            (Type::Array { element: ea, dims: da }, Type::Array { element: eb, dims: db }) => {
                self.convert_array(ia, *ea, da, ib, *eb, db, path, depth, ctx)
            }
            _ => refuse(format!("{path}: {na} → {nb} changes the meaning of the value")),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn convert_struct(
        &mut self,
        tag: &str,
        ma: &[Member],
        mb: &[Member],
        new_size: u64,
        path: &str,
        depth: u32,
        ctx: &mut Ctx,
    ) -> Conversion {
        let mut parts = Vec::new();
        let said = ctx.changes.len();
        let key = |members: &[Member], i: usize| -> String {
            match &members[i].name {
                Some(n) => n.clone(),
                // Anonymous members match by rank among the anonymous ones.
                None => {
                    let k = members[..i].iter().filter(|m| m.name.is_none()).count();
                    format!("<anonymous #{k}>")
                }
            }
        };
        for (j, nm) in mb.iter().enumerate() {
            let name = key(mb, j);
            let member_path = format!("{path}.{name}");
            let renamed = |i: usize| self.spec.new_member_name(tag, &key(ma, i)).to_string();
            let Some(i) = (0..ma.len()).find(|&i| renamed(i) == name) else {
                ctx.changes.push(format!(
                    "{path}: member {name} added at offset {}",
                    nm.offset
                ));
                let given = self.spec.values.members.get(tag).and_then(|m| m.get(&name));
                match given.map(|v| crate::spec::encode(self.new, nm.ty, v)) {
                    Some(Ok(bytes)) if nm.bitfield.is_none() => parts.push(Part::Value {
                        name,
                        new_offset: nm.offset,
                        bytes,
                    }),
                    _ => ctx.new_members.push(member_path),
                }
                continue;
            };
            let om = &ma[i];
            if om.offset != nm.offset {
                ctx.changes.push(format!(
                    "{path}: member {name} moved from offset {} to {}",
                    om.offset, nm.offset
                ));
            }
            match (om.bitfield, nm.bitfield) {
                (None, None) => {
                    let conversion = self.convert(om.ty, nm.ty, &member_path, depth + 1, ctx);
                    parts.push(Part::Member {
                        name,
                        old_offset: om.offset,
                        old_size: type_size(self.old, om.ty).unwrap_or(0),
                        new_offset: nm.offset,
                        conversion,
                    });
                }
                (Some((ob, obits)), Some((nb, nbits)))
                    if obits == nbits && self.cmp.equal(om.ty, nm.ty) =>
                {
                    let bit = |off: u64, b: u64| off.checked_mul(8).and_then(|x| x.checked_add(b));
                    match (bit(om.offset, ob), bit(nm.offset, nb)) {
                        (Some(old_bit), Some(new_bit)) => parts.push(Part::Bits {
                            name,
                            old_bit,
                            new_bit,
                            bits: obits,
                        }),
                        _ => parts.push(Part::Member {
                            name,
                            old_offset: om.offset,
                            old_size: 0,
                            new_offset: nm.offset,
                            conversion: refuse(format!("{member_path}: bitfield offset overflows")),
                        }),
                    }
                }
                _ => parts.push(Part::Member {
                    name,
                    old_offset: om.offset,
                    old_size: 0,
                    new_offset: nm.offset,
                    conversion: refuse(format!("{member_path}: a bitfield changed width or type")),
                }),
            }
        }
        for (i, _) in ma.iter().enumerate() {
            let name = key(ma, i);
            let new_name = self.spec.new_member_name(tag, &name).to_string();
            if !(0..mb.len()).any(|j| key(mb, j) == new_name) {
                ctx.changes.push(format!("{path}: member {name} removed"));
            } else if new_name != name {
                ctx.changes
                    .push(format!("{path}: member {name} renamed {new_name}"));
            }
        }
        if ctx.changes.len() == said {
            ctx.changes.push(format!(
                "{path}: size or layout changed (now {new_size} bytes)"
            ));
        }
        Conversion::Struct { parts }
    }

    #[allow(clippy::too_many_arguments)]
    fn convert_array(
        &mut self,
        ia: TypeId,
        ea: TypeId,
        da: &[ArrayDim],
        ib: TypeId,
        eb: TypeId,
        db: &[ArrayDim],
        path: &str,
        depth: u32,
        ctx: &mut Ctx,
    ) -> Conversion {
        let (Some(ArrayDim::Fixed(ca)), Some(ArrayDim::Fixed(cb))) = (da.first(), db.first())
        else {
            return refuse(format!("{path}: an array of unknown length"));
        };
        // Inner dimensions must match; the outermost one may change.
        if da.get(1..) != db.get(1..) {
            return refuse(format!("{path}: the inner dimensions of an array changed"));
        }
        let (Some(sa), Some(sb)) = (type_size(self.old, ia), type_size(self.new, ib)) else {
            return refuse(format!("{path}: an array of unsized elements"));
        };
        let stride = |total: u64, count: u64| {
            if count == 0 {
                Some(0)
            } else {
                total.checked_div(count)
            }
        };
        let (Some(old_stride), Some(new_stride)) = (stride(sa, *ca), stride(sb, *cb)) else {
            return refuse(format!("{path}: array size"));
        };
        if ca != cb {
            ctx.changes.push(format!("{path}: length {ca} → {cb}"));
        }
        let element = if da.len() > 1 {
            // Rows of an array of arrays: the element conversion of the
            // innermost type, applied over each row's elements.
            let rows = da[1..].iter().try_fold(1u64, |n, d| match d {
                ArrayDim::Fixed(c) => n.checked_mul(*c),
                _ => None,
            });
            let (Some(rows), Some(es_a), Some(es_b)) =
                (rows, type_size(self.old, ea), type_size(self.new, eb))
            else {
                return refuse(format!("{path}: array size"));
            };
            let inner = self.convert(ea, eb, &format!("{path}[]"), depth + 1, ctx);
            if inner.is_copy() && es_a == es_b {
                Conversion::Copy {
                    size: old_stride.min(new_stride),
                }
            } else {
                Conversion::Array {
                    count: rows,
                    old_stride: es_a,
                    new_stride: es_b,
                    element: Box::new(inner),
                }
            }
        } else {
            self.convert(ea, eb, &format!("{path}[]"), depth + 1, ctx)
        };
        Conversion::Array {
            count: (*ca).min(*cb),
            old_stride,
            new_stride,
            element: Box::new(element),
        }
    }

    /// Whether a pointer to OLD type `a` may keep pointing at the same
    /// object as a pointer to NEW type `b`: the same type, or the evolved
    /// version of the same named struct, union, enum or typedef.
    fn pointees_correspond(&mut self, a: Option<TypeId>, b: Option<TypeId>) -> bool {
        self.pointees_correspond_at(a, b, 0)
    }

    fn pointees_correspond_at(&mut self, a: Option<TypeId>, b: Option<TypeId>, depth: u32) -> bool {
        let (Some(a), Some(b)) = (a, b) else {
            return a.is_none() && b.is_none();
        };
        if self.cmp.equal(a, b) {
            return true;
        }
        // A pointer to a pointer (`struct node **` into a list's links):
        // the pointer pointed at keeps its size and meaning when its own
        // pointee corresponds, and moves with the member that holds it.
        if let (Some(Type::Pointer { pointee: pa }), Some(Type::Pointer { pointee: pb })) =
            (self.old.get(a.0 as usize), self.new.get(b.0 as usize))
        {
            return depth < MAX_TYPEDEF_CHAIN && self.pointees_correspond_at(*pa, *pb, depth + 1);
        }
        let name_of = |types: &[Type], id: TypeId| -> Option<String> {
            match types.get(id.0 as usize)? {
                Type::Typedef { name, .. } => Some(format!("typedef {name}")),
                Type::Struct { name: Some(n), .. } => Some(format!("struct {n}")),
                Type::Union { name: Some(n), .. } => Some(format!("union {n}")),
                Type::Enum { name: Some(n), .. } => Some(format!("enum {n}")),
                Type::Qualified {
                    target: Some(t), ..
                } => {
                    // `const struct s *`: the qualifier does not change what
                    // is pointed at.
                    match types.get(t.0 as usize)? {
                        Type::Struct { name: Some(n), .. } => Some(format!("struct {n}")),
                        Type::Typedef { name, .. } => Some(format!("typedef {name}")),
                        _ => None,
                    }
                }
                _ => None,
            }
        };
        matches!((name_of(self.old, a), name_of(self.new, b)), (Some(x), Some(y)) if x == y)
    }
}

fn refuse(why: String) -> Conversion {
    Conversion::Refuse { why }
}

/// The type `id` names once typedefs and qualifiers are stripped (`None`:
/// `void` through a typedef, or a broken or too long chain).
pub fn resolve(types: &[Type], id: TypeId) -> Option<(TypeId, &Type)> {
    let mut cur = id;
    for _ in 0..MAX_TYPEDEF_CHAIN {
        match types.get(cur.0 as usize)? {
            Type::Typedef { target, .. } | Type::Qualified { target, .. } => cur = (*target)?,
            t => return Some((cur, t)),
        }
    }
    None
}

fn int_kind(encoding: BaseEncoding, size: u64) -> Option<IntKind> {
    let signed = match encoding {
        BaseEncoding::Signed | BaseEncoding::SignedChar => true,
        BaseEncoding::Unsigned | BaseEncoding::UnsignedChar | BaseEncoding::Bool => false,
        _ => return None,
    };
    let size = u8::try_from(size)
        .ok()
        .filter(|s| matches!(s, 1 | 2 | 4 | 8))?;
    Some(IntKind { size, signed })
}

fn enum_kind(
    types: &[Type],
    size: u64,
    underlying: Option<TypeId>,
    values: &[(String, i64)],
) -> Option<IntKind> {
    let signed = match underlying.and_then(|u| resolve(types, u)) {
        Some((_, Type::Base { encoding, .. })) => {
            matches!(encoding, BaseEncoding::Signed | BaseEncoding::SignedChar)
        }
        // No underlying type recorded: signed if any value is negative.
        _ => values.iter().any(|(_, v)| *v < 0),
    };
    let size = u8::try_from(size)
        .ok()
        .filter(|s| matches!(s, 1 | 2 | 4 | 8))?;
    Some(IntKind { size, signed })
}
