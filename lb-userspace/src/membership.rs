//! The failure detector: heartbeats in, membership events out.
//!
//! Pure and deterministic: time is passed in, nothing sleeps, nothing does I/O, and nodes are
//! visited in id order, so the same inputs always give the same events. The daemon calls
//! [`Membership::on_heartbeat`] for every authentic heartbeat and [`Membership::tick`] when
//! [`Membership::next_deadline`] is reached, so detection latency is exactly the configured
//! `k x interval`, never "that plus a polling period".
//!
//! Rules:
//! - A node is *down* once `miss_limit` (k) intervals pass without a valid heartbeat: at
//!   `last valid heartbeat + k x interval` (inclusive), where the interval is the node's
//!   configured override or else the one its latest heartbeat advertises.
//! - A brand-new node (never up since it was added) is *up* on its first valid heartbeat.
//! - A node that was down, or that restarted (new incarnation) under
//!   [`RestartPolicy::HoldDown`], is *joining*: it becomes up only after `hold_down` of
//!   heartbeats with no gap of k intervals and no further restart. So a flapping node gives one
//!   `NodeDown` and no `NodeUp` until it has been stable for the whole hold-down.
//! - Replays (sequence not above the last one of the same incarnation) and older incarnations
//!   are rejected and counted; they never refresh liveness. Two exceptions let a node back in
//!   whose accepted incarnation cannot be beaten (an incarnation is its agent's start time in
//!   ms, `heartbeat::new_incarnation`; "the clock" is the balancer's, passed in):
//!   - the accepted incarnation claims a start more than `clock_skew` in the future (a forged
//!     one, or a node whose clock was ahead) and has been silent for an interval: a lower one
//!     is accepted as a restart;
//!   - the node is silent (k intervals without a valid heartbeat: whatever sent the accepted
//!     incarnation stopped) and the lower incarnation is *current*, its start within
//!     `clock_skew` of the clock (an agent restarted on a node whose clock stepped back).
//!
//!   Anything else lower stays rejected, so captured heartbeats cannot be replayed except,
//!   for a silent node, those of an agent started within the last `clock_skew`.
//! - Two agents claiming one node: the newer incarnation is accepted; an older one that keeps
//!   beating (rising sequence) while the accepted one is live is rejected as
//!   [`Reject::Duplicate`], counted, and shown on the node ([`NodeStatus::duplicate_seen`]).
//! - The advertised weight is clamped to the node's `max_weight` (counted), so one node cannot
//!   take every route by advertising a huge weight.
//! - The interval is the one the node advertises, but never more than the configured maximum
//!   (`heartbeat_interval_max`, by default the expected `heartbeat_interval`): an agent may
//!   beat faster than expected, never slower.
//! - **Fail static**: when, at the moment a node would go down, more than `fail_static_share`
//!   of the up nodes (or all of them) have been silent for over half their detection window,
//!   the likelier fault is the balancer's own receive path (CPU, NIC, its own network), not
//!   that many nodes died together. Nobody is taken down; the detector holds until
//!   heartbeats flow again and judges then: nodes that are still silent go down. Each such
//!   episode is counted. Time is the heartbeat's arrival time (the kernel's receive stamp),
//!   so a daemon that was busy does not mistake its own backlog for silence.
use crate::heartbeat::{Heartbeat, NodeState};
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Default k: intervals missed before a node is down.
pub const DEFAULT_MISS_LIMIT: u32 = 3;
/// Default hold-down before a returning node is up again.
pub const DEFAULT_HOLD_DOWN: Duration = Duration::from_secs(2);
/// Advertised intervals are clamped to this, so a buggy agent cannot make itself immortal.
pub const MAX_INTERVAL: Duration = Duration::from_secs(60);
/// Advertised intervals below this are raised to it.
pub const MIN_INTERVAL: Duration = Duration::from_millis(1);
/// Default for how far an incarnation's start time may be from the balancer's clock and still
/// count as current (Kerberos allows the same skew).
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// The start time an incarnation claims, in ms since the Unix epoch (its high 44 bits, see
/// `heartbeat::new_incarnation`).
pub fn incarnation_ms(incarnation: u64) -> u64 {
    incarnation >> 20
}

/// `t` in ms since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What to do when a node that is up announces a new incarnation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RestartPolicy {
    /// `NodeRestarted` + `NodeDown{Restarted}`, then up again after the hold-down (a rebooted
    /// node lost its state; a crash-looping node stays out). The controller drains such a node
    /// rather than failing it: its tracked flows stay (an agent restart on a running node breaks
    /// no connection; a rebooted node resets its old flows itself), no new flow goes to it, and
    /// if it goes silent during the hold-down it is failed (`NodeDown{MissedHeartbeats}`).
    #[default]
    HoldDown,
    /// `NodeRestarted` only; the node stays up (an agent restart that does not touch the
    /// service, e.g. an agent upgrade).
    StayUp,
}

/// Per-node failure-detector settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeCfg {
    /// k: missed intervals before the node is down (0 is treated as 1).
    pub miss_limit: u32,
    /// Stable time a returning node needs before it is up again.
    pub hold_down: Duration,
    /// Fixed heartbeat interval; `None` = the interval each heartbeat advertises, at most
    /// `max_interval`.
    pub interval: Option<Duration>,
    /// The longest advertised interval honoured (a slower agent is judged at this one).
    pub max_interval: Duration,
    pub on_restart: RestartPolicy,
    /// The largest advertised weight honoured; a larger one is clamped to it (and counted).
    pub max_weight: u32,
    /// How far an incarnation's start may be from the balancer's clock and count as current.
    pub clock_skew: Duration,
}

impl Default for NodeCfg {
    fn default() -> Self {
        NodeCfg {
            miss_limit: DEFAULT_MISS_LIMIT,
            hold_down: DEFAULT_HOLD_DOWN,
            interval: None,
            max_interval: MAX_INTERVAL,
            on_restart: RestartPolicy::HoldDown,
            max_weight: u32::MAX,
            clock_skew: DEFAULT_CLOCK_SKEW,
        }
    }
}

/// Why a node went down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DownReason {
    /// k intervals without a valid heartbeat.
    MissedHeartbeats,
    /// A new incarnation while up ([`RestartPolicy::HoldDown`]).
    Restarted,
    /// The active health check failed `fall` times in a row (see `health`).
    HealthCheck,
}

/// A membership change. Heartbeats and active health checks produce the same type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// The node is up. `weight` is the advertised weight (0 = keep the configured one);
    /// `draining` says it came up already draining.
    NodeUp {
        node: u32,
        weight: u32,
        draining: bool,
    },
    NodeDown {
        node: u32,
        reason: DownReason,
    },
    /// An up node reports draining.
    NodeDraining {
        node: u32,
    },
    /// An up, draining node reports up again.
    NodeUndrained {
        node: u32,
    },
    /// A new incarnation was seen (reported at once, whatever the node's phase).
    NodeRestarted {
        node: u32,
        incarnation: u64,
    },
    /// An up node advertises a different weight.
    WeightChanged {
        node: u32,
        old: u32,
        new: u32,
    },
}

impl Event {
    /// The node the event is about.
    pub fn node(&self) -> u32 {
        match *self {
            Event::NodeUp { node, .. }
            | Event::NodeDown { node, .. }
            | Event::NodeDraining { node }
            | Event::NodeUndrained { node }
            | Event::NodeRestarted { node, .. }
            | Event::WeightChanged { node, .. } => node,
        }
    }
}

