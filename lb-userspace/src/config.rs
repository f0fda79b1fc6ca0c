//! `lb.toml`: the daemon's configuration. Parsed and validated up front; every problem is
//! reported with its field and what is wrong, and nothing starts with a bad config.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::dataplane::{ForwardMode, HashMode};

/// Whole configuration file.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub ipip: IpipConfig,
    #[serde(default, rename = "vip")]
    pub vips: Vec<VipConfig>,
    #[serde(default, rename = "node")]
    pub nodes: Vec<NodeConfig>,
    /// Several balancers sharing one store; absent: single-box on the state file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    /// VIPs announced over BGP through bird2; absent: nothing is announced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<BgpConfig>,
}

/// `[bgp]`: this balancer announces its VIPs (/32, /128) through a bird2 it does not run: it
/// writes `routes_file`, which bird.conf includes, and has bird re-read its configuration with
/// `birdc -s <socket> configure` (`crate::announce`; the bird.conf it needs:
/// `docs/control-plane.md`, "Announcing VIPs over BGP (bird2)").
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BgpConfig {
    /// The `birdc` program: a name looked up on the PATH, or an absolute path.
    pub birdc: PathBuf,
    /// bird's control socket (`bird -s`; Debian's default: /run/bird/bird.ctl).
    pub socket: PathBuf,
    /// The file bird.conf includes; the balancer writes it (atomically) and owns it.
    pub routes_file: PathBuf,
}

impl Default for BgpConfig {
    fn default() -> Self {
        Self {
            birdc: "birdc".into(),
            socket: "/run/bird/bird.ctl".into(),
            routes_file: "/etc/bird/lb-vips.conf".into(),
        }
    }
}

/// Longest path of a Unix socket (`sun_path` holds 108 bytes with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

impl BgpConfig {
    /// Every field checked; each problem is one line naming the field.
    pub fn validate(&self) -> Result<()> {
        let text = |p: &Path, field: &str| -> Result<String> {
            let s = p
                .to_str()
                .with_context(|| format!("bgp.{field} {p:?} is not UTF-8"))?;
            if s.chars().any(char::is_control) {
                bail!("bgp.{field} {s:?} contains a control character");
            }
            Ok(s.to_string())
        };
        let birdc = text(&self.birdc, "birdc")?;
        if birdc.is_empty() {
            bail!("bgp.birdc is empty: use \"birdc\" (looked up on the PATH) or an absolute path");
        }
        if birdc.contains('/') && !self.birdc.is_absolute() {
            bail!(
                "bgp.birdc {birdc:?}: use a plain name looked up on the PATH (\"birdc\") or an \
                 absolute path (a relative path depends on the daemon's working directory)"
            );
        }
        if birdc.ends_with('/') {
            bail!("bgp.birdc {birdc:?} names a directory: give the program");
        }
        let socket = text(&self.socket, "socket")?;
        if !self.socket.is_absolute() || socket.ends_with('/') {
            bail!("bgp.socket {socket:?}: give bird's control socket as an absolute file path");
        }
        if socket.len() > MAX_SOCKET_PATH {
            bail!(
                "bgp.socket {socket:?} is {} bytes long: a Unix socket path has at most \
                 {MAX_SOCKET_PATH}",
                socket.len()
            );
        }
        let routes = text(&self.routes_file, "routes_file")?;
        if !self.routes_file.is_absolute() || routes.ends_with('/') {
            bail!(
                "bgp.routes_file {routes:?}: give the file bird.conf includes as an absolute file path"
            );
        }
        if routes.contains('"') {
            bail!(
                "bgp.routes_file {routes:?} contains '\"', which bird's include \"...\" cannot name"
            );
        }
        if self.routes_file == self.socket {
            bail!(
                "bgp.routes_file {routes:?} is bgp.socket: the daemon would overwrite bird's socket"
            );
        }
        Ok(())
    }
}

/// `[cluster]`: this balancer is one of several sharing a store (etcd), under the key prefix
/// `/lb/<name>/` (the layout: `docs/control-plane.md`, "Cluster mode"): it runs the tables the
/// cluster's leader writes there.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// etcd client URLs, `http://host:port`.
    pub endpoints: Vec<String>,
    /// Cluster name: every key lives under `/lb/<name>/`.
    pub name: String,
    /// This balancer's ID, unique in the cluster (a short string or a number).
    #[serde(deserialize_with = "string_or_number")]
    pub id: String,
    /// This balancer's lease: its liveness reports and its leadership end this long after it
    /// stops renewing it (dies, or loses etcd). Whole seconds (etcd leases are).
    #[serde(default = "default_lease_ttl", with = "humantime_serde_compat")]
    pub lease_ttl: Duration,
}

/// The default lease: a new leader within 2 s of the old one's death (issue 12's bound).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(2);
/// Longest lease accepted: longer only delays failover (the leader's death is noticed this late).
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(60);

fn default_lease_ttl() -> Duration {
    DEFAULT_LEASE_TTL
}

/// `id = "a"` or `id = 3`, kept as text (it is part of etcd keys).
fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        Text(String),
        Number(u64),
    }
    Ok(match Id::deserialize(d)? {
        Id::Text(s) => s,
        Id::Number(n) => n.to_string(),
    })
}

