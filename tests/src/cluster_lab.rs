//! The cluster lab: several balancers behind an ECMP router, in network namespaces, for issue
//! 12's cluster mode (etcd, BGP, several `lb run`). It builds the network, the router, the
//! balancers' bird2, the nodes' servers and an etcd; what runs on the balancers besides bird
//! (forwarders, `lb run` daemons: [`ClusterLab::start_daemon`]) is the caller's.
//! `lb-lab up --balancers N` (`crate::cluster_labctl`) runs it with daemons and agents and
//! leaves it running ([`ClusterLab::keep_running`]).
//!
//! ```text
//!   <name>-client   198.18.200.2, 2001:db8:200::2; default route via the router
//!        |  (a veth pair: its own subnet, 198.18.200.0/24, 2001:db8:200::/64)
//!   <name>-router   eth1 198.18.200.1, 2001:db8:200::1; eth0 198.18.0.254, 2001:db8::254:
//!                   bird2 (AS 65000) with a BGP session (IPv4 and IPv6) and BFD to every
//!                   balancer, `merge paths on` into the kernel: the VIPs' routes are ECMP
//!                   routes over the balancers announcing them, hashed on the L4 tuple
//!                   (fib_multipath_hash_policy=1)
//!        |  (eth0 on br0 of <name>-br: one L2 segment, 198.18.0.0/24, 2001:db8::/64)
//!   <name>-lbI      198.18.0.(20+I), 2001:db8::(20+I), MAC 02:00:00:00:00:(14+I hex): bird2
//!                   (AS 65001) announcing what its include file (written by
//!                   `lb_userspace::announce::Announcer`) says; I = 1..=8
//!   <name>-nodeJ    lab.rs's nodes: 198.18.0.(10+J), 2001:db8::(10+J); the lab's VIPs on lo,
//!                   arp_ignore=1, arp_announce=2, default routes via the router (replies go
//!                   to the client directly: dsr-l2), `lb-lab serve`; J = 1..=8
//!   <name>-br       br0 198.18.0.250, 2001:db8::250: the bridge, and etcd on
//!                   http://198.18.0.250:2379 (data dir /run/<name>/etcd)
//! ```
//! Everything is named after the lab (`lab::Names`: namespaces `<name>-*`, processes
//! `<name>:<role>`, files under `/run/<name>/`), so `lab::down` removes it, on drop and before
//! a new lab of the same name (after a crash).
use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_userspace::{announce, config::BgpConfig};

use crate::lab::{
    self, Names, ROUTER_IP, ROUTER_IP6, ROUTER_MAC, all_vips, in_ns, ip_batch, node_ip, node_ip6,
    node_mac, sysctls, v6_host, wait_for,
};

/// Most balancers and nodes a cluster lab has.
pub const MAX_BALANCERS: usize = 8;
pub const MAX_NODES: usize = 8;

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 2);
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0x2);
/// The router's address on the client's subnet.
pub const ROUTER_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);
pub const ROUTER_CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0x1);
/// br0's address: etcd listens there.
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 250);
pub const ETCD_PORT: u16 = 2379;
pub const ROUTER_AS: u32 = 65000;
pub const BALANCER_AS: u32 = 65001;
/// BFD between the router and each balancer: a silent peer is down after `BFD_MULTIPLIER`
/// missed intervals of `BFD_INTERVAL_MS` (150 ms), which withdraws its BGP routes. (Not
/// tighter: the test machine is shared, and a scheduling hiccup must not flap a session.)
pub const BFD_INTERVAL_MS: u32 = 30;
pub const BFD_MULTIPLIER: u32 = 5;
/// BGP hold time, the fallback should BFD not run: bird's shortest (3 s).
pub const BGP_HOLD_S: u32 = 3;

/// Balancer `i` (1-based): its address on the segment.
pub fn balancer_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 20 + i as u8)
}

/// Balancer `i` (1-based): its IPv6 address (balancer 1: 2001:db8::21).
pub fn balancer_ip6(i: usize) -> Ipv6Addr {
    v6_host(20 + i as u8)
}

/// Balancer `i` (1-based): its MAC.
pub fn balancer_mac(i: usize) -> String {
    format!("02:00:00:00:00:{:02x}", 20 + i)
}

/// What to build.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// The lab's name (`lab::Names` rules: `lb...lab...`, e.g. `lbclab`); every namespace,
    /// process and file of the lab is named after it.
    pub name: String,
    /// 1..=8.
    pub balancers: usize,
    /// 1..=8.
    pub nodes: usize,
    /// The `lb-lab` binary (the nodes' servers: `lb-lab serve`).
    pub lab_bin: PathBuf,
}

/// A running cluster lab; dropping it removes everything of it, unless it was told to keep
/// running ([`ClusterLab::keep_running`], [`ClusterLab::attach`]).
pub struct ClusterLab {
    names: Names,
    balancers: usize,
    nodes: usize,
    birdc: PathBuf,
    /// Our children by role (`bird-router`, `bird-lb1`, `etcd`, `serve-1`...), killed and
    /// reaped on drop (`lab::down` also finds them by name).
    children: BTreeMap<String, Child>,
    /// Dropping leaves the lab running (`lb-lab up --balancers N`; `lab::down` removes it).
    keep: bool,
}

/// An installed program: on the PATH, else in /usr/sbin or /sbin (bird lives there).
pub fn program(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!("{name} is not installed: run `cargo xtask setup` (bird2, etcd-server)")
        })
}

