//! Load/verifier smoke test of the XDP programs, the loader's `VIP_CACHE` / `VIP_GEN` upkeep
//! (cache collisions, table flips, shared indices, re-adoption of pinned maps), and the paths of
//! the packets `cargo xtask bench dataplane` times (the ns/packet comparison with the baselines
//! is the bench's; no test here measures time).
//! Root only. Run: `cargo test --release -p lb-tests --test ebpf_smoke -- --test-threads=1 --nocapture`.
use std::path::{Path, PathBuf};

use aya::{
    maps::{Array, HashMap, Map, MapData},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_common::{
    FAMILY_V4, GlobalConfig, NODE_ACTIVE, NodeEntry, PROTO_TCP, RouteEntry, VIP_CACHE_SIZE,
    VipCacheEntry, VipKey, VipMeta, addr_hash_v4, hash::addr_word, vip_cache_slot,
};
use lb_userspace::{
    dataplane::{Dataplane, DataplaneOptions, ForwardMode, HashMode, VipSpec, remove_pins},
    objects,
};

const VIP: [u8; 4] = [10, 0, 0, 1];
const NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x10];
const NODE1_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
const LB_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

fn ipv4_tcp(dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&LB_MAC);
    p.extend_from_slice(&CLIENT_MAC);
    p.extend_from_slice(&[0x08, 0x00]);
    let total: u16 = 20 + 20 + 10;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 192, 168, 1, 2];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&dst);
    p.extend_from_slice(&ip);
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = flags;
    p.extend_from_slice(&tcp);
    p.extend_from_slice(b"0123456789");
    p
}

/// An established TCP packet (ACK) from the standard client.
fn ack(dst: [u8; 4], dport: u16) -> Vec<u8> {
    ipv4_tcp(dst, 40000, dport, 0x10)
}

/// The dsr-l2 rewrite of `pkt` towards a node with `mac`.
fn dsr_to(pkt: &[u8], mac: [u8; 6]) -> Vec<u8> {
    let mut out = pkt.to_vec();
    out[0..6].copy_from_slice(&mac);
    out[6..12].copy_from_slice(&pkt[0..6]);
    out
}

fn key(addr: [u8; 4], port: u16) -> VipKey {
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(&addr);
    VipKey {
        addr: a,
        port: port.to_be(),
        proto: PROTO_TCP,
        family: FAMILY_V4,
    }
}

fn spec(addr: [u8; 4], port: u16, index: u32, mode: ForwardMode) -> VipSpec {
    VipSpec {
        key: key(addr, port),
        index,
        mode,
        hash: HashMode::FiveTuple,
    }
}

fn table(node: u32, n: usize) -> Vec<RouteEntry> {
    vec![RouteEntry { node, flags: 0 }; n]
}

fn load(pin_dir: Option<&Path>) -> Dataplane {
    let mut dp = Dataplane::load(&DataplaneOptions {
        route_slots: 4096,
        // 8x the 2,000 flows `bench_packets_take_their_paths` inserts: no set overflows (the table is
        // set-associative; a full set evicts even when the table as a whole is not full).
        conntrack_size: 16384,
        pin_dir: pin_dir.map(Path::to_path_buf),
    })
    .unwrap_or_else(|e| panic!("loading the balancer failed: {e:#?}"));
    for (i, mac) in [(0, NODE_MAC), (1, NODE1_MAC)] {
        dp.set_node(
            i,
            &NodeEntry {
                addr4: [192, 168, 2, 10 + i as u8],
                mac,
                state: NODE_ACTIVE,
                ..Default::default()
            },
        )
        .unwrap();
    }
    dp.set_config(&GlobalConfig {
        gw_mac: [2, 0, 0, 0, 0, 0x99],
        mtu: 1500,
        ipip_src4: [10, 9, 0, 0],
        ipip_src4_mask: [0, 0, 0xff, 0xff],
        ..Default::default()
    })
    .unwrap();
    dp
}

fn dataplane() -> Dataplane {
    let mut dp = load(None);
    dp.upsert_vip(&spec(VIP, 80, 0, ForwardMode::DsrL2), &table(0, 64))
        .unwrap();
    dp.upsert_vip(&spec(VIP, 81, 1, ForwardMode::Ipip), &table(0, 64))
        .unwrap();
    dp
}

/// A bpffs directory for one test's pins, removed when dropped.
struct Pins(PathBuf);