/// Letters, digits, '-', '_' and '.', 1..=64 of them: safe inside an etcd key and a log line.
fn key_safe(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl ClusterConfig {
    /// Every field checked; each problem is one line naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.endpoints.is_empty() {
            bail!(
                "cluster.endpoints is empty: list the etcd client URLs, e.g. [\"http://10.0.0.1:2379\"]"
            );
        }
        let mut seen = BTreeSet::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            check_endpoint(e).with_context(|| format!("cluster.endpoints[{i}] {e:?}"))?;
            if !seen.insert(e.trim_end_matches('/')) {
                bail!("cluster.endpoints[{i}] {e:?} is listed twice");
            }
        }
        if self.name.contains('/') {
            bail!(
                "cluster.name {:?}: '/' would split the key prefix /lb/<name>/; use letters, \
                 digits, '-', '_' and '.'",
                self.name
            );
        }
        if !key_safe(&self.name) {
            bail!(
                "cluster.name {:?}: use 1 to 64 letters, digits, '-', '_' and '.'",
                self.name
            );
        }
        if !key_safe(&self.id) {
            bail!(
                "cluster.id {:?}: use 1 to 64 letters, digits, '-', '_' and '.' (unique per \
                 cluster)",
                self.id
            );
        }
        let ttl = self.lease_ttl;
        if ttl.subsec_nanos() != 0 || ttl < Duration::from_secs(1) || ttl > MAX_LEASE_TTL {
            bail!(
                "cluster.lease_ttl {ttl:?}: use whole seconds within 1s..={}s (etcd leases are \
                 whole seconds; longer only delays failover)",
                MAX_LEASE_TTL.as_secs()
            );
        }
        Ok(())
    }
}

/// `http://host:port` and nothing more (TLS is not supported yet).
fn check_endpoint(e: &str) -> Result<()> {
    let uri: hyper::Uri = e
        .parse()
        .map_err(|err| anyhow::anyhow!("not a URL ({err}): use http://host:port"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => bail!("scheme {other:?}: use http://host:port (TLS is not supported yet)"),
        None => bail!("no scheme: use http://host:port"),
    }
    let auth = uri.authority().context("no host: use http://host:port")?;
    if auth.host().is_empty() {
        bail!("no host: use http://host:port");
    }
    // The text after the host's last ':' (not inside an IPv6 address's brackets).
    let port = auth
        .as_str()
        .rsplit_once(':')
        .map(|(_, p)| p)
        .filter(|p| !p.contains(']'));
    match (port, auth.port_u16()) {
        (None, _) => bail!("no port: use http://host:port, e.g. port 2379"),
        (Some(_), Some(p)) if p != 0 => {}
        (Some(p), _) => bail!("port {p} out of 1..=65535"),
    }
    if auth.as_str().contains('@') {
        bail!("user info is not supported: use http://host:port");
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        bail!("a path or query is not allowed: use http://host:port");
    }
    Ok(())
}

/// `[daemon]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Instance name: maps and the XDP link are pinned under `/sys/fs/bpf/<instance>/`.
    pub instance: String,
    /// Where heartbeats are received (UDP).
    pub heartbeat_listen: SocketAddr,
    /// Multicast group to join for heartbeats, if agents send to one.
    pub heartbeat_group: Option<IpAddr>,
    /// Shared heartbeat key (at least 16 bytes; raw or hex).
    pub key_file: Option<PathBuf>,
    /// Optional per-node keys: a node with a file `<id>.key` here (same format) is heard only
    /// with that key, and its notices are signed with it; other nodes use `key_file`. The files
    /// are read at start and at every configuration change (SIGHUP, `lb apply`, `lb node add`).
    pub node_key_dir: Option<PathBuf>,
    /// Expected agent heartbeat interval: the grace a re-adopted node gets after a restart.
    /// An agent may advertise a shorter one (it is judged by that), never a longer one than
    /// `heartbeat_interval_max`.
    #[serde(with = "humantime_serde_compat")]
    pub heartbeat_interval: Duration,
    /// Longest advertised interval honoured (default: `heartbeat_interval`); a slower agent
    /// is judged at this one, so it cannot stretch failure detection.
    #[serde(default, with = "opt_duration")]
    pub heartbeat_interval_max: Option<Duration>,
    /// Fail static: hold every node up when more than this share of the up nodes (or all of
    /// them) go silent together, which points at the balancer's own receive path. 0 = off.
    pub fail_static_share: f64,
    /// Missed intervals before a node is down.
    pub miss_limit: u32,
    /// A node that was down must beat continuously this long before it rejoins.
    #[serde(with = "humantime_serde_compat")]
    pub hold_down: Duration,
    /// How far an agent's incarnation (its start time) may be from this balancer's clock and
    /// still count as current: a lower incarnation than the accepted one is let in only when
    /// the accepted one lies further than this in the future, or the node is silent and the
    /// new one is current (see `docs/heartbeat.md`).
    #[serde(with = "humantime_serde_compat")]
    pub clock_skew_max: Duration,
    /// XDP attach mode: `auto` (native when the driver supports it), `native`, `generic`.
    pub xdp_mode: String,
    /// Entries of the ROUTES map (each VIP needs 2 x its route count).
    pub route_slots: u32,
    /// Entries of the CONNTRACK map.
    pub conntrack_size: u32,
    /// Node index of the reserve (HaloD failover) node, if any.
    pub reserve_node: Option<u32>,
    /// Idle tracked flows older than this are expired.
    #[serde(with = "humantime_serde_compat")]
    pub flow_idle_timeout: Duration,
    /// The control API's Unix socket (default `/run/lb/<instance>.sock`).
    pub api_socket: Option<PathBuf>,
    /// Where `/metrics` (Prometheus text) and the status page `/` are served, e.g.
    /// `127.0.0.1:9100`; off when unset.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            instance: "lb".into(),
            heartbeat_listen: SocketAddr::from((
                Ipv4Addr::UNSPECIFIED,
                crate::heartbeat::DEFAULT_PORT,
            )),
            heartbeat_group: None,
            key_file: None,
            node_key_dir: None,
            heartbeat_interval: Duration::from_millis(100),
            heartbeat_interval_max: None,
            fail_static_share: 0.5,
            miss_limit: 3,
            hold_down: Duration::from_secs(2),
            clock_skew_max: crate::membership::DEFAULT_CLOCK_SKEW,
            xdp_mode: "auto".into(),
            route_slots: lb_common::DEFAULT_ROUTE_SLOTS,
            conntrack_size: lb_common::DEFAULT_CONNTRACK_SIZE,
            reserve_node: None,
            flow_idle_timeout: Duration::from_secs(300),
            api_socket: None,
            metrics_listen: None,
        }
    }
}

