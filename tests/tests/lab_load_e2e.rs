//! The lab under load (root): real clients in the client namespace (HTTP requests at a steady
//! rate, long-lived TCP echo connections checked byte for byte, UDP datagrams) through both
//! forwarding modes over IPv4 and IPv6 at once (dsr-l2 and ipip on 198.18.100.1 and .2,
//! dsr-l2 and ip6ip6 on 2001:db8:100::1 and ::2), with the README's sizes (65536 routes per
//! VIP), while nodes fail, join, change weight, drain, and the daemon and an agent restart.
//! One lab per test carries both families (a lab costs ~5 s to bring up and remove): every
//! assertion covers the four VIPs. Each test brings up its own lab (`lbloadlab<N>`:
//! namespaces `lbloadlab<N>-*`, never the default `lb-lab` nor `lab_e2e`'s `lbtlab`) in
//! whatever XDP mode the lab chooses (native on veths that allow it) and removes it however
//! the test ends.
//!
//! The lab's balancer has TCP and UDP echo (port 7) on the dsr-l2 VIPs only; the tests add
//! them on the ipip VIPs at run time (`lb vip add 198.18.100.2:7/tcp --mode ipip`, and
//! `[2001:db8:100::2]:7/tcp`, which the balancer sends IP6IP6): the nodes' TCP echo server is
//! dual-stack on every address, their UDP echo is bound to every VIP of both families, and
//! `lb decap` already takes both ipip VIPs. So long-lived connections run through all four.
//!
//! Every wait is on a condition with a deadline; the load is made to run through each event
//! (`Load::run_through`: N more lines on every connection and M more requests started after
//! it) before anything is asserted.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lb_tests::{
    daemon::log_seconds,
    lab::{
        self, CLIENT_EXTRA, CLIENT_EXTRA6, CLIENT_IP, CLIENT_IP6, DSR_VIP, DSR_VIP6, ECHO_PORT,
        IPIP_VIP, IPIP_VIP6, Names, ROUTES,
    },
    labctl::{LabCtl, wait_for},
    load::{self, EchoSpec, Load, Report, Request},
};

/// The VIPs every test drives: (address, mode), IPv4 then IPv6.
const VIPS: [(IpAddr, &str); 4] = [
    (IpAddr::V4(DSR_VIP), "dsr-l2"),
    (IpAddr::V4(IPIP_VIP), "ipip"),
    (IpAddr::V6(DSR_VIP6), "dsr-l2"),
    (IpAddr::V6(IPIP_VIP6), "ip6ip6"),
];

fn vips() -> Vec<IpAddr> {
    VIPS.map(|v| v.0).to_vec()
}

/// `IPv4` or `IPv6`.
fn family(a: IpAddr) -> &'static str {
    if a.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// The lab of one test, removed on drop.
struct TestLab {
    ctl: LabCtl,
}

impl Drop for TestLab {
    fn drop(&mut self) {
        match lab::down(&self.ctl.names) {
            Ok(r) => eprintln!("{}", r.summary(&self.ctl.names)),
            Err(e) => eprintln!("lab down: {e:#}"),
        }
    }
}

fn up(name: &str, nodes: usize) -> Result<TestLab> {
    let names = Names::new(name)?;
    let spec = lab::Spec {
        names: names.clone(),
        nodes,
        xdp: lab::XdpChoice::Auto,
        lb: lb_tests::daemon::lb_binary()?,
        lab_bin: env!("CARGO_BIN_EXE_lb-lab").into(),
    };
    let t = Instant::now();
    let l = TestLab {
        ctl: LabCtl::new(names, nodes, spec.lb.clone()),
    };
    lab::up(&spec, false)?;
    let st = l.ctl.status()?;
    eprintln!(
        "lab {name}: up in {:.1} s, {nodes} nodes, XDP {} mode",
        t.elapsed().as_secs_f64(),
        st["xdp_mode"].as_str().unwrap_or("?")
    );
    Ok(l)
}

