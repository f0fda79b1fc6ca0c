//! Helpers of the scale suite: a cheap reader of the kernel's route tables (memory-mapped),
//! TCP servers in node namespaces, a TCP load generator in the client namespace, and
//! counting membership events in a daemon's log.
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, OwnedFd},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_common::{NodeEntry, RouteEntry, VipKey};
use lb_userspace::dataplane::{PinnedView, vip_key};
use rand::Rng as _;

use crate::netns::Netns;

/// `n` TCP VIPs, 198.18.100.1 up, on `port`: their addresses and their keys.
pub fn tcp_vips(n: u8, port: u16) -> (Vec<Ipv4Addr>, Vec<VipKey>) {
    let addrs: Vec<Ipv4Addr> = (1..=n).map(|i| Ipv4Addr::new(198, 18, 100, i)).collect();
    let keys = addrs
        .iter()
        .map(|a| vip_key((*a).into(), port, lb_common::PROTO_TCP))
        .collect();
    (addrs, keys)
}

/// Waits (up to `timeout`) until every node of `ids` is ACTIVE and owns routes in every VIP's
/// kernel table; how long after `t0` that first held (see [`wait_tables`]).
pub fn wait_all_own(
    kv: &KernelView,
    watch: &mut Watch,
    ids: &[u32],
    t0: Instant,
    timeout: Duration,
) -> Result<Option<Duration>> {
    wait_tables(kv, watch, t0, timeout, false, |kv, key, buf, w| {
        kv.all_own(key, ids, buf, |kv| w.poll_quiet(kv))
    })
}

/// The kernel's view of a running daemon, read cheaply enough to poll while the daemon works,
/// through [`PinnedView`] (route tables read from the mmapped `ROUTES`); pollers still scan
/// in chunks and stop early, see [`KernelView::scan`].
pub struct KernelView {
    view: PinnedView,
}

/// Entries read per chunk by [`KernelView::scan`].
pub const CHUNK: u32 = 4096;

/// The buffer of chunked reads.
#[derive(Default)]
pub struct ScanBuf {
    values: Vec<RouteEntry>,
}

