//! The data plane from userspace: load the balancer, size and (optionally) pin its maps, write
//! VIPs, nodes, routes and config, and read counters. Tests, benchmarks and the daemon configure
//! the XDP program only through this module, so they all exercise the same map-writing code.
//!
//! Route tables switch atomically: each VIP owns two slices of `ROUTES` (generations 0 and 1)
//! from `VipMeta::route_base`. A change is written into the inactive slice, then the VIP index's
//! `VIP_GEN` word (4 bytes, one store) is flipped, so a packet sees exactly one generation. The
//! `VIP_CACHE` slots the hot path reads are kept in step with `VIPS` (see docs/dataplane.md).
//!
//! The program's event log (aya-log records of drops, PMTU replies and evictions) is read by
//! the [`EventLogger`] made at load ([`Dataplane::take_event_logger`]) and switched on and off
//! with [`Dataplane::set_event_log`]; see `crate::livelog`.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{ProgramError, TestRun, TestRunOptions, Xdp, XdpMode, links::FdLink},
};
use lb_common::{
    CONFIG_F_LOG_EVENTS, CtEntry, DROP_REASON_COUNT, FAMILY_V4, FAMILY_V6, FlowKey, GlobalConfig,
    MAX_VIPS, NodeEntry, PROTO_ANY, RouteEntry, STAT_COUNT, TrafficCounter, VIP_CACHE_SIZE,
    VIP_F_ADDR_MARKER, VIP_F_FRAG_ONLY, VIP_FILTER_WORDS, VipCacheEntry, VipKey, VipMeta,
    ct::{CT_MAP_FLAGS, CT_WAYS, CtSet, ct_sets_for},
    hash,
};
use thiserror::Error;

pub use crate::livelog::EventLogger;
use crate::{conntrack::CtTable, mmap::MappedArray, objects};

/// `VipMeta::flags` bit of the earlier format, where `VipMeta` named the live slice and this bit
/// said it was the second of the pair. Only read, when re-adopting maps pinned by such a run.
const LEGACY_VIP_F_GEN_B: u32 = 1 << 15;

/// Typed errors of the data-plane layer.
#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error("loading the {what} eBPF object failed: {source}")]
    Load {
        what: &'static str,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("program {0}: {1}")]
    Program(&'static str, #[source] Box<ProgramError>),
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("invalid {0}")]
    Invalid(String),
    #[error("the balancer's event log: {0}")]
    EventLog(#[source] Box<aya_log::Error>),
    #[error(
        "route table space exhausted: need {need} slots, {free} free of {total} (raise route_slots)"
    )]
    NoRouteSpace { need: u32, free: u32, total: u32 },
    #[error("unknown VIP {0}")]
    UnknownVip(String),
    #[error("{0}")]
    Other(#[from] anyhow::Error),
}

type Result<T> = std::result::Result<T, DataplaneError>;

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map {
        name,
        source: Box::new(source),
    }
}

/// Sizes and placement of the data plane's maps.
#[derive(Clone, Debug)]
pub struct DataplaneOptions {
    /// Entries of `ROUTES` (and `ROUTE_STATS`): each VIP needs `2 * N`.
    pub route_slots: u32,
    /// Entries of `CONNTRACK`.
    pub conntrack_size: u32,
    /// Pin maps under this bpffs directory (and re-adopt maps already pinned there).
    pub pin_dir: Option<PathBuf>,
}

impl Default for DataplaneOptions {
    fn default() -> Self {
        Self {
            route_slots: lb_common::DEFAULT_ROUTE_SLOTS,
            conntrack_size: lb_common::DEFAULT_CONNTRACK_SIZE,
            pin_dir: None,
        }
    }
}

/// Forwarding mode of a VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardMode {
    DsrL2,
    Ipip,
}

/// How a VIP hashes flows onto routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HashMode {
    /// Source/destination address, ports and protocol.
    FiveTuple,
    /// Source address only (client affinity).
    SourceIp,
}

/// A VIP as the data plane sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipSpec {
    pub key: VipKey,
    /// Counter index, `< MAX_VIPS`.
    pub index: u32,
    pub mode: ForwardMode,
    pub hash: HashMode,
}

impl VipSpec {
    fn flags(&self) -> u32 {
        let mode = match self.mode {
            ForwardMode::DsrL2 => lb_common::VIP_MODE_DSR_L2,
            ForwardMode::Ipip => lb_common::VIP_MODE_IPIP,
        };
        let hash = match self.hash {
            HashMode::FiveTuple => 0,
            HashMode::SourceIp => lb_common::VIP_F_HASH_SRC,
        };
        mode | hash
    }
}

/// Where a VIP's pair of route-table slices lives.
#[derive(Clone, Debug)]
struct VipSlots {
    /// As in `VIPS`: `route_base` is the first slot of the pair.
    meta: VipMeta,
    /// First slot of the pair (`meta.route_base`).
    base: u32,
    /// What each of the two slices holds, so a change writes only the entries that differ.
    halves: [Vec<RouteEntry>; 2],
    /// Routes where the inactive slice differs from the live one (`None`: not known, found
    /// by comparing the slices), so [`Dataplane::update_routes`] costs what it writes.
    stale: Option<Vec<u32>>,
}

/// Counters summed over CPUs.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Counters {
    /// Indexed by `lb_common::Stat`.
    pub stats: Vec<u64>,
    /// Indexed by `lb_common::DropReason`.
    pub drops: Vec<u64>,
}

/// The loaded balancer and its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    vips_map: HashMap<MapData, VipKey, VipMeta>,
    vip_cache_map: Array<MapData, VipCacheEntry>,
    vip_gen_map: Array<MapData, u32>,
    filter_map: Array<MapData, u64>,
    routes: RouteSlots,
    nodes_map: Array<MapData, NodeEntry>,
    /// `CONNTRACK`, mmapped.
    conntrack: CtTable,
    config_map: Array<MapData, GlobalConfig>,
    stats_map: PerCpuArray<MapData, u64>,
    drops_map: PerCpuArray<MapData, u64>,
    vip_stats_map: PerCpuArray<MapData, TrafficCounter>,
    node_stats_map: PerCpuArray<MapData, TrafficCounter>,
    route_stats_map: PerCpuArray<MapData, u64>,
    /// Mirror of the real VIPs (not wildcard/marker entries).
    vips: BTreeMap<VipKey, VipSlots>,
    /// Mirror of `VIP_CACHE`.
    cache: Vec<VipCacheEntry>,
    /// Mirror of `VIP_GEN`: the live generation (0 or 1) by VIP index.
    gens: Vec<u32>,
    /// Our copy of `VIP_FILTER`, so updates write only changed words.
    filter: Vec<u64>,
    route_slots: u32,
    /// The reader of the program's event records, until the caller takes it.
    event_logger: Option<EventLogger>,
    /// The event-log switch (`CONFIG_F_LOG_EVENTS`), which every `CONFIG` write carries.
    log_events: bool,
    /// The flow-hash seed written into every VIP's `VipMeta` (see [`Dataplane::set_hash_seed`]).
    hash_seed: u32,
}

