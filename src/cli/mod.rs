//! Command-line subcommands (`mailtrail log`, ...).

pub mod bounce_parse;