impl ClusterLab {
    /// Builds the lab and waits until every BGP session is established and etcd answers.
    pub fn new(spec: &ClusterSpec) -> Result<Self> {
        lab::require_root()?;
        ensure!(
            (1..=MAX_BALANCERS).contains(&spec.balancers),
            "balancers {}: use 1 to {MAX_BALANCERS}",
            spec.balancers
        );
        ensure!(
            (1..=MAX_NODES).contains(&spec.nodes),
            "nodes {}: use 1 to {MAX_NODES}",
            spec.nodes
        );
        ensure!(
            spec.lab_bin.is_file(),
            "lb-lab binary {} is missing: build it (`cargo xtask test` does)",
            spec.lab_bin.display()
        );
        let names = Names::new(&spec.name)?;
        remove_instances(&names);
        if !lab::leftovers(&names).is_empty() {
            println!(
                "cluster lab: removing what an earlier lab {} left behind",
                names.name
            );
            println!("{}", lab::down(&names)?.summary(&names));
        }
        let mut me = Self {
            names,
            balancers: spec.balancers,
            nodes: spec.nodes,
            birdc: program("birdc")?,
            children: BTreeMap::new(),
            keep: false,
        };
        // From here on, a failure drops `me`, which removes what was built.
        let started = Instant::now();
        me.build(spec)?;
        println!(
            "cluster lab {}: {} balancers, {} nodes, BGP established and etcd ready in {} ms",
            me.names.name,
            me.balancers,
            me.nodes,
            started.elapsed().as_millis()
        );
        Ok(me)
    }

    /// The running cluster lab called `names` (`balancers` and `nodes` as it was built), to
    /// look at and operate; dropping this leaves it running.
    pub fn attach(names: Names, balancers: usize, nodes: usize) -> Result<Self> {
        Ok(Self {
            names,
            balancers,
            nodes,
            birdc: program("birdc")?,
            children: BTreeMap::new(),
            keep: true,
        })
    }

    /// Lets the lab outlive this value (and this process): its processes run on by
    /// themselves; `lab::down` (`lb-lab down`) removes it.
    pub fn keep_running(mut self) {
        self.keep = true;
    }

    fn build(&mut self, spec: &ClusterSpec) -> Result<()> {
        let n = self.names.clone();
        for d in [n.run_dir(), n.pid_dir(), n.log_dir(), self.router_dir()] {
            fs::create_dir_all(&d).with_context(|| format!("mkdir {}", d.display()))?;
        }
        self.build_network()?;
        let bird = program("bird")?;
        // The router's bird, then each balancer's (with an include file announcing nothing).
        fs::write(self.router_dir().join("bird.conf"), self.router_bird_conf())?;
        self.start_bird_at("router", &self.router_ns(), &bird, &self.router_dir())?;
        for i in 1..=self.balancers {
            let dir = self.balancer_dir(i);
            fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
            fs::write(self.routes_file(i), announce::render(&BTreeSet::new()))?;
            fs::write(dir.join("bird.conf"), self.balancer_bird_conf(i))?;
            self.start_balancer_bird(i)?;
        }
        for j in 1..=self.nodes {
            let mut args: Vec<OsString> =
                vec!["serve".into(), "--node".into(), j.to_string().into()];
            for vip in all_vips() {
                args.extend(["--vip".into(), vip.to_string().into()]);
            }
            let role = format!("serve-{j}");
            let child = lab::spawn(
                &n,
                &role,
                &self.node_ns(j),
                spec.lab_bin.as_os_str(),
                &args,
                false,
            )?;
            self.children.insert(role, child);
        }
        self.start_etcd()?;
        for j in 1..=self.nodes {
            let role = format!("serve-{j}");
            let client = self.client_ns();
            wait_for(
                &format!("node {j}'s HTTP server, from the client"),
                Duration::from_secs(10),
                || {
                    lab::check_alive(&n, &role)?;
                    Ok(
                        lab::http_get_ip_in(&client, IpAddr::V4(node_ip(j)), lab::HTTP_PORT, None)
                            .is_ok(),
                    )
                },
            )?;
        }
        self.wait_bgp_established(Duration::from_secs(20))?;
        Ok(())
    }

