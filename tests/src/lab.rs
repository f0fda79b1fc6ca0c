//! The lab: the balancer working end to end on one machine, in network namespaces that outlive
//! the process that made them (`lb-lab up|down|status`, `cargo xtask lab ...`, and
//! `cargo xtask run` with no arguments).
//!
//! Topology (one L2 segment, 198.18.0.0/24 and 2001:db8::/64, a bridge in its own namespace;
//! an IPv6 address ends in the IPv4 address's last octet, written as is: .11 is ::11):
//! ```text
//!   <name>-client   198.18.0.1 (+ .101-.104), 2001:db8::1 (+ ::101-::104); routes
//!                   198.18.100.0/24 and 2001:db8:100::/64 via the gateway
//!   <name>-gw       198.18.0.2, 2001:db8::2   `lb run` on eth0 (heartbeats on :7711,
//!                   metrics on :9100)
//!   <name>-nodeN    198.18.0.(10+N), 2001:db8::(10+N), MAC 02:00:00:00:00:(0a+N): VIPs on lo,
//!                   arp_ignore=1, arp_announce=2, `lb agent`, `lb decap` (ipip),
//!                   `lb-lab serve` (dual-stack)
//!   <name>-br       br0 198.18.0.254, 2001:db8::254, MAC 02:00:00:00:00:fe: the bridge, and
//!                   the IP router the ipip VIPs' encapsulated packets go to
//!                   (`[ipip] gateway_mac`)
//! ```
//! VIPs: 198.18.100.1 and 2001:db8:100::1 dsr-l2 (TCP 80 HTTP, TCP 7 echo, UDP 7 echo),
//! 198.18.100.2 and 2001:db8:100::2 ipip (TCP 80; IP6IP6 for the IPv6 one), 65536 routes each.
//! These are the README's addresses: its `lb` examples work on the lab. IPv6 addresses skip
//! duplicate address detection (`accept_dad=0`, `nodad`), so they are usable at once.
//!
//! Everything the lab makes is found again by name, not by memory, so `down` also cleans up
//! after a crash: namespaces `<name>-*`, processes whose `argv[0]` is `<name>:<role>` (or
//! listed in `/run/<name>/pids/`, or running in a lab namespace), the pins
//! `/sys/fs/bpf/<name>` (the daemon's) and `/sys/fs/bpf/<name>-peers` (the bridge side's
//! `XDP_PASS` programs), the daemon's socket and lock under `/run/lb/` (a cluster lab's
//! balancers, `crate::cluster_lab`: the pins `/sys/fs/bpf/<name>-lbI` and locks
//! `/run/lb/<name>-lbI.lock` of their instances), and `/run/<name>/` (config, key, state, logs,
//! pid files).
use std::{
    ffi::OsString,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::{
        fd::{AsRawFd as _, FromRawFd as _},
        unix::{
            fs::{OpenOptionsExt as _, PermissionsExt as _},
            process::CommandExt as _,
        },
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::netns::{sh, spawn_in};

/// The lab's default name: namespaces `lb-lab-*`, `/run/lb-lab/`, instance `lb-lab`.
pub const DEFAULT_NAME: &str = "lb-lab";
/// Default and largest node count.
pub const DEFAULT_NODES: usize = 3;
pub const MAX_NODES: usize = 64;

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The client's extra source addresses (secondary addresses on its eth0).
pub const CLIENT_EXTRA: [Ipv4Addr; 4] = [
    Ipv4Addr::new(198, 18, 0, 101),
    Ipv4Addr::new(198, 18, 0, 102),
    Ipv4Addr::new(198, 18, 0, 103),
    Ipv4Addr::new(198, 18, 0, 104),
];
pub const GW_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
pub const ROUTER_MAC: &str = "02:00:00:00:00:fe";
/// The dsr-l2 VIP: HTTP on 80, TCP and UDP echo on 7.
pub const DSR_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
/// The ipip VIP: HTTP on 80.
pub const IPIP_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);
pub const VIP_NET: &str = "198.18.100.0/24";
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x1);
/// The client's extra IPv6 source addresses.
pub const CLIENT_EXTRA6: [Ipv6Addr; 4] = [
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x101),
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x102),
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x103),
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x104),
];
pub const GW_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x2);
pub const ROUTER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x254);
/// The IPv6 dsr-l2 VIP: HTTP on 80, TCP and UDP echo on 7.
pub const DSR_VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x1);
/// The IPv6 ipip (IP6IP6) VIP: HTTP on 80.
pub const IPIP_VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x2);
pub const VIP6_NET: &str = "2001:db8:100::/64";
/// Outer source prefix of the IPv6 ipip VIP's packets (`[ipip] source_v6`).
pub const IPIP_SRC6: &str = "fd00::";
/// Outer source network of the IPv4 ipip VIP's packets (`[ipip] source_v4`).
pub const IPIP_SRC4_NET: &str = "172.16.0.0/16";
pub const HTTP_PORT: u16 = 80;
pub const ECHO_PORT: u16 = 7;
pub const HB_PORT: u16 = 7711;
pub const METRICS_PORT: u16 = 9100;
pub const ROUTES: u32 = 65536;

/// Node `i` (1-based): its address on the segment.
pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 10 + i as u8)
}

/// Node `i` (1-based): its IPv6 address, ending in the digits of its IPv4 address's last
/// octet (node 1: 198.18.0.11 and 2001:db8::11).
pub fn node_ip6(i: usize) -> Ipv6Addr {
    v6_host(10 + i as u8)
}

/// 2001:db8::D for the decimal digits D of `last` (.11 -> ::11, .254 -> ::254).
pub fn v6_host(last: u8) -> Ipv6Addr {
    let low = u16::from_str_radix(&last.to_string(), 16).unwrap_or(0);
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, low)
}

/// Node `i` (1-based): its MAC (the README's numbering: node 1 is `...:0b`).
pub fn node_mac(i: usize) -> String {
    format!("02:00:00:00:00:{:02x}", 0x0a + i)
}

/// The names one lab uses, all derived from its name.
#[derive(Clone, Debug)]
pub struct Names {
    pub name: String,
}

impl Names {
    /// `lb-lab`, or another name of lowercase letters and digits that starts with `lb` and
    /// contains `lab` (the tests' `lbtlab`): no lab's `<name>-` prefix then covers another
    /// lab's names, and `/run/<name>` is never a directory of someone else (`/run/lb`).
    pub fn new(name: &str) -> Result<Self> {
        let plain = name.len() <= 24
            && name.starts_with("lb")
            && name.contains("lab")
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        ensure!(
            name == DEFAULT_NAME || plain,
            "lab name {name:?}: use {DEFAULT_NAME}, or up to 24 lowercase letters and digits \
             starting with `lb` and containing `lab` (e.g. lbtlab)"
        );
        Ok(Self { name: name.into() })
    }

