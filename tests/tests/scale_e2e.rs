//! The control plane at the README's default sizes: 16 dsr-l2 TCP VIPs of 65536 routes each,
//! 20 nodes whose agents (100 ms heartbeats, k = 3, hold-down 2 s) all start at once.
//! - every node is up in the kernel (ACTIVE in NODES, owning routes in every VIP) within 1 s of
//!   the last agent's start;
//! - no NodeDown for 20 s while the client drives short TCP connections through all VIPs on
//!   both cores (and under 1% of those connections fail);
//! - the daemon restarted under that load (SIGTERM, then SIGKILL) re-adopts everything: no
//!   NodeDown, no route table change, under 1% failed connections (measured: none);
//! - an agent killed with SIGKILL has its node down (no route on it in any VIP, not ACTIVE)
//!   within 800 ms, and the other 19 stay up.
//!
//! Problems are collected and reported together at the end with the measured figures, so one
//! run tells everything (time to all-up, conn/s, failures, failover time).
#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test
use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use lb_common::{NODE_ACTIVE, VipKey};
use lb_tests::{
    daemon::DaemonSetup,
    netns::{ChildGuard, Lab},
    scale::{
        KernelView, LoadStats, Problems, ScanBuf, TcpLoad, TcpServers, Watch, events, tcp_vips,
        wait_all_own, wait_tables,
    },
};

const NODES: u32 = 20;
const VIPS: u8 = 16;
const ROUTES: u32 = 65536;
const CONNTRACK: u32 = 1 << 20;
const PORT: u16 = 80;
/// Client threads driving TCP connections (the machine has 2 cores).
const LOAD_THREADS: usize = 4;
/// The node whose agent is killed.
const VICTIM: u32 = 7;

const ALL_UP_BUDGET: Duration = Duration::from_secs(1);
/// Observation window: no NodeDown, every node ACTIVE and owning routes, under TCP load.
const STEADY: Duration = Duration::from_secs(20);
/// Observation window after each daemon restart, under load: long enough for a wrongly
/// judged node to go down (3 intervals) several times; none may.
const AFTER_RESTART: Duration = Duration::from_secs(2);
/// Connections the load has answered through a daemon before it is stopped (so the restart
/// happens under load however slowly the load threads start on a busy machine).
const BEFORE_RESTART_CONNS: u64 = 1000;
/// Observation window before the kill, under load: every node up (the failover figure is
/// meaningful only from there).
const BEFORE_KILL: Duration = Duration::from_secs(1);
/// Observation window after the failover, under load: the other 19 stay up, the victim down.
const AFTER_KILL: Duration = Duration::from_secs(3);
const FAILOVER_BUDGET: Duration = Duration::from_millis(800);
/// Kernel sampling period while the steady phases run.
const SAMPLE: Duration = Duration::from_millis(50);

/// Samples the kernel every [`SAMPLE`] for `dur`: every node of `up` is ACTIVE and (one VIP per
/// sample, in turn) owns routes; `down` is not ACTIVE. Returns the samples taken and the nodes
/// ever seen not ACTIVE.
fn monitor(
    kv: &KernelView,
    keys: &[VipKey],
    up: &[u32],
    down: Option<u32>,
    dur: Duration,
    what: &str,
    problems: &mut Problems,
) -> (u32, BTreeSet<u32>) {
    let start = Instant::now();
    let mut buf = ScanBuf::default();
    let mut ever = BTreeSet::new();
    let mut n = 0u32;
    while start.elapsed() < dur {
        let at = start.elapsed().as_secs_f64();
        let inactive = kv.inactive(up).unwrap();
        if !inactive.is_empty() {
            problems.add(
                &format!("{what}: nodes not ACTIVE"),
                format!("+{at:.2}s {inactive:?}"),
            );
            ever.extend(inactive);
        }
        let i = n as usize % keys.len();
        if let Some((_, false)) = kv.all_own(&keys[i], up, &mut buf, |_| {}).unwrap() {
            problems.add(
                &format!("{what}: a VIP has nodes without routes"),
                format!(
                    "+{at:.2}s VIP #{} misses {:?}",
                    i + 1,
                    missing_owners(kv, &keys[i], up)
                ),
            );
        }
        if let Some(d) = down
            && kv.node(d).unwrap().state == NODE_ACTIVE
        {
            problems.add(
                &format!("{what}: killed node ACTIVE again"),
                format!("+{at:.2}s node {d}"),
            );
        }
        n += 1;
        if let Some(left) = (SAMPLE * n).checked_sub(start.elapsed()) {
            std::thread::sleep(left);
        }
    }
    (n, ever)
}

