//! `lb agent`: runs on each node, sends heartbeats to the balancer(s) and reacts to
//! ROUTE_MOVED notices.
//!
//! One UDP socket does both: heartbeats go out every `--interval` to every balancer (unicast or
//! a multicast group), and notices come back to the same socket (the balancer answers the
//! heartbeat's source address). Every process start has a fresh incarnation. Signals:
//! SIGUSR1 = start draining, SIGUSR2 = back to up (both idempotent, and a heartbeat goes out at
//! once), SIGTERM/SIGINT = exit. A notice for this node is verified, logged, and handed to the
//! `--on-route-moved` hook (run by `sh -c`, one at a time, off the heartbeat thread, so a slow
//! hook never delays a heartbeat; one still running after `--hook-timeout` is killed).
//!
//! Nothing arriving at the socket can stop the heartbeats: each wake-up reads at most
//! [`NOTICE_READS`] datagrams before the agent looks at the clock (and at SIGTERM) again,
//! datagrams that cannot be a notice for this node are refused by their header before any
//! HMAC, and refusals are logged at most once per [`REJECT_LOG_PERIOD`], with a count.
//!
//! With `--check URL` the agent probes its local service (TCP connect, or an HTTP GET that
//! must answer 2xx/3xx) and announces the node draining while the service fails, up again
//! once it passes (see [`ServiceCheck`]).
use crate::health::{self, HealthCfg, RiseFall};
use crate::heartbeat::{
    self, DEFAULT_PORT, DecodeError, HEADER_LEN, Heartbeat, KIND_ROUTE_MOVED, Key, MAGIC,
    MAX_DATAGRAM, Message, NodeState, Notice, VERSION, format_ranges,
};
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Default heartbeat interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);
/// Longest interval accepted (the balancer clamps to the same).
pub const MAX_INTERVAL: Duration = crate::membership::MAX_INTERVAL;
/// How often load figures are re-read.
const LOAD_PERIOD: Duration = Duration::from_secs(1);
/// Notices waiting for the hook beyond this are dropped (and logged).
const HOOK_QUEUE: usize = 256;
/// Most datagrams read per wake-up before the agent looks at the clock and its signals again.
pub const NOTICE_READS: usize = 64;
/// Refused datagrams are logged at most this often (with how many there were).
pub const REJECT_LOG_PERIOD: Duration = Duration::from_secs(10);
/// Balancer incarnations whose notice sequence is remembered (oldest forgotten first).
const NOTICE_SOURCES: usize = 64;

/// `lb agent` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// This node's index, as configured on the balancer.
    #[arg(long = "node-id", value_name = "ID")]
    pub node_id: u32,
    /// Balancer heartbeat address(es): IP[:PORT] or HOST:PORT, comma-separated; a multicast
    /// group address works too. Default port 7711.
    #[arg(long, value_name = "ADDR[,ADDR...]", value_delimiter = ',', required = true, value_parser = parse_balancer)]
    pub balancer: Vec<SocketAddr>,
    /// Shared HMAC key file: at least 16 bytes, raw or hex.
    #[arg(long = "key-file", value_name = "FILE")]
    pub key_file: PathBuf,
    /// Heartbeat interval ("100ms", "1s"); the balancer declares the node down after k of them.
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = parse_interval)]
    pub interval: Duration,
    /// Advertised weight; 0 keeps the weight configured on the balancer.
    #[arg(long, value_name = "W", default_value_t = 0)]
    pub weight: u32,
    /// Start draining (SIGUSR1 drains, SIGUSR2 undrains later).
    #[arg(long)]
    pub draining: bool,
    /// Command run (via `sh -c`) for each ROUTE_MOVED notice, with LB_NODE_ID, LB_VIP,
    /// LB_REASON, LB_ROUTES, LB_ROUTE_COUNT (and LB_PART, LB_PARTS, LB_BALANCER) set.
    #[arg(long = "on-route-moved", value_name = "CMD")]
    pub on_route_moved: Option<String>,
    /// Local address to send from and receive notices on (default: any address, any port).
    #[arg(long, value_name = "ADDR")]
    pub bind: Option<SocketAddr>,
    /// A route-moved hook still running after this long is killed (its whole process group).
    #[arg(long = "hook-timeout", value_name = "DURATION", default_value = "10s", value_parser = parse_positive)]
    pub hook_timeout: Duration,
    /// The local service to check: `tcp://HOST:PORT` (connect) or `http://HOST:PORT/PATH` (GET,
    /// 2xx/3xx passes). While it fails the node is announced draining (no new flows), up again
    /// once it passes; each change is logged.
    #[arg(long, value_name = "URL", value_parser = parse_check)]
    pub check: Option<CheckTarget>,
    /// Time between service checks.
    #[arg(long = "check-interval", value_name = "DURATION", default_value = "1s", value_parser = parse_positive)]
    pub check_interval: Duration,
    /// Timeout of one service check.
    #[arg(long = "check-timeout", value_name = "DURATION", default_value = "500ms", value_parser = parse_positive)]
    pub check_timeout: Duration,
    /// Consecutive passing checks before a failing service counts as up again.
    #[arg(long = "check-rise", value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub check_rise: u32,
    /// Consecutive failing checks before a passing service counts as failing.
    #[arg(long = "check-fall", value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub check_fall: u32,
}

/// What `--check` probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckTarget {
    /// As given (for the log).
    pub url: String,
    pub addr: SocketAddr,
    /// `Some(path)` for `http://`: GET it and require 2xx/3xx.
    pub http_path: Option<String>,
    /// The Host header (`HOST:PORT` as given).
    pub host: String,
}

