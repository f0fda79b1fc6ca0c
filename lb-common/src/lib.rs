//! Contracts between the XDP program (`lb-ebpf`) and userspace (`lb-userspace`).
//!
//! Everything a map holds is defined here, once, as `#[repr(C)]` with explicit padding and
//! compile-time size/offset asserts, so both sides agree byte for byte. The flow hash lives here
//! too, so userspace can predict which route (and node) a flow maps to.
//!
//! Byte order: addresses and ports are stored exactly as they appear on the wire (network
//! order). Hash inputs are the raw wire bytes read as little-endian `u32` words; both the BPF
//! target (`bpfel`) and the supported hosts are little-endian.
#![no_std]

pub mod ct;
pub mod decide;
pub mod hash;

pub use hash::{
    addr_hash_v4, addr_hash_v6, flow_hash_v4, flow_hash_v6, route_index, vip_cache_slot,
};

// ---------------------------------------------------------------------------------------------
// Map names (the contract between the ELF and the loader).
// ---------------------------------------------------------------------------------------------

/// Program section names.
pub const PROG_BALANCER: &str = "lb_balancer";
pub const PROG_DECAP: &str = "lb_decap";

pub const MAP_VIPS: &str = "VIPS";
pub const MAP_VIP_CACHE: &str = "VIP_CACHE";
pub const MAP_VIP_GEN: &str = "VIP_GEN";
pub const MAP_VIP_FILTER: &str = "VIP_FILTER";
pub const MAP_ROUTES: &str = "ROUTES";
/// `BPF_F_MMAPABLE`: userspace maps the array and reads/writes entries as memory.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Map flags of `ROUTES`: mmapable, so a route change of tens of thousands of entries is
/// memory stores, not a syscall per entry.
pub const ROUTES_MAP_FLAGS: u32 = BPF_F_MMAPABLE;
pub const MAP_NODES: &str = "NODES";
pub const MAP_CONNTRACK: &str = "CONNTRACK";
pub const MAP_CONFIG: &str = "CONFIG";
pub const MAP_STATS: &str = "STATS";
pub const MAP_DROPS: &str = "DROPS";
pub const MAP_VIP_STATS: &str = "VIP_STATS";
pub const MAP_NODE_STATS: &str = "NODE_STATS";
pub const MAP_ROUTE_STATS: &str = "ROUTE_STATS";
pub const MAP_DECAP_VIPS: &str = "DECAP_VIPS";
pub const MAP_DECAP_STATS: &str = "DECAP_STATS";
pub const MAP_DECAP_SRC4: &str = "DECAP_SRC4";
pub const MAP_DECAP_SRC6: &str = "DECAP_SRC6";

// ---------------------------------------------------------------------------------------------
// Limits. Map sizes compiled into the ELF are maxima; the loader may shrink them from config.
// ---------------------------------------------------------------------------------------------

/// Most VIPs (entries of `VIPS`, and the bound of a VIP index).
pub const MAX_VIPS: u32 = 16384;
/// Entries of `VIP_CACHE` (a power of two): the direct-mapped cache of `VIPS` that the hot
/// path reads instead of the hash map. 4x `MAX_VIPS`, so few VIPs share a slot: with 4096
/// slots, traffic over 10,000 VIPs (most of them past the cache, in the hash) cost 507 ns per
/// packet; with 65536 (2.5 MiB), 352 ns.
pub const VIP_CACHE_SIZE: u32 = 65536;
/// Most nodes (entries of `NODES`, and the bound of a node index).
pub const MAX_NODES: u32 = 4096;
/// Node index that routes point at when no node owns them: never configured, so always DOWN
/// (packets on such a route are dropped as `NoBackend`). Configurable nodes are `< NODE_NONE`.
pub const NODE_NONE: u32 = MAX_NODES - 1;
/// Most route IDs one VIP may have.
pub const MAX_ROUTES_PER_VIP: u32 = 65536;
/// Default route IDs per VIP: with 65536 routes each of 500 equal nodes owns 131 or 132, so
/// the worst imbalance is under 1%.
pub const DEFAULT_ROUTES_PER_VIP: u32 = 65536;
/// Default capacity of `ROUTES` (entries): two generations of 16 default-sized VIPs.
pub const DEFAULT_ROUTE_SLOTS: u32 = 16 * 2 * DEFAULT_ROUTES_PER_VIP;
/// Default capacity of `CONNTRACK`.
pub const DEFAULT_CONNTRACK_SIZE: u32 = 1 << 20;
/// `ROUTE_STATS` counts one forwarded packet in this many (a power of two), per VIP and CPU:
/// every `ROUTE_STATS_SAMPLE`-th packet of the VIP on that CPU adds one to its route's counter.
/// Counting every packet cost a cache miss per packet at scale (10,000 VIPs x 256 routes:
/// ~140 ns of 350; 1M flows over one VIP of 65536 routes: ~11 ns).
pub const ROUTE_STATS_SAMPLE: u64 = 64;
/// `VIP_FILTER` is a bitmap of this many `u64` words (65536 bits).
pub const VIP_FILTER_WORDS: u32 = 1024;
/// Most VIPs the node-side decap program recognises.
pub const MAX_DECAP_VIPS: u32 = 1024;
/// Most outer-source networks (per address family) the node-side decap program accepts.
pub const MAX_DECAP_SOURCES: u32 = 64;

