//! Node choice (docs/dataplane.md step 9) as a pure function: which node a packet goes to,
//! what happens to its `CONNTRACK` entry, and which `Stat` events it counts. The program does
//! the map lookups this asks for and applies the result; `lb trace` asks the same function.
use crate::{CT_F_FIN, CT_F_KEEP, CT_F_RST, DropReason, NODE_ACTIVE, NODE_DRAINING, Stat};

/// TCP flag bits (byte 13 of the header).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// What kind of packet is being routed, as far as node choice cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowKind {
    /// TCP SYN without ACK: a new flow.
    Syn,
    /// UDP: always tracked.
    Udp,
    /// TCP other than a SYN, and ICMP errors about a flow. `seen` holds the `CT_F_FIN` /
    /// `CT_F_RST` bits the packet carries; `always` forces a conntrack lookup and never inserts
    /// (ICMP errors).
    Tracked { seen: u32, always: bool },
    /// IPv4 fragment: no conntrack.
    Fragment,
}

impl FlowKind {
    /// The kind of a TCP packet from its flags byte.
    #[inline(always)]
    pub const fn tcp(flags: u8) -> Self {
        use tcp_flags::{ACK, FIN, RST, SYN};
        if flags & (SYN | ACK) == SYN {
            return FlowKind::Syn;
        }
        let mut seen = 0;
        if flags & FIN != 0 {
            seen |= CT_F_FIN;
        }
        if flags & RST != 0 {
            seen |= CT_F_RST;
        }
        FlowKind::Tracked {
            seen,
            always: false,
        }
    }
}

/// ACTIVE or DRAINING.
#[inline(always)]
pub const fn is_live(state: u8) -> bool {
    state == NODE_ACTIVE || state == NODE_DRAINING
}

/// Whether the flow must be looked up in `CONNTRACK`. A route that has not moved needs no
/// lookup for established TCP: its owner is authoritative.
#[inline(always)]
pub const fn needs_lookup(kind: FlowKind, route_moved: bool) -> bool {
    match kind {
        FlowKind::Syn | FlowKind::Fragment => false,
        FlowKind::Udp => true,
        FlowKind::Tracked { seen, always } => route_moved || seen != 0 || always,
    }
}

/// The flags a flow's entry gets from a packet (`seen`: its `CT_F_FIN`/`CT_F_RST` bits) on a
/// route that is `moved` or not, given the entry's `old` flags (0 for a new entry). All stay
/// set (userspace clears `CT_F_KEEP` when the route settles): a FIN or RST only ends the entry
/// once the flow has been quiet since (`CT_CLOSE_QUIET`), and every packet of a flow on a moved
/// route refreshes `last_seen`, so a forged FIN/RST cannot end a flow that goes on talking,
/// while a real close (FIN, then the last ACK) is quiet soon after.
#[inline(always)]
pub const fn ct_flags(old: u32, seen: u32, moved: bool) -> u32 {
    let keep = if moved { CT_F_KEEP } else { 0 };
    old | seen | keep
}

/// What to do with the flow's `CONNTRACK` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtAction {
    /// Nothing.
    None,
    /// Insert (or overwrite) `{node, vip, now, ct_flags(0, ..)}`.
    Insert,
    /// Hit on a live node: refresh `last_seen` if stale, add the `seen` flags.
    Refresh,
    /// Hit on a down node: point the entry at the new node (`last_seen = now`, flags kept plus
    /// `seen`).
    Rewrite,
}

/// The outcome of node choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    /// Index into `NODES`.
    pub node: u32,
    pub ct: CtAction,
    /// Bit `1 << Stat as u32` for each event to count.
    pub stats: u32,
}

const fn bit(s: Stat) -> u32 {
    1 << s as u32
}

