//! The real daemon and agents in network namespaces with real traffic: dsr-l2 forwarding,
//! failover timing, restart under traffic without loss, and refusal of bad state/config.
#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use lb_tests::{
    daemon::{
        DaemonSetup, Flood, HB_PORT, LogLines, UdpSender, UdpSink, assert_delivered, lb_binary,
        received, send_udp, udp_vip, wait_received,
    },
    netns::{Lab, Netns},
    scale::TcpServers,
};
use lb_userspace::heartbeat::{self, Heartbeat, Key, MoveReason, NodeState};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const PORT: u16 = 5000;
/// How long datagrams already sent may take to arrive before the missing ones count as lost
/// (they take well under a millisecond; this only bounds the wait on a busy machine).
const DELIVERY: Duration = Duration::from_secs(5);

/// Waits until a line of `log` from `from` on contains `what`; panics after `timeout`.
fn wait_log(log: &LogLines, from: usize, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !log.since(from).iter().any(|l| l.contains(what)) {
        assert!(
            Instant::now() < deadline,
            "no {what:?} in the log within {timeout:?}: {:#?}",
            log.since(from)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn dsr_forwarding_and_failover_with_agents() {
    let lab = Lab::new(2).unwrap();
    lab.add_dsr_vip(VIP).unwrap();
    let setup = DaemonSetup::dsr(&lab, VIP, PORT, "udp", 64, "").unwrap();
    let _daemon = setup.start(&lab, &[]).unwrap();
    let key = udp_vip(VIP, PORT);
    // Node 1 alone owns every route; its hook records route-moved notices.
    let hook_file = setup.dir.0.join("moved.log");
    let hook = format!(
        "echo \"$LB_REASON $LB_ROUTE_COUNT $LB_VIP\" >> {}",
        hook_file.display()
    );
    let mut agent1 = setup
        .agent_with(&lab, 1, "100ms", &["--on-route-moved", &hook])
        .unwrap();
    setup
        .wait_routes(&key, Duration::from_secs(10), |r| {
            r.iter().all(|e| e.node == 1)
        })
        .unwrap();
    // Node 2 joins: exactly its share moves, and node 1's agent is told which routes.
    let _agent2 = setup.agent(&lab, 2, "100ms").unwrap();
    setup
        .wait_routes(&key, Duration::from_secs(10), |r| {
            r.iter().any(|e| e.node == 1) && r.iter().any(|e| e.node == 2)
        })
        .unwrap();
    let routes = setup.routes(&key).unwrap();
    let n1 = routes.iter().filter(|e| e.node == 1).count();
    assert_eq!(n1, 32, "two equal nodes split 64 routes evenly");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = std::fs::read_to_string(&hook_file).unwrap_or_default();
        if !log.is_empty() || std::time::Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        log.trim(),
        format!("join 32 {VIP}:{PORT}/udp"),
        "hook output"
    );

    // Real traffic: 32 flows reach both nodes, every datagram arrives once.
    let sinks: Vec<UdpSink> = lab
        .nodes
        .iter()
        .map(|n| UdpSink::start(&n.ns, PORT).unwrap())
        .collect();
    let sent = send_udp(
        &lab.client.ns.name,
        VIP,
        PORT,
        32,
        10,
        Duration::from_millis(1),
    )
    .unwrap();
    // Every datagram sent has arrived (or the deadline passed: the assertion names the missing).
    wait_received(&sinks.iter().collect::<Vec<_>>(), sent.len(), DELIVERY);
    let got: Vec<Vec<(u32, u32)>> = sinks.into_iter().map(|s| s.finish().unwrap()).collect();
    assert!(
        !got[0].is_empty() && !got[1].is_empty(),
        "both nodes got traffic"
    );
    let all: Vec<(u32, u32)> = got.iter().flatten().copied().collect();
    assert_delivered(all, sent, "before failover");
    // A flow sticks to one node.
    for flow in 0..32 {
        let on: Vec<usize> = (0..2)
            .filter(|i| got[*i].iter().any(|(f, _)| *f == flow))
            .collect();
        assert_eq!(on.len(), 1, "flow {flow} seen on {on:?}");
    }

    // Kill node 1's agent: its routes move to node 2 within the failure-detection budget.
    agent1.signal_and_wait(libc::SIGKILL).unwrap();
    let took = setup
        .wait_routes(&key, Duration::from_secs(3), |r| {
            r.iter().all(|e| e.node == 2)
        })
        .unwrap();
    eprintln!("failover took {took:?}");
    assert!(took < Duration::from_millis(800), "failover took {took:?}");

    let sink2 = UdpSink::start(&lab.nodes[1].ns, PORT).unwrap();
    let sent = send_udp(
        &lab.client.ns.name,
        VIP,
        PORT,
        16,
        5,
        Duration::from_millis(1),
    )
    .unwrap();
    wait_received(&[&sink2], sent.len(), DELIVERY);
    assert_delivered(sink2.finish().unwrap(), sent, "after failover, on node 2");
}

#[test]
fn restart_under_traffic_loses_no_packets() {
    let lab = Lab::new(2).unwrap();
    lab.add_dsr_vip(VIP).unwrap();
    let setup = DaemonSetup::dsr(&lab, VIP, PORT, "udp", 64, "").unwrap();
    let mut daemon = setup.start(&lab, &[]).unwrap();
    let key = udp_vip(VIP, PORT);
    let _a1 = setup.agent(&lab, 1, "100ms").unwrap();
    let _a2 = setup.agent(&lab, 2, "100ms").unwrap();
    setup
        .wait_routes(&key, Duration::from_secs(10), |r| {
            r.iter().filter(|e| e.node == 1).count() == 32
                && r.iter().filter(|e| e.node == 2).count() == 32
        })
        .unwrap();
    // Owners only: "moved" flags are cleared by the daemon as tracked flows finish.
    let owners = |r: Vec<lb_common::RouteEntry>| r.into_iter().map(|e| e.node).collect::<Vec<_>>();
    let before = owners(setup.routes(&key).unwrap());

    let sinks: Vec<UdpSink> = lab
        .nodes
        .iter()
        .map(|n| UdpSink::start(&n.ns, PORT).unwrap())
        .collect();
    let all: Vec<&UdpSink> = sinks.iter().collect();
    // Traffic over 16 flows (a datagram per flow every 2 ms) until stopped, whatever the phases
    // take on a busy machine: each phase below lasts until `PHASE` more datagrams have arrived
    // in it, so traffic demonstrably flows through the daemon, with no daemon at all, and
    // through the restarted daemon.
    const PHASE: usize = 16 * 25;
    let sender = UdpSender::start(&lab.client.ns.name, VIP, PORT, 16, Duration::from_millis(2));
    let flowing = |what: &str| {
        let from = received(&all);
        let got = wait_received(&all, from + PHASE, Duration::from_secs(10));
        assert!(
            got >= from + PHASE,
            "{what}: {} of {PHASE} more datagrams arrived in 10 s",
            got - from
        );
    };
    flowing("through the first daemon");
    let status = daemon.signal_and_wait(libc::SIGTERM).unwrap();
    assert!(status.success(), "daemon exit status {status}");
    // The program keeps forwarding with no daemon at all: an observation window of at least
    // NO_DAEMON with traffic arriving in it (any datagram lost in it fails the check below).
    const NO_DAEMON: Duration = Duration::from_millis(500);
    let stopped = Instant::now();
    flowing("with no daemon");
    std::thread::sleep(NO_DAEMON.saturating_sub(stopped.elapsed()));
    let _daemon2 = setup.start(&lab, &[]).unwrap();
    flowing("through the restarted daemon");
    let sent = sender.stop().unwrap();
    wait_received(&all, sent.len(), DELIVERY);
    let got: Vec<(u32, u32)> = sinks
        .into_iter()
        .flat_map(|s| s.finish().unwrap())
        .collect();
    eprintln!(
        "restart under traffic: {} datagrams sent, {} delivered",
        sent.len(),
        got.len()
    );
    assert_delivered(got, sent, "across the daemon restart");
    assert_eq!(
        owners(setup.routes(&key).unwrap()),
        before,
        "the restarted daemon kept the route table"
    );
}

#[test]
fn multicast_heartbeats_drive_membership_with_advertised_weights() {
    let lab = Lab::new(2).unwrap();
    lab.add_dsr_vip(VIP).unwrap();
    let group = "239.18.0.1";
    for h in [&lab.lb, &lab.nodes[0], &lab.nodes[1]] {
        h.ns.ip(&["route", "add", "224.0.0.0/4", "dev", "eth0"])
            .unwrap();
    }
    let extra = format!("heartbeat_listen = \"0.0.0.0:7711\"\nheartbeat_group = \"{group}\"");
    let setup = DaemonSetup::dsr(&lab, VIP, PORT, "udp", 64, &extra).unwrap();
    let _daemon = setup.start(&lab, &[]).unwrap();
    let key = udp_vip(VIP, PORT);
    let lb = lb_binary().unwrap();
    let agents: Vec<_> = (1..=2u32)
        .map(|id| {
            lb_tests::netns::ChildGuard(Some(
                lab.nodes[(id - 1) as usize]
                    .ns
                    .command(&lb.to_string_lossy())
                    .args(["agent", "--node-id", &id.to_string(), "--balancer"])
                    .arg(format!("{group}:7711"))
                    .arg("--key-file")
                    .arg(&setup.key)
                    // Node 1 advertises weight 3 (node 2 keeps the configured 1).
                    .args(if id == 1 {
                        &["--weight", "3"][..]
                    } else {
                        &[][..]
                    })
                    .stdin(std::process::Stdio::null())
                    .spawn()
                    .unwrap(),
            ))
        })
        .collect();
    setup
        .wait_routes(&key, Duration::from_secs(10), |r| {
            r.iter().filter(|e| e.node == 1).count() == 48
                && r.iter().filter(|e| e.node == 2).count() == 16
        })
        .unwrap();
    drop(agents);
}

/// Fail static: the balancer's own link goes down for 1 s, so every heartbeat stops at once.
/// The daemon keeps the table (no NodeDown, no route moves, one warning) and, once heartbeats
/// flow again, judges normally: an agent killed afterwards is down within the usual budget.
#[test]
fn fail_static_keeps_the_table_when_every_heartbeat_stops_at_once() {
    let lab = Lab::new(3).unwrap();
    lab.add_dsr_vip(VIP).unwrap();
    let setup = DaemonSetup::dsr(&lab, VIP, PORT, "udp", 64, "").unwrap();
    let (_daemon, log) = setup.start_captured(&lab, &[]).unwrap();
    let key = udp_vip(VIP, PORT);
    let mut agents: Vec<_> = (1..=3)
        .map(|id| setup.agent(&lab, id, "100ms").unwrap())
        .collect();
    let all_three = |r: &[lb_common::RouteEntry]| (1..=3).all(|n| r.iter().any(|e| e.node == n));
    setup
        .wait_routes(&key, Duration::from_secs(10), all_three)
        .unwrap();
    let before = setup.routes(&key).unwrap();
    let from = log.len();
    // The outage, an observation window: the link stays down for OUTAGE (over 3 x the 100 ms
    // heartbeat interval, miss_limit 3: every node would be judged down) and at least until
    // the daemon has said that it holds the table; no NodeDown and no table change over it.
    const OUTAGE: Duration = Duration::from_secs(1);
    lab.lb.ns.ip(&["link", "set", "eth0", "down"]).unwrap();
    let down = Instant::now();
    wait_log(
        &log,
        from,
        "fail static: most nodes went silent",
        Duration::from_secs(10),
    );
    std::thread::sleep(OUTAGE.saturating_sub(down.elapsed()));
    lab.lb.ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    // The daemon says it judges normally again.
    wait_log(
        &log,
        from,
        "fail static: heartbeats flow again",
        Duration::from_secs(10),
    );
    let during = log.since(from);
    assert!(
        !during.iter().any(|l| l.contains("NodeDown")),
        "a node went down: {during:#?}"
    );
    assert_eq!(setup.routes(&key).unwrap(), before, "the table changed");
    // Judged normally again: one agent killed now is down in time.
    agents[0].signal_and_wait(libc::SIGKILL).unwrap();
    let took = setup
        .wait_routes(&key, Duration::from_secs(3), |r| {
            r.iter().all(|e| e.node != 1)
        })
        .unwrap();
    assert!(took < Duration::from_millis(800), "failover took {took:?}");
}

/// SIGHUP applies the configuration file again: a node removed from it leaves every table and
/// its NODES slot; a file that does not load is refused and changes nothing.
#[test]
fn sighup_applies_the_config_and_refuses_a_bad_one() {
    let lab = Lab::new(2).unwrap();
    lab.add_dsr_vip(VIP).unwrap();
    let setup = DaemonSetup::dsr(&lab, VIP, PORT, "udp", 64, "").unwrap();
    let (daemon, log) = setup.start_captured(&lab, &[]).unwrap();
    let pid = daemon.pid().unwrap() as i32;
    let key = udp_vip(VIP, PORT);
    let _agents: Vec<_> = (1..=2)
        .map(|id| setup.agent(&lab, id, "100ms").unwrap())
        .collect();
    setup
        .wait_routes(&key, Duration::from_secs(10), |r| {
            r.iter().filter(|e| e.node == 1).count() == 32
        })
        .unwrap();
    let good = std::fs::read_to_string(&setup.config).unwrap();
    let wait_log = |from: usize, what: &str| wait_log(&log, from, what, Duration::from_secs(10));
    // A bad file (node 1 twice): refused, nothing changes.
    std::fs::write(
        &setup.config,
        format!("{good}\n[[node]]\nid = 1\nmac = \"02:00:00:00:00:01\"\n"),
    )
    .unwrap();
    let from = log.len();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    wait_log(from, "reload refused");
    assert!(log.since(from).iter().any(|l| l.contains("listed twice")));
    assert_eq!(
        setup
            .routes(&key)
            .unwrap()
            .iter()
            .filter(|e| e.node == 2)
            .count(),
        32
    );
    // Node 2 removed from the file: all routes on node 1, node 2's slot empty.
    let without_2 = good
        .split("\n[[node]]\nid = 2\n")
        .next()
        .unwrap()
        .to_string();
    std::fs::write(&setup.config, without_2).unwrap();
    let from = log.len();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    wait_log(from, "reloaded");
    setup
        .wait_routes(&key, Duration::from_secs(3), |r| {
            r.iter().all(|e| e.node == 1)
        })
        .unwrap();
    let view = lb_userspace::dataplane::PinnedView::open(setup.pin_dir()).unwrap();
    assert_eq!(view.node(2).unwrap(), lb_common::NodeEntry::default());
    assert_eq!(view.node(1).unwrap().state, lb_common::NODE_ACTIVE);
}

/// A node without an agent, checked by TCP connect (`check = "tcp"`): up when its server
/// answers, down (routes moved to the agent's node) once it stops answering.
#[test]
fn tcp_checked_node_follows_its_server() {
    let lab = Lab::new(2).unwrap();
    lab.add_dsr_vip(VIP).unwrap();
    let setup = DaemonSetup::dsr(&lab, VIP, PORT, "udp", 64, "").unwrap();
    let check_port = 8080;
    let cfg = std::fs::read_to_string(&setup.config).unwrap().replace(
        "\n[[node]]\nid = 2\n",
        &format!(
            "\n[[node]]\nid = 2\ncheck = \"tcp\"\ncheck_addr = \"{}:{check_port}\"\ncheck_interval = \"100ms\"\ncheck_rise = 1\ncheck_fall = 2\n",
            lab.nodes[1].ip
        ),
    );
    std::fs::write(&setup.config, cfg).unwrap();
    let server = TcpServers::start(&[(&lab.nodes[1].ns, 2)], check_port).unwrap();
    let _daemon = setup.start(&lab, &[]).unwrap();
    let key = udp_vip(VIP, PORT);
    let _agent = setup.agent(&lab, 1, "100ms").unwrap();
    setup
        .wait_routes(&key, Duration::from_secs(10), |r| {
            r.iter().filter(|e| e.node == 2).count() == 32
        })
        .unwrap();
    server.finish().unwrap();
    let took = setup
        .wait_routes(&key, Duration::from_secs(5), |r| {
            r.iter().all(|e| e.node == 1)
        })
        .unwrap();
    eprintln!("TCP-checked node down after {took:?}");
}

/// A second `lb run` of a running instance is refused before it touches anything, and the
/// first keeps running.
#[test]
fn a_second_daemon_of_an_instance_is_refused() {
    let lab = Lab::new(1).unwrap();
    lab.add_dsr_vip(VIP).unwrap();
    let setup = DaemonSetup::dsr(&lab, VIP, PORT, "udp", 64, "").unwrap();
    let mut first = setup.start(&lab, &[]).unwrap();
    let key = udp_vip(VIP, PORT);
    let _agent = setup.agent(&lab, 1, "100ms").unwrap();
    setup
        .wait_routes(&key, Duration::from_secs(10), |r| {
            r.iter().all(|e| e.node == 1)
        })
        .unwrap();
    let out = lab
        .lb
        .ns
        .command(&lb_binary().unwrap().to_string_lossy())
        .args(["run", "--iface", &lab.lb.ifname, "--config"])
        .arg(&setup.config)
        .arg("--state-dir")
        .arg(&setup.state_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.starts_with("lb: error: "), "{err:?}");
    assert!(err.contains("already running"), "{err:?}");
    assert!(
        err.contains(&first.pid().unwrap().to_string()),
        "names the running pid: {err:?}"
    );
    assert!(
        first.0.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the first still runs"
    );
    assert!(setup.routes(&key).unwrap().iter().all(|e| e.node == 1));
}

/// A namespace with a veth interface, enough for the daemon to start (or refuse to).
fn dummy_ns() -> Netns {
    let ns = Netns::new(&format!("{}d", lb_tests::netns::unique_prefix())).unwrap();
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ])
    .unwrap();
    ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    ns
}