fn missing_owners(kv: &KernelView, key: &VipKey, ids: &[u32]) -> Vec<u32> {
    let owners = kv.owners(key).unwrap();
    ids.iter()
        .copied()
        .filter(|id| !owners.contains_key(id))
        .collect()
}

/// Reads every VIP's whole table: a node of `up` without routes, a route on `down` or on any
/// other node are problems. Returns the smallest/largest share of a node of `up` and the time
/// the reads took.
fn full_check(
    kv: &KernelView,
    keys: &[VipKey],
    up: &[u32],
    down: Option<u32>,
    what: &str,
    problems: &mut Problems,
) -> (u32, u32, Duration) {
    let t = Instant::now();
    let (mut lo, mut hi) = (u32::MAX, 0);
    for (i, k) in keys.iter().enumerate() {
        let owners = kv.owners(k).unwrap();
        let missing: Vec<u32> = up
            .iter()
            .copied()
            .filter(|id| !owners.contains_key(id))
            .collect();
        for id in up {
            let c = owners.get(id).copied().unwrap_or(0);
            lo = lo.min(c);
            hi = hi.max(c);
        }
        if !missing.is_empty() {
            problems.add(
                &format!("{what}: nodes without routes"),
                format!("VIP #{}: {missing:?}", i + 1),
            );
        }
        if let Some(d) = down
            && let Some(c) = owners.get(&d)
        {
            problems.add(
                &format!("{what}: killed node still owns routes"),
                format!("VIP #{}: {c} routes on node {d}", i + 1),
            );
        }
        let stray: Vec<(u32, u32)> = owners
            .iter()
            .filter(|(o, _)| !up.contains(o) && Some(**o) != down)
            .map(|(o, c)| (*o, *c))
            .collect();
        if !stray.is_empty() {
            problems.add(
                &format!("{what}: routes on other nodes (node, routes)"),
                format!("VIP #{}: {stray:?}", i + 1),
            );
        }
    }
    (lo, hi, t.elapsed())
}

fn check_load(st: &LoadStats, what: &str, problems: &mut Problems) {
    if st.ok == 0 {
        problems.add(
            &format!("{what}: TCP load"),
            "no connection succeeded".into(),
        );
    }
    // Connections may fail very rarely (a SYN lost twice in a row); 1% is a fault.
    if st.failed * 100 >= st.attempts.max(1) {
        problems.add(
            &format!("{what}: TCP load"),
            format!(
                "{} of {} connections failed: {:?}; first: {:?}",
                st.failed, st.attempts, st.failures, st.first_failures
            ),
        );
    }
}

