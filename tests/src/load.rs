//! A load generator for the lab (`lab.rs`), run from its client namespace:
//! - long-lived TCP connections to the nodes' echo servers, each sending a 64-byte line every
//!   `line_every` and checking that the echo matches byte for byte; per connection: bytes sent
//!   and received, exchanges, the slowest round trip, and how it broke if it did (reset,
//!   timeout, mismatch, closed). The node a connection is on is read on the nodes themselves
//!   (the established socket in each node namespace's `/proc/net/tcp`), not from the
//!   balancer: connections are opened until every wanted node holds `per_node` of them;
//! - a steady rate of short HTTP requests (`GET /`, answered `node N`) over the VIPs and the
//!   client's source addresses, each recorded with when it was due, started and ended, and the
//!   node that answered or how it failed.
//!
//! IPv4 and IPv6 alike: VIPs of both families may be mixed in one load, each connection or
//! request using the client's source addresses of its VIP's family.
//!
//! Cheap on purpose (the CI machine has 2 cores): a thread per connection asleep between
//! lines, a pacer and a few HTTP workers. Deterministic apart from the kernel's port choice.
use std::{
    collections::{BTreeMap, HashMap},
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{lab, netns::spawn_in};

/// Bytes per echo line (the last one is `\n`).
pub const LINE: usize = 64;
/// How long an echo or an HTTP exchange may take before it counts as failed.
pub const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// Long-lived echo connections to `vip:port`: `per_node` on each node of `nodes`.
#[derive(Clone, Debug)]
pub struct EchoSpec {
    pub vip: IpAddr,
    pub port: u16,
    pub nodes: Vec<u32>,
    pub per_node: usize,
}

/// What a [`Load`] runs.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The client namespace.
    pub client_ns: String,
    /// The nodes: (id, namespace), to find which node holds a connection.
    pub nodes: Vec<(u32, String)>,
    /// Source addresses (either family), used in turn: for a VIP, those of its family.
    pub sources: Vec<IpAddr>,
    pub echo: Vec<EchoSpec>,
    /// Each connection sends a line this often.
    pub line_every: Duration,
    /// VIPs of the short HTTP requests (port 80), in turn.
    pub http_vips: Vec<IpAddr>,
    /// Requests per second over all VIPs (0: none).
    pub http_rate: f64,
    pub http_workers: usize,
}

/// How a connection or request failed.
#[derive(Clone, Debug)]
pub struct Failure {
    pub at: Instant,
    /// `reset`, `timeout`, `closed`, `mismatch`, `refused`, `connect`, `io`, `bad reply`.
    pub kind: String,
    pub msg: String,
}

/// One long-lived connection.
#[derive(Clone, Debug)]
pub struct Conn {
    pub id: usize,
    pub vip: IpAddr,
    pub port: u16,
    /// The client's end.
    pub local: SocketAddr,
    /// The node holding the other end when it was opened.
    pub node: u32,
    pub sent: u64,
    pub received: u64,
    /// Lines sent and echoed intact.
    pub exchanges: u64,
    pub max_rtt: Duration,
    /// How it broke (it stops then).
    pub failure: Option<Failure>,
}

impl Conn {
    /// Bytes sent that never came back.
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }
}

/// One short HTTP request.
#[derive(Clone, Debug)]
pub struct Request {
    pub seq: u64,
    pub vip: IpAddr,
    pub src: IpAddr,
    /// When the pacer wanted it to start, when a worker started it, when it ended.
    pub due: Instant,
    pub start: Instant,
    pub end: Instant,
    /// The node that answered, or how it failed.
    pub outcome: std::result::Result<u32, Failure>,
}

impl Request {
    pub fn latency(&self) -> Duration {
        self.end - self.start
    }
    pub fn node(&self) -> Option<u32> {
        self.outcome.as_ref().ok().copied()
    }
    /// Failed, or slower than `slow` (a lost SYN costs a 1 s retransmission).
    pub fn disturbed(&self, slow: Duration) -> bool {
        self.outcome.is_err() || self.latency() > slow
    }
}

