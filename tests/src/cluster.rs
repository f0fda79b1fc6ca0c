//! Cluster mode in a lab (issue 12): three `lb run` balancers sharing one etcd (in the lab's
//! bridge namespace), two dsr-l2 TCP VIPs of 65536 routes, nodes whose agents beat to every
//! balancer, echo servers on every node. The client reaches the VIPs through one balancer at a
//! time ([`Cluster::route_via`]), which stands in for a router's ECMP choice.
//! `tests/cluster_daemon_e2e.rs` and `cargo xtask bench control` use it.
use std::{
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;

use lb_userspace::dataplane::vip_key;

use crate::{
    daemon::{DaemonSetup, LogLines},
    echo::{EchoServers, Held},
    etcd::Etcd,
    netns::{ChildGuard, Host, Lab},
};

pub const VIPS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(198, 18, 100, 1),
    Ipv4Addr::new(198, 18, 100, 2),
];
pub const PORT: u16 = 7;
pub const ROUTES: u32 = 65536;
pub const NODES: usize = 3;
pub const ETCD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);

/// The cluster; fields drop in order: servers, agents, daemons, files, etcd, namespaces.
pub struct Cluster {
    _servers: EchoServers,
    pub agents: Vec<Option<ChildGuard>>,
    pub daemons: Vec<Option<ChildGuard>>,
    pub logs: Vec<LogLines>,
    pub setups: Vec<DaemonSetup>,
    pub etcd: Etcd,
    /// Balancers 2 and 3 (balancer 1 is the lab's `lb` host).
    hosts: Vec<Host>,
    pub lab: Lab,
}

impl Cluster {
    pub fn up() -> Self {
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

    pub fn host(&self, i: usize) -> &Host {
        if i == 0 {
            &self.lab.lb
        } else {
            &self.hosts[i - 1]
        }
    }

    pub fn ips(&self) -> Vec<Ipv4Addr> {
        (0..3).map(|i| self.host(i).ip).collect()
    }

    pub fn live(&self) -> Vec<usize> {
        (0..3).filter(|i| self.daemons[*i].is_some()).collect()
    }

    pub fn status(&self, i: usize) -> Value {
        self.setups[i].status().unwrap()
    }

    /// The balancer that leads, as every live one reports it (all must agree).
    pub fn leader(&self) -> usize {
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
    pub fn converged(&self, active: usize, draining: usize, limit: Duration) -> Duration {
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
    pub fn revision(&self) -> (i64, String) {
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
    pub fn same_kernel_tables(&self) {
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
    pub fn owners(&self, i: usize) -> Vec<Vec<u32>> {
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
    pub fn route_via(&self, i: usize) {
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

    pub fn kill_daemon(&mut self, i: usize) {
        let mut d = self.daemons[i].take().unwrap();
        d.signal_and_wait(libc::SIGKILL).unwrap();
    }

    pub fn lb(&self, i: usize, args: &[&str]) -> std::process::Output {
        self.setups[i].cli(args).unwrap()
    }
}

/// Connections held from the client, each asked which node it is on, in turn, until stopped.
pub struct Pinger {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<anyhow::Result<Vec<Option<String>>>>,
}

impl Pinger {
    pub fn start(lab: &Lab, n: usize) -> Self {
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
    pub fn stop(self) -> Vec<String> {
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
