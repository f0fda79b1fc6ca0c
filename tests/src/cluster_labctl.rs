//! The cluster lab as `lb-lab up --balancers N` runs it (`cargo xtask lab up --balancers N`):
//! [`crate::cluster_lab`]'s topology (client, router with bird2 ECMP over BGP+BFD, N
//! balancers with bird2, nodes, etcd) with `lb run` in cluster mode on every balancer
//! (`[cluster]` on the lab's etcd, `[bgp]` through its bird) and every node's `lb agent` beating
//! to all of them. Like the single-balancer lab it stays up after `up` returns (or in the
//! foreground until Ctrl-C), records itself in `/run/<name>/lab.json` (with its balancer
//! count), and `lab::down` removes it, also after a crash (the balancers' instance pins and
//! locks are among `lab::Names`' paths).
use std::{
    fs,
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use crate::{
    cluster_lab::{self, BRIDGE_IP, ClusterLab, ClusterSpec, ETCD_PORT, MAX_BALANCERS},
    lab::{self, DSR_VIP, DSR_VIP6, ECHO_PORT, HTTP_PORT, Names, ROUTES, Recorded},
};

/// What `lb-lab up --balancers N` builds.
#[derive(Clone, Debug)]
pub struct UpSpec {
    pub names: Names,
    /// 2..=8.
    pub balancers: usize,
    /// 1..=8.
    pub nodes: usize,
    /// The `lb` binary the balancers and agents run.
    pub lb: PathBuf,
    /// The `lb-lab` binary (the nodes' servers).
    pub lab_bin: PathBuf,
}

/// Why the cluster lab's balancers run generic XDP (what `lab.json` and `status` say).
const XDP_WHY: &str = "the cluster lab's balancers run generic XDP (native XDP_TX on a veth \
                       needs an XDP program on its bridge-side peer, which this lab does not set up)";

/// The VIP addresses the cluster lab's balancers serve (its dsr-l2 VIPs: HTTP on 80, TCP
/// and UDP echo on 7).
pub fn vips() -> [IpAddr; 2] {
    [IpAddr::V4(DSR_VIP), IpAddr::V6(DSR_VIP6)]
}

/// Builds the cluster lab, starts the daemons and agents and waits until every balancer runs
/// one revision, the router has every balancer as a next hop for every VIP and the VIPs
/// answer from the client; then prints how to use it. Without `foreground` it returns, leaving
/// the lab running (a failure once the daemons start leaves it for a look; one while building
/// the network, birds and etcd removes it); with it, it runs until SIGINT, SIGTERM or SIGHUP,
/// then removes the lab.
pub fn up(spec: &UpSpec, foreground: bool) -> Result<()> {
    lab::require_root()?;
    ensure!(
        (2..=MAX_BALANCERS).contains(&spec.balancers),
        "--balancers {}: a cluster lab has 2 to {MAX_BALANCERS} balancers (without \
         --balancers, the single-balancer lab runs)",
        spec.balancers
    );
    ensure!(
        (1..=cluster_lab::MAX_NODES).contains(&spec.nodes),
        "--nodes {}: a cluster lab has 1 to {} nodes",
        spec.nodes,
        cluster_lab::MAX_NODES
    );
    for (what, p) in [("lb", &spec.lb), ("lb-lab", &spec.lab_bin)] {
        ensure!(
            p.is_file(),
            "{what} binary {} is missing: build it (`cargo xtask lab up` does)",
            p.display()
        );
    }
    let n = &spec.names;
    lab::refuse_if_up(n)?;
    lab::ensure_bpffs()?;
    if foreground {
        lab::catch_signals();
    }
    let started = Instant::now();
    // A failure while building drops the lab, which removes it (an earlier lab's leftovers are
    // removed first).
    let mut cl = ClusterLab::new(&ClusterSpec {
        name: n.name.clone(),
        balancers: spec.balancers,
        nodes: spec.nodes,
        lab_bin: spec.lab_bin.clone(),
    })?;
    let rec = Recorded {
        nodes: spec.nodes,
        xdp_mode: "generic".into(),
        xdp_why: XDP_WHY.into(),
        lb: spec.lb.clone(),
        foreground,
        balancers: spec.balancers,
    };
    let result = start(&mut cl, spec, &rec);
    if let Err(e) = result {
        if foreground {
            return Err(e); // `cl` drops: the lab is removed.
        }
        eprintln!(
            "lab: error: {e:#}\nlab: the lab is left as it is for a look (logs in {}); \
             `cargo xtask lab down` removes it",
            n.log_dir().display()
        );
        cl.keep_running();
        return Err(e);
    }
    print_banner(&cl, spec, &rec, started.elapsed());
    // From here on the lab lives on its own; `lab::down` removes it (with SIGTERM: each
    // daemon withdraws its VIPs and leaves the cluster).
    cl.keep_running();
    if !foreground {
        return Ok(());
    }
    // Balancers seen gone, so each death (or stop: the banner says how) is said once.
    let mut gone = vec![false; spec.balancers];
    while !lab::stop_requested() {
        for (i, was_gone) in (1..).zip(gone.iter_mut()) {
            let alive = lab::pid_alive_by_file(n, &format!("lb-lb{i}")).is_some();
            if !alive && !*was_gone {
                println!(
                    "lab: balancer {i}'s lb run is gone (its log: {})",
                    n.log_dir().join(format!("lb-lb{i}.log")).display()
                );
            }
            *was_gone = !alive;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("lab: tearing down");
    println!("{}", lab::down(n)?.summary(n));
    Ok(())
}

/// The part of `up` after the network, birds, servers and etcd: the record, the daemons and
/// agents, and the waits.
fn start(cl: &mut ClusterLab, spec: &UpSpec, rec: &Recorded) -> Result<()> {
    let n = &spec.names;
    fs::set_permissions(n.run_dir(), fs::Permissions::from_mode(0o700))?;
    fs::write(n.lab_file(), serde_json::to_vec_pretty(rec)?)
        .with_context(|| format!("writing {}", n.lab_file().display()))?;
    let stop = || -> Result<()> {
        ensure!(!lab::stop_requested(), "interrupted");
        Ok(())
    };
    let t0 = Instant::now();
    for i in 1..=spec.balancers {
        cl.start_daemon(&spec.lb, i, ROUTES)?;
        stop()?;
    }
    for j in 1..=spec.nodes {
        cl.start_agent(&spec.lb, j)?;
    }
    let all: Vec<usize> = (1..=spec.balancers).collect();
    let (rev, _) = cl.wait_converged(&spec.lb, &all, spec.nodes, Duration::from_secs(60))?;
    stop()?;
    cl.wait_nexthops(
        &vips(),
        &all.iter().copied().collect(),
        Duration::from_secs(20),
    )?;
    println!(
        "lab: {} balancers on revision {rev} with {} nodes active, announcing, every one a \
         next hop at the router: {} ms after the first lb run",
        spec.balancers,
        spec.nodes,
        t0.elapsed().as_millis()
    );
    let client = cl.client_ns();
    for vip in vips() {
        lab::wait_for(
            &format!(
                "http://{}/ from the client",
                SocketAddr::new(vip, HTTP_PORT)
            ),
            Duration::from_secs(10),
            || {
                stop()?;
                Ok(lab::http_get_ip_in(&client, vip, HTTP_PORT, None).is_ok())
            },
        )?;
    }
    Ok(())
}

fn print_banner(cl: &ClusterLab, spec: &UpSpec, rec: &Recorded, took: Duration) {
    let n = &spec.names;
    let c = cl.client_ns();
    let router = cl.router_ns();
    let lb = spec.lb.display();
    let status: Vec<Option<serde_json::Value>> = (1..=spec.balancers)
        .map(|i| cl.lb_status(&spec.lb, i).ok())
        .collect();
    let cluster = status.iter().flatten().next().map(|s| &s["cluster"]);
    let leader = cluster
        .and_then(|c| c["leader"].as_str())
        .unwrap_or("?")
        .to_string();
    let revision = cluster.map_or(serde_json::Value::Null, |c| c["revision"].clone());
    let digest = cluster.and_then(|c| c["digest"].as_str()).unwrap_or("?");
    let mut balancers = String::new();
    for i in 1..=spec.balancers {
        let sock = cl.api_socket(i);
        balancers += &format!(
            "  {lb} status --socket {}      # balancer {i} (lb{i}, {}){}\n",
            sock.display(),
            cluster_lab::balancer_ip(i),
            if leader == format!("lb{i}") {
                ": the leader"
            } else {
                ""
            }
        );
    }
    let sock1 = cl.api_socket(1);
    let sock1 = sock1.display();
    let pid_of = |i: usize| {
        lab::pid_alive_by_file(n, &format!("lb-lb{i}")).map_or("?".into(), |p| p.to_string())
    };
    let stop = if rec.foreground {
        "Ctrl-C stops the balancers and removes the lab."
    } else {
        "`cargo xtask lab down` removes it; `cargo xtask lab status` shows it."
    };
    println!(
        r#"
lab: up in {secs:.1} s: {b} balancers (`lb run` in cluster mode, XDP generic) behind the router
     in namespace {router} (bird2: BGP + BFD to each balancer's bird2, ECMP on the L4 hash),
     {nodes} nodes, etcd on http://{BRIDGE_IP}:{ETCD_PORT}; leader {leader}, every balancer
     on revision {revision} (digest {short})

Reach the VIPs from the client namespace (the router spreads connections over the balancers):
  ip netns exec {c} curl http://{DSR_VIP}/      # "node N" says which node answered
  ip netns exec {c} curl -6 'http://[{DSR_VIP6}]/'
  ip netns exec {c} bash -c 'exec 3<>/dev/tcp/{DSR_VIP}/{ECHO_PORT}; echo hello >&3; head -1 <&3'   # TCP echo
  ip netns exec {c} bash -c 'exec 3<>/dev/udp/{DSR_VIP}/{ECHO_PORT}; echo hello >&3; timeout 1 head -1 <&3'   # UDP echo

The router's ECMP routes (a next hop per balancer announcing the VIP):
  ip -n {router} route show {DSR_VIP}
  ip -6 -n {router} route show {DSR_VIP6}
  birdc -s {rsock} show protocols      # its BGP sessions

Each balancer (`lb status --json`: `cluster` has the leader, revision and digest of the tables,
the same everywhere; `cargo xtask lab status` shows them for all):
{balancers}  {lb} node drain 2 --socket {sock1}      # a change on any balancer: the next revision everywhere
  {lb} stats --socket {sock1}      # what this balancer forwarded (its share of the client's flows)

Kill a balancer and watch the others and the router (`lb status`, `ip route` above):
  kill {pid2}      # balancer 2's lb run (SIGTERM): it withdraws the VIPs and leaves the cluster
  kill -9 {pid1}      # balancer 1's lb run crashes: its program forwards on; if it led, another leads within 2 s
  nsenter --net=/run/netns/{ns2} {lb} run --iface eth0 --config {cfg2} --state-dir {state2}   # balancer 2 again (`ip netns exec` would hide its pins: it remounts /sys)

Files: {run} (key, lbI/: lb.toml, state/, bird.conf, vips.conf; router/, etcd/, logs/, pids/). {stop}
"#,
        secs = took.as_secs_f64(),
        b = spec.balancers,
        nodes = spec.nodes,
        short = digest.get(..16).unwrap_or(digest),
        rsock = cl.router_socket().display(),
        pid1 = pid_of(1),
        pid2 = pid_of(2),
        ns2 = cl.balancer_ns(2),
        cfg2 = cl.balancer_dir(2).join("lb.toml").display(),
        state2 = cl.balancer_dir(2).join("state").display(),
        run = n.run_dir().display(),
    );
}

/// `lb-lab status` of a cluster lab: namespaces, processes, each balancer's cluster status
/// (leader, revision, digest, nodes, announcements) and the router's next hops; true when all
/// is up and every balancer runs one revision with every node active.
pub fn status(n: &Names, lb: &Path, rec: &Recorded) -> Result<bool> {
    println!(
        "lab {}: cluster of {} balancers and {} nodes behind a router, XDP {} mode{}",
        n.name,
        rec.balancers,
        rec.nodes,
        rec.xdp_mode,
        if rec.foreground {
            " (run in the foreground)"
        } else {
            ""
        }
    );
    let mut want_ns = vec![n.ns("br"), n.ns("client"), n.ns("router")];
    want_ns.extend((1..=rec.balancers).map(|i| n.ns(&format!("lb{i}"))));
    want_ns.extend((1..=rec.nodes).map(|j| n.ns(&format!("node{j}"))));
    // The balancers' daemons are judged by their API below (one restarted by hand, as the
    // banner shows, has no pid file).
    let mut roles = vec!["etcd".to_string(), "bird-router".into()];
    roles.extend((1..=rec.balancers).map(|i| format!("bird-lb{i}")));
    for j in 1..=rec.nodes {
        roles.extend([format!("agent-{j}"), format!("serve-{j}")]);
    }
    let mut ok = lab::print_present(n, &want_ns, &roles);
    let cl = ClusterLab::attach(n.clone(), rec.balancers, rec.nodes)?;
    let mut runs = Vec::new();
    for i in 1..=rec.balancers {
        match cl.lb_status(lb, i) {
            Ok(s) => {
                let c = &s["cluster"];
                let digest = c["digest"].as_str().unwrap_or("?");
                println!(
                    "  balancer {i} ({}, pid {}): leader {}{}, revision {}, digest {}, {} live \
                     balancers, nodes {} active / {} draining / {} down, announcing {}",
                    c["id"].as_str().unwrap_or("?"),
                    s["pid"],
                    c["leader"].as_str().unwrap_or("none"),
                    if c["leading"] == true {
                        " (this one)"
                    } else {
                        ""
                    },
                    c["revision"],
                    digest.get(..16).unwrap_or(digest),
                    c["balancers"].as_array().map_or(0, Vec::len),
                    s["nodes"]["active"],
                    s["nodes"]["draining"],
                    s["nodes"]["down"],
                    s["bgp_announced"]
                        .as_array()
                        .map(|a| a
                            .iter()
                            .filter_map(|v| v.as_str())
                            .collect::<Vec<_>>()
                            .join(" "))
                        .filter(|a| !a.is_empty())
                        .unwrap_or_else(|| "nothing".into()),
                );
                if s["nodes"]["active"].as_u64() != Some(rec.nodes as u64) {
                    ok = false;
                }
                runs.push((c["revision"].as_i64().unwrap_or(0), digest.to_string()));
            }
            Err(e) => {
                ok = false;
                // `lb`'s first line says why (a hint may follow).
                let why = format!("{e:#}");
                println!(
                    "  balancer {i}: not answering ({})",
                    why.lines().next().unwrap_or("").trim()
                );
            }
        }
    }
    for vip in vips() {
        match cl.ecmp_nexthops(vip) {
            Ok(hops) => {
                let names: Vec<String> = hops
                    .iter()
                    .map(|h| match cl.balancer_of(*h) {
                        Some(i) => format!("lb{i} ({h})"),
                        None => h.to_string(),
                    })
                    .collect();
                println!(
                    "  router: {vip} via {} next hops: {}",
                    hops.len(),
                    names.join(", ")
                );
                if hops.len() != rec.balancers {
                    ok = false;
                }
            }
            Err(e) => {
                ok = false;
                println!("  router: {vip}: {e:#}");
            }
        }
    }
    let one = runs.windows(2).all(|w| w[0] == w[1]);
    ok &= one && runs.len() == rec.balancers && runs.first().is_some_and(|r| r.0 > 0);
    let verdict = match runs.first() {
        None => "no balancer answers".to_string(),
        Some((rev, _)) if ok => format!("every balancer runs revision {rev}"),
        Some((rev, _)) if one => format!(
            "{} of {} balancers answer, on revision {rev}",
            runs.len(),
            rec.balancers
        ),
        Some(_) => format!(
            "{} of {} balancers answer, on different revisions or tables",
            runs.len(),
            rec.balancers
        ),
    };
    println!("  {}: {verdict}", if ok { "up" } else { "DEGRADED" });
    Ok(ok)
}
