//! The controller: the daemon's decisions as a pure function over plain data.
//!
//! It owns the node registry (one [`NodeState`] per node, shared by every VIP's table), the
//! VIPs with their stable data-plane indices, route tables and "moved" flags. Input is a batch
//! of [`Input`]s (membership and health events, conntrack-scan results, configuration); output
//! is a [`Plan`]: the kernel writes in the only order that never sends a packet to a node that
//! cannot take it, the route-moved notices, and whether to persist. The daemon's tokio shell
//! executes plans; nothing here does I/O or reads a clock, so everything is host-tested.
//!
//! Kernel write order within a plan:
//! 1. nodes becoming able to take traffic (`ACTIVE`, or `DRAINING` from down/absent) are
//!    written first, so no route ever points at a node the kernel still thinks is down;
//! 2. new VIPs and route-table changes (each VIP's changes become live with one generation flip);
//! 3. removed VIPs are dropped;
//! 4. the remaining node writes (active -> draining/down), after no route points at them;
//! 5. removed nodes are cleared.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use lb_common::{
    NODE_ACTIVE, NODE_DOWN, NODE_DRAINING, NODE_NONE, NodeEntry, ROUTE_F_MOVED, RouteEntry, VipKey,
};
use thiserror::Error;

use crate::{
    config::{self, Config},
    dataplane::{self, ForwardMode, HashMode, VipSpec},
    heartbeat::MoveReason,
    membership::{DownReason, Event},
    routes::{Move, NodeInfo, NodeState, RouteError, RouteTable},
    state::{self, NodeRecord, State, VipRecord},
};

/// Why the controller refused a configuration or a persisted state. A refused input changes
/// nothing.
#[derive(Debug, Error)]
pub enum ControllerError {
    #[error("route table of VIP {vip}: {source}")]
    Route {
        vip: String,
        #[source]
        source: RouteError,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("no free VIP index (at most {} VIPs)", lb_common::MAX_VIPS)]
    NoVipIndex,
}

/// The error of a route-table operation on `vip`'s table.
fn route_err(vip: &VipKey) -> impl FnOnce(RouteError) -> ControllerError + '_ {
    move |source| ControllerError::Route {
        vip: dataplane::vip_display(vip),
        source,
    }
}

/// A node as the registry knows it: its data-plane addresses from the configuration, and the
/// one state every VIP's table holds for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub id: u32,
    pub mac: [u8; 6],
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// Weight from the configuration.
    pub config_weight: u32,
    /// Weight the node's agent advertises (0 = no opinion).
    pub advertised_weight: u32,
    /// The operator's weight (`lb node weight`): beats the agent's.
    pub admin_weight: Option<u32>,
    /// The operator drained the node (`lb node drain`): it stays draining while up, whatever
    /// its agent advertises.
    pub admin_drain: bool,
    /// The node's agent (or its last heartbeat) says it is draining.
    pub agent_draining: bool,
    /// Its agent restarted and it is held down: drained (tracked flows stay) until it is up.
    pub restarting: bool,
    /// State in every route table (and, translated, in `NODES`).
    pub state: NodeState,
    /// Weight in every route table.
    pub weight: u32,
}

impl Node {
    /// The weight the tables should use: the operator's if set, else the agent's if it has
    /// one, else the configured one.
    pub fn wanted_weight(&self) -> u32 {
        if let Some(w) = self.admin_weight {
            w
        } else if self.advertised_weight > 0 {
            self.advertised_weight
        } else {
            self.config_weight
        }
    }

    /// The node's `NODES` entry.
    pub fn entry(&self) -> NodeEntry {
        NodeEntry {
            addr6: self.ipv6.map(|a| a.octets()).unwrap_or_default(),
            addr4: self.ipv4.map(|a| a.octets()).unwrap_or_default(),
            mac: self.mac,
            state: kernel_state(self.state),
            _pad: 0,
        }
    }

    fn info(&self) -> NodeInfo {
        NodeInfo {
            weight: self.weight,
            state: self.state,
        }
    }
}

/// The `NODES` state byte of a node state.
pub fn kernel_state(s: NodeState) -> u8 {
    match s {
        NodeState::Active => NODE_ACTIVE,
        NodeState::Draining => NODE_DRAINING,
        NodeState::Down => NODE_DOWN,
    }
}

/// The node state a `NODES` state byte stands for.
pub fn state_from_kernel(s: u8) -> NodeState {
    match s {
        NODE_ACTIVE => NodeState::Active,
        NODE_DRAINING => NodeState::Draining,
        _ => NodeState::Down,
    }
}

/// Whether tracked flows on a node in this state are kept (it may still serve them).
fn live(s: NodeState) -> bool {
    matches!(s, NodeState::Active | NodeState::Draining)
}

/// A set of one VIP's route IDs: a bitmap of N bits, so a batch that moves tens of thousands
/// of routes pays a bit operation per route, not a tree insert.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteSet {
    words: Vec<u64>,
    len: usize,
}

impl RouteSet {
    /// An empty set for routes `0..n`.
    pub fn new(n: u32) -> Self {
        Self {
            words: vec![0; (n as usize).div_ceil(64)],
            len: 0,
        }
    }

    /// Adds `r`; false if it was there (or is out of range).
    pub fn insert(&mut self, r: u32) -> bool {
        let (w, b) = ((r / 64) as usize, 1u64 << (r % 64));
        match self.words.get_mut(w) {
            Some(word) if *word & b == 0 => {
                *word |= b;
                self.len += 1;
                true
            }
            _ => false,
        }
    }

