//! `cargo xtask bench control`: control-plane benchmarks.
//! - route update: one event (join, failure, drain) on a VIP with N = 65536 routes and 1000
//!   nodes, computed and pushed to the kernel map atomically (the daemon's code path);
//! - heartbeat ingestion: authenticated heartbeats per second received over UDP, verified and
//!   run through the failure detector on one core;
//! - failover: an agent is killed in a namespace lab; time until the node's routes point
//!   elsewhere in the kernel map, with default settings (100 ms interval, k = 3).
//!
//! Prints a table and writes `target/bench/control.json`.
use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use lb_common::{NODE_NONE, RouteEntry};
use lb_userspace::{
    dataplane::{Dataplane, DataplaneOptions, ForwardMode, HashMode, VipSpec, vip_key},
    heartbeat::{self, Heartbeat, Key, Receiver},
    membership::{Membership, NodeCfg},
    routes::RouteTable,
};
use serde_json::json;

use crate::{
    daemon::{DaemonSetup, udp_vip},
    netns::Lab,
};

const N: u32 = 65536;
const NODES: u32 = 1000;

fn entries(t: &RouteTable) -> Vec<RouteEntry> {
    t.owners()
        .map(|o| RouteEntry {
            node: o.unwrap_or(NODE_NONE),
            flags: 0,
        })
        .collect()
}

fn stats(mut v: Vec<f64>) -> Spread {
    v.sort_by(f64::total_cmp);
    let median = v[v.len() / 2];
    (median, v[0], v[v.len() - 1])
}

/// (median, min, max).
type Spread = (f64, f64, f64);

/// (median, min, max) milliseconds of compute + push per event type.
fn route_updates(trials: usize) -> Result<Vec<(&'static str, Spread)>> {
    let mut dp = Dataplane::load(&DataplaneOptions {
        route_slots: 2 * N,
        conntrack_size: 1024,
        pin_dir: None,
    })?;
    let spec = VipSpec {
        key: vip_key(
            Ipv4Addr::new(198, 18, 100, 1).into(),
            80,
            lb_common::PROTO_TCP,
        ),
        index: 0,
        mode: ForwardMode::DsrL2,
        hash: HashMode::FiveTuple,
    };
    let mut table = RouteTable::new(N)?;
    for n in 0..NODES {
        table.join(n, 1)?;
    }
    dp.upsert_vip(&spec, &entries(&table))?;
    let mut out = Vec::new();
    for event in ["join", "failure", "drain"] {
        let mut times = Vec::with_capacity(trials);
        for t in 0..trials {
            let node = (t as u32 * 37) % NODES;
            let start = Instant::now();
            match event {
                "join" => table.join(NODES, 1)?,
                "failure" => table.fail(node)?,
                _ => table.drain(node)?,
            };
            dp.set_routes(&spec.key, &entries(&table))?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
            // Undo, untimed, so every trial starts from the same balanced table.
            match event {
                "join" => table.remove(NODES)?,
                "failure" => table.join(node, 1)?,
                _ => table.activate(node)?,
            };
            dp.set_routes(&spec.key, &entries(&table))?;
        }
        out.push((event, stats(times)));
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
    let trials = if quick { 5 } else { 25 };
    eprintln!("route updates: N = {N}, {NODES} nodes, {trials} trials per event");
    let updates = route_updates(trials)?;
    eprintln!("heartbeat ingestion");
    let (hb_rate, hb_n) = heartbeat_rate(if quick { 50_000 } else { 300_000 })?;
    let fo_trials = if quick { 5 } else { 20 };
    eprintln!(
        "failover: {fo_trials} agent kills in a namespace lab (default 100 ms interval, k = 3)"
    );
    let fo = failover(fo_trials)?;
    let (fo_med, fo_min, fo_max) = stats(fo.clone());

    println!();
    println!("| benchmark | median | min | max |");
    println!("|---|---|---|---|");
    for (ev, (med, min, max)) in &updates {
        println!(
            "| route update ({ev}), N={N}, {NODES} nodes, compute + push | {med:.2} ms | {min:.2} ms | {max:.2} ms |"
        );
    }
    println!("| heartbeats verified + processed ({hb_n} msgs, one core) | {hb_rate:.0}/s | | |");
    println!(
        "| failover: agent killed -> routes moved in kernel map ({} trials) | {fo_med:.0} ms | {fo_min:.0} ms | {fo_max:.0} ms |",
        fo.len()
    );

    let get = |name: &str| {
        updates
            .iter()
            .find(|(e, _)| *e == name)
            .map_or(0.0, |(_, s)| s.0)
    };
    let doc = json!({
        "route_update_ms": { "join": get("join"), "failure": get("failure"), "drain": get("drain") },
        "route_update_detail_ms": updates.iter().map(|(e, (med, min, max))| (e.to_string(), json!({"median": med, "min": min, "max": max}))).collect::<serde_json::Map<_, _>>(),
        "heartbeats_per_sec": hb_rate,
        "failover_ms": { "median": fo_med, "min": fo_min, "max": fo_max, "trials": fo },
        "routes": N,
        "nodes": NODES,
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("control.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
    println!("\nwrote {}", path.display());
    Ok(())
}
