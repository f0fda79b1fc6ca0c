//! `lb run`: the balancer daemon.
//!
//! Start-up: config, then persisted state, then the data plane (re-adopting pinned maps), then
//! route tables pushed, then the XDP program attached — or, if a pinned link from an earlier
//! run exists, swapped into that link atomically, so traffic never sees a gap. Then the loop:
//! heartbeats and health checks in, membership events out, each event turned into the minimum
//! route moves, pushed to the kernel atomically, persisted, and announced to the old owners.
//! SIGTERM leaves the program attached and forwarding (pinned); `--detach-on-exit` removes it.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{
    XdpMode,
    links::{FdLink, PinnedLink},
};
use lb_common::{
    GlobalConfig, NODE_ACTIVE, NODE_DOWN, NODE_DRAINING, NODE_NONE, NodeEntry, ROUTE_F_MOVED,
    RouteEntry, VipKey,
};
use log::{info, warn};

use crate::{
    config::{self, Config, NodeConfig, XdpModeSetting},
    dataplane::{self, Dataplane, DataplaneOptions, VipSpec},
    health,
    heartbeat::{self, Key, MoveReason, Receiver},
    membership::{self, Event, Membership},
    routes::{Move, NodeInfo, NodeState, RouteTable},
    signals,
    state::{NodeRecord, NodeStatus, State},
};

/// How often conntrack is scanned (only while some route is flagged "moved").
const MAINTENANCE_PERIOD: Duration = Duration::from_secs(2);

/// Arguments of `lb run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Network interface to attach the balancer to.
    #[arg(long)]
    pub iface: String,
    /// Configuration file (TOML).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where the state file lives (default /var/lib/lb/<instance>).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Start with empty state even if a state file exists (it is overwritten).
    #[arg(long)]
    pub reset_state: bool,
    /// Detach the program and remove the pinned maps on exit (default: keep forwarding).
    #[arg(long)]
    pub detach_on_exit: bool,
    /// bpffs directory under which `<instance>/` is created.
    #[arg(long, default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
}

/// One VIP: its data-plane identity and route table, and which routes are flagged "moved".
struct VipState {
    spec: VipSpec,
    table: RouteTable,
    /// Routes whose flows may still live on a previous owner: the kernel consults conntrack.
    moved: BTreeSet<u32>,
}

/// The running daemon.
pub struct Daemon {
    cfg: Config,
    dp: Dataplane,
    vips: Vec<VipState>,
    nodes: BTreeMap<u32, NodeConfig>,
    /// Last incarnation/sequence accepted per node (persisted for replay protection).
    seen: BTreeMap<u32, (u64, u64)>,
    membership: Membership,
    receiver: Option<Receiver>,
    /// Where each node's agent sends from (route-moved notices go there).
    agents: BTreeMap<u32, SocketAddr>,
    health_rx: mpsc::Receiver<(u32, Event)>,
    _health: Vec<health::HealthChecker>,
    state_dir: PathBuf,
    pin_dir: PathBuf,
    link: Option<PinnedLink>,
    args: RunArgs,
    last_maintenance: Instant,
}

/// A node's weight and state. Every VIP's table holds the same node set and states (each
/// event is applied to all of them), so the first table answers for all.
fn node_info(vips: &[VipState], id: u32) -> Option<NodeInfo> {
    vips.first().and_then(|v| v.table.node(id))
}

/// Whether a node (by table state) is live: tracked flows on it are kept.
fn live(table: &RouteTable, node: u32) -> bool {
    matches!(
        table.node(node).map(|n| n.state),
        Some(NodeState::Active | NodeState::Draining)
    )
}

