//! upstare-patcher
