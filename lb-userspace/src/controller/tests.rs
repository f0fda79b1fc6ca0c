use super::*;
use crate::membership::DownReason;
use proptest::prelude::*;

/// The kernel maps as a plan leaves them, checked after every single step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Kernel {
    nodes: BTreeMap<u32, NodeEntry>,
    vips: BTreeMap<VipKey, (VipSpec, Vec<RouteEntry>)>,
}

impl Kernel {
    fn run(&mut self, plan: &Plan) {
        for step in &plan.steps {
            match step {
                Step::Node { id, entry } => {
                    self.nodes.insert(*id, *entry);
                }
                Step::ClearNode { id } => {
                    self.nodes.remove(id);
                }
                Step::Vip { spec, routes } => {
                    self.vips.insert(spec.key, (*spec, routes.clone()));
                }
                Step::Routes { key, changes } => {
                    let (_, routes) = self.vips.get_mut(key).expect("Routes for an unknown VIP");
                    for (r, e) in changes {
                        routes[*r as usize] = *e;
                    }
                }
                Step::RemoveVip { key } => {
                    self.vips.remove(key);
                }
            }
            self.check_live();
        }
    }

    /// No route is ever live toward a node that is not ACTIVE in NODES.
    fn check_live(&self) {
        for (key, (_, routes)) in &self.vips {
            for (r, e) in routes.iter().enumerate() {
                if e.node == NODE_NONE {
                    continue;
                }
                let st = self.nodes.get(&e.node).map(|n| n.state);
                assert_eq!(
                    st,
                    Some(NODE_ACTIVE),
                    "VIP {} route {r} -> node {} which NODES has as {st:?}",
                    dataplane::vip_display(key),
                    e.node
                );
            }
        }
    }

    /// What the controller says the kernel should hold.
    fn of(c: &Controller) -> Kernel {
        Kernel {
            nodes: c.nodes().map(|n| (n.id, n.entry())).collect(),
            vips: c
                .vips()
                .map(|v| (v.spec.key, (v.spec, v.entries())))
                .collect(),
        }
    }
}

fn vip(last: u8) -> String {
    format!("198.18.100.{last}")
}

/// A config with nodes `(id, weight)` and dsr-l2 TCP VIPs `(last octet, routes)`.
fn config(nodes: &[(u32, u32)], vips: &[(u8, u32)]) -> Config {
    let mut s = String::new();
    for (last, routes) in vips {
        s += &format!(
            "[[vip]]\naddr = \"{}\"\nport = 80\nproto = \"tcp\"\nroutes = {routes}\n",
            vip(*last)
        );
    }
    for (id, w) in nodes {
        s += &format!("[[node]]\nid = {id}\nmac = \"02:00:00:00:00:{id:02x}\"\nweight = {w}\n");
    }
    let c: Config = toml::from_str(&s).expect("test config parses");
    c.validate().expect("test config is valid");
    c
}

fn key(last: u8) -> VipKey {
    dataplane::vip_key(vip(last).parse().expect("ip"), 80, lb_common::PROTO_TCP)
}

fn up(node: u32) -> Input {
    Input::Membership(Event::NodeUp {
        node,
        weight: 0,
        draining: false,
    })
}

fn down(node: u32) -> Input {
    Input::Membership(Event::NodeDown {
        node,
        reason: DownReason::MissedHeartbeats,
    })
}

fn ev(e: Event) -> Input {
    Input::Membership(e)
}

/// Starts a controller (first start: empty kernel) and runs its plan on a fresh kernel.
fn start(cfg: &Config) -> (Controller, Kernel) {
    let (c, plan) = Controller::start(cfg, None, &Adopted::default()).expect("start");
    let mut k = Kernel::default();
    k.run(&plan);
    assert_eq!(k, Kernel::of(&c));
    (c, k)
}

fn apply(c: &mut Controller, k: &mut Kernel, inputs: &[Input]) -> Plan {
    let plan = c.apply(inputs);
    k.run(&plan);
    assert_eq!(
        *k,
        Kernel::of(c),
        "kernel after the plan differs from the controller"
    );
    plan
}

/// What a restarted daemon re-adopts from `k`.
fn adopted(k: &Kernel) -> Adopted {
    Adopted {
        hash_seed: None,
        vips: k
            .vips
            .iter()
            .map(|(key, (spec, routes))| {
                (
                    *key,
                    AdoptedVip {
                        index: spec.index,
                        routes: routes.clone(),
                    },
                )
            })
            .collect(),
        nodes: k.nodes.iter().map(|(id, e)| (*id, e.state)).collect(),
    }
}

