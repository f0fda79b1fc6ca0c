//! `lb-lab up|down|status`: the balancer working on one machine, in network namespaces (a
//! client, the gateway running `lb run`, K nodes with agents and servers; with `--balancers N`
//! the cluster lab: a router doing ECMP over N balancers in cluster mode, and etcd). Run it
//! through `cargo xtask lab ...` or `cargo xtask run` (no arguments), as root. The library side
//! is `lb_tests::lab` and `lb_tests::cluster_lab`, which document the topologies.
use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_tests::{
    cluster_labctl::{self, UpSpec},
    lab::{self, Names, Spec, XdpChoice},
};

#[derive(Parser)]
#[command(
    name = "lb-lab",
    about = "The load balancer in network namespaces on this machine"
)]
struct Cli {
    /// The lab's name: namespaces `<name>-*`, `/run/<name>/`, the daemon's instance (the tests
    /// use their own name, so they never touch a lab you run).
    #[arg(long, global = true, default_value = lab::DEFAULT_NAME, hide = true)]
    name: String,
    /// The `lb` binary [default: `lb` next to this program].
    #[arg(long, global = true, value_name = "PATH")]
    lb: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the namespaces, start the servers, decapsulators, agents and the balancer, wait
    /// until the VIPs answer and print how to use them. An earlier lab's leftovers are removed.
    Up {
        /// Nodes (namespaces `<name>-node1..K`; at most 8 with --balancers).
        #[arg(long, default_value_t = lab::DEFAULT_NODES)]
        nodes: usize,
        /// `auto`: native XDP where the veths allow it, generic otherwise (the cluster lab's
        /// balancers always run generic).
        #[arg(long, value_enum, default_value = "auto")]
        xdp: Xdp,
        /// The cluster lab instead: N balancers (2..=8, namespaces `<name>-lb1..N`) running
        /// `lb run` in cluster mode (etcd, `[bgp]` through bird2) behind a router doing ECMP
        /// over them (`<name>-router`); every node's agent beats to all of them.
        #[arg(long, value_name = "N")]
        balancers: Option<usize>,
        /// Run the balancer in the foreground (its output on this terminal; a cluster lab's
        /// balancers log to files) until Ctrl-C or SIGTERM, then remove the lab.
        #[arg(long)]
        foreground: bool,
    },
    /// Remove everything of the lab (also after a crash): processes, namespaces, pins,
    /// socket, state.
    Down,
    /// What is up: namespaces, processes, the balancer's status (a cluster lab: each
    /// balancer's leader, revision and digest, and the router's next hops). Exit status 1
    /// unless all is.
    Status,
    /// (internal) The servers of node N: HTTP on :80, TCP and UDP echo on :7.
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        node: u32,
        #[arg(long = "vip")]
        vips: Vec<IpAddr>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Xdp {
    Auto,
    Generic,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("lb-lab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<bool> {
    let names = Names::new(&cli.name)?;
    let me = std::env::current_exe().context("current_exe")?;
    let lb = match cli.lb {
        Some(p) => p,
        None => me.with_file_name("lb"),
    };
    match cli.cmd {
        Cmd::Up {
            nodes,
            balancers: Some(balancers),
            foreground,
            ..
        } => {
            let spec = UpSpec {
                names,
                balancers,
                nodes,
                lb,
                lab_bin: me,
            };
            cluster_labctl::up(&spec, foreground)?;
            Ok(true)
        }
        Cmd::Up {
            nodes,
            xdp,
            balancers: None,
            foreground,
        } => {
            let spec = Spec {
                names,
                nodes,
                xdp: match xdp {
                    Xdp::Auto => XdpChoice::Auto,
                    Xdp::Generic => XdpChoice::Generic,
                },
                lb,
                lab_bin: me,
            };
            lab::up(&spec, foreground)?;
            Ok(true)
        }
        Cmd::Down => {
            println!("{}", lab::down(&names)?.summary(&names));
            Ok(true)
        }
        Cmd::Status => lab::status(&names, &lb),
        Cmd::Serve { node, vips } => {
            lab::serve(node, &vips)?;
            Ok(true)
        }
    }
}
