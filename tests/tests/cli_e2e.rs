//! The `lb` CLI, the metrics endpoint, the status page and the daemon's warnings against a real
//! daemon in a namespace lab, at the README's size (a VIP of 65536 routes), with real TCP
//! through the balancer:
//! - every operator command with `--json`, its values checked against the kernel's tables;
//! - every kind of error: one `lb: error: ...` line naming the problem, and nothing changed;
//! - `/metrics` parsed strictly as OpenMetrics text, its counters following real traffic;
//! - the status page as headless Chromium renders it, before and after a drain;
//! - an agent with the wrong key: one rate-limited warning naming the node.
#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::FromRawFd as _,
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use lb_common::{FlowKey, NODE_ACTIVE, VipKey};
use lb_tests::{
    cli::{
        self, Element, Exposition, PublicLb, chromium_dump_dom, elements, http_get_ok,
        one_error_line, parse_openmetrics, row_cells,
    },
    daemon::{DaemonSetup, HB_PORT, LogLines, lb_binary, log_seconds},
    echo::{EchoServers, Held},
    netns::{ChildGuard, Lab},
};
use lb_userspace::{
    config::Config,
    dataplane::{HashMode, PinnedView, ip_bytes, vip_key},
};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const PORT: u16 = 7000;
const VIP_NAME: &str = "198.18.100.1:7000/tcp";
const ROUTES: u32 = 65536;
const METRICS: &str = "127.0.0.1:9100";
const WAIT: Duration = Duration::from_secs(10);

/// A lab with a daemon over all its nodes (one dsr-l2 TCP VIP of 65536 routes) and agents for
/// `agents`, waited for until exactly those nodes own routes.
struct Bed {
    // Dropped in this order: agents, daemon, files, namespaces.
    _agents: Vec<ChildGuard>,
    _daemon: ChildGuard,
    log: Option<LogLines>,
    setup: DaemonSetup,
    key: VipKey,
    lab: Lab,
}

impl Bed {
    fn new(nodes: usize, agents: &[u32], extra_daemon: &str, captured: bool) -> Self {
        let lab = Lab::new(nodes).unwrap();
        lab.add_dsr_vip(VIP).unwrap();
        let setup = DaemonSetup::dsr(&lab, VIP, PORT, "tcp", ROUTES, extra_daemon).unwrap();
        // Room for a second VIP added at runtime (`dsr` sizes the map for this one VIP).
        let text = std::fs::read_to_string(&setup.config).unwrap();
        let slots = format!("route_slots = {}\n", 2 * ROUTES);
        assert!(text.contains(&slots), "no {slots:?} in {text}");
        let text = text.replace(&slots, &format!("route_slots = {}\n", 4 * ROUTES));
        std::fs::write(&setup.config, text).unwrap();
        let (daemon, log) = if captured {
            let (d, l) = setup.start_captured(&lab, &[]).unwrap();
            (d, Some(l))
        } else {
            (setup.start(&lab, &[]).unwrap(), None)
        };
        let agents: Vec<ChildGuard> = agents
            .iter()
            .map(|id| setup.agent(&lab, *id, "100ms").unwrap())
            .collect();
        let key = vip_key(VIP.into(), PORT, lb_common::PROTO_TCP);
        Self {
            _agents: agents,
            _daemon: daemon,
            log,
            setup,
            key,
            lab,
        }
    }

    /// Waits until the nodes `ids` (and only they) own routes.
    fn wait_owners(&self, ids: &[u32]) {
        let want = ids.to_vec();
        self.setup
            .wait_routes(&self.key, WAIT, move |r| {
                let c = counts(r);
                c.keys().copied().collect::<Vec<_>>() == want
            })
            .unwrap_or_else(|e| {
                let now = self.setup.routes(&self.key).map(|r| counts(&r));
                panic!("nodes {ids:?} never were the owners: {e}; routes per node: {now:?}")
            });
    }

    fn kernel(&self) -> BTreeMap<u32, usize> {
        counts(&self.setup.routes(&self.key).unwrap())
    }

    fn owners(&self) -> Vec<u32> {
        self.setup
            .routes(&self.key)
            .unwrap()
            .iter()
            .map(|e| e.node)
            .collect()
    }

    fn node(&self, id: u32) -> Value {
        self.setup.node_json(id).unwrap()
    }

    fn metrics_addr(&self) -> SocketAddr {
        METRICS.parse().unwrap()
    }

    /// `/metrics`, checked: 200, the OpenMetrics content type, strictly parsed.
    fn scrape(&self) -> Exposition {
        let r = http_get_ok(&self.lab.lb.ns, self.metrics_addr(), "/metrics", WAIT).unwrap();
        assert_eq!(
            r.header("content-type"),
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            "content type of /metrics"
        );
        parse_openmetrics(&r.body)
            .unwrap_or_else(|e| panic!("/metrics is not strict OpenMetrics text: {e:#}"))
    }
}

/// Routes per owning node (unowned routes under `NODE_NONE`).
fn counts(r: &[lb_common::RouteEntry]) -> BTreeMap<u32, usize> {
    let mut c = BTreeMap::new();
    for e in r {
        *c.entry(e.node).or_default() += 1;
    }
    c
}

/// `n` short TCP connections from the client namespace through the VIP to the echo servers
/// (one request each, then closed); returns the nodes that answered.
fn connections(lab: &Lab, n: usize) -> Vec<u32> {
    lab.client
        .ns
        .spawn(move || {
            (0..n)
                .map(|_| Held::connect(VIP, PORT)?.ask())
                .collect::<anyhow::Result<Vec<u32>>>()
        })
        .join()
        .unwrap()
        .unwrap()
}

/// Packets each of [`connections`]' connections surely sends through the balancer: SYN, the
/// handshake's ACK, the request and the FIN.
const PACKETS_PER_CONNECTION: u64 = 4;

