//! The per-CPU counters: `STATS` by `Stat`, and step 10's traffic counters (`VIP_STATS`,
//! `NODE_STATS`, `ROUTE_STATS`).
use aya_ebpf::maps::PerCpuArray;
use lb_common::{ROUTE_STATS_SAMPLE, Stat, TrafficCounter};

use super::maps::{NODE_STATS, ROUTE_STATS, STATS, VIP_STATS};

#[inline(always)]
pub(crate) fn count(stat: Stat) {
    count_index(stat as u32);
}

/// `count` by `Stat` index.
#[inline(always)]
pub(crate) fn count_index(stat: u32) {
    if let Some(c) = STATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *c += 1 };
    }
}

/// Adds a packet of `bytes`; returns the slot's new packet count (1 if the slot is missing).
#[inline(always)]
fn count_traffic(map: &PerCpuArray<TrafficCounter>, index: u32, bytes: u64) -> u64 {
    let Some(c) = map.get_ptr_mut(index) else {
        return 1;
    };
    // SAFETY: per-CPU slot, only this CPU writes it.
    unsafe {
        (*c).packets += 1;
        (*c).bytes += bytes;
        (*c).packets
    }
}

/// Counts the `Stat` events of a `decide::Choice` (bit `1 << stat`).
#[inline(always)]
pub(crate) fn count_events(bits: u32) {
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

/// Step 10's counters for a packet sent on to a node (`bytes` = frame length as received).
#[inline(always)]
pub(crate) fn count_forwarded(vip: u32, node: u32, slot: u32, bytes: u64) {
    count(Stat::Tx);
    let vip_packets = count_traffic(&VIP_STATS, vip, bytes);
    count_traffic(&NODE_STATS, node, bytes);
    // Sampled: a write per packet to a random slot of a table this large is a cache miss.
    if vip_packets.is_multiple_of(ROUTE_STATS_SAMPLE)
        && let Some(c) = ROUTE_STATS.get_ptr_mut(slot)
    {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *c += 1 };
    }
}
