//! Shared test helpers: real servers on loopback that tests talk to.
#![allow(dead_code)]

pub mod test_dns;
pub mod test_mx;
