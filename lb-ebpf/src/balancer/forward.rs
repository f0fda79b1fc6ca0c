//! Step 10: the packet sent on to its node, dsr-l2 (MAC rewrite) or ipip (outer header, or a
//! PMTU reply when it would not fit), and counted.
use core::mem::offset_of;

use aya_ebpf::{
    helpers::generated::{bpf_check_mtu, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{DropReason, GlobalConfig, NodeEntry, Stat, VIP_MODE_IPIP, VipMeta};
use lb_ebpf::{
    encap,
    parse::{
        ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6, ETH_VLAN_HLEN, IPV4_HLEN, IPV6_HLEN, PROTO_IPIP,
        PROTO_IPV6_IN, eth, ipv6, vlan,
    },
    pkt::{Frame, Mac, ld, put, st16, st32},
};

use super::{
    counters::{count, count_forwarded, count_index},
    events::log_pmtu,
    maps::{CONFIG, NODES},
    parse::{Flow, Ip},
    pmtu::{pmtu_budget, pmtu4, pmtu6},
    route::{PICK_EVENT_SHIFT, PICK_NODE_SHIFT, route_hash},
};
use crate::Verdict;

/// Step 10 for the node `pick` chose: rewrite or encapsulate (or answer with a PMTU error),
/// then count.
#[inline(never)]
pub(crate) fn forward(
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
        let inner = Inner::new(ip.l3, ip.v6, ip.df, flow.icmp, ip.len, ip.tc);
        encap(ctx, inner, route_hash(ip, flow, meta), node)?
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

pub(crate) enum Sent {
    /// Sent on to the node.
    Forwarded,
    /// Too big for the path to the node: answer with frag-needed / packet-too-big (MTU given).
    NeedPmtu(u16),
    /// Answered with ICMP frag-needed / packet-too-big.
    PmtuReply,
}

/// dsr-l2: Ethernet destination = node, source = the frame's old destination.
#[inline(always)]
pub(crate) fn dsr(f: Frame, node: &NodeEntry) -> Result<Sent, DropReason> {
    // verifier: re-derive the Ethernet pointer (it was checked at parse time); the two MACs.
    let Some(e) = f.at::<{ eth::ETHER_TYPE }>(0) else {
        return Err(DropReason::HelperFailed);
    };
    let old_dst = Mac::load(e + eth::DST);
    let mac = node.mac.as_ptr() as usize;
    // SAFETY: both MACs bounds-checked above.
    unsafe {
        old_dst.store(e + eth::SRC);
        Mac::load(mac).store(e + eth::DST);
    }
    Ok(Sent::Forwarded)
}

/// The Ethernet fields a rewrite keeps: old destination, old source, the VLAN tag.
pub(crate) struct EthSave {
    pub(crate) dst: Mac,
    pub(crate) src: Mac,
    pub(crate) tag: u32,
}

#[inline(always)]
pub(crate) fn save_eth(f: Frame) -> Result<EthSave, DropReason> {
    // verifier: re-derive the Ethernet pointer (it was checked at parse time).
    let Some(e) = f.at::<ETH_VLAN_HLEN>(0) else {
        return Err(DropReason::HelperFailed);
    };
    Ok(EthSave {
        dst: Mac::load(e + eth::DST),
        src: Mac::load(e + eth::SRC),
        // The 802.1Q tag (TPID and TCI), if `l3` says there is one.
        tag: ld(e + eth::ETHER_TYPE),
    })
}

/// Moves the frame start `by` bytes earlier (room for new headers).
#[inline(always)]
pub(crate) fn grow_head(ctx: &XdpContext, by: i32) -> Result<Frame, DropReason> {
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -by) } != 0 {
        return Err(DropReason::HelperFailed);
    }
    Ok(Frame::of(ctx))
}

/// Writes an Ethernet header (with the VLAN tag when `l3` says there is one).
#[inline(always)]
pub(crate) fn write_eth(
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
        dst.store(e + eth::DST);
        src.store(e + eth::SRC);
        if l3 == ETH_VLAN_HLEN {
            st32(e + eth::ETHER_TYPE, tag);
            st16(e + ETH_HLEN + vlan::ETHER_TYPE, ethertype.to_be());
        } else {
            st16(e + eth::ETHER_TYPE, ethertype.to_be());
        }
    }
    Ok(())
}

#[inline(always)]
pub(crate) fn config() -> Result<&'static GlobalConfig, DropReason> {
    // verifier: index 0 of a 1-entry array always exists, but the lookup can return null.
    CONFIG.get(0).ok_or(DropReason::HelperFailed)
}

/// What `encap` needs of the packet, in one register (a subprogram takes five): the IP header's
/// offset (bits 0..8), IPv6, DF and "an ICMP error" (bits 8, 9, 10), the IPv4 total or IPv6
/// payload length (16..32) and `Ip::tc` (32..48).
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(crate) struct Inner(u64);

