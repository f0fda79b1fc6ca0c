//! Route assignment for one VIP: which node owns each of the VIP's N route IDs. Pure: no I/O,
//! no clock, no randomness, so the same table and the same events always give the same table
//! (the daemon can replay, persist and later share it between balancers).
//!
//! # Model
//! The data plane hashes a flow onto a route ID in `0..N` and sends it to that route's owner.
//! Moving a route breaks (or forces a connection-table lookup for) the flows on it, so the
//! control plane moves as few routes as possible. Nodes are `NODES` indices with a weight
//! (>= 1) and a [`NodeState`]. The **share holders** are the active nodes other than the reserve
//! (or the reserve alone, when it is the only active node). Node `i`'s share is
//! `s_i = N * w_i / W` with `W` the share holders' total weight, in exact `u64` arithmetic.
//!
//! # Invariant and optimality
//! After every event (except a failover to the reserve, below) each share holder owns
//! `floor(s_i)` or `ceil(s_i)` routes, every other node owns none, and a route is unowned only
//! when there is no share holder. An event that changes the share holders or their weights (or
//! takes routes from a node) runs one [`RouteTable::rebalance`]; other events move nothing:
//! 1. Targets `t_i ∈ {floor(s_i), ceil(s_i)}` with `Σ t_i = N`: the `E = N - Σ floor(s_i)` extra
//!    routes go first to nodes that already own more than their floor (each such slot saves a
//!    move), least over their share first, so the nodes most over their share give first.
//! 2. Donors: every route of a non-holder (and every unowned route), plus each holder's
//!    `c_i - t_i` excess, taking that donor's **highest route IDs** (as HaloD does).
//! 3. The moving routes, highest ID first, each go to the holder most under its target.
//!
//! Every final table must give each holder `t_i` from such a set, and must move at least the
//! routes counted in step 2; choosing the ceil slots as in step 1 makes that count minimal:
//! `moves = Σ_non-holders c_i + Σ_holders max(0, c_i - floor_i) - min(E, #{c_i > floor_i, s_i
//! not integral})` (the tests check it against brute force). From a balanced table with equal
//! weights this is exactly HaloD: a join moves only routes to the new node (`floor(N / M)` of
//! them, the donors' highest IDs, from the nodes with the most routes), and a leave, failure
//! or drain moves only that node's routes, each to the node most under its share. With
//! unequal weights the floor/ceil bound can force a few extra moves (a join may have to bump
//! an old node from floor to ceil, a departure may push another node under its new floor);
//! they are unavoidable for the invariant and included in the minimum. Extra routes that do
//! not save a move go to the node the event is about (e.g. the joiner) first. Other ties go
//! by node index (lower index gives first and receives first), never by map iteration order.
//! Cost per event: `O(N + M log M)` for `M` nodes (about 80 µs at N = 65536, M = 1000).
//!
//! # Reserve node (HaloD's failover node)
//! An optional reserve is a known node with share 0: while other share holders exist it owns
//! nothing after a rebalance. When an active node **fails** and the reserve is active, all the
//! failed node's routes go to the reserve and nothing else moves: one target, one cheap write,
//! and the survivors' flows are untouched. This is the one state that breaks the invariant
//! (the reserve holds routes, see [`RouteTable::is_balanced`]). The next event that changes the
//! share holders or their weights (join, rejoin, activate, drain, remove, weight change) or an
//! explicit [`RouteTable::rebalance`] empties the reserve first: its routes count as donated and
//! go to the nodes under their targets, so a rejoining node gets back exactly the reserve's
//! routes when it is the only one short. Planned departures (drain, remove) never use the
//! reserve: they spread directly, since the cost has to be paid anyway. If the reserve is the
//! only active node, it is the sole share holder and owns every route.
//!
//! The reserve is not emptied by events that leave the share holders alone (removing a down
//! node, changing a draining node's weight).
//!
//! # API
//! Events are methods ([`RouteTable::join`], `fail`, `drain`, `activate`, `remove`,
//! `set_weight`, `set_reserve`, `rebalance`) or [`Event`] values for [`RouteTable::apply`].
//! Invalid events return a typed [`RouteError`] and change nothing; repeating a state change
//! (failing a down node, draining a draining one) is a no-op, but a duplicate join is an error.
//! The serde form is plain (`routes`, `nodes`, `reserve`, and `owners` as bit-packed node list
//! positions in base64) and validated on load, as is a table rebuilt with
//! [`RouteTable::from_parts`].
//! Event results are [`Move`] lists (in descending route order) that the daemon turns into map
//! writes, "route moved" notices to the old owners and `ROUTE_F_MOVED` flags.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt;

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use lb_common::{DEFAULT_ROUTES_PER_VIP, MAX_NODES, MAX_ROUTES_PER_VIP};
use serde::{Deserialize, Serialize};

/// `owners` sentinel for an unowned route (never a valid node index: those are `< MAX_NODES`).
const NO_OWNER: u32 = u32::MAX;

/// Life-cycle state of a node in a route table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Takes a share of the routes (unless it is the reserve).
    Active,
    /// Owns no routes and gets none; stays known so its tracked flows can finish.
    Draining,
    /// Failed (or administratively down): owns no routes; may rejoin.
    Down,
}

impl NodeState {
    /// Lower-case name, as used in JSON and the CLI.
    pub const fn as_str(self) -> &'static str {
        match self {
            NodeState::Active => "active",
            NodeState::Draining => "draining",
            NodeState::Down => "down",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node's weight and state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Relative capacity, at least 1.
    pub weight: u32,
    /// Current state.
    pub state: NodeState,
}

/// One route changing owner. `from` is `None` for a previously unowned route, `to` is `None`
/// only when no share holder remains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Move {
    /// Route ID in `0..N`.
    pub route: u32,
    /// Previous owner.
    pub from: Option<u32>,
    /// New owner.
    pub to: Option<u32>,
}

/// A membership event, for callers that log, persist or replay events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// [`RouteTable::join`].
    Join { node: u32, weight: u32 },
    /// [`RouteTable::fail`].
    Fail { node: u32 },
    /// [`RouteTable::remove`].
    Remove { node: u32 },
    /// [`RouteTable::drain`].
    Drain { node: u32 },
    /// [`RouteTable::activate`].
    Activate { node: u32 },
    /// [`RouteTable::set_weight`].
    SetWeight { node: u32, weight: u32 },
    /// [`RouteTable::set_reserve`].
    SetReserve { node: Option<u32> },
    /// [`RouteTable::rebalance`].
    Rebalance,
}

/// Why an event or a persisted table was rejected. A rejected event changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// N outside `1..=MAX_ROUTES_PER_VIP`.
    #[error("route count {0} is out of range (1..={MAX_ROUTES_PER_VIP})")]
    InvalidRouteCount(u64),
    /// A node index that cannot be a `NODES` index.
    #[error("node index {0} is out of range (must be below {MAX_NODES})")]
    NodeOutOfRange(u32),
    /// Weight 0.
    #[error("node {0}: weight must be at least 1")]
    ZeroWeight(u32),
    /// The event names a node the table does not know.
    #[error("node {0} is not in the route table")]
    UnknownNode(u32),
    /// `join` for a node that is already active or draining.
    #[error("node {node} is already a member ({state})")]
    AlreadyMember { node: u32, state: NodeState },
    /// The event does not apply to the node's state (e.g. draining a down node).
    #[error("cannot {event} node {node}: it is {state}")]
    InvalidTransition {
        node: u32,
        state: NodeState,
        event: &'static str,
    },
    /// A persisted table that does not hold together.
    #[error("invalid route table: {0}")]
    Invalid(String),
}

/// The route table of one VIP: N route IDs, each owned by at most one node.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "TableRepr")]
pub struct RouteTable {
    /// Owner of each route, `NO_OWNER` when unowned.
    owners: Vec<u32>,
    nodes: BTreeMap<u32, NodeInfo>,
    reserve: Option<u32>,
    /// Cache: routes owned per node index (length `MAX_NODES`).
    counts: Vec<u32>,
    /// Cache: unowned routes.
    unowned: u32,
}

impl PartialEq for RouteTable {
    fn eq(&self, other: &Self) -> bool {
        self.owners == other.owners && self.nodes == other.nodes && self.reserve == other.reserve
    }
}

impl Eq for RouteTable {}

impl Default for RouteTable {
    /// An empty table with [`DEFAULT_ROUTES_PER_VIP`] routes.
    fn default() -> Self {
        Self::empty(DEFAULT_ROUTES_PER_VIP as usize)
    }
}

impl RouteTable {
    /// An empty table (no nodes, every route unowned) with `routes` route IDs.
    pub fn new(routes: u32) -> Result<Self, RouteError> {
        check_route_count(routes as usize)?;
        Ok(Self::empty(routes as usize))
    }

