//! `lb_decap`: node-side decapsulator for ipip mode (docs/dataplane.md "Node-side decap").
//! Strips the outer IPv4 (IPIP) or IPv6 (IP6IP6) header of packets whose inner destination is
//! a VIP this node serves, so kernels without the `ipip` module still receive them. Only
//! tunnels from the configured outer-source networks (the balancers' `[ipip] source_v4` /
//! `source_v6`) are opened: anyone else could otherwise inject packets that reach the VIP's
//! service from any source address they like.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::generated::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use lb_common::{
    DECAP_STAT_COUNT, DecapKey, DecapStat, FAMILY_V4, FAMILY_V6, MAX_DECAP_SOURCES, MAX_DECAP_VIPS,
};
use lb_ebpf::{
    parse::{
        ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6, ETH_VLAN_HLEN, IPV4_HLEN, IPV6_HLEN, PROTO_IPIP,
        PROTO_IPV6_IN, eth, ipv4, ipv6, vlan,
    },
    pkt::{Frame, ld, st16, st32},
};

/// VIP addresses this node accepts inside IPIP / IP6IP6 (value unused).
#[map]
static DECAP_VIPS: HashMap<DecapKey, u32> = HashMap::with_max_entries(MAX_DECAP_VIPS, 0);
/// IPv4 outer-source networks accepted (value unused).
#[map]
static DECAP_SRC4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_DECAP_SOURCES, 0);
/// IPv6 outer-source networks accepted (value unused).
#[map]
static DECAP_SRC6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(MAX_DECAP_SOURCES, 0);
/// Decap verdict counts by `DecapStat`.
#[map]
static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DECAP_STAT_COUNT, 0);

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let stat = try_decap(&ctx);
    if let Some(c) = DECAP_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *c += 1 };
    }
    match stat {
        DecapStat::Malformed | DecapStat::ForeignSource => XDP_DROP,
        _ => XDP_PASS,
    }
}

#[inline(always)]
fn try_decap(ctx: &XdpContext) -> DecapStat {
    let f = Frame::of(ctx);
    let Some((ethertype, l3)) = f.l3() else {
        return DecapStat::Pass;
    };
    let mut key = DecapKey::default();
    let (outer_len, src_ok) = match ethertype {
        ETH_P_IPV4 => {
            let Some(h) = f.at::<IPV4_HLEN>(l3) else {
                return DecapStat::Pass;
            };
            if ld::<u8>(h + ipv4::PROTO) != PROTO_IPIP {
                return DecapStat::Pass;
            }
            let ver_ihl: u8 = ld(h + ipv4::VER_IHL);
            let ihl_len = ((ver_ihl & 0x0f) as usize) * 4;
            if ver_ihl >> 4 != 4 || ihl_len < IPV4_HLEN {
                return DecapStat::Malformed;
            }
            let Some(inner) = f.at::<IPV4_HLEN>(l3 + ihl_len) else {
                return DecapStat::Malformed;
            };
            key.addr[..4].copy_from_slice(&ld::<[u8; 4]>(inner + ipv4::DST));
            key.family = FAMILY_V4;
            let src = DECAP_SRC4.get(Key::new(32, ld::<[u8; 4]>(h + ipv4::SRC)));
            (ihl_len, src.is_some())
        }
        ETH_P_IPV6 => {
            let Some(h) = f.at::<IPV6_HLEN>(l3) else {
                return DecapStat::Pass;
            };
            if ld::<u8>(h + ipv6::NEXT_HDR) != PROTO_IPV6_IN {
                return DecapStat::Pass;
            }
            let Some(inner) = f.at::<IPV6_HLEN>(l3 + IPV6_HLEN) else {
                return DecapStat::Malformed;
            };
            key.addr = ld(inner + ipv6::DST);
            key.family = FAMILY_V6;
            let src = DECAP_SRC6.get(Key::new(128, ld::<[u8; 16]>(h + ipv6::SRC)));
            (IPV6_HLEN, src.is_some())
        }
        _ => return DecapStat::Pass,
    };
    // SAFETY: read-only use of the value's existence.
    if unsafe { DECAP_VIPS.get(key) }.is_none() {
        return DecapStat::NotOurs;
    }
    if !src_ok {
        return DecapStat::ForeignSource;
    }
    strip(ctx, l3, outer_len)
}

/// Removes `outer_len` bytes after the Ethernet header (and tag): the Ethernet header is
/// written again just in front of the inner IP header, then the frame start moves up.
#[inline(always)]
fn strip(ctx: &XdpContext, l3: usize, outer_len: usize) -> DecapStat {
    // verifier: re-derive the Ethernet pointer after the map lookup.
    let Some(e) = Frame::of(ctx).at::<ETH_VLAN_HLEN>(0) else {
        return DecapStat::Malformed;
    };
    // The two MACs as three words, then the ethertype, or the 802.1Q tag and the inner one.
    let (w0, w1, w2) = (ld::<u32>(e), ld::<u32>(e + 4), ld::<u32>(e + 8));
    let w3: u32 = ld(e + eth::ETHER_TYPE);
    let w4: u16 = ld(e + ETH_HLEN + vlan::ETHER_TYPE);
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return DecapStat::Malformed;
    }
    // verifier: fresh bound after the head moved (the inner header is still there).
    let Some(e) = Frame::of(ctx).at::<ETH_VLAN_HLEN>(0) else {
        return DecapStat::Malformed;
    };
    // SAFETY: 18 bytes bounds-checked above; only the first `l3` are written.
    unsafe {
        st32(e, w0);
        st32(e + 4, w1);
        st32(e + 8, w2);
        if l3 == ETH_HLEN {
            st16(e + eth::ETHER_TYPE, w3 as u16);
        } else {
            st32(e + eth::ETHER_TYPE, w3);
            st16(e + ETH_HLEN + vlan::ETHER_TYPE, w4);
        }
    }
    DecapStat::Decapsulated
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
