//! `cargo xtask bench control`: control-plane benchmarks.
//! - route update: one event (join, failure, drain) on a VIP with N = 65536 routes and 1000
//!   nodes, through the daemon's code path: the controller's plan, pushed to the kernel maps
//!   atomically, and the state handed to the persister; the persister's own write (on its
//!   thread, off the membership path) is reported beside it;
//! - apply: the same with 16 VIPs of N = 65536 routes and 20 nodes;
//! - heartbeat ingestion: authenticated heartbeats per second received over UDP, verified and
//!   run through the failure detector on one core;
//! - failover: an agent is killed in a namespace lab; time until the node's routes point
//!   elsewhere in the kernel map, with default settings (100 ms interval, k = 3);
//! - cli update: `lb node weight` issued -> the new table live in every kernel table;
//! - cluster update: the same at the leader of three balancers -> the new revision live in
//!   every balancer's kernel tables;
//! - balancer failover: one of three balancers behind an ECMP router dies under load:
//!   connections broken (`balancer_failover_broken`), detection, longest stall.
//!
//! Prints a table and writes `target/bench/control.json`.
use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use lb_userspace::{
    config::Config,
    controller::{Adopted, Controller, Input},
    daemon::execute_steps,
    dataplane::{Dataplane, DataplaneOptions},
    heartbeat::{self, Heartbeat, Key, Receiver},
    membership::{DownReason, Event, Membership, NodeCfg},
    persist::Persister,
};
use serde_json::json;

use crate::{
    daemon::{DaemonSetup, udp_vip},
    netns::Lab,
    scale::{KernelView, Watch, events, tcp_vips, wait_all_own},
};

const N: u32 = 65536;
const NODES: u32 = 1000;
/// `apply_ms`: one event over this many VIPs of N routes.
const APPLY_VIPS: u32 = 16;
const APPLY_NODES: u32 = 20;
/// `join_storm`: agents starting at once (against `APPLY_VIPS` VIPs of N routes).
const STORM_NODES: u32 = 20;

fn stats(mut v: Vec<f64>) -> Spread {
    v.sort_by(f64::total_cmp);
    let median = v[v.len() / 2];
    (median, v[0], v[v.len() - 1])
}

/// (median, min, max).
type Spread = (f64, f64, f64);

/// A config of `vips` TCP VIPs of N routes over `nodes` heartbeat nodes.
fn config(vips: u32, nodes: u32) -> Result<Config> {
    let mut s = format!("[daemon]\nroute_slots = {}\n", 2 * N * vips);
    for v in 0..vips {
        s += &format!(
            "[[vip]]\naddr = \"198.18.{}.{}\"\nport = 80\nproto = \"tcp\"\nroutes = {N}\n",
            100 + v / 250,
            1 + v % 250
        );
    }
    for n in 0..nodes {
        s += &format!(
            "[[node]]\nid = {n}\nmac = \"02:00:00:00:{:02x}:{:02x}\"\n",
            n >> 8,
            n & 0xff
        );
    }
    let cfg: Config = toml::from_str(&s)?;
    cfg.validate()?;
    Ok(cfg)
}

/// The daemon's path for one batch: the controller's plan, executed on the kernel maps, and
/// the state handed to the persister (which writes it on its own thread).
struct Shell {
    ctl: Controller,
    dp: Dataplane,
    persister: Persister,
    _dir: crate::daemon::TempDir,
}

impl Shell {
    fn new(vips: u32, nodes: u32, up: u32) -> Result<Self> {
        let cfg = config(vips, nodes)?;
        let dp = Dataplane::load(&DataplaneOptions {
            route_slots: cfg.daemon.route_slots,
            conntrack_size: 1024,
            pin_dir: None,
        })?;
        let (ctl, plan) = Controller::start(&cfg, None, &Adopted::default())?;
        let dir = crate::daemon::TempDir::new("bench-state")?;
        let mut sh = Shell {
            ctl,
            dp,
            persister: Persister::spawn(dir.0.clone()),
            _dir: dir,
        };
        execute_steps(&mut sh.dp, &plan)?;
        let ups: Vec<Input> = (0..up)
            .map(|n| {
                membership(Event::NodeUp {
                    node: n,
                    weight: 0,
                    draining: false,
                })
            })
            .collect();
        sh.step(&ups)?;
        sh.persister
            .flush(Duration::from_secs(30))
            .map_err(anyhow::Error::msg)?;
        Ok(sh)
    }