/// Every map of the balancer, for pinning.
const ALL_MAPS: [&str; 13] = [
    lb_common::MAP_VIPS,
    lb_common::MAP_VIP_CACHE,
    lb_common::MAP_VIP_GEN,
    lb_common::MAP_VIP_FILTER,
    lb_common::MAP_ROUTES,
    lb_common::MAP_NODES,
    lb_common::MAP_CONNTRACK,
    lb_common::MAP_CONFIG,
    lb_common::MAP_STATS,
    lb_common::MAP_DROPS,
    lb_common::MAP_VIP_STATS,
    lb_common::MAP_NODE_STATS,
    lb_common::MAP_ROUTE_STATS,
];

fn take<M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<M> {
    let map = ebpf
        .take_map(name)
        .ok_or(DataplaneError::MissingMap(name))?;
    M::try_from(map).map_err(map_err(name))
}

impl Dataplane {
    /// Loads the balancer program (not attached) and its maps. With `pin_dir`, maps already
    /// pinned there are re-adopted (their contents kept) and new ones are pinned.
    pub fn load(opts: &DataplaneOptions) -> Result<Self> {
        if opts.route_slots == 0 || opts.conntrack_size == 0 {
            return Err(DataplaneError::Invalid(
                "route_slots and conntrack_size must be > 0".into(),
            ));
        }
        let ct_sets = ct_sets_for(opts.conntrack_size);
        let obj = objects::get(objects::BALANCER, "balancer")?;
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(lb_common::MAP_ROUTES, opts.route_slots)
            .map_max_entries(lb_common::MAP_ROUTE_STATS, opts.route_slots)
            .map_max_entries(lb_common::MAP_CONNTRACK, ct_sets);
        let pins: Vec<(&'static str, PathBuf)> = match &opts.pin_dir {
            Some(dir) => {
                fs::create_dir_all(dir).map_err(|e| {
                    DataplaneError::Invalid(format!(
                        "creating pin directory {}: {e}",
                        dir.display()
                    ))
                })?;
                ALL_MAPS.iter().map(|m| (*m, dir.join(m))).collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(obj).map_err(|e| DataplaneError::Load {
            what: "balancer",
            source: Box::new(e),
        })?;
        check_build_sizes(&ebpf)?;
        // Takes the log ring buffer out of `ebpf`: it must stay open until the program loads.
        let event_logger =
            EventLogger::new(&mut ebpf).map_err(|e| DataplaneError::EventLog(Box::new(e)))?;
        {
            let prog: &mut Xdp = program(&mut ebpf, lb_common::PROG_BALANCER)?;
            prog.load()
                .map_err(|e| DataplaneError::Program(lb_common::PROG_BALANCER, Box::new(e)))?;
        }
        let mut dp = Self {
            vips_map: take(&mut ebpf, lb_common::MAP_VIPS)?,
            vip_cache_map: take(&mut ebpf, lb_common::MAP_VIP_CACHE)?,
            vip_gen_map: take(&mut ebpf, lb_common::MAP_VIP_GEN)?,
            filter_map: take(&mut ebpf, lb_common::MAP_VIP_FILTER)?,
            routes: RouteSlots::new(take(&mut ebpf, lb_common::MAP_ROUTES)?)?,
            nodes_map: take(&mut ebpf, lb_common::MAP_NODES)?,
            conntrack: conntrack_table(&ebpf, ct_sets, 0)?,
            config_map: take(&mut ebpf, lb_common::MAP_CONFIG)?,
            stats_map: take(&mut ebpf, lb_common::MAP_STATS)?,
            drops_map: take(&mut ebpf, lb_common::MAP_DROPS)?,
            vip_stats_map: take(&mut ebpf, lb_common::MAP_VIP_STATS)?,
            node_stats_map: take(&mut ebpf, lb_common::MAP_NODE_STATS)?,
            route_stats_map: take(&mut ebpf, lb_common::MAP_ROUTE_STATS)?,
            ebpf,
            vips: BTreeMap::new(),
            cache: vec![VipCacheEntry::default(); VIP_CACHE_SIZE as usize],
            gens: vec![0; MAX_VIPS as usize],
            filter: vec![0; VIP_FILTER_WORDS as usize],
            route_slots: opts.route_slots,
            event_logger: Some(event_logger),
            log_events: false,
            hash_seed: 0,
        };
        dp.readopt()?;
        // Until the caller sets one: the seed the re-adopted VIPs were forwarding with.
        if let Some(seed) = dp.vips.values().next().map(|s| s.meta.hash_seed) {
            dp.set_hash_seed(seed);
        }
        // The kernel sizes its set index from CONFIG. This write also turns the event log off
        // (a pinned CONFIG may have it on from a run that crashed with a watcher).
        let cfg = dp.config()?;
        dp.set_config(&cfg)?;
        Ok(dp)
    }

    /// Rebuilds the userspace mirror from the (possibly pinned, pre-existing) maps.
    fn readopt(&mut self) -> Result<()> {
        let slots = self.routes.len();
        if slots != self.route_slots {
            return Err(DataplaneError::Invalid(format!(
                "pinned ROUTES has {slots} slots but {} were asked for; remove the pins or keep the size",
                self.route_slots
            )));
        }
        // Whole arrays in a few syscalls each: one lookup per entry was ~80k syscalls for
        // VIP_GEN and VIP_CACHE at this build's sizes, on every daemon start.
        self.gens = read_array(&self.vip_gen_map, lb_common::MAP_VIP_GEN)?;
        for g in &mut self.gens {
            // The kernel reads only bit 0.
            *g &= 1;
        }
        self.cache = read_array(&self.vip_cache_map, lb_common::MAP_VIP_CACHE)?;
        let entries: Vec<(VipKey, VipMeta)> = self
            .vips_map
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err(lb_common::MAP_VIPS))?;
        let mut legacy = Vec::new();
        for (key, mut meta) in entries {
            if meta.flags & (VIP_F_FRAG_ONLY | VIP_F_ADDR_MARKER) != 0 {
                continue;
            }
            if meta.flags & LEGACY_VIP_F_GEN_B != 0 {
                // Pinned by the earlier format: `route_base` named the live second slice.
                meta.route_base = meta.route_base.wrapping_sub(meta.route_count);
                meta.flags &= !LEGACY_VIP_F_GEN_B;
                legacy.push(key);
            }
            let base = meta.route_base;
            let mut halves = [Vec::new(), Vec::new()];
            for (h, half) in halves.iter_mut().enumerate() {
                let start = base + h as u32 * meta.route_count;
                *half = (start..start + meta.route_count)
                    .map(|i| self.routes.get(i))
                    .collect::<Result<_>>()?;
            }
            self.vips.insert(
                key,
                VipSlots {
                    meta,
                    base,
                    halves,
                    stale: None,
                },
            );
        }
        self.filter = read_array(&self.filter_map, lb_common::MAP_VIP_FILTER)?;
        for key in legacy {
            self.convert_legacy(&key)?;
        }
        // Fragment entries and cache slots re-derived from the VIPs (normally no writes).
        let keys: Vec<VipKey> = self.vips.keys().copied().collect();
        for key in &keys {
            self.sync_wildcards(key)?;
        }
        let slots: BTreeSet<u32> = (0..VIP_CACHE_SIZE)
            .filter(|i| self.cache[*i as usize] != VipCacheEntry::default())
            .chain(keys.iter().map(cache_slot))
            .collect();
        for slot in slots {
            self.sync_cache_slot(slot)?;
        }
        Ok(())
    }

    /// A VIP pinned in the earlier format (live table in the second slice, `VIP_GEN` absent or
    /// 0): copy the live table into the first slice, which the index's generation 0 names, then
    /// write the base-form meta. Every packet sees the live table throughout.
    fn convert_legacy(&mut self, key: &VipKey) -> Result<()> {
        let Some(s) = self.vips.get(key).cloned() else {
            return Ok(());
        };
        let i = s.meta.index as usize;
        if self.gens.get(i).copied().unwrap_or(0) != 0 {
            return Err(DataplaneError::Invalid(format!(
                "pinned VIP {} is in the earlier format but VIP_GEN[{i}] is set",
                vip_display(key)
            )));
        }
        self.write_half(s.base, &s.halves[0], &s.halves[1])?;
        self.vips_map
            .insert(key, s.meta, 0)
            .map_err(map_err(lb_common::MAP_VIPS))?;
        if let Some(m) = self.vips.get_mut(key) {
            m.halves[0] = s.halves[1].clone();
        }
        Ok(())
    }

    /// The balancer program (for attaching and `BPF_PROG_TEST_RUN`).
    pub fn program_mut(&mut self) -> Result<&mut Xdp> {
        program(&mut self.ebpf, lb_common::PROG_BALANCER)
    }

    /// Attaches to `iface` in `mode`, returning the link so the caller can pin it
    /// (a pinned link keeps forwarding after the daemon exits).
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<FdLink> {
        let prog = self.program_mut()?;
        let id = prog
            .attach(iface, mode)
            .map_err(|e| DataplaneError::Program(lb_common::PROG_BALANCER, Box::new(e)))?;
        let link = prog
            .take_link(id)
            .map_err(|e| DataplaneError::Program(lb_common::PROG_BALANCER, Box::new(e)))?;
        FdLink::try_from(link).map_err(|e| {
            DataplaneError::Invalid(format!("XDP link on {iface} is not an fd link: {e}"))
        })
    }

    /// Atomically replaces the program behind an existing (e.g. re-opened pinned) link.
    pub fn replace_in_link(&mut self, link: FdLink) -> Result<()> {
        let prog = self.program_mut()?;
        let link = aya::programs::xdp::XdpLink::try_from(link)
            .map_err(|e| DataplaneError::Invalid(format!("pinned link is not an XDP link: {e}")))?;
        prog.attach_to_link(link)
            .map(|_| ())
            .map_err(|e| DataplaneError::Program(lb_common::PROG_BALANCER, Box::new(e)))
    }

    /// Runs one packet through the program with `BPF_PROG_TEST_RUN`: (verdict, output bytes).
    pub fn test_run(&mut self, packet: &[u8]) -> Result<(u32, Vec<u8>)> {
        // Room for encapsulation headers the program may prepend.
        let mut out = vec![0u8; packet.len() + 256];
        let prog = self.program_mut()?;
        let res = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .map_err(|e| DataplaneError::Program(lb_common::PROG_BALANCER, Box::new(e)))?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, out))
    }

    // -----------------------------------------------------------------------------------------
    // Config and nodes
    // -----------------------------------------------------------------------------------------

    /// Writes the global config. `mtu` must be 0 (no PMTU check) or at least 1280. `ct_sets`
    /// and the `CONFIG_F_LOG_EVENTS` bit of `flags` are the loader's: the caller's are ignored
    /// (so a config reload keeps the event log as [`Dataplane::set_event_log`] left it).
    pub fn set_config(&mut self, cfg: &GlobalConfig) -> Result<()> {
        if cfg.mtu != 0 && cfg.mtu < 1280 {
            return Err(DataplaneError::Invalid(format!(
                "mtu {} is below 1280 (use 0 to disable the PMTU check)",
                cfg.mtu
            )));
        }
        let log = if self.log_events {
            CONFIG_F_LOG_EVENTS
        } else {
            0
        };
        let cfg = GlobalConfig {
            ct_sets: self.conntrack.sets(),
            flags: (cfg.flags & !CONFIG_F_LOG_EVENTS) | log,
            ..*cfg
        };
        self.config_map
            .set(0, cfg, 0)
            .map_err(map_err(lb_common::MAP_CONFIG))
    }

    pub fn config(&self) -> Result<GlobalConfig> {
        self.config_map
            .get(&0, 0)
            .map_err(map_err(lb_common::MAP_CONFIG))
    }

    /// Turns the program's event log on or off: one aya-log record per drop, PMTU reply and
    /// conntrack eviction (read with the [`EventLogger`]). Off after every load. Forwarding
    /// costs the same either way (the program reads the switch only on those paths).
    pub fn set_event_log(&mut self, on: bool) -> Result<()> {
        let cfg = self.config()?;
        let was = std::mem::replace(&mut self.log_events, on);
        self.set_config(&cfg).inspect_err(|_| self.log_events = was)
    }

    /// Whether the event log is on.
    pub fn event_log(&self) -> bool {
        self.log_events
    }

    /// The reader of the program's event records, for the caller to pump (`None` once taken).
    /// Records wait in a 128 KiB ring buffer; the program drops new ones while it is full.
    pub fn take_event_logger(&mut self) -> Option<EventLogger> {
        self.event_logger.take()
    }

    /// Writes one node slot.
    pub fn set_node(&mut self, index: u32, node: &NodeEntry) -> Result<()> {
        check_node_index(index)?;
        self.nodes_map
            .set(index, node, 0)
            .map_err(map_err(lb_common::MAP_NODES))
    }

    pub fn node(&self, index: u32) -> Result<NodeEntry> {
        check_node_index(index)?;
        self.nodes_map
            .get(&index, 0)
            .map_err(map_err(lb_common::MAP_NODES))
    }

    /// Changes only a node's state (active / draining / down).
    pub fn set_node_state(&mut self, index: u32, state: u8) -> Result<()> {
        let mut n = self.node(index)?;
        n.state = state;
        self.set_node(index, &n)
    }

    // -----------------------------------------------------------------------------------------
    // VIPs and route tables
    // -----------------------------------------------------------------------------------------

    /// Adds a VIP with its route table, or replaces an existing VIP's table (and mode).
    /// The table becomes visible atomically.
    pub fn upsert_vip(&mut self, spec: &VipSpec, routes: &[RouteEntry]) -> Result<()> {
        validate_key(&spec.key)?;
        let n = u32::try_from(routes.len()).unwrap_or(u32::MAX);
        if n == 0 || n > lb_common::MAX_ROUTES_PER_VIP {
            return Err(DataplaneError::Invalid(format!(
                "route count {n} out of 1..={}",
                lb_common::MAX_ROUTES_PER_VIP
            )));
        }
        if spec.index >= lb_common::MAX_VIPS {
            return Err(DataplaneError::Invalid(format!(
                "VIP index {} >= {}",
                spec.index,
                lb_common::MAX_VIPS
            )));
        }
        if let Some(r) = routes.iter().find(|r| r.node >= lb_common::MAX_NODES) {
            return Err(DataplaneError::Invalid(format!(
                "route points at node {} >= {}",
                r.node,
                lb_common::MAX_NODES
            )));
        }
        let old = self.vips.get(&spec.key).map(|s| s.meta);
        // `target`: the generation whose slice holds the new table once it is live.
        let (base, target, mut halves) = match self.vips.get(&spec.key) {
            // Same N: the slice the VIP's packets do not read now.
            Some(s) if s.meta.route_count == n => (
                s.base,
                1 - self.gens[s.meta.index as usize],
                s.halves.clone(),
            ),
            // New VIP, or N changed: a fresh pair (the old one stays in the mirror, so it is
            // not reused, until the new meta is live), at the generation live for the index.
            _ => {
                // Both slices start as this table, so every later change is a small diff
                // (otherwise the first flip would write all N entries of the empty slice).
                let base = self.allocate(2 * n)?;
                let target = self.gens[spec.index as usize];
                self.write_half(base + (1 - target) * n, &[], routes)?;
                let mut halves = [Vec::new(), Vec::new()];
                halves[(1 - target) as usize] = routes.to_vec();
                (base, target, halves)
            }
        };
        // On error the live table is untouched and the mirror unchanged.
        self.write_half(base + target * n, &halves[target as usize], routes)?;
        halves[target as usize] = routes.to_vec();
        let meta = VipMeta {
            index: spec.index,
            flags: spec.flags(),
            route_base: base,
            route_count: n,
            hash_seed: self.hash_seed,
        };
        if let Some(s) = self.vips.get_mut(&spec.key)
            && s.base == base
        {
            // What the slices hold now, even if a step below fails.
            s.halves = halves.clone();
        }
        // The switch: one 4-byte store, if the index's live generation is not `target` yet.
        self.set_generation(spec.index, target, &spec.key)?;
        if old != Some(meta) {
            self.vips_map
                .insert(spec.key, meta, 0)
                .map_err(map_err(lb_common::MAP_VIPS))?;
        }
        self.vips.insert(
            spec.key,
            VipSlots {
                meta,
                base,
                halves,
                stale: None,
            },
        );
        self.sync_wildcards(&spec.key)?;
        self.sync_cache_slot(cache_slot(&spec.key))?;
        Ok(())
    }

    /// Makes `target` the live generation of VIP index `index` (`VIP_GEN[index]`, one 4-byte
    /// write). Any other VIP sharing the index (`except` is the caller's, already written) first
    /// gets its live table copied into its `target` slice, so no VIP's packets change table.
    fn set_generation(&mut self, index: u32, target: u32, except: &VipKey) -> Result<()> {
        if self.gens[index as usize] == target {
            return Ok(());
        }
        let sharers: Vec<(VipKey, VipSlots)> = self
            .vips
            .iter()
            .filter(|(k, s)| s.meta.index == index && *k != except)
            .map(|(k, s)| (*k, s.clone()))
            .collect();
        for (k, s) in sharers {
            let live = &s.halves[(1 - target) as usize];
            let at = s.base + target * s.meta.route_count;
            self.write_half(at, &s.halves[target as usize], live)?;
            if let Some(m) = self.vips.get_mut(&k) {
                m.halves[target as usize] = live.clone();
                m.stale = None;
            }
        }
        self.vip_gen_map
            .set(index, target, 0)
            .map_err(map_err(lb_common::MAP_VIP_GEN))?;
        self.gens[index as usize] = target;
        Ok(())
    }

    /// Brings one `VIP_CACHE` slot in line with the VIPs: its occupant stays while it is a VIP
    /// with the same meta; otherwise the lowest colliding VIP takes it, or it is cleared.
    ///
    /// An array update is not atomic, so a change goes in steps where a torn read either
    /// misses or sees one VIP's key with that VIP's own data (see `VipCacheEntry`): retire the
    /// occupant (family 0, data kept), wait for in-flight packets, write the new data under
    /// family 0, then write the family.
    fn sync_cache_slot(&mut self, slot: u32) -> Result<()> {
        let cur = self.cache[slot as usize];
        let keep =
            cur.key.family != 0 && self.vips.get(&cur.key).is_some_and(|s| s.meta == cur.meta);
        if keep {
            return Ok(());
        }
        let want = self
            .vips
            .iter()
            .find(|(k, _)| cache_slot(k) == slot)
            .map(|(k, s)| VipCacheEntry {
                key: *k,
                meta: s.meta,
            });
        let mut at = cur;
        if at.key.family != 0 {
            at.key.family = 0;
            self.write_cache(slot, at)?;
        }
        let Some(want) = want else {
            return Ok(());
        };
        let staged = VipCacheEntry {
            key: VipKey {
                family: 0,
                ..want.key
            },
            meta: want.meta,
        };
        if at != staged {
            if at != VipCacheEntry::default() {
                // A packet may have matched the old key and not yet read the old data.
                wait_for_readers();
            }
            self.write_cache(slot, staged)?;
        }
        self.write_cache(slot, want)
    }

    fn write_cache(&mut self, slot: u32, e: VipCacheEntry) -> Result<()> {
        self.vip_cache_map
            .set(slot, e, 0)
            .map_err(map_err(lb_common::MAP_VIP_CACHE))?;
        self.cache[slot as usize] = e;
        Ok(())
    }

    /// Changes some routes of an existing VIP; they become live together, atomically (written
    /// into the inactive slice, which first catches up with the live one, then one generation
    /// flip). Costs the entries it writes, not the table's size.
    pub fn update_routes(&mut self, key: &VipKey, changes: &[(u32, RouteEntry)]) -> Result<()> {
        let s = self
            .vips
            .get(key)
            .ok_or_else(|| DataplaneError::UnknownVip(vip_display(key)))?;
        let n = s.meta.route_count;
        if let Some((r, e)) = changes
            .iter()
            .find(|(r, e)| *r >= n || e.node >= lb_common::MAX_NODES)
        {
            return Err(DataplaneError::Invalid(format!(
                "route {r} -> node {} out of range (routes < {n}, nodes < {})",
                e.node,
                lb_common::MAX_NODES
            )));
        }
        let index = s.meta.index;
        let live_gen = self.gens[index as usize] as usize;
        let target = 1 - live_gen;
        let (live, inactive) = (&s.halves[live_gen], &s.halves[target]);
        let lagging: Vec<u32> = match &s.stale {
            Some(v) => v.clone(),
            None => (0..n)
                .filter(|&i| inactive[i as usize] != live[i as usize])
                .collect(),
        };
        // The catch-up first, then the changes: the batch applies in order, so where a change
        // touches a lagging route the change wins.
        let offset = s.base + target as u32 * n;
        let (keys, values): (Vec<u32>, Vec<RouteEntry>) = lagging
            .iter()
            .map(|&i| (offset + i, live[i as usize]))
            .chain(changes.iter().map(|&(r, e)| (offset + r, e)))
            .unzip();
        let written = self.routes.write(&keys, &values);
        let Some(s) = self.vips.get_mut(key) else {
            return written;
        };
        if written.is_err() {
            // A batch may stop part-way: the inactive slice is unknown, so the next write
            // rewrites all of it (no real entry equals this one).
            s.halves[target].fill(RouteEntry {
                node: u32::MAX,
                flags: u32::MAX,
            });
            s.stale = None;
            return written;
        }
        let [h0, h1] = &mut s.halves;
        let (live, inactive) = if live_gen == 0 { (h0, h1) } else { (h1, h0) };
        for &i in &lagging {
            inactive[i as usize] = live[i as usize];
        }
        for &(r, e) in changes {
            inactive[r as usize] = e;
        }
        // After the flip the old live slice lags exactly where a change differs from it.
        let mut stale: Vec<u32> = changes
            .iter()
            .filter(|(r, e)| live[*r as usize] != *e)
            .map(|(r, _)| *r)
            .collect();
        stale.sort_unstable();
        stale.dedup();
        // Unknown until the flip is done.
        s.stale = None;
        self.set_generation(index, target as u32, key)?;
        if let Some(s) = self.vips.get_mut(key) {
            s.stale = Some(stale);
        }
        Ok(())
    }

    /// Replaces the route table of an existing VIP (same N), atomically.
    pub fn set_routes(&mut self, key: &VipKey, routes: &[RouteEntry]) -> Result<()> {
        let s = self
            .vips
            .get(key)
            .ok_or_else(|| DataplaneError::UnknownVip(vip_display(key)))?;
        let spec = VipSpec {
            key: *key,
            index: s.meta.index,
            mode: if s.meta.mode() == lb_common::VIP_MODE_IPIP {
                ForwardMode::Ipip
            } else {
                ForwardMode::DsrL2
            },
            hash: if s.meta.flags & lb_common::VIP_F_HASH_SRC != 0 {
                HashMode::SourceIp
            } else {
                HashMode::FiveTuple
            },
        };
        self.upsert_vip(&spec, routes)
    }

    /// The live route table of a VIP.
    pub fn routes(&self, key: &VipKey) -> Result<Vec<RouteEntry>> {
        let s = self
            .vips
            .get(key)
            .ok_or_else(|| DataplaneError::UnknownVip(vip_display(key)))?;
        let offset = s.meta.live_offset(self.gens[s.meta.index as usize]);
        (offset..offset + s.meta.route_count)
            .map(|i| self.routes.get(i))
            .collect()
    }

    /// The live route table of a VIP as the userspace mirror holds it (no syscalls).
    pub fn live_routes(&self, key: &VipKey) -> Option<&[RouteEntry]> {
        let s = self.vips.get(key)?;
        Some(&s.halves[self.gens[s.meta.index as usize] as usize])
    }

    /// The flow-hash seed VIPs get from now on. Set it before writing VIPs: VIPs written
    /// under another seed keep it until they are written again (the daemon's first plan
    /// writes every VIP).
    pub fn set_hash_seed(&mut self, seed: u32) {
        self.hash_seed = seed;
        self.conntrack.set_seed(seed);
    }

    /// The seed VIPs are written with (after a load: the re-adopted VIPs' seed, or 0).
    pub fn hash_seed(&self) -> u32 {
        self.hash_seed
    }

    /// The live `VipMeta` of a VIP.
    pub fn vip_meta(&self, key: &VipKey) -> Option<VipMeta> {
        self.vips.get(key).map(|s| s.meta)
    }

    /// Keys of the configured VIPs.
    pub fn vip_keys(&self) -> Vec<VipKey> {
        self.vips.keys().copied().collect()
    }

    /// Removes a VIP and, if it was the last on its address, the address's marker and filter bit.
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        if self.vips.remove(key).is_none() {
            return Err(DataplaneError::UnknownVip(vip_display(key)));
        }
        // Out of the cache first, so no packet finds it there once it is gone from VIPS.
        self.sync_cache_slot(cache_slot(key))?;
        match self.vips_map.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(lb_common::MAP_VIPS)(e)),
        }
        self.sync_wildcards(key)
    }

    /// Makes the slice at `offset` hold `routes`, writing only the entries that differ from
    /// `have` (what the slice held), in one `BPF_MAP_UPDATE_BATCH` call.
    fn write_half(
        &mut self,
        offset: u32,
        have: &[RouteEntry],
        routes: &[RouteEntry],
    ) -> Result<()> {
        let (keys, values): (Vec<u32>, Vec<RouteEntry>) = routes
            .iter()
            .enumerate()
            .filter(|(i, r)| have.get(*i) != Some(*r))
            .map(|(i, r)| (offset + i as u32, *r))
            .unzip();
        self.routes.write(&keys, &values)
    }

    /// First-fit allocation of `len` consecutive slots.
    fn allocate(&self, len: u32) -> Result<u32> {
        let mut used: Vec<(u32, u32)> = self
            .vips
            .values()
            .map(|s| (s.base, 2 * s.meta.route_count))
            .collect();
        used.sort_unstable();
        let mut cursor = 0u32;
        for (start, l) in used {
            if start >= cursor && start - cursor >= len {
                return Ok(cursor);
            }
            cursor = cursor.max(start + l);
        }
        if self.route_slots.saturating_sub(cursor) >= len {
            return Ok(cursor);
        }
        let used_total: u32 = self.vips.values().map(|s| 2 * s.meta.route_count).sum();
        Err(DataplaneError::NoRouteSpace {
            need: len,
            free: self.route_slots - used_total,
            total: self.route_slots,
        })
    }

    /// Re-derives the fragment entry `(addr, 0, proto)`, the address marker `(addr, 0, ANY)`
    /// and the filter bit for the address (and protocol) of `key`.
    fn sync_wildcards(&mut self, key: &VipKey) -> Result<()> {
        let same_addr: Vec<(VipKey, VipMeta)> = self
            .vips
            .iter()
            .filter(|(k, _)| k.addr == key.addr && k.family == key.family)
            .map(|(k, s)| (*k, s.meta))
            .collect();
        // Fragment entry: the lowest-port VIP on this address and protocol, unless a real
        // all-ports VIP owns the (addr, 0, proto) key.
        let frag_key = VipKey { port: 0, ..*key };
        if !self.vips.contains_key(&frag_key) {
            let target = same_addr
                .iter()
                .filter(|(k, _)| k.proto == key.proto)
                .min_by_key(|(k, _)| u16::from_be(k.port));
            match target {
                Some((_, live)) => {
                    let meta = VipMeta {
                        flags: live.flags | VIP_F_FRAG_ONLY,
                        ..*live
                    };
                    if self.vips_map.get(&frag_key, 0).ok() != Some(meta) {
                        self.vips_map
                            .insert(frag_key, meta, 0)
                            .map_err(map_err(lb_common::MAP_VIPS))?;
                    }
                }
                None => self.remove_if_present(&frag_key)?,
            }
        }
        let marker = VipKey {
            port: 0,
            proto: PROTO_ANY,
            ..*key
        };
        if same_addr.is_empty() {
            self.remove_if_present(&marker)?;
        } else {
            let meta = VipMeta {
                index: 0,
                flags: VIP_F_ADDR_MARKER,
                route_base: 0,
                route_count: 0,
                hash_seed: 0,
            };
            if self.vips_map.get(&marker, 0).ok() != Some(meta) {
                self.vips_map
                    .insert(marker, meta, 0)
                    .map_err(map_err(lb_common::MAP_VIPS))?;
            }
        }
        self.sync_filter()
    }

    fn remove_if_present(&mut self, key: &VipKey) -> Result<()> {
        match self.vips_map.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(map_err(lb_common::MAP_VIPS)(e)),
        }
    }

    /// Recomputes the VIP address bitmap and writes the words that changed.
    fn sync_filter(&mut self) -> Result<()> {
        let mut want = vec![0u64; VIP_FILTER_WORDS as usize];
        let addrs: BTreeSet<([u8; 16], u8)> =
            self.vips.keys().map(|k| (k.addr, k.family)).collect();
        for (addr, family) in addrs {
            let (w, bit) = hash::filter_slot(addr_hash(&addr, family));
            want[w as usize] |= bit;
        }
        for (i, (have, want)) in self.filter.iter_mut().zip(want).enumerate() {
            if *have != want {
                self.filter_map
                    .set(i as u32, want, 0)
                    .map_err(map_err(lb_common::MAP_VIP_FILTER))?;
                *have = want;
            }
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Conntrack and counters
    // -----------------------------------------------------------------------------------------

    /// A second mapping of `CONNTRACK`, for a scan that runs beside the daemon's other work
    /// (the kernel writes the table concurrently anyway; readers check every slot they use).
    pub fn conntrack_view(&self) -> Result<CtTable> {
        conntrack_table(&self.ebpf, self.conntrack.sets(), self.hash_seed)
    }

    /// All tracked flows.
    pub fn conntrack(&self) -> Result<Vec<(FlowKey, CtEntry)>> {
        Ok(self.conntrack.entries())
    }

    /// Looks one flow up.
    pub fn conntrack_get(&self, key: &FlowKey) -> Result<Option<CtEntry>> {
        Ok(self.conntrack.get(key))
    }

    /// Deletes one flow (expiry of idle entries).
    pub fn conntrack_remove(&mut self, key: &FlowKey) -> Result<()> {
        self.conntrack.remove(key);
        Ok(())
    }

    /// Records one flow where the kernel would (tests, and re-homing flows).
    pub fn conntrack_insert(&mut self, key: &FlowKey, entry: &CtEntry) -> Result<()> {
        if !self.conntrack.insert(key, entry) {
            return Err(DataplaneError::Invalid(
                "conntrack set full of flows on moved routes (CT_F_KEEP): not recorded".into(),
            ));
        }
        Ok(())
    }

    /// Global verdict/event counters and drop reasons, summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let sum = |m: &PerCpuArray<MapData, u64>, name: &'static str, n: u32| {
            (0..n)
                .map(|i| {
                    m.get(&i, 0)
                        .map(|v| v.iter().sum::<u64>())
                        .map_err(map_err(name))
                })
                .collect::<Result<Vec<u64>>>()
        };
        Ok(Counters {
            stats: sum(&self.stats_map, lb_common::MAP_STATS, STAT_COUNT)?,
            drops: sum(&self.drops_map, lb_common::MAP_DROPS, DROP_REASON_COUNT)?,
        })
    }

    /// Forwarded traffic of one VIP index, summed over CPUs.
    pub fn vip_traffic(&self, index: u32) -> Result<TrafficCounter> {
        sum_traffic(&self.vip_stats_map, lb_common::MAP_VIP_STATS, index)
    }

    /// Forwarded traffic of one node index, summed over CPUs.
    pub fn node_traffic(&self, index: u32) -> Result<TrafficCounter> {
        sum_traffic(&self.node_stats_map, lb_common::MAP_NODE_STATS, index)
    }

    /// Packets forwarded through each route of a VIP (both generations summed), estimated from
    /// the kernel's samples: each counts as `ROUTE_STATS_SAMPLE` packets.
    pub fn route_packets(&self, key: &VipKey) -> Result<Vec<u64>> {
        let s = self
            .vips
            .get(key)
            .ok_or_else(|| DataplaneError::UnknownVip(vip_display(key)))?;
        let n = s.meta.route_count;
        (0..n)
            .map(|r| {
                let mut total = 0;
                for slot in [s.base + r, s.base + n + r] {
                    let v = self
                        .route_stats_map
                        .get(&slot, 0)
                        .map_err(map_err(lb_common::MAP_ROUTE_STATS))?;
                    total += v.iter().sum::<u64>();
                }
                Ok(total * lb_common::ROUTE_STATS_SAMPLE)
            })
            .collect()
    }
}

