//! The operator commands of `lb` (`status`, `vip`, `node`, `routes`, `stats`, `trace`, `apply`,
//! `check`, `config`, `completions`): arguments checked by clap before anything is sent, one
//! call (or a few) to the daemon's local API through [`crate::client`], then a table for
//! people or, with `--json`, the API's JSON for scripts.
//!
//! Rendering is pure (`render_*` return the text) so it is unit-tested; the `async fn`s only
//! fetch and print.
use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
    future::Future,
    io::{IsTerminal as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use clap::{
    Args, Subcommand,
    builder::{PossibleValuesParser, TypedValueParser as _},
};
use hyper::Method;
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    api::{self, Diff, NodeInfo, RoutesInfo, Stats, Status, Trace, Traffic, VipInfo, WeightBody},
    client::{self, Body, Client, ClientError},
    config::{self, Config, MAX_WEIGHT, NodeConfig, VipConfig},
    dataplane::{ForwardMode, HashMode},
};

/// How often `lb node drain --wait` looks at the node's open flows (the daemon counts them
/// every 2 s, so faster polling would only repeat the same number).
const DRAIN_POLL: Duration = Duration::from_millis(500);
/// Route ranges shown per row before the list is cut short (`--json` has them all).
const MAX_SHOWN_RANGES: usize = 8;
/// The wire names of [`ForwardMode`] and [`HashMode`], listed for clap's help and shell
/// completion; parsing goes through serde, so a name that drifted from the enums fails
/// (and the unit tests say so).
const MODES: [&str; 2] = ["dsr-l2", "ipip"];
const HASHES: [&str; 2] = ["five-tuple", "source-ip"];

/// The operator commands, flattened into `lb`'s own subcommands by `main.rs`.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show the running balancer: interface, XDP mode, nodes, heartbeats, conntrack.
    Status(ClientOpts),
    /// List, add or remove VIPs.
    Vip(VipArgs),
    /// List, add, remove, drain, undrain or re-weight nodes.
    Node(NodeArgs),
    /// Show which node owns which route IDs of a VIP.
    Routes(RoutesArgs),
    /// Packets and bytes per VIP and node, events and drops (--watch: rates, redrawn).
    Stats(StatsArgs),
    /// Where a flow's packets would go and why (--live: data-plane events as they happen).
    Trace(TraceArgs),
    /// Apply a configuration file to the running balancer and print what changed.
    Apply(ApplyArgs),
    /// Validate a configuration file (no balancer needed).
    Check(CheckArgs),
    /// Print the running balancer's configuration (TOML).
    Config(ClientOpts),
    /// Print a shell completion script for `lb`.
    Completions(CompletionsArgs),
}

/// Where the API is and how to print its replies (global to each command's subcommands).
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Balancer API")]
pub struct ClientOpts {
    /// Print JSON (the API's reply) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// The API socket [default: /run/lb/<instance>.sock].
    #[arg(long, global = true, env = "LB_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The balancer instance (`daemon.instance`), which names the default socket.
    #[arg(long, global = true, default_value = "lb", value_name = "NAME", value_parser = parse_instance)]
    pub instance: String,
}

impl ClientOpts {
    fn client(&self) -> Client {
        Client::new(
            self.socket
                .clone()
                .unwrap_or_else(|| api::default_socket(&self.instance)),
        )
    }
}

#[derive(Args, Debug)]
pub struct VipArgs {
    #[command(flatten)]
    opts: ClientOpts,
    #[command(subcommand)]
    cmd: VipCmd,
}

#[derive(Subcommand, Debug)]
enum VipCmd {
    /// List the VIPs: mode, hash, routes (moved, unowned), traffic.
    List,
    /// Add a VIP: ADDR:PORT/PROTO, IPv6 as [ADDR]:PORT/PROTO, port 0 = all ports.
    Add(VipAddArgs),
    /// Remove a VIP (its traffic is no longer balanced).
    Remove {
        /// ADDR:PORT/PROTO ([ADDR]:PORT/PROTO for IPv6), as `lb vip list` shows it.
        #[arg(value_parser = parse_vip, value_name = "VIP")]
        vip: VipName,
    },
}

#[derive(Args, Debug)]
struct VipAddArgs {
    /// ADDR:PORT/PROTO ([ADDR]:PORT/PROTO for IPv6; port 0 = all ports).
    #[arg(value_parser = parse_vip, value_name = "VIP")]
    vip: VipName,
    /// Forwarding: MAC rewrite to nodes on this L2 segment, or IPIP/IP6IP6 encapsulation.
    #[arg(long, default_value = "dsr-l2",
          value_parser = PossibleValuesParser::new(MODES).try_map(from_wire_name::<ForwardMode>))]
    mode: ForwardMode,
    /// What picks the route: the whole 5-tuple, or the source address only (affinity).
    #[arg(long, default_value = "five-tuple",
          value_parser = PossibleValuesParser::new(HASHES).try_map(from_wire_name::<HashMode>))]
    hash: HashMode,
    /// Route IDs of the VIP (the granularity of balancing).
    #[arg(long, default_value_t = lb_common::DEFAULT_ROUTES_PER_VIP, value_parser = parse_route_count)]
    routes: u32,
}

#[derive(Args, Debug)]
pub struct NodeArgs {
    #[command(flatten)]
    opts: ClientOpts,
    #[command(subcommand)]
    cmd: NodeCmd,
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// List the nodes: state, weight, routes, flows, traffic, heartbeats, agent load.
    List,
    /// Add a node (it takes routes once it is up: heartbeats or a passing check).
    Add(NodeAddArgs),
    /// Remove a node: its routes move to the others, its open flows are cut.
    Remove {
        /// Node ID.
        #[arg(value_parser = parse_node_id)]
        id: u32,
        /// Remove it even if that leaves VIPs without a live node.
        #[arg(long)]
        force: bool,
    },
    /// Drain a node: no new flows, open ones stay (--wait: until they are gone).
    Drain {
        /// Node ID.
        #[arg(value_parser = parse_node_id)]
        id: u32,
        /// Then wait until the node has no open flows, showing how many are left.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits (e.g. 30s, 5m).
        #[arg(long, default_value = "5m", requires = "wait", value_parser = parse_positive_duration)]
        timeout: Duration,
    },
    /// Undrain a node: it takes new flows again.
    Undrain {
        /// Node ID.
        #[arg(value_parser = parse_node_id)]
        id: u32,
    },
    /// Set a node's weight (beats its agent's), or --clear to give it back.
    Weight {
        /// Node ID.
        #[arg(value_parser = parse_node_id)]
        id: u32,
        /// The weight (its share of routes relative to the other nodes' weights).
        #[arg(required_unless_present = "clear", value_parser = parse_weight, value_name = "WEIGHT")]
        weight: Option<u32>,
        /// Drop the operator's weight: the agent's (or the file's) counts again.
        #[arg(long, conflicts_with = "weight")]
        clear: bool,
    },
}

