//! A byte-exact packet builder for the fixture tests, the fuzzer and the benchmarks.
//!
//! [`Packet`] describes one frame (Ethernet, optional 802.1Q tag, IPv4 or IPv6, then TCP, UDP,
//! ICMP/ICMPv6 or raw bytes) and [`Packet::build`] serialises it with correct IPv4 header,
//! TCP, UDP and ICMP checksums. Malformed frames are made by building a valid one and then
//! patching or truncating the bytes ([`set_u16`], [`Vec::truncate`]).
//!
//! The second half holds the expected-output builders: what the balancer must send for a given
//! input frame (dsr-l2 rewrite, ipip / ip6ip6 encapsulation, ICMP frag-needed and ICMPv6
//! packet-too-big replies, node-side decapsulation), exactly as `docs/dataplane.md` words it.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An Ethernet address.
pub type Mac = [u8; 6];

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_GRE: u8 = 47;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_HOPOPTS: u8 = 0;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// Name of an XDP verdict, for messages.
pub fn verdict_name(v: u32) -> &'static str {
    match v {
        XDP_ABORTED => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        4 => "XDP_REDIRECT",
        _ => "XDP_?",
    }
}

// ---------------------------------------------------------------------------------------------
// Checksums (RFC 1071).
// ---------------------------------------------------------------------------------------------

/// Adds `data` to a running one's-complement sum as big-endian 16-bit words (an odd trailing
/// byte is padded with zero). Chain calls only at even offsets.
pub fn csum_add(sum: u64, data: &[u8]) -> u64 {
    let mut s = sum;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        s += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        s += u64::from(u16::from_be_bytes([*b, 0]));
    }
    s
}

/// Folds a running sum to 16 bits and complements it: the value to store in a checksum field.
pub fn csum_fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    csum_fold(csum_add(0, data))
}

