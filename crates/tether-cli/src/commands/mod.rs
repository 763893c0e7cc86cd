//! One module per subcommand.

pub(crate) mod agent_image;
pub(crate) mod cleanup;
pub(crate) mod config;
pub(crate) mod demo;
pub(crate) mod doctor;
pub(crate) mod exec;
pub(crate) mod ls;
pub(crate) mod serve_http;
pub(crate) mod status;