/// PMTU replies (frag-needed / packet-too-big) each CPU may send per second, after a burst of
/// [`PMTU_BURST`]: Linux's own ICMP limit (`net.ipv4.icmp_msgs_per_sec` 1000, burst 50).
/// Beyond it the packet is dropped as `DropReason::PmtuLimited`: a flood of oversized packets
/// with forged sources cannot turn the balancer into an ICMP reflector.
pub const PMTU_PER_SEC: u64 = 1000;
pub const PMTU_BURST: u64 = 50;

// ---------------------------------------------------------------------------------------------
// Address families and protocols as stored in keys.
// ---------------------------------------------------------------------------------------------

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
/// `VipKey::proto` of an address marker.
pub const PROTO_ANY: u8 = 0;

// ---------------------------------------------------------------------------------------------
// VIPS: (vip address, port, protocol) -> VipMeta.
// ---------------------------------------------------------------------------------------------

/// Key of `VIPS`. An IPv4 address sits in `addr[0..4]` with the rest zero.
/// A key with `port == 0` is a wildcard entry: see [`VIP_F_FRAG_ONLY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipKey {
    /// VIP address, wire order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// Destination port, network byte order (as read from the packet).
    pub port: u16,
    /// IP protocol (6 TCP, 17 UDP).
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
}

/// Forwarding mode in `VipMeta::flags` bits 0..4.
pub const VIP_F_MODE_MASK: u32 = 0xf;
/// dsr-l2: rewrite MACs and `XDP_TX`; the node holds the VIP on loopback.
pub const VIP_MODE_DSR_L2: u32 = 0;
/// ipip: IPIP / IP6IP6 to the node, sent to the configured gateway MAC.
pub const VIP_MODE_IPIP: u32 = 1;
/// Hash on the source address only (client affinity) instead of the 5-tuple.
pub const VIP_F_HASH_SRC: u32 = 1 << 4;
/// A wildcard (`port == 0`) entry that exists only so fragments, which carry no ports after
/// the first, find their VIP's table; unfragmented traffic ignores it.
pub const VIP_F_FRAG_ONLY: u32 = 1 << 5;
/// An address marker (`port == 0`, `proto == PROTO_ANY`): "this address is a VIP address", so
/// malformed packets to it are dropped and counted instead of passed. Holds no route table.
pub const VIP_F_ADDR_MARKER: u32 = 1 << 6;

/// Value of `VIPS` (and the data half of a `VIP_CACHE` entry): a VIP's static data. It does
/// not change when the VIP's route table switches: the live generation is `VIP_GEN[index]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipMeta {
    /// Index into the per-VIP counter arrays and `VIP_GEN`, `< MAX_VIPS`.
    pub index: u32,
    /// `VIP_F_*` bits and the forwarding mode.
    pub flags: u32,
    /// First entry of the VIP's pair of route-table slices in `ROUTES`; the live slice starts
    /// at [`VipMeta::live_offset`].
    pub route_base: u32,
    /// Route IDs in the table (N); never 0 for a live VIP.
    pub route_count: u32,
    /// The balancer's flow-hash seed (`hash::flow_hash_v4/v6`): the same in every VIP, kept
    /// here because the fast path already holds this cache line.
    pub hash_seed: u32,
}