/// Running sum of the IPv4 pseudo-header.
pub fn pseudo_v4(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u64 {
    let mut s = csum_add(0, &src);
    s = csum_add(s, &dst);
    s + u64::from(proto) + len as u64
}

/// Running sum of the IPv6 pseudo-header.
pub fn pseudo_v6(src: [u8; 16], dst: [u8; 16], next: u8, len: usize) -> u64 {
    let mut s = csum_add(0, &src);
    s = csum_add(s, &dst);
    s + u64::from(next) + len as u64
}

/// IPv4 header checksum of `hdr` (its checksum field, bytes 10..12, is treated as zero).
pub fn ipv4_header_checksum(hdr: &[u8]) -> u16 {
    let mut h = hdr.to_vec();
    h[10] = 0;
    h[11] = 0;
    checksum(&h)
}

// ---------------------------------------------------------------------------------------------
// Small byte helpers.
// ---------------------------------------------------------------------------------------------

/// Writes a big-endian u16 at `off`.
pub fn set_u16(buf: &mut [u8], off: usize, v: u16) {
    buf[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

/// Reads a big-endian u16 at `off`.
pub fn get_u16(buf: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([buf[off], buf[off + 1]])
}

/// Ethernet header (with the optional 802.1Q tag) in front of `ethertype`.
pub fn eth_header(dst: Mac, src: Mac, vlan: Option<u16>, ethertype: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(18);
    b.extend_from_slice(&dst);
    b.extend_from_slice(&src);
    if let Some(tci) = vlan {
        b.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
        b.extend_from_slice(&tci.to_be_bytes());
    }
    b.extend_from_slice(&ethertype.to_be_bytes());
    b
}

/// Length of the L2 header of `frame` (14, or 18 with one 802.1Q tag) and the ethertype after
/// it, as the balancer parses it (one tag skipped). `None` when the frame is too short.
pub fn l2(frame: &[u8]) -> Option<(usize, u16)> {
    if frame.len() < 14 {
        return None;
    }
    let et = get_u16(frame, 12);
    if et == ETH_P_8021Q {
        if frame.len() < 18 {
            return None;
        }
        return Some((18, get_u16(frame, 16)));
    }
    Some((14, et))
}

/// The IP destination of a frame as the balancer reads it (steps 1-2 of the spec): Ethernet,
/// one optional 802.1Q tag, then IPv4 (20-byte header present) or IPv6 (40 bytes present).
/// `None` when the frame carries no readable IPv4/IPv6 destination.
pub fn frame_dst(frame: &[u8]) -> Option<IpAddr> {
    let (off, et) = l2(frame)?;
    match et {
        ETH_P_IPV4 if frame.len() >= off + 20 => {
            let d = &frame[off + 16..off + 20];
            Some(IpAddr::V4(Ipv4Addr::new(d[0], d[1], d[2], d[3])))
        }
        ETH_P_IPV6 if frame.len() >= off + 40 => {
            let mut d = [0u8; 16];
            d.copy_from_slice(&frame[off + 24..off + 40]);
            Some(IpAddr::V6(Ipv6Addr::from(d)))
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The builder.
// ---------------------------------------------------------------------------------------------

/// IPv4 header fields. `proto` `None` takes the protocol from the L4 part.
#[derive(Clone, Debug)]
pub struct Ipv4 {
    pub tos: u8,
    pub id: u16,
    pub df: bool,
    pub mf: bool,
    /// Fragment offset in 8-byte units.
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: Option<u8>,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// Options, padded with zero (end-of-list) to a multiple of 4 when built.
    pub options: Vec<u8>,
}

/// IPv6 header fields. `next` `None` takes the next header from the L4 part.
#[derive(Clone, Debug)]
pub struct Ipv6 {
    pub tc: u8,
    pub flow: u32,
    pub hop: u8,
    pub next: Option<u8>,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

#[derive(Clone, Debug)]
pub enum Ip {
    V4(Ipv4),
    V6(Ipv6),
}

#[derive(Clone, Debug)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// Options, padded with zero to a multiple of 4 when built.
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct Udp {
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
}

/// ICMP (IPv4) or ICMPv6, chosen by the IP version: type, code, the 4 bytes after the
/// checksum, and the body (for errors, the quoted packet).
#[derive(Clone, Debug)]
pub struct Icmp {
    pub ty: u8,
    pub code: u8,
    pub rest: [u8; 4],
    pub body: Vec<u8>,
}

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp(Tcp),
    Udp(Udp),
    Icmp(Icmp),
    /// Raw bytes with an explicit protocol number (fragments, GRE, extension headers...).
    Raw(u8, Vec<u8>),
}

impl L4 {
    fn proto(&self, v6: bool) -> u8 {
        match self {
            L4::Tcp(_) => IPPROTO_TCP,
            L4::Udp(_) => IPPROTO_UDP,
            L4::Icmp(_) if v6 => IPPROTO_ICMPV6,
            L4::Icmp(_) => IPPROTO_ICMP,
            L4::Raw(p, _) => *p,
        }
    }
}

/// One frame. Build with the constructors and chained setters, serialise with [`Packet::build`].
#[derive(Clone, Debug)]
pub struct Packet {
    pub dst_mac: Mac,
    pub src_mac: Mac,
    /// 802.1Q TCI.
    pub vlan: Option<u16>,
    pub ip: Ip,
    pub l4: L4,
}

/// MACs used unless a test sets others.
pub const DEFAULT_SRC_MAC: Mac = [0x02, 0xc1, 0x1e, 0x47, 0x00, 0x01];
pub const DEFAULT_DST_MAC: Mac = [0x02, 0x1b, 0x00, 0x00, 0x00, 0x01];

fn ip_header(src: IpAddr, dst: IpAddr) -> Ip {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ip::V4(Ipv4 {
            tos: 0,
            id: 0x1234,
            df: true,
            mf: false,
            frag_off: 0,
            ttl: 64,
            proto: None,
            src: s.octets(),
            dst: d.octets(),
            options: Vec::new(),
        }),
        (IpAddr::V6(s), IpAddr::V6(d)) => Ip::V6(Ipv6 {
            tc: 0,
            flow: 0,
            hop: 64,
            next: None,
            src: s.octets(),
            dst: d.octets(),
        }),
        _ => panic!("mixed address families: {src} -> {dst}"),
    }
}

impl Packet {
    /// A frame with the given addresses and L4 part, default MACs, no tag; IPv4 has DF set.
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        Self {
            dst_mac: DEFAULT_DST_MAC,
            src_mac: DEFAULT_SRC_MAC,
            vlan: None,
            ip: ip_header(src, dst),
            l4,
        }
    }

    /// A TCP segment with `flags`, no payload.
    pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8) -> Self {
        Self::new(
            src,
            dst,
            L4::Tcp(Tcp {
                sport,
                dport,
                seq: 0x0102_0304,
                ack: if flags & TCP_ACK != 0 { 0x0a0b_0c0d } else { 0 },
                flags,
                window: 0xfaf0,
                options: Vec::new(),
                payload: Vec::new(),
            }),
        )
    }

    /// A UDP datagram, no payload.
    pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Self {
        Self::new(
            src,
            dst,
            L4::Udp(Udp {
                sport,
                dport,
                payload: Vec::new(),
            }),
        )
    }

    /// An ICMP (IPv4) or ICMPv6 message.
    pub fn icmp(src: IpAddr, dst: IpAddr, ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Self {
        Self::new(
            src,
            dst,
            L4::Icmp(Icmp {
                ty,
                code,
                rest,
                body: body.to_vec(),
            }),
        )
    }

    /// An ICMP error (IPv4 type/code) quoting `quoted` (an IP packet, e.g. [`Packet::l3`] of
    /// the packet that caused it, possibly cut).
    pub fn icmp_error(src: IpAddr, dst: IpAddr, ty: u8, code: u8, quoted: &[u8]) -> Self {
        Self::icmp(src, dst, ty, code, [0; 4], quoted)
    }

    /// Raw L4 bytes with an explicit protocol / next header.
    pub fn raw(src: IpAddr, dst: IpAddr, proto: u8, bytes: &[u8]) -> Self {
        Self::new(src, dst, L4::Raw(proto, bytes.to_vec()))
    }

    // --- chained setters ---------------------------------------------------------------------

    pub fn macs(mut self, dst: Mac, src: Mac) -> Self {
        self.dst_mac = dst;
        self.src_mac = src;
        self
    }

    pub fn vlan(mut self, tci: u16) -> Self {
        self.vlan = Some(tci);
        self
    }

    /// TCP/UDP payload, ICMP body, or raw bytes.
    pub fn payload(mut self, p: &[u8]) -> Self {
        match &mut self.l4 {
            L4::Tcp(t) => t.payload = p.to_vec(),
            L4::Udp(u) => u.payload = p.to_vec(),
            L4::Icmp(i) => i.body = p.to_vec(),
            L4::Raw(_, b) => *b = p.to_vec(),
        }
        self
    }

    /// A payload of `n` bytes of a recognisable pattern.
    pub fn payload_len(self, n: usize) -> Self {
        let p: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        self.payload(&p)
    }

    /// IPv4 TOS or IPv6 traffic class.
    pub fn tos(mut self, tos: u8) -> Self {
        match &mut self.ip {
            Ip::V4(h) => h.tos = tos,
            Ip::V6(h) => h.tc = tos,
        }
        self
    }

    pub fn flow_label(mut self, flow: u32) -> Self {
        if let Ip::V6(h) = &mut self.ip {
            h.flow = flow & 0xfffff;
        }
        self
    }

    pub fn ttl(mut self, ttl: u8) -> Self {
        match &mut self.ip {
            Ip::V4(h) => h.ttl = ttl,
            Ip::V6(h) => h.hop = ttl,
        }
        self
    }

    fn v4(&mut self) -> &mut Ipv4 {
        match &mut self.ip {
            Ip::V4(h) => h,
            Ip::V6(_) => panic!("IPv4-only setter on an IPv6 packet"),
        }
    }

    pub fn df(mut self, df: bool) -> Self {
        self.v4().df = df;
        self
    }

    pub fn mf(mut self, mf: bool) -> Self {
        self.v4().mf = mf;
        self
    }

    /// Fragment offset in 8-byte units.
    pub fn frag_offset(mut self, units: u16) -> Self {
        self.v4().frag_off = units;
        self
    }

    pub fn ip_id(mut self, id: u16) -> Self {
        self.v4().id = id;
        self
    }

    pub fn ip_options(mut self, opts: &[u8]) -> Self {
        self.v4().options = opts.to_vec();
        self
    }

    /// Overrides the IP protocol / IPv6 next header (the L4 bytes stay as they are).
    pub fn proto(mut self, p: u8) -> Self {
        match &mut self.ip {
            Ip::V4(h) => h.proto = Some(p),
            Ip::V6(h) => h.next = Some(p),
        }
        self
    }

    pub fn tcp_options(mut self, opts: &[u8]) -> Self {
        if let L4::Tcp(t) = &mut self.l4 {
            t.options = opts.to_vec();
        }
        self
    }

    pub fn seq(mut self, seq: u32, ack: u32) -> Self {
        if let L4::Tcp(t) = &mut self.l4 {
            t.seq = seq;
            t.ack = ack;
        }
        self
    }

    // --- serialisation -----------------------------------------------------------------------

    /// Source and destination addresses.
    pub fn addrs(&self) -> (IpAddr, IpAddr) {
        match &self.ip {
            Ip::V4(h) => (
                IpAddr::V4(Ipv4Addr::from(h.src)),
                IpAddr::V4(Ipv4Addr::from(h.dst)),
            ),
            Ip::V6(h) => (
                IpAddr::V6(Ipv6Addr::from(h.src)),
                IpAddr::V6(Ipv6Addr::from(h.dst)),
            ),
        }
    }

    /// The L4 bytes with checksums computed over the pseudo-header of this packet's addresses.
    pub fn l4_bytes(&self) -> Vec<u8> {
        let v6 = matches!(self.ip, Ip::V6(_));
        let pseudo = |proto: u8, len: usize| match &self.ip {
            Ip::V4(h) => pseudo_v4(h.src, h.dst, proto, len),
            Ip::V6(h) => pseudo_v6(h.src, h.dst, proto, len),
        };
        match &self.l4 {
            L4::Tcp(t) => {
                let mut opts = t.options.clone();
                while !opts.len().is_multiple_of(4) {
                    opts.push(0);
                }
                let doff = (20 + opts.len()) / 4;
                let mut b = Vec::with_capacity(doff * 4 + t.payload.len());
                b.extend_from_slice(&t.sport.to_be_bytes());
                b.extend_from_slice(&t.dport.to_be_bytes());
                b.extend_from_slice(&t.seq.to_be_bytes());
                b.extend_from_slice(&t.ack.to_be_bytes());
                b.push((doff as u8) << 4);
                b.push(t.flags);
                b.extend_from_slice(&t.window.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
                b.extend_from_slice(&opts);
                b.extend_from_slice(&t.payload);
                let c = csum_fold(csum_add(pseudo(IPPROTO_TCP, b.len()), &b));
                set_u16(&mut b, 16, c);
                b
            }
            L4::Udp(u) => {
                let len = 8 + u.payload.len();
                let mut b = Vec::with_capacity(len);
                b.extend_from_slice(&u.sport.to_be_bytes());
                b.extend_from_slice(&u.dport.to_be_bytes());
                b.extend_from_slice(&(len as u16).to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                b.extend_from_slice(&u.payload);
                let mut c = csum_fold(csum_add(pseudo(IPPROTO_UDP, len), &b));
                if c == 0 {
                    c = 0xffff; // RFC 768: a computed zero is sent as all ones.
                }
                set_u16(&mut b, 6, c);
                b
            }
            L4::Icmp(i) => {
                let mut b = vec![i.ty, i.code, 0, 0];
                b.extend_from_slice(&i.rest);
                b.extend_from_slice(&i.body);
                let start = if v6 {
                    pseudo(IPPROTO_ICMPV6, b.len())
                } else {
                    0
                };
                let c = csum_fold(csum_add(start, &b));
                set_u16(&mut b, 2, c);
                b
            }
            L4::Raw(_, bytes) => bytes.clone(),
        }
    }

    /// The IP packet (header + L4), without Ethernet.
    pub fn l3(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        match &self.ip {
            Ip::V4(h) => {
                let mut b = ipv4_header_bytes(h, self.l4.proto(false), l4.len());
                b.extend_from_slice(&l4);
                b
            }
            Ip::V6(h) => {
                let mut b = Vec::with_capacity(40 + l4.len());
                let first = (6u32 << 28) | (u32::from(h.tc) << 20) | (h.flow & 0xfffff);
                b.extend_from_slice(&first.to_be_bytes());
                b.extend_from_slice(&(l4.len() as u16).to_be_bytes());
                b.push(h.next.unwrap_or(self.l4.proto(true)));
                b.push(h.hop);
                b.extend_from_slice(&h.src);
                b.extend_from_slice(&h.dst);
                b.extend_from_slice(&l4);
                b
            }
        }
    }

    /// The whole frame.
    pub fn build(&self) -> Vec<u8> {
        let et = match self.ip {
            Ip::V4(_) => ETH_P_IPV4,
            Ip::V6(_) => ETH_P_IPV6,
        };
        let mut b = eth_header(self.dst_mac, self.src_mac, self.vlan, et);
        b.extend_from_slice(&self.l3());
        b
    }
}

fn ipv4_header_bytes(h: &Ipv4, l4_proto: u8, l4_len: usize) -> Vec<u8> {
    let mut opts = h.options.clone();
    while !opts.len().is_multiple_of(4) {
        opts.push(0);
    }
    let hl = 20 + opts.len();
    let mut b = Vec::with_capacity(hl);
    b.push(0x40 | (hl / 4) as u8);
    b.push(h.tos);
    b.extend_from_slice(&((hl + l4_len) as u16).to_be_bytes());
    b.extend_from_slice(&h.id.to_be_bytes());
    let frag = (u16::from(h.df) << 14) | (u16::from(h.mf) << 13) | (h.frag_off & 0x1fff);
    b.extend_from_slice(&frag.to_be_bytes());
    b.push(h.ttl);
    b.push(h.proto.unwrap_or(l4_proto));
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&h.src);
    b.extend_from_slice(&h.dst);
    b.extend_from_slice(&opts);
    let c = checksum(&b);
    set_u16(&mut b, 10, c);
    b
}

/// Recomputes the IPv4 header checksum of the header starting at `off` (after patching fields).
pub fn fix_ipv4_checksum(frame: &mut [u8], off: usize) {
    let ihl = usize::from(frame[off] & 0x0f) * 4;
    let c = ipv4_header_checksum(&frame[off..off + ihl]);
    set_u16(frame, off + 10, c);
}

/// An ARP request frame (broadcast) from `sha`/`spa` asking for `tpa`.
pub fn arp_request(sha: Mac, spa: Ipv4Addr, tpa: Ipv4Addr, vlan: Option<u16>) -> Vec<u8> {
    let mut b = eth_header([0xff; 6], sha, vlan, ETH_P_ARP);
    b.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]);
    b.extend_from_slice(&sha);
    b.extend_from_slice(&spa.octets());
    b.extend_from_slice(&[0; 6]);
    b.extend_from_slice(&tpa.octets());
    b
}

/// An IPv4 fragment series of a TCP/UDP packet: the L4 bytes (header + payload, checksummed as
/// a whole) split into fragments of `frag_len` bytes (a multiple of 8 except the last). Each
/// fragment is a full frame with MF/offset set; the L4 header is only in the first.
pub fn fragments(p: &Packet, frag_len: usize) -> Vec<Vec<u8>> {
    assert!(frag_len.is_multiple_of(8) && frag_len > 0);
    let l4 = p.l4_bytes();
    let proto = p.l4.proto(false);
    let chunks: Vec<&[u8]> = l4.chunks(frag_len).collect();
    let last = chunks.len() - 1;
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut f = p.clone();
            f.l4 = L4::Raw(proto, c.to_vec());
            let f = f
                .mf(i != last)
                .frag_offset((i * frag_len / 8) as u16)
                .df(false);
            f.build()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Expected outputs (docs/dataplane.md, step 10, PMTU replies, decap).
// ---------------------------------------------------------------------------------------------

/// dsr-l2: Ethernet dst = node MAC, src = the frame's old dst MAC, everything else unchanged.
pub fn dsr_rewrite(frame: &[u8], node_mac: Mac) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[6..12].copy_from_slice(&frame[0..6]);
    out[0..6].copy_from_slice(&node_mac);
    out
}

/// The ipip outer IPv4 source: `base[i] | (hash.to_be_bytes()[i] & mask[i])`.
pub fn ipip_src4(base: [u8; 4], mask: [u8; 4], hash: u32) -> [u8; 4] {
    let h = hash.to_be_bytes();
    std::array::from_fn(|i| base[i] | (h[i] & mask[i]))
}

/// The ipip outer IPv6 source: `prefix[0..12] ++ hash.to_be_bytes()`.
pub fn ipip_src6(prefix: [u8; 16], hash: u32) -> [u8; 16] {
    let mut a = prefix;
    a[12..].copy_from_slice(&hash.to_be_bytes());
    a
}

/// The new Ethernet header of a forwarded ipip frame: dst = `gw`, src = old dst MAC, tag kept.
fn encap_eth(frame: &[u8], gw: Mac) -> (Vec<u8>, usize) {
    let (off, _) = l2(frame).expect("frame has an Ethernet header");
    let mut e = frame[..off].to_vec();
    e[6..12].copy_from_slice(&frame[0..6]);
    e[0..6].copy_from_slice(&gw);
    (e, off)
}

/// ipip, IPv4 VIP: new Ethernet header, then the outer IPv4 header (`0x45`, TOS copied, total =
/// inner total + 20, id 0, frag_off 0, TTL 64, protocol 4, checksum), then the frame's IP
/// packet and anything after it, unchanged.
pub fn ipip4_encap(frame: &[u8], gw: Mac, src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let (mut out, off) = encap_eth(frame, gw);
    let inner = &frame[off..];
    let total = get_u16(inner, 2) + 20;
    let mut h = vec![0x45, inner[1]];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0, 64, IPPROTO_IPIP, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = checksum(&h);
    set_u16(&mut h, 10, c);
    out.extend_from_slice(&h);
    out.extend_from_slice(inner);
    out
}

/// ipip, IPv6 VIP: new Ethernet header, then the outer IPv6 header (traffic class copied,
/// flow label = `hash & 0xfffff`, payload length = 40 + inner payload length, next header 41,
/// hop limit 64), then the frame's IPv6 packet unchanged.
pub fn ipip6_encap(frame: &[u8], gw: Mac, src: [u8; 16], dst: [u8; 16], hash: u32) -> Vec<u8> {
    let (mut out, off) = encap_eth(frame, gw);
    let inner = &frame[off..];
    let tc = ((inner[0] & 0x0f) << 4) | (inner[1] >> 4);
    let first = (6u32 << 28) | (u32::from(tc) << 20) | (hash & 0xfffff);
    out.extend_from_slice(&first.to_be_bytes());
    out.extend_from_slice(&(get_u16(inner, 4) + 40).to_be_bytes());
    out.push(IPPROTO_IPV6);
    out.push(64);
    out.extend_from_slice(&src);
    out.extend_from_slice(&dst);
    out.extend_from_slice(inner);
    out
}

/// Swapped Ethernet header of a reply (tag kept) and the L2 length.
fn reply_eth(frame: &[u8]) -> (Vec<u8>, usize) {
    let (off, _) = l2(frame).expect("frame has an Ethernet header");
    let mut e = frame[..off].to_vec();
    e[0..6].copy_from_slice(&frame[6..12]);
    e[6..12].copy_from_slice(&frame[0..6]);
    (e, off)
}

/// IPv4 ICMP frag-needed reply to `frame` for path MTU `mtu` (next-hop MTU `mtu - 20`).
pub fn icmp4_frag_needed(frame: &[u8], mtu: u16) -> Vec<u8> {
    let (mut out, off) = reply_eth(frame);
    let ip = &frame[off..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let quote = &ip[..ihl + 8];
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&(mtu - 20).to_be_bytes());
    icmp.extend_from_slice(quote);
    let c = checksum(&icmp);
    set_u16(&mut icmp, 2, c);
    let total = (20 + icmp.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0, 64, IPPROTO_ICMP, 0, 0]);
    h.extend_from_slice(&ip[16..20]); // source = original destination (the VIP)
    h.extend_from_slice(&ip[12..16]); // destination = original source
    let c = checksum(&h);
    set_u16(&mut h, 10, c);
    out.extend_from_slice(&h);
    out.extend_from_slice(&icmp);
    out
}

/// ICMPv6 packet-too-big reply to `frame` for path MTU `mtu` (MTU field `mtu - 40`), quoting
/// the first 128 bytes of the original IPv6 packet.
pub fn icmp6_packet_too_big(frame: &[u8], mtu: u16) -> Vec<u8> {
    let (mut out, off) = reply_eth(frame);
    let ip = &frame[off..];
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&ip[24..40]); // original destination
    dst.copy_from_slice(&ip[8..24]); // original source
    let mut icmp = vec![2, 0, 0, 0];
    icmp.extend_from_slice(&u32::from(mtu - 40).to_be_bytes());
    icmp.extend_from_slice(&ip[..128]);
    let c = csum_fold(csum_add(
        pseudo_v6(src, dst, IPPROTO_ICMPV6, icmp.len()),
        &icmp,
    ));
    set_u16(&mut icmp, 2, c);
    out.extend_from_slice(&(6u32 << 28).to_be_bytes());
    out.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    out.push(IPPROTO_ICMPV6);
    out.push(64);
    out.extend_from_slice(&src);
    out.extend_from_slice(&dst);
    out.extend_from_slice(&icmp);
    out
}

/// Node-side decap: the outer IP header (IPv4 IHL*4 bytes, or IPv6 40 bytes) removed, the
/// Ethernet header and tag moved up; everything else unchanged.
pub fn decap(frame: &[u8]) -> Vec<u8> {
    let (off, et) = l2(frame).expect("frame has an Ethernet header");
    let outer = match et {
        ETH_P_IPV4 => usize::from(frame[off] & 0x0f) * 4,
        ETH_P_IPV6 => 40,
        _ => panic!("decap of a non-IP frame"),
    };
    let mut out = frame[..off].to_vec();
    out.extend_from_slice(&frame[off + outer..]);
    out
}

/// Wraps the IP packet of `frame` in an outer IPv4 (protocol 4) or IPv6 (next header 41)
/// header from `src` to `dst` the way a balancer would (checksums correct); Ethernet kept.
pub fn encapsulate(frame: &[u8], src: IpAddr, dst: IpAddr) -> Vec<u8> {
    let (off, _) = l2(frame).expect("frame has an Ethernet header");
    let inner = frame[off..].to_vec();
    let (proto, et) = match src {
        IpAddr::V4(_) => (IPPROTO_IPIP, ETH_P_IPV4),
        IpAddr::V6(_) => (IPPROTO_IPV6, ETH_P_IPV6),
    };
    let mut p = Packet::raw(src, dst, proto, &inner);
    if let Ip::V4(h) = &mut p.ip {
        h.df = false;
        h.id = 0;
    }
    let l3 = p.l3();
    let mut out = frame[..off].to_vec();
    let n = out.len();
    out[n - 2..].copy_from_slice(&et.to_be_bytes());
    out.extend_from_slice(&l3);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse().unwrap())
    }
    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse().unwrap())
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to 0x2ddf0 -> 0xddf2.
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(csum_add(0, &d), 0x2ddf0);
        assert_eq!(checksum(&d), !0xddf2);
    }

    #[test]
    fn ipv4_header_known_vector() {
        // The classic example header (Wikipedia "IPv4 header checksum"): checksum 0xb861.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header_checksum(&h), 0xb861);
        let mut full = h;
        full[10] = 0xb8;
        full[11] = 0x61;
        assert_eq!(checksum(&full), 0);
    }

    #[test]
    fn odd_length_is_zero_padded() {
        assert_eq!(checksum(&[0xab]), !0xab00);
        assert_eq!(checksum(&[0x12, 0x34, 0x56]), !(0x1234u16 + 0x5600));
    }

    #[test]
    fn udp_known_vector() {
        // 10.0.0.1:1234 -> 10.0.0.2:53, payload "abc"; the words sum to 0xdd93 -> 0x226c.
        let p = Packet::udp(v4("10.0.0.1"), v4("10.0.0.2"), 1234, 53).payload(b"abc");
        let l4 = p.l4_bytes();
        // Independent sum: pseudo-header words and UDP words with checksum 0.
        let words: [u32; 12] = [
            0x0a00, 0x0001, 0x0a00, 0x0002, 0x0011, 0x000b, // pseudo-header
            0x04d2, 0x0035, 0x000b, 0x0000, 0x6162, 0x6300, // header + "abc" padded
        ];
        let mut s: u32 = words.iter().sum();
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        assert_eq!(get_u16(&l4, 6), !(s as u16));
        assert_eq!(!(s as u16), 0x226c);
    }

    #[test]
    fn tcp_checksum_verifies_with_pseudo_header() {
        let p = Packet::tcp(v4("192.0.2.1"), v4("198.51.100.7"), 40000, 80, TCP_SYN)
            .tcp_options(&[2, 4, 0x05, 0xb4])
            .payload(b"hello");
        let l4 = p.l4_bytes();
        let s = pseudo_v4([192, 0, 2, 1], [198, 51, 100, 7], IPPROTO_TCP, l4.len());
        assert_eq!(csum_fold(csum_add(s, &l4)), 0);
        assert_eq!(l4[12] >> 4, 6);
        let p6 = Packet::tcp(v6("2001:db8::1"), v6("2001:db8::2"), 1, 2, TCP_ACK).payload_len(33);
        let l4 = p6.l4_bytes();
        let (IpAddr::V6(a), IpAddr::V6(b)) = p6.addrs() else {
            unreachable!()
        };
        let s = pseudo_v6(a.octets(), b.octets(), IPPROTO_TCP, l4.len());
        assert_eq!(csum_fold(csum_add(s, &l4)), 0);
    }

    #[test]
    fn icmpv6_checksum_known_vector() {
        // Echo request fe80::1 -> fe80::2, id 0, seq 0, no data. Independent sum:
        // pseudo: fe80 + 1 + fe80 + 2 + len 8 + nh 58 (0x3a); message: 8000.
        let p = Packet::icmp(v6("fe80::1"), v6("fe80::2"), 128, 0, [0; 4], &[]);
        let l4 = p.l4_bytes();
        let mut s: u32 = 0xfe80 + 1 + 0xfe80 + 2 + 8 + 0x3a + 0x8000;
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        assert_eq!(get_u16(&l4, 2), !(s as u16));
    }

    #[test]
    fn ipv4_frame_layout() {
        let f = Packet::tcp(v4("10.0.0.9"), v4("10.0.0.1"), 1000, 80, TCP_SYN)
            .vlan(7)
            .ip_options(&[1, 1, 1, 0])
            .build();
        assert_eq!(get_u16(&f, 12), ETH_P_8021Q);
        assert_eq!(get_u16(&f, 14), 7);
        assert_eq!(get_u16(&f, 16), ETH_P_IPV4);
        assert_eq!(f[18], 0x46);
        assert_eq!(usize::from(get_u16(&f, 20)), f.len() - 18);
        assert_eq!(checksum(&f[18..42]), 0);
        assert_eq!(get_u16(&f, 24), 0x4000); // DF
        assert_eq!(frame_dst(&f), Some(v4("10.0.0.1")));
        assert_eq!(frame_dst(&f[..37]), None);
    }

    #[test]
    fn ipv6_frame_layout() {
        let f = Packet::udp(v6("2001:db8::9"), v6("2001:db8::1"), 5, 53)
            .tos(0xb8)
            .flow_label(0x12345)
            .payload(b"x")
            .build();
        assert_eq!(&f[14..18], &[0x6b, 0x81, 0x23, 0x45]);
        assert_eq!(get_u16(&f, 18), 9);
        assert_eq!(f[20], IPPROTO_UDP);
        assert_eq!(frame_dst(&f), Some(v6("2001:db8::1")));
    }

    #[test]
    fn fragments_split_l4() {
        let p = Packet::udp(v4("10.0.0.9"), v4("10.0.0.1"), 5, 53).payload_len(30);
        let frags = fragments(&p, 16);
        assert_eq!(frags.len(), 3);
        assert_eq!(get_u16(&frags[0], 20), 0x2000); // MF, offset 0
        assert_eq!(get_u16(&frags[1], 20), 0x2002); // MF, offset 2 (16 bytes)
        assert_eq!(get_u16(&frags[2], 20), 0x0004);
        assert_eq!(frags[2].len(), 14 + 20 + 6);
        for f in &frags {
            assert_eq!(checksum(&f[14..34]), 0);
        }
    }

    #[test]
    fn encap_outputs() {
        let f = Packet::tcp(v4("10.0.0.9"), v4("10.0.0.1"), 1000, 80, TCP_ACK)
            .tos(0x10)
            .vlan(5)
            .build();
        let gw = [2, 0, 0, 0, 0, 0x99];
        let out = ipip4_encap(&f, gw, [172, 16, 1, 2], [10, 1, 0, 1]);
        assert_eq!(out.len(), f.len() + 20);
        assert_eq!(&out[0..6], &gw);
        assert_eq!(&out[6..12], &f[0..6]);
        assert_eq!(&out[12..18], &f[12..18]);
        assert_eq!(out[18], 0x45);
        assert_eq!(out[19], 0x10);
        assert_eq!(get_u16(&out, 20), get_u16(&f, 20) + 20);
        assert_eq!(checksum(&out[18..38]), 0);
        assert_eq!(&out[38..], &f[18..]);
        assert_eq!(decap(&out)[12..], f[12..]);
        assert_eq!(
            ipip_src4([172, 16, 0, 0], [0, 0, 255, 255], 0xaabb_ccdd),
            [172, 16, 0xcc, 0xdd]
        );
        let f6 = Packet::tcp(v6("2001:db8::9"), v6("2001:db8::2"), 1, 443, TCP_ACK)
            .tos(0xfc)
            .build();
        let o6 = ipip6_encap(&f6, gw, [0xfd; 16], [0xfe; 16], 0x1234_5678);
        assert_eq!(&o6[14..18], &[0x6f, 0xc4, 0x56, 0x78]);
        assert_eq!(get_u16(&o6, 18), get_u16(&f6, 18) + 40);
        assert_eq!(o6[20], 41);
    }

    #[test]
    fn pmtu_replies() {
        let f = Packet::tcp(v4("192.0.2.9"), v4("10.0.0.2"), 1000, 443, TCP_ACK)
            .ip_options(&[1, 1, 1, 1])
            .payload_len(1500)
            .build();
        let r = icmp4_frag_needed(&f, 1500);
        assert_eq!(r.len(), 14 + 20 + 8 + 24 + 8);
        assert_eq!(checksum(&r[14..34]), 0);
        assert_eq!(checksum(&r[34..]), 0);
        assert_eq!(get_u16(&r, 34 + 6), 1480);
        assert_eq!(&r[26..30], &[10, 0, 0, 2]);
        let f6 = Packet::tcp(v6("2001:db8::9"), v6("2001:db8::2"), 1, 443, TCP_ACK)
            .payload_len(1500)
            .build();
        let r6 = icmp6_packet_too_big(&f6, 1500);
        assert_eq!(r6.len(), 14 + 40 + 8 + 128);
        assert_eq!(get_u16(&r6, 18), 136);
        let s = pseudo_v6(
            r6[22..38].try_into().unwrap(),
            r6[38..54].try_into().unwrap(),
            58,
            136,
        );
        assert_eq!(csum_fold(csum_add(s, &r6[54..])), 0);
        assert_eq!(&r6[58..62], &1460u32.to_be_bytes());
    }

    #[test]
    fn arp_layout() {
        let a = arp_request(
            [2, 0, 0, 0, 0, 1],
            "10.0.0.9".parse().unwrap(),
            "10.0.0.1".parse().unwrap(),
            None,
        );
        assert_eq!(a.len(), 42);
        assert_eq!(get_u16(&a, 12), ETH_P_ARP);
        assert_eq!(frame_dst(&a), None);
    }
}
