//! `lb_balancer`: the XDP L4 load balancer. Packet semantics are docs/dataplane.md, step by
//! step; this file wires the maps and packet memory to the logic in the `lb_ebpf` library.
//!
//! Cost model (the product's selling point): non-VIP traffic stops at one array lookup
//! (`VIP_FILTER`); established TCP on a route that has not moved does only array lookups
//! (`VIP_CACHE`, `VIP_GEN`, `ROUTES`, `NODES` and the counters); `VIPS` (hash) is read only when
//! the VIP is not in its cache slot; `CONNTRACK` and `CONFIG` are touched only on the paths
//! that need them. The commonest case (IPv4 without options, established TCP, dsr-l2) has a
//! fast path of its own (`fast_v4`) that keeps everything in registers and falls back to the
//! general path for anything else; cold paths (conntrack, encap, PMTU, malformed) are
//! subprograms.
//!
//! Event log: drops, PMTU replies and conntrack evictions each write one aya-log record (target
//! `LOG_TARGET`, level debug) when `CONFIG_F_LOG_EVENTS` is set. The switch is read only on
//! those rare branches, so forwarding does no extra work whether it is on or off.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
        xdp_md,
    },
    helpers::generated::{
        bpf_check_mtu, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_xdp_adjust_head,
        bpf_xdp_adjust_tail,
    },
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::XdpContext,
};
use lb_common::{
    CONFIG_F_LOG_EVENTS, CT_F_KEEP, CT_TIME_SHIFT, CtEntry, DEFAULT_CONNTRACK_SIZE,
    DEFAULT_ROUTE_SLOTS, DROP_REASON_COUNT, DropReason, FAMILY_V4, FAMILY_V6, GlobalConfig,
    MAX_NODES, MAX_VIPS, NODE_DOWN, NodeEntry, PMTU_BURST, PMTU_PER_SEC, PROTO_ANY, PROTO_ICMP,
    PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, ROUTE_F_MOVED, ROUTES_MAP_FLAGS, RouteEntry, STAT_COUNT,
    Stat, TrafficCounter, VIP_CACHE_SIZE, VIP_F_FRAG_ONLY, VIP_F_HASH_SRC, VIP_FILTER_WORDS,
    VIP_MODE_IPIP, VipCacheEntry, VipKey, VipMeta, addr_hash_v4, addr_hash_v6,
    ct::{
        CT_MAP_FLAGS, CT_WAYS, CtKey, CtSet, CtSlot, ct_find_in, ct_get_in, ct_insert_way_in,
        ct_key_words, ct_set_index, ct_store, ct_tag,
    },
    flow_hash_v4, flow_hash_v6,
    hash::filter_slot,
    route_index, vip_cache_slot,
};
use lb_ebpf::{
    decide::{self, CtAction, FlowKind},
    encap, evlog,
    parse::{
        self, ETH_P_IPV4, ETH_P_IPV6, ETH_VLAN_HLEN, ICMP_HLEN, IPV4_HLEN, IPV6_HLEN, PROTO_IPIP,
        PROTO_IPV6_IN, TCP_HLEN, UDP_HLEN, ipv4, ipv6, tcp,
    },
    pkt::{Frame, Mac, be16, be32, bytes16, ld, le32, port, put, st32, words16},
};

// ---------------------------------------------------------------------------------------------
// Maps (names are the contract with the loader, which pins them itself when the daemon runs).
// ---------------------------------------------------------------------------------------------

/// Every VIP by (address, port, protocol), plus per-address fragment entries and markers.
#[map]
static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS * 4, 0);
/// Direct-mapped cache of `VIPS` (real VIPs only), read before the hash map.
#[map]
static VIP_CACHE: Array<VipCacheEntry> = Array::with_max_entries(VIP_CACHE_SIZE, 0);
/// Live route-table generation (0 or 1) by VIP index: the atomic table switch.
#[map]
static VIP_GEN: Array<u32> = Array::with_max_entries(MAX_VIPS, 0);
/// Bitmap of VIP destination addresses: a clear bit passes a packet without a hash lookup.
#[map]
static VIP_FILTER: Array<u64> = Array::with_max_entries(VIP_FILTER_WORDS, 0);
/// Route tables, two generations per VIP: slot -> owning node and `ROUTE_F_*` flags.
#[map]
static ROUTES: Array<RouteEntry> = Array::with_max_entries(DEFAULT_ROUTE_SLOTS, ROUTES_MAP_FLAGS);
/// Node index -> MAC, ipip addresses and state.
#[map]
static NODES: Array<NodeEntry> = Array::with_max_entries(MAX_NODES, 0);
/// Client flow -> node in 16-way sets (`lb_common::ct`), so tracked flows keep their node when
/// routes move. Mmapable: userspace scans and edits it without a syscall per set.
#[map]
static CONNTRACK: Array<CtSet> =
    Array::with_max_entries(DEFAULT_CONNTRACK_SIZE / CT_WAYS as u32, CT_MAP_FLAGS);
/// The one global setting record: ipip gateway MAC, MTU, outer source addresses.
#[map]
static CONFIG: Array<GlobalConfig> = Array::with_max_entries(1, 0);
/// Verdict and event counts by `Stat`.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);
/// Drop counts by `DropReason`.
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_REASON_COUNT, 0);
/// Forwarded packets and bytes by VIP index.
#[map]
static VIP_STATS: PerCpuArray<TrafficCounter> = PerCpuArray::with_max_entries(MAX_VIPS, 0);
/// Forwarded packets and bytes by node index.
#[map]
static NODE_STATS: PerCpuArray<TrafficCounter> = PerCpuArray::with_max_entries(MAX_NODES, 0);
/// Forwarded packets by `ROUTES` slot.
#[map]
static ROUTE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DEFAULT_ROUTE_SLOTS, 0);
/// Event records (aya-log's wire format) for userspace: `aya_log::EbpfLogger` finds the ring
/// buffer by this name. 128 KiB, as aya-log-ebpf sizes it: ~550 records.
#[map]
static AYA_LOGS: RingBuf = RingBuf::with_byte_size(1 << 17, 0);
/// Where the event log assembles a record, per CPU (off the stack).
#[map]
static EVENT: PerCpuArray<evlog::Slot> = PerCpuArray::with_max_entries(1, 0);
/// Per-CPU PMTU reply budget (a token bucket counted in nanoseconds): [credit, last refill].
#[map]
static PMTU_BUDGET: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

// ---------------------------------------------------------------------------------------------
// Entry.
// ---------------------------------------------------------------------------------------------