#[test]
fn corrupt_state_file_is_refused_and_reset_state_recovers() {
    let lab = Lab::new(1).unwrap();
    let setup = DaemonSetup::dsr(&lab, VIP, PORT, "udp", 16, "").unwrap();
    std::fs::create_dir_all(&setup.state_dir).unwrap();
    let state_file = setup.state_dir.join("state.json");
    std::fs::write(&state_file, b"{\"format\": 1, \"nodes\": [oops").unwrap();
    let out = lab
        .lb
        .ns
        .command(&lb_binary().unwrap().to_string_lossy())
        .args(["run", "--iface", "eth0", "--config"])
        .arg(&setup.config)
        .arg("--state-dir")
        .arg(&setup.state_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started on a corrupt state file");
    assert!(
        err.contains(&state_file.display().to_string()),
        "error names the file: {err}"
    );
    assert_eq!(
        std::fs::read(&state_file).unwrap(),
        b"{\"format\": 1, \"nodes\": [oops",
        "the bad file is left for the operator"
    );
    // An explicit --reset-state starts empty.
    let mut d = setup.start(&lab, &["--reset-state"]).unwrap();
    assert!(d.signal_and_wait(libc::SIGTERM).unwrap().success());
}

#[test]
fn bad_config_and_arguments_fail_with_one_line_errors() {
    let ns = dummy_ns();
    let dir = lb_tests::daemon::TempDir::new("badcfg").unwrap();
    let lb = lb_binary().unwrap();
    let cases: [(&str, &str); 4] = [
        (
            "[[vip]]\naddr = \"198.18.100.1\"\nport = 80\nproto = \"sctp\"\n",
            "sctp",
        ),
        ("[daemon]\nmiss_limit = 0\n", "miss_limit"),
        ("[daemon]\nheartbeat_interval = \"soon\"\n", "duration"),
        ("this is not toml", "parsing config"),
    ];
    // `lb run --iface IF` with a config of `config` in the namespace.
    let run = |iface: &str, config: &str| {
        let cfg = dir.0.join("lb.toml");
        std::fs::write(&cfg, config).unwrap();
        ns.command(&lb.to_string_lossy())
            .args(["run", "--iface", iface, "--config"])
            .arg(&cfg)
            .arg("--state-dir")
            .arg(dir.0.join("state"))
            .output()
            .unwrap()
    };
    for (text, needle) in cases {
        let out = run("eth0", text);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(needle), "{needle:?} not in {err:?}");
        assert!(err.starts_with("lb: error:"), "{err:?}");
    }
    // A bad command line (clap's errors too): one `lb: error:` line first, exit code 2.
    for args in [
        &["run", "--no-such-flag"][..],
        &["run"][..],
        &["agent", "--node-id", "x"][..],
    ] {
        let out = std::process::Command::new(&lb).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with("lb: error: "), "{args:?}: {err:?}");
        assert!(!err.starts_with("lb: error: error"), "{err:?}");
    }
    // Unknown interface: a clear error, nothing left pinned.
    let out = run("nosuchif0", "[daemon]\ninstance = \"lbtbadif\"\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("nosuchif0"), "{err}");
    assert!(
        !std::path::Path::new("/sys/fs/bpf/lbtbadif").exists(),
        "a failed start pinned nothing"
    );
}

