//! Comparing types across two versions: the comparer lives with the model
//! (`upstare_dwarf::compare`), which also resolves declarations with it.

pub use upstare_dwarf::compare::{is_const_object, TypeComparer};
