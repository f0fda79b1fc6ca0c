//! Load/verifier smoke test of the XDP programs, plus a rough ns/packet measurement.
//! Root only. Run: `cargo test --release -p lb-tests --test ebpf_smoke -- --test-threads=1 --nocapture`.
use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_common::{FAMILY_V4, GlobalConfig, NODE_ACTIVE, NodeEntry, PROTO_TCP, RouteEntry, VipKey};
use lb_userspace::{
    dataplane::{Dataplane, DataplaneOptions, ForwardMode, HashMode, VipSpec},
    objects,
};

const VIP: [u8; 4] = [10, 0, 0, 1];
const NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x10];
const LB_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

fn ipv4_tcp(dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
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
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = flags;
    p.extend_from_slice(&tcp);
    p.extend_from_slice(b"0123456789");
    p
}

fn dataplane() -> Dataplane {
    let mut dp = Dataplane::load(&DataplaneOptions {
        route_slots: 4096,
        conntrack_size: 4096,
        pin_dir: None,
    })
    .unwrap_or_else(|e| panic!("loading the balancer failed: {e:#?}"));
    dp.set_node(
        0,
        &NodeEntry {
            addr4: [192, 168, 2, 10],
            mac: NODE_MAC,
            state: NODE_ACTIVE,
            ..Default::default()
        },
    )
    .unwrap();
    dp.set_config(&GlobalConfig {
        gw_mac: [2, 0, 0, 0, 0, 0x99],
        mtu: 1500,
        ipip_src4: [10, 9, 0, 0],
        ipip_src4_mask: [0, 0, 0xff, 0xff],
        ..Default::default()
    })
    .unwrap();
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&VIP);
    for (port, mode, index) in [(80u16, ForwardMode::DsrL2, 0), (81, ForwardMode::Ipip, 1)] {
        let spec = VipSpec {
            key: VipKey {
                addr,
                port: u16::from_ne_bytes(port.to_be_bytes()),
                proto: PROTO_TCP,
                family: FAMILY_V4,
            },
            index,
            mode,
            hash: HashMode::FiveTuple,
        };
        dp.upsert_vip(&spec, &[RouteEntry { node: 0, flags: 0 }; 64])
            .unwrap();
    }
    dp
}

fn time_ns(prog: &mut Xdp, pkt: &[u8]) -> f64 {
    let mut out = vec![0u8; pkt.len() + 256];
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            repeat: 1_000_000,
            ..Default::default()
        })
        .unwrap();
    // The kernel reports the mean duration per repetition.
    res.duration.as_nanos() as f64
}

#[test]
fn balancer_loads_and_forwards() {
    let mut dp = dataplane();
    // dsr-l2 established TCP: MAC rewrite and XDP_TX.
    let pkt = ipv4_tcp(VIP, 80, 0x10);
    let (verdict, out) = dp.test_run(&pkt).unwrap();
    assert_eq!(verdict, 3, "XDP_TX");
    assert_eq!(&out[0..6], &NODE_MAC);
    assert_eq!(&out[6..12], &LB_MAC);
    assert_eq!(&out[12..], &pkt[12..]);
    // Non-VIP: pass untouched.
    let (verdict, out) = dp.test_run(&ipv4_tcp([10, 0, 0, 2], 80, 0x10)).unwrap();
    assert_eq!(verdict, 2, "XDP_PASS");
    assert_eq!(out, ipv4_tcp([10, 0, 0, 2], 80, 0x10));
    // SYN: conntrack insert.
    let (verdict, _) = dp.test_run(&ipv4_tcp(VIP, 80, 0x02)).unwrap();
    assert_eq!(verdict, 3);
    assert_eq!(dp.conntrack().unwrap().len(), 1);
    // ipip: 20 more bytes, protocol 4.
    let pkt = ipv4_tcp(VIP, 81, 0x10);
    let (verdict, out) = dp.test_run(&pkt).unwrap();
    assert_eq!(verdict, 3);
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

#[test]
fn bench_ns_per_packet() {
    let mut base = aya::Ebpf::load(objects::BASELINE).unwrap();
    let ack = ipv4_tcp(VIP, 80, 0x10);
    let other = ipv4_tcp([10, 0, 0, 2], 80, 0x10);
    let mut baseline = |name: &str, pkt: &[u8]| {
        let prog: &mut Xdp = base.program_mut(name).unwrap().try_into().unwrap();
        prog.load().unwrap();
        time_ns(prog, pkt)
    };
    let tx = baseline("baseline_tx", &ack);
    let pass = baseline("baseline_pass", &other);
    let mut dp = dataplane();
    let prog = dp.program_mut().unwrap();
    let est = time_ns(prog, &ack);
    let non_vip = time_ns(prog, &other);
    let syn = time_ns(prog, &ipv4_tcp(VIP, 80, 0x02));
    let ipip = time_ns(prog, &ipv4_tcp(VIP, 81, 0x10));
    println!("baseline_tx {tx:.1} ns, baseline_pass {pass:.1} ns");
    println!(
        "dsr established {est:.1} ns ({:.2}x tx), non-VIP {non_vip:.1} ns ({:.2}x pass), SYN (ct overwrite) {syn:.1} ns, ipip {ipip:.1} ns",
        est / tx,
        non_vip / pass
    );
}