impl Pins {
    fn new(name: &str) -> Self {
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/lb-smoke-{name}-{}",
            std::process::id()
        ));
        remove_pins(&dir).unwrap();
        Self(dir)
    }

    fn map(&self, name: &str) -> Map {
        let data = MapData::from_pin(self.0.join(name)).unwrap();
        Map::from_map_data(data).unwrap()
    }

    fn cache(&self, slot: u32) -> VipCacheEntry {
        let m: Array<MapData, VipCacheEntry> =
            self.map(lb_common::MAP_VIP_CACHE).try_into().unwrap();
        m.get(&slot, 0).unwrap()
    }

    fn generation(&self, index: u32) -> u32 {
        let m: Array<MapData, u32> = self.map(lb_common::MAP_VIP_GEN).try_into().unwrap();
        m.get(&index, 0).unwrap()
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = remove_pins(&self.0);
    }
}

fn slot_of(k: &VipKey) -> u32 {
    let a = addr_hash_v4(addr_word(&[k.addr[0], k.addr[1], k.addr[2], k.addr[3]]));
    vip_cache_slot(a, k.port, k.proto)
}

/// Asserts `pkt` is forwarded (dsr-l2) to the node with `mac`.
#[track_caller]
fn assert_dsr(dp: &mut Dataplane, pkt: &[u8], mac: [u8; 6]) {
    let (verdict, out) = dp.test_run(pkt).unwrap();
    assert_eq!(verdict, XDP_TX, "XDP_TX");
    assert_eq!(out, dsr_to(pkt, mac));
}

#[test]
fn balancer_loads_and_forwards() {
    let mut dp = dataplane();
    // dsr-l2 established TCP: MAC rewrite and XDP_TX.
    let pkt = ack(VIP, 80);
    assert_dsr(&mut dp, &pkt, NODE_MAC);
    // Non-VIP: pass untouched.
    let (verdict, out) = dp.test_run(&ack([10, 0, 0, 2], 80)).unwrap();
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, ack([10, 0, 0, 2], 80));
    // SYN: conntrack insert.
    let (verdict, _) = dp.test_run(&ipv4_tcp(VIP, 40000, 80, 0x02)).unwrap();
    assert_eq!(verdict, XDP_TX);
    assert_eq!(dp.conntrack().unwrap().len(), 1);
    // ipip: 20 more bytes, protocol 4.
    let pkt = ack(VIP, 81);
    let (verdict, out) = dp.test_run(&pkt).unwrap();
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out.len(), pkt.len() + 20);
    assert_eq!(out[14 + 9], 4);
    assert_eq!(&out[34..], &pkt[14..]);
    println!("counters: {:?}", dp.counters().unwrap());
}

#[test]
fn decap_loads() {
    let mut ebpf = aya::Ebpf::load(objects::DECAP).unwrap();
    let prog: &mut Xdp = ebpf
        .program_mut(lb_common::PROG_DECAP)
        .unwrap()
        .try_into()
        .unwrap();
    if let Err(e) = prog.load() {
        panic!("loading lb_decap failed: {e:#?}");
    }
}