impl VipMeta {
    #[inline(always)]
    pub const fn mode(&self) -> u32 {
        self.flags & VIP_F_MODE_MASK
    }

    /// First `ROUTES` slot of the live table for `VIP_GEN[index]` = `generation` (0 or 1; only
    /// bit 0 counts): `route_base + generation * route_count`.
    #[inline(always)]
    pub const fn live_offset(&self, generation: u32) -> u32 {
        self.route_base
            .wrapping_add((generation & 1).wrapping_mul(self.route_count))
    }
}

// ---------------------------------------------------------------------------------------------
// VIP_CACHE: direct-mapped cache of VIPS; VIP_GEN: the live table generation per VIP index.
// ---------------------------------------------------------------------------------------------

/// Value of `VIP_CACHE` (an array of [`VIP_CACHE_SIZE`] entries). The entry at
/// `vip_cache_slot(addr_hash_v4/v6(addr), port, proto)` may hold the VIP `(addr, port, proto)`:
/// the kernel compares the whole key with the packet's and, on a mismatch, looks `VIPS` up
/// (the source of truth). Only real VIPs are cached (no fragment entries or address markers);
/// the first VIP to claim a slot keeps it.
///
/// An empty slot has `key.family == 0`, which no packet key has. The loader never lets a
/// reader pair a key with another VIP's data, although an array update is not atomic: it
/// changes a slot by (1) writing the old key with family 0 over the old data (only the family
/// byte differs), (2) after an RCU grace period, writing the new key with family 0 and the new
/// data (the family byte reads 0 throughout), (3) writing the new family byte (only it
/// differs). At every step a torn read either misses or sees one VIP's key with its own data.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipCacheEntry {
    /// The VIP's key; `family == 0` marks an empty slot.
    pub key: VipKey,
    /// The VIP's `VIPS` value.
    pub meta: VipMeta,
}

// ---------------------------------------------------------------------------------------------
// ROUTES: flat array of route entries; each VIP owns two slices (generations) of N entries.
// ---------------------------------------------------------------------------------------------

/// The route may have flows on a previous owner: consult `CONNTRACK` for established traffic.
/// Routes without it need no connection-table lookup (their owner is authoritative).
pub const ROUTE_F_MOVED: u32 = 1;

/// Value of `ROUTES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteEntry {
    /// Index into `NODES` of the route's owner.
    pub node: u32,
    /// `ROUTE_F_*` bits.
    pub flags: u32,
}

// ---------------------------------------------------------------------------------------------
// NODES: node index -> where to send.
// ---------------------------------------------------------------------------------------------

/// Not in service (also what an unused, zeroed slot reads as).
pub const NODE_DOWN: u8 = 0;
/// Takes new and tracked flows.
pub const NODE_ACTIVE: u8 = 1;
/// Keeps its tracked flows, takes no new ones.
pub const NODE_DRAINING: u8 = 2;

/// Value of `NODES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeEntry {
    /// IPv6 address (ipip mode, IPv6 VIPs), wire order; zero when the node has none.
    pub addr6: [u8; 16],
    /// IPv4 address (ipip mode, IPv4 VIPs), wire order; zero when the node has none.
    pub addr4: [u8; 4],
    /// Node MAC (dsr-l2 destination).
    pub mac: [u8; 6],
    /// `NODE_DOWN`, `NODE_ACTIVE` or `NODE_DRAINING`.
    pub state: u8,
    /// Explicit padding.
    pub _pad: u8,
}

// ---------------------------------------------------------------------------------------------
// CONNTRACK: flow -> node (set-associative LRU; layout and way choice in `ct`).
// ---------------------------------------------------------------------------------------------

/// A tracked flow: the client-to-VIP 5-tuple. IPv4 addresses in the first 4 bytes. Stored in
/// `CONNTRACK` as `ct::CtKey` words.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    /// Client address, wire order.
    pub src: [u8; 16],
    /// VIP address, wire order.
    pub dst: [u8; 16],
    /// Client port, network order.
    pub sport: u16,
    /// VIP port, network order.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Explicit padding; always zero.
    pub _pad: [u8; 2],
}