impl Daemon {
    /// Everything up to and including attaching; does not run the loop.
    pub fn start(args: RunArgs) -> Result<Self> {
        // Fail before touching anything if the interface does not exist.
        let c_iface = std::ffi::CString::new(args.iface.as_str())
            .with_context(|| format!("interface name {:?}", args.iface))?;
        // SAFETY: a valid NUL-terminated string.
        if unsafe { libc::if_nametoindex(c_iface.as_ptr()) } == 0 {
            bail!(
                "interface {:?} does not exist (ip link shows the names)",
                args.iface
            );
        }
        let cfg = match &args.config {
            Some(p) => Config::load(p)?,
            None => {
                warn!("no --config given: starting with no VIPs and no nodes");
                Config::default()
            }
        };
        let instance = cfg.daemon.instance.clone();
        let state_dir = args
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/lb").join(&instance));
        ensure_bpffs(&args.bpffs)?;
        let pin_dir = args.bpffs.join(&instance);

        let state = if args.reset_state {
            info!("--reset-state: starting with empty state");
            State::new()
        } else {
            State::load(&state_dir)?.unwrap_or_else(State::new)
        };

        let mut dp = Dataplane::load(&DataplaneOptions {
            route_slots: cfg.daemon.route_slots,
            conntrack_size: cfg.daemon.conntrack_size,
            pin_dir: Some(pin_dir.clone()),
        })
        .with_context(|| {
            format!(
                "loading the data plane (maps pinned in {})",
                pin_dir.display()
            )
        })?;
        dp.set_config(&global_config(&cfg)?)?;

        let nodes: BTreeMap<u32, NodeConfig> =
            cfg.nodes.iter().map(|n| (n.id, n.clone())).collect();
        let vips = build_tables(&cfg, &state)?;
        let seen: BTreeMap<u32, (u64, u64)> = state
            .nodes
            .iter()
            .filter_map(|(id, r)| Some((*id, (r.incarnation?, r.sequence.unwrap_or(0)))))
            .collect();

        let key = match &cfg.daemon.key_file {
            Some(p) => {
                Some(Key::from_file(p).with_context(|| format!("key file {}", p.display()))?)
            }
            None => None,
        };
        let needs_heartbeats = cfg.nodes.iter().any(|n| n.check == "heartbeat");
        let receiver = match (key, needs_heartbeats) {
            (Some(key), _) => {
                let r = Receiver::bind(cfg.daemon.heartbeat_listen, key).with_context(|| {
                    format!(
                        "binding the heartbeat socket {}",
                        cfg.daemon.heartbeat_listen
                    )
                })?;
                if let Some(g) = cfg.daemon.heartbeat_group {
                    r.join_multicast(g, None, 0)
                        .with_context(|| format!("joining multicast group {g}"))?;
                }
                Some(r)
            }
            (None, true) => bail!(
                "nodes use heartbeats but daemon.key_file is not set (the key authenticates them)"
            ),
            (None, false) => None,
        };

        let mut membership = Membership::new(membership::NodeCfg {
            miss_limit: cfg.daemon.miss_limit,
            hold_down: cfg.daemon.hold_down,
            ..Default::default()
        });
        let now = Instant::now();
        let (health_tx, health_rx) = mpsc::channel();
        let mut checkers = Vec::new();
        for n in cfg.nodes.iter() {
            if n.check == "heartbeat" {
                let node_cfg = membership::NodeCfg {
                    miss_limit: n.miss_limit.unwrap_or(cfg.daemon.miss_limit),
                    hold_down: cfg.daemon.hold_down,
                    interval: None,
                    ..Default::default()
                };
                membership.add_node(n.id, node_cfg);
                // A node that was up before a restart stays up, with a fresh deadline: it goes
                // down only if its agent stays silent for k intervals from now.
                let table_state = node_info(&vips, n.id);
                if let Some(info) = table_state
                    && info.state != NodeState::Down
                {
                    let grace = cfg.daemon.heartbeat_interval * node_cfg.miss_limit;
                    membership.assume_up(
                        n.id,
                        now,
                        grace,
                        info.state == NodeState::Draining,
                        info.weight,
                    );
                }
                // Heartbeats captured before the restart stay replays.
                if let Some((inc, seq)) = seen.get(&n.id) {
                    membership.restore_seen(n.id, *inc, *seq);
                }
            } else if let Some(addr) = n.check_addr {
                let d = health::HealthCfg::default();
                let hc = health::HealthCfg {
                    http_path: n.check_http_path.clone(),
                    interval: n.check_interval.unwrap_or(d.interval),
                    timeout: n.check_timeout.unwrap_or(d.timeout),
                    rise: n.check_rise.unwrap_or(d.rise),
                    fall: n.check_fall.unwrap_or(d.fall),
                    ..d
                };
                checkers.push(
                    health::HealthChecker::spawn(n.id, addr, hc, health_tx.clone())
                        .with_context(|| format!("starting the health check of node {}", n.id))?,
                );
            }
        }

        let mut d = Self {
            cfg,
            dp,
            vips,
            nodes,
            seen,
            membership,
            receiver,
            agents: BTreeMap::new(),
            health_rx,
            _health: checkers,
            state_dir,
            pin_dir,
            link: None,
            args,
            last_maintenance: Instant::now(),
        };
        d.push_everything()?;
        d.attach()?;
        d.save()?;
        Ok(d)
    }

