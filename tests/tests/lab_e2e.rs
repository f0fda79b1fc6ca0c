//! The lab (`lb-lab`: what `cargo xtask run` without arguments and `cargo xtask lab` run), end
//! to end (root): `up`, then real traffic from the client namespace to every VIP reaching every
//! node (dsr-l2 and ipip, HTTP, TCP and UDP echo, several source addresses), over IPv4 and over
//! IPv6 (ipip: IP6IP6), then `down` leaving nothing; and `up` and `down` after a crash.
//!
//! The labs here are named `lbtlab` (namespaces `lbtlab-*`, `/run/lbtlab/`), never the default
//! `lb-lab`: a lab someone is running is not touched.
use std::{
    net::{IpAddr, SocketAddr},
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_tests::lab::{
    self, CLIENT_EXTRA, CLIENT_EXTRA6, CLIENT_IP, CLIENT_IP6, DSR_VIP, DSR_VIP6, ECHO_PORT,
    HTTP_PORT, IPIP_VIP, IPIP_VIP6, LabProcess, Names,
};

const NAME: &str = "lbtlab";

fn names() -> Names {
    Names::new(NAME).unwrap()
}

/// `lb-lab --name lbtlab ARGS` (the binary cargo built next to this test).
fn lab_cmd(args: &[&str]) -> Result<Output> {
    lab::lab_cli(env!("CARGO_BIN_EXE_lb-lab").as_ref(), NAME, args)
}

fn lab_ok(args: &[&str]) -> Result<String> {
    lab::lab_cli_ok(env!("CARGO_BIN_EXE_lb-lab").as_ref(), NAME, args)
}

/// Removes the lab however the test ends.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = lab_cmd(&["down"]);
    }
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rfind(')')
            .and_then(|i| s[i + 2..].chars().next())
            .is_some_and(|st| st != 'Z' && st != 'X')
    })
}

/// The client's source addresses of `vip`'s family.
fn sources(vip: IpAddr) -> Vec<IpAddr> {
    if vip.is_ipv4() {
        std::iter::once(CLIENT_IP)
            .chain(CLIENT_EXTRA)
            .map(IpAddr::V4)
            .collect()
    } else {
        std::iter::once(CLIENT_IP6)
            .chain(CLIENT_EXTRA6)
            .map(IpAddr::V6)
            .collect()
    }
}

/// GETs `http://vip/` from the client (source addresses in turn) until every node of
/// `1..=nodes` has answered; returns the answers per node.
fn every_node_answers(vip: impl Into<IpAddr>, nodes: u32) -> Result<Vec<u32>> {
    let vip: IpAddr = vip.into();
    let url = format!("http://{}/", SocketAddr::new(vip, HTTP_PORT));
    let client = names().ns("client");
    let sources = sources(vip);
    let mut counts = vec![0u32; nodes as usize];
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    // At least one GET from each source address, then until every node answered.
    while i < sources.len() || counts.contains(&0) {
        ensure!(
            Instant::now() < deadline,
            "{url}: after {i} GETs the answers per node are {counts:?}"
        );
        let src = sources[i % sources.len()];
        let body = lab::http_get_ip_in(&client, vip, HTTP_PORT, Some(src))
            .with_context(|| format!("GET {url} from {src}"))?;
        let node: u32 = body
            .trim()
            .strip_prefix("node ")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("{url} answered {body:?}"))?;
        ensure!((1..=nodes).contains(&node), "answer from node {node}?");
        counts[node as usize - 1] += 1;
        i += 1;
    }
    Ok(counts)
}

