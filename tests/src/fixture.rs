//! The fixed data-plane configuration the fixture tests, the fuzzer and the benchmark share:
//! a few nodes, VIPs in both forwarding modes, IPv4 and IPv6, 5-tuple and source affinity,
//! N = 16 routes per VIP, written through the same `Dataplane` code the daemon uses. Plus the
//! flow-hash helpers that predict a flow's route owner, and loaders for the decap and baseline
//! programs (which `Dataplane` does not load).
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use lb_common::{
    FlowKey, GlobalConfig, NODE_ACTIVE, NodeEntry, PROTO_TCP, PROTO_UDP, RouteEntry,
    hash::{addr_word, addr_words, flow_hash_v4, flow_hash_v6, ports_word, route_index},
};
use lb_userspace::{
    dataplane::{Dataplane, DataplaneOptions, ForwardMode, HashMode, VipSpec, ip_bytes, vip_key},
    objects,
};

use crate::packet::Mac;

/// Routes per VIP.
pub const N: u32 = 16;
/// Slots of `ROUTES` the fixtures load with.
pub const ROUTE_SLOTS: u32 = 1024;
/// Nodes that own routes, round robin: route `i` belongs to `1 + i % 4`.
pub const ROUTE_NODES: [u32; 4] = [1, 2, 3, 4];
/// A node with MAC but no IPv4/IPv6 address (ipip to it is `NoBackend`).
pub const NODE_NOADDR: u32 = 5;

/// The balancer's own MAC (destination of client frames).
pub const LB_MAC: Mac = [0x02, 0x1b, 0x00, 0x00, 0x00, 0x01];
/// The upstream router's MAC (source of client frames).
pub const ROUTER_MAC: Mac = [0x02, 0xc1, 0x1e, 0x47, 0x00, 0x01];
/// The ipip gateway MAC.
pub const GW_MAC: Mac = [0x02, 0x9a, 0x7e, 0x00, 0x00, 0x01];
/// Path MTU towards the nodes.
pub const MTU: u16 = 1500;
pub const IPIP_SRC4: [u8; 4] = [172, 16, 0, 0];
pub const IPIP_SRC4_MASK: [u8; 4] = [0, 0, 0xff, 0xff];
pub const IPIP_SRC6: [u8; 16] = [
    0xfd, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef,
];

/// Node `i`'s MAC.
pub const fn node_mac(i: u32) -> Mac {
    [0x02, 0x4e, 0x00, 0x00, 0x00, i as u8]
}

/// Node `i`'s IPv4 address (10.1.0.i).
pub const fn node_addr4(i: u32) -> [u8; 4] {
    [10, 1, 0, i as u8]
}

/// Node `i`'s IPv6 address (fd00:1::i).
pub const fn node_addr6(i: u32) -> [u8; 16] {
    [
        0xfd, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, i as u8,
    ]
}

pub fn node_entry(i: u32) -> NodeEntry {
    let (addr4, addr6) = if i == NODE_NOADDR {
        ([0; 4], [0; 16])
    } else {
        (node_addr4(i), node_addr6(i))
    };
    NodeEntry {
        addr6,
        addr4,
        mac: node_mac(i),
        state: NODE_ACTIVE,
        _pad: 0,
    }
}

/// The global config.
pub fn config() -> GlobalConfig {
    GlobalConfig {
        gw_mac: GW_MAC,
        mtu: MTU,
        ipip_src4: IPIP_SRC4,
        ipip_src4_mask: IPIP_SRC4_MASK,
        ipip_src6: IPIP_SRC6,
        ..Default::default()
    }
}

/// One configured VIP.
#[derive(Clone, Copy, Debug)]
pub struct Vip {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub mode: ForwardMode,
    pub hash: HashMode,
    pub index: u32,
}

impl Vip {
    pub fn spec(&self) -> VipSpec {
        VipSpec {
            key: vip_key(self.addr, self.port, self.proto),
            index: self.index,
            mode: self.mode,
            hash: self.hash,
        }
    }
    pub fn key(&self) -> lb_common::VipKey {
        vip_key(self.addr, self.port, self.proto)
    }
}

pub const fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

pub const fn v6(segs: [u16; 8]) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(
        segs[0], segs[1], segs[2], segs[3], segs[4], segs[5], segs[6], segs[7],
    ))
}