/// `CONNTRACK` mapped (for flows hashed with `seed`), after checking that a pinned one has
/// this build's layout and size.
fn conntrack_table(ebpf: &Ebpf, sets: u32, seed: u32) -> Result<CtTable> {
    let name = lb_common::MAP_CONNTRACK;
    let Some(aya::maps::Map::Array(data)) = ebpf.map(name) else {
        return Err(DataplaneError::Invalid(format!(
            "map {name} is not the set-associative array of this build (pinned by an older \
             version?); remove the pins to start with an empty table"
        )));
    };
    let info = data.info().map_err(map_err(name))?;
    if info.value_size() as usize != size_of::<CtSet>() || info.map_flags() & CT_MAP_FLAGS == 0 {
        return Err(DataplaneError::Invalid(format!(
            "pinned {name} has another layout (value size {}, flags {:#x}); remove the pins to \
             start with an empty table",
            info.value_size(),
            info.map_flags()
        )));
    }
    if info.max_entries() != sets {
        return Err(DataplaneError::Invalid(format!(
            "pinned {name} has {} sets ({} flows) but {sets} were asked for; remove the pins or \
             keep conntrack_size",
            info.max_entries(),
            info.max_entries() as usize * CT_WAYS
        )));
    }
    let fd = dup_map_fd(ebpf, name)?;
    CtTable::map(fd, sets, seed)
        .map_err(|e| DataplaneError::Invalid(format!("mmap of {name}: {e}")))
}

