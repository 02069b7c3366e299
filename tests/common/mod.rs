//! Shared helpers for the integration tests: the real mailtrail binary on loopback, and real
//! peers (scripted MX, DNS server) it talks to. Each test binary uses a part of it.
#![allow(dead_code)]

pub mod disk;
pub mod mailtrail;
pub mod postfix;
pub mod test_dns;
pub mod test_mx;
