//! Cluster mode's decisions (issue 12), as plain functions: the table revision every balancer
//! runs, the leader's rule over the balancers' reports, and which moved routes may settle.
//! The daemon (`daemon/clustered.rs`) moves these to and from etcd (`cluster`).
//!
//! The rule (docs/control-plane.md, "Cluster mode"): a node is up when some live balancer's
//! own detector holds it up, down when none does. A balancer in fail static (it hears almost
//! no node) is no evidence either way, unless every balancer is. Weight and drain come from
//! the first balancer (the leader itself first, then by id) that holds the node up.
use std::collections::{BTreeMap, BTreeSet};

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use lb_common::{FlowKey, VipKey};
use serde::{Deserialize, Serialize};

use crate::{
    cluster::{NodeView, Report},
    config::{Config, NodeConfig, VipConfig},
    controller::{Controller, Input, RouteSet},
    dataplane,
    membership::{DownReason, Event},
    state::{self, State},
};

/// The format this build writes and reads.
pub const REVISION_FORMAT: u32 = 1;

/// One table revision: everything every balancer needs to run the same tables. The leader
/// writes it to etcd as JSON (the `tables` key); its etcd revision names it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Revision {
    pub format: u32,
    /// The balancer that wrote it.
    pub leader: String,
    /// The cluster's nodes, VIPs and reserve node (its running configuration: `lb` changes
    /// included), flattened into the revision's fields.
    #[serde(flatten)]
    pub shared: Shared,
    /// Node states, tables, moved flags and the hash seed (the state file's format).
    pub state: State,
    /// VIP (as `lb` writes it) -> its revision counter: conntrack scans report on one.
    pub vip_revisions: BTreeMap<String, u64>,
}

impl Revision {
    /// The revision of `ctl` running `cfg`, written by `leader`.
    pub fn new(leader: &str, cfg: &Config, ctl: &Controller) -> Self {
        Self {
            format: REVISION_FORMAT,
            leader: leader.to_string(),
            shared: Shared::of(cfg),
            state: ctl.snapshot(),
            vip_revisions: ctl
                .vip_revisions()
                .into_iter()
                .map(|(k, r)| (dataplane::vip_display(&k), r))
                .collect(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // A revision holds only strings, numbers and maps with string keys: it always encodes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes and checks a revision; every problem is one line.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let r: Revision =
            serde_json::from_slice(bytes).map_err(|e| format!("not a table revision: {e}"))?;
        if r.format != REVISION_FORMAT {
            return Err(format!(
                "table revision format {} (this build reads {REVISION_FORMAT}): upgrade every \
                 balancer to one build",
                r.format
            ));
        }
        Ok(r)
    }

    /// `base` (this balancer's own configuration) running the revision's nodes and VIPs.
    pub fn config(&self, base: &Config) -> Config {
        self.shared.apply_to(base)
    }

    /// The VIPs' revision counters by key (entries naming no VIP are left out).
    pub fn vip_revisions(&self) -> BTreeMap<VipKey, u64> {
        let by_name: BTreeMap<String, VipKey> = self
            .state
            .vips
            .iter()
            .map(|v| {
                let k = dataplane::vip_key(v.addr, v.port, v.proto);
                (dataplane::vip_display(&k), k)
            })
            .collect();
        self.vip_revisions
            .iter()
            .filter_map(|(name, r)| by_name.get(name).map(|k| (*k, *r)))
            .collect()
    }
}

/// The part of a configuration the cluster shares: nodes, VIPs, the reserve node (the rest,
/// `[daemon]` and `[cluster]`, is each balancer's own).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Shared {
    pub nodes: Vec<NodeConfig>,
    pub vips: Vec<VipConfig>,
    pub reserve_node: Option<u32>,
}

impl Shared {
    pub fn of(cfg: &Config) -> Self {
        Self {
            nodes: cfg.nodes.clone(),
            vips: cfg.vips.clone(),
            reserve_node: cfg.daemon.reserve_node,
        }
    }

    pub fn to_json(&self) -> String {
        // Strings, numbers and lists only: it always encodes.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("not a proposed configuration: {e}"))
    }

    /// SHA-256 of its JSON: two balancers with the same digest share the same configuration.
    pub fn digest(&self) -> String {
        crate::running::digest(self.to_json().as_bytes())
    }

