//! `lb`: the balancer daemon (`lb run`), the node agent (`lb agent`), the node-side
//! decapsulator (`lb decap`) and the operator commands that talk to a running daemon
//! (`lb status`, `lb node ...`, see `cli.rs`).
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand, error::ErrorKind};

#[derive(Parser)]
#[command(name = "lb", version, about = "XDP L4 load balancer")]
struct Cli {
    /// Log level (error, warn, info, debug, trace) or a `RUST_LOG`-style filter; default:
    /// `RUST_LOG`, else info.
    #[arg(long, global = true)]
    log_level: Option<String>,
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
    #[command(flatten)]
    Operator(lb_userspace::cli::Command),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    if let Err(e) = init_logging(cli.log_level.as_deref()) {
        eprintln!("lb: error: --log-level: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.cmd {
        Cmd::Run(args) => lb_userspace::daemon::run(args),
        Cmd::Agent(args) => lb_userspace::agent::run(args),
        Cmd::Decap(args) => lb_userspace::decap::run(args),
        Cmd::Operator(cmd) => lb_userspace::cli::run(cmd, Cli::command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: error: {e:#}");
            if let Some(hint) = lb_userspace::client::hint_of(&e) {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Help and version go to stdout as clap prints them; a bad command line is one
/// `lb: error: ...` line (what is wrong), then clap's usage and hint lines, and exit code 2.
fn usage_error(e: clap::Error) -> ExitCode {
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        };
    }
    let text = e.render().to_string();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty()).peekable();
    let mut first = lines
        .next()
        .unwrap_or("invalid command line")
        .trim_start_matches("error: ")
        .to_string();
    // "the following required arguments were not provided:" lists them on the next, indented
    // lines: they belong on the error line.
    if first.ends_with(':') {
        while let Some(l) = lines.next_if(|l| l.starts_with(' ')) {
            first.push(' ');
            first.push_str(l.trim());
        }
    }
    eprintln!("lb: error: {first}");
    for l in lines {
        eprintln!("{l}");
    }
    ExitCode::from(2)
}

/// Logs to stderr through `tracing` (records of crates using `log`, aya's included, too), and
/// feeds the live event log (`lb trace --live`) whatever the level.
fn init_logging(level: Option<&str>) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("{l:?}: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    lb_userspace::livelog::try_init(filter)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// The whole tree (daemon, agent and operator commands side by side, globals included)
    /// passes clap's own consistency checks.
    #[test]
    fn command_tree_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