/// `[ipip]`: encapsulation settings (only needed when a VIP uses `mode = "ipip"`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IpipConfig {
    /// Next-hop MAC for encapsulated frames.
    pub gateway_mac: Option<String>,
    /// Path MTU towards the nodes; 0 disables PMTU replies.
    pub mtu: u16,
    /// IPv4 outer-source network, e.g. `172.16.0.0/16`: host bits come from the flow hash.
    pub source_v4: String,
    /// IPv6 outer-source prefix (its last 32 bits come from the flow hash).
    pub source_v6: Ipv6Addr,
}

impl Default for IpipConfig {
    fn default() -> Self {
        Self {
            gateway_mac: None,
            mtu: 1500,
            source_v4: "172.16.0.0/16".into(),
            source_v6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0),
        }
    }
}

/// `[[vip]]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    pub addr: IpAddr,
    /// 0 = all ports.
    pub port: u16,
    /// `tcp` or `udp`.
    pub proto: String,
    #[serde(default = "default_mode")]
    pub mode: ForwardMode,
    #[serde(default = "default_hash")]
    pub hash: HashMode,
    /// Route IDs (N) of this VIP.
    #[serde(default = "default_routes")]
    pub routes: u32,
}

fn default_mode() -> ForwardMode {
    ForwardMode::DsrL2
}
fn default_hash() -> HashMode {
    HashMode::FiveTuple
}
fn default_routes() -> u32 {
    lb_common::DEFAULT_ROUTES_PER_VIP
}

/// Largest node weight (a weight is a share of routes; 65536 routes split 1:1000 already
/// leaves the light node 65 routes).
pub const MAX_WEIGHT: u32 = 1000;

/// By default an agent may advertise at most this many times its node's configured weight.
pub const ADVERTISED_WEIGHT_FACTOR: u32 = 4;

/// `[[node]]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node index (also the node ID its agent sends), `< MAX_NODES`.
    pub id: u32,
    #[serde(default)]
    pub name: Option<String>,
    /// MAC for dsr-l2.
    pub mac: Option<String>,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    #[serde(default = "one")]
    pub weight: u32,
    /// The largest weight the node's agent may advertise (1..=1000; default 4 x `weight`, at
    /// most 1000): more is clamped to it, so one node (whoever holds the shared key) cannot
    /// take every route by advertising a huge weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertised_weight_max: Option<u32>,
    /// `heartbeat` (default: an agent runs on the node) or `tcp` (active connect check).
    #[serde(default = "default_check")]
    pub check: String,
    /// Target of the TCP check (`addr:port`).
    pub check_addr: Option<SocketAddr>,
    /// Optional HTTP GET path for the TCP check (2xx/3xx is healthy).
    pub check_http_path: Option<String>,
    /// Time between TCP checks (default 1s).
    #[serde(default, with = "opt_duration")]
    pub check_interval: Option<Duration>,
    /// Timeout of one TCP check (default 500ms).
    #[serde(default, with = "opt_duration")]
    pub check_timeout: Option<Duration>,
    /// Consecutive successes before the node is up (default 2).
    pub check_rise: Option<u32>,
    /// Consecutive failures before the node is down (default 3).
    pub check_fall: Option<u32>,
    /// Per-node override of the missed-interval limit.
    pub miss_limit: Option<u32>,
    /// The operator drained the node (`lb node drain`): it takes no new flows, whatever its
    /// agent advertises, until undrained.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drain: bool,
    /// The operator's weight (`lb node weight`): beats the weight the agent advertises.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_weight: Option<u32>,
}

fn one() -> u32 {
    1
}

impl NodeConfig {
    /// The largest weight the node's agent may advertise.
    pub fn max_advertised_weight(&self) -> u32 {
        self.advertised_weight_max.unwrap_or_else(|| {
            self.weight
                .saturating_mul(ADVERTISED_WEIGHT_FACTOR)
                .min(MAX_WEIGHT)
        })
    }
}
fn default_check() -> String {
    "heartbeat".into()
}

