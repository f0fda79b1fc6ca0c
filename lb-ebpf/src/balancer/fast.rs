//! The IPv4 fast path: steps 2-10 for the commonest packet (established TCP to a dsr-l2 VIP,
//! IPv4 without options), in registers, falling back to the general path for anything else.
use lb_common::{
    FAMILY_V4, PROTO_TCP, ROUTE_F_MOVED, VIP_F_HASH_SRC, VIP_MODE_IPIP, VipCacheEntry,
    addr_hash_v4, flow_hash_v4, route_index, vip_cache_slot,
};
use lb_ebpf::{
    decide,
    parse::{self, IPV4_HLEN, TCP_HLEN, ipv4, tcp},
    pkt::{Frame, be16, ld, le32, port},
};

use super::{
    counters::count_forwarded,
    forward::dsr,
    maps::{NODES, ROUTES, VIP_CACHE, VIP_GEN},
    vip::{CACHE_ADDR, CACHE_TAIL, cache_tail, in_filter},
};

/// What the IPv4 fast path made of a packet.
pub(crate) enum Fast {
    /// Forwarded (dsr-l2) and counted.
    Tx,
    /// Not for a VIP address (`VIP_FILTER` bit clear).
    Pass,
    /// Anything else: the general path (steps 2-12) handles it from the start.
    Slow,
}

/// The hot path, in registers: established TCP (no SYN, FIN or RST) over IPv4 without options
/// or fragmentation, to a dsr-l2 VIP found in `VIP_CACHE`, on a route that has not moved, whose
/// owner is live. For these packets it does exactly what the general path would (same checks,
/// hash, route, rewrite and counters); every other packet to a VIP address goes to the general
/// path untouched, and non-VIP packets stop at the `VIP_FILTER` bit as there.
#[inline(always)]
pub(crate) fn fast_v4(f: Frame, l3: usize) -> Fast {
    use parse::tcp::{ACK, FIN, RST, SYN};
    // The IPv4 header without options and the TCP header, in one bound.
    let Some(h) = f.at::<{ IPV4_HLEN + TCP_HLEN }>(l3) else {
        return Fast::Slow;
    };
    let dst = le32(h + ipv4::DST);
    let dst_hash = addr_hash_v4(dst);
    if !in_filter(dst_hash) {
        return Fast::Pass;
    }
    let frag = be16(h + ipv4::FRAG_OFF);
    if ld::<u8>(h + ipv4::VER_IHL) != 0x45
        || ld::<u8>(h + ipv4::PROTO) != PROTO_TCP
        || parse::is_fragment(frag)
    {
        return Fast::Slow;
    }
    // Steps 4 and 6: total length inside the frame, holding the TCP header (data offset).
    let t = h + IPV4_HLEN;
    let tot = be16(h + ipv4::TOT_LEN) as usize;
    let doff = (ld::<u8>(t + tcp::DOFF) >> 4) as usize;
    if tot > f.len() - l3 || doff < 5 || IPV4_HLEN + doff * 4 > tot {
        return Fast::Slow;
    }
    let flags: u8 = ld(t + tcp::FLAGS);
    if flags & (SYN | ACK) == SYN || flags & (FIN | RST) != 0 {
        return Fast::Slow;
    }
    // Step 7 from the cache only.
    let dport = port(t + tcp::DST_PORT);
    // verifier: the slot is < VIP_CACHE_SIZE, but the lookup can return null.
    let Some(e) = VIP_CACHE.get(vip_cache_slot(dst_hash, dport, PROTO_TCP)) else {
        return Fast::Slow;
    };
    let k = e as *const VipCacheEntry as usize;
    if ld::<u32>(k + CACHE_TAIL) != cache_tail(dport, PROTO_TCP, FAMILY_V4)
        || ld::<u32>(k + CACHE_ADDR) != dst
        || ld::<u32>(k + CACHE_ADDR + 4)
            | ld::<u32>(k + CACHE_ADDR + 8)
            | ld::<u32>(k + CACHE_ADDR + 12)
            != 0
    {
        return Fast::Slow;
    }
    let meta = e.meta;
    if meta.mode() == VIP_MODE_IPIP || meta.route_count == 0 {
        return Fast::Slow;
    }
    // Step 8.
    let ports = if meta.flags & VIP_F_HASH_SRC != 0 {
        0
    } else {
        le32(t + tcp::PORTS)
    };
    let hash = flow_hash_v4(meta.hash_seed, le32(h + ipv4::SRC), dst, ports, PROTO_TCP);
    // verifier: the index is < MAX_VIPS (the loader checks), but the lookup can return null.
    let Some(generation) = VIP_GEN.get(meta.index) else {
        return Fast::Slow;
    };
    let slot = meta
        .live_offset(*generation)
        .wrapping_add(route_index(hash, meta.route_count));
    let Some(route) = ROUTES.get(slot) else {
        return Fast::Slow;
    };
    // Step 9: an unmoved route's owner is authoritative ("TCP other" may use a DRAINING one).
    if route.flags & ROUTE_F_MOVED != 0 {
        return Fast::Slow;
    }
    let node_idx = route.node;
    let Some(node) = NODES.get(node_idx).filter(|n| decide::is_live(n.state)) else {
        return Fast::Slow;
    };
    // Step 10 (`dsr` fails only on its verifier re-check of the Ethernet header).
    if dsr(f, node).is_err() {
        return Fast::Slow;
    }
    count_forwarded(meta.index, node_idx, slot, f.len() as u64);
    Fast::Tx
}
