//! `upstare-patcher`: decides what maps to what between two instrumented
//! versions, from their frame-description tables alone (no process).
//!
//! - [`types`]: comparing types across the two versions.
//! - [`plan`]: the [`UpdatePlan`] (globals, functions, variables,
//!   continuations) as plain, serializable data, and [`default_plan`].
//! - [`convert`]: datatype conversions between the two versions' types.
//! - [`review`]: the plan in words, and what needs the user.
//! - [`patchfile`]: the PATCH file (plan + identity of OLD and NEW).
//! - [`header`]: C declarations for writing transformers.
//!
//! The runtime (`upstare-apply`) executes a plan; it never re-decides a
//! mapping. Changes of type are named in the plan and refused for now.

#![forbid(unsafe_code)]

pub mod convert;
pub mod header;
pub mod patchfile;
pub mod plan;
pub mod review;
pub mod types;

pub use patchfile::{ImageIdentity, Patch};
pub use plan::{
    default_plan, CallShape, ContinuationMapping, FunctionMapping, GlobalAction, GlobalMapping,
    SiteKind, UpdatePlan, VarSource,
};
pub use review::{review, NeedsUser, Review};
pub use types::{is_const_object, TypeComparer};