impl DaemonConfig {
    /// The longest advertised heartbeat interval honoured.
    pub fn max_interval(&self) -> Duration {
        self.heartbeat_interval_max
            .unwrap_or(self.heartbeat_interval)
    }

    /// The fail-static threshold, `None` when off.
    pub fn fail_static(&self) -> Option<f64> {
        (self.fail_static_share > 0.0).then_some(self.fail_static_share)
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates a config file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let cfg: Config = toml::from_str(text).map_err(|e| toml_error(text, origin, &e))?;
        cfg.validate()
            .with_context(|| format!("invalid config {origin}"))?;
        Ok(cfg)
    }

    /// Checks everything that parsing alone does not.
    pub fn validate(&self) -> Result<()> {
        let d = &self.daemon;
        if d.instance.is_empty()
            || !d
                .instance
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!(
                "daemon.instance {:?}: use letters, digits, '-' and '_'",
                d.instance
            );
        }
        if d.miss_limit == 0 {
            bail!("daemon.miss_limit must be at least 1");
        }
        if d.heartbeat_interval.is_zero() {
            bail!("daemon.heartbeat_interval must be > 0");
        }
        if let Some(m) = d.heartbeat_interval_max
            && m < d.heartbeat_interval
        {
            bail!(
                "daemon.heartbeat_interval_max ({m:?}) is below daemon.heartbeat_interval ({:?})",
                d.heartbeat_interval
            );
        }
        if !(0.0..=1.0).contains(&d.fail_static_share) {
            bail!(
                "daemon.fail_static_share {} must be within 0..=1 (0 turns fail-static off)",
                d.fail_static_share
            );
        }
        parse_xdp_mode(&d.xdp_mode)?;
        if self.ipip.mtu != 0 && self.ipip.mtu < 1280 {
            bail!("ipip.mtu {} is below 1280 (0 disables)", self.ipip.mtu);
        }
        parse_v4_net(&self.ipip.source_v4).context("ipip.source_v4")?;
        let gw_mac = match &self.ipip.gateway_mac {
            Some(m) => Some(parse_mac(m).context("ipip.gateway_mac")?),
            None => None,
        };
        if d.flow_idle_timeout.is_zero() {
            bail!(
                "daemon.flow_idle_timeout must be > 0 (tracked flows would expire at once, so \
                 every route move would break them)"
            );
        }
        let mut seen = BTreeSet::new();
        for (i, v) in self.vips.iter().enumerate() {
            let p = parse_proto(&v.proto).with_context(|| format!("vip[{i}].proto"))?;
            if v.routes == 0 || v.routes > lb_common::MAX_ROUTES_PER_VIP {
                bail!(
                    "vip[{i}].routes {} out of 1..={}",
                    v.routes,
                    lb_common::MAX_ROUTES_PER_VIP
                );
            }
            if !seen.insert((v.addr, v.port, p)) {
                bail!("vip[{i}] {}:{}/{} is listed twice", v.addr, v.port, v.proto);
            }
            if v.mode == ForwardMode::Ipip && self.ipip.gateway_mac.is_none() {
                bail!("vip[{i}] uses ipip but ipip.gateway_mac is not set");
            }
            if v.addr == d.heartbeat_listen.ip() {
                bail!(
                    "vip[{i}] {} is daemon.heartbeat_listen's address: the data plane would \
                     take the heartbeats; listen on another address",
                    v.addr
                );
            }
        }
        if self.vips.len() > lb_common::MAX_VIPS as usize {
            bail!(
                "{} VIPs configured; at most {}",
                self.vips.len(),
                lb_common::MAX_VIPS
            );
        }
        let mut ids = BTreeSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if n.id >= lb_common::NODE_NONE {
                bail!("node[{i}].id {} >= {}", n.id, lb_common::NODE_NONE);
            }
            if !ids.insert(n.id) {
                bail!("node id {} is listed twice", n.id);
            }
            if n.weight == 0 || n.weight > MAX_WEIGHT {
                bail!("node[{i}].weight {} out of 1..={MAX_WEIGHT}", n.weight);
            }
            if let Some(w) = n.admin_weight
                && (w == 0 || w > MAX_WEIGHT)
            {
                bail!("node[{i}].admin_weight {w} out of 1..={MAX_WEIGHT}");
            }
            if let Some(w) = n.advertised_weight_max
                && (w == 0 || w > MAX_WEIGHT)
            {
                bail!("node[{i}].advertised_weight_max {w} out of 1..={MAX_WEIGHT}");
            }
            if let Some(m) = &n.mac {
                let mac = parse_mac(m).with_context(|| format!("node[{i}].mac"))?;
                check_node_mac(mac, gw_mac, None).with_context(|| format!("node[{i}].mac"))?;
            }
            match n.check.as_str() {
                "heartbeat" => {}
                "tcp" if n.check_addr.is_some() => {}
                "tcp" => bail!("node[{i}] has check = \"tcp\" but no check_addr"),
                other => bail!("node[{i}].check {other:?}: use \"heartbeat\" or \"tcp\""),
            }
            if n.check_rise == Some(0) || n.check_fall == Some(0) {
                bail!("node[{i}]: check_rise and check_fall must be at least 1");
            }
            if n.check_interval.is_some_and(|d| d.is_zero())
                || n.check_timeout.is_some_and(|d| d.is_zero())
            {
                bail!("node[{i}]: check_interval and check_timeout must be > 0");
            }
            if n.miss_limit == Some(0) {
                bail!("node[{i}].miss_limit must be at least 1");
            }
            let needs_mac = self.vips.iter().any(|v| v.mode == ForwardMode::DsrL2);
            if needs_mac && n.mac.is_none() {
                bail!("node[{i}] has no mac, which dsr-l2 VIPs need");
            }
            if self
                .vips
                .iter()
                .any(|v| v.mode == ForwardMode::Ipip && v.addr.is_ipv4())
                && n.ipv4.is_none()
            {
                bail!("node[{i}] has no ipv4, which IPv4 ipip VIPs need");
            }
            if self
                .vips
                .iter()
                .any(|v| v.mode == ForwardMode::Ipip && v.addr.is_ipv6())
                && n.ipv6.is_none()
            {
                bail!("node[{i}] has no ipv6, which IPv6 ipip VIPs need");
            }
        }
        if let Some(r) = d.reserve_node
            && !ids.contains(&r)
        {
            bail!("daemon.reserve_node {r} is not a configured node");
        }
        if let Some(c) = &self.cluster {
            c.validate()?;
        }
        if let Some(b) = &self.bgp {
            b.validate()?;
        }
        Ok(())
    }

    /// What [`Config::validate`] cannot know: no node may have the MAC of the interface the
    /// balancer runs on (`own`), or its dsr-l2 frames would come straight back to it.
    pub fn check_own_mac(&self, own: [u8; 6]) -> Result<()> {
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(m) = &n.mac {
                check_node_mac(parse_mac(m)?, None, Some(own))
                    .with_context(|| format!("node[{i}].mac"))?;
            }
        }
        Ok(())
    }
}

