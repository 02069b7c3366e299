//! Command-line subcommands (`mailtrail log`, ...).

pub mod log;
pub mod queue;