/// What happened to a packet that was not dropped.
enum Verdict {
    /// Not for us (or not handled): `XDP_PASS`, counted as `Stat::Pass`.
    Pass,
    /// Sent back out with `XDP_TX`; counters already updated.
    Tx,
}

#[xdp]
pub fn lb_balancer(ctx: XdpContext) -> u32 {
    match try_balance(&ctx) {
        Ok(Verdict::Pass) => {
            count(Stat::Pass);
            XDP_PASS
        }
        Ok(Verdict::Tx) => XDP_TX,
        Err(reason) => {
            count(Stat::Drop);
            if let Some(c) = DROPS.get_ptr_mut(reason as u32) {
                // SAFETY: per-CPU slot, only this CPU writes it.
                unsafe { *c += 1 };
            }
            // The context read back from its stack slot: LLVM would otherwise keep it in
            // registers through the whole program for this one call, which costs the
            // forwarding paths spills and reloads.
            // SAFETY: a plain read of the context's own field.
            log_drop(unsafe { core::ptr::read_volatile(&ctx.ctx) }, reason);
            XDP_DROP
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Counters.
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn count(stat: Stat) {
    count_index(stat as u32);
}

/// `count` by `Stat` index.
#[inline(always)]
fn count_index(stat: u32) {
    if let Some(c) = STATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn count_traffic(map: &PerCpuArray<TrafficCounter>, index: u32, bytes: u64) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// Counts the `Stat` events of a `decide::Choice` (bit `1 << stat`).
#[inline(always)]
fn count_events(bits: u32) {
    if bits == 0 {
        return;
    }
    for s in [
        Stat::CtInsert,
        Stat::CtHit,
        Stat::CtMiss,
        Stat::CtReroute,
        Stat::DrainKeep,
    ] {
        if bits & (1 << s as u32) != 0 {
            count(s);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing (steps 1-7 and 11).
// ---------------------------------------------------------------------------------------------

/// The packet's own IP header, as forwarding needs it.
#[derive(Clone, Copy)]
struct Ip {
    /// Offset of the IP header: 14, or 18 behind a VLAN tag.
    l3: usize,
    v6: bool,
    /// IPv4 header length (IHL*4).
    ihl_len: usize,
    /// IPv4 total length, or IPv6 payload length.
    len: u16,
    /// IPv4: `[tos, 0]`; IPv6: the header's first two bytes (they hold the traffic class).
    tc: [u8; 2],
    /// IPv4 DF bit.
    df: bool,
    /// Addresses as little-endian words of the wire bytes (IPv4 in word 0).
    src: [u32; 4],
    dst: [u32; 4],
    /// `addr_hash_v4/v6(dst)` (for `VIP_FILTER` and `VIP_CACHE`).
    dst_hash: u32,
}

impl Ip {
    #[inline(always)]
    fn family(&self) -> u8 {
        if self.v6 { FAMILY_V6 } else { FAMILY_V4 }
    }
}

/// The client-to-VIP flow a packet belongs to.
struct Flow {
    client: [u32; 4],
    vip: [u32; 4],
    /// `ports_word(client port, VIP port)`; 0 for fragments.
    ports: u32,
    proto: u8,
    kind: FlowKind,
    /// An ICMP error about the flow (never answered with another ICMP error).
    icmp: bool,
}

#[inline(always)]
fn try_balance(ctx: &XdpContext) -> Result<Verdict, DropReason> {
    let f = Frame::of(ctx);
    // Frames too short for Ethernet (or the tag) carry nothing that marks them as VIP traffic.
    let Some((ethertype, l3)) = f.l3() else {
        return Ok(Verdict::Pass);
    };
    match ethertype {
        ETH_P_IPV4 => match fast_v4(f, l3) {
            Fast::Tx => Ok(Verdict::Tx),
            Fast::Pass => Ok(Verdict::Pass),
            Fast::Slow => ipv4(ctx, f, l3),
        },
        ETH_P_IPV6 => ipv6(ctx, f, l3),
        _ => Ok(Verdict::Pass),
    }
}

/// What the IPv4 fast path made of a packet.
enum Fast {
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
fn fast_v4(f: Frame, l3: usize) -> Fast {
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
    let dport = port(t + 2);
    // verifier: the slot is < VIP_CACHE_SIZE, but the lookup can return null.
    let Some(e) = VIP_CACHE.get(vip_cache_slot(dst_hash, dport, PROTO_TCP)) else {
        return Fast::Slow;
    };
    let k = e as *const VipCacheEntry as usize;
    let tail = (dport as u32) | ((PROTO_TCP as u32) << 16) | ((FAMILY_V4 as u32) << 24);
    if ld::<u32>(k + 16) != tail
        || ld::<u32>(k) != dst
        || ld::<u32>(k + 4) | ld::<u32>(k + 8) | ld::<u32>(k + 12) != 0
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
        le32(t)
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

#[inline(always)]
fn in_filter(addr_hash: u32) -> bool {
    let (word, bit) = filter_slot(addr_hash);
    VIP_FILTER.get(word).is_some_and(|w| w & bit != 0)
}

#[inline(always)]
fn vip_get(key: &VipKey) -> Option<VipMeta> {
    // SAFETY: the value is copied out at once; the loader replaces values whole.
    unsafe { VIPS.get(key) }.copied()
}

/// A malformed packet: dropped for `reason` if its destination is a VIP address (the address
/// marker exists), otherwise passed untouched.
#[inline(never)]
fn malformed(dst: &[u32; 4], family: u8, reason: DropReason) -> Result<Verdict, DropReason> {
    let marker = VipKey {
        addr: bytes16(dst),
        port: 0,
        proto: PROTO_ANY,
        family,
    };
    if vip_get(&marker).is_some() {
        Err(reason)
    } else {
        Ok(Verdict::Pass)
    }
}

/// Step 7: `(addr, port, proto)`, else the all-ports VIP `(addr, 0, proto)` (fragment-only
/// entries do not count).
#[inline(always)]
fn lookup_vip(addr: &[u32; 4], family: u8, port: u16, proto: u8) -> Option<VipMeta> {
    let mut key = VipKey {
        addr: bytes16(addr),
        port,
        proto,
        family,
    };
    if let Some(m) = vip_get(&key)
        && m.flags & VIP_F_FRAG_ONLY == 0
    {
        return Some(m);
    }
    if port == 0 {
        return None;
    }
    key.port = 0;
    vip_get(&key).filter(|m| m.flags & VIP_F_FRAG_ONLY == 0)
}

/// Step 7 for a packet's own destination: the `VIP_CACHE` slot first (array lookup and key
/// compare), then `VIPS`.
#[inline(always)]
fn packet_vip(ip: &Ip, port: u16, proto: u8) -> Option<VipMeta> {
    let family = ip.family();
    // verifier: the slot is < VIP_CACHE_SIZE, but the lookup can return null.
    if let Some(e) = VIP_CACHE.get(vip_cache_slot(ip.dst_hash, port, proto)) {
        let k = e as *const VipCacheEntry as usize;
        // The key as five words: the address, then port | proto << 16 | family << 24.
        let tail = (port as u32) | ((proto as u32) << 16) | ((family as u32) << 24);
        if ld::<u32>(k + 16) == tail
            && ld::<u32>(k) == ip.dst[0]
            && ld::<u32>(k + 4) == ip.dst[1]
            && ld::<u32>(k + 8) == ip.dst[2]
            && ld::<u32>(k + 12) == ip.dst[3]
        {
            return Some(e.meta);
        }
    }
    lookup_vip_slow(&ip.dst, family, port, proto)
}

/// `lookup_vip` as its own subprogram (the key lives on its stack, off the hot path).
#[inline(never)]
fn lookup_vip_slow(addr: &[u32; 4], family: u8, port: u16, proto: u8) -> Option<VipMeta> {
    lookup_vip(addr, family, port, proto)
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, f: Frame, l3: usize) -> Result<Verdict, DropReason> {
    let Some(h) = f.at::<IPV4_HLEN>(l3) else {
        return Ok(Verdict::Pass);
    };
    let dst = le32(h + ipv4::DST);
    let dst_hash = addr_hash_v4(dst);
    if !in_filter(dst_hash) {
        return Ok(Verdict::Pass);
    }
    let dst = [dst, 0, 0, 0];
    let avail = f.len() - l3;
    let ihl_len = match parse::ipv4_header_len(ld(h + ipv4::VER_IHL), avail) {
        Ok(n) => n,
        Err(r) => return malformed(&dst, FAMILY_V4, r),
    };
    let tot = be16(h + ipv4::TOT_LEN);
    let l4_len = match parse::ipv4_l4_len(tot, ihl_len, avail) {
        Ok(n) => n,
        Err(r) => return malformed(&dst, FAMILY_V4, r),
    };
    let proto: u8 = ld(h + ipv4::PROTO);
    let frag = be16(h + ipv4::FRAG_OFF);
    let ip = Ip {
        l3,
        v6: false,
        ihl_len,
        len: tot,
        tc: [ld(h + ipv4::TOS), 0],
        df: frag & ipv4::DF != 0,
        src: [le32(h + ipv4::SRC), 0, 0, 0],
        dst,
        dst_hash,
    };
    let l4 = l3 + ihl_len;
    match proto {
        PROTO_TCP | PROTO_UDP if parse::is_fragment(frag) => fragment(ctx, &ip, proto),
        // Non-first fragments carry no ICMP header; ICMP errors are never fragmented in practice.
        _ if parse::is_fragment(frag) => Ok(Verdict::Pass),
        PROTO_TCP => tcp_packet(ctx, f, &ip, l4, l4_len),
        PROTO_UDP => udp_packet(ctx, f, &ip, l4, l4_len),
        PROTO_ICMP => icmp4(ctx, &ip, l4, l4_len),
        _ => Ok(Verdict::Pass),
    }
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, f: Frame, l3: usize) -> Result<Verdict, DropReason> {
    let Some(h) = f.at::<IPV6_HLEN>(l3) else {
        return Ok(Verdict::Pass);
    };
    let dst = words16(h + ipv6::DST);
    let dst_hash = addr_hash_v6(&dst);
    if !in_filter(dst_hash) {
        return Ok(Verdict::Pass);
    }
    let plen = be16(h + ipv6::PAYLOAD_LEN);
    let l4_len = match parse::ipv6_l4_len(plen, f.len() - l3) {
        Ok(n) => n,
        Err(r) => return malformed(&dst, FAMILY_V6, r),
    };
    let ip = Ip {
        l3,
        v6: true,
        ihl_len: IPV6_HLEN,
        len: plen,
        tc: [ld(h), ld(h + 1)],
        df: false,
        src: words16(h + ipv6::SRC),
        dst,
        dst_hash,
    };
    let l4 = l3 + IPV6_HLEN;
    match ld::<u8>(h + ipv6::NEXT_HDR) {
        PROTO_TCP => tcp_packet(ctx, f, &ip, l4, l4_len),
        PROTO_UDP => udp_packet(ctx, f, &ip, l4, l4_len),
        PROTO_ICMPV6 => icmp6(ctx, &ip, l4, l4_len),
        // Extension headers included.
        _ => Ok(Verdict::Pass),
    }
}

/// Step 5: fragments go by addresses and protocol to the `(dst, 0, proto)` table.
#[inline(always)]
fn fragment(ctx: &XdpContext, ip: &Ip, proto: u8) -> Result<Verdict, DropReason> {
    let key = VipKey {
        addr: bytes16(&ip.dst),
        port: 0,
        proto,
        family: FAMILY_V4,
    };
    let Some(meta) = vip_get(&key) else {
        return Ok(Verdict::Pass);
    };
    let flow = Flow {
        client: ip.src,
        vip: ip.dst,
        ports: 0,
        proto,
        kind: FlowKind::Fragment,
        icmp: false,
    };
    balance(ctx, ip, &flow, &meta, Some(Stat::Fragment))
}

#[inline(always)]
fn tcp_packet(
    ctx: &XdpContext,
    f: Frame,
    ip: &Ip,
    l4: usize,
    l4_len: usize,
) -> Result<Verdict, DropReason> {
    let Some(t) = f.at::<TCP_HLEN>(l4) else {
        return malformed(&ip.dst, ip.family(), DropReason::BadTcpHeader);
    };
    if let Err(r) = parse::tcp_header(l4_len, ld(t + tcp::DOFF)) {
        return malformed(&ip.dst, ip.family(), r);
    }
    let Some(meta) = packet_vip(ip, port(t + 2), PROTO_TCP) else {
        return Ok(Verdict::Pass);
    };
    let flow = Flow {
        client: ip.src,
        vip: ip.dst,
        ports: le32(t),
        proto: PROTO_TCP,
        kind: FlowKind::tcp(ld(t + tcp::FLAGS)),
        icmp: false,
    };
    let plain = FlowKind::Tracked {
        seen: 0,
        always: false,
    };
    if flow.kind == plain && meta.mode() != VIP_MODE_IPIP {
        return established(ctx, ip, &flow, &meta);
    }
    balance(ctx, ip, &flow, &meta, None)
}

#[inline(always)]
fn udp_packet(
    ctx: &XdpContext,
    f: Frame,
    ip: &Ip,
    l4: usize,
    l4_len: usize,
) -> Result<Verdict, DropReason> {
    let Some(u) = f.at::<UDP_HLEN>(l4) else {
        return malformed(&ip.dst, ip.family(), DropReason::BadUdpHeader);
    };
    if let Err(r) = parse::udp_header(l4_len, be16(u + 4)) {
        return malformed(&ip.dst, ip.family(), r);
    }
    let Some(meta) = packet_vip(ip, port(u + 2), PROTO_UDP) else {
        return Ok(Verdict::Pass);
    };
    let flow = Flow {
        client: ip.src,
        vip: ip.dst,
        ports: le32(u),
        proto: PROTO_UDP,
        kind: FlowKind::Udp,
        icmp: false,
    };
    balance(ctx, ip, &flow, &meta, None)
}

/// The ICMP/ICMPv6 type at `l4`, if the message holds type, code and checksum (anything
/// shorter is not an ICMP message we could act on).
#[inline(always)]
fn icmp_type_at(f: &Frame, l4: usize, l4_len: usize) -> Option<u8> {
    if l4_len < 4 {
        return None;
    }
    f.at::<4>(l4).map(ld)
}

/// Step 11 for IPv4: an ICMP error quoting a packet the node sent from the VIP.
#[inline(always)]
fn icmp4(ctx: &XdpContext, ip: &Ip, l4: usize, l4_len: usize) -> Result<Verdict, DropReason> {
    let f = Frame::of(ctx);
    match icmp_type_at(&f, l4, l4_len) {
        Some(t) if parse::is_icmp4_error(t) => {}
        _ => return Ok(Verdict::Pass),
    }
    let emb = l4 + ICMP_HLEN;
    let Some(e) = f.at::<IPV4_HLEN>(emb) else {
        return malformed(&ip.dst, FAMILY_V4, DropReason::BadIcmp);
    };
    let emb_ihl = match parse::icmp4_embedded(l4_len, ld(e + ipv4::VER_IHL)) {
        Ok(n) => n,
        Err(r) => return malformed(&ip.dst, FAMILY_V4, r),
    };
    let Some(p) = f.at::<4>(emb + emb_ihl) else {
        return malformed(&ip.dst, FAMILY_V4, DropReason::BadIcmp);
    };
    let proto: u8 = ld(e + ipv4::PROTO);
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(Verdict::Pass);
    }
    let vip = [le32(e + ipv4::SRC), 0, 0, 0];
    icmp_flow(ctx, ip, vip, [le32(e + ipv4::DST), 0, 0, 0], p, proto)
}

/// Step 11 for IPv6.
#[inline(always)]
fn icmp6(ctx: &XdpContext, ip: &Ip, l4: usize, l4_len: usize) -> Result<Verdict, DropReason> {
    let f = Frame::of(ctx);
    match icmp_type_at(&f, l4, l4_len) {
        Some(t) if parse::is_icmp6_error(t) => {}
        _ => return Ok(Verdict::Pass),
    }
    if let Err(r) = parse::icmp6_embedded(l4_len) {
        return malformed(&ip.dst, FAMILY_V6, r);
    }
    let emb = l4 + ICMP_HLEN;
    let Some(e) = f.at::<{ IPV6_HLEN + 4 }>(emb) else {
        return malformed(&ip.dst, FAMILY_V6, DropReason::BadIcmp);
    };
    let proto: u8 = ld(e + ipv6::NEXT_HDR);
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(Verdict::Pass);
    }
    icmp_flow(
        ctx,
        ip,
        words16(e + ipv6::SRC),
        words16(e + ipv6::DST),
        e + IPV6_HLEN,
        proto,
    )
}

/// The flow an ICMP error is about: client = embedded destination, VIP = embedded source.
#[inline(always)]
fn icmp_flow(
    ctx: &XdpContext,
    ip: &Ip,
    vip: [u32; 4],
    client: [u32; 4],
    ports: usize,
    proto: u8,
) -> Result<Verdict, DropReason> {
    let Some(meta) = lookup_vip(&vip, ip.family(), port(ports), proto) else {
        return Ok(Verdict::Pass);
    };
    let flow = Flow {
        client,
        vip,
        ports: parse::reverse_ports_word(le32(ports)),
        proto,
        // Always looked up, never inserted: an ICMP error is no evidence of a flow.
        kind: FlowKind::Tracked {
            seen: 0,
            always: true,
        },
        icmp: true,
    };
    balance(ctx, ip, &flow, &meta, Some(Stat::IcmpForward))
}

// ---------------------------------------------------------------------------------------------
// Route, node choice and conntrack (steps 8-9).
// ---------------------------------------------------------------------------------------------

/// Steps 8-10 for every kind of packet: two subprograms called one after the other, so the
/// deepest call chains (conntrack under `pick`, PMTU replies under `forward`) each fit the
/// 512-byte stack next to the entry's frame.
#[inline(always)]
fn balance(
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
const PICK_NODE_SHIFT: u64 = 32;
const PICK_EVENT_SHIFT: u64 = 48;

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

/// Step 10 for the node `pick` chose: rewrite or encapsulate (or answer with a PMTU error),
/// then count.
#[inline(never)]
fn forward(
    ctx: &XdpContext,
    ip: &Ip,
    flow: &Flow,
    meta: &VipMeta,
    picked: u64,
) -> Result<Verdict, DropReason> {
    let slot = picked as u32;
    let node_idx = (picked >> PICK_NODE_SHIFT) as u32 & 0xffff;
    // `pick` checked the node is live, so its entry exists.
    let node = NODES.get(node_idx).ok_or(DropReason::NoBackend)?;
    let f = Frame::of(ctx);
    let bytes = f.len() as u64;
    let mut sent = if meta.mode() == VIP_MODE_IPIP {
        encap(ctx, ip, route_hash(ip, flow, meta), node, flow.icmp)?
    } else {
        dsr(f, node)?
    };
    if let Sent::NeedPmtu(mtu) = sent {
        if !pmtu_budget() {
            return Err(DropReason::PmtuLimited);
        }
        sent = if ip.v6 {
            pmtu6(ctx, ip, mtu)?
        } else {
            pmtu4(ctx, ip, mtu)?
        };
        log_pmtu(flow, ip.v6, meta.index, node_idx);
    }
    if let Sent::PmtuReply = sent {
        count(Stat::Tx);
        count(Stat::PmtuReply);
        return Ok(Verdict::Tx);
    }
    match (picked >> PICK_EVENT_SHIFT) as u32 & 0xff {
        0 => {}
        e => count_index(e - 1),
    }
    count_forwarded(meta.index, node_idx, slot, bytes);
    Ok(Verdict::Tx)
}

/// The route hash of the flow: 5-tuple, or source address only for affinity VIPs.
#[inline(always)]
fn route_hash(ip: &Ip, flow: &Flow, meta: &VipMeta) -> u32 {
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
fn route_of(
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

/// Step 10's counters for a packet sent on to a node (`bytes` = frame length as received).
#[inline(always)]
fn count_forwarded(vip: u32, node: u32, slot: u32, bytes: u64) {
    count(Stat::Tx);
    count_traffic(&VIP_STATS, vip, bytes);
    count_traffic(&NODE_STATS, node, bytes);
    if let Some(c) = ROUTE_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *c += 1 };
    }
}

/// The hot path, inline: established TCP (no SYN, FIN or RST) to a dsr-l2 VIP. Exactly what
/// `balance` does for such a packet, without its subprogram call; a moved route (conntrack
/// needed) goes to `balance`.
#[inline(always)]
fn established(
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
        let now = (unsafe { bpf_ktime_get_coarse_ns() } >> CT_TIME_SHIFT) as u32;
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

// `CONNTRACK` set operations: global subprograms, so the verifier checks each once rather than
// once per path that reaches it (there are hundreds), and a way index never leaves them. `ways`
// is always `CT_WAYS`; as an argument it keeps the scans rolled (see `lb_common::ct`). `set` is
// a `CONNTRACK` value, `key` the flow's words, `tag` its tag. They return 1 or 0 (globals return
// scalars). Safety, for all three: each pointer is null (then they do nothing) or valid for its
// type; the verifier enforces this on every call.

/// Copies the flow's entry to `out`; 0 if the flow is not tracked. A way another CPU is
/// rewriting fails the check word (a miss), never gives a torn entry.
///
/// # Safety
/// Each pointer is null or valid for its type (see above).
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn lb_ct_get(
    set: *mut CtSet,
    key: *const CtKey,
    tag: u32,
    ways: usize,
    out: *mut CtEntry,
) -> u32 {
    // verifier: a global's pointer arguments may be null.
    if set.is_null() || key.is_null() || out.is_null() {
        return 0;
    }
    // SAFETY: non-null pointers to a live set, a key and an entry (the verifier checks sizes).
    unsafe { ct_get_in(set, &*key, tag, ways.min(CT_WAYS), out) as u32 }
}

/// `lb_ct_put` results: stored in the flow's own or a free way; stored over a victim; over a
/// victim noted for the event log; not stored (the set holds only `CT_F_KEEP` flows).
const CT_PUT_STORED: u32 = 1;
const CT_PUT_EVICTED: u32 = 2;
const CT_PUT_EVICTED_LOGGED: u32 = 3;
const CT_PUT_FULL: u32 = 4;

/// Records `e` for the flow (`ct_store`): in its own way, else a free one, else the set's
/// victim (`ct_insert_way_in`); returns a `CT_PUT_*`.
///
/// # Safety
/// Each pointer is null or valid for its type (see above).
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn lb_ct_put(
    set: *mut CtSet,
    key: *const CtKey,
    tag: u32,
    ways: usize,
    e: *const CtEntry,
) -> u32 {
    // verifier: a global's pointer arguments may be null.
    if set.is_null() || key.is_null() || e.is_null() {
        return 0;
    }
    // SAFETY: as in `lb_ct_get`.
    unsafe {
        let keep = (*e).flags & CT_F_KEEP != 0;
        let Some((i, evicts)) =
            ct_insert_way_in(&*set, &*key, tag, (*e).last_seen, keep, ways.min(CT_WAYS))
        else {
            return CT_PUT_FULL;
        };
        let mut r = CT_PUT_STORED;
        if evicts {
            // The victim's record is written by the caller (see `note_evict`).
            r = if (*set).slots.get(i).is_some_and(note_evict) {
                CT_PUT_EVICTED_LOGGED
            } else {
                CT_PUT_EVICTED
            };
        }
        ct_store(set, i, &*key, tag, &*e);
        r
    }
}

/// Stores `e.last_seen` and `e.flags` in the flow's way, if it is still there: fields the
/// check word does not cover, so no reader sees them torn against the node.
///
/// # Safety
/// Each pointer is null or valid for its type (see above).
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn lb_ct_touch(
    set: *mut CtSet,
    key: *const CtKey,
    tag: u32,
    ways: usize,
    e: *const CtEntry,
) -> u32 {
    // verifier: a global's pointer arguments may be null.
    if set.is_null() || key.is_null() || e.is_null() {
        return 0;
    }
    // SAFETY: as in `lb_ct_get`.
    unsafe {
        let Some(i) = ct_find_in(&*set, &*key, tag, ways.min(CT_WAYS)) else {
            return 0;
        };
        let p = &raw mut (*set).slots[i].entry;
        (&raw mut (*p).last_seen).write_volatile((*e).last_seen);
        (&raw mut (*p).flags).write_volatile((*e).flags);
    }
    1
}

// ---------------------------------------------------------------------------------------------
// Forwarding (step 10) and PMTU replies.
// ---------------------------------------------------------------------------------------------

enum Sent {
    /// Sent on to the node.
    Forwarded,
    /// Too big for the path to the node: answer with frag-needed / packet-too-big (MTU given).
    NeedPmtu(u16),
    /// Answered with ICMP frag-needed / packet-too-big.
    PmtuReply,
}

/// dsr-l2: Ethernet destination = node, source = the frame's old destination.
#[inline(always)]
fn dsr(f: Frame, node: &NodeEntry) -> Result<Sent, DropReason> {
    // verifier: re-derive the Ethernet pointer (it was checked at parse time).
    let Some(eth) = f.at::<12>(0) else {
        return Err(DropReason::HelperFailed);
    };
    // As 16+32-bit words: the old destination (bytes 0..6) becomes the source (6..12).
    let (d0, d1) = (ld::<u16>(eth), ld::<u32>(eth + 2));
    let mac = node.mac.as_ptr() as usize;
    // SAFETY: 12 bytes bounds-checked above.
    unsafe {
        ((eth + 6) as *mut u16).write(d0);
        ((eth + 8) as *mut u32).write(d1);
        (eth as *mut u16).write(ld::<u16>(mac));
        ((eth + 2) as *mut u32).write(ld::<u32>(mac + 2));
    }
    Ok(Sent::Forwarded)
}

/// The Ethernet fields a rewrite keeps: old destination, old source, the VLAN tag.
struct EthSave {
    dst: Mac,
    src: Mac,
    tag: u32,
}

#[inline(always)]
fn save_eth(f: Frame) -> Result<EthSave, DropReason> {
    // verifier: re-derive the Ethernet pointer (it was checked at parse time).
    let Some(e) = f.at::<ETH_VLAN_HLEN>(0) else {
        return Err(DropReason::HelperFailed);
    };
    Ok(EthSave {
        dst: Mac::load(e),
        src: Mac::load(e + 6),
        tag: ld(e + 12),
    })
}

/// Moves the frame start `by` bytes earlier (room for new headers).
#[inline(always)]
fn grow_head(ctx: &XdpContext, by: i32) -> Result<Frame, DropReason> {
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -by) } != 0 {
        return Err(DropReason::HelperFailed);
    }
    Ok(Frame::of(ctx))
}

/// Writes an Ethernet header (with the VLAN tag when `l3` says there is one).
#[inline(always)]
fn write_eth(
    f: Frame,
    l3: usize,
    dst: Mac,
    src: Mac,
    tag: u32,
    ethertype: u16,
) -> Result<(), DropReason> {
    // verifier: fresh bound after the head moved.
    let Some(e) = f.at::<ETH_VLAN_HLEN>(0) else {
        return Err(DropReason::HelperFailed);
    };
    // SAFETY: 18 bytes bounds-checked above.
    unsafe {
        dst.store(e);
        src.store(e + 6);
        if l3 == ETH_VLAN_HLEN {
            st32(e + 12, tag);
            ((e + 16) as *mut u16).write(ethertype.to_be());
        } else {
            ((e + 12) as *mut u16).write(ethertype.to_be());
        }
    }
    Ok(())
}

#[inline(always)]
fn config() -> Result<&'static GlobalConfig, DropReason> {
    // verifier: index 0 of a 1-entry array always exists, but the lookup can return null.
    CONFIG.get(0).ok_or(DropReason::HelperFailed)
}

/// ipip: checks the MTU, then prepends the outer header to the node (step 10). Its own
/// subprogram: its locals stay off `balance`'s stack.
#[inline(never)]
fn encap(
    ctx: &XdpContext,
    ip: &Ip,
    hash: u32,
    node: &NodeEntry,
    icmp: bool,
) -> Result<Sent, DropReason> {
    if (ip.v6 && node.addr6 == [0; 16]) || (!ip.v6 && node.addr4 == [0; 4]) {
        return Err(DropReason::NoBackend);
    }
    let cfg = config()?;
    let grow = if ip.v6 { IPV6_HLEN } else { IPV4_HLEN };
    // IPv4: outer total length; IPv6: outer payload length.
    let outer_len = ip.len as u32 + grow as u32;
    // The L3 size on the path: IPv4 total, or IPv6 header plus payload.
    let l3_size = if ip.v6 {
        outer_len + IPV6_HLEN as u32
    } else {
        outer_len
    };
    if (cfg.mtu != 0 && l3_size > cfg.mtu as u32) || outer_len > u16::MAX as u32 {
        if outer_len > u16::MAX as u32 || !aggregated(ctx, l3_size - grow as u32) {
            // No ICMP error about an ICMP error; IPv4 without DF has no frag-needed either.
            if cfg.mtu != 0 && !icmp && (ip.v6 || ip.df) {
                return Ok(Sent::NeedPmtu(cfg.mtu));
            }
            return Err(DropReason::TooBig);
        }
        // An aggregate of segments the sender sized (docs/dataplane.md "Generic XDP and
        // aggregated frames"): encapsulated whole, the kernel sends it on as one GSO packet.
        count(Stat::EncapAggregate);
    }
    let eth = save_eth(Frame::of(ctx))?;
    let f = grow_head(ctx, grow as i32)?;
    let l3 = ip.l3;
    let gw = Mac::load(cfg.gw_mac.as_ptr() as usize);
    if ip.v6 {
        write_eth(f, l3, gw, eth.dst, eth.tag, ETH_P_IPV6)?;
        // verifier: fresh bound after the head moved.
        let Some(p) = f.at::<IPV6_HLEN>(l3) else {
            return Err(DropReason::HelperFailed);
        };
        let first = encap::ipv6_first8(ip.tc, hash & 0xf_ffff, outer_len as u16, PROTO_IPV6_IN);
        let src = cfg.ipip_src6.as_ptr() as usize;
        let dst = node.addr6.as_ptr() as usize;
        // SAFETY: 40 bytes bounds-checked above; map values stay valid across adjust_head.
        unsafe {
            put(p, &first);
            st32(p + 8, ld(src));
            st32(p + 12, ld(src + 4));
            st32(p + 16, ld(src + 8));
            st32(p + 20, hash.to_be());
            st32(p + 24, ld(dst));
            st32(p + 28, ld(dst + 4));
            st32(p + 32, ld(dst + 8));
            st32(p + 36, ld(dst + 12));
        }
    } else {
        write_eth(f, l3, gw, eth.dst, eth.tag, ETH_P_IPV4)?;
        // verifier: fresh bound after the head moved.
        let Some(p) = f.at::<IPV4_HLEN>(l3) else {
            return Err(DropReason::HelperFailed);
        };
        let hdr = encap::ipv4_header(
            ip.tc[0],
            outer_len as u16,
            PROTO_IPIP,
            encap::outer_src4(cfg, hash),
            node.addr4,
        );
        // SAFETY: 20 bytes bounds-checked above.
        unsafe { put(p, &hdr) };
    }
    count(Stat::Encap);
    Ok(Sent::Forwarded)
}

/// Whether an IP packet of `l3_len` bytes is longer than the receiving interface's MTU: then
/// it did not arrive as one frame but is an aggregate built by GRO or LRO (or a virtual
/// peer's TSO), which only generic XDP is shown. Asked only of packets over the ipip MTU.
#[inline(always)]
fn aggregated(ctx: &XdpContext, l3_len: u32) -> bool {
    // In: the L3 length (the helper adds the device's link header); out: the device MTU.
    let mut len = l3_len;
    // SAFETY: plain helper call on our own context (ifindex 0: the receiving device); `len`
    // is on our stack.
    let r = unsafe { bpf_check_mtu(ctx.ctx.cast(), 0, &mut len, 0, 0) };
    r == aya_ebpf::bindings::bpf_check_mtu_ret::BPF_MTU_CHK_RET_FRAG_NEEDED as i64
}

/// Takes one PMTU reply from this CPU's budget: `PMTU_PER_SEC` a second after a burst of
/// `PMTU_BURST` (the bucket starts full). False when it is spent.
#[inline(never)]
fn pmtu_budget() -> bool {
    const COST: u64 = 1_000_000_000 / PMTU_PER_SEC;
    let Some(b) = PMTU_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: per-CPU slot, only this CPU reads and writes it.
    let b = unsafe { &mut *b };
    let credit = b[0]
        .saturating_add(now.saturating_sub(b[1]))
        .min(COST * PMTU_BURST);
    b[1] = now;
    if credit < COST {
        b[0] = credit;
        return false;
    }
    b[0] = credit - COST;
    true
}

/// Cuts the frame to `len` bytes.
#[inline(always)]
fn cut_to(ctx: &XdpContext, f: Frame, len: usize) -> Result<(), DropReason> {
    let delta = len as i32 - f.len() as i32;
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return Err(DropReason::HelperFailed);
    }
    Ok(())
}

/// ICMP frag-needed back to the client, quoting the IPv4 header and 8 bytes. The original
/// header stays where it is: the new headers go in front of it, then the tail is cut.
#[inline(never)]
fn pmtu4(ctx: &XdpContext, ip: &Ip, mtu: u16) -> Result<Sent, DropReason> {
    const GROW: usize = IPV4_HLEN + ICMP_HLEN;
    const MAX_QUOTE: usize = 60 + 8;
    let eth = save_eth(Frame::of(ctx))?;
    let l3 = ip.l3;
    let quote_len = ip.ihl_len + 8;
    let f = grow_head(ctx, GROW as i32)?;
    // verifier: one constant bound covering every write and the quote read below (the packet
    // is over mtu - 20 >= 1260 bytes, so this always holds).
    if f.ptr_at::<[u8; ETH_VLAN_HLEN + GROW + MAX_QUOTE]>(0)
        .is_none()
    {
        return Err(DropReason::HelperFailed);
    }
    let quote = f.start + l3 + GROW;
    let mut sum = 0u64;
    let mut i = 0;
    while i < MAX_QUOTE / 4 {
        if i * 4 >= quote_len {
            break;
        }
        sum += be32(quote + i * 4) as u64;
        // One load per step: keeps LLVM from hoisting every load (and spilling them all).
        sum = core::hint::black_box(sum);
        i += 1;
    }
    let icmp = encap::icmp4_frag_needed(mtu.saturating_sub(IPV4_HLEN as u16), sum);
    let hdr = encap::ipv4_header(
        0,
        (GROW + quote_len) as u16,
        PROTO_ICMP,
        ip.dst[0].to_le_bytes(),
        ip.src[0].to_le_bytes(),
    );
    write_eth(f, l3, eth.src, eth.dst, eth.tag, ETH_P_IPV4)?;
    // SAFETY: within the constant bound checked above.
    unsafe {
        put(f.start + l3, &hdr);
        put(f.start + l3 + IPV4_HLEN, &icmp);
    }
    cut_to(ctx, f, l3 + GROW + quote_len)?;
    Ok(Sent::PmtuReply)
}

/// ICMPv6 packet-too-big back to the client, quoting the first 128 bytes of the packet.
#[inline(never)]
fn pmtu6(ctx: &XdpContext, ip: &Ip, mtu: u16) -> Result<Sent, DropReason> {
    const GROW: usize = IPV6_HLEN + ICMP_HLEN;
    let eth = save_eth(Frame::of(ctx))?;
    let l3 = ip.l3;
    let f = grow_head(ctx, GROW as i32)?;
    // verifier: one constant bound covering every write and the quote read below (the packet
    // is over mtu - 40 >= 1240 bytes, so this always holds).
    if f.ptr_at::<[u8; ETH_VLAN_HLEN + GROW + encap::PTB_QUOTE]>(0)
        .is_none()
    {
        return Err(DropReason::HelperFailed);
    }
    let quote = f.start + l3 + GROW;
    let mut sum = 0u64;
    let mut i = 0;
    while i < encap::PTB_QUOTE / 4 {
        sum += be32(quote + i * 4) as u64;
        // One load per step: keeps LLVM from hoisting every load (and spilling them all).
        sum = core::hint::black_box(sum);
        i += 1;
    }
    let len = (ICMP_HLEN + encap::PTB_QUOTE) as u32;
    // Reply from the VIP (the original destination) to the client.
    sum += lb_ebpf::csum::icmp6_pseudo(&ip.dst, &ip.src, len);
    let icmp = encap::icmp6_packet_too_big(mtu.saturating_sub(IPV6_HLEN as u16) as u32, sum);
    let first = encap::ipv6_first8([0x60, 0], 0, len as u16, PROTO_ICMPV6);
    write_eth(f, l3, eth.src, eth.dst, eth.tag, ETH_P_IPV6)?;
    let p = f.start + l3;
    // SAFETY: within the constant bound checked above.
    unsafe {
        put(p, &first);
        let mut i = 0;
        while i < 4 {
            st32(p + 8 + i * 4, ip.dst[i].to_le());
            st32(p + 24 + i * 4, ip.src[i].to_le());
            i += 1;
        }
        put(p + IPV6_HLEN, &icmp);
    }
    cut_to(ctx, f, l3 + GROW + encap::PTB_QUOTE)?;
    Ok(Sent::PmtuReply)
}

// ---------------------------------------------------------------------------------------------
// Event log: one aya-log record per drop, PMTU reply and conntrack eviction, only while
// `CONFIG_F_LOG_EVENTS` is set (`lb_ebpf::evlog` has the format and why not aya-log-ebpf's
// macros). Each site calls its `log_*` only on its rare branch; it reads the switch, fills the
// per-CPU `EVENT` slot and calls `lb_log_event`, which writes the record.
// ---------------------------------------------------------------------------------------------

/// The event slot, if the event log is on (two array lookups; only on the rare paths).
#[inline(always)]
fn event_slot() -> Option<&'static mut evlog::Slot> {
    if CONFIG
        .get(0)
        .is_none_or(|c| c.flags & CONFIG_F_LOG_EVENTS == 0)
    {
        return None;
    }
    // SAFETY: per-CPU value, only this CPU uses it, and only within one packet.
    EVENT.get_ptr_mut(0).map(|s| unsafe { &mut *s })
}

/// Writes the record of the event in this CPU's `EVENT` slot; 1 if it did (0: no slot, or
/// the ring buffer is full, or the kind is unknown). A global: checked once by the verifier,
/// and its frame is small enough to be called under `pick`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_log_event() -> u32 {
    // SAFETY: as in `event_slot`.
    let Some(s) = EVENT.get_ptr_mut(0).map(|s| unsafe { &mut *s }) else {
        return 0;
    };
    let Some(label) = evlog::LABELS.get(s.ev.kind as usize) else {
        return 0;
    };
    let sent = if s.ev.v6 != 0 {
        s.rec = evlog::TEMPLATE_V6;
        evlog::fill::<16>(&mut s.rec, &evlog::V6, label, &s.ev);
        // SAFETY: the record is at least `V6.len` bytes of plain data.
        let rec = unsafe { &*(&raw const s.rec).cast::<[u8; evlog::V6.len]>() };
        AYA_LOGS.output::<[u8; evlog::V6.len]>(rec, 0)
    } else {
        s.rec = evlog::TEMPLATE_V4;
        evlog::fill::<4>(&mut s.rec, &evlog::V4, label, &s.ev);
        // SAFETY: as above.
        let rec = unsafe { &*(&raw const s.rec).cast::<[u8; evlog::V4.len]>() };
        AYA_LOGS.output::<[u8; evlog::V4.len]>(rec, 0)
    };
    sent.is_ok() as u32
}

/// Client, VIP, ports and protocol of a flow into `ev` (addresses as little-endian words; the
/// ports word as read from the wire, client port in the low half).
#[inline(always)]
fn event_flow(
    ev: &mut evlog::Event,
    client: &[u32; 4],
    vip: &[u32; 4],
    ports: u32,
    proto: u8,
    v6: bool,
) {
    ev.client = bytes16(client);
    ev.vip_addr = bytes16(vip);
    ev.cport = u16::from_be(ports as u16);
    ev.vport = u16::from_be((ports >> 16) as u16);
    ev.proto = proto;
    ev.v6 = v6 as u8;
}

/// The record of a dropped packet: addresses, protocol and ports re-read from the frame as far
/// as it holds them; for TCP and UDP (not fragments) the VIP's index and the route owner.
#[inline(never)]
fn log_drop(ctx: *mut xdp_md, reason: DropReason) {
    let Some(s) = event_slot() else {
        return;
    };
    s.ev.reset(reason as u32);
    drop_flow(&XdpContext::new(ctx), &mut s.ev);
    lb_log_event();
}

/// `log_drop`'s parse: fills in what the frame holds.
#[inline(always)]
fn drop_flow(ctx: &XdpContext, ev: &mut evlog::Event) {
    let f = Frame::of(ctx);
    let Some((ethertype, l3)) = f.l3() else {
        return;
    };
    // Addresses, protocol, the L4 offset (None: no L4 header here), and whether ports route.
    let (src, dst, v6, proto, l4, whole) = match ethertype {
        ETH_P_IPV4 => {
            let Some(h) = f.at::<IPV4_HLEN>(l3) else {
                return;
            };
            let ihl = ((ld::<u8>(h + ipv4::VER_IHL) & 0xf) as usize) * 4;
            let frag = be16(h + ipv4::FRAG_OFF);
            // Only the first fragment holds the ports; no fragment routes by them.
            let l4 = (ihl >= IPV4_HLEN && frag & 0x1fff == 0).then_some(l3 + ihl);
            let src = [le32(h + ipv4::SRC), 0, 0, 0];
            let dst = [le32(h + ipv4::DST), 0, 0, 0];
            let whole = !parse::is_fragment(frag);
            (src, dst, false, ld::<u8>(h + ipv4::PROTO), l4, whole)
        }
        ETH_P_IPV6 => {
            let Some(h) = f.at::<IPV6_HLEN>(l3) else {
                return;
            };
            let src = words16(h + ipv6::SRC);
            let dst = words16(h + ipv6::DST);
            let proto = ld::<u8>(h + ipv6::NEXT_HDR);
            (src, dst, true, proto, Some(l3 + IPV6_HLEN), true)
        }
        _ => return,
    };
    let tcp_udp = proto == PROTO_TCP || proto == PROTO_UDP;
    let ports = match l4.and_then(|o| f.at::<4>(o)) {
        Some(p) if tcp_udp => le32(p),
        _ => 0,
    };
    event_flow(ev, &src, &dst, ports, proto, v6);
    if !tcp_udp || ports == 0 || !whole {
        return;
    }
    let family = if v6 { FAMILY_V6 } else { FAMILY_V4 };
    let Some(meta) = lookup_vip_slow(&dst, family, (ports >> 16) as u16, proto) else {
        return;
    };
    ev.vip = meta.index as i32;
    let ip = Ip {
        l3,
        v6,
        ihl_len: 0,
        len: 0,
        tc: [0; 2],
        df: false,
        src,
        dst,
        dst_hash: 0,
    };
    let flow = Flow {
        client: src,
        vip: dst,
        ports,
        proto,
        kind: FlowKind::Udp,
        icmp: false,
    };
    if let Ok((_, _, route)) = route_of(&ip, &flow, &meta) {
        ev.node = route.node as i32;
    }
}

/// The record of a PMTU reply (frag-needed / packet-too-big) sent for a flow to `node`.
#[inline(never)]
fn log_pmtu(flow: &Flow, v6: bool, vip: u32, node: u32) {
    let Some(s) = event_slot() else {
        return;
    };
    s.ev.reset(evlog::PMTU);
    event_flow(
        &mut s.ev,
        &flow.client,
        &flow.vip,
        flow.ports,
        flow.proto,
        v6,
    );
    s.ev.vip = vip as i32;
    s.ev.node = node as i32;
    lb_log_event();
}

/// Notes a conntrack eviction's victim (its flow, node and VIP) in the event slot, for
/// `lb_log_event` once `lb_ct_put` has returned (the stack below it is full); false when the
/// event log is off.
#[inline(never)]
fn note_evict(victim: &CtSlot) -> bool {
    let Some(s) = event_slot() else {
        return false;
    };
    let w = &victim.key;
    let words = |a: u64, b: u64| [a as u32, (a >> 32) as u32, b as u32, (b >> 32) as u32];
    s.ev.reset(evlog::EVICT);
    let v6 = (w[4] >> 40) as u8 == FAMILY_V6;
    let (client, vip) = (words(w[0], w[1]), words(w[2], w[3]));
    event_flow(
        &mut s.ev,
        &client,
        &vip,
        w[4] as u32,
        (w[4] >> 32) as u8,
        v6,
    );
    s.ev.vip = victim.entry.vip as i32;
    s.ev.node = victim.entry.node as i32;
    true
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