/// A node MAC must be a unicast address that is neither the ipip gateway's (`gw`) nor the
/// balancer's own (`own`): frames sent to it must reach the node and only the node.
pub fn check_node_mac(mac: [u8; 6], gw: Option<[u8; 6]>, own: Option<[u8; 6]>) -> Result<()> {
    let s = mac_string(&mac);
    if mac == [0xff; 6] {
        bail!("{s} is the broadcast address: give the node's own MAC");
    }
    if mac[0] & 1 != 0 {
        bail!("{s} is a multicast address: give the node's own (unicast) MAC");
    }
    if mac == [0; 6] {
        bail!("{s} is all zeros: give the node's own MAC");
    }
    if Some(mac) == gw {
        bail!("{s} is ipip.gateway_mac (the router's): give the node's own MAC");
    }
    if Some(mac) == own {
        bail!("{s} is the balancer's own interface MAC: give the node's own MAC");
    }
    Ok(())
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A TOML error as one line saying where and what (`parsing config F: line 3, column 9:
/// invalid basic string`), then toml's excerpt of the spot.
fn toml_error(text: &str, origin: &str, e: &toml::de::Error) -> anyhow::Error {
    let at = e.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("line {line}, column {column}: ")
    });
    let excerpt: String = e
        .to_string()
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty() && l.trim() != e.message().trim())
        .map(|l| format!("\n{l}"))
        .collect();
    anyhow::anyhow!(
        "parsing config {origin}: {}{}{excerpt}",
        at.unwrap_or_default(),
        e.message().trim()
    )
}

/// `tcp` / `udp` -> protocol number.
pub fn parse_proto(s: &str) -> Result<u8> {
    match s {
        "tcp" => Ok(lb_common::PROTO_TCP),
        "udp" => Ok(lb_common::PROTO_UDP),
        other => bail!("protocol {other:?}: use \"tcp\" or \"udp\""),
    }
}

/// `aa:bb:cc:dd:ee:ff` -> bytes.
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("MAC {s:?}: expected six hex bytes separated by ':'");
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).with_context(|| format!("MAC {s:?}: bad byte {p:?}"))?;
    }
    Ok(mac)
}

/// `a.b.c.d/len` -> (base, host mask), both wire order.
pub fn parse_v4_net(s: &str) -> Result<([u8; 4], [u8; 4])> {
    let (addr, len) = s
        .split_once('/')
        .with_context(|| format!("{s:?}: expected a.b.c.d/len"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .with_context(|| format!("{s:?}: bad address"))?;
    let len: u32 = len
        .parse()
        .with_context(|| format!("{s:?}: bad prefix length"))?;
    if !(8..=32).contains(&len) {
        bail!("{s:?}: prefix length must be 8..=32");
    }
    let host = if len == 32 { 0 } else { u32::MAX >> len };
    let base = u32::from(addr) & !host;
    Ok((base.to_be_bytes(), host.to_be_bytes()))
}

/// An IP network: an address with its prefix length (host bits zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// `a.b.c.d/len` or `x:y::/len` (a bare address is one host); host bits are cleared.
pub fn parse_prefix(s: &str) -> Result<Prefix> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr = addr
        .parse()
        .with_context(|| format!("{s:?}: expected an address/prefix length, e.g. 172.16.0.0/16"))?;
    let bits: u8 = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= bits)
            .with_context(|| format!("{s:?}: prefix length must be 0..={bits}"))?,
        None => bits,
    };
    let addr = match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    };
    Ok(Prefix { addr, len })
}