impl TestLab {
    /// TCP echo (`proto` tcp) or UDP echo on both ipip VIPs (IPv4 and IPv6, which the
    /// balancer encapsulates IP6IP6), port 7, 65536 routes.
    fn add_ipip_echo(&self, proto: &str) -> Result<()> {
        for vip in [IpAddr::V4(IPIP_VIP), IpAddr::V6(IPIP_VIP6)] {
            self.ctl.cli(&[
                "vip",
                "add",
                &format!("{}/{proto}", SocketAddr::new(vip, ECHO_PORT)),
                "--mode",
                "ipip",
                "--routes",
                &ROUTES.to_string(),
            ])?;
        }
        Ok(())
    }

    fn node_list(&self) -> Vec<(u32, String)> {
        (1..=self.ctl.nodes as u32)
            .map(|i| (i, self.ctl.node_ns(i as usize)))
            .collect()
    }

    /// Load: `per_node` echo connections on each of `nodes` through each of the 4 VIPs, and
    /// 100 HTTP requests per second over the 4 VIPs.
    fn load(&self, nodes: &[u32], per_node: usize) -> Result<Load> {
        let spec = load::Spec {
            client_ns: self.ctl.names.ns("client"),
            nodes: self.node_list(),
            sources: sources(),
            echo: vips()
                .into_iter()
                .map(|vip| EchoSpec {
                    vip,
                    port: ECHO_PORT,
                    nodes: nodes.to_vec(),
                    per_node,
                })
                .collect(),
            line_every: Duration::from_millis(50),
            http_vips: vips(),
            http_rate: 100.0,
            http_workers: 6,
        };
        let l = Load::start(&spec)?;
        eprintln!(
            "load: {} long-lived connections ({per_node} per node {nodes:?} per VIP, {} VIPs), \
             100 requests/s",
            l.conns().len(),
            spec.echo.len()
        );
        Ok(l)
    }

    /// Waits until node `id` is in `state` (polling the API); when that was seen.
    fn wait_state(&self, id: u32, state: &str, timeout: Duration) -> Result<Instant> {
        Ok(self.wait_state_window(id, state, timeout)?.1)
    }

    /// [`TestLab::wait_state`], also returning when the last poll that still saw another
    /// state began: the node was in the old state at least until then.
    fn wait_state_window(
        &self,
        id: u32,
        state: &str,
        timeout: Duration,
    ) -> Result<(Instant, Instant)> {
        let mut last_other = Instant::now();
        wait_for(&format!("node {id} {state}"), timeout, || {
            let poll = Instant::now();
            let now_in = self.ctl.node_state(id)? == state;
            if !now_in {
                last_other = poll;
            }
            Ok(now_in)
        })?;
        Ok((last_other, Instant::now()))
    }
}

/// The client's source addresses, both families (the load takes those of each VIP's).
fn sources() -> Vec<IpAddr> {
    std::iter::once(CLIENT_IP)
        .chain(CLIENT_EXTRA)
        .map(IpAddr::V4)
        .chain(
            std::iter::once(CLIENT_IP6)
                .chain(CLIENT_EXTRA6)
                .map(IpAddr::V6),
        )
        .collect()
}

/// Answers per node among `reqs`, per family (`IPv4`, `IPv6`).
fn per_family_node<'a>(
    reqs: impl IntoIterator<Item = &'a Request>,
) -> BTreeMap<&'static str, BTreeMap<u32, u64>> {
    let mut m: BTreeMap<&str, Vec<&Request>> = BTreeMap::new();
    for r in reqs {
        m.entry(family(r.vip)).or_default().push(r);
    }
    m.into_iter()
        .map(|(f, rs)| (f, load::per_node(rs)))
        .collect()
}

/// Fails with every problem of these connections (a failure or lost bytes).
fn assert_conns_intact<'a>(
    r: &Report,
    conns: impl IntoIterator<Item = &'a load::Conn>,
    what: &str,
) {
    let p = r.conn_problems(conns);
    assert!(
        p.is_empty(),
        "{what}: {} connections broke or lost bytes:\n  {}\n{}",
        p.len(),
        p.join("\n  "),
        r.summary()
    );
}