    /// Removes `r`; false if it was not there.
    pub fn remove(&mut self, r: u32) -> bool {
        let (w, b) = ((r / 64) as usize, 1u64 << (r % 64));
        match self.words.get_mut(w) {
            Some(word) if *word & b != 0 => {
                *word &= !b;
                self.len -= 1;
                true
            }
            _ => false,
        }
    }

    pub fn contains(&self, r: u32) -> bool {
        self.words
            .get((r / 64) as usize)
            .is_some_and(|w| w & (1u64 << (r % 64)) != 0)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The members in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let b = w.trailing_zeros();
                    w &= w - 1;
                    i as u32 * 64 + b
                })
            })
        })
    }
}

/// One VIP: data-plane identity, route table and moved flags.
#[derive(Clone, Debug)]
pub struct Vip {
    pub spec: VipSpec,
    /// Shared with the persister's snapshot; copied only when it changes while being written.
    pub table: Arc<RouteTable>,
    /// Routes whose flows may still live on a previous owner: the kernel consults conntrack.
    pub moved: RouteSet,
    /// Bumped on every table or flag change, so a conntrack scan of an older table is ignored.
    pub revision: u64,
}

impl Vip {
    fn entry(&self, route: u32) -> RouteEntry {
        RouteEntry {
            node: self.table.owner(route).unwrap_or(NODE_NONE),
            flags: if self.moved.contains(route) {
                ROUTE_F_MOVED
            } else {
                0
            },
        }
    }

    /// The whole table as `ROUTES` entries.
    pub fn entries(&self) -> Vec<RouteEntry> {
        (0..self.table.route_count())
            .map(|r| self.entry(r))
            .collect()
    }
}

/// A VIP found pinned in the kernel at start-up: what it held when the last daemon stopped.
#[derive(Clone, Debug, Default)]
pub struct AdoptedVip {
    pub index: u32,
    /// The live table, as route entries.
    pub routes: Vec<RouteEntry>,
}

/// What the kernel maps held at start-up (empty on a first start). When the daemon died
/// between a push and its save, these are newer than the state file and win.
#[derive(Clone, Debug, Default)]
pub struct Adopted {
    pub vips: BTreeMap<VipKey, AdoptedVip>,
    /// The flow-hash seed the kernel's VIPs carry (None when it holds no VIP).
    pub hash_seed: Option<u32>,
    /// `NODES` state bytes of slots that were not empty.
    pub nodes: BTreeMap<u32, u8>,
}

/// One input of a batch.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// A membership change (heartbeats or an active health check).
    Membership(Event),
    /// A conntrack scan of `vip` at `revision` found no tracked flow that still needs the old
    /// owner of these routes: their moved flags can go.
    Settled {
        vip: VipKey,
        revision: u64,
        routes: Vec<u32>,
    },
}

/// One kernel write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Write a `NODES` slot.
    Node { id: u32, entry: NodeEntry },
    /// Empty a `NODES` slot (node removed).
    ClearNode { id: u32 },
    /// Create a VIP, or replace its whole table (the data plane writes only what differs).
    Vip {
        spec: VipSpec,
        routes: Vec<RouteEntry>,
    },
    /// Change some routes of an existing VIP; they become live together (one generation flip).
    Routes {
        key: VipKey,
        changes: Vec<(u32, RouteEntry)>,
    },
    /// Remove a VIP.
    RemoveVip { key: VipKey },
}

/// HaloD's "route moved": tell the old owner's agent which of its routes moved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub node: u32,
    pub vip: VipKey,
    pub reason: MoveReason,
    pub routes: Vec<u32>,
}

/// What the shell does for a batch, in order: `steps`, then `notices`, then a persist if
/// `persist` (one, whatever the batch held).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub notices: Vec<Notice>,
    pub persist: bool,
    /// One line per applied change, for the log.
    pub log: Vec<String>,
    /// VIPs that lost their last active node in this batch: from now on their new flows are
    /// dropped (counted by the data plane as `no_backend`) until a node is active again.
    pub unserved: Vec<VipKey>,
    /// VIPs that had no active node before this batch and have one after it.
    pub served: Vec<VipKey>,
}

impl Plan {
    /// Route entries written by this plan (for benchmarks and tests).
    pub fn route_writes(&self) -> usize {
        self.steps
            .iter()
            .map(|s| match s {
                Step::Vip { routes, .. } => routes.len(),
                Step::Routes { changes, .. } => changes.len(),
                _ => 0,
            })
            .sum()
    }
}

/// The controller. See the module docs.
#[derive(Clone, Debug)]
pub struct Controller {
    nodes: BTreeMap<u32, Node>,
    vips: BTreeMap<VipKey, Vip>,
    reserve: Option<u32>,
    /// Last incarnation/sequence accepted per node (persisted for replay protection).
    seen: BTreeMap<u32, (u64, u64)>,
    /// The flow-hash seed: random on a first start, then kept (state file, kernel maps) for
    /// as long as the route tables, since another seed maps every flow to another route.
    hash_seed: u32,
}

/// The routes of one VIP a batch touched, with their entries before it.
#[derive(Default)]
struct Touched {
    seen: RouteSet,
    before: Vec<(u32, RouteEntry)>,
}

impl Touched {
    fn new(n: u32) -> Self {
        Self {
            seen: RouteSet::new(n),
            before: Vec::new(),
        }
    }

    /// Records `route`'s entry unless the batch touched it already.
    fn touch(&mut self, route: u32, entry: impl FnOnce() -> RouteEntry) {
        if self.seen.insert(route) {
            self.before.push((route, entry()));
        }
    }
}

