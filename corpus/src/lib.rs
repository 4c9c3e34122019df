//! upstare-corpus