/// Two VIPs sharing a cache slot: the first keeps it, the second is found through `VIPS`; the
/// slot passes to the second when the first goes, and follows a meta change.
#[test]
fn vip_cache_collisions() {
    let pins = Pins::new("cache");
    let mut dp = load(Some(&pins.0));
    let a = key(VIP, 80);
    let slot = slot_of(&a);
    let b_port = (1..=u16::MAX)
        .find(|p| *p != 80 && slot_of(&key(VIP, *p)) == slot)
        .expect("a port sharing port 80's slot");
    let b = key(VIP, b_port);
    dp.upsert_vip(&spec(VIP, 80, 0, ForwardMode::DsrL2), &table(0, 8))
        .unwrap();
    dp.upsert_vip(&spec(VIP, b_port, 1, ForwardMode::DsrL2), &table(1, 8))
        .unwrap();
    assert_eq!(pins.cache(slot).key, a, "first VIP keeps the slot");
    assert_eq!(pins.cache(slot).meta, dp.vip_meta(&a).unwrap());
    assert_dsr(&mut dp, &ack(VIP, 80), NODE_MAC);
    assert_dsr(&mut dp, &ack(VIP, b_port), NODE1_MAC);
    // Every VIP with a free slot is cached.
    let c = key(VIP, 443);
    assert_ne!(slot_of(&c), slot);
    dp.upsert_vip(&spec(VIP, 443, 2, ForwardMode::DsrL2), &table(1, 8))
        .unwrap();
    assert_eq!(pins.cache(slot_of(&c)).key, c);

    // The occupant goes: the colliding VIP takes the slot.
    dp.remove_vip(&a).unwrap();
    assert_eq!(pins.cache(slot).key, b);
    assert_eq!(pins.cache(slot).meta, dp.vip_meta(&b).unwrap());
    assert_dsr(&mut dp, &ack(VIP, b_port), NODE1_MAC);
    let (verdict, _) = dp.test_run(&ack(VIP, 80)).unwrap();
    assert_eq!(verdict, XDP_PASS, "removed VIP's port on a VIP address");

    // A meta change (mode) reaches the cache entry.
    dp.upsert_vip(&spec(VIP, b_port, 1, ForwardMode::Ipip), &table(1, 8))
        .unwrap();
    assert_eq!(pins.cache(slot).meta, dp.vip_meta(&b).unwrap());
    let pkt = ack(VIP, b_port);
    let (verdict, out) = dp.test_run(&pkt).unwrap();
    assert_eq!((verdict, out.len()), (XDP_TX, pkt.len() + 20), "ipip now");

    // The last VIP of the slot goes: the slot is empty (family 0).
    dp.remove_vip(&b).unwrap();
    assert_eq!(pins.cache(slot).key.family, 0);
    let (verdict, _) = dp.test_run(&ack(VIP, b_port)).unwrap();
    assert_eq!(verdict, XDP_PASS);
    assert_dsr(&mut dp, &ack(VIP, 443), NODE1_MAC);
}

/// Table switches flip `VIP_GEN`; N and index changes; VIPs sharing an index keep their tables.
#[test]
fn table_generations() {
    let pins = Pins::new("gen");
    let mut dp = load(Some(&pins.0));
    let a = key(VIP, 80);
    dp.upsert_vip(&spec(VIP, 80, 3, ForwardMode::DsrL2), &table(0, 16))
        .unwrap();
    let meta = dp.vip_meta(&a).unwrap();
    assert_eq!(pins.generation(3), 0);
    assert_dsr(&mut dp, &ack(VIP, 80), NODE_MAC);
    for (round, node) in [1u32, 0, 1].into_iter().enumerate() {
        dp.set_routes(&a, &table(node, 16)).unwrap();
        assert_eq!(
            pins.generation(3),
            (round as u32 + 1) % 2,
            "one flip per switch"
        );
        assert_eq!(
            dp.vip_meta(&a).unwrap(),
            meta,
            "a switch leaves the meta alone"
        );
        assert_eq!(dp.routes(&a).unwrap(), table(node, 16));
        let mac = if node == 0 { NODE_MAC } else { NODE1_MAC };
        assert_dsr(&mut dp, &ack(VIP, 80), mac);
    }
    // N changes: a new pair at the live generation, no flip.
    dp.upsert_vip(&spec(VIP, 80, 3, ForwardMode::DsrL2), &table(0, 32))
        .unwrap();
    assert_eq!(pins.generation(3), 1);
    assert_eq!(dp.vip_meta(&a).unwrap().route_count, 32);
    assert_eq!(dp.routes(&a).unwrap(), table(0, 32));
    assert_dsr(&mut dp, &ack(VIP, 80), NODE_MAC);
    // The index changes.
    dp.upsert_vip(&spec(VIP, 80, 5, ForwardMode::DsrL2), &table(1, 32))
        .unwrap();
    assert_eq!(dp.vip_meta(&a).unwrap().index, 5);
    assert_eq!(dp.routes(&a).unwrap(), table(1, 32));
    assert_dsr(&mut dp, &ack(VIP, 80), NODE1_MAC);
    assert_eq!(dp.vip_traffic(5).unwrap().packets, 1);

    // Two VIPs on one index (e.g. while the daemon renumbers): flipping one keeps the other.
    let b = key(VIP, 90);
    dp.upsert_vip(&spec(VIP, 90, 5, ForwardMode::DsrL2), &table(0, 8))
        .unwrap();
    for node in [0u32, 1, 0] {
        dp.set_routes(&a, &table(node, 32)).unwrap();
        let mac = if node == 0 { NODE_MAC } else { NODE1_MAC };
        assert_dsr(&mut dp, &ack(VIP, 80), mac);
        assert_dsr(&mut dp, &ack(VIP, 90), NODE_MAC);
        assert_eq!(dp.routes(&b).unwrap(), table(0, 8));
    }
    dp.set_routes(&b, &table(1, 8)).unwrap();
    assert_dsr(&mut dp, &ack(VIP, 90), NODE1_MAC);
    assert_dsr(&mut dp, &ack(VIP, 80), NODE_MAC);
}