/// Each VIP's spec and route count before a batch.
type Shape = BTreeMap<VipKey, (VipSpec, u32)>;

/// What a batch changed, gathered while its inputs are applied one by one.
#[derive(Default)]
struct Changes {
    /// Node states before the batch (first touch).
    nodes_before: BTreeMap<u32, Option<NodeEntry>>,
    /// Route entries before the batch (first touch), per VIP.
    routes_before: BTreeMap<VipKey, Touched>,
    notices: Vec<Notice>,
    log: Vec<String>,
    persist: bool,
}

impl Controller {
    /// An empty controller.
    pub fn empty() -> Self {
        Self {
            nodes: BTreeMap::new(),
            vips: BTreeMap::new(),
            reserve: None,
            seen: BTreeMap::new(),
            hash_seed: rand::random(),
        }
    }

    /// The flow-hash seed every VIP of the data plane carries.
    pub fn hash_seed(&self) -> u32 {
        self.hash_seed
    }

    /// The controller for `cfg`, starting from the persisted `state` and what the kernel held
    /// (`adopted`): tables the kernel holds win over the file's (they are never older), then
    /// everything is reconciled with `cfg` (nodes and VIPs no longer configured are removed,
    /// new ones added, changed weights applied). The plan writes every node and VIP, clears
    /// stale node slots and removes stale VIPs, so the kernel matches whatever it held before.
    pub fn start(
        cfg: &Config,
        state: Option<&State>,
        adopted: &Adopted,
    ) -> Result<(Self, Plan), ControllerError> {
        let mut c = match state {
            Some(s) => Self::from_state(s)?,
            None => Self::empty(),
        };
        c.adopt_kernel(adopted)?;
        let plan = c.configure(cfg)?;
        // A daemon that died part-way through a plan may have left some tables changed and
        // others not: bring every table back to its balanced shares (no-op when balanced).
        c.for_tables(&mut Changes::default(), MoveReason::Join, |t| {
            Ok(t.rebalance())
        })?;
        let mut full = c.full_plan_over(adopted);
        full.log = plan.log;
        Ok((c, full))
    }

    /// Every node and every VIP's whole table, in the safe order (live nodes, tables, the
    /// rest), for a kernel that may hold anything: recovery after a failed write. The data
    /// plane writes only the entries that differ from what it holds.
    pub fn full_plan(&self) -> Plan {
        self.full_plan_over(&Adopted::default())
    }

    /// [`Controller::full_plan`], also removing the VIPs and clearing the node slots that the
    /// kernel holds (`adopted`) and the controller does not know: those VIPs go before any
    /// node slot is cleared or taken down, so no route of theirs points at such a node.
    fn full_plan_over(&self, adopted: &Adopted) -> Plan {
        let mut steps = Vec::new();
        let node_steps = |live_now: bool| {
            self.nodes
                .values()
                .filter(move |n| live(n.state) == live_now)
                .map(|n| Step::Node {
                    id: n.id,
                    entry: n.entry(),
                })
        };
        steps.extend(node_steps(true));
        steps.extend(self.vips.values().map(|v| Step::Vip {
            spec: v.spec,
            routes: v.entries(),
        }));
        steps.extend(
            adopted
                .vips
                .keys()
                .filter(|k| !self.vips.contains_key(k))
                .map(|key| Step::RemoveVip { key: *key }),
        );
        steps.extend(node_steps(false));
        steps.extend(
            adopted
                .nodes
                .keys()
                .filter(|id| !self.nodes.contains_key(id) && **id != NODE_NONE)
                .map(|id| Step::ClearNode { id: *id }),
        );
        Plan {
            steps,
            persist: true,
            ..Plan::default()
        }
    }

    /// The controller a persisted state describes (nodes without configuration details: call
    /// [`Controller::configure`] next).
    pub fn from_state(s: &State) -> Result<Self, ControllerError> {
        let mut c = Self::empty();
        c.hash_seed = s.hash_seed;
        for (id, r) in &s.nodes {
            c.nodes.insert(
                *id,
                Node {
                    id: *id,
                    mac: [0; 6],
                    ipv4: None,
                    ipv6: None,
                    config_weight: r.weight,
                    advertised_weight: r.advertised_weight,
                    admin_weight: None,
                    admin_drain: false,
                    restarting: r.restarting,
                    // Set by `configure` once the operator's drain is known.
                    agent_draining: r.agent_draining.unwrap_or(r.status == NodeState::Draining),
                    state: r.status,
                    weight: r.weight,
                },
            );
            if let (Some(i), Some(q)) = (r.incarnation, r.sequence) {
                c.seen.insert(*id, (i, q));
            }
        }
        for v in &s.vips {
            let key = dataplane::vip_key(v.addr, v.port, v.proto);
            // The tables' node sets and states are the registry's: rebuild them from it so a
            // file whose tables disagree with its node list cannot split the two.
            let owners: Vec<Option<u32>> = v.table.owners().collect();
            let table = c.table_from_owners(&key, &owners, v.table.reserve())?;
            c.reserve = v.table.reserve();
            let mut moved = RouteSet::new(table.route_count());
            for r in state::expand(&v.moved) {
                moved.insert(r);
            }
            c.vips.insert(
                key,
                Vip {
                    spec: VipSpec {
                        key,
                        index: v.index,
                        // Set from the configuration by `configure`.
                        mode: ForwardMode::DsrL2,
                        hash: HashMode::FiveTuple,
                    },
                    table: Arc::new(table),
                    moved,
                    revision: 0,
                },
            );
        }
        Ok(c)
    }

