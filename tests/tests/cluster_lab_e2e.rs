//! The cluster lab as `cargo xtask lab up --balancers N` runs it (`lb-lab up --balancers N`),
//! end to end (root): `up` with 3 balancers, then the client's HTTP requests to the VIPs reach
//! every node through the router and every balancer, every balancer's `lb status` shows one
//! revision and digest, the router has 3 next hops per VIP, `lb-lab status` says so; a balancer
//! stopped as the banner says leaves the router's routes; `lb-lab down` leaves nothing (no
//! namespaces, processes, pins, locks, /run directories), also after every process was killed.
//!
//! The lab here is named `lbtclab` (namespaces `lbtclab-*`, `/run/lbtclab/`, instances
//! `lbtclab-lbI`), never the default `lb-lab`: a lab someone is running is not touched.
use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_tests::{
    cluster_lab::{ClusterLab, balancer_ip, balancer_ip6},
    lab::{self, DSR_VIP, DSR_VIP6, HTTP_PORT, LabProcess, Names},
};

const NAME: &str = "lbtclab";
const BALANCERS: usize = 3;
const NODES: usize = 3;

fn names() -> Names {
    Names::new(NAME).unwrap()
}

fn lb() -> PathBuf {
    lb_tests::daemon::lb_binary().unwrap()
}