/// A TCP FIN was seen on the flow (it ends the entry only once the flow is quiet:
/// `CT_CLOSE_QUIET`).
pub const CT_F_FIN: u32 = 1;
/// A TCP RST was seen on the flow (as `CT_F_FIN`).
pub const CT_F_RST: u32 = 2;
/// The flow was seen on a moved route (`ROUTE_F_MOVED`), where every packet refreshes its
/// entry: the entry is needed to keep the flow on its node, and its `last_seen` is live. A new
/// flow's SYN never evicts such an entry (a SYN flood cannot push established flows off their
/// nodes); only another flow on a moved route can.
pub const CT_F_KEEP: u32 = 4;
/// A flow that sent a FIN or RST is closed once it has been quiet this long (`CtEntry::last_seen`
/// units, ~10.7 s): then it is the first to be evicted or expired. Until then (a forged FIN/RST
/// on a flow that goes on talking, whose packets refresh `last_seen`) it is an open flow.
pub const CT_CLOSE_QUIET: u32 = 10;

/// What `CONNTRACK` records of a flow (a `ct::CtSlot` and its `ct::CtSet::seen` word).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// Index into `NODES` of the flow's node.
    pub node: u32,
    /// The VIP's index (lets userspace count flows per VIP/node without parsing keys).
    pub vip: u32,
    /// Coarse last-seen time: `bpf_ktime_get_coarse_ns() >> CT_TIME_SHIFT` (~1.07 s units);
    /// refreshed only when stale, so the hot path rarely writes.
    pub last_seen: u32,
    /// `CT_F_*` bits.
    pub flags: u32,
}

/// Shift from nanoseconds to `CtEntry::last_seen` units.
pub const CT_TIME_SHIFT: u32 = 30;

// ---------------------------------------------------------------------------------------------
// CONFIG: one global entry.
// ---------------------------------------------------------------------------------------------

/// Value of `CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalConfig {
    /// Next-hop MAC for ipip-encapsulated frames.
    pub gw_mac: [u8; 6],
    /// Largest L3 packet the path to nodes carries; ipip packets that would exceed it after
    /// encapsulation get ICMP frag-needed / packet-too-big instead. 0 disables the check.
    pub mtu: u16,
    /// IPv4 outer-source base for ipip: the source is `base | (flow_hash & mask)` (wire order).
    pub ipip_src4: [u8; 4],
    /// Host-bits mask applied to the flow hash for the IPv4 outer source (wire order).
    pub ipip_src4_mask: [u8; 4],
    /// IPv6 outer-source prefix; its last 4 bytes are replaced by the flow hash.
    pub ipip_src6: [u8; 16],
    /// Sets in `CONNTRACK`. Written by the loader from the map's size; callers' value ignored.
    pub ct_sets: u32,
    /// `CONFIG_F_*` bits (read only on the rare paths); the loader owns `CONFIG_F_LOG_EVENTS`.
    pub flags: u32,
}

/// `GlobalConfig::flags`: write an aya-log record (target [`LOG_TARGET`]) for each drop, PMTU
/// reply and conntrack eviction. Off unless a live trace is watching.
pub const CONFIG_F_LOG_EVENTS: u32 = 1;

/// The aya-log target of the balancer's event records (the program's module path, made
/// explicit so userspace can select them).
pub const LOG_TARGET: &str = "lb_balancer";

// ---------------------------------------------------------------------------------------------
// Counters. All are per-CPU arrays of u64 (or `TrafficCounter`), summed by userspace.
// ---------------------------------------------------------------------------------------------

/// Packet and byte counts (value of `VIP_STATS` and `NODE_STATS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounter {
    pub packets: u64,
    pub bytes: u64,
}

