//! The stand-alone agent binary (what the agent image runs). Same as `tether agent`.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "tether-agent",
    version,
    about = "tether's agent (normally started by `tether`)"
)]
struct Cli {
    #[command(flatten)]
    agent: tether_agent::AgentArgs,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let code = match tether_agent::run(Cli::parse().agent).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            1
        }
    };
    std::process::exit(code);
}