fn assert_no_failed_requests(r: &Report, reqs: &[&Request], what: &str) {
    let failed: Vec<&Request> = reqs
        .iter()
        .copied()
        .filter(|q| q.outcome.is_err())
        .collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} requests failed:\n  {}\n{}",
        failed.len(),
        reqs.len(),
        r.request_problems(&failed, 10).join("\n  "),
        r.summary()
    );
}

/// Each node of `want` (id, expected share) got `n * share` answers within 5 standard
/// deviations of the binomial: a node's count of `n` flows whose hashes fall on routes it
/// owns is Binomial(n, share) (the route shares are exact to 1/65536), so a correct balancer
/// fails this with probability < 1e-6 per node. Nodes not in `want` got none.
fn assert_shares(counts: &BTreeMap<u32, u64>, want: &[(u32, f64)], what: &str) {
    let n: u64 = counts.values().sum();
    for (node, c) in counts {
        assert!(
            want.iter().any(|w| w.0 == *node),
            "{what}: node {node} answered {c} of {n}, it should have none: {counts:?}"
        );
    }
    for &(node, share) in want {
        let got = counts.get(&node).copied().unwrap_or(0);
        let expect = n as f64 * share;
        let bound = load::binomial_bound(n, share, 5.0);
        eprintln!(
            "{what}: node {node}: {got} of {n} (expected {expect:.0} +- {bound:.0}, i.e. +-{:.1}%)",
            100.0 * bound / expect
        );
        assert!(
            (got as f64 - expect).abs() <= bound,
            "{what}: node {node} answered {got} of {n}, expected {expect:.0} +- {bound:.0} (5 sigma): {counts:?}"
        );
    }
}

/// 2000 requests through each of the 4 VIPs (dsr-l2 and ipip over IPv4, dsr-l2 and ip6ip6
/// over IPv6) from the 5 source addresses of its family and the kernel's source ports: each
/// of the 3 nodes answers 1/3 of them within 5 sigma of the binomial: sigma =
/// sqrt(2000 * 1/3 * 2/3) = 21.1, so 667 +- 105 (+-15.8% of the share).
#[test]
fn distribution_within_bound() -> Result<()> {
    let l = up("lbloadlab1", 3)?;
    let client = l.ctl.names.ns("client");
    let want: Vec<(u32, f64)> = (1..=3).map(|i| (i, 1.0 / 3.0)).collect();
    for (vip, mode) in VIPS {
        let t = Instant::now();
        let counts = load::http_burst(&client, vip, &sources(), 2000, 4)?;
        eprintln!(
            "{mode} {vip}: 2000 requests in {:.1} s: {counts:?}",
            t.elapsed().as_secs_f64()
        );
        assert_shares(&counts, &want, &format!("{mode} {vip}"));
    }
    Ok(())
}