    /// Namespace of a role: `client`, `gw`, `br`, `node1`...
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.name)
    }
    pub fn ns_prefix(&self) -> String {
        format!("{}-", self.name)
    }
    pub fn run_dir(&self) -> PathBuf {
        PathBuf::from("/run").join(&self.name)
    }
    pub fn pid_dir(&self) -> PathBuf {
        self.run_dir().join("pids")
    }
    pub fn log_dir(&self) -> PathBuf {
        self.run_dir().join("logs")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.run_dir().join("state")
    }
    pub fn config(&self) -> PathBuf {
        self.run_dir().join("lb.toml")
    }
    pub fn key(&self) -> PathBuf {
        self.run_dir().join("key")
    }
    pub(crate) fn lab_file(&self) -> PathBuf {
        self.run_dir().join("lab.json")
    }
    /// The daemon's instance (its pins, socket and lock are named after it).
    pub fn instance(&self) -> &str {
        &self.name
    }
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(&self.name)
    }
    pub fn peer_pin_dir(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(format!("{}-peers", self.name))
    }
    pub fn socket(&self) -> PathBuf {
        lb_userspace::api::default_socket(&self.name)
    }
    fn lock(&self) -> PathBuf {
        PathBuf::from(lb_userspace::api::SOCKET_DIR).join(format!("{}.lock", self.name))
    }
    /// Balancer `i`'s `lb run` instance in a cluster lab (`crate::cluster_lab`): its pins
    /// `/sys/fs/bpf/<name>-lbI` and lock `/run/lb/<name>-lbI.lock`.
    pub fn balancer_instance(&self, i: usize) -> String {
        format!("{}-lb{i}", self.name)
    }
    /// `argv[0]` of the lab's processes: `<name>:<role>`.
    fn arg0(&self, role: &str) -> String {
        format!("{}:{role}", self.name)
    }
    /// Every path the lab creates outside its namespaces (a cluster lab's balancers: their
    /// instances' pins and locks).
    fn paths(&self) -> Vec<PathBuf> {
        let mut v = vec![
            self.pin_dir(),
            self.peer_pin_dir(),
            self.socket(),
            self.lock(),
        ];
        for i in 1..=crate::cluster_lab::MAX_BALANCERS {
            let instance = self.balancer_instance(i);
            v.push(PathBuf::from("/sys/fs/bpf").join(&instance));
            v.push(PathBuf::from(lb_userspace::api::SOCKET_DIR).join(format!("{instance}.lock")));
        }
        v.push(self.run_dir());
        v
    }
}

/// XDP mode the lab asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpChoice {
    /// Native where the veths allow it (an `XDP_PASS` program on the gateway's bridge-side
    /// peer attaches natively), generic otherwise.
    Auto,
    Generic,
}

/// What `up` builds.
#[derive(Clone, Debug)]
pub struct Spec {
    pub names: Names,
    pub nodes: usize,
    pub xdp: XdpChoice,
    /// The `lb` binary.
    pub lb: PathBuf,
    /// The `lb-lab` binary (runs the servers: `lb-lab serve`).
    pub lab_bin: PathBuf,
}

/// What a running lab recorded about itself (`/run/<name>/lab.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Recorded {
    pub nodes: usize,
    /// `native` or `generic`: what the lab set up for.
    pub xdp_mode: String,
    /// Why that mode.
    pub xdp_why: String,
    pub lb: PathBuf,
    pub foreground: bool,
    /// A cluster lab's balancer count (`lb-lab up --balancers N`); 0: the single-balancer lab.
    #[serde(default)]
    pub balancers: usize,
}