#[derive(Args, Debug)]
struct NodeAddArgs {
    /// Node ID (the one its agent sends).
    #[arg(value_parser = parse_node_id)]
    id: u32,
    /// A name for people (tables, logs).
    #[arg(long)]
    name: Option<String>,
    /// MAC address (dsr-l2 VIPs need it).
    #[arg(long, value_parser = parse_mac_arg)]
    mac: Option<String>,
    /// IPv4 address (IPv4 ipip VIPs need it).
    #[arg(long)]
    ipv4: Option<Ipv4Addr>,
    /// IPv6 address (IPv6 ipip VIPs need it).
    #[arg(long)]
    ipv6: Option<Ipv6Addr>,
    /// Its share of routes relative to the other nodes' weights.
    #[arg(long, default_value_t = 1, value_parser = parse_weight)]
    weight: u32,
    /// How the node is judged: its agent's heartbeats, or a TCP connect check.
    #[arg(long, default_value = "heartbeat", value_parser = ["heartbeat", "tcp"])]
    check: String,
    /// Target of the TCP check.
    #[arg(long, value_name = "ADDR:PORT", required_if_eq("check", "tcp"))]
    check_addr: Option<SocketAddr>,
    /// HTTP GET path for the TCP check (2xx/3xx is healthy).
    #[arg(long, value_name = "PATH", requires = "check_addr", value_parser = parse_http_path)]
    check_http_path: Option<String>,
}

#[derive(Args, Debug)]
pub struct RoutesArgs {
    #[command(flatten)]
    opts: ClientOpts,
    /// ADDR:PORT/PROTO ([ADDR]:PORT/PROTO for IPv6), as `lb vip list` shows it.
    #[arg(value_parser = parse_vip, value_name = "VIP")]
    vip: VipName,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    #[command(flatten)]
    opts: ClientOpts,
    /// Redraw every --interval with rates, until Ctrl-C (with --json: one line per read).
    #[arg(long)]
    watch: bool,
    /// Time between reads with --watch.
    #[arg(long, default_value = "1s", requires = "watch", value_parser = parse_positive_duration)]
    interval: Duration,
}

#[derive(Args, Debug)]
pub struct TraceArgs {
    #[command(flatten)]
    opts: ClientOpts,
    /// The client: ADDR or ADDR:PORT ([ADDR]:PORT for IPv6).
    #[arg(required_unless_present = "live", value_parser = parse_trace_src)]
    src: Option<String>,
    /// The VIP the client connects to: ADDR:PORT.
    #[arg(required_unless_present = "live")]
    dst: Option<SocketAddr>,
    /// tcp or udp.
    #[arg(required_unless_present = "live", value_parser = parse_proto_arg)]
    proto: Option<String>,
    /// Instead: print data-plane events (drops, PMTU replies, evictions) as they happen,
    /// until Ctrl-C.
    #[arg(long, conflicts_with_all = ["src", "dst", "proto"])]
    live: bool,
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    #[command(flatten)]
    opts: ClientOpts,
    /// The configuration file (validated here first, as the daemon would).
    #[arg(short, long, value_name = "FILE")]
    file: PathBuf,
    /// Only show what would change.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The configuration file to validate.
    #[arg(short, long, value_name = "FILE")]
    file: PathBuf,
    /// `--json` prints `{"file", "ok", "vips", "nodes"}`; `--socket` and `--instance` are
    /// accepted like everywhere and ignored (no balancer is needed).
    #[command(flatten)]
    opts: ClientOpts,
}

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    shell: clap_complete::Shell,
}

/// Runs one operator command. `top` builds the whole `lb` command, which completions cover.
pub fn run(cmd: Command, top: impl FnOnce() -> clap::Command) -> Result<()> {
    match cmd {
        Command::Status(o) => block_on(status(o)),
        Command::Vip(a) => block_on(vip(a)),
        Command::Node(a) => block_on(node(a)),
        Command::Routes(a) => block_on(routes(a)),
        Command::Stats(a) => block_on(stats(a)),
        Command::Trace(a) => block_on(trace(a)),
        Command::Apply(a) => block_on(apply(a)),
        Command::Check(a) => check(&a),
        Command::Config(o) => block_on(running_config(o)),
        Command::Completions(a) => {
            let mut cmd = top();
            let mut out = Vec::new();
            clap_complete::generate(a.shell, &mut cmd, "lb", &mut out);
            emit(&String::from_utf8_lossy(&out))
        }
    }
}

/// Each command is a few calls in sequence: one thread is plenty.
fn block_on(f: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(f)
}

async fn status(o: ClientOpts) -> Result<()> {
    let s = o.client().get_json::<Status>("/v1/status").await?;
    if o.json {
        return emit_json(&s.raw);
    }
    emit(&render_status(&s.value))
}

async fn vip(a: VipArgs) -> Result<()> {
    let c = a.opts.client();
    match a.cmd {
        VipCmd::List => {
            let v = c.get_json::<Vec<VipInfo>>("/v1/vips").await?;
            if a.opts.json {
                return emit_json(&v.raw);
            }
            emit(&render_vips(&v.value))
        }
        VipCmd::Add(v) => {
            let body = VipConfig {
                addr: v.vip.addr,
                port: v.vip.port,
                proto: v.vip.proto,
                mode: v.mode,
                hash: v.hash,
                routes: v.routes,
            };
            change(&c, &a.opts, Method::POST, "/v1/vips", to_json(&body)?).await
        }
        VipCmd::Remove { vip } => {
            let path = format!("/v1/vips/{}", client::encode(&vip.to_string()));
            change(&c, &a.opts, Method::DELETE, &path, Body::Empty).await
        }
    }
}

