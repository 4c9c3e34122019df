//! upstare-rewriter
