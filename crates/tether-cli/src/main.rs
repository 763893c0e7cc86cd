//! `tether`: the command-line entry point. Parses arguments, sets up logging and output, and hands
//! each subcommand to its module in `commands/`.

mod cli;
mod commands;
mod environment;
mod follow;
mod kube_agent;
mod proxy;
mod ui;

use clap::Parser as _;
use tracing_subscriber::EnvFilter;

use crate::{
    cli::{Cli, Command, ConfigCommand, DoctorCheck, GlobalArgs, Output, OutputFormat},
    ui::Ui,
};

fn main() {
    let cli = Cli::parse();
    init_logging(&cli.global);
    let format = match (&cli.global.output, &cli.command) {
        (Output::Format(format), _) => *format,
        (Output::File(_), Command::AgentImage { .. }) => OutputFormat::Text,
        (Output::File(file), _) => {
            eprintln!("error: --output takes text or json, not {}", file.display());
            std::process::exit(2);
        }
    };
    let ui = Ui::new(format);
    let code = match cli.command {
        Command::Config(ConfigCommand::Check { file }) => {
            commands::config::check(file.as_deref().or(cli.global.config.as_deref()), ui)
        }
        Command::Config(ConfigCommand::Schema) => commands::config::schema(),
        Command::Doctor {
            check: None,
            namespace,
            context,
        } => commands::doctor::run(namespace, context, cli.global.config.as_deref(), ui),
        Command::Doctor {
            check: Some(DoctorCheck::Latency { pid, count }),
            ..
        } => run_async(commands::status::latency(pid, count, ui)),
        Command::Ls { namespace, context } => run_async(commands::ls::run(
            namespace,
            context,
            cli.global.config.as_deref(),
            ui,
        )),
        Command::AgentImage {
            agent,
            name,
            push,
            plain_http,
        } => {
            let output = match &cli.global.output {
                Output::File(file) => Some(file.as_path()),
                Output::Format(_) => None,
            };
            let destination = match (output, push) {
                (None, None) => Err(anyhow::anyhow!(
                    "say where the image goes: --push REGISTRY/REPOSITORY:TAG, or --output FILE.tar"
                )),
                (output, push) => Ok(commands::agent_image::Destination {
                    tarball: output.map(|file| (file, name.as_str())),
                    push: push.map(|reference| (reference, plain_http)),
                }),
            };
            destination
                .and_then(|destination| commands::agent_image::run(destination, agent, ui))
                .unwrap_or_else(|error| {
                    eprintln!("error: {error:#}");
                    1
                })
        }
        Command::Status => run_async(commands::status::run(ui)),
        Command::Cleanup { target } => run_async(commands::cleanup::run(target, ui)),
        Command::Agent(args) => run_async(tether_agent::run(args)),
        Command::Exec(args) => run_async(commands::exec::run(args, cli.global.config.clone(), ui)),
        Command::Demo => commands::demo::run(ui).unwrap_or_else(|error| {
            eprintln!("error: {error:#}");
            1
        }),
        Command::ServeHttp {
            name,
            port,
            bind,
            count_file,
        } => run_async(commands::serve_http::run(name, bind, port, count_file)),
    };
    std::process::exit(code);
}

fn init_logging(global: &GlobalArgs) {
    // By default only tether's own warnings: a library's (kube's client retrying, hyper, rustls)
    // while a link is down is detail for -v, not a line on the user's terminal.
    let default = match (global.quiet, global.verbose) {
        (true, _) => "off,tether=error,tether_agent=error,tether_kube=error",
        (false, 0) => "off,tether=warn,tether_agent=warn,tether_kube=warn,tether_config=warn",
        (false, 1) => "info,tether=info",
        (false, 2) => "info,tether=debug,tether_agent=debug",
        (false, _) => "debug,tether=trace,tether_agent=trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

pub(crate) fn run_async(future: impl Future<Output = anyhow::Result<i32>>) -> i32 {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(future) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}