async fn node(a: NodeArgs) -> Result<()> {
    let c = a.opts.client();
    match a.cmd {
        NodeCmd::List => {
            let n = c.get_json::<Vec<NodeInfo>>("/v1/nodes").await?;
            if a.opts.json {
                return emit_json(&n.raw);
            }
            emit(&render_nodes(&n.value))
        }
        NodeCmd::Add(n) => {
            let body = NodeConfig {
                id: n.id,
                name: n.name,
                mac: n.mac,
                ipv4: n.ipv4,
                ipv6: n.ipv6,
                weight: n.weight,
                advertised_weight_max: None,
                check: n.check,
                check_addr: n.check_addr,
                check_http_path: n.check_http_path,
                check_interval: None,
                check_timeout: None,
                check_rise: None,
                check_fall: None,
                miss_limit: None,
                drain: false,
                admin_weight: None,
            };
            change(&c, &a.opts, Method::POST, "/v1/nodes", to_json(&body)?).await
        }
        NodeCmd::Remove { id, force } => {
            let path = format!("/v1/nodes/{id}{}", force_query(force));
            change(&c, &a.opts, Method::DELETE, &path, Body::Empty).await
        }
        NodeCmd::Drain { id, wait, timeout } => {
            let path = format!("/v1/nodes/{id}/drain");
            change(&c, &a.opts, Method::POST, &path, Body::Empty).await?;
            if wait {
                wait_drained(&c, id, timeout).await?;
            }
            Ok(())
        }
        NodeCmd::Undrain { id } => {
            let path = format!("/v1/nodes/{id}/undrain");
            change(&c, &a.opts, Method::POST, &path, Body::Empty).await
        }
        // clap has made sure there is exactly one of WEIGHT and --clear: no weight is
        // the clear (`null`: give the node back to its agent's or the file's weight).
        NodeCmd::Weight { id, weight, .. } => {
            let path = format!("/v1/nodes/{id}/weight");
            let body = to_json(&WeightBody { weight })?;
            change(&c, &a.opts, Method::PUT, &path, body).await
        }
    }
}

/// A changing call: its [`Diff`] printed.
async fn change(c: &Client, o: &ClientOpts, method: Method, path: &str, body: Body) -> Result<()> {
    let d = c.call_json::<Diff>(method, path, body).await?;
    if o.json {
        return emit_json(&d.raw);
    }
    emit(&render_diff(&d.value, false))
}

/// `lb node drain --wait`: progress on stderr (stdout holds the drain's own reply), done when
/// the daemon's conntrack scan finds no open flow on the node.
async fn wait_drained(c: &Client, id: u32, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let mut shown = None;
    loop {
        let n = c
            .get_json::<NodeInfo>(&format!("/v1/nodes/{id}"))
            .await?
            .value;
        if !n.flows_current {
            // The count predates the drain: wait for the scan the daemon starts after it.
        } else if n.flows == 0 {
            eprintln!("node {id} drained: no open flows");
            return Ok(());
        }
        if !n.admin_drain {
            return Err(ClientError::new(format!(
                "node {id} was undrained while waiting ({} left)",
                plural(n.flows, "open flow", "open flows")
            ))
            .into());
        }
        if n.flows_current && shown != Some(n.flows) {
            eprintln!(
                "node {id} draining: {}",
                plural(n.flows, "open flow", "open flows")
            );
            shown = Some(n.flows);
        }
        if start.elapsed() >= timeout {
            return Err(ClientError::new(format!(
                "node {id} still has {} after {}",
                plural(n.flows, "open flow", "open flows"),
                fmt_duration(timeout)
            ))
            .with_hint(format!(
                "the node stays drained and its flows keep working until they end; \
                 `lb node remove {id}` would cut them; or wait longer (--timeout)"
            ))
            .into());
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

async fn routes(a: RoutesArgs) -> Result<()> {
    let path = format!("/v1/vips/{}/routes", client::encode(&a.vip.to_string()));
    let r = a.opts.client().get_json::<RoutesInfo>(&path).await?;
    if a.opts.json {
        return emit_json(&r.raw);
    }
    emit(&render_routes(&r.value))
}

async fn stats(a: StatsArgs) -> Result<()> {
    let c = a.opts.client();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut prev: Option<Stats> = None;
    loop {
        let s = c.get_json::<Stats>("/v1/stats").await?;
        if a.opts.json && a.watch {
            // One document per line, so a script can read the watch as a stream.
            emit(&format!("{}\n", s.raw))?;
        } else if a.opts.json {
            emit_json(&s.raw)?;
        } else if a.watch {
            emit(&frame(a.interval, &render_stats(&s.value, prev.as_ref())))?;
        } else {
            emit(&render_stats(&s.value, None))?;
        }
        if !a.watch {
            return Ok(());
        }
        prev = Some(s.value);
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            () = tokio::time::sleep(a.interval) => {}
        }
    }
}

/// One `--watch` screen: on a terminal the screen is cleared first, elsewhere (a file,
/// a pipe) frames are separated by a blank line.
fn frame(interval: Duration, body: &str) -> String {
    let head = format!("every {}, Ctrl-C to stop\n\n", fmt_duration(interval));
    if std::io::stdout().is_terminal() {
        format!("\x1b[H\x1b[2J{head}{body}")
    } else {
        format!("{head}{body}\n")
    }
}

async fn trace(a: TraceArgs) -> Result<()> {
    let c = a.opts.client();
    if a.live {
        return trace_live(&c).await;
    }
    // clap has made the three positionals required without --live.
    let (Some(src), Some(dst), Some(proto)) = (a.src, a.dst, a.proto) else {
        return Err(ClientError::new("trace needs SRC, DST and PROTO (or --live)").into());
    };
    let dst = dst.to_string();
    let path = format!(
        "/v1/trace{}",
        client::query(&[("src", &src), ("dst", &dst), ("proto", &proto)])
    );
    let t = c.get_json::<Trace>(&path).await?;
    if a.opts.json {
        return emit_json(&t.raw);
    }
    emit(&render_trace(&t.value))
}

/// Prints the daemon's event lines as they come, until Ctrl-C (exit 0) or the daemon ends
/// the stream (an error: the operator should know it stopped, e.g. a daemon restart).
async fn trace_live(c: &Client) -> Result<()> {
    let mut lines = c.stream_lines("/v1/trace/live").await?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            line = lines.next_line() => match line? {
                Some(l) => emit(&format!("{l}\n"))?,
                None => {
                    return Err(ClientError::new(format!(
                        "the balancer on {} ended the stream",
                        c.socket().display()
                    ))
                    .into());
                }
            },
        }
    }
}

async fn apply(a: ApplyArgs) -> Result<()> {
    // The daemon validates again, but a bad file is caught here without a round trip, with
    // the same message `lb run` would give.
    Config::load(&a.file)?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading config {}", a.file.display()))?;
    let dry_run = if a.dry_run { "true" } else { "false" };
    let path = format!("/v1/apply{}", client::query(&[("dry_run", dry_run)]));
    let d = a
        .opts
        .client()
        .call_json::<Diff>(Method::POST, &path, Body::Text(text))
        .await?;
    if a.opts.json {
        return emit_json(&d.raw);
    }
    emit(&render_diff(&d.value, a.dry_run))
}