    /// Writes nodes, then every VIP's table; removes pinned VIPs no longer configured.
    fn push_everything(&mut self) -> Result<()> {
        self.dp.set_node(NODE_NONE, &NodeEntry::default())?;
        let ids: Vec<u32> = self.nodes.keys().copied().collect();
        for id in ids {
            self.write_node(id)?;
        }
        let wanted: BTreeSet<VipKey> = self.vips.iter().map(|v| v.spec.key).collect();
        for key in self.dp.vip_keys() {
            if !wanted.contains(&key) {
                info!(
                    "removing VIP {} (no longer configured)",
                    dataplane::vip_display(&key)
                );
                self.dp.remove_vip(&key)?;
            }
        }
        for i in 0..self.vips.len() {
            self.push_vip(i)?;
        }
        Ok(())
    }

    /// The node's NODES entry from config and its state in the tables.
    fn write_node(&mut self, id: u32) -> Result<()> {
        let n = self.nodes.get(&id).context("unknown node")?;
        let state = node_info(&self.vips, id).map_or(NODE_DOWN, |i| match i.state {
            NodeState::Active => NODE_ACTIVE,
            NodeState::Draining => NODE_DRAINING,
            NodeState::Down => NODE_DOWN,
        });
        let entry = NodeEntry {
            addr6: n.ipv6.map(|a| a.octets()).unwrap_or_default(),
            addr4: n.ipv4.map(|a| a.octets()).unwrap_or_default(),
            mac: match &n.mac {
                Some(m) => config::parse_mac(m)?,
                None => [0; 6],
            },
            state,
            _pad: 0,
        };
        self.dp.set_node(id, &entry)?;
        Ok(())
    }

    fn push_vip(&mut self, i: usize) -> Result<()> {
        let v = &self.vips[i];
        let entries: Vec<RouteEntry> = v
            .table
            .owners()
            .enumerate()
            .map(|(r, o)| RouteEntry {
                node: o.unwrap_or(NODE_NONE),
                flags: if v.moved.contains(&(r as u32)) {
                    ROUTE_F_MOVED
                } else {
                    0
                },
            })
            .collect();
        self.dp.upsert_vip(&v.spec, &entries)?;
        Ok(())
    }

