//! Internet checksum (RFC 1071) arithmetic. Sums are kept in a `u64` of big-endian words and
//! folded at the end; 32-bit words may be added instead of 16-bit ones because
//! 2^16 = 1 (mod 2^16 - 1), which halves the loads over packet bytes.

/// Folds a running sum to 16 bits (not inverted).
#[inline(always)]
pub const fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum field value for a running sum (the sum must not include the field itself).
#[inline(always)]
pub const fn finish(sum: u64) -> u16 {
    !fold(sum)
}

/// Sum of `bytes` as big-endian 16-bit words (an odd last byte is padded with zero).
#[inline(always)]
pub fn sum_bytes(bytes: &[u8]) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u64;
        i += 2;
    }
    if i < bytes.len() {
        sum += (bytes[i] as u64) << 8;
    }
    sum
}

/// Header checksum of a 20-byte IPv4 header whose checksum field (bytes 10..12) is zero.
#[inline(always)]
pub fn ipv4_header(hdr: &[u8; 20]) -> u16 {
    finish(sum_bytes(hdr))
}

/// Sum of address words read little-endian from the wire (the `lb-common` convention).
#[inline(always)]
pub fn sum_le_words(w: &[u32; 4]) -> u64 {
    w[0].swap_bytes() as u64
        + w[1].swap_bytes() as u64
        + w[2].swap_bytes() as u64
        + w[3].swap_bytes() as u64
}

/// ICMPv6 pseudo-header sum: addresses (as little-endian wire words), upper-layer length and
/// next header 58.
#[inline(always)]
pub fn icmp6_pseudo(src: &[u32; 4], dst: &[u32; 4], len: u32) -> u64 {
    sum_le_words(src) + sum_le_words(dst) + (len >> 16) as u64 + (len & 0xffff) as u64 + 58
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: words 0001 f203 f4f5 f6f7 sum to ddf2 (folded).
        let b = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum_bytes(&b)), 0xddf2);
        assert_eq!(finish(sum_bytes(&b)), !0xddf2);
    }

    #[test]
    fn known_ipv4_header() {
        // Classic example header; its checksum is 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header(&h), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(fold(sum_bytes(&h)), 0xffff);
    }

    #[test]
    fn word32_sum_equals_word16_sum() {
        let b: [u8; 12] = [1, 2, 3, 4, 0xff, 0xfe, 0xfd, 0xfc, 9, 8, 7, 6];
        let mut s32 = 0u64;
        for c in b.chunks(4) {
            s32 += u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as u64;
        }
        assert_eq!(fold(s32), fold(sum_bytes(&b)));
    }

    #[test]
    fn le_words_sum_like_bytes() {
        let b: [u8; 16] = core::array::from_fn(|i| (i * 17 + 3) as u8);
        let w: [u32; 4] = core::array::from_fn(|i| {
            u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
        });
        assert_eq!(fold(sum_le_words(&w)), fold(sum_bytes(&b)));
    }

    #[test]
    fn odd_length_pads() {
        assert_eq!(sum_bytes(&[0x12]), 0x1200);
    }
}