/// Maps sized by this build's limits: a pinned one made by a build with other limits (before an
/// upgrade) is refused by name here, rather than failing later at an index past its end.
fn check_build_sizes(ebpf: &Ebpf) -> Result<()> {
    use aya::maps::Map;
    for (name, want) in [
        (lb_common::MAP_VIPS, MAX_VIPS * 4),
        (lb_common::MAP_VIP_CACHE, VIP_CACHE_SIZE),
        (lb_common::MAP_VIP_GEN, MAX_VIPS),
        (lb_common::MAP_VIP_STATS, MAX_VIPS),
        (lb_common::MAP_VIP_FILTER, VIP_FILTER_WORDS),
        (lb_common::MAP_NODES, lb_common::MAX_NODES),
        (lb_common::MAP_NODE_STATS, lb_common::MAX_NODES),
    ] {
        let data = match ebpf.map(name) {
            Some(Map::Array(d) | Map::HashMap(d) | Map::PerCpuArray(d)) => d,
            _ => return Err(DataplaneError::MissingMap(name)),
        };
        let have = data.info().map_err(map_err(name))?.max_entries();
        if have != want {
            return Err(DataplaneError::Invalid(format!(
                "pinned {name} has {have} entries but this build uses {want} (pinned by another \
                 version?); remove the pins to start this one"
            )));
        }
    }
    Ok(())
}