    /// Attaches, or swaps the new program into the link pinned by an earlier run (no gap).
    fn attach(&mut self) -> Result<()> {
        let iface = self.args.iface.clone();
        let link_path = self.pin_dir.join(format!("link-{iface}"));
        if link_path.exists() {
            let pinned = PinnedLink::from_pin(&link_path)
                .with_context(|| format!("opening pinned link {}", link_path.display()))?;
            let fd_link = FdLink::from(pinned);
            self.dp
                .replace_in_link(fd_link)
                .with_context(|| format!("replacing the program in {}", link_path.display()))?;
            // Re-open the pin so we can unpin it later (--detach-on-exit).
            self.link = Some(PinnedLink::from_pin(&link_path)?);
            info!("re-adopted the XDP link on {iface}: program replaced atomically");
            return Ok(());
        }
        let setting = config::parse_xdp_mode(&self.cfg.daemon.xdp_mode)?;
        let (link, mode_name) = match setting {
            XdpModeSetting::Native => (self.dp.attach(&iface, XdpMode::Driver)?, "native"),
            XdpModeSetting::Generic => (self.dp.attach(&iface, XdpMode::Skb)?, "generic"),
            XdpModeSetting::Auto => match self.dp.attach(&iface, XdpMode::Driver) {
                Ok(l) => (l, "native"),
                Err(e) => {
                    info!("native XDP unavailable on {iface} ({e}); using generic mode");
                    (self.dp.attach(&iface, XdpMode::Skb)?, "generic")
                }
            },
        };
        let pinned = link
            .pin(&link_path)
            .with_context(|| format!("pinning the XDP link at {}", link_path.display()))?;
        self.link = Some(pinned);
        info!("attached to {iface} in {mode_name} mode");
        println!("lb: attached to {iface} in {mode_name} XDP mode");
        Ok(())
    }

    /// Persists tables and node records.
    fn save(&self) -> Result<()> {
        let mut st = State::new();
        for id in self.nodes.keys() {
            let info = node_info(&self.vips, *id);
            let status = match info.map(|i| i.state) {
                Some(NodeState::Active) => NodeStatus::Active,
                Some(NodeState::Draining) => NodeStatus::Draining,
                _ => NodeStatus::Down,
            };
            let weight = info.map_or(self.nodes[id].weight, |i| i.weight);
            let (inc, seq) = self.seen.get(id).copied().unzip();
            st.nodes.insert(
                *id,
                NodeRecord {
                    weight,
                    status,
                    incarnation: inc,
                    sequence: seq,
                },
            );
        }
        for v in &self.vips {
            st.tables.push(crate::state::TableRecord {
                addr: dataplane::key_ip(&v.spec.key),
                port: u16::from_be(v.spec.key.port),
                proto: v.spec.key.proto,
                table: v.table.clone(),
                moved: v.moved.iter().copied().collect(),
            });
        }
        st.save(&self.state_dir)?;
        Ok(())
    }

    /// The main loop, until SIGTERM/SIGINT.
    pub fn run(mut self) -> Result<()> {
        signals::install();
        println!("lb: ready");
        while !signals::stop_requested() {
            let now = Instant::now();
            let wait = self
                .membership
                .next_deadline()
                .map_or(Duration::from_millis(100), |d| {
                    d.saturating_duration_since(now)
                })
                .min(Duration::from_millis(100));
            let mut events = Vec::new();
            if let Some(r) = self.receiver.as_mut() {
                if let Some((hb, from)) = r.recv(wait).context("receiving heartbeats")? {
                    match self.membership.on_heartbeat(Instant::now(), &hb) {
                        Ok(evs) => {
                            self.agents.insert(hb.node, from);
                            self.seen.insert(hb.node, (hb.incarnation, hb.sequence));
                            events.extend(evs);
                        }
                        Err(e) => log::debug!("heartbeat from {from} rejected: {e}"),
                    }
                }
            } else {
                std::thread::sleep(wait);
            }
            while let Ok((_, ev)) = self.health_rx.try_recv() {
                events.push(ev);
            }
            events.extend(self.membership.tick(Instant::now()));
            if !events.is_empty() {
                self.apply(&events)?;
            }
            if self.last_maintenance.elapsed() >= MAINTENANCE_PERIOD {
                self.last_maintenance = Instant::now();
                if let Err(e) = self.maintain() {
                    warn!("conntrack maintenance: {e:#}");
                }
            }
        }
        self.shutdown()
    }