/// Heartbeats the daemon read (accepted and rejected) and the datagrams the kernel dropped at
/// its heartbeat port for a full queue, from `lb status --json`.
fn heartbeat_counts(status: &serde_json::Value) -> (u64, u64) {
    let hb = &status["heartbeats"];
    let rejected: u64 = hb["rejected"].as_object().map_or(0, |m| {
        m.values().filter_map(serde_json::Value::as_u64).sum()
    });
    (
        hb["accepted"].as_u64().unwrap_or(0) + rejected,
        hb["queue_drops"].as_u64().unwrap_or(0),
    )
}

/// Whether the daemon's log from `from` on says node `id` went down.
fn went_down(log: &LogLines, from: usize, id: u32) -> Option<String> {
    let needle = format!("NodeDown {{ node: {id},");
    log.since(from).into_iter().find(|l| l.contains(&needle))
}

/// Item 8: a flood at the heartbeat port, at twice the rate the daemon can read and verify
/// (measured here, from its own counters: the kernel drops at least as many datagrams as the
/// daemon reads), and one at an agent's notice port, stop nothing. An agent killed during the
/// flood is down within the usual bound; the other nodes stay up all along, the flooded agent
/// keeps beating, the API answers, and SIGTERM ends the daemon at once.
#[test]
fn a_flood_at_the_heartbeat_and_notice_ports_stops_nothing() {
    let lab = Lab::new(3).unwrap();
    lab.add_dsr_vip(VIP).unwrap();
    let setup = DaemonSetup::dsr(&lab, VIP, PORT, "udp", 64, "").unwrap();
    let (mut daemon, log) = setup.start_captured(&lab, &[]).unwrap();
    let key = udp_vip(VIP, PORT);
    let mut agent1 = setup.agent(&lab, 1, "100ms").unwrap();
    let _agent2 = setup.agent(&lab, 2, "100ms").unwrap();
    // Node 3's agent takes notices on a port the test knows, to flood it.
    let notice_port = SocketAddr::from((lab.nodes[2].ip, 7799));
    let _agent3 = setup
        .agent_with(&lab, 3, "100ms", &["--bind", &notice_port.to_string()])
        .unwrap();
    setup
        .wait_routes(&key, Duration::from_secs(10), |r| {
            (1..=3).all(|n| r.iter().any(|e| e.node == n))
        })
        .unwrap();
    // Forged heartbeats for the configured nodes (another key): each passes every check the
    // daemon makes before the HMAC, so each costs it a read and an HMAC.
    let forged = Key::from_bytes(b"not the lab key, not the lab key").unwrap();
    let beats: Vec<Vec<u8>> = (1..=3u32)
        .map(|node| {
            Heartbeat {
                node,
                incarnation: u64::MAX,
                sequence: 1,
                state: NodeState::Up,
                weight: 1,
                interval_ms: 100,
                cpu_permille: None,
                active_conns: None,
            }
            .encode(&forged)
        })
        .collect();
    // At node 3's agent: forged notices for node 3 (an HMAC each) and junk.
    let vip = heartbeat::Vip {
        addr: VIP.into(),
        port: PORT,
        proto: lb_common::PROTO_UDP,
    };
    let mut seq = 1;
    let ranges = [heartbeat::RouteRange { first: 0, last: 63 }];
    let notices = vec![
        heartbeat::split_notices(3, vip, MoveReason::Drain, &ranges, 9, &mut seq)
            .remove(0)
            .encode(&forged)
            .unwrap(),
        vec![0u8; 100],
    ];
    let from = log.len();
    let hb_port = SocketAddr::from((lab.lb.ip, HB_PORT));
    let mut flood = Flood::start(&lab.client.ns.name, hb_port, beats.clone(), 2);
    let agent_flood = Flood::start(&lab.client.ns.name, notice_port, notices, 1);
    // Twice the verify rate: over a second, the kernel drops at least as many datagrams at
    // the heartbeat port as the daemon reads. More senders until it does.
    let mut threads = 2;
    let (read, drops, secs) = loop {
        let (r0, d0) = heartbeat_counts(&setup.status().unwrap());
        let t = Instant::now();
        let s0 = flood.sent();
        std::thread::sleep(Duration::from_secs(1));
        let (r1, d1) = heartbeat_counts(&setup.status().unwrap());
        let secs = t.elapsed().as_secs_f64();
        let (read, drops) = (r1 - r0, d1 - d0);
        eprintln!(
            "flood with {threads} senders: {:.0}/s sent, the daemon read and verified {:.0}/s, \
             the kernel dropped {:.0}/s",
            (flood.sent() - s0) as f64 / secs,
            read as f64 / secs,
            drops as f64 / secs
        );
        if drops >= read || threads >= 8 {
            break (read, drops, secs);
        }
        flood.add(&lab.client.ns.name, hb_port, beats.clone(), 2);
        threads += 2;
    };
    assert!(
        drops >= read,
        "the flood never reached twice the daemon's verify rate ({:.0}/s read, {:.0}/s dropped)",
        read as f64 / secs,
        drops as f64 / secs
    );
    // An agent killed under the flood is down within the usual bound.
    agent1.signal_and_wait(libc::SIGKILL).unwrap();
    let took = setup
        .wait_routes(&key, Duration::from_secs(3), |r| {
            r.iter().all(|e| e.node != 1)
        })
        .unwrap();
    eprintln!("failover under the flood took {took:?}");
    assert!(took < Duration::from_millis(800), "failover took {took:?}");
    // An observation window of 2 s more flood (over six detection windows): nodes 2 and 3
    // stay up (a node whose heartbeats stop for 300 ms goes down), and node 3's agent,
    // flooded too, still beats at the end of it.
    std::thread::sleep(Duration::from_secs(2));
    for id in [2, 3] {
        assert_eq!(went_down(&log, from, id), None, "node {id} went down");
        let n = setup.node_json(id).unwrap();
        assert_eq!(n["state"], "active", "{n}");
    }
    let n3 = setup.node_json(3).unwrap();
    let age = n3["last_heartbeat_age"].as_f64().unwrap_or(f64::MAX);
    assert!(age < 0.5, "node 3's last heartbeat is {age} s old: {n3}");
    let owners = setup.routes(&key).unwrap();
    assert!((2..=3).all(|n| owners.iter().filter(|e| e.node == n).count() == 32));
    // SIGTERM under the flood.
    let t = Instant::now();
    let status = daemon.signal_and_wait(libc::SIGTERM).unwrap();
    eprintln!("SIGTERM under the flood: exited in {:?}", t.elapsed());
    assert!(status.success(), "daemon exit status {status}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let sent = flood.stop().unwrap();
    let at_agent = agent_flood.stop().unwrap();
    eprintln!("flooded {sent} datagrams at the daemon, {at_agent} at node 3's agent");
}

/// Item 9: one shared key no longer lets a node steer membership. An agent advertising a huge
/// weight is held to 4 x its configured weight; a heartbeat forged with an incarnation far in
/// the future locks the real agent out only for a moment; a second agent claiming a node ID is
/// reported (log, `lb node list`, `lb status`).
#[test]
fn one_shared_key_does_not_steer_membership() {
    let lab = Lab::new(2).unwrap();
    lab.add_dsr_vip(VIP).unwrap();
    let setup = DaemonSetup::dsr(&lab, VIP, PORT, "udp", 64, "").unwrap();
    let (_daemon, log) = setup.start_captured(&lab, &[]).unwrap();
    let key = udp_vip(VIP, PORT);
    let _agent1 = setup
        .agent_with(&lab, 1, "100ms", &["--weight", "1000"])
        .unwrap();
    let _agent2 = setup.agent(&lab, 2, "100ms").unwrap();
    // Weights 4 (clamped from 1000) and 1: 64 routes split 51 or 52 to 12 or 13.
    let split = |r: &[lb_common::RouteEntry]| {
        let one = r.iter().filter(|e| e.node == 1).count();
        (51..=52).contains(&one) && r.iter().all(|e| e.node == 1 || e.node == 2)
    };
    setup
        .wait_routes(&key, Duration::from_secs(10), split)
        .unwrap();
    let st = setup.status().unwrap();
    assert!(
        st["heartbeats"]["weight_clamped"].as_u64().unwrap() > 0,
        "{st}"
    );
    wait_log(&log, 0, "advertises weight 1000", Duration::from_secs(5));

    // A heartbeat for node 1 with the largest incarnation there is, signed with the real key.
    let real = Key::from_file(&setup.key).unwrap();
    let forged = Heartbeat {
        node: 1,
        incarnation: u64::MAX,
        sequence: 1,
        state: NodeState::Up,
        weight: 1,
        interval_ms: 100,
        cpu_permille: None,
        active_conns: None,
    }
    .encode(&real);
    let to = SocketAddr::from((lab.lb.ip, HB_PORT));
    let from = log.len();
    lab.client
        .ns
        .spawn(move || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            s.send_to(&forged, to)?;
            Ok(())
        })
        .join()
        .unwrap()
        .unwrap();
    // Node 1 restarts (held drained), then its real agent is let back in: up again after
    // the hold-down, with its share.
    setup
        .wait_routes(&key, Duration::from_secs(5), |r| {
            r.iter().all(|e| e.node == 2)
        })
        .unwrap();
    let back = setup
        .wait_routes(&key, Duration::from_secs(10), split)
        .unwrap();
    eprintln!("the real agent of node 1 was back {back:?} after the forged incarnation");
    wait_log(
        &log,
        from,
        "accepted below the one before",
        Duration::from_secs(5),
    );
    let st = setup.status().unwrap();
    assert!(
        st["heartbeats"]["incarnation_resets"].as_u64().unwrap() >= 1,
        "{st}"
    );

    // A second agent claiming node 2 (run on node 1's host): the newer one is taken, the
    // older one keeps beating and is reported.
    let from = log.len();
    let (_impostor, _) = setup
        .agent_captured(&lab, &lab.nodes[0].ns, 2, &["--interval", "100ms"])
        .unwrap();
    wait_log(
        &log,
        from,
        "two agents claim node 2",
        Duration::from_secs(10),
    );
    let n2 = setup.node_json(2).unwrap();
    assert_eq!(n2["duplicate_agent"], true, "{n2}");
    let st = setup.status().unwrap();
    assert!(
        st["heartbeats"]["rejected"]["duplicate_node"]
            .as_u64()
            .unwrap()
            > 0,
        "{st}"
    );
    let human = setup.cli_ok(&["node", "list"]).unwrap();
    assert!(human.contains("node 2: a second agent claims"), "{human}");
}