    /// A table over the registry's nodes with the given owners (owners the registry does not
    /// know are dropped: their routes become unowned and are re-assigned by the next rebalance).
    fn table_from_owners(
        &self,
        key: &VipKey,
        owners: &[Option<u32>],
        reserve: Option<u32>,
    ) -> Result<RouteTable, ControllerError> {
        let known: Vec<Option<u32>> = owners
            .iter()
            .map(|o| {
                o.filter(|n| {
                    self.nodes
                        .get(n)
                        .is_some_and(|node| node.state == NodeState::Active)
                })
            })
            .collect();
        RouteTable::from_parts(
            self.nodes.values().map(|n| (n.id, n.info())),
            reserve.filter(|r| self.nodes.contains_key(r)),
            &known,
        )
        .map_err(route_err(key))
    }

    /// Takes node states and tables from the kernel where they differ from the file's: the
    /// daemon may have died after a push and before its save.
    fn adopt_kernel(&mut self, a: &Adopted) -> Result<(), ControllerError> {
        // The kernel's seed is the one its tables were forwarding with.
        if let Some(seed) = a.hash_seed {
            self.hash_seed = seed;
        }
        let mut changed = false;
        for (id, st) in &a.nodes {
            if let Some(n) = self.nodes.get_mut(id) {
                let s = state_from_kernel(*st);
                if n.state != s {
                    n.state = s;
                    changed = true;
                }
            }
        }
        let keys: Vec<VipKey> = self.vips.keys().copied().collect();
        for key in keys {
            let Some(k) = a.vips.get(&key) else { continue };
            let Some(v) = self.vips.get(&key) else {
                continue;
            };
            if k.routes.len() != v.table.route_count() as usize {
                continue;
            }
            let kernel_owners: Vec<Option<u32>> = k
                .routes
                .iter()
                .map(|e| (e.node != NODE_NONE).then_some(e.node))
                .collect();
            let mut kernel_moved = RouteSet::new(v.table.route_count());
            for (r, e) in k.routes.iter().enumerate() {
                if e.flags & ROUTE_F_MOVED != 0 {
                    kernel_moved.insert(r as u32);
                }
            }
            let same =
                v.table.owners().eq(kernel_owners.iter().copied()) && v.moved == kernel_moved;
            if same && !changed {
                continue;
            }
            let table = self.table_from_owners(&key, &kernel_owners, self.reserve)?;
            if let Some(v) = self.vips.get_mut(&key) {
                v.table = Arc::new(table);
                v.moved = kernel_moved;
                v.spec.index = k.index;
            }
        }
        Ok(())
    }

    /// Makes nodes, VIPs and the reserve match `cfg`: removed nodes leave every table and the
    /// kernel; new nodes start down (their agent or health check brings them up); changed
    /// weights apply at once; VIPs keep their index across edits and reorderings (a new VIP
    /// takes the lowest free index); a VIP whose route count changed starts a fresh table.
    pub fn configure(&mut self, cfg: &Config) -> Result<Plan, ControllerError> {
        // On a copy, so a refused configuration changes nothing (configuration is rare; the
        // tables are copied only as they change).
        let before = self.shape();
        let served = self.served();
        let mut next = self.clone();
        let mut ch = Changes::default();
        next.configure_inner(cfg, &mut ch)?;
        let mut plan = next.compile(&before, ch);
        next.report_served(&served, &mut plan);
        *self = next;
        Ok(plan)
    }