/// Index into `STATS`: verdicts and data-plane events.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Not for a VIP: passed untouched.
    Pass = 0,
    /// Forwarded with `XDP_TX`.
    Tx = 1,
    /// Dropped (reason in `DROPS`).
    Drop = 2,
    /// A new flow recorded in `CONNTRACK`.
    CtInsert = 3,
    /// A `CONNTRACK` lookup found the flow.
    CtHit = 4,
    /// A `CONNTRACK` lookup missed (route owner used).
    CtMiss = 5,
    /// A tracked flow's node was down: re-routed and the entry rewritten.
    CtReroute = 6,
    /// ICMP/ICMPv6 error about a VIP flow forwarded to the flow's node.
    IcmpForward = 7,
    /// ipip packet too big: ICMP frag-needed / packet-too-big sent back.
    PmtuReply = 8,
    /// IPv4 fragment routed by addresses and protocol.
    Fragment = 9,
    /// Packets encapsulated (ipip mode).
    Encap = 10,
    /// A tracked flow stayed on its draining node.
    DrainKeep = 11,
    /// A new flow took the place of a tracked one in its full `CONNTRACK` set.
    CtEvict = 12,
    /// A new flow was not recorded: its `CONNTRACK` set was full of flows on moved routes
    /// (`CT_F_KEEP`), which a new flow does not evict. Flood pressure.
    CtFull = 13,
    /// ipip: a frame longer than the receiving interface's MTU (a GRO/LRO/TSO aggregate, seen
    /// in generic XDP mode) encapsulated whole instead of answered with a PMTU error.
    EncapAggregate = 14,
}

pub const STAT_COUNT: u32 = 15;

/// Index into `DROPS`: why a VIP packet was dropped.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// 802.1Q tag cut short.
    TruncatedVlan = 0,
    /// IPv4 header cut short or IHL < 5.
    BadIpv4Header = 1,
    /// IPv4 total length inconsistent with the frame or header.
    BadIpv4Length = 2,
    /// IPv6 header cut short.
    BadIpv6Header = 3,
    /// IPv6 payload length inconsistent with the frame.
    BadIpv6Length = 4,
    /// TCP header cut short or data offset < 5.
    BadTcpHeader = 5,
    /// UDP header cut short or its length inconsistent.
    BadUdpHeader = 6,
    /// ICMP error too short to hold the embedded header.
    BadIcmp = 7,
    /// The route's owner is down and the flow has no live node.
    NoBackend = 8,
    /// ipip packet too big after encapsulation and without DF (so no frag-needed reply).
    TooBig = 9,
    /// A kernel helper (adjust head/tail) failed.
    HelperFailed = 10,
    /// The VIP has no route table (`route_count == 0`) or its table entry is missing.
    NoRoute = 11,
    /// ipip packet too big, and this CPU already sent its share of PMTU replies
    /// ([`PMTU_PER_SEC`], [`PMTU_BURST`]).
    PmtuLimited = 12,
}

pub const DROP_REASON_COUNT: u32 = 13;

impl DropReason {
    /// The reason with this index.
    pub const fn from_index(i: u32) -> Option<Self> {
        use DropReason::*;
        Some(match i {
            0 => TruncatedVlan,
            1 => BadIpv4Header,
            2 => BadIpv4Length,
            3 => BadIpv6Header,
            4 => BadIpv6Length,
            5 => BadTcpHeader,
            6 => BadUdpHeader,
            7 => BadIcmp,
            8 => NoBackend,
            9 => TooBig,
            10 => HelperFailed,
            11 => NoRoute,
            12 => PmtuLimited,
            _ => return None,
        })
    }

    /// The reason's name, as in this enum (the event log and the counters print it).
    pub const fn name(self) -> &'static str {
        use DropReason::*;
        match self {
            TruncatedVlan => "TruncatedVlan",
            BadIpv4Header => "BadIpv4Header",
            BadIpv4Length => "BadIpv4Length",
            BadIpv6Header => "BadIpv6Header",
            BadIpv6Length => "BadIpv6Length",
            BadTcpHeader => "BadTcpHeader",
            BadUdpHeader => "BadUdpHeader",
            BadIcmp => "BadIcmp",
            NoBackend => "NoBackend",
            TooBig => "TooBig",
            HelperFailed => "HelperFailed",
            NoRoute => "NoRoute",
            PmtuLimited => "PmtuLimited",
        }
    }
}