pub const VIP4_A: IpAddr = v4(10, 0, 0, 1);
pub const VIP4_B: IpAddr = v4(10, 0, 0, 2);
pub const VIP4_AFF: IpAddr = v4(10, 0, 0, 3);
pub const VIP4_NOADDR: IpAddr = v4(10, 0, 0, 4);
pub const VIP4_ALLPORTS: IpAddr = v4(10, 0, 0, 5);
pub const VIP6_A: IpAddr = v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1]);
pub const VIP6_B: IpAddr = v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 2]);
pub const VIP6_AFF: IpAddr = v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 3]);
pub const VIP6_NOADDR: IpAddr = v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 4]);

pub const CLIENT4: IpAddr = v4(192, 0, 2, 10);
pub const CLIENT6: IpAddr = v6([0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 0x10]);
/// A router that sends ICMP errors.
pub const ROUTER4: IpAddr = v4(198, 51, 100, 1);
pub const ROUTER6: IpAddr = v6([0x2001, 0xdb8, 0xee, 0, 0, 0, 0, 1]);
/// Addresses that are not VIPs (their filter bits are checked to be clear).
pub const OTHER4: IpAddr = v4(10, 9, 9, 9);
pub const OTHER6: IpAddr = v6([0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 9]);

const fn vip(
    addr: IpAddr,
    port: u16,
    proto: u8,
    mode: ForwardMode,
    hash: HashMode,
    index: u32,
) -> Vip {
    Vip {
        addr,
        port,
        proto,
        mode,
        hash,
        index,
    }
}

use ForwardMode::{DsrL2, Ipip};
use HashMode::{FiveTuple, SourceIp};

pub const V4_TCP_DSR: Vip = vip(VIP4_A, 80, PROTO_TCP, DsrL2, FiveTuple, 0);
pub const V4_UDP_DSR: Vip = vip(VIP4_A, 53, PROTO_UDP, DsrL2, FiveTuple, 1);
pub const V4_TCP_IPIP: Vip = vip(VIP4_B, 443, PROTO_TCP, Ipip, FiveTuple, 2);
pub const V4_UDP_IPIP: Vip = vip(VIP4_B, 4500, PROTO_UDP, Ipip, FiveTuple, 3);
pub const V6_TCP_DSR: Vip = vip(VIP6_A, 80, PROTO_TCP, DsrL2, FiveTuple, 4);
pub const V6_UDP_DSR: Vip = vip(VIP6_A, 53, PROTO_UDP, DsrL2, FiveTuple, 5);
pub const V6_TCP_IPIP: Vip = vip(VIP6_B, 443, PROTO_TCP, Ipip, FiveTuple, 6);
pub const V6_UDP_IPIP: Vip = vip(VIP6_B, 4500, PROTO_UDP, Ipip, FiveTuple, 7);
pub const V4_TCP_AFF: Vip = vip(VIP4_AFF, 8080, PROTO_TCP, DsrL2, SourceIp, 8);
pub const V6_TCP_AFF: Vip = vip(VIP6_AFF, 8080, PROTO_TCP, Ipip, SourceIp, 9);
/// ipip VIP whose every route points at [`NODE_NOADDR`].
pub const V4_NOADDR: Vip = vip(VIP4_NOADDR, 80, PROTO_TCP, Ipip, FiveTuple, 10);
pub const V6_NOADDR: Vip = vip(VIP6_NOADDR, 80, PROTO_TCP, Ipip, FiveTuple, 11);
/// All-ports UDP VIP (`port == 0`).
pub const V4_UDP_ALL: Vip = vip(VIP4_ALLPORTS, 0, PROTO_UDP, DsrL2, FiveTuple, 12);

pub const VIPS: [Vip; 13] = [
    V4_TCP_DSR,
    V4_UDP_DSR,
    V4_TCP_IPIP,
    V4_UDP_IPIP,
    V6_TCP_DSR,
    V6_UDP_DSR,
    V6_TCP_IPIP,
    V6_UDP_IPIP,
    V4_TCP_AFF,
    V6_TCP_AFF,
    V4_NOADDR,
    V6_NOADDR,
    V4_UDP_ALL,
];

/// Node indices the fixtures configure (for counter checks).
pub const NODES: [u32; 5] = [1, 2, 3, 4, NODE_NOADDR];

/// The standard table: route `i` -> node `1 + i % 4`, no flags.
pub fn std_routes() -> Vec<RouteEntry> {
    (0..N)
        .map(|i| RouteEntry {
            node: ROUTE_NODES[(i % 4) as usize],
            flags: 0,
        })
        .collect()
}

/// The route table a VIP starts with.
pub fn routes_for(v: &Vip) -> Vec<RouteEntry> {
    if v.index == V4_NOADDR.index || v.index == V6_NOADDR.index {
        vec![
            RouteEntry {
                node: NODE_NOADDR,
                flags: 0
            };
            N as usize
        ]
    } else {
        std_routes()
    }
}