/// Node 2 of 4 vanishes (link down, then its agent, servers and decapsulator killed) under
/// load through the 4 VIPs (both modes, both families): connections on the other nodes see
/// no reset and lose no byte; node 2's own
/// connections break (its sockets are gone; the balancer sends their packets to the routes'
/// new owners, which answer with resets); new requests are disturbed (failed, or slowed by a
/// lost SYN's 1 s retransmission) only while the failure is being detected, all starting
/// within 1 s of the kill (detection is ~300 ms: 3 missed 100 ms heartbeats).
#[test]
fn failover_under_load() -> Result<()> {
    let l = up("lbloadlab2", 4)?;
    l.add_ipip_echo("tcp")?;
    let load = l.load(&[1, 2, 3, 4], 3)?;
    load.run_through(5, 100, Duration::from_secs(20))?;

    let kill = Instant::now();
    l.ctl.vanish_node(2)?;
    let detected = l.wait_state(2, "down", Duration::from_secs(5))?;
    eprintln!(
        "node 2 vanished; the API says down {:.0} ms after the kill",
        (detected - kill).as_secs_f64() * 1e3
    );
    load.run_through(10, 300, Duration::from_secs(20))?;
    let r = load.stop()?;
    eprintln!("{}", r.summary());

    assert_conns_intact(
        &r,
        r.conns.iter().filter(|c| c.node != 2),
        "connections on the surviving nodes",
    );
    // Node 2's own connections are expected to break: the node is gone.
    let on2: Vec<&load::Conn> = r.conns.iter().filter(|c| c.node == 2).collect();
    for c in &on2 {
        let f = c.failure.as_ref();
        eprintln!(
            "node 2's connection {} broke as expected: {}",
            c.id,
            f.map_or("NOT BROKEN".into(), |f| format!(
                "{} at t={:.3}s ({:.0} ms after the kill)",
                f.kind,
                r.t(f.at),
                f.at.saturating_duration_since(kill).as_secs_f64() * 1e3
            ))
        );
    }
    assert!(
        on2.iter().all(|c| c.failure.is_some()),
        "a connection on the vanished node 2 kept working?\n{}",
        r.summary()
    );

    let slow = Duration::from_millis(500);
    let disturbed: Vec<&Request> = r.requests.iter().filter(|q| q.disturbed(slow)).collect();
    let failed = disturbed.iter().filter(|q| q.outcome.is_err()).count();
    match (disturbed.first(), disturbed.last()) {
        (Some(first), Some(last)) => eprintln!(
            "requests: {} disturbed ({failed} failed, {} slower than {slow:?}) of {}; recovery: \
             first disturbed started {:+.0} ms from the kill, last {:+.0} ms: {:.0} ms first to last",
            disturbed.len(),
            disturbed.len() - failed,
            r.requests.len(),
            signed_ms(first.start, kill),
            signed_ms(last.start, kill),
            (last.start - first.start).as_secs_f64() * 1e3
        ),
        _ => eprintln!(
            "requests: none of {} failed or was slower than {slow:?}",
            r.requests.len()
        ),
    }
    // Recovery per VIP (each mode and family detects and reroutes on its own tables).
    for (vip, mode) in VIPS {
        let d: Vec<&&Request> = disturbed.iter().filter(|q| q.vip == vip).collect();
        let n = r.requests.iter().filter(|q| q.vip == vip).count();
        match (d.first(), d.last()) {
            (Some(first), Some(last)) => eprintln!(
                "  {mode} {vip}: {} of {n} disturbed, first started {:+.0} ms from the kill, \
                 last {:+.0} ms",
                d.len(),
                signed_ms(first.start, kill),
                signed_ms(last.start, kill)
            ),
            _ => eprintln!("  {mode} {vip}: none of {n} disturbed"),
        }
    }
    let late: Vec<&Request> = disturbed
        .iter()
        .copied()
        .filter(|q| q.start > kill + Duration::from_secs(1))
        .collect();
    assert!(
        late.is_empty(),
        "requests still disturbed more than 1 s after the kill:\n  {}",
        r.request_problems(&late, 10).join("\n  ")
    );
    // Requests started after the detection: none on node 2, all answered.
    let after: Vec<&Request> = r.requests_between(detected, Instant::now());
    ensure!(
        after.len() >= 300,
        "only {} requests after detection",
        after.len()
    );
    assert_no_failed_requests(&r, &after, "requests after node 2 was down");
    let counts = load::per_node(after.iter().copied());
    assert!(
        !counts.contains_key(&2),
        "node 2 answered after it was down: {counts:?}"
    );
    for vip in vips() {
        let c = load::per_node(after.iter().copied().filter(|q| q.vip == vip));
        eprintln!("answers through {vip} after the detection: {c:?}");
        assert!(
            [1, 3, 4].iter().all(|n| c.contains_key(n)),
            "{vip}: the surviving nodes did not all answer after the detection: {c:?}"
        );
    }
    Ok(())
}

fn signed_ms(at: Instant, base: Instant) -> f64 {
    if at >= base {
        (at - base).as_secs_f64() * 1e3
    } else {
        -((base - at).as_secs_f64() * 1e3)
    }
}

