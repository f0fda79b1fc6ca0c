//! `lb-bench lab`: the balancer in the lab (`lb_tests::lab`: the real daemon, its tables of
//! 65536 routes per VIP, 3 nodes up), on a veth in native XDP mode.
//!
//! - `mpps`: packets per second through the balancer, by `BPF_PROG_TEST_RUN` in live-frame
//!   mode (`BPF_F_TEST_XDP_LIVE_FRAMES`, kernel >= 5.18): the kernel runs the program `repeat`
//!   times on frames built from the input, in batches, and really sends the `XDP_TX` frames
//!   out of the interface `xdp_md.ingress_ifindex` names (the gateway's `eth0`, through
//!   `ndo_xdp_xmit`) to its bridge-side peer. The balancer is the daemon's own program (found
//!   through its pinned link), the input one established dsr-l2 flow's packet (TCP PSH|ACK, 64
//!   bytes of payload, on a route that is not flagged moved: the path most traffic takes). The
//!   baseline, `baseline_tx` (swap the MACs, `XDP_TX`), runs on the same link with the same
//!   input, interleaved with the balancer round by round. For the run the peer's `XDP_PASS`
//!   program is swapped (`BPF_LINK_UPDATE` on the lab's pinned link) for `bench_sink`, which
//!   drops and counts the benchmark's frames (source 198.18.0.99) and passes the rest: both
//!   programs' frames then end the same way, cheaply, and the count proves every frame was
//!   transmitted; the lab's own traffic (heartbeats, ARP) is untouched. Mpps = repeat / wall
//!   time of the call; the kernel's own duration (its timed loop, whole ns per frame) is
//!   reported beside it. The calls run on one CPU, SCHED_FIFO (the machine's other work does
//!   not preempt them), with a pause between calls (under the RT throttle). aya 0.14's
//!   `test_run` has neither the flags nor `ctx_in`, so the calls are raw `bpf(2)` with
//!   `bpf_attr` filled by hand (below).
//!
//!   Both programs must be attached somewhere: a test run of an XDP program that no device
//!   holds adds it to the kernel's XDP dispatcher and removes it afterwards
//!   (`bpf_prog_change_xdp`), 15-35 ms per call on this machine, outside the kernel's timed
//!   loop but inside the wall time (it made the baseline look 5% slower). The balancer is
//!   attached to `eth0`; `baseline_tx` is attached in generic mode to an idle veth in the
//!   gateway's namespace for the run.
//! - `rps`: HTTP requests per second of a small load generator in the client namespace: `conns`
//!   threads, each a loop of one request per TCP connection (connect, `GET /`, read to the
//!   server's close) for `secs` seconds, through the dsr-l2 VIP (3 nodes) and directly to node
//!   1's address, alternating, `rps_rounds` times each.
//!
//! Writes `target/bench/lab.json` with `mpps.{lb,baseline,ratio}` and `rps.{vip,direct,ratio}`
//! (medians of the rounds) and the rounds themselves.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::{Array, PerCpuArray},
    programs::{Xdp, XdpMode},
};
use lb_common::{NODE_ACTIVE, PROTO_TCP, ROUTE_F_MOVED, hash::route_index};
use lb_tests::{
    fixture,
    lab::{self, Names, Spec, XdpChoice},
    netns::{sh, spawn_in},
    packet::{Packet, TCP_ACK, TCP_PSH},
};
use lb_userspace::dataplane::{PinnedView, vip_key};
use serde::Serialize;

/// The benchmark's own lab (never the default `lb-lab` someone may be running).
const LAB_NAME: &str = "lbbenchlab";
/// Source address of the benchmark's frames (no host has it; `bench_sink` drops by it).
const BENCH_SRC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);
/// The gateway's and the client's MACs in the lab.
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