/// Persist (through JSON, as the state file) and restart with `cfg` over kernel `k`.
fn restart(c: &Controller, k: &mut Kernel, cfg: &Config) -> Controller {
    let json = serde_json::to_string(&c.snapshot()).expect("serialize");
    let st: State = serde_json::from_str(&json).expect("deserialize");
    let (c2, plan) = Controller::start(cfg, Some(&st), &adopted(k)).expect("restart");
    k.run(&plan);
    assert_eq!(*k, Kernel::of(&c2));
    c2
}

fn count(c: &Controller, vip: u8, node: u32) -> u32 {
    c.vip(&key(vip)).expect("vip").table.count(node)
}

#[test]
fn join_then_fail_writes_only_moved_routes_in_safe_order() {
    let cfg = config(&[(1, 1), (2, 1)], &[(1, 64), (2, 64)]);
    let (mut c, mut k) = start(&cfg);
    let p = apply(&mut c, &mut k, &[up(1)]);
    assert_eq!(
        p.route_writes(),
        128,
        "node 1 takes every route of both VIPs"
    );
    assert!(
        matches!(p.steps[0], Step::Node { id: 1, .. }),
        "node first: {p:?}"
    );
    let p = apply(&mut c, &mut k, &[up(2)]);
    assert_eq!(p.route_writes(), 64, "half of each VIP moves");
    assert_eq!(count(&c, 1, 2), 32);
    // Moved off a live node: flagged, and node 1 is told.
    assert_eq!(c.vip(&key(1)).expect("vip").moved.len(), 32);
    assert_eq!(p.notices.len(), 2);
    assert!(
        p.notices
            .iter()
            .all(|n| n.node == 1 && n.routes.len() == 32)
    );
    let p = apply(&mut c, &mut k, &[down(2)]);
    // Routes first, then node 2's DOWN.
    assert!(
        matches!(p.steps.last(), Some(Step::Node { id: 2, .. })),
        "{p:?}"
    );
    assert_eq!(count(&c, 1, 1), 64);
    assert!(p.persist);
}

#[test]
fn a_batch_writes_each_route_once_and_persists_once() {
    let cfg = config(&[(1, 1), (2, 1), (3, 1)], &[(1, 96)]);
    let (mut c, mut k) = start(&cfg);
    let p = apply(&mut c, &mut k, &[up(1), up(2), up(3)]);
    assert_eq!(
        p.route_writes(),
        96,
        "each route written once, with its final owner"
    );
    assert_eq!(
        p.steps
            .iter()
            .filter(|s| matches!(s, Step::Routes { .. }))
            .count(),
        1
    );
    // Down and back up in one batch: the node ends active; nothing dangles.
    let p = apply(&mut c, &mut k, &[down(2), up(2)]);
    assert_eq!(c.node(2).expect("node").state, NodeState::Active);
    assert!(p.persist);
}

#[test]
fn notices_name_only_routes_that_moved_over_the_whole_batch() {
    let cfg = config(&[(1, 1), (2, 1)], &[(1, 64)]);
    let (mut c, mut k) = start(&cfg);
    apply(&mut c, &mut k, &[up(1), up(2)]);
    let before = c.vip(&key(1)).expect("vip").table.clone();
    // Node 2 goes down and comes back in one batch: whatever ends on node 1 again did not move
    // for node 1, and node 2 is told only of routes it no longer owns.
    let p = apply(&mut c, &mut k, &[down(2), up(2)]);
    let after = &c.vip(&key(1)).expect("vip").table;
    for n in &p.notices {
        for r in &n.routes {
            assert_eq!(before.owner(*r), Some(n.node), "{n:?}");
            assert_ne!(after.owner(*r), Some(n.node), "{n:?}");
        }
    }
}

#[test]
fn unknown_nodes_and_no_ops_plan_nothing() {
    let cfg = config(&[(1, 1)], &[(1, 16)]);
    let (mut c, mut k) = start(&cfg);
    let p = apply(&mut c, &mut k, &[up(7), down(1)]);
    assert!(p.steps.is_empty(), "{p:?}");
    apply(&mut c, &mut k, &[up(1)]);
    let p = apply(&mut c, &mut k, &[up(1)]);
    assert!(p.steps.is_empty(), "{p:?}");
}