fn check(a: &CheckArgs) -> Result<()> {
    let cfg = Config::load(&a.file)?;
    if a.opts.json {
        return emit_json(&serde_json::json!({
            "file": a.file,
            "ok": true,
            "vips": cfg.vips.len(),
            "nodes": cfg.nodes.len(),
        }));
    }
    emit(&format!(
        "{}: ok ({}, {})\n",
        a.file.display(),
        plural(cfg.vips.len() as u64, "VIP", "VIPs"),
        plural(cfg.nodes.len() as u64, "node", "nodes")
    ))
}

async fn running_config(o: ClientOpts) -> Result<()> {
    let c = o.client();
    let bytes = c.call(Method::GET, "/v1/config", Body::Empty).await?;
    let text = String::from_utf8_lossy(&bytes);
    if o.json {
        // The same document as JSON, for jq and friends.
        let v: toml::Value = toml::from_str(&text).with_context(|| {
            format!(
                "the configuration from {} is not TOML",
                c.socket().display()
            )
        })?;
        return emit_json(&serde_json::to_value(v)?);
    }
    if text.ends_with('\n') {
        emit(&text)
    } else {
        emit(&format!("{text}\n"))
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<Body> {
    Ok(Body::Json(serde_json::to_value(v)?))
}

/// `?force=`: removing a node that is the last live one of a VIP is refused without it.
fn force_query(force: bool) -> String {
    client::query(&[("force", if force { "true" } else { "false" })])
}

/// Writes to stdout. A reader that went away (`lb node list | head`) ends the command
/// quietly, as a tool killed by SIGPIPE would, instead of an error about a broken pipe.
fn emit(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(e).context("writing to stdout"),
    }
}

fn emit_json(v: &serde_json::Value) -> Result<()> {
    emit(&format!("{}\n", serde_json::to_string_pretty(v)?))
}

// ---------------------------------------------------------------------------------------
// Argument parsers (clap reports their errors as `lb: error: invalid value ...`, exit 2).

/// A VIP as the API names it: `addr:port/proto`, IPv6 in brackets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipName {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: String,
}

impl fmt::Display for VipName {
    /// The canonical form (`SocketAddr`'s), so `[2001:db8:0::1]:80/TCP` names the same VIP
    /// as the daemon's `[2001:db8::1]:80/tcp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.addr, self.port),
            self.proto
        )
    }
}

/// Exactly what the daemon accepts (`api::split_vip` parses both sides).
pub fn parse_vip(s: &str) -> Result<VipName, String> {
    let (sock, _) = api::split_vip(s)?;
    // split_vip has checked the part after the last '/' to be `tcp` or `udp`.
    let proto = s.rsplit_once('/').map_or("", |(_, p)| p);
    Ok(VipName {
        addr: sock.ip(),
        port: sock.port(),
        proto: proto.to_string(),
    })
}

/// `tcp` or `udp`, as the config file and VIP names spell them.
pub fn parse_proto_arg(s: &str) -> Result<String, String> {
    config::parse_proto(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

pub fn parse_node_id(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(id) if id < lb_common::NODE_NONE => Ok(id),
        _ => Err(format!(
            "node ID {s:?}: expected a number from 0 to {}",
            lb_common::NODE_NONE - 1
        )),
    }
}

pub fn parse_weight(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(w) if (1..=MAX_WEIGHT).contains(&w) => Ok(w),
        _ => Err(format!(
            "weight {s:?}: expected a number from 1 to {MAX_WEIGHT}"
        )),
    }
}

fn parse_route_count(s: &str) -> Result<u32, String> {
    let max = lb_common::MAX_ROUTES_PER_VIP;
    match s.parse::<u32>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("routes {s:?}: expected a number from 1 to {max}")),
    }
}

/// A duration as the config file writes it (`500ms`, `30s`, `5m`), above zero.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = config::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err(format!("duration {s:?} must be above zero"));
    }
    Ok(d)
}

/// Checked like the config file's MACs, sent in one canonical spelling.
fn parse_mac_arg(s: &str) -> Result<String, String> {
    let mac = config::parse_mac(s).map_err(|e| format!("{e:#}"))?;
    Ok(mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":"))
}

fn parse_http_path(s: &str) -> Result<String, String> {
    if s.starts_with('/') && !s.chars().any(char::is_whitespace) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?}: expected a path such as /healthz"))
    }
}

/// The name the daemon would accept (`daemon.instance`): it becomes a file name.
fn parse_instance(s: &str) -> Result<String, String> {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(s.to_string())
    } else {
        Err(format!("instance {s:?}: use letters, digits, '-' and '_'"))
    }
}

/// `ADDR` or `ADDR:PORT` (`[V6]:PORT`), in canonical form.
fn parse_trace_src(s: &str) -> Result<String, String> {
    if let Ok(a) = s.parse::<IpAddr>() {
        return Ok(a.to_string());
    }
    s.parse::<SocketAddr>()
        .map(|a| a.to_string())
        .map_err(|_| format!("{s:?}: expected ADDR or ADDR:PORT ([ADDR]:PORT for IPv6)"))
}

/// An enum from its serde (wire) name.
fn from_wire_name<T: DeserializeOwned>(s: String) -> Result<T, serde_json::Error> {
    serde_json::from_value(serde_json::Value::String(s))
}

/// An enum's serde (wire) name, as the API and the config file spell it.
fn wire_name<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(e) => format!("<{e}>"),
    }
}