    /// Applies membership events: route moves, kernel writes (in the order that never sends
    /// a packet to a node that cannot take it), state, notices.
    pub fn apply(&mut self, events: &[Event]) -> Result<()> {
        for ev in events {
            info!("membership: {ev:?}");
            let node = ev.node();
            let Some(cfg_weight) = self.nodes.get(&node).map(|n| n.weight) else {
                continue;
            };
            let mut notices: Vec<(usize, MoveReason, Vec<Move>)> = Vec::new();
            // A node coming up must be ACTIVE in NODES before any route points at it.
            if let Event::NodeUp {
                weight, draining, ..
            } = *ev
            {
                // The agent's advertised weight, or the configured one when it has no opinion.
                let w = if weight > 0 { weight } else { cfg_weight };
                self.set_table_state(
                    node,
                    |t, n| match t.node(n).map(|i| i.state) {
                        Some(NodeState::Active | NodeState::Draining) => Ok(Vec::new()),
                        _ => t.join(n, w),
                    },
                    &mut notices,
                    MoveReason::Join,
                )?;
                self.write_node(node)?;
                if draining {
                    self.set_table_state(node, |t, n| t.drain(n), &mut notices, MoveReason::Drain)?;
                }
                self.push_changed(&notices)?;
                self.write_node(node)?;
            } else {
                match *ev {
                    Event::NodeDown { .. } => {
                        self.set_table_state(
                            node,
                            |t, n| match t.node(n).map(|i| i.state) {
                                Some(NodeState::Active | NodeState::Draining) => t.fail(n),
                                _ => Ok(Vec::new()),
                            },
                            &mut notices,
                            MoveReason::Failure,
                        )?;
                    }
                    Event::NodeDraining { .. } => self.set_table_state(
                        node,
                        |t, n| match t.node(n).map(|i| i.state) {
                            Some(NodeState::Active) => t.drain(n),
                            _ => Ok(Vec::new()),
                        },
                        &mut notices,
                        MoveReason::Drain,
                    )?,
                    Event::NodeUndrained { .. } => self.set_table_state(
                        node,
                        |t, n| match t.node(n).map(|i| i.state) {
                            Some(NodeState::Draining) => t.activate(n),
                            _ => Ok(Vec::new()),
                        },
                        &mut notices,
                        MoveReason::Join,
                    )?,
                    Event::WeightChanged { new, .. } if new > 0 => self.set_table_state(
                        node,
                        |t, n| match t.node(n).map(|i| i.state) {
                            Some(NodeState::Active) => t.set_weight(n, new),
                            _ => Ok(Vec::new()),
                        },
                        &mut notices,
                        MoveReason::Weight,
                    )?,
                    _ => {}
                }
                // Routes first, then the node's state: tracked flows keep working until no
                // route sends new flows to it.
                self.push_changed(&notices)?;
                self.write_node(node)?;
            }
            self.send_notices(&notices);
        }
        self.save()
    }

    /// Runs `f` on every VIP's table, recording moves and flagging routes whose old owner is
    /// still live (its tracked flows must keep going there).
    fn set_table_state(
        &mut self,
        node: u32,
        f: impl Fn(&mut RouteTable, u32) -> std::result::Result<Vec<Move>, crate::routes::RouteError>,
        out: &mut Vec<(usize, MoveReason, Vec<Move>)>,
        reason: MoveReason,
    ) -> Result<()> {
        for (i, v) in self.vips.iter_mut().enumerate() {
            let moves = f(&mut v.table, node).with_context(|| {
                format!("route table of {}", dataplane::vip_display(&v.spec.key))
            })?;
            for m in &moves {
                if let Some(from) = m.from
                    && live(&v.table, from)
                {
                    v.moved.insert(m.route);
                }
            }
            if !moves.is_empty() {
                out.push((i, reason, moves));
            }
        }
        Ok(())
    }