#[derive(Clone)]
struct Opts {
    nodes: usize,
    rounds: usize,
    repeat: u32,
    batch: u32,
    conns: usize,
    secs: f64,
    rps_rounds: usize,
    only: Option<String>,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        nodes: 3,
        rounds: 9,
        repeat: 2_000_000,
        batch: 64,
        conns: 16,
        secs: 3.0,
        rps_rounds: 3,
        only: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val =
            || -> Result<&String> { it.next().with_context(|| format!("{a} needs a value")) };
        match a.as_str() {
            "--nodes" => o.nodes = val()?.parse()?,
            "--rounds" => o.rounds = val()?.parse()?,
            "--repeat" => o.repeat = val()?.parse()?,
            "--batch" => o.batch = val()?.parse()?,
            "--conns" => o.conns = val()?.parse()?,
            "--secs" => o.secs = val()?.parse()?,
            "--rps-rounds" => o.rps_rounds = val()?.parse()?,
            "--only" => o.only = Some(val()?.clone()),
            other => bail!(
                "unknown argument {other:?} (--nodes N, --rounds N, --repeat N, --batch N, \
                 --conns N, --secs S, --rps-rounds N, --only mpps|rps)"
            ),
        }
    }
    ensure!(
        o.rounds >= 3 && o.rps_rounds >= 1,
        "--rounds must be at least 3"
    );
    ensure!(
        o.repeat > 0 && o.conns > 0 && o.secs > 0.0,
        "--repeat, --conns, --secs must be positive"
    );
    ensure!((1..=256).contains(&o.batch), "--batch: 1 to 256");
    ensure!(
        o.only.as_deref().is_none_or(|w| w == "mpps" || w == "rps"),
        "--only mpps or --only rps"
    );
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// Raw bpf(2): what aya 0.14 does not expose (live-frame test runs, link update, link info)
// ---------------------------------------------------------------------------------------------

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `BPF_F_TEST_XDP_LIVE_FRAMES` (include/uapi/linux/bpf.h).
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// `bpf(cmd, attr, sizeof attr)`: the kernel reads `size_of::<T>()` bytes of `attr` (the
/// fields a command uses come first in its member of `union bpf_attr`; the rest is zero).
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, properly laid out bpf_attr prefix of size_of::<T>() bytes; the
    // pointers inside it (if any) point at buffers the caller keeps alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut T).cast::<libc::c_void>(),
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn fd_from(rc: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this new descriptor to us.
    unsafe { OwnedFd::from_raw_fd(rc as RawFd) }
}

/// `BPF_OBJ_GET`: a pinned object's fd.
fn obj_get(path: &Path) -> Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = Attr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let rc = bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("opening {}", path.display()))?;
    Ok(fd_from(rc))
}

/// The program behind a link: `BPF_OBJ_GET_INFO_BY_FD` (`bpf_link_info.prog_id`), then
/// `BPF_PROG_GET_FD_BY_ID`.
fn link_prog(link: &OwnedFd) -> Result<OwnedFd> {
    /// The head of `struct bpf_link_info`.
    #[repr(C)]
    #[derive(Default)]
    struct LinkInfo {
        link_type: u32,
        id: u32,
        prog_id: u32,
        _pad: u32,
    }
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    #[repr(C)]
    struct IdAttr {
        prog_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut info = LinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of::<LinkInfo>() as u32,
        info: (&mut info as *mut LinkInfo) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD of a link")?;
    let mut attr = IdAttr {
        prog_id: info.prog_id,
        next_id: 0,
        open_flags: 0,
    };
    let rc = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)
        .with_context(|| format!("BPF_PROG_GET_FD_BY_ID {}", info.prog_id))?;
    Ok(fd_from(rc))
}

/// `BPF_LINK_UPDATE`: puts `prog` behind `link` (an XDP link: atomically, on the same device
/// in the same mode).
fn link_update(link: &OwnedFd, prog: RawFd) -> Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = Attr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).context("BPF_LINK_UPDATE")?;
    Ok(())
}