    fn build_network(&self) -> Result<()> {
        let br = self.bridge_ns();
        let router = self.router_ns();
        let client = self.client_ns();
        // (namespace, bridge-side link name, MAC, IPv4, IPv6) of each host on the segment.
        let mut hosts: Vec<(String, String, String, Ipv4Addr, Ipv6Addr)> = vec![(
            router.clone(),
            "router".into(),
            ROUTER_MAC.into(),
            ROUTER_IP,
            ROUTER_IP6,
        )];
        for i in 1..=self.balancers {
            hosts.push((
                self.balancer_ns(i),
                format!("lb{i}"),
                balancer_mac(i),
                balancer_ip(i),
                balancer_ip6(i),
            ));
        }
        for j in 1..=self.nodes {
            hosts.push((
                self.node_ns(j),
                format!("node{j}"),
                node_mac(j),
                node_ip(j),
                node_ip6(j),
            ));
        }
        // No duplicate address detection (addresses usable at once): set before the links
        // exist, so every interface inherits it.
        let no_dad = [
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
        ];
        let all_ns = std::iter::once(&br)
            .chain(std::iter::once(&client))
            .chain(hosts.iter().map(|h| &h.0));
        for ns in all_ns {
            crate::netns::sh(&["ip", "netns", "add", ns])?;
            sysctls(ns, &no_dad)?;
        }
        let mut lines = vec![
            "link set lo up".to_string(),
            "link add br0 type bridge mcast_snooping 0".into(),
            "link set br0 address 02:00:00:00:00:fa".into(),
            format!("addr add {BRIDGE_IP}/24 dev br0"),
            format!("addr add {}/64 dev br0 nodad", v6_host(250)),
            "link set br0 up".into(),
        ];
        for (ns, peer, ..) in &hosts {
            lines.push(format!(
                "link add {peer} type veth peer name eth0 netns {ns}"
            ));
            lines.push(format!("link set {peer} master br0 up"));
        }
        ip_batch(&br, &lines)?;
        for (ns, _, mac, ip, ip6) in &hosts {
            let mut lines = vec![
                "link set lo up".to_string(),
                format!("link set eth0 address {mac}"),
                format!("addr add {ip}/24 dev eth0"),
                format!("addr add {ip6}/64 dev eth0 nodad"),
                "link set eth0 up".into(),
            ];
            let mut kv = vec![
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                ("net.ipv4.conf.eth0.rp_filter", "0"),
                // A balancer forwarding back out of eth0 must not redirect the router
                // around itself, and nobody takes redirects.
                ("net.ipv4.conf.all.send_redirects", "0"),
                ("net.ipv4.conf.eth0.send_redirects", "0"),
                ("net.ipv4.conf.all.accept_redirects", "0"),
                ("net.ipv6.conf.all.accept_redirects", "0"),
            ];
            if ns.starts_with(&self.names.ns("node")) {
                // dsr-l2 nodes (lab.rs): the VIPs on lo, no ARP answers for them, replies to
                // the client straight through the router.
                for vip in all_vips() {
                    let len = if vip.is_ipv4() { 32 } else { 128 };
                    lines.push(format!("addr add {vip}/{len} dev lo"));
                }
                lines.push(format!("route add default via {ROUTER_IP}"));
                lines.push(format!("route add default via {ROUTER_IP6}"));
                kv.push(("net.ipv4.conf.all.arp_ignore", "1"));
                kv.push(("net.ipv4.conf.all.arp_announce", "2"));
            }
            if ns == &router {
                lines.push(format!(
                    "link add eth1 type veth peer name eth0 netns {client}"
                ));
                lines.push(format!("addr add {ROUTER_CLIENT_IP}/24 dev eth1"));
                lines.push(format!("addr add {ROUTER_CLIENT_IP6}/64 dev eth1 nodad"));
                lines.push("link set eth1 up".into());
                kv.extend([
                    ("net.ipv4.ip_forward", "1"),
                    ("net.ipv6.conf.all.forwarding", "1"),
                    // ECMP on the L4 tuple: the connections of one client spread over the
                    // balancers, each connection stays on one.
                    ("net.ipv4.fib_multipath_hash_policy", "1"),
                    ("net.ipv6.fib_multipath_hash_policy", "1"),
                ]);
            }
            ip_batch(ns, &lines)?;
            sysctls(ns, &kv)?;
        }
        ip_batch(
            &client,
            &[
                "link set lo up".to_string(),
                format!("addr add {CLIENT_IP}/24 dev eth0"),
                format!("addr add {CLIENT_IP6}/64 dev eth0 nodad"),
                "link set eth0 up".into(),
                format!("route add default via {ROUTER_CLIENT_IP}"),
                format!("route add default via {ROUTER_CLIENT_IP6}"),
            ],
        )?;
        // Native XDP frames lose the skb's checksum-offload state (lab.rs): every veth sends
        // real checksums, so a balancer's XDP program can later run natively.
        let peers: Vec<String> = hosts.iter().map(|h| h.1.clone()).collect();
        in_ns(&br, move || {
            peers.iter().try_for_each(|p| lab::tx_csum_off(p))
        })?;
        for ns in hosts.iter().map(|h| &h.0).chain([&client]) {
            in_ns(ns, || lab::tx_csum_off("eth0"))?;
        }
        in_ns(&router, || lab::tx_csum_off("eth1"))?;
        Ok(())
    }

    /// The BFD and BGP timers both sides share.
    fn bird_timers() -> String {
        format!(
            "  hold time {BGP_HOLD_S};\n  keepalive time 1;\n  connect delay time 1;\n  \
             connect retry time 1;\n  error wait time 1, 2;\n  bfd on;\n"
        )
    }

    fn bfd_block() -> String {
        format!(
            "protocol bfd {{\n  interface \"eth0\" {{\n    min rx interval {BFD_INTERVAL_MS} ms;\n    \
             min tx interval {BFD_INTERVAL_MS} ms;\n    idle tx interval 300 ms;\n    \
             multiplier {BFD_MULTIPLIER};\n  }};\n}}\n"
        )
    }

    /// The router's bird.conf: a session per balancer and family, routes merged into ECMP
    /// routes in the kernel.
    pub fn router_bird_conf(&self) -> String {
        let mut s = format!(
            "# The cluster lab's router ({name}).\nrouter id {ROUTER_IP};\nlog stderr all;\n\
             protocol device {{ scan time 10; }}\n\
             # Equal BGP routes from several balancers become one multipath kernel route.\n\
             protocol kernel k4 {{\n  merge paths on;\n  ipv4 {{ import none; export all; }};\n}}\n\
             protocol kernel k6 {{\n  merge paths on;\n  ipv6 {{ import none; export all; }};\n}}\n\
             {bfd}template bgp balancer {{\n  local as {ROUTER_AS};\n{timers}}}\n",
            name = self.names.name,
            bfd = Self::bfd_block(),
            timers = Self::bird_timers(),
        );
        for i in 1..=self.balancers {
            s += &format!(
                "protocol bgp lb{i}_4 from balancer {{\n  local {ROUTER_IP};\n  neighbor {} as {BALANCER_AS};\n  \
                 ipv4 {{ import all; export none; }};\n}}\n\
                 protocol bgp lb{i}_6 from balancer {{\n  local {ROUTER_IP6};\n  neighbor {} as {BALANCER_AS};\n  \
                 ipv6 {{ import all; export none; next hop prefer global; }};\n}}\n",
                balancer_ip(i),
                balancer_ip6(i),
            );
        }
        s
    }