// ---------------------------------------------------------------------------------------
// Rendering.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// A table column: its title and which side its cells hug (numbers right).
#[derive(Clone, Copy)]
struct Col(&'static str, Align);

const fn l(title: &'static str) -> Col {
    Col(title, Align::Left)
}
const fn r(title: &'static str) -> Col {
    Col(title, Align::Right)
}

/// Columns padded to their widest cell, two spaces apart, no trailing blanks; the header
/// line is left out when every title is empty (key/value blocks).
fn render_table(cols: &[Col], rows: &[Vec<String>]) -> String {
    let width = |i: usize| {
        rows.iter()
            .filter_map(|row| row.get(i))
            .map(|c| c.chars().count())
            .chain([cols[i].0.len()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..cols.len()).map(width).collect();
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, cell) in cells.enumerate().take(cols.len()) {
            if i > 0 {
                s.push_str("  ");
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            match cols[i].1 {
                Align::Left => {
                    s.push_str(cell);
                    s.extend(std::iter::repeat_n(' ', pad));
                }
                Align::Right => {
                    s.extend(std::iter::repeat_n(' ', pad));
                    s.push_str(cell);
                }
            }
        }
        let mut s = s.trim_end().to_string();
        s.push('\n');
        s
    };
    let mut out = String::new();
    if cols.iter().any(|c| !c.0.is_empty()) {
        out.push_str(&line(&mut cols.iter().map(|c| c.0)));
    }
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// Key/value lines (`status`, `trace`).
fn render_pairs(pairs: &[(&str, String)]) -> String {
    let rows: Vec<Vec<String>> = pairs
        .iter()
        .map(|(k, v)| vec![k.to_string(), v.clone()])
        .collect();
    render_table(&[l(""), l("")], &rows)
}

fn render_status(s: &Status) -> String {
    let n = &s.nodes;
    let hb = &s.heartbeats;
    let rejected: u64 = hb.rejected.values().sum();
    let mut heartbeats = format!("{} accepted, {rejected} rejected", hb.accepted);
    let reasons = nonzero(&hb.rejected);
    if !reasons.is_empty() {
        write!(heartbeats, " ({reasons})").ok();
    }
    for (count, what) in [
        (hb.queue_drops, "dropped (socket queue full)"),
        (hb.interval_clamped, "with too long an interval"),
        (hb.weight_clamped, "with too large a weight"),
        (hb.incarnation_resets, "incarnation resets"),
        (hb.fail_static_episodes, "fail-static episodes"),
    ] {
        if count > 0 {
            write!(heartbeats, ", {count} {what}").ok();
        }
    }
    let ct = &s.conntrack;
    let mut pairs = vec![
        (
            "daemon",
            format!(
                "lb {}, instance {}, pid {}, up {}",
                s.version,
                s.instance,
                s.pid,
                fmt_secs(s.uptime_seconds)
            ),
        ),
        (
            "interface",
            format!(
                "{}, XDP {}, program {}",
                s.iface,
                s.xdp_mode,
                s.program_id.map_or("-".into(), |id| id.to_string())
            ),
        ),
        (
            "config",
            s.config_file
                .as_ref()
                .map_or("none (API only)".into(), |p| p.display().to_string()),
        ),
        ("state", s.state_dir.display().to_string()),
        ("vips", s.vips.to_string()),
        (
            "nodes",
            format!(
                "{} active, {} draining, {} down",
                n.active, n.draining, n.down
            ),
        ),
        ("heartbeats", heartbeats),
        (
            "conntrack",
            format!(
                "{}/{} entries ({}), {}, {}",
                ct.entries,
                ct.capacity,
                fmt_pct(ratio(ct.entries, ct.capacity)),
                plural(ct.open_flows, "open flow", "open flows"),
                plural(ct.evictions, "eviction", "evictions")
            ),
        ),
    ];
    if let Some(c) = &s.cluster {
        pairs.push((
            "cluster",
            format!(
                "balancer {} of {} ({}), {}; revision {}, tables {}",
                c.id,
                c.balancers.join(" "),
                if c.connected {
                    "etcd up"
                } else {
                    "NO ETCD SESSION"
                },
                match (&c.leader, c.leading) {
                    (_, true) => "leading".to_string(),
                    (Some(l), false) => format!("{l} leads"),
                    (None, false) => "NOBODY LEADS".to_string(),
                },
                c.revision,
                c.digest.get(..16).unwrap_or(&c.digest)
            ),
        ));
        pairs.push((
            "cluster flows",
            format!(
                "{} shared, {} of others' held, {} errors",
                c.counters.flows_exported, c.counters.flows_imported, c.counters.errors
            ),
        ));
    }
    if let Some(b) = &s.bgp_announced {
        pairs.push((
            "bgp",
            if b.is_empty() {
                "announcing nothing".to_string()
            } else {
                format!("announcing {}", b.join(" "))
            },
        ));
    }
    if s.fail_static {
        pairs.push((
            "FAIL STATIC",
            "holding every node up: most went silent at once (judging again once heartbeats flow)"
                .into(),
        ));
    }
    if !s.unserved_vips.is_empty() {
        pairs.push((
            "NO ACTIVE NODE",
            format!(
                "{}: new flows dropped (no_backend)",
                s.unserved_vips.join(", ")
            ),
        ));
    }
    render_pairs(&pairs)
}

fn render_vips(vips: &[VipInfo]) -> String {
    let rows: Vec<Vec<String>> = vips
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                wire_name(&v.mode),
                wire_name(&v.hash),
                v.routes.to_string(),
                v.moved.to_string(),
                v.unowned.to_string(),
                fmt_count(v.packets),
                fmt_bytes(v.bytes),
            ]
        })
        .collect();
    let cols = [
        l("VIP"),
        l("MODE"),
        l("HASH"),
        r("ROUTES"),
        r("MOVED"),
        r("UNOWNED"),
        r("PACKETS"),
        r("BYTES"),
    ];
    render_table(&cols, &rows)
}

/// Marks what the operator set (`*`), explained under the table when present.
fn render_nodes(nodes: &[NodeInfo]) -> String {
    let mut starred = false;
    let mut star = |set: bool| {
        starred |= set;
        if set { "*" } else { "" }
    };
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.id.to_string(),
                n.name.clone().unwrap_or_else(|| "-".into()),
                format!("{}{}", n.state, star(n.admin_drain)),
                format!("{}{}", n.weight, star(n.admin_weight.is_some())),
                n.routes.to_string(),
                fmt_pct(n.route_share),
                fmt_pct(n.weighted_share),
                fmt_count(n.flows),
                fmt_count(n.packets),
                fmt_bytes(n.bytes),
                n.last_heartbeat_age.map_or("-".into(), fmt_age),
                n.cpu_permille
                    .map_or("-".into(), |p| format!("{}.{}%", p / 10, p % 10)),
                n.active_conns.map_or("-".into(), |c| fmt_count(c.into())),
            ]
        })
        .collect();
    let cols = [
        r("ID"),
        l("NAME"),
        l("STATE"),
        r("WEIGHT"),
        r("ROUTES"),
        r("SHARE"),
        r("WEIGHTED"),
        r("FLOWS"),
        r("PACKETS"),
        r("BYTES"),
        r("HEARTBEAT"),
        r("CPU"),
        r("CONNS"),
    ];
    let mut out = render_table(&cols, &rows);
    if starred {
        out.push_str(
            "* set by the operator (undo with `lb node undrain ID`, `lb node weight ID --clear`)\n",
        );
    }
    for n in nodes.iter().filter(|n| n.duplicate_agent) {
        out.push_str(&format!(
            "! node {}: a second agent claims this node ID (its heartbeats are refused; see the log)\n",
            n.id
        ));
    }
    out
}