/// Why a heartbeat was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Reject {
    #[error("heartbeat from unknown node")]
    UnknownNode,
    #[error("replayed heartbeat (sequence not above the last one)")]
    Replay,
    #[error("heartbeat from an older incarnation")]
    StaleIncarnation,
    #[error(
        "heartbeat from a second agent claiming the node (an older incarnation that keeps \
         beating beside the accepted one)"
    )]
    Duplicate,
}

/// Heartbeats accepted and rejected, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MembershipCounters {
    pub accepted: u64,
    pub unknown_node: u64,
    pub replay: u64,
    pub stale_incarnation: u64,
    /// Fail-static episodes: times the detector held nodes up because too many went silent.
    pub fail_static: u64,
    /// Heartbeats advertising an interval above the node's maximum (judged at the maximum).
    pub interval_clamped: u64,
    /// Heartbeats of a second agent claiming a node ([`Reject::Duplicate`]).
    pub duplicate: u64,
    /// Heartbeats advertising a weight above the node's maximum (clamped to it).
    pub weight_clamped: u64,
    /// Lower incarnations accepted (a future one replaced, or a stepped-back clock).
    pub incarnation_reset: u64,
}

/// Where a node stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Added, never heard from.
    New,
    /// Up: routes may point at it.
    Up,
    /// Heard from again after being down (or a restart); waiting out the hold-down.
    Joining { since: Instant },
    /// Down.
    Down,
}

/// What the detector knows about a node (for `lb node list`, metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    pub phase: Phase,
    pub cfg: NodeCfg,
    pub incarnation: Option<u64>,
    pub sequence: u64,
    pub last_seen: Option<Instant>,
    /// When the node is (or was) declared down without another valid heartbeat.
    pub expires: Option<Instant>,
    /// The interval in use (override, or advertised and capped).
    pub interval: Option<Duration>,
    /// The interval the node's last heartbeat advertised.
    pub advertised_interval: Option<Duration>,
    pub draining: bool,
    pub weight: u32,
    pub cpu_permille: Option<u16>,
    pub active_conns: Option<u32>,
    /// Joining after a restart while up: the controller holds it drained, so going silent
    /// now is reported (`NodeDown`), unlike a joiner that was down.
    pub held_after_restart: bool,
    /// The latest heartbeat of an older incarnation that was rejected (a second agent, a
    /// stepped-back clock, or a delayed datagram of an agent that restarted).
    pub rival: Option<Rival>,
    /// When a second agent claiming this node last beat (see [`Reject::Duplicate`]).
    pub duplicate_seen: Option<Instant>,
}

/// A rejected older incarnation of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rival {
    pub incarnation: u64,
    pub sequence: u64,
    pub at: Instant,
}

/// What to make of a heartbeat whose incarnation is below the accepted one.
enum Lower {
    /// Accept it as a restart (see the module docs).
    Reset,
    /// A second agent that keeps beating beside the accepted one.
    Duplicate,
    Stale,
}

/// Judges a heartbeat `hb` of `n` whose incarnation is below the accepted `accepted`, at `now`
/// (`wall`: the balancer's clock, `None` if unknown) and records it as the node's rival.
fn lower(
    n: &mut NodeStatus,
    now: Instant,
    wall: Option<SystemTime>,
    accepted: u64,
    hb: &Heartbeat,
) -> Lower {
    let silent = n.expires.is_none_or(|t| now >= t);
    let quiet_for_an_interval = n
        .last_seen
        .is_none_or(|t| now.saturating_duration_since(t) >= n.interval.unwrap_or(MIN_INTERVAL));
    if let Some(wall) = wall {
        let clock = unix_ms(wall);
        let skew = u64::try_from(n.cfg.clock_skew.as_millis()).unwrap_or(u64::MAX);
        let accepted_in_future = incarnation_ms(accepted) > clock.saturating_add(skew);
        let current = incarnation_ms(hb.incarnation).abs_diff(clock) <= skew;
        if (accepted_in_future && quiet_for_an_interval) || (silent && current) {
            n.rival = None;
            return Lower::Reset;
        }
    }
    let again = n
        .rival
        .is_some_and(|r| r.incarnation == hb.incarnation && hb.sequence > r.sequence);
    n.rival = Some(Rival {
        incarnation: hb.incarnation,
        sequence: hb.sequence,
        at: now,
    });
    if again && !silent {
        n.duplicate_seen = Some(now);
        Lower::Duplicate
    } else {
        Lower::Stale
    }
}

/// The failure detector.
#[derive(Clone, Debug)]
pub struct Membership {
    defaults: NodeCfg,
    nodes: BTreeMap<u32, NodeStatus>,
    counters: MembershipCounters,
    /// Fail-static threshold (share of up nodes silent at once); `None` = off.
    fail_static_share: Option<f64>,
    /// Set while fail-static holds nodes up.
    holding: Option<Hold>,
}

/// A fail-static episode.
#[derive(Clone, Copy, Debug)]
struct Hold {
    /// When to judge again without a heartbeat.
    recheck: Instant,
    /// When the first heartbeat arrived after the episode began: the receive path works
    /// again. Every live node beats within [`Membership::resume_grace`] of it; then the
    /// episode ends and nodes still silent are judged normally.
    resumed: Option<Instant>,
}

/// While fail-static holds, the detector judges again this often (and at every heartbeat).
pub const FAIL_STATIC_RECHECK: Duration = Duration::from_millis(100);

fn add(t: Instant, d: Duration) -> Option<Instant> {
    t.checked_add(d)
}

impl Membership {
    /// An empty detector; `defaults` is what [`Membership::add_node_default`] uses.
    pub fn new(defaults: NodeCfg) -> Membership {
        Membership {
            defaults,
            nodes: BTreeMap::new(),
            counters: MembershipCounters::default(),
            fail_static_share: None,
            holding: None,
        }
    }

    /// Turns fail-static on with this threshold (`0 < share <= 1`; 1 = only when every up node
    /// goes silent), or off with `None`.
    pub fn set_fail_static(&mut self, share: Option<f64>) {
        self.fail_static_share = share;
    }

    /// Whether fail-static is holding nodes up now.
    pub fn holding(&self) -> bool {
        self.holding.is_some()
    }

    /// Whether, at `now`, so many up nodes are silent that a missed deadline is more likely
    /// the balancer's own fault (see the module docs).
    fn too_many_silent(&self, now: Instant) -> bool {
        let Some(share) = self.fail_static_share else {
            return false;
        };
        let (mut up, mut silent) = (0usize, 0usize);
        for n in self.nodes.values().filter(|n| n.phase == Phase::Up) {
            up += 1;
            let window = n
                .interval
                .and_then(|i| i.checked_mul(n.cfg.miss_limit))
                .unwrap_or(Duration::ZERO);
            let quiet = n
                .last_seen
                .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
            if quiet > window / 2 {
                silent += 1;
            }
        }
        up > 0 && (silent == up || silent as f64 > share * up as f64)
    }

    /// Starts (and counts) or extends a fail-static episode.
    fn hold(&mut self, now: Instant) {
        match &mut self.holding {
            Some(h) => h.recheck = now + FAIL_STATIC_RECHECK,
            None => {
                self.counters.fail_static += 1;
                self.holding = Some(Hold {
                    recheck: now + FAIL_STATIC_RECHECK,
                    resumed: None,
                });
            }
        }
    }

    /// How long after heartbeats resume every live node has beaten again: two of the longest
    /// interval in use (jitter included).
    fn resume_grace(&self) -> Duration {
        let longest = self
            .nodes
            .values()
            .filter(|n| n.phase == Phase::Up)
            .filter_map(|n| n.interval)
            .max()
            .unwrap_or(FAIL_STATIC_RECHECK);
        longest * 2
    }