impl Inner {
    #[inline(always)]
    pub(crate) fn new(l3: usize, v6: bool, df: bool, icmp: bool, len: u16, tc: [u8; 2]) -> Self {
        Self(
            (l3 as u64 & 0xff)
                | (v6 as u64) << 8
                | (df as u64) << 9
                | (icmp as u64) << 10
                | (len as u64) << 16
                | (u16::from_ne_bytes(tc) as u64) << 32,
        )
    }
    #[inline(always)]
    fn l3(self) -> usize {
        (self.0 & 0xff) as usize
    }
    #[inline(always)]
    fn v6(self) -> bool {
        self.0 & 1 << 8 != 0
    }
    #[inline(always)]
    fn df(self) -> bool {
        self.0 & 1 << 9 != 0
    }
    #[inline(always)]
    fn icmp(self) -> bool {
        self.0 & 1 << 10 != 0
    }
    #[inline(always)]
    fn len(self) -> u16 {
        (self.0 >> 16) as u16
    }
    #[inline(always)]
    fn tc(self) -> [u8; 2] {
        ((self.0 >> 32) as u16).to_ne_bytes()
    }
}

/// ipip: checks the MTU, then prepends the outer header to the node (step 10). Its own
/// subprogram: its locals stay off its callers' stacks. Every outcome but `Forwarded` leaves
/// the packet as it was (the fast paths rely on it), except a failed re-check of the bytes the
/// head just grew by, which cannot fail.
#[inline(never)]
fn encap(ctx: &XdpContext, ip: Inner, hash: u32, node: &NodeEntry) -> Result<Sent, DropReason> {
    encap_inline(ctx, ip, hash, node)
}

/// `encap`'s body, inline in the fast paths' ipip subprogram (a call less per packet).
#[inline(always)]
pub(crate) fn encap_inline(
    ctx: &XdpContext,
    ip: Inner,
    hash: u32,
    node: &NodeEntry,
) -> Result<Sent, DropReason> {
    let v6 = ip.v6();
    // Word loads: compared as byte arrays, the addresses were read a byte at a time.
    let n = node as *const NodeEntry as usize;
    let no_addr = if v6 {
        let a = n + offset_of!(NodeEntry, addr6);
        ld::<u64>(a) | ld::<u64>(a + 8) == 0
    } else {
        ld::<u32>(n + offset_of!(NodeEntry, addr4)) == 0
    };
    if no_addr {
        return Err(DropReason::NoBackend);
    }
    let cfg = config()?;
    let grow = if v6 { IPV6_HLEN } else { IPV4_HLEN };
    // IPv4: outer total length; IPv6: outer payload length.
    let outer_len = ip.len() as u32 + grow as u32;
    // The L3 size on the path: IPv4 total, or IPv6 header plus payload.
    let l3_size = if v6 {
        outer_len + IPV6_HLEN as u32
    } else {
        outer_len
    };
    if (cfg.mtu != 0 && l3_size > cfg.mtu as u32) || outer_len > u16::MAX as u32 {
        if outer_len > u16::MAX as u32 || !aggregated(ctx, l3_size - grow as u32) {
            // No ICMP error about an ICMP error; IPv4 without DF has no frag-needed either.
            if cfg.mtu != 0 && !ip.icmp() && (v6 || ip.df()) {
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
    let l3 = ip.l3();
    let gw = Mac::load(cfg.gw_mac.as_ptr() as usize);
    if v6 {
        write_eth(f, l3, gw, eth.dst, eth.tag, ETH_P_IPV6)?;
        // verifier: fresh bound after the head moved.
        let Some(p) = f.at::<IPV6_HLEN>(l3) else {
            return Err(DropReason::HelperFailed);
        };
        let first = encap::ipv6_first8(ip.tc(), hash & 0xf_ffff, outer_len as u16, PROTO_IPV6_IN);
        let src = cfg.ipip_src6.as_ptr() as usize;
        let dst = node.addr6.as_ptr() as usize;
        // SAFETY: 40 bytes bounds-checked above; map values stay valid across adjust_head.
        unsafe {
            put(p, &first);
            // The source: the configured /96, then the flow hash (`encap::outer_src6`).
            st32(p + ipv6::SRC, ld(src));
            st32(p + ipv6::SRC + 4, ld(src + 4));
            st32(p + ipv6::SRC + 8, ld(src + 8));
            st32(p + ipv6::SRC + 12, hash.to_be());
            st32(p + ipv6::DST, ld(dst));
            st32(p + ipv6::DST + 4, ld(dst + 4));
            st32(p + ipv6::DST + 8, ld(dst + 8));
            st32(p + ipv6::DST + 12, ld(dst + 12));
        }
    } else {
        write_eth(f, l3, gw, eth.dst, eth.tag, ETH_P_IPV4)?;
        // verifier: fresh bound after the head moved.
        let Some(p) = f.at::<IPV4_HLEN>(l3) else {
            return Err(DropReason::HelperFailed);
        };
        let hdr = encap::ipv4_header(
            ip.tc()[0],
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