/// Whether `addr` is one of the configured VIP addresses.
pub fn is_vip_addr(addr: IpAddr) -> bool {
    VIPS.iter().any(|v| v.addr == addr)
}

/// The flow-hash seed the fixtures' balancer runs with (the daemon draws its own at random).
pub const HASH_SEED: u32 = 0x5eed_f1c5;

/// Loads the balancer unpinned and writes the standard configuration.
pub fn load() -> Result<Dataplane> {
    load_with(64 * 1024)
}

/// As [`load`], with a given conntrack size.
pub fn load_with(conntrack_size: u32) -> Result<Dataplane> {
    let mut dp = Dataplane::load(&DataplaneOptions {
        route_slots: ROUTE_SLOTS,
        conntrack_size,
        pin_dir: None,
    })
    .context("loading the balancer")?;
    configure(&mut dp)?;
    Ok(dp)
}

/// Writes config, nodes and VIPs.
pub fn configure(dp: &mut Dataplane) -> Result<()> {
    dp.set_hash_seed(HASH_SEED);
    dp.set_config(&config())?;
    for i in NODES {
        dp.set_node(i, &node_entry(i))?;
    }
    for v in VIPS {
        dp.upsert_vip(&v.spec(), &routes_for(&v))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Flow hash predictions.
// ---------------------------------------------------------------------------------------------

/// A host-order port as the raw network-order `u16` the hash and `FlowKey` use.
pub const fn wire16(p: u16) -> u16 {
    u16::from_ne_bytes(p.to_be_bytes())
}

/// The fixtures' flow hash (under [`HASH_SEED`]) for (client, VIP, client port, VIP port,
/// protocol). Pass ports 0 for source affinity and fragments.
pub fn flow_hash(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8) -> u32 {
    seeded_flow_hash(HASH_SEED, src, dst, sport, dport, proto)
}

/// The kernel's flow hash under `seed` (a running daemon's: `PinnedView::meta`).
pub fn seeded_flow_hash(
    seed: u32,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    proto: u8,
) -> u32 {
    let ports = ports_word(wire16(sport), wire16(dport));
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => flow_hash_v4(
            seed,
            addr_word(&s.octets()),
            addr_word(&d.octets()),
            ports,
            proto,
        ),
        (IpAddr::V6(s), IpAddr::V6(d)) => flow_hash_v6(
            seed,
            &addr_words(&s.octets()),
            &addr_words(&d.octets()),
            ports,
            proto,
        ),
        _ => panic!("mixed families"),
    }
}

/// The hash the balancer uses for a packet of `vip` from `src:sport` (affinity VIPs hash
/// without ports).
pub fn vip_hash(vip: &Vip, src: IpAddr, sport: u16, dport: u16) -> u32 {
    match vip.hash {
        HashMode::FiveTuple => flow_hash(src, vip.addr, sport, dport, vip.proto),
        HashMode::SourceIp => flow_hash(src, vip.addr, 0, 0, vip.proto),
    }
}

/// Route ID of a hash.
pub fn route_of(hash: u32) -> u32 {
    route_index(hash, N)
}

/// Owner of a hash in the standard table.
pub fn std_owner(hash: u32) -> u32 {
    std_routes()[route_of(hash) as usize].node
}

/// The conntrack key of a client flow to a VIP.
pub fn flow_key(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8) -> FlowKey {
    let (s, family) = ip_bytes(src);
    let (d, _) = ip_bytes(dst);
    FlowKey {
        src: s,
        dst: d,
        sport: wire16(sport),
        dport: wire16(dport),
        proto,
        family,
        _pad: [0; 2],
    }
}

/// The first client port from `start` whose flow to `vip` lands on route `route`.
pub fn port_for_route(vip: &Vip, src: IpAddr, start: u16, route: u32) -> u16 {
    (start..=u16::MAX)
        .find(|p| route_of(vip_hash(vip, src, *p, vip.port)) == route)
        .expect("some port hashes to every route")
}

/// The first client port from `start` whose flow to `vip` has standard owner `node`.
pub fn port_for_node(vip: &Vip, src: IpAddr, start: u16, node: u32) -> u16 {
    (start..=u16::MAX)
        .find(|p| std_owner(vip_hash(vip, src, *p, vip.port)) == node)
        .expect("some port hashes to every node")
}

// ---------------------------------------------------------------------------------------------
// Other programs and test runs.
// ---------------------------------------------------------------------------------------------

/// One `BPF_PROG_TEST_RUN`: (verdict, output bytes, kernel-measured duration per repeat).
pub fn xdp_run(prog: &mut Xdp, input: &[u8], repeat: u32) -> Result<(u32, Vec<u8>, Duration)> {
    let mut out = vec![0u8; input.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out, r.duration))
}