impl KernelView {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        Ok(Self {
            view: PinnedView::open(pin_dir)?,
        })
    }

    /// A node's `NODES` entry.
    pub fn node(&self, index: u32) -> Result<NodeEntry> {
        Ok(self.view.node(index)?)
    }

    /// The ids in `ids` whose `NODES` state is not ACTIVE.
    pub fn inactive(&self, ids: &[u32]) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for &id in ids {
            if self.node(id)?.state != lb_common::NODE_ACTIVE {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// The live slice of `key`: (its `VIP_GEN`, first entry, entry count).
    pub fn live(&self, key: &VipKey) -> Result<(u32, u32, u32)> {
        Ok(self.view.live(key)?)
    }

    /// `VIP_GEN` of `key` (flips with every pushed table).
    pub fn generation(&self, key: &VipKey) -> Result<u32> {
        Ok(self.live(key)?.0)
    }

    /// Reads `count` entries of `ROUTES` from `offset` (from the map's memory mapping).
    pub fn read<'b>(
        &self,
        offset: u32,
        count: u32,
        buf: &'b mut ScanBuf,
    ) -> Result<&'b [RouteEntry]> {
        let n = count as usize;
        if buf.values.len() < n {
            buf.values.resize(n, RouteEntry::default());
        }
        self.view.read_routes(offset, &mut buf.values[..n])?;
        Ok(&buf.values[..n])
    }

    /// Scans the live table of `key` in chunks of [`CHUNK`]: `visit` gets each chunk and
    /// returns false to stop early; `between` runs after each chunk (to keep polling other
    /// things while a long table is read). Returns the generation the whole scan saw, or `None`
    /// if the table flipped meanwhile (the scan mixed two tables: discard it).
    pub fn scan(
        &self,
        key: &VipKey,
        buf: &mut ScanBuf,
        mut visit: impl FnMut(&[RouteEntry]) -> bool,
        mut between: impl FnMut(&Self),
    ) -> Result<Option<u32>> {
        let (generation, offset, count) = self.live(key)?;
        let mut at = 0;
        while at < count {
            let c = CHUNK.min(count - at);
            let more = visit(self.read(offset + at, c, buf)?);
            at += c;
            between(self);
            if !more {
                break;
            }
        }
        Ok((self.live(key)?.0 == generation).then_some(generation))
    }

    /// The live route table of `key` (re-read if its generation flipped during the read).
    pub fn routes(&self, key: &VipKey) -> Result<Vec<RouteEntry>> {
        let mut buf = ScanBuf::default();
        for _ in 0..10 {
            let (generation, offset, count) = self.live(key)?;
            let v = self.read(offset, count, &mut buf)?.to_vec();
            if self.live(key)?.0 == generation {
                return Ok(v);
            }
        }
        bail!("route table kept changing during the read")
    }

    /// Routes per owner in the live table of `key`.
    pub fn owners(&self, key: &VipKey) -> Result<BTreeMap<u32, u32>> {
        let mut m = BTreeMap::new();
        for r in self.routes(key)? {
            *m.entry(r.node).or_insert(0) += 1;
        }
        Ok(m)
    }

    /// Whether every node of `ids` owns a route of `key` in one consistent read (chunks are
    /// read until all are seen: usually one). `None`: the table flipped during the read.
    pub fn all_own(
        &self,
        key: &VipKey,
        ids: &[u32],
        buf: &mut ScanBuf,
        between: impl FnMut(&Self),
    ) -> Result<Option<(u32, bool)>> {
        let mut missing: Vec<u32> = ids.to_vec();
        let g = self.scan(
            key,
            buf,
            |chunk| {
                missing.retain(|id| !chunk.iter().any(|r| r.node == *id));
                !missing.is_empty()
            },
            between,
        )?;
        Ok(g.map(|g| (g, missing.is_empty())))
    }

    /// Whether no route of `key` is on node `id` in one consistent read (stops at the first
    /// route found on it). `None`: the table flipped during the read.
    pub fn none_on(
        &self,
        key: &VipKey,
        id: u32,
        buf: &mut ScanBuf,
        between: impl FnMut(&Self),
    ) -> Result<Option<(u32, bool)>> {
        let mut found = false;
        let g = self.scan(
            key,
            buf,
            |chunk| {
                found = chunk.iter().any(|r| r.node == id);
                !found
            },
            between,
        )?;
        Ok(g.map(|g| (g, !found)))
    }
}

/// Watches, between and during table scans, when each VIP's `VIP_GEN` value was first seen
/// and when a set of nodes was first seen all ACTIVE (or all not ACTIVE): a condition checked
/// on a table dates from when that table's generation appeared, not from when the (slow) scan
/// finished. `VIP_GEN` toggles between two slices, so two pushes of one VIP between two polls
/// (a few ms apart) would go unseen; the daemon pushes once per event.
pub struct Watch {
    pub keys: Vec<VipKey>,
    pub gens: Vec<u32>,
    pub since: Vec<Instant>,
    /// Polls so far per VIP whose value changed (pushes seen).
    pub flips: Vec<u32>,
    /// Nodes expected ACTIVE / not ACTIVE.
    pub up: Vec<u32>,
    pub down: Vec<u32>,
    /// Since when the nodes have all been as expected (None: not now).
    pub nodes_ok_since: Option<Instant>,
}

impl Watch {
    pub fn new(kv: &KernelView, keys: &[VipKey], up: &[u32], down: &[u32]) -> Result<Self> {
        let now = Instant::now();
        let mut w = Self {
            keys: keys.to_vec(),
            gens: keys
                .iter()
                .map(|k| kv.generation(k))
                .collect::<Result<_>>()?,
            since: vec![now; keys.len()],
            flips: vec![0; keys.len()],
            up: up.to_vec(),
            down: down.to_vec(),
            nodes_ok_since: None,
        };
        w.poll(kv)?;
        Ok(w)
    }

    /// Reads every VIP's generation and the watched nodes' states.
    pub fn poll(&mut self, kv: &KernelView) -> Result<()> {
        let now = Instant::now();
        for (i, k) in self.keys.iter().enumerate() {
            let g = kv.generation(k)?;
            if g != self.gens[i] {
                self.gens[i] = g;
                self.since[i] = now;
                self.flips[i] += 1;
            }
        }
        let mut ok = true;
        for &id in &self.up {
            ok &= kv.node(id)?.state == lb_common::NODE_ACTIVE;
        }
        for &id in &self.down {
            ok &= kv.node(id)?.state != lb_common::NODE_ACTIVE;
        }
        match (ok, self.nodes_ok_since) {
            (true, None) => self.nodes_ok_since = Some(now),
            (false, Some(_)) => self.nodes_ok_since = None,
            _ => {}
        }
        Ok(())
    }

