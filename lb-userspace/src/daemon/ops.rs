//! The daemon's answers to API requests. Reads are views of the controller, the detector and
//! the kernel's counters; every change is a new configuration run through the same path as
//! SIGHUP ([`Daemon::change`]): validated whole, applied by the controller on a copy (a refused
//! change leaves everything as it was), written to the kernel, persisted, then answered.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use lb_common::{
    CT_F_FIN, CT_F_RST, DropReason, FlowKey, STAT_COUNT, VipKey,
    decide::{self, CtAction, FlowKind},
};

use super::*;
use crate::{
    api::{self, ConntrackStatus, Diff, HeartbeatCounts, NodeCounts, NodeInfo, Observation},
    server::{Fail, Reply, Request},
};

/// Names of the `STATS` events, by index (`lb_common::Stat`).
pub const EVENT_NAMES: [&str; STAT_COUNT as usize] = [
    "pass",
    "tx",
    "drop",
    "ct_insert",
    "ct_hit",
    "ct_miss",
    "ct_reroute",
    "icmp_forward",
    "pmtu_reply",
    "fragment",
    "encap",
    "drain_keep",
    "ct_evict",
    "ct_full",
    "encap_aggregate",
];

/// Snake-case name of a drop reason (`no_backend`), as the API and metrics label it.
pub fn drop_name(i: u32) -> String {
    let Some(r) = DropReason::from_index(i) else {
        return format!("reason_{i}");
    };
    let mut out = String::new();
    for (n, c) in r.name().chars().enumerate() {
        if c.is_ascii_uppercase() {
            if n > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A change [`Daemon::prepare`] worked out: the configuration, the heartbeat keys it implies,
/// the controller after it and the kernel writes that take the kernel there.
pub(super) struct Change {
    pub next: Config,
    keys: BTreeMap<u32, crate::heartbeat::Key>,
    pub ctl: crate::controller::Controller,
    plan: crate::controller::Plan,
    changes: Vec<String>,
}

pub(super) enum Prepared {
    /// Nothing to make (a dry run, or no change): what it would do.
    Done(Diff),
    Change(Box<Change>),
}

fn json<T: serde::Serialize>(v: &T) -> Result<Reply, Fail> {
    serde_json::to_value(v)
        .map(Reply::Json)
        .map_err(|e| Fail::internal(format!("encoding the reply: {e}")))
}

fn kernel(e: impl std::fmt::Display) -> Fail {
    Fail::internal(format!("{e:#}"))
}

/// A VIP's name (`addr:port/proto`) to its key.
pub fn parse_vip(name: &str) -> Result<VipKey, Fail> {
    let (addr, proto) = api::split_vip(name).map_err(|e| Fail::bad(e.to_string()))?;
    Ok(dataplane::vip_key(addr.ip(), addr.port(), proto))
}

impl Daemon {
    /// Answers one API request.
    pub(super) fn handle(
        &mut self,
        req: Request,
        socket: Option<&mut Receiver>,
    ) -> Result<Reply, Fail> {
        match req {
            Request::Status => json(&self.status(socket.as_deref())),
            Request::Nodes => json(&self.node_infos()?),
            Request::Node(id) => {
                let infos = self.node_infos()?;
                let n = infos
                    .into_iter()
                    .find(|n| n.id == id)
                    .ok_or_else(|| unknown_node(id))?;
                json(&n)
            }
            Request::Vips => json(&self.vip_infos()?),
            Request::Routes(name) => {
                let key = parse_vip(&name)?;
                json(&self.routes_info(&key)?)
            }
            Request::Stats => json(&self.stats()?),
            Request::Trace(q) => json(&self.trace(&q)?),
            Request::Config => toml::to_string(&self.cfg)
                .map(Reply::Text)
                .map_err(|e| Fail::internal(format!("encoding the configuration: {e}"))),
            Request::Observe => json(&self.observe(socket.as_deref())?),
            Request::AddNode(n) => {
                if self.cfg.nodes.iter().any(|c| c.id == n.id) {
                    return Err(Fail::conflict(format!("node {} already exists", n.id))
                        .hint("change it with `lb node weight`/`drain`, or remove it first"));
                }
                let mut next = self.cfg.clone();
                next.nodes.push(*n);
                self.change(next, socket, false).and_then(|d| json(&d))
            }
            Request::RemoveNode { id, force } => {
                self.known_node(id)?;
                if !force && let Some(vips) = self.left_without_live_node(id) {
                    return Err(Fail::conflict(format!(
                        "node {id} is the last live node: removing it leaves {vips} with no node"
                    ))
                    .hint("pass --force to remove it anyway (their traffic is dropped)"));
                }
                let mut next = self.cfg.clone();
                next.nodes.retain(|n| n.id != id);
                if next.daemon.reserve_node == Some(id) {
                    next.daemon.reserve_node = None;
                }
                self.change(next, socket, false).and_then(|d| json(&d))
            }
            Request::Drain(id) | Request::Undrain(id) => {
                let drain = matches!(req, Request::Drain(_));
                let next = self.edit_node(id, |n| n.drain = drain)?;
                self.change(next, socket, false).and_then(|d| json(&d))
            }
            Request::Weight { id, weight } => {
                if let Some(w) = weight
                    && !(1..=config::MAX_WEIGHT).contains(&w)
                {
                    return Err(Fail::bad(format!(
                        "weight {w} out of 1..={}",
                        config::MAX_WEIGHT
                    )));
                }
                let next = self.edit_node(id, |n| n.admin_weight = weight)?;
                self.change(next, socket, false).and_then(|d| json(&d))
            }
            Request::AddVip(v) => {
                let proto = config::parse_proto(&v.proto).map_err(|e| Fail::bad(e.to_string()))?;
                let key = dataplane::vip_key(v.addr, v.port, proto);
                if self.ctl.vip(&key).is_some() {
                    return Err(Fail::conflict(format!(
                        "VIP {} already exists",
                        dataplane::vip_display(&key)
                    ))
                    .hint("remove it first to change its mode, hash or route count"));
                }
                let mut next = self.cfg.clone();
                next.vips.push(*v);
                self.change(next, socket, false).and_then(|d| json(&d))
            }
            Request::RemoveVip(name) => {
                let key = parse_vip(&name)?;
                if self.ctl.vip(&key).is_none() {
                    return Err(unknown_vip(&name));
                }
                let mut next = self.cfg.clone();
                next.vips.retain(|v| {
                    config::parse_proto(&v.proto)
                        .map(|p| dataplane::vip_key(v.addr, v.port, p) != key)
                        .unwrap_or(true)
                });
                self.change(next, socket, false).and_then(|d| json(&d))
            }
            Request::Apply { text, dry_run } => {
                let next = Config::parse(&text, "(the applied file)")
                    .map_err(|e| Fail::bad(format!("{e:#}")))?;
                self.change(next, socket, dry_run).and_then(|d| json(&d))
            }
        }
    }

    fn known_node(&self, id: u32) -> Result<(), Fail> {
        if self.cfg.nodes.iter().any(|n| n.id == id) {
            Ok(())
        } else {
            Err(unknown_node(id))
        }
    }

    /// The running configuration with one node edited.
    fn edit_node(&self, id: u32, f: impl FnOnce(&mut config::NodeConfig)) -> Result<Config, Fail> {
        let mut next = self.cfg.clone();
        let n = next
            .nodes
            .iter_mut()
            .find(|n| n.id == id)
            .ok_or_else(|| unknown_node(id))?;
        f(n);
        Ok(next)
    }

    /// The VIPs that would have no live node without `id` (`None` when none would, or `id`
    /// is not live itself).
    fn left_without_live_node(&self, id: u32) -> Option<String> {
        let live = |n: &crate::controller::Node| n.state != NodeState::Down;
        if !self.ctl.node(id).is_some_and(live) || self.ctl.nodes().any(|n| n.id != id && live(n)) {
            return None;
        }
        let vips: Vec<String> = self
            .ctl
            .vips()
            .map(|v| dataplane::vip_display(&v.spec.key))
            .collect();
        (!vips.is_empty()).then(|| vips.join(", "))
    }

    /// Makes the running configuration `next` (or, `dry_run`, says what that would do). The
    /// one path of every change: API calls, `lb apply`, SIGHUP. In cluster mode a change is
    /// checked here, then proposed to the leader (this balancer's own leader part included),
    /// which writes it to etcd before any kernel runs it (`Link::forward`).
    pub(super) fn change(
        &mut self,
        next: Config,
        socket: Option<&mut Receiver>,
        dry_run: bool,
    ) -> Result<Diff, Fail> {
        let c = match self.prepare(next, dry_run)? {
            Prepared::Done(diff) => return Ok(diff),
            Prepared::Change(c) => c,
        };
        if let Some(link) = self.cluster.as_mut() {
            return link.forward(
                &crate::replica::Shared::of(&self.cfg),
                &crate::replica::Shared::of(&c.next),
            );
        }
        self.install(*c, socket)
    }

    /// Checks `next` and works out what it changes, on a copy of the controller: a refused
    /// configuration changes nothing. `Done` for a dry run or no change.
    pub(super) fn prepare(&self, next: Config, dry_run: bool) -> Result<Prepared, Fail> {
        let mut next = next;
        // What only a restart changes keeps its running value (so the running configuration
        // says what runs); the diff names it.
        let later = keep_restart_only(&self.cfg.daemon, &mut next.daemon);
        next.validate().map_err(|e| Fail::bad(format!("{e:#}")))?;
        if let Some(mac) = self.own_mac {
            next.check_own_mac(mac)
                .map_err(|e| Fail::bad(format!("{e:#}")))?;
        }
        let keys = super::node_keys(&next).map_err(|e| Fail::bad(format!("{e:#}")))?;
        let mut changes = config_diff(&self.cfg, &next);
        let mut ctl = self.ctl.clone();
        let plan = ctl
            .configure(&next)
            .map_err(|e| Fail::conflict(e.to_string()))?;
        let route_writes = plan.route_writes() as u64;
        changes.extend(later.iter().map(|what| {
            format!("! daemon.{what} differs: it changes at the next restart (the running value is kept)")
        }));
        if dry_run || changes.is_empty() {
            return Ok(Prepared::Done(Diff {
                changes,
                route_writes,
                applied: false,
            }));
        }
        Ok(Prepared::Change(Box::new(Change {
            next,
            keys,
            ctl,
            plan,
            changes,
        })))
    }

    /// Makes a prepared change: the global settings, the controller, the kernel writes, then
    /// the running configuration and the state on disk.
    pub(super) fn install(
        &mut self,
        c: Change,
        mut socket: Option<&mut Receiver>,
    ) -> Result<Diff, Fail> {
        let start = Instant::now();
        let Change {
            next,
            keys,
            ctl,
            plan,
            changes,
        } = c;
        let route_writes = plan.route_writes() as u64;
        // The global settings first: if they cannot be written, nothing else has changed.
        let globals = global_config(&next).map_err(|e| Fail::bad(format!("{e:#}")))?;
        self.dp.set_config(&globals).map_err(kernel)?;
        self.ctl = ctl;
        self.change_seq += 1;
        self.adopt_config(next, keys, socket.as_deref_mut());
        if let Err(e) = self.execute(&plan, socket) {
            self.resync = true;
            return Err(Fail::internal(format!(
                "writing the change to the kernel: {e:#} (everything is written again next round)"
            )));
        }
        let live = start.elapsed();
        for line in &changes {
            info!("configuration: {line}");
        }
        self.save_running()
            .map_err(|e| Fail::internal(format!("{e:#}")))?;
        let saved = start.elapsed();
        if live > SLOW_BATCH {
            warn!(
                "a configuration change took {live:?} to reach the kernel ({route_writes} route writes)"
            );
        }
        tracing::debug!(?live, ?saved, route_writes, "configuration change applied");
        Ok(Diff {
            changes,
            route_writes,
            applied: true,
        })
    }

    /// Makes `next` the running configuration's nodes and VIPs for everything beside the
    /// controller: heartbeat keys and agents' sockets, the detector, the health checks.
    pub(super) fn adopt_config(
        &mut self,
        next: Config,
        keys: BTreeMap<u32, crate::heartbeat::Key>,
        socket: Option<&mut Receiver>,
    ) {
        // Agents of nodes no longer heartbeat-checked lose their address and own socket.
        let heard = |id: u32| {
            next.nodes
                .iter()
                .any(|n| n.id == id && n.check == "heartbeat")
        };
        self.agents.retain(|id, _| heard(*id));
        if let Some(r) = socket {
            r.set_node_keys(keys);
            r.retain_peers(heard);
        }
        sync_membership(&mut self.membership, &next);
        self.cfg = next;
        self.sync_checks();
    }

    /// The running configuration and the state, on disk before the change is answered.
    pub(super) fn save_running(&mut self) -> anyhow::Result<()> {
        running::save(
            &self.state_dir,
            &running::Running {
                source_sha256: self.source_sha256.clone(),
                xdp_mode: Some(self.xdp_mode.clone()),
                offloads_off: self.offloads_off.iter().map(|f| f.name().into()).collect(),
                config: self.cfg.clone(),
            },
        )?;
        self.persister
            .flush(FLUSH_TIMEOUT)
            .map_err(|e| anyhow::anyhow!("saving state in {}: {e}", self.state_dir.display()))
    }

    // -----------------------------------------------------------------------------------------
    // Views
    // -----------------------------------------------------------------------------------------

    fn status(&self, socket: Option<&Receiver>) -> api::Status {
        let mut counts = NodeCounts::default();
        for n in self.ctl.nodes() {
            match n.state {
                NodeState::Active => counts.active += 1,
                NodeState::Draining => counts.draining += 1,
                NodeState::Down => counts.down += 1,
            }
        }
        let m = self.membership.counters();
        let mut hb = HeartbeatCounts {
            accepted: m.accepted,
            interval_clamped: m.interval_clamped,
            weight_clamped: m.weight_clamped,
            incarnation_resets: m.incarnation_reset,
            fail_static_episodes: m.fail_static,
            ..Default::default()
        };
        let mut rejected = vec![
            ("unknown_node", m.unknown_node),
            ("replay", m.replay),
            ("stale_incarnation", m.stale_incarnation),
            ("duplicate_node", m.duplicate),
        ];
        if let Some(r) = socket {
            let c = r.counters();
            hb.queue_drops = c.queue_drops;
            rejected.extend([
                ("bad_hmac", c.bad_hmac),
                ("malformed", c.malformed),
                ("truncated", c.truncated),
                ("oversized", c.oversized),
                ("bad_magic", c.bad_magic),
                ("unknown_version", c.unknown_version),
                ("unknown_kind", c.unknown_kind),
                ("wrong_direction", c.wrong_direction),
            ]);
        }
        hb.rejected = rejected
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let ev = self.dp.counters().map(|c| c.stats).unwrap_or_default();
        let stat = |s: lb_common::Stat| ev.get(s as usize).copied().unwrap_or(0);
        let served = self.ctl.served();
        api::Status {
            version: env!("CARGO_PKG_VERSION").into(),
            instance: self.cfg.daemon.instance.clone(),
            pid: std::process::id(),
            iface: self.args.iface.clone(),
            xdp_mode: self.xdp_mode.clone(),
            program_id: self.program_id,
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            config_file: self.args.config.clone(),
            state_dir: self.state_dir.clone(),
            vips: self.ctl.vips().count(),
            nodes: counts,
            heartbeats: hb,
            conntrack: ConntrackStatus {
                capacity: u64::from(self.cfg.daemon.conntrack_size),
                entries: self.ct.entries,
                scans: self.ct_scans,
                open_flows: self.ct.open,
                evictions: stat(lb_common::Stat::CtEvict),
                inserts: stat(lb_common::Stat::CtInsert),
            },
            fail_static: self.membership.holding(),
            unserved_vips: self
                .ctl
                .vips()
                .filter(|v| !served.contains(&v.spec.key))
                .map(|v| dataplane::vip_display(&v.spec.key))
                .collect(),
            unserved_episodes: self.unserved_episodes,
            cluster: self.cluster_status(),
            bgp_announced: self
                .bgp
                .as_ref()
                .map(|(a, _, _)| a.announced().iter().map(|ip| ip.to_string()).collect()),
        }
    }

    fn node_infos(&self) -> Result<Vec<NodeInfo>, Fail> {
        let now = Instant::now();
        let total_routes: u64 = self
            .ctl
            .vips()
            .map(|v| u64::from(v.table.route_count()))
            .sum();
        let active_weight: u64 = self
            .ctl
            .nodes()
            .filter(|n| n.state == NodeState::Active)
            .map(|n| u64::from(n.weight))
            .sum();
        let mut out = Vec::new();
        for n in self.ctl.nodes() {
            let cfg = self.cfg.nodes.iter().find(|c| c.id == n.id);
            let routes: u64 = self
                .ctl
                .vips()
                .map(|v| u64::from(v.table.count(n.id)))
                .sum();
            let traffic = self.dp.node_traffic(n.id).map_err(kernel)?;
            let st = self.membership.status(n.id);
            out.push(NodeInfo {
                id: n.id,
                name: cfg.and_then(|c| c.name.clone()),
                state: n.state.to_string(),
                check: cfg.map_or_else(|| "heartbeat".into(), |c| c.check.clone()),
                mac: cfg.and_then(|c| c.mac.clone()),
                ipv4: n.ipv4.map(IpAddr::V4),
                ipv6: n.ipv6.map(IpAddr::V6),
                weight: n.weight,
                config_weight: n.config_weight,
                advertised_weight: n.advertised_weight,
                admin_weight: n.admin_weight,
                admin_drain: n.admin_drain,
                routes,
                route_share: share(routes, total_routes),
                weighted_share: if n.state == NodeState::Active {
                    share(u64::from(n.weight), active_weight)
                } else {
                    0.0
                },
                flows: self.ct.flows.get(&n.id).copied().unwrap_or(0),
                flows_current: self.ct.seq >= self.change_seq,
                packets: traffic.packets,
                bytes: traffic.bytes,
                last_heartbeat_age: st
                    .and_then(|s| s.last_seen)
                    .map(|t| now.saturating_duration_since(t).as_secs_f64()),
                cpu_permille: st.and_then(|s| s.cpu_permille),
                active_conns: st.and_then(|s| s.active_conns),
                duplicate_agent: st
                    .and_then(|s| s.duplicate_seen)
                    .is_some_and(|t| now.saturating_duration_since(t) < super::DUPLICATE_SHOWN),
            });
        }
        Ok(out)
    }

    fn vip_infos(&self) -> Result<Vec<api::VipInfo>, Fail> {
        self.ctl
            .vips()
            .map(|v| {
                let t = self.dp.vip_traffic(v.spec.index).map_err(kernel)?;
                let key = &v.spec.key;
                Ok(api::VipInfo {
                    name: dataplane::vip_display(key),
                    addr: dataplane::key_ip(key),
                    port: u16::from_be(key.port),
                    proto: dataplane::proto_name(key.proto).into(),
                    mode: v.spec.mode,
                    hash: v.spec.hash,
                    index: v.spec.index,
                    routes: v.table.route_count(),
                    moved: v.moved.len() as u32,
                    unowned: v.table.unowned(),
                    packets: t.packets,
                    bytes: t.bytes,
                })
            })
            .collect()
    }

    fn routes_info(&self, key: &VipKey) -> Result<api::RoutesInfo, Fail> {
        let name = dataplane::vip_display(key);
        let v = self.ctl.vip(key).ok_or_else(|| unknown_vip(&name))?;
        let n = v.table.route_count();
        let mut by_node: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        let mut unowned = Vec::new();
        for (r, o) in v.table.owners().enumerate() {
            match o {
                Some(node) => by_node.entry(node).or_default().push(r as u32),
                None => unowned.push(r as u32),
            }
        }
        let nodes = self
            .ctl
            .nodes()
            .map(|node| {
                let routes = by_node.remove(&node.id).unwrap_or_default();
                api::RouteOwner {
                    node: node.id,
                    state: node.state.to_string(),
                    count: routes.len() as u32,
                    share: share(routes.len() as u64, u64::from(n)),
                    ranges: state::ranges(routes),
                }
            })
            .collect();
        Ok(api::RoutesInfo {
            vip: name,
            routes: n,
            nodes,
            unowned: state::ranges(unowned),
            moved: state::ranges(v.moved.iter()),
        })
    }

    fn stats(&self) -> Result<api::Stats, Fail> {
        let c = self.dp.counters().map_err(kernel)?;
        let vips = self
            .ctl
            .vips()
            .map(|v| {
                let t = self.dp.vip_traffic(v.spec.index).map_err(kernel)?;
                Ok(api::Traffic {
                    name: dataplane::vip_display(&v.spec.key),
                    packets: t.packets,
                    bytes: t.bytes,
                })
            })
            .collect::<Result<_, Fail>>()?;
        let nodes = self
            .ctl
            .nodes()
            .map(|n| {
                let t = self.dp.node_traffic(n.id).map_err(kernel)?;
                Ok(api::Traffic {
                    name: n.id.to_string(),
                    packets: t.packets,
                    bytes: t.bytes,
                })
            })
            .collect::<Result<_, Fail>>()?;
        Ok(api::Stats {
            at: self.started.elapsed().as_secs_f64(),
            vips,
            nodes,
            events: EVENT_NAMES
                .iter()
                .zip(&c.stats)
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            drops: c
                .drops
                .iter()
                .enumerate()
                .map(|(i, v)| (drop_name(i as u32), *v))
                .collect(),
        })
    }

    /// Where a packet of a flow would go: the same steps as the program's node choice
    /// (`lb-ebpf/src/decide.rs`), on the controller's table and the kernel's conntrack entry.
    fn trace(&self, q: &api::TraceQuery) -> Result<api::Trace, Fail> {
        let proto = config::parse_proto(&q.proto).map_err(|e| Fail::bad(e.to_string()))?;
        let dst: SocketAddr = q
            .dst
            .parse()
            .map_err(|_| Fail::bad(format!("destination {:?}: expected addr:port", q.dst)))?;
        let src: SocketAddr = q
            .src
            .parse()
            .or_else(|_| q.src.parse::<IpAddr>().map(|a| SocketAddr::new(a, 0)))
            .map_err(|_| Fail::bad(format!("source {:?}: expected addr or addr:port", q.src)))?;
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(Fail::bad(
                "source and destination are of different families",
            ));
        }
        let (s, family) = dataplane::ip_bytes(src.ip());
        let (d, _) = dataplane::ip_bytes(dst.ip());
        let key = FlowKey {
            src: s,
            dst: d,
            sport: src.port().to_be(),
            dport: dst.port().to_be(),
            proto,
            family,
            ..Default::default()
        };
        let v = flow_vip(&key, |k| self.ctl.vip(k).is_some())
            .and_then(|k| self.ctl.vip(&k))
            .ok_or_else(|| {
                unknown_vip(&format!("{dst}/{}", q.proto))
                    .hint("a packet to it is passed to the host untouched")
            })?;
        let route = flow_route(
            self.ctl.hash_seed(),
            v.spec.hash,
            v.table.route_count(),
            &key,
        );
        let owner = v.table.owner(route);
        let moved = v.moved.contains(route);
        let ct = self.dp.conntrack_get(&key).map_err(kernel)?;
        let kstate = |id: u32| {
            self.ctl.node(id).map_or(lb_common::NODE_DOWN, |n| {
                crate::controller::kernel_state(n.state)
            })
        };
        let state_name = |id: u32| {
            self.ctl
                .node(id)
                .map_or("unknown".into(), |n| n.state.to_string())
        };
        let coarse = coarse_now();
        let tracked = ct.map(|e| api::TrackedFlow {
            node: e.node,
            idle_seconds: (u64::from(lb_common::ct::ct_age(coarse, e.last_seen))
                << lb_common::CT_TIME_SHIFT)
                / 1_000_000_000,
            closing: e.flags & (CT_F_FIN | CT_F_RST) != 0,
        });
        // The program's own decision function, for an established packet of the flow and for
        // a new connection (TCP SYN).
        let kind = if proto == lb_common::PROTO_UDP {
            FlowKind::Udp
        } else {
            FlowKind::tcp(decide::tcp_flags::ACK)
        };
        let owner_id = owner.unwrap_or(lb_common::NODE_NONE);
        let owner_state = kstate(owner_id);
        let looked_up = decide::needs_lookup(kind, moved);
        let hit = looked_up
            .then(|| ct.map(|e| (e.node, kstate(e.node))))
            .flatten();
        let established = decide::choose(kind, owner_id, owner_state, looked_up, hit);
        let mut why = match (&established, moved) {
            (_, true) => format!("route {route} moved (flows on it are looked up in conntrack); "),
            (_, false) => format!("route {route}; "),
        };
        match &established {
            Ok(c) if c.ct == CtAction::Refresh => {
                why += &format!(
                    "the flow is tracked on node {} ({}): it stays there",
                    c.node,
                    state_name(c.node)
                )
            }
            Ok(c) if c.ct == CtAction::Rewrite => {
                why += &format!(
                    "the flow was tracked on node {}, which is down: re-routed to the owner, node {} ({})",
                    hit.map_or(0, |h| h.0),
                    c.node,
                    state_name(c.node)
                )
            }
            Ok(c) => why += &format!("owned by node {} ({})", c.node, state_name(c.node)),
            Err(reason) => {
                why += &format!(
                    "owner {}: dropped ({})",
                    owner.map_or("none".into(), |o| format!("node {o} ({})", state_name(o))),
                    drop_name(*reason as u32)
                )
            }
        }
        if proto == lb_common::PROTO_TCP {
            match decide::choose(FlowKind::Syn, owner_id, owner_state, false, None) {
                Ok(c) if established.as_ref().is_ok_and(|e| e.node == c.node) => {}
                Ok(c) => why += &format!("; a new connection goes to node {}", c.node),
                Err(r) => {
                    why += &format!("; a new connection is dropped ({})", drop_name(r as u32))
                }
            }
        }
        let node = established.ok().map(|c| c.node);
        Ok(api::Trace {
            vip: dataplane::vip_display(&v.spec.key),
            route,
            owner,
            moved,
            tracked,
            node,
            why,
        })
    }

    fn observe(&self, socket: Option<&Receiver>) -> Result<Observation, Fail> {
        let vips = self.vip_infos()?;
        let tables = self
            .ctl
            .vips()
            .map(|v| self.routes_info(&v.spec.key))
            .collect::<Result<_, Fail>>()?;
        Ok(Observation {
            status: self.status(socket),
            nodes: self.node_infos()?,
            vips,
            stats: self.stats()?,
            tables,
            route_moves: self
                .route_moves
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
        })
    }
}

/// Copies into `next` the settings of `running` that only a restart can change (the socket,
/// the maps, the attach mode, the servers' addresses); returns the names of those that differed.
pub fn keep_restart_only(
    running: &config::DaemonConfig,
    next: &mut config::DaemonConfig,
) -> Vec<&'static str> {
    let mut differ = Vec::new();
    macro_rules! keep {
        ($($field:ident),*) => {$(
            if running.$field != next.$field {
                differ.push(stringify!($field));
                next.$field = running.$field.clone();
            }
        )*};
    }
    keep!(
        instance,
        heartbeat_listen,
        heartbeat_group,
        key_file,
        node_key_dir,
        xdp_mode,
        route_slots,
        conntrack_size,
        api_socket,
        metrics_listen
    );
    differ
}

/// What the last conntrack scan counted.
#[derive(Clone, Debug, Default)]
pub struct CtCounts {
    /// [`Daemon`]'s change sequence when the scan started.
    pub seq: u64,
    /// Entries in use.
    pub entries: u64,
    /// Entries of open flows (not closing, not idle past the timeout).
    pub open: u64,
    /// Open flows per node.
    pub flows: BTreeMap<u32, u64>,
}

impl CtCounts {
    /// Counts one live (not expired) entry.
    pub fn count(&mut self, ct: &lb_common::CtEntry) {
        self.entries += 1;
        if ct.flags & (CT_F_FIN | CT_F_RST) == 0 {
            self.open += 1;
            *self.flows.entry(ct.node).or_default() += 1;
        }
    }
}

fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn unknown_node(id: u32) -> Fail {
    Fail::not_found(format!("no node {id}")).hint("`lb node list` shows the nodes")
}

fn unknown_vip(name: &str) -> Fail {
    Fail::not_found(format!("no VIP {name}")).hint("`lb vip list` shows the VIPs")
}

/// One line per difference between two configurations: `+`/`-` for added and removed nodes
/// and VIPs, `~` with the changed fields for edited ones, and the global settings.
pub fn config_diff(old: &Config, new: &Config) -> Vec<String> {
    fn fields<T: serde::Serialize>(v: &T) -> BTreeMap<String, serde_json::Value> {
        match serde_json::to_value(v) {
            Ok(serde_json::Value::Object(m)) => m.into_iter().collect(),
            _ => BTreeMap::new(),
        }
    }
    fn edits(
        what: &str,
        a: BTreeMap<String, serde_json::Value>,
        b: BTreeMap<String, serde_json::Value>,
    ) -> Option<String> {
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        let parts: Vec<String> = keys
            .into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| {
                let show = |v: Option<&serde_json::Value>| {
                    v.filter(|v| !v.is_null())
                        .map_or("-".into(), |v| v.to_string())
                };
                format!("{k} {} -> {}", show(a.get(k)), show(b.get(k)))
            })
            .collect();
        (!parts.is_empty()).then(|| format!("~ {what}: {}", parts.join(", ")))
    }
    let mut out = Vec::new();
    for (section, a, b) in [
        ("daemon", fields(&old.daemon), fields(&new.daemon)),
        ("ipip", fields(&old.ipip), fields(&new.ipip)),
    ] {
        out.extend(edits(section, a, b));
    }
    let nodes = |c: &Config| -> BTreeMap<u32, BTreeMap<String, serde_json::Value>> {
        c.nodes.iter().map(|n| (n.id, fields(n))).collect()
    };
    let (a, mut b) = (nodes(old), nodes(new));
    for (id, fa) in a {
        match b.remove(&id) {
            None => out.push(format!("- node {id}")),
            Some(fb) => out.extend(edits(&format!("node {id}"), fa, fb)),
        }
    }
    out.extend(b.keys().map(|id| format!("+ node {id}")));
    let vips = |c: &Config| -> BTreeMap<String, BTreeMap<String, serde_json::Value>> {
        c.vips
            .iter()
            .map(|v| {
                (
                    format!("{}/{}", SocketAddr::new(v.addr, v.port), v.proto),
                    fields(v),
                )
            })
            .collect()
    };
    let (a, mut b) = (vips(old), vips(new));
    for (name, fa) in a {
        match b.remove(&name) {
            None => out.push(format!("- vip {name}")),
            Some(fb) => out.extend(edits(&format!("vip {name}"), fa, fb)),
        }
    }
    out.extend(b.keys().map(|name| format!("+ vip {name}")));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `lb apply` / SIGHUP of a file with a new `route_slots`: the running value is kept (the
    /// maps are sized at load) and the diff says it changes at the next restart.
    #[test]
    fn restart_only_settings_keep_their_running_value() {
        let running = Config::default();
        let mut next = Config::default();
        next.daemon.route_slots *= 2;
        next.daemon.miss_limit = 5;
        let differ = keep_restart_only(&running.daemon, &mut next.daemon);
        assert_eq!(differ, vec!["route_slots"]);
        assert_eq!(next.daemon.route_slots, running.daemon.route_slots);
        assert_eq!(next.daemon.miss_limit, 5, "live settings are applied");
        assert_eq!(
            config_diff(&running, &next),
            vec!["~ daemon: miss_limit 3 -> 5".to_string()]
        );
    }

    #[test]
    fn drop_reasons_are_snake_case() {
        assert_eq!(drop_name(DropReason::NoBackend as u32), "no_backend");
        assert_eq!(
            drop_name(DropReason::BadIpv4Header as u32),
            "bad_ipv4_header"
        );
        assert_eq!(drop_name(99), "reason_99");
    }
}
