//! The local control API's wire types: what `lb run` serves on its Unix socket (HTTP/JSON,
//! `docs/api.md`) and what the `lb` CLI, the metrics endpoint and the status page read.
//!
//! Every change goes through the daemon's loop as one controller input, validated whole
//! before anything changes and persisted before the reply.
//!
//! Endpoints (all JSON unless noted; errors are non-2xx with an [`ApiError`] body: 400 bad
//! input, 404 unknown node/VIP, 409 duplicate or refused (e.g. last live node without force),
//! 500 kernel or disk failure):
//! - `GET  /v1/status` -> [`Status`]
//! - `GET  /v1/vips` -> `[VipInfo]`; `POST /v1/vips` ([`VipAdd`]) -> [`Diff`];
//!   `DELETE /v1/vips/{vip}` -> [`Diff`] (`{vip}` = `addr:port/proto`, URL-encoded)
//! - `GET  /v1/vips/{vip}/routes` -> [`RoutesInfo`]
//! - `GET  /v1/nodes` -> `[NodeInfo]`; `GET /v1/nodes/{id}` -> [`NodeInfo`];
//!   `POST /v1/nodes` ([`NodeAdd`]) -> [`Diff`]; `DELETE /v1/nodes/{id}?force=` -> [`Diff`]
//! - `POST /v1/nodes/{id}/drain`, `POST /v1/nodes/{id}/undrain` -> [`Diff`]
//! - `PUT  /v1/nodes/{id}/weight` ([`WeightBody`]) -> [`Diff`]
//! - `GET  /v1/stats` -> [`Stats`]
//! - `GET  /v1/trace?src=&dst=&proto=` ([`TraceQuery`]) -> [`Trace`]
//! - `POST /v1/apply?dry_run=` (body: `lb.toml` text) -> [`Diff`]
//! - `GET  /v1/config` -> the running configuration as `lb.toml` text (`text/plain`)
//! - `GET  /v1/trace/live` -> `text/plain` stream, one line per rare data-plane event
//!   (drops, PMTU replies, evictions) while the request is open
//! - `GET  /v1/observe` -> [`Observation`] (what `/metrics` and the status page render)
use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    config::{NodeConfig, VipConfig},
    dataplane::{ForwardMode, HashMode},
};

/// Default socket directory: `<dir>/<instance>.sock`.
pub const SOCKET_DIR: &str = "/run/lb";

/// The API socket of an instance.
pub fn default_socket(instance: &str) -> PathBuf {
    PathBuf::from(SOCKET_DIR).join(format!("{instance}.sock"))
}

/// Splits a VIP name `addr:port/proto` (IPv6 as `[addr]:port/proto`; port 0 = all ports)
/// into its socket address and protocol number.
pub fn split_vip(name: &str) -> Result<(std::net::SocketAddr, u8), String> {
    let bad = || {
        format!(
            "VIP {name:?}: expected addr:port/proto, e.g. 198.18.0.1:80/tcp or [2001:db8::1]:443/tcp"
        )
    };
    let (addr, proto) = name.rsplit_once('/').ok_or_else(bad)?;
    let addr: std::net::SocketAddr = addr.parse().map_err(|_| bad())?;
    let proto = crate::config::parse_proto(proto).map_err(|e| format!("VIP {name:?}: {e}"))?;
    Ok((addr, proto))
}

/// Body of every non-2xx reply.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    /// What is wrong, one line.
    pub error: String,
    /// What to do about it, if there is something to say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub instance: String,
    pub pid: u32,
    pub iface: String,
    /// `native` or `generic`.
    pub xdp_mode: String,
    /// Kernel ID of the attached XDP program.
    pub program_id: Option<u32>,
    pub uptime_seconds: f64,
    /// The file `lb run` was started with (SIGHUP re-applies it).
    pub config_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub vips: usize,
    pub nodes: NodeCounts,
    pub heartbeats: HeartbeatCounts,
    pub conntrack: ConntrackStatus,
    /// Fail static is holding every node up (most went silent at once).
    pub fail_static: bool,
    /// VIPs without an active node: their new flows are dropped (`no_backend`).
    #[serde(default)]
    pub unserved_vips: Vec<String>,
    /// Times a VIP lost its last active node since the daemon started.
    #[serde(default)]
    pub unserved_episodes: u64,
    /// Cluster mode (`[cluster]`): absent on a single box.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
    /// `[bgp]`: the VIP addresses bird was last told to announce (absent without `[bgp]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp_announced: Option<Vec<String>>,
}

