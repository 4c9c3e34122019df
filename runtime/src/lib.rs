//! upstare-runtime
