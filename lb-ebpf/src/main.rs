//! `lb_balancer`: the XDP L4 load balancer. Packet semantics are docs/dataplane.md, step by
//! step; this program wires the maps and packet memory to the logic in the `lb_ebpf` library
//! (`parse` rules, `pkt` packet access, `encap`, `csum`, `evlog`, `decide`).
//!
//! Cost model (the product's selling point): non-VIP traffic stops at one array lookup
//! (`VIP_FILTER`); established TCP on a route that has not moved does only array lookups
//! (`VIP_CACHE`, `VIP_GEN`, `ROUTES`, `NODES` and the counters); `VIPS` (hash) is read only when
//! the VIP is not in its cache slot; `CONNTRACK` and `CONFIG` are touched only on the paths
//! that need them. The commonest case (established TCP over IPv4 without options or IPv6
//! without extension headers, dsr-l2 or ipip) has fast paths of their own (`fast_v4`,
//! `fast_v6`, the ipip tail `fast_ipip`) that keep everything in registers and fall back to
//! the general path for anything else; cold paths (conntrack, encap, PMTU, malformed) are
//! subprograms. `#[inline(always)]` / `#[inline(never)]` decide which functions are BPF
//! subprograms, and so the 512-byte combined stack: change none without measuring.
//!
//! Event log: drops, PMTU replies and conntrack evictions each write one aya-log record (target
//! `LOG_TARGET`, level debug) when `CONFIG_F_LOG_EVENTS` is set. The switch is read only on
//! those rare branches, so forwarding does no extra work whether it is on or off.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    macros::xdp,
    programs::XdpContext,
};
use lb_common::Stat;

use balancer::{counters::count, events::log_drop, maps::DROPS, parse::try_balance};

/// The program's parts (files under `src/balancer/`), in the order a packet meets them; the
/// step numbers are docs/dataplane.md's "Per packet".
mod balancer {
    /// Every map static; their names are the loader's contract.
    pub(crate) mod maps;

    /// Steps 1-7 and 11: Ethernet, IPv4/IPv6, TCP/UDP, fragments, ICMP errors.
    pub(crate) mod parse;

    /// Steps 3, 4 and 7: `VIP_FILTER`, the address marker, `VIP_CACHE` then `VIPS`.
    pub(crate) mod vip;

    /// Steps 2-10 for established TCP over IPv4 or IPv6 (dsr-l2 or ipip), in registers.
    pub(crate) mod fast;

    /// Steps 8-9: flow hash, route slot, node choice with conntrack.
    pub(crate) mod route;

    /// Step 9: the `lb_ct_get` / `lb_ct_put` / `lb_ct_touch` global subprograms.
    pub(crate) mod conntrack;

    /// Step 10: dsr-l2 rewrite, ipip encapsulation, counting.
    pub(crate) mod forward;

    /// Step 10 (ipip): ICMP frag-needed / packet-too-big replies and their rate limit.
    pub(crate) mod pmtu;

    /// `STATS`, `VIP_STATS`, `NODE_STATS`, `ROUTE_STATS` updates.
    pub(crate) mod counters;

    /// The event log: records of drops, PMTU replies and conntrack evictions.
    pub(crate) mod events;
}

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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