    /// One batch; returns the milliseconds it took and the route entries it wrote.
    fn step(&mut self, inputs: &[Input]) -> Result<(f64, usize)> {
        let start = Instant::now();
        let plan = self.ctl.apply(inputs);
        execute_steps(&mut self.dp, &plan)?;
        if plan.persist {
            self.persister.submit(self.ctl.snapshot());
        }
        Ok((start.elapsed().as_secs_f64() * 1e3, plan.route_writes()))
    }

    /// Milliseconds the persister took for its last write, once it is done.
    fn save_ms(&self) -> Result<f64> {
        self.persister
            .flush(Duration::from_secs(30))
            .map_err(anyhow::Error::msg)?;
        Ok(self
            .persister
            .stats()
            .last_write
            .map_or(0.0, |d| d.as_secs_f64() * 1e3))
    }
}

fn membership(e: Event) -> Input {
    Input::Membership(e)
}

/// Per event type: (median, min, max) ms of one event through the daemon's path (compute +
/// push + hand-off to the persister) with `vips` VIPs and `nodes` nodes, and the median
/// milliseconds of the persister's own write (off the membership path).
fn route_updates(vips: u32, nodes: u32, trials: usize) -> Result<Vec<(&'static str, Spread, f64)>> {
    // The last node stays down, for the join.
    let mut sh = Shell::new(vips, nodes, nodes - 1)?;
    let joiner = nodes - 1;
    let mut out = Vec::new();
    for event in ["join", "failure", "drain"] {
        let mut times = Vec::with_capacity(trials);
        let mut saves = Vec::with_capacity(trials);
        for t in 0..trials {
            let node = (t as u32 * 37) % joiner;
            let (ev, undo) = match event {
                "join" => (
                    Event::NodeUp {
                        node: joiner,
                        weight: 0,
                        draining: false,
                    },
                    Event::NodeDown {
                        node: joiner,
                        reason: DownReason::MissedHeartbeats,
                    },
                ),
                "failure" => (
                    Event::NodeDown {
                        node,
                        reason: DownReason::MissedHeartbeats,
                    },
                    Event::NodeUp {
                        node,
                        weight: 0,
                        draining: false,
                    },
                ),
                _ => (Event::NodeDraining { node }, Event::NodeUndrained { node }),
            };
            let (ms, writes) = sh.step(&[membership(ev)])?;
            anyhow::ensure!(writes > 0, "{event} wrote no route");
            times.push(ms);
            saves.push(sh.save_ms()?);
            // Undo, untimed, so every trial starts from the same balanced table.
            sh.step(&[membership(undo)])?;
            sh.save_ms()?;
        }
        out.push((event, stats(times), stats(saves).0));
    }
    Ok(out)
}