/// A second fd of a map, before it is taken.
fn dup_map_fd(ebpf: &Ebpf, name: &'static str) -> Result<OwnedFd> {
    match ebpf.map(name) {
        Some(aya::maps::Map::Array(data)) => data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| DataplaneError::Invalid(format!("dup of map {name} fd: {e}"))),
        _ => Err(DataplaneError::MissingMap(name)),
    }
}

/// `ROUTES`: read and written as memory when the map is mmapable (this build creates it so),
/// else through syscalls (a map pinned by an older build, which keeps working, more slowly).
struct RouteSlots {
    map: Array<MapData, RouteEntry>,
    mem: Option<MappedArray<RouteEntry>>,
}

impl RouteSlots {
    fn new(map: Array<MapData, RouteEntry>) -> Result<Self> {
        let name = lb_common::MAP_ROUTES;
        let data = Self::data(&map);
        let info = data.info().map_err(map_err(name))?;
        let mem = if info.map_flags() & lb_common::ROUTES_MAP_FLAGS == 0 {
            tracing::warn!(
                "pinned {name} is not mmapable (made by an older build): route changes use \
                 BPF_MAP_UPDATE_BATCH; remove the pins once to get the faster path"
            );
            None
        } else {
            let fd = data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| DataplaneError::Invalid(format!("dup of map {name} fd: {e}")))?;
            let m = MappedArray::map(fd, info.max_entries())
                .map_err(|e| DataplaneError::Invalid(format!("mmap of {name}: {e}")))?;
            Some(m)
        };
        Ok(Self { map, mem })
    }

    fn data(map: &Array<MapData, RouteEntry>) -> &MapData {
        aya::maps::IterableMap::<u32, RouteEntry>::map(map)
    }

    fn len(&self) -> u32 {
        self.map.len()
    }

    /// One slot.
    fn get(&self, i: u32) -> Result<RouteEntry> {
        match &self.mem {
            Some(m) if i < m.len() => Ok(m.get(i)),
            _ => self.map.get(&i, 0).map_err(map_err(lb_common::MAP_ROUTES)),
        }
    }

    /// Writes slots: stores into the mapping, or one `BPF_MAP_UPDATE_BATCH` call (aya has no
    /// batch API).
    fn write(&mut self, keys: &[u32], values: &[RouteEntry]) -> Result<()> {
        if let Some(m) = self.mem.as_mut() {
            if let Some(k) = keys.iter().find(|k| **k >= m.len()) {
                return Err(DataplaneError::Invalid(format!(
                    "ROUTES slot {k} >= {}",
                    m.len()
                )));
            }
            for (k, v) in keys.iter().zip(values) {
                m.set(*k, *v);
            }
            // The stores are visible before whatever the caller writes next (the flip).
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            return Ok(());
        }
        batch_update(Self::data(&self.map).fd().as_fd(), keys, values).map_err(|e| {
            DataplaneError::Map {
                name: lb_common::MAP_ROUTES,
                source: Box::new(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_update_batch",
                    io_error: e,
                })),
            }
        })
    }
}