    /// `base` (a balancer's own configuration) with these nodes and VIPs.
    pub fn apply_to(&self, base: &Config) -> Config {
        let mut cfg = base.clone();
        cfg.nodes = self.nodes.clone();
        cfg.vips = self.vips.clone();
        cfg.daemon.reserve_node = self.reserve_node;
        cfg
    }
}

/// The leader's view of every node in `nodes`: `own` is the leader's report, `others` the
/// other live balancers' (see the module docs for the rule).
pub fn merge(
    nodes: impl IntoIterator<Item = u32>,
    own: &Report,
    others: &BTreeMap<String, Report>,
) -> BTreeMap<u32, NodeView> {
    let all: Vec<&Report> = std::iter::once(own).chain(others.values()).collect();
    let evidence: Vec<&Report> = if all.iter().all(|r| r.fail_static) {
        all
    } else {
        all.into_iter().filter(|r| !r.fail_static).collect()
    };
    nodes
        .into_iter()
        .map(|id| {
            let views = evidence.iter().filter_map(|r| r.nodes.get(&id));
            let mut held = false;
            let mut up = None;
            for v in views {
                match v {
                    NodeView::Up { .. } if up.is_none() => up = Some(*v),
                    NodeView::Held => held = true,
                    _ => {}
                }
            }
            let view = up.unwrap_or(if held { NodeView::Held } else { NodeView::Down });
            (id, view)
        })
        .collect()
}

/// The membership events that take `ctl`'s nodes to the `merged` view.
pub fn events(ctl: &Controller, merged: &BTreeMap<u32, NodeView>) -> Vec<Event> {
    let mut out = Vec::new();
    for (&node, &want) in merged {
        let Some(have) = ctl.node_view(node) else {
            continue;
        };
        match (have, want) {
            (a, b) if a == b => {}
            (NodeView::Down | NodeView::Held, NodeView::Held) => {}
            (_, NodeView::Down) => out.push(Event::NodeDown {
                node,
                reason: DownReason::MissedHeartbeats,
            }),
            (NodeView::Up { .. }, NodeView::Held) => out.push(Event::NodeDown {
                node,
                reason: DownReason::Restarted,
            }),
            (NodeView::Down | NodeView::Held, NodeView::Up { weight, draining }) => {
                out.push(Event::NodeUp {
                    node,
                    weight,
                    draining,
                });
            }
            (
                NodeView::Up {
                    weight: w0,
                    draining: d0,
                },
                NodeView::Up {
                    weight: w1,
                    draining: d1,
                },
            ) => {
                if d0 != d1 {
                    out.push(if d1 {
                        Event::NodeDraining { node }
                    } else {
                        Event::NodeUndrained { node }
                    });
                }
                if w0 != w1 {
                    out.push(Event::WeightChanged {
                        node,
                        old: w0,
                        new: w1,
                    });
                }
            }
        }
    }
    out
}

/// The moved routes no live balancer's flows need any more: for each VIP with moved routes,
/// once every report (`own` and `others`) has scanned the VIP at its current revision, the
/// routes all of them found settled.
pub fn settled(ctl: &Controller, own: &Report, others: &BTreeMap<String, Report>) -> Vec<Input> {
    let reports: Vec<&Report> = std::iter::once(own).chain(others.values()).collect();
    let mut out = Vec::new();
    for v in ctl.vips().filter(|v| !v.moved.is_empty()) {
        let name = dataplane::vip_display(&v.spec.key);
        let mut common: Option<BTreeSet<u32>> = None;
        let mut complete = true;
        for r in &reports {
            let Some(scan) = r.scans.get(&name).filter(|s| s.revision == v.revision) else {
                complete = false;
                break;
            };
            let mut mine = RouteSet::new(v.table.route_count());
            for route in state::expand(&scan.settled) {
                mine.insert(route);
            }
            common = Some(match common {
                None => mine.iter().filter(|r| v.moved.contains(*r)).collect(),
                Some(c) => c.into_iter().filter(|r| mine.contains(*r)).collect(),
            });
        }
        let routes: Vec<u32> = common.unwrap_or_default().into_iter().collect();
        if complete && !routes.is_empty() {
            out.push(Input::Settled {
                vip: v.spec.key,
                revision: v.revision,
                routes,
            });
        }
    }
    out
}

/// A flow on a moved route that its balancer keeps on its old node: shared with the other
/// balancers, so that it keeps that node wherever ECMP sends it (docs/control-plane.md,
/// "Moved routes across balancers").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pin {
    pub key: FlowKey,
    /// The node its conntrack entry names.
    pub node: u32,
    /// Its VIP's index (the same on every balancer running one revision).
    pub vip: u32,
}

