//! `upstare-patcher`: decides what maps to what between two instrumented
//! versions, from their frame-description tables alone (no process).
//!
//! - [`types`]: comparing types across the two versions.
//! - [`convert`]: datatype conversions by the default rules.
//! - [`initial`]: OLD's initial values (data never changed follows NEW).
//! - [`spec`]: the user's overrides (SPEC.toml), checked against both
//!   versions.
//! - [`plan`]: the [`UpdatePlan`] (globals, functions, variables,
//!   continuations) as plain, serializable data, and [`default_plan`] /
//!   [`plan_with_spec`].
//! - [`review`]: the plan in words, and what needs the user.
//! - [`patchfile`]: the PATCH file (plan + identity of OLD and NEW).
//! - [`header`]: C declarations for writing transformers.
//! - [`transformer`]: the SPEC's C transformers: where they are called, and
//!   their build into a shared object.
//! - [`heap_arrays`]: heap arrays whose count the SPEC names (`[heap]`).
//! - [`input`]: reading an input file (regular, capped, whole).
//! - [`unrelated`]: telling an update from a replacement by another program.
//!
//! The runtime (`upstare-apply`) executes a plan; it never re-decides a
//! mapping. A change of type no rule maps is named in the plan, with why.

#![forbid(unsafe_code)]

pub mod convert;
pub mod header;
pub mod heap_arrays;
pub mod initial;
pub mod input;
pub mod patchfile;
pub mod plan;
pub mod review;
pub mod spec;
pub mod transformer;
pub mod types;
pub mod unrelated;

pub use patchfile::{ImageIdentity, Patch};
pub use plan::{
    default_plan, plan_for_binaries, plan_with_spec, CallShape, ContinuationMapping,
    FunctionMapping, GlobalAction, GlobalMapping, InactiveRule, PlanError, SiteKind, UpdatePlan,
    VarSource,
};
pub use review::{review, NeedsUser, Review};
pub use spec::{Spec, SpecError};
pub use types::{is_const_object, TypeComparer};