/// A balancer of a cluster, as `lb status` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterStatus {
    /// This balancer's id.
    pub id: String,
    /// Whether it has an etcd session.
    pub connected: bool,
    /// Who leads, as last read from etcd.
    pub leader: Option<String>,
    pub leading: bool,
    /// The table revision live in its kernel maps (0: none yet).
    pub revision: i64,
    /// SHA-256 of the tables it forwards with (seed, nodes, every VIP's live routes): equal
    /// on every balancer running the same revision.
    pub digest: String,
    /// The live balancers (their reports are in etcd), this one included.
    pub balancers: Vec<String>,
    pub counters: ClusterCounters,
}

/// Cluster-mode events since the daemon started.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterCounters {
    /// Table revisions applied from etcd.
    pub applied: u64,
    /// Table revisions written (as the leader).
    pub written: u64,
    /// Revisions that could not be applied (invalid, or the kernel write failed).
    pub refused: u64,
    /// etcd requests that failed (unreachable, timed out, errors).
    pub errors: u64,
    /// Flows on moved routes this balancer shares (its last scan), and those beyond
    /// `replica::MAX_PINS` it could not.
    #[serde(default)]
    pub flows_exported: u64,
    #[serde(default)]
    pub flows_unshared: u64,
    /// Other balancers' moved-route flows recorded in this balancer's conntrack now.
    #[serde(default)]
    pub flows_imported: u64,
}

/// Nodes by state.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeCounts {
    pub active: usize,
    pub draining: usize,
    pub down: usize,
}

/// Heartbeats since the daemon started.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeartbeatCounts {
    pub accepted: u64,
    /// Rejected, by reason: `bad_hmac` (wrong key or corrupt), `malformed`, `truncated`,
    /// `oversized`, `bad_magic`, `unknown_version`, `unknown_kind`, `wrong_direction` (the
    /// socket's), `unknown_node`, `replay`, `stale_incarnation`, `duplicate_node` (a second
    /// agent claiming a node; the detector's).
    pub rejected: BTreeMap<String, u64>,
    /// Dropped by the kernel before being read (socket queue full).
    pub queue_drops: u64,
    /// Heartbeats advertising an interval above `heartbeat_interval_max`.
    pub interval_clamped: u64,
    /// Heartbeats advertising a weight above their node's `advertised_weight_max`.
    #[serde(default)]
    pub weight_clamped: u64,
    /// Lower incarnations accepted (a future one replaced, or a clock that stepped back).
    #[serde(default)]
    pub incarnation_resets: u64,
    pub fail_static_episodes: u64,
}

/// Connection tracking.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConntrackStatus {
    pub capacity: u64,
    /// Entries in use at the last scan (every 2 s).
    pub entries: u64,
    /// Scans done since the daemon started.
    pub scans: u64,
    /// Entries of open flows (not closed, not idle past `flow_idle_timeout`).
    pub open_flows: u64,
    /// New flows that took the place of a tracked one in a full set.
    pub evictions: u64,
    pub inserts: u64,
}

/// One node, `GET /v1/nodes`, `GET /v1/nodes/{id}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    pub id: u32,
    pub name: Option<String>,
    /// `active`, `draining` or `down`.
    pub state: String,
    /// How the node is judged: `heartbeat` or `tcp`.
    pub check: String,
    pub mac: Option<String>,
    pub ipv4: Option<IpAddr>,
    pub ipv6: Option<IpAddr>,
    /// Weight the route tables use.
    pub weight: u32,
    pub config_weight: u32,
    /// The agent's advertised weight (0 = no opinion).
    pub advertised_weight: u32,
    /// The operator's weight (`lb node weight`), which beats the agent's.
    pub admin_weight: Option<u32>,
    /// The operator drained it (`lb node drain`), whatever the agent says.
    pub admin_drain: bool,
    /// Routes it owns, summed over VIPs, and its share of all routes.
    pub routes: u64,
    pub route_share: f64,
    /// Its weight over the weights of all active nodes (0 when not active).
    pub weighted_share: f64,
    /// Open tracked flows on it (last conntrack scan, every 2 s).
    pub flows: u64,
    /// Whether `flows` comes from a scan that started after the last change (a drain just
    /// made is not judged by a count taken before it).
    pub flows_current: bool,
    pub packets: u64,
    pub bytes: u64,
    /// Seconds since its last accepted heartbeat.
    pub last_heartbeat_age: Option<f64>,
    /// What the agent reports.
    pub cpu_permille: Option<u16>,
    pub active_conns: Option<u32>,
    /// A second agent claiming this node ID beat in the last 10 s (its heartbeats are
    /// rejected as `duplicate_node`).
    #[serde(default)]
    pub duplicate_agent: bool,
}