/// Parses `tcp://HOST:PORT` or `http://HOST[:PORT][/PATH]` (port 80, path `/` by default);
/// a host name is resolved now.
pub fn parse_check(s: &str) -> Result<CheckTarget, String> {
    let s = s.trim();
    let (scheme, rest) = s
        .split_once("://")
        .ok_or_else(|| format!("check {s:?}: expected tcp://HOST:PORT or http://HOST:PORT/PATH"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(rest[i..].to_string())),
        None => (rest, None),
    };
    let (http_path, default_port) = match scheme {
        "tcp" if path.is_none() => (None, None),
        "tcp" => return Err(format!("check {s:?}: a tcp:// check has no path")),
        "http" => (Some(path.unwrap_or_else(|| "/".into())), Some(80)),
        other => {
            return Err(format!(
                "check {s:?}: unknown scheme {other:?}: use tcp:// or http://"
            ));
        }
    };
    if hostport.is_empty() {
        return Err(format!("check {s:?}: no host"));
    }
    let has_port = hostport.rsplit_once(':').is_some_and(|(h, p)| {
        !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_digit())
            && (!h.contains(':') || h.ends_with(']'))
    });
    let target = match (has_port, default_port) {
        (true, _) => hostport.to_string(),
        (false, Some(p)) => format!("{hostport}:{p}"),
        (false, None) => {
            return Err(format!(
                "check {s:?}: tcp:// needs a port (tcp://HOST:PORT)"
            ));
        }
    };
    let addr = target
        .to_socket_addrs()
        .map_err(|e| format!("check {s:?}: cannot resolve {target:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("check {s:?}: {target:?} resolves to nothing"))?;
    Ok(CheckTarget {
        url: s.to_string(),
        addr,
        http_path,
        host: hostport.to_string(),
    })
}

fn parse_positive(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("duration {s:?} must be above 0"));
    }
    Ok(d)
}

/// Parses "100ms", "2s", "1m" (a whole number and a unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("invalid duration {s:?}: expected a number and a unit, like 100ms or 1s")
    })?;
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => n
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("duration {s:?} is too large")),
        "" => Err(format!(
            "duration {s:?} needs a unit: ms, s or m (like 100ms)"
        )),
        u => Err(format!(
            "invalid duration unit {u:?} in {s:?}: use ms, s or m"
        )),
    }
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(1) || d > MAX_INTERVAL {
        return Err(format!(
            "interval {s:?} out of range: 1ms to {}s",
            MAX_INTERVAL.as_secs()
        ));
    }
    Ok(d)
}

/// Parses a balancer address: `IP`, `IP:PORT`, `[V6]:PORT`, or `HOST:PORT` (resolved now).
pub fn parse_balancer(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = s
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Ok(SocketAddr::new(ip, DEFAULT_PORT));
    }
    let resolved = if s.contains(':') {
        s.to_socket_addrs()
    } else {
        (s, DEFAULT_PORT).to_socket_addrs()
    };
    resolved
        .map_err(|e| format!("cannot resolve balancer address {s:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("balancer address {s:?} resolves to nothing"))
}

/// Stop and drain switches; [`run`] wires them to signals, tests flip them directly.
#[derive(Debug)]
pub struct AgentControl {
    pub stop: AtomicBool,
    pub draining: AtomicBool,
}

impl AgentControl {
    pub const fn new() -> AgentControl {
        AgentControl {
            stop: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }
    }
}

impl Default for AgentControl {
    fn default() -> Self {
        AgentControl::new()
    }
}

static SIGNALS: AgentControl = AgentControl::new();

extern "C" fn on_signal(sig: libc::c_int) {
    // Only atomic stores: async-signal-safe.
    match sig {
        libc::SIGUSR1 => SIGNALS.draining.store(true, Ordering::SeqCst),
        libc::SIGUSR2 => SIGNALS.draining.store(false, Ordering::SeqCst),
        _ => SIGNALS.stop.store(true, Ordering::SeqCst),
    }
}

fn install_signals() -> Result<()> {
    for sig in [libc::SIGUSR1, libc::SIGUSR2, libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is valid; the handler only does atomic stores. No
        // SA_RESTART, so a signal interrupts the wait and is acted on at once.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error())
                .context(format!("installing handler for signal {sig}"));
        }
    }
    Ok(())
}

/// `lb agent`: runs until SIGTERM/SIGINT.
pub fn run(args: AgentArgs) -> Result<()> {
    install_signals()?;
    SIGNALS.draining.store(args.draining, Ordering::SeqCst);
    run_with(args, &SIGNALS)
}