/// `update_routes` writes only changes (the inactive slice first catches up with the live one)
/// yet the live table always equals the model, whatever mix of small updates, whole-table
/// writes and VIPs sharing an index comes before; a bad change is refused and changes nothing.
#[test]
fn incremental_route_updates_match_a_model() {
    use rand::{Rng as _, SeedableRng as _};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut dp = load(None);
    let a = key(VIP, 80);
    let b = key(VIP, 90);
    let n = 257usize;
    let mut model = table(0, n);
    dp.upsert_vip(&spec(VIP, 80, 3, ForwardMode::DsrL2), &model)
        .unwrap();
    dp.upsert_vip(&spec(VIP, 90, 3, ForwardMode::DsrL2), &table(1, 8))
        .unwrap();
    for round in 0..300 {
        if round % 37 == 36 {
            // A whole-table write in between (start-up, resync).
            for e in model.iter_mut() {
                e.node = rng.gen_range(0..2);
            }
            dp.set_routes(&a, &model).unwrap();
        } else {
            let changes: Vec<(u32, RouteEntry)> = (0..rng.gen_range(0..12))
                .map(|_| {
                    (
                        rng.gen_range(0..n as u32),
                        RouteEntry {
                            node: rng.gen_range(0..2),
                            flags: rng.gen_range(0..2),
                        },
                    )
                })
                .collect();
            dp.update_routes(&a, &changes).unwrap();
            for (r, e) in &changes {
                model[*r as usize] = *e;
            }
        }
        assert_eq!(dp.routes(&a).unwrap(), model, "round {round}");
        assert_eq!(
            dp.routes(&b).unwrap(),
            table(1, 8),
            "the index sharer keeps its table"
        );
    }
    let bad = [(n as u32, RouteEntry { node: 0, flags: 0 })];
    assert!(dp.update_routes(&a, &bad).is_err());
    assert_eq!(dp.routes(&a).unwrap(), model);
}

/// A new `Dataplane` on the same pins takes over the VIPs, tables and generations; maps pinned
/// in the earlier format (live slice named by `VipMeta`, bit 15 for "second slice") convert.
#[test]
fn readopt_pinned() {
    let pins = Pins::new("readopt");
    let a = key(VIP, 80);
    let b = key(VIP, 81);
    {
        let mut dp = load(Some(&pins.0));
        dp.upsert_vip(&spec(VIP, 80, 0, ForwardMode::DsrL2), &table(0, 16))
            .unwrap();
        dp.upsert_vip(&spec(VIP, 81, 1, ForwardMode::DsrL2), &table(0, 16))
            .unwrap();
        dp.set_routes(&a, &table(1, 16)).unwrap();
        assert_eq!(pins.generation(0), 1);
    }
    let mut dp = load(Some(&pins.0));
    assert_eq!(dp.vip_keys(), vec![a, b]);
    assert_eq!(dp.routes(&a).unwrap(), table(1, 16));
    assert_dsr(&mut dp, &ack(VIP, 80), NODE1_MAC);
    dp.set_routes(&a, &table(0, 16)).unwrap();
    assert_eq!(pins.generation(0), 0);
    assert_dsr(&mut dp, &ack(VIP, 80), NODE_MAC);
    let meta_b = dp.vip_meta(&b).unwrap();
    drop(dp);

    // Rewrite b as the earlier format would have it after one switch: the live table (node 1)
    // in the second slice, the meta pointing there with bit 15, generation 0.
    {
        let mut vips: HashMap<MapData, VipKey, VipMeta> =
            pins.map(lb_common::MAP_VIPS).try_into().unwrap();
        let mut routes: Array<MapData, RouteEntry> =
            pins.map(lb_common::MAP_ROUTES).try_into().unwrap();
        let n = meta_b.route_count;
        for i in 0..n {
            routes
                .set(
                    meta_b.route_base + n + i,
                    RouteEntry { node: 1, flags: 0 },
                    0,
                )
                .unwrap();
        }
        let legacy = VipMeta {
            flags: meta_b.flags | (1 << 15),
            route_base: meta_b.route_base + n,
            ..meta_b
        };
        vips.insert(b, legacy, 0).unwrap();
        assert_eq!(pins.generation(1), 0);
    }
    let mut dp = load(Some(&pins.0));
    assert_eq!(
        dp.vip_meta(&b).unwrap(),
        meta_b,
        "converted to the pair's base"
    );
    assert_eq!(dp.routes(&b).unwrap(), table(1, 16));
    assert_dsr(&mut dp, &ack(VIP, 81), NODE1_MAC);
    assert_eq!(pins.cache(slot_of(&b)).meta, meta_b);
    dp.set_routes(&b, &table(0, 16)).unwrap();
    assert_dsr(&mut dp, &ack(VIP, 81), NODE_MAC);
    dp.set_routes(&b, &table(1, 16)).unwrap();
    assert_dsr(&mut dp, &ack(VIP, 81), NODE1_MAC);
}