/// Every entry of an array map, in order, by `BPF_MAP_LOOKUP_BATCH`.
fn read_array<V: aya::Pod + Default>(
    map: &Array<MapData, V>,
    name: &'static str,
) -> Result<Vec<V>> {
    let data = aya::maps::IterableMap::<u32, V>::map(map);
    batch_lookup(data.fd().as_fd(), map.len()).map_err(|e| {
        map_err(name)(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_lookup_batch",
            io_error: e,
        }))
    })
}

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// One `bpf(cmd, attr)` call of a batch command (aya has no batch API).
fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: the caller's attr points at live key/value buffers with room for `count`
    // entries of the map's key and value sizes (and at the cursors it names); the kernel
    // writes back `count` and the cursor.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `BPF_MAP_LOOKUP_BATCH` over a whole array map of `len` entries: a few syscalls, not one per
/// entry. Values come back in key order (arrays return keys `0..len`, checked).
fn batch_lookup<V: Copy + Default>(fd: BorrowedFd<'_>, len: u32) -> std::io::Result<Vec<V>> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    let n = len as usize;
    let mut keys = vec![0u32; n];
    let mut values = vec![V::default(); n];
    let (mut done, mut cursor) = (0usize, None::<u32>);
    while done < n {
        let mut next = 0u32;
        let mut attr = BatchAttr {
            in_batch: cursor.as_ref().map_or(0, |c| c as *const u32 as u64),
            out_batch: &mut next as *mut u32 as u64,
            keys: keys[done..].as_mut_ptr() as u64,
            values: values[done..].as_mut_ptr() as u64,
            count: (n - done) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr);
        done += attr.count as usize;
        match r {
            // ENOENT: no entries after this batch.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        if attr.count == 0 {
            return Err(std::io::Error::other("batch lookup made no progress"));
        }
        cursor = Some(next);
    }
    if done != n || keys.iter().enumerate().any(|(i, k)| *k as usize != i) {
        return Err(std::io::Error::other(format!(
            "batch lookup returned {done} of {n} entries, or out of order"
        )));
    }
    Ok(values)
}

