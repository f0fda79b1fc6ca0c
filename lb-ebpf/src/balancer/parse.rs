//! Steps 1-7 and 11 (docs/dataplane.md): Ethernet and VLAN, the IPv4/IPv6 header, the
//! `VIP_FILTER` check, TCP/UDP headers, fragments and ICMP errors, each packet read into an
//! `Ip` and a `Flow` and handed to `route::balance`. The validity rules themselves are
//! `lb_ebpf::parse`'s (host-tested); this module applies them to packet memory.
use aya_ebpf::programs::XdpContext;
use lb_common::{
    DropReason, FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Stat,
    VIP_MODE_IPIP, VipKey, addr_hash_v4, addr_hash_v6,
};
use lb_ebpf::{
    decide::FlowKind,
    parse::{
        self, ETH_P_IPV4, ETH_P_IPV6, ICMP_HLEN, ICMP_TYPE_CODE_CSUM, IPV4_HLEN, IPV6_HLEN,
        PORTS_LEN, TCP_HLEN, UDP_HLEN, ipv4, ipv6, tcp, udp,
    },
    pkt::{Frame, be16, bytes16, ld, le32, port, words16},
};

use super::{
    fast::{Fast, fast_v4, fast_v6},
    route::{balance, established},
    vip::{in_filter, lookup_vip, malformed, packet_vip, vip_get},
};
use crate::Verdict;

/// The packet's own IP header, as forwarding needs it.
#[derive(Clone, Copy)]
pub(crate) struct Ip {
    /// Offset of the IP header: 14, or 18 behind a VLAN tag.
    pub(crate) l3: usize,
    pub(crate) v6: bool,
    /// IPv4 header length (IHL*4).
    pub(crate) ihl_len: usize,
    /// IPv4 total length, or IPv6 payload length.
    pub(crate) len: u16,
    /// IPv4: `[tos, 0]`; IPv6: the header's first two bytes (they hold the traffic class).
    pub(crate) tc: [u8; 2],
    /// IPv4 DF bit.
    pub(crate) df: bool,
    /// Addresses as little-endian words of the wire bytes (IPv4 in word 0).
    pub(crate) src: [u32; 4],
    pub(crate) dst: [u32; 4],
    /// `addr_hash_v4/v6(dst)` (for `VIP_FILTER` and `VIP_CACHE`).
    pub(crate) dst_hash: u32,
}

impl Ip {
    #[inline(always)]
    pub(crate) fn family(&self) -> u8 {
        if self.v6 { FAMILY_V6 } else { FAMILY_V4 }
    }
}

/// The client-to-VIP flow a packet belongs to.
pub(crate) struct Flow {
    pub(crate) client: [u32; 4],
    pub(crate) vip: [u32; 4],
    /// `ports_word(client port, VIP port)`; 0 for fragments.
    pub(crate) ports: u32,
    pub(crate) proto: u8,
    pub(crate) kind: FlowKind,
    /// An ICMP error about the flow (never answered with another ICMP error).
    pub(crate) icmp: bool,
}

#[inline(always)]
pub(crate) fn try_balance(ctx: &XdpContext) -> Result<Verdict, DropReason> {
    let f = Frame::of(ctx);
    // Frames too short for Ethernet (or the tag) carry nothing that marks them as VIP traffic.
    let Some((ethertype, l3)) = f.l3() else {
        return Ok(Verdict::Pass);
    };
    match ethertype {
        // After a fast path's `Slow`, the frame is read from the context again: an ipip
        // attempt called a helper that may move packet data, which (to the verifier) ends
        // every packet pointer taken before (the packet itself is unchanged).
        ETH_P_IPV4 => match fast_v4(ctx, f, l3) {
            Fast::Tx => Ok(Verdict::Tx),
            Fast::Pass => Ok(Verdict::Pass),
            Fast::Slow => ipv4(ctx, Frame::of(ctx), l3),
        },
        ETH_P_IPV6 => match fast_v6(ctx, f, l3) {
            Fast::Tx => Ok(Verdict::Tx),
            Fast::Pass => Ok(Verdict::Pass),
            Fast::Slow => ipv6(ctx, Frame::of(ctx), l3),
        },
        _ => Ok(Verdict::Pass),
    }
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
        tc: [ld(h + ipv6::VCF), ld(h + ipv6::VCF + 1)],
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
    let Some(meta) = packet_vip(ip, port(t + tcp::DST_PORT), PROTO_TCP) else {
        return Ok(Verdict::Pass);
    };
    let flow = Flow {
        client: ip.src,
        vip: ip.dst,
        ports: le32(t + tcp::PORTS),
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
    if let Err(r) = parse::udp_header(l4_len, be16(u + udp::LEN)) {
        return malformed(&ip.dst, ip.family(), r);
    }
    let Some(meta) = packet_vip(ip, port(u + udp::DST_PORT), PROTO_UDP) else {
        return Ok(Verdict::Pass);
    };
    let flow = Flow {
        client: ip.src,
        vip: ip.dst,
        ports: le32(u + udp::PORTS),
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
    if l4_len < ICMP_TYPE_CODE_CSUM {
        return None;
    }
    f.at::<ICMP_TYPE_CODE_CSUM>(l4).map(ld)
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
    let Some(p) = f.at::<PORTS_LEN>(emb + emb_ihl) else {
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
    let Some(e) = f.at::<{ IPV6_HLEN + PORTS_LEN }>(emb) else {
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