/// Most pins one report carries (46 bytes each, base64: ~500 KiB, well inside etcd's default
/// 1.5 MiB request limit); the rest are counted, not shared.
pub const MAX_PINS: usize = 8192;
/// One pin on the wire: src 16, dst 16, sport 2, dport 2, proto 1, family 1, node 4, vip 4.
const PIN_BYTES: usize = 46;

/// Pins as one base64 string (ports in network order as the key holds them, numbers LE).
pub fn encode_pins(pins: &[Pin]) -> String {
    let mut b = Vec::with_capacity(pins.len() * PIN_BYTES);
    for p in pins {
        b.extend_from_slice(&p.key.src);
        b.extend_from_slice(&p.key.dst);
        b.extend_from_slice(&p.key.sport.to_ne_bytes());
        b.extend_from_slice(&p.key.dport.to_ne_bytes());
        b.push(p.key.proto);
        b.push(p.key.family);
        b.extend_from_slice(&p.node.to_le_bytes());
        b.extend_from_slice(&p.vip.to_le_bytes());
    }
    BASE64.encode(b)
}

/// The inverse of [`encode_pins`]; a string that is not one is an error (one line).
pub fn decode_pins(text: &str) -> Result<Vec<Pin>, String> {
    let b = BASE64
        .decode(text)
        .map_err(|e| format!("shared flows: not base64: {e}"))?;
    if b.len() % PIN_BYTES != 0 {
        return Err(format!(
            "shared flows: {} bytes is not a whole number of {PIN_BYTES}-byte records",
            b.len()
        ));
    }
    Ok(b.chunks_exact(PIN_BYTES)
        .map(|r| {
            let arr = |at: usize| -> [u8; 16] {
                let mut a = [0u8; 16];
                a.copy_from_slice(&r[at..at + 16]);
                a
            };
            let u16_at = |at: usize| u16::from_ne_bytes([r[at], r[at + 1]]);
            let u32_at = |at: usize| u32::from_le_bytes([r[at], r[at + 1], r[at + 2], r[at + 3]]);
            Pin {
                key: FlowKey {
                    src: arr(0),
                    dst: arr(16),
                    sport: u16_at(32),
                    dport: u16_at(34),
                    proto: r[36],
                    family: r[37],
                    _pad: [0; 2],
                },
                node: u32_at(38),
                vip: u32_at(42),
            }
        })
        .collect())
}

