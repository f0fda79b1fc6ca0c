//! The flow hash, shared so userspace (`lb trace`, tests) predicts exactly what the kernel does.
//!
//! Inputs are raw wire bytes read as little-endian words (what a load from the packet gives on
//! `bpfel`), packed into 64-bit words: BPF registers are 64-bit, so a 64-bit multiply with the
//! high half folded down mixes as well as 32-bit Murmur rounds at a fraction of the
//! instructions (32-bit rotates and shifts in 64-bit registers each need masking). The flow hash
//! is keyed: the seed is random per balancer and persisted with its route tables (see
//! `docs/dataplane.md`), so a client cannot choose flows that share a conntrack set or a route.
//! Keyed, not cryptographic: the hash is never shown to clients.
//!
//! Changing any function here remaps every flow to another route (the persisted tables keep
//! route owners, not flows): the known-answer test below pins them.

/// Multipliers: the golden ratio and SplitMix64's two (odd, dense in bits).
const K1: u64 = 0x9e37_79b9_7f4a_7c15;
const K2: u64 = 0xbf58_476d_1ce4_e5b9;
const K3: u64 = 0x94d0_49bb_1331_11eb;

/// One 64-bit word into the state: xor it in, multiply (the high bits take every lower bit), and
/// fold the high half down. Each step is a bijection of `h ^ w`.
#[inline(always)]
const fn absorb(h: u64, w: u64) -> u64 {
    let x = (h ^ w).wrapping_mul(K2);
    x ^ (x >> 32)
}

/// The 32-bit result: the high half of one more multiply.
#[inline(always)]
const fn finish(h: u64) -> u32 {
    (h.wrapping_mul(K3) >> 32) as u32
}

/// The last word of a flow: ports, protocol and the address family (so a v4 and a v6 flow
/// with equal words never hash alike by construction).
#[inline(always)]
const fn tail(ports: u32, proto: u8, family: u8) -> u64 {
    (ports as u64) | ((proto as u64) << 32) | ((family as u64) << 40)
}

#[inline(always)]
const fn pair(lo: u32, hi: u32) -> u64 {
    (lo as u64) | ((hi as u64) << 32)
}

/// Murmur3-style 32-bit mixing, kept for [`ct_check`] (conntrack ways, off the hot path).
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

/// Hash of an IPv4 flow under `seed`. For source affinity pass `ports = 0`; for fragments
/// pass `ports = 0`.
#[inline(always)]
pub const fn flow_hash_v4(seed: u32, src: u32, dst: u32, ports: u32, proto: u8) -> u32 {
    let h = absorb(seed as u64, pair(src, dst));
    finish(absorb(h, tail(ports, proto, 4)))
}

/// Hash of an IPv6 flow (same conventions as [`flow_hash_v4`]).
#[inline(always)]
pub const fn flow_hash_v6(seed: u32, src: &[u32; 4], dst: &[u32; 4], ports: u32, proto: u8) -> u32 {
    let mut h = absorb(seed as u64, pair(src[0], src[1]));
    h = absorb(h, pair(src[2], src[3]));
    h = absorb(h, pair(dst[0], dst[1]));
    h = absorb(h, pair(dst[2], dst[3]));
    finish(absorb(h, tail(ports, proto, 6)))
}

/// Hash of a destination address, for the `VIP_FILTER` bitmap and `VIP_CACHE` (not keyed:
/// the VIP addresses are public, and a collision only costs a `VIPS` lookup). Fibonacci
/// hashing: the high half of the product depends on every address bit.
#[inline(always)]
pub const fn addr_hash_v4(addr: u32) -> u32 {
    ((addr as u64 | (4 << 40)).wrapping_mul(K1) >> 32) as u32
}

