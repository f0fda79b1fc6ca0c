//! Event log: one aya-log record per drop, PMTU reply and conntrack eviction, only while
//! `CONFIG_F_LOG_EVENTS` is set (`lb_ebpf::evlog` has the format and why not aya-log-ebpf's
//! macros). Each site calls its `log_*` only on its rare branch; it reads the switch, fills the
//! per-CPU `EVENT` slot and calls `lb_log_event`, which writes the record.
use aya_ebpf::{bindings::xdp_md, programs::XdpContext};
use lb_common::{
    CONFIG_F_LOG_EVENTS, DropReason, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, ct::CtSlot,
};
use lb_ebpf::{
    decide::FlowKind,
    evlog,
    parse::{self, ETH_P_IPV4, ETH_P_IPV6, IPV4_HLEN, IPV6_HLEN, PORTS_LEN, ipv4, ipv6},
    pkt::{Frame, be16, bytes16, ld, le32, words16},
};

use super::{
    maps::{AYA_LOGS, CONFIG, EVENT},
    parse::{Flow, Ip},
    route::route_of,
    vip::lookup_vip_slow,
};

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
pub(crate) fn log_drop(ctx: *mut xdp_md, reason: DropReason) {
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
            let l4 = (ihl >= IPV4_HLEN && frag & ipv4::OFFSET == 0).then_some(l3 + ihl);
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
    let ports = match l4.and_then(|o| f.at::<PORTS_LEN>(o)) {
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
pub(crate) fn log_pmtu(flow: &Flow, v6: bool, vip: u32, node: u32) {
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
pub(crate) fn note_evict(victim: &CtSlot) -> bool {
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
    s.ev.vip = victim.vip as i32;
    s.ev.node = victim.node as i32;
    true
}