/// The `test` member of `union bpf_attr` (`BPF_PROG_TEST_RUN`), up to `batch_size`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `struct xdp_md` as `ctx_in`: `data` 0, `data_end` = the frame's length, `data_meta` 0 (no
/// metadata), the ingress device (whose `ndo_xdp_xmit` sends `XDP_TX` frames) and queue 0.
#[repr(C)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// One live-frame run of `prog` on `frame` from `ifindex`: (wall time, the kernel's ns per
/// run).
fn live_run(
    prog: RawFd,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
    batch: u32,
) -> Result<(Duration, u32)> {
    let ctx = XdpMd {
        data: 0,
        data_end: frame.len() as u32,
        data_meta: 0,
        ingress_ifindex: ifindex,
        rx_queue_index: 0,
        egress_ifindex: 0,
    };
    let mut attr = TestRunAttr {
        prog_fd: prog as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ctx_size_in: size_of::<XdpMd>() as u32,
        ctx_in: (&ctx as *const XdpMd) as u64,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        batch_size: batch,
        ..Default::default()
    };
    let t0 = Instant::now();
    bpf(BPF_PROG_TEST_RUN, &mut attr)
        .context("BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES (kernel >= 5.18)")?;
    Ok((t0.elapsed(), attr.duration))
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

/// Removes the benchmark's lab however the run ends.
struct LabGuard(Names);

impl Drop for LabGuard {
    fn drop(&mut self) {
        match lab::down(&self.0) {
            Ok(r) => eprintln!("{}", r.summary(&self.0)),
            Err(e) => eprintln!("bench lab: removing the lab failed: {e:#}"),
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

#[derive(Serialize)]
struct MppsReport {
    /// Median over the rounds, Mpps by wall time.
    lb: f64,
    baseline: f64,
    /// `lb / baseline`.
    ratio: f64,
    /// Per round (same order for both), Mpps by wall time.
    lb_rounds: Vec<f64>,
    baseline_rounds: Vec<f64>,
    /// By the kernel's own duration (the timed loop only, in whole ns per frame): medians,
    /// ratio, rounds.
    lb_kernel: f64,
    baseline_kernel: f64,
    ratio_kernel: f64,
    lb_kernel_rounds: Vec<f64>,
    baseline_kernel_rounds: Vec<f64>,
    repeat: u32,
    batch: u32,
    frame_bytes: usize,
    /// The flow measured and what the balancer did with it.
    flow: String,
    /// Frames `bench_sink` counted / frames the programs were run on.
    sunk: u64,
    sent: u64,
    /// The balancer's `Stat::Tx` and `Stat::CtMiss` over its runs (per `lb stats`).
    lb_tx: u64,
    lb_ct_miss: u64,
    cpu: usize,
    /// The measuring thread ran SCHED_FIFO (not preempted by the machine's other work).
    realtime: bool,
}

#[derive(Serialize)]
struct RpsReport {
    vip: f64,
    direct: f64,
    /// `vip / direct`.
    ratio: f64,
    vip_rounds: Vec<f64>,
    direct_rounds: Vec<f64>,
    vip_target: String,
    direct_target: String,
    conns: usize,
    secs: f64,
    /// Requests that failed (connect, timeout, not 200), over all rounds.
    vip_errors: u64,
    direct_errors: u64,
}

#[derive(Serialize)]
struct Report {
    #[serde(skip_serializing_if = "Option::is_none")]
    mpps: Option<MppsReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rps: Option<RpsReport>,
    nodes: usize,
    routes_per_vip: u32,
    xdp_mode: String,
}

pub fn run(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    lab::require_root()?;
    let me = std::env::current_exe().context("current_exe")?;
    let spec = Spec {
        names: Names::new(LAB_NAME)?,
        nodes: o.nodes,
        xdp: XdpChoice::Auto,
        lb: me.with_file_name("lb"),
        lab_bin: me.with_file_name("lb-lab"),
    };
    println!(
        "bench lab: starting the lab {LAB_NAME} ({} nodes, {} routes per VIP)",
        o.nodes,
        lab::ROUTES
    );
    lab::up_with_banner(&spec, false, false).context("starting the benchmark's lab")?;
    let _guard = LabGuard(spec.names.clone());
    let status = lab::lb_status(&spec.lb, &spec.names)?;
    let xdp_mode = status["xdp_mode"].as_str().unwrap_or("?").to_string();

    let mpps = if o.only.as_deref() != Some("rps") {
        ensure!(
            xdp_mode == "native",
            "the lab's balancer runs in {xdp_mode} XDP mode: the live-frame benchmark needs \
             native mode on the veth"
        );
        Some(mpps(&spec, &o)?)
    } else {
        None
    };
    let rps = if o.only.as_deref() != Some("mpps") {
        Some(rps(&spec, &o)?)
    } else {
        None
    };

    println!(
        "\nlab bench: balancer on a veth in {xdp_mode} XDP mode, {} nodes, {} routes per VIP",
        o.nodes,
        lab::ROUTES
    );
    println!(
        "{:<44} {:>10} {:>10} {:>10} {:>7}",
        "case", "median", "min", "max", "ratio"
    );
    // One table row: the median, the rounds' range and the ratio, `digits` after the point.
    let row = |case: &str, median: f64, rounds: &[f64], ratio: f64, digits: usize| {
        println!(
            "{case:<44} {median:>10.digits$} {:>10.digits$} {:>10.digits$} {ratio:>7.3}",
            min(rounds),
            max(rounds),
        );
    };
    if let Some(m) = &mpps {
        let lb = "mpps.lb (dsr-l2 established, live frames)";
        row(lb, m.lb, &m.lb_rounds, m.ratio, 3);
        let base = "mpps.baseline (baseline_tx, same link)";
        row(base, m.baseline, &m.baseline_rounds, 1.0, 3);
        println!(
            "  ({:.1} vs {:.1} ns per frame; by the kernel's duration: lb {:.3}, baseline {:.3} \
             Mpps, ratio {:.3}; {} rounds of {} frames each, batch {}, CPU {}{}; {} of {} frames \
             reached the sink; flow {})",
            1e3 / m.lb,
            1e3 / m.baseline,
            m.lb_kernel,
            m.baseline_kernel,
            m.ratio_kernel,
            m.lb_rounds.len(),
            m.repeat,
            m.batch,
            m.cpu,
            if m.realtime { " SCHED_FIFO" } else { "" },
            m.sunk,
            m.sent,
            m.flow
        );
    }
    if let Some(r) = &rps {
        let vip = format!("rps.vip ({})", r.vip_target);
        row(&vip, r.vip, &r.vip_rounds, r.ratio, 0);
        let direct = format!("rps.direct ({})", r.direct_target);
        row(&direct, r.direct, &r.direct_rounds, 1.0, 0);
        println!(
            "  ({} connections, one request each, {} s per round, {} rounds each; errors: vip {}, direct {})",
            r.conns,
            r.secs,
            r.vip_rounds.len(),
            r.vip_errors,
            r.direct_errors
        );
    }
    let report = Report {
        mpps,
        rps,
        nodes: o.nodes,
        routes_per_vip: lab::ROUTES,
        xdp_mode,
    };
    let path = lb_tests::write_bench_json("lab.json", &report)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// `lb stats --json` of the lab's daemon: its `events`.
fn lb_events(spec: &Spec) -> Result<serde_json::Value> {
    let out = std::process::Command::new(&spec.lb)
        .args(["stats", "--json", "--socket"])
        .arg(spec.names.socket())
        .output()
        .context("running lb stats")?;
    ensure!(out.status.success(), "lb stats failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["events"].clone())
}

fn event(v: &serde_json::Value, name: &str) -> u64 {
    v[name].as_u64().unwrap_or(0)
}

/// A client port whose flow from [`BENCH_SRC`] to the dsr-l2 VIP lands on a route that is not
/// flagged moved and whose owner is active (waiting up to 10 s for the daemon to clear the
/// moved flags the nodes' joining left); the port and the owner.
fn pick_flow(spec: &Spec) -> Result<(u16, u32)> {
    let view = PinnedView::open(&spec.names.pin_dir())?;
    let vip = IpAddr::V4(lab::DSR_VIP);
    let key = vip_key(vip, lab::HTTP_PORT, PROTO_TCP);
    let seed = view.meta(&key)?.hash_seed;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let routes = view.routes(&key)?;
        for sport in 40000..41000u16 {
            let hash = fixture::seeded_flow_hash(
                seed,
                IpAddr::V4(BENCH_SRC),
                vip,
                sport,
                lab::HTTP_PORT,
                PROTO_TCP,
            );
            let r = routes[route_index(hash, routes.len() as u32) as usize];
            if r.flags & ROUTE_F_MOVED == 0 && view.node(r.node)?.state == NODE_ACTIVE {
                return Ok((sport, r.node));
            }
        }
        ensure!(
            Instant::now() < deadline,
            "no route of {vip}:{} without the moved flag and with an active owner",
            lab::HTTP_PORT
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays within it for cpu < CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        ensure!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0,
            "sched_setaffinity CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Makes the calling thread SCHED_FIFO (priority 10), so other work on its CPU does not
/// preempt it mid-run (which the wall time would count); false (and a warning) if refused.
fn set_fifo() -> bool {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: sched_setscheduler on the calling thread with a valid parameter.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0 {
        return true;
    }
    eprintln!(
        "warning: SCHED_FIFO refused ({}): the wall times include preemption",
        std::io::Error::last_os_error()
    );
    false
}

/// Back to SCHED_OTHER (what the thread's children would otherwise inherit).
fn set_normal() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: as in set_fifo.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
}

/// Removes the idle device (which detaches what it holds).
struct DummyGuard;

impl Drop for DummyGuard {
    fn drop(&mut self) {
        let _ = sh(&["ip", "link", "del", DUMMY]);
    }
}

/// Puts the peer's original program back behind its link however the run ends.
struct PeerRestore {
    link: OwnedFd,
    original: OwnedFd,
}

impl Drop for PeerRestore {
    fn drop(&mut self) {
        if let Err(e) = link_update(&self.link, self.original.as_raw_fd()) {
            eprintln!("bench lab: putting the peer's XDP_PASS program back failed: {e:#}");
        }
    }
}

fn mpps(spec: &Spec, o: &Opts) -> Result<MppsReport> {
    // In the gateway's namespace: `ingress_ifindex` is looked up there, and so is the dummy
    // device the baseline is attached to.
    let (spec, o) = (spec.clone(), o.clone());
    spawn_in(&spec.names.ns("gw"), move || mpps_in_gw(&spec, &o))
        .join()
        .map_err(|_| anyhow::anyhow!("the benchmark thread panicked"))?
}

/// The idle device in the gateway's namespace that holds `baseline_tx` (generic mode) for
/// the run, and its veth peer.
const DUMMY: &str = "lbbench0";
const DUMMY_PEER: &str = "lbbench1";

fn mpps_in_gw(spec: &Spec, o: &Opts) -> Result<MppsReport> {
    let (sport, owner) = pick_flow(spec)?;
    let frame = Packet::tcp(
        IpAddr::V4(BENCH_SRC),
        IpAddr::V4(lab::DSR_VIP),
        sport,
        lab::HTTP_PORT,
        TCP_PSH | TCP_ACK,
    )
    .payload_len(64)
    .macs(GW_MAC, CLIENT_MAC)
    .build();
    let flow = format!(
        "{BENCH_SRC}:{sport} -> {}:{} tcp PSH|ACK, route not moved, node {owner}",
        lab::DSR_VIP,
        lab::HTTP_PORT
    );
    println!("bench lab: mpps: {flow}");

    // The programs: the daemon's balancer (through its pinned link), and ours.
    let lb_link = obj_get(&spec.names.pin_dir().join("link-eth0"))?;
    let lb_prog = link_prog(&lb_link)?;
    let mut ebpf = Ebpf::load(lb_userspace::objects::get(
        lb_userspace::objects::BASELINE,
        "baseline",
    )?)
    .context("loading the baseline programs")?;
    for name in ["baseline_tx", "bench_sink"] {
        let p: &mut Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("{name} missing"))?
            .try_into()?;
        p.load().with_context(|| format!("loading {name}"))?;
    }
    let prog_fd = |ebpf: &Ebpf, name: &str| -> Result<OwnedFd> {
        let p: &Xdp = ebpf
            .program(name)
            .with_context(|| format!("{name} missing"))?
            .try_into()?;
        Ok(p.fd()?.as_fd().try_clone_to_owned()?)
    };
    let tx_prog = prog_fd(&ebpf, "baseline_tx")?;
    let sink_prog = prog_fd(&ebpf, "bench_sink")?;
    Array::<_, u32>::try_from(
        ebpf.map_mut("BENCH_SINK_SRC")
            .context("BENCH_SINK_SRC missing")?,
    )?
    .set(0, u32::from_ne_bytes(BENCH_SRC.octets()), 0)?;
    let count = PerCpuArray::<_, u64>::try_from(
        ebpf.take_map("BENCH_SINK_COUNT")
            .context("BENCH_SINK_COUNT")?,
    )?;
    let sunk = || -> Result<u64> { Ok(count.get(&0, 0)?.iter().sum()) };

    // A test run of a program that no device has attached adds it to the kernel's XDP
    // dispatcher and removes it again (`bpf_prog_change_xdp`): 15-35 ms per call, outside the
    // timed loop but in the wall time. The balancer is attached (to eth0); so that the
    // baseline is too, it is attached in generic mode to an idle device for the run (down:
    // nothing runs it there).
    let _ = sh(&["ip", "link", "del", DUMMY]);
    // (A veth pair: this kernel has no `dummy` driver.)
    sh(&[
        "ip", "link", "add", DUMMY, "type", "veth", "peer", "name", DUMMY_PEER,
    ])?;
    let _dummy = DummyGuard;
    {
        let p: &mut Xdp = ebpf
            .program_mut("baseline_tx")
            .context("baseline_tx missing")?
            .try_into()?;
        p.attach(DUMMY, XdpMode::Skb)
            .with_context(|| format!("attaching baseline_tx to {DUMMY} (generic)"))?;
    }

    // The sink behind the gateway's bridge-side peer, for the run.
    let peer_link = obj_get(&spec.names.peer_pin_dir().join("link-gw"))?;
    let original = link_prog(&peer_link)?;
    link_update(&peer_link, sink_prog.as_raw_fd())?;
    let restore = PeerRestore {
        link: peer_link,
        original,
    };

    let cpu = num_cpus().saturating_sub(1);
    let (lb_fd, tx_fd) = (lb_prog.as_raw_fd(), tx_prog.as_raw_fd());
    let (rounds, repeat, batch) = (o.rounds, o.repeat, o.batch);
    let sunk_before = sunk()?;
    let ev_before = lb_events(spec)?;
    // SAFETY: if_nametoindex reads a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
    ensure!(ifindex != 0, "no eth0 in the gateway's namespace");
    pin_to(cpu)?;
    let realtime = set_fifo();
    let measured = (|| -> Result<_> {
        // Warm-up.
        for fd in [lb_fd, tx_fd] {
            live_run(fd, &frame, ifindex, repeat.min(200_000), batch)?;
        }
        let mut lb = Vec::new();
        let mut base = Vec::new();
        for r in 0..rounds {
            // Alternate which goes first, so a drift in the machine's load hits both alike.
            let order = if r % 2 == 0 {
                [(lb_fd, true), (tx_fd, false)]
            } else {
                [(tx_fd, false), (lb_fd, true)]
            };
            for (fd, is_lb) in order {
                if realtime {
                    // Under the RT throttle (95% of each second by default).
                    std::thread::sleep(Duration::from_millis(300));
                }
                let m = live_run(fd, &frame, ifindex, repeat, batch)?;
                if is_lb { lb.push(m) } else { base.push(m) }
            }
        }
        Ok((lb, base))
    })();
    if realtime {
        set_normal();
    }
    let (lb_runs, base_runs) = measured?;
    let ev_after = lb_events(spec)?;
    let sunk = sunk()? - sunk_before;
    drop(restore);

    let warm = u64::from(repeat.min(200_000));
    let sent = 2 * warm + 2 * rounds as u64 * u64::from(repeat);
    let lb_tx = event(&ev_after, "tx") - event(&ev_before, "tx");
    let lb_ct_miss = event(&ev_after, "ct_miss") - event(&ev_before, "ct_miss");
    let lb_sent = warm + rounds as u64 * u64::from(repeat);
    ensure!(
        lb_tx >= lb_sent,
        "the balancer forwarded {lb_tx} packets (Stat::Tx) for {lb_sent} runs: it did not take \
         the dsr-l2 path (lb stats --json shows where they went)"
    );
    // A few frames may meet a full veth ring now and then; more than 0.1% would make the runs
    // cheaper than they should be.
    if sent.abs_diff(sunk) * 1000 > sent {
        eprintln!(
            "warning: {sent} frames were sent with XDP_TX but the sink counted {sunk}: the veth \
             dropped them on transmit (its ring full), which makes those runs cheaper"
        );
    }
    let mpps_wall = |v: &[(Duration, u32)]| -> Vec<f64> {
        v.iter()
            .map(|(d, _)| f64::from(repeat) / d.as_secs_f64() / 1e6)
            .collect()
    };
    let mpps_kernel = |v: &[(Duration, u32)]| -> Vec<f64> {
        v.iter()
            .map(|(_, ns)| 1e3 / f64::from((*ns).max(1)))
            .collect()
    };
    let lb_rounds = mpps_wall(&lb_runs);
    let baseline_rounds = mpps_wall(&base_runs);
    let (lb_kernel_rounds, baseline_kernel_rounds) =
        (mpps_kernel(&lb_runs), mpps_kernel(&base_runs));
    let (lb_k, base_k) = (median(&lb_kernel_rounds), median(&baseline_kernel_rounds));
    let (lb, baseline) = (median(&lb_rounds), median(&baseline_rounds));
    Ok(MppsReport {
        lb,
        baseline,
        ratio: lb / baseline,
        lb_rounds,
        baseline_rounds,
        lb_kernel: lb_k,
        baseline_kernel: base_k,
        ratio_kernel: lb_k / base_k,
        lb_kernel_rounds,
        baseline_kernel_rounds,
        repeat,
        batch,
        frame_bytes: frame.len(),
        flow,
        sunk,
        sent,
        lb_tx,
        lb_ct_miss,
        cpu,
        realtime,
    })
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One load run: `conns` threads in the client namespace, each a loop of single-request
/// connections to `dst` (from the client's addresses in turn) until `secs` pass. (requests/s,
/// failed requests).
fn load(client: &str, dst: IpAddr, conns: usize, secs: f64) -> Result<(f64, u64)> {
    let sources: Vec<IpAddr> = std::iter::once(lab::CLIENT_IP)
        .chain(lab::CLIENT_EXTRA)
        .map(IpAddr::V4)
        .collect();
    let barrier = Arc::new(Barrier::new(conns + 1));
    let run_for = Duration::from_secs_f64(secs);
    let workers: Vec<_> = (0..conns)
        .map(|k| {
            let barrier = barrier.clone();
            let src = sources[k % sources.len()];
            spawn_in(client, move || {
                barrier.wait();
                let start = Instant::now();
                let (mut ok, mut failed) = (0u64, 0u64);
                while start.elapsed() < run_for {
                    match lab::http_get_ip(Some(src), dst, lab::HTTP_PORT) {
                        Ok(_) => ok += 1,
                        Err(_) => failed += 1,
                    }
                }
                Ok((ok, failed, start.elapsed()))
            })
        })
        .collect();
    barrier.wait();
    let (mut ok, mut failed, mut longest) = (0u64, 0u64, Duration::ZERO);
    for w in workers {
        let (o, f, d) = w
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        ok += o;
        failed += f;
        longest = longest.max(d);
    }
    Ok((ok as f64 / longest.as_secs_f64(), failed))
}

fn rps(spec: &Spec, o: &Opts) -> Result<RpsReport> {
    let client = spec.names.ns("client");
    let vip = IpAddr::V4(lab::DSR_VIP);
    let direct = IpAddr::V4(lab::node_ip(1));
    let target = |a: IpAddr| format!("http://{}/", SocketAddr::new(a, lab::HTTP_PORT));
    println!(
        "bench lab: rps: {} connections x {} s, {} vs {}, {} rounds each",
        o.conns,
        o.secs,
        target(vip),
        target(direct),
        o.rps_rounds
    );
    // Warm-up (and a check that both answer).
    lab::http_get_ip_in(&client, vip, lab::HTTP_PORT, None)?;
    lab::http_get_ip_in(&client, direct, lab::HTTP_PORT, None)?;
    load(&client, vip, o.conns, 0.5)?;
    let (mut v, mut d) = (Vec::new(), Vec::new());
    let (mut v_err, mut d_err) = (0, 0);
    for r in 0..o.rps_rounds {
        let order = if r % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for through_vip in order {
            let (rate, failed) = load(
                &client,
                if through_vip { vip } else { direct },
                o.conns,
                o.secs,
            )?;
            if through_vip {
                v.push(rate);
                v_err += failed;
            } else {
                d.push(rate);
                d_err += failed;
            }
        }
    }
    let (vm, dm) = (median(&v), median(&d));
    Ok(RpsReport {
        vip: vm,
        direct: dm,
        ratio: vm / dm,
        vip_rounds: v,
        direct_rounds: d,
        vip_target: target(vip),
        direct_target: target(direct),
        conns: o.conns,
        secs: o.secs,
        vip_errors: v_err,
        direct_errors: d_err,
    })
}
