//! Every map of the balancer. The names are the contract with the loader (`lb-userspace`
//! `dataplane`), which finds, sizes and pins them by name: never rename one.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    DEFAULT_CONNTRACK_SIZE, DEFAULT_ROUTE_SLOTS, DROP_REASON_COUNT, GlobalConfig, MAX_NODES,
    MAX_VIPS, NodeEntry, ROUTES_MAP_FLAGS, RouteEntry, STAT_COUNT, TrafficCounter, VIP_CACHE_SIZE,
    VIP_FILTER_WORDS, VipCacheEntry, VipKey, VipMeta,
    ct::{CT_MAP_FLAGS, CT_WAYS, CtSet},
};
use lb_ebpf::evlog;

/// Every VIP by (address, port, protocol), plus per-address fragment entries and markers.
#[map]
pub(crate) static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS * 4, 0);

/// Direct-mapped cache of `VIPS` (real VIPs only), read before the hash map.
#[map]
pub(crate) static VIP_CACHE: Array<VipCacheEntry> = Array::with_max_entries(VIP_CACHE_SIZE, 0);

/// Live route-table generation (0 or 1) by VIP index: the atomic table switch.
#[map]
pub(crate) static VIP_GEN: Array<u32> = Array::with_max_entries(MAX_VIPS, 0);

/// Bitmap of VIP destination addresses: a clear bit passes a packet without a hash lookup.
#[map]
pub(crate) static VIP_FILTER: Array<u64> = Array::with_max_entries(VIP_FILTER_WORDS, 0);

/// Route tables, two generations per VIP: slot -> owning node and `ROUTE_F_*` flags.
#[map]
pub(crate) static ROUTES: Array<RouteEntry> =
    Array::with_max_entries(DEFAULT_ROUTE_SLOTS, ROUTES_MAP_FLAGS);

/// Node index -> MAC, ipip addresses and state.
#[map]
pub(crate) static NODES: Array<NodeEntry> = Array::with_max_entries(MAX_NODES, 0);

/// Client flow -> node in 16-way sets (`lb_common::ct`), so tracked flows keep their node when
/// routes move. Mmapable: userspace scans and edits it without a syscall per set.
#[map]
pub(crate) static CONNTRACK: Array<CtSet> =
    Array::with_max_entries(DEFAULT_CONNTRACK_SIZE / CT_WAYS as u32, CT_MAP_FLAGS);

/// The one global setting record: ipip gateway MAC, MTU, outer source addresses.
#[map]
pub(crate) static CONFIG: Array<GlobalConfig> = Array::with_max_entries(1, 0);

/// Verdict and event counts by `Stat`.
#[map]
pub(crate) static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// Drop counts by `DropReason`.
#[map]
pub(crate) static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_REASON_COUNT, 0);

/// Forwarded packets and bytes by VIP index.
#[map]
pub(crate) static VIP_STATS: PerCpuArray<TrafficCounter> =
    PerCpuArray::with_max_entries(MAX_VIPS, 0);

/// Forwarded packets and bytes by node index.
#[map]
pub(crate) static NODE_STATS: PerCpuArray<TrafficCounter> =
    PerCpuArray::with_max_entries(MAX_NODES, 0);

/// Forwarded packets by `ROUTES` slot, sampled: one in `ROUTE_STATS_SAMPLE` per VIP and CPU.
#[map]
pub(crate) static ROUTE_STATS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(DEFAULT_ROUTE_SLOTS, 0);

/// Event records (aya-log's wire format) for userspace: `aya_log::EbpfLogger` finds the ring
/// buffer by this name. 128 KiB, as aya-log-ebpf sizes it: ~550 records.
#[map]
pub(crate) static AYA_LOGS: RingBuf = RingBuf::with_byte_size(1 << 17, 0);

/// Where the event log assembles a record, per CPU (off the stack).
#[map]
pub(crate) static EVENT: PerCpuArray<evlog::Slot> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU PMTU reply budget (a token bucket counted in nanoseconds): [credit, last refill].
#[map]
pub(crate) static PMTU_BUDGET: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);