/// Heartbeats per second, received on loopback, verified and processed on one core.
fn heartbeat_rate(total: u64) -> Result<(f64, u64)> {
    let key = Key::from_bytes(b"0123456789abcdef0123456789abcdef")?;
    let mut rx = Receiver::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), key.clone())?;
    let to = rx.local_addr()?;
    let mut membership = Membership::new(NodeCfg::default());
    for n in 0..NODES {
        membership.add_node(n, NodeCfg::default());
    }
    // Pre-encode so the sender is cheap; one incarnation per node, increasing sequences.
    let msgs: Vec<Vec<u8>> = (0..total)
        .map(|i| {
            Heartbeat {
                node: (i % u64::from(NODES)) as u32,
                incarnation: 1,
                sequence: i / u64::from(NODES) + 1,
                state: heartbeat::NodeState::Up,
                weight: 1,
                interval_ms: 100,
                cpu_permille: None,
                active_conns: None,
            }
            .encode(&key)
        })
        .collect();
    let sender = std::thread::spawn(move || -> Result<()> {
        let s = UdpSocket::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        for (i, m) in msgs.iter().enumerate() {
            s.send_to(m, to)?;
            // Pace a little so the receive buffer does not overflow.
            if i % 64 == 63 {
                std::thread::yield_now();
            }
        }
        Ok(())
    });
    let mut processed = 0u64;
    let mut start = None;
    while let Some((hb, _)) = rx.recv(Duration::from_millis(300))? {
        start.get_or_insert_with(Instant::now);
        if membership.on_heartbeat(Instant::now(), &hb).is_ok() {
            processed += 1;
        }
    }
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    let secs = start.map_or(0.0, |s| s.elapsed().as_secs_f64() - 0.3);
    Ok((processed as f64 / secs.max(1e-9), processed))
}

/// Join storm: `STORM_NODES` agents start at once against a daemon with `APPLY_VIPS` VIPs of N
/// routes; milliseconds until every node is ACTIVE and owns routes in every VIP's kernel table,
/// then NodeDowns logged while all agents keep running for `hold` (false downs, must be 0).
fn join_storm(hold: Duration) -> Result<(f64, usize)> {
    let ids: Vec<u32> = (1..=STORM_NODES).collect();
    let (vips, keys) = tcp_vips(APPLY_VIPS as u8, 80);
    let lab = Lab::new(STORM_NODES as usize)?;
    lab.add_dsr_vips(&vips)?;
    let setup = DaemonSetup::dsr_many(&lab, &vips, 80, "tcp", N, 1 << 16, "")?;
    let (_daemon, log) = setup.start_captured(&lab, &[])?;
    let kv = KernelView::open(setup.pin_dir())?;
    let mut watch = Watch::new(&kv, &keys, &ids, &[])?;
    let from = log.len();
    let _agents = ids
        .iter()
        .map(|id| setup.agent(&lab, *id, "100ms"))
        .collect::<Result<Vec<_>>>()?;
    let t0 = Instant::now();
    let up = wait_all_own(&kv, &mut watch, &ids, t0, Duration::from_secs(20))?
        .context("not every node came up within 20 s")?;
    std::thread::sleep(hold);
    let downs = events(&log.since(from), "NodeDown").len();
    Ok((up.as_secs_f64() * 1e3, downs))
}

/// `cli_update_ms`: `lb node weight` issued (the CLI process spawned) -> the new table live in
/// every kernel table (node 1 owns its new share in each of the `APPLY_VIPS` VIPs of N routes),
/// 20 nodes up; the weight alternates 2, 1 on node 1.
fn cli_updates(trials: usize) -> Result<Vec<f64>> {
    let ids: Vec<u32> = (1..=APPLY_NODES).collect();
    let (vips, keys) = tcp_vips(APPLY_VIPS as u8, 80);
    let lab = Lab::new(APPLY_NODES as usize)?;
    lab.add_dsr_vips(&vips)?;
    let setup = DaemonSetup::dsr_many(&lab, &vips, 80, "tcp", N, 1 << 16, "")?;
    let _daemon = setup.start(&lab, &[])?;
    let kv = KernelView::open(setup.pin_dir())?;
    let mut watch = Watch::new(&kv, &keys, &ids, &[])?;
    let _agents = ids
        .iter()
        .map(|id| setup.agent(&lab, *id, "100ms"))
        .collect::<Result<Vec<_>>>()?;
    wait_all_own(
        &kv,
        &mut watch,
        &ids,
        Instant::now(),
        Duration::from_secs(20),
    )?
    .context("not every node came up within 20 s")?;
    weight_changes(
        &[kv],
        &keys,
        &setup.socket(),
        trials,
        [N * 2 / (APPLY_NODES + 1), N / APPLY_NODES],
        Duration::from_secs(10),
    )
}

