//! Telling an update from a replacement: when `main`, or most of OLD's
//! functions and globals, have no counterpart in NEW, NEW is plainly
//! another program, and carrying OLD's state over would run it with
//! dropped globals and zeroed locals. The plan refuses such an update
//! (see [`crate::plan::UpdatePlan::unrelated`]) unless the SPEC accepts it
//! with `accept.unmatched = N`, N being the count of OLD's functions and
//! globals with no counterpart, so that a SPEC written for one pair of
//! versions accepts no other.

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use upstare_dwarf::fdt::FrameTables;

use crate::spec::{global_key, Spec};

/// How many names [`Unrelated`] lists.
const NAMES_SHOWN: usize = 5;

/// OLD's functions and globals with no counterpart in NEW (by name, after
/// the SPEC's renames).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unmatched {
    /// OLD has `main` and NEW has no counterpart of it.
    pub main: bool,
    /// OLD's functions (distinct names) with no counterpart, in OLD's order.
    pub functions: Vec<String>,
    /// How many distinct function names OLD has.
    pub function_total: usize,
    /// OLD's globals and static locals (`name`, `function::name`) with no
    /// counterpart, in OLD's order.
    pub globals: Vec<String>,
    /// How many distinct globals OLD has.
    pub global_total: usize,
}

impl Unmatched {
    /// Compares the names of OLD and NEW.
    pub fn of(old: &FrameTables, new: &FrameTables, spec: &Spec) -> Unmatched {
        let new_functions: HashSet<&str> = new.functions.iter().map(|f| f.name.as_str()).collect();
        let new_globals: HashSet<String> = new
            .globals
            .iter()
            .map(|g| global_key(&g.name, g.owner.as_deref()))
            .collect();
        let mut u = Unmatched::default();
        let mut seen = HashSet::new();
        for f in &old.functions {
            if !seen.insert(f.name.as_str()) {
                continue;
            }
            u.function_total += 1;
            if !new_functions.contains(spec.new_function_name(&f.name).as_str()) {
                u.main |= f.name == "main";
                u.functions.push(f.name.clone());
            }
        }
        let mut seen = HashSet::new();
        for g in &old.globals {
            let key = global_key(&g.name, g.owner.as_deref());
            if !seen.insert(key.clone()) {
                continue;
            }
            u.global_total += 1;
            if !new_globals.contains(&spec.new_global_key(&key)) {
                u.globals.push(key);
            }
        }
        u
    }

    /// OLD's functions and globals with no counterpart.
    pub fn count(&self) -> usize {
        self.functions.len() + self.globals.len()
    }

    /// NEW is plainly another program: `main` has no counterpart, or more
    /// than half of OLD's functions and globals have none.
    pub fn is_another_program(&self) -> bool {
        let total = self.function_total + self.global_total;
        self.main || (total > 0 && self.count() * 2 > total)
    }

    /// What the refusal says.
    pub fn summary(&self) -> Unrelated {
        Unrelated {
            main: self.main,
            functions: self.functions.len(),
            function_total: self.function_total,
            globals: self.globals.len(),
            global_total: self.global_total,
            names: self
                .functions
                .iter()
                .chain(&self.globals)
                .take(NAMES_SHOWN)
                .cloned()
                .collect(),
        }
    }
}

/// Why NEW is taken for another program (see [`Unmatched`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unrelated {
    /// `main` has no counterpart.
    pub main: bool,
    /// OLD's functions with no counterpart, of how many.
    pub functions: usize,
    pub function_total: usize,
    /// OLD's globals with no counterpart, of how many.
    pub globals: usize,
    pub global_total: usize,
    /// The first few of them.
    pub names: Vec<String>,
}

impl Unrelated {
    /// The SPEC line that accepts this update.
    pub fn spec_line(&self) -> String {
        format!("accept.unmatched = {}", self.functions + self.globals)
    }
}

impl fmt::Display for Unrelated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the new version looks like another program: ")?;
        if self.main {
            f.write_str("main has no counterpart; ")?;
        }
        write!(
            f,
            "{} of {} functions and {} of {} globals of the old version have none",
            self.functions, self.function_total, self.globals, self.global_total
        )?;
        if !self.names.is_empty() {
            write!(f, " ({}", self.names.join(", "))?;
            let more = (self.functions + self.globals).saturating_sub(self.names.len());
            if more > 0 {
                write!(f, ", {more} more")?;
            }
            f.write_str(")")?;
        }
        write!(f, "; a SPEC line `{}` accepts it", self.spec_line())
    }
}