/// Long-lived connections and short requests running until [`Load::stop`].
pub struct Load {
    pub started: Instant,
    stop_conns: Arc<AtomicBool>,
    stop_http: Arc<AtomicBool>,
    conns: Vec<Arc<Mutex<Conn>>>,
    conn_threads: Vec<JoinHandle<()>>,
    requests: Arc<Mutex<Vec<Request>>>,
    http_threads: Vec<JoinHandle<Result<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Load {
    /// Opens the connections (until every wanted node has its share: 30 s at most), then
    /// starts the lines and the requests.
    pub fn start(spec: &Spec) -> Result<Self> {
        let started = Instant::now();
        let stop_conns = Arc::new(AtomicBool::new(false));
        let stop_http = Arc::new(AtomicBool::new(false));
        let mut conns = Vec::new();
        let mut conn_threads = Vec::new();
        for es in &spec.echo {
            for (stream, node) in open_spread(spec, es)? {
                let id = conns.len();
                let local = stream.local_addr()?;
                let c = Arc::new(Mutex::new(Conn {
                    id,
                    vip: es.vip,
                    port: es.port,
                    local,
                    node,
                    sent: 0,
                    received: 0,
                    exchanges: 0,
                    max_rtt: Duration::ZERO,
                    failure: None,
                }));
                let (c2, stop, every) = (c.clone(), stop_conns.clone(), spec.line_every);
                conn_threads.push(std::thread::spawn(move || {
                    converse(stream, &c2, &stop, every)
                }));
                conns.push(c);
            }
        }
        let requests = Arc::new(Mutex::new(Vec::new()));
        let mut http_threads = Vec::new();
        if spec.http_rate > 0.0 && !spec.http_vips.is_empty() {
            // Each VIP's sources, checked before anything runs.
            let vips: Vec<(IpAddr, Vec<IpAddr>)> = spec
                .http_vips
                .iter()
                .map(|&vip| Ok((vip, sources_for(&spec.sources, vip)?)))
                .collect::<Result<_>>()?;
            let (tx, rx) = mpsc::channel::<(u64, IpAddr, IpAddr, Instant)>();
            let rx = Arc::new(Mutex::new(rx));
            for _ in 0..spec.http_workers.max(1) {
                let (rx, requests) = (rx.clone(), requests.clone());
                http_threads.push(spawn_in(&spec.client_ns, move || {
                    loop {
                        let job = lock(&rx).recv();
                        let Ok((seq, vip, src, due)) = job else {
                            return Ok(());
                        };
                        let start = Instant::now();
                        let outcome = http_request(src, vip);
                        lock(&requests).push(Request {
                            seq,
                            vip,
                            src,
                            due,
                            start,
                            end: Instant::now(),
                            outcome,
                        });
                    }
                }));
            }
            let rate = spec.http_rate;
            let stop = stop_http.clone();
            http_threads.push(std::thread::spawn(move || {
                let t0 = Instant::now();
                for seq in 0u64.. {
                    let due = t0 + Duration::from_secs_f64(seq as f64 / rate);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let (vip, sources) = &vips[seq as usize % vips.len()];
                    // Sources change every round over the VIPs, so each VIP gets every source.
                    let src = sources[(seq as usize / vips.len()) % sources.len()];
                    let vip = *vip;
                    if tx.send((seq, vip, src, due)).is_err() {
                        break;
                    }
                }
                Ok(())
            }));
        }
        Ok(Self {
            started,
            stop_conns,
            stop_http,
            conns,
            conn_threads,
            requests,
            http_threads,
        })
    }

    /// The connections as they are now.
    pub fn conns(&self) -> Vec<Conn> {
        self.conns.iter().map(|c| lock(c).clone()).collect()
    }

    /// The requests finished so far.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.requests).clone()
    }

    /// Waits until every connection that has not failed has done `lines` more exchanges and
    /// `requests` more requests have finished that started from now on (so an event just
    /// made is exercised by the load), `timeout` at most. Returns the instant it started from.
    pub fn run_through(&self, lines: u64, requests: usize, timeout: Duration) -> Result<Instant> {
        let from = Instant::now();
        let base: Vec<u64> = self.conns().iter().map(|c| c.exchanges).collect();
        crate::labctl::wait_for(
            &format!("{lines} more lines on every live connection and {requests} more requests"),
            timeout,
            || {
                let lines_ok = self
                    .conns()
                    .iter()
                    .zip(&base)
                    .all(|(c, b)| c.failure.is_some() || c.exchanges >= b + lines);
                let reqs = lock(&self.requests)
                    .iter()
                    .filter(|r| r.start >= from)
                    .count();
                Ok(lines_ok && reqs >= requests)
            },
        )?;
        Ok(from)
    }

