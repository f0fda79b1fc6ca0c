//! Header layouts (offsets on the wire) and the validity rules of docs/dataplane.md steps 1-6
//! and 11, as functions over plain values read from the packet.
use core::mem::offset_of;

use lb_common::DropReason;
use network_types::{
    eth::EthHdr,
    icmp::Icmpv4Hdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

// Lengths and field offsets come from network-types' `repr(C)` header structs, as constants;
// the programs read fields with `pkt::ld` at `header + OFFSET`, not through the structs: their
// fields are byte arrays (alignment 1), so LLVM loads them a byte at a time (measured: the
// fast path's `Ipv4Hdr::tot_len()` costs 3 instructions more than `be16`).

pub const ETH_HLEN: usize = EthHdr::LEN;
pub const VLAN_HLEN: usize = VlanHdr::LEN;
/// Ethernet header plus one 802.1Q tag: the most we put in front of L3.
pub const ETH_VLAN_HLEN: usize = ETH_HLEN + VLAN_HLEN;

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;

pub const IPV4_HLEN: usize = Ipv4Hdr::LEN;
/// The longest IPv4 header: IHL 15.
pub const IPV4_MAX_HLEN: usize = 15 * 4;
pub const IPV6_HLEN: usize = Ipv6Hdr::LEN;
pub const TCP_HLEN: usize = TcpHdr::LEN;
pub const UDP_HLEN: usize = UdpHdr::LEN;
/// ICMP and ICMPv6 headers are the same 8 bytes: type, code, checksum, 4 type-specific.
pub const ICMP_HLEN: usize = Icmpv4Hdr::LEN;
/// Type, code and checksum: the part of an ICMP header every message has.
pub const ICMP_TYPE_CODE_CSUM: usize = offset_of!(Icmpv4Hdr, data);
/// The ICMP / ICMPv6 checksum.
pub const ICMP_CHECK: usize = offset_of!(Icmpv4Hdr, check);
/// The source and destination ports, the first 4 bytes of a TCP or UDP header (as one word:
/// `lb_common::hash::ports_word`).
pub const PORTS_LEN: usize = 4;
/// Bytes of the transport header an ICMP error must quote after the embedded IP header.
pub const ICMP_QUOTE_L4: usize = 8;

/// Ethernet header field offsets.
pub mod eth {
    use super::*;
    pub const DST: usize = offset_of!(EthHdr, dst_addr);
    pub const SRC: usize = offset_of!(EthHdr, src_addr);
    /// The ethertype; behind a source MAC, an 802.1Q tag (TPID 0x8100 and TCI) starts here.
    pub const ETHER_TYPE: usize = offset_of!(EthHdr, ether_type);
}

/// 802.1Q tag field offsets, from the end of the Ethernet header (whose ethertype field held
/// the TPID 0x8100): the TCI, then the inner ethertype.
pub mod vlan {
    use super::*;
    pub const ETHER_TYPE: usize = offset_of!(VlanHdr, ether_type);
}

/// IPv4 header field offsets.
pub mod ipv4 {
    use super::*;
    pub const VER_IHL: usize = offset_of!(Ipv4Hdr, vihl);
    pub const TOS: usize = offset_of!(Ipv4Hdr, tos);
    pub const TOT_LEN: usize = offset_of!(Ipv4Hdr, tot_len);
    pub const FRAG_OFF: usize = offset_of!(Ipv4Hdr, frags);
    pub const PROTO: usize = offset_of!(Ipv4Hdr, proto);
    pub const CHECK: usize = offset_of!(Ipv4Hdr, check);
    pub const SRC: usize = offset_of!(Ipv4Hdr, src_addr);
    pub const DST: usize = offset_of!(Ipv4Hdr, dst_addr);
    /// "Don't fragment" in the host-order frag_off word.
    pub const DF: u16 = 0x4000;
    /// "More fragments" and the fragment offset.
    pub const MF_OFFSET: u16 = 0x3fff;
    /// The fragment offset alone (non-zero: not the first fragment).
    pub const OFFSET: u16 = 0x1fff;
}

/// IPv6 header field offsets.
pub mod ipv6 {
    use super::*;
    /// Version, traffic class and flow label (the traffic class straddles bytes 0 and 1).
    pub const VCF: usize = offset_of!(Ipv6Hdr, vcf);
    pub const PAYLOAD_LEN: usize = offset_of!(Ipv6Hdr, payload_len);
    pub const NEXT_HDR: usize = offset_of!(Ipv6Hdr, next_hdr);
    pub const SRC: usize = offset_of!(Ipv6Hdr, src_addr);
    pub const DST: usize = offset_of!(Ipv6Hdr, dst_addr);
}

/// TCP header field offsets and flag bits.
pub mod tcp {
    use super::*;
    /// The ports word: source port, then destination port.
    pub const PORTS: usize = offset_of!(TcpHdr, source);
    pub const DST_PORT: usize = offset_of!(TcpHdr, dest);
    /// Data offset (high nibble) and the flags byte after it, as plain bytes: `decide` takes
    /// the flags byte whole (`TcpHdr`'s per-flag accessors compile to the same code, measured).
    pub const DOFF: usize = offset_of!(TcpHdr, _bitfield_1);
    pub const FLAGS: usize = DOFF + 1;
    pub use lb_common::decide::tcp_flags::{ACK, FIN, RST, SYN};
}

/// UDP header field offsets.
pub mod udp {
    use super::*;
    /// The ports word: source port, then destination port.
    pub const PORTS: usize = offset_of!(UdpHdr, src);
    pub const DST_PORT: usize = offset_of!(UdpHdr, dst);
    pub const LEN: usize = offset_of!(UdpHdr, len);
}

pub const PROTO_IPIP: u8 = 4;
pub const PROTO_IPV6_IN: u8 = 41;

/// IPv4 fixed-header checks: returns the header length (IHL*4).
/// `avail` = bytes of the frame from the start of the IP header.
#[inline(always)]
pub fn ipv4_header_len(ver_ihl: u8, avail: usize) -> Result<usize, DropReason> {
    let ihl_len = ((ver_ihl & 0x0f) as usize) * 4;
    if ver_ihl >> 4 != 4 || ihl_len < IPV4_HLEN || ihl_len > avail {
        return Err(DropReason::BadIpv4Header);
    }
    Ok(ihl_len)
}

/// IPv4 total-length checks: returns the transport length (total - IHL*4). Ethernet padding
/// after the total length is allowed.
#[inline(always)]
pub fn ipv4_l4_len(tot_len: u16, ihl_len: usize, avail: usize) -> Result<usize, DropReason> {
    let tot = tot_len as usize;
    if tot < ihl_len || tot > avail {
        return Err(DropReason::BadIpv4Length);
    }
    Ok(tot - ihl_len)
}

/// IPv6 payload-length check. `avail` = bytes of the frame from the start of the IP header.
#[inline(always)]
pub fn ipv6_l4_len(payload_len: u16, avail: usize) -> Result<usize, DropReason> {
    let plen = payload_len as usize;
    if IPV6_HLEN + plen > avail {
        return Err(DropReason::BadIpv6Length);
    }
    Ok(plen)
}

/// MF set or a non-zero fragment offset (`frag_off` in host order).
#[inline(always)]
pub const fn is_fragment(frag_off: u16) -> bool {
    frag_off & ipv4::MF_OFFSET != 0
}

/// TCP header checks against the IP payload length. `doff_byte` is byte 12 of the header.
#[inline(always)]
pub fn tcp_header(l4_len: usize, doff_byte: u8) -> Result<(), DropReason> {
    let doff = (doff_byte >> 4) as usize;
    if l4_len < TCP_HLEN || doff < 5 || doff * 4 > l4_len {
        return Err(DropReason::BadTcpHeader);
    }
    Ok(())
}

/// UDP header checks against the IP payload length.
#[inline(always)]
pub fn udp_header(l4_len: usize, udp_len: u16) -> Result<(), DropReason> {
    let ulen = udp_len as usize;
    if l4_len < UDP_HLEN || ulen < UDP_HLEN || ulen > l4_len {
        return Err(DropReason::BadUdpHeader);
    }
    Ok(())
}

/// ICMP destination unreachable (3) and time exceeded (11) quote a packet we forwarded.
#[inline(always)]
pub const fn is_icmp4_error(icmp_type: u8) -> bool {
    matches!(icmp_type, 3 | 11)
}

/// ICMPv6 errors: destination unreachable, packet too big, time exceeded, parameter problem.
#[inline(always)]
pub const fn is_icmp6_error(icmp_type: u8) -> bool {
    matches!(icmp_type, 1..=4)
}

/// An ICMP error's embedded IPv4 header: returns its length (IHL*4). The message (of `l4_len`
/// bytes) must hold the ICMP header, the embedded header and 8 bytes after it.
#[inline(always)]
pub fn icmp4_embedded(l4_len: usize, emb_ver_ihl: u8) -> Result<usize, DropReason> {
    let ihl_len = ((emb_ver_ihl & 0x0f) as usize) * 4;
    if emb_ver_ihl >> 4 != 4 || ihl_len < IPV4_HLEN || ICMP_HLEN + ihl_len + ICMP_QUOTE_L4 > l4_len
    {
        return Err(DropReason::BadIcmp);
    }
    Ok(ihl_len)
}

/// An ICMPv6 error must hold the ICMPv6 header, the embedded IPv6 header and 8 bytes after it.
#[inline(always)]
pub fn icmp6_embedded(l4_len: usize) -> Result<(), DropReason> {
    if ICMP_HLEN + IPV6_HLEN + ICMP_QUOTE_L4 > l4_len {
        return Err(DropReason::BadIcmp);
    }
    Ok(())
}

/// The client-to-VIP ports word (see `lb_common::hash::ports_word`) of an ICMP error, whose
/// embedded header is VIP-to-client: swap the two 16-bit halves.
#[inline(always)]
pub const fn reverse_ports_word(embedded: u32) -> u32 {
    embedded.rotate_left(16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::hash::ports_word;

    /// network-types' layouts are the wire's (RFC 791, 8200, 793, 768, 802.1Q).
    #[test]
    fn layouts_are_the_wire_offsets() {
        assert_eq!((ETH_HLEN, VLAN_HLEN, ETH_VLAN_HLEN), (14, 4, 18));
        assert_eq!(
            (eth::DST, eth::SRC, eth::ETHER_TYPE, vlan::ETHER_TYPE),
            (0, 6, 12, 2)
        );
        assert_eq!((IPV4_HLEN, IPV6_HLEN, TCP_HLEN, UDP_HLEN), (20, 40, 20, 8));
        assert_eq!((ICMP_HLEN, ICMP_TYPE_CODE_CSUM, ICMP_CHECK), (8, 4, 2));
        let v4 = [
            ipv4::VER_IHL,
            ipv4::TOS,
            ipv4::TOT_LEN,
            ipv4::FRAG_OFF,
            ipv4::PROTO,
            ipv4::CHECK,
            ipv4::SRC,
            ipv4::DST,
        ];
        assert_eq!(v4, [0, 1, 2, 6, 9, 10, 12, 16]);
        let v6 = [
            ipv6::VCF,
            ipv6::PAYLOAD_LEN,
            ipv6::NEXT_HDR,
            ipv6::SRC,
            ipv6::DST,
        ];
        assert_eq!(v6, [0, 4, 6, 8, 24]);
        assert_eq!(
            (tcp::PORTS, tcp::DST_PORT, tcp::DOFF, tcp::FLAGS),
            (0, 2, 12, 13)
        );
        assert_eq!((udp::PORTS, udp::DST_PORT, udp::LEN), (0, 2, 4));
    }

    #[test]
    fn ipv4_header_rules() {
        assert_eq!(ipv4_header_len(0x45, 20), Ok(20));
        assert_eq!(ipv4_header_len(0x46, 24), Ok(24));
        assert_eq!(ipv4_header_len(0x46, 23), Err(DropReason::BadIpv4Header));
        assert_eq!(ipv4_header_len(0x44, 60), Err(DropReason::BadIpv4Header));
        assert_eq!(ipv4_header_len(0x65, 60), Err(DropReason::BadIpv4Header));
        assert_eq!(ipv4_l4_len(40, 20, 46), Ok(20)); // Ethernet padding is fine
        assert_eq!(ipv4_l4_len(19, 20, 46), Err(DropReason::BadIpv4Length));
        assert_eq!(ipv4_l4_len(47, 20, 46), Err(DropReason::BadIpv4Length));
    }

    #[test]
    fn ipv6_length_rule() {
        assert_eq!(ipv6_l4_len(20, 60), Ok(20));
        assert_eq!(ipv6_l4_len(21, 60), Err(DropReason::BadIpv6Length));
    }

    #[test]
    fn fragments() {
        assert!(!is_fragment(0x4000)); // DF only
        assert!(is_fragment(0x2000)); // MF
        assert!(is_fragment(0x0001)); // offset
        assert!(!is_fragment(0));
    }

    #[test]
    fn l4_rules() {
        assert_eq!(tcp_header(20, 0x50), Ok(()));
        assert_eq!(tcp_header(19, 0x50), Err(DropReason::BadTcpHeader));
        assert_eq!(tcp_header(40, 0x40), Err(DropReason::BadTcpHeader));
        assert_eq!(tcp_header(23, 0x60), Err(DropReason::BadTcpHeader));
        assert_eq!(udp_header(8, 8), Ok(()));
        assert_eq!(udp_header(7, 8), Err(DropReason::BadUdpHeader));
        assert_eq!(udp_header(20, 7), Err(DropReason::BadUdpHeader));
        assert_eq!(udp_header(20, 21), Err(DropReason::BadUdpHeader));
    }

    #[test]
    fn icmp_rules() {
        assert!(is_icmp4_error(3) && is_icmp4_error(11) && !is_icmp4_error(8));
        assert!(is_icmp6_error(2) && !is_icmp6_error(128) && !is_icmp6_error(0));
        assert_eq!(icmp4_embedded(36, 0x45), Ok(20));
        assert_eq!(icmp4_embedded(35, 0x45), Err(DropReason::BadIcmp));
        assert_eq!(icmp4_embedded(40, 0x46), Ok(24));
        assert_eq!(icmp4_embedded(60, 0x44), Err(DropReason::BadIcmp));
        assert_eq!(icmp6_embedded(56), Ok(()));
        assert_eq!(icmp6_embedded(55), Err(DropReason::BadIcmp));
    }

    #[test]
    fn icmp_ports_are_reversed() {
        let vip_port = u16::from_ne_bytes(443u16.to_be_bytes());
        let client_port = u16::from_ne_bytes(5555u16.to_be_bytes());
        // The embedded header is VIP -> client.
        let embedded = ports_word(vip_port, client_port);
        assert_eq!(
            reverse_ports_word(embedded),
            ports_word(client_port, vip_port)
        );
    }
}