    fn empty(routes: usize) -> Self {
        Self {
            owners: vec![NO_OWNER; routes],
            nodes: BTreeMap::new(),
            reserve: None,
            counts: vec![0; MAX_NODES as usize],
            unowned: routes as u32,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Accessors
    // -----------------------------------------------------------------------------------------

    /// N, the number of route IDs.
    pub fn route_count(&self) -> u32 {
        self.owners.len() as u32
    }

    /// Owner of `route` (`None` if unowned or out of range).
    pub fn owner(&self, route: u32) -> Option<u32> {
        self.owners.get(route as usize).copied().and_then(owner_opt)
    }

    /// Owner of every route, in route order (what the daemon writes to `ROUTES`).
    pub fn owners(&self) -> impl ExactSizeIterator<Item = Option<u32>> + '_ {
        self.owners.iter().map(|&o| owner_opt(o))
    }

    /// Routes owned by `node` (0 for unknown nodes).
    pub fn count(&self, node: u32) -> u32 {
        self.counts.get(node as usize).copied().unwrap_or(0)
    }

    /// Routes owned by every known node.
    pub fn counts(&self) -> BTreeMap<u32, u32> {
        self.nodes.keys().map(|&id| (id, self.count(id))).collect()
    }

    /// Routes without an owner (all of them while there is no share holder).
    pub fn unowned(&self) -> u32 {
        self.unowned
    }

    /// Route IDs owned by `node`, ascending.
    pub fn routes_of(&self, node: u32) -> Vec<u32> {
        if node == NO_OWNER {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(self.count(node) as usize);
        out.extend(
            self.owners
                .iter()
                .enumerate()
                .filter(|&(_, &o)| o == node)
                .map(|(r, _)| r as u32),
        );
        out
    }

    /// A node's weight and state.
    pub fn node(&self, node: u32) -> Option<NodeInfo> {
        self.nodes.get(&node).copied()
    }

    /// Every known node, by index.
    pub fn nodes(&self) -> impl Iterator<Item = (u32, NodeInfo)> + '_ {
        self.nodes.iter().map(|(&id, &info)| (id, info))
    }

    /// The reserve node, if one is designated.
    pub fn reserve(&self) -> Option<u32> {
        self.reserve
    }

    /// The share holders `(node, weight)` by index: the active non-reserve nodes, or the
    /// reserve alone if it is the only active node.
    pub fn share_holders(&self) -> Vec<(u32, u32)> {
        let holders: Vec<(u32, u32)> = self
            .nodes
            .iter()
            .filter(|&(&id, info)| info.state == NodeState::Active && Some(id) != self.reserve)
            .map(|(&id, info)| (id, info.weight))
            .collect();
        if !holders.is_empty() {
            return holders;
        }
        match self
            .reserve
            .and_then(|r| self.nodes.get(&r).map(|i| (r, i)))
        {
            Some((r, info)) if info.state == NodeState::Active => vec![(r, info.weight)],
            _ => holders,
        }
    }

    /// `(floor, ceil)` of each share holder's share `N * w / W`.
    pub fn shares(&self) -> BTreeMap<u32, (u32, u32)> {
        let holders = self.share_holders();
        let total: u64 = holders.iter().map(|&(_, w)| u64::from(w)).sum();
        let n = self.owners.len() as u64;
        holders
            .iter()
            .map(|&(id, w)| {
                let num = n * u64::from(w);
                let floor = (num / total) as u32;
                (id, (floor, floor + u32::from(!num.is_multiple_of(total))))
            })
            .collect()
    }

    /// Whether the invariant holds: each share holder owns floor or ceil of its share, nobody
    /// else owns anything, and no route is unowned while a share holder exists. False only
    /// after a failover to the reserve (or for a table loaded from elsewhere).
    pub fn is_balanced(&self) -> bool {
        let shares = self.shares();
        if shares.is_empty() {
            return self.unowned == self.route_count();
        }
        let holders_total: u64 = shares.keys().map(|&id| u64::from(self.count(id))).sum();
        holders_total == u64::from(self.route_count())
            && shares.iter().all(|(&id, &(lo, hi))| {
                let c = self.count(id);
                lo <= c && c <= hi
            })
    }

    // -----------------------------------------------------------------------------------------
    // Events
    // -----------------------------------------------------------------------------------------

    /// Apply one [`Event`].
    pub fn apply(&mut self, event: Event) -> Result<Vec<Move>, RouteError> {
        match event {
            Event::Join { node, weight } => self.join(node, weight),
            Event::Fail { node } => self.fail(node),
            Event::Remove { node } => self.remove(node),
            Event::Drain { node } => self.drain(node),
            Event::Activate { node } => self.activate(node),
            Event::SetWeight { node, weight } => self.set_weight(node, weight),
            Event::SetReserve { node } => self.set_reserve(node),
            Event::Rebalance => Ok(self.rebalance()),
        }
    }

    /// A new node, or a down node coming back, becomes active with `weight` and takes its
    /// share. Joining an active or draining node is an error (use [`Self::activate`] or
    /// [`Self::set_weight`]).
    pub fn join(&mut self, node: u32, weight: u32) -> Result<Vec<Move>, RouteError> {
        if node >= MAX_NODES {
            return Err(RouteError::NodeOutOfRange(node));
        }
        if weight == 0 {
            return Err(RouteError::ZeroWeight(node));
        }
        if let Some(info) = self.nodes.get(&node)
            && info.state != NodeState::Down
        {
            return Err(RouteError::AlreadyMember {
                node,
                state: info.state,
            });
        }
        Ok(self.change(&[node], |t| {
            t.nodes.insert(
                node,
                NodeInfo {
                    weight,
                    state: NodeState::Active,
                },
            );
        }))
    }

    /// Makes a new node known as down with `weight`: it owns and takes nothing until it joins.
    /// Nothing moves. A node the table already knows is an error.
    pub fn add_down(&mut self, node: u32, weight: u32) -> Result<(), RouteError> {
        if node >= MAX_NODES {
            return Err(RouteError::NodeOutOfRange(node));
        }
        if weight == 0 {
            return Err(RouteError::ZeroWeight(node));
        }
        if let Some(info) = self.nodes.get(&node) {
            return Err(RouteError::AlreadyMember {
                node,
                state: info.state,
            });
        }
        self.nodes.insert(
            node,
            NodeInfo {
                weight,
                state: NodeState::Down,
            },
        );
        Ok(())
    }

    /// The node failed: it becomes down. If a reserve is designated and active, all the
    /// node's routes go to it and nothing else moves; otherwise they spread to the nodes most
    /// under their share. Failing a down node does nothing.
    pub fn fail(&mut self, node: u32) -> Result<Vec<Move>, RouteError> {
        let info = self.known(node)?;
        match info.state {
            NodeState::Down => Ok(Vec::new()),
            NodeState::Draining => {
                self.set_state(node, NodeState::Down);
                Ok(Vec::new())
            }
            NodeState::Active => {
                let failover = self.reserve.filter(|&r| {
                    r != node
                        && self
                            .nodes
                            .get(&r)
                            .is_some_and(|i| i.state == NodeState::Active)
                });
                match failover {
                    Some(reserve) => {
                        self.set_state(node, NodeState::Down);
                        Ok(self.move_all(node, reserve))
                    }
                    None => Ok(self.change(&[node], |t| t.set_state(node, NodeState::Down))),
                }
            }
        }
    }

    /// Forget the node (it must be added again with [`Self::join`]); its routes spread to the
    /// nodes most under their share. Removing the reserve clears the designation.
    pub fn remove(&mut self, node: u32) -> Result<Vec<Move>, RouteError> {
        self.known(node)?;
        Ok(self.change(&[node], |t| {
            t.nodes.remove(&node);
            if t.reserve == Some(node) {
                t.reserve = None;
            }
        }))
    }

    /// The node stops taking new flows: its routes spread to the nodes most under their
    /// share, and it stays known as draining (its tracked flows finish). Draining a draining
    /// node does nothing; draining a down node is an error.
    pub fn drain(&mut self, node: u32) -> Result<Vec<Move>, RouteError> {
        let info = self.known(node)?;
        match info.state {
            NodeState::Draining => Ok(Vec::new()),
            NodeState::Down => Err(RouteError::InvalidTransition {
                node,
                state: info.state,
                event: "drain",
            }),
            NodeState::Active => {
                Ok(self.change(&[node], |t| t.set_state(node, NodeState::Draining)))
            }
        }
    }

    /// A draining or down node becomes active again with its weight and takes its share
    /// (undrain). Activating an active node does nothing.
    pub fn activate(&mut self, node: u32) -> Result<Vec<Move>, RouteError> {
        let info = self.known(node)?;
        if info.state == NodeState::Active {
            return Ok(Vec::new());
        }
        Ok(self.change(&[node], |t| t.set_state(node, NodeState::Active)))
    }

    /// Change a node's weight (in any state); if it holds a share, routes move to or from it.
    pub fn set_weight(&mut self, node: u32, weight: u32) -> Result<Vec<Move>, RouteError> {
        let info = self.known(node)?;
        if weight == 0 {
            return Err(RouteError::ZeroWeight(node));
        }
        if info.weight == weight {
            return Ok(Vec::new());
        }
        Ok(self.change(&[node], |t| {
            if let Some(i) = t.nodes.get_mut(&node) {
                i.weight = weight;
            }
        }))
    }

    /// Designate (or, with `None`, clear) the reserve. A new reserve gives up its share; a
    /// former reserve that is active takes one.
    pub fn set_reserve(&mut self, node: Option<u32>) -> Result<Vec<Move>, RouteError> {
        if let Some(n) = node {
            self.known(n)?;
        }
        if node == self.reserve {
            return Ok(Vec::new());
        }
        let affected: Vec<u32> = self.reserve.into_iter().chain(node).collect();
        Ok(self.change(&affected, |t| t.reserve = node))
    }

    /// Restore the invariant with the fewest moves (e.g. to empty the reserve after a
    /// failover once the failed node is known to stay away). A no-op on a balanced table.
    pub fn rebalance(&mut self) -> Vec<Move> {
        self.rebalance_for(None)
    }

    /// [`Self::rebalance`]; `prefer` (the node an event is about) wins ties for the extra
    /// routes that do not save a move, so that after a join, as far as the invariant allows,
    /// only the new node receives routes.
    fn rebalance_for(&mut self, prefer: Option<u32>) -> Vec<Move> {
        let holders = self.share_holders();
        // Routes each node index gives up: non-holders (including a node just removed from
        // `nodes`) give up everything. Unowned routes move only if someone can take them.
        let mut excess = self.counts.clone();
        let take_unowned = !holders.is_empty();
        let mut receivers: BinaryHeap<(u32, Reverse<u32>)> = BinaryHeap::new();
        for (&(id, _), target) in holders.iter().zip(self.targets(&holders, prefer)) {
            let c = self.counts[id as usize];
            excess[id as usize] = c.saturating_sub(target);
            if target > c {
                receivers.push((target - c, Reverse(id)));
            }
        }
        let total = excess.iter().map(|&e| e as usize).sum::<usize>()
            + if take_unowned {
                self.unowned as usize
            } else {
                0
            };
        let mut moves = Vec::with_capacity(total);
        for (r, owner) in self.owners.iter().enumerate().rev() {
            if moves.len() == total {
                break;
            }
            let give = match excess.get_mut(*owner as usize) {
                Some(e) if *e > 0 => {
                    *e -= 1;
                    true
                }
                Some(_) => false,
                None => take_unowned, // NO_OWNER
            };
            if give {
                moves.push(Move {
                    route: r as u32,
                    from: owner_opt(*owner),
                    to: None,
                });
            }
        }
        for mv in &mut moves {
            // Most under target first, ties to the lower node index.
            if let Some((deficit, Reverse(to))) = receivers.pop() {
                if deficit > 1 {
                    receivers.push((deficit - 1, Reverse(to)));
                }
                mv.to = Some(to);
            }
            self.reassign(mv.route, mv.to);
        }
        moves
    }

    // -----------------------------------------------------------------------------------------
    // Internals
    // -----------------------------------------------------------------------------------------

    fn known(&self, node: u32) -> Result<NodeInfo, RouteError> {
        self.nodes
            .get(&node)
            .copied()
            .ok_or(RouteError::UnknownNode(node))
    }

    fn set_state(&mut self, node: u32, state: NodeState) {
        if let Some(i) = self.nodes.get_mut(&node) {
            i.state = state;
        }
    }

    /// Apply a membership change and rebalance if it changed the share holders or their
    /// weights, or if one of the `affected` nodes owns routes. Otherwise nothing moves (so,
    /// e.g., removing a down node leaves a failover on the reserve in place). The first
    /// affected node is preferred for extra routes (see [`Self::targets`]).
    fn change(&mut self, affected: &[u32], f: impl FnOnce(&mut Self)) -> Vec<Move> {
        let before = self.share_holders();
        f(self);
        if before != self.share_holders() || affected.iter().any(|&n| self.count(n) > 0) {
            self.rebalance_for(affected.first().copied())
        } else {
            Vec::new()
        }
    }

    /// Failover: every route of `from` goes to `to`, nothing else moves.
    fn move_all(&mut self, from: u32, to: u32) -> Vec<Move> {
        let mut moves = Vec::with_capacity(self.count(from) as usize);
        for (r, owner) in self.owners.iter_mut().enumerate().rev() {
            if *owner == from {
                *owner = to;
                moves.push(Move {
                    route: r as u32,
                    from: Some(from),
                    to: Some(to),
                });
            }
        }
        self.counts[from as usize] = 0;
        self.counts[to as usize] += moves.len() as u32;
        moves
    }

    fn reassign(&mut self, route: u32, to: Option<u32>) {
        let slot = &mut self.owners[route as usize];
        match owner_opt(*slot) {
            Some(old) => self.counts[old as usize] -= 1,
            None => self.unowned -= 1,
        }
        *slot = to.unwrap_or(NO_OWNER);
        match to {
            Some(new) => self.counts[new as usize] += 1,
            None => self.unowned += 1,
        }
    }

    /// Targets `t_i ∈ {floor(s_i), ceil(s_i)}`, `Σ t_i = N`, in `holders` order, minimising
    /// `Σ max(0, c_i - t_i)`: the extra routes go first to holders owning more than their
    /// floor (each saves a move), least over their share first (ties: higher index, so lower
    /// indices give first, as in HaloD); the rest (which cannot save a move) go to `prefer`
    /// first, then to the holders most under their share (ties: lower index).
    fn targets(&self, holders: &[(u32, u32)], prefer: Option<u32>) -> Vec<u32> {
        let n = self.owners.len() as u64;
        let total: u64 = holders.iter().map(|&(_, w)| u64::from(w)).sum();
        if total == 0 {
            return Vec::new();
        }
        let mut targets = Vec::with_capacity(holders.len());
        // (index into holders, over target, c*W - N*w)
        let mut candidates: Vec<(usize, bool, i128)> = Vec::new();
        let mut floors: u64 = 0;
        for (k, &(id, w)) in holders.iter().enumerate() {
            let num = n * u64::from(w);
            let floor = num / total;
            floors += floor;
            targets.push(floor as u32);
            if !num.is_multiple_of(total) {
                let c = u64::from(self.counts[id as usize]);
                let over = i128::from(c) * i128::from(total) - i128::from(num);
                candidates.push((k, c > floor, over));
            }
        }
        let extra = (n - floors) as usize;
        if extra > 0 {
            candidates.sort_unstable_by(|a, b| {
                let (ia, ib) = (holders[a.0].0, holders[b.0].0);
                let pref = |over: bool, id: u32| !over && Some(id) == prefer;
                b.1.cmp(&a.1)
                    .then(pref(b.1, ib).cmp(&pref(a.1, ia)))
                    .then(a.2.cmp(&b.2))
                    .then(if a.1 { ib.cmp(&ia) } else { ia.cmp(&ib) })
            });
            for &(k, _, _) in candidates.iter().take(extra) {
                targets[k] += 1;
            }
        }
        targets
    }
}

fn owner_opt(o: u32) -> Option<u32> {
    (o != NO_OWNER).then_some(o)
}

fn check_route_count(routes: usize) -> Result<(), RouteError> {
    if routes == 0 || routes > MAX_ROUTES_PER_VIP as usize {
        return Err(RouteError::InvalidRouteCount(routes as u64));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Persistence
// ---------------------------------------------------------------------------------------------

/// One node in the persisted form.
#[derive(Serialize, Deserialize)]
struct NodeRecord {
    node: u32,
    weight: u32,
    state: NodeState,
}

/// Persisted form: plain, validated on load (the caches are rebuilt, never trusted).
///
/// - `routes`: N, the number of route IDs (`1..=MAX_ROUTES_PER_VIP`).
/// - `nodes`: every known node as `{node, weight, state}`, sorted by node index, each once.
/// - `reserve`: the reserve's node index, or `null`.
/// - `owners`: `"<width>:<base64>"`: route `r`'s owner is the `width`-bit value at bits
///   `r * width ..` of the standard-alphabet, padded base64 bytes, least significant bit first
///   (bit `b` is bit `b % 8` of byte `b / 8`); 0 is unowned, `k` is `nodes[k - 1]`. Written
///   with the fewest bits that hold `nodes.len()` (at least 1, at most 13 for `MAX_NODES`),
///   read with any width in `1..=13`; the bytes are exactly `ceil(routes * width / 8)`, the
///   unused bits of the last byte are 0 and every value is at most `nodes.len()`.
///
/// The size depends only on N and the node count, not on the table's history. The previous
/// form, runs `[[owner or null, length], ...]`, was small for tables built by joins but a
/// failure deals the failed node's routes out one at a time, so after churn most runs had
/// length 1 and it was larger than one number per route. Measured
/// (`persisted_size_packed_vs_per_route`, compact JSON, 65536 routes, 20 nodes, 5-bit values):
///
/// | table                              | packed | per route | runs              |
/// |------------------------------------|--------|-----------|-------------------|
/// | equal weights, 20 joins            | 55_461 | 164_680   | 2_330 (171)       |
/// | equal weights, +50 join/fail       | 55_445 | 159_203   | 293_446 (45_546)  |
/// | weights 1..=100, 20 joins          | 55_480 | 160_342   | 2_246 (164)       |
/// | weights 1..=100, +50 join/fail     | 55_455 | 142_740   | 240_703 (38_938)  |
///
/// (bytes; run counts in parentheses). A fresh table is larger than as runs, but no history
/// makes it grow.
#[derive(Serialize, Deserialize)]
struct TableRepr {
    routes: u32,
    nodes: Vec<NodeRecord>,
    reserve: Option<u32>,
    owners: String,
}

/// Widest owner value in the persisted form: enough for `MAX_NODES` nodes.
const MAX_OWNER_WIDTH: u32 = 13;
const _: () = assert!(MAX_NODES < 1 << MAX_OWNER_WIDTH);

/// Bits needed for the owner values `0..=nodes` (at least 1).
fn owner_width(nodes: usize) -> u32 {
    (usize::BITS - nodes.leading_zeros()).max(1)
}

impl From<&RouteTable> for TableRepr {
    fn from(t: &RouteTable) -> Self {
        // Node index -> 1-based position in the sorted node list (0 for unowned).
        let mut index = vec![0u64; MAX_NODES as usize];
        for (k, &node) in t.nodes.keys().enumerate() {
            index[node as usize] = k as u64 + 1;
        }
        let width = owner_width(t.nodes.len());
        let mut bytes = Vec::with_capacity((t.owners.len() * width as usize).div_ceil(8));
        let (mut acc, mut bits) = (0u64, 0u32);
        for &o in &t.owners {
            if o != NO_OWNER {
                acc |= index[o as usize] << bits;
            }
            bits += width;
            while bits >= 8 {
                bytes.push(acc as u8);
                acc >>= 8;
                bits -= 8;
            }
        }
        if bits > 0 {
            bytes.push(acc as u8);
        }
        Self {
            routes: t.route_count(),
            nodes: t
                .nodes
                .iter()
                .map(|(&node, i)| NodeRecord {
                    node,
                    weight: i.weight,
                    state: i.state,
                })
                .collect(),
            reserve: t.reserve,
            owners: format!("{width}:{}", BASE64.encode(bytes)),
        }
    }
}

/// Serialized through [`TableRepr`] from a borrow (serde's `into` would clone the table first).
impl Serialize for RouteTable {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        TableRepr::from(self).serialize(s)
    }
}

/// The owner values (0 unowned, `k` the k-th node) of `routes` routes from a persisted
/// `"<width>:<base64>"`, checked as [`TableRepr`] describes: every value is at most `nodes`.
fn decode_owners(owners: &str, routes: u32, nodes: usize) -> Result<Vec<u16>, RouteError> {
    let invalid = |msg: String| RouteError::Invalid(format!("owners: {msg}"));
    let Some((width, data)) = owners.split_once(':') else {
        return Err(invalid(r#"expected "<width>:<base64>""#.into()));
    };
    if width.is_empty() || !width.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(format!("width {width:?} is not a number")));
    }
    let width = match width.parse::<u32>() {
        Ok(w) if (1..=MAX_OWNER_WIDTH).contains(&w) => w,
        _ => {
            return Err(invalid(format!(
                "width {width} is out of range (1..={MAX_OWNER_WIDTH})"
            )));
        }
    };
    let bytes = BASE64
        .decode(data)
        .map_err(|e| invalid(format!("bad base64: {e}")))?;
    let need = (u64::from(routes) * u64::from(width)).div_ceil(8);
    if bytes.len() as u64 != need {
        return Err(invalid(format!(
            "{} bytes, {routes} routes of {width} bits need {need}",
            bytes.len()
        )));
    }
    let mask = (1u64 << width) - 1;
    let mut values = Vec::with_capacity(routes as usize);
    let (mut acc, mut bits, mut next) = (0u64, 0u32, 0usize);
    for route in 0..routes {
        while bits < width {
            acc |= u64::from(bytes[next]) << bits;
            next += 1;
            bits += 8;
        }
        let k = acc & mask;
        acc >>= width;
        bits -= width;
        if k > nodes as u64 {
            return Err(invalid(format!(
                "route {route} has owner {k}, there are {nodes} nodes"
            )));
        }
        values.push(k as u16);
    }
    // The length check leaves fewer than 8 bits: the unused top of the last byte.
    if acc != 0 {
        return Err(invalid(format!(
            "the unused {bits} bits after the last route are not zero"
        )));
    }
    Ok(values)
}

impl TryFrom<TableRepr> for RouteTable {
    type Error = RouteError;

    fn try_from(r: TableRepr) -> Result<Self, RouteError> {
        check_route_count(r.routes as usize)?;
        let nodes = r.nodes.into_iter().map(|rec| {
            (
                rec.node,
                NodeInfo {
                    weight: rec.weight,
                    state: rec.state,
                },
            )
        });
        let mut t = Self::with_nodes(r.routes as usize, nodes, r.reserve)?;
        let ids: Vec<u32> = t.nodes.keys().copied().collect();
        let values = decode_owners(&r.owners, r.routes, ids.len())?;
        // Assigned in runs: a value names a node of the table, so this cannot fail.
        let mut first = 0usize;
        for (route, &k) in values.iter().enumerate() {
            if values.get(route + 1) != Some(&k) {
                let owner = (k > 0).then(|| ids[usize::from(k) - 1]);
                t.assign_run(first as u32, (route + 1 - first) as u32, owner)?;
                first = route + 1;
            }
        }
        Ok(t)
    }
}

impl RouteTable {
    /// A table from its parts, validated like a persisted one.
    ///
    /// For state kept elsewhere (the data plane's `ROUTES` map when the daemon re-adopts a
    /// table, older state files): the route count is `owners.len()`, nodes must be valid
    /// `NODES` indices with non-zero weights, listed once, the reserve and every owner must be
    /// among them. The table need not be balanced.
    pub fn from_parts(
        nodes: impl IntoIterator<Item = (u32, NodeInfo)>,
        reserve: Option<u32>,
        owners: &[Option<u32>],
    ) -> Result<RouteTable, RouteError> {
        check_route_count(owners.len())?;
        let mut t = Self::with_nodes(owners.len(), nodes, reserve)?;
        for (route, &owner) in owners.iter().enumerate() {
            t.assign_run(route as u32, 1, owner)?;
        }
        Ok(t)
    }

    /// An empty table with `routes` routes and the given, validated, nodes and reserve.
    fn with_nodes(
        routes: usize,
        nodes: impl IntoIterator<Item = (u32, NodeInfo)>,
        reserve: Option<u32>,
    ) -> Result<Self, RouteError> {
        let mut t = Self::empty(routes);
        for (node, info) in nodes {
            if node >= MAX_NODES {
                return Err(RouteError::NodeOutOfRange(node));
            }
            if info.weight == 0 {
                return Err(RouteError::ZeroWeight(node));
            }
            if t.nodes.insert(node, info).is_some() {
                return Err(RouteError::Invalid(format!("node {node} listed twice")));
            }
        }
        if let Some(res) = reserve
            && !t.nodes.contains_key(&res)
        {
            return Err(RouteError::Invalid(format!("reserve {res} is not a node")));
        }
        t.reserve = reserve;
        Ok(t)
    }

    /// Gives routes `first..first + len` (in range, currently unowned) to a known `owner`.
    fn assign_run(&mut self, first: u32, len: u32, owner: Option<u32>) -> Result<(), RouteError> {
        let Some(o) = owner else { return Ok(()) };
        if !self.nodes.contains_key(&o) {
            let what = match len {
                1 => format!("route {first}"),
                _ => format!("routes {first}..={}", first + (len - 1)),
            };
            return Err(RouteError::Invalid(format!(
                "{what} owned by unknown node {o}"
            )));
        }
        for route in first..first + len {
            self.reassign(route, Some(o));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    // ---- Independent checks (recomputed from the raw owners, never from the caches) -------

    /// Routes per node index and unowned routes, counted from the owners.
    struct Tally {
        n: u32,
        per: Vec<u32>,
        unowned: u32,
    }

    impl Tally {
        fn of(t: &RouteTable) -> Self {
            let mut per = vec![0u32; MAX_NODES as usize];
            let mut unowned = 0;
            for o in t.owners() {
                match o {
                    Some(n) => per[n as usize] += 1,
                    None => unowned += 1,
                }
            }
            Tally {
                n: t.route_count(),
                per,
                unowned,
            }
        }

        fn c(&self, node: u32) -> u32 {
            self.per[node as usize]
        }

        /// Routes owned by nodes outside `holders`.
        fn outside(&self, holders: &[(u32, u32)]) -> usize {
            let inside: u64 = holders.iter().map(|&(id, _)| u64::from(self.c(id))).sum();
            (u64::from(self.n - self.unowned) - inside) as usize
        }
    }

    /// Share holders from the node states alone.
    fn holders_of(t: &RouteTable) -> Vec<(u32, u32)> {
        let active: Vec<(u32, u32)> = t
            .nodes()
            .filter(|&(id, i)| i.state == NodeState::Active && Some(id) != t.reserve())
            .map(|(id, i)| (id, i.weight))
            .collect();
        if active.is_empty()
            && let Some(r) = t.reserve()
            && t.node(r).map(|i| i.state) == Some(NodeState::Active)
        {
            return vec![(r, t.node(r).unwrap().weight)];
        }
        active
    }

    /// Floor of `n * w / total` and whether it is exact (u128: shares no code with the module).
    fn floor_share(n: u32, w: u32, total: u128) -> (u32, bool) {
        let num = n as u128 * w as u128;
        ((num / total) as u32, num.is_multiple_of(total))
    }

    fn total_weight(holders: &[(u32, u32)]) -> u128 {
        holders.iter().map(|&(_, w)| w as u128).sum()
    }

    /// The claimed minimum for reaching a balanced table over `holders` from `before`:
    /// Σ non-holders (+ unowned) + Σ max(0, c - floor) - min(E, #{c > floor, share not integral}).
    fn min_moves(before: &Tally, holders: &[(u32, u32)]) -> usize {
        if holders.is_empty() {
            return (before.n - before.unowned) as usize; // everything goes to "none"
        }
        let total = total_weight(holders);
        let (mut floors, mut over, mut savable) = (0u64, 0usize, 0usize);
        for &(id, w) in holders {
            let c = before.c(id);
            let (f, integral) = floor_share(before.n, w, total);
            floors += u64::from(f);
            over += c.saturating_sub(f) as usize;
            savable += usize::from(c > f && !integral);
        }
        let extra = (u64::from(before.n) - floors) as usize;
        before.unowned as usize + before.outside(holders) + over - extra.min(savable)
    }

    /// The same minimum by brute force over every choice of ceil slots (small tables).
    fn brute_min_moves(before: &Tally, holders: &[(u32, u32)]) -> usize {
        if holders.is_empty() {
            return (before.n - before.unowned) as usize;
        }
        let total = total_weight(holders);
        let fixed = before.unowned as usize + before.outside(holders);
        let shares: Vec<(u32, bool, u32)> = holders
            .iter()
            .map(|&(id, w)| {
                let (f, integral) = floor_share(before.n, w, total);
                (f, integral, before.c(id))
            })
            .collect();
        let extra = before.n as usize - shares.iter().map(|s| s.0 as usize).sum::<usize>();
        (0u32..(1 << shares.len()))
            .filter(|mask| mask.count_ones() as usize == extra)
            .filter(|mask| {
                shares
                    .iter()
                    .enumerate()
                    .all(|(k, s)| mask & (1 << k) == 0 || !s.1)
            })
            .map(|mask| {
                let up = |k: usize| u32::from(mask & (1 << k) != 0);
                fixed
                    + shares
                        .iter()
                        .enumerate()
                        .map(|(k, &(f, _, c))| c.saturating_sub(f + up(k)) as usize)
                        .sum::<usize>()
            })
            .min()
            .unwrap()
    }

    /// After a join of `node` to a balanced table, how many old holders must receive a route:
    /// the extra (ceil) slots that neither save a move nor can go to the new node.
    fn forced_bumps(before: &Tally, holders: &[(u32, u32)], node: u32) -> usize {
        let total = total_weight(holders);
        let (mut floors, mut savable, mut joiner) = (0u64, 0usize, 0usize);
        for &(id, w) in holders {
            let (f, integral) = floor_share(before.n, w, total);
            floors += u64::from(f);
            savable += usize::from(before.c(id) > f && !integral);
            joiner += usize::from(id == node && !integral);
        }
        let extra = (u64::from(before.n) - floors) as usize;
        extra.saturating_sub(savable + joiner)
    }

    /// The invariant, computed independently.
    fn balanced(t: &RouteTable, tally: &Tally) -> bool {
        let holders = holders_of(t);
        if holders.is_empty() {
            return tally.unowned == t.route_count();
        }
        let total = total_weight(&holders);
        tally.unowned == 0
            && tally.outside(&holders) == 0
            && holders.iter().all(|&(id, w)| {
                let (f, integral) = floor_share(t.route_count(), w, total);
                let c = tally.c(id);
                c == f || (!integral && c == f + 1)
            })
    }

    /// Caches match the owners, owners are known nodes, and `moves` turn `before` into
    /// `after`.
    fn check_consistent(before: &RouteTable, after: &RouteTable, tally: &Tally, moves: &[Move]) {
        assert_eq!(after.unowned(), tally.unowned);
        for id in 0..MAX_NODES {
            assert_eq!(after.count(id), tally.c(id), "cached count of node {id}");
            assert!(
                tally.c(id) == 0 || after.node(id).is_some(),
                "unknown owner {id}"
            );
        }
        assert_eq!(after.is_balanced(), balanced(after, tally));
        let mut owners: Vec<Option<u32>> = before.owners().collect();
        let mut seen = BTreeSet::new();
        for m in moves {
            assert!(seen.insert(m.route), "route {} moved twice", m.route);
            assert_ne!(m.from, m.to, "{m:?}");
            assert_eq!(owners[m.route as usize], m.from, "{m:?}");
            owners[m.route as usize] = m.to;
        }
        assert!(
            owners.iter().copied().eq(after.owners()),
            "moves do not explain the table"
        );
    }

    // ---- Random event sequences ------------------------------------------------------------

    #[derive(Clone, Copy, Debug)]
    struct Op {
        kind: u8,
        pick: u32,
        weight: u32,
    }

    fn op() -> impl Strategy<Value = Op> {
        let weight = prop_oneof![8 => 1u32..=100, 1 => Just(1u32), 1 => 1_000_000u32..=u32::MAX];
        (0u8..13, any::<u32>(), weight).prop_map(|(kind, pick, weight)| Op { kind, pick, weight })
    }

    /// Turn a raw op into an event against the current table (mostly valid ones).
    fn event_for(t: &RouteTable, op: Op, node_space: u32) -> Event {
        let known: Vec<u32> = t.nodes().map(|(id, _)| id).collect();
        let pick_known = || {
            if known.is_empty() || op.pick.is_multiple_of(31) {
                op.pick % (MAX_NODES + 8) // often unknown or out of range: the error paths
            } else {
                known[op.pick as usize % known.len()]
            }
        };
        match op.kind {
            0..=3 => Event::Join {
                node: if op.pick.is_multiple_of(53) {
                    MAX_NODES + op.pick % 3
                } else {
                    op.pick % node_space
                },
                weight: if op.pick.is_multiple_of(19) {
                    0
                } else {
                    op.weight
                },
            },
            4 | 5 => Event::Fail { node: pick_known() },
            6 => Event::Drain { node: pick_known() },
            7 => Event::Remove { node: pick_known() },
            8 => Event::SetWeight {
                node: pick_known(),
                weight: if op.pick.is_multiple_of(17) {
                    0
                } else {
                    op.weight
                },
            },
            9 | 10 => Event::Activate { node: pick_known() },
            11 => Event::SetReserve {
                node: (!op.pick.is_multiple_of(4)).then(pick_known),
            },
            _ => Event::Rebalance,
        }
    }

    fn subject(e: Event) -> Option<u32> {
        match e {
            Event::Join { node, .. }
            | Event::Fail { node }
            | Event::Remove { node }
            | Event::Drain { node }
            | Event::Activate { node }
            | Event::SetWeight { node, .. } => Some(node),
            Event::SetReserve { node } => node,
            Event::Rebalance => None,
        }
    }

    /// Apply `event` and check everything the module promises about it.
    fn step(t: &mut RouteTable, event: Event) -> Result<Vec<Move>, RouteError> {
        let before = t.clone();
        let tally0 = Tally::of(&before);
        let was_balanced = balanced(&before, &tally0);
        let holders_before = holders_of(&before);
        let result = t.apply(event);
        let Ok(moves) = &result else {
            assert_eq!(*t, before, "rejected {event:?} changed the table");
            return result;
        };
        let tally = Tally::of(t);
        check_consistent(&before, t, &tally, moves);
        let holders = holders_of(t);
        let reserve0 = before.reserve();
        let active = |t: &RouteTable, n: u32| t.node(n).map(|i| i.state) == Some(NodeState::Active);
        if let Event::Fail { node } = event
            && active(&before, node)
            && let Some(r) = reserve0.filter(|&r| r != node && active(&before, r))
        {
            // Failover: the failed node's routes, all to the reserve, nothing else.
            assert_eq!(moves.len(), tally0.c(node) as usize);
            assert!(
                moves
                    .iter()
                    .all(|m| m.from == Some(node) && m.to == Some(r))
            );
            return result;
        }
        // Rebalance iff the share holders (or weights) changed, or a node the event is about
        // (or the old reserve, for set_reserve) owns routes and was actually changed.
        let touched: Vec<u32> = subject(event)
            .into_iter()
            .chain(reserve0.filter(|_| matches!(event, Event::SetReserve { .. })))
            .collect();
        let changed = |n: u32| {
            t.node(n) != before.node(n)
                || (matches!(event, Event::SetReserve { .. }) && reserve0 != t.reserve())
        };
        let rebalances = matches!(event, Event::Rebalance)
            || holders != holders_before
            || touched.iter().any(|&n| tally0.c(n) > 0 && changed(n));
        if !rebalances {
            assert!(moves.is_empty(), "{event:?} moved routes: {moves:?}");
            assert_eq!(balanced(t, &tally), was_balanced);
            return result;
        }
        assert!(
            balanced(t, &tally),
            "unbalanced after {event:?}: {:?}",
            t.counts()
        );
        assert_eq!(moves.len(), min_moves(&tally0, &holders), "{event:?}");
        let equal = |h: &[(u32, u32)]| h.windows(2).all(|p| p[0].1 == p[1].1);
        if was_balanced && equal(&holders) && equal(&holders_before) {
            // Equal weights (HaloD's case): exactly HaloD's rules.
            match event {
                Event::Join { node, .. } | Event::Activate { node } => {
                    assert!(moves.iter().all(|m| m.to == Some(node)), "{moves:?}")
                }
                Event::Fail { node } | Event::Drain { node } | Event::Remove { node } => {
                    assert!(moves.iter().all(|m| m.from == Some(node)), "{moves:?}")
                }
                _ => {}
            }
        }
        if was_balanced {
            match event {
                // A join: routes go only to the new node, except for ceil slots that weights
                // force onto others (never with equal weights).
                Event::Join { node, .. } => {
                    let others = moves.iter().filter(|m| m.to != Some(node)).count();
                    assert!(others <= forced_bumps(&tally0, &holders, node), "{moves:?}");
                }
                // A departure: all of its routes move (the rest is covered by min_moves).
                Event::Fail { node } | Event::Drain { node } | Event::Remove { node } => {
                    let own = moves.iter().filter(|m| m.from == Some(node)).count();
                    assert_eq!(own, tally0.c(node) as usize);
                }
                _ => {}
            }
        }
        result
    }

    fn run(n: u32, node_space: u32, setup: &[u32], ops: &[Op]) {
        let mut t = RouteTable::new(n).unwrap();
        let mut log = Vec::new();
        let mut results = Vec::new();
        for (k, &w) in setup.iter().enumerate() {
            let e = Event::Join {
                node: k as u32 % node_space,
                weight: w,
            };
            results.push(step(&mut t, e));
            log.push(e);
        }
        for &op in ops {
            let e = event_for(&t, op, node_space);
            results.push(step(&mut t, e));
            log.push(e);
        }
        // Replay determinism: same start + same events => same table and same moves.
        let mut replay = RouteTable::new(n).unwrap();
        let replayed: Vec<_> = log.iter().map(|&e| replay.apply(e)).collect();
        assert_eq!(replay, t);
        assert!(replayed == results, "replay gave different moves");
        // Persistence round trip.
        let back: RouteTable = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.counts(), t.counts());
        assert_eq!(back.unowned(), t.unowned());
    }

    fn config(cases: u32) -> ProptestConfig {
        ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    proptest! {
        #![proptest_config(config(2000))]
        #[test]
        fn prop_small_tables(
            n in 1u32..=64,
            node_space in 1u32..=12,
            setup in prop::collection::vec(1u32..=100, 0..8),
            ops in prop::collection::vec(op(), 1..80),
        ) {
            run(n, node_space, &setup, &ops);
        }
    }

    proptest! {
        #![proptest_config(config(150))]
        #[test]
        fn prop_medium_tables(
            n in 1u32..=4096,
            node_space in 1u32..=300,
            setup in prop::collection::vec(1u32..=100, 0..120),
            ops in prop::collection::vec(op(), 1..60),
        ) {
            run(n, node_space, &setup, &ops);
        }
    }

    proptest! {
        #![proptest_config(config(2))]
        #[test]
        fn prop_large_tables(
            n in prop_oneof![Just(65536u32), 30000u32..=65536],
            setup in prop::collection::vec(1u32..=100, 300..=1000),
            ops in prop::collection::vec(op(), 1..40),
        ) {
            run(n, 1000, &setup, &ops);
        }
    }

    /// Arbitrary, unbalanced tables (as a persisted table from elsewhere might be).
    fn arbitrary_table() -> impl Strategy<Value = RouteTable> {
        let nodes = prop::collection::vec((1u32..=6, 0u8..4), 1..=7);
        (1u32..=40, nodes, any::<u64>(), any::<u8>()).prop_map(|(n, specs, seed, res)| {
            let nodes: Vec<(u32, NodeInfo)> = specs
                .iter()
                .enumerate()
                .map(|(k, &(weight, s))| {
                    let state = match s {
                        0 | 1 => NodeState::Active,
                        2 => NodeState::Draining,
                        _ => NodeState::Down,
                    };
                    (k as u32 * 3, NodeInfo { weight, state })
                })
                .collect();
            let mut x = seed | 1;
            let owners: Vec<Option<u32>> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    nodes
                        .get((x % (nodes.len() as u64 + 1)) as usize)
                        .map(|r| r.0)
                })
                .collect();
            let reserve = (res % 3 == 0).then(|| nodes[res as usize % nodes.len()].0);
            RouteTable::from_parts(nodes, reserve, &owners).unwrap()
        })
    }

    proptest! {
        #![proptest_config(config(4000))]
        /// One rebalance from any table reaches the brute-force minimum, which the closed
        /// formula matches; a second rebalance is a no-op.
        #[test]
        fn prop_rebalance_from_any_table_is_minimal(t in arbitrary_table()) {
            let before = t.clone();
            let tally0 = Tally::of(&before);
            let mut t = t;
            let moves = t.rebalance();
            let tally = Tally::of(&t);
            check_consistent(&before, &t, &tally, &moves);
            let holders = holders_of(&t);
            prop_assert_eq!(moves.len(), brute_min_moves(&tally0, &holders));
            prop_assert_eq!(moves.len(), min_moves(&tally0, &holders));
            prop_assert!(balanced(&t, &tally));
            prop_assert!(t.rebalance().is_empty());
        }
    }

    // ---- HaloD's example -------------------------------------------------------------------

    /// HaloD's join, literally: sort the nodes by routes owned (descending), then by id; walk
    /// the list (wrapping) moving each node's highest route to the new node until
    /// `floor(N / (M + 1))` routes have moved. The first node takes everything.
    fn halod_join(owners: &mut [u32], new: u32) -> usize {
        let ids: BTreeSet<u32> = owners.iter().copied().filter(|&o| o != NO_OWNER).collect();
        if ids.is_empty() {
            owners.fill(new);
            return owners.len();
        }
        let quota = owners.len() / (ids.len() + 1);
        let count = |id: u32| owners.iter().filter(|&&o| o == id).count();
        let mut list: Vec<(usize, u32)> = ids.iter().map(|&id| (count(id), id)).collect();
        list.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut moved = 0;
        for &(_, id) in list.iter().cycle() {
            if moved == quota {
                break;
            }
            let r = owners.iter().rposition(|&o| o == id).unwrap();
            owners[r] = new;
            moved += 1;
        }
        moved
    }

    fn row(t: &RouteTable) -> String {
        t.owners()
            .map(|o| o.map_or("-".to_string(), |n| n.to_string()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn halod_progression_24_routes() {
        let mut t = RouteTable::new(24).unwrap();
        let mut reference = vec![NO_OWNER; 24];
        let mut moved = Vec::new();
        println!("HaloD progression, 24 routes (route 0..23 -> node):");
        for node in 1..=8u32 {
            let before = t.clone();
            let moves = t.join(node, 1).unwrap();
            let quota = halod_join(&mut reference, node);
            assert_eq!(moves.len(), quota, "join of node {node}");
            assert!(moves.iter().all(|m| m.to == Some(node)));
            // Each donor gave its highest route IDs.
            for donor in before.nodes().map(|(id, _)| id) {
                let kept = t.routes_of(donor);
                let gave = moves.iter().filter(|m| m.from == Some(donor));
                assert!(gave.clone().all(|m| kept.iter().all(|&k| k < m.route)));
            }
            assert_eq!(
                t.owners.as_slice(),
                reference.as_slice(),
                "after node {node}"
            );
            assert!(t.is_balanced());
            println!("{node} nodes: {}", row(&t));
            moved.push(moves.len());
        }
        assert_eq!(moved, [24, 12, 8, 6, 4, 4, 3, 3]);
        // Worked by hand from the note's rules (routes 0-based): node 2 took 12..23, node 3 the
        // top 4 of each: 8..11 and 20..23.
        let mut three = RouteTable::new(24).unwrap();
        for node in 1..=3 {
            three.join(node, 1).unwrap();
        }
        assert_eq!(three.routes_of(1), (0..8).collect::<Vec<_>>());
        assert_eq!(three.routes_of(2), (12..20).collect::<Vec<_>>());
        assert_eq!(three.routes_of(3), [8, 9, 10, 11, 20, 21, 22, 23]);
        assert_eq!(t.counts().values().copied().collect::<Vec<_>>(), [3; 8]);
    }

    // ---- Reserve and failure ---------------------------------------------------------------

    /// 24 routes over nodes 1..=4 (6 each) and node 9 as the reserve.
    fn four_and_reserve() -> RouteTable {
        let mut t = RouteTable::new(24).unwrap();
        for node in [1, 2, 3, 4, 9] {
            t.join(node, 1).unwrap();
        }
        let moves = t.set_reserve(Some(9)).unwrap();
        assert!(moves.iter().all(|m| m.from == Some(9)));
        assert_eq!(t.count(9), 0);
        assert_eq!(t.counts().values().filter(|&&c| c == 6).count(), 4);
        t
    }

    #[test]
    fn failure_goes_to_the_reserve_and_comes_back_on_rejoin() {
        let mut t = four_and_reserve();
        let before = t.clone();
        let owned = t.routes_of(2);
        let moves = t.fail(2).unwrap();
        assert_eq!(moves.len(), 6);
        assert!(moves.iter().all(|m| m.from == Some(2) && m.to == Some(9)));
        assert_eq!(t.routes_of(9), owned);
        for n in [1, 3, 4] {
            assert_eq!(t.routes_of(n), before.routes_of(n));
        }
        assert_eq!(t.node(2).unwrap().state, NodeState::Down);
        assert!(!t.is_balanced());
        // Removing an unrelated down node or failing again changes nothing.
        assert!(t.fail(2).unwrap().is_empty());
        // The failed node rejoins: exactly the reserve's routes flow back to it.
        let moves = t.join(2, 1).unwrap();
        assert_eq!(moves.len(), 6);
        assert!(moves.iter().all(|m| m.from == Some(9) && m.to == Some(2)));
        assert_eq!(t, before);
        assert!(t.is_balanced());
    }

    #[test]
    fn reserve_holdings_spread_on_the_next_rebalancing_event() {
        let mut t = four_and_reserve();
        t.fail(2).unwrap();
        t.fail(3).unwrap();
        assert_eq!(t.count(9), 12);
        // A new node joins: the reserve's 12 routes go first (8 to it, 2 to each survivor).
        let moves = t.join(5, 1).unwrap();
        assert_eq!(moves.len(), 12);
        assert!(moves.iter().all(|m| m.from == Some(9)));
        assert_eq!(t.count(9), 0);
        assert_eq!((t.count(1), t.count(4), t.count(5)), (8, 8, 8));
        // Or explicitly, after another failover.
        t.fail(5).unwrap();
        assert_eq!(t.count(9), 8);
        let moves = t.rebalance();
        assert_eq!(moves.len(), 8);
        assert_eq!((t.count(1), t.count(4), t.count(9)), (12, 12, 0));
    }

    #[test]
    fn failure_without_reserve_spreads_to_the_most_under_nodes() {
        let mut t = RouteTable::new(24).unwrap();
        for node in 1..=4 {
            t.join(node, 1).unwrap();
        }
        let moves = t.fail(1).unwrap();
        assert_eq!(moves.len(), 6);
        assert!(moves.iter().all(|m| m.from == Some(1)));
        // Highest route first, each to the node most under its target (ties: lower index).
        let to: Vec<u32> = moves.iter().map(|m| m.to.unwrap()).collect();
        assert_eq!(to, [2, 3, 4, 2, 3, 4]);
        assert_eq!(t.counts(), BTreeMap::from([(1, 0), (2, 8), (3, 8), (4, 8)]));
        // Same with a reserve that is itself down.
        let mut t = four_and_reserve();
        t.fail(9).unwrap();
        let moves = t.fail(1).unwrap();
        assert!(moves.iter().all(|m| m.from == Some(1) && m.to != Some(9)));
        assert!(t.is_balanced());
    }

    #[test]
    fn reserve_alone_owns_everything_until_a_node_joins() {
        let mut t = RouteTable::new(10).unwrap();
        t.join(7, 3).unwrap();
        t.set_reserve(Some(7)).unwrap();
        assert_eq!(t.count(7), 10, "the only active node holds the share");
        assert!(t.is_balanced());
        let moves = t.join(1, 1).unwrap();
        assert_eq!(moves.len(), 10);
        assert_eq!((t.count(1), t.count(7)), (10, 0));
        // The last regular node fails: the reserve takes over everything.
        let moves = t.fail(1).unwrap();
        assert!(moves.iter().all(|m| m.to == Some(7)));
        assert!(t.is_balanced());
        // Clearing the designation makes it a regular node again.
        t.join(1, 1).unwrap();
        t.set_reserve(None).unwrap();
        assert_eq!((t.count(1), t.count(7)), (3, 7));
    }

    /// With unequal weights, floor/ceil can force moves beyond the event's node; they are part
    /// of the minimum.
    #[test]
    fn weighted_events_can_force_extra_moves() {
        // 2 routes, weights 3, 2, 1, 5: shares 0.55, 0.36, 0.18, 0.91, so nodes 0 and 3 own one
        // each. Node 1 fails owning nothing, but node 3's share becomes 1.11: it needs a route.
        let mut t = RouteTable::new(2).unwrap();
        for (node, w) in [(0, 3), (1, 2), (2, 1), (3, 5)] {
            t.join(node, w).unwrap();
        }
        assert_eq!(t.count(1), 0);
        let moves = t.fail(1).unwrap();
        assert_eq!(moves.len(), 1);
        assert_eq!(moves[0].to, Some(3));
        assert!(t.is_balanced());
        // 11 routes, weights 8, 6, 3, 6, 8 and a joiner of weight 3: nodes 1 and 3 must drop
        // from 3 to 2 routes, but the joiner's ceil is 1, so an old node must take one too.
        let mut t = RouteTable::new(11).unwrap();
        for (node, w) in [(0, 8), (1, 6), (2, 3), (3, 6), (4, 8)] {
            t.join(node, w).unwrap();
        }
        assert_eq!([1, 3].map(|n| t.count(n)), [3, 3]);
        let moves = t.join(5, 3).unwrap();
        assert_eq!(moves.len(), 2);
        assert_eq!(moves.iter().filter(|m| m.to == Some(5)).count(), 1);
        assert!(t.is_balanced());
    }

    // ---- Edge cases ------------------------------------------------------------------------

    #[test]
    fn empty_table() {
        let mut t = RouteTable::new(16).unwrap();
        assert_eq!(t.route_count(), 16);
        assert_eq!(t.unowned(), 16);
        assert!(t.owners().all(|o| o.is_none()));
        assert_eq!(t.owner(0), None);
        assert_eq!(t.owner(99), None);
        assert!(t.counts().is_empty());
        assert!(t.shares().is_empty());
        assert!(t.is_balanced());
        assert!(t.rebalance().is_empty());
        assert_eq!(t.fail(1), Err(RouteError::UnknownNode(1)));
        assert_eq!(RouteTable::default().route_count(), DEFAULT_ROUTES_PER_VIP);
        let moves = t.join(3, 1).unwrap();
        assert_eq!(moves.len(), 16);
        assert!(moves.iter().all(|m| m.from.is_none() && m.to == Some(3)));
        assert_eq!(t.routes_of(3), (0..16).collect::<Vec<_>>());
    }

    #[test]
    fn single_route() {
        let mut t = RouteTable::new(1).unwrap();
        assert_eq!(t.join(5, 1).unwrap().len(), 1);
        assert!(t.join(6, 1).unwrap().is_empty(), "5 keeps the route (ceil)");
        assert_eq!(t.owner(0), Some(5));
        assert_eq!(t.shares(), BTreeMap::from([(5, (0, 1)), (6, (0, 1))]));
        let moves = t.fail(5).unwrap();
        assert_eq!(
            moves,
            [Move {
                route: 0,
                from: Some(5),
                to: Some(6)
            }]
        );
        assert!(t.join(5, 1).unwrap().is_empty());
        assert_eq!(t.owner(0), Some(6));
    }

    #[test]
    fn all_nodes_drained_leaves_routes_unowned() {
        let mut t = RouteTable::new(12).unwrap();
        for node in [1, 2, 3] {
            t.join(node, 1).unwrap();
        }
        t.drain(1).unwrap();
        t.drain(2).unwrap();
        assert_eq!(t.count(3), 12);
        let moves = t.drain(3).unwrap();
        assert_eq!(moves.len(), 12);
        assert!(moves.iter().all(|m| m.from == Some(3) && m.to.is_none()));
        assert_eq!(t.unowned(), 12);
        assert!(t.is_balanced());
        assert!(t.drain(3).unwrap().is_empty(), "draining twice is a no-op");
        let moves = t.activate(2).unwrap();
        assert!(moves.iter().all(|m| m.from.is_none() && m.to == Some(2)));
        assert_eq!(t.count(2), 12);
        assert_eq!(t.node(1).unwrap().state, NodeState::Draining);
    }

    #[test]
    fn rejoin_after_failure() {
        let mut t = RouteTable::new(30).unwrap();
        for node in [1, 2, 3] {
            t.join(node, 1).unwrap();
        }
        t.fail(2).unwrap();
        assert_eq!((t.count(1), t.count(2), t.count(3)), (15, 0, 15));
        assert_eq!(
            t.join(1, 1),
            Err(RouteError::AlreadyMember {
                node: 1,
                state: NodeState::Active
            })
        );
        // Back with a new weight: takes half.
        let moves = t.join(2, 2).unwrap();
        assert!(moves.iter().all(|m| m.to == Some(2)));
        assert_eq!(
            (t.count(1), t.count(2), t.count(3)),
            (7, 15, 8),
            "lower index gives first"
        );
        // Fail then activate keeps the weight.
        t.fail(2).unwrap();
        t.activate(2).unwrap();
        assert_eq!(t.count(2), 15);
        // Draining nodes cannot "join"; they are activated.
        t.drain(3).unwrap();
        assert!(matches!(
            t.join(3, 1),
            Err(RouteError::AlreadyMember { .. })
        ));
        t.activate(3).unwrap();
        assert!(t.is_balanced());
    }

    #[test]
    fn large_and_changing_weights() {
        let mut t = RouteTable::new(65536).unwrap();
        t.join(0, u32::MAX).unwrap();
        t.join(1, 1).unwrap();
        t.join(2, u32::MAX).unwrap();
        assert_eq!(t.shares()[&1], (0, 1));
        assert!(t.is_balanced());
        assert_eq!(t.count(0) + t.count(2), 65536 - t.count(1));
        // 1 becomes as heavy as the others: it takes a third.
        let moves = t.set_weight(1, u32::MAX).unwrap();
        assert!(moves.iter().all(|m| m.to == Some(1)));
        assert!((21845..=21846).contains(&t.count(1)));
        // And back to 1: only its routes move.
        let moves = t.set_weight(1, 1).unwrap();
        assert!(moves.iter().all(|m| m.from == Some(1)));
        assert!(t.is_balanced());
        assert!(
            t.set_weight(1, 1).unwrap().is_empty(),
            "same weight: nothing moves"
        );
        // Weights of nodes without a share only take effect when they return.
        t.drain(1).unwrap();
        assert!(t.set_weight(1, 7).unwrap().is_empty());
        assert_eq!(t.node(1).unwrap().weight, 7);
    }

    #[test]
    fn bad_events_are_typed_errors_and_change_nothing() {
        let mut t = RouteTable::new(8).unwrap();
        t.join(1, 1).unwrap();
        t.join(2, 1).unwrap();
        t.fail(2).unwrap();
        let before = t.clone();
        assert_eq!(RouteTable::new(0), Err(RouteError::InvalidRouteCount(0)));
        assert_eq!(
            RouteTable::new(65537),
            Err(RouteError::InvalidRouteCount(65537))
        );
        assert!(RouteTable::new(65536).is_ok());
        assert_eq!(
            t.join(1, 1).unwrap_err().to_string(),
            "node 1 is already a member (active)"
        );
        assert_eq!(t.join(3, 0), Err(RouteError::ZeroWeight(3)));
        assert_eq!(
            t.join(MAX_NODES, 1),
            Err(RouteError::NodeOutOfRange(MAX_NODES))
        );
        for e in [
            Event::Fail { node: 9 },
            Event::Remove { node: 9 },
            Event::Drain { node: 9 },
            Event::Activate { node: 9 },
            Event::SetWeight { node: 9, weight: 1 },
            Event::SetReserve { node: Some(9) },
        ] {
            assert_eq!(t.apply(e), Err(RouteError::UnknownNode(9)), "{e:?}");
        }
        assert_eq!(t.set_weight(1, 0), Err(RouteError::ZeroWeight(1)));
        assert_eq!(
            t.drain(2),
            Err(RouteError::InvalidTransition {
                node: 2,
                state: NodeState::Down,
                event: "drain"
            })
        );
        assert_eq!(
            t.drain(2).unwrap_err().to_string(),
            "cannot drain node 2: it is down"
        );
        assert_eq!(t, before);
        // Removing a node forgets it.
        t.remove(2).unwrap();
        assert_eq!(t.fail(2), Err(RouteError::UnknownNode(2)));
        assert!(t.join(2, 1).is_ok());
    }

    #[test]
    fn persisted_form_round_trips_and_is_validated() {
        let mut t = RouteTable::new(6).unwrap();
        t.join(1, 2).unwrap();
        t.join(4, 1).unwrap();
        t.set_reserve(Some(4)).unwrap();
        t.join(5, 1).unwrap();
        t.drain(5).unwrap();
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "routes": 6,
                "nodes": [
                    {"node": 1, "weight": 2, "state": "active"},
                    {"node": 4, "weight": 1, "state": "active"},
                    {"node": 5, "weight": 1, "state": "draining"},
                ],
                "reserve": 4,
                // Six 2-bit 1s (node 1 is the first node): 0x55, 0x05.
                "owners": "2:VQU=",
            })
        );
        let back: RouteTable = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.count(1), 6);
        let bad = |path: &str, v: serde_json::Value| {
            let mut j = json.clone();
            j[path] = v;
            let err = serde_json::from_value::<RouteTable>(j)
                .unwrap_err()
                .to_string();
            assert!(!err.is_empty());
            err
        };
        assert!(bad("owners", serde_json::json!("2:VQ==")).contains("1 bytes"));
        assert!(bad("owners", serde_json::json!("2:Vf8=")).contains("unused 4 bits"));
        assert!(bad("owners", serde_json::json!([[1, 6]])).contains("invalid type"));
        assert!(bad("owners", serde_json::json!([1, 1, 1, 1, 1, 1])).contains("invalid type"));
        assert!(bad("routes", serde_json::json!(0)).contains("out of range"));
        assert!(bad("reserve", serde_json::json!(8)).contains("reserve 8"));
        let dup = serde_json::json!([{"node": 1, "weight": 2, "state": "active"},
                                     {"node": 1, "weight": 2, "state": "active"}]);
        assert!(bad("nodes", dup).contains("twice"));
        let zero = serde_json::json!([{"node": 1, "weight": 0, "state": "active"}]);
        assert!(bad("nodes", zero).contains("weight"));
        // Events have a stable, tagged JSON form too.
        let e = Event::Join { node: 3, weight: 2 };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(s, r#"{"event":"join","node":3,"weight":2}"#);
        assert_eq!(serde_json::from_str::<Event>(&s).unwrap(), e);
    }

    /// `values` as `width`-bit fields, least significant bit first, one bit at a time (an
    /// encoder independent of [`TableRepr`]'s).
    fn pack(width: u32, values: &[u32]) -> Vec<u8> {
        let mut bytes = vec![0u8; (values.len() * width as usize).div_ceil(8)];
        for (i, &v) in values.iter().enumerate() {
            for b in 0..width as usize {
                if v >> b & 1 == 1 {
                    let bit = i * width as usize + b;
                    bytes[bit / 8] |= 1 << (bit % 8);
                }
            }
        }
        bytes
    }

    fn packed(width: u32, values: &[u32]) -> String {
        format!("{width}:{}", BASE64.encode(pack(width, values)))
    }

    /// Checks the persisted `owners` against an independent encoding, then the round trip.
    fn check_packed_round_trip(t: &RouteTable) {
        let json = serde_json::to_value(t).unwrap();
        let ids: Vec<u32> = t.nodes().map(|(id, _)| id).collect();
        assert!(ids.is_sorted());
        let width = (1..).find(|&w| 1usize << w > ids.len()).unwrap();
        let position: BTreeMap<u32, u32> = (1..).zip(&ids).map(|(k, &id)| (id, k)).collect();
        let values: Vec<u32> = t.owners().map(|o| o.map_or(0, |o| position[&o])).collect();
        assert_eq!(json["owners"], packed(width, &values));
        let back: RouteTable = serde_json::from_value(json).unwrap();
        assert_eq!(back, *t);
        assert_eq!(back.counts(), t.counts());
        assert_eq!(back.unowned(), t.unowned());
        assert_eq!(back.is_balanced(), t.is_balanced());
        let parts = RouteTable::from_parts(t.nodes(), t.reserve(), &t.owners().collect::<Vec<_>>())
            .unwrap();
        assert_eq!(parts, *t);
        assert_eq!(parts.counts(), t.counts());
    }

    #[test]
    fn persisted_owners_round_trip_with_many_runs() {
        let nodes: Vec<(u32, NodeInfo)> = (0..7)
            .map(|k| {
                let state = [NodeState::Active, NodeState::Draining, NodeState::Down][k % 3];
                let info = NodeInfo {
                    weight: k as u32 + 1,
                    state,
                };
                (k as u32 * 5, info)
            })
            .collect();
        // Runs of length 1..=9 cycling through the nodes and "unowned".
        let mut owners = Vec::new();
        let mut k = 0usize;
        while owners.len() < 5000 {
            let owner = (k % 8 != 7).then(|| nodes[k % 8].0);
            owners.extend(std::iter::repeat_n(owner, k % 9 + 1));
            k += 1;
        }
        owners.truncate(5000);
        let t = RouteTable::from_parts(nodes.clone(), Some(10), &owners).unwrap();
        assert!(!t.is_balanced());
        // 7 nodes: 3 bits a route, 1875 bytes, 2500 base64 characters.
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(json["owners"].as_str().unwrap().len(), 2 + 2500);
        check_packed_round_trip(&t);
        // Single routes, all unowned, all one owner.
        for owners in [vec![Some(0)], vec![None; 65536], vec![Some(30); 65536]] {
            let t = RouteTable::from_parts(nodes.clone(), None, &owners).unwrap();
            check_packed_round_trip(&t);
        }
        // Widths at every power of two, up to MAX_NODES nodes (13 bits), odd route counts.
        let info = NodeInfo {
            weight: 1,
            state: NodeState::Active,
        };
        for (n, width) in [
            (0, 1),
            (1, 1),
            (2, 2),
            (3, 2),
            (4, 3),
            (7, 3),
            (8, 4),
            (255, 8),
            (256, 9),
            (4095, 12),
            (MAX_NODES, 13),
        ] {
            let ids: Vec<u32> = (0..n).map(|k| MAX_NODES - 1 - k * 7 % MAX_NODES).collect();
            let mut sorted = ids.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), n as usize);
            for routes in [1, 7, 65535, 65536] {
                let owners: Vec<Option<u32>> = (0..routes)
                    .map(|r| (n > 0 && r % 5 != 4).then(|| ids[(r * 3 % n.max(1)) as usize]))
                    .collect();
                let t = RouteTable::from_parts(ids.iter().map(|&id| (id, info)), None, &owners)
                    .unwrap();
                let json = serde_json::to_value(&t).unwrap();
                let s = json["owners"].as_str().unwrap();
                assert!(s.starts_with(&format!("{width}:")), "{n} nodes: {s:.8}");
                check_packed_round_trip(&t);
            }
        }
    }