/// Nodes 1 and 2 up, node 3's agent stopped; under load through the 4 VIPs node 3's agent
/// starts (it is a returning node: up after the 2 s hold-down): no established connection
/// breaks, no request fails, new requests through every VIP reach node 3. Then `lb node
/// weight 1 3`: again nothing breaks, and new requests of each family shift to node 1 (3/5,
/// the others 1/5 each).
#[test]
fn join_and_weight_change_under_load() -> Result<()> {
    let l = up("lbloadlab3", 3)?;
    l.ctl.kill("agent-3", libc::SIGTERM)?;
    l.wait_state(3, "down", Duration::from_secs(5))?;
    l.add_ipip_echo("tcp")?;
    let load = l.load(&[1, 2], 3)?;
    load.run_through(5, 100, Duration::from_secs(20))?;

    let join = Instant::now();
    l.ctl.start_agent(3)?;
    let active_at = l.wait_state(3, "active", Duration::from_secs(10))?;
    eprintln!(
        "node 3's agent started; active after {:.0} ms (hold-down 2 s)",
        (active_at - join).as_secs_f64() * 1e3
    );
    let reached = wait_for(
        "a new request through every VIP answered by node 3",
        Duration::from_secs(10),
        || {
            let reqs = load.requests();
            Ok(vips().iter().all(|&vip| {
                reqs.iter()
                    .any(|q| q.vip == vip && q.start >= active_at && q.node() == Some(3))
            }))
        },
    )?;
    eprintln!(
        "node 3 answered a request through every VIP within {:.0} ms of it becoming active",
        reached.as_secs_f64() * 1e3
    );
    load.run_through(5, 100, Duration::from_secs(20))?;

    l.ctl.cli(&["node", "weight", "1", "3"])?;
    let weighted = Instant::now();
    // 300 requests of each family.
    load.run_through(10, 600, Duration::from_secs(20))?;
    let r = load.stop()?;
    eprintln!("{}", r.summary());

    assert_conns_intact(
        &r,
        &r.conns,
        "established connections through the join and the weight change",
    );
    let all: Vec<&Request> = r.requests.iter().collect();
    assert_no_failed_requests(&r, &all, "requests through the join and the weight change");
    let joined = load::per_node(r.requests_between(active_at, weighted));
    eprintln!("answers between node 3 active and the weight change: {joined:?}");
    assert!(joined.get(&3).is_some_and(|&c| c > 0), "{joined:?}");
    // Per family, so a weight applied to one family's VIPs only cannot pass.
    for (fam, after) in per_family_node(r.requests_between(weighted, Instant::now())) {
        assert_shares(
            &after,
            &[(1, 0.6), (2, 0.2), (3, 0.2)],
            &format!("{fam} requests after `lb node weight 1 3`"),
        );
    }
    Ok(())
}

/// `lb node drain 2` under load through the 4 VIPs: no request started after the command
/// returned lands on node 2, none fails, and node 2's long-lived connections (through every
/// VIP, both families) keep exchanging lines (20 more each) without a reset or a lost byte.
#[test]
fn drain_under_load() -> Result<()> {
    let l = up("lbloadlab4", 3)?;
    l.add_ipip_echo("tcp")?;
    let load = l.load(&[1, 2, 3], 3)?;
    load.run_through(5, 100, Duration::from_secs(20))?;

    l.ctl.cli(&["node", "drain", "2"])?;
    let drained = Instant::now();
    load.run_through(20, 300, Duration::from_secs(20))?;
    let n2 = l.ctl.node(2)?;
    eprintln!(
        "node 2 after the drain: state {}, open tracked flows {} (current: {})",
        n2["state"], n2["flows"], n2["flows_current"]
    );
    assert_eq!(n2["state"], "draining");
    let r = load.stop()?;
    eprintln!("{}", r.summary());

    let on2: Vec<&load::Conn> = r.conns.iter().filter(|c| c.node == 2).collect();
    for vip in vips() {
        assert!(
            on2.iter().any(|c| c.vip == vip),
            "no connection through {vip} on node 2"
        );
    }
    assert_conns_intact(
        &r,
        on2.iter().copied(),
        "node 2's connections through its drain",
    );
    assert_conns_intact(&r, &r.conns, "all connections");
    let all: Vec<&Request> = r.requests.iter().collect();
    assert_no_failed_requests(&r, &all, "requests through the drain");
    let after = r.requests_between(drained, Instant::now());
    let counts = load::per_node(after.iter().copied());
    eprintln!("answers to requests started after the drain returned: {counts:?}");
    let on_drained: Vec<&Request> = after
        .iter()
        .copied()
        .filter(|q| q.node() == Some(2))
        .collect();
    assert!(
        on_drained.is_empty(),
        "{} requests started after `lb node drain 2` returned were answered by node 2:\n  {}",
        on_drained.len(),
        r.request_problems(&on_drained, 10).join("\n  ")
    );
    for (fam, c) in per_family_node(after.iter().copied()) {
        assert!(
            c.contains_key(&1) && c.contains_key(&3),
            "{fam} answers after the drain: {c:?}"
        );
    }
    Ok(())
}