/// `BPF_MAP_UPDATE_BATCH` on an array map: one syscall for many entries.
fn batch_update<V: Copy>(fd: BorrowedFd<'_>, keys: &[u32], values: &[V]) -> std::io::Result<()> {
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    debug_assert_eq!(keys.len(), values.len());
    let mut done = 0;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: u32::try_from(keys.len() - done).unwrap_or(u32::MAX),
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        bpf_batch(BPF_MAP_UPDATE_BATCH, &mut attr)?;
        if attr.count == 0 {
            return Err(std::io::Error::other("batch update made no progress"));
        }
        done += attr.count as usize;
    }
    Ok(())
}

fn sum_traffic(
    m: &PerCpuArray<MapData, TrafficCounter>,
    name: &'static str,
    index: u32,
) -> Result<TrafficCounter> {
    let v = m.get(&index, 0).map_err(map_err(name))?;
    Ok(v.iter()
        .fold(TrafficCounter::default(), |a, c| TrafficCounter {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
        }))
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp> {
    let p = ebpf.program_mut(name).ok_or_else(|| {
        DataplaneError::Invalid(format!("program {name} missing from the object"))
    })?;
    p.try_into()
        .map_err(|e| DataplaneError::Program(name, Box::new(e)))
}

fn check_node_index(index: u32) -> Result<()> {
    if index >= lb_common::MAX_NODES {
        return Err(DataplaneError::Invalid(format!(
            "node index {index} >= {}",
            lb_common::MAX_NODES
        )));
    }
    Ok(())
}

fn validate_key(key: &VipKey) -> Result<()> {
    match key.family {
        FAMILY_V4 if key.addr[4..].iter().all(|b| *b == 0) => {}
        FAMILY_V4 => {
            return Err(DataplaneError::Invalid(
                "IPv4 VIP key with bytes beyond the first 4".into(),
            ));
        }
        FAMILY_V6 => {}
        f => return Err(DataplaneError::Invalid(format!("address family {f}"))),
    }
    if key.proto != lb_common::PROTO_TCP && key.proto != lb_common::PROTO_UDP {
        return Err(DataplaneError::Invalid(format!(
            "protocol {} (only TCP and UDP VIPs)",
            key.proto
        )));
    }
    Ok(())
}

/// The `VIP_CACHE` slot of a VIP, as the kernel computes it.
fn cache_slot(key: &VipKey) -> u32 {
    hash::vip_cache_slot(addr_hash(&key.addr, key.family), key.port, key.proto)
}

/// Waits until every XDP program run that started before now has finished: an RCU grace
/// period (`membarrier(MEMBARRIER_CMD_GLOBAL)` runs `synchronize_rcu`). Where that command is
/// unavailable (nohz_full), a sleep far longer than any program run.
fn wait_for_readers() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The `VIP_FILTER` hash of an address as the kernel computes it.
pub fn addr_hash(addr: &[u8; 16], family: u8) -> u32 {
    if family == FAMILY_V4 {
        hash::addr_hash_v4(hash::addr_word(&[addr[0], addr[1], addr[2], addr[3]]))
    } else {
        hash::addr_hash_v6(&hash::addr_words(addr))
    }
}

/// Human form of a VIP key: `10.0.0.1:80/tcp`, `[2001:db8::1]:443/udp`.
pub fn vip_display(key: &VipKey) -> String {
    let sa = std::net::SocketAddr::new(key_ip(key), u16::from_be(key.port));
    format!("{sa}/{}", proto_name(key.proto))
}

/// `tcp`, `udp` (the names `lb.toml` and VIP names use), `?` for anything else.
pub fn proto_name(p: u8) -> &'static str {
    match p {
        lb_common::PROTO_TCP => "tcp",
        lb_common::PROTO_UDP => "udp",
        _ => "?",
    }
}

