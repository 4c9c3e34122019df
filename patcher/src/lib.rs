//! `upstare-patcher`: will compare the frame-description tables of two
//! versions and produce an update plan (`upstare-patch`): which functions,
//! types and globals changed, the default datatype, stack and continuation
//! mappings, what a user must supply, and a user override file.
//!
//! Not built yet (no issue asks for it so far). Today `upstare-apply` computes
//! the default mapping itself while it plans an update: types are compared
//! structurally by `upstare_runtime::engine::transfer::TypeComparer`, globals and
//! frames are checked by `transfer::check_globals` and
//! `rebuild::check_frames`, and any change of type is refused. That logic
//! moves here once plans become files a user can read and override.