/// The agent loop, controlled by `ctl` (its `draining` is the live state; `args.draining` is
/// only the starting value [`run`] puts there).
pub fn run_with(args: AgentArgs, ctl: &AgentControl) -> Result<()> {
    let key = Key::from_file(&args.key_file).context("loading the heartbeat key")?;
    if args.balancer.is_empty() {
        bail!("no balancer address given (--balancer ADDR)");
    }
    let any_v6 = args.balancer.iter().any(SocketAddr::is_ipv6);
    let bind = args.bind.unwrap_or_else(|| {
        if any_v6 {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)
        } else {
            SocketAddr::from(([0, 0, 0, 0], 0))
        }
    });
    if bind.is_ipv4() && any_v6 {
        bail!(
            "--bind {bind} is IPv4 but a balancer address is IPv6; bind an IPv6 address (e.g. [::]:0)"
        );
    }
    // An IPv6 socket reaches IPv4 balancers through v4-mapped addresses.
    let targets: Vec<SocketAddr> = args
        .balancer
        .iter()
        .map(|a| match (bind, a) {
            (SocketAddr::V6(_), SocketAddr::V4(v4)) => {
                SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            _ => *a,
        })
        .collect();
    let sock =
        UdpSocket::bind(bind).with_context(|| format!("binding the agent socket to {bind}"))?;
    sock.set_nonblocking(true)
        .context("setting the agent socket non-blocking")?;
    let local = sock
        .local_addr()
        .context("reading the agent socket address")?;

    let incarnation = heartbeat::new_incarnation();
    let interval_ms = u32::try_from(args.interval.as_millis())
        .unwrap_or(u32::MAX)
        .max(1);
    tracing::info!(
        "agent: node {} incarnation {incarnation:#x}, heartbeats every {:?} from {local} to {}",
        args.node_id,
        args.interval,
        targets
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );

    let hooks = args
        .on_route_moved
        .clone()
        .map(|cmd| spawn_hook_runner(cmd, args.hook_timeout))
        .transpose()?;
    let service = args
        .check
        .clone()
        .map(|target| {
            ServiceCheck::spawn(
                args.node_id,
                target,
                HealthCfg {
                    interval: args.check_interval,
                    timeout: args.check_timeout,
                    rise: args.check_rise,
                    fall: args.check_fall,
                    ..HealthCfg::default()
                },
            )
        })
        .transpose()?;
    let mut load = LoadSampler::default();
    let mut notices = NoticeFilter::default();
    let mut failing = vec![false; targets.len()];
    let mut sequence: u64 = 0;
    // Draining if the operator says so (SIGUSR1, --draining) or the local service fails.
    let wanted =
        || ctl.draining.load(Ordering::SeqCst) || service.as_ref().is_some_and(|s| !s.passing());
    let mut draining = wanted();
    let mut next_send = Instant::now();
    let mut buf = [0u8; MAX_DATAGRAM + 1];

    while !ctl.stop.load(Ordering::SeqCst) {
        let now_draining = wanted();
        if now_draining != draining {
            draining = now_draining;
            tracing::info!(
                "agent: node {} now {}",
                args.node_id,
                if draining { "draining" } else { "up" }
            );
            next_send = Instant::now();
        }
        let now = Instant::now();
        if now >= next_send {
            sequence += 1;
            let (cpu_permille, active_conns) = load.sample(now);
            let hb = Heartbeat {
                node: args.node_id,
                incarnation,
                sequence,
                state: if draining {
                    NodeState::Draining
                } else {
                    NodeState::Up
                },
                weight: args.weight,
                interval_ms,
                cpu_permille,
                active_conns,
            };
            let bytes = hb.encode(&key);
            for (i, t) in targets.iter().enumerate() {
                match sock.send_to(&bytes, t) {
                    Ok(_) if failing[i] => {
                        failing[i] = false;
                        tracing::info!("agent: heartbeats to {t} go through again");
                    }
                    Ok(_) => {}
                    Err(e) if !failing[i] => {
                        failing[i] = true;
                        tracing::warn!("agent: cannot send heartbeat to {t}: {e}");
                    }
                    Err(_) => {}
                }
            }
            next_send += args.interval;
            if next_send <= now {
                next_send = now + args.interval; // fell behind (suspended?): do not burst
            }
        }
        heartbeat::wait_readable(&sock, next_send.saturating_duration_since(Instant::now()))
            .context("waiting on the agent socket")?;
        // A bounded batch: under a flood the next heartbeat (and SIGTERM) still come first.
        for _ in 0..NOTICE_READS {
            if ctl.stop.load(Ordering::SeqCst) {
                break;
            }
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let notice = match notices.accept(&buf[..n], &key, args.node_id) {
                        Ok(n) => n,
                        Err(why) => {
                            notices.refuse(Instant::now(), from, &why);
                            continue;
                        }
                    };
                    tracing::info!(
                        "agent: routes moved off node {} for {} ({}): {} route(s) {} [part {}/{}, from {from}]",
                        notice.node,
                        notice.vip,
                        notice.reason,
                        notice.route_count(),
                        format_ranges(&notice.ranges),
                        notice.part + 1,
                        notice.parts
                    );
                    if let Some(h) = &hooks
                        && h.try_send((notice, from)).is_err()
                    {
                        tracing::warn!("agent: route-moved hook queue full; notice dropped");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e).context("receiving on the agent socket"),
            }
        }
    }
    tracing::info!("agent: node {} stopping", args.node_id);
    Ok(())
}

/// Why a datagram at the agent's socket was not acted on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refused {
    /// Not a version-1 ROUTE_MOVED header (refused before any HMAC).
    NotANotice,
    /// A notice for another node (by its unauthenticated node field: no HMAC spent on it).
    OtherNode(u32),
    /// Did not decode or authenticate.
    Bad(DecodeError),
    /// A balancer incarnation's sequence not above the last one accepted from it.
    Replay { incarnation: u64, sequence: u64 },
    /// From a balancer incarnation older than every one remembered.
    Stale { incarnation: u64 },
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::NotANotice => f.write_str("not a route-moved notice"),
            Refused::OtherNode(n) => write!(f, "a notice for node {n}"),
            Refused::Bad(e) => write!(f, "{e}"),
            Refused::Replay {
                incarnation,
                sequence,
            } => write!(
                f,
                "replayed notice (balancer incarnation {incarnation:#x}, sequence {sequence})"
            ),
            Refused::Stale { incarnation } => write!(
                f,
                "notice from an old balancer incarnation {incarnation:#x}"
            ),
        }
    }
}

/// Verifies notices and drops replays: per balancer incarnation (a field of the notice, so a
/// replay is caught whatever address or port it is sent from), the highest sequence accepted.
#[derive(Debug, Default)]
struct NoticeFilter {
    last: BTreeMap<u64, u64>,
    /// Refusals since the last one logged.
    refused: u64,
    logged: Option<Instant>,
}