/// A connection from `src_port` of the client to the VIP; returns the node that answered.
fn connection_from_port(lab: &Lab, src_port: u16) -> u32 {
    lab.client
        .ns
        .spawn(move || {
            // SAFETY: plain socket calls on a descriptor this closure owns; the sockaddr is a
            // zeroed sockaddr_in filled in below.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let stream = unsafe { TcpStream::from_raw_fd(fd) };
            let one: libc::c_int = 1;
            let sa = |ip: Ipv4Addr, port: u16| {
                let mut a: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                a.sin_family = libc::AF_INET as libc::sa_family_t;
                a.sin_port = port.to_be();
                a.sin_addr.s_addr = u32::from(ip).to_be();
                a
            };
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_REUSEADDR,
                    (&raw const one).cast(),
                    std::mem::size_of_val(&one) as libc::socklen_t,
                );
                // A blocking connect gives up after SO_SNDTIMEO.
                let timeout = libc::timeval {
                    tv_sec: 5,
                    tv_usec: 0,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_SNDTIMEO,
                    (&raw const timeout).cast(),
                    std::mem::size_of_val(&timeout) as libc::socklen_t,
                );
                let local = sa(Ipv4Addr::UNSPECIFIED, src_port);
                anyhow::ensure!(
                    libc::bind(fd, (&raw const local).cast(), len) == 0,
                    "bind :{src_port}: {}",
                    std::io::Error::last_os_error()
                );
                let remote = sa(VIP, PORT);
                anyhow::ensure!(
                    libc::connect(fd, (&raw const remote).cast(), len) == 0,
                    "connect from :{src_port}: {}",
                    std::io::Error::last_os_error()
                );
            }
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut w = stream.try_clone()?;
            writeln!(w, "which")?;
            let mut line = String::new();
            BufReader::new(stream).read_line(&mut line)?;
            Ok(line.trim().parse::<u32>()?)
        })
        .join()
        .unwrap()
        .unwrap()
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn applied(d: &Value) -> (Vec<String>, bool) {
    let changes = d["changes"]
        .as_array()
        .unwrap_or_else(|| panic!("not a diff: {d}"))
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    (changes, d["applied"].as_bool().unwrap())
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

// ---------------------------------------------------------------------------------------------

#[test]
fn every_command_works_and_json_parses() {
    let bed = Bed::new(2, &[1, 2], "", false);
    let (lab, setup) = (&bed.lab, &bed.setup);
    bed.wait_owners(&[1, 2]);
    // Findings that do not stop the rest from being checked, reported at the end.
    let mut problems: Vec<String> = Vec::new();
    let _servers =
        EchoServers::start(&[(&lab.nodes[0].ns, 1), (&lab.nodes[1].ns, 2)], PORT).unwrap();

    // status
    let s = setup.cli_json(&["status"]).unwrap();
    assert_eq!(s["iface"], "eth0", "{s}");
    assert_eq!(s["xdp_mode"], "generic", "{s}");
    assert!(s["program_id"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["nodes"]["active"], 2, "{s}");
    assert_eq!(s["nodes"]["down"], 0, "{s}");
    assert_eq!(s["vips"], 1, "{s}");
    assert_eq!(s["instance"], setup.instance.as_str(), "{s}");
    assert!(s["heartbeats"]["accepted"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["fail_static"], false, "{s}");
    let human = setup.cli_ok(&["status"]).unwrap();
    eprintln!("$ lb {}\n{human}", ["status"].join(" "));
    for want in ["eth0", "generic", "2 active", &setup.instance] {
        assert!(human.contains(want), "lb status lacks {want:?}:\n{human}");
    }

    // vip list
    let v = setup.cli_json(&["vip", "list"]).unwrap();
    let v = v.as_array().unwrap();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0]["name"], VIP_NAME);
    assert_eq!(v[0]["routes"], ROUTES);
    assert_eq!(v[0]["unowned"], 0);
    assert_eq!(v[0]["mode"], "dsr-l2");
    assert_eq!(v[0]["hash"], "five-tuple");
    assert_eq!(v[0]["proto"], "tcp");
    assert_eq!(v[0]["port"], PORT);

    // vip add / remove: an all-ports UDP VIP of 1024 routes, in the kernel then gone.
    let udp = "198.18.100.2:0/udp";
    let udp_key = vip_key(
        Ipv4Addr::new(198, 18, 100, 2).into(),
        0,
        lb_common::PROTO_UDP,
    );
    let d = setup
        .cli_json(&["vip", "add", udp, "--routes", "1024"])
        .unwrap();
    let (changes, ok) = applied(&d);
    assert!(ok, "{d}");
    assert_eq!(changes, [format!("+ vip {udp}")], "{d}");
    assert!(d["route_writes"].as_u64().unwrap() >= 1024, "{d}");
    let v = setup.cli_json(&["vip", "list"]).unwrap();
    let added = v
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == udp)
        .unwrap_or_else(|| panic!("{udp} not listed: {v}"));
    assert_eq!(added["routes"], 1024);
    assert_eq!(added["port"], 0);
    assert_eq!(added["proto"], "udp");
    let r = setup.routes(&udp_key).unwrap();
    assert_eq!(r.len(), 1024);
    assert_eq!(
        counts(&r).keys().copied().collect::<Vec<_>>(),
        [1, 2],
        "the new VIP's table is over both live nodes"
    );
    let d = setup.cli_json(&["vip", "remove", udp]).unwrap();
    assert_eq!(applied(&d), (vec![format!("- vip {udp}")], true), "{d}");
    assert!(
        !setup.routes(&udp_key).is_ok_and(|r| !r.is_empty()),
        "the removed VIP is still in the kernel"
    );
    assert_eq!(
        setup
            .cli_json(&["vip", "list"])
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // node list
    let nodes = setup.cli_json(&["node", "list"]).unwrap();
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    let share: f64 = nodes.iter().map(|n| f(&n["route_share"])).sum();
    assert!((share - 1.0).abs() < 1e-9, "route shares sum to {share}");
    for n in nodes {
        assert_eq!(n["state"], "active", "{n}");
        assert_eq!(n["check"], "heartbeat", "{n}");
        assert!((f(&n["weighted_share"]) - 0.5).abs() < 1e-9, "{n}");
        assert_eq!(n["routes"], 32768, "{n}");
        assert_eq!(n["admin_drain"], false, "{n}");
        assert!(n["admin_weight"].is_null(), "{n}");
        assert!(f(&n["last_heartbeat_age"]) < 1.0, "{n}");
    }
    assert_eq!(nodes[0]["mac"], "02:00:00:00:00:0b");
    assert_eq!(nodes[1]["ipv4"], "198.18.0.12");
    let human = setup.cli_ok(&["node", "list"]).unwrap();
    eprintln!("$ lb {}\n{human}", ["node", "list"].join(" "));
    let ids: Vec<&str> = human
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        human.starts_with("ID") && ids.contains(&"1") && ids.contains(&"2"),
        "lb node list:\n{human}"
    );

    // node add: listed down, nowhere in the kernel.
    let d = setup
        .cli_json(&[
            "node",
            "add",
            "9",
            "--mac",
            "02:00:00:00:00:09",
            "--weight",
            "2",
        ])
        .unwrap();
    assert_eq!(applied(&d), (vec!["+ node 9".to_string()], true), "{d}");
    let n9 = bed.node(9);
    assert_eq!(n9["state"], "down", "{n9}");
    assert_eq!(n9["weight"], 2, "{n9}");
    assert_eq!(n9["config_weight"], 2, "{n9}");
    assert_eq!(n9["mac"], "02:00:00:00:00:09", "{n9}");
    assert_eq!(n9["routes"], 0, "{n9}");
    assert!(!bed.kernel().contains_key(&9), "{:?}", bed.kernel());
    let view = PinnedView::open(setup.pin_dir()).unwrap();
    assert_ne!(view.node(9).unwrap().state, NODE_ACTIVE);

    // node weight: 3 to 1 is exactly 3/4 of 65536 routes; --clear gives the halves back.
    let d = setup.cli_json(&["node", "weight", "1", "3"]).unwrap();
    let (changes, ok) = applied(&d);
    assert!(ok && changes == ["~ node 1: admin_weight - -> 3"], "{d}");
    let k = bed.kernel();
    assert_eq!((k[&1], k[&2]), (49152, 16384), "kernel after weight 3");
    let n1 = bed.node(1);
    assert_eq!(
        (n1["weight"].clone(), n1["admin_weight"].clone()),
        (3.into(), 3.into())
    );
    assert!((f(&n1["weighted_share"]) - 0.75).abs() < 1e-9, "{n1}");
    assert!((f(&n1["route_share"]) - 0.75).abs() < 1e-9, "{n1}");
    let d = setup.cli_json(&["node", "weight", "1", "--clear"]).unwrap();
    assert!(applied(&d).1, "{d}");
    let k = bed.kernel();
    assert_eq!((k[&1], k[&2]), (32768, 32768), "kernel after --clear");
    assert!(bed.node(1)["admin_weight"].is_null());

    // node drain / undrain.
    let d = setup.cli_json(&["node", "drain", "2"]).unwrap();
    assert!(applied(&d).1, "{d}");
    let n2 = bed.node(2);
    assert_eq!(n2["state"], "draining", "{n2}");
    assert_eq!(n2["admin_drain"], true, "{n2}");
    assert_eq!(n2["routes"], 0, "{n2}");
    assert_eq!(
        bed.kernel(),
        BTreeMap::from([(1, 65536)]),
        "kernel while 2 is drained"
    );
    assert_eq!(setup.cli_json(&["status"]).unwrap()["nodes"]["draining"], 1);
    let d = setup.cli_json(&["node", "undrain", "2"]).unwrap();
    assert!(applied(&d).1, "{d}");
    let n2 = bed.node(2);
    assert_eq!(n2["state"], "active", "{n2}");
    assert_eq!(n2["admin_drain"], false, "{n2}");
    assert_eq!(bed.kernel(), BTreeMap::from([(1, 32768), (2, 32768)]));

    // node remove.
    let d = setup.cli_json(&["node", "remove", "9"]).unwrap();
    assert_eq!(applied(&d), (vec!["- node 9".to_string()], true), "{d}");
    let ids: Vec<u64> = setup
        .cli_json(&["node", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2]);

    // routes: the kernel's table exactly, every route ID once.
    let r = setup.cli_json(&["routes", VIP_NAME]).unwrap();
    assert_eq!(r["vip"], VIP_NAME);
    assert_eq!(r["routes"], ROUTES);
    let kernel = bed.owners();
    let mut all: Vec<(u64, u64, u32)> = Vec::new();
    for o in r["nodes"].as_array().unwrap() {
        let node = o["node"].as_u64().unwrap() as u32;
        let mut total = 0;
        for range in o["ranges"].as_array().unwrap() {
            let (a, b) = (range[0].as_u64().unwrap(), range[1].as_u64().unwrap());
            assert!(a <= b, "{range}");
            for route in a..=b {
                assert_eq!(
                    kernel[route as usize], node,
                    "route {route} in node {node}'s ranges"
                );
            }
            total += b - a + 1;
            all.push((a, b, node));
        }
        assert_eq!(o["count"].as_u64().unwrap(), total, "{o}");
        assert_eq!(
            total as usize,
            kernel.iter().filter(|n| **n == node).count(),
            "node {node}'s count against the kernel"
        );
        assert!(
            (f(&o["share"]) - total as f64 / 65536.0).abs() < 1e-9,
            "{o}"
        );
    }
    for range in r["unowned"].as_array().unwrap() {
        all.push((
            range[0].as_u64().unwrap(),
            range[1].as_u64().unwrap(),
            u32::MAX,
        ));
    }
    all.sort_unstable();
    let mut next = 0;
    for (a, b, _) in &all {
        assert_eq!(
            *a, next,
            "route ranges overlap or leave a gap at {next}: {all:?}"
        );
        next = b + 1;
    }
    assert_eq!(next, 65536, "route ranges end at {next}");
    assert!(r["moved"].as_array().is_some());
    let human = setup.cli_ok(&["routes", VIP_NAME]).unwrap();
    eprintln!("$ lb {}\n{human}", ["routes", VIP_NAME].join(" "));
    assert!(
        human.starts_with(&format!("{VIP_NAME}: 65536 routes")),
        "{human}"
    );

    // stats: real TCP through the VIP shows on the VIP and the nodes.
    let before = setup.cli_json(&["stats"]).unwrap();
    let landed = connections(lab, 20);
    assert!(landed.iter().all(|n| [1, 2].contains(n)), "{landed:?}");
    let sent = 20 * PACKETS_PER_CONNECTION;
    let traffic = |s: &Value, what: &str, name: &str| -> u64 {
        s[what]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .map_or(0, |t| t["packets"].as_u64().unwrap())
    };
    let after = wait_for("stats to count the connections", WAIT, || {
        let s = setup.cli_json(&["stats"]).unwrap();
        (traffic(&s, "vips", VIP_NAME) >= traffic(&before, "vips", VIP_NAME) + sent).then_some(s)
    });
    assert!(traffic(&after, "vips", VIP_NAME) > 0);
    let node_packets = |s: &Value| traffic(s, "nodes", "1") + traffic(s, "nodes", "2");
    assert!(
        node_packets(&after) >= node_packets(&before) + sent,
        "node packets {} -> {}",
        node_packets(&before),
        node_packets(&after)
    );
    for id in landed.iter().map(|n| n.to_string()) {
        assert!(
            traffic(&after, "nodes", &id) > 0,
            "node {id} answered but counts no packet"
        );
    }
    assert!(after["events"]["tx"].as_u64().unwrap() >= sent, "{after}");
    assert!(after["drops"].is_object() && after["at"].as_f64().unwrap() > 0.0);
    let human = setup.cli_ok(&["stats"]).unwrap();
    eprintln!("$ lb {}\n{human}", ["stats"].join(" "));
    assert!(human.contains(VIP_NAME), "{human}");

    // trace: the route this flow hashes to, its owner as the kernel has it, and a real
    // connection from that source port lands there.
    let (src_ip, sport) = (lab.client.ip, 40123u16);
    let src = format!("{src_ip}:{sport}");
    let dst = format!("{VIP}:{PORT}");
    let t = setup.cli_json(&["trace", &src, &dst, "tcp"]).unwrap();
    let flow = FlowKey {
        src: ip_bytes(src_ip.into()).0,
        dst: ip_bytes(VIP.into()).0,
        sport: sport.to_be(),
        dport: PORT.to_be(),
        proto: lb_common::PROTO_TCP,
        family: ip_bytes(VIP.into()).1,
        ..Default::default()
    };
    let seed = setup.hash_seed(&bed.key).unwrap();
    let route = lb_userspace::daemon::flow_route(seed, HashMode::FiveTuple, ROUTES, &flow);
    assert_eq!(t["vip"], VIP_NAME, "{t}");
    assert_eq!(t["route"].as_u64().unwrap(), u64::from(route), "{t}");
    assert!(route < ROUTES);
    let owner = bed.owners()[route as usize];
    assert_eq!(t["owner"].as_u64(), Some(u64::from(owner)), "{t}");
    assert_eq!(t["node"].as_u64(), Some(u64::from(owner)), "{t}");
    assert_eq!(t["moved"], false, "{t}");
    assert!(
        t["why"]
            .as_str()
            .unwrap()
            .contains(&format!("node {owner}")),
        "{t}"
    );
    assert_eq!(
        connection_from_port(lab, sport),
        owner,
        "a connection from {src} did not land where lb trace said"
    );
    let human = setup.cli_ok(&["trace", &src, &dst, "tcp"]).unwrap();
    eprintln!("$ lb {}\n{human}", ["trace", &src, &dst, "tcp"].join(" "));
    assert!(human.contains(&route.to_string()), "{human}");

    // apply: a file adding node 7, dry first (nothing changes), then for real.
    let config_before = setup.cli_json(&["config"]).unwrap();
    let file = setup.dir.0.join("plus7.toml");
    let text = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &file,
        format!("{text}\n[[node]]\nid = 7\nmac = \"02:00:00:00:00:07\"\n"),
    )
    .unwrap();
    let file_s = file.to_str().unwrap();
    let d = setup
        .cli_json(&["apply", "-f", file_s, "--dry-run"])
        .unwrap();
    assert_eq!(applied(&d), (vec!["+ node 7".to_string()], false), "{d}");
    assert_eq!(setup.cli_json(&["config"]).unwrap(), config_before);
    assert!(
        !setup
            .cli_json(&["node", "list"])
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == 7),
        "a dry run added node 7"
    );
    let human = setup.cli_ok(&["apply", "-f", file_s, "--dry-run"]).unwrap();
    eprintln!(
        "$ lb {}\n{human}",
        ["apply", "-f", file_s, "--dry-run"].join(" ")
    );
    assert!(
        human.contains("+ node 7") && human.contains("dry run"),
        "{human}"
    );
    let d = setup.cli_json(&["apply", "-f", file_s]).unwrap();
    assert_eq!(applied(&d), (vec!["+ node 7".to_string()], true), "{d}");
    assert_eq!(bed.node(7)["state"], "down");
    let d = setup.cli_json(&["apply", "-f", file_s]).unwrap();
    assert_eq!(
        applied(&d),
        (vec![], false),
        "the same file again changes nothing: {d}"
    );

    // check: no daemon involved (a bogus socket, given or from the environment, is fine).
    let out = cli::lb(&["check", "-f", file_s, "--json"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(c["ok"], true, "{c}");
    assert_eq!(c["file"], file_s, "{c}");
    assert_eq!(
        (c["vips"].clone(), c["nodes"].clone()),
        (1.into(), 3.into()),
        "{c}"
    );
    let out = cli::lb(&[
        "check",
        "-f",
        file_s,
        "--json",
        "--socket",
        "/nonexistent.sock",
    ])
    .unwrap();
    if !out.status.success() {
        problems.push(format!(
            "lb check -f FILE --socket /nonexistent.sock: refused, unlike every other operator \
             command: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or_default()
        ));
    }
    let out = std::process::Command::new(lb_binary().unwrap())
        .args(["check", "-f", file_s])
        .env("LB_SOCKET", "/nonexistent.sock")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout(&out).contains("ok (1 VIP, 3 nodes)"),
        "{}",
        stdout(&out)
    );

    // config: TOML that reads back as a Config, holding what the API says.
    let text = setup.cli_ok(&["config"]).unwrap();
    let cfg = Config::parse(&text, "lb config").unwrap();
    assert_eq!(
        cfg.nodes.iter().map(|n| n.id).collect::<Vec<_>>(),
        [1, 2, 7]
    );
    assert_eq!(cfg.vips.len(), 1);
    assert_eq!(cfg.vips[0].routes, ROUTES);
    assert_eq!(cfg.daemon.instance, setup.instance);
    let j = setup.cli_json(&["config"]).unwrap();
    assert_eq!(j["node"].as_array().unwrap().len(), 3, "{j}");
    assert_eq!(j["daemon"]["instance"], setup.instance.as_str(), "{j}");

    // completions.
    let out = cli::lb(&["completions", "bash"]).unwrap();
    assert!(out.status.success());
    let script = stdout(&out);
    assert!(
        script.len() > 1000 && script.contains("drain") && script.contains("_lb"),
        "completions bash: {} bytes",
        script.len()
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------------

/// What must not change when a command fails.
#[derive(Debug, PartialEq)]
struct Snapshot {
    config: Value,
    vips: Vec<Value>,
    nodes: Vec<(Value, Value, Value, Value)>,
    owners: Vec<u32>,
}

impl Snapshot {
    /// What differs from `after`, briefly (route tables as counts per node).
    fn changes(&self, after: &Snapshot) -> String {
        let mut out = Vec::new();
        if self.config != after.config {
            out.push(format!("config {} -> {}", self.config, after.config));
        }
        if self.vips != after.vips {
            out.push(format!("VIPs {:?} -> {:?}", self.vips, after.vips));
        }
        if self.nodes != after.nodes {
            out.push(format!("nodes {:?} -> {:?}", self.nodes, after.nodes));
        }
        if self.owners != after.owners {
            let moved = self
                .owners
                .iter()
                .zip(&after.owners)
                .filter(|(a, b)| a != b)
                .count();
            out.push(format!(
                "{moved} routes moved: {:?} -> {:?}",
                owner_counts(&self.owners),
                owner_counts(&after.owners)
            ));
        }
        out.join("; ")
    }
}

fn owner_counts(owners: &[u32]) -> BTreeMap<u32, usize> {
    let mut c = BTreeMap::new();
    for o in owners {
        *c.entry(*o).or_default() += 1;
    }
    c
}

fn snapshot(bed: &Bed) -> Snapshot {
    let nodes = bed
        .setup
        .cli_json(&["node", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["id"].clone(),
                n["state"].clone(),
                n["weight"].clone(),
                n["admin_drain"].clone(),
            )
        })
        .collect();
    let vips = bed
        .setup
        .cli_json(&["vip", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let mut v = v.clone();
            let o = v.as_object_mut().unwrap();
            o.remove("packets");
            o.remove("bytes");
            v
        })
        .collect();
    Snapshot {
        config: bed.setup.cli_json(&["config"]).unwrap(),
        vips,
        nodes,
        owners: bed.owners(),
    }
}

/// How the rest of an error's stderr may look.
#[derive(Clone, Copy, Debug)]
enum Rest {
    /// Only `hint: ...` lines.
    Hints,
    /// clap's usage lines.
    Usage,
    /// Anything (a TOML error's excerpt of the file).
    Any,
}

#[test]
fn errors_are_one_line_and_change_nothing() {
    // Only node 1 is up: it is the last live node.
    let bed = Bed::new(2, &[1], "", false);
    let setup = &bed.setup;
    bed.wait_owners(&[1]);
    let sock = setup.socket();
    let sock = sock.to_str().unwrap();
    let mut problems = Vec::new();

    // Nothing may change, so every command is compared with the state before the first one
    // (or before the last one that changed something, to tell each culprit apart).
    let mut baseline = snapshot(&bed);
    let mut expect = |what: &str, out: Output, needles: &[&str], rest: Rest| {
        let after = snapshot(&bed);
        if after != baseline {
            problems.push(format!(
                "{what}: changed something: {}",
                baseline.changes(&after)
            ));
            baseline = after;
        }
        let line = match one_error_line(what, &out) {
            Ok(l) => l,
            Err(e) => {
                problems.push(format!("{e:#}"));
                return;
            }
        };
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!("{what}: exit {:?}: {stderr}", out.status.code());
        for n in needles {
            if !line.contains(n) {
                problems.push(format!(
                    "{what}: the error line does not say {n:?}: {line:?} (stderr {stderr:?})"
                ));
            }
        }
        let rest_ok = match rest {
            Rest::Hints => stderr.lines().skip(1).all(|l| l.starts_with("hint: ")),
            Rest::Usage => stderr.lines().skip(1).all(|l| {
                l.starts_with("Usage:")
                    || l.starts_with("For more")
                    || l.starts_with("  ")
                    || l.starts_with("tip:")
                    || l.is_empty()
            }),
            Rest::Any => true,
        };
        if !rest_ok {
            problems.push(format!(
                "{what}: more than the error and its hint: {stderr:?}"
            ));
        }
        if !stdout(&out).is_empty() {
            problems.push(format!("{what}: printed to stdout: {:?}", stdout(&out)));
        }
    };
    let run = |args: &[&str]| setup.cli(args).unwrap();

    expect(
        "node drain 42",
        run(&["node", "drain", "42"]),
        &["node 42"],
        Rest::Hints,
    );
    expect(
        "routes of an unknown VIP",
        run(&["routes", "198.18.9.9:80/tcp"]),
        &["198.18.9.9:80/tcp"],
        Rest::Hints,
    );
    expect(
        "vip remove of an unknown VIP",
        run(&["vip", "remove", "198.18.9.9:80/tcp"]),
        &["198.18.9.9:80/tcp"],
        Rest::Hints,
    );
    expect(
        "node add of an existing node",
        run(&["node", "add", "1", "--mac", "02:00:00:00:00:01"]),
        &["node 1", "exists"],
        Rest::Hints,
    );
    expect(
        "vip add of an existing VIP",
        run(&["vip", "add", VIP_NAME]),
        &[VIP_NAME, "exists"],
        Rest::Hints,
    );
    expect(
        "node add with a bad IPv4 address",
        run(&[
            "node",
            "add",
            "5",
            "--mac",
            "02:00:00:00:00:05",
            "--ipv4",
            "300.1.1.1",
        ]),
        &["300.1.1.1", "--ipv4"],
        Rest::Usage,
    );
    expect(
        "node add with a bad MAC",
        run(&["node", "add", "5", "--mac", "02:00:00:00:zz"]),
        &["02:00:00:00:zz", "--mac"],
        Rest::Usage,
    );
    expect(
        "vip add with a bad port",
        run(&["vip", "add", "198.18.100.3:99999/tcp"]),
        &["198.18.100.3:99999/tcp"],
        Rest::Usage,
    );
    expect(
        "vip add with an unknown protocol",
        run(&["vip", "add", "198.18.100.3:80/icmp"]),
        &["icmp"],
        Rest::Usage,
    );
    expect(
        "node weight 0",
        run(&["node", "weight", "1", "0"]),
        &["weight", "\"0\"", "1 to 1000"],
        Rest::Usage,
    );
    expect(
        "node weight 1001",
        run(&["node", "weight", "1", "1001"]),
        &["weight", "1001", "1 to 1000"],
        Rest::Usage,
    );
    expect(
        "removing the last live node",
        run(&["node", "remove", "1"]),
        &["node 1", "last live node", VIP_NAME],
        Rest::Hints,
    );
    expect(
        "no daemon",
        cli::lb(&["status", "--socket", "/nonexistent.sock"]).unwrap(),
        &["no balancer is running", "/nonexistent.sock"],
        Rest::Hints,
    );
    let public = PublicLb::new().unwrap();
    expect(
        "not root",
        public.run_as(65534, &["status", "--socket", sock]).unwrap(),
        &["permission denied", sock],
        Rest::Hints,
    );
    expect(
        "not root, a change",
        public
            .run_as(65534, &["node", "drain", "1", "--socket", sock])
            .unwrap(),
        &["permission denied", sock],
        Rest::Hints,
    );

    // Configuration files: a syntax error, then a value out of range; the line names the file,
    // the place and what is wrong.
    let good = std::fs::read_to_string(&setup.config).unwrap();
    let syntax = format!("{good}\n[[node]]\nid = 5\nmac = \"02:00:00:00:00:05\n");
    let toml_err = toml::from_str::<toml::Value>(&syntax).unwrap_err();
    let bad_line = syntax[..toml_err.span().unwrap().start]
        .matches('\n')
        .count()
        + 1;
    let syntax_file = setup.dir.0.join("syntax.toml");
    std::fs::write(&syntax_file, &syntax).unwrap();
    let value_file = setup.dir.0.join("weight0.toml");
    std::fs::write(
        &value_file,
        format!("{good}\n[[node]]\nid = 5\nweight = 0\n"),
    )
    .unwrap();
    let (syntax_s, value_s) = (syntax_file.to_str().unwrap(), value_file.to_str().unwrap());
    let where_ = format!("line {bad_line}");
    let what = toml_err.message().to_string();
    for (cmd, out) in [
        ("apply", run(&["apply", "-f", syntax_s])),
        ("check", cli::lb(&["check", "-f", syntax_s]).unwrap()),
    ] {
        expect(
            &format!("{cmd} -f with a TOML syntax error"),
            out,
            &[syntax_s, &where_, &what],
            Rest::Any,
        );
    }
    for (cmd, out) in [
        ("apply", run(&["apply", "-f", value_s])),
        (
            "apply --dry-run",
            run(&["apply", "-f", value_s, "--dry-run"]),
        ),
        ("check", cli::lb(&["check", "-f", value_s]).unwrap()),
    ] {
        expect(
            &format!("{cmd} -f with weight = 0"),
            out,
            &[value_s, "node[2].weight", "0", "1..=1000"],
            Rest::Hints,
        );
    }
    expect(
        "apply -f of a missing file",
        run(&["apply", "-f", "/nonexistent/lb.toml"]),
        &["/nonexistent/lb.toml"],
        Rest::Hints,
    );

    // Command lines clap refuses.
    expect(
        "lb node weight (no arguments)",
        run(&["node", "weight"]),
        &["<ID>"],
        Rest::Usage,
    );
    expect(
        "lb node weight 1 (no weight)",
        run(&["node", "weight", "1"]),
        &["WEIGHT"],
        Rest::Usage,
    );
    expect(
        "lb node frobnicate",
        run(&["node", "frobnicate"]),
        &["frobnicate"],
        Rest::Usage,
    );

    // The API itself (what the CLI's own checks keep from it): status codes as docs/api.md
    // lists them, a JSON error body, nothing changed.
    for (method, path, body, status) in [
        ("PUT", "/v1/nodes/1/weight", Some(r#"{"weight": 0}"#), 400),
        (
            "PUT",
            "/v1/nodes/1/weight",
            Some(r#"{"weight": 1001}"#),
            400,
        ),
        ("PUT", "/v1/nodes/1/weight", Some(r#"{"weight": "x"}"#), 400),
        (
            "POST",
            "/v1/nodes",
            Some(r#"{"id": 5, "mac": "02:zz"}"#),
            400,
        ),
        ("POST", "/v1/nodes", Some(r#"{"id": 5, "weight": 0}"#), 400),
        ("POST", "/v1/nodes", Some("not json"), 400),
        (
            "POST",
            "/v1/vips",
            Some(r#"{"addr": "198.18.100.3", "port": 80, "proto": "icmp"}"#),
            400,
        ),
        (
            "POST",
            "/v1/nodes",
            Some(r#"{"id": 1, "mac": "02:00:00:00:00:01"}"#),
            409,
        ),
        (
            "POST",
            "/v1/vips",
            Some(r#"{"addr": "198.18.100.1", "port": 7000, "proto": "tcp"}"#),
            409,
        ),
        ("POST", "/v1/nodes/42/drain", None, 404),
        ("DELETE", "/v1/nodes/1", None, 409),
        ("GET", "/v1/vips/198.18.9.9%3A80%2Ftcp/routes", None, 404),
        ("GET", "/v1/nope", None, 404),
        (
            "GET",
            "/v1/trace?src=198.18.0.1&dst=198.18.100.1%3A7000&proto=icmp",
            None,
            400,
        ),
    ] {
        let before = snapshot(&bed);
        let r = cli::unix_request(&setup.socket(), method, path, body).unwrap();
        let what = format!("{method} {path} {body:?}");
        let err: Result<lb_userspace::api::ApiError, _> = serde_json::from_str(&r.body);
        match err {
            Ok(e) if r.status == status && !e.error.is_empty() && !e.error.contains('\n') => {}
            _ => problems.push(format!(
                "{what}: expected {status} with a one-line JSON error, got {} {:?}",
                r.status, r.body
            )),
        }
        let after = snapshot(&bed);
        if after != before {
            problems.push(format!(
                "{what}: changed something: {}",
                before.changes(&after)
            ));
        }
    }

    // With --force the last live node goes: every route is then unowned.
    let d = setup.cli_json(&["node", "remove", "1", "--force"]).unwrap();
    assert_eq!(applied(&d), (vec!["- node 1".to_string()], true), "{d}");
    let k = bed.kernel();
    assert!(!k.contains_key(&1), "node 1 still owns routes: {k:?}");
    assert_eq!(
        setup.cli_json(&["vip", "list"]).unwrap()[0]["unowned"],
        ROUTES
    );

    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------

#[test]
fn metrics_scrape_sees_traffic() {
    let bed = Bed::new(
        2,
        &[1, 2],
        &format!("metrics_listen = \"{METRICS}\""),
        false,
    );
    let lab = &bed.lab;
    bed.wait_owners(&[1, 2]);
    let _servers =
        EchoServers::start(&[(&lab.nodes[0].ns, 1), (&lab.nodes[1].ns, 2)], PORT).unwrap();

    let m0 = bed.scrape();
    let vip = [("vip", VIP_NAME), ("mode", "dsr-l2")];
    // The families the docs promise, with their types.
    for (family, kind) in [
        ("lb_vip_packets", "counter"),
        ("lb_vip_bytes", "counter"),
        ("lb_node_packets", "counter"),
        ("lb_node_bytes", "counter"),
        ("lb_node_state", "gauge"),
        ("lb_node_weight", "gauge"),
        ("lb_node_routes", "gauge"),
        ("lb_node_open_flows", "gauge"),
        ("lb_drops", "counter"),
        ("lb_events", "counter"),
        ("lb_heartbeats", "counter"),
        ("lb_route_moves", "counter"),
        ("lb_conntrack_capacity", "gauge"),
        ("lb_conntrack_entries", "gauge"),
        ("lb_conntrack_inserts", "counter"),
        ("lb_conntrack_evictions", "counter"),
    ] {
        let fam = m0
            .families
            .get(family)
            .unwrap_or_else(|| panic!("no family {family}"));
        assert_eq!(fam.kind, kind, "{family}");
        assert!(
            fam.help.as_deref().is_some_and(|h| !h.is_empty()),
            "{family} has no HELP"
        );
    }
    assert_eq!(m0.families["lb_vip_bytes"].unit.as_deref(), Some("bytes"));
    assert_eq!(m0.one("lb_vip_routes", &vip).unwrap(), 65536.0);
    assert_eq!(m0.one("lb_conntrack_capacity", &[]).unwrap(), 65536.0);
    assert_eq!(
        m0.one("lb_info", &[("xdp_mode", "generic"), ("iface", "eth0")])
            .unwrap(),
        1.0
    );
    for id in ["1", "2"] {
        for (state, v) in [("active", 1.0), ("draining", 0.0), ("down", 0.0)] {
            assert_eq!(
                m0.one("lb_node_state", &[("node", id), ("state", state)])
                    .unwrap(),
                v,
                "node {id} {state}"
            );
        }
        assert_eq!(m0.one("lb_node_routes", &[("node", id)]).unwrap(), 32768.0);
        assert_eq!(m0.one("lb_node_weight", &[("node", id)]).unwrap(), 1.0);
    }

    // Traffic: 30 connections, at least 4 packets each through the balancer.
    let n = 30;
    let landed = connections(lab, n);
    let sent = (n as u64 * PACKETS_PER_CONNECTION) as f64;
    let delta = |a: &Exposition, b: &Exposition, name: &str, labels: &[(&str, &str)]| {
        b.sum(name, labels) - a.sum(name, labels)
    };
    let m1 = wait_for("the metrics to count the connections", WAIT, || {
        let m = bed.scrape();
        (delta(&m0, &m, "lb_vip_packets_total", &vip) >= sent
            && delta(&m0, &m, "lb_heartbeats_total", &[("result", "accepted")]) > 0.0)
            .then_some(m)
    });
    eprintln!(
        "after {n} connections: vip +{}, nodes +{}, tx +{}, heartbeats +{}",
        delta(&m0, &m1, "lb_vip_packets_total", &vip),
        delta(&m0, &m1, "lb_node_packets_total", &[]),
        delta(&m0, &m1, "lb_events_total", &[("event", "tx")]),
        delta(&m0, &m1, "lb_heartbeats_total", &[("result", "accepted")]),
    );
    assert!(delta(&m0, &m1, "lb_vip_packets_total", &vip) >= sent);
    assert!(delta(&m0, &m1, "lb_vip_bytes_total", &vip) >= sent * 40.0);
    assert!(delta(&m0, &m1, "lb_node_packets_total", &[]) >= sent);
    for id in [1u32, 2] {
        if landed.contains(&id) {
            assert!(
                delta(
                    &m0,
                    &m1,
                    "lb_node_packets_total",
                    &[("node", &id.to_string())]
                ) > 0.0,
                "node {id} answered but its packets did not grow"
            );
        }
    }
    assert!(delta(&m0, &m1, "lb_events_total", &[("event", "tx")]) >= sent);
    assert!(delta(&m0, &m1, "lb_heartbeats_total", &[("result", "accepted")]) > 0.0);
    assert!(m1.one("lb_conntrack_inserts_total", &[]).is_ok());

    // Drain node 2: its routes move (reason drain) and its state flips.
    let owned = m1.one("lb_node_routes", &[("node", "2")]).unwrap();
    bed.setup.cli_ok(&["node", "drain", "2"]).unwrap();
    let m2 = bed.scrape();
    assert_eq!(
        delta(&m1, &m2, "lb_route_moves_total", &[("reason", "drain")]),
        owned,
        "route moves by drain: node 2's {owned} routes"
    );
    for (state, v) in [("active", 0.0), ("draining", 1.0), ("down", 0.0)] {
        assert_eq!(
            m2.one("lb_node_state", &[("node", "2"), ("state", state)])
                .unwrap(),
            v,
            "node 2 {state} after the drain"
        );
    }
    assert_eq!(
        m2.one("lb_node_state", &[("node", "1"), ("state", "active")])
            .unwrap(),
        1.0
    );
    assert_eq!(
        m2.one("lb_node_admin_drain", &[("node", "2")]).unwrap(),
        1.0
    );
    assert_eq!(m2.one("lb_node_routes", &[("node", "2")]).unwrap(), 0.0);
    assert_eq!(m2.one("lb_node_routes", &[("node", "1")]).unwrap(), 65536.0);
}

// ---------------------------------------------------------------------------------------------

/// The element with id `id`.
fn by_id<'a>(els: &'a [Element], id: &str) -> &'a Element {
    els.iter()
        .find(|e| e.attr("id") == Some(id))
        .unwrap_or_else(|| panic!("no element #{id}"))
}

/// The elements after `from` up to the next `section` (the VIP section's content).
fn section_of<'a>(els: &'a [Element], section: &Element) -> &'a [Element] {
    let i = els.iter().position(|e| e.start == section.start).unwrap();
    let end = els[i + 1..]
        .iter()
        .position(|e| e.tag == "section")
        .map_or(els.len(), |p| i + 1 + p);
    &els[i + 1..end]
}

#[test]
fn status_page_in_headless_chromium() {
    // Missing chromium fails here, with the command that installs it.
    cli::chromium_binary().unwrap();
    let bed = Bed::new(
        2,
        &[1, 2],
        &format!("metrics_listen = \"{METRICS}\""),
        false,
    );
    bed.wait_owners(&[1, 2]);
    // The server answers (an HTML page) before Chromium is started.
    let page = http_get_ok(&bed.lab.lb.ns, bed.metrics_addr(), "/", WAIT).unwrap();
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(page.body.starts_with("<!DOCTYPE html>"), "{}", page.body);
    assert!(!page.body.contains("<script"), "the page has a script");
    let url = format!("http://{METRICS}/");
    let load = || chromium_dump_dom(&bed.lab.lb.ns.name, &url, Duration::from_secs(60)).unwrap();

    let dom = load();
    let els = elements(&dom);
    assert!(
        dom.contains("<table id=\"nodes\">"),
        "no nodes table:\n{dom}"
    );
    for id in ["node-1", "node-2"] {
        let row = by_id(&els, id);
        assert_eq!(row.tag, "tr", "#{id}");
        assert!(row.has_class("node"), "#{id}");
        assert_eq!(row.attr("data-state"), Some("active"), "#{id}");
        let cells = row_cells(&dom, row);
        assert_eq!(
            cells.get(2).map(String::as_str),
            Some("active"),
            "#{id}: {cells:?}"
        );
    }
    let vip_row = els
        .iter()
        .find(|e| e.tag == "tr" && e.attr("data-vip") == Some(VIP_NAME))
        .expect("no VIP row");
    assert!(vip_row.has_class("vip"));
    let section = els
        .iter()
        .find(|e| e.tag == "section" && e.has_class("vip") && e.attr("data-vip") == Some(VIP_NAME))
        .expect("no VIP section");
    let inside = section_of(&els, section);
    let strip = inside
        .iter()
        .find(|e| e.tag == "div" && e.has_class("strip"))
        .expect("no div.strip in the VIP section");
    assert_eq!(strip.attr("data-routes"), Some("65536"));
    let cells: usize = strip.attr("data-cells").unwrap().parse().unwrap();
    assert!((1..=512).contains(&cells), "{cells} cells");
    for id in ["1", "2"] {
        assert!(
            inside.iter().any(|e| e.tag == "path"
                && e.has_class("owner")
                && e.attr("data-node") == Some(id)),
            "node {id} has no band in the strip"
        );
    }
    let legend = |dom: &str, inside: &[Element], id: &str| -> Vec<String> {
        let row = inside
            .iter()
            .find(|e| e.tag == "tr" && e.has_class("owner") && e.attr("data-node") == Some(id))
            .unwrap_or_else(|| panic!("no legend row for node {id}"));
        row_cells(dom, row)
    };
    let l2 = legend(&dom, inside, "2");
    assert_eq!(
        l2.get(3).map(String::as_str),
        Some("32768"),
        "legend of node 2: {l2:?}"
    );

    // Drain node 2 and load the page again.
    bed.setup.cli_ok(&["node", "drain", "2"]).unwrap();
    let dom = load();
    let els = elements(&dom);
    assert_eq!(by_id(&els, "node-2").attr("data-state"), Some("draining"));
    assert_eq!(by_id(&els, "node-1").attr("data-state"), Some("active"));
    let section = els
        .iter()
        .find(|e| e.tag == "section" && e.attr("data-vip") == Some(VIP_NAME))
        .expect("no VIP section after the drain");
    let inside = section_of(&els, section);
    assert!(
        inside
            .iter()
            .any(|e| e.tag == "div" && e.has_class("strip"))
    );
    let l2 = legend(&dom, inside, "2");
    assert_eq!(
        (l2.get(2).map(String::as_str), l2.get(3).map(String::as_str)),
        (Some("draining"), Some("0")),
        "legend of node 2 after the drain: {l2:?}"
    );
    let l1 = legend(&dom, inside, "1");
    assert_eq!(l1.get(3).map(String::as_str), Some("65536"), "{l1:?}");
    assert!(
        !inside
            .iter()
            .any(|e| e.tag == "path" && e.has_class("owner") && e.attr("data-node") == Some("2")),
        "the drained node still has a band in the strip"
    );
}

// ---------------------------------------------------------------------------------------------

#[test]
fn wrong_key_is_a_warning_naming_the_node() {
    let bed = Bed::new(2, &[1], "", true);
    let (lab, setup) = (&bed.lab, &bed.setup);
    let log = bed.log.clone().unwrap();
    bed.wait_owners(&[1]);
    // Node 2's agent has a key of its own.
    let wrong = setup.dir.0.join("wrong.key");
    std::fs::write(
        &wrong,
        "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100\n",
    )
    .unwrap();
    let from = log.len();
    let _agent2 = ChildGuard(Some(
        lab.nodes[1]
            .ns
            .command(&lb_binary().unwrap().to_string_lossy())
            .args(["agent", "--node-id", "2", "--balancer"])
            .arg(format!("{}:{HB_PORT}", lab.lb.ip))
            .arg("--key-file")
            .arg(&wrong)
            .args(["--interval", "100ms"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    ));
    let is_warning =
        |l: &String| l.contains("WARN") && l.contains("node 2") && l.contains("wrong key");
    let first = wait_for(
        "a warning naming node 2 and the wrong key",
        Duration::from_secs(5),
        || log.since(from).into_iter().find(is_warning),
    );
    let warned_at = Instant::now();
    eprintln!("warning: {first}");
    // Seconds from the first warning to `line`, by the daemon's own stamps (when it wrote each
    // line, however late this test got to read it).
    let after_first = |line: &str| {
        let at = |l: &str| log_seconds(l).unwrap_or_else(|| panic!("no time in {l:?}"));
        (at(line) - at(&first)).rem_euclid(86400.0)
    };
    let rejected = |s: &Value| {
        s["heartbeats"]["rejected"]["bad_hmac"]
            .as_u64()
            .unwrap_or(0)
    };
    let s = setup.cli_json(&["status"]).unwrap();
    let at_warning = rejected(&s);
    assert!(at_warning > 0, "{s}");

    // Five more seconds of heartbeats at 100 ms: all rejected, node 2 down all along, and no
    // second warning within 10 s of the first (at most one per node per 10 s; on a busy machine
    // this window may outlast the period, so a warning counts by when the daemon wrote it).
    let s = wait_for(
        "50 more rejected heartbeats",
        Duration::from_secs(15),
        || {
            assert_eq!(
                bed.node(2)["state"],
                "down",
                "node 2 came up with the wrong key"
            );
            let s = setup.cli_json(&["status"]).unwrap();
            (rejected(&s) >= at_warning + 45 && warned_at.elapsed() >= Duration::from_secs(5))
                .then_some(s)
        },
    );
    let warnings: Vec<String> = log.since(from).into_iter().filter(is_warning).collect();
    let early: Vec<&String> = warnings[1..]
        .iter()
        .filter(|w| after_first(w) < 9.5)
        .collect();
    assert!(
        early.is_empty(),
        "{} more warnings within 10 s of the first, for {} rejected heartbeats: {early:#?}",
        early.len(),
        rejected(&s)
    );
    assert_eq!(s["nodes"]["active"], 1, "{s}");
    assert_eq!(s["nodes"]["down"], 1, "{s}");
    assert_eq!(bed.node(2)["state"], "down");
    assert_eq!(bed.node(1)["state"], "active");
    assert!(!bed.kernel().contains_key(&2));
    // `lb status` says so too.
    let human = setup.cli_ok(&["status"]).unwrap();
    eprintln!("$ lb {}\n{human}", ["status"].join(" "));
    assert!(human.contains("bad_hmac"), "{human}");

    // Rate-limited, not said once and forgotten: the warning comes again one period on.
    let second = wait_for(
        "a second warning about node 2, one period later",
        Duration::from_secs(14),
        || {
            let w: Vec<String> = log.since(from).into_iter().filter(is_warning).collect();
            w.get(1).map(|l| after_first(l))
        },
    );
    eprintln!("second warning {second:.3} s after the first (daemon's stamps)");
    assert!(second >= 9.5, "a second warning after only {second:.3} s");
    assert_eq!(bed.node(2)["state"], "down");
}