/// The daemon is killed (SIGKILL) and, later, stopped (SIGTERM) under load, and started again
/// each time the way the lab starts it: the program keeps forwarding while no daemon runs
/// (the load is made to run through each gap) and across each restart: no connection breaks
/// or loses a byte, no request fails or waits for a retransmission.
///
/// The lab starts its daemon with `--detach-on-exit` (so `lab down` leaves nothing), with
/// which a SIGTERM detaches the program by design. So after the SIGKILL the daemon is started
/// without it, making the SIGTERM the documented "exits and leaves the program forwarding";
/// after that it is started again exactly as the lab does.
#[test]
fn daemon_restart_under_load() -> Result<()> {
    let l = up("lbloadlab5", 3)?;
    l.add_ipip_echo("tcp")?;
    let load = l.load(&[1, 2, 3], 3)?;
    load.run_through(5, 100, Duration::from_secs(20))?;

    for (sig, name, detach_next) in [
        (libc::SIGKILL, "SIGKILL", false),
        (libc::SIGTERM, "SIGTERM", true),
    ] {
        l.ctl.stop_daemon(sig)?;
        let link = l.ctl.names.pin_dir().join("link-eth0");
        ensure!(link.exists(), "{} is gone after {name}", link.display());
        // Forwarding with no daemon at all.
        load.run_through(5, 50, Duration::from_secs(20))?;
        let log_from = l.ctl.log("daemon").len();
        let took = l.ctl.start_daemon(detach_next, 3)?;
        let log = l.ctl.log("daemon")[log_from..].to_string();
        ensure!(
            log.contains("re-adopted the XDP link on eth0: program replaced atomically"),
            "the restarted daemon did not swap its program into the pinned link:\n{log}"
        );
        eprintln!(
            "daemon {name}ed; load ran through the gap; restarted{} and ready with 3 nodes in {:.0} ms",
            if detach_next {
                " (as the lab does)"
            } else {
                " (without --detach-on-exit)"
            },
            took.as_secs_f64() * 1e3
        );
        load.run_through(5, 50, Duration::from_secs(20))?;
    }
    let r = load.stop()?;
    eprintln!("{}", r.summary());
    assert_conns_intact(&r, &r.conns, "connections through the daemon restarts");
    let all: Vec<&Request> = r.requests.iter().collect();
    assert_no_failed_requests(&r, &all, "requests through the daemon restarts");
    let slow: Vec<&Request> = all
        .iter()
        .copied()
        .filter(|q| q.latency() > Duration::from_millis(900))
        .collect();
    assert!(
        slow.is_empty(),
        "requests that waited for a retransmission (a lost packet):\n  {}",
        r.request_problems(&slow, 10).join("\n  ")
    );
    Ok(())
}