impl NoticeFilter {
    fn accept(&mut self, bytes: &[u8], key: &Key, node: u32) -> Result<Notice, Refused> {
        // The header and the node field first: only a ROUTE_MOVED for this node is worth an
        // HMAC, so a flood of anything else costs a few comparisons per datagram.
        if bytes.len() < HEADER_LEN + 4
            || bytes[..4] != MAGIC
            || bytes[4] != VERSION
            || bytes[5] != KIND_ROUTE_MOVED
        {
            return Err(Refused::NotANotice);
        }
        let claimed = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if claimed != node {
            return Err(Refused::OtherNode(claimed));
        }
        let n = match heartbeat::decode(bytes, key) {
            Ok(Message::RouteMoved(n)) => n,
            Ok(Message::Heartbeat(_)) => return Err(Refused::NotANotice),
            Err(e) => return Err(Refused::Bad(e)),
        };
        match self.last.get(&n.incarnation) {
            Some(&seq) if n.sequence <= seq => {
                return Err(Refused::Replay {
                    incarnation: n.incarnation,
                    sequence: n.sequence,
                });
            }
            Some(_) => {}
            None if self.last.len() >= NOTICE_SOURCES
                && self.last.keys().next().is_some_and(|&o| n.incarnation < o) =>
            {
                return Err(Refused::Stale {
                    incarnation: n.incarnation,
                });
            }
            None => {}
        }
        self.last.insert(n.incarnation, n.sequence);
        // Bounded: balancers are few, and a restart replaces an incarnation by a larger one.
        while self.last.len() > NOTICE_SOURCES {
            self.last.pop_first();
        }
        Ok(n)
    }

    /// Counts a refusal; logs it (with the count since the last log) at most once per
    /// [`REJECT_LOG_PERIOD`].
    fn refuse(&mut self, now: Instant, from: SocketAddr, why: &Refused) {
        self.refused += 1;
        if self
            .logged
            .is_some_and(|t| now.saturating_duration_since(t) < REJECT_LOG_PERIOD)
        {
            return;
        }
        tracing::warn!(
            "agent: refused {} datagram(s) since the last report; the latest from {from}: {why}",
            self.refused
        );
        self.refused = 0;
        self.logged = Some(now);
    }
}