/// Chooses the node. `owner`/`owner_state` come from the route slot; `hit` is the conntrack
/// lookup result `(node, that node's state)` when [`needs_lookup`] asked for one (`looked_up`).
#[inline(always)]
pub fn choose(
    kind: FlowKind,
    owner: u32,
    owner_state: u8,
    looked_up: bool,
    hit: Option<(u32, u8)>,
) -> Result<Choice, DropReason> {
    let owner_ok = match kind {
        // New flows only go to ACTIVE nodes; existing ones may finish on DRAINING ones.
        FlowKind::Syn | FlowKind::Udp => owner_state == NODE_ACTIVE,
        FlowKind::Tracked { .. } | FlowKind::Fragment => is_live(owner_state),
    };
    let to_owner = |ct, stats| {
        if owner_ok {
            Ok(Choice {
                node: owner,
                ct,
                stats,
            })
        } else {
            Err(DropReason::NoBackend)
        }
    };
    match kind {
        FlowKind::Syn => to_owner(CtAction::Insert, bit(Stat::CtInsert)),
        FlowKind::Fragment => to_owner(CtAction::None, 0),
        FlowKind::Udp | FlowKind::Tracked { .. } if looked_up => match hit {
            Some((node, state)) if is_live(state) => {
                let mut stats = bit(Stat::CtHit);
                if state == NODE_DRAINING {
                    stats |= bit(Stat::DrainKeep);
                }
                Ok(Choice {
                    node,
                    ct: CtAction::Refresh,
                    stats,
                })
            }
            Some(_) => to_owner(CtAction::Rewrite, bit(Stat::CtReroute)),
            // An unknown UDP flow, or an established TCP flow on a moved route that conntrack
            // does not know (it began elsewhere, or lost its entry): it goes to the owner from
            // now on, recorded so that it stays there.
            None if matches!(
                kind,
                FlowKind::Udp
                    | FlowKind::Tracked {
                        seen: 0,
                        always: false
                    }
            ) =>
            {
                to_owner(CtAction::Insert, bit(Stat::CtMiss) | bit(Stat::CtInsert))
            }
            None => to_owner(CtAction::None, bit(Stat::CtMiss)),
        },
        FlowKind::Udp | FlowKind::Tracked { .. } => to_owner(CtAction::None, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NODE_DOWN;

    const A: u8 = NODE_ACTIVE;
    const D: u8 = NODE_DRAINING;
    const X: u8 = NODE_DOWN;
    const ACK: FlowKind = FlowKind::Tracked {
        seen: 0,
        always: false,
    };

    fn ok(node: u32, ct: CtAction, stats: &[Stat]) -> Result<Choice, DropReason> {
        Ok(Choice {
            node,
            ct,
            stats: stats.iter().fold(0, |b, s| b | bit(*s)),
        })
    }

    #[test]
    fn tcp_kinds() {
        assert_eq!(FlowKind::tcp(0x02), FlowKind::Syn);
        assert_eq!(FlowKind::tcp(0x12), ACK); // SYN-ACK is not a new flow
        assert_eq!(
            FlowKind::tcp(0x11),
            FlowKind::Tracked {
                seen: CT_F_FIN,
                always: false
            }
        );
        assert_eq!(
            FlowKind::tcp(0x14),
            FlowKind::Tracked {
                seen: CT_F_RST,
                always: false
            }
        );
    }

    #[test]
    fn lookups_only_where_needed() {
        assert!(!needs_lookup(ACK, false));
        assert!(needs_lookup(ACK, true));
        assert!(needs_lookup(FlowKind::tcp(0x11), false));
        assert!(needs_lookup(FlowKind::Udp, false));
        assert!(!needs_lookup(FlowKind::Syn, true));
        assert!(!needs_lookup(FlowKind::Fragment, true));
        assert!(needs_lookup(
            FlowKind::Tracked {
                seen: 0,
                always: true
            },
            false
        ));
    }

    #[test]
    fn syn() {
        let k = FlowKind::Syn;
        assert_eq!(
            choose(k, 7, A, false, None),
            ok(7, CtAction::Insert, &[Stat::CtInsert])
        );
        assert_eq!(choose(k, 7, D, false, None), Err(DropReason::NoBackend));
        assert_eq!(choose(k, 7, X, false, None), Err(DropReason::NoBackend));
    }

    #[test]
    fn udp() {
        let k = FlowKind::Udp;
        assert_eq!(
            choose(k, 7, A, true, Some((3, A))),
            ok(3, CtAction::Refresh, &[Stat::CtHit])
        );
        assert_eq!(
            choose(k, 7, X, true, Some((3, D))),
            ok(3, CtAction::Refresh, &[Stat::CtHit, Stat::DrainKeep])
        );
        assert_eq!(
            choose(k, 7, A, true, Some((3, X))),
            ok(7, CtAction::Rewrite, &[Stat::CtReroute])
        );
        assert_eq!(
            choose(k, 7, D, true, Some((3, X))),
            Err(DropReason::NoBackend)
        );
        assert_eq!(
            choose(k, 7, A, true, None),
            ok(7, CtAction::Insert, &[Stat::CtMiss, Stat::CtInsert])
        );
        assert_eq!(choose(k, 7, D, true, None), Err(DropReason::NoBackend));
    }

    #[test]
    fn tcp_other() {
        assert_eq!(choose(ACK, 7, A, false, None), ok(7, CtAction::None, &[]));
        assert_eq!(choose(ACK, 7, D, false, None), ok(7, CtAction::None, &[]));
        assert_eq!(choose(ACK, 7, X, false, None), Err(DropReason::NoBackend));
        assert_eq!(
            choose(ACK, 7, A, true, Some((3, D))),
            ok(3, CtAction::Refresh, &[Stat::CtHit, Stat::DrainKeep])
        );
        assert_eq!(
            choose(ACK, 7, D, true, Some((3, X))),
            ok(7, CtAction::Rewrite, &[Stat::CtReroute])
        );
        assert_eq!(
            choose(ACK, 7, X, true, Some((3, X))),
            Err(DropReason::NoBackend)
        );
        // Unknown on a moved route: to the owner, and recorded there.
        assert_eq!(
            choose(ACK, 7, D, true, None),
            ok(7, CtAction::Insert, &[Stat::CtMiss, Stat::CtInsert])
        );
        assert_eq!(choose(ACK, 7, X, true, None), Err(DropReason::NoBackend));
        // A FIN/RST or an ICMP error that conntrack does not know is not recorded.
        let fin = FlowKind::tcp(0x11);
        assert_eq!(
            choose(fin, 7, A, true, None),
            ok(7, CtAction::None, &[Stat::CtMiss])
        );
        let icmp = FlowKind::Tracked {
            seen: 0,
            always: true,
        };
        assert_eq!(
            choose(icmp, 7, A, true, None),
            ok(7, CtAction::None, &[Stat::CtMiss])
        );
    }

    #[test]
    fn flags_accumulate() {
        use crate::{CT_F_FIN, CT_F_KEEP, CT_F_RST};
        assert_eq!(ct_flags(0, 0, false), 0);
        assert_eq!(ct_flags(0, CT_F_RST, false), CT_F_RST);
        // The last ACK after a FIN keeps it: the close ends the entry once quiet.
        assert_eq!(ct_flags(CT_F_FIN, 0, false), CT_F_FIN);
        assert_eq!(
            ct_flags(CT_F_FIN, CT_F_RST, true),
            CT_F_FIN | CT_F_RST | CT_F_KEEP
        );
        assert_eq!(ct_flags(CT_F_KEEP, 0, false), CT_F_KEEP);
        assert_eq!(ct_flags(0, 0, true), CT_F_KEEP);
    }

    #[test]
    fn fragment() {
        let k = FlowKind::Fragment;
        assert_eq!(choose(k, 7, D, false, None), ok(7, CtAction::None, &[]));
        assert_eq!(choose(k, 7, X, false, None), Err(DropReason::NoBackend));
    }
}