    fn configure_inner(&mut self, cfg: &Config, ch: &mut Changes) -> Result<(), ControllerError> {
        let invalid = |e: anyhow::Error| ControllerError::Invalid(format!("{e:#}"));
        // Nodes.
        let wanted: BTreeMap<u32, &config::NodeConfig> =
            cfg.nodes.iter().map(|n| (n.id, n)).collect();
        if self.reserve != cfg.daemon.reserve_node {
            // Cleared first (a validated config names only configured nodes, so a reserve
            // being removed always lands here) and set again below.
            self.for_tables(ch, MoveReason::Join, |t| t.set_reserve(None))?;
            self.reserve = None;
        }
        let gone: Vec<u32> = self
            .nodes
            .keys()
            .filter(|id| !wanted.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            ch.log
                .push(format!("node {id} is no longer configured: removed"));
            self.touch_node(ch, id);
            self.for_tables(ch, MoveReason::Removed, |t| t.remove(id))?;
            self.nodes.remove(&id);
            self.seen.remove(&id);
        }
        for (id, nc) in &wanted {
            let mac = match &nc.mac {
                Some(m) => config::parse_mac(m).map_err(invalid)?,
                None => [0; 6],
            };
            self.touch_node(ch, *id);
            match self.nodes.get_mut(id) {
                Some(n) => {
                    n.mac = mac;
                    n.ipv4 = nc.ipv4;
                    n.ipv6 = nc.ipv6;
                    n.config_weight = nc.weight;
                    if n.admin_drain != nc.drain || n.admin_weight != nc.admin_weight {
                        ch.persist = true;
                    }
                    n.admin_weight = nc.admin_weight;
                    n.admin_drain = nc.drain;
                }
                None => {
                    let n = Node {
                        id: *id,
                        mac,
                        ipv4: nc.ipv4,
                        ipv6: nc.ipv6,
                        config_weight: nc.weight,
                        advertised_weight: 0,
                        admin_weight: nc.admin_weight,
                        admin_drain: nc.drain,
                        agent_draining: false,
                        restarting: false,
                        state: NodeState::Down,
                        weight: nc.admin_weight.unwrap_or(nc.weight),
                    };
                    for v in self.vips.values_mut() {
                        Arc::make_mut(&mut v.table)
                            .add_down(*id, n.weight)
                            .map_err(route_err(&v.spec.key))?;
                    }
                    self.nodes.insert(*id, n);
                }
            }
            self.sync_weight(ch, *id)?;
            self.sync_drain(ch, *id)?;
        }
        // VIPs.
        let mut want_vips = BTreeMap::new();
        for v in &cfg.vips {
            let proto = config::parse_proto(&v.proto).map_err(invalid)?;
            want_vips.insert(dataplane::vip_key(v.addr, v.port, proto), v);
        }
        let gone: Vec<VipKey> = self
            .vips
            .keys()
            .filter(|k| !want_vips.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            ch.log.push(format!(
                "VIP {} is no longer configured: removed",
                dataplane::vip_display(&key)
            ));
            self.vips.remove(&key);
            ch.persist = true;
        }
        for (key, vc) in want_vips {
            let fresh = match self.vips.get_mut(&key) {
                Some(v) if v.table.route_count() == vc.routes => {
                    if v.spec.mode != vc.mode || v.spec.hash != vc.hash {
                        v.spec.mode = vc.mode;
                        v.spec.hash = vc.hash;
                        v.revision += 1;
                        ch.persist = true;
                    }
                    false
                }
                Some(v) => {
                    ch.log.push(format!(
                        "VIP {}: route count changed ({} -> {}); starting a fresh table",
                        dataplane::vip_display(&key),
                        v.table.route_count(),
                        vc.routes
                    ));
                    true
                }
                None => true,
            };
            if fresh {
                let index = match self.vips.get(&key) {
                    Some(v) => v.spec.index,
                    None => self.free_index()?,
                };
                let mut table = RouteTable::new(vc.routes).map_err(route_err(&key))?;
                for n in self.nodes.values() {
                    match n.state {
                        NodeState::Down => table.add_down(n.id, n.weight),
                        NodeState::Active => table.join(n.id, n.weight).map(|_| ()),
                        NodeState::Draining => table
                            .join(n.id, n.weight)
                            .and_then(|_| table.drain(n.id))
                            .map(|_| ()),
                    }
                    .map_err(route_err(&key))?;
                }
                if let Some(r) = self.reserve {
                    table.set_reserve(Some(r)).map_err(route_err(&key))?;
                }
                // A replaced VIP (new N) is written whole; the old one is dropped from the
                // routes-before map so the plan does not diff against a different N.
                ch.routes_before.remove(&key);
                self.vips.insert(
                    key,
                    Vip {
                        spec: VipSpec {
                            key,
                            index,
                            mode: vc.mode,
                            hash: vc.hash,
                        },
                        table: Arc::new(table),
                        moved: RouteSet::new(vc.routes),
                        revision: 0,
                    },
                );
                ch.persist = true;
            }
        }
        if self.reserve != cfg.daemon.reserve_node {
            let r = cfg.daemon.reserve_node;
            self.for_tables(ch, MoveReason::Join, |t| t.set_reserve(r))?;
            self.reserve = r;
        }
        Ok(())
    }

    /// Lowest VIP index no VIP uses.
    fn free_index(&self) -> Result<u32, ControllerError> {
        let used: BTreeSet<u32> = self.vips.values().map(|v| v.spec.index).collect();
        (0..lb_common::MAX_VIPS)
            .find(|i| !used.contains(i))
            .ok_or(ControllerError::NoVipIndex)
    }

    /// Applies a batch of inputs, one by one, and returns one plan for all of them: each
    /// route and node is written once, with its final value, and one persist covers the batch.
    pub fn apply(&mut self, inputs: &[Input]) -> Plan {
        let before = self.shape();
        let served = self.served();
        let mut ch = Changes::default();
        for input in inputs {
            self.apply_one(&mut ch, input);
        }
        let mut plan = self.compile(&before, ch);
        self.report_served(&served, &mut plan);
        plan
    }

    /// The VIPs with an active node, which takes their new flows (a draining node finishes
    /// its tracked flows only).
    pub fn served(&self) -> BTreeSet<VipKey> {
        self.vips
            .iter()
            .filter(|(_, v)| v.table.nodes().any(|(_, n)| n.state == NodeState::Active))
            .map(|(k, _)| *k)
            .collect()
    }

    /// Fills in which VIPs lost or found their last active node since `before`.
    fn report_served(&self, before: &BTreeSet<VipKey>, plan: &mut Plan) {
        let after = self.served();
        plan.unserved = before
            .iter()
            .filter(|k| self.vips.contains_key(k) && !after.contains(k))
            .copied()
            .collect();
        plan.served = after.difference(before).copied().collect();
    }

    fn apply_one(&mut self, ch: &mut Changes, input: &Input) {
        match input {
            Input::Membership(ev) => {
                if let Err(e) = self.on_event(ch, ev) {
                    // Cannot happen for a registry node (every table knows it); logged, not fatal.
                    ch.log.push(format!("membership {ev:?} not applied: {e}"));
                }
            }
            Input::Settled {
                vip,
                revision,
                routes,
            } => {
                let Some(v) = self.vips.get(vip) else { return };
                if v.revision != *revision {
                    return;
                }
                let clear: Vec<u32> = routes
                    .iter()
                    .copied()
                    .filter(|r| v.moved.contains(*r))
                    .collect();
                if clear.is_empty() {
                    return;
                }
                self.touch_routes(ch, vip, &clear);
                if let Some(v) = self.vips.get_mut(vip) {
                    for r in &clear {
                        v.moved.remove(*r);
                    }
                    v.revision += 1;
                }
                ch.persist = true;
            }
        }
    }