/// A map pinned by a build with other limits (here `VIP_GEN` of the old 1024 VIPs) is refused
/// by name when the balancer loads over the pins.
#[test]
fn pins_of_another_build_are_refused() {
    let pins = Pins::new("oldsize");
    std::fs::create_dir_all(&pins.0).unwrap();
    Array::<MapData, u32>::create(1024, 0)
        .unwrap()
        .pin(pins.0.join(lb_common::MAP_VIP_GEN))
        .unwrap();
    let err = Dataplane::load(&DataplaneOptions {
        route_slots: 4096,
        conntrack_size: 16384,
        pin_dir: Some(pins.0.clone()),
    })
    .err()
    .expect("a VIP_GEN of 1024 entries must be refused");
    let msg = err.to_string();
    assert!(
        msg.contains("VIP_GEN") && msg.contains("1024") && msg.contains("remove the pins"),
        "{msg}"
    );
}

/// `repeat` runs of `pkt`: (verdict, output) of the last. With `repeat > 1` the kernel feeds
/// each run's output to the next.
fn run(prog: &mut Xdp, pkt: &[u8], repeat: u32) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; pkt.len() + 256];
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })
        .unwrap();
    out.truncate(res.data_size_out as usize);
    (res.return_value, out)
}

/// The packets `cargo xtask bench dataplane` times, checked for what they do (the timing
/// itself is the bench's: a test on a busy machine measures nothing): the baselines swap MACs
/// or pass; the balancer rewrites an established packet to its node and passes a non-VIP
/// packet untouched, also over repeated runs fed their own output (what the bench's `repeat`
/// method relies on); 2,000 SYNs of distinct flows are each forwarded and each insert a flow.
#[test]
fn bench_packets_take_their_paths() {
    let est_pkt = ack(VIP, 80);
    let other = ack([10, 0, 0, 2], 80);
    let mut base = aya::Ebpf::load(objects::BASELINE).unwrap();
    let mut swapped = est_pkt.clone();
    swapped[0..6].copy_from_slice(&est_pkt[6..12]);
    swapped[6..12].copy_from_slice(&est_pkt[0..6]);
    {
        let prog: &mut Xdp = base.program_mut("baseline_tx").unwrap().try_into().unwrap();
        prog.load().unwrap();
        assert_eq!(run(prog, &est_pkt, 1), (XDP_TX, swapped.clone()));
        // An even number of swaps gives the packet back.
        assert_eq!(run(prog, &est_pkt, 1000), (XDP_TX, est_pkt.clone()));
    }
    {
        let prog: &mut Xdp = base
            .program_mut("baseline_pass")
            .unwrap()
            .try_into()
            .unwrap();
        prog.load().unwrap();
        assert_eq!(run(prog, &other, 1000), (XDP_PASS, other.clone()));
    }
    let mut dp = dataplane();
    let prog = dp.program_mut().unwrap();
    let est_out = dsr_to(&est_pkt, NODE_MAC);
    assert_eq!(run(prog, &est_pkt, 1), (XDP_TX, est_out.clone()));
    // Fed its own output, the rewrite goes to the same node again (the source MAC becomes the
    // MAC the frame came to, the node's, from the second run on).
    assert_eq!(
        run(prog, &est_pkt, 1000),
        (XDP_TX, dsr_to(&est_out, NODE_MAC)),
        "established, repeat 1000"
    );
    for repeat in [1, 1000] {
        assert_eq!(
            run(prog, &other, repeat),
            (XDP_PASS, other.clone()),
            "non-VIP, repeat {repeat}"
        );
    }
    for i in 0..2000u16 {
        let pkt = ipv4_tcp(VIP, 1024 + i, 80, 0x02);
        assert_eq!(
            run(prog, &pkt, 1),
            (XDP_TX, dsr_to(&pkt, NODE_MAC)),
            "SYN #{i}"
        );
    }
    assert_eq!(
        dp.conntrack().unwrap().len(),
        2000,
        "every SYN inserted a flow"
    );
}