    fn push_changed(&mut self, changed: &[(usize, MoveReason, Vec<Move>)]) -> Result<()> {
        let idx: BTreeSet<usize> = changed.iter().map(|(i, _, _)| *i).collect();
        for i in idx {
            self.push_vip(i)?;
        }
        Ok(())
    }

    /// HaloD's "route moved": tell each old owner's agent which of its routes moved.
    fn send_notices(&mut self, changed: &[(usize, MoveReason, Vec<Move>)]) {
        let Some(r) = self.receiver.as_mut() else {
            return;
        };
        for (i, reason, moves) in changed {
            let key = self.vips[*i].spec.key;
            let mut by_node: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
            for m in moves {
                if let Some(f) = m.from {
                    by_node.entry(f).or_default().push(m.route);
                }
            }
            for (node, routes) in by_node {
                let Some(to) = self.agents.get(&node) else {
                    continue;
                };
                let vip = heartbeat::Vip {
                    addr: dataplane::key_ip(&key),
                    port: u16::from_be(key.port),
                    proto: key.proto,
                };
                if let Err(e) = r.send_route_moved(*to, node, vip, *reason, &routes) {
                    warn!("route-moved notice to node {node} at {to}: {e}");
                }
            }
        }
    }

    /// Periodic conntrack work: expire idle flows, clear "moved" flags of routes whose previous
    /// owners have no tracked flows left, report drains that completed.
    fn maintain(&mut self) -> Result<()> {
        if self.vips.iter().all(|v| v.moved.is_empty()) {
            return Ok(());
        }
        let now = coarse_now();
        let idle =
            (self.cfg.daemon.flow_idle_timeout.as_nanos() >> lb_common::CT_TIME_SHIFT) as u32;
        let mut still_needed: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); self.vips.len()];
        let by_key: BTreeMap<VipKey, usize> = self
            .vips
            .iter()
            .enumerate()
            .map(|(i, v)| (v.spec.key, i))
            .collect();
        for (key, ct) in self.dp.conntrack()? {
            let expired = now.wrapping_sub(ct.last_seen) > idle
                || (ct.flags & (lb_common::CT_F_FIN | lb_common::CT_F_RST) != 0
                    && now.wrapping_sub(ct.last_seen) > 10);
            if expired {
                self.dp.conntrack_remove(&key)?;
                continue;
            }
            let vk = VipKey {
                addr: key.dst,
                port: key.dport,
                proto: key.proto,
                family: key.family,
            };
            let Some(&i) = by_key.get(&vk) else { continue };
            let v = &self.vips[i];
            let route = flow_route(v.spec.hash, v.table.route_count(), &key);
            if v.table.owner(route) != Some(ct.node) && live(&v.table, ct.node) {
                still_needed[i].insert(route);
            }
        }
        for (i, needed) in still_needed.iter().enumerate() {
            let before = self.vips[i].moved.len();
            self.vips[i].moved.retain(|r| needed.contains(r));
            if self.vips[i].moved.len() != before {
                self.push_vip(i)?;
            }
        }
        Ok(())
    }

    fn shutdown(mut self) -> Result<()> {
        self.save()?;
        if self.args.detach_on_exit {
            if let Some(link) = self.link.take() {
                let fd = link.unpin().context("unpinning the XDP link")?;
                drop(fd);
            }
            dataplane::remove_pins(&self.pin_dir)
                .with_context(|| format!("removing {}", self.pin_dir.display()))?;
            println!("lb: detached and removed pinned maps");
        } else {
            println!("lb: exiting; the program stays attached and forwarding (pinned)");
        }
        Ok(())
    }
}