/// `lb-lab --name lbtclab ARGS` (the binary cargo built next to this test).
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

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    while !f()? {
        if start.elapsed() > timeout {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn alive(pid: u32) -> bool {
    lab::alive(pid)
}

/// Balancer `i`'s API socket, as the banner names it.
fn socket(i: usize) -> PathBuf {
    names().run_dir().join(format!("lb{i}/lb.sock"))
}

/// `lb ARGS --json --socket <balancer i's>`, parsed.
fn lb_json(i: usize, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new(lb())
        .args(args)
        .arg("--json")
        .arg("--socket")
        .arg(socket(i))
        .stdin(Stdio::null())
        .output()?;
    ensure!(
        out.status.success(),
        "lb {} (balancer {i}): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Packets balancer `i` forwarded for the VIP called `vip` (`lb stats`).
fn vip_packets(i: usize, vip: &str) -> Result<u64> {
    let s = lb_json(i, &["stats"])?;
    let v = s["vips"]
        .as_array()
        .and_then(|a| a.iter().find(|v| v["name"] == vip))
        .with_context(|| format!("no VIP {vip} in balancer {i}'s lb stats: {s}"))?;
    Ok(v["packets"].as_u64().unwrap_or(0))
}

/// GETs `http://vip/` from the client (a new connection, so a new source port, each time)
/// until every node has answered and every balancer has forwarded some of them (the router's
/// L4 hash spreads the connections); returns the answers per node and the packets per
/// balancer.
fn answers_through_every_balancer(vip: IpAddr) -> Result<(Vec<u32>, Vec<u64>)> {
    let name = format!("{}/tcp", SocketAddr::new(vip, HTTP_PORT));
    let before: Vec<u64> = (1..=BALANCERS)
        .map(|i| vip_packets(i, &name))
        .collect::<Result<_>>()?;
    let client = names().ns("client");
    let mut counts = vec![0u32; NODES];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for _ in 0..10 {
            let body = lab::http_get_ip_in(&client, vip, HTTP_PORT, None)
                .with_context(|| format!("GET http://{name}"))?;
            let node: usize = body
                .trim()
                .strip_prefix("node ")
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("{name} answered {body:?}"))?;
            ensure!((1..=NODES).contains(&node), "answer from node {node}?");
            counts[node - 1] += 1;
        }
        let carried: Vec<u64> = (1..=BALANCERS)
            .map(|i| Ok(vip_packets(i, &name)? - before[i - 1]))
            .collect::<Result<_>>()?;
        if !counts.contains(&0) && !carried.contains(&0) {
            return Ok((counts, carried));
        }
        ensure!(
            Instant::now() < deadline,
            "{name}: answers per node {counts:?}, packets per balancer {carried:?}"
        );
    }
}

/// Every path of balancer instances the lab's daemons create outside `/run/<name>`: pins and
/// lock files.
fn instance_paths() -> Vec<PathBuf> {
    let n = names();
    (1..=BALANCERS)
        .flat_map(|i| {
            let inst = n.balancer_instance(i);
            [
                Path::new("/sys/fs/bpf").join(&inst),
                Path::new("/run/lb").join(format!("{inst}.lock")),
            ]
        })
        .collect()
}

fn assert_nothing_left(pids: &[LabProcess]) {
    let n = names();
    let left = lab::leftovers(&n);
    assert!(left.is_empty(), "left after down: {left:?}");
    for p in pids {
        assert!(!alive(p.pid), "{} ({}) still runs", p.pid, p.what);
    }
    assert!(lab::lab_namespaces(&n).is_empty());
    for path in instance_paths().into_iter().chain([n.run_dir()]) {
        assert!(!path.exists(), "{} still exists", path.display());
    }
}

#[test]
fn cluster_lab_up_serves_through_the_router_and_down_leaves_nothing() -> Result<()> {
    lab::require_root()?;
    let _cleanup = Cleanup;
    let n = names();
    let t0 = Instant::now();
    let up = lab_ok(&["up", "--balancers", "3"])?;
    let took = t0.elapsed();
    // The banner: the VIPs from the client, each balancer's `lb status`, the router's route,
    // how to stop a balancer.
    for want in [
        format!("ip netns exec {NAME}-client curl http://{DSR_VIP}/"),
        format!("ip netns exec {NAME}-client curl -6 'http://[{DSR_VIP6}]/'"),
        format!("ip -n {NAME}-router route show {DSR_VIP}"),
        format!("ip -6 -n {NAME}-router route show {DSR_VIP6}"),
        format!("status --socket {}", socket(1).display()),
        format!("status --socket {}", socket(3).display()),
        format!("nsenter --net=/run/netns/{NAME}-lb2 "),
    ] {
        assert!(up.contains(&want), "no {want:?} in:\n{up}");
    }
    let pid2 = lab::pid_alive_by_file(&n, "lb-lb2").context("no lb-lb2 running")?;
    assert!(up.contains(&format!("kill {pid2} ")), "{up}");

    // A second `up`, cluster or single, is refused and changes nothing.
    for args in [&["up", "--balancers", "3"][..], &["up"]] {
        let again = lab_cmd(args)?;
        assert!(!again.status.success());
        assert!(String::from_utf8_lossy(&again.stderr).contains("already up"));
    }

    let status = lab_ok(&["status"])?;
    assert!(
        status.contains("cluster of 3 balancers and 3 nodes"),
        "{status}"
    );
    assert!(
        status.contains("up: every balancer runs revision"),
        "{status}"
    );

    // One revision and one digest everywhere, one leader, every node active, both VIP
    // addresses announced.
    let st: Vec<serde_json::Value> = (1..=BALANCERS)
        .map(|i| lb_json(i, &["status"]))
        .collect::<Result<_>>()?;
    let c0 = &st[0]["cluster"];
    assert!(c0["revision"].as_i64().unwrap_or(0) > 0, "{c0}");
    assert_eq!(c0["digest"].as_str().map_or(0, str::len), 64, "{c0}");
    let leader = c0["leader"].as_str().context("no leader")?;
    for s in &st {
        let c = &s["cluster"];
        assert_eq!(
            (&c["revision"], &c["digest"], &c["leader"]),
            (&c0["revision"], &c0["digest"], &c0["leader"]),
            "{s}"
        );
        assert_eq!(c["balancers"].as_array().map(Vec::len), Some(BALANCERS));
        assert_eq!(s["nodes"]["active"], NODES);
        let ann: BTreeSet<&str> = s["bgp_announced"]
            .as_array()
            .context("bgp_announced")?
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(
            ann,
            [DSR_VIP.to_string(), DSR_VIP6.to_string()]
                .iter()
                .map(String::as_str)
                .collect()
        );
    }
    let leading: Vec<usize> = (1..=BALANCERS)
        .filter(|&i| st[i - 1]["cluster"]["leading"] == true)
        .collect();
    assert_eq!(leading.len(), 1, "leading: {leading:?}");
    assert_eq!(leader, format!("lb{}", leading[0]));
    println!(
        "cluster lab up in {} ms: leader {leader}, revision {} on every balancer",
        took.as_millis(),
        c0["revision"]
    );

    // The router: a next hop per balancer for each VIP address (`ip -j route show exact`).
    let cl = ClusterLab::attach(n.clone(), BALANCERS, NODES)?;
    let want4: BTreeSet<IpAddr> = (1..=BALANCERS).map(|i| balancer_ip(i).into()).collect();
    let want6: BTreeSet<IpAddr> = (1..=BALANCERS).map(|i| balancer_ip6(i).into()).collect();
    assert_eq!(cl.ecmp_nexthops(DSR_VIP.into())?, want4);
    assert_eq!(cl.ecmp_nexthops(DSR_VIP6.into())?, want6);

    // The client reaches every node through the router and every balancer.
    for vip in [IpAddr::from(DSR_VIP), IpAddr::from(DSR_VIP6)] {
        let (nodes, balancers) = answers_through_every_balancer(vip)?;
        println!("{vip}: answers per node {nodes:?}, packets per balancer {balancers:?}");
    }

    // Balancer 2 stopped as the banner says (SIGTERM): it withdraws, the router keeps 1 and
    // 3, the status says the lab is degraded, the VIPs still answer.
    // SAFETY: kill(2) of the lab's balancer 2 daemon, just seen alive by its pid file.
    unsafe { libc::kill(pid2 as i32, libc::SIGTERM) };
    let t1 = Instant::now();
    let rest: BTreeSet<usize> = [1, 3].into();
    let gone = cl.wait_nexthops(
        &[DSR_VIP.into(), DSR_VIP6.into()],
        &rest,
        Duration::from_secs(10),
    )?;
    println!(
        "balancer 2 stopped: out of the router's routes {} ms later",
        gone.as_millis()
    );
    wait_until("balancer 2's daemon gone", Duration::from_secs(10), || {
        Ok(!alive(pid2))
    })?;
    let degraded = lab_cmd(&["status"])?;
    let text = String::from_utf8_lossy(&degraded.stdout);
    assert!(!degraded.status.success(), "{text}");
    assert!(text.contains("balancer 2: not answering"), "{text}");
    assert!(text.contains("DEGRADED: 2 of 3 balancers answer"), "{text}");
    let client = n.ns("client");
    for vip in [IpAddr::from(DSR_VIP), IpAddr::from(DSR_VIP6)] {
        for _ in 0..10 {
            lab::http_get_ip_in(&client, vip, HTTP_PORT, None)?;
        }
    }
    println!("{} ms from SIGTERM to checked", t1.elapsed().as_millis());

    let pids = lab::lab_processes(&n);
    // etcd, the router's bird; per balancer bird and (but the stopped one) lb run; per node
    // the agent and the servers.
    assert_eq!(pids.len(), 2 + 2 * BALANCERS - 1 + 2 * NODES, "{pids:?}");
    for p in instance_paths() {
        assert!(p.exists(), "{} is missing while the lab runs", p.display());
    }
    let t2 = Instant::now();
    let down = lab_ok(&["down"])?;
    println!("lb-lab down: {} ms", t2.elapsed().as_millis());
    assert!(
        down.contains(&format!(
            "stopped {} processes, deleted {} namespaces",
            pids.len(),
            3 + BALANCERS + NODES
        )),
        "{down}"
    );
    assert_nothing_left(&pids);
    assert!(lab_ok(&["down"])?.contains("nothing to remove"));
    let status = lab_cmd(&["status"])?;
    assert!(!status.status.success());
    assert!(String::from_utf8_lossy(&status.stdout).contains("down (nothing of it exists)"));
    Ok(())
}

/// kill -9 of every process of a cluster lab: namespaces, the daemons' pins (their programs
/// stay attached) and locks, and /run/<name> stay behind, `status` says so, and `down`
/// removes all of it.
#[test]
fn cluster_lab_down_after_a_crash_leaves_nothing() -> Result<()> {
    lab::require_root()?;
    let _cleanup = Cleanup;
    let n = names();
    lab_ok(&["up", "--balancers", "3", "--nodes", "2"])?;
    let pids = lab::lab_processes(&n);
    ensure!(!pids.is_empty(), "no lab processes to kill");
    for p in &pids {
        // SAFETY: kill(2) of a lab process.
        unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
    }
    wait_until("the killed processes gone", Duration::from_secs(5), || {
        Ok(pids.iter().all(|p| !alive(p.pid)))
    })?;
    for p in instance_paths() {
        assert!(p.exists(), "{} is missing after the crash", p.display());
    }
    let status = lab_cmd(&["status"])?;
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(!status.status.success(), "status of a crashed lab says up");
    assert!(text.contains("etcd=DEAD"), "{text}");
    assert!(text.contains("DEGRADED: no balancer answers"), "{text}");

    let down = lab_ok(&["down"])?;
    assert!(
        down.contains(&format!("deleted {} namespaces", 3 + BALANCERS + 2)),
        "{down}"
    );
    assert_nothing_left(&pids);
    Ok(())
}