/// `--check`: probes the local service on a thread of its own (so a hanging service never
/// delays a heartbeat). The first probe decides at once; after it a change takes `rise`
/// passing or `fall` failing probes in a row. Not passing until the first probe has passed.
/// Each change is logged. Dropping it stops the thread.
#[derive(Debug)]
pub struct ServiceCheck {
    passing: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl ServiceCheck {
    fn spawn(node: u32, target: CheckTarget, cfg: HealthCfg) -> Result<ServiceCheck> {
        let passing = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the service check's runtime")?;
        let cfg = HealthCfg {
            http_path: target.http_path.clone(),
            http_host: Some(target.host.clone()),
            ..cfg
        };
        let (p, s) = (Arc::clone(&passing), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("service-check".into())
            .spawn(move || {
                let mut rf: Option<RiseFall> = None;
                while !s.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    let result = rt.block_on(health::probe(target.addr, &cfg));
                    let ok = result.is_ok();
                    let change = match &mut rf {
                        None => {
                            rf = Some(RiseFall::decided(ok, cfg.rise, cfg.fall));
                            Some(ok)
                        }
                        Some(rf) => rf.record(ok),
                    };
                    if let Some(up) = change {
                        p.store(up, Ordering::SeqCst);
                        match &result {
                            Ok(()) => tracing::info!(
                                "agent: node {node}: local service {} passes: announcing up",
                                target.url
                            ),
                            Err(e) => tracing::warn!(
                                "agent: node {node}: local service {} fails ({e}): announcing \
                                 draining (no new flows) until it passes",
                                target.url
                            ),
                        }
                    }
                    // Sleep out the interval in short steps, so a stop is seen soon.
                    let next = started + cfg.interval;
                    while !s.load(Ordering::SeqCst) {
                        let left = next.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        std::thread::sleep(left.min(Duration::from_millis(50)));
                    }
                }
            })
            .context("starting the service check thread")?;
        Ok(ServiceCheck { passing, stop })
    }

    /// Whether the service passes (as rise/fall have decided).
    pub fn passing(&self) -> bool {
        self.passing.load(Ordering::SeqCst)
    }
}

impl Drop for ServiceCheck {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The environment a hook sees for a notice.
pub fn hook_env(n: &Notice, from: SocketAddr) -> Vec<(&'static str, String)> {
    vec![
        ("LB_NODE_ID", n.node.to_string()),
        ("LB_VIP", n.vip.to_string()),
        ("LB_REASON", n.reason.to_string()),
        ("LB_ROUTES", format_ranges(&n.ranges)),
        ("LB_ROUTE_COUNT", n.route_count().to_string()),
        ("LB_PART", (n.part + 1).to_string()),
        ("LB_PARTS", n.parts.to_string()),
        ("LB_BALANCER", from.to_string()),
    ]
}

fn spawn_hook_runner(
    cmd: String,
    timeout: Duration,
) -> Result<mpsc::SyncSender<(Notice, SocketAddr)>> {
    let (tx, rx) = mpsc::sync_channel::<(Notice, SocketAddr)>(HOOK_QUEUE);
    std::thread::Builder::new()
        .name("route-moved-hook".into())
        .spawn(move || {
            for (notice, from) in rx {
                match run_hook(&cmd, hook_env(&notice, from), timeout) {
                    Ok(HookEnd::Exited(s)) if s.success() => {}
                    Ok(HookEnd::Exited(s)) => {
                        tracing::warn!("agent: route-moved hook exited with {s}")
                    }
                    Ok(HookEnd::Killed) => tracing::warn!(
                        "agent: route-moved hook still running after {timeout:?}: killed (its \
                         process group); raise --hook-timeout if it needs longer"
                    ),
                    Err(e) => tracing::warn!("agent: cannot run route-moved hook: {e}"),
                }
            }
        })
        .context("starting the hook thread")?;
    Ok(tx)
}

/// How a hook run ended.
#[derive(Debug)]
enum HookEnd {
    Exited(std::process::ExitStatus),
    /// Still running at the timeout: its process group was killed.
    Killed,
}

/// Runs `sh -c cmd` with `env` in a process group of its own; kills the group if it is still
/// running after `timeout` (a hung hook must not hold up every later notice).
fn run_hook(cmd: &str, env: Vec<(&'static str, String)>, timeout: Duration) -> io::Result<HookEnd> {
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .envs(env)
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .spawn()?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(HookEnd::Exited(status));
        }
        let now = Instant::now();
        if now >= deadline {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill(2) of the process group led by a child we started (its group
                // id is its pid, `process_group(0)`), which we have not reaped yet.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            let _ = child.wait();
            return Ok(HookEnd::Killed);
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
    }
}

/// CPU busy (per mille, since the previous sample) and TCP sockets in use, re-read at most once
/// per [`LOAD_PERIOD`] (cheap: `/proc/stat` and `/proc/net/sockstat{,6}`).
#[derive(Debug, Default)]
struct LoadSampler {
    at: Option<Instant>,
    cpu_prev: Option<(u64, u64)>,
    cpu: Option<u16>,
    conns: Option<u32>,
}

impl LoadSampler {
    fn sample(&mut self, now: Instant) -> (Option<u16>, Option<u32>) {
        if self.at.is_none_or(|t| now.duration_since(t) >= LOAD_PERIOD) {
            self.at = Some(now);
            let cur = std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|s| cpu_times(&s));
            self.cpu = match (self.cpu_prev, cur) {
                (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                    Some(((b1.saturating_sub(b0)) * 1000 / (t1 - t0)).min(1000) as u16)
                }
                _ => None,
            };
            self.cpu_prev = cur;
            let v4 = std::fs::read_to_string("/proc/net/sockstat").ok();
            let v6 = std::fs::read_to_string("/proc/net/sockstat6").ok();
            let c4 = v4.as_deref().and_then(|s| sockstat_inuse(s, "TCP:"));
            let c6 = v6.as_deref().and_then(|s| sockstat_inuse(s, "TCP6:"));
            self.conns = match (c4, c6) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
            };
        }
        (self.cpu, self.conns)
    }
}

/// (busy, total) jiffies from the first line of /proc/stat.
fn cpu_times(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v[4]; // idle + iowait
    Some((total.saturating_sub(idle), total))
}

/// `inuse` of the line starting with `prefix` in /proc/net/sockstat{,6}.
fn sockstat_inuse(s: &str, prefix: &str) -> Option<u32> {
    let line = s.lines().find(|l| l.starts_with(prefix))?;
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == "inuse" {
            return it.next()?.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heartbeat::{MoveReason, Receiver, Vip};
    use clap::Parser;
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    fn parse(args: &[&str]) -> Result<AgentArgs, String> {
        let mut v = vec!["lb-agent"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v)
            .map(|c| c.agent)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn arguments() {
        let a = parse(&[
            "--node-id",
            "3",
            "--balancer",
            "127.0.0.1,[::1]:9000",
            "--key-file",
            "/k",
        ])
        .unwrap();
        assert_eq!(a.node_id, 3);
        assert_eq!(
            a.balancer,
            vec![
                "127.0.0.1:7711".parse().unwrap(),
                "[::1]:9000".parse().unwrap()
            ]
        );
        assert_eq!(
            (a.interval, a.weight, a.draining),
            (DEFAULT_INTERVAL, 0, false)
        );
        let a = parse(&[
            "--node-id",
            "3",
            "--balancer",
            "127.0.0.1:1",
            "--key-file",
            "/k",
            "--interval",
            "1s",
            "--weight",
            "5",
            "--draining",
            "--on-route-moved",
            "true",
            "--bind",
            "127.0.0.1:0",
        ])
        .unwrap();
        assert_eq!(
            (a.interval, a.weight, a.draining),
            (Duration::from_secs(1), 5, true)
        );
        for bad in [
            &[
                "--node-id",
                "x",
                "--balancer",
                "127.0.0.1",
                "--key-file",
                "/k",
            ][..],
            &["--node-id", "1", "--key-file", "/k"],
            &[
                "--node-id",
                "1",
                "--balancer",
                "127.0.0.1",
                "--key-file",
                "/k",
                "--interval",
                "100",
            ],
            &[
                "--node-id",
                "1",
                "--balancer",
                "127.0.0.1",
                "--key-file",
                "/k",
                "--interval",
                "0ms",
            ],
            &[
                "--node-id",
                "1",
                "--balancer",
                "1.2.3.4:notaport",
                "--key-file",
                "/k",
            ],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "ms", "1h", "1.5s", "100", "-1s"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(!e.contains('\n'), "one line: {e}");
        }
        assert!(parse_interval("61s").is_err());
    }

    #[test]
    fn load_parsers() {
        assert_eq!(
            cpu_times("cpu  10 0 10 70 10 0 0 0 0 0\ncpu0 1 2\n"),
            Some((20, 100))
        );
        assert_eq!(cpu_times("garbage"), None);
        let s = "sockets: used 5\nTCP: inuse 12 orphan 0 tw 3 alloc 14 mem 1\nUDP: inuse 2\n";
        assert_eq!(sockstat_inuse(s, "TCP:"), Some(12));
        assert_eq!(sockstat_inuse("TCP6: inuse 4\n", "TCP6:"), Some(4));
        assert_eq!(sockstat_inuse(s, "TCP6:"), None);
        let mut l = LoadSampler::default();
        let _ = l.sample(Instant::now()); // whatever /proc holds here, no panic
    }

    fn key_file(dir: &std::path::Path, contents: &[u8]) -> PathBuf {
        let p = dir.join("hb.key");
        std::fs::write(&p, contents).unwrap();
        p
    }

    /// `lb agent --node-id NODE --balancer BALANCER --key-file KEY --bind 127.0.0.1:0`, the
    /// rest as clap defaults it.
    fn agent_args(node: u32, balancer: SocketAddr, key: &std::path::Path) -> AgentArgs {
        parse(&[
            "--node-id",
            &node.to_string(),
            "--balancer",
            &balancer.to_string(),
            "--key-file",
            &key.display().to_string(),
            "--bind",
            "127.0.0.1:0",
        ])
        .unwrap()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lb-agent-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn bad_key_file_is_a_clear_error() {
        let dir = temp_dir("badkey");
        let args = agent_args(1, "127.0.0.1:9".parse().unwrap(), &key_file(&dir, b"short"));
        let e = format!(
            "{:#}",
            run_with(args.clone(), &AgentControl::new()).unwrap_err()
        );
        assert!(
            e.contains("loading the heartbeat key") && e.contains("at least 16"),
            "{e}"
        );
        let missing = AgentArgs {
            key_file: dir.join("nope"),
            ..args
        };
        let e = format!("{:#}", run_with(missing, &AgentControl::new()).unwrap_err());
        assert!(e.contains("cannot read key file"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn agent_to_receiver_and_notice_hook_over_loopback() {
        let dir = temp_dir("loop");
        let hex = b"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";
        let kf = key_file(&dir, hex);
        let key = Key::from_file(&kf).unwrap();
        let mut rx = Receiver::bind("127.0.0.1:0".parse().unwrap(), key.clone()).unwrap();
        let out = dir.join("hook.out");
        let hook = format!(
            "printf '%s|%s|%s|%s|%s' \"$LB_NODE_ID\" \"$LB_VIP\" \"$LB_REASON\" \"$LB_ROUTES\" \"$LB_ROUTE_COUNT\" > {0}.tmp && mv {0}.tmp {0}",
            out.display()
        );
        let args = AgentArgs {
            interval: Duration::from_millis(20),
            weight: 9,
            on_route_moved: Some(hook),
            ..agent_args(4, rx.local_addr().unwrap(), &kf)
        };
        let ctl = Arc::new(AgentControl::new());
        let agent = {
            let ctl = Arc::clone(&ctl);
            std::thread::spawn(move || run_with(args, &ctl))
        };
        // A forged heartbeat (another key) is rejected and counted.
        let forger = UdpSocket::bind("127.0.0.1:0").unwrap();
        let forged_key = Key::from_bytes(b"not the shared key at all").unwrap();
        let mut forged = Heartbeat {
            node: 4,
            incarnation: u64::MAX,
            sequence: 1,
            state: NodeState::Up,
            weight: 1,
            interval_ms: 20,
            cpu_permille: None,
            active_conns: None,
        };
        forger
            .send_to(&forged.encode(&forged_key), rx.local_addr().unwrap())
            .unwrap();
        let wait = Duration::from_secs(5);
        let (first, from) = rx.recv(wait).unwrap().expect("a heartbeat");
        assert_eq!(
            (first.node, first.weight, first.interval_ms, first.state),
            (4, 9, 20, NodeState::Up)
        );
        let (second, _) = rx.recv(wait).unwrap().expect("a heartbeat");
        assert_eq!(second.incarnation, first.incarnation);
        assert!(second.sequence > first.sequence);
        assert_eq!(rx.counters().bad_hmac, 1);
        forged.sequence = 2;
        forger
            .send_to(&forged.encode(&forged_key), rx.local_addr().unwrap())
            .unwrap();

        // Draining is reported.
        ctl.draining.store(true, Ordering::SeqCst);
        let t = Instant::now();
        loop {
            let (hb, _) = rx.recv(wait).unwrap().expect("a heartbeat");
            if hb.state == NodeState::Draining {
                break;
            }
            assert!(t.elapsed() < wait);
        }
        assert_eq!(rx.counters().bad_hmac, 2);

        // A notice reaches the agent and runs the hook. A forged one and one for another node
        // are ignored first.
        let vip = Vip {
            addr: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
            port: 443,
            proto: 6,
        };
        let mut seq = 1;
        let bad = heartbeat::split_notices(
            4,
            vip,
            MoveReason::Join,
            &[heartbeat::RouteRange { first: 1, last: 1 }],
            1,
            &mut seq,
        );
        forger
            .send_to(&bad[0].encode(&forged_key).unwrap(), from)
            .unwrap();
        rx.send_route_moved(from, 5, vip, MoveReason::Join, &[1])
            .unwrap();
        rx.send_route_moved(from, 4, vip, MoveReason::Drain, &[0, 1, 2, 3, 7, 100, 101])
            .unwrap();
        let t = Instant::now();
        while !out.exists() {
            assert!(t.elapsed() < wait, "hook did not run");
            std::thread::sleep(Duration::from_millis(10));
        }
        let got = std::fs::read_to_string(&out).unwrap();
        assert_eq!(got, "4|10.1.2.3:443/tcp|drain|0-3,7,100-101|7");

        ctl.stop.store(true, Ordering::SeqCst);
        agent.join().unwrap().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Starts `run_with(args)` on a thread; returns its control and handle.
    fn spawn_agent(args: AgentArgs) -> (Arc<AgentControl>, std::thread::JoinHandle<Result<()>>) {
        let ctl = Arc::new(AgentControl::new());
        let c = Arc::clone(&ctl);
        (ctl, std::thread::spawn(move || run_with(args, &c)))
    }

    /// Waits (up to 10 s) for a heartbeat `pred` accepts; returns it and its source.
    fn wait_beat(rx: &mut Receiver, pred: impl Fn(&Heartbeat) -> bool) -> (Heartbeat, SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no such heartbeat in 10 s");
            if let Some((hb, from)) = rx.recv(left).unwrap()
                && pred(&hb)
            {
                return (hb, from);
            }
        }
    }

    /// Defects: the agent's replay protection was per source address, so a captured notice
    /// replayed from another port ran the hook again; and a hook that never returned held up
    /// every later notice for ever. Now a replay is caught whatever its source, and a hook still
    /// running after `--hook-timeout` is killed (with its children) so the next one runs.
    #[test]
    fn a_replay_from_another_port_is_refused_and_a_hung_hook_is_killed() {
        let dir = temp_dir("hung");
        let kf = key_file(&dir, b"0123456789abcdef0123456789abcdef");
        let key = Key::from_file(&kf).unwrap();
        let mut rx = Receiver::bind("127.0.0.1:0".parse().unwrap(), key.clone()).unwrap();
        let out = dir.join("hook.out");
        let pids = dir.join("pids");
        // The drain hook hangs (in a child of its shell); any other writes its reason.
        let hook = format!(
            "echo \"$LB_REASON\" >> {out}; if [ \"$LB_REASON\" = drain ]; then sleep 1000 & echo $! > {pids}; wait; fi",
            out = out.display(),
            pids = pids.display()
        );
        let args = AgentArgs {
            interval: Duration::from_millis(20),
            on_route_moved: Some(hook),
            hook_timeout: Duration::from_millis(300),
            ..agent_args(4, rx.local_addr().unwrap(), &kf)
        };
        let (ctl, agent) = spawn_agent(args);
        let (_, at) = wait_beat(&mut rx, |_| true);
        let vip = Vip {
            addr: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
            port: 443,
            proto: 6,
        };
        let r = [heartbeat::RouteRange { first: 1, last: 1 }];
        let mut seq = 1;
        let drain = heartbeat::split_notices(4, vip, MoveReason::Drain, &r, 77, &mut seq).remove(0);
        let join = heartbeat::split_notices(4, vip, MoveReason::Join, &r, 77, &mut seq).remove(0);
        let one = UdpSocket::bind("127.0.0.1:0").unwrap();
        let other = UdpSocket::bind("127.0.0.1:0").unwrap();
        let drain = drain.encode(&key).unwrap();
        one.send_to(&drain, at).unwrap();
        // The same datagram from another port: a replay.
        other.send_to(&drain, at).unwrap();
        one.send_to(&join.encode(&key).unwrap(), at).unwrap();
        let t = Instant::now();
        while !std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("join")
        {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the hook after a hung one never ran: {:?}",
                std::fs::read_to_string(&out)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "drain\njoin\n");
        // The hung hook's child was killed with it.
        let child: i32 = std::fs::read_to_string(&pids)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let t = Instant::now();
        // SAFETY: kill(2) with signal 0 only checks whether the process exists.
        while unsafe { libc::kill(child, 0) } == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the hook's child survived"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        ctl.stop.store(true, Ordering::SeqCst);
        agent.join().unwrap().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A flood at the agent's port (notices for this node with a forged key, which cost an
    /// HMAC each, and junk) neither stops its heartbeats nor its shutdown.
    #[test]
    fn a_flood_at_the_agent_stops_neither_heartbeats_nor_stop() {
        let dir = temp_dir("flood");
        let kf = key_file(&dir, b"0123456789abcdef0123456789abcdef");
        let key = Key::from_file(&kf).unwrap();
        let mut rx = Receiver::bind("127.0.0.1:0".parse().unwrap(), key.clone()).unwrap();
        let args = AgentArgs {
            interval: Duration::from_millis(20),
            ..agent_args(4, rx.local_addr().unwrap(), &kf)
        };
        let (ctl, agent) = spawn_agent(args);
        let (_, at) = wait_beat(&mut rx, |_| true);
        let forged = Key::from_bytes(b"not the shared key at all").unwrap();
        let vip = Vip {
            addr: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
            port: 443,
            proto: 6,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flooders: Vec<_> = (0..2)
            .map(|i| {
                let stop = Arc::clone(&stop);
                let mut seq = 1;
                let r = [heartbeat::RouteRange { first: 0, last: 9 }];
                let bytes = if i == 0 {
                    heartbeat::split_notices(4, vip, MoveReason::Drain, &r, 5, &mut seq)
                        .remove(0)
                        .encode(&forged)
                        .unwrap()
                } else {
                    vec![0u8; 64]
                };
                std::thread::spawn(move || {
                    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                    let mut sent = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let _ = s.send_to(&bytes, at);
                        sent += 1;
                    }
                    sent
                })
            })
            .collect();
        // Heartbeats keep coming, none late by more than a few intervals.
        let window = Instant::now();
        let mut last = Instant::now();
        let mut beats = 0;
        let mut worst = Duration::ZERO;
        while window.elapsed() < Duration::from_millis(1500) {
            if let Some(r) = rx.recv_stamped(Duration::from_secs(2)).unwrap() {
                worst = worst.max(r.at.saturating_duration_since(last));
                last = r.at;
                beats += 1;
            } else {
                worst = Duration::MAX;
                break;
            }
        }
        let (tx, done) = mpsc::channel();
        ctl.stop.store(true, Ordering::SeqCst);
        std::thread::spawn(move || {
            let _ = tx.send(agent.join());
        });
        let stopped = done.recv_timeout(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        let sent: u64 = flooders.into_iter().map(|f| f.join().unwrap()).sum();
        eprintln!("{sent} datagrams flooded; {beats} heartbeats, longest gap {worst:?}");
        assert!(beats >= 30, "{beats} heartbeats in 1.5 s");
        assert!(worst < Duration::from_millis(300), "a gap of {worst:?}");
        stopped
            .expect("the agent did not stop within 2 s")
            .unwrap()
            .unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn check_urls() {
        let t = parse_check("tcp://127.0.0.1:80").unwrap();
        assert_eq!(
            (t.addr, t.http_path.as_deref()),
            ("127.0.0.1:80".parse().unwrap(), None)
        );
        let t = parse_check("http://127.0.0.1:8080/healthz").unwrap();
        assert_eq!(
            (t.addr, t.http_path.as_deref(), t.host.as_str()),
            (
                "127.0.0.1:8080".parse().unwrap(),
                Some("/healthz"),
                "127.0.0.1:8080"
            )
        );
        let t = parse_check("http://[::1]").unwrap();
        assert_eq!(
            (t.addr, t.http_path.as_deref()),
            ("[::1]:80".parse().unwrap(), Some("/"))
        );
        for bad in [
            "127.0.0.1:80",
            "tcp://127.0.0.1",
            "tcp://127.0.0.1:80/x",
            "udp://127.0.0.1:53",
            "http://",
        ] {
            let e = parse_check(bad).unwrap_err();
            assert!(e.contains("check") && !e.contains('\n'), "{bad}: {e}");
        }
        assert!(
            parse(&[
                "--node-id",
                "1",
                "--balancer",
                "127.0.0.1",
                "--key-file",
                "/k",
                "--check-fall",
                "0"
            ])
            .is_err()
        );
    }

    /// Defect: an agent beat "up" while its service was dead, so its traffic was
    /// black-holed. With `--check` it announces draining while the service fails, up again
    /// once it passes.
    #[test]
    fn check_announces_draining_while_the_service_fails() {
        let dir = temp_dir("check");
        let kf = key_file(&dir, b"0123456789abcdef0123456789abcdef");
        let key = Key::from_file(&kf).unwrap();
        let mut rx = Receiver::bind("127.0.0.1:0".parse().unwrap(), key.clone()).unwrap();
        let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = service.local_addr().unwrap().port();
        let args = AgentArgs {
            interval: Duration::from_millis(20),
            check: Some(parse_check(&format!("tcp://127.0.0.1:{port}")).unwrap()),
            check_interval: Duration::from_millis(50),
            ..agent_args(4, rx.local_addr().unwrap(), &kf)
        };
        let (ctl, agent) = spawn_agent(args);
        wait_beat(&mut rx, |h| h.state == NodeState::Up);
        drop(service);
        wait_beat(&mut rx, |h| h.state == NodeState::Draining);
        let _service = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        wait_beat(&mut rx, |h| h.state == NodeState::Up);
        // The operator's drain holds whatever the check says.
        ctl.draining.store(true, Ordering::SeqCst);
        wait_beat(&mut rx, |h| h.state == NodeState::Draining);
        ctl.stop.store(true, Ordering::SeqCst);
        agent.join().unwrap().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn notice_filter_drops_replays() {
        let key = Key::from_bytes(&[7u8; 32]).unwrap();
        let vip = Vip {
            addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 80,
            proto: 6,
        };
        let mut seq = 5;
        let r = [heartbeat::RouteRange { first: 0, last: 0 }];
        let a = heartbeat::split_notices(1, vip, MoveReason::Failure, &r, 10, &mut seq).remove(0);
        let b = heartbeat::split_notices(1, vip, MoveReason::Failure, &r, 10, &mut seq).remove(0);
        let from: SocketAddr = "127.0.0.1:7711".parse().unwrap();
        let mut f = NoticeFilter::default();
        let enc = |n: &Notice| n.encode(&key).unwrap();
        assert!(f.accept(&enc(&a), &key, 1).is_ok());
        assert_eq!(
            f.accept(&enc(&a), &key, 1).unwrap_err(),
            Refused::Replay {
                incarnation: 10,
                sequence: 5
            }
        );
        assert!(f.accept(&enc(&b), &key, 1).is_ok());
        let mut restarted = a.clone();
        restarted.incarnation = 11;
        assert!(f.accept(&enc(&restarted), &key, 1).is_ok());
        assert!(matches!(
            f.accept(&enc(&b), &key, 1),
            Err(Refused::Replay { .. })
        ));
        assert_eq!(
            f.accept(&enc(&b), &key, 2).unwrap_err(),
            Refused::OtherNode(1)
        );
        // Refused by their header, before any HMAC.
        let hb = Heartbeat {
            node: 1,
            incarnation: 1,
            sequence: 1,
            state: NodeState::Up,
            weight: 0,
            interval_ms: 100,
            cpu_permille: None,
            active_conns: None,
        };
        assert_eq!(
            f.accept(&hb.encode(&key), &key, 1).unwrap_err(),
            Refused::NotANotice
        );
        assert_eq!(f.accept(b"junk", &key, 1).unwrap_err(), Refused::NotANotice);
        let forged = Key::from_bytes(&[8u8; 32]).unwrap();
        let mut c = b.clone();
        c.sequence = 99;
        assert_eq!(
            f.accept(&c.encode(&forged).unwrap(), &key, 1).unwrap_err(),
            Refused::Bad(DecodeError::BadHmac)
        );
        // Bounded: the oldest incarnations are forgotten, and anything older refused.
        for inc in 100..(100 + NOTICE_SOURCES as u64) {
            let mut n = a.clone();
            n.incarnation = inc;
            assert!(f.accept(&enc(&n), &key, 1).is_ok());
        }
        assert_eq!(f.last.len(), NOTICE_SOURCES);
        assert_eq!(
            f.accept(&enc(&restarted), &key, 1).unwrap_err(),
            Refused::Stale { incarnation: 11 }
        );
        let env = hook_env(&b, from);
        assert!(env.contains(&("LB_ROUTES", "0".to_string())));
        assert!(env.contains(&("LB_REASON", "failure".to_string())));
    }
}
