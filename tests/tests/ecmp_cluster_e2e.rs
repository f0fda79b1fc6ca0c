//! Cluster mode behind a real ECMP router (issue 12), as root: the cluster lab
//! (`lb_tests::cluster_lab`: client, router with bird2 multipath and BFD, three balancers each
//! with bird2, three nodes, etcd) with `lb run` in cluster mode on every balancer, announcing
//! the VIPs through `[bgp]`, and `lb agent` on every node beating to all three. Long-lived TCP
//! connections from the client, spread by the router's L4 hash over the balancers:
//! - a balancer dies as a box (daemon killed, program detached, bird gone): the router drops it
//!   (BFD) and its flows, and some of the others' (hash-threshold ECMP), move to the other
//!   balancers, which run the same tables: no connection breaks; the recovery time is printed;
//! - a balancer's daemon stops (SIGTERM): it withdraws the VIPs, the router moves its flows,
//!   none breaks.
//!
//! Namespaces `lbcfaillab-*`.
#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test
use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_tests::{
    cluster_lab::{ClusterLab, ClusterSpec, Load},
    daemon::lb_binary,
    lab::{DSR_VIP, DSR_VIP6, ROUTES},
    netns::spawn_in,
};

const BALANCERS: usize = 3;
const NODES: usize = 3;

fn vips() -> Vec<IpAddr> {
    vec![DSR_VIP.into(), DSR_VIP6.into()]
}

fn up(name: &str) -> ClusterLab {
    let mut lab = ClusterLab::new(&ClusterSpec {
        name: name.into(),
        balancers: BALANCERS,
        nodes: NODES,
        lab_bin: env!("CARGO_BIN_EXE_lb-lab").into(),
    })
    .unwrap();
    let lb = lb_binary().unwrap();
    let t0 = Instant::now();
    for i in 1..=BALANCERS {
        lab.start_daemon(&lb, i, ROUTES).unwrap();
    }
    for j in 1..=NODES {
        lab.start_agent(&lb, j).unwrap();
    }
    let all: Vec<usize> = (1..=BALANCERS).collect();
    lab.wait_converged(&lb, &all, NODES, Duration::from_secs(30))
        .unwrap();
    lab.wait_nexthops(&vips(), &(1..=BALANCERS).collect(), Duration::from_secs(10))
        .unwrap();
    println!(
        "3 balancers on one revision, announcing, 3 next hops at the router: {} ms",
        t0.elapsed().as_millis()
    );
    lab
}

#[test]
fn balancer_deaths_behind_ecmp_break_no_connection() {
    lb_tests::lab::require_root().unwrap();
    let mut lab = up("lbcfaillab");
    let lb = lb_binary().unwrap();
    // Routes moved while nodes joined settle first: every route is then unmoved.
    let all: Vec<usize> = (1..=BALANCERS).collect();
    let settle = Instant::now();
    let (rev, _) = lab
        .wait_converged(&lb, &all, NODES, Duration::from_secs(30))
        .unwrap();
    println!("revision {rev} after {} ms", settle.elapsed().as_millis());

    let load = Load::start(&lab, 90);
    std::thread::sleep(Duration::from_millis(500));
    let before = lab_forwarded(&lab);
    std::thread::sleep(Duration::from_millis(500));
    let carried: Vec<u64> = lab_forwarded(&lab)
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    println!("packets each balancer carried in 0.5 s: {carried:?}");

    // Balancer 2 dies as a box.
    load.mark();
    let t0 = Instant::now();
    lab.fail_balancer(2).unwrap();
    lab.wait_nexthops(&vips(), &[1, 3].into(), Duration::from_secs(3))
        .unwrap();
    let dropped = t0.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let (broken, slowest) = load.stop();
    println!(
        "balancer 2 died under 90 connections: the router dropped it after {} ms; the \
         longest stall of a connection {slowest} ms; {} broken",
        dropped.as_millis(),
        broken.len()
    );
    assert!(broken.is_empty(), "broken: {broken:?}");

    // Balancer 3's daemon stops cleanly: it withdraws, the router moves its flows to 1.
    let load = Load::start(&lab, 60);
    load.mark();
    let t0 = Instant::now();
    lab.stop_daemon(3).unwrap();
    lab.wait_nexthops(&vips(), &[1].into(), Duration::from_secs(3))
        .unwrap();
    let withdrawn = t0.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let (broken, slowest) = load.stop();
    println!(
        "balancer 3's daemon stopped (SIGTERM): withdrawn from the router {} ms later; the \
         longest stall of a connection {slowest} ms; {} broken",
        withdrawn.as_millis(),
        broken.len()
    );
    assert!(broken.is_empty(), "broken: {broken:?}");
}