/// Hash of a destination IPv6 address, for the `VIP_FILTER` bitmap.
#[inline(always)]
pub const fn addr_hash_v6(addr: &[u32; 4]) -> u32 {
    let h = absorb(6 << 40, pair(addr[0], addr[1]));
    finish(absorb(h, pair(addr[2], addr[3])))
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
pub const fn flow_key_hash(seed: u32, key: &crate::FlowKey, with_ports: bool) -> u32 {
    let ports = if with_ports {
        ports_word(key.sport, key.dport)
    } else {
        0
    };
    if key.family == crate::FAMILY_V4 {
        let s = [key.src[0], key.src[1], key.src[2], key.src[3]];
        let d = [key.dst[0], key.dst[1], key.dst[2], key.dst[3]];
        flow_hash_v4(seed, addr_word(&s), addr_word(&d), ports, key.proto)
    } else {
        flow_hash_v6(
            seed,
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
    fmix(mix(mix(mix(0x9e37_79b9 ^ 0x0c7, tag), node), vip) ^ 12)
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
            let h = flow_hash_v4(0x5eed, i, 0x0a00_0001, ports_word(i as u16, 80), 6);
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
        let base = flow_hash_v4(7, 1, 2, 3, 6);
        assert_ne!(base, flow_hash_v4(8, 1, 2, 3, 6));
        assert_ne!(base, flow_hash_v4(7, 9, 2, 3, 6));
        assert_ne!(base, flow_hash_v4(7, 1, 9, 3, 6));
        assert_ne!(base, flow_hash_v4(7, 1, 2, 9, 6));
        assert_ne!(base, flow_hash_v4(7, 1, 2, 3, 17));
        let a = [1, 2, 3, 4];
        let b = [5, 6, 7, 8];
        let h6 = flow_hash_v6(7, &a, &b, 3, 6);
        assert_ne!(h6, flow_hash_v6(8, &a, &b, 3, 6));
        assert_ne!(h6, flow_hash_v6(7, &b, &a, 3, 6));
        assert_ne!(h6, flow_hash_v6(7, &a, &b, 4, 6));
        assert_ne!(addr_hash_v4(1), addr_hash_v4(2));
    }

    /// Known answers (computed by an independent Python model of the functions above): a
    /// changed hash silently remaps every flow of every persisted table (and
    /// every tracked flow's conntrack set), so a change must be deliberate and show up here.
    #[test]
    fn known_answers() {
        let (s, d) = (addr_word(&[198, 18, 0, 1]), addr_word(&[198, 18, 100, 1]));
        let ports = ports_word(40000u16.to_be(), 80u16.to_be());
        assert_eq!(flow_hash_v4(0x1234_5678, s, d, ports, 6), 0xfa91_523f);
        assert_eq!(flow_hash_v4(0x1234_5679, s, d, ports, 6), 0x4e78_41de);
        assert_eq!(flow_hash_v4(0x1234_5678, s, d, 0, 6), 0x6938_3eb4);
        let s6 = addr_words(&core::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).octets());
        let d6 =
            addr_words(&core::net::Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1).octets());
        assert_eq!(flow_hash_v6(0x1234_5678, &s6, &d6, ports, 6), 0xb848_0ccd);
        assert_eq!(addr_hash_v4(d), 0xb55c_8800);
        assert_eq!(addr_hash_v6(&d6), 0x4eea_afa7);
    }

    /// Every input bit flips about half of the output bits, whatever the seed (what keeps
    /// routes and conntrack sets evenly loaded for any client population).
    #[test]
    fn avalanche() {
        let mut x = 0x0123_4567_89ab_cdefu64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u32
        };
        for bit in 0..96 {
            let mut flipped = 0u32;
            const N: u32 = 2000;
            for _ in 0..N {
                let (seed, s, d, p) = (next(), next(), next(), next());
                let a = flow_hash_v4(seed, s, d, p, 6);
                let m = 1u32 << (bit % 32);
                let b = match bit / 32 {
                    0 => flow_hash_v4(seed, s ^ m, d, p, 6),
                    1 => flow_hash_v4(seed, s, d ^ m, p, 6),
                    _ => flow_hash_v4(seed, s, d, p ^ m, 6),
                };
                flipped += (a ^ b).count_ones();
            }
            let share = f64::from(flipped) / f64::from(N * 32);
            assert!((0.47..0.53).contains(&share), "input bit {bit}: {share}");
        }
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
            flow_key_hash(9, &k, true),
            flow_hash_v4(9, s, d, ports_word(1234, 80), 6)
        );
        assert_eq!(flow_key_hash(9, &k, false), flow_hash_v4(9, s, d, 0, 6));
        k.family = crate::FAMILY_V6;
        assert_eq!(
            flow_key_hash(9, &k, true),
            flow_hash_v6(
                9,
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
