//! The flow hash, shared so userspace (`lb trace`, tests) predicts exactly what the kernel does.
//!
//! Murmur3-style word mixing: a handful of multiplies and rotates per 32-bit word, no tables,
//! no loops the verifier has to bound. Inputs are raw wire bytes read as little-endian words
//! (what a `u32` load from the packet gives on `bpfel`).

const SEED: u32 = 0x9e37_79b9;

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The ports word: source and destination port as they sit on the wire, i.e. the first four
/// bytes of the TCP/UDP header read as a little-endian `u32`. `sport`/`dport` are the raw
/// network-order `u16` values (as stored in [`crate::FlowKey`]).
#[inline(always)]
pub const fn ports_word(sport: u16, dport: u16) -> u32 {
    (sport as u32) | ((dport as u32) << 16)
}

/// Little-endian words of a 16-byte address.
#[inline(always)]
pub const fn addr_words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_le_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_le_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_le_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_le_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// Little-endian word of a 4-byte address.
#[inline(always)]
pub const fn addr_word(a: &[u8; 4]) -> u32 {
    u32::from_le_bytes(*a)
}

/// Hash of an IPv4 flow. For source affinity pass `ports = 0`; for fragments pass `ports = 0`.
#[inline(always)]
pub const fn flow_hash_v4(src: u32, dst: u32, ports: u32, proto: u8) -> u32 {
    let mut h = SEED ^ (proto as u32);
    h = mix(h, src);
    h = mix(h, dst);
    h = mix(h, ports);
    fmix(h ^ 12)
}

/// Hash of an IPv6 flow (same conventions as [`flow_hash_v4`]).
#[inline(always)]
pub const fn flow_hash_v6(src: &[u32; 4], dst: &[u32; 4], ports: u32, proto: u8) -> u32 {
    let mut h = SEED ^ (proto as u32) ^ 0x0600;
    h = mix(h, src[0]);
    h = mix(h, src[1]);
    h = mix(h, src[2]);
    h = mix(h, src[3]);
    h = mix(h, dst[0]);
    h = mix(h, dst[1]);
    h = mix(h, dst[2]);
    h = mix(h, dst[3]);
    h = mix(h, ports);
    fmix(h ^ 36)
}

/// Hash of a destination address, for the `VIP_FILTER` bitmap.
#[inline(always)]
pub const fn addr_hash_v4(addr: u32) -> u32 {
    fmix(mix(SEED, addr) ^ 4)
}

/// Hash of a destination IPv6 address, for the `VIP_FILTER` bitmap.
#[inline(always)]
pub const fn addr_hash_v6(addr: &[u32; 4]) -> u32 {
    let mut h = SEED ^ 0x0600;
    h = mix(h, addr[0]);
    h = mix(h, addr[1]);
    h = mix(h, addr[2]);
    h = mix(h, addr[3]);
    fmix(h ^ 16)
}

/// `VIP_FILTER` position of an address hash: (word index, bit mask).
#[inline(always)]
pub const fn filter_slot(addr_hash: u32) -> (u32, u64) {
    (
        (addr_hash >> 6) & (crate::VIP_FILTER_WORDS - 1),
        1u64 << (addr_hash & 63),
    )
}

/// `VIP_CACHE` slot of the VIP `(addr, port, proto)`, from the address's `VIP_FILTER` hash
/// ([`addr_hash_v4`] / [`addr_hash_v6`], which the kernel has already computed), the port as
/// stored in `VipKey` (network order read natively) and the protocol.
#[inline(always)]
pub const fn vip_cache_slot(addr_hash: u32, port: u16, proto: u8) -> u32 {
    // Fibonacci hashing: the top bits of the product depend on every input bit.
    let h = (addr_hash ^ (port as u32) ^ ((proto as u32) << 16)).wrapping_mul(0x9e37_79b1);
    h >> (32 - crate::VIP_CACHE_SIZE.trailing_zeros())
}

/// The kernel's hash of a tracked flow (`CONNTRACK` key), so userspace can find a flow's route.
/// `with_ports = false` for source-affinity VIPs.
#[inline(always)]
pub const fn flow_key_hash(key: &crate::FlowKey, with_ports: bool) -> u32 {
    let ports = if with_ports {
        ports_word(key.sport, key.dport)
    } else {
        0
    };
    if key.family == crate::FAMILY_V4 {
        let s = [key.src[0], key.src[1], key.src[2], key.src[3]];
        let d = [key.dst[0], key.dst[1], key.dst[2], key.dst[3]];
        flow_hash_v4(addr_word(&s), addr_word(&d), ports, key.proto)
    } else {
        flow_hash_v6(
            &addr_words(&key.src),
            &addr_words(&key.dst),
            ports,
            key.proto,
        )
    }
}

/// `CtSlot::check`: binds a conntrack way's tag to its node and VIP, so a slot torn by a
/// concurrent rewrite does not validate.
#[inline(always)]
pub const fn ct_check(tag: u32, node: u32, vip: u32) -> u32 {
    fmix(mix(mix(mix(SEED ^ 0x0c7, tag), node), vip) ^ 12)
}