/// Packets each balancer forwarded with XDP (its interface's TX counter: XDP_TX frames).
fn lab_forwarded(lab: &ClusterLab) -> Vec<u64> {
    (1..=BALANCERS)
        .map(|i| {
            let ns = lab.balancer_ns(i);
            spawn_in(&ns, || {
                // /proc/thread-self/net is this thread's namespace (/sys is not).
                let dev = std::fs::read_to_string("/proc/thread-self/net/dev")?;
                let line = dev
                    .lines()
                    .find(|l| l.trim_start().starts_with("eth0:"))
                    .ok_or_else(|| anyhow::anyhow!("no eth0 in {dev}"))?;
                // Receive: 8 fields, then transmit: bytes, packets.
                let fields: Vec<&str> = line
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .split_whitespace()
                    .collect();
                Ok(fields.get(9).and_then(|f| f.parse().ok()).unwrap_or(0))
            })
            .join()
            .unwrap()
            .unwrap_or(0)
        })
        .collect()
}

/// Issue 12 item 5: flows on *moved* routes. Node 3 joins while 90 connections run on nodes 1
/// and 2: a third of the routes move to node 3, and each flow on them stays on its old node
/// only through a conntrack entry, recorded by the balancer that carries it. Then balancer 2
/// dies and the router moves its flows (and, hash-threshold, some of the others') to other
/// balancers: each must find the flow's entry there too.
#[test]
fn flows_on_moved_routes_keep_their_node_when_ecmp_moves_them() {
    lb_tests::lab::require_root().unwrap();
    let mut lab = ClusterLab::new(&ClusterSpec {
        name: "lbcmovelab".into(),
        balancers: BALANCERS,
        nodes: NODES,
        lab_bin: env!("CARGO_BIN_EXE_lb-lab").into(),
    })
    .unwrap();
    let lb = lb_binary().unwrap();
    for i in 1..=BALANCERS {
        lab.start_daemon(&lb, i, ROUTES).unwrap();
    }
    for j in 1..NODES {
        lab.start_agent(&lb, j).unwrap();
    }
    let all: Vec<usize> = (1..=BALANCERS).collect();
    lab.wait_converged(&lb, &all, NODES - 1, Duration::from_secs(30))
        .unwrap();
    lab.wait_nexthops(&vips(), &(1..=BALANCERS).collect(), Duration::from_secs(10))
        .unwrap();
    let load = Load::start(&lab, 90);
    // Node 3 joins: a third of every table moves to it, flagged moved.
    let t0 = Instant::now();
    lab.start_agent(&lb, NODES).unwrap();
    lab.wait_converged(&lb, &all, NODES, Duration::from_secs(10))
        .unwrap();
    let joined = t0.elapsed();
    let shared = wait_shared(&lab, &lb, Duration::from_secs(5));
    println!(
        "node 3 joined: every balancer on the new revision after {} ms; moved-route flows \
         shared: {shared}",
        joined.as_millis()
    );
    load.mark();
    let t1 = Instant::now();
    lab.fail_balancer(2).unwrap();
    lab.wait_nexthops(&vips(), &[1, 3].into(), Duration::from_secs(3))
        .unwrap();
    let dropped = t1.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let (broken, stall) = load.stop();
    println!(
        "balancer 2 died {} ms after node 3 joined (routes moved): the router dropped it after \
         {} ms; longest stall {stall} ms; {} of 90 connections broken",
        (t1 - t0).as_millis(),
        dropped.as_millis(),
        broken.len()
    );
    assert!(broken.is_empty(), "broken: {broken:?}");
}

/// Waits until every balancer has imported the others' moved-route flows (`lb status`
/// counters); returns what they show.
fn wait_shared(lab: &ClusterLab, lb: &std::path::Path, limit: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let st: Vec<serde_json::Value> = (1..=BALANCERS)
            .map(|i| lab.lb_status(lb, i).unwrap()["cluster"]["counters"].clone())
            .collect();
        let ok = st
            .iter()
            .all(|c| c["flows_imported"].as_u64().unwrap_or(0) > 0);
        if ok || t0.elapsed() > limit {
            return format!(
                "{} after {} ms",
                st.iter()
                    .map(|c| format!(
                        "exported {} imported {}",
                        c["flows_exported"], c["flows_imported"]
                    ))
                    .collect::<Vec<_>>()
                    .join("; "),
                t0.elapsed().as_millis()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
