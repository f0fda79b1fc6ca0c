//! The fast paths: steps 2-10 for the commonest packets (established TCP over IPv4 without
//! options or over IPv6 without extension headers, to a VIP found in `VIP_CACHE`, dsr-l2 or
//! ipip), in registers, falling back to the general path for anything else.
use aya_ebpf::programs::XdpContext;
use lb_common::{
    FAMILY_V4, FAMILY_V6, NodeEntry, PROTO_TCP, ROUTE_F_MOVED, VIP_F_HASH_SRC, VIP_MODE_IPIP,
    VipMeta, addr_hash_v4, addr_hash_v6, flow_hash_v4, flow_hash_v6, route_index,
};
use lb_ebpf::{
    decide,
    parse::{self, IPV4_HLEN, IPV6_HLEN, TCP_HLEN, ipv4, ipv6, tcp},
    pkt::{Frame, be16, ld, le32, port, words16},
};

use super::{
    counters::count_forwarded,
    forward::{Inner, Sent, dsr, encap_inline},
    maps::{NODES, ROUTES, VIP_GEN},
    vip::{cached_vip, in_filter},
};

/// What a fast path made of a packet.
pub(crate) enum Fast {
    /// Forwarded and counted.
    Tx,
    /// Not for a VIP address (`VIP_FILTER` bit clear).
    Pass,
    /// Anything else: the general path (steps 2-12) handles it from the start.
    Slow,
}

/// The IPv4 hot path: established TCP (no SYN, FIN or RST) over IPv4 without options or
/// fragmentation, to a VIP found in `VIP_CACHE`, on a route that has not moved, whose owner is
/// live. For these packets it does exactly what the general path would (same checks, hash,
/// route, rewrite or encapsulation, and counters); every other packet to a VIP address goes to
/// the general path untouched, and non-VIP packets stop at the `VIP_FILTER` bit as there.
#[inline(always)]
pub(crate) fn fast_v4(ctx: &XdpContext, f: Frame, l3: usize) -> Fast {
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
    let tot = be16(h + ipv4::TOT_LEN);
    let tot_len = tot as usize;
    if tot_len < IPV4_HLEN || tot_len > f.len() - l3 || !plain_tcp(t, tot_len - IPV4_HLEN) {
        return Fast::Slow;
    }
    // Step 7 from the cache only.
    let Some(meta) = cached_vip(
        &[dst, 0, 0, 0],
        dst_hash,
        port(t + tcp::DST_PORT),
        PROTO_TCP,
        FAMILY_V4,
    ) else {
        return Fast::Slow;
    };
    // Step 8.
    let hash = flow_hash_v4(
        meta.hash_seed,
        le32(h + ipv4::SRC),
        dst,
        ports(meta, t),
        PROTO_TCP,
    );
    let tos = ld(h + ipv4::TOS);
    let inner = Inner::new(l3, false, frag & ipv4::DF != 0, false, tot, [tos, 0]);
    if meta.mode() == VIP_MODE_IPIP {
        return fast_ipip(ctx, meta, hash, inner);
    }
    route_and_send::<false>(ctx, f, meta, hash, inner)
}

/// The fast paths' ipip tail (steps 8-10 with the encapsulation inline) as a subprogram:
/// inline in the entry, it would grow the entry's frame past the combined stack limit.
#[inline(never)]
fn fast_ipip(ctx: &XdpContext, meta: &VipMeta, hash: u32, inner: Inner) -> Fast {
    route_and_send::<true>(ctx, Frame::of(ctx), meta, hash, inner)
}

/// The IPv6 hot path: as `fast_v4`, for IPv6 whose next header is TCP.
#[inline(always)]
pub(crate) fn fast_v6(ctx: &XdpContext, f: Frame, l3: usize) -> Fast {
    let Some(h) = f.at::<{ IPV6_HLEN + TCP_HLEN }>(l3) else {
        return Fast::Slow;
    };
    let dst = words16(h + ipv6::DST);
    let dst_hash = addr_hash_v6(&dst);
    if !in_filter(dst_hash) {
        return Fast::Pass;
    }
    // Extension headers (and every other protocol) take the general path.
    if ld::<u8>(h + ipv6::NEXT_HDR) != PROTO_TCP {
        return Fast::Slow;
    }
    // Steps 4 and 6: payload inside the frame, holding the TCP header (data offset).
    let t = h + IPV6_HLEN;
    let plen = be16(h + ipv6::PAYLOAD_LEN);
    if IPV6_HLEN + plen as usize > f.len() - l3 || !plain_tcp(t, plen as usize) {
        return Fast::Slow;
    }
    let Some(meta) = cached_vip(
        &dst,
        dst_hash,
        port(t + tcp::DST_PORT),
        PROTO_TCP,
        FAMILY_V6,
    ) else {
        return Fast::Slow;
    };
    let src = words16(h + ipv6::SRC);
    let hash = flow_hash_v6(meta.hash_seed, &src, &dst, ports(meta, t), PROTO_TCP);
    let tc = [ld(h + ipv6::VCF), ld(h + ipv6::VCF + 1)];
    let inner = Inner::new(l3, true, false, false, plen, tc);
    if meta.mode() == VIP_MODE_IPIP {
        return fast_ipip(ctx, meta, hash, inner);
    }
    route_and_send::<false>(ctx, f, meta, hash, inner)
}

/// Step 6 for the fast paths: a TCP header at `t` whose data offset fits `l4_len`, and a
/// packet of an established flow (no SYN, FIN or RST), which needs no conntrack.
#[inline(always)]
fn plain_tcp(t: usize, l4_len: usize) -> bool {
    use parse::tcp::{ACK, FIN, RST, SYN};
    let doff = (ld::<u8>(t + tcp::DOFF) >> 4) as usize;
    let flags: u8 = ld(t + tcp::FLAGS);
    doff >= 5 && doff * 4 <= l4_len && flags & (SYN | ACK) != SYN && flags & (FIN | RST) == 0
}

/// The ports word the route hash takes: 0 for source-affinity VIPs.
#[inline(always)]
fn ports(meta: &VipMeta, t: usize) -> u32 {
    if meta.flags & VIP_F_HASH_SRC != 0 {
        0
    } else {
        le32(t + tcp::PORTS)
    }
}

/// Steps 8-10 once the VIP and the flow hash are known: the live route, which must not have
/// moved, its live owner, then dsr-l2 or ipip.
#[inline(always)]
fn route_and_send<const IPIP: bool>(
    ctx: &XdpContext,
    f: Frame,
    meta: &VipMeta,
    hash: u32,
    inner: Inner,
) -> Fast {
    if meta.route_count == 0 {
        return Fast::Slow;
    }
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
    if !send::<IPIP>(ctx, f, hash, node, inner) {
        return Fast::Slow;
    }
    count_forwarded(meta.index, node_idx, slot, f.len() as u64);
    Fast::Tx
}

/// Step 10 (`IPIP`: the VIP's mode, known to the caller). False (the packet unchanged) when the
/// general path must handle it: a PMTU reply, an ipip node without an address, or `dsr`'s
/// verifier re-check of the Ethernet header.
#[inline(always)]
fn send<const IPIP: bool>(
    ctx: &XdpContext,
    f: Frame,
    hash: u32,
    node: &NodeEntry,
    inner: Inner,
) -> bool {
    if IPIP {
        matches!(encap_inline(ctx, inner, hash, node), Ok(Sent::Forwarded))
    } else {
        dsr(f, node).is_ok()
    }
}
