//! mailtrail: an SMTP relay that records what happened to every recipient of every message.
//!
//! Data flows one way: [`smtp`] (inbound session) → [`spool`] (durable) → [`delivery`]
//! (outbound) → [`store`] (outcomes) ← [`bounce`] (returned mail); [`api`] and [`cli`] read
//! the store. See `docs/architecture.md`.

pub mod api;
pub mod bounce;
pub mod checks;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod metrics;
pub mod receipt;
pub mod smtp;
pub mod spool;
pub mod store;
#[cfg(test)]
pub(crate) mod test_support;
