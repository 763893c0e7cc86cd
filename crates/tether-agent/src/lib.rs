//! The tether agent: runs in (or next to) the target's network namespace and serves sessions from
//! the local proxy over the tether protocol.
//!
//! Today it authenticates clients and answers every operation it does not implement yet with a
//! clean `Unsupported` error, so clients can rely on the protocol's behaviour from day one. Steal,
//! mirror and the rest arrive with their issues.
//!
//! Entry points: [`AgentArgs`] (the command line, shared by the `tether-agent` binary and the hidden
//! `tether agent` subcommand), [`run`], and [`serve`] for tests and embedding.

pub mod link;
mod session;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use tokio::net::TcpListener;

pub use session::serve;

/// Runs the agent: `tether agent --listen ADDR --token-file FILE`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Address to serve sessions on.
    #[arg(long, default_value = "127.0.0.1:44128")]
    pub listen: SocketAddr,
    /// File holding the session token clients must present (whitespace around it is ignored).
    /// A file, not a flag or variable, so the token does not show in `ps` or `/proc/PID/environ`.
    #[arg(long)]
    pub token_file: PathBuf,
}

/// Reads the token, binds, and serves until the process is stopped.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let token = read_token(&args.token_file)?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "agent listening");
    serve(listener, Arc::from(token)).await;
    Ok(())
}

fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let raw = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = raw.trim();
    anyhow::ensure!(
        !token.is_empty(),
        "the token file {} is empty",
        path.display()
    );
    Ok(token.to_owned())
}
