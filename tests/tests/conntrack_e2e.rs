//! Connection tracking with real TCP through a real daemon (root): connections of any age keep
//! their node when their route moves later (issue 10 item 1), and a SYN flood from random
//! sources does not push flows on moved routes off their nodes (item 5). Each test has its own
//! two-node lab (`Lab`: namespaces `t<pid><n>...`).
#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test
use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_tests::{
    echo::{Held, TwoNodes, new_connections},
    netns::send_frames,
    packet::{Packet, TCP_SYN},
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const PORT: u16 = 7100;
const ROUTES: u32 = 65536;

/// Connections held in the client namespace, each asked "which node?" in turn until stopped;
/// every answer must be the node it first landed on.
struct Pinger {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<anyhow::Result<Report>>,
}

#[derive(Debug)]
struct Report {
    /// (connection's first node, answers it gave, what went wrong).
    conns: Vec<(u32, u64, Option<String>)>,
}

impl Report {
    fn broken(&self) -> Vec<&(u32, u64, Option<String>)> {
        self.conns.iter().filter(|c| c.2.is_some()).collect()
    }
}

impl Pinger {
    /// Opens `n` connections (or, with `only`, keeps opening until `n` land on that node) and
    /// pings them every `every`.
    fn start(two: &TwoNodes, n: usize, only: Option<u32>, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = two.lab.client.ns.spawn(move || {
            let mut conns = Vec::new();
            let mut tries = 0;
            while conns.len() < n {
                tries += 1;
                anyhow::ensure!(tries < 20 * n, "{n} connections did not land on {only:?}");
                let mut c = Held::connect(VIP, PORT)?;
                let node = c.ask()?;
                if only.is_none_or(|o| o == node) {
                    conns.push((c, node, 1u64, None::<String>));
                }
            }
            let _ = tx.send(conns.iter().map(|c| c.1).collect::<Vec<u32>>());
            while !stop2.load(Ordering::Relaxed) {
                for (c, node, answers, err) in conns.iter_mut().filter(|c| c.3.is_none()) {
                    match c.ask() {
                        Ok(a) if a == *node => *answers += 1,
                        Ok(a) => *err = Some(format!("answered by node {a}")),
                        Err(e) => *err = Some(format!("{e:#}")),
                    }
                }
                std::thread::sleep(every);
            }
            Ok(Report {
                conns: conns.into_iter().map(|c| (c.1, c.2, c.3)).collect(),
            })
        });
        let nodes = rx.recv_timeout(Duration::from_secs(60)).unwrap();
        eprintln!(
            "{} connections open: {} on node 1, {} on node 2",
            nodes.len(),
            nodes.iter().filter(|&&x| x == 1).count(),
            nodes.iter().filter(|&&x| x == 2).count()
        );
        Self { stop, handle }
    }

    fn finish(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap().unwrap()
    }
}

/// Waits `d` (the connections keep talking meanwhile).
fn run_for(d: Duration) {
    std::thread::sleep(d);
}

/// Item 1. With `flow_idle_timeout = 3s`: 24 connections keep talking while a weight change
/// moves some routes (before the fix, the scan then deleted every entry older than the idle
/// timeout, and established flows on unmoved routes never refresh theirs), for more than twice
/// the timeout; then node 1 is drained, which moves every route of node 1: every connection
/// must go on being answered by the node it began on.
#[test]
fn long_lived_connections_keep_their_node_when_their_route_moves_later() {
    let two = TwoNodes::up(VIP, PORT, PORT, ROUTES, 65536, "flow_idle_timeout = \"3s\"").unwrap();
    let p = Pinger::start(&two, 24, None, Duration::from_millis(300));
    // Some routes of node 1 move to node 2 (shares 1/4 : 3/4).
    two.setup.cli_ok(&["node", "weight", "2", "3"]).unwrap();
    run_for(Duration::from_secs(8));
    two.setup.cli_ok(&["node", "drain", "1"]).unwrap();
    let t = Instant::now();
    two.setup
        .wait_routes(&two.key, Duration::from_secs(10), |r| {
            r.iter().all(|e| e.node == 2)
        })
        .unwrap();
    eprintln!("node 1 drained in the kernel after {:?}", t.elapsed());
    run_for(Duration::from_secs(4));
    // New connections all go to node 2.
    assert!(
        new_connections(&two.lab, VIP, PORT, 20)
            .unwrap()
            .iter()
            .all(|&n| n == 2)
    );
    let r = p.finish();
    let on1 = r.conns.iter().filter(|c| c.0 == 1).count();
    eprintln!(
        "{} connections, {on1} on node 1 (drained), {} answers in all",
        r.conns.len(),
        r.conns.iter().map(|c| c.1).sum::<u64>()
    );
    assert!(
        on1 >= 3,
        "too few connections on node 1 to prove anything: {r:?}"
    );
    assert!(
        r.broken().is_empty(),
        "broken connections: {:?}",
        r.broken()
    );
}

/// Item 5. A small table (4096 flows in 256 sets of 16), 50 connections on node 1, node 1
/// drained (all its routes move: the 50 are tracked flows on moved routes, kept on node 1 by
/// conntrack), then 100,000 SYNs from random sources at the VIP: every set fills with them many
/// times over. The 50 keep their node; the flood shows as evictions.
#[test]
fn syn_flood_does_not_evict_flows_on_moved_routes() {
    let two = TwoNodes::up(VIP, PORT, PORT, ROUTES, 4096, "").unwrap();
    let p = Pinger::start(&two, 50, Some(1), Duration::from_millis(200));
    two.setup.cli_ok(&["node", "drain", "1"]).unwrap();
    two.setup
        .wait_routes(&two.key, Duration::from_secs(10), |r| {
            r.iter().all(|e| e.node == 2)
        })
        .unwrap();
    // Every connection has talked since the move (its entry is kept).
    run_for(Duration::from_secs(2));
    let (lb_mac, client_mac, ifname) = (
        two.lab.lb.mac,
        two.lab.client.mac,
        two.lab.client.ifname.clone(),
    );
    let sent = two
        .lab
        .client
        .ns
        .spawn(move || {
            let mut x = 0x2545_f491_4f6c_dd1du64;
            let frames = (0..100_000).map(move |_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let src = Ipv4Addr::new(10, (x >> 8) as u8, (x >> 16) as u8, (x >> 24) as u8);
                Packet::tcp(
                    IpAddr::V4(src),
                    IpAddr::V4(VIP),
                    1024 + (x >> 40) as u16 % 60000,
                    PORT,
                    TCP_SYN,
                )
                .macs(lb_mac, client_mac)
                .build()
            });
            send_frames(&ifname, frames, 500, Duration::from_millis(2))
        })
        .join()
        .unwrap()
        .unwrap();
    run_for(Duration::from_secs(2));
    let stats = two.setup.cli_json(&["stats"]).unwrap();
    let ev = &stats["events"];
    eprintln!(
        "flood: {sent} SYNs sent; ct_insert {}, ct_evict {}, ct_full {}",
        ev["ct_insert"], ev["ct_evict"], ev["ct_full"]
    );
    assert!(
        ev["ct_evict"].as_u64().unwrap() > 20_000,
        "the flood did not churn the table: {ev}"
    );
    let r = p.finish();
    assert_eq!(r.conns.len(), 50);
    assert!(
        r.broken().is_empty(),
        "broken connections: {:?}",
        r.broken()
    );
}