    /// Stops the requests (the ones under way finish), then the connections (each after its
    /// current exchange); returns everything seen.
    pub fn stop(mut self) -> Result<Report> {
        self.stop_http.store(true, Ordering::Relaxed);
        for h in self.http_threads.drain(..) {
            h.join()
                .map_err(|_| anyhow::anyhow!("HTTP load thread panicked"))??;
        }
        self.stop_conns.store(true, Ordering::Relaxed);
        for h in self.conn_threads.drain(..) {
            h.join()
                .map_err(|_| anyhow::anyhow!("connection thread panicked"))?;
        }
        let mut requests = lock(&self.requests).clone();
        requests.sort_by_key(|r| r.seq);
        Ok(Report {
            started: self.started,
            elapsed: self.started.elapsed(),
            conns: self.conns(),
            requests,
        })
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop_http.store(true, Ordering::Relaxed);
        self.stop_conns.store(true, Ordering::Relaxed);
    }
}

/// The addresses of `sources` of `vip`'s family (at least one).
pub fn sources_for(sources: &[IpAddr], vip: IpAddr) -> Result<Vec<IpAddr>> {
    let v: Vec<IpAddr> = sources
        .iter()
        .copied()
        .filter(|s| s.is_ipv4() == vip.is_ipv4())
        .collect();
    ensure!(
        !v.is_empty(),
        "no source address of {vip}'s family among {sources:?}"
    );
    Ok(v)
}

