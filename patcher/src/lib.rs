//! `upstare-patcher`: decides what maps to what between two instrumented
//! versions, from their frame-description tables alone (no process).
//!
//! - [`types`]: comparing types across the two versions.
//! - [`plan`]: the [`UpdatePlan`] (globals, functions, variables,
//!   continuations) as plain, serializable data, and [`default_plan`].
//!
//! The runtime (`upstare-apply`) executes a plan; it never re-decides a
//! mapping. Changes of type are named in the plan and refused for now.

#![forbid(unsafe_code)]

pub mod convert;
pub mod initial;
pub mod plan;
pub mod types;

pub use plan::{
    default_plan, plan_for_binaries, CallShape, ContinuationMapping, FunctionMapping, GlobalAction,
    GlobalMapping, PlanError, SiteKind, UpdatePlan, VarSource,
};
pub use types::{is_const_object, TypeComparer};