/// Every pin the other balancers share (reports whose pins do not decode are skipped, and
/// named in the returned errors), sorted and without duplicates.
pub fn wanted_pins(others: &BTreeMap<String, Report>) -> (Vec<Pin>, Vec<String>) {
    let mut all = BTreeSet::new();
    let mut errors = Vec::new();
    for (id, r) in others {
        match decode_pins(&r.pins) {
            Ok(p) => all.extend(p),
            Err(e) => errors.push(format!("balancer {id}: {e}")),
        }
    }
    (all.into_iter().collect(), errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ScanReport;

    fn report(nodes: &[(u32, NodeView)]) -> Report {
        Report {
            nodes: nodes.iter().copied().collect(),
            ..Report::default()
        }
    }
    const UP: NodeView = NodeView::Up {
        weight: 0,
        draining: false,
    };

    #[test]
    fn a_node_is_up_while_any_balancer_hears_it() {
        let own = report(&[(1, NodeView::Down), (2, NodeView::Down)]);
        let others = BTreeMap::from([
            ("b".to_string(), report(&[(1, UP), (2, NodeView::Down)])),
            ("c".to_string(), report(&[(1, NodeView::Down)])),
        ]);
        let m = merge([1, 2, 3], &own, &others);
        assert_eq!(m[&1], UP, "heartbeat loss toward two balancers keeps it up");
        assert_eq!(m[&2], NodeView::Down);
        assert_eq!(m[&3], NodeView::Down, "a node nobody reports is down");
    }

    #[test]
    fn fail_static_reports_are_no_evidence_unless_all_are() {
        let mut own = report(&[(1, UP)]);
        own.fail_static = true;
        let others = BTreeMap::from([("b".to_string(), report(&[(1, NodeView::Down)]))]);
        assert_eq!(merge([1], &own, &others)[&1], NodeView::Down);
        let mut b = report(&[(1, NodeView::Down)]);
        b.fail_static = true;
        let others = BTreeMap::from([("b".to_string(), b)]);
        assert_eq!(
            merge([1], &own, &others)[&1],
            UP,
            "every balancer deaf: the tables are held"
        );
    }

    #[test]
    fn the_leaders_own_view_wins_weight_and_drain() {
        let own = report(&[(
            1,
            NodeView::Up {
                weight: 7,
                draining: true,
            },
        )]);
        let others = BTreeMap::from([("a".to_string(), report(&[(1, UP)]))]);
        assert_eq!(
            merge([1], &own, &others)[&1],
            NodeView::Up {
                weight: 7,
                draining: true
            }
        );
        // Held only where nobody holds it up.
        let own = report(&[(1, NodeView::Held)]);
        assert_eq!(merge([1], &own, &others)[&1], UP);
        assert_eq!(
            merge([1], &own, &BTreeMap::new())[&1],
            NodeView::Held,
            "a restart seen by every balancer holds it"
        );
    }

    #[test]
    fn a_scan_of_another_revision_settles_nothing() {
        let others = BTreeMap::from([(
            "b".to_string(),
            Report {
                scans: BTreeMap::from([(
                    "x".to_string(),
                    ScanReport {
                        revision: 1,
                        settled: vec![(0, 3)],
                    },
                )]),
                ..Report::default()
            },
        )]);
        // A controller without moved routes settles nothing whatever the reports say.
        assert!(settled(&Controller::empty(), &Report::default(), &others).is_empty());
    }

    #[test]
    fn pins_round_trip_and_bad_ones_are_refused() {
        let pins = vec![
            Pin {
                key: FlowKey {
                    src: [1; 16],
                    dst: [2; 16],
                    sport: 0x1234,
                    dport: 80u16.to_be(),
                    proto: 6,
                    family: lb_common::FAMILY_V6,
                    _pad: [0; 2],
                },
                node: 7,
                vip: 3,
            },
            Pin::default_v4(),
        ];
        assert_eq!(decode_pins(&encode_pins(&pins)).unwrap(), pins);
        assert_eq!(decode_pins("").unwrap(), vec![]);
        assert!(decode_pins("!!").unwrap_err().contains("base64"));
        assert!(
            decode_pins(&BASE64.encode([0u8; 45]))
                .unwrap_err()
                .contains("46-byte")
        );
        let others = BTreeMap::from([
            (
                "a".to_string(),
                Report {
                    pins: encode_pins(&pins),
                    ..Report::default()
                },
            ),
            (
                "b".to_string(),
                Report {
                    pins: "not pins".into(),
                    ..Report::default()
                },
            ),
        ]);
        let (w, errors) = wanted_pins(&others);
        assert_eq!(w.len(), 2);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("balancer b"), "{errors:?}");
    }

    impl Pin {
        fn default_v4() -> Self {
            Pin {
                key: FlowKey {
                    src: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                    family: lb_common::FAMILY_V4,
                    ..FlowKey::default()
                },
                node: 1,
                vip: 0,
            }
        }
    }

    #[test]
    fn revisions_round_trip_and_bad_ones_are_refused() {
        let cfg = Config::default();
        let ctl = Controller::empty();
        let r = Revision::new("a", &cfg, &ctl);
        let back = Revision::decode(&r.encode()).expect("decodes");
        assert_eq!(back.encode(), r.encode());
        assert!(
            Revision::decode(b"{}")
                .unwrap_err()
                .contains("not a table revision")
        );
        let mut v: serde_json::Value = serde_json::from_slice(&r.encode()).unwrap();
        v["format"] = 9.into();
        let err = Revision::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.contains("format 9"), "{err}");
    }
}