#[test]
fn cache_covers_every_slot() {
    // The slot function stays inside the map (the kernel would pass on a miss, not fail).
    for p in 0..=u16::MAX {
        assert!(slot_of(&key(VIP, p)) < VIP_CACHE_SIZE);
    }
}

/// `CONNTRACK` is set-associative: a SYN into a full set evicts a closing flow first, then the
/// least recently seen one, counts `CtEvict`, and leaves the other ways alone.
#[test]
fn full_conntrack_set_evicts_quiet_closing_then_oldest_never_kept() {
    use lb_common::{
        CT_F_FIN, PROTO_TCP, Stat,
        ct::{CT_WAYS, ct_key_tag, ct_set_index},
    };
    let mut dp = dataplane();
    let sets = dp.config().unwrap().ct_sets;
    let flow = |port: u16| {
        lb_tests::fixture::flow_key([192, 168, 1, 2].into(), VIP.into(), port, 80, PROTO_TCP)
    };
    // CT_WAYS + 3 client ports whose flows share one set.
    let mut groups: std::collections::HashMap<u32, Vec<u16>> = Default::default();
    let ports = (1024..=u16::MAX)
        .find_map(|p| {
            let g = groups
                .entry(ct_set_index(ct_key_tag(dp.hash_seed(), &flow(p)), sets))
                .or_default();
            g.push(p);
            (g.len() == CT_WAYS + 3).then(|| g.clone())
        })
        .expect("a set with CT_WAYS + 3 flows");
    let syn = |dp: &mut Dataplane, p: u16| {
        let pkt = ipv4_tcp(VIP, p, 80, 0x02);
        assert_dsr(dp, &pkt, NODE_MAC);
    };
    for &p in &ports[..CT_WAYS] {
        syn(&mut dp, p);
    }
    // Age one flow, then a new flow must take exactly its way.
    let oldest = ports[3];
    let mut e = dp.conntrack_get(&flow(oldest)).unwrap().expect("tracked");
    e.last_seen = e.last_seen.wrapping_sub(100);
    dp.conntrack_insert(&flow(oldest), &e).unwrap();
    syn(&mut dp, ports[CT_WAYS]);
    assert_eq!(
        dp.conntrack_get(&flow(oldest)).unwrap(),
        None,
        "oldest evicted"
    );
    // A closing flow (FIN last, then quiet) goes before older open ones.
    let closing = ports[7];
    let mut e = dp.conntrack_get(&flow(closing)).unwrap().expect("tracked");
    e.flags = CT_F_FIN;
    e.last_seen = e.last_seen.wrapping_sub(lb_common::CT_CLOSE_QUIET + 1);
    dp.conntrack_insert(&flow(closing), &e).unwrap();
    let mut e = dp.conntrack_get(&flow(ports[0])).unwrap().expect("tracked");
    e.last_seen = e.last_seen.wrapping_sub(50);
    dp.conntrack_insert(&flow(ports[0]), &e).unwrap();
    syn(&mut dp, ports[CT_WAYS + 1]);
    assert_eq!(
        dp.conntrack_get(&flow(closing)).unwrap(),
        None,
        "closing evicted"
    );
    for &p in ports[..CT_WAYS + 2]
        .iter()
        .filter(|&&p| p != oldest && p != closing)
    {
        assert!(
            dp.conntrack_get(&flow(p)).unwrap().is_some(),
            "port {p} kept"
        );
    }
    assert_eq!(dp.conntrack().unwrap().len(), CT_WAYS);
    let c = dp.counters().unwrap();
    assert_eq!(c.stats[Stat::CtEvict as usize], 2);
    assert_eq!(c.stats[Stat::CtInsert as usize], CT_WAYS as u64 + 2);
    // Flows seen on moved routes (`CT_F_KEEP`) are out of a new flow's reach: with every way
    // kept, a SYN is still forwarded but not recorded, and `CtFull` counts it.
    for (key, mut e) in dp.conntrack().unwrap() {
        e.flags |= lb_common::CT_F_KEEP;
        dp.conntrack_insert(&key, &e).unwrap();
    }
    syn(&mut dp, ports[CT_WAYS + 2]);
    assert_eq!(dp.conntrack_get(&flow(ports[CT_WAYS + 2])).unwrap(), None);
    assert_eq!(dp.conntrack().unwrap().len(), CT_WAYS);
    let c = dp.counters().unwrap();
    assert_eq!(c.stats[Stat::CtFull as usize], 1);
    assert_eq!(c.stats[Stat::CtEvict as usize], 2);
    // The daemon's scan clears `CT_F_KEEP` in place: only the flags change, in the flow's
    // own way; an untracked flow is left alone.
    let mut view = dp.conntrack_view().unwrap();
    let (key, before) = dp.conntrack().unwrap()[0];
    assert!(view.set_flags(&key, before.flags & !lb_common::CT_F_KEEP));
    let after = dp.conntrack_get(&key).unwrap().unwrap();
    assert_eq!(
        after,
        lb_common::CtEntry {
            flags: before.flags & !lb_common::CT_F_KEEP,
            ..before
        }
    );
    assert!(!view.set_flags(&flow(ports[CT_WAYS + 2]), 0));
    assert_eq!(dp.conntrack().unwrap().len(), CT_WAYS);
}

