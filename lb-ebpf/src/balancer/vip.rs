//! Which VIP a packet is for: the `VIP_FILTER` bit (step 3), the address marker that makes a
//! malformed packet a counted drop (step 4), and the VIP lookup (step 7): `VIP_CACHE` first,
//! then `VIPS`.
use core::mem::offset_of;

use lb_common::{
    DropReason, PROTO_ANY, VIP_F_FRAG_ONLY, VipCacheEntry, VipKey, VipMeta, hash::filter_slot,
    vip_cache_slot,
};
use lb_ebpf::pkt::{bytes16, ld};

use super::{
    maps::{VIP_CACHE, VIP_FILTER, VIPS},
    parse::Ip,
};
use crate::Verdict;

#[inline(always)]
pub(crate) fn in_filter(addr_hash: u32) -> bool {
    let (word, bit) = filter_slot(addr_hash);
    VIP_FILTER.get(word).is_some_and(|w| w & bit != 0)
}

#[inline(always)]
pub(crate) fn vip_get(key: &VipKey) -> Option<VipMeta> {
    // SAFETY: the value is copied out at once; the loader replaces values whole.
    unsafe { VIPS.get(key) }.copied()
}

/// A malformed packet: dropped for `reason` if its destination is a VIP address (the address
/// marker exists), otherwise passed untouched.
#[inline(never)]
pub(crate) fn malformed(
    dst: &[u32; 4],
    family: u8,
    reason: DropReason,
) -> Result<Verdict, DropReason> {
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
pub(crate) fn lookup_vip(addr: &[u32; 4], family: u8, port: u16, proto: u8) -> Option<VipMeta> {
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

/// A `VIP_CACHE` entry's key is compared as five words loaded from the map value: the address
/// (four words, IPv4 in the first) at `CACHE_ADDR`, then `cache_tail` at `CACHE_TAIL`.
const CACHE_ADDR: usize = offset_of!(VipCacheEntry, key) + offset_of!(VipKey, addr);
const CACHE_TAIL: usize = offset_of!(VipCacheEntry, key) + offset_of!(VipKey, port);
const _: () = assert!(
    offset_of!(VipKey, proto) == offset_of!(VipKey, port) + 2
        && offset_of!(VipKey, family) == offset_of!(VipKey, port) + 3
);

/// The key's last word: port, protocol and family as `VipKey` lays them out.
#[inline(always)]
const fn cache_tail(port: u16, proto: u8, family: u8) -> u32 {
    (port as u32) | ((proto as u32) << 16) | ((family as u32) << 24)
}

/// Step 7 from `VIP_CACHE` alone (array lookup and key compare): the VIP `(dst, port, proto)`
/// if its slot holds it. `dst_hash` is `dst`'s address hash.
#[inline(always)]
pub(crate) fn cached_vip(
    dst: &[u32; 4],
    dst_hash: u32,
    port: u16,
    proto: u8,
    family: u8,
) -> Option<&'static VipMeta> {
    // verifier: the slot is < VIP_CACHE_SIZE, but the lookup can return null.
    let e = VIP_CACHE.get(vip_cache_slot(dst_hash, port, proto))?;
    let k = e as *const VipCacheEntry as usize;
    (ld::<u32>(k + CACHE_TAIL) == cache_tail(port, proto, family)
        && ld::<u32>(k + CACHE_ADDR) == dst[0]
        && ld::<u32>(k + CACHE_ADDR + 4) == dst[1]
        && ld::<u32>(k + CACHE_ADDR + 8) == dst[2]
        && ld::<u32>(k + CACHE_ADDR + 12) == dst[3])
        .then_some(&e.meta)
}

/// Step 7 for a packet's own destination: the `VIP_CACHE` slot first, then `VIPS`.
#[inline(always)]
pub(crate) fn packet_vip(ip: &Ip, port: u16, proto: u8) -> Option<VipMeta> {
    let family = ip.family();
    if let Some(m) = cached_vip(&ip.dst, ip.dst_hash, port, proto, family) {
        return Some(*m);
    }
    lookup_vip_slow(&ip.dst, family, port, proto)
}

/// `lookup_vip` as its own subprogram (the key lives on its stack, off the hot path).
#[inline(never)]
pub(crate) fn lookup_vip_slow(
    addr: &[u32; 4],
    family: u8,
    port: u16,
    proto: u8,
) -> Option<VipMeta> {
    lookup_vip(addr, family, port, proto)
}