/// Opens connections to `es.vip:es.port` from the sources in turn until each node of
/// `es.nodes` holds `es.per_node` (the others are closed again).
fn open_spread(spec: &Spec, es: &EchoSpec) -> Result<Vec<(TcpStream, u32)>> {
    let sources = sources_for(&spec.sources, es.vip)?;
    let remote = SocketAddr::new(es.vip, es.port);
    let mut have: BTreeMap<u32, Vec<TcpStream>> = es.nodes.iter().map(|&n| (n, vec![])).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut k = 0usize;
    let want = |have: &BTreeMap<u32, Vec<TcpStream>>| {
        have.values()
            .map(|v| es.per_node.saturating_sub(v.len()))
            .sum::<usize>()
    };
    while want(&have) > 0 {
        ensure!(
            Instant::now() < deadline,
            "{remote}: could not get {} connections on each of nodes {:?} in 30 s (have {:?})",
            es.per_node,
            es.nodes,
            have.iter().map(|(n, v)| (*n, v.len())).collect::<Vec<_>>()
        );
        // A batch a bit larger than what is missing, then find where each went.
        let batch = want(&have) + 2;
        let srcs: Vec<IpAddr> = (0..batch)
            .map(|i| sources[(k + i) % sources.len()])
            .collect();
        k += batch;
        let (vip, port) = (es.vip, es.port);
        let opened: Vec<TcpStream> = spawn_in(&spec.client_ns, move || {
            srcs.iter()
                .map(|&src| {
                    let mut s = lab::connect_ip(Some(src), vip, port)?;
                    s.set_read_timeout(Some(IO_TIMEOUT))?;
                    s.set_write_timeout(Some(IO_TIMEOUT))?;
                    s.set_nodelay(true)?;
                    // One exchange: the far end is established before we look for it.
                    s.write_all(b"hello\n")?;
                    let mut back = [0u8; 6];
                    s.read_exact(&mut back)
                        .with_context(|| format!("first echo on a connection to {remote}"))?;
                    ensure!(&back == b"hello\n", "echo answered {back:?}");
                    Ok(s)
                })
                .collect::<Result<Vec<_>>>()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("connecting thread panicked"))??;
        let locs = locate(&spec.nodes, port)?;
        for s in opened {
            let local = s.local_addr()?;
            let node = locs
                .get(&(local, vip))
                .with_context(|| format!("connection {local} -> {remote} is on no node"))?;
            if let Some(v) = have.get_mut(node)
                && v.len() < es.per_node
            {
                v.push(s);
            }
        }
    }
    Ok(have
        .into_iter()
        .flat_map(|(n, v)| v.into_iter().map(move |s| (s, n)))
        .collect())
}

/// Established TCP sockets on local `port` in each node's namespace: (client end, VIP) ->
/// node (`/proc/thread-self/net/tcp` and `tcp6` of a thread inside the namespace: a
/// dual-stack server's IPv4 connections are listed in `tcp6`, v4-mapped, and are returned as
/// IPv4 addresses, as the client sees them).
pub fn locate(nodes: &[(u32, String)], port: u16) -> Result<HashMap<(SocketAddr, IpAddr), u32>> {
    let mut m = HashMap::new();
    for (id, ns) in nodes {
        let text = spawn_in(ns, || {
            let mut t = std::fs::read_to_string("/proc/thread-self/net/tcp")
                .context("reading /proc/net/tcp")?;
            // Absent without IPv6; then there is nothing more to read.
            t.push_str(&std::fs::read_to_string("/proc/thread-self/net/tcp6").unwrap_or_default());
            Ok(t)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread panicked"))??;
        for l in text.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 4 || f[3] != "01" {
                continue;
            }
            let (Some(local), Some(remote)) = (parse_proc_addr(f[1]), parse_proc_addr(f[2])) else {
                continue;
            };
            if local.port() == port {
                m.insert((remote, local.ip()), *id);
            }
        }
    }
    Ok(m)
}

/// `016412C6:0007` style: the address as the kernel prints it, each 32-bit word of it (one
/// in `tcp`, four in `tcp6`) as a native-order number in hex, then the port in hex. An
/// IPv4-mapped IPv6 address (::ffff:a.b.c.d, a dual-stack socket's IPv4 peer) comes back as
/// IPv4.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (a, p) = s.split_once(':')?;
    let port = u16::from_str_radix(p, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = a.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(w, 16).ok()?.to_ne_bytes())
    };
    let ip = match a.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            let v6 = Ipv6Addr::from(b);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The line `seq` of connection `id`: 64 bytes ending in `\n`, different for every line.
fn line(id: usize, seq: u64) -> [u8; LINE] {
    let mut b = [0u8; LINE];
    let head = format!("c{id:04} s{seq:010} ");
    b[..head.len()].copy_from_slice(head.as_bytes());
    for (i, x) in b.iter_mut().enumerate().skip(head.len()) {
        *x = b'a' + ((id as u64 * 7 + seq * 13 + i as u64) % 26) as u8;
    }
    b[LINE - 1] = b'\n';
    b
}

fn classify(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionReset | K::ConnectionAborted => "reset",
        K::BrokenPipe => "broken pipe",
        K::TimedOut | K::WouldBlock => "timeout",
        K::UnexpectedEof => "closed",
        K::ConnectionRefused => "refused",
        _ => "io",
    }
}