fn load_xdp(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    let p: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing"))?
        .try_into()?;
    p.load().with_context(|| format!("loading {name}"))?;
    Ok(())
}

fn xdp_prog<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing"))?
        .try_into()?)
}

/// The node-side decapsulator, loaded by the same code as `lb decap`.
pub struct Decap(lb_userspace::decap::Decap);

impl Decap {
    pub fn load() -> Result<Self> {
        Ok(Self(lb_userspace::decap::Decap::load()?))
    }

    /// Accepts `addr` as a local VIP.
    pub fn add_vip(&mut self, addr: IpAddr) -> Result<()> {
        self.0.add_vip(addr)
    }

    /// Accepts tunnels whose outer source lies in `net` (`lb decap --source`).
    pub fn add_source(&mut self, net: &str) -> Result<()> {
        self.0.add_source(lb_userspace::config::parse_prefix(net)?)
    }

    pub fn test_run(&mut self, input: &[u8]) -> Result<(u32, Vec<u8>)> {
        let (v, out, _) = xdp_run(self.0.program_mut()?, input, 1)?;
        Ok((v, out))
    }

    /// `DECAP_STATS`, summed over CPUs, indexed by `DecapStat`.
    pub fn stats(&self) -> Result<Vec<u64>> {
        self.0.counters()
    }
}

/// The benchmark baselines (`baseline_pass`, `baseline_tx`).
/// What `bench_wrapper` does to each run's input before the program under test sees it.
#[derive(Clone, Debug, Default)]
pub struct WrapperCfg {
    /// A never-seen flow every run (the counter steps), else the same flow.
    pub new_flows: bool,
    /// Write the counter into the IPv4 source address's low half and the source port.
    pub rewrite_src: bool,
    /// Non-zero: IPv4 destination low half = counter % `vips`.
    pub vips: u32,
    /// The input frame: each run's output is cut back to its length and gets its Ethernet
    /// header back (for programs that rewrite or encapsulate).
    pub restore: Option<Vec<u8>>,
}

pub struct Baseline {
    ebpf: Ebpf,
}

impl Baseline {
    pub fn load() -> Result<Self> {
        let mut ebpf = EbpfLoader::new().load(objects::get(objects::BASELINE, "baseline")?)?;
        load_xdp(&mut ebpf, "baseline_pass")?;
        load_xdp(&mut ebpf, "baseline_tx")?;
        load_xdp(&mut ebpf, "bench_wrapper")?;
        Ok(Self { ebpf })
    }

    pub fn program_mut(&mut self, name: &str) -> Result<&mut Xdp> {
        xdp_prog(&mut self.ebpf, name)
    }

    /// Makes `bench_wrapper` tail-call `target`.
    pub fn set_wrapper_target(&mut self, target: &aya::programs::ProgramFd) -> Result<()> {
        let map = self
            .ebpf
            .map_mut("BENCH_TARGET")
            .ok_or_else(|| anyhow!("BENCH_TARGET missing"))?;
        let mut arr = aya::maps::ProgramArray::try_from(map)?;
        arr.set(0, target, 0)?;
        Ok(())
    }

    /// `bench_wrapper`'s settings (its `BENCH_CFG`).
    pub fn set_wrapper(&mut self, cfg: &WrapperCfg) -> Result<()> {
        let mut words = [0u32; 8];
        words[0] = u32::from(cfg.new_flows);
        words[1] = u32::from(cfg.rewrite_src);
        words[2] = cfg.vips;
        if let Some(input) = &cfg.restore {
            let eth = input
                .get(..14)
                .ok_or_else(|| anyhow!("a restored input needs an Ethernet header"))?;
            words[3] = u32::try_from(input.len())?;
            let mut b = [0u8; 16];
            b[..14].copy_from_slice(eth);
            for (w, c) in words[4..].iter_mut().zip(b.chunks_exact(4)) {
                *w = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        let map = self
            .ebpf
            .map_mut("BENCH_CFG")
            .ok_or_else(|| anyhow!("BENCH_CFG missing"))?;
        let mut arr = aya::maps::Array::<_, [u32; 8]>::try_from(map)?;
        arr.set(0, words, 0)?;
        Ok(())
    }

    /// Points `bench_wrapper` at this object's `baseline_tx` (to measure the wrapper itself).
    pub fn wrap_baseline_tx(&mut self) -> Result<()> {
        let fd = self.program_mut("baseline_tx")?.fd()?.try_clone()?;
        self.set_wrapper_target(&fd)
    }
}
