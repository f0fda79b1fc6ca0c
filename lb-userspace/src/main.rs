//! `lb`: the balancer daemon (`lb run`) and the node agent (`lb agent`).
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "lb", version, about = "XDP L4 load balancer")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the balancer on an interface (root).
    Run(lb_userspace::daemon::RunArgs),
    /// Run the node agent: heartbeats to the balancer(s), route-moved notices back.
    Agent(lb_userspace::agent::AgentArgs),
    /// On a node of an ipip VIP: strip the outer header of packets for its VIPs (XDP).
    Decap(lb_userspace::decap::DecapArgs),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run(args) => lb_userspace::daemon::run(args),
        Cmd::Agent(args) => lb_userspace::agent::run(args),
        Cmd::Decap(args) => lb_userspace::decap::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