/// A connection's life: a line, its echo in full, checked, then sleep till the next tick.
fn converse(mut s: TcpStream, c: &Mutex<Conn>, stop: &AtomicBool, every: Duration) {
    let id = lock(c).id;
    let mut next = Instant::now();
    let fail = |kind: &str, msg: String| {
        lock(c).failure = Some(Failure {
            at: Instant::now(),
            kind: kind.into(),
            msg,
        });
    };
    for seq in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let out = line(id, seq);
        let t = Instant::now();
        if let Err(e) = s.write_all(&out) {
            return fail(classify(&e), format!("write of line {seq}: {e}"));
        }
        lock(c).sent += LINE as u64;
        let mut back = [0u8; LINE];
        let mut got = 0;
        while got < LINE {
            match s.read(&mut back[got..]) {
                Ok(0) => {
                    return fail(
                        "closed",
                        format!("closed by the far end in line {seq} ({got} bytes back)"),
                    );
                }
                Ok(n) => {
                    got += n;
                    lock(c).received += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return fail(
                        classify(&e),
                        format!("read of line {seq} ({got} bytes back): {e}"),
                    );
                }
            }
        }
        if back != out {
            return fail(
                "mismatch",
                format!(
                    "line {seq}: sent {:?}, got {:?}",
                    String::from_utf8_lossy(&out),
                    String::from_utf8_lossy(&back)
                ),
            );
        }
        {
            let mut g = lock(c);
            g.exchanges += 1;
            g.max_rtt = g.max_rtt.max(t.elapsed());
        }
        next += every;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

/// `GET /` on `vip:80` from `src`: the node that answered.
fn http_request(src: IpAddr, vip: IpAddr) -> std::result::Result<u32, Failure> {
    let failure = |kind: &str, msg: String| Failure {
        at: Instant::now(),
        kind: kind.into(),
        msg,
    };
    let mut s = lab::connect_ip(Some(src), vip, lab::HTTP_PORT).map_err(|e| {
        let msg = format!("{e:#}");
        let kind = if msg.contains("reset") {
            "reset"
        } else if msg.contains("refused") {
            "refused"
        } else {
            "connect"
        };
        failure(kind, msg)
    })?;
    let io = |what: &str, e: std::io::Error| failure(classify(&e), format!("{what}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| io("setsockopt", e))?;
    s.set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| io("setsockopt", e))?;
    // The Host header brackets an IPv6 address, as a URL does.
    let host = match vip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| io("request", e))?;
    let mut reply = Vec::with_capacity(160);
    s.read_to_end(&mut reply).map_err(|e| io("reply", e))?;
    let text = String::from_utf8_lossy(&reply);
    text.split_once("\r\n\r\n")
        .filter(|(head, _)| head.starts_with("HTTP/1.1 200"))
        .and_then(|(_, body)| body.trim().strip_prefix("node ")?.parse().ok())
        .ok_or_else(|| failure("bad reply", format!("reply {text:?}")))
}

/// What a [`Load`] saw.
#[derive(Clone, Debug)]
pub struct Report {
    pub started: Instant,
    pub elapsed: Duration,
    pub conns: Vec<Conn>,
    pub requests: Vec<Request>,
}

impl Report {
    /// Connections that broke.
    pub fn broken(&self) -> Vec<&Conn> {
        self.conns.iter().filter(|c| c.failure.is_some()).collect()
    }

    /// Requests that started in `[from, to)`.
    pub fn requests_between(&self, from: Instant, to: Instant) -> Vec<&Request> {
        self.requests
            .iter()
            .filter(|r| r.start >= from && r.start < to)
            .collect()
    }

    pub fn failed(&self) -> Vec<&Request> {
        self.requests
            .iter()
            .filter(|r| r.outcome.is_err())
            .collect()
    }

    /// Seconds since the load started (for messages).
    pub fn t(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.started).as_secs_f64()
    }

    /// Per connection problems, one line each (empty: none).
    pub fn conn_problems<'a>(&self, conns: impl IntoIterator<Item = &'a Conn>) -> Vec<String> {
        conns
            .into_iter()
            .filter(|c| c.failure.is_some() || c.lost() > 0)
            .map(|c| {
                let f = c.failure.as_ref();
                format!(
                    "conn {} {} -> {} on node {}: {} at t={:.3}s ({}), {} bytes lost, {} lines ok",
                    c.id,
                    c.local,
                    SocketAddr::new(c.vip, c.port),
                    c.node,
                    f.map_or("-", |f| f.kind.as_str()),
                    f.map_or(0.0, |f| self.t(f.at)),
                    f.map_or("", |f| f.msg.as_str()),
                    c.lost(),
                    c.exchanges
                )
            })
            .collect()
    }

    /// One line per failed request (the first `max`).
    pub fn request_problems(&self, reqs: &[&Request], max: usize) -> Vec<String> {
        reqs.iter()
            .take(max)
            .map(|r| {
                format!(
                    "request {} {} -> {}: started t={:.3}s, {:.0} ms: {}",
                    r.seq,
                    r.src,
                    r.vip,
                    self.t(r.start),
                    r.latency().as_secs_f64() * 1e3,
                    match &r.outcome {
                        Ok(n) => format!("node {n}"),
                        Err(f) => format!("{}: {}", f.kind, f.msg),
                    }
                )
            })
            .collect()
    }

    /// A paragraph for the test log: connections per node (count, broken, bytes, lines,
    /// slowest round trip) and requests (ok, failed, answers per node, slowest).
    pub fn summary(&self) -> String {
        let mut s = format!("load ran {:.1} s\n", self.elapsed.as_secs_f64());
        let mut by_node: BTreeMap<(IpAddr, u32), Vec<&Conn>> = BTreeMap::new();
        for c in &self.conns {
            by_node.entry((c.vip, c.node)).or_default().push(c);
        }
        for ((vip, node), cs) in &by_node {
            s += &format!(
                "  {} node {node}: {} conns, {} broken, {} B sent, {} B echoed, {} lost, {} lines, slowest {:.1} ms\n",
                SocketAddr::new(*vip, cs[0].port),
                cs.len(),
                cs.iter().filter(|c| c.failure.is_some()).count(),
                cs.iter().map(|c| c.sent).sum::<u64>(),
                cs.iter().map(|c| c.received).sum::<u64>(),
                cs.iter().map(|c| c.lost()).sum::<u64>(),
                cs.iter().map(|c| c.exchanges).sum::<u64>(),
                cs.iter()
                    .map(|c| c.max_rtt)
                    .max()
                    .unwrap_or_default()
                    .as_secs_f64()
                    * 1e3,
            );
        }
        let mut per: BTreeMap<IpAddr, BTreeMap<u32, u64>> = BTreeMap::new();
        for r in &self.requests {
            if let Some(n) = r.node() {
                *per.entry(r.vip).or_default().entry(n).or_insert(0) += 1;
            }
        }
        s += &format!(
            "  requests: {} done, {} failed, slowest {:.0} ms, answers per VIP and node {:?}",
            self.requests.len(),
            self.failed().len(),
            self.requests
                .iter()
                .map(Request::latency)
                .max()
                .unwrap_or_default()
                .as_secs_f64()
                * 1e3,
            per
        );
        s
    }
}