    /// Balancer `i`'s bird.conf: what `docs/control-plane.md` asks of an operator (include
    /// the announcer's file, export its two protocols to the router, nothing to the kernel).
    pub fn balancer_bird_conf(&self, i: usize) -> String {
        format!(
            "# Balancer {i} of the cluster lab {name}.\nrouter id {ip};\nlog stderr all;\n\
             protocol device {{ scan time 10; }}\n\
             # The VIPs this balancer announces: written by lb_userspace::announce.\n\
             include \"{routes}\";\n\
             {bfd}template bgp uplink {{\n  local as {BALANCER_AS};\n{timers}}}\n\
             protocol bgp up4 from uplink {{\n  local {ip};\n  neighbor {ROUTER_IP} as {ROUTER_AS};\n  \
             ipv4 {{ import none; export where proto = \"{p4}\"; }};\n}}\n\
             protocol bgp up6 from uplink {{\n  local {ip6};\n  neighbor {ROUTER_IP6} as {ROUTER_AS};\n  \
             ipv6 {{ import none; export where proto = \"{p6}\"; }};\n}}\n",
            name = self.names.name,
            ip = balancer_ip(i),
            ip6 = balancer_ip6(i),
            routes = self.routes_file(i).display(),
            bfd = Self::bfd_block(),
            timers = Self::bird_timers(),
            p4 = announce::PROTO_V4,
            p6 = announce::PROTO_V6,
        )
    }

    fn start_bird_at(&mut self, who: &str, ns: &str, bird: &Path, dir: &Path) -> Result<()> {
        let role = format!("bird-{who}");
        let args: Vec<OsString> = vec![
            "-f".into(),
            "-c".into(),
            dir.join("bird.conf").into(),
            "-s".into(),
            dir.join("bird.ctl").into(),
        ];
        let child = lab::spawn(&self.names, &role, ns, bird.as_os_str(), &args, false)?;
        self.children.insert(role.clone(), child);
        let sock = dir.join("bird.ctl");
        let n = self.names.clone();
        wait_for(
            &format!("{role}'s control socket"),
            Duration::from_secs(10),
            || {
                lab::check_alive(&n, &role)?;
                Ok(sock.exists())
            },
        )
    }

    fn start_balancer_bird(&mut self, i: usize) -> Result<()> {
        let bird = program("bird")?;
        let (ns, dir) = (self.balancer_ns(i), self.balancer_dir(i));
        self.start_bird_at(&format!("lb{i}"), &ns, &bird, &dir)
    }