/// XDP attach mode setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpModeSetting {
    Auto,
    Native,
    Generic,
}

pub fn parse_xdp_mode(s: &str) -> Result<XdpModeSetting> {
    match s {
        "auto" => Ok(XdpModeSetting::Auto),
        "native" | "driver" => Ok(XdpModeSetting::Native),
        "generic" | "skb" => Ok(XdpModeSetting::Generic),
        other => bail!("xdp_mode {other:?}: use auto, native or generic"),
    }
}

/// Durations written as `100ms`, `2s`, `1m`, or a bare number of milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "ms"), |i| (&s[..i], &s[i..]));
    let v: f64 = num
        .parse()
        .with_context(|| format!("duration {s:?}: expected e.g. 100ms, 2s"))?;
    let secs = match unit.trim() {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        "us" => v / 1e6,
        other => bail!("duration {s:?}: unknown unit {other:?} (ms, s, m)"),
    };
    if !secs.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&secs) {
        bail!("duration {s:?} out of range");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// serde adapter for optional durations as strings.
mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::humantime_serde_compat::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let Some(s) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        super::parse_duration(&s)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("{e:#}")))
    }
}

/// serde adapter for durations as strings ("100ms").
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// In the largest whole unit: `5m`, `2s`, `100ms`, else `250us` (what `parse_duration` reads).
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        if d.subsec_nanos() == 0 && d.as_secs().is_multiple_of(60) && d.as_secs() > 0 {
            s.serialize_str(&format!("{}m", d.as_secs() / 60))
        } else if d.subsec_nanos() == 0 {
            s.serialize_str(&format!("{}s", d.as_secs()))
        } else if d.subsec_nanos().is_multiple_of(1_000_000) {
            s.serialize_str(&format!("{}ms", d.as_millis()))
        } else {
            s.serialize_str(&format!("{}us", d.as_micros()))
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("{e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config> {
        let c: Config = toml::from_str(s)?;
        c.validate()?;
        Ok(c)
    }

    const GOOD: &str = r#"
[daemon]
instance = "t1"
heartbeat_interval = "100ms"
[ipip]
gateway_mac = "02:00:00:00:00:01"
[[vip]]
addr = "198.18.0.100"
port = 80
proto = "tcp"
routes = 64
[[vip]]
addr = "2001:db8::100"
port = 53
proto = "udp"
mode = "ipip"
hash = "source-ip"
[[node]]
id = 1
mac = "02:00:00:00:01:01"
ipv4 = "198.18.1.1"
ipv6 = "2001:db8::1:1"
"#;

    #[test]
    fn good_config_parses() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.vips.len(), 2);
        assert_eq!(c.vips[1].mode, ForwardMode::Ipip);
        assert_eq!(c.vips[1].hash, HashMode::SourceIp);
        assert_eq!(c.vips[1].routes, lb_common::DEFAULT_ROUTES_PER_VIP);
        assert_eq!(c.daemon.heartbeat_interval, Duration::from_millis(100));
        assert_eq!(c.daemon.clock_skew_max, Duration::from_secs(300));
        // An agent may advertise 4 x the configured weight, at most 1000, unless configured.
        assert_eq!(c.nodes[0].max_advertised_weight(), 4);
        let mut n = c.nodes[0].clone();
        n.weight = 400;
        assert_eq!(n.max_advertised_weight(), 1000);
        n.advertised_weight_max = Some(2);
        assert_eq!(n.max_advertised_weight(), 2);
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let cases = [
            (GOOD.replace("proto = \"tcp\"", "proto = \"sctp\""), "sctp"),
            (GOOD.replace("routes = 64", "routes = 0"), "routes"),
            (GOOD.replace("02:00:00:00:01:01", "02:00:00:01:01"), "MAC"),
            (
                GOOD.replace("instance = \"t1\"", "instance = \"a/b\""),
                "instance",
            ),
            (GOOD.replace("\"100ms\"", "\"100 parsecs\""), "duration"),
            (GOOD.replace("id = 1", "id = 99999"), "id"),
            (GOOD.replace("[[node]]", "[[node]]\nbogus = 1"), "bogus"),
            (
                GOOD.replace("[[node]]", "[[node]]\ncheck_rise = 0"),
                "check_rise",
            ),
            (
                GOOD.replace("[[node]]", "[[node]]\nadvertised_weight_max = 1001"),
                "advertised_weight_max",
            ),
            (
                GOOD.replace("[[node]]", "[[node]]\ncheck_interval = \"0s\""),
                "check_interval",
            ),
            (
                GOOD.replace("[[node]]", "[[node]]\ncheck = \"tcp\""),
                "check_addr",
            ),
            (
                GOOD.replace("gateway_mac = \"02:00:00:00:00:01\"", ""),
                "gateway_mac",
            ),
            (
                format!(
                    "{GOOD}\n[[node]]\nid = 1\nmac = \"02:00:00:00:01:02\"\nipv4 = \"198.18.1.2\"\nipv6 = \"2001:db8::2\""
                ),
                "twice",
            ),
            (
                GOOD.replace("02:00:00:00:01:01", "ff:ff:ff:ff:ff:ff"),
                "node[0].mac: ff:ff:ff:ff:ff:ff is the broadcast address",
            ),
            (
                GOOD.replace("02:00:00:00:01:01", "01:00:5e:00:00:01"),
                "node[0].mac: 01:00:5e:00:00:01 is a multicast address",
            ),
            (
                GOOD.replace("02:00:00:00:01:01", "00:00:00:00:00:00"),
                "all zeros",
            ),
            (
                GOOD.replace("02:00:00:00:01:01", "02:00:00:00:00:01"),
                "node[0].mac: 02:00:00:00:00:01 is ipip.gateway_mac",
            ),
            (
                GOOD.replace(
                    "heartbeat_interval = \"100ms\"",
                    "heartbeat_interval = \"100ms\"\nflow_idle_timeout = \"0s\"",
                ),
                "daemon.flow_idle_timeout must be > 0",
            ),
            (
                GOOD.replace(
                    "heartbeat_interval = \"100ms\"",
                    "heartbeat_interval = \"100ms\"\nheartbeat_listen = \"198.18.0.100:7711\"",
                ),
                "vip[0] 198.18.0.100 is daemon.heartbeat_listen's address",
            ),
            (
                GOOD.replace(
                    "heartbeat_interval = \"100ms\"",
                    "heartbeat_interval = \"100ms\"\nheartbeat_listen = \"[2001:db8::100]:7711\"",
                ),
                "vip[1] 2001:db8::100 is daemon.heartbeat_listen's address",
            ),
        ];
        for (text, needle) in cases {
            let err = format!("{:#}", parse(&text).unwrap_err());
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
        }
    }

    #[test]
    fn heartbeat_address_beside_a_vip_is_fine() {
        let text = GOOD.replace(
            "heartbeat_interval = \"100ms\"",
            "heartbeat_interval = \"100ms\"\nheartbeat_listen = \"198.18.0.101:7711\"",
        );
        parse(&text).unwrap();
    }

    #[test]
    fn a_node_with_the_balancers_own_mac_is_refused() {
        let c = parse(GOOD).unwrap();
        c.check_own_mac([2, 0, 0, 0, 9, 9]).unwrap();
        let e = format!("{:#}", c.check_own_mac([2, 0, 0, 0, 1, 1]).unwrap_err());
        assert_eq!(
            e,
            "node[0].mac: 02:00:00:00:01:01 is the balancer's own interface MAC: give the node's own MAC"
        );
    }

    #[test]
    fn prefixes() {
        let p = parse_prefix("172.16.9.9/16").unwrap();
        assert_eq!(p.to_string(), "172.16.0.0/16");
        assert_eq!(
            parse_prefix("fd00::1:2/96").unwrap().to_string(),
            "fd00::/96"
        );
        assert_eq!(parse_prefix("10.0.0.1").unwrap().len, 32);
        assert_eq!(parse_prefix("0.0.0.0/0").unwrap().len, 0);
        for bad in ["172.16.0.0/33", "fd00::/129", "x/8", "10.0.0.0/"] {
            assert!(parse_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn helpers() {
        assert_eq!(
            parse_v4_net("172.16.0.0/16").unwrap(),
            ([172, 16, 0, 0], [0, 0, 255, 255])
        );
        assert!(parse_v4_net("172.16.0.0").is_err());
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("250").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("-1s").is_err());
        assert_eq!(
            parse_mac("0a:0b:0c:0d:0e:0f").unwrap(),
            [10, 11, 12, 13, 14, 15]
        );
    }

    const CLUSTER: &str = r#"
[cluster]
endpoints = ["http://127.0.0.1:2379", "http://[::1]:2379"]
name = "edge-1"
id = "a"
"#;

    #[test]
    fn bgp_section_parses_and_is_optional() {
        assert_eq!(parse(GOOD).unwrap().bgp, None, "absent = nothing announced");
        // An empty section takes Debian's paths.
        let b = parse(&format!("{GOOD}\n[bgp]\n")).unwrap().bgp.unwrap();
        assert_eq!(b, BgpConfig::default());
        let text = format!(
            "{GOOD}\n[bgp]\nbirdc = \"/usr/sbin/birdc\"\nsocket = \"/run/b/bird.ctl\"\n\
             routes_file = \"/etc/bird/vips.conf\"\n"
        );
        let cfg = parse(&text).unwrap();
        let b = cfg.bgp.clone().unwrap();
        assert_eq!(b.birdc, PathBuf::from("/usr/sbin/birdc"));
        assert_eq!(b.socket, PathBuf::from("/run/b/bird.ctl"));
        assert_eq!(b.routes_file, PathBuf::from("/etc/bird/vips.conf"));
        // It survives running.json (serialize, parse back).
        let back = Config::parse(&toml::to_string(&cfg).unwrap(), "back").unwrap();
        assert_eq!(back.bgp, cfg.bgp);
    }

    #[test]
    fn bad_bgp_sections_say_what_is_wrong() {
        let long = format!("socket = \"/{}\"", "s".repeat(MAX_SOCKET_PATH));
        let cases = [
            ("birdc = \"\"", "bgp.birdc is empty"),
            (
                "birdc = \"bin/birdc\"",
                "bgp.birdc \"bin/birdc\": use a plain name",
            ),
            (
                "birdc = \"/usr/sbin/\"",
                "bgp.birdc \"/usr/sbin/\" names a directory",
            ),
            (
                "birdc = \"bird\\nc\"",
                "bgp.birdc \"bird\\nc\" contains a control character",
            ),
            (
                "socket = \"bird.ctl\"",
                "bgp.socket \"bird.ctl\": give bird's control socket",
            ),
            ("socket = \"/run/bird/\"", "bgp.socket \"/run/bird/\": give"),
            ("socket = \"\"", "bgp.socket \"\": give"),
            (
                long.as_str(),
                "bytes long: a Unix socket path has at most 107",
            ),
            (
                "routes_file = \"vips.conf\"",
                "bgp.routes_file \"vips.conf\": give",
            ),
            (
                "routes_file = \"/etc/bird/\"",
                "bgp.routes_file \"/etc/bird/\": give",
            ),
            (
                "routes_file = \"/etc/a\\\"b\"",
                "bgp.routes_file \"/etc/a\\\"b\" contains '\"'",
            ),
            (
                "routes_file = \"/run/bird/bird.ctl\"",
                "bgp.routes_file \"/run/bird/bird.ctl\" is bgp.socket",
            ),
            ("bogus = 1", "bogus"),
        ];
        for (line, want) in cases {
            let text = format!("{GOOD}\n[bgp]\n{line}\n");
            let err = format!("{:#}", Config::parse(&text, "t").unwrap_err());
            assert!(err.contains(want), "want {want:?} in: {err}");
            if !err.starts_with("parsing config") {
                assert!(!err.contains('\n'), "one line: {err}");
            }
        }
    }

    #[test]
    fn cluster_section_parses_and_is_optional() {
        assert_eq!(parse(GOOD).unwrap().cluster, None, "absent = single box");
        let c = parse(&format!("{GOOD}{CLUSTER}")).unwrap().cluster.unwrap();
        assert_eq!(c.endpoints.len(), 2);
        assert_eq!((c.name.as_str(), c.id.as_str()), ("edge-1", "a"));
        assert_eq!(c.lease_ttl, DEFAULT_LEASE_TTL);
        // A numeric id is kept as text; lease_ttl is a duration.
        let text = format!("{GOOD}{CLUSTER}").replace("id = \"a\"", "id = 7\nlease_ttl = \"5s\"");
        let c = parse(&text).unwrap().cluster.unwrap();
        assert_eq!((c.id.as_str(), c.lease_ttl), ("7", Duration::from_secs(5)));
        // It survives running.json (serialize, parse back).
        let cfg = parse(&text).unwrap();
        let back = Config::parse(&toml::to_string(&cfg).unwrap(), "back").unwrap();
        assert_eq!(back.cluster, cfg.cluster);
    }

    #[test]
    fn bad_cluster_sections_say_what_is_wrong() {
        let with = |from: &str, to: &str| {
            let text = format!("{GOOD}{CLUSTER}");
            assert!(text.contains(from), "{from}");
            text.replace(from, to)
        };
        let eps = "endpoints = [\"http://127.0.0.1:2379\", \"http://[::1]:2379\"]";
        let cases = [
            (with(eps, "endpoints = []"), "cluster.endpoints is empty"),
            (
                with(eps, "endpoints = [\"127.0.0.1:2379\"]"),
                "cluster.endpoints[0]",
            ),
            (
                with(eps, "endpoints = [\"http://h:2379\", \"http://h:2379\"]"),
                "twice",
            ),
            (with(eps, "endpoints = [\"https://h:2379\"]"), "TLS"),
            (with(eps, "endpoints = [\"http://h\"]"), "no port"),
            (with(eps, "endpoints = [\"http://h:0\"]"), "port 0 out of"),
            (with(eps, "endpoints = [\"http://h:2379/v3\"]"), "path"),
            (with(eps, "endpoints = [\"http://u@h:2379\"]"), "user info"),
            (
                with(eps, "endpoints = [\"http://h:99999\"]"),
                "port 99999 out of",
            ),
            (with(eps, "endpoints = [\"http://h :1\"]"), "not a URL"),
            (with("name = \"edge-1\"", "name = \"\""), "cluster.name"),
            (with("name = \"edge-1\"", "name = \"a/b\""), "'/'"),
            (with("name = \"edge-1\"", "name = \"a b\""), "cluster.name"),
            (with("id = \"a\"", "id = \"\""), "cluster.id"),
            (with("id = \"a\"", "id = \"x/y\""), "cluster.id"),
            (
                with("id = \"a\"", "id = \"a\"\nlease_ttl = \"0s\""),
                "lease_ttl",
            ),
            (
                with("id = \"a\"", "id = \"a\"\nlease_ttl = \"1500ms\""),
                "whole seconds",
            ),
            (
                with("id = \"a\"", "id = \"a\"\nlease_ttl = \"1h\""),
                "lease_ttl",
            ),
            (
                with("id = \"a\"", "id = \"a\"\nlease_ttl = \"61s\""),
                "lease_ttl",
            ),
            (with("id = \"a\"", "id = \"a\"\nbogus = 1"), "bogus"),
            (with("name = \"edge-1\"\n", ""), "name"),
        ];
        for (text, want) in cases {
            let err = format!("{:#}", Config::parse(&text, "t").unwrap_err());
            assert!(err.contains(want), "want {want:?} in: {err}");
            // One line each (toml's own errors add an excerpt below their first line).
            if !err.starts_with("parsing config") {
                assert!(!err.contains('\n'), "one line: {err}");
            }
        }
    }
}
