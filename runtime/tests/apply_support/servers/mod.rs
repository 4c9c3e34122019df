//! The real servers the `real_*` tests and the `real_pause` benchmark
//! drive: how each is started on 127.0.0.1 and a client of its protocol.

pub mod memcached;
pub mod nginx;
pub mod redis;
pub mod sshd;