    fn on_event(&mut self, ch: &mut Changes, ev: &Event) -> Result<(), ControllerError> {
        let id = ev.node();
        let Some(node) = self.nodes.get(&id) else {
            ch.log
                .push(format!("membership {ev:?}: node {id} is not configured"));
            return Ok(());
        };
        let state = node.state;
        ch.log.push(format!("membership: {ev:?}"));
        self.touch_node(ch, id);
        match *ev {
            Event::NodeUp {
                weight, draining, ..
            } => {
                self.set_advertised(ch, id, weight);
                self.set_agent_draining(ch, id, draining);
                self.set_restarting(id, false);
                if state == NodeState::Down {
                    let w = self.nodes[&id].wanted_weight();
                    self.for_tables(ch, MoveReason::Join, |t| t.join(id, w))?;
                    if let Some(n) = self.nodes.get_mut(&id) {
                        n.state = NodeState::Active;
                        n.weight = w;
                    }
                }
                self.sync_weight(ch, id)?;
                self.sync_drain(ch, id)?;
            }
            Event::NodeDown {
                reason: DownReason::Restarted,
                ..
            } => {
                // Held down after a restart: drained, not failed (see `RestartPolicy`).
                self.set_restarting(id, true);
                self.sync_drain(ch, id)?;
            }
            Event::NodeDown { .. } => {
                self.set_restarting(id, false);
                if live(state) {
                    self.for_tables(ch, MoveReason::Failure, |t| t.fail(id))?;
                    self.set_state(id, NodeState::Down);
                }
            }
            Event::NodeDraining { .. } => {
                self.set_agent_draining(ch, id, true);
                self.sync_drain(ch, id)?;
            }
            Event::NodeUndrained { .. } => {
                self.set_agent_draining(ch, id, false);
                self.sync_drain(ch, id)?;
            }
            Event::WeightChanged { new, .. } => {
                self.set_advertised(ch, id, new);
                self.sync_weight(ch, id)?;
            }
            Event::NodeRestarted { .. } => {}
        }
        Ok(())
    }

    fn set_advertised(&mut self, ch: &mut Changes, id: u32, w: u32) {
        if let Some(n) = self.nodes.get_mut(&id)
            && n.advertised_weight != w
        {
            n.advertised_weight = w;
            ch.persist = true;
        }
    }

