//! Headers the balancer writes: ipip outer headers and PMTU replies (docs/dataplane.md step 10
//! and "PMTU replies"), built as byte arrays so the host tests check them byte for byte.
use crate::{
    csum,
    parse::{ICMP_CHECK, ipv4},
};
use lb_common::GlobalConfig;

pub const TTL: u8 = 64;
/// ICMPv6 packet-too-big quotes this many bytes of the original packet.
pub const PTB_QUOTE: usize = 128;

/// ipip outer IPv4 source: the configured base with the flow hash in the host bits, so the
/// node's NIC spreads flows over its queues (RSS).
#[inline(always)]
pub fn outer_src4(cfg: &GlobalConfig, hash: u32) -> [u8; 4] {
    let h = hash.to_be_bytes();
    let (b, m) = (cfg.ipip_src4, cfg.ipip_src4_mask);
    [
        b[0] | (h[0] & m[0]),
        b[1] | (h[1] & m[1]),
        b[2] | (h[2] & m[2]),
        b[3] | (h[3] & m[3]),
    ]
}

/// ipip outer IPv6 source: the configured /96 prefix followed by the flow hash.
#[inline(always)]
pub fn outer_src6(cfg: &GlobalConfig, hash: u32) -> [u8; 16] {
    let mut s = cfg.ipip_src6;
    let h = hash.to_be_bytes();
    s[12] = h[0];
    s[13] = h[1];
    s[14] = h[2];
    s[15] = h[3];
    s
}

/// A 20-byte IPv4 header (no options, id 0, no fragment bits, TTL 64) with its checksum.
#[inline(always)]
pub fn ipv4_header(tos: u8, total: u16, proto: u8, src: [u8; 4], dst: [u8; 4]) -> [u8; 20] {
    let t = total.to_be_bytes();
    let mut h = [
        0x45, tos, t[0], t[1], 0, 0, 0, 0, TTL, proto, 0, 0, src[0], src[1], src[2], src[3],
        dst[0], dst[1], dst[2], dst[3],
    ];
    let c = csum::ipv4_header(&h).to_be_bytes();
    h[ipv4::CHECK] = c[0];
    h[ipv4::CHECK + 1] = c[1];
    h
}

/// The first 8 bytes of an IPv6 header (the addresses follow). `vtc` holds the traffic class
/// where an IPv6 header has it: low nibble of byte 0, high nibble of byte 1.
#[inline(always)]
pub fn ipv6_first8(vtc: [u8; 2], flow_label: u32, payload_len: u16, next_hdr: u8) -> [u8; 8] {
    let p = payload_len.to_be_bytes();
    [
        0x60 | (vtc[0] & 0x0f),
        (vtc[1] & 0xf0) | ((flow_label >> 16) & 0x0f) as u8,
        (flow_label >> 8) as u8,
        flow_label as u8,
        p[0],
        p[1],
        next_hdr,
        TTL,
    ]
}

/// ICMP frag-needed header (type 3 code 4) for a reply quoting bytes whose sum is `quote_sum`.
#[inline(always)]
pub fn icmp4_frag_needed(next_hop_mtu: u16, quote_sum: u64) -> [u8; 8] {
    let m = next_hop_mtu.to_be_bytes();
    let mut h = [3, 4, 0, 0, 0, 0, m[0], m[1]];
    let c = csum::finish(csum::sum_bytes(&h) + quote_sum).to_be_bytes();
    h[ICMP_CHECK] = c[0];
    h[ICMP_CHECK + 1] = c[1];
    h
}

/// ICMPv6 packet-too-big header (type 2 code 0). `sum` covers the pseudo-header
/// (`csum::icmp6_pseudo`) and the `PTB_QUOTE` quoted bytes.
#[inline(always)]
pub fn icmp6_packet_too_big(mtu: u32, sum: u64) -> [u8; 8] {
    let m = mtu.to_be_bytes();
    let mut h = [2, 0, 0, 0, m[0], m[1], m[2], m[3]];
    let c = csum::finish(sum + csum::sum_bytes(&h)).to_be_bytes();
    h[ICMP_CHECK] = c[0];
    h[ICMP_CHECK + 1] = c[1];
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csum::{fold, sum_bytes};

    fn words(a: &[u8; 16]) -> [u32; 4] {
        core::array::from_fn(|i| {
            u32::from_le_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]])
        })
    }

    fn cfg() -> GlobalConfig {
        GlobalConfig {
            ipip_src4: [10, 9, 0, 0],
            ipip_src4_mask: [0, 0, 0xff, 0xff],
            ipip_src6: [
                0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xaa, 0xbb, 0xcc, 0xdd,
            ],
            ..Default::default()
        }
    }

    #[test]
    fn outer_sources() {
        let h = 0x1234_5678;
        assert_eq!(outer_src4(&cfg(), h), [10, 9, 0x56, 0x78]);
        let s6 = outer_src6(&cfg(), h);
        assert_eq!(&s6[..12], &cfg().ipip_src6[..12]);
        assert_eq!(&s6[12..], &[0x12, 0x34, 0x56, 0x78]);
    }

    #[test]
    fn ipv4_header_is_valid() {
        let h = ipv4_header(0x28, 1520, 4, [10, 9, 1, 2], [192, 168, 1, 20]);
        assert_eq!(
            &h[..12],
            &[0x45, 0x28, 0x05, 0xf0, 0, 0, 0, 0, 64, 4, h[10], h[11]]
        );
        assert_eq!(fold(sum_bytes(&h)), 0xffff);
    }

    #[test]
    fn ipv6_header_fields() {
        // Inner first bytes 0x6a 0xb1: traffic class 0xab; only 20 bits of flow label.
        let h = ipv6_first8([0x6a, 0xb1], 0xf_1234 | 0xfff0_0000, 100, 41);
        assert_eq!(h, [0x6a, 0xbf, 0x12, 0x34, 0, 100, 41, 64]);
    }

    #[test]
    fn icmp_checksums_verify() {
        let quote: [u8; 28] = core::array::from_fn(|i| (i * 7) as u8);
        let h = icmp4_frag_needed(1480, sum_bytes(&quote));
        assert_eq!(&h[..2], &[3, 4]);
        assert_eq!(&h[4..], &[0, 0, 0x05, 0xc8]);
        assert_eq!(fold(sum_bytes(&h) + sum_bytes(&quote)), 0xffff);

        let q6: [u8; PTB_QUOTE] = core::array::from_fn(|i| (i * 13) as u8);
        let (s, d) = ([0x20u8; 16], [0x30u8; 16]);
        let pseudo = csum::icmp6_pseudo(&words(&s), &words(&d), 136);
        let h = icmp6_packet_too_big(1460, pseudo + sum_bytes(&q6));
        let total = sum_bytes(&s) + sum_bytes(&d) + 136 + 58 + sum_bytes(&h) + sum_bytes(&q6);
        assert_eq!(fold(total), 0xffff);
        assert_eq!(&h[4..], &1460u32.to_be_bytes());
    }
}