    /// `birdc -s SOCKET ARGS...`: its output.
    pub fn birdc(&self, socket: &Path, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.birdc)
            .arg("-s")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running birdc")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success(),
            "birdc -s {} {}: {}",
            socket.display(),
            args.join(" "),
            text.trim()
        );
        Ok(text)
    }

    /// The router's BGP sessions and their state (`lb1_4` -> `Established`...).
    pub fn router_sessions(&self) -> Result<BTreeMap<String, String>> {
        let text = self.birdc(&self.router_socket(), &["show", "protocols"])?;
        Ok(parse_bgp_sessions(&text))
    }

    /// Waits until the router has every BGP session with every live balancer up.
    pub fn wait_bgp_established(&self, timeout: Duration) -> Result<()> {
        wait_for("every BGP session established", timeout, || {
            lab::check_alive(&self.names, "bird-router")?;
            let s = self.router_sessions()?;
            Ok(s.len() == 2 * self.balancers && s.values().all(|v| v == "Established"))
        })
        .with_context(|| {
            format!(
                "router sessions: {:?}",
                self.router_sessions().unwrap_or_default()
            )
        })
    }

    // -----------------------------------------------------------------------------------------
    // etcd
    // -----------------------------------------------------------------------------------------

    /// etcd's client URL (reachable from every namespace on the segment).
    pub fn etcd_endpoint(&self) -> String {
        format!("http://{BRIDGE_IP}:{ETCD_PORT}")
    }

    pub fn etcd_data_dir(&self) -> PathBuf {
        self.names.run_dir().join("etcd")
    }

    /// Starts etcd on its data dir (again, after [`ClusterLab::stop_etcd`]) and waits until it
    /// answers a balancer (`/health` from balancer 1's namespace).
    pub fn start_etcd(&mut self) -> Result<()> {
        ensure!(
            !self.children.contains_key("etcd"),
            "etcd is already running"
        );
        let etcd = program("etcd")?;
        let peer = "http://127.0.0.1:2380";
        let client = self.etcd_endpoint();
        let args: Vec<OsString> = [
            format!("--name={}", self.names.name),
            format!("--data-dir={}", self.etcd_data_dir().display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster={}={peer}", self.names.name),
            "--initial-cluster-state=new".into(),
        ]
        .map(OsString::from)
        .to_vec();
        let child = lab::spawn(
            &self.names,
            "etcd",
            &self.bridge_ns(),
            etcd.as_os_str(),
            &args,
            false,
        )?;
        self.children.insert("etcd".into(), child);
        let started = Instant::now();
        let from = self.balancer_ns(1);
        let n = self.names.clone();
        wait_for("etcd to answer", Duration::from_secs(20), || {
            lab::check_alive(&n, "etcd")?;
            Ok(self
                .etcd_request(&from, "GET", "/health", None)
                .is_ok_and(|b| b.contains("\"health\":\"true\"")))
        })?;
        println!(
            "cluster lab {}: etcd on {} ready in {} ms",
            n.name,
            client,
            started.elapsed().as_millis()
        );
        Ok(())
    }

    /// Kills etcd (SIGKILL, as a crash) and waits until it is gone; its data dir stays.
    pub fn stop_etcd(&mut self) -> Result<()> {
        let mut c = self
            .children
            .remove("etcd")
            .context("etcd is not running")?;
        c.kill().context("killing etcd")?;
        c.wait().context("waiting for etcd")?;
        Ok(())
    }

    /// One HTTP/1.1 request to etcd's client URL from namespace `ns` (its JSON gateway, e.g.
    /// `POST /v3/kv/put`): the body of a 200 answer.
    pub fn etcd_request(
        &self,
        ns: &str,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<String> {
        let (method, path, body) = (
            method.to_string(),
            path.to_string(),
            body.map(str::to_string),
        );
        in_ns(ns, move || {
            let addr = SocketAddr::from((BRIDGE_IP, ETCD_PORT));
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                .with_context(|| format!("connecting to etcd on {addr}"))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let body = body.unwrap_or_default();
            write!(
                s,
                "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )?;
            let mut reply = String::new();
            s.read_to_string(&mut reply)?;
            let (head, rest) = reply
                .split_once("\r\n\r\n")
                .with_context(|| format!("etcd answered {reply:?}"))?;
            ensure!(head.starts_with("HTTP/1.1 200"), "etcd answered {head:?}");
            Ok(rest.to_string())
        })
    }

    // -----------------------------------------------------------------------------------------
    // Names and addresses
    // -----------------------------------------------------------------------------------------

    pub fn names(&self) -> &Names {
        &self.names
    }
    pub fn balancers(&self) -> usize {
        self.balancers
    }
    pub fn nodes(&self) -> usize {
        self.nodes
    }
    pub fn router_ns(&self) -> String {
        self.names.ns("router")
    }
    pub fn client_ns(&self) -> String {
        self.names.ns("client")
    }
    pub fn bridge_ns(&self) -> String {
        self.names.ns("br")
    }
    /// Balancer `i` (1-based).
    pub fn balancer_ns(&self, i: usize) -> String {
        self.names.ns(&format!("lb{i}"))
    }
    /// Node `j` (1-based).
    pub fn node_ns(&self, j: usize) -> String {
        self.names.ns(&format!("node{j}"))
    }
    /// The router's bird.conf and bird.ctl.
    pub fn router_dir(&self) -> PathBuf {
        self.names.run_dir().join("router")
    }
    /// Balancer `i`'s files: bird.conf, bird.ctl, vips.conf.
    pub fn balancer_dir(&self, i: usize) -> PathBuf {
        self.names.run_dir().join(format!("lb{i}"))
    }
    /// Balancer `i`'s bird control socket.
    pub fn bird_socket(&self, i: usize) -> PathBuf {
        self.balancer_dir(i).join("bird.ctl")
    }
    /// The file balancer `i`'s bird.conf includes (the announcer writes it).
    pub fn routes_file(&self, i: usize) -> PathBuf {
        self.balancer_dir(i).join("vips.conf")
    }
    pub fn router_socket(&self) -> PathBuf {
        self.router_dir().join("bird.ctl")
    }
    /// Balancer `i`'s `[bgp]` section.
    pub fn bgp_config(&self, i: usize) -> BgpConfig {
        BgpConfig {
            birdc: self.birdc.clone(),
            socket: self.bird_socket(i),
            routes_file: self.routes_file(i),
        }
    }
    /// Which balancer has this address (IPv4 or IPv6), if any.
    pub fn balancer_of(&self, ip: IpAddr) -> Option<usize> {
        (1..=self.balancers)
            .find(|&i| ip == IpAddr::V4(balancer_ip(i)) || ip == IpAddr::V6(balancer_ip6(i)))
    }

    // -----------------------------------------------------------------------------------------
    // Routes, failures
    // -----------------------------------------------------------------------------------------

    /// The router's next hops for `vip` (its /32 or /128 route): one per balancer it spreads
    /// the VIP's flows over; empty without a route.
    pub fn ecmp_nexthops(&self, vip: IpAddr) -> Result<BTreeSet<IpAddr>> {
        let (family, prefix) = match vip {
            IpAddr::V4(_) => ("-4", format!("{vip}/32")),
            IpAddr::V6(_) => ("-6", format!("{vip}/128")),
        };
        let router = self.router_ns();
        let out = crate::netns::sh(&[
            "ip", "-j", family, "-n", &router, "route", "show", "exact", &prefix,
        ])?;
        parse_nexthops(&out).with_context(|| format!("the router's route to {prefix}: {out}"))
    }

    /// Waits until the router's next hops for every one of `vips` are exactly balancers
    /// `want`; returns how long that took.
    pub fn wait_nexthops(
        &self,
        vips: &[IpAddr],
        want: &BTreeSet<usize>,
        timeout: Duration,
    ) -> Result<Duration> {
        let started = Instant::now();
        let expect = |vip: &IpAddr| -> BTreeSet<IpAddr> {
            want.iter()
                .map(|&i| match vip {
                    IpAddr::V4(_) => IpAddr::V4(balancer_ip(i)),
                    IpAddr::V6(_) => IpAddr::V6(balancer_ip6(i)),
                })
                .collect()
        };
        let mut last = BTreeMap::new();
        loop {
            let mut all = true;
            for vip in vips {
                let have = self.ecmp_nexthops(*vip)?;
                all &= have == expect(vip);
                last.insert(*vip, have);
            }
            if all {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!(
                    "the router's next hops are not balancers {want:?} after {timeout:?}: {last:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Balancer `i` fails as a box would: its link stops forwarding (its bridge port goes
    /// down, so nothing it sends leaves, not even a TCP FIN), then its bird is killed. The
    /// router notices only by BFD (or the BGP hold time).
    pub fn kill_balancer(&mut self, i: usize) -> Result<()> {
        ensure!((1..=self.balancers).contains(&i), "no balancer {i}");
        ip_batch(&self.bridge_ns(), &[format!("link set lb{i} down")])?;
        if let Some(mut c) = self.children.remove(&format!("bird-lb{i}")) {
            c.kill().context("killing bird")?;
            c.wait().context("waiting for bird")?;
        }
        Ok(())
    }

    /// Balancer `i` back after [`ClusterLab::kill_balancer`]: its link up, its bird started
    /// on the include file as the announcer left it.
    pub fn revive_balancer(&mut self, i: usize) -> Result<()> {
        ensure!((1..=self.balancers).contains(&i), "no balancer {i}");
        ip_batch(&self.bridge_ns(), &[format!("link set lb{i} up")])?;
        let _ = fs::remove_file(self.bird_socket(i));
        self.start_balancer_bird(i)
    }

    /// Forwarded packets counted by namespace `ns`'s kernel: (IPv4 `ForwDatagrams`, IPv6
    /// `Ip6OutForwDatagrams`).
    pub fn forwarded(ns: &str) -> Result<(u64, u64)> {
        in_ns(ns, || {
            let v4 = fs::read_to_string("/proc/thread-self/net/snmp")?;
            let v6 = fs::read_to_string("/proc/thread-self/net/snmp6")?;
            Ok((
                snmp_field(&v4, "Ip:", "ForwDatagrams")?,
                snmp6_field(&v6, "Ip6OutForwDatagrams")?,
            ))
        })
    }
}

impl ClusterLab {
    // -----------------------------------------------------------------------------------------
    // Cluster-mode daemons and agents
    // -----------------------------------------------------------------------------------------

    /// Balancer `i`'s `lb run` instance (pins `/sys/fs/bpf/<instance>`, lock file
    /// `/run/lb/<instance>.lock`).
    pub fn instance(&self, i: usize) -> String {
        self.names.balancer_instance(i)
    }
    /// Balancer `i`'s control API socket.
    pub fn api_socket(&self, i: usize) -> PathBuf {
        self.balancer_dir(i).join("lb.sock")
    }
    /// The key every agent and balancer shares.
    pub fn key_file(&self) -> PathBuf {
        self.names.run_dir().join("key")
    }

    /// Balancer `i`'s `lb.toml`: cluster mode on the lab's etcd, `[bgp]` through its bird, the
    /// lab's dsr-l2 VIPs (IPv4 and IPv6: HTTP on 80, TCP and UDP echo on 7) of `routes` routes,
    /// every node heartbeat-checked.
    pub fn balancer_config(&self, i: usize, routes: u32) -> String {
        let vips: Vec<_> = lab::lab_vips()
            .into_iter()
            .filter(|v| v.3 == "dsr-l2")
            .collect();
        let bgp = self.bgp_config(i);
        let mut s = format!(
            "[daemon]\ninstance = \"{instance}\"\nheartbeat_listen = \"{ip}:{hb}\"\n\
             key_file = \"{key}\"\nxdp_mode = \"generic\"\nconntrack_size = 65536\n\
             route_slots = {slots}\napi_socket = \"{sock}\"\n\n\
             [cluster]\nendpoints = [\"{etcd}\"]\nname = \"{name}\"\nid = \"lb{i}\"\n\n\
             [bgp]\nbirdc = \"{birdc}\"\nsocket = \"{bsock}\"\nroutes_file = \"{rfile}\"\n",
            instance = self.instance(i),
            ip = balancer_ip(i),
            hb = lab::HB_PORT,
            key = self.key_file().display(),
            slots = 2 * routes as usize * vips.len(),
            sock = self.api_socket(i).display(),
            etcd = self.etcd_endpoint(),
            name = self.names.name,
            birdc = bgp.birdc.display(),
            bsock = bgp.socket.display(),
            rfile = bgp.routes_file.display(),
        );
        for (addr, port, proto, mode) in vips {
            s += &format!(
                "\n[[vip]]\naddr = \"{addr}\"\nport = {port}\nproto = \"{proto}\"\nmode = \"{mode}\"\nroutes = {routes}\n"
            );
        }
        for j in 1..=self.nodes {
            s += &format!(
                "\n[[node]]\nid = {j}\nmac = \"{}\"\nipv4 = \"{}\"\nipv6 = \"{}\"\n",
                node_mac(j),
                node_ip(j),
                node_ip6(j)
            );
        }
        s
    }

    /// Starts `lb run` on balancer `i` (`lb`: the binary), its log in the lab's log dir.
    pub fn start_daemon(&mut self, lb: &Path, i: usize, routes: u32) -> Result<()> {
        if !self.key_file().exists() {
            lab::write_key(&self.key_file())?;
        }
        let dir = self.balancer_dir(i);
        let cfg = dir.join("lb.toml");
        fs::write(&cfg, self.balancer_config(i, routes))?;
        let args: Vec<OsString> = vec![
            "run".into(),
            "--iface".into(),
            "eth0".into(),
            "--config".into(),
            cfg.into(),
            "--state-dir".into(),
            dir.join("state").into(),
        ];
        let role = format!("lb-lb{i}");
        let child = lab::spawn(
            &self.names,
            &role,
            &self.balancer_ns(i),
            lb.as_os_str(),
            &args,
            false,
        )?;
        self.children.insert(role.clone(), child);
        wait_for(
            &format!("balancer {i}'s daemon to answer"),
            Duration::from_secs(30),
            || {
                lab::check_alive(&self.names, &role)?;
                Ok(self.lb_status(lb, i).is_ok())
            },
        )
        .with_context(|| {
            format!(
                "its log: {}",
                self.names.log_dir().join(format!("{role}.log")).display()
            )
        })?;
        Ok(())
    }

    /// Kills balancer `i`'s daemon (SIGKILL): its program stays attached and forwarding on the
    /// tables it had, bird keeps announcing what it last announced.
    pub fn kill_daemon(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.children.remove(&format!("lb-lb{i}")) {
            c.kill().context("killing lb run")?;
            c.wait().context("waiting for lb run")?;
        }
        Ok(())
    }

    /// Balancer `i` stops forwarding as a dead box on the wire would: its daemon killed, its
    /// XDP program detached (the namespace does not forward IP, so frames to it go nowhere),
    /// its bird frozen (the router notices by BFD). Its link stays up: with the bridge port
    /// down instead, the bridge would flood frames for its MAC to the other balancers, whose
    /// programs would forward them, hiding the failure.
    pub fn fail_balancer(&mut self, i: usize) -> Result<()> {
        self.kill_daemon(i)?;
        let _ = fs::remove_dir_all(format!("/sys/fs/bpf/{}", self.instance(i)));
        ip_batch(
            &self.balancer_ns(i),
            &["link set dev eth0 xdpgeneric off".into()],
        )?;
        // Frozen, not killed: a killed bird's BGP socket would still close (a FIN the router
        // acts on at once), a dead box sends nothing; the router notices by BFD. (Dropping
        // the lab kills it.)
        if let Some(c) = self.children.get(&format!("bird-lb{i}")) {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGSTOP) };
        }
        Ok(())
    }

    /// Stops balancer `i`'s daemon with SIGTERM and waits for it to exit.
    pub fn stop_daemon(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.children.remove(&format!("lb-lb{i}")) {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            c.wait().context("waiting for lb run")?;
        }
        Ok(())
    }

    /// Starts node `j`'s agent, beating to every balancer.
    pub fn start_agent(&mut self, lb: &Path, j: usize) -> Result<()> {
        let to: Vec<String> = (1..=self.balancers)
            .map(|i| format!("{}:{}", balancer_ip(i), lab::HB_PORT))
            .collect();
        let args: Vec<OsString> = vec![
            "agent".into(),
            "--node-id".into(),
            j.to_string().into(),
            "--balancer".into(),
            to.join(",").into(),
            "--key-file".into(),
            self.key_file().into(),
        ];
        let role = format!("agent-{j}");
        let child = lab::spawn(
            &self.names,
            &role,
            &self.node_ns(j),
            lb.as_os_str(),
            &args,
            false,
        )?;
        self.children.insert(role, child);
        Ok(())
    }

    /// Stops node `j`'s agent (SIGKILL: the node fails as far as heartbeats tell).
    pub fn kill_agent(&mut self, j: usize) -> Result<()> {
        if let Some(mut c) = self.children.remove(&format!("agent-{j}")) {
            c.kill().context("killing lb agent")?;
            c.wait().context("waiting for lb agent")?;
        }
        Ok(())
    }

    /// `lb status --json` of balancer `i`.
    pub fn lb_status(&self, lb: &Path, i: usize) -> Result<serde_json::Value> {
        let out = Command::new(lb)
            .args(["status", "--json", "--socket"])
            .arg(self.api_socket(i))
            .stdin(Stdio::null())
            .output()
            .context("running lb status")?;
        ensure!(
            out.status.success(),
            "lb status (balancer {i}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Waits until balancers `live` run one revision (the same digest), each with `active`
    /// nodes and announcing every VIP address; returns (revision, digest).
    pub fn wait_converged(
        &self,
        lb: &Path,
        live: &[usize],
        active: usize,
        timeout: Duration,
    ) -> Result<(i64, String)> {
        let mut last = String::new();
        let mut got = (0, String::new());
        wait_for("the balancers to run one revision", timeout, || {
            let st = live
                .iter()
                .map(|i| self.lb_status(lb, *i))
                .collect::<Result<Vec<_>>>()?;
            let first = &st[0]["cluster"];
            let ok = st.iter().all(|s| {
                s["cluster"]["revision"] == first["revision"]
                    && s["cluster"]["digest"] == first["digest"]
                    && s["nodes"]["active"] == active
                    && s["bgp_announced"].as_array().is_some_and(|a| !a.is_empty())
            }) && first["revision"].as_i64().unwrap_or(0) > 0;
            last = st
                .iter()
                .map(|s| format!("{} {} {}", s["cluster"], s["nodes"], s["bgp_announced"]))
                .collect::<Vec<_>>()
                .join("; ");
            if ok {
                got = (
                    first["revision"].as_i64().unwrap_or(0),
                    first["digest"].as_str().unwrap_or("").to_string(),
                );
            }
            Ok(ok)
        })
        .with_context(|| format!("last seen: {last}"))?;
        Ok(got)
    }
}

impl Drop for ClusterLab {
    fn drop(&mut self) {
        if self.keep {
            // Our `Child` handles go without killing or waiting for anything.
            return;
        }
        for (_, mut c) in std::mem::take(&mut self.children) {
            let _ = c.kill();
            let _ = c.wait();
        }
        remove_instances(&self.names);
        match lab::down(&self.names) {
            Ok(_) => {}
            Err(e) => eprintln!("cluster lab {}: removing it: {e:#}", self.names.name),
        }
    }
}

/// Per connection: the error if it broke, and its longest wait for an answer after the mark.
type Outcome = Vec<(Option<String>, Duration)>;

/// Long-lived TCP connections from the client to the lab's dsr-l2 VIPs' echo port (two in
/// three IPv4, one IPv6), each written to and read back in turn until stopped: a reset or an
/// answer missing for 3 s is a broken connection.
pub struct Load {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<anyhow::Result<Outcome>>,
    marked: Arc<AtomicBool>,
}

impl Load {
    pub fn start(lab: &ClusterLab, n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let marked = Arc::new(AtomicBool::new(false));
        let (stop2, marked2) = (stop.clone(), marked.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = crate::netns::spawn_in(&lab.client_ns(), move || {
            let mut conns = Vec::new();
            for k in 0..n {
                let vip: IpAddr = if k % 3 == 2 {
                    lab::DSR_VIP6.into()
                } else {
                    lab::DSR_VIP.into()
                };
                let s = TcpStream::connect_timeout(
                    &SocketAddr::new(vip, lab::ECHO_PORT),
                    Duration::from_secs(3),
                )?;
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                conns.push((s, None::<String>, Duration::ZERO));
            }
            let _ = tx.send(());
            let mut buf = [0u8; 5];
            while !stop2.load(Ordering::Relaxed) {
                let marked = marked2.load(Ordering::Relaxed);
                for (s, err, longest) in conns.iter_mut().filter(|c| c.1.is_none()) {
                    let t = Instant::now();
                    let r = s.write_all(b"ping\n").and_then(|()| s.read_exact(&mut buf));
                    match r {
                        Ok(()) if &buf == b"ping\n" => {
                            if marked {
                                *longest = (*longest).max(t.elapsed());
                            }
                        }
                        Ok(()) => *err = Some(format!("echo answered {buf:?}")),
                        Err(e) => *err = Some(e.to_string()),
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(conns.into_iter().map(|c| (c.1, c.2)).collect())
        });
        rx.recv_timeout(Duration::from_secs(30)).unwrap();
        Self {
            stop,
            handle,
            marked,
        }
    }

    /// From now on, each connection's longest wait for an answer is kept.
    pub fn mark(&self) {
        self.marked.store(true, Ordering::Relaxed);
    }

    /// Stops: the broken connections' errors, and the longest wait for an answer after the
    /// mark (how long the slowest connection stalled).
    pub fn stop(self) -> (Vec<String>, u128) {
        self.stop.store(true, Ordering::Relaxed);
        let r = self.handle.join().unwrap().unwrap();
        let stall = r.iter().map(|c| c.1).max().unwrap_or_default().as_millis();
        (r.into_iter().filter_map(|c| c.0).collect(), stall)
    }
}

/// The balancer daemons' pins and lock files (named after their instances, `<lab>-lbI`;
/// `lab::down` removes them too, after stopping the processes).
fn remove_instances(n: &Names) {
    for i in 1..=MAX_BALANCERS {
        let instance = n.balancer_instance(i);
        let _ = fs::remove_dir_all(format!("/sys/fs/bpf/{instance}"));
        let _ = fs::remove_file(format!("/run/lb/{instance}.lock"));
    }
}

/// `birdc show protocols`: each BGP protocol and its state (`Established`, `Active`...).
pub fn parse_bgp_sessions(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // name proto table state since info...
            (f.len() >= 6 && f[1] == "BGP").then(|| (f[0].to_string(), f[5].to_string()))
        })
        .collect()
}

/// `ip -j route show exact PREFIX`: the gateways of the route (one, or each of a multipath
/// route's next hops); none without a route.
pub fn parse_nexthops(json: &str) -> Result<BTreeSet<IpAddr>> {
    let routes: serde_json::Value = serde_json::from_str(json.trim()).context("not JSON")?;
    let mut out = BTreeSet::new();
    for r in routes.as_array().context("not a JSON list")? {
        let hops: Vec<&serde_json::Value> = match r.get("nexthops").and_then(|v| v.as_array()) {
            Some(h) => h.iter().collect(),
            None => vec![r],
        };
        for h in hops {
            let gw = h["gateway"]
                .as_str()
                .context("a next hop without a gateway")?;
            out.insert(gw.parse().with_context(|| format!("gateway {gw:?}"))?);
        }
    }
    Ok(out)
}

/// The value of `field` in `/proc/net/snmp`'s pair of lines starting with `prefix`.
fn snmp_field(text: &str, prefix: &str, field: &str) -> Result<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let (names, values) = (lines.next(), lines.next());
    let (names, values) = names
        .zip(values)
        .with_context(|| format!("no {prefix} lines"))?;
    let i = names
        .split_whitespace()
        .position(|n| n == field)
        .with_context(|| format!("no {field} in {prefix}"))?;
    values
        .split_whitespace()
        .nth(i)
        .context("short values line")?
        .parse()
        .with_context(|| format!("{prefix} {field}"))
}

/// The value of `field` in `/proc/net/snmp6`.
fn snmp6_field(text: &str, field: &str) -> Result<u64> {
    text.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(field)).then(|| f.next()).flatten()
        })
        .with_context(|| format!("no {field}"))?
        .parse()
        .with_context(|| field.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_routes_sessions_and_counters() {
        let multi = r#"[{"dst":"198.18.100.1","protocol":"bird","metric":32,"flags":[],"nexthops":[{"gateway":"198.18.0.21","dev":"eth0","weight":1,"flags":[]},{"gateway":"198.18.0.22","dev":"eth0","weight":1,"flags":[]}]}]"#;
        let v: Vec<IpAddr> = parse_nexthops(multi).unwrap().into_iter().collect();
        assert_eq!(
            v,
            [
                "198.18.0.21".parse::<IpAddr>().unwrap(),
                "198.18.0.22".parse().unwrap()
            ]
        );
        let one = r#"[{"dst":"2001:db8:100::1","gateway":"2001:db8::21","dev":"eth0","protocol":"bird","metric":32,"flags":[],"pref":"medium"}]"#;
        assert_eq!(parse_nexthops(one).unwrap().len(), 1);
        assert!(parse_nexthops("[]").unwrap().is_empty());
        assert!(parse_nexthops("[{\"dst\":\"x\"}]").is_err());
        let protos = "BIRD 2.0.12 ready.\nName       Proto      Table      State  Since         Info\n\
                      device1    Device     ---        up     08:09:53.871\n\
                      lb1_4      BGP        ---        up     08:09:54.000  Established\n\
                      lb1_6      BGP        ---        start  08:09:54.000  Active        Socket: Connection refused\n";
        let s = parse_bgp_sessions(protos);
        assert_eq!(s.len(), 2);
        assert_eq!(s["lb1_4"], "Established");
        assert_eq!(s["lb1_6"], "Active");
        let snmp = "Ip: Forwarding DefaultTTL InReceives ForwDatagrams\nIp: 1 64 10 7\nIcmp: InMsgs\nIcmp: 0\n";
        assert_eq!(snmp_field(snmp, "Ip:", "ForwDatagrams").unwrap(), 7);
        assert_eq!(
            snmp6_field(
                "Ip6InReceives  3\nIp6OutForwDatagrams    12\n",
                "Ip6OutForwDatagrams"
            )
            .unwrap(),
            12
        );
        // Addresses never collide.
        let mut all: BTreeSet<IpAddr> = BTreeSet::new();
        for i in 1..=MAX_BALANCERS {
            assert!(all.insert(balancer_ip(i).into()) && all.insert(balancer_ip6(i).into()));
        }
        for j in 1..=MAX_NODES {
            assert!(all.insert(node_ip(j).into()) && all.insert(node_ip6(j).into()));
        }
        for a in [
            ROUTER_IP.into(),
            ROUTER_IP6.into(),
            BRIDGE_IP.into(),
            IpAddr::V6(v6_host(250)),
        ] {
            assert!(all.insert(a), "{a}");
        }
        assert_eq!(balancer_ip6(1), "2001:db8::21".parse::<Ipv6Addr>().unwrap());
    }
}