/// Connects to `vip:port` from the client namespace `n` times, one request each; returns the
/// node that answered each (`None`: refused or failed).
fn ask(lab: &Lab, vip: Ipv4Addr, port: u16, n: usize) -> Vec<Option<u32>> {
    lab.client
        .ns
        .spawn(move || {
            Ok((0..n)
                .map(|_| {
                    let mut s = TcpStream::connect_timeout(
                        &SocketAddr::from((vip, port)),
                        Duration::from_secs(2),
                    )
                    .ok()?;
                    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                    s.write_all(b"hello\n").ok()?;
                    let mut line = String::new();
                    BufReader::new(s).read_line(&mut line).ok()?;
                    line.trim().parse().ok()
                })
                .collect())
        })
        .join()
        .unwrap()
        .unwrap()
}

/// Item 11: `lb agent --check tcp://127.0.0.1:PORT` announces its node draining while the
/// local service is stopped, so new connections all go to the other node (none is refused),
/// and up again once the service is back, when the node takes new connections again; the
/// agent says so in its log.
#[test]
fn an_agent_check_keeps_new_connections_off_a_dead_service() {
    let lab = Lab::new(2).unwrap();
    lab.add_dsr_vip(VIP).unwrap();
    let port = 8081;
    let setup = DaemonSetup::dsr(&lab, VIP, port, "tcp", 64, "").unwrap();
    let _daemon = setup.start(&lab, &[]).unwrap();
    let key = lb_userspace::dataplane::vip_key(VIP.into(), port, lb_common::PROTO_TCP);
    let server1 = TcpServers::start(&[(&lab.nodes[0].ns, 1)], port).unwrap();
    let _server2 = TcpServers::start(&[(&lab.nodes[1].ns, 2)], port).unwrap();
    let check = format!("tcp://127.0.0.1:{port}");
    let args = [
        "--interval",
        "100ms",
        "--check",
        check.as_str(),
        "--check-interval",
        "100ms",
    ];
    let (_agent1, alog) = setup
        .agent_captured(&lab, &lab.nodes[0].ns, 1, &args)
        .unwrap();
    let _agent2 = setup.agent_with(&lab, 2, "100ms", &args[2..]).unwrap();
    let halves = |r: &[lb_common::RouteEntry]| {
        (1..=2).all(|n| r.iter().filter(|e| e.node == n).count() == 32)
    };
    setup
        .wait_routes(&key, Duration::from_secs(10), halves)
        .unwrap();
    let answers = ask(&lab, VIP, port, 64);
    assert!(
        answers.contains(&Some(1)) && answers.contains(&Some(2)),
        "{answers:?}"
    );

    // Node 1's service stops: its agent announces draining, node 1 owns no route.
    let from = alog.len();
    server1.finish().unwrap();
    let took = setup
        .wait_routes(&key, Duration::from_secs(5), |r| {
            r.iter().all(|e| e.node == 2)
        })
        .unwrap();
    eprintln!("node 1 out of the table {took:?} after its service stopped");
    wait_log(&alog, from, "fails", Duration::from_secs(5));
    assert!(
        alog.since(from)
            .iter()
            .any(|l| l.contains("announcing draining"))
    );
    assert_eq!(setup.node_json(1).unwrap()["state"], "draining");
    let answers = ask(&lab, VIP, port, 64);
    assert!(answers.iter().all(|a| *a == Some(2)), "{answers:?}");

    // The service is back: so is node 1, and it takes new connections again.
    let from = alog.len();
    let _server1 = TcpServers::start(&[(&lab.nodes[0].ns, 1)], port).unwrap();
    setup
        .wait_routes(&key, Duration::from_secs(5), halves)
        .unwrap();
    wait_log(&alog, from, "passes: announcing up", Duration::from_secs(5));
    let answers = ask(&lab, VIP, port, 64);
    assert!(answers.contains(&Some(1)), "{answers:?}");
    assert!(answers.iter().all(Option::is_some), "{answers:?}");
}