/// Defect: a node removed from lb.toml kept an ACTIVE entry in NODES after the restart.
#[test]
fn a_node_removed_from_the_config_leaves_nothing_in_the_kernel() {
    let cfg = config(&[(1, 1), (2, 1), (3, 1)], &[(1, 64), (2, 64)]);
    let (mut c, mut k) = start(&cfg);
    apply(&mut c, &mut k, &[up(1), up(2), up(3)]);
    assert!(count(&c, 1, 3) > 0);
    let cfg2 = config(&[(1, 1), (2, 1)], &[(1, 64), (2, 64)]);
    let c2 = restart(&c, &mut k, &cfg2);
    assert!(c2.node(3).is_none());
    assert!(
        !k.nodes.contains_key(&3),
        "NODES still holds node 3: {:?}",
        k.nodes.get(&3)
    );
    for (_, routes) in k.vips.values() {
        assert!(routes.iter().all(|e| e.node != 3));
    }
    // At run time too (a config reload).
    let mut c3 = c2.clone();
    let cfg3 = config(&[(1, 1)], &[(1, 64), (2, 64)]);
    let p = c3.configure(&cfg3).expect("configure");
    k.run(&p);
    assert!(!k.nodes.contains_key(&2));
    assert_eq!(count(&c3, 1, 1), 64);
}

/// Defect: a changed weight in lb.toml was not applied to a node that was already up.
#[test]
fn a_changed_config_weight_applies_to_an_up_node() {
    let cfg = config(&[(1, 1), (2, 1)], &[(1, 100)]);
    let (mut c, mut k) = start(&cfg);
    apply(&mut c, &mut k, &[up(1), up(2)]);
    assert_eq!(count(&c, 1, 1), 50);
    let cfg2 = config(&[(1, 3), (2, 1)], &[(1, 100)]);
    let c2 = restart(&c, &mut k, &cfg2);
    assert_eq!(c2.node(1).expect("node").weight, 3);
    assert_eq!(count(&c2, 1, 1), 75);
    // The agent's advertised weight, when it has one, wins over the file.
    let mut c3 = c2.clone();
    apply(
        &mut c3,
        &mut k,
        &[ev(Event::WeightChanged {
            node: 1,
            old: 0,
            new: 1,
        })],
    );
    assert_eq!(count(&c3, 1, 1), 50);
}

/// Defect: a weight change while draining was lost.
#[test]
fn a_weight_change_while_draining_is_kept_for_the_undrain() {
    let cfg = config(&[(1, 1), (2, 1)], &[(1, 100)]);
    let (mut c, mut k) = start(&cfg);
    apply(&mut c, &mut k, &[up(1), up(2)]);
    apply(&mut c, &mut k, &[ev(Event::NodeDraining { node: 2 })]);
    assert_eq!(count(&c, 1, 2), 0);
    apply(
        &mut c,
        &mut k,
        &[ev(Event::WeightChanged {
            node: 2,
            old: 0,
            new: 3,
        })],
    );
    assert_eq!(c.node(2).expect("node").weight, 3);
    apply(&mut c, &mut k, &[ev(Event::NodeUndrained { node: 2 })]);
    assert_eq!(count(&c, 1, 2), 75);
}

/// Applies a configuration as the daemon's API does, checking the kernel after each step.
fn configure(c: &mut Controller, k: &mut Kernel, cfg: &Config) -> Plan {
    let plan = c.configure(cfg).expect("configure");
    k.run(&plan);
    assert_eq!(*k, Kernel::of(c));
    plan
}

/// `lb node drain`: the operator's drain holds whatever the agent says, and the undrain gives
/// the node back to its agent (which may itself be draining).
#[test]
fn an_operators_drain_holds_whatever_the_agent_advertises() {
    let mut cfg = config(&[(1, 1), (2, 1)], &[(1, 100), (2, 100)]);
    let (mut c, mut k) = start(&cfg);
    apply(&mut c, &mut k, &[up(1), up(2)]);
    cfg.nodes[1].drain = true;
    configure(&mut c, &mut k, &cfg);
    assert_eq!(c.node(2).expect("node").state, NodeState::Draining);
    assert_eq!(count(&c, 1, 2), 0);
    assert_eq!(count(&c, 2, 1), 100);
    // The agent says up, draining, up again, restarts: the node stays draining.
    for e in [
        Event::NodeUndrained { node: 2 },
        Event::NodeDraining { node: 2 },
        Event::NodeUndrained { node: 2 },
    ] {
        apply(&mut c, &mut k, &[ev(e)]);
        assert_eq!(c.node(2).expect("node").state, NodeState::Draining, "{e:?}");
    }
    apply(&mut c, &mut k, &[down(2), up(2)]);
    assert_eq!(c.node(2).expect("node").state, NodeState::Draining);
    assert_eq!(count(&c, 1, 2), 0);
    // ... across a daemon restart too.
    let mut c = restart(&c, &mut k, &cfg);
    assert_eq!(c.node(2).expect("node").state, NodeState::Draining);
    // Undrained by the operator while its agent drains: still draining (the agent's say).
    apply(&mut c, &mut k, &[ev(Event::NodeDraining { node: 2 })]);
    cfg.nodes[1].drain = false;
    configure(&mut c, &mut k, &cfg);
    assert_eq!(c.node(2).expect("node").state, NodeState::Draining);
    apply(&mut c, &mut k, &[ev(Event::NodeUndrained { node: 2 })]);
    assert_eq!(c.node(2).expect("node").state, NodeState::Active);
    assert_eq!(count(&c, 1, 2), 50);
}