    fn set_restarting(&mut self, id: u32, on: bool) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.restarting = on;
        }
    }

    fn set_agent_draining(&mut self, ch: &mut Changes, id: u32, draining: bool) {
        if let Some(n) = self.nodes.get_mut(&id)
            && n.agent_draining != draining
        {
            n.agent_draining = draining;
            ch.persist = true;
        }
    }

    /// Brings an up node's state to what its agent and the operator want: draining if either
    /// says so, else active. A down node stays down (its next heartbeat decides).
    fn sync_drain(&mut self, ch: &mut Changes, id: u32) -> Result<(), ControllerError> {
        let Some(n) = self.nodes.get(&id) else {
            return Ok(());
        };
        let drain = n.agent_draining || n.admin_drain || n.restarting;
        match n.state {
            NodeState::Active if drain => {
                self.for_tables(ch, MoveReason::Drain, |t| t.drain(id))?;
                self.set_state(id, NodeState::Draining);
            }
            NodeState::Draining if !drain => {
                self.for_tables(ch, MoveReason::Join, |t| t.activate(id))?;
                self.set_state(id, NodeState::Active);
            }
            _ => {}
        }
        Ok(())
    }

    /// Brings the tables' weight of a node to its wanted weight (in any state: a draining or
    /// down node keeps the new weight for when it is active again).
    fn sync_weight(&mut self, ch: &mut Changes, id: u32) -> Result<(), ControllerError> {
        let Some(n) = self.nodes.get(&id) else {
            return Ok(());
        };
        let w = n.wanted_weight();
        if n.weight == w {
            return Ok(());
        }
        ch.log
            .push(format!("node {id}: weight {} -> {w}", n.weight));
        self.for_tables(ch, MoveReason::Weight, |t| t.set_weight(id, w))?;
        if let Some(n) = self.nodes.get_mut(&id) {
            n.weight = w;
        }
        ch.persist = true;
        Ok(())
    }

    fn set_state(&mut self, id: u32, s: NodeState) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.state = s;
        }
    }

    /// Records a node's kernel entry before the batch touches it.
    fn touch_node(&self, ch: &mut Changes, id: u32) {
        ch.nodes_before
            .entry(id)
            .or_insert_with(|| self.nodes.get(&id).map(Node::entry));
    }

    fn touch_routes(&self, ch: &mut Changes, key: &VipKey, routes: &[u32]) {
        let Some(v) = self.vips.get(key) else { return };
        let touched = ch
            .routes_before
            .entry(*key)
            .or_insert_with(|| Touched::new(v.table.route_count()));
        for r in routes {
            touched.touch(*r, || v.entry(*r));
        }
    }

    /// Runs `f` on every VIP's table; records the moves (first-touch route entries, moved
    /// flags for routes whose old owner is still live, notices to old owners). Every table
    /// holds the same nodes in the same states, and a refused table operation changes nothing,
    /// so an error comes from the first table, before any has changed.
    fn for_tables(
        &mut self,
        ch: &mut Changes,
        reason: MoveReason,
        f: impl Fn(&mut RouteTable) -> Result<Vec<Move>, RouteError>,
    ) -> Result<(), ControllerError> {
        for (key, v) in self.vips.iter_mut() {
            let moves = f(Arc::make_mut(&mut v.table)).map_err(route_err(key))?;
            ch.persist = true;
            if moves.is_empty() {
                continue;
            }
            v.revision += 1;
            let touched = ch
                .routes_before
                .entry(*key)
                .or_insert_with(|| Touched::new(v.table.route_count()));
            let mut by_node: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
            for m in &moves {
                touched.touch(m.route, || RouteEntry {
                    node: m.from.unwrap_or(NODE_NONE),
                    flags: if v.moved.contains(m.route) {
                        ROUTE_F_MOVED
                    } else {
                        0
                    },
                });
                if let Some(from) = m.from {
                    if v.table.node(from).is_some_and(|i| live(i.state)) {
                        v.moved.insert(m.route);
                    }
                    by_node.entry(from).or_default().push(m.route);
                }
            }
            for (node, mut routes) in by_node {
                routes.sort_unstable();
                ch.notices.push(Notice {
                    node,
                    vip: *key,
                    reason,
                    routes,
                });
            }
        }
        Ok(())
    }

    /// Each VIP's spec and route count, which is all [`Controller::compile`] needs of the
    /// state before a batch.
    fn shape(&self) -> Shape {
        self.vips
            .iter()
            .map(|(k, v)| (*k, (v.spec, v.table.route_count())))
            .collect()
    }

    /// The plan that takes the kernel from `before` to `self`.
    fn compile(&self, before: &Shape, ch: Changes) -> Plan {
        // A node is told of the routes it owned before the batch and does not own after it:
        // a route that came back, or passed through it, within the batch did not move for it.
        let mut owner_before: BTreeMap<VipKey, std::collections::HashMap<u32, u32>> =
            BTreeMap::new();
        let notices = ch
            .notices
            .into_iter()
            .filter_map(|mut n| {
                let v = self.vips.get(&n.vip)?;
                let before = owner_before.entry(n.vip).or_insert_with(|| {
                    ch.routes_before
                        .get(&n.vip)
                        .map(|t| t.before.iter().map(|(r, e)| (*r, e.node)).collect())
                        .unwrap_or_default()
                });
                n.routes.retain(|r| {
                    before.get(r) == Some(&n.node) && v.table.owner(*r) != Some(n.node)
                });
                (!n.routes.is_empty()).then_some(n)
            })
            .collect();
        let mut plan = Plan {
            persist: ch.persist,
            log: ch.log,
            notices,
            ..Plan::default()
        };
        let mut late = Vec::new();
        let mut clears = Vec::new();
        for (id, was) in &ch.nodes_before {
            let now = self.nodes.get(id).map(Node::entry);
            if now == *was {
                continue;
            }
            plan.persist = true;
            match now {
                None => clears.push(Step::ClearNode { id: *id }),
                Some(entry) => {
                    let becomes_live = entry.state == NODE_ACTIVE
                        || (entry.state == NODE_DRAINING
                            && was.is_none_or(|w| w.state == NODE_DOWN));
                    let step = Step::Node { id: *id, entry };
                    if becomes_live {
                        plan.steps.push(step);
                    } else {
                        late.push(step);
                    }
                }
            }
        }
        for (key, v) in &self.vips {
            // A new VIP, or one whose spec or route count changed, is written whole.
            if before.get(key) != Some(&(v.spec, v.table.route_count())) {
                plan.steps.push(Step::Vip {
                    spec: v.spec,
                    routes: v.entries(),
                });
                continue;
            }
            let mut changes: Vec<(u32, RouteEntry)> = ch
                .routes_before
                .get(key)
                .into_iter()
                .flat_map(|t| t.before.iter())
                .filter_map(|(r, old)| {
                    let new = v.entry(*r);
                    (new != *old).then_some((*r, new))
                })
                .collect();
            changes.sort_unstable_by_key(|c| c.0);
            if !changes.is_empty() {
                plan.steps.push(Step::Routes { key: *key, changes });
            }
        }
        // Removed VIPs go before any node is taken down or cleared: their routes may still
        // point at such a node.
        for key in before.keys() {
            if !self.vips.contains_key(key) {
                plan.steps.push(Step::RemoveVip { key: *key });
            }
        }
        plan.steps.extend(late);
        plan.steps.extend(clears);
        plan
    }

    // -----------------------------------------------------------------------------------------
    // Cluster mode
    // -----------------------------------------------------------------------------------------

    /// The controller a cluster's table revision describes: `state` (the leader's tables,
    /// node states and moved flags) with the node addresses and VIP modes of `cfg` (the
    /// configuration the revision carries) and the VIPs' revision counters. Refused when the
    /// two do not name the same nodes and VIPs.
    pub fn from_revision(
        state: &State,
        cfg: &Config,
        vip_revisions: &BTreeMap<VipKey, u64>,
    ) -> Result<Self, ControllerError> {
        let invalid = |e: anyhow::Error| ControllerError::Invalid(format!("{e:#}"));
        let mut c = Self::from_state(state)?;
        if c.nodes.len() != cfg.nodes.len() || c.vips.len() != cfg.vips.len() {
            return Err(ControllerError::Invalid(format!(
                "the revision's state has {} nodes and {} VIPs, its configuration {} and {}",
                c.nodes.len(),
                c.vips.len(),
                cfg.nodes.len(),
                cfg.vips.len()
            )));
        }
        for nc in &cfg.nodes {
            let n = c.nodes.get_mut(&nc.id).ok_or_else(|| {
                ControllerError::Invalid(format!("node {} has no state in the revision", nc.id))
            })?;
            n.mac = match &nc.mac {
                Some(m) => config::parse_mac(m).map_err(invalid)?,
                None => [0; 6],
            };
            n.ipv4 = nc.ipv4;
            n.ipv6 = nc.ipv6;
            n.config_weight = nc.weight;
            n.admin_weight = nc.admin_weight;
            n.admin_drain = nc.drain;
        }
        for vc in &cfg.vips {
            let proto = config::parse_proto(&vc.proto).map_err(invalid)?;
            let key = dataplane::vip_key(vc.addr, vc.port, proto);
            let v = c.vips.get_mut(&key).ok_or_else(|| {
                ControllerError::Invalid(format!(
                    "VIP {} has no table in the revision",
                    dataplane::vip_display(&key)
                ))
            })?;
            v.spec.mode = vc.mode;
            v.spec.hash = vc.hash;
            v.revision = vip_revisions.get(&key).copied().unwrap_or(0);
        }
        c.reserve = cfg.daemon.reserve_node;
        Ok(c)
    }

    /// Becomes `next` (a cluster revision) and returns the plan that takes the kernel there,
    /// in the same safe order as a batch's, writing only what differs. A new hash seed
    /// rewrites every VIP whole. Replay protection (`seen`) stays this balancer's own.
    pub fn replace_with(&mut self, mut next: Controller) -> Plan {
        let mut before = self.shape();
        let served = self.served();
        let mut ch = Changes {
            persist: true,
            ..Changes::default()
        };
        for id in self.nodes.keys().chain(next.nodes.keys()) {
            self.touch_node(&mut ch, *id);
        }
        if self.hash_seed != next.hash_seed {
            before.retain(|k, _| !next.vips.contains_key(k));
        }
        for (key, v) in &next.vips {
            let Some(old) = self.vips.get(key) else {
                continue;
            };
            if before.get(key) != Some(&(v.spec, v.table.route_count())) {
                continue;
            }
            let mut touched = Touched::new(v.table.route_count());
            if !Arc::ptr_eq(&old.table, &v.table) || old.moved != v.moved {
                for r in 0..v.table.route_count() {
                    let was = old.entry(r);
                    if was != v.entry(r) {
                        touched.touch(r, || was);
                    }
                }
            }
            ch.routes_before.insert(*key, touched);
        }
        next.seen = std::mem::take(&mut self.seen);
        next.seen.retain(|id, _| next.nodes.contains_key(id));
        *self = next;
        let mut plan = self.compile(&before, ch);
        self.report_served(&served, &mut plan);
        plan
    }

    /// What this controller's node states amount to as a detector's view: the leader turns
    /// the difference between this and the cluster's merged view into membership events.
    pub fn node_view(&self, id: u32) -> Option<crate::cluster::NodeView> {
        use crate::cluster::NodeView;
        let n = self.nodes.get(&id)?;
        Some(match n.state {
            NodeState::Down => NodeView::Down,
            _ if n.restarting => NodeView::Held,
            _ => NodeView::Up {
                weight: n.advertised_weight,
                draining: n.agent_draining,
            },
        })
    }

    /// Each VIP's revision counter (conntrack scans name the one they looked at).
    pub fn vip_revisions(&self) -> BTreeMap<VipKey, u64> {
        self.vips.iter().map(|(k, v)| (*k, v.revision)).collect()
    }

    // -----------------------------------------------------------------------------------------
    // Views
    // -----------------------------------------------------------------------------------------

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn node(&self, id: u32) -> Option<&Node> {
        self.nodes.get(&id)
    }

    pub fn vips(&self) -> impl Iterator<Item = &Vip> {
        self.vips.values()
    }

    pub fn vip(&self, key: &VipKey) -> Option<&Vip> {
        self.vips.get(key)
    }

    /// Records the last heartbeat accepted from a node (persisted for replay protection).
    pub fn set_seen(&mut self, id: u32, incarnation: u64, sequence: u64) {
        if self.nodes.contains_key(&id) {
            self.seen.insert(id, (incarnation, sequence));
        }
    }

    pub fn seen(&self, id: u32) -> Option<(u64, u64)> {
        self.seen.get(&id).copied()
    }

    /// What to persist. Cheap: tables are shared, not copied.
    pub fn snapshot(&self) -> State {
        let mut st = State::new();
        st.hash_seed = self.hash_seed;
        for n in self.nodes.values() {
            let (inc, seq) = self.seen.get(&n.id).copied().unzip();
            st.nodes.insert(
                n.id,
                NodeRecord {
                    weight: n.weight,
                    status: n.state,
                    advertised_weight: n.advertised_weight,
                    agent_draining: Some(n.agent_draining),
                    restarting: n.restarting,
                    incarnation: inc,
                    sequence: seq,
                },
            );
        }
        for v in self.vips.values() {
            st.vips.push(VipRecord {
                addr: dataplane::key_ip(&v.spec.key),
                port: u16::from_be(v.spec.key.port),
                proto: v.spec.key.proto,
                index: v.spec.index,
                table: Arc::clone(&v.table),
                moved: state::ranges(v.moved.iter()),
            });
        }
        st
    }
}

#[cfg(test)]
mod tests;