/// Route ID in `0..n` for a flow hash: Lemire's multiply-shift reduction (no division, and
/// uniform for any `n`, not only powers of two).
#[inline(always)]
pub const fn route_index(hash: u32, n: u32) -> u32 {
    (((hash as u64) * (n as u64)) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_index_is_in_range_and_uniform() {
        let n = 24u32;
        let mut buckets = [0u32; 24];
        for i in 0..240_000u32 {
            let h = flow_hash_v4(i, 0x0a00_0001, ports_word(i as u16, 80), 6);
            let r = route_index(h, n);
            assert!(r < n);
            buckets[r as usize] += 1;
        }
        for b in buckets {
            // 10,000 expected per bucket; allow 5%.
            assert!((9_500..=10_500).contains(&b), "bucket {b}");
        }
        assert_eq!(route_index(u32::MAX, 65536), 65535);
        assert_eq!(route_index(0, 65536), 0);
    }

    #[test]
    fn hash_depends_on_every_field() {
        let base = flow_hash_v4(1, 2, 3, 6);
        assert_ne!(base, flow_hash_v4(9, 2, 3, 6));
        assert_ne!(base, flow_hash_v4(1, 9, 3, 6));
        assert_ne!(base, flow_hash_v4(1, 2, 9, 6));
        assert_ne!(base, flow_hash_v4(1, 2, 3, 17));
        let a = [1, 2, 3, 4];
        let b = [5, 6, 7, 8];
        let h6 = flow_hash_v6(&a, &b, 3, 6);
        assert_ne!(h6, flow_hash_v6(&b, &a, 3, 6));
        assert_ne!(h6, flow_hash_v6(&a, &b, 4, 6));
        assert_ne!(addr_hash_v4(1), addr_hash_v4(2));
    }

    #[test]
    fn words_are_wire_bytes_little_endian() {
        assert_eq!(addr_word(&[10, 0, 0, 1]), 0x0100_000a);
        // Port 80 on the wire is [0x00, 0x50]; as a raw LE u16 that is 0x5000.
        let sport = u16::from_le_bytes(80u16.to_be_bytes());
        let dport = u16::from_le_bytes(443u16.to_be_bytes());
        assert_eq!(
            ports_word(sport, dport),
            u32::from_le_bytes([0x00, 0x50, 0x01, 0xbb])
        );
    }

    #[test]
    fn vip_cache_slots_spread() {
        // The ports of one address, and one port over many addresses, rarely share a slot.
        let size = crate::VIP_CACHE_SIZE as usize;
        let mut seen = [false; crate::VIP_CACHE_SIZE as usize];
        let mut collisions = 0;
        let a = addr_hash_v4(addr_word(&[10, 0, 0, 1]));
        for port in 1..=1024u16 {
            let s = vip_cache_slot(a, port.to_be(), 6) as usize;
            assert!(s < size);
            collisions += usize::from(seen[s]);
            seen[s] = true;
        }
        assert!(collisions < 160, "{collisions} collisions");
        let mut seen = [false; crate::VIP_CACHE_SIZE as usize];
        let mut collisions = 0;
        for host in 0..1024u32 {
            let addr = addr_word(&[10, 0, (host >> 8) as u8, host as u8]);
            let s = vip_cache_slot(addr_hash_v4(addr), 80u16.to_be(), 6);
            collisions += usize::from(seen[s as usize]);
            seen[s as usize] = true;
        }
        assert!(collisions < 160, "{collisions} collisions");
        assert_ne!(vip_cache_slot(a, 80, 6), vip_cache_slot(a, 80, 17));
    }

    #[test]
    fn flow_key_hash_matches_the_word_hashes() {
        let mut k = crate::FlowKey {
            src: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sport: 1234,
            dport: 80,
            proto: 6,
            family: crate::FAMILY_V4,
            _pad: [0; 2],
        };
        let (s, d) = (addr_word(&[10, 0, 0, 1]), addr_word(&[10, 0, 0, 2]));
        assert_eq!(
            flow_key_hash(&k, true),
            flow_hash_v4(s, d, ports_word(1234, 80), 6)
        );
        assert_eq!(flow_key_hash(&k, false), flow_hash_v4(s, d, 0, 6));
        k.family = crate::FAMILY_V6;
        assert_eq!(
            flow_key_hash(&k, true),
            flow_hash_v6(
                &addr_words(&k.src),
                &addr_words(&k.dst),
                ports_word(1234, 80),
                6
            )
        );
    }

    #[test]
    fn filter_slot_in_range() {
        for h in [0u32, 1, 63, 64, u32::MAX] {
            let (w, bit) = filter_slot(h);
            assert!(w < crate::VIP_FILTER_WORDS);
            assert_eq!(bit.count_ones(), 1);
        }
    }
}