/// Index into `DECAP_STATS` (node-side decap program).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapStat {
    /// Encapsulated packet for a configured VIP: outer header stripped.
    Decapsulated = 0,
    /// Encapsulated, but the inner destination is not a configured VIP: passed untouched.
    NotOurs = 1,
    /// Malformed encapsulated packet: dropped.
    Malformed = 2,
    /// Not encapsulated: passed untouched.
    Pass = 3,
    /// Encapsulated for a configured VIP, but the outer source is not in a configured source
    /// network (`lb decap --source`): dropped, so only the balancers can tunnel to the VIPs.
    ForeignSource = 4,
}

pub const DECAP_STAT_COUNT: u32 = 5;

/// Key of `DECAP_VIPS` (node side): a VIP address; IPv4 in the first 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DecapKey {
    /// VIP address, wire order.
    pub addr: [u8; 16],
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Explicit padding; always zero.
    pub _pad: [u8; 3],
}

// ---------------------------------------------------------------------------------------------
// Layout asserts.
// ---------------------------------------------------------------------------------------------

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<VipKey>() == 20);
    assert!(offset_of!(VipKey, port) == 16);
    assert!(offset_of!(VipKey, proto) == 18);
    assert!(offset_of!(VipKey, family) == 19);
    assert!(size_of::<VipMeta>() == 20);
    assert!(offset_of!(VipMeta, route_base) == 8);
    assert!(offset_of!(VipMeta, hash_seed) == 16);
    assert!(size_of::<VipCacheEntry>() == 40);
    assert!(offset_of!(VipCacheEntry, meta) == 20);
    assert!(VIP_CACHE_SIZE.is_power_of_two());
    assert!(ROUTE_STATS_SAMPLE.is_power_of_two());
    assert!(size_of::<RouteEntry>() == 8);
    assert!(size_of::<NodeEntry>() == 28);
    assert!(offset_of!(NodeEntry, addr4) == 16);
    assert!(offset_of!(NodeEntry, mac) == 20);
    assert!(offset_of!(NodeEntry, state) == 26);
    assert!(size_of::<FlowKey>() == 40);
    assert!(offset_of!(FlowKey, sport) == 32);
    assert!(offset_of!(FlowKey, proto) == 36);
    assert!(size_of::<CtEntry>() == 16);
    assert!(size_of::<ct::CtSlot>() == 64);
    assert!(offset_of!(ct::CtSlot, node) == 40);
    assert!(offset_of!(ct::CtSlot, check) == 48);
    assert!(size_of::<ct::CtSet>() == 128 + 64 * ct::CT_WAYS);
    assert!(size_of::<[u32; ct::CT_WAYS]>() == 64);
    assert!(offset_of!(ct::CtSet, seen) == 64);
    assert!(offset_of!(ct::CtSet, slots) == 128);
    // The flags fit below a `seen` word's time.
    assert!((CT_F_KEEP | CT_F_FIN | CT_F_RST) >> ct::CT_FLAG_BITS == 0);
    assert!(DEFAULT_CONNTRACK_SIZE.is_multiple_of(ct::CT_WAYS as u32));
    assert!(size_of::<GlobalConfig>() == 40);
    assert!(offset_of!(GlobalConfig, ct_sets) == 32);
    assert!(offset_of!(GlobalConfig, ipip_src4) == 8);
    assert!(offset_of!(GlobalConfig, ipip_src6) == 16);
    assert!(offset_of!(GlobalConfig, flags) == 36);
    assert!(size_of::<TrafficCounter>() == 16);
    assert!(matches!(
        DropReason::from_index(DROP_REASON_COUNT - 1),
        Some(DropReason::PmtuLimited)
    ));
    assert!(DropReason::from_index(DROP_REASON_COUNT).is_none());
    assert!(size_of::<DecapKey>() == 20);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are repr(C) plain data with explicit padding and no implicit holes.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipMeta {}
    unsafe impl aya::Pod for VipCacheEntry {}
    unsafe impl aya::Pod for RouteEntry {}
    unsafe impl aya::Pod for NodeEntry {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for ct::CtSet {}
    unsafe impl aya::Pod for GlobalConfig {}
    unsafe impl aya::Pod for TrafficCounter {}
    unsafe impl aya::Pod for DecapKey {}
}