fn render_routes(t: &RoutesInfo) -> String {
    let mut out = format!("{}: {} routes\n", t.vip, t.routes);
    let rows: Vec<Vec<String>> = t
        .nodes
        .iter()
        .map(|o| {
            vec![
                o.node.to_string(),
                o.state.clone(),
                o.count.to_string(),
                fmt_pct(o.share),
                fmt_ranges(&o.ranges, MAX_SHOWN_RANGES),
            ]
        })
        .collect();
    let cols = [r("NODE"), l("STATE"), r("ROUTES"), r("SHARE"), l("RANGES")];
    out.push_str(&render_table(&cols, &rows));
    let summary = |ranges: &[(u32, u32)]| {
        if ranges.is_empty() {
            "none".to_string()
        } else {
            format!(
                "{}: {}",
                plural(range_total(ranges), "route", "routes"),
                fmt_ranges(ranges, MAX_SHOWN_RANGES)
            )
        }
    };
    out.push_str(&render_pairs(&[
        ("moved", summary(&t.moved)),
        ("unowned", summary(&t.unowned)),
    ]));
    out
}

/// Counters, and rates against the previous read when there is one (`--watch`).
fn render_stats(s: &Stats, prev: Option<&Stats>) -> String {
    let dt = prev.map(|p| s.at - p.at).filter(|dt| *dt > 0.0);
    let mut out = traffic_table("VIP", &s.vips, prev.map(|p| &p.vips[..]), dt);
    out.push('\n');
    out.push_str(&traffic_table(
        "NODE",
        &s.nodes,
        prev.map(|p| &p.nodes[..]),
        dt,
    ));
    out.push('\n');
    let or_none = |s: String| if s.is_empty() { "none".into() } else { s };
    out.push_str(&render_pairs(&[
        ("events", or_none(nonzero(&s.events))),
        ("drops", or_none(nonzero(&s.drops))),
    ]));
    out
}

fn traffic_table(
    what: &'static str,
    now: &[Traffic],
    prev: Option<&[Traffic]>,
    dt: Option<f64>,
) -> String {
    let before: BTreeMap<&str, &Traffic> = prev
        .unwrap_or_default()
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let rows: Vec<Vec<String>> = now
        .iter()
        .map(|t| {
            let mut row = vec![t.name.clone(), fmt_count(t.packets), fmt_bytes(t.bytes)];
            if prev.is_some() {
                // A counter that went backwards (program reloaded) has no rate this round.
                let rate = |new: u64, old: Option<u64>, scale: f64| match (old, dt) {
                    (Some(old), Some(dt)) if new >= old => fmt_si((new - old) as f64 * scale / dt),
                    _ => "-".into(),
                };
                let old = before.get(t.name.as_str());
                row.push(rate(t.packets, old.map(|o| o.packets), 1.0));
                row.push(rate(t.bytes, old.map(|o| o.bytes), 8.0));
            }
            row
        })
        .collect();
    let mut cols = vec![l(what), r("PACKETS"), r("BYTES")];
    if prev.is_some() {
        cols.extend([r("PKT/S"), r("BIT/S")]);
    }
    render_table(&cols, &rows)
}

fn render_trace(t: &Trace) -> String {
    let mut route = format!(
        "{}, owner {}",
        t.route,
        t.owner.map_or("none".into(), |n| format!("node {n}"))
    );
    if t.moved {
        route.push_str(", moved (flows looked up in conntrack)");
    }
    let tracked = t.tracked.as_ref().map_or("no".into(), |f| {
        format!(
            "node {}, idle {}{}",
            f.node,
            fmt_secs(f.idle_seconds as f64),
            if f.closing { ", closing" } else { "" }
        )
    });
    render_pairs(&[
        ("vip", t.vip.clone()),
        ("route", route),
        ("tracked", tracked),
        (
            "node",
            t.node.map_or("none (dropped)".into(), |n| n.to_string()),
        ),
        ("why", t.why.clone()),
    ])
}

/// A change's lines (`+` added, `-` removed, `~` changed, `!` needs a restart), then whether
/// it took effect.
fn render_diff(d: &Diff, dry_run: bool) -> String {
    let mut out: String = d.changes.iter().map(|c| format!("{c}\n")).collect();
    let outcome = if dry_run {
        "dry run: nothing applied".to_string()
    } else if d.applied {
        format!(
            "applied ({})",
            plural(d.route_writes, "route write", "route writes")
        )
    } else if d.changes.is_empty() {
        "no change".to_string()
    } else {
        "not applied".to_string()
    };
    out.push_str(&outcome);
    out.push('\n');
    if d.changes.iter().any(|c| c.starts_with('!')) {
        out.push_str("! = a setting only a restart of `lb run` changes\n");
    }
    out
}

/// Inclusive route ranges as `0-1023,4096-5000,7`; past `max` ranges the rest is counted,
/// not listed.
pub fn fmt_ranges(ranges: &[(u32, u32)], max: usize) -> String {
    let mut s = ranges
        .iter()
        .take(max)
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    if ranges.len() > max {
        write!(s, ",... ({} ranges, --json lists all)", ranges.len()).ok();
    }
    s
}

fn range_total(ranges: &[(u32, u32)]) -> u64 {
    ranges
        .iter()
        .map(|&(a, b)| u64::from(b.saturating_sub(a)) + 1)
        .sum()
}

/// `name count` pairs of the non-zero counters.
fn nonzero(counters: &BTreeMap<String, u64>) -> String {
    counters
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn plural(n: u64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {many}")
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// A share (0..=1) as a percentage.
fn fmt_pct(share: f64) -> String {
    format!("{:.1}%", share * 100.0)
}

/// With SI suffixes: `950`, `12.3k`, `4.5M`.
fn fmt_si(v: f64) -> String {
    if v < 1000.0 {
        return format!("{v:.0}");
    }
    let mut v = v;
    let mut unit = "";
    for u in ["k", "M", "G", "T", "P", "E"] {
        if v < 1000.0 {
            break;
        }
        v /= 1000.0;
        unit = u;
    }
    format!("{v:.1}{unit}")
}

/// Exact below 10000 (small counts are read digit by digit), SI above.
fn fmt_count(n: u64) -> String {
    if n < 10_000 {
        n.to_string()
    } else {
        fmt_si(n as f64)
    }
}

fn fmt_bytes(n: u64) -> String {
    format!("{}B", fmt_si(n as f64))
}

/// A heartbeat's age: tenths of a second matter below 10 s (the interval is 100 ms).
fn fmt_age(secs: f64) -> String {
    if secs < 10.0 {
        format!("{secs:.1}s")
    } else {
        fmt_secs(secs)
    }
}

fn fmt_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        fmt_secs(d.as_secs_f64())
    }
}