/// An agent restart (held down by the detector) drains the node instead of failing it: its
/// routes move with the moved flag, so tracked flows stay on it; up again after the hold-down
/// it is active; silent during the hold-down it fails.
#[test]
fn a_restarted_node_is_drained_while_held_down() {
    let cfg = config(&[(1, 1), (2, 1)], &[(1, 100)]);
    let (mut c, mut k) = start(&cfg);
    apply(&mut c, &mut k, &[up(1), up(2)]);
    let held = ev(Event::NodeDown {
        node: 2,
        reason: DownReason::Restarted,
    });
    apply(&mut c, &mut k, std::slice::from_ref(&held));
    assert_eq!(c.node(2).expect("node").state, NodeState::Draining);
    assert_eq!(count(&c, 1, 2), 0);
    let v = c.vip(&key(1)).expect("vip");
    assert_eq!(v.moved.len(), 50, "its flows are looked up in conntrack");
    // An API change meanwhile does not bring it back early.
    configure(&mut c, &mut k, &cfg);
    assert_eq!(c.node(2).expect("node").state, NodeState::Draining);
    apply(&mut c, &mut k, &[up(2)]);
    assert_eq!(c.node(2).expect("node").state, NodeState::Active);
    assert_eq!(count(&c, 1, 2), 50);
    // Held again, then silent: failed.
    apply(&mut c, &mut k, &[held]);
    apply(&mut c, &mut k, &[down(2)]);
    assert_eq!(c.node(2).expect("node").state, NodeState::Down);
}

/// `lb node weight`: the operator's weight beats the agent's, and clearing it gives the
/// agent's back.
#[test]
fn an_operators_weight_beats_the_agents_until_cleared() {
    let mut cfg = config(&[(1, 1), (2, 1)], &[(1, 100)]);
    let (mut c, mut k) = start(&cfg);
    apply(
        &mut c,
        &mut k,
        &[
            up(1),
            ev(Event::NodeUp {
                node: 2,
                weight: 3,
                draining: false,
            }),
        ],
    );
    assert_eq!(count(&c, 1, 2), 75);
    cfg.nodes[1].admin_weight = Some(1);
    configure(&mut c, &mut k, &cfg);
    assert_eq!(count(&c, 1, 2), 50);
    apply(
        &mut c,
        &mut k,
        &[ev(Event::WeightChanged {
            node: 2,
            old: 3,
            new: 9,
        })],
    );
    assert_eq!(
        count(&c, 1, 2),
        50,
        "the agent's new weight does not override"
    );
    cfg.nodes[1].admin_weight = None;
    configure(&mut c, &mut k, &cfg);
    assert_eq!(count(&c, 1, 2), 90);
}

/// A node added at runtime starts down and takes routes when its agent comes up; one
/// removed at runtime leaves every table and `NODES`.
#[test]
fn nodes_added_and_removed_at_runtime() {
    let mut cfg = config(&[(1, 1)], &[(1, 64)]);
    let (mut c, mut k) = start(&cfg);
    apply(&mut c, &mut k, &[up(1)]);
    let mut more = config(&[(1, 1), (7, 1)], &[(1, 64)]);
    configure(&mut c, &mut k, &more);
    assert_eq!(c.node(7).expect("node").state, NodeState::Down);
    assert_eq!(count(&c, 1, 7), 0);
    apply(&mut c, &mut k, &[up(7)]);
    assert_eq!(count(&c, 1, 7), 32);
    more.nodes.retain(|n| n.id != 7);
    cfg = more;
    configure(&mut c, &mut k, &cfg);
    assert!(c.node(7).is_none());
    assert!(!k.nodes.contains_key(&7));
    assert_eq!(count(&c, 1, 1), 64);
}

