//! Command-line subcommands (`mailtrail log`, ...).