#[test]
fn sixteen_vips_twenty_agents_hold_under_tcp_load_and_fail_over() {
    let t_test = Instant::now();
    let (vips, keys) = tcp_vips(VIPS, PORT);
    let ids: Vec<u32> = (1..=NODES).collect();
    let lab = Lab::new(NODES as usize).unwrap();
    lab.add_dsr_vips(&vips).unwrap();
    let setup = DaemonSetup::dsr_many(
        &lab,
        &vips,
        PORT,
        "tcp",
        ROUTES,
        CONNTRACK,
        "heartbeat_interval = \"100ms\"\nmiss_limit = 3\nhold_down = \"2s\"",
    )
    .unwrap();
    eprintln!("lab ready in {:?}", t_test.elapsed());
    let t = Instant::now();
    let (mut daemon, mut log) = setup.start_captured(&lab, &[]).unwrap();
    eprintln!("daemon ready in {:?}", t.elapsed());
    let servers = TcpServers::start(
        &lab.nodes
            .iter()
            .zip(&ids)
            .map(|(n, id)| (&n.ns, *id))
            .collect::<Vec<_>>(),
        PORT,
    )
    .unwrap();
    let kv = KernelView::open(setup.pin_dir()).unwrap();
    let mut problems = Problems::default();

    // ---- all 20 agents at once: every node up in the kernel within 1 s ----
    let mut watch = Watch::new(&kv, &keys, &ids, &[]).unwrap();
    let log_agents = log.len();
    let mut agents: Vec<ChildGuard> = ids
        .iter()
        .map(|id| setup.agent(&lab, *id, "100ms").unwrap())
        .collect();
    let t0 = Instant::now();
    let all_up = wait_all_own(&kv, &mut watch, &ids, t0, Duration::from_secs(15)).unwrap();
    let all_active = watch
        .nodes_ok_since
        .map(|t| t.saturating_duration_since(t0));
    eprintln!(
        "all {NODES} nodes up after {all_up:?} from the last agent's spawn (ACTIVE in NODES since {all_active:?}; tables pushed per VIP: {:?})",
        watch.flips
    );
    match all_up {
        Some(d) if d <= ALL_UP_BUDGET => {}
        Some(d) => problems.add(
            "start: all nodes up too late",
            format!("{d:?} (budget {ALL_UP_BUDGET:?})"),
        ),
        None => problems.add(
            "start: not all nodes up within 15 s",
            format!("not ACTIVE: {:?}", kv.inactive(&ids).unwrap()),
        ),
    }
    let (lo, hi, read_cost) = full_check(&kv, &keys, &ids, None, "after start", &mut problems);
    eprintln!(
        "full table read ({VIPS} x {ROUTES} entries) took {read_cost:?}; routes per node per VIP {lo}..{hi}"
    );

    // ---- 20 s of TCP load: nothing goes down ----
    let log_steady = log.len();
    let load = TcpLoad::start(&lab.client.ns, &vips, PORT, LOAD_THREADS);
    let (samples, ever_down) = monitor(&kv, &keys, &ids, None, STEADY, "steady", &mut problems);
    let steady = load.finish().unwrap();
    eprintln!(
        "steady: {samples} kernel samples, nodes ever not ACTIVE {ever_down:?}; TCP load: {}",
        steady.summary()
    );
    check_load(&steady, "steady", &mut problems);
    let (lo, hi, _) = full_check(&kv, &keys, &ids, None, "after steady", &mut problems);
    eprintln!("after steady: routes per node per VIP {lo}..{hi}");
    let lines = log.since(log_agents);
    let (start_lines, steady_lines) = lines.split_at((log_steady - log_agents).min(lines.len()));
    let downs_start = events(start_lines, "NodeDown");
    let ups_start = events(start_lines, "NodeUp");
    let downs_steady = events(steady_lines, "NodeDown");
    let ups_steady = events(steady_lines, "NodeUp");
    eprintln!(
        "daemon log: start {} NodeUp, {} NodeDown; steady {} NodeUp, {} NodeDown",
        ups_start.len(),
        downs_start.len(),
        ups_steady.len(),
        downs_steady.len()
    );
    if !downs_start.is_empty() || !downs_steady.is_empty() {
        problems.add(
            "NodeDown logged with every agent running",
            format!(
                "{} while starting {downs_start:?}, {} under load {downs_steady:?}",
                downs_start.len(),
                downs_steady.len()
            ),
        );
    }

    // ---- the daemon restarts under load (SIGTERM, then SIGKILL): the pinned program keeps
    // forwarding, the restarted daemon re-adopts everything, nothing moves, nothing breaks ----
    let tables: Vec<_> = keys.iter().map(|k| kv.routes(k).unwrap()).collect();
    let load = TcpLoad::start(&lab.client.ns, &vips, PORT, LOAD_THREADS);
    let mut restart_times = Vec::new();
    let mut downs_restart = Vec::new();
    let mut answered = 0;
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        if !load.wait_answered(answered, BEFORE_RESTART_CONNS, Duration::from_secs(15)) {
            problems.add(
                "restart: the load did not run before the restart",
                format!(
                    "{} of {BEFORE_RESTART_CONNS} connections answered in 15 s",
                    load.answered() - answered
                ),
            );
        }
        daemon.signal_and_wait(sig).unwrap();
        let t = Instant::now();
        let (d, l) = setup.start_captured(&lab, &[]).unwrap();
        restart_times.push(t.elapsed());
        daemon = d;
        log = l;
        monitor(
            &kv,
            &keys,
            &ids,
            None,
            AFTER_RESTART,
            "after restart",
            &mut problems,
        );
        downs_restart.extend(events(&log.since(0), "NodeDown"));
        answered = load.answered();
    }
    let restarted = load.finish().unwrap();
    eprintln!(
        "daemon restarts (SIGTERM, SIGKILL) ready in {restart_times:?}; NodeDown after them {downs_restart:?}; TCP load: {}",
        restarted.summary()
    );
    check_load(&restarted, "across daemon restarts", &mut problems);
    if !downs_restart.is_empty() {
        problems.add(
            "NodeDown after a daemon restart",
            format!("{downs_restart:?}"),
        );
    }
    for (k, before) in keys.iter().zip(&tables) {
        if kv.routes(k).unwrap() != *before {
            problems.add("a daemon restart changed a route table", format!("{k:?}"));
        }
    }

    // ---- SIGKILL one agent under load: its node is down within 800 ms ----
    let others: Vec<u32> = ids.iter().copied().filter(|i| *i != VICTIM).collect();
    let load = TcpLoad::start(&lab.client.ns, &vips, PORT, LOAD_THREADS);
    monitor(
        &kv,
        &keys,
        &ids,
        None,
        BEFORE_KILL,
        "before kill",
        &mut problems,
    );
    // The failover figure means something only if the victim is up when its agent dies.
    if kv.node(VICTIM).unwrap().state != NODE_ACTIVE
        || kv
            .none_on(&keys[0], VICTIM, &mut ScanBuf::default(), |_| {})
            .unwrap()
            .is_some_and(|(_, none)| none)
    {
        problems.add(
            "failover: the victim was not up before the kill (the figure is meaningless)",
            format!("node {VICTIM}"),
        );
    }
    let mut watch = Watch::new(&kv, &keys, &[], &[VICTIM]).unwrap();
    let log_kill = log.len();
    let t_kill = Instant::now();
    agents[(VICTIM - 1) as usize]
        .signal_and_wait(libc::SIGKILL)
        .unwrap();
    let failover = wait_tables(
        &kv,
        &mut watch,
        t_kill,
        Duration::from_secs(5),
        true,
        |kv, key, buf, w| kv.none_on(key, VICTIM, buf, |kv| w.poll_quiet(kv)),
    )
    .unwrap();
    let state_down = watch
        .nodes_ok_since
        .map(|t| t.saturating_duration_since(t_kill));
    eprintln!(
        "failover: no route on node {VICTIM} in any VIP after {failover:?} from SIGKILL (not ACTIVE since {state_down:?}; tables pushed per VIP: {:?})",
        watch.flips
    );
    match failover {
        Some(d) if d <= FAILOVER_BUDGET => {}
        Some(d) => problems.add(
            "failover too slow",
            format!("{d:?} (budget {FAILOVER_BUDGET:?})"),
        ),
        None => problems.add(
            "failover: killed node not down within 5 s",
            format!("NODES state {}", kv.node(VICTIM).unwrap().state),
        ),
    }
    // The other 19 stay up (and the victim down) for a while under load.
    let (_, ever_down) = monitor(
        &kv,
        &keys,
        &others,
        Some(VICTIM),
        AFTER_KILL,
        "after kill",
        &mut problems,
    );
    let after_kill = load.finish().unwrap();
    eprintln!(
        "after kill: other nodes ever not ACTIVE {ever_down:?}; TCP load: {}",
        after_kill.summary()
    );
    let (lo, hi, _) = full_check(
        &kv,
        &keys,
        &others,
        Some(VICTIM),
        "after failover",
        &mut problems,
    );
    eprintln!("after failover: routes per node per VIP {lo}..{hi}");
    let downs_kill = events(&log.since(log_kill), "NodeDown");
    eprintln!("daemon log after the kill: NodeDown {downs_kill:?}");
    let wrong: Vec<_> = downs_kill.iter().filter(|d| **d != Some(VICTIM)).collect();
    if !wrong.is_empty() {
        problems.add(
            "NodeDown for other nodes after the kill",
            format!("{wrong:?}"),
        );
    }
    if !downs_kill.contains(&Some(VICTIM)) {
        problems.add(
            "no NodeDown logged for the killed node",
            format!("node {VICTIM}"),
        );
    }
    if let Ok(Some(status)) = daemon.0.as_mut().unwrap().try_wait() {
        problems.add("the daemon exited", status.to_string());
    }
    let served = servers.finish().unwrap();
    eprintln!("connections served per node: {served:?}");

    eprintln!(
        "\nSCALE SUMMARY ({NODES} nodes, {VIPS} VIPs x {ROUTES} routes, {LOAD_THREADS} client threads)\n  \
         all nodes up (kernel) after the last agent's spawn: {all_up:?} (NODES all ACTIVE at {all_active:?})\n  \
         steady {STEADY:?} TCP: {}\n  \
         NodeDown with all agents running: {} while starting + {} under load\n  \
         daemon restarts under load (SIGTERM, SIGKILL): ready in {restart_times:?}, {} NodeDown, TCP: {}\n  \
         failover, SIGKILL -> no route on the node in any VIP: {failover:?} (NODES not ACTIVE at {state_down:?})\n  \
         TCP around the failover: {}\n  \
         test wall time {:?}",
        steady.summary(),
        downs_start.len(),
        downs_steady.len(),
        downs_restart.len(),
        restarted.summary(),
        after_kill.summary(),
        t_test.elapsed()
    );
    assert!(problems.is_empty(), "problems:\n  {}", problems.report());
}
