//! Steps 8-9: the flow hash, the live `ROUTES` slot, and the node (the route's owner, or the
//! one conntrack remembers); `balance` runs them (`pick`) and then step 10 (`forward`).
use aya_ebpf::{helpers::generated::bpf_ktime_get_coarse_ns, programs::XdpContext};
use lb_common::{
    CT_TIME_SHIFT, CtEntry, DropReason, NODE_DOWN, NodeEntry, ROUTE_F_MOVED, RouteEntry, Stat,
    VIP_F_HASH_SRC, VipMeta,
    ct::CT_TIME_MASK,
    ct::{CT_WAYS, ct_key_words, ct_set_index, ct_tag},
    flow_hash_v4, flow_hash_v6, route_index,
};
use lb_ebpf::{
    decide::{self, CtAction, FlowKind},
    pkt::Frame,
};

use super::{
    conntrack::{
        CT_PUT_EVICTED, CT_PUT_EVICTED_LOGGED, CT_PUT_FULL, lb_ct_get, lb_ct_put, lb_ct_touch,
    },
    counters::{count, count_events, count_forwarded},
    events::lb_log_event,
    forward::{config, dsr, forward},
    maps::{CONNTRACK, NODES, ROUTES, VIP_GEN},
    parse::{Flow, Ip},
};
use crate::Verdict;

/// Steps 8-10 for every kind of packet: two subprograms called one after the other, so the
/// deepest call chains (conntrack under `pick`, PMTU replies under `forward`) each fit the
/// 512-byte stack next to the entry's frame.
#[inline(always)]
pub(crate) fn balance(
    ctx: &XdpContext,
    ip: &Ip,
    flow: &Flow,
    meta: &VipMeta,
    event: Option<Stat>,
) -> Result<Verdict, DropReason> {
    let picked = pick(ip, flow, meta);
    if picked & PICK_ERR != 0 {
        return Err(DropReason::from_index(picked as u32).unwrap_or(DropReason::NoRoute));
    }
    let event = event.map_or(0, |e| e as u64 + 1);
    forward(ctx, ip, flow, meta, picked | event << PICK_EVENT_SHIFT)
}

/// `pick`'s result in one register: the `ROUTES` slot in bits 0..32 and the node in 32..48;
/// `PICK_ERR | reason` on a drop. `balance` adds the packet's event (`Stat` + 1) at bit 48.
const PICK_ERR: u64 = 1 << 63;
pub(crate) const PICK_NODE_SHIFT: u64 = 32;
pub(crate) const PICK_EVENT_SHIFT: u64 = 48;

/// Steps 8-9: the route slot and the node for the packet (see `PICK_ERR`).
#[inline(never)]
fn pick(ip: &Ip, flow: &Flow, meta: &VipMeta) -> u64 {
    let r = route_of(ip, flow, meta)
        .and_then(|(hash, slot, route)| Ok((slot, choose_node(ip, flow, meta, route, hash)?.0)));
    match r {
        Ok((slot, node)) => slot as u64 | (node as u64) << PICK_NODE_SHIFT,
        Err(reason) => PICK_ERR | reason as u64,
    }
}

/// The route hash of the flow: 5-tuple, or source address only for affinity VIPs.
#[inline(always)]
pub(crate) fn route_hash(ip: &Ip, flow: &Flow, meta: &VipMeta) -> u32 {
    let ports = if meta.flags & VIP_F_HASH_SRC != 0 {
        0
    } else {
        flow.ports
    };
    flow_hash(ip, flow, ports, meta.hash_seed)
}

/// The flow's hash with the given ports word (0 for source affinity).
#[inline(always)]
fn flow_hash(ip: &Ip, flow: &Flow, ports: u32, seed: u32) -> u32 {
    if ip.v6 {
        flow_hash_v6(seed, &flow.client, &flow.vip, ports, flow.proto)
    } else {
        flow_hash_v4(seed, flow.client[0], flow.vip[0], ports, flow.proto)
    }
}

/// Step 8: the flow hash, the live `ROUTES` slot and its entry.
#[inline(always)]
pub(crate) fn route_of(
    ip: &Ip,
    flow: &Flow,
    meta: &VipMeta,
) -> Result<(u32, u32, &'static RouteEntry), DropReason> {
    let hash = route_hash(ip, flow, meta);
    if meta.route_count == 0 {
        return Err(DropReason::NoRoute);
    }
    // verifier: the index is < MAX_VIPS (the loader checks), but the lookup can return null.
    let Some(generation) = VIP_GEN.get(meta.index) else {
        return Err(DropReason::NoRoute);
    };
    let slot = meta
        .live_offset(*generation)
        .wrapping_add(route_index(hash, meta.route_count));
    let Some(route) = ROUTES.get(slot) else {
        return Err(DropReason::NoRoute);
    };
    Ok((hash, slot, route))
}