/// A VIP key's address (inverse of [`ip_bytes`]).
pub fn key_ip(key: &VipKey) -> std::net::IpAddr {
    if key.family == FAMILY_V4 {
        std::net::IpAddr::from([key.addr[0], key.addr[1], key.addr[2], key.addr[3]])
    } else {
        std::net::IpAddr::from(key.addr)
    }
}

/// Builds a VIP key from an address, a host-order port and a protocol number.
pub fn vip_key(addr: std::net::IpAddr, port: u16, proto: u8) -> VipKey {
    let (bytes, family) = ip_bytes(addr);
    VipKey {
        addr: bytes,
        port: port.to_be(),
        proto,
        family,
    }
}

/// An address as stored in keys (IPv4 in the first 4 bytes) and its family.
pub fn ip_bytes(addr: std::net::IpAddr) -> ([u8; 16], u8) {
    match addr {
        std::net::IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            (b, FAMILY_V4)
        }
        std::net::IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    }
}

/// Removes a pin directory's map files (used with `--detach` / test cleanup).
pub fn remove_pins(dir: &Path) -> std::io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Read-only view of a running daemon's pinned maps (tests, benchmarks, inspection tools):
/// the live route table of a VIP exactly as packets see it.
pub struct PinnedView {
    vips: HashMap<MapData, VipKey, VipMeta>,
    vip_gen: Array<MapData, u32>,
    routes: RouteSlots,
    nodes: Array<MapData, NodeEntry>,
}

impl PinnedView {
    /// Opens the maps pinned under `pin_dir` (`/sys/fs/bpf/<instance>`).
    pub fn open(pin_dir: &Path) -> Result<Self> {
        fn open_map<M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
            dir: &Path,
            name: &'static str,
        ) -> Result<M> {
            let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
            let map = aya::maps::Map::from_map_data(data).map_err(map_err(name))?;
            M::try_from(map).map_err(map_err(name))
        }
        Ok(Self {
            vips: open_map(pin_dir, lb_common::MAP_VIPS)?,
            vip_gen: open_map(pin_dir, lb_common::MAP_VIP_GEN)?,
            routes: RouteSlots::new(open_map(pin_dir, lb_common::MAP_ROUTES)?)?,
            nodes: open_map(pin_dir, lb_common::MAP_NODES)?,
        })
    }

    /// The `VIPS` entry of `key` (its flow-hash seed included).
    pub fn meta(&self, key: &VipKey) -> Result<VipMeta> {
        self.vips
            .get(key, 0)
            .map_err(|_| DataplaneError::UnknownVip(vip_display(key)))
    }

    /// Where the live table of `key` is: (its index's `VIP_GEN`, first slot, route count).
    pub fn live(&self, key: &VipKey) -> Result<(u32, u32, u32)> {
        let meta = self
            .vips
            .get(key, 0)
            .map_err(|_| DataplaneError::UnknownVip(vip_display(key)))?;
        let generation = self
            .vip_gen
            .get(&meta.index, 0)
            .map_err(map_err(lb_common::MAP_VIP_GEN))?;
        Ok((generation, meta.live_offset(generation), meta.route_count))
    }

    /// Reads `out.len()` `ROUTES` slots from `offset`.
    pub fn read_routes(&self, offset: u32, out: &mut [RouteEntry]) -> Result<()> {
        for (i, e) in (offset..).zip(out.iter_mut()) {
            *e = self.routes.get(i)?;
        }
        Ok(())
    }

    /// The live route table of `key` (its `VipMeta`, its index's `VIP_GEN`, then that
    /// generation's entries).
    pub fn routes(&self, key: &VipKey) -> Result<Vec<RouteEntry>> {
        let (_, offset, count) = self.live(key)?;
        let mut out = vec![RouteEntry::default(); count as usize];
        self.read_routes(offset, &mut out)?;
        Ok(out)
    }

    /// A node's entry.
    pub fn node(&self, index: u32) -> Result<NodeEntry> {
        self.nodes
            .get(&index, 0)
            .map_err(map_err(lb_common::MAP_NODES))
    }
}
