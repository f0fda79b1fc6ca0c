//! Cluster mode end to end (issue 12), as root: three `lb run` balancers sharing one etcd (in
//! the lab's bridge namespace), two dsr-l2 VIPs of 65536 routes, three nodes whose agents beat
//! to every balancer, real TCP from the client. The client reaches the VIPs through one
//! balancer at a time (`ip route ... via`), which stands in for the router's ECMP choice.
//!
//! - Tables are identical on every balancer (digest of what each kernel runs, and the pinned
//!   `ROUTES` themselves) after failures, drains and joins, and heartbeat loss toward one
//!   balancer changes nothing; a follower refuses changes, the leader makes them.
//! - The leader's death changes no table and breaks no connection; a balancer's death (its
//!   daemon killed, its link down) breaks no connection once the client's path moves to
//!   another balancer (every route unmoved): the recovery time is printed.
//! - With etcd stopped, forwarding goes on and nothing changes (a node failure included); with
//!   etcd back, every balancer re-syncs to the leader's new revision.
#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test
use std::{
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_tests::{
    daemon::{DaemonSetup, LogLines},
    echo::{EchoServers, Held, new_connections},
    etcd::Etcd,
    netns::{ChildGuard, Host, Lab},
};
use lb_userspace::dataplane::vip_key;
use serde_json::Value;

const VIPS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(198, 18, 100, 1),
    Ipv4Addr::new(198, 18, 100, 2),
];
const PORT: u16 = 7;
const ROUTES: u32 = 65536;
const NODES: usize = 3;
const ETCD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);

/// The cluster; fields drop in order: servers, agents, daemons, files, etcd, namespaces.
struct Cluster {
    _servers: EchoServers,
    agents: Vec<Option<ChildGuard>>,
    daemons: Vec<Option<ChildGuard>>,
    logs: Vec<LogLines>,
    setups: Vec<DaemonSetup>,
    etcd: Etcd,
    /// Balancers 2 and 3 (balancer 1 is the lab's `lb` host).
    hosts: Vec<Host>,
    lab: Lab,
}