/// Item 12: every node of a VIP down: its packets are dropped and counted (`no_backend`), and
/// the daemon warns once for the transition, not per packet; it says so again when a node is
/// back. `lb status` lists the VIP meanwhile.
#[test]
fn a_vip_without_nodes_drops_with_a_count_and_one_warning() {
    let lab = Lab::new(2).unwrap();
    lab.add_dsr_vip(VIP).unwrap();
    // Fail static off: with it, the last nodes to go silent together are held up (the
    // likelier fault is the balancer's own), and the VIP never loses them.
    let setup = DaemonSetup::dsr(&lab, VIP, PORT, "udp", 64, "fail_static_share = 0").unwrap();
    let (_daemon, log) = setup.start_captured(&lab, &[]).unwrap();
    let key = udp_vip(VIP, PORT);
    let mut agents: Vec<_> = (1..=2)
        .map(|id| setup.agent(&lab, id, "100ms").unwrap())
        .collect();
    setup
        .wait_routes(&key, Duration::from_secs(10), |r| {
            (1..=2).all(|n| r.iter().any(|e| e.node == n))
        })
        .unwrap();
    let from = log.len();
    for a in &mut agents {
        a.signal_and_wait(libc::SIGKILL).unwrap();
    }
    let warning = "has no active node";
    wait_log(&log, from, warning, Duration::from_secs(5));
    let no_backend = || {
        setup.cli_json(&["stats"]).unwrap()["drops"]["no_backend"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = no_backend();
    let sink: Vec<UdpSink> = lab
        .nodes
        .iter()
        .map(|n| UdpSink::start(&n.ns, PORT).unwrap())
        .collect();
    let sent = send_udp(
        &lab.client.ns.name,
        VIP,
        PORT,
        16,
        20,
        Duration::from_millis(1),
    )
    .unwrap();
    let deadline = Instant::now() + DELIVERY;
    while no_backend() < before + sent.len() as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        no_backend() - before,
        sent.len() as u64,
        "every datagram dropped and counted"
    );
    assert_eq!(received(&sink.iter().collect::<Vec<_>>()), 0);
    let st = setup.status().unwrap();
    assert_eq!(
        st["unserved_vips"],
        serde_json::json!([format!("{VIP}:{PORT}/udp")]),
        "{st}"
    );
    assert_eq!(st["unserved_episodes"], 1, "{st}");
    let warned = log
        .since(from)
        .iter()
        .filter(|l| l.contains(warning))
        .count();
    assert_eq!(warned, 1, "{:#?}", log.since(from));
    // A node back: said once, and the VIP forwards again.
    let _agent1 = setup.agent(&lab, 1, "100ms").unwrap();
    wait_log(
        &log,
        from,
        "has an active node again",
        Duration::from_secs(10),
    );
    assert_eq!(
        setup.status().unwrap()["unserved_vips"],
        serde_json::json!([])
    );
}
