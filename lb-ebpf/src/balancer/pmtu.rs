//! PMTU replies (step 10, ipip): ICMP frag-needed and ICMPv6 packet-too-big back to the
//! client, and their per-CPU rate limit (docs/dataplane.md "PMTU replies").
use aya_ebpf::{
    helpers::generated::{bpf_ktime_get_ns, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{DropReason, PMTU_BURST, PMTU_PER_SEC, PROTO_ICMP, PROTO_ICMPV6};
use lb_ebpf::{
    encap,
    parse::{
        ETH_P_IPV4, ETH_P_IPV6, ETH_VLAN_HLEN, ICMP_HLEN, ICMP_QUOTE_L4, IPV4_HLEN, IPV4_MAX_HLEN,
        IPV6_HLEN, ipv6,
    },
    pkt::{Frame, be32, put, st32},
};

use super::{
    forward::{Sent, grow_head, save_eth, write_eth},
    maps::PMTU_BUDGET,
    parse::Ip,
};

/// Takes one PMTU reply from this CPU's budget: `PMTU_PER_SEC` a second after a burst of
/// `PMTU_BURST` (the bucket starts full). False when it is spent.
#[inline(never)]
pub(crate) fn pmtu_budget() -> bool {
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
pub(crate) fn pmtu4(ctx: &XdpContext, ip: &Ip, mtu: u16) -> Result<Sent, DropReason> {
    const GROW: usize = IPV4_HLEN + ICMP_HLEN;
    const MAX_QUOTE: usize = IPV4_MAX_HLEN + ICMP_QUOTE_L4;
    let eth = save_eth(Frame::of(ctx))?;
    let l3 = ip.l3;
    let quote_len = ip.ihl_len + ICMP_QUOTE_L4;
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
pub(crate) fn pmtu6(ctx: &XdpContext, ip: &Ip, mtu: u16) -> Result<Sent, DropReason> {
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
            st32(p + ipv6::SRC + i * 4, ip.dst[i].to_le());
            st32(p + ipv6::DST + i * 4, ip.src[i].to_le());
            i += 1;
        }
        put(p + IPV6_HLEN, &icmp);
    }
    cut_to(ctx, f, l3 + GROW + encap::PTB_QUOTE)?;
    Ok(Sent::PmtuReply)
}
