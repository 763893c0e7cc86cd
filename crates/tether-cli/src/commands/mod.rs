//! One module per subcommand.

pub(crate) mod cleanup;
pub(crate) mod config;
pub(crate) mod doctor;