/// The hot path, inline: established TCP (no SYN, FIN or RST) to a dsr-l2 VIP. Exactly what
/// `balance` does for such a packet, without its subprogram call; a moved route (conntrack
/// needed) goes to `balance`.
#[inline(always)]
pub(crate) fn established(
    ctx: &XdpContext,
    ip: &Ip,
    flow: &Flow,
    meta: &VipMeta,
) -> Result<Verdict, DropReason> {
    let (_, slot, route) = route_of(ip, flow, meta)?;
    if route.flags & ROUTE_F_MOVED != 0 {
        return balance(ctx, ip, flow, meta, None);
    }
    // The route's owner is authoritative; "TCP other" may finish on a DRAINING node.
    let node_idx = route.node;
    let Some(node) = NODES.get(node_idx).filter(|n| decide::is_live(n.state)) else {
        return Err(DropReason::NoBackend);
    };
    let f = Frame::of(ctx);
    dsr(f, node)?;
    count_forwarded(meta.index, node_idx, slot, f.len() as u64);
    Ok(Verdict::Tx)
}

/// Step 9: the node for this packet (`hash` is the route hash from `route_of`).
#[inline(always)]
fn choose_node(
    ip: &Ip,
    flow: &Flow,
    meta: &VipMeta,
    route: &RouteEntry,
    hash: u32,
) -> Result<(u32, &'static NodeEntry), DropReason> {
    let looked_up = decide::needs_lookup(flow.kind, route.flags & ROUTE_F_MOVED != 0);
    let node = if !looked_up && flow.kind != FlowKind::Syn {
        // The hot path: the route's owner is authoritative, no conntrack at all.
        let owner = NODES.get(route.node);
        let state = owner.map_or(NODE_DOWN, |n| n.state);
        decide::choose(flow.kind, route.node, state, false, None)?;
        route.node
    } else {
        tracked(ip, flow, meta, route, hash)?
    };
    // A chosen node is never DOWN, so its entry exists.
    NODES
        .get(node)
        .map(|n| (node, n))
        .ok_or(DropReason::NoBackend)
}

/// Node choice with the conntrack lookup and update the packet needs (in `pick`, off the hot
/// path). `CONNTRACK` is read and written in place by the `lb_ct_*` globals; `lb_common::ct`
/// has the layout, the way choice and why no lock is needed.
#[inline(always)]
fn tracked(
    ip: &Ip,
    flow: &Flow,
    meta: &VipMeta,
    route: &RouteEntry,
    hash: u32,
) -> Result<u32, DropReason> {
    // The tag is the 5-tuple hash: the route hash already is one unless the VIP hashes by
    // source address only.
    let tag = ct_tag(if meta.flags & VIP_F_HASH_SRC != 0 {
        flow_hash(ip, flow, flow.ports, meta.hash_seed)
    } else {
        hash
    });
    let looked_up = decide::needs_lookup(flow.kind, route.flags & ROUTE_F_MOVED != 0);
    let owner_state = NODES.get(route.node).map_or(NODE_DOWN, |n| n.state);
    let key = ct_key_words(&flow.client, &flow.vip, flow.ports, flow.proto, ip.family());
    // verifier: the index is below the map size (`ct_sets` is the loader's copy of it), but
    // the lookup can return null.
    let set = CONNTRACK
        .get_ptr_mut(ct_set_index(tag, config()?.ct_sets))
        .ok_or(DropReason::HelperFailed)?;
    let mut hit = None;
    let mut old = CtEntry::default();
    // SAFETY (the three `lb_ct_*` calls): a live set, and references to locals.
    if looked_up && unsafe { lb_ct_get(set, &key, tag, CT_WAYS, &mut old) } != 0 {
        hit = Some((old.node, NODES.get(old.node).map_or(NODE_DOWN, |x| x.state)));
    }
    let choice = decide::choose(flow.kind, route.node, owner_state, looked_up, hit)?;
    if choice.ct != CtAction::None {
        // SAFETY: no arguments; cannot fail.
        let now = (unsafe { bpf_ktime_get_coarse_ns() } >> CT_TIME_SHIFT) as u32 & CT_TIME_MASK;
        let seen = match flow.kind {
            FlowKind::Tracked { seen, .. } => seen,
            _ => 0,
        };
        // `CT_F_KEEP` only for a flow seen again on a moved route (a hit), never for an
        // insert: a flood of new flows must not make itself unevictable.
        let flags = match choice.ct {
            CtAction::Insert => decide::ct_flags(0, seen, false),
            _ => decide::ct_flags(old.flags, seen, route.flags & ROUTE_F_MOVED != 0),
        };
        // Written only when they change, so the hot path rarely dirties the line.
        let stale = old.last_seen != now || old.flags != flags;
        // The new entry goes where the old one was read to: the stack has no room for both.
        old = CtEntry {
            node: choice.node,
            vip: meta.index,
            last_seen: now,
            flags,
        };
        let e = &old;
        match choice.ct {
            CtAction::Refresh if stale => {
                unsafe { lb_ct_touch(set, &key, tag, CT_WAYS, e) };
            }
            CtAction::Refresh => {}
            _ => match unsafe { lb_ct_put(set, &key, tag, CT_WAYS, e) } {
                CT_PUT_FULL => count(Stat::CtFull),
                CT_PUT_EVICTED => count(Stat::CtEvict),
                CT_PUT_EVICTED_LOGGED => {
                    lb_log_event();
                    count(Stat::CtEvict);
                }
                _ => {}
            },
        }
    }
    count_events(choice.stats);
    Ok(choice.node)
}