/// The event log (`Dataplane::set_event_log`), end to end: ring buffer, aya-log, `log`,
/// `tracing`, the live-log layer. Two balancers get the same packets, one with the log off and
/// one with it on: verdicts, output bytes and counters are identical; the one that is off
/// writes no record; the one that is on writes exactly one per drop, PMTU reply and eviction,
/// and none for forwarded packets.
#[test]
fn event_log_records_rare_paths_only_when_on() {
    use lb_common::{CONFIG_F_LOG_EVENTS, PROTO_TCP};
    use lb_tests::{
        fixture::{self as fx, CLIENT4, CLIENT6, Vip},
        packet::{IPPROTO_TCP, Packet, TCP_ACK, TCP_PSH, TCP_SYN, XDP_DROP},
    };
    use lb_userspace::livelog;
    use std::net::IpAddr;

    static LOGGING: std::sync::Once = std::sync::Once::new();
    // The normal log off: the live log gets the records whatever its filter.
    LOGGING.call_once(|| {
        livelog::try_init(tracing_subscriber::EnvFilter::new("off")).expect("logging")
    });
    let mut lines = livelog::subscribe();
    let owner =
        |v: &Vip, client: IpAddr, sport: u16| fx::std_owner(fx::vip_hash(v, client, sport, v.port));

    // One conntrack set (16 ways), so that the 17th new flow evicts.
    let mut off = fx::load_with(16).unwrap();
    let mut on = fx::load_with(16).unwrap();
    let mut off_log = off.take_event_logger().expect("a logger");
    let mut on_log = on.take_event_logger().expect("a logger");
    assert!(on.take_event_logger().is_none(), "taken once");
    on.set_event_log(true).unwrap();
    assert!(on.event_log() && !off.event_log());
    // A config write (as on SIGHUP) keeps the switch.
    on.set_config(&fx::config()).unwrap();
    assert_ne!(on.config().unwrap().flags & CONFIG_F_LOG_EVENTS, 0);
    assert_eq!(off.config().unwrap().flags & CONFIG_F_LOG_EVENTS, 0);

    let v4_dsr = fx::V4_TCP_DSR;
    let v6_dsr = fx::V6_TCP_DSR;
    let v4_ipip = fx::V4_TCP_IPIP;
    // (packet, the record it must give, if any)
    let mut cases: Vec<(Vec<u8>, Option<String>)> = vec![
        (
            Packet::tcp(CLIENT4, v4_dsr.addr, 40000, 80, TCP_PSH | TCP_ACK)
                .payload_len(100)
                .build(),
            None,
        ),
        (
            Packet::tcp(CLIENT6, v6_dsr.addr, 40000, 80, TCP_ACK)
                .payload_len(100)
                .build(),
            None,
        ),
        (
            Packet::tcp(CLIENT4, v4_ipip.addr, 40000, 443, TCP_ACK)
                .payload_len(100)
                .build(),
            None,
        ),
        (
            Packet::tcp(CLIENT4, fx::OTHER4, 40000, 80, TCP_ACK).build(),
            None,
        ),
        // Drops: no node with an address for ipip; a TCP header cut short (IPv6).
        (
            Packet::tcp(CLIENT4, fx::VIP4_NOADDR, 40000, 80, TCP_ACK).build(),
            Some(format!(
                "drop NoBackend     proto=6 192.0.2.10:40000 -> 10.0.0.4:80 vip={} node={}",
                fx::V4_NOADDR.index,
                fx::NODE_NOADDR
            )),
        ),
        (
            Packet::raw(
                CLIENT6,
                v6_dsr.addr,
                IPPROTO_TCP,
                &[0x9c, 0x40, 0, 80, 0, 0],
            )
            .build(),
            Some(format!(
                "drop BadTcpHeader  proto=6 2001:db8:c1::10:40000 -> 2001:db8::1:80 vip={} node={}",
                v6_dsr.index,
                owner(&v6_dsr, CLIENT6, 40000)
            )),
        ),
        // Too big for the path MTU (1500) once encapsulated, DF set.
        (
            Packet::tcp(CLIENT4, v4_ipip.addr, 40001, 443, TCP_ACK)
                .payload_len(1460)
                .build(),
            Some(format!(
                "pmtu-reply         proto=6 192.0.2.10:40001 -> 10.0.0.2:443 vip={} node={}",
                v4_ipip.index,
                owner(&v4_ipip, CLIENT4, 40001)
            )),
        ),
    ];
    let check = |on: &mut Dataplane, off: &mut Dataplane, pkt: &[u8]| {
        let a = off.test_run(pkt).unwrap();
        let b = on.test_run(pkt).unwrap();
        assert_eq!(a, b, "the same verdict and bytes with the log on");
        a
    };
    let mut expect_record = |log: &mut lb_userspace::dataplane::EventLogger,
                             want: Option<String>| {
        match want {
            Some(line) => {
                assert_eq!(log.pump(), 1, "one record for {line:?}");
                assert_eq!(lines.try_recv().expect("the record's line"), line);
            }
            None => assert_eq!(log.pump(), 0, "no record"),
        }
        assert!(lines.try_recv().is_err(), "nothing else");
    };
    for (pkt, want) in cases.drain(..) {
        let (verdict, _) = check(&mut on, &mut off, &pkt);
        if want.as_deref().is_some_and(|w| w.starts_with("drop")) {
            assert_eq!(verdict, XDP_DROP);
        }
        assert_eq!(off_log.pump(), 0, "the log is off");
        expect_record(&mut on_log, want);
    }

    // Fill the one set with 16 new flows, age one, and a 17th evicts it.
    let syn = |port: u16| Packet::tcp(CLIENT4, v4_dsr.addr, port, 80, TCP_SYN).build();
    for port in 41000..41016 {
        check(&mut on, &mut off, &syn(port));
        expect_record(&mut on_log, None);
    }
    let aged = 41005;
    for dp in [&mut on, &mut off] {
        let key = fx::flow_key(CLIENT4, v4_dsr.addr, aged, 80, PROTO_TCP);
        let mut e = dp.conntrack_get(&key).unwrap().expect("tracked");
        e.last_seen = e.last_seen.wrapping_sub(100);
        dp.conntrack_insert(&key, &e).unwrap();
    }
    check(&mut on, &mut off, &syn(41016));
    assert_eq!(off_log.pump(), 0, "the log is off");
    expect_record(
        &mut on_log,
        Some(format!(
            "ct-evict           proto=6 192.0.2.10:{aged} -> 10.0.0.1:80 vip={} node={}",
            v4_dsr.index,
            owner(&v4_dsr, CLIENT4, aged)
        )),
    );
    let (a, b) = (off.counters().unwrap(), on.counters().unwrap());
    assert_eq!((a.stats, a.drops), (b.stats, b.drops), "the same counters");

    // Off again: drops write nothing.
    on.set_event_log(false).unwrap();
    let noaddr = Packet::tcp(CLIENT4, fx::VIP4_NOADDR, 40000, 80, TCP_ACK).build();
    assert_eq!(on.test_run(&noaddr).unwrap().0, XDP_DROP);
    expect_record(&mut on_log, None);
}