/// Defect: a VIP's index was its position in the config file.
#[test]
fn vip_indices_survive_reordering_and_removal() {
    let cfg = config(&[(1, 1)], &[(1, 16), (2, 16), (3, 16)]);
    let (mut c, mut k) = start(&cfg);
    apply(&mut c, &mut k, &[up(1)]);
    let idx = |c: &Controller, v: u8| c.vip(&key(v)).expect("vip").spec.index;
    assert_eq!((idx(&c, 1), idx(&c, 2), idx(&c, 3)), (0, 1, 2));
    // Reordered, one removed.
    let cfg2 = config(&[(1, 1)], &[(3, 16), (1, 16)]);
    let c2 = restart(&c, &mut k, &cfg2);
    assert_eq!((idx(&c2, 1), idx(&c2, 3)), (0, 2));
    assert!(!k.vips.contains_key(&key(2)));
    // A new VIP takes the lowest free index; the others keep theirs.
    let cfg3 = config(&[(1, 1)], &[(4, 16), (3, 16), (1, 16)]);
    let c3 = restart(&c2, &mut k, &cfg3);
    assert_eq!((idx(&c3, 1), idx(&c3, 3), idx(&c3, 4)), (0, 2, 1));
    assert_eq!(
        count(&c3, 4, 1),
        16,
        "the new VIP's table holds the up node"
    );
}

#[test]
fn kernel_tables_newer_than_the_file_win() {
    let cfg = config(&[(1, 1), (2, 1)], &[(1, 64)]);
    let (mut c, mut k) = start(&cfg);
    apply(&mut c, &mut k, &[up(1)]);
    let old = serde_json::to_string(&c.snapshot()).expect("serialize");
    // The daemon pushes node 2's join, then dies before saving.
    apply(&mut c, &mut k, &[up(2)]);
    let st: State = serde_json::from_str(&old).expect("deserialize");
    let (c2, plan) = Controller::start(&cfg, Some(&st), &adopted(&k)).expect("restart");
    assert_eq!(c2.node(2).expect("node").state, NodeState::Active);
    assert_eq!(
        *c2.vip(&key(1)).expect("vip").table,
        *c.vip(&key(1)).expect("vip").table
    );
    k.run(&plan);
    assert_eq!(k, Kernel::of(&c));
}