fn stats() -> Result<serde_json::Value> {
    let n = names();
    let out = Command::new(lb_tests::daemon::lb_binary()?)
        .args(["stats", "--json", "--socket"])
        .arg(n.socket())
        .output()?;
    ensure!(out.status.success(), "lb stats failed");
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn stats_event(event: &str) -> Result<u64> {
    Ok(stats()?["events"][event].as_u64().unwrap_or(0))
}

/// Packets the balancer forwarded for the VIP called `name` (`lb stats` names it).
fn vip_packets(name: &str) -> Result<u64> {
    let s = stats()?;
    let v = s["vips"]
        .as_array()
        .and_then(|a| a.iter().find(|v| v["name"] == name))
        .with_context(|| format!("no VIP {name} in lb stats: {s}"))?;
    Ok(v["packets"].as_u64().unwrap_or(0))
}

fn assert_nothing_left(pids: &[LabProcess]) {
    let n = names();
    let left = lab::leftovers(&n);
    assert!(left.is_empty(), "left after down: {left:?}");
    for p in pids {
        assert!(!alive(p.pid), "{} ({}) still runs", p.pid, p.what);
    }
    assert!(lab::lab_namespaces(&n).is_empty());
    for path in [n.pin_dir(), n.peer_pin_dir(), n.run_dir(), n.socket()] {
        assert!(!path.exists(), "{} still exists", path.display());
    }
}

#[test]
fn lab_up_serves_every_vip_from_every_node_and_down_leaves_nothing() -> Result<()> {
    let _cleanup = Cleanup;
    let n = names();
    let up = lab_ok(&["up", "--nodes", "3"])?;
    // It says how to reach the VIP and which `lb` commands to try, and in which XDP mode.
    assert!(
        up.contains(&format!(
            "ip netns exec {NAME}-client curl http://{DSR_VIP}/"
        )),
        "{up}"
    );
    assert!(
        up.contains(&format!("export LB_SOCKET={}", n.socket().display())),
        "{up}"
    );
    let said_native = up.contains("XDP native mode");
    assert!(said_native || up.contains("XDP generic mode"), "{up}");

    // A second `up` of a running lab is refused and changes nothing.
    let again = lab_cmd(&["up"])?;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already up"));

    let status = lab_ok(&["status"])?;
    assert!(
        status.contains("3 active / 0 draining / 0 down"),
        "{status}"
    );
    let mode = if said_native { "native" } else { "generic" };
    assert!(
        status.contains(&format!("on eth0 in {mode} XDP mode")),
        "{status}"
    );

    let dsr = every_node_answers(DSR_VIP, 3)?;
    eprintln!("dsr-l2 {DSR_VIP}: answers per node {dsr:?}");
    let encap_before = stats_event("encap")?;
    let ipip = every_node_answers(IPIP_VIP, 3)?;
    eprintln!("ipip {IPIP_VIP}: answers per node {ipip:?}");
    // Those went through the balancer's encapsulation (and the nodes' decap).
    assert!(stats_event("encap")? > encap_before);

    // TCP echo: 64 KiB each over several connections (several nodes), from several sources.
    let client = n.ns("client");
    for k in 0..6u32 {
        let src = [CLIENT_IP, CLIENT_EXTRA[1]][k as usize % 2];
        let msg: Vec<u8> = (0..65536u32).map(|i| (i * 7 + k) as u8).collect();
        let m2 = msg.clone();
        let back = lb_tests::netns::spawn_in(&client, move || {
            lab::tcp_echo(Some(src), DSR_VIP, ECHO_PORT, &m2)
        })
        .join()
        .unwrap()?;
        assert!(back == msg, "TCP echo {k} from {src} came back different");
    }
    // UDP echo: one datagram per socket (a new flow each).
    for k in 0..8u32 {
        let src = CLIENT_EXTRA[k as usize % CLIENT_EXTRA.len()];
        let msg = format!("datagram {k} from {src}").into_bytes();
        let m2 = msg.clone();
        let back = lb_tests::netns::spawn_in(&client, move || {
            lab::udp_echo(Some(src), DSR_VIP, ECHO_PORT, &m2)
        })
        .join()
        .unwrap()?;
        assert_eq!(back, msg, "UDP echo {k}");
    }

    let pids = lab::lab_processes(&n);
    // The daemon, and an agent, a decapsulator and the servers per node.
    assert_eq!(pids.len(), 1 + 3 * 3, "{pids:?}");
    let down = lab_ok(&["down"])?;
    assert!(
        down.contains("stopped 10 processes, deleted 6 namespaces"),
        "{down}"
    );
    assert_nothing_left(&pids);
    assert!(lab_ok(&["down"])?.contains("nothing to remove"));
    let status = lab_cmd(&["status"])?;
    assert!(!status.status.success());
    assert!(String::from_utf8_lossy(&status.stdout).contains("down (nothing of it exists)"));
    Ok(())
}

/// kill -9 of every lab process: the namespaces, pins and files stay behind.
fn crash() -> Result<Vec<LabProcess>> {
    let pids = lab::lab_processes(&names());
    ensure!(!pids.is_empty(), "no lab processes to kill");
    for p in &pids {
        // SAFETY: kill(2) of a lab process.
        unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
    }
    wait_until("the killed processes gone", Duration::from_secs(5), || {
        pids.iter().all(|p| !alive(p.pid))
    })?;
    Ok(pids)
}

#[test]
fn lab_up_and_down_after_a_crash_remove_what_was_left() -> Result<()> {
    let _cleanup = Cleanup;
    let n = names();
    lab_ok(&["up", "--nodes", "2"])?;
    crash()?;
    assert!(!lab::lab_namespaces(&n).is_empty());
    assert!(n.pin_dir().exists());
    let status = lab_cmd(&["status"])?;
    assert!(!status.status.success(), "status of a crashed lab says up");
    assert!(String::from_utf8_lossy(&status.stdout).contains("daemon=DEAD"));

    // `up` over the wreck removes it first and comes up.
    let up = lab_ok(&["up", "--nodes", "2"])?;
    assert!(
        up.contains("removing what an earlier lab lbtlab left behind"),
        "{up}"
    );
    every_node_answers(DSR_VIP, 2)?;

    // Crash again, this time with one agent surviving whose pid file is lost, and the lab's
    // own record gone: `down` finds everything by name alone.
    let agent = lab::lab_processes(&n)
        .into_iter()
        .find(|p| p.what == "agent-1")
        .context("no agent-1")?;
    std::fs::remove_file(n.pid_dir().join("agent-1.pid"))?;
    let mut pids: Vec<LabProcess> = lab::lab_processes(&n)
        .into_iter()
        .filter(|p| p.pid != agent.pid)
        .collect();
    for p in &pids {
        // SAFETY: kill(2) of a lab process.
        unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
    }
    wait_until("the killed processes gone", Duration::from_secs(5), || {
        pids.iter().all(|p| !alive(p.pid))
    })?;
    std::fs::remove_file(n.run_dir().join("lab.json"))?;
    assert!(alive(agent.pid));
    let status = lab_cmd(&["status"])?;
    assert!(String::from_utf8_lossy(&status.stdout).contains("parts are left"));

    let down = lab_ok(&["down"])?;
    assert!(
        down.contains("stopped 1 process, deleted 5 namespaces"),
        "{down}"
    );
    pids.push(agent);
    assert_nothing_left(&pids);
    Ok(())
}

/// The IPv6 VIPs (dsr-l2 and ipip, the latter IP6IP6 into `lb decap` on the nodes) answer from
/// every node, TCP echo and UDP echo work over IPv6, the nodes' dual-stack servers answer on
/// both families directly, and nothing was dropped.
#[test]
fn lab_serves_the_ipv6_vips_from_every_node() -> Result<()> {
    let _cleanup = Cleanup;
    let n = names();
    let up = lab_ok(&["up", "--nodes", "3"])?;
    assert!(
        up.contains(&format!(
            "ip netns exec {NAME}-client curl -6 'http://[{DSR_VIP6}]/'"
        )),
        "{up}"
    );
    assert!(
        up.contains(&format!(
            "ip netns exec {NAME}-client curl -6 'http://[{IPIP_VIP6}]/'"
        )),
        "{up}"
    );
    let client = n.ns("client");

    // The servers directly, over both families (not through the balancer).
    for i in 1..=3 {
        for ip in [IpAddr::V4(lab::node_ip(i)), IpAddr::V6(lab::node_ip6(i))] {
            let body = lab::http_get_ip_in(&client, ip, HTTP_PORT, None)?;
            assert_eq!(body, format!("node {i}\n"), "{ip}");
        }
    }

    let dsr_before = vip_packets(&format!("[{DSR_VIP6}]:{HTTP_PORT}/tcp"))?;
    let dsr = every_node_answers(DSR_VIP6, 3)?;
    eprintln!("dsr-l2 {DSR_VIP6}: answers per node {dsr:?}");
    assert!(vip_packets(&format!("[{DSR_VIP6}]:{HTTP_PORT}/tcp"))? > dsr_before);

    let encap_before = stats_event("encap")?;
    let ipip_before = vip_packets(&format!("[{IPIP_VIP6}]:{HTTP_PORT}/tcp"))?;
    let ipip = every_node_answers(IPIP_VIP6, 3)?;
    eprintln!("ipip {IPIP_VIP6}: answers per node {ipip:?}");
    // Through the balancer's IP6IP6 encapsulation (and the nodes' decap).
    let ipip_packets = vip_packets(&format!("[{IPIP_VIP6}]:{HTTP_PORT}/tcp"))? - ipip_before;
    let encapsulated = stats_event("encap")? - encap_before;
    assert!(ipip_packets > 0);
    assert!(
        encapsulated >= ipip_packets,
        "{ipip_packets} packets to the ipip VIP, {encapsulated} encapsulated"
    );

    // TCP echo over IPv6: 64 KiB each over several connections, from several sources.
    let echo_before = vip_packets(&format!("[{DSR_VIP6}]:{ECHO_PORT}/tcp"))?;
    for k in 0..6u32 {
        let src = IpAddr::V6([CLIENT_IP6, CLIENT_EXTRA6[1]][k as usize % 2]);
        let msg: Vec<u8> = (0..65536u32).map(|i| (i * 7 + k) as u8).collect();
        let m2 = msg.clone();
        let back = lb_tests::netns::spawn_in(&client, move || {
            lab::tcp_echo_ip(Some(src), IpAddr::V6(DSR_VIP6), ECHO_PORT, &m2)
        })
        .join()
        .unwrap()?;
        assert!(back == msg, "TCP echo {k} from {src} came back different");
    }
    assert!(vip_packets(&format!("[{DSR_VIP6}]:{ECHO_PORT}/tcp"))? > echo_before);
    // UDP echo over IPv6: one datagram per socket (a new flow each).
    for k in 0..8u32 {
        let src = IpAddr::V6(CLIENT_EXTRA6[k as usize % CLIENT_EXTRA6.len()]);
        let msg = format!("datagram {k} from {src}").into_bytes();
        let m2 = msg.clone();
        let back = lb_tests::netns::spawn_in(&client, move || {
            lab::udp_echo_ip(Some(src), IpAddr::V6(DSR_VIP6), ECHO_PORT, &m2)
        })
        .join()
        .unwrap()?;
        assert_eq!(back, msg, "UDP echo {k}");
    }
    // IPv4 still answers from the same (dual-stack) servers.
    every_node_answers(DSR_VIP, 3)?;

    let drops = stats()?["drops"].clone();
    let dropped: u64 = drops
        .as_object()
        .context("drops")?
        .values()
        .filter_map(|v| v.as_u64())
        .sum();
    assert_eq!(dropped, 0, "drops by reason: {drops}");
    Ok(())
}