impl Cluster {
    fn up() -> Self {
        let lab = Lab::new(NODES).unwrap();
        lab.add_dsr_vips(&VIPS).unwrap();
        lab.bridge
            .ip(&["addr", "add", &format!("{ETCD_IP}/24"), "dev", "br0"])
            .unwrap();
        let etcd = Etcd::start(&lab.bridge, ETCD_IP).unwrap();
        let hosts: Vec<Host> = (1..3)
            .map(|i| {
                let name = format!("{}l{i}", lab.prefix);
                Host::attach(&lab.bridge, &name, &format!("{name}p"), 2 + i).unwrap()
            })
            .collect();
        let mut c = Self {
            _servers: EchoServers::start(
                &lab.nodes
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (&n.ns, i as u32 + 1))
                    .collect::<Vec<_>>(),
                PORT,
            )
            .unwrap(),
            agents: Vec::new(),
            daemons: Vec::new(),
            logs: Vec::new(),
            setups: Vec::new(),
            etcd,
            hosts,
            lab,
        };
        let t0 = Instant::now();
        for i in 0..3 {
            let section = format!(
                "\n[cluster]\nendpoints = [\"{}\"]\nname = \"{}\"\nid = \"b{}\"\nlease_ttl = \"2s\"\n",
                c.etcd.endpoint(),
                c.lab.prefix,
                i + 1
            );
            let setup = DaemonSetup::cluster_member(
                &c.lab,
                c.host(i),
                &format!("b{}", i + 1),
                &VIPS,
                ROUTES,
                &section,
            )
            .unwrap();
            let (child, log) = setup.start_on(c.host(i), &[]).unwrap();
            c.setups.push(setup);
            c.daemons.push(Some(child));
            c.logs.push(log);
        }
        let ips = c.ips();
        for id in 1..=NODES as u32 {
            let a = c.setups[0].agent_to(&c.lab, id, "100ms", &ips).unwrap();
            c.agents.push(Some(a));
        }
        let took = c.converged(NODES, 0, Duration::from_secs(30));
        println!(
            "3 balancers up, every node active on each, one revision: {} ms after the first \
             daemon's start ({} ms after the last agent's)",
            t0.elapsed().as_millis(),
            took.as_millis()
        );
        c
    }

    fn host(&self, i: usize) -> &Host {
        if i == 0 {
            &self.lab.lb
        } else {
            &self.hosts[i - 1]
        }
    }

    fn ips(&self) -> Vec<Ipv4Addr> {
        (0..3).map(|i| self.host(i).ip).collect()
    }

    fn live(&self) -> Vec<usize> {
        (0..3).filter(|i| self.daemons[*i].is_some()).collect()
    }

    fn status(&self, i: usize) -> Value {
        self.setups[i].status().unwrap()
    }

    /// The balancer that leads, as every live one reports it (all must agree).
    fn leader(&self) -> usize {
        let live = self.live();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let names: Vec<Value> = live
                .iter()
                .map(|i| self.status(*i)["cluster"]["leader"].clone())
                .collect();
            if let Some(Value::String(n)) = names.first()
                && names.iter().all(|x| x == &names[0])
            {
                let i = n.trim_start_matches('b').parse::<usize>().unwrap() - 1;
                if live.contains(&i) {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "no agreed leader: {names:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every live balancer runs the same revision (non-zero) with the same
    /// digest and `active`/`draining` node counts; returns how long that took.
    fn converged(&self, active: usize, draining: usize, limit: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            let st: Vec<Value> = self.live().iter().map(|i| self.status(*i)).collect();
            let first = &st[0]["cluster"];
            let same = st.iter().all(|s| {
                s["cluster"]["revision"] == first["revision"]
                    && s["cluster"]["digest"] == first["digest"]
                    && s["nodes"]["active"] == active
                    && s["nodes"]["draining"] == draining
            });
            if same && first["revision"].as_i64().unwrap_or(0) > 0 {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < limit,
                "balancers did not converge on {active} active, {draining} draining within \
                 {limit:?}: {}",
                st.iter()
                    .map(|s| format!(
                        "{} rev {} digest {:.12} nodes {}",
                        s["cluster"]["id"],
                        s["cluster"]["revision"],
                        s["cluster"]["digest"].as_str().unwrap_or(""),
                        s["nodes"]
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// (revision, digest) every live balancer reports (they must agree).
    fn revision(&self) -> (i64, String) {
        let st: Vec<Value> = self.live().iter().map(|i| self.status(*i)).collect();
        let r = (
            st[0]["cluster"]["revision"].as_i64().unwrap(),
            st[0]["cluster"]["digest"].as_str().unwrap().to_string(),
        );
        for s in &st {
            assert_eq!(
                (
                    s["cluster"]["revision"].as_i64().unwrap(),
                    s["cluster"]["digest"].as_str().unwrap()
                ),
                (r.0, r.1.as_str()),
                "{s}"
            );
        }
        r
    }

    /// The pinned `ROUTES` of every VIP are the same on every live balancer.
    fn same_kernel_tables(&self) {
        for v in VIPS {
            let key = vip_key(v.into(), PORT, lb_common::PROTO_TCP);
            let live = self.live();
            let first = self.setups[live[0]].routes(&key).unwrap();
            assert_eq!(first.len(), ROUTES as usize);
            for i in &live[1..] {
                assert!(
                    self.setups[*i].routes(&key).unwrap() == first,
                    "balancer {} runs another table for {v}",
                    i + 1
                );
            }
        }
    }

    /// Every VIP's route owners as balancer `i`'s kernel holds them (moved flags aside: the
    /// leader clears them as flows settle).
    fn owners(&self, i: usize) -> Vec<Vec<u32>> {
        VIPS.iter()
            .map(|v| {
                let key = vip_key((*v).into(), PORT, lb_common::PROTO_TCP);
                self.setups[i]
                    .routes(&key)
                    .unwrap()
                    .iter()
                    .map(|e| e.node)
                    .collect()
            })
            .collect()
    }

    /// Client traffic to the VIPs goes through balancer `i` (the router's ECMP choice).
    fn route_via(&self, i: usize) {
        for v in VIPS {
            self.lab
                .client
                .ns
                .ip(&[
                    "route",
                    "replace",
                    &format!("{v}/32"),
                    "via",
                    &self.host(i).ip.to_string(),
                ])
                .unwrap();
        }
    }

    fn kill_daemon(&mut self, i: usize) {
        let mut d = self.daemons[i].take().unwrap();
        d.signal_and_wait(libc::SIGKILL).unwrap();
    }

    fn lb(&self, i: usize, args: &[&str]) -> std::process::Output {
        self.setups[i].cli(args).unwrap()
    }
}

/// Connections held from the client, each asked which node it is on, in turn, until stopped.
struct Pinger {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<anyhow::Result<Vec<Option<String>>>>,
}

impl Pinger {
    fn start(lab: &Lab, n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = lab.client.ns.spawn(move || {
            let mut conns = Vec::new();
            for i in 0..n {
                let mut c = Held::connect(VIPS[i % 2], PORT)?;
                let node = c.ask()?;
                conns.push((c, node, None::<String>));
            }
            let _ = tx.send(());
            while !stop2.load(Ordering::Relaxed) {
                for (c, node, err) in conns.iter_mut().filter(|c| c.2.is_none()) {
                    match c.ask() {
                        Ok(a) if a == *node => {}
                        Ok(a) => *err = Some(format!("node {node} -> answered by node {a}")),
                        Err(e) => *err = Some(format!("node {node}: {e:#}")),
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(conns.into_iter().map(|c| c.2).collect())
        });
        rx.recv_timeout(Duration::from_secs(30)).unwrap();
        Self { stop, handle }
    }

    /// Stops; the errors of the connections that broke.
    fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .unwrap()
            .unwrap()
            .into_iter()
            .flatten()
            .collect()
    }
}

#[test]
fn tables_agree_through_failures_drains_and_heartbeat_loss() {
    lb_tests::lab::require_root().unwrap();
    let mut c = Cluster::up();
    c.same_kernel_tables();
    let leader = c.leader();
    let follower = (leader + 1) % 3;
    let (rev0, _) = c.revision();

    // Heartbeat loss toward one balancer: its detector takes node 1 down, the others still
    // hear it, so the leader changes nothing.
    let deaf = (leader + 2) % 3;
    let deaf_ip = c.host(deaf).ip.to_string();
    c.lab.nodes[0]
        .ns
        .ip(&["route", "add", "blackhole", &format!("{deaf_ip}/32")])
        .unwrap();
    let from = c.logs[deaf].len();
    let t0 = Instant::now();
    while !c.logs[deaf]
        .since(from)
        .iter()
        .any(|l| l.contains("node 1: no heartbeat"))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "balancer {} never missed node 1",
            deaf + 1
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.revision().0, rev0, "heartbeat loss toward one balancer");
    c.converged(NODES, 0, Duration::from_secs(1));
    println!(
        "heartbeat loss toward balancer {}: no table change",
        deaf + 1
    );

    // A node fails: every balancer takes it down in the same revision.
    let t0 = Instant::now();
    drop(c.agents[1].take());
    let took = c.converged(NODES - 1, 0, Duration::from_secs(5));
    println!(
        "node 2's agent stopped: every balancer runs the new revision {} ms later",
        t0.elapsed().as_millis().max(took.as_millis())
    );
    c.same_kernel_tables();

    // A follower refuses changes; the leader makes them, and every balancer runs them.
    let out = c.lb(follower, &["node", "drain", "3"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not lead"), "{err}");
    let out = c.lb(leader, &["node", "drain", "3"]);
    assert!(out.status.success(), "{out:?}");
    c.converged(1, 1, Duration::from_secs(5));
    c.same_kernel_tables();

    // The failed node's agent comes back; the drained node is undrained.
    let ips = c.ips();
    c.agents[1] = Some(c.setups[0].agent_to(&c.lab, 2, "100ms", &ips).unwrap());
    c.converged(2, 1, Duration::from_secs(10));
    let out = c.lb(leader, &["node", "undrain", "3"]);
    assert!(out.status.success(), "{out:?}");
    c.converged(NODES, 0, Duration::from_secs(5));
    c.same_kernel_tables();

    // Heartbeats reach the deaf balancer again: still nothing to change.
    let (rev1, _) = c.revision();
    c.lab.nodes[0]
        .ns
        .ip(&["route", "del", "blackhole", &format!("{deaf_ip}/32")])
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.revision().0, rev1);
    // The kernel counts land where the tables say: new connections through every balancer.
    for i in 0..3 {
        c.route_via(i);
        let nodes = new_connections(&c.lab, VIPS[0], PORT, 12).unwrap();
        assert!(nodes.iter().all(|n| (1..=3).contains(n)), "{nodes:?}");
    }
}

#[test]
fn leader_and_balancer_deaths_break_no_connection() {
    lb_tests::lab::require_root().unwrap();
    let mut c = Cluster::up();
    let leader = c.leader();
    let carrier = (leader + 1) % 3;
    let spare = (leader + 2) % 3;
    c.route_via(carrier);
    let pinger = Pinger::start(&c.lab, 60);
    let owners0 = c.owners(spare);

    // The leader's daemon dies: a new leader within the lease, and no table changes.
    let t0 = Instant::now();
    c.kill_daemon(leader);
    let new = c.leader();
    println!(
        "leader (balancer {}) killed: balancer {} leads {} ms later",
        leader + 1,
        new + 1,
        t0.elapsed().as_millis()
    );
    assert!(t0.elapsed() < Duration::from_secs(4));
    std::thread::sleep(Duration::from_millis(300));
    c.revision();
    for i in c.live() {
        assert!(
            c.owners(i) == owners0,
            "balancer {}: a new leader moved routes",
            i + 1
        );
    }

    // The balancer carrying the client's flows dies as a box would (daemon killed, link
    // down); the client's path moves to the spare (as ECMP would).
    let t0 = Instant::now();
    c.kill_daemon(carrier);
    c.host(carrier)
        .ns
        .ip(&["link", "set", "eth0", "down"])
        .unwrap();
    c.route_via(spare);
    // Every connection answers again through the spare.
    new_connections(&c.lab, VIPS[1], PORT, 4).unwrap();
    let recovered = t0.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let broken = pinger.stop();
    println!(
        "balancer {} died under 60 connections: new connections through balancer {} after {} \
         ms; {} broken",
        carrier + 1,
        spare + 1,
        recovered.as_millis(),
        broken.len()
    );
    assert!(broken.is_empty(), "broken connections: {broken:?}");
    assert!(c.owners(spare) == owners0, "no route moved");
}

#[test]
fn etcd_down_keeps_forwarding_and_changes_nothing_until_back() {
    lb_tests::lab::require_root().unwrap();
    let mut c = Cluster::up();
    let (rev0, digest0) = c.revision();
    c.etcd.kill();
    let t0 = Instant::now();
    // Node 3 fails while etcd is away: nobody changes tables on their own.
    drop(c.agents[2].take());
    std::thread::sleep(Duration::from_secs(3));
    for i in 0..3 {
        let st = c.status(i);
        assert_eq!(st["cluster"]["revision"].as_i64().unwrap(), rev0, "{st}");
        assert_eq!(st["cluster"]["digest"].as_str().unwrap(), digest0, "{st}");
        assert!(
            st["cluster"]["counters"]["errors"].as_u64().unwrap() > 0,
            "{st}"
        );
        assert_eq!(st["cluster"]["leading"], false, "{st}");
    }
    // Forwarding goes on through every balancer (to nodes 1 and 2: node 3 is gone).
    for i in 0..3 {
        c.route_via(i);
        let nodes = c.lab.client.ns.spawn(move || {
            let mut got = Vec::new();
            for _ in 0..40 {
                if let Ok(mut h) = Held::connect(VIPS[0], PORT)
                    && let Ok(n) = h.ask()
                {
                    got.push(n);
                }
            }
            Ok(got)
        });
        let got = nodes.join().unwrap().unwrap();
        assert!(
            got.iter().filter(|n| **n != 3).count() >= 20,
            "through balancer {}: {got:?}",
            i + 1
        );
    }
    println!(
        "etcd down for {} ms: tables unchanged on every balancer, forwarding on",
        t0.elapsed().as_millis()
    );
    let t1 = Instant::now();
    c.etcd.run().unwrap();
    let took = c.converged(NODES - 1, 0, Duration::from_secs(15));
    println!(
        "etcd back: every balancer runs the new revision (node 3 down) {} ms later",
        t1.elapsed().as_millis().max(took.as_millis())
    );
    assert!(c.revision().0 > rev0);
    c.same_kernel_tables();
}