/// Route ID of a tracked flow, as the kernel computes it.
pub fn flow_route(mode: dataplane::HashMode, n: u32, key: &lb_common::FlowKey) -> u32 {
    let h = lb_common::hash::flow_key_hash(key, mode == dataplane::HashMode::FiveTuple);
    lb_common::hash::route_index(h, n)
}

/// `CLOCK_MONOTONIC_COARSE` in `CtEntry::last_seen` units (what `bpf_ktime_get_coarse_ns` reads).
fn coarse_now() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    let ns = (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64;
    (ns >> lb_common::CT_TIME_SHIFT) as u32
}

fn global_config(cfg: &Config) -> Result<GlobalConfig> {
    let (src4, mask4) = config::parse_v4_net(&cfg.ipip.source_v4)?;
    Ok(GlobalConfig {
        gw_mac: match &cfg.ipip.gateway_mac {
            Some(m) => config::parse_mac(m)?,
            None => [0; 6],
        },
        mtu: cfg.ipip.mtu,
        ipip_src4: src4,
        ipip_src4_mask: mask4,
        ipip_src6: cfg.ipip.source_v6.octets(),
        ..Default::default()
    })
}

/// Route tables for the configured VIPs: the persisted table when it matches (same VIP, same
/// N), reconciled with the configured nodes; otherwise a fresh table with the nodes persisted
/// as live.
fn build_tables(cfg: &Config, state: &State) -> Result<Vec<VipState>> {
    let mut out = Vec::new();
    for (index, v) in cfg.vips.iter().enumerate() {
        let proto = config::parse_proto(&v.proto)?;
        let key = dataplane::vip_key(v.addr, v.port, proto);
        let spec = VipSpec {
            key,
            index: index as u32,
            mode: v.mode,
            hash: v.hash,
        };
        let persisted = state
            .tables
            .iter()
            .find(|t| t.addr == v.addr && t.port == v.port && t.proto == proto);
        let (mut table, moved) = match persisted {
            Some(t) if t.table.route_count() == v.routes => (
                t.table.clone(),
                t.moved.iter().copied().filter(|r| *r < v.routes).collect(),
            ),
            other => {
                if let Some(t) = other {
                    info!(
                        "VIP {}: route count changed ({} -> {}); starting a fresh table",
                        dataplane::vip_display(&key),
                        t.table.route_count(),
                        v.routes
                    );
                }
                // A fresh table with the nodes that were live (in another VIP's table).
                let mut table = RouteTable::new(v.routes)?;
                for n in &cfg.nodes {
                    let rec = state.nodes.get(&n.id);
                    if let Some(r) = rec
                        && r.status != NodeStatus::Down
                    {
                        table.join(n.id, r.weight)?;
                        if r.status == NodeStatus::Draining {
                            table.drain(n.id)?;
                        }
                    }
                }
                (table, BTreeSet::new())
            }
        };
        // Reconcile with the configured nodes and reserve.
        let gone: Vec<u32> = table
            .nodes()
            .map(|(id, _)| id)
            .filter(|id| !cfg.nodes.iter().any(|n| n.id == *id))
            .collect();
        for id in gone {
            info!("node {id} is no longer configured: removing it");
            table.remove(id)?;
        }
        if table.reserve() != cfg.daemon.reserve_node {
            table.set_reserve(cfg.daemon.reserve_node)?;
        }
        out.push(VipState { spec, table, moved });
    }
    Ok(out)
}

/// Mounts bpffs at `dir` if it is not mounted yet.
fn ensure_bpffs(dir: &Path) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let target = dir.to_string_lossy();
    if mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, mnt, fs) = (f.next(), f.next(), f.next());
        mnt == Some(&*target) && fs == Some("bpf")
    }) {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let c = std::ffi::CString::new(target.as_bytes()).context("bpffs path")?;
    // SAFETY: valid NUL-terminated strings; mount(2) has no other preconditions.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "bpffs is not mounted at {} and mounting it failed: {} (is BPF available? are you root?)",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