/// Answers per node among `reqs`.
pub fn per_node<'a>(reqs: impl IntoIterator<Item = &'a Request>) -> BTreeMap<u32, u64> {
    let mut m = BTreeMap::new();
    for r in reqs {
        if let Some(n) = r.node() {
            *m.entry(n).or_insert(0) += 1;
        }
    }
    m
}

/// The largest deviation from `n * p` a count of `n` independent trials of probability `p`
/// may show at `z` standard deviations of the binomial (`sqrt(n p (1 - p))`).
pub fn binomial_bound(n: u64, p: f64, z: f64) -> f64 {
    z * (n as f64 * p * (1.0 - p)).sqrt()
}

/// `count` GETs of `http://vip/` from `threads` threads in the client namespace, the
/// sources of `vip`'s family in turn (each request a new connection, so a new source port):
/// answers per node; any failure fails.
pub fn http_burst(
    client_ns: &str,
    vip: IpAddr,
    sources: &[IpAddr],
    count: usize,
    threads: usize,
) -> Result<BTreeMap<u32, u64>> {
    let sources = sources_for(sources, vip)?;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let sources = sources.to_vec();
            spawn_in(client_ns, move || {
                let mut m = BTreeMap::new();
                for i in (t..count).step_by(threads) {
                    let src = sources[i % sources.len()];
                    let node = http_request(src, vip).map_err(|f| {
                        let url = SocketAddr::new(vip, lab::HTTP_PORT);
                        anyhow::anyhow!("GET http://{url}/ from {src}: {}: {}", f.kind, f.msg)
                    })?;
                    *m.entry(node).or_insert(0u64) += 1;
                }
                Ok(m)
            })
        })
        .collect();
    let mut all = BTreeMap::new();
    for h in handles {
        for (n, c) in h
            .join()
            .map_err(|_| anyhow::anyhow!("burst thread panicked"))??
        {
            *all.entry(n).or_insert(0) += c;
        }
    }
    Ok(all)
}

/// What a UDP burst saw.
#[derive(Debug, Default)]
pub struct UdpResult {
    pub sent: u64,
    pub answered: u64,
    /// Answers that differed from the datagram sent.
    pub mismatched: u64,
    /// The first few datagrams without an answer.
    pub unanswered: Vec<String>,
}

