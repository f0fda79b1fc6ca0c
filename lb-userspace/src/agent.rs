//! `lb agent`: runs on each node, sends heartbeats to the balancer(s) and reacts to
//! ROUTE_MOVED notices.
//!
//! One UDP socket does both: heartbeats go out every `--interval` to every balancer (unicast or
//! a multicast group), and notices come back to the same socket (the balancer answers the
//! heartbeat's source address). Every process start has a fresh incarnation. Signals:
//! SIGUSR1 = start draining, SIGUSR2 = back to up (both idempotent, and a heartbeat goes out at
//! once), SIGTERM/SIGINT = exit. A notice for this node is verified, logged, and handed to the
//! `--on-route-moved` hook (run by `sh -c`, one at a time, off the heartbeat thread, so a slow
//! hook never delays a heartbeat).
use crate::heartbeat::{
    self, DEFAULT_PORT, Heartbeat, Key, MAX_DATAGRAM, Message, NodeState, Notice, format_ranges,
};
use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
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
        .map(spawn_hook_runner)
        .transpose()?;
    let mut load = LoadSampler::default();
    let mut notices = NoticeFilter::default();
    let mut failing = vec![false; targets.len()];
    let mut sequence: u64 = 0;
    let mut draining = ctl.draining.load(Ordering::SeqCst);
    let mut next_send = Instant::now();
    let mut buf = [0u8; MAX_DATAGRAM + 1];

    while !ctl.stop.load(Ordering::SeqCst) {
        let now_draining = ctl.draining.load(Ordering::SeqCst);
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
        loop {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if let Some(notice) = notices.accept(&buf[..n], from, &key, args.node_id) {
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

/// Verifies notices and drops replays (per balancer source: incarnation, then sequence).
#[derive(Debug, Default)]
struct NoticeFilter {
    last: HashMap<SocketAddr, (u64, u64)>,
}

impl NoticeFilter {
    fn accept(&mut self, bytes: &[u8], from: SocketAddr, key: &Key, node: u32) -> Option<Notice> {
        let n = match heartbeat::decode(bytes, key) {
            Ok(Message::RouteMoved(n)) => n,
            Ok(Message::Heartbeat(_)) => {
                tracing::debug!("agent: ignoring a heartbeat from {from}");
                return None;
            }
            Err(e) => {
                tracing::warn!("agent: rejected datagram from {from}: {e}");
                return None;
            }
        };
        if n.node != node {
            tracing::warn!(
                "agent: notice from {from} is for node {}, not {node}; ignored",
                n.node
            );
            return None;
        }
        if let Some(&(inc, seq)) = self.last.get(&from)
            && (n.incarnation < inc || (n.incarnation == inc && n.sequence <= seq))
        {
            tracing::warn!(
                "agent: replayed or stale notice from {from} (sequence {}); ignored",
                n.sequence
            );
            return None;
        }
        if self.last.len() >= 64 && !self.last.contains_key(&from) {
            self.last.clear(); // bounded; authentic sources are few
        }
        self.last.insert(from, (n.incarnation, n.sequence));
        Some(n)
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

fn spawn_hook_runner(cmd: String) -> Result<mpsc::SyncSender<(Notice, SocketAddr)>> {
    let (tx, rx) = mpsc::sync_channel::<(Notice, SocketAddr)>(HOOK_QUEUE);
    std::thread::Builder::new()
        .name("route-moved-hook".into())
        .spawn(move || {
            for (notice, from) in rx {
                let status = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(&cmd)
                    .envs(hook_env(&notice, from))
                    .stdin(std::process::Stdio::null())
                    .status();
                match status {
                    Ok(s) if s.success() => {}
                    Ok(s) => tracing::warn!("agent: route-moved hook exited with {s}"),
                    Err(e) => tracing::warn!("agent: cannot run route-moved hook: {e}"),
                }
            }
        })
        .context("starting the hook thread")?;
    Ok(tx)
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

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lb-agent-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn bad_key_file_is_a_clear_error() {
        let dir = temp_dir("badkey");
        let args = AgentArgs {
            node_id: 1,
            balancer: vec!["127.0.0.1:9".parse().unwrap()],
            key_file: key_file(&dir, b"short"),
            interval: DEFAULT_INTERVAL,
            weight: 0,
            draining: false,
            on_route_moved: None,
            bind: Some("127.0.0.1:0".parse().unwrap()),
        };
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
            node_id: 4,
            balancer: vec![rx.local_addr().unwrap()],
            key_file: kf,
            interval: Duration::from_millis(20),
            weight: 9,
            draining: false,
            on_route_moved: Some(hook),
            bind: Some("127.0.0.1:0".parse().unwrap()),
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
        assert!(f.accept(&a.encode(&key).unwrap(), from, &key, 1).is_some());
        assert!(f.accept(&a.encode(&key).unwrap(), from, &key, 1).is_none());
        assert!(f.accept(&b.encode(&key).unwrap(), from, &key, 1).is_some());
        let mut restarted = a.clone();
        restarted.incarnation = 11;
        assert!(
            f.accept(&restarted.encode(&key).unwrap(), from, &key, 1)
                .is_some()
        );
        assert!(
            f.accept(&b.encode(&key).unwrap(), from, &key, 1).is_none(),
            "older incarnation"
        );
        assert!(
            f.accept(&b.encode(&key).unwrap(), from, &key, 2).is_none(),
            "other node"
        );
        let env = hook_env(&b, from);
        assert!(env.contains(&("LB_ROUTES", "0".to_string())));
        assert!(env.contains(&("LB_REASON", "failure".to_string())));
    }
}