    /// When a fail-static episode wants to be judged again, if one holds.
    fn hold_wake(&self) -> Option<Instant> {
        let h = self.holding?;
        Some(h.resumed.map_or(h.recheck, |r| r + self.resume_grace()))
    }

    /// Decides whether missed deadlines at `now` are acted on; tracks fail-static episodes:
    /// one starts when a deadline passes while too many nodes are silent, and ends once
    /// heartbeats have flowed again for [`Membership::resume_grace`] (a real failure of many
    /// nodes is then acted on, just later), or when no deadline is due any more. Only
    /// `tick` (`ends`) ends an episode, so every node due then is judged in the same pass.
    fn judge(&mut self, now: Instant, ends: bool) -> bool {
        let due = self
            .nodes
            .values()
            .any(|n| n.phase == Phase::Up && n.expires.is_some_and(|t| now >= t));
        if !due {
            self.holding = None;
            return true;
        }
        if let Some(Hold {
            resumed: Some(r), ..
        }) = self.holding
            && now >= r + self.resume_grace()
        {
            if ends {
                self.holding = None;
            }
            return true;
        }
        if self.holding.is_some() || self.too_many_silent(now) {
            self.hold(now);
            false
        } else {
            true
        }
    }

    /// The default node settings.
    pub fn defaults(&self) -> NodeCfg {
        self.defaults
    }

    /// Adds (or reconfigures, keeping its state) a node.
    pub fn add_node(&mut self, id: u32, cfg: NodeCfg) {
        let cfg = NodeCfg {
            miss_limit: cfg.miss_limit.max(1),
            ..cfg
        };
        self.nodes
            .entry(id)
            .and_modify(|n| n.cfg = cfg)
            .or_insert(NodeStatus {
                phase: Phase::New,
                cfg,
                incarnation: None,
                sequence: 0,
                last_seen: None,
                expires: None,
                interval: cfg.interval,
                advertised_interval: None,
                draining: false,
                weight: 0,
                cpu_permille: None,
                active_conns: None,
                held_after_restart: false,
                rival: None,
                duplicate_seen: None,
            });
    }

    /// Adds a node with the default settings.
    pub fn add_node_default(&mut self, id: u32) {
        self.add_node(id, self.defaults);
    }

    /// Forgets a node; its heartbeats are then rejected as `UnknownNode`. No event.
    pub fn remove_node(&mut self, id: u32) -> bool {
        self.nodes.remove(&id).is_some()
    }

    /// Marks a node up without a heartbeat (a restarted daemon re-adopting a node that was up):
    /// it stays up until `now + grace` unless a heartbeat extends it. Its next heartbeat is
    /// accepted whatever its incarnation, and compared against `draining` and `weight`.
    pub fn assume_up(
        &mut self,
        id: u32,
        now: Instant,
        grace: Duration,
        draining: bool,
        weight: u32,
    ) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.phase = Phase::Up;
            n.incarnation = None;
            n.sequence = 0;
            n.last_seen = Some(now);
            n.expires = add(now, grace);
            n.draining = draining;
            n.weight = weight;
        }
    }

    /// Restores the last incarnation and sequence accepted from a node before a daemon restart
    /// (persisted state), so heartbeats captured before the restart stay rejected as replays.
    /// Call after [`Membership::add_node`] (and [`Membership::assume_up`], which forgets them).
    pub fn restore_seen(&mut self, id: u32, incarnation: u64, sequence: u64) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.incarnation = Some(incarnation);
            n.sequence = sequence;
        }
    }

    /// A node's status.
    pub fn status(&self, id: u32) -> Option<&NodeStatus> {
        self.nodes.get(&id)
    }

    /// All nodes, in id order.
    pub fn nodes(&self) -> impl Iterator<Item = (u32, &NodeStatus)> {
        self.nodes.iter().map(|(id, n)| (*id, n))
    }

    /// Accepted/rejected heartbeat counters.
    pub fn counters(&self) -> &MembershipCounters {
        &self.counters
    }

    /// Processes an authentic heartbeat received at `now`, without the balancer's wall clock
    /// (so no lower incarnation is ever accepted; see [`Membership::on_heartbeat_at`]).
    pub fn on_heartbeat(&mut self, now: Instant, hb: &Heartbeat) -> Result<Vec<Event>, Reject> {
        self.on_heartbeat_at(now, None, hb)
    }

    /// Processes an authentic heartbeat received at `now` (monotonic) and `wall` (the
    /// balancer's clock at the same moment, which judges incarnations; see the module docs).
    pub fn on_heartbeat_at(
        &mut self,
        now: Instant,
        wall: Option<SystemTime>,
        hb: &Heartbeat,
    ) -> Result<Vec<Event>, Reject> {
        let Some(n) = self.nodes.get_mut(&hb.node) else {
            self.counters.unknown_node += 1;
            return Err(Reject::UnknownNode);
        };
        let mut restarted = false;
        if let Some(inc) = n.incarnation {
            if hb.incarnation < inc {
                match lower(n, now, wall, inc, hb) {
                    Lower::Reset => self.counters.incarnation_reset += 1,
                    Lower::Duplicate => {
                        self.counters.duplicate += 1;
                        return Err(Reject::Duplicate);
                    }
                    Lower::Stale => {
                        self.counters.stale_incarnation += 1;
                        return Err(Reject::StaleIncarnation);
                    }
                }
            }
            if hb.incarnation == inc && hb.sequence <= n.sequence {
                self.counters.replay += 1;
                return Err(Reject::Replay);
            }
            restarted = hb.incarnation != inc;
        }
        let weight = hb.weight.min(n.cfg.max_weight);
        if weight < hb.weight {
            self.counters.weight_clamped += 1;
        }
        self.counters.accepted += 1;
        let node = hb.node;
        let mut events = Vec::new();
        // Whatever tick() was or was not called, silence before this heartbeat counts first,
        // unless fail-static holds or should (this node's silence was then likely ours).
        let own_expired = self
            .nodes
            .get(&node)
            .is_some_and(|n| n.expires.is_some_and(|t| now >= t));
        let forgiven = own_expired && !self.judge(now, false);
        if let Some(h) = &mut self.holding {
            // A heartbeat got through: the receive path works again.
            h.resumed.get_or_insert(now);
        }
        if !forgiven && let Some(n) = self.nodes.get_mut(&node) {
            expire(node, n, now, &mut events);
        }
        let Some(n) = self.nodes.get_mut(&node) else {
            return Ok(events);
        };

        n.incarnation = Some(hb.incarnation);
        n.sequence = hb.sequence;
        n.last_seen = Some(now);
        let advertised = Duration::from_millis(u64::from(hb.interval_ms));
        n.advertised_interval = Some(advertised);
        let cap = n.cfg.max_interval.min(MAX_INTERVAL);
        if n.cfg.interval.is_none() && advertised > cap {
            self.counters.interval_clamped += 1;
        }
        let interval = n
            .cfg
            .interval
            .unwrap_or_else(|| advertised.clamp(MIN_INTERVAL, cap.max(MIN_INTERVAL)));
        n.interval = Some(interval);
        n.expires = interval
            .checked_mul(n.cfg.miss_limit)
            .and_then(|d| add(now, d));
        n.cpu_permille = hb.cpu_permille;
        n.active_conns = hb.active_conns;
        let draining = hb.state == NodeState::Draining;
        if restarted {
            events.push(Event::NodeRestarted {
                node,
                incarnation: hb.incarnation,
            });
        }

        match n.phase {
            Phase::New => {
                n.phase = Phase::Up;
                n.draining = draining;
                n.weight = weight;
                events.push(Event::NodeUp {
                    node,
                    weight: n.weight,
                    draining,
                });
                return Ok(events);
            }
            Phase::Up if restarted && n.cfg.on_restart == RestartPolicy::HoldDown => {
                events.push(Event::NodeDown {
                    node,
                    reason: DownReason::Restarted,
                });
                n.phase = Phase::Joining { since: now };
                n.held_after_restart = true;
            }
            Phase::Up => {
                if draining != n.draining {
                    events.push(if draining {
                        Event::NodeDraining { node }
                    } else {
                        Event::NodeUndrained { node }
                    });
                }
                if weight != n.weight {
                    events.push(Event::WeightChanged {
                        node,
                        old: n.weight,
                        new: weight,
                    });
                }
            }
            Phase::Down => n.phase = Phase::Joining { since: now },
            Phase::Joining { .. } if restarted => n.phase = Phase::Joining { since: now },
            Phase::Joining { .. } => {}
        }
        n.draining = draining;
        n.weight = weight;
        if let Phase::Joining { since } = n.phase
            && now.saturating_duration_since(since) >= n.cfg.hold_down
        {
            n.phase = Phase::Up;
            n.held_after_restart = false;
            events.push(Event::NodeUp {
                node,
                weight: n.weight,
                draining,
            });
        }
        Ok(events)
    }

    /// Applies the passage of time: nodes silent for k intervals go down, joining nodes whose
    /// hold-down is over come up.
    pub fn tick(&mut self, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        let act = self.judge(now, true);
        for (&id, n) in self.nodes.iter_mut() {
            if act {
                expire(id, n, now, &mut events);
            }
            // A joiner past its own deadline (held by fail static) is never promoted.
            if let Phase::Joining { since } = n.phase
                && add(since, n.cfg.hold_down).is_some_and(|t| now >= t)
                && n.expires.is_none_or(|t| now < t)
            {
                n.phase = Phase::Up;
                n.held_after_restart = false;
                events.push(Event::NodeUp {
                    node: id,
                    weight: n.weight,
                    draining: n.draining,
                });
            }
        }
        events
    }

    /// The earliest instant at which [`Membership::tick`] can change anything, or `None` when
    /// only a heartbeat can (sleep until then, or until a heartbeat arrives).
    pub fn next_deadline(&self) -> Option<Instant> {
        // While fail-static holds, passed deadlines are judged again when the episode wants.
        let wake = self.hold_wake();
        let later = |t: Instant| match wake {
            Some(w) if t < w => w,
            _ => t,
        };
        self.nodes
            .values()
            .filter_map(|n| match n.phase {
                Phase::Up => n.expires.map(later),
                Phase::Joining { since } => {
                    let up = add(since, n.cfg.hold_down);
                    match (n.expires.map(later), up) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    }
                }
                Phase::New | Phase::Down => None,
            })
            .min()
    }
}