/// Node 1's agent restarts (SIGTERM, then started again at once: a new incarnation) while
/// connections are open on node 1. The daemon's restart policy is the default,
/// `RestartPolicy::HoldDown` (`membership.rs`; `sync_membership` configures no other;
/// docs/heartbeat.md: "by default a restart of an up node also takes it down
/// (`NodeDown{Restarted}`) and through the hold-down"), so: `NodeRestarted` and
/// `NodeDown{Restarted}` are logged, no new request lands on node 1 while it is held down,
/// it is active again no sooner than the 2 s hold-down, then takes new requests again; the
/// other nodes' connections do not notice.
///
/// And the rule the restart must keep: the node itself stayed up (only its agent restarted),
/// so the flows established on it must not break: taking a node out of the tables stops new
/// flows, it must not cut the ones it serves. (This part fails with the daemon as it is: the
/// restart is handled like a failure, see the assertion's message.)
#[test]
fn agent_restart_with_open_connections() -> Result<()> {
    let l = up("lbloadlab6", 3)?;
    l.add_ipip_echo("tcp")?;
    let load = l.load(&[1, 2, 3], 3)?;
    load.run_through(5, 100, Duration::from_secs(20))?;
    let log_from = l.ctl.log("daemon").len();

    let reroutes = || -> Result<u64> {
        Ok(l.ctl.cli_json(&["stats"])?["events"]["ct_reroute"]
            .as_u64()
            .unwrap_or(0))
    };
    let reroutes_before = reroutes()?;
    let restart = Instant::now();
    l.ctl.kill("agent-1", libc::SIGTERM)?;
    l.ctl.start_agent(1)?;
    let restarted_in = restart.elapsed();
    // Held down after the restart: drained in the tables (docs/control-plane.md, "Agent
    // restart"), so its tracked connections stay and no new flow reaches it.
    let down_at = l.wait_state(1, "draining", Duration::from_secs(5))?;
    let moved: Vec<String> = l
        .ctl
        .cli_json(&["vip", "list"])?
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| format!("{} {} moved", v["name"], v["moved"]))
                .collect()
        })
        .unwrap_or_default();
    eprintln!("while node 1 is held down: {}", moved.join(", "));
    // Node 1 was down at least from `down_at` to `still_down`.
    let (still_down, up_at) = l.wait_state_window(1, "active", Duration::from_secs(10))?;
    eprintln!(
        "agent 1 restarted in {:.0} ms; node 1 seen down {:.0} ms after the restart began, \
         active again {:.0} ms after that",
        restarted_in.as_secs_f64() * 1e3,
        (down_at - restart).as_secs_f64() * 1e3,
        (up_at - down_at).as_secs_f64() * 1e3
    );
    let back = wait_for(
        "a new request answered by node 1",
        Duration::from_secs(10),
        || {
            Ok(load
                .requests()
                .iter()
                .any(|q| q.start >= up_at && q.node() == Some(1)))
        },
    )?;
    eprintln!(
        "node 1 answered a new request {:.0} ms after it was active",
        back.as_secs_f64() * 1e3
    );
    load.run_through(10, 100, Duration::from_secs(20))?;
    let r = load.stop()?;
    eprintln!("{}", r.summary());
    eprintln!(
        "conntrack re-routes (tracked flows of a DOWN node sent to the route's new owner) \
         during the restart: {}",
        reroutes()? - reroutes_before
    );

    let log = l.ctl.log("daemon")[log_from..].to_string();
    let events: Vec<&str> = log.lines().filter(|l| l.contains("node: 1")).collect();
    eprintln!("daemon log, node 1:\n  {}", events.join("\n  "));
    assert!(
        log.contains("NodeRestarted { node: 1"),
        "no NodeRestarted:\n{log}"
    );
    assert!(
        log.contains("NodeDown { node: 1, reason: Restarted }"),
        "the restart did not take node 1 down with reason Restarted (HoldDown):\n{log}"
    );
    // Held down for the whole hold-down: from the daemon's own timestamps of the two events.
    let at = |needle: &str| -> Result<f64> {
        let line = log
            .lines()
            .find(|l| l.contains(needle))
            .with_context(|| format!("no {needle:?} in the daemon log:\n{log}"))?;
        log_seconds(line).with_context(|| format!("no time in {line:?}"))
    };
    let held_for = (at("NodeUp { node: 1")? - at("NodeDown { node: 1, reason: Restarted }")?)
        .rem_euclid(86400.0);
    eprintln!(
        "the daemon held node 1 down for {:.3} s (hold-down 2 s)",
        held_for
    );
    assert!(
        // The log stamps lines when written; the hold-down runs from the restarting
        // heartbeat's kernel arrival time, a few ms earlier.
        (1.95..3.0).contains(&held_for),
        "node 1 was held down {held_for:.3} s, not the 2 s hold-down (+ a heartbeat)"
    );
    let held: Vec<&Request> = r
        .requests_between(down_at, still_down)
        .into_iter()
        .filter(|q| q.end <= still_down && q.node() == Some(1))
        .collect();
    assert!(
        held.is_empty(),
        "new requests landed on node 1 while it was held down:\n  {}",
        r.request_problems(&held, 10).join("\n  ")
    );
    assert_conns_intact(
        &r,
        r.conns.iter().filter(|c| c.node != 1),
        "connections on nodes 2 and 3",
    );
    // Requests that did not touch node 1 (answered elsewhere, or failed without being on it
    // during the restart) must all succeed.
    let others: Vec<&Request> = r
        .requests
        .iter()
        .filter(|q| q.end < restart || q.start > up_at || q.node().is_some())
        .collect();
    assert_no_failed_requests(&r, &others, "requests away from node 1's restart");

    // The node stayed up: its established flows must survive the restart of its agent.
    let on1: Vec<&load::Conn> = r.conns.iter().filter(|c| c.node == 1).collect();
    assert!(!on1.is_empty());
    let p = r.conn_problems(on1.iter().copied());
    assert!(
        p.is_empty(),
        "node 1 stayed up (only its agent restarted), yet {} of its {} established connections \
         broke:\n  {}",
        p.len(),
        on1.len(),
        p.join("\n  ")
    );
    let all: Vec<&Request> = r.requests.iter().collect();
    assert_no_failed_requests(&r, &all, "requests through node 1's agent restart");
    Ok(())
}