/// `trials` times `lb node weight 1 W` (W alternating 2, 1) against the API `socket`: ms from
/// the CLI's spawn until every table of `keys` flipped its generation in every kernel of
/// `views`, then checks node 1 owns `shares[0]` (weight 2) or `shares[1]` (weight 1) of each,
/// within one route. Each trial starts once no route is flagged moved anywhere (the flags a
/// change sets are cleared a little later, by another flip), waiting up to `settle`.
fn weight_changes(
    views: &[KernelView],
    keys: &[lb_common::VipKey],
    socket: &std::path::Path,
    trials: usize,
    shares: [u32; 2],
    settle: Duration,
) -> Result<Vec<f64>> {
    let settled = || -> Result<bool> {
        for kv in views {
            for k in keys {
                if kv
                    .routes(k)?
                    .iter()
                    .any(|e| e.flags & lb_common::ROUTE_F_MOVED != 0)
                {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    };
    let mut times = Vec::with_capacity(trials);
    for i in 0..trials {
        let (weight, want) = [("2", shares[0]), ("1", shares[1])][i % 2];
        let calm = Instant::now();
        while !settled()? {
            anyhow::ensure!(
                calm.elapsed() < settle,
                "moved flags not cleared everywhere within {settle:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let before: Vec<Vec<u32>> = views
            .iter()
            .map(|kv| keys.iter().map(|k| kv.generation(k)).collect())
            .collect::<Result<_>>()?;
        let t0 = Instant::now();
        let mut cli = std::process::Command::new(crate::daemon::lb_binary()?)
            .args(["node", "weight", "1", weight, "--socket"])
            .arg(socket)
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("running lb node weight")?;
        // Each table flips its generation word once when the change goes live: polling the
        // words is cheap, so the poller takes nothing from the daemons' cores.
        let mut pending: Vec<(usize, usize)> = (0..views.len())
            .flat_map(|b| (0..keys.len()).map(move |v| (b, v)))
            .collect();
        while !pending.is_empty() {
            pending.retain(|&(b, v)| {
                views[b]
                    .generation(&keys[v])
                    .map_or(true, |g| g == before[b][v])
            });
            if t0.elapsed() > Duration::from_secs(5) {
                anyhow::bail!(
                    "lb node weight 1 {weight}: {} tables did not flip within 5 s",
                    pending.len()
                );
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        let status = cli.wait()?;
        anyhow::ensure!(status.success(), "lb node weight 1 {weight}: {status}");
        // What went live is the new share (exact: N * w / W rounded either way).
        for (b, kv) in views.iter().enumerate() {
            for k in keys {
                let got = kv.routes(k)?.iter().filter(|e| e.node == 1).count() as u32;
                anyhow::ensure!(
                    got.abs_diff(want) <= 1,
                    "kernel {}: after weight {weight} node 1 owns {got} routes, not {want}",
                    b + 1
                );
            }
        }
    }
    Ok(times)
}

/// cluster_update: `lb node weight` issued at the leader of three balancers -> the new
/// revision live in every balancer's kernel tables (each VIP's generation word flipped on all
/// three), times in ms. Each trial starts once no route is flagged moved on any balancer (the
/// leader clears the flags when every balancer's scan agrees, a few seconds after a change).
fn cluster_updates(trials: usize) -> Result<Vec<f64>> {
    use crate::cluster::{Cluster, PORT, ROUTES, VIPS};
    let c = Cluster::up();
    let leader = c.leader();
    let keys: Vec<lb_common::VipKey> = VIPS
        .iter()
        .map(|v| lb_userspace::dataplane::vip_key((*v).into(), PORT, lb_common::PROTO_TCP))
        .collect();
    let views = c
        .setups
        .iter()
        .map(|s| KernelView::open(s.pin_dir()))
        .collect::<Result<Vec<_>>>()?;
    weight_changes(
        &views,
        &keys,
        &c.setups[leader].socket(),
        trials,
        [ROUTES / 2, ROUTES / 3],
        Duration::from_secs(20),
    )
}

/// balancer_failover: three cluster-mode balancers behind the cluster lab's ECMP router
/// (bird2, BFD), 90 long-lived connections from the client; one balancer dies as a box (its
/// program detached, its bird frozen). Per trial (a fresh lab each, a different balancer):
/// connections broken, ms until the router dropped it, the longest stall of a connection.
fn balancer_failovers(trials: usize) -> Result<Vec<(usize, f64, f64)>> {
    use crate::cluster_lab::{ClusterLab, ClusterSpec, Load};
    let lb = crate::daemon::lb_binary()?;
    let lab_bin = lb.with_file_name("lb-lab");
    let mut out = Vec::with_capacity(trials);
    for t in 0..trials {
        let mut lab = ClusterLab::new(&ClusterSpec {
            name: "lbcbenchlab".into(),
            balancers: 3,
            nodes: 3,
            lab_bin: lab_bin.clone(),
        })?;
        for i in 1..=3 {
            lab.start_daemon(&lb, i, N)?;
        }
        for j in 1..=3 {
            lab.start_agent(&lb, j)?;
        }
        lab.wait_converged(&lb, &[1, 2, 3], 3, Duration::from_secs(30))?;
        let vips: Vec<std::net::IpAddr> =
            vec![crate::lab::DSR_VIP.into(), crate::lab::DSR_VIP6.into()];
        lab.wait_nexthops(&vips, &[1, 2, 3].into(), Duration::from_secs(10))?;
        let load = Load::start(&lab, 90);
        std::thread::sleep(Duration::from_secs(1));
        let dead = 1 + t % 3;
        let rest: std::collections::BTreeSet<usize> = (1..=3).filter(|i| *i != dead).collect();
        load.mark();
        let t0 = Instant::now();
        lab.fail_balancer(dead)?;
        lab.wait_nexthops(&vips, &rest, Duration::from_secs(5))?;
        let detect = t0.elapsed().as_secs_f64() * 1e3;
        std::thread::sleep(Duration::from_secs(3));
        let (broken, stall) = load.stop();
        eprintln!(
            "  balancer {dead} died: router dropped it after {detect:.0} ms, longest stall \
             {stall} ms, {} broken",
            broken.len()
        );
        out.push((broken.len(), detect, stall as f64));
    }
    Ok(out)
}

/// Failover times (ms) over `trials` agent kills in a namespace lab, default settings.
fn failover(trials: usize) -> Result<Vec<f64>> {
    let lab = Lab::new(2)?;
    let vip = Ipv4Addr::new(198, 18, 100, 1);
    let setup = DaemonSetup::dsr(&lab, vip, 5000, "udp", N, "")?;
    let _daemon = setup.start(&lab, &[])?;
    let key = udp_vip(vip, 5000);
    let _a2 = setup.agent(&lab, 2, "100ms")?;
    let mut times = Vec::with_capacity(trials);
    for _ in 0..trials {
        let mut a1 = setup.agent(&lab, 1, "100ms")?;
        setup
            .wait_routes(&key, Duration::from_secs(15), |r| {
                r.iter().any(|e| e.node == 1) && r.iter().any(|e| e.node == 2)
            })
            .context("node 1 did not (re)join")?;
        // Let a few heartbeats flow so the kill lands at a random phase of the interval.
        std::thread::sleep(Duration::from_millis(150 + (times.len() as u64 * 13) % 100));
        a1.signal_and_wait(libc::SIGKILL)?;
        let took = setup.wait_routes(&key, Duration::from_secs(5), |r| {
            r.iter().all(|e| e.node == 2)
        })?;
        times.push(took.as_secs_f64() * 1e3);
    }
    Ok(times)
}

pub fn run(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    // `--only balancer_failover`: that case alone (a development aid; no JSON written).
    if args
        .windows(2)
        .any(|w| w[0] == "--only" && w[1] == "balancer_failover")
    {
        let bf = balancer_failovers(3)?;
        println!("balancer_failover (broken, detect ms, stall ms): {bf:?}");
        return Ok(());
    }
    // `--only cluster_update`: that case alone (a development aid; no JSON written).
    if args
        .windows(2)
        .any(|w| w[0] == "--only" && w[1] == "cluster_update")
    {
        let cu = cluster_updates(20)?;
        let (med, min, max) = stats(cu.clone());
        println!("cluster_update: median {med:.1} ms, min {min:.1} ms, max {max:.1} ms: {cu:.1?}");
        return Ok(());
    }
    // `--only cli_update`: that case alone (a development aid; no JSON written).
    if args
        .windows(2)
        .any(|w| w[0] == "--only" && w[1] == "cli_update")
    {
        let cli = cli_updates(20)?;
        let (med, min, max) = stats(cli.clone());
        println!("cli_update: median {med:.1} ms, min {min:.1} ms, max {max:.1} ms: {cli:.1?}");
        return Ok(());
    }
    let trials = if quick { 5 } else { 25 };
    eprintln!("route updates: N = {N}, 1 VIP, {NODES} nodes, {trials} trials per event");
    let updates = route_updates(1, NODES, trials)?;
    eprintln!("apply: N = {N}, {APPLY_VIPS} VIPs, {APPLY_NODES} nodes, {trials} trials per event");
    let applies = route_updates(APPLY_VIPS, APPLY_NODES, trials)?;
    let storm_trials = if quick { 1 } else { 3 };
    let hold = Duration::from_secs(if quick { 5 } else { 10 });
    eprintln!(
        "join storm: {STORM_NODES} agents at once, {APPLY_VIPS} VIPs x N = {N}, {storm_trials} trials, then {hold:?} watching for false downs"
    );
    let storms = (0..storm_trials)
        .map(|_| join_storm(hold))
        .collect::<Result<Vec<_>>>()?;
    let (storm_med, storm_min, storm_max) = stats(storms.iter().map(|s| s.0).collect());
    let false_downs: usize = storms.iter().map(|s| s.1).sum();
    eprintln!("heartbeat ingestion");
    let (hb_rate, hb_n) = heartbeat_rate(if quick { 50_000 } else { 300_000 })?;
    let fo_trials = if quick { 5 } else { 20 };
    eprintln!(
        "failover: {fo_trials} agent kills in a namespace lab (default 100 ms interval, k = 3)"
    );
    let fo = failover(fo_trials)?;
    let (fo_med, fo_min, fo_max) = stats(fo.clone());
    eprintln!(
        "cli update: `lb node weight` x 20, {APPLY_VIPS} VIPs x N = {N}, {APPLY_NODES} nodes up"
    );
    let cli = cli_updates(20)?;
    let (cli_med, cli_min, cli_max) = stats(cli.clone());
    eprintln!("cluster update: `lb node weight` at the leader x 20, 3 balancers, 2 VIPs x N = {N}");
    let cu = cluster_updates(20)?;
    let (cu_med, cu_min, cu_max) = stats(cu.clone());
    let bf_trials = if quick { 1 } else { 3 };
    eprintln!(
        "balancer failover: one of 3 balancers behind the ECMP router dies under 90 connections, {bf_trials} trials"
    );
    let bf = balancer_failovers(bf_trials)?;
    let bf_broken: usize = bf.iter().map(|b| b.0).sum();
    let (bf_det_med, _, bf_det_max) = stats(bf.iter().map(|b| b.1).collect());
    let (bf_stall_med, _, bf_stall_max) = stats(bf.iter().map(|b| b.2).collect());

    println!();
    println!("| benchmark | median | min | max | persister write (off path), median |");
    println!("|---|---|---|---|---|");
    let rows = |what: &str, rows: &[(&'static str, Spread, f64)]| {
        for (ev, (med, min, max), save) in rows {
            println!(
                "| {what} ({ev}): compute + push + save hand-off | {med:.2} ms | {min:.2} ms | {max:.2} ms | {save:.1} ms |"
            );
        }
    };
    rows(&format!("route update, N={N}, {NODES} nodes"), &updates);
    rows(
        &format!("apply, {APPLY_VIPS} VIPs x N={N}, {APPLY_NODES} nodes"),
        &applies,
    );
    println!(
        "| join_storm: {STORM_NODES} agents start at once, {APPLY_VIPS} VIPs x N={N}: last agent spawned -> every node ACTIVE and owning routes in every kernel table ({storm_trials} trials) | {storm_med:.0} ms | {storm_min:.0} ms | {storm_max:.0} ms | |"
    );
    println!(
        "| false_downs: NodeDown logged while every agent runs, from the storm until {hold:?} after all are up ({storm_trials} trials) | {false_downs} | | | |"
    );
    println!("| heartbeats verified + processed ({hb_n} msgs, one core) | {hb_rate:.0}/s | | | |");
    println!(
        "| failover: agent killed -> routes moved in kernel map ({} trials) | {fo_med:.0} ms | {fo_min:.0} ms | {fo_max:.0} ms | |",
        fo.len()
    );
    println!(
        "| cli_update: `lb node weight` issued -> new table live in all {APPLY_VIPS} kernel tables ({} trials) | {cli_med:.1} ms | {cli_min:.1} ms | {cli_max:.1} ms | |",
        cli.len()
    );
    println!(
        "| cluster_update: `lb node weight` at the leader -> new revision live in the kernel tables of all 3 balancers ({} trials) | {cu_med:.1} ms | {cu_min:.1} ms | {cu_max:.1} ms | |",
        cu.len()
    );

    println!(
        "| balancer_failover_broken: connections broken when 1 of 3 balancers behind the ECMP router dies under 90 ({} trials) | {bf_broken} | | | |",
        bf.len()
    );
    println!(
        "| balancer failover: router drops the dead balancer (BFD 30 ms x 5) | {bf_det_med:.0} ms | | {bf_det_max:.0} ms | |"
    );
    println!(
        "| balancer failover: longest stall of a connection (one TCP retransmission) | {bf_stall_med:.0} ms | | {bf_stall_max:.0} ms | |"
    );

    let detail = |rows: &[(&'static str, Spread, f64)]| {
        rows.iter()
            .map(|(e, (med, min, max), save)| {
                (
                    e.to_string(),
                    json!({"median": med, "min": min, "max": max, "persister_write_ms": save}),
                )
            })
            .collect::<serde_json::Map<_, _>>()
    };
    let doc = json!({
        "balancer_failover_broken": bf_broken,
        "balancer_failover": {
            "trials": bf.len(),
            "connections": 90,
            "broken": bf.iter().map(|b| b.0).collect::<Vec<_>>(),
            "router_detect_ms": bf.iter().map(|b| b.1).collect::<Vec<_>>(),
            "longest_stall_ms": bf.iter().map(|b| b.2).collect::<Vec<_>>(),
        },
        "cluster_update_ms": { "median": cu_med, "min": cu_min, "max": cu_max, "trials": cu, "balancers": 3 },
        "route_update_ms": detail(&updates),
        "apply_ms": detail(&applies),
        "apply_vips": APPLY_VIPS,
        "apply_nodes": APPLY_NODES,
        "join_storm_ms": { "median": storm_med, "min": storm_min, "max": storm_max, "trials": storms.iter().map(|s| s.0).collect::<Vec<_>>(), "nodes": STORM_NODES },
        "false_downs": false_downs,
        "heartbeats_per_sec": hb_rate,
        "failover_ms": { "median": fo_med, "min": fo_min, "max": fo_max, "trials": fo },
        "cli_update_ms": { "median": cli_med, "min": cli_min, "max": cli_max, "trials": cli },
        "routes": N,
        "nodes": NODES,
    });
    let path = crate::write_bench_json("control.json", &doc)?;
    println!("\nwrote {}", path.display());
    let dir = crate::bench_dir();
    println!(
        "wrote {}",
        crate::charts::failover_from(&dir, &dir)?.display()
    );
    Ok(())
}