    #[test]
    fn persisted_owners_round_trip_after_200_random_events() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        for (seed, n, node_space) in [(1, 65536, 40), (2, 4096, 300), (3, 97, 12)] {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut t = RouteTable::new(n).unwrap();
            for _ in 0..200 {
                let op = Op {
                    kind: rng.gen_range(0..13),
                    pick: rng.r#gen(),
                    weight: rng.gen_range(1..=100),
                };
                let event = event_for(&t, op, node_space);
                let _ = step(&mut t, event);
            }
            assert!(t.nodes().count() > 1, "seed {seed}: a trivial table");
            check_packed_round_trip(&t);
        }
    }

    #[test]
    fn persisted_owners_are_validated() {
        let mut t = RouteTable::new(6).unwrap();
        t.join(1, 1).unwrap();
        t.join(2, 1).unwrap();
        let json = serde_json::to_value(&t).unwrap();
        // 1, 1, 1, 2, 2, 2 in 2 bits: 0b10_01_01_01, 0b0000_10_10.
        assert_eq!(json["owners"], "2:lQo=");
        assert_eq!(packed(2, &[1, 1, 1, 2, 2, 2]), "2:lQo=");
        let load_in = |routes: u32, owners: &str| {
            let mut j = json.clone();
            j["routes"] = routes.into();
            j["owners"] = owners.into();
            serde_json::from_value::<RouteTable>(j).map_err(|e| e.to_string())
        };
        let load = |owners: &str| load_in(6, owners);
        assert_eq!(load("2:lQo=").unwrap(), t);
        // 0 is unowned; a wider width than needed reads the same.
        assert_eq!(load(&packed(2, &[1, 1, 0, 2, 2, 2])).unwrap().unowned(), 1);
        assert_eq!(load(&packed(13, &[1, 1, 1, 2, 2, 2])).unwrap(), t);
        assert_eq!(load(&packed(1, &[1, 1, 1, 0, 0, 0])).unwrap().count(1), 3);
        // 7 routes fit in the same 2 bytes: the 7th reads the zero padding, unowned.
        assert_eq!(load_in(7, "2:lQo=").unwrap().unowned(), 1);
        let long = BASE64.encode([0x95, 0x0a, 0]);
        // A 7th route in the padding of 6: invalid for 6 routes, valid for 7.
        let high_padding = packed(2, &[1, 1, 1, 2, 2, 2, 1]);
        assert_eq!(load_in(7, &high_padding).unwrap().count(1), 4);
        for (routes, owners, needle) in [
            (6, "2lQo=", r#"owners: expected "<width>:<base64>""#),
            (6, "x:lQo=", r#"owners: width "x" is not a number"#),
            (6, ":lQo=", r#"owners: width "" is not a number"#),
            (6, "+2:lQo=", r#"owners: width "+2" is not a number"#),
            (
                6,
                "99999999999:lQo=",
                "width 99999999999 is out of range (1..=13)",
            ),
            (6, "0:lQo=", "owners: width 0 is out of range (1..=13)"),
            (6, "14:lQo=", "owners: width 14 is out of range (1..=13)"),
            // Wrong width: the length no longer matches.
            (6, "1:lQo=", "owners: 2 bytes, 6 routes of 1 bits need 1"),
            (6, "3:lQo=", "owners: 2 bytes, 6 routes of 3 bits need 3"),
            (6, "2:lQo", "owners: bad base64"),
            (6, "2:l*o=", "owners: bad base64"),
            (6, "2:lQp=", "owners: bad base64"), // non-canonical last symbol
            (6, "2: lQo=", "owners: bad base64"),
            (6, "2:", "owners: 0 bytes, 6 routes of 2 bits need 2"),
            (6, "2:lQ==", "owners: 1 bytes, 6 routes of 2 bits need 2"),
            (
                6,
                &format!("2:{long}"),
                "owners: 3 bytes, 6 routes of 2 bits need 2",
            ),
            (
                5,
                "2:lQo=",
                "owners: the unused 6 bits after the last route are not zero",
            ),
            (
                6,
                &high_padding[..],
                "owners: the unused 4 bits after the last route",
            ),
            (
                6,
                &packed(2, &[1, 1, 1, 2, 2, 3]),
                "owners: route 5 has owner 3, there are 2 nodes",
            ),
            (
                6,
                &packed(13, &[8191, 1, 1, 2, 2, 2]),
                "route 0 has owner 8191",
            ),
            (
                6,
                "2:lRo=",
                "owners: the unused 4 bits after the last route are not zero",
            ),
            (
                6,
                "2:lYo=",
                "owners: the unused 4 bits after the last route are not zero",
            ),
        ] {
            let err = load_in(routes, owners).unwrap_err();
            assert!(err.contains(needle), "{owners}: {needle:?} not in {err:?}");
            assert!(err.contains("invalid route table: owners: "), "{err}");
        }
        // Index out of range with a table of no nodes: only 0 is valid.
        let mut empty = json.clone();
        empty["nodes"] = serde_json::json!([]);
        empty["owners"] = packed(1, &[0, 0, 0, 0, 0, 1]).into();
        let err = serde_json::from_value::<RouteTable>(empty.clone())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("route 5 has owner 1, there are 0 nodes"),
            "{err}"
        );
        empty["owners"] = packed(1, &[0; 6]).into();
        assert_eq!(
            serde_json::from_value::<RouteTable>(empty).unwrap(),
            RouteTable::new(6).unwrap()
        );
        // The constructor checks the same things.
        let nodes = || t.nodes();
        assert_eq!(
            RouteTable::from_parts(nodes(), None, &[]),
            Err(RouteError::InvalidRouteCount(0))
        );
        assert_eq!(
            RouteTable::from_parts(nodes(), None, &[Some(1), Some(4), None]),
            Err(RouteError::Invalid(
                "route 1 owned by unknown node 4".into()
            ))
        );
        assert_eq!(
            RouteTable::from_parts(nodes(), Some(3), &[None]),
            Err(RouteError::Invalid("reserve 3 is not a node".into()))
        );
        assert_eq!(
            RouteTable::from_parts(nodes().chain(nodes()), None, &[None]),
            Err(RouteError::Invalid("node 1 listed twice".into()))
        );
        let zero = NodeInfo {
            weight: 0,
            state: NodeState::Active,
        };
        assert_eq!(
            RouteTable::from_parts([(7, zero)], None, &[None]),
            Err(RouteError::ZeroWeight(7))
        );
        let one = NodeInfo { weight: 1, ..zero };
        assert_eq!(
            RouteTable::from_parts([(MAX_NODES, one)], None, &[None]),
            Err(RouteError::NodeOutOfRange(MAX_NODES))
        );
        let t2 = RouteTable::from_parts(nodes(), None, &[Some(2), None, Some(2)]).unwrap();
        assert_eq!((t2.count(2), t2.unowned(), t2.route_count()), (2, 1, 3));
    }

    /// The numbers quoted on [`TableRepr`]:
    /// `cargo test -p lb-userspace --lib routes::tests::persisted_size -- --nocapture`.
    #[test]
    fn persisted_size_packed_vs_per_route() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        /// Bytes packed, bytes in the per-route form, bytes and count in the old run form.
        fn sizes(t: &RouteTable) -> (usize, usize, usize, usize) {
            let packed = serde_json::to_string(t).unwrap();
            let mut old = serde_json::to_value(t).unwrap();
            old["owners"] = serde_json::json!(t.owners().collect::<Vec<_>>());
            let per_route = serde_json::to_string(&old).unwrap();
            let mut runs: Vec<(Option<u32>, u32)> = Vec::new();
            for owner in t.owners() {
                match runs.last_mut() {
                    Some((o, len)) if *o == owner => *len += 1,
                    _ => runs.push((owner, 1)),
                }
            }
            let count = runs.len();
            old["owners"] = serde_json::json!(runs);
            let as_runs = serde_json::to_string(&old).unwrap();
            (packed.len(), per_route.len(), as_runs.len(), count)
        }
        for weighted in [false, true] {
            let mut rng = StdRng::seed_from_u64(50);
            let weight = |rng: &mut StdRng| if weighted { rng.gen_range(1..=100) } else { 1 };
            let mut t = RouteTable::new(65536).unwrap();
            for node in 0..20 {
                let w = weight(&mut rng);
                t.join(node, w).unwrap();
            }
            let fresh = sizes(&t);
            check_packed_round_trip(&t);
            for _ in 0..50 {
                let node = rng.gen_range(0..20);
                if t.node(node).map(|i| i.state) == Some(NodeState::Active) {
                    t.fail(node).unwrap();
                } else {
                    let w = weight(&mut rng);
                    t.join(node, w).unwrap();
                }
            }
            let churned = sizes(&t);
            assert_eq!(t.nodes().count(), 20);
            let weights = if weighted {
                "weights 1..=100"
            } else {
                "equal weights"
            };
            for (when, (packed, per_route, runs, count)) in
                [("20 joins", fresh), ("+50 join/fail", churned)]
            {
                println!(
                    "65536 routes, 20 nodes, {weights}, {when}: {packed} bytes packed, \
                     {per_route} bytes per route ({runs} bytes as {count} runs)"
                );
            }
            // 65536 5-bit values are 40960 bytes, 54616 in base64 with the width, whatever
            // the history; one number per route is between 2.5 and 3 times that.
            for (packed, per_route, ..) in [fresh, churned] {
                assert!(packed < 64 * 1024, "{packed}");
                assert!(packed * 2 < per_route, "{packed} vs {per_route}");
            }
            assert!(churned.0.abs_diff(fresh.0) < 100, "{fresh:?} {churned:?}");
            check_packed_round_trip(&t);
        }
    }

    /// Ad-hoc timing, asserts nothing about time. For real numbers:
    /// `cargo test --release -p lb-userspace --lib routes::tests::timing -- --nocapture`.
    #[test]
    fn timing_65536_routes_1000_nodes() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        use std::time::Instant;
        fn time(t: &mut RouteTable, name: &str, f: impl FnOnce(&mut RouteTable) -> Vec<Move>) {
            let start = Instant::now();
            let moves = f(t);
            let took = start.elapsed();
            println!("{name:<28} {took:>9.1?} {:>6} moves", moves.len());
            assert!(!moves.is_empty());
        }
        let mut rng = StdRng::seed_from_u64(7);
        let mut t = RouteTable::new(65536).unwrap();
        let start = Instant::now();
        for node in 0..1000 {
            t.join(node, rng.gen_range(1..=100)).unwrap();
        }
        println!("1000 joins (table build)     {:>9.1?}", start.elapsed());
        time(&mut t, "join", |t| t.join(2000, 77).unwrap());
        time(&mut t, "fail (spread)", |t| t.fail(10).unwrap());
        time(&mut t, "rejoin", |t| t.join(10, 60).unwrap());
        time(&mut t, "drain", |t| t.drain(20).unwrap());
        time(&mut t, "activate (undrain)", |t| t.activate(20).unwrap());
        time(&mut t, "set_weight (to 100)", |t| {
            t.set_weight(30, 100).unwrap()
        });
        time(&mut t, "set_weight (to 1)", |t| {
            t.set_weight(30, 1).unwrap()
        });
        time(&mut t, "remove", |t| t.remove(40).unwrap());
        t.join(1000, 50).unwrap();
        time(&mut t, "set_reserve", |t| {
            t.set_reserve(Some(1000)).unwrap()
        });
        time(&mut t, "fail (to reserve)", |t| t.fail(50).unwrap());
        time(&mut t, "rejoin (reserve flows back)", |t| {
            t.join(50, 5).unwrap()
        });
        let start = Instant::now();
        let owners: Vec<u32> = t.owners().map(|o| o.unwrap_or(u32::MAX)).collect();
        println!("owners() to a Vec (map push) {:>9.1?}", start.elapsed());
        let start = Instant::now();
        let json = serde_json::to_string(&t).unwrap();
        println!(
            "serialize (JSON)             {:>9.1?} {} bytes",
            start.elapsed(),
            json.len()
        );
        let start = Instant::now();
        let back: RouteTable = serde_json::from_str(&json).unwrap();
        println!("deserialize + validate       {:>9.1?}", start.elapsed());
        assert_eq!(back, t);
        assert_eq!(owners.len(), 65536);
        assert!(t.is_balanced());
    }
}