#[test]
fn settled_routes_lose_their_flag_unless_the_table_moved_since() {
    let cfg = config(&[(1, 1), (2, 1)], &[(1, 64)]);
    let (mut c, mut k) = start(&cfg);
    apply(&mut c, &mut k, &[up(1), up(2)]);
    let v = c.vip(&key(1)).expect("vip").clone();
    assert_eq!(v.moved.len(), 32);
    let routes: Vec<u32> = v.moved.iter().collect();
    // A scan of an older revision is ignored.
    let stale = Input::Settled {
        vip: key(1),
        revision: v.revision - 1,
        routes: routes.clone(),
    };
    assert!(apply(&mut c, &mut k, &[stale]).steps.is_empty());
    let p = apply(
        &mut c,
        &mut k,
        &[Input::Settled {
            vip: key(1),
            revision: v.revision,
            routes,
        }],
    );
    assert_eq!(p.route_writes(), 32);
    assert!(c.vip(&key(1)).expect("vip").moved.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Properties over random event sequences
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Up {
        node: u32,
        weight: u32,
        draining: bool,
    },
    Down(u32),
    Drain(u32),
    Undrain(u32),
    Weight(u32, u32),
    Settle(u8),
    /// Reload with node `n` removed (or re-added if absent); by the second number, VIPs
    /// rotated (3) or the last VIP removed/re-added (2).
    Reconfigure(u32, u32),
    Restart,
    /// Node `n` goes down; the daemon dies after the first `k` steps of that plan (before its
    /// save) and restarts from the state file written before it.
    Crash(u32, usize),
}

const NODES: u32 = 5;

fn op() -> impl Strategy<Value = Op> {
    let node = 1..=NODES;
    prop_oneof![
        4 => (node.clone(), 0u32..4, any::<bool>()).prop_map(|(node, weight, draining)| Op::Up {
            node,
            weight,
            draining: draining && weight == 3,
        }),
        3 => node.clone().prop_map(Op::Down),
        1 => node.clone().prop_map(Op::Drain),
        1 => node.clone().prop_map(Op::Undrain),
        1 => (node.clone(), 0u32..4).prop_map(|(n, w)| Op::Weight(n, w)),
        1 => (0u8..3).prop_map(Op::Settle),
        1 => (node.clone(), 1u32..4).prop_map(|(n, w)| Op::Reconfigure(n, w)),
        1 => Just(Op::Restart),
        1 => (node.clone(), 0usize..8).prop_map(|(n, k)| Op::Crash(n, k)),
    ]
}

/// Config state the ops edit: which nodes are configured with what weight, VIP order.
#[derive(Clone)]
struct World {
    nodes: BTreeMap<u32, u32>,
    vips: Vec<(u8, u32)>,
}

impl World {
    fn config(&self) -> Config {
        let nodes: Vec<(u32, u32)> = self.nodes.iter().map(|(a, b)| (*a, *b)).collect();
        config(&nodes, &self.vips)
    }
}

fn inputs_of(op: &Op, c: &Controller) -> Vec<Input> {
    match *op {
        Op::Up {
            node,
            weight,
            draining,
        } => vec![ev(Event::NodeUp {
            node,
            weight,
            draining,
        })],
        Op::Down(n) => vec![down(n)],
        Op::Drain(node) => vec![ev(Event::NodeDraining { node })],
        Op::Undrain(node) => vec![ev(Event::NodeUndrained { node })],
        Op::Weight(node, new) => vec![ev(Event::WeightChanged { node, old: 0, new })],
        Op::Settle(i) => c
            .vips()
            .nth(i as usize)
            .map(|v| Input::Settled {
                vip: v.spec.key,
                revision: v.revision,
                routes: v.moved.iter().step_by(2).collect(),
            })
            .into_iter()
            .collect(),
        Op::Reconfigure(..) | Op::Restart | Op::Crash(..) => Vec::new(),
    }
}

fn check_tables(c: &Controller) {
    for v in c.vips() {
        // Tables agree with the registry, and every route of an active node set is owned.
        for n in c.nodes() {
            assert_eq!(
                v.table.node(n.id),
                Some(n.info()),
                "node {} in {:?}",
                n.id,
                v.spec.key
            );
        }
        assert_eq!(v.table.nodes().count(), c.nodes().count());
        if c.nodes().any(|n| n.state == NodeState::Active) {
            assert_eq!(v.table.unowned(), 0);
            assert!(v.table.is_balanced());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Every plan keeps routes toward ACTIVE nodes only (checked after each kernel step), the
    /// kernel always ends equal to the controller, removed nodes leave nothing, persist +
    /// restart gives the same controller, and a batch gives the same result as its inputs one
    /// by one.
    #[test]
    fn random_sequences_keep_the_invariants(ops in proptest::collection::vec(op(), 1..40)) {
        let mut world = World {
            nodes: (1..=NODES).map(|n| (n, 1 + n % 2)).collect(),
            vips: vec![(1, 48), (2, 61), (3, 7)],
        };
        let (mut c, mut k) = start(&world.config());
        // The same inputs, batched: applied together whenever a reconfigure/restart comes.
        let mut batched = c.clone();
        let mut kb = k.clone();
        let mut pending: Vec<Input> = Vec::new();
        for op in &ops {
            let inputs = inputs_of(op, &c);
            for i in &inputs {
                apply(&mut c, &mut k, std::slice::from_ref(i));
            }
            pending.extend(inputs);
            match *op {
                Op::Reconfigure(n, w) => {
                    if world.nodes.remove(&n).is_none() {
                        world.nodes.insert(n, w);
                    }
                    if w == 3 && let Some(v) = world.vips.pop() {
                        world.vips.insert(0, v);
                    } else if w == 2 {
                        if world.vips.iter().any(|v| v.0 == 3) {
                            world.vips.retain(|v| v.0 != 3);
                        } else {
                            world.vips.push((3, 7));
                        }
                    }
                    let cfg = world.config();
                    let p = c.configure(&cfg).expect("configure");
                    k.run(&p);
                    prop_assert_eq!(&k, &Kernel::of(&c));
                    let p = batched.apply(&pending);
                    kb.run(&p);
                    pending.clear();
                    let p = batched.configure(&cfg).expect("configure");
                    kb.run(&p);
                    for id in 1..=NODES {
                        if !world.nodes.contains_key(&id) {
                            prop_assert!(!k.nodes.contains_key(&id));
                            prop_assert!(k.vips.values().all(|(_, r)| r.iter().all(|e| e.node != id)));
                        }
                    }
                }
                Op::Crash(n, steps) => {
                    let saved = serde_json::to_string(&c.snapshot()).expect("serialize");
                    let plan = c.apply(&[down(n)]);
                    let mut partial = plan.clone();
                    partial.steps.truncate(steps);
                    k.run(&partial);
                    let st: State = serde_json::from_str(&saved).expect("deserialize");
                    let cfg = world.config();
                    let (c2, plan) = Controller::start(&cfg, Some(&st), &adopted(&k)).expect("restart");
                    k.run(&plan);
                    prop_assert_eq!(&k, &Kernel::of(&c2));
                    c = c2;
                    // The batched twin starts over from here.
                    batched = c.clone();
                    kb = k.clone();
                    pending.clear();
                }
                Op::Restart => {
                    let cfg = world.config();
                    let c2 = restart(&c, &mut k, &cfg);
                    prop_assert_eq!(Kernel::of(&c2), Kernel::of(&c));
                    for (a, b) in c.vips().zip(c2.vips()) {
                        prop_assert_eq!(&a.table, &b.table);
                        prop_assert_eq!(&a.moved, &b.moved);
                        prop_assert_eq!(a.spec, b.spec);
                    }
                    prop_assert_eq!(c.nodes().cloned().collect::<Vec<_>>(), c2.nodes().cloned().collect::<Vec<_>>());
                    c = c2;
                    let p = batched.apply(&pending);
                    kb.run(&p);
                    pending.clear();
                    batched = restart(&batched, &mut kb, &cfg);
                }
                _ => {}
            }
            check_tables(&c);
        }
        let p = batched.apply(&pending);
        kb.run(&p);
        // Same tables and nodes (revisions and moved-flag timing may differ: a batch flags
        // only routes whose owner changed over the whole batch).
        prop_assert_eq!(
            c.nodes().cloned().collect::<Vec<_>>(),
            batched.nodes().cloned().collect::<Vec<_>>()
        );
        for (a, b) in c.vips().zip(batched.vips()) {
            prop_assert_eq!(&a.table, &b.table);
        }
        check_tables(&batched);
    }
}

/// A VIP left without an active node drops its new flows: the plan that takes its last
/// active node away says so once (`unserved`), the one that brings a node back says so
/// (`served`), and batches in between say nothing.
#[test]
fn a_vip_losing_its_last_active_node_is_reported_once_per_transition() {
    let cfg = config(&[(1, 1), (2, 1)], &[(1, 64), (2, 64)]);
    let (mut c, mut k) = start(&cfg);
    let both = vec![key(1), key(2)];
    assert!(c.served().is_empty(), "nodes start down");
    let p = apply(&mut c, &mut k, &[up(1)]);
    assert_eq!(
        (p.unserved.clone(), p.served.clone()),
        (vec![], both.clone())
    );
    let p = apply(&mut c, &mut k, &[up(2)]);
    assert!(p.unserved.is_empty() && p.served.is_empty());
    let p = apply(&mut c, &mut k, &[down(1)]);
    assert!(p.unserved.is_empty(), "node 2 still takes new flows");
    // The last one drains: nothing takes new flows any more (tracked ones finish on it).
    let p = apply(&mut c, &mut k, &[ev(Event::NodeDraining { node: 2 })]);
    assert_eq!(
        (p.unserved.clone(), p.served.clone()),
        (both.clone(), vec![])
    );
    let p = apply(&mut c, &mut k, &[down(2)]);
    assert!(
        p.unserved.is_empty(),
        "reported once, not again as it fails"
    );
    // Back: reported once.
    let p = apply(&mut c, &mut k, &[up(2), up(1)]);
    assert_eq!(
        (p.unserved.clone(), p.served.clone()),
        (vec![], both.clone())
    );
    // A reload that removes every node leaves both VIPs unserved; a VIP removed is not.
    let p = configure(&mut c, &mut k, &config(&[], &[(1, 64)]));
    assert_eq!((p.unserved, p.served), (vec![key(1)], vec![]));
}

/// The flow-hash seed decides every flow's route, so it lives as long as the tables: kept
/// across restarts through the state file, and the kernel's (what it was forwarding with)
/// wins over the file's. First starts draw distinct seeds.
#[test]
fn hash_seed_survives_restarts_and_the_kernels_wins() {
    let cfg = config(&[(1, 1), (2, 1)], &[(1, 64)]);
    let (c, mut k) = start(&cfg);
    let (other, _) = start(&cfg);
    assert_ne!(
        c.hash_seed(),
        other.hash_seed(),
        "two first starts drew one seed"
    );
    let c2 = restart(&c, &mut k, &cfg);
    assert_eq!(c2.hash_seed(), c.hash_seed());
    let st = c.snapshot();
    let kernel = Adopted {
        hash_seed: Some(c.hash_seed() ^ 1),
        ..adopted(&k)
    };
    let (c3, _) = Controller::start(&cfg, Some(&st), &kernel).expect("restart");
    assert_eq!(c3.hash_seed(), c.hash_seed() ^ 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Cluster mode: followers that run the leader's table revisions (every one, or only some
    /// of them, or starting late from nothing) end with the leader's kernel exactly, and no
    /// step of their plans ever leaves a route toward a node their `NODES` does not hold as
    /// ACTIVE.
    #[test]
    fn followers_of_revisions_run_the_leaders_tables(
        ops in proptest::collection::vec(op(), 1..30),
        skips in proptest::collection::vec(any::<bool>(), 30),
    ) {
        let mut world = World {
            nodes: (1..=NODES).map(|n| (n, 1 + n % 2)).collect(),
            vips: vec![(1, 48), (2, 61), (3, 7)],
        };
        let (mut c, mut k) = start(&world.config());
        let mut every = Controller::empty();
        let mut ke = Kernel::default();
        let mut some = Controller::empty();
        let mut ks = Kernel::default();
        let follow = |f: &mut Controller, kf: &mut Kernel, cfg: &Config, leader: &Controller| {
            let rev = crate::replica::Revision::new("a", cfg, leader);
            let rev = crate::replica::Revision::decode(&rev.encode()).expect("decodes");
            let cfg = rev.config(&Config::default());
            let next = Controller::from_revision(&rev.state, &cfg, &rev.vip_revisions())
                .expect("a revision of a valid controller is valid");
            let plan = f.replace_with(next);
            kf.run(&plan);
        };
        for (i, op) in ops.iter().enumerate() {
            let inputs = inputs_of(op, &c);
            apply(&mut c, &mut k, &inputs);
            if let Op::Reconfigure(n, w) = *op {
                if world.nodes.remove(&n).is_none() {
                    world.nodes.insert(n, w);
                }
                if w == 2 {
                    if world.vips.iter().any(|v| v.0 == 3) {
                        world.vips.retain(|v| v.0 != 3);
                    } else {
                        world.vips.push((3, 7));
                    }
                }
                let p = c.configure(&world.config()).expect("configure");
                k.run(&p);
            }
            let cfg = world.config();
            follow(&mut every, &mut ke, &cfg, &c);
            prop_assert_eq!(&ke, &k);
            prop_assert_eq!(every.vip_revisions(), c.vip_revisions());
            if !skips[i] {
                follow(&mut some, &mut ks, &cfg, &c);
                prop_assert_eq!(&ks, &k);
            }
        }
        let mut late = Controller::empty();
        let mut kl = Kernel::default();
        follow(&mut late, &mut kl, &world.config(), &c);
        prop_assert_eq!(&kl, &k);
        // A revision with another seed rewrites every VIP whole.
        let mut reseeded = c.clone();
        reseeded.hash_seed = c.hash_seed.wrapping_add(1);
        let plan = late.replace_with(reseeded);
        prop_assert_eq!(
            plan.steps.iter().filter(|s| matches!(s, Step::Vip { .. })).count(),
            c.vips().count()
        );
    }
}

/// A revision whose configuration does not name the state's nodes and VIPs is refused.
#[test]
fn a_revision_that_does_not_fit_its_configuration_is_refused() {
    let cfg = config(&[(1, 1), (2, 1)], &[(1, 64)]);
    let (c, _) = start(&cfg);
    let other = config(&[(1, 1)], &[(1, 64)]);
    let err = Controller::from_revision(&c.snapshot(), &other, &BTreeMap::new()).unwrap_err();
    assert!(err.to_string().contains("2 nodes"), "{err}");
    let other = config(&[(1, 1), (3, 1)], &[(1, 64)]);
    let err = Controller::from_revision(&c.snapshot(), &other, &BTreeMap::new()).unwrap_err();
    assert!(err.to_string().contains("node 3"), "{err}");
    let other = config(&[(1, 1), (2, 1)], &[(2, 64)]);
    let err = Controller::from_revision(&c.snapshot(), &other, &BTreeMap::new()).unwrap_err();
    assert!(err.to_string().contains("no table"), "{err}");
}