/// UDP echo through both modes and both families: 1000 datagrams to each of
/// 198.18.100.1:7/udp (dsr-l2), 198.18.100.2:7/udp (ipip, added at run time),
/// [2001:db8:100::1]:7/udp (dsr-l2) and [2001:db8:100::2]:7/udp (ip6ip6, added at run time),
/// each from a new socket (a new source port), the 5 source addresses of the VIP's family:
/// every one answered with its own bytes, and the datagrams the nodes' stacks received
/// (`Udp: InDatagrams` plus `Udp6InDatagrams` in each node namespace) add up to them and are
/// spread 1/3 each within 5 sigma (333 +- 75, +-22%).
#[test]
fn udp_echo_through_both_modes() -> Result<()> {
    let l = up("lbloadlab7", 3)?;
    l.add_ipip_echo("udp")?;
    let client = l.ctl.names.ns("client");
    let want: Vec<(u32, f64)> = (1..=3).map(|i| (i, 1.0 / 3.0)).collect();
    for (vip, mode) in VIPS {
        let before: Vec<u64> = (1..=3)
            .map(|i| load::udp_in_datagrams(&l.ctl.node_ns(i)))
            .collect::<Result<_>>()?;
        let t = Instant::now();
        let res = load::udp_burst(&client, vip, ECHO_PORT, &sources(), 1000)?;
        let after: Vec<u64> = (1..=3)
            .map(|i| load::udp_in_datagrams(&l.ctl.node_ns(i)))
            .collect::<Result<_>>()?;
        let counts: BTreeMap<u32, u64> = (1..=3u32)
            .map(|i| (i, after[i as usize - 1] - before[i as usize - 1]))
            .collect();
        eprintln!(
            "{mode} {}/udp: {} sent, {} answered, {} mismatched in {:.1} s; received per node {counts:?}",
            SocketAddr::new(vip, ECHO_PORT),
            res.sent,
            res.answered,
            res.mismatched,
            t.elapsed().as_secs_f64()
        );
        assert_eq!(
            (res.answered, res.mismatched),
            (res.sent, 0),
            "{mode}: unanswered {:?}",
            res.unanswered
        );
        assert_eq!(
            counts.values().sum::<u64>(),
            res.sent,
            "{mode}: the nodes received {counts:?}, not the {} datagrams sent",
            res.sent
        );
        assert_shares(&counts, &want, &format!("{mode} {vip} UDP"));
    }
    // Heartbeats and the daemon are unaffected: all nodes still active.
    let st = l.ctl.status()?;
    ensure!(
        st["nodes"]["active"].as_u64() == Some(3),
        "nodes after the UDP bursts: {}",
        st["nodes"]
    );
    Ok(())
}