/// Up or joining node past its expiry: down (an event only if it was up).
fn expire(id: u32, n: &mut NodeStatus, now: Instant, events: &mut Vec<Event>) {
    let expired = n.expires.is_some_and(|t| now >= t);
    match n.phase {
        Phase::Up if expired => {
            n.phase = Phase::Down;
            events.push(Event::NodeDown {
                node: id,
                reason: DownReason::MissedHeartbeats,
            });
        }
        Phase::Joining { .. } if expired => {
            n.phase = Phase::Down;
            // A node held down after a restart is still draining in the tables: it fails now.
            if std::mem::take(&mut n.held_after_restart) {
                events.push(Event::NodeDown {
                    node: id,
                    reason: DownReason::MissedHeartbeats,
                });
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    struct Agent {
        node: u32,
        inc: u64,
        seq: u64,
        state: NodeState,
        weight: u32,
    }

    impl Agent {
        fn new(node: u32, inc: u64) -> Agent {
            Agent {
                node,
                inc,
                seq: 0,
                state: NodeState::Up,
                weight: 0,
            }
        }
        fn beat(&mut self) -> Heartbeat {
            self.seq += 1;
            Heartbeat {
                node: self.node,
                incarnation: self.inc,
                sequence: self.seq,
                state: self.state,
                weight: self.weight,
                interval_ms: 100,
                cpu_permille: None,
                active_conns: None,
            }
        }
    }

    fn setup() -> (Membership, Instant) {
        let mut m = Membership::new(NodeCfg::default());
        m.add_node_default(1);
        m.add_node_default(2);
        (m, Instant::now())
    }

    fn up(node: u32) -> Event {
        Event::NodeUp {
            node,
            weight: 0,
            draining: false,
        }
    }

    #[test]
    fn up_on_first_beat_and_nothing_while_steady() {
        let (mut m, t0) = setup();
        assert_eq!(m.next_deadline(), None);
        assert!(
            m.tick(t0 + Duration::from_secs(10)).is_empty(),
            "never-seen nodes are not 'down'"
        );
        let mut a = Agent::new(1, 10);
        assert_eq!(m.on_heartbeat(t0, &a.beat()), Ok(vec![up(1)]));
        for i in 1..50 {
            assert_eq!(m.on_heartbeat(t0 + 100 * MS * i, &a.beat()), Ok(vec![]));
            assert!(m.tick(t0 + 100 * MS * i + 50 * MS).is_empty());
        }
        assert_eq!(m.status(1).unwrap().phase, Phase::Up);
        assert_eq!(m.status(2).unwrap().phase, Phase::New);
        assert_eq!(m.counters().accepted, 50);
    }

    #[test]
    fn down_after_exactly_k_intervals() {
        let (mut m, t0) = setup();
        let mut a = Agent::new(1, 10);
        m.on_heartbeat(t0, &a.beat()).unwrap();
        let deadline = t0 + 300 * MS;
        assert_eq!(m.next_deadline(), Some(deadline));
        assert!(m.tick(deadline - MS).is_empty());
        assert_eq!(m.status(1).unwrap().phase, Phase::Up);
        assert_eq!(
            m.tick(deadline + MS),
            vec![Event::NodeDown {
                node: 1,
                reason: DownReason::MissedHeartbeats
            }]
        );
        assert!(
            m.tick(deadline + 2 * MS).is_empty(),
            "down is reported once"
        );
        assert_eq!(m.next_deadline(), None);
        // Exactly at the deadline counts as missed, so next_deadline is an exact wake-up time.
        let mut b = Agent::new(2, 1);
        m.on_heartbeat(t0, &b.beat()).unwrap();
        assert_eq!(m.next_deadline(), Some(deadline));
        assert_eq!(m.tick(deadline).len(), 1);
        let _ = b.beat();
    }

    #[test]
    fn interval_override_and_miss_limit() {
        let mut m = Membership::new(NodeCfg::default());
        m.add_node(
            1,
            NodeCfg {
                miss_limit: 5,
                interval: Some(200 * MS),
                ..NodeCfg::default()
            },
        );
        let t0 = Instant::now();
        let mut a = Agent::new(1, 1); // advertises 100 ms, overridden
        m.on_heartbeat(t0, &a.beat()).unwrap();
        assert_eq!(m.next_deadline(), Some(t0 + 1000 * MS));
        assert!(m.tick(t0 + 999 * MS).is_empty());
        assert_eq!(m.tick(t0 + 1001 * MS).len(), 1);
    }

    #[test]
    fn advertised_interval_is_used() {
        let (mut m, t0) = setup();
        let mut a = Agent::new(1, 1);
        let mut hb = a.beat();
        hb.interval_ms = 250;
        m.on_heartbeat(t0, &hb).unwrap();
        assert_eq!(m.next_deadline(), Some(t0 + 750 * MS));
        hb = a.beat();
        hb.interval_ms = u32::MAX; // clamped
        m.on_heartbeat(t0, &hb).unwrap();
        assert_eq!(m.next_deadline(), Some(t0 + 3 * MAX_INTERVAL));
    }

    #[test]
    fn replay_stale_and_unknown_rejected_and_counted() {
        let (mut m, t0) = setup();
        let mut a = Agent::new(1, 10);
        let first = a.beat();
        let second = a.beat();
        m.on_heartbeat(t0, &first).unwrap();
        m.on_heartbeat(t0 + MS, &second).unwrap();
        assert_eq!(m.on_heartbeat(t0 + 2 * MS, &second), Err(Reject::Replay));
        assert_eq!(m.on_heartbeat(t0 + 2 * MS, &first), Err(Reject::Replay));
        let mut old = Agent::new(1, 9);
        old.seq = 1000;
        assert_eq!(
            m.on_heartbeat(t0 + 2 * MS, &old.beat()),
            Err(Reject::StaleIncarnation)
        );
        assert_eq!(
            m.on_heartbeat(t0, &Agent::new(99, 1).beat()),
            Err(Reject::UnknownNode)
        );
        let c = m.counters();
        assert_eq!(
            (c.accepted, c.replay, c.stale_incarnation, c.unknown_node),
            (2, 2, 1, 1)
        );
        // Rejected beats do not keep the node alive.
        for i in 0..10 {
            let _ = m.on_heartbeat(t0 + 100 * MS * i, &second);
        }
        assert_eq!(m.tick(t0 + MS + 300 * MS).len(), 1);
    }

    #[test]
    fn restart_noticed_immediately_and_held_down() {
        let (mut m, t0) = setup();
        let mut a = Agent::new(1, 10);
        m.on_heartbeat(t0, &a.beat()).unwrap();
        m.on_heartbeat(t0 + 100 * MS, &a.beat()).unwrap();
        let mut b = Agent::new(1, 11); // restarted: sequence starts again
        let t1 = t0 + 150 * MS;
        assert_eq!(
            m.on_heartbeat(t1, &b.beat()),
            Ok(vec![
                Event::NodeRestarted {
                    node: 1,
                    incarnation: 11
                },
                Event::NodeDown {
                    node: 1,
                    reason: DownReason::Restarted
                },
            ])
        );
        // The old incarnation is now stale.
        assert_eq!(
            m.on_heartbeat(t1 + MS, &a.beat()),
            Err(Reject::StaleIncarnation)
        );
        assert_eq!(m.next_deadline(), Some(t1 + 300 * MS));
        let mut t = t1;
        while t + 100 * MS < t1 + DEFAULT_HOLD_DOWN {
            t += 100 * MS;
            assert_eq!(m.on_heartbeat(t, &b.beat()), Ok(vec![]));
            assert!(m.tick(t).is_empty());
        }
        assert_eq!(m.next_deadline(), Some(t1 + DEFAULT_HOLD_DOWN));
        assert_eq!(m.tick(t1 + DEFAULT_HOLD_DOWN), vec![up(1)]);
    }

    /// A node held down after a restart (drained in the tables) that goes silent is reported
    /// down, so its routes and flows leave it; a joiner that was down goes back silently.
    #[test]
    fn a_restarted_node_that_goes_silent_while_held_is_reported_down() {
        let (mut m, t0) = setup();
        let mut a = Agent::new(1, 10);
        m.on_heartbeat(t0, &a.beat()).unwrap();
        let mut b = Agent::new(1, 11);
        let t1 = t0 + 100 * MS;
        assert_eq!(m.on_heartbeat(t1, &b.beat()).unwrap().len(), 2);
        assert_eq!(
            m.tick(t1 + 300 * MS),
            vec![Event::NodeDown {
                node: 1,
                reason: DownReason::MissedHeartbeats
            }]
        );
        assert_eq!(m.status(1).unwrap().phase, Phase::Down);
        // Back again, never up since: held down like any returning node, silently.
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(m.on_heartbeat(t2, &b.beat()), Ok(vec![]));
        assert!(m.tick(t2 + 300 * MS).is_empty());
    }

    #[test]
    fn restart_stay_up_policy() {
        let mut m = Membership::new(NodeCfg::default());
        m.add_node(
            1,
            NodeCfg {
                on_restart: RestartPolicy::StayUp,
                ..NodeCfg::default()
            },
        );
        let t0 = Instant::now();
        m.on_heartbeat(t0, &Agent::new(1, 1).beat()).unwrap();
        assert_eq!(
            m.on_heartbeat(t0 + MS, &Agent::new(1, 2).beat()),
            Ok(vec![Event::NodeRestarted {
                node: 1,
                incarnation: 2
            }])
        );
        assert_eq!(m.status(1).unwrap().phase, Phase::Up);
    }

    #[test]
    fn hold_down_on_return_after_failure() {
        let (mut m, t0) = setup();
        let mut a = Agent::new(1, 10);
        m.on_heartbeat(t0, &a.beat()).unwrap();
        assert_eq!(m.tick(t0 + 300 * MS).len(), 1);
        // Same incarnation comes back (a network partition healed): hold-down too.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(m.on_heartbeat(t1, &a.beat()), Ok(vec![]));
        assert!(matches!(m.status(1).unwrap().phase, Phase::Joining { .. }));
        let mut t = t1;
        let mut ups = vec![];
        while t < t1 + DEFAULT_HOLD_DOWN + 500 * MS {
            t += 100 * MS;
            ups.extend(m.on_heartbeat(t, &a.beat()).unwrap());
            ups.extend(m.tick(t));
        }
        assert_eq!(ups, vec![up(1)]);
        assert_eq!(m.status(1).unwrap().phase, Phase::Up);
    }

    #[test]
    fn hold_down_restarts_after_a_gap() {
        let (mut m, t0) = setup();
        let mut a = Agent::new(1, 10);
        m.on_heartbeat(t0, &a.beat()).unwrap();
        m.tick(t0 + 300 * MS);
        let t1 = t0 + Duration::from_secs(1);
        m.on_heartbeat(t1, &a.beat()).unwrap();
        // Silent for k intervals while joining: back to down, silently.
        assert!(m.tick(t1 + 300 * MS).is_empty());
        assert_eq!(m.status(1).unwrap().phase, Phase::Down);
        let t2 = t1 + 400 * MS;
        m.on_heartbeat(t2, &a.beat()).unwrap();
        assert_eq!(m.status(1).unwrap().phase, Phase::Joining { since: t2 });
        // A heartbeat after a gap, without any tick in between, also restarts the hold-down.
        let t3 = t2 + 500 * MS;
        m.on_heartbeat(t3, &a.beat()).unwrap();
        assert_eq!(m.status(1).unwrap().phase, Phase::Joining { since: t3 });
    }

    #[test]
    fn flapping_node_does_not_churn() {
        let (mut m, t0) = setup();
        let mut events = vec![];
        let mut t = t0;
        // Crash-looping: a new incarnation every 400 ms for 10 s, 100 ms heartbeats in between.
        for inc in 1..=25u64 {
            let mut a = Agent::new(1, inc);
            for _ in 0..4 {
                events.extend(m.on_heartbeat(t, &a.beat()).unwrap());
                t += 100 * MS;
                events.extend(m.tick(t));
            }
        }
        let ups = events
            .iter()
            .filter(|e| matches!(e, Event::NodeUp { .. }))
            .count();
        let downs = events
            .iter()
            .filter(|e| matches!(e, Event::NodeDown { .. }))
            .count();
        assert_eq!((ups, downs), (1, 1), "{events:?}");
        // Flapping by silence: up 1 s, silent 0.5 s, repeatedly: one NodeUp per hold-down at most.
        let (mut m, t0) = setup();
        let mut a = Agent::new(1, 1);
        let mut events = vec![];
        let mut t = t0;
        for _ in 0..10 {
            for _ in 0..10 {
                events.extend(m.on_heartbeat(t, &a.beat()).unwrap());
                t += 100 * MS;
                events.extend(m.tick(t));
            }
            t += 500 * MS;
            events.extend(m.tick(t));
        }
        let ups = events
            .iter()
            .filter(|e| matches!(e, Event::NodeUp { .. }))
            .count();
        assert_eq!(ups, 1, "{events:?}");
    }

    #[test]
    fn draining_and_weight() {
        let (mut m, t0) = setup();
        let mut a = Agent::new(1, 1);
        a.state = NodeState::Draining;
        a.weight = 5;
        assert_eq!(
            m.on_heartbeat(t0, &a.beat()),
            Ok(vec![Event::NodeUp {
                node: 1,
                weight: 5,
                draining: true
            }])
        );
        a.state = NodeState::Up;
        assert_eq!(
            m.on_heartbeat(t0 + MS, &a.beat()),
            Ok(vec![Event::NodeUndrained { node: 1 }])
        );
        a.state = NodeState::Draining;
        a.weight = 7;
        assert_eq!(
            m.on_heartbeat(t0 + 2 * MS, &a.beat()),
            Ok(vec![
                Event::NodeDraining { node: 1 },
                Event::WeightChanged {
                    node: 1,
                    old: 5,
                    new: 7
                }
            ])
        );
        assert_eq!(m.on_heartbeat(t0 + 3 * MS, &a.beat()), Ok(vec![]));
        assert!(m.status(1).unwrap().draining);
    }

    #[test]
    fn next_deadline_tracks_earliest_node() {
        let (mut m, t0) = setup();
        let mut a = Agent::new(1, 1);
        let mut b = Agent::new(2, 1);
        m.on_heartbeat(t0, &a.beat()).unwrap();
        m.on_heartbeat(t0 + 50 * MS, &b.beat()).unwrap();
        assert_eq!(m.next_deadline(), Some(t0 + 300 * MS));
        m.on_heartbeat(t0 + 100 * MS, &a.beat()).unwrap();
        assert_eq!(m.next_deadline(), Some(t0 + 350 * MS));
        // Sleeping until each deadline finds every event with zero latency.
        let t = m.next_deadline().unwrap();
        assert_eq!(
            m.tick(t),
            vec![Event::NodeDown {
                node: 2,
                reason: DownReason::MissedHeartbeats
            }]
        );
        let t = m.next_deadline().unwrap();
        assert_eq!(t, t0 + 400 * MS);
        assert_eq!(m.tick(t).len(), 1);
        assert_eq!(m.next_deadline(), None);
        // Joining: the earlier of expiry and hold-down end.
        m.on_heartbeat(t0 + Duration::from_secs(1), &a.beat())
            .unwrap();
        assert_eq!(m.next_deadline(), Some(t0 + 1300 * MS));
        let mut quick = NodeCfg {
            hold_down: 100 * MS,
            ..NodeCfg::default()
        };
        quick.miss_limit = 0; // treated as 1
        m.add_node(1, quick);
        assert_eq!(m.next_deadline(), Some(t0 + 1100 * MS));
    }

    #[test]
    fn assume_up_and_remove() {
        let (mut m, t0) = setup();
        m.assume_up(1, t0, Duration::from_secs(1), false, 3);
        assert_eq!(m.next_deadline(), Some(t0 + Duration::from_secs(1)));
        let mut a = Agent::new(1, 77);
        a.weight = 3;
        assert_eq!(
            m.on_heartbeat(t0 + MS, &a.beat()),
            Ok(vec![]),
            "no restart, no up"
        );
        assert_eq!(m.next_deadline(), Some(t0 + 301 * MS));
        assert!(m.remove_node(1));
        assert_eq!(
            m.on_heartbeat(t0 + 2 * MS, &a.beat()),
            Err(Reject::UnknownNode)
        );
        m.assume_up(2, t0, Duration::from_secs(1), false, 0);
        assert_eq!(m.tick(t0 + Duration::from_secs(1)).len(), 1);
        assert_eq!(m.nodes().count(), 1);
    }

    #[test]
    fn restored_incarnation_keeps_replays_out() {
        let (mut m, t0) = setup();
        m.assume_up(2, t0, Duration::from_secs(1), false, 0);
        m.restore_seen(2, 5, 10);
        let mut b = Agent::new(2, 5);
        b.seq = 9;
        assert_eq!(m.on_heartbeat(t0 + MS, &b.beat()), Err(Reject::Replay));
        assert_eq!(
            m.on_heartbeat(t0 + MS, &Agent::new(2, 4).beat()),
            Err(Reject::StaleIncarnation)
        );
        assert_eq!(m.on_heartbeat(t0 + MS, &b.beat()), Ok(vec![]));
        assert_eq!(
            m.on_heartbeat(t0 + 2 * MS, &Agent::new(2, 6).beat()),
            Ok(vec![
                Event::NodeRestarted {
                    node: 2,
                    incarnation: 6
                },
                Event::NodeDown {
                    node: 2,
                    reason: DownReason::Restarted
                },
            ])
        );
    }

    /// Defect: `heartbeat_interval` was unused and detection followed whatever an agent
    /// advertised (up to 60 s). Now an agent may beat faster, never slower than the maximum.
    #[test]
    fn advertised_interval_is_capped_at_the_configured_maximum() {
        let mut m = Membership::new(NodeCfg {
            max_interval: 100 * MS,
            ..NodeCfg::default()
        });
        m.add_node_default(1);
        m.add_node_default(2);
        let t0 = Instant::now();
        let (mut a, mut b) = (Agent::new(1, 1), Agent::new(2, 1));
        let mut slow = a.beat();
        slow.interval_ms = 60_000;
        let mut fast = b.beat();
        fast.interval_ms = 50;
        m.on_heartbeat(t0, &slow).unwrap();
        m.on_heartbeat(t0, &fast).unwrap();
        assert_eq!(m.counters().interval_clamped, 1);
        assert_eq!(m.status(1).unwrap().interval, Some(100 * MS));
        assert_eq!(m.status(2).unwrap().interval, Some(50 * MS));
        // The fast one goes first, at 3 x 50 ms; the slow one at 3 x 100 ms, not 3 minutes.
        assert_eq!(m.tick(t0 + 149 * MS), vec![]);
        let mut got = m.tick(t0 + 150 * MS);
        got.extend(m.tick(t0 + 300 * MS));
        assert_eq!(
            got,
            vec![
                Event::NodeDown {
                    node: 2,
                    reason: DownReason::MissedHeartbeats
                },
                Event::NodeDown {
                    node: 1,
                    reason: DownReason::MissedHeartbeats
                },
            ]
        );
    }

    fn four_up(share: Option<f64>) -> (Membership, Vec<Agent>, Instant) {
        let mut m = Membership::new(NodeCfg::default());
        m.set_fail_static(share);
        let mut agents: Vec<Agent> = (1..=4).map(|n| Agent::new(n, 1)).collect();
        let t0 = Instant::now();
        for a in agents.iter_mut() {
            m.add_node_default(a.node);
            m.on_heartbeat(t0, &a.beat()).unwrap();
        }
        (m, agents, t0)
    }

    #[test]
    fn fail_static_holds_when_every_node_goes_silent_and_judges_once_beats_return() {
        let (mut m, mut agents, t0) = four_up(Some(0.5));
        // Nobody beats: at the deadline nobody goes down, and the detector says it holds.
        assert_eq!(m.tick(t0 + 300 * MS), vec![]);
        assert!(m.holding());
        assert_eq!(m.counters().fail_static, 1);
        assert_eq!(m.tick(t0 + 2000 * MS), vec![], "still holding");
        assert_eq!(m.counters().fail_static, 1, "one episode");
        let recheck = m.next_deadline().unwrap();
        assert!(recheck > t0 + 2000 * MS, "no busy loop on passed deadlines");
        // Three come back (their silence was ours): no event, no hold-down.
        let t1 = t0 + 2100 * MS;
        for a in agents.iter_mut().take(3) {
            assert_eq!(m.on_heartbeat(t1, &a.beat()).unwrap(), vec![]);
        }
        // Every live node has had its chance to beat by two intervals after the first beat;
        // the fourth stays silent and is judged normally then.
        assert_eq!(m.tick(t1 + 150 * MS), vec![]);
        assert_eq!(
            m.tick(t1 + 200 * MS),
            vec![Event::NodeDown {
                node: 4,
                reason: DownReason::MissedHeartbeats
            }]
        );
        assert!(!m.holding());
        for n in 1..=3 {
            assert_eq!(m.status(n).unwrap().phase, Phase::Up);
        }
    }

    #[test]
    fn fail_static_only_above_the_share() {
        // Two of four silent (not more than half): both go down.
        let (mut m, mut agents, t0) = four_up(Some(0.5));
        for a in agents.iter_mut().take(2) {
            m.on_heartbeat(t0 + 100 * MS, &a.beat()).unwrap();
            m.on_heartbeat(t0 + 200 * MS, &a.beat()).unwrap();
        }
        let got = m.tick(t0 + 300 * MS);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(!m.holding());
        // Three of four silent: held, until node 1's heartbeats show the path works; then the
        // three (really dead) go down, two intervals later than without fail static.
        let (mut m, mut agents, t0) = four_up(Some(0.5));
        m.on_heartbeat(t0 + 200 * MS, &agents[0].beat()).unwrap();
        assert_eq!(m.tick(t0 + 300 * MS), vec![]);
        assert!(m.holding());
        m.on_heartbeat(t0 + 300 * MS, &agents[0].beat()).unwrap();
        assert_eq!(m.tick(t0 + 400 * MS), vec![]);
        m.on_heartbeat(t0 + 400 * MS, &agents[0].beat()).unwrap();
        assert_eq!(m.tick(t0 + 500 * MS).len(), 3);
        assert!(!m.holding());
        assert_eq!(m.status(1).unwrap().phase, Phase::Up);
        // Off: all four go down.
        let (mut m, _, t0) = four_up(None);
        assert_eq!(m.tick(t0 + 300 * MS).len(), 4);
    }

    #[test]
    fn fail_static_covers_a_late_heartbeat_of_a_held_node() {
        // Everyone silent past the deadline; the first heartbeat to arrive afterwards (read
        // before any tick) does not take its own node down.
        let (mut m, mut agents, t0) = four_up(Some(0.5));
        let late = t0 + 400 * MS;
        assert_eq!(m.on_heartbeat(late, &agents[0].beat()).unwrap(), vec![]);
        assert_eq!(m.status(1).unwrap().phase, Phase::Up);
        assert!(m.holding());
    }

    #[test]
    fn fail_static_neither_spins_nor_promotes_a_silent_joiner() {
        let mut m = Membership::new(NodeCfg::default());
        m.set_fail_static(Some(0.5));
        let t0 = Instant::now();
        let mut agents: Vec<Agent> = (1..=3).map(|n| Agent::new(n, 1)).collect();
        for a in agents.iter_mut() {
            m.add_node_default(a.node);
            m.on_heartbeat(t0, &a.beat()).unwrap();
        }
        // Node 3 restarts: down (restart), joining for the hold-down.
        let mut again = Agent::new(3, 2);
        let evs = m.on_heartbeat(t0 + 50 * MS, &again.beat()).unwrap();
        assert!(evs.contains(&Event::NodeDown {
            node: 3,
            reason: DownReason::Restarted
        }));
        // Everything goes silent: nodes 1 and 2 held; the joiner is past its deadline too.
        assert_eq!(m.tick(t0 + 400 * MS), vec![]);
        assert!(m.holding());
        let next = m.next_deadline().unwrap();
        assert!(
            next > t0 + 400 * MS,
            "no busy loop: next deadline {:?}",
            next - t0
        );
        // The hold-down ends while the joiner is still silent: no NodeUp for it.
        assert_eq!(m.tick(t0 + 2100 * MS), vec![]);
        assert_ne!(m.status(3).unwrap().phase, Phase::Up);
    }

    #[test]
    fn fail_static_episode_ends_in_one_pass_and_is_counted_once() {
        let (mut m, mut agents, t0) = four_up(Some(0.5));
        assert_eq!(m.tick(t0 + 300 * MS), vec![]);
        m.on_heartbeat(t0 + 400 * MS, &agents[0].beat()).unwrap();
        // Past the grace, a heartbeat is read before the tick: the tick still ends the
        // episode and takes all three silent nodes down together.
        m.on_heartbeat(t0 + 700 * MS, &agents[0].beat()).unwrap();
        assert_eq!(m.tick(t0 + 700 * MS).len(), 3);
        assert!(!m.holding());
        assert_eq!(m.counters().fail_static, 1);
    }

    /// An incarnation as `heartbeat::new_incarnation` makes it, for a start at `ms`.
    fn inc_at(ms: u64) -> u64 {
        (ms << 20) | 0x1234
    }

    const HOUR_MS: u64 = 3_600_000;

    /// Defect: a node advertising a huge weight took every route. Now the weight is clamped to
    /// the node's maximum and counted.
    #[test]
    fn advertised_weight_is_clamped_to_the_maximum() {
        let mut m = Membership::new(NodeCfg {
            max_weight: 10,
            ..NodeCfg::default()
        });
        m.add_node_default(1);
        let t0 = Instant::now();
        let mut a = Agent::new(1, 1);
        a.weight = u32::MAX;
        assert_eq!(
            m.on_heartbeat(t0, &a.beat()),
            Ok(vec![Event::NodeUp {
                node: 1,
                weight: 10,
                draining: false
            }])
        );
        a.weight = 4;
        assert_eq!(
            m.on_heartbeat(t0 + MS, &a.beat()),
            Ok(vec![Event::WeightChanged {
                node: 1,
                old: 10,
                new: 4
            }])
        );
        a.weight = 11;
        assert_eq!(
            m.on_heartbeat(t0 + 2 * MS, &a.beat()),
            Ok(vec![Event::WeightChanged {
                node: 1,
                old: 4,
                new: 10
            }])
        );
        assert_eq!(m.status(1).unwrap().weight, 10);
        assert_eq!(m.counters().weight_clamped, 2);
    }

    /// Defect: one heartbeat with an incarnation far in the future (a forged one, or a node
    /// whose clock was years ahead) made every later heartbeat of the real agent stale, for
    /// ever (and it was persisted). Now a lower incarnation replaces a future one as soon as
    /// the future one has gone quiet for an interval.
    #[test]
    fn a_future_incarnation_does_not_lock_the_node_out() {
        let (mut m, t0) = setup();
        let clock = 1_700_000_000_000u64;
        let wall = |t: Instant| {
            UNIX_EPOCH + Duration::from_millis(clock) + t.saturating_duration_since(t0)
        };
        let mut real = Agent::new(1, inc_at(clock - HOUR_MS));
        m.on_heartbeat_at(t0, Some(wall(t0)), &real.beat()).unwrap();
        // The forged beat is a restart, as any new incarnation is.
        let mut forged = Agent::new(1, u64::MAX);
        let t1 = t0 + 50 * MS;
        assert_eq!(
            m.on_heartbeat_at(t1, Some(wall(t1)), &forged.beat())
                .unwrap()
                .len(),
            2
        );
        // The real agent's next beat, under an interval later: still stale.
        let t2 = t0 + 100 * MS;
        assert_eq!(
            m.on_heartbeat_at(t2, Some(wall(t2)), &real.beat()),
            Err(Reject::StaleIncarnation)
        );
        // An interval after the forged beat: the real agent is back (a restart: held down).
        let t3 = t0 + 200 * MS;
        assert_eq!(
            m.on_heartbeat_at(t3, Some(wall(t3)), &real.beat()),
            Ok(vec![Event::NodeRestarted {
                node: 1,
                incarnation: real.inc
            }])
        );
        assert_eq!(m.counters().incarnation_reset, 1);
        let mut t = t3;
        let mut ups = vec![];
        while t < t3 + DEFAULT_HOLD_DOWN + 200 * MS {
            t += 100 * MS;
            ups.extend(m.on_heartbeat_at(t, Some(wall(t)), &real.beat()).unwrap());
            ups.extend(m.tick(t));
        }
        assert_eq!(ups, vec![up(1)]);
        // Persisted: a daemon restarted with the forged incarnation on record lets it in too.
        let (mut m, t0) = setup();
        m.assume_up(2, t0, Duration::from_secs(1), false, 0);
        m.restore_seen(2, u64::MAX, 5);
        let mut b = Agent::new(2, inc_at(clock - HOUR_MS));
        let t1 = t0 + Duration::from_secs(1);
        assert!(m.on_heartbeat_at(t1, Some(wall(t1)), &b.beat()).is_ok());
        assert_eq!(m.status(2).unwrap().incarnation, Some(b.inc));
        // Without the balancer's clock nothing lower is ever accepted.
        let (mut m, t0) = setup();
        m.on_heartbeat(t0, &forged.beat()).unwrap();
        assert_eq!(
            m.on_heartbeat(t0 + Duration::from_secs(5), &real.beat()),
            Err(Reject::StaleIncarnation)
        );
    }

    /// Defect: an agent restarted after its node's clock stepped back has a lower incarnation
    /// than the one before, and was rejected as stale until the clock caught up. Now, once the
    /// old incarnation is silent, a current lower one (its start within the skew of the
    /// balancer's clock) is accepted; a captured heartbeat of an old agent is not.
    #[test]
    fn a_node_whose_clock_stepped_back_rejoins() {
        let (mut m, t0) = setup();
        let clock = 1_700_000_000_000u64;
        let wall = |t: Instant| {
            UNIX_EPOCH + Duration::from_millis(clock) + t.saturating_duration_since(t0)
        };
        // Node 1's clock was 2 minutes ahead when its agent started; node 2's was right, and
        // an agent of node 2 from an hour ago was captured.
        let mut ahead = Agent::new(1, inc_at(clock + 120_000));
        let mut two = Agent::new(2, inc_at(clock - 1000));
        let mut captured = Agent::new(2, inc_at(clock - HOUR_MS));
        m.on_heartbeat_at(t0, Some(wall(t0)), &ahead.beat())
            .unwrap();
        m.on_heartbeat_at(t0, Some(wall(t0)), &two.beat()).unwrap();
        let _ = ahead.beat();
        // NTP steps node 1's clock back; its agent restarts: a lower incarnation, current.
        let mut stepped = Agent::new(1, inc_at(clock + 100));
        let t1 = t0 + 100 * MS;
        m.on_heartbeat_at(t1, Some(wall(t1)), &two.beat()).unwrap();
        assert_eq!(
            m.on_heartbeat_at(t1, Some(wall(t1)), &stepped.beat()),
            Err(Reject::StaleIncarnation),
            "not while the old incarnation may still beat"
        );
        // Once node 1 is down (silent k intervals), the current incarnation rejoins.
        let t2 = t0 + 300 * MS;
        m.on_heartbeat_at(t2, Some(wall(t2)), &two.beat()).unwrap();
        assert_eq!(
            m.tick(t2),
            vec![Event::NodeDown {
                node: 1,
                reason: DownReason::MissedHeartbeats
            }]
        );
        let t3 = t0 + 350 * MS;
        assert_eq!(
            m.on_heartbeat_at(t3, Some(wall(t3)), &stepped.beat()),
            Ok(vec![Event::NodeRestarted {
                node: 1,
                incarnation: stepped.inc
            }])
        );
        assert!(matches!(m.status(1).unwrap().phase, Phase::Joining { .. }));
        // Node 2 goes silent; the captured hour-old incarnation is not current: still stale.
        let t4 = t0 + Duration::from_secs(2);
        assert_eq!(m.tick(t4).len(), 1);
        assert_eq!(
            m.on_heartbeat_at(t4, Some(wall(t4)), &captured.beat()),
            Err(Reject::StaleIncarnation)
        );
        // A clock an hour behind is not current either (the operator is warned to fix it).
        let mut behind = Agent::new(2, inc_at(clock - HOUR_MS + 5000));
        assert_eq!(
            m.on_heartbeat_at(t4, Some(wall(t4)), &behind.beat()),
            Err(Reject::StaleIncarnation)
        );
        assert_eq!(m.counters().incarnation_reset, 1);
    }

    /// Defect: two agents claiming one node ID were not noticed (the older one's heartbeats
    /// were quietly stale). Now an older incarnation that keeps beating beside a live accepted
    /// one is rejected as a duplicate, counted, and shown on the node; a single late datagram
    /// of a restarted agent is only stale.
    #[test]
    fn two_agents_claiming_one_node_are_reported() {
        let (mut m, t0) = setup();
        let mut a = Agent::new(1, 10);
        let mut b = Agent::new(1, 11);
        m.on_heartbeat(t0, &a.beat()).unwrap();
        assert_eq!(m.on_heartbeat(t0 + 10 * MS, &b.beat()).unwrap().len(), 2);
        assert_eq!(
            m.on_heartbeat(t0 + 100 * MS, &a.beat()),
            Err(Reject::StaleIncarnation),
            "one late beat could be the restarted agent's last"
        );
        assert_eq!(m.status(1).unwrap().duplicate_seen, None);
        m.on_heartbeat(t0 + 110 * MS, &b.beat()).unwrap();
        assert_eq!(
            m.on_heartbeat(t0 + 200 * MS, &a.beat()),
            Err(Reject::Duplicate)
        );
        assert_eq!(m.status(1).unwrap().duplicate_seen, Some(t0 + 200 * MS));
        assert_eq!(m.on_heartbeat(t0 + 210 * MS, &b.beat()), Ok(vec![]));
        assert_eq!(
            m.on_heartbeat(t0 + 300 * MS, &a.beat()),
            Err(Reject::Duplicate)
        );
        let c = m.counters();
        assert_eq!((c.duplicate, c.stale_incarnation), (2, 1));
        // A replayed beat of the older one (same sequence) is no proof of a second agent.
        let mut again = Agent::new(1, 10);
        again.seq = a.seq - 1;
        assert_eq!(
            m.on_heartbeat(t0 + 310 * MS, &again.beat()),
            Err(Reject::StaleIncarnation)
        );
    }
}