// ---------------------------------------------------------------------------------------------
// Signals (foreground mode): a flag, so teardown runs whatever interrupted us
// ---------------------------------------------------------------------------------------------

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT, SIGTERM and SIGHUP set a flag instead of killing the process (children get the
/// default disposition back on exec).
pub fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

fn check_stop() -> Result<()> {
    if stop_requested() {
        bail!("interrupted");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// up
// ---------------------------------------------------------------------------------------------

/// Builds the lab and starts everything; with `foreground` the daemon's output goes to our
/// stdout/stderr and this returns when the daemon exits (after a signal, which is forwarded to
/// it), tearing the lab down; otherwise it returns once the lab answers, leaving it running.
pub fn up(spec: &Spec, foreground: bool) -> Result<()> {
    up_with_banner(spec, foreground, true)
}

/// [`up`]; without `banner` the lab does not print how to use it (for a benchmark that runs
/// its own lab).
pub fn up_with_banner(spec: &Spec, foreground: bool, banner: bool) -> Result<()> {
    require_root()?;
    ensure!(
        (1..=MAX_NODES).contains(&spec.nodes),
        "--nodes {}: use 1 to {MAX_NODES}",
        spec.nodes
    );
    for (what, p) in [("lb", &spec.lb), ("lb-lab", &spec.lab_bin)] {
        ensure!(
            p.is_file(),
            "{what} binary {} is missing: build it (`cargo xtask lab up` does)",
            p.display()
        );
    }
    let n = &spec.names;
    refuse_if_up(n)?;
    if !leftovers(n).is_empty() {
        println!("lab: removing what an earlier lab {} left behind", n.name);
        println!("{}", down(n)?.summary(n));
    }
    if foreground {
        catch_signals();
        let result = up_foreground(spec, banner);
        println!("lab: tearing down");
        let down = down(n);
        if let Ok(r) = &down {
            println!("{}", r.summary(n));
        }
        return match (result, down) {
            (Ok(()), d) => d.map(|_| ()),
            (Err(e), Ok(_)) => Err(e),
            (Err(e), Err(d)) => Err(e.context(format!("and tearing the lab down failed: {d:#}"))),
        };
    }
    match build_and_start(spec, false, banner) {
        Ok(_) => Ok(()),
        Err(e) => {
            eprintln!(
                "lab: error: {e:#}\nlab: the lab is left as it is for a look (logs in {}); \
                 `cargo xtask lab down` removes it",
                n.log_dir().display()
            );
            Err(e)
        }
    }
}

/// Fails when the lab called `n` (single or cluster) is up: its record is there and its
/// balancer daemon (one of them, for a cluster lab) or the cluster's etcd runs.
pub fn refuse_if_up(n: &Names) -> Result<()> {
    let Some(rec) = read_recorded(n) else {
        return Ok(());
    };
    let mut roles = vec!["daemon".to_string(), "etcd".into()];
    roles.extend((1..=rec.balancers).map(|i| format!("lb-lb{i}")));
    if !roles.iter().any(|r| pid_alive_by_file(n, r).is_some()) {
        return Ok(());
    }
    let what = if rec.balancers > 0 {
        format!("{} balancers, {} nodes", rec.balancers, rec.nodes)
    } else {
        format!("{} nodes", rec.nodes)
    };
    bail!(
        "the lab {} is already up ({what}, started {}): `cargo xtask lab status` shows it, \
         `cargo xtask lab down` removes it",
        n.name,
        match (rec.foreground, rec.balancers > 0) {
            (true, false) => "in the foreground by `cargo xtask run`",
            (true, true) => "in the foreground by `cargo xtask lab up --foreground`",
            (false, _) => "by `cargo xtask lab up`",
        }
    );
}

fn up_foreground(spec: &Spec, banner: bool) -> Result<()> {
    let mut daemon = build_and_start(spec, true, banner)?.context("no daemon child")?;
    let mut forwarded = false;
    loop {
        if let Some(status) = daemon.try_wait()? {
            if !forwarded && !status.success() {
                bail!("the daemon exited ({status})");
            }
            return Ok(());
        }
        if stop_requested() && !forwarded {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
            forwarded = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Namespaces, links, addresses, programs, processes; waits until the lab answers. Returns the
/// daemon child in foreground mode.
fn build_and_start(spec: &Spec, foreground: bool, banner: bool) -> Result<Option<Child>> {
    let n = &spec.names;
    ensure_bpffs()?;
    for d in [n.run_dir(), n.pid_dir(), n.log_dir(), n.state_dir()] {
        fs::create_dir_all(&d).with_context(|| format!("mkdir {}", d.display()))?;
    }
    fs::set_permissions(n.run_dir(), fs::Permissions::from_mode(0o700))?;
    write_key(&n.key())?;

    println!(
        "lab: creating namespaces {}{{client,gw,br,node1..{}}}",
        n.ns_prefix(),
        spec.nodes
    );
    build_network(spec)?;
    check_stop()?;

    let (xdp_mode, xdp_why) = choose_xdp(spec)?;
    fs::write(n.config(), lab_config(n, spec.nodes, xdp_mode))
        .with_context(|| format!("writing {}", n.config().display()))?;
    let rec = Recorded {
        nodes: spec.nodes,
        xdp_mode: xdp_mode.into(),
        xdp_why: xdp_why.clone(),
        lb: spec.lb.clone(),
        foreground,
        balancers: 0,
    };
    fs::write(n.lab_file(), serde_json::to_vec_pretty(&rec)?)?;
    check_stop()?;

    // Node side first: servers, decapsulators, agents (agents beat before the daemon listens;
    // it takes them in as soon as it does).
    let lb = spec.lb.as_os_str();
    for i in 1..=spec.nodes {
        let ns = n.ns(&format!("node{i}"));
        let mut serve_args: Vec<OsString> =
            vec!["serve".into(), "--node".into(), i.to_string().into()];
        for vip in all_vips() {
            serve_args.extend(["--vip".into(), vip.to_string().into()]);
        }
        spawn(
            n,
            &format!("serve-{i}"),
            &ns,
            spec.lab_bin.as_os_str(),
            &serve_args,
            false,
        )?;
        let decap: Vec<OsString> = [
            "decap",
            "--iface",
            "eth0",
            "--vip",
            &IPIP_VIP.to_string(),
            "--vip",
            &IPIP_VIP6.to_string(),
            // Only the balancer's outer sources (`[ipip] source_v4`, `source_v6` as a /96).
            "--source",
            IPIP_SRC4_NET,
            "--source",
            &format!("{IPIP_SRC6}/96"),
            "--xdp-mode",
            xdp_mode,
        ]
        .map(OsString::from)
        .to_vec();
        spawn(n, &format!("decap-{i}"), &ns, lb, &decap, false)?;
        spawn(n, &format!("agent-{i}"), &ns, lb, &agent_args(n, i), false)?;
    }
    check_stop()?;
    let mut run: Vec<OsString> = ["run", "--iface", "eth0", "--config"]
        .map(OsString::from)
        .to_vec();
    run.extend([
        n.config().into(),
        "--state-dir".into(),
        n.state_dir().into(),
        "--detach-on-exit".into(),
    ]);
    if foreground {
        println!("lab: starting the balancer (its output follows)");
    }
    let mut daemon = Some(spawn(n, "daemon", &n.ns("gw"), lb, &run, foreground)?);
    let waited = wait_up(spec, daemon.as_mut().filter(|_| foreground));
    if let Err(e) = waited {
        if let Some(mut d) = daemon.filter(|_| foreground) {
            let _ = d.kill();
            let _ = d.wait();
        }
        return Err(e);
    }
    if banner {
        print_banner(spec, &rec);
    }
    Ok(daemon.filter(|_| foreground))
}

/// Every VIP address of the lab: the dsr-l2 and ipip VIPs, IPv4 then IPv6.
pub fn all_vips() -> [IpAddr; 4] {
    [
        IpAddr::V4(DSR_VIP),
        IpAddr::V4(IPIP_VIP),
        IpAddr::V6(DSR_VIP6),
        IpAddr::V6(IPIP_VIP6),
    ]
}

pub fn write_key(path: &Path) -> Result<()> {
    let mut raw = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .context("reading /dev/urandom")?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(f, "{hex}")?;
    Ok(())
}

/// `ip -n NS -batch -` of `lines`.
pub fn ip_batch(ns: &str, lines: &[String]) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ip (package iproute2)")?;
    {
        let mut stdin = child.stdin.take().context("ip -batch stdin")?;
        for l in lines {
            writeln!(stdin, "{l}")?;
        }
    }
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "ip -n {ns} -batch failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// `sysctl -qw K=V...` inside namespace `ns`.
pub fn sysctls(ns: &str, kv: &[(&str, &str)]) -> Result<()> {
    let mut args = vec![
        "ip".to_string(),
        "netns".into(),
        "exec".into(),
        ns.into(),
        "sysctl".into(),
        "-qw".into(),
    ];
    args.extend(kv.iter().map(|(k, v)| format!("{k}={v}")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    sh(&args).map(|_| ())
}

fn build_network(spec: &Spec) -> Result<()> {
    let n = &spec.names;
    let br = n.ns("br");
    // (namespace, bridge-side name, last octet of MAC and address)
    let mut hosts: Vec<(String, String, u8)> = vec![
        (n.ns("client"), "client".into(), 1),
        (n.ns("gw"), "gw".into(), 2),
    ];
    for i in 1..=spec.nodes {
        hosts.push((n.ns(&format!("node{i}")), format!("node{i}"), 10 + i as u8));
    }
    // No duplicate address detection (a second or two of "tentative" addresses that cannot
    // be used): set before the links exist, so every interface inherits it.
    let no_dad = [
        ("net.ipv6.conf.all.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_dad", "0"),
    ];
    for ns in std::iter::once(&br).chain(hosts.iter().map(|h| &h.0)) {
        sh(&["ip", "netns", "add", ns])?;
        sysctls(ns, &no_dad)?;
    }
    // No multicast snooping: neighbour discovery is flooded like ARP.
    let mut lines = vec![
        "link set lo up".to_string(),
        "link add br0 type bridge mcast_snooping 0".into(),
        format!("link set br0 address {ROUTER_MAC}"),
        format!("addr add {ROUTER_IP}/24 dev br0"),
        format!("addr add {ROUTER_IP6}/64 dev br0 nodad"),
        "link set br0 up".into(),
    ];
    for (ns, peer, _) in &hosts {
        lines.push(format!(
            "link add {peer} type veth peer name eth0 netns {ns}"
        ));
        lines.push(format!("link set {peer} master br0 up"));
    }
    ip_batch(&br, &lines)?;
    // br0 routes the ipip VIPs' encapsulated packets (outer sources 172.16/16 and fd00::/96)
    // to the nodes.
    sysctls(
        &br,
        &[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.br0.rp_filter", "0"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.br0.send_redirects", "0"),
        ],
    )?;
    for (ns, _, last) in &hosts {
        let mut lines = vec![
            "link set lo up".to_string(),
            format!("link set eth0 address 02:00:00:00:00:{last:02x}"),
            format!("addr add 198.18.0.{last}/24 dev eth0"),
            format!("addr add {}/64 dev eth0 nodad", v6_host(*last)),
            "link set eth0 up".into(),
        ];
        let mut kv = vec![
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.eth0.rp_filter", "0"),
        ];
        if *last == 1 {
            for a in CLIENT_EXTRA {
                lines.push(format!("addr add {a}/24 dev eth0"));
            }
            for a in CLIENT_EXTRA6 {
                lines.push(format!("addr add {a}/64 dev eth0 nodad"));
            }
            lines.push(format!("route add {VIP_NET} via {GW_IP}"));
            lines.push(format!("route add {VIP6_NET} via {GW_IP6}"));
        } else if *last > 10 {
            // (IPv6 needs no arp_ignore: a neighbour solicitation is only answered for
            // addresses of the interface it arrived on, not for those on lo.)
            for vip in all_vips() {
                let len = if vip.is_ipv4() { 32 } else { 128 };
                lines.push(format!("addr add {vip}/{len} dev lo"));
            }
            kv.push(("net.ipv4.conf.all.arp_ignore", "1"));
            kv.push(("net.ipv4.conf.all.arp_announce", "2"));
        }
        ip_batch(ns, &lines)?;
        sysctls(ns, &kv)?;
    }
    // Native XDP frames lose the skb's checksum-offload state: everything sent inside the lab
    // carries real checksums (`ethtool -K IF tx off`, done here with the ioctl).
    let peers: Vec<String> = hosts.iter().map(|h| h.1.clone()).collect();
    in_ns(&br, move || {
        for p in &peers {
            tx_csum_off(p)?;
        }
        Ok(())
    })?;
    for (ns, _, _) in &hosts {
        in_ns(ns, || tx_csum_off("eth0"))?;
    }
    Ok(())
}

/// Runs `f` on a thread inside namespace `ns`.
pub fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    spawn_in(ns, f)
        .join()
        .map_err(|_| anyhow::anyhow!("thread in namespace {ns} panicked"))?
}

/// `ethtool -K IF tx off`, read back (`lb_userspace::offload`).
pub fn tx_csum_off(ifname: &str) -> Result<()> {
    lb_userspace::offload::set(ifname, lb_userspace::offload::Feature::TxCsum, false)
}

/// `lb agent` arguments of node `i` of lab `n` (also for restarting it: `LabCtl::start_agent`).
pub fn agent_args(n: &Names, i: usize) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "agent",
        "--node-id",
        &i.to_string(),
        "--balancer",
        &format!("{GW_IP}:{HB_PORT}"),
        "--key-file",
    ]
    .map(OsString::from)
    .to_vec();
    args.push(n.key().into());
    args
}

/// Native XDP needs the bridge-side peer of the gateway's veth to run an XDP program (frames
/// the balancer sends back with `XDP_TX` are dropped otherwise); attach `baseline_pass` there
/// natively and pin its link. Failing that, the lab runs in generic mode.
fn choose_xdp(spec: &Spec) -> Result<(&'static str, String)> {
    if spec.xdp == XdpChoice::Generic {
        return Ok((
            "generic",
            "generic mode was asked for (--xdp generic)".into(),
        ));
    }
    let dir = spec.names.peer_pin_dir();
    fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let pin = dir.join("link-gw");
    match in_ns(&spec.names.ns("br"), move || attach_pass("gw", &pin)) {
        Ok(()) => Ok((
            "native",
            "veth supports native XDP; the gateway's bridge-side peer runs an XDP_PASS program \
             (so XDP_TX frames are received) and TX checksum offload is off on the lab's veths"
                .into(),
        )),
        Err(e) => Ok((
            "generic",
            format!("native XDP on the gateway's bridge-side veth failed ({e:#})"),
        )),
    }
}

fn attach_pass(ifname: &str, pin: &Path) -> Result<()> {
    use aya::programs::{Xdp, XdpMode, links::FdLink};
    let obj = lb_userspace::objects::get(lb_userspace::objects::BASELINE, "baseline")?;
    let mut ebpf = aya::Ebpf::load(obj).context("loading the baseline programs")?;
    let prog: &mut Xdp = ebpf
        .program_mut("baseline_pass")
        .context("baseline_pass missing")?
        .try_into()?;
    prog.load().context("loading baseline_pass")?;
    let id = prog
        .attach(ifname, XdpMode::Driver)
        .with_context(|| format!("attaching XDP_PASS to {ifname} (native)"))?;
    let link = FdLink::try_from(prog.take_link(id)?).context("XDP link is not an fd link")?;
    link.pin(pin)
        .with_context(|| format!("pinning the link at {}", pin.display()))?;
    Ok(())
}

/// The lab's VIPs: (address, port, protocol, mode).
pub fn lab_vips() -> Vec<(IpAddr, u16, &'static str, &'static str)> {
    let mut v = Vec::new();
    for (dsr, ipip) in [
        (IpAddr::V4(DSR_VIP), IpAddr::V4(IPIP_VIP)),
        (IpAddr::V6(DSR_VIP6), IpAddr::V6(IPIP_VIP6)),
    ] {
        v.push((dsr, HTTP_PORT, "tcp", "dsr-l2"));
        v.push((dsr, ECHO_PORT, "tcp", "dsr-l2"));
        v.push((dsr, ECHO_PORT, "udp", "dsr-l2"));
        v.push((ipip, HTTP_PORT, "tcp", "ipip"));
    }
    v
}

/// The lab's `lb.toml`.
pub fn lab_config(n: &Names, nodes: usize, xdp_mode: &str) -> String {
    let mut s = format!(
        r#"# The lab's configuration (written by `lb-lab up`; README "Configuration" explains each field).
[daemon]
instance = "{instance}"
heartbeat_listen = "{GW_IP}:{HB_PORT}"
key_file = "{key}"
xdp_mode = "{xdp_mode}"
conntrack_size = 65536
metrics_listen = "{GW_IP}:{METRICS_PORT}"

[ipip]
gateway_mac = "{ROUTER_MAC}"     # br0 in {br}: routes the outer packets to the nodes
mtu = 1500
source_v4 = "{IPIP_SRC4_NET}"
source_v6 = "{IPIP_SRC6}"
"#,
        instance = n.instance(),
        key = n.key().display(),
        br = n.ns("br"),
    );
    for (addr, port, proto, mode) in lab_vips() {
        s += &format!(
            "\n[[vip]]\naddr = \"{addr}\"\nport = {port}\nproto = \"{proto}\"\nmode = \"{mode}\"\nroutes = {ROUTES}\n"
        );
    }
    for i in 1..=nodes {
        s += &format!(
            "\n[[node]]\nid = {i}\nname = \"node{i}\"\nmac = \"{}\"\nipv4 = \"{}\"\nipv6 = \"{}\"\n",
            node_mac(i),
            node_ip(i),
            node_ip6(i)
        );
    }
    s
}

/// `lb-lab --name <name> <args>` (`bin`: the lb-lab binary), its output echoed to stderr.
pub fn lab_cli(bin: &Path, name: &str, args: &[&str]) -> Result<std::process::Output> {
    let out = Command::new(bin)
        .args(["--name", name])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running lb-lab {}", args.join(" ")))?;
    eprintln!(
        "--- lb-lab {} ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// [`lab_cli`] that must succeed; its stdout.
pub fn lab_cli_ok(bin: &Path, name: &str, args: &[&str]) -> Result<String> {
    let out = lab_cli(bin, name, args)?;
    ensure!(out.status.success(), "lb-lab {} failed", args.join(" "));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts `program args` in namespace `ns` with `argv[0]` = `<name>:<role>`, in a session of
/// its own, and records its pid. Output: the terminal (`inherit`) or appended to
/// `logs/<role>.log` (a restarted process continues its log).
pub fn spawn(
    n: &Names,
    role: &str,
    ns: &str,
    program: &std::ffi::OsStr,
    args: &[OsString],
    inherit: bool,
) -> Result<Child> {
    let nsfile = fs::File::open(PathBuf::from("/run/netns").join(ns))
        .with_context(|| format!("opening namespace {ns}"))?;
    let nsfd = nsfile.as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.arg0(n.arg0(role)).args(args).stdin(Stdio::null());
    if inherit {
        cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
    } else {
        let log = n.log_dir().join(format!("{role}.log"));
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        cmd.stdout(f.try_clone()?).stderr(f);
    }
    // SAFETY: setns and setsid are async-signal-safe system calls; `nsfile` outlives spawn().
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(nsfd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {role} ({})", Path::new(program).display()))?;
    drop(nsfile);
    let pid = child.id();
    let start = start_time(pid).unwrap_or(0);
    fs::write(
        n.pid_dir().join(format!("{role}.pid")),
        format!("{pid} {start}\n"),
    )?;
    Ok(child)
}

/// Waits (with deadlines) until the servers answer, the daemon is ready with every node
/// active, and both VIPs answer from the client.
fn wait_up(spec: &Spec, mut fg: Option<&mut Child>) -> Result<()> {
    let n = &spec.names;
    let client = n.ns("client");
    // The servers, directly (not through the balancer).
    for i in 1..=spec.nodes {
        for ip in [IpAddr::V4(node_ip(i)), IpAddr::V6(node_ip6(i))] {
            wait_for(
                &format!("node {i}'s HTTP server on {ip}"),
                Duration::from_secs(10),
                || {
                    check_alive(n, &format!("serve-{i}"))?;
                    Ok(http_get_ip_in(&client, ip, HTTP_PORT, None).is_ok())
                },
            )?;
        }
        wait_for(
            &format!("node {i}'s decap"),
            Duration::from_secs(10),
            || {
                check_alive(n, &format!("decap-{i}"))?;
                Ok(log_has(n, &format!("decap-{i}"), "ready"))
            },
        )?;
    }
    let want = spec.nodes;
    wait_for(
        &format!("the balancer with {want} active nodes"),
        Duration::from_secs(30),
        || {
            check_stop()?;
            if let Some(c) = fg.as_mut() {
                if let Some(status) = c.try_wait()? {
                    bail!("the daemon exited ({status}); its output is above");
                }
            } else {
                check_alive(n, "daemon")?;
            }
            Ok(lb_status(&spec.lb, n)
                .is_ok_and(|s| s["nodes"]["active"].as_u64() == Some(want as u64)))
        },
    )?;
    for vip in all_vips() {
        wait_for(
            &format!(
                "http://{}/ from the client",
                SocketAddr::new(vip, HTTP_PORT)
            ),
            Duration::from_secs(10),
            || {
                check_stop()?;
                Ok(http_get_ip_in(&client, vip, HTTP_PORT, None).is_ok())
            },
        )?;
    }
    Ok(())
}

/// Polls `f` every 50 ms until it says true; an error from `f` ends the wait.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    loop {
        if f().with_context(|| format!("waiting for {what}"))? {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("{what}: not there after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Fails with the tail of its log when the lab process `role` is not running.
pub fn check_alive(n: &Names, role: &str) -> Result<()> {
    if pid_alive_by_file(n, role).is_none() {
        bail!(
            "{role} exited; its log {}:\n{}",
            n.log_dir().join(format!("{role}.log")).display(),
            log_tail(n, role)
        );
    }
    Ok(())
}

fn log_has(n: &Names, role: &str, needle: &str) -> bool {
    fs::read_to_string(n.log_dir().join(format!("{role}.log"))).is_ok_and(|s| s.contains(needle))
}

/// The last 20 lines of the lab process `role`'s log.
pub fn log_tail(n: &Names, role: &str) -> String {
    let s = fs::read_to_string(n.log_dir().join(format!("{role}.log"))).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// `lb status --json` of the lab's daemon.
pub fn lb_status(lb: &Path, n: &Names) -> Result<serde_json::Value> {
    let out = Command::new(lb)
        .args(["status", "--json", "--socket"])
        .arg(n.socket())
        .stdin(Stdio::null())
        .output()
        .context("running lb status")?;
    ensure!(
        out.status.success(),
        "lb status: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn print_banner(spec: &Spec, rec: &Recorded) {
    let n = &spec.names;
    let c = n.ns("client");
    let lb = spec.lb.display();
    let sock = n.socket();
    let sock = sock.display();
    let mode = lb_status(&spec.lb, n)
        .ok()
        .and_then(|s| s["xdp_mode"].as_str().map(str::to_string))
        .unwrap_or_else(|| rec.xdp_mode.clone());
    let stop = if rec.foreground {
        "Ctrl-C stops the balancer and removes the lab.".to_string()
    } else {
        "`cargo xtask lab down` removes it; `cargo xtask lab status` shows it.".to_string()
    };
    println!(
        r#"
lab: up: {nodes} nodes behind the balancer in namespace {gw}, XDP {mode} mode
     ({why})

Reach the VIPs from the client namespace:
  ip netns exec {c} curl http://{DSR_VIP}/      # dsr-l2: "node N" says which node answered
  ip netns exec {c} curl http://{IPIP_VIP}/      # ipip (decapsulated on the node by `lb decap`)
  ip netns exec {c} curl --interface {extra} http://{DSR_VIP}/   # another source address
  ip netns exec {c} bash -c 'exec 3<>/dev/tcp/{DSR_VIP}/{ECHO_PORT}; echo hello >&3; head -1 <&3'   # TCP echo
  ip netns exec {c} bash -c 'exec 3<>/dev/udp/{DSR_VIP}/{ECHO_PORT}; echo hello >&3; timeout 1 head -1 <&3'   # UDP echo
  ip netns exec {c} curl -6 'http://[{DSR_VIP6}]/'      # IPv6 dsr-l2
  ip netns exec {c} curl -6 'http://[{IPIP_VIP6}]/'      # IPv6 ipip (IP6IP6)
  ip netns exec {c} curl -6 --interface {extra6} 'http://[{DSR_VIP6}]/'   # another IPv6 source
  ip netns exec {c} bash -c 'exec 3<>/dev/tcp/{DSR_VIP6}/{ECHO_PORT}; echo hello >&3; head -1 <&3'   # TCP echo over IPv6

Operate the balancer (another terminal):
  export LB_SOCKET={sock}       # or --socket {sock} on each command
  {lb} status
  {lb} node list
  {lb} routes {DSR_VIP}:{HTTP_PORT}/tcp
  {lb} node drain 2 --wait        # then: {lb} node undrain 2
  {lb} stats --watch
  {lb} trace {CLIENT_IP}:40000 {DSR_VIP}:{HTTP_PORT} tcp
  ip netns exec {c} curl http://{GW_IP}:{METRICS_PORT}/metrics

Files: {run} (lb.toml, key, state/, logs/, pids/). {stop}
"#,
        nodes = spec.nodes,
        gw = n.ns("gw"),
        why = rec.xdp_why,
        extra = CLIENT_EXTRA[0],
        extra6 = CLIENT_EXTRA6[0],
        run = n.run_dir().display(),
    );
}

// ---------------------------------------------------------------------------------------------
// Finding what a lab left: by name, pid file and namespace
// ---------------------------------------------------------------------------------------------

/// A live process of the lab.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabProcess {
    pub pid: u32,
    /// Its role (`daemon`, `agent-1`...) or, for a stranger in a lab namespace, its command.
    pub what: String,
}

/// The process's start time (clock ticks since boot), field 22 of /proc/PID/stat.
pub fn start_time(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Alive and not a zombie.
pub fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rfind(')')
            .and_then(|i| s[i + 2..].chars().next())
            .is_some_and(|st| st != 'Z' && st != 'X')
    })
}

fn cmdline(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The pid in `pids/<role>.pid` if that process still runs (same start time).
pub fn pid_alive_by_file(n: &Names, role: &str) -> Option<u32> {
    let s = fs::read_to_string(n.pid_dir().join(format!("{role}.pid"))).ok()?;
    let mut it = s.split_whitespace();
    let pid: u32 = it.next()?.parse().ok()?;
    let start: u64 = it.next()?.parse().ok()?;
    (alive(pid) && start_time(pid) == Some(start)).then_some(pid)
}

/// Namespaces named `<name>-*`.
pub fn lab_namespaces(n: &Names) -> Vec<String> {
    let prefix = n.ns_prefix();
    let mut v: Vec<String> = fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|f| f.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn ns_inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata(path).ok().map(|m| m.ino())
}

/// Every live process of the lab: `argv[0]` = `<name>:<role>`, a pid file naming it, or
/// running in one of its namespaces.
pub fn lab_processes(n: &Names) -> Vec<LabProcess> {
    let me = std::process::id();
    let mut found: std::collections::BTreeMap<u32, String> = Default::default();
    let marker = format!("{}:", n.name);
    let ns_inodes: Vec<u64> = lab_namespaces(n)
        .iter()
        .filter_map(|ns| ns_inode(&PathBuf::from("/run/netns").join(ns)))
        .collect();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.filter_map(|e| e.ok()) {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid == me || !alive(pid) {
                continue;
            }
            let argv = cmdline(pid);
            if let Some(role) = argv.first().and_then(|a| a.strip_prefix(&marker)) {
                found.insert(pid, role.to_string());
                continue;
            }
            let in_lab_ns = fs::read_link(format!("/proc/{pid}/ns/net"))
                .ok()
                .and_then(|l| {
                    let l = l.to_string_lossy().into_owned();
                    l.strip_prefix("net:[")?
                        .strip_suffix(']')?
                        .parse::<u64>()
                        .ok()
                })
                .is_some_and(|ino| ns_inodes.contains(&ino));
            if in_lab_ns {
                found.insert(pid, format!("in a lab namespace: {}", argv.join(" ")));
            }
        }
    }
    if let Ok(dir) = fs::read_dir(n.pid_dir()) {
        for e in dir.filter_map(|e| e.ok()) {
            let f = e.file_name().to_string_lossy().into_owned();
            if let Some(role) = f.strip_suffix(".pid")
                && let Some(pid) = pid_alive_by_file(n, role)
            {
                found.entry(pid).or_insert_with(|| role.to_string());
            }
        }
    }
    found
        .into_iter()
        .map(|(pid, what)| LabProcess { pid, what })
        .collect()
}

/// Everything of the lab still present, one line each (empty: nothing).
pub fn leftovers(n: &Names) -> Vec<String> {
    let mut v: Vec<String> = lab_namespaces(n)
        .into_iter()
        .map(|ns| format!("namespace {ns}"))
        .collect();
    v.extend(
        lab_processes(n)
            .into_iter()
            .map(|p| format!("process {} ({})", p.pid, p.what)),
    );
    v.extend(
        n.paths()
            .into_iter()
            .filter(|p| p.symlink_metadata().is_ok())
            .map(|p| format!("path {}", p.display())),
    );
    v
}

// ---------------------------------------------------------------------------------------------
// down
// ---------------------------------------------------------------------------------------------

/// What `down` removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub processes: Vec<LabProcess>,
    pub namespaces: Vec<String>,
    pub paths: Vec<PathBuf>,
}

impl Removed {
    /// One line for people.
    pub fn summary(&self, n: &Names) -> String {
        if self.processes.is_empty() && self.namespaces.is_empty() && self.paths.is_empty() {
            return format!("lab {}: nothing to remove", n.name);
        }
        let paths: Vec<String> = self.paths.iter().map(|p| p.display().to_string()).collect();
        let count =
            |k: usize, one: &str, many: &str| format!("{k} {}", if k == 1 { one } else { many });
        format!(
            "lab {}: stopped {}, deleted {}, removed {}",
            n.name,
            count(self.processes.len(), "process", "processes"),
            count(self.namespaces.len(), "namespace", "namespaces"),
            if paths.is_empty() {
                "no files".to_string()
            } else {
                paths.join(", ")
            }
        )
    }
}

/// Removes everything of the lab called `n`, whatever state it is in: stops its processes
/// (SIGTERM, then SIGKILL after 5 s), deletes its namespaces, pins, socket, lock and run
/// directory, then checks that nothing is left.
pub fn down(n: &Names) -> Result<Removed> {
    require_root()?;
    let mut removed = Removed::default();
    // The daemon first, so it is not judging nodes whose agents are being stopped.
    let mut procs = lab_processes(n);
    procs.sort_by_key(|p| p.what != "daemon");
    for p in &procs {
        // SAFETY: kill(2); the pid was just seen alive with the lab's marker.
        unsafe { libc::kill(p.pid as i32, libc::SIGTERM) };
    }
    let gone = |procs: &[LabProcess]| {
        procs.iter().all(|p| {
            reap(p.pid);
            !alive(p.pid)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gone(&procs) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in procs.iter().filter(|p| alive(p.pid)) {
        eprintln!("lab: {} ({}) ignored SIGTERM: SIGKILL", p.pid, p.what);
        // SAFETY: as above.
        unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gone(&procs) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    removed.processes = procs;
    for ns in lab_namespaces(n) {
        sh(&["ip", "netns", "del", &ns])?;
        removed.namespaces.push(ns);
    }
    for p in n.paths() {
        if p.symlink_metadata().is_err() {
            continue;
        }
        let r = if p.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        r.with_context(|| format!("removing {}", p.display()))?;
        removed.paths.push(p);
    }
    let left = leftovers(n);
    ensure!(
        left.is_empty(),
        "the lab {} is not completely gone: {}",
        n.name,
        left.join(", ")
    );
    Ok(removed)
}

/// Reaps `pid` if it is our child (a no-op otherwise).
pub fn reap(pid: u32) {
    let mut st = 0;
    // SAFETY: waitpid with WNOHANG never blocks; ECHILD for strangers is ignored.
    unsafe { libc::waitpid(pid as i32, &mut st, libc::WNOHANG) };
}

// ---------------------------------------------------------------------------------------------
// status
// ---------------------------------------------------------------------------------------------

/// What the lab called `n` recorded about itself (`/run/<name>/lab.json`), if it did.
pub fn read_recorded(n: &Names) -> Option<Recorded> {
    serde_json::from_slice(&fs::read(n.lab_file()).ok()?).ok()
}

/// Prints what is up; true when the whole lab is.
pub fn status(n: &Names, lb: &Path) -> Result<bool> {
    let Some(rec) = read_recorded(n) else {
        let left = leftovers(n);
        if left.is_empty() {
            println!("lab {}: down (nothing of it exists)", n.name);
        } else {
            println!(
                "lab {}: not up, but parts are left (`cargo xtask lab down` removes them):",
                n.name
            );
            for l in left {
                println!("  {l}");
            }
        }
        return Ok(false);
    };
    if rec.balancers > 0 {
        return crate::cluster_labctl::status(n, lb, &rec);
    }
    println!(
        "lab {}: {} nodes, set up for XDP {} mode{}",
        n.name,
        rec.nodes,
        rec.xdp_mode,
        if rec.foreground {
            " (run in the foreground by `cargo xtask run`)"
        } else {
            ""
        }
    );
    let mut want_ns = vec![n.ns("br"), n.ns("client"), n.ns("gw")];
    want_ns.extend((1..=rec.nodes).map(|i| n.ns(&format!("node{i}"))));
    let mut roles = vec!["daemon".to_string()];
    for i in 1..=rec.nodes {
        roles.extend(["agent", "decap", "serve"].map(|r| format!("{r}-{i}")));
    }
    let mut ok = print_present(n, &want_ns, &roles);
    match lb_status(lb, n) {
        Ok(s) => {
            println!(
                "  balancer: {} on {} in {} XDP mode, {} VIPs, nodes {} active / {} draining / {} down, \
                 heartbeats {} accepted",
                s["instance"].as_str().unwrap_or("?"),
                s["iface"].as_str().unwrap_or("?"),
                s["xdp_mode"].as_str().unwrap_or("?"),
                s["vips"],
                s["nodes"]["active"],
                s["nodes"]["draining"],
                s["nodes"]["down"],
                s["heartbeats"]["accepted"],
            );
            if s["nodes"]["active"].as_u64() != Some(rec.nodes as u64) {
                ok = false;
            }
        }
        Err(e) => {
            ok = false;
            println!("  balancer: not answering ({e:#})");
        }
    }
    println!(
        "  {}: `LB_SOCKET={} {} status` for the whole picture",
        if ok { "up" } else { "DEGRADED" },
        n.socket().display(),
        lb.display()
    );
    Ok(ok)
}

/// Prints which of the namespaces `want_ns` and processes `roles` (by pid file) of lab `n` are
/// there; true when all are.
pub fn print_present(n: &Names, want_ns: &[String], roles: &[String]) -> bool {
    let mut ok = true;
    let have = lab_namespaces(n);
    let missing: Vec<&str> = want_ns
        .iter()
        .filter(|ns| !have.contains(ns))
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        println!("  namespaces: {} present", want_ns.len());
    } else {
        ok = false;
        println!("  namespaces: MISSING {}", missing.join(" "));
    }
    let mut line = String::new();
    for r in roles {
        match pid_alive_by_file(n, r) {
            Some(pid) => line += &format!(" {r}={pid}"),
            None => {
                ok = false;
                line += &format!(" {r}=DEAD");
            }
        }
    }
    println!("  processes:{line}");
    ok
}

// ---------------------------------------------------------------------------------------------
// The servers on each node (`lb-lab serve`)
// ---------------------------------------------------------------------------------------------

/// HTTP on :80 (`GET /` answers `node N\n`), TCP echo on :7, both dual-stack (IPv4 and IPv6
/// on one socket), and UDP echo on :7 of each VIP (a UDP reply must come from the address the
/// datagram went to). Runs until killed.
pub fn serve(node: u32, vips: &[IpAddr]) -> Result<()> {
    let http = listen_dual_stack(HTTP_PORT).context("binding [::]:80")?;
    let echo = listen_dual_stack(ECHO_PORT).context("binding [::]:7")?;
    let mut handles = Vec::new();
    for &vip in vips {
        let udp =
            UdpSocket::bind((vip, ECHO_PORT)).with_context(|| format!("binding {vip}:7/udp"))?;
        handles.push(std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            loop {
                if let Ok((len, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&buf[..len], from);
                }
            }
        }));
    }
    std::thread::spawn(move || {
        for s in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(mut w) = s.try_clone() else { return };
                let mut r = s;
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
    println!(
        "lb-lab serve: node {node}: HTTP :{HTTP_PORT}, TCP echo :{ECHO_PORT} (IPv4 and IPv6), UDP echo :{ECHO_PORT}; ready"
    );
    for s in http.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = answer_http(s, node);
        });
    }
    Ok(())
}

/// A TCP listener on `[::]:port` that also takes IPv4 (`IPV6_V6ONLY` off, whatever
/// `net.ipv6.bindv6only` says).
fn listen_dual_stack(port: u16) -> Result<TcpListener> {
    // SAFETY: plain socket calls on a descriptor owned by the returned listener.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let listener = TcpListener::from_raw_fd(fd);
        let off: libc::c_int = 0;
        let on: libc::c_int = 1;
        for (opt_level, opt, v) in [
            (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &off),
            (libc::SOL_SOCKET, libc::SO_REUSEADDR, &on),
        ] {
            ensure!(
                libc::setsockopt(
                    fd,
                    opt_level,
                    opt,
                    (v as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as u32,
                ) == 0,
                "setsockopt: {}",
                std::io::Error::last_os_error()
            );
        }
        let (sa, len) = sockaddr(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port));
        ensure!(
            libc::bind(fd, (&sa as *const libc::sockaddr_storage).cast(), len) == 0,
            "bind [::]:{port}: {}",
            std::io::Error::last_os_error()
        );
        ensure!(
            libc::listen(fd, 1024) == 0,
            "listen: {}",
            std::io::Error::last_os_error()
        );
        Ok(listener)
    }
}

/// `a` as a `sockaddr_in` or `sockaddr_in6` in a `sockaddr_storage`, and its length.
fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage; the writes below stay within it (both
    // sockaddr_in and sockaddr_in6 are smaller and less aligned).
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        match a {
            SocketAddr::V4(a) => {
                let sin =
                    &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                sin.sin_family = libc::AF_INET as u16;
                sin.sin_port = a.port().to_be();
                sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
                (ss, size_of::<libc::sockaddr_in>() as u32)
            }
            SocketAddr::V6(a) => {
                let sin6 =
                    &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                sin6.sin6_family = libc::AF_INET6 as u16;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_addr.s6_addr = a.ip().octets();
                (ss, size_of::<libc::sockaddr_in6>() as u32)
            }
        }
    }
}

fn answer_http(s: TcpStream, node: u32) -> Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut request = String::new();
    r.read_line(&mut request)?;
    // The headers, up to the empty line.
    loop {
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 || l.trim().is_empty() {
            break;
        }
    }
    let body = format!("node {node}\n");
    let status = if request.starts_with("GET ") || request.starts_with("HEAD ") {
        "200 OK"
    } else {
        "405 Method Not Allowed"
    };
    let mut reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !request.starts_with("HEAD ") {
        reply += &body;
    }
    w.write_all(reply.as_bytes())?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Client side (used by `up`'s checks and the tests)
// ---------------------------------------------------------------------------------------------

/// A TCP connection from `src` (any address when `None`) to `dst:port`, 2 s to connect.
pub fn connect_from(src: Option<Ipv4Addr>, dst: Ipv4Addr, port: u16) -> Result<TcpStream> {
    connect_ip(src.map(IpAddr::V4), IpAddr::V4(dst), port)
}

/// [`connect_from`] for IPv4 or IPv6 (`src`, if given, of the same family as `dst`).
pub fn connect_ip(src: Option<IpAddr>, dst: IpAddr, port: u16) -> Result<TcpStream> {
    let remote = SocketAddr::new(dst, port);
    let Some(src) = src else {
        let s = TcpStream::connect_timeout(&remote, Duration::from_secs(2))
            .with_context(|| format!("connecting to {remote}"))?;
        return Ok(s);
    };
    ensure!(
        src.is_ipv4() == dst.is_ipv4(),
        "source {src} and destination {dst} are of different families"
    );
    let family = if dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // std cannot bind before connecting: the socket by hand.
    // SAFETY: plain socket calls on a descriptor owned by the returned stream.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as u32,
        );
        let (local, len) = sockaddr(SocketAddr::new(src, 0));
        ensure!(
            libc::bind(fd, (&local as *const libc::sockaddr_storage).cast(), len) == 0,
            "bind {src}: {}",
            std::io::Error::last_os_error()
        );
        let (sa, len) = sockaddr(remote);
        ensure!(
            libc::connect(fd, (&sa as *const libc::sockaddr_storage).cast(), len) == 0,
            "connecting from {src} to {remote}: {}",
            std::io::Error::last_os_error()
        );
        Ok(stream)
    }
}

/// `GET /` on `dst:port` from the calling thread's namespace: the body.
pub fn http_get(src: Option<Ipv4Addr>, dst: Ipv4Addr, port: u16) -> Result<String> {
    http_get_ip(src.map(IpAddr::V4), IpAddr::V4(dst), port)
}

/// [`http_get`] for IPv4 or IPv6.
pub fn http_get_ip(src: Option<IpAddr>, dst: IpAddr, port: u16) -> Result<String> {
    let url = format!("http://{}/", SocketAddr::new(dst, port));
    let mut s = connect_ip(src, dst, port)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let host = match dst {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .with_context(|| format!("reading the reply of {url}"))?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .with_context(|| format!("{url} answered {reply:?}"))?;
    ensure!(head.starts_with("HTTP/1.1 200"), "{url} answered {head:?}");
    Ok(body.to_string())
}

/// [`http_get`] from namespace `ns`.
pub fn http_get_in(ns: &str, dst: Ipv4Addr, port: u16, src: Option<Ipv4Addr>) -> Result<String> {
    http_get_ip_in(ns, IpAddr::V4(dst), port, src.map(IpAddr::V4))
}

/// [`http_get_ip`] from namespace `ns`.
pub fn http_get_ip_in(ns: &str, dst: IpAddr, port: u16, src: Option<IpAddr>) -> Result<String> {
    in_ns(ns, move || http_get_ip(src, dst, port))
}

/// Sends `msg` over TCP to `dst:port` and reads as many bytes back.
pub fn tcp_echo(src: Option<Ipv4Addr>, dst: Ipv4Addr, port: u16, msg: &[u8]) -> Result<Vec<u8>> {
    tcp_echo_ip(src.map(IpAddr::V4), IpAddr::V4(dst), port, msg)
}

/// [`tcp_echo`] for IPv4 or IPv6.
pub fn tcp_echo_ip(src: Option<IpAddr>, dst: IpAddr, port: u16, msg: &[u8]) -> Result<Vec<u8>> {
    let mut s = connect_ip(src, dst, port)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)
        .with_context(|| format!("reading the echo from {}", SocketAddr::new(dst, port)))?;
    Ok(back)
}

/// Sends `msg` in one datagram to `dst:port` and waits (1 s) for the reply.
pub fn udp_echo(src: Option<Ipv4Addr>, dst: Ipv4Addr, port: u16, msg: &[u8]) -> Result<Vec<u8>> {
    udp_echo_ip(src.map(IpAddr::V4), IpAddr::V4(dst), port, msg)
}

/// [`udp_echo`] for IPv4 or IPv6.
pub fn udp_echo_ip(src: Option<IpAddr>, dst: IpAddr, port: u16, msg: &[u8]) -> Result<Vec<u8>> {
    let any = if dst.is_ipv4() {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    };
    let s = UdpSocket::bind((src.unwrap_or(any), 0))?;
    s.connect((dst, port))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.send(msg)?;
    let mut buf = [0u8; 65536];
    let len = s
        .recv(&mut buf)
        .with_context(|| format!("no UDP echo from {}", SocketAddr::new(dst, port)))?;
    Ok(buf[..len].to_vec())
}

/// Mounts the BPF filesystem at /sys/fs/bpf unless it is there (the lab pins programs).
pub fn ensure_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        (f.nth(1), f.next()) == (Some("/sys/fs/bpf"), Some("bpf"))
    }) {
        return Ok(());
    }
    sh(&["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"])
        .map(|_| ())
        .context("mounting bpffs at /sys/fs/bpf")
}

pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the lab needs root (network namespaces, BPF): run it as root");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_config_is_valid_for_any_node_count() {
        let n = Names::new(DEFAULT_NAME).unwrap();
        for nodes in [1, DEFAULT_NODES, MAX_NODES] {
            for mode in ["native", "generic"] {
                let text = lab_config(&n, nodes, mode);
                let cfg = lb_userspace::config::Config::parse(&text, "lab config").unwrap();
                assert_eq!((cfg.vips.len(), cfg.nodes.len()), (8, nodes));
                assert!(cfg.nodes.iter().all(|n| n.ipv6.is_some()));
                assert_eq!(cfg.daemon.instance, "lb-lab");
            }
        }
        // Node addresses stay clear of the client's extra sources and the router.
        assert!(node_ip(MAX_NODES) < CLIENT_EXTRA[0]);
        assert!(node_ip6(MAX_NODES) < CLIENT_EXTRA6[0]);
        assert_eq!(node_ip6(1), "2001:db8::11".parse::<Ipv6Addr>().unwrap());
        assert_eq!(v6_host(254), ROUTER_IP6);
    }

    #[test]
    fn lab_names_never_cover_each_other() {
        for ok in ["lb-lab", "lbtlab", "lblab2"] {
            assert!(Names::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "lb", "lb-lab-x", "lab", "lb_lab", "LBLAB", "systemd", "lb-lab/x", "",
        ] {
            assert!(Names::new(bad).is_err(), "{bad}");
        }
    }
}