    /// [`Watch::poll`] for use as a scan's `between` (errors show up in the next poll).
    pub fn poll_quiet(&mut self, kv: &KernelView) {
        let _ = self.poll(kv);
    }
}

/// Waits until every VIP's live table passes `check` (a consistent scan at the generation now
/// live) while the watched nodes are as `watch` expects. Returns when that first held,
/// measured from `t0`: the latest of the nodes' and each passing table's first sighting (so
/// the figure does not include how long the scans took); `None` after `timeout`.
///
/// Tables are scanned only while the nodes are as expected, one VIP per round, again when its
/// generation changes (or 200 ms after a failed scan, in case two pushes went unseen).
/// `sticky`: a table that passed counts as passed even after later pushes (for conditions no
/// correct later push can undo, e.g. "no route on a dead node", so other churn cannot keep
/// the wait from ending; the caller checks the final tables in full). Otherwise a push
/// un-passes the VIP until its new table is scanned.
pub fn wait_tables(
    kv: &KernelView,
    watch: &mut Watch,
    t0: Instant,
    timeout: Duration,
    sticky: bool,
    mut check: impl FnMut(&KernelView, &VipKey, &mut ScanBuf, &mut Watch) -> Result<Option<(u32, bool)>>,
) -> Result<Option<Duration>> {
    let n = watch.keys.len();
    // Per VIP: the generation that passed and when it was first seen.
    let mut ok: Vec<Option<(u32, Instant)>> = vec![None; n];
    let mut tried: Vec<Option<(u32, Instant)>> = vec![None; n];
    let mut buf = ScanBuf::default();
    let mut next = 0;
    loop {
        watch.poll(kv)?;
        if !sticky {
            for (o, g) in ok.iter_mut().zip(&watch.gens) {
                if o.is_some_and(|(og, _)| og != *g) {
                    *o = None;
                }
            }
        }
        if let Some(nodes) = watch.nodes_ok_since
            && ok.iter().all(Option::is_some)
        {
            let at = ok
                .iter()
                .flatten()
                .map(|(_, t)| *t)
                .fold(nodes, Instant::max);
            return Ok(Some(at.saturating_duration_since(t0)));
        }
        if t0.elapsed() > timeout {
            return Ok(None);
        }
        let due = |i: usize| {
            ok[i].is_none()
                && tried[i].is_none_or(|(g, at)| {
                    g != watch.gens[i] || at.elapsed() >= Duration::from_millis(200)
                })
        };
        let pick = (0..n).map(|j| (next + j) % n).find(|&i| due(i));
        match pick {
            Some(i) if watch.nodes_ok_since.is_some() => {
                next = (i + 1) % n;
                let key = watch.keys[i];
                let r = check(kv, &key, &mut buf, watch)?;
                match r {
                    Some((g, true)) if g == watch.gens[i] => ok[i] = Some((g, watch.since[i])),
                    Some((g, _)) => tried[i] = Some((g, Instant::now())),
                    None => {}
                }
            }
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// One TCP server per node namespace on `0.0.0.0:port`: for each connection it reads a
/// request line, answers with its node id and a newline, and closes.
pub struct TcpServers {
    stop: Arc<AtomicBool>,
    /// Duplicates of the listening sockets: `shutdown` on one wakes its blocked `accept`.
    listeners: Vec<OwnedFd>,
    handles: Vec<JoinHandle<Result<u64>>>,
}

impl TcpServers {
    /// `nodes`: (namespace, node id).
    pub fn start(nodes: &[(&Netns, u32)], port: u16) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut listeners = Vec::new();
        let mut handles = Vec::new();
        for &(ns, id) in nodes {
            let (tx, rx) = mpsc::channel();
            let stop2 = stop.clone();
            handles.push(ns.spawn(move || {
                let l = TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
                let _ = tx.send(l.try_clone().map(OwnedFd::from));
                let reply = format!("{id}\n");
                let mut served = 0u64;
                loop {
                    match l.accept() {
                        Ok((s, _)) => {
                            if serve(s, reply.as_bytes()).is_ok() {
                                served += 1;
                            }
                        }
                        Err(_) if stop2.load(Ordering::Relaxed) => return Ok(served),
                        Err(e) => eprintln!("[server {id}] accept: {e}"),
                    }
                }
            }));
            let fd = rx
                .recv_timeout(Duration::from_secs(5))
                .context("TCP server did not start")??;
            listeners.push(fd);
        }
        Ok(Self {
            stop,
            listeners,
            handles,
        })
    }

    /// Stops the servers; returns the connections each served.
    pub fn finish(mut self) -> Result<Vec<u64>> {
        self.shutdown();
        self.handles
            .drain(..)
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("server thread panicked"))?
            })
            .collect()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for fd in &self.listeners {
            // SAFETY: shutdown(2) on a socket fd we own.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

impl Drop for TcpServers {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve(mut s: TcpStream, reply: &[u8]) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_nodelay(true)?;
    let mut buf = [0u8; 256];
    let mut got = 0;
    while !buf[..got].contains(&b'\n') {
        if got == buf.len() {
            return Err(std::io::Error::other("request line too long"));
        }
        let n = s.read(&mut buf[got..])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    s.write_all(reply)
}

/// What a [`TcpLoad`] saw.
#[derive(Debug, Default, Clone)]
pub struct LoadStats {
    pub attempts: u64,
    pub ok: u64,
    pub failed: u64,
    /// Successful connections that took over 500 ms (a retransmitted SYN or segment).
    pub slow: u64,
    /// Answers per node id.
    pub per_node: BTreeMap<u32, u64>,
    /// Failures per kind.
    pub failures: BTreeMap<String, u64>,
    /// The first few failures: (time since the load started, VIP, error).
    pub first_failures: Vec<(Duration, Ipv4Addr, String)>,
    pub elapsed: Duration,
}

impl LoadStats {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn merge(&mut self, o: LoadStats) {
        self.attempts += o.attempts;
        self.ok += o.ok;
        self.failed += o.failed;
        self.slow += o.slow;
        for (k, v) in o.per_node {
            *self.per_node.entry(k).or_insert(0) += v;
        }
        for (k, v) in o.failures {
            *self.failures.entry(k).or_insert(0) += v;
        }
        self.first_failures.extend(o.first_failures);
        self.first_failures.sort_by_key(|f| f.0);
        self.first_failures.truncate(10);
    }

    /// One line: rate, failures, spread over nodes.
    pub fn summary(&self) -> String {
        let min = self.per_node.values().min().copied().unwrap_or(0);
        let max = self.per_node.values().max().copied().unwrap_or(0);
        format!(
            "{} attempts, {} ok, {} failed ({:.3}%), {} slow (>500 ms) in {:.1} s = {:.0} conn/s; {} nodes answered, {min}..{max} each; failures {:?}",
            self.attempts,
            self.ok,
            self.failed,
            100.0 * self.failed as f64 / self.attempts.max(1) as f64,
            self.slow,
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.per_node.len(),
            self.failures,
        )
    }
}

/// Client threads opening short TCP connections to random VIPs as fast as they can: connect,
/// send a line, read the answer (a node id) to the end, close.
pub struct TcpLoad {
    stop: Arc<AtomicBool>,
    /// Connections answered so far, all threads (progress, while it runs).
    answered: Arc<AtomicU64>,
    handles: Vec<JoinHandle<Result<LoadStats>>>,
    started: Instant,
}

impl TcpLoad {
    pub fn start(ns: &Netns, vips: &[Ipv4Addr], port: u16, threads: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let handles = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                let answered = answered.clone();
                let vips = vips.to_vec();
                ns.spawn(move || {
                    let mut st = LoadStats::default();
                    let mut rng = rand::thread_rng();
                    while !stop.load(Ordering::Relaxed) {
                        let vip = vips[rng.gen_range(0..vips.len())];
                        st.attempts += 1;
                        let t = Instant::now();
                        match one_connection(vip, port) {
                            Ok(node) => {
                                st.ok += 1;
                                answered.fetch_add(1, Ordering::Relaxed);
                                if t.elapsed() > Duration::from_millis(500) {
                                    st.slow += 1;
                                }
                                *st.per_node.entry(node).or_insert(0) += 1;
                            }
                            Err((kind, e)) => {
                                st.failed += 1;
                                *st.failures.entry(kind.into()).or_insert(0) += 1;
                                if st.first_failures.len() < 10 {
                                    st.first_failures.push((started.elapsed(), vip, e));
                                }
                            }
                        }
                    }
                    Ok(st)
                })
            })
            .collect();
        Self {
            stop,
            answered,
            handles,
            started,
        }
    }

    /// Connections answered so far.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Waits until `n` more connections than `from` have been answered; false if `timeout`
    /// passes first.
    pub fn wait_answered(&self, from: u64, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.answered() < from + n {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Stops the threads and sums what they saw.
    pub fn finish(mut self) -> Result<LoadStats> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = LoadStats::default();
        for h in self.handles.drain(..) {
            all.merge(
                h.join()
                    .map_err(|_| anyhow::anyhow!("load thread panicked"))??,
            );
        }
        all.elapsed = self.started.elapsed();
        Ok(all)
    }
}

impl Drop for TcpLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One request; on failure (kind, message).
fn one_connection(vip: Ipv4Addr, port: u16) -> std::result::Result<u32, (&'static str, String)> {
    let timeout = Duration::from_secs(3);
    let mut s = TcpStream::connect_timeout(&SocketAddr::from((vip, port)), timeout)
        .map_err(|e| (io_kind("connect", &e), format!("connect: {e}")))?;
    let io = |e: std::io::Error| (io_kind("io", &e), format!("exchange: {e}"));
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    s.set_nodelay(true).map_err(io)?;
    s.write_all(b"hello\n").map_err(io)?;
    let mut buf = Vec::with_capacity(16);
    s.read_to_end(&mut buf).map_err(io)?;
    let text = String::from_utf8_lossy(&buf);
    text.trim()
        .parse()
        .map_err(|_| ("bad reply", format!("reply {text:?}")))
}

fn io_kind(phase: &'static str, e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind as K;
    match (phase, e.kind()) {
        ("connect", K::TimedOut | K::WouldBlock) => "connect timeout",
        ("connect", K::ConnectionRefused) => "connect refused",
        ("connect", K::ConnectionReset) => "connect reset",
        ("connect", _) => "connect other",
        (_, K::TimedOut | K::WouldBlock) => "read/write timeout",
        (_, K::ConnectionReset) => "reset",
        (_, K::BrokenPipe) => "broken pipe",
        _ => "io other",
    }
}

/// Membership events named `event` (e.g. `NodeDown`) in log lines: the node id of each (the
/// first number after "node" following the event name; `None` when there is none).
pub fn events(lines: &[String], event: &str) -> Vec<Option<u32>> {
    lines
        .iter()
        .filter_map(|l| {
            let rest = &l[l.find(event)? + event.len()..];
            let after = rest.find("node").map(|i| &rest[i + 4..]);
            Some(after.and_then(|a| {
                let digits: String = a
                    .chars()
                    .skip_while(|c| !c.is_ascii_digit())
                    .take_while(char::is_ascii_digit)
                    .collect();
                digits.parse().ok()
            }))
        })
        .collect()
}

/// Problems found by a test, grouped by kind: every kind is reported with its count and first
/// few instances, so one run lists everything that went wrong without drowning in repeats.
#[derive(Default)]
pub struct Problems {
    kinds: Vec<(String, u64, Vec<String>)>,
}

impl Problems {
    pub fn add(&mut self, kind: &str, detail: String) {
        match self.kinds.iter_mut().find(|k| k.0 == kind) {
            Some(k) => {
                k.1 += 1;
                if k.2.len() < 3 {
                    k.2.push(detail);
                }
            }
            None => self.kinds.push((kind.into(), 1, vec![detail])),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }

    pub fn report(&self) -> String {
        self.kinds
            .iter()
            .map(|(kind, n, first)| format!("{kind} (x{n}): {}", first.join(" | ")))
            .collect::<Vec<_>>()
            .join("\n  ")
    }
}