/// One VIP, `GET /v1/vips`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VipInfo {
    /// `addr:port/proto` (IPv6 in brackets): how the API and CLI name a VIP.
    pub name: String,
    pub addr: IpAddr,
    pub port: u16,
    pub proto: String,
    pub mode: ForwardMode,
    pub hash: HashMode,
    pub index: u32,
    pub routes: u32,
    /// Routes flagged moved (their flows are looked up in conntrack).
    pub moved: u32,
    /// Routes with no owner (no live node).
    pub unowned: u32,
    pub packets: u64,
    pub bytes: u64,
}

/// `GET /v1/vips/{vip}/routes`: HaloD's picture of the table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RoutesInfo {
    pub vip: String,
    pub routes: u32,
    pub nodes: Vec<RouteOwner>,
    /// Routes with no owner, as inclusive ranges.
    pub unowned: Vec<(u32, u32)>,
    /// Routes flagged moved, as inclusive ranges.
    pub moved: Vec<(u32, u32)>,
}

/// One node's part of a VIP's table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RouteOwner {
    pub node: u32,
    pub state: String,
    pub count: u32,
    pub share: f64,
    /// Route IDs as inclusive ranges.
    pub ranges: Vec<(u32, u32)>,
}

/// `GET /v1/stats`: counters since the program was loaded (summed over CPUs).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    /// Seconds on the daemon's monotonic clock when read (for rates between two reads).
    pub at: f64,
    pub vips: Vec<Traffic>,
    pub nodes: Vec<Traffic>,
    /// Verdicts and events by name (`pass`, `tx`, `drop`, `ct_insert`, ...).
    pub events: BTreeMap<String, u64>,
    /// Drops by reason (`no_backend`, `bad_tcp_header`, ...).
    pub drops: BTreeMap<String, u64>,
}

/// Packets and bytes of one VIP or node.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Traffic {
    /// VIP name or node ID.
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}

/// `GET /v1/trace?src=&dst=&proto=`: where a packet of this flow would go, and why.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Trace {
    pub vip: String,
    pub route: u32,
    pub owner: Option<u32>,
    pub moved: bool,
    /// The conntrack entry of the flow, if tracked.
    pub tracked: Option<TrackedFlow>,
    /// The node the packet would be sent to (None: dropped).
    pub node: Option<u32>,
    /// Why, in words.
    pub why: String,
}

/// A conntrack entry as `lb trace` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TrackedFlow {
    pub node: u32,
    /// Seconds since its last refresh.
    pub idle_seconds: u64,
    pub closing: bool,
}

/// Query of `GET /v1/trace`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TraceQuery {
    /// `addr` or `addr:port` (`[v6]:port`).
    pub src: String,
    /// `addr:port`.
    pub dst: String,
    /// `tcp` or `udp`.
    pub proto: String,
}

/// `POST /v1/nodes`: a node added at runtime, in the config file's form.
pub type NodeAdd = NodeConfig;
/// `POST /v1/vips`: a VIP added at runtime, in the config file's form.
pub type VipAdd = VipConfig;

/// `PUT /v1/nodes/{id}/weight`: the operator's weight, or `null` to give the node back to
/// its agent's (or the file's) weight.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WeightBody {
    pub weight: Option<u32>,
}

/// `?force=true` on removals that would leave VIPs without a live node.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ForceQuery {
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/apply?dry_run=`: body is a whole `lb.toml`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ApplyQuery {
    #[serde(default)]
    pub dry_run: bool,
}

/// What a change did (or, dry, would do): the reply of every changing call.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Diff {
    /// One line per change (`+ node 4`, `- vip 198.18.0.1:80/tcp`, `~ node 2 weight 1 -> 3`).
    pub changes: Vec<String>,
    /// Route entries written to the kernel.
    pub route_writes: u64,
    /// Whether it was applied (false for a dry run or no change).
    pub applied: bool,
}

/// Everything the metrics endpoint and the status page show, read in one go.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Observation {
    pub status: Status,
    pub nodes: Vec<NodeInfo>,
    pub vips: Vec<VipInfo>,
    pub stats: Stats,
    /// Each VIP's table (same order as `vips`).
    pub tables: Vec<RoutesInfo>,
    /// Routes moved since start, by reason (`join`, `failure`, `drain`, `weight`).
    pub route_moves: BTreeMap<String, u64>,
}