/// Whole seconds in the two largest units: `42s`, `5m`, `5m03s`, `2h07m`, `3d04h`.
fn fmt_secs(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    let (big, small, bu, su) = match s {
        0..60 => return format!("{s}s"),
        60..3600 => (s / 60, s % 60, "m", "s"),
        3600..86400 => (s / 3600, s % 3600 / 60, "h", "m"),
        _ => (s / 86400, s % 86400 / 3600, "d", "h"),
    };
    if small == 0 {
        format!("{big}{bu}")
    } else {
        format!("{big}{bu}{small:02}{su}")
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn vip_names_parse_and_print_canonically() {
        let v = parse_vip("198.51.100.1:80/tcp").unwrap();
        assert_eq!(
            v,
            VipName {
                addr: "198.51.100.1".parse().unwrap(),
                port: 80,
                proto: "tcp".into()
            }
        );
        assert_eq!(v.to_string(), "198.51.100.1:80/tcp");
        let v = parse_vip("[2001:db8:0::1]:443/udp").unwrap();
        assert_eq!(v.to_string(), "[2001:db8::1]:443/udp");
        let v = parse_vip("198.51.100.1:0/udp").unwrap();
        assert_eq!(v.port, 0);
        assert_eq!(v.to_string(), "198.51.100.1:0/udp");
    }

    #[test]
    fn bad_vip_names_say_what_is_expected() {
        for bad in [
            "198.51.100.1:80",
            "198.51.100.1/tcp",
            "2001:db8::1:80/tcp",
            "[2001:db8::1]/tcp",
            "198.51.100.1:70000/tcp",
            "198.51.100.1:80/icmp",
            "198.51.100.1:80/TCP",
            "host:80/tcp",
            "",
        ] {
            let e = parse_vip(bad).unwrap_err();
            assert!(
                e.contains("addr:port/proto") || e.contains("protocol"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn percent_encoding_keeps_a_vip_one_segment() {
        assert_eq!(
            client::encode("[2001:db8::1]:443/tcp"),
            "%5B2001%3Adb8%3A%3A1%5D%3A443%2Ftcp"
        );
        assert_eq!(
            client::encode("198.51.100.1:80/tcp"),
            "198.51.100.1%3A80%2Ftcp"
        );
        assert_eq!(client::encode("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(client::encode("a b%"), "a%20b%25");
        assert_eq!(
            client::query(&[("src", "[::1]:5"), ("proto", "tcp")]),
            "?src=%5B%3A%3A1%5D%3A5&proto=tcp"
        );
    }

    #[test]
    fn ranges_print_compactly_and_truncate_with_a_count() {
        assert_eq!(fmt_ranges(&[], 8), "");
        assert_eq!(
            fmt_ranges(&[(0, 1023), (4096, 5000), (7000, 7000)], 8),
            "0-1023,4096-5000,7000"
        );
        let many: Vec<(u32, u32)> = (0..20).map(|i| (i * 10, i * 10 + 1)).collect();
        assert_eq!(
            fmt_ranges(&many, 3),
            "0-1,10-11,20-21,... (20 ranges, --json lists all)"
        );
        assert_eq!(range_total(&many), 40);
    }

    fn node(id: u32) -> NodeInfo {
        NodeInfo {
            id,
            name: None,
            state: "active".into(),
            check: "heartbeat".into(),
            mac: None,
            ipv4: None,
            ipv6: None,
            weight: 1,
            config_weight: 1,
            advertised_weight: 0,
            admin_weight: None,
            admin_drain: false,
            routes: 0,
            route_share: 0.0,
            weighted_share: 0.0,
            flows: 0,
            flows_current: true,
            packets: 0,
            bytes: 0,
            last_heartbeat_age: None,
            cpu_permille: None,
            active_conns: None,
            duplicate_agent: false,
        }
    }

    #[test]
    fn node_table_aligns_and_marks_operator_settings() {
        let a = NodeInfo {
            name: Some("web-1".into()),
            routes: 43690,
            route_share: 2.0 / 3.0,
            weighted_share: 2.0 / 3.0,
            weight: 2,
            admin_weight: Some(2),
            flows: 12345,
            flows_current: true,
            packets: 1_234_567,
            bytes: 987,
            last_heartbeat_age: Some(0.04),
            cpu_permille: Some(453),
            active_conns: Some(120),
            ..node(1)
        };
        let b = NodeInfo {
            state: "draining".into(),
            admin_drain: true,
            routes: 0,
            flows: 3,
            flows_current: true,
            last_heartbeat_age: Some(75.0),
            ..node(12)
        };
        let expected = "\
ID  NAME   STATE      WEIGHT  ROUTES  SHARE  WEIGHTED  FLOWS  PACKETS  BYTES  HEARTBEAT    CPU  CONNS
 1  web-1  active         2*   43690  66.7%     66.7%  12.3k     1.2M   987B       0.0s  45.3%    120
12  -      draining*       1       0   0.0%      0.0%      3        0     0B      1m15s      -      -
* set by the operator (undo with `lb node undrain ID`, `lb node weight ID --clear`)
";
        assert_eq!(render_nodes(&[a, b]), expected);
        // Nothing operator-set: no legend.
        assert!(!render_nodes(&[node(0)]).contains("operator"));
    }

    #[test]
    fn table_pads_columns_and_skips_empty_headers() {
        let rows = vec![
            vec!["a".into(), "1".into()],
            vec!["long".into(), "100".into()],
        ];
        assert_eq!(
            render_table(&[l("K"), r("N")], &rows),
            "K       N\na       1\nlong  100\n"
        );
        assert_eq!(render_table(&[l(""), l("")], &rows), "a     1\nlong  100\n");
    }

    #[test]
    fn stats_rates_come_from_two_reads() {
        let t = |packets, bytes| Traffic {
            name: "198.51.100.1:80/tcp".into(),
            packets,
            bytes,
        };
        let before = Stats {
            at: 10.0,
            vips: vec![t(1000, 100_000)],
            ..Stats::default()
        };
        let now = Stats {
            at: 12.0,
            vips: vec![t(3000, 300_000)],
            drops: [
                ("no_backend".to_string(), 2),
                ("bad_tcp_header".to_string(), 0),
            ]
            .into_iter()
            .collect(),
            ..Stats::default()
        };
        let out = render_stats(&now, Some(&before));
        // 2000 packets and 200 kB over 2 s.
        assert!(
            out.contains("198.51.100.1:80/tcp     3000  300.0kB   1.0k  800.0k"),
            "{out}"
        );
        assert!(out.contains("drops   no_backend 2\n"), "{out}");
        assert!(!out.contains("bad_tcp_header"));
        assert!(!render_stats(&now, None).contains("PKT/S"));
    }

    #[test]
    fn durations_and_weights_are_checked() {
        assert_eq!(parse_positive_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(
            parse_positive_duration("500ms"),
            Ok(Duration::from_millis(500))
        );
        assert!(parse_positive_duration("0s").is_err());
        assert!(parse_positive_duration("5 parsecs").is_err());
        assert_eq!(parse_weight("1"), Ok(1));
        assert_eq!(parse_weight(&MAX_WEIGHT.to_string()), Ok(MAX_WEIGHT));
        for bad in ["0", "1001", "-1", "x", ""] {
            assert!(parse_weight(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_node_id("4094"), Ok(4094));
        assert!(parse_node_id("4095").is_err());
        assert_eq!(
            parse_mac_arg("AA:bb:0:1:2:3"),
            Ok("aa:bb:00:01:02:03".into())
        );
        assert!(parse_mac_arg("aa:bb").is_err());
        assert_eq!(parse_trace_src("2001:db8::1"), Ok("2001:db8::1".into()));
        assert_eq!(
            parse_trace_src("[2001:db8::1]:5000"),
            Ok("[2001:db8::1]:5000".into())
        );
        assert!(parse_trace_src("10.0.0.1:x").is_err());
    }

    #[test]
    fn durations_print_in_two_units() {
        assert_eq!(fmt_duration(Duration::from_secs(30)), "30s");
        assert_eq!(fmt_duration(Duration::from_secs(300)), "5m");
        assert_eq!(fmt_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(fmt_secs(303.0), "5m03s");
        assert_eq!(fmt_secs(7620.0), "2h07m");
        assert_eq!(fmt_secs(273_600.0), "3d04h");
    }

    #[test]
    fn mode_and_hash_names_match_the_enums() {
        for m in MODES {
            let v: ForwardMode = from_wire_name(m.into()).unwrap();
            assert_eq!(wire_name(&v), m);
        }
        for h in HASHES {
            let v: HashMode = from_wire_name(h.into()).unwrap();
            assert_eq!(wire_name(&v), h);
        }
        for m in [ForwardMode::DsrL2, ForwardMode::Ipip] {
            assert!(MODES.contains(&wire_name(&m).as_str()));
        }
        for h in [HashMode::FiveTuple, HashMode::SourceIp] {
            assert!(HASHES.contains(&wire_name(&h).as_str()));
        }
    }

    /// The operator commands as `main.rs` mounts them (flattened into `lb`).
    #[derive(clap::Parser, Debug)]
    #[command(name = "lb")]
    struct Lb {
        #[command(subcommand)]
        cmd: Command,
    }

    fn parse(args: &str) -> Result<Command, clap::Error> {
        use clap::Parser as _;
        Lb::try_parse_from(std::iter::once("lb").chain(args.split_whitespace())).map(|l| l.cmd)
    }

    #[test]
    fn command_line_rules() {
        use clap::CommandFactory as _;
        Lb::command().debug_assert();
        // Globals work after the subcommand and select the socket.
        let Ok(Command::Node(n)) = parse("node list --json --instance edge") else {
            panic!("node list");
        };
        assert!(n.opts.json);
        if std::env::var_os("LB_SOCKET").is_none() {
            assert_eq!(n.opts.client().socket(), Path::new("/run/lb/edge.sock"));
        }
        let Ok(Command::Vip(v)) =
            parse("vip --socket /tmp/x.sock add [2001:db8::1]:0/udp --mode ipip")
        else {
            panic!("vip add");
        };
        assert_eq!(v.opts.client().socket(), Path::new("/tmp/x.sock"));
        let VipCmd::Add(add) = v.cmd else {
            panic!("vip add")
        };
        assert_eq!(
            (add.mode, add.hash, add.routes),
            (ForwardMode::Ipip, HashMode::FiveTuple, 65536)
        );
        // Exactly one of WEIGHT and --clear.
        assert!(parse("node weight 3 5").is_ok());
        assert!(parse("node weight 3 --clear").is_ok());
        assert!(parse("node weight 3").is_err());
        assert!(parse("node weight 3 5 --clear").is_err());
        assert!(parse("node weight 3 1001").is_err());
        // --timeout only with --wait; a tcp check needs its target.
        assert!(parse("node drain 3 --wait --timeout 30s").is_ok());
        assert!(parse("node drain 3 --timeout 30s").is_err());
        assert!(parse("node add 3 --check tcp").is_err());
        assert!(
            parse("node add 3 --check tcp --check-addr 10.0.0.3:80 --check-http-path /healthz")
                .is_ok()
        );
        assert!(parse("node add 3 --mac 02:00:00:00:00").is_err());
        // trace: the flow, or --live alone.
        assert!(parse("trace 10.0.0.1 198.51.100.1:80 tcp").is_ok());
        assert!(parse("trace --live").is_ok());
        assert!(parse("trace").is_err());
        assert!(parse("trace --live 10.0.0.1").is_err());
        assert!(parse("trace 10.0.0.1 198.51.100.1:80 icmp").is_err());
        assert!(parse("vip add 198.51.100.1:80/tcp --routes 0").is_err());
        assert!(parse("status --instance ../x").is_err());
    }

    #[test]
    fn diff_says_whether_it_was_applied() {
        let d = Diff {
            changes: vec!["+ node 4".into()],
            route_writes: 1,
            applied: true,
        };
        assert_eq!(
            render_diff(&d, false),
            "+ node 4\napplied (1 route write)\n"
        );
        let dry = Diff {
            applied: false,
            ..d
        };
        assert_eq!(
            render_diff(&dry, true),
            "+ node 4\ndry run: nothing applied\n"
        );
        assert_eq!(render_diff(&Diff::default(), false), "no change\n");
        let restart = Diff {
            changes: vec!["! daemon.conntrack_size 65536 -> 131072".into()],
            route_writes: 0,
            applied: false,
        };
        assert!(
            render_diff(&restart, false)
                .ends_with("not applied\n! = a setting only a restart of `lb run` changes\n")
        );
    }
}