/// `count` datagrams to `vip:port`, each from a new socket (a new source port), the sources
/// of `vip`'s family in turn, each waiting (1 s) for its echo.
pub fn udp_burst(
    client_ns: &str,
    vip: IpAddr,
    port: u16,
    sources: &[IpAddr],
    count: usize,
) -> Result<UdpResult> {
    let sources = sources_for(sources, vip)?;
    let dst = SocketAddr::new(vip, port);
    spawn_in(client_ns, move || {
        let mut r = UdpResult::default();
        for i in 0..count {
            let src = sources[i % sources.len()];
            let msg = format!("datagram {i:06} from {src} to {dst}").into_bytes();
            r.sent += 1;
            let s = UdpSocket::bind((src, 0))?;
            s.connect(dst)?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.send(&msg)?;
            let mut buf = [0u8; 2048];
            match s.recv(&mut buf) {
                Ok(n) if buf[..n] == msg[..] => r.answered += 1,
                Ok(_) => {
                    r.answered += 1;
                    r.mismatched += 1;
                }
                Err(e) => {
                    if r.unanswered.len() < 5 {
                        r.unanswered
                            .push(format!("{} from {}: {e}", i, s.local_addr()?));
                    }
                }
            }
        }
        Ok(r)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("UDP thread panicked"))?
}

/// UDP datagrams delivered to the sockets of namespace `ns`, IPv4 and IPv6: `Udp:
/// InDatagrams` of `/proc/thread-self/net/snmp` plus `Udp6InDatagrams` of `snmp6`, read by a
/// thread in it.
pub fn udp_in_datagrams(ns: &str) -> Result<u64> {
    spawn_in(ns, || {
        let text = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
        let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
        let (Some(head), Some(vals)) = (udp.next(), udp.next()) else {
            bail!("no Udp lines in /proc/net/snmp");
        };
        let i = head
            .split_whitespace()
            .position(|f| f == "InDatagrams")
            .context("no InDatagrams")?;
        let v4: u64 = vals
            .split_whitespace()
            .nth(i)
            .context("short Udp line")?
            .parse()
            .context("InDatagrams")?;
        // Absent without IPv6: then there are no IPv6 datagrams.
        let text6 = std::fs::read_to_string("/proc/thread-self/net/snmp6").unwrap_or_default();
        let v6: u64 = match text6
            .lines()
            .find_map(|l| l.strip_prefix("Udp6InDatagrams"))
        {
            Some(v) => v.trim().parse().context("Udp6InDatagrams")?,
            None => 0,
        };
        Ok(v4 + v6)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_addresses_parse() {
        // 198.18.100.1:7 as x86 prints it.
        let a = parse_proc_addr("016412C6:0007").unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(a, "198.18.100.1:7".parse().unwrap());
        }
        assert_eq!(a.port(), 7);
        let m = parse_proc_addr("0000000000000000FFFF0000016412C6:0007").unwrap();
        assert_eq!(m, a, "v4-mapped in tcp6");
        // [2001:db8::11]:80 as x86 prints it.
        let v6 = parse_proc_addr("B80D0120000000000000000011000000:0050").unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(v6, "[2001:db8::11]:80".parse().unwrap());
        }
        assert_eq!(parse_proc_addr("B80D012000:0050"), None);
        assert_eq!(parse_proc_addr("016412C6"), None);
    }

    #[test]
    fn sources_are_taken_of_the_vips_family() {
        let all: Vec<IpAddr> = ["198.18.0.1", "2001:db8::1", "198.18.0.101"]
            .map(|a| a.parse().unwrap())
            .to_vec();
        let v4 = sources_for(&all, "198.18.100.1".parse().unwrap()).unwrap();
        assert_eq!(v4, [all[0], all[2]]);
        let v6 = sources_for(&all, "2001:db8:100::1".parse().unwrap()).unwrap();
        assert_eq!(v6, [all[1]]);
        assert!(sources_for(&all[..1], "2001:db8:100::1".parse().unwrap()).is_err());
    }

    #[test]
    fn lines_differ_and_end_in_newline() {
        let a = line(1, 2);
        assert_eq!(a[LINE - 1], b'\n');
        assert_ne!(a, line(1, 3));
        assert_ne!(a, line(2, 2));
        assert!(!a[..LINE - 1].contains(&b'\n'));
    }

    #[test]
    fn binomial_bound_is_z_sigma() {
        let b = binomial_bound(2000, 1.0 / 3.0, 5.0);
        assert!((b - 5.0 * (2000.0f64 * 2.0 / 9.0).sqrt()).abs() < 1e-9);
    }
}
