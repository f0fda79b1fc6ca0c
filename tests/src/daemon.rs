//! Running the real `lb` binary (daemon and agents) inside lab namespaces.
use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_common::{RouteEntry, VipKey};
use lb_userspace::dataplane::{PinnedView, vip_key};

use crate::netns::{ChildGuard, Lab, Netns, mac_str};

/// The `lb` binary built next to this test (`target/<profile>/lb`).
pub fn lb_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .context("test binary has no parent directory")?;
    let lb = dir.join("lb");
    if !lb.exists() {
        bail!(
            "{} is missing: build it first (`cargo build --release -p lb-userspace`; `cargo xtask test` does)",
            lb.display()
        );
    }
    Ok(lb)
}

/// Removes a bpffs pin directory (maps and the XDP link) on drop.
pub struct PinGuard(pub PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test daemon instance's API socket and lock file (`/run/lb/<instance>.{sock,lock}`),
/// removed on drop: a daemon stopped with SIGKILL cannot remove them itself, and test
/// instances have unique names, so they would pile up.
pub struct RunFiles(pub String);

impl Drop for RunFiles {
    fn drop(&mut self) {
        let sock = lb_userspace::api::default_socket(&self.0);
        if let Some(dir) = sock.parent() {
            let _ = std::fs::remove_file(dir.join(format!("{}.lock", self.0)));
        }
        let _ = std::fs::remove_file(&sock);
    }
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        let d = std::env::temp_dir().join(format!("lb-{tag}-{}", crate::netns::unique_prefix()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d)?;
        Ok(Self(d))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The heartbeat port the lab daemon listens on.
pub const HB_PORT: u16 = 7711;

/// What a lab daemon's configuration holds.
struct Spec<'a> {
    listen: Ipv4Addr,
    vips: &'a [Ipv4Addr],
    port: u16,
    proto: &'a str,
    routes: u32,
    conntrack_size: u32,
}

/// A lab daemon's files and names.
pub struct DaemonSetup {
    pub instance: String,
    pub dir: TempDir,
    pub config: PathBuf,
    pub key: PathBuf,
    pub state_dir: PathBuf,
    pub pins: PinGuard,
    pub run_files: RunFiles,
}

impl DaemonSetup {
    /// Writes a config for a dsr-l2 VIP `vip:port/proto` with `routes` route IDs over all lab
    /// nodes (ids 1..), heartbeat-checked. `extra_daemon` is appended to `[daemon]`.
    pub fn dsr(
        lab: &Lab,
        vip: Ipv4Addr,
        port: u16,
        proto: &str,
        routes: u32,
        extra_daemon: &str,
    ) -> Result<Self> {
        Self::dsr_many(lab, &[vip], port, proto, routes, 65536, extra_daemon)
    }

    /// [`DaemonSetup::dsr`] for several dsr-l2 VIPs `vips[i]:port/proto`, each with `routes`
    /// route IDs; `route_slots` fits two generations of every VIP, `conntrack_size` as given.
    pub fn dsr_many(
        lab: &Lab,
        vips: &[Ipv4Addr],
        port: u16,
        proto: &str,
        routes: u32,
        conntrack_size: u32,
        extra_daemon: &str,
    ) -> Result<Self> {
        let instance = format!("lbt{}", lab.prefix);
        let spec = Spec {
            listen: lab.lb.ip,
            vips,
            port,
            proto,
            routes,
            conntrack_size,
        };
        Self::build(lab, instance, &spec, extra_daemon, "")
    }

    /// One balancer `id` of a cluster (`[cluster]` section `cluster`), on lab host `host`:
    /// [`DaemonSetup::dsr_many`]'s VIPs and nodes, its own instance, heartbeats on its address.
    pub fn cluster_member(
        lab: &Lab,
        host: &crate::netns::Host,
        id: &str,
        vips: &[Ipv4Addr],
        routes: u32,
        cluster: &str,
    ) -> Result<Self> {
        let spec = Spec {
            listen: host.ip,
            vips,
            port: 7,
            proto: "tcp",
            routes,
            conntrack_size: 65536,
        };
        Self::build(lab, format!("lbt{}{id}", lab.prefix), &spec, "", cluster)
    }

    fn build(
        lab: &Lab,
        instance: String,
        spec: &Spec<'_>,
        extra_daemon: &str,
        tail: &str,
    ) -> Result<Self> {
        let Spec {
            listen: listen_ip,
            vips,
            port,
            proto,
            routes,
            conntrack_size,
        } = *spec;
        let dir = TempDir::new("daemon")?;
        let key = dir.0.join("key");
        std::fs::write(
            &key,
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
        )?;
        // `extra_daemon` may choose its own heartbeat address (e.g. for multicast).
        let listen = if extra_daemon.contains("heartbeat_listen") {
            String::new()
        } else {
            format!("heartbeat_listen = \"{listen_ip}:{HB_PORT}\"\n")
        };
        let slots = (2 * routes as u64 * vips.len() as u64).max(4096);
        let mut cfg = format!(
            "[daemon]\ninstance = \"{instance}\"\n{listen}key_file = \"{}\"\nxdp_mode = \"generic\"\nroute_slots = {slots}\nconntrack_size = {conntrack_size}\n{extra_daemon}\n",
            key.display(),
        );
        for vip in vips {
            cfg.push_str(&format!(
                "\n[[vip]]\naddr = \"{vip}\"\nport = {port}\nproto = \"{proto}\"\nroutes = {routes}\n"
            ));
        }
        for (i, n) in lab.nodes.iter().enumerate() {
            cfg.push_str(&format!(
                "\n[[node]]\nid = {}\nmac = \"{}\"\nipv4 = \"{}\"\n",
                i + 1,
                mac_str(&n.mac),
                n.ip
            ));
        }
        cfg.push_str(tail);
        let config = dir.0.join("lb.toml");
        std::fs::write(&config, cfg)?;
        let state_dir = dir.0.join("state");
        Ok(Self {
            pins: PinGuard(PathBuf::from("/sys/fs/bpf").join(&instance)),
            run_files: RunFiles(instance.clone()),
            instance,
            config,
            key,
            state_dir,
            dir,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pins.0
    }

    /// The daemon's control API socket (the default for its instance).
    pub fn socket(&self) -> PathBuf {
        lb_userspace::api::default_socket(&self.instance)
    }

    /// Runs the `lb` CLI against this daemon (`--socket` set), returning its output whatever
    /// its exit status.
    pub fn cli(&self, args: &[&str]) -> Result<std::process::Output> {
        std::process::Command::new(lb_binary()?)
            .args(args)
            .arg("--socket")
            .arg(self.socket())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running lb {}", args.join(" ")))
    }

    /// [`DaemonSetup::cli`] that must succeed; returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!(
                "lb {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Node `id` as `lb node list --json` shows it.
    pub fn node_json(&self, id: u32) -> Result<serde_json::Value> {
        self.cli_json(&["node", "list"])?
            .as_array()
            .and_then(|a| a.iter().find(|n| n["id"] == id).cloned())
            .with_context(|| format!("node {id} is not listed"))
    }

    /// [`DaemonSetup::cli_ok`] with `--json`, parsed.
    pub fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli_ok(&a)?;
        serde_json::from_str(&out)
            .with_context(|| format!("lb {} --json printed {out:?}", args.join(" ")))
    }

    /// Starts `lb run` in the balancer namespace and waits until it says it is ready.
    pub fn start(&self, lab: &Lab, extra: &[&str]) -> Result<ChildGuard> {
        self.start_inner(lab, extra, None)
    }

    /// [`DaemonSetup::start`] that also captures the daemon's stdout and stderr lines (its log)
    /// into the returned list, in arrival order, still echoing them prefixed `[daemon]`.
    pub fn start_captured(&self, lab: &Lab, extra: &[&str]) -> Result<(ChildGuard, LogLines)> {
        let log = LogLines::default();
        let child = self.start_inner(lab, extra, Some(log.clone()))?;
        Ok((child, log))
    }

    fn start_inner(&self, lab: &Lab, extra: &[&str], log: Option<LogLines>) -> Result<ChildGuard> {
        self.start_in(&lab.lb, extra, log)
    }

    /// `lb run` on lab host `host` (a cluster member's), its log captured.
    pub fn start_on(
        &self,
        host: &crate::netns::Host,
        extra: &[&str],
    ) -> Result<(ChildGuard, LogLines)> {
        let log = LogLines::default();
        let child = self.start_in(host, extra, Some(log.clone()))?;
        Ok((child, log))
    }

    fn start_in(
        &self,
        host: &crate::netns::Host,
        extra: &[&str],
        log: Option<LogLines>,
    ) -> Result<ChildGuard> {
        let lb = lb_binary()?;
        let mut cmd = host.ns.command(&lb.to_string_lossy());
        cmd.args(["run", "--iface", &host.ifname, "--config"])
            .arg(&self.config)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if log.is_some() {
                Stdio::piped()
            } else {
                Stdio::inherit()
            });
        let mut child = cmd.spawn().context("starting lb run")?;
        let stdout = child.stdout.take().context("daemon stdout")?;
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                    eprintln!("[daemon] {line}");
                    if let Some(log) = &log {
                        log.push(line);
                    }
                }
            });
        }
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                eprintln!("[daemon] {line}");
                if line.contains("lb: ready") {
                    let _ = tx.send(());
                }
                if let Some(log) = &log {
                    log.push(line);
                }
            }
        });
        let mut guard = ChildGuard(Some(child));
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(()) => Ok(guard),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = guard.0.as_mut().and_then(|c| c.wait().ok());
                bail!("daemon exited before it was ready ({status:?}); its stderr is above")
            }
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("daemon did not become ready in 30 s"),
        }
    }

    /// Starts an agent for node `id` (1-based) inside that node's namespace.
    pub fn agent(&self, lab: &Lab, id: u32, interval: &str) -> Result<ChildGuard> {
        self.agent_with(lab, id, interval, &[])
    }

    /// [`DaemonSetup::agent`] with extra `lb agent` arguments.
    pub fn agent_with(
        &self,
        lab: &Lab,
        id: u32,
        interval: &str,
        extra: &[&str],
    ) -> Result<ChildGuard> {
        self.spawn_agent(lab, id, interval, &[lab.lb.ip], extra)
    }

    /// An agent for node `id` beating to every balancer in `balancers`.
    pub fn agent_to(
        &self,
        lab: &Lab,
        id: u32,
        interval: &str,
        balancers: &[Ipv4Addr],
    ) -> Result<ChildGuard> {
        self.spawn_agent(lab, id, interval, balancers, &[])
    }

    fn spawn_agent(
        &self,
        lab: &Lab,
        id: u32,
        interval: &str,
        balancers: &[Ipv4Addr],
        extra: &[&str],
    ) -> Result<ChildGuard> {
        let to: Vec<String> = balancers.iter().map(|b| format!("{b}:{HB_PORT}")).collect();
        let lb = lb_binary()?;
        let child = lab.nodes[(id - 1) as usize]
            .ns
            .command(&lb.to_string_lossy())
            .args(["agent", "--node-id", &id.to_string(), "--balancer"])
            .arg(to.join(","))
            .arg("--key-file")
            .arg(&self.key)
            .args(["--interval", interval])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting lb agent")?;
        Ok(ChildGuard(Some(child)))
    }

    /// An agent claiming node `id` run in namespace `ns` (any lab host), with its log (info
    /// and up) captured into the returned lines and echoed prefixed `[agent ID]`.
    pub fn agent_captured(
        &self,
        lab: &Lab,
        ns: &Netns,
        id: u32,
        extra: &[&str],
    ) -> Result<(ChildGuard, LogLines)> {
        let lb = lb_binary()?;
        let mut child = ns
            .command(&lb.to_string_lossy())
            .args(["agent", "--node-id", &id.to_string(), "--balancer"])
            .arg(format!("{}:{HB_PORT}", lab.lb.ip))
            .arg("--key-file")
            .arg(&self.key)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting lb agent")?;
        let log = LogLines::default();
        let stderr = child.stderr.take().context("agent stderr")?;
        let l2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                eprintln!("[agent {id}] {line}");
                l2.push(line);
            }
        });
        Ok((ChildGuard(Some(child)), log))
    }

    /// `lb status --json`, parsed.
    pub fn status(&self) -> Result<serde_json::Value> {
        self.cli_json(&["status"])
    }

    /// The live route table of a VIP as the kernel sees it.
    pub fn routes(&self, key: &VipKey) -> Result<Vec<RouteEntry>> {
        Ok(PinnedView::open(self.pin_dir())?.routes(key)?)
    }

    /// The flow-hash seed the kernel's copy of `key` carries.
    pub fn hash_seed(&self, key: &VipKey) -> Result<u32> {
        Ok(PinnedView::open(self.pin_dir())?.meta(key)?.hash_seed)
    }

    /// Waits until `pred(routes)` holds, returning how long it took.
    pub fn wait_routes(
        &self,
        key: &VipKey,
        timeout: Duration,
        pred: impl Fn(&[RouteEntry]) -> bool,
    ) -> Result<Duration> {
        let start = Instant::now();
        let view = PinnedView::open(self.pin_dir())?;
        loop {
            if let Ok(r) = view.routes(key)
                && pred(&r)
            {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!("route table condition not met within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// A daemon's captured output lines (see [`DaemonSetup::start_captured`]), shared with the
/// threads reading its pipes.
#[derive(Clone, Default)]
pub struct LogLines(Arc<Mutex<Vec<String>>>);

impl LogLines {
    fn push(&self, line: String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }

    /// Lines so far.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Lines from index `from` on (a phase's lines: take `len()` at its start).
    pub fn since(&self, from: usize) -> Vec<String> {
        let v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        v.get(from..).map(<[String]>::to_vec).unwrap_or_default()
    }
}

/// Seconds into the day of a daemon log line's RFC 3339 timestamp
/// (`2026-12-02T00:39:17.558513Z  WARN ...`): when the daemon wrote it, whenever the test got
/// to read it. Differences across midnight need `rem_euclid(86400.0)`.
pub fn log_seconds(line: &str) -> Option<f64> {
    let t = line.split_whitespace().next()?.split_once('T')?.1;
    let t = t.strip_suffix('Z')?;
    let mut it = t.split(':');
    let (h, m, sec) = (it.next()?, it.next()?, it.next()?);
    Some(
        h.parse::<f64>().ok()? * 3600.0
            + m.parse::<f64>().ok()? * 60.0
            + sec.parse::<f64>().ok()?,
    )
}

pub fn udp_vip(vip: Ipv4Addr, port: u16) -> VipKey {
    vip_key(vip.into(), port, lb_common::PROTO_UDP)
}

/// A datagram's tag: (flow, sequence number).
pub type Tag = (u32, u32);

/// Counts datagrams (tagged `flow:u32, seq:u32`) that reach a node's UDP port.
pub struct UdpSink {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicUsize>,
    handle: Option<std::thread::JoinHandle<Result<Vec<Tag>>>>,
}

impl UdpSink {
    pub fn start(ns: &Netns, port: u16) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let received = Arc::new(AtomicUsize::new(0));
        let r2 = received.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let handle = ns.spawn(move || {
            let sock = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
            sock.set_read_timeout(Some(Duration::from_millis(50)))?;
            // Room for seconds of test traffic: on a busy machine this thread may not run for
            // a while, and a full socket queue would count as datagrams the balancer lost.
            force_rcvbuf(&sock, 16 << 20)?;
            let _ = ready_tx.send(());
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while !s2.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf)
                    && n >= 8
                {
                    let flow = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                    let seq = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
                    got.push((flow, seq));
                    r2.store(got.len(), Ordering::Relaxed);
                }
            }
            Ok(got)
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("UDP sink did not start")?;
        Ok(Self {
            stop,
            received,
            handle: Some(handle),
        })
    }

    /// Datagrams received so far.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }

    /// Stops and returns what arrived.
    pub fn finish(mut self) -> Result<Vec<(u32, u32)>> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take() {
            Some(h) => h
                .join()
                .map_err(|_| anyhow::anyhow!("sink thread panicked"))?,
            None => Ok(Vec::new()),
        }
    }
}

/// Sets a socket's receive buffer to `bytes` past `net.core.rmem_max` (`SO_RCVBUFFORCE`; root).
fn force_rcvbuf(sock: &UdpSocket, bytes: libc::c_int) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: setsockopt(2) on a socket we own, with a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const bytes).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Datagrams received by all of `sinks` together.
pub fn received(sinks: &[&UdpSink]) -> usize {
    sinks.iter().map(|s| s.received()).sum()
}

/// Waits until `sinks` together have received at least `n` datagrams, or `timeout` passes;
/// returns how many they have. Deciding whether that is right is the caller's (e.g.
/// [`assert_delivered`] on what the sinks return when finished).
pub fn wait_received(sinks: &[&UdpSink], n: usize, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let got = received(sinks);
        if got >= n || Instant::now() >= deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends `count` datagrams per flow from the client namespace to `vip:port`, one flow per
/// source port, `gap` apart (round-robin over flows). Returns the (flow, seq) pairs sent.
pub fn send_udp(
    ns: &str,
    vip: Ipv4Addr,
    port: u16,
    flows: u32,
    count: u32,
    gap: Duration,
) -> Result<Vec<(u32, u32)>> {
    let stop = Arc::new(AtomicBool::new(false));
    let h = crate::netns::spawn_in(ns, move || send_rounds(vip, port, flows, count, gap, &stop));
    h.join()
        .map_err(|_| anyhow::anyhow!("sender thread panicked"))?
}

/// [`send_udp`] until stopped: rounds of one datagram per flow, `gap` apart, from a thread in
/// the client namespace, for as long as the test needs traffic (e.g. through a daemon restart
/// however long that takes on a busy machine).
pub struct UdpSender {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Result<Vec<Tag>>>>,
}

impl UdpSender {
    pub fn start(ns: &str, vip: Ipv4Addr, port: u16, flows: u32, gap: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let handle = crate::netns::spawn_in(ns, move || {
            send_rounds(vip, port, flows, u32::MAX, gap, &s2)
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops after the current round; returns the (flow, seq) pairs sent.
    pub fn stop(mut self) -> Result<Vec<Tag>> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take() {
            Some(h) => h
                .join()
                .map_err(|_| anyhow::anyhow!("sender thread panicked"))?,
            None => Ok(Vec::new()),
        }
    }
}

impl Drop for UdpSender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Up to `count` rounds (fewer if `stop` is set) of one datagram per flow, `gap` apart.
fn send_rounds(
    vip: Ipv4Addr,
    port: u16,
    flows: u32,
    count: u32,
    gap: Duration,
    stop: &AtomicBool,
) -> Result<Vec<Tag>> {
    let socks: Vec<UdpSocket> = (0..flows)
        .map(|_| {
            let s = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))?;
            s.connect(SocketAddr::from((vip, port)))?;
            Ok(s)
        })
        .collect::<Result<_>>()?;
    let mut sent = Vec::new();
    for seq in 0..count {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        for (flow, s) in socks.iter().enumerate() {
            let mut msg = [0u8; 64];
            msg[..4].copy_from_slice(&(flow as u32).to_be_bytes());
            msg[4..8].copy_from_slice(&seq.to_be_bytes());
            s.send(&msg)?;
            sent.push((flow as u32, seq));
        }
        std::thread::sleep(gap);
    }
    Ok(sent)
}

/// Asserts that `got` holds exactly the datagrams in `sent` (any order), with a short report.
pub fn assert_delivered(mut got: Vec<(u32, u32)>, mut sent: Vec<(u32, u32)>, what: &str) {
    got.sort_unstable();
    sent.sort_unstable();
    if got == sent {
        return;
    }
    let missing: Vec<_> = sent
        .iter()
        .filter(|p| got.binary_search(p).is_err())
        .collect();
    let extra = got.len() as i64 - (sent.len() - missing.len()) as i64;
    panic!(
        "{what}: {} of {} datagrams missing (first: {:?}), {extra} duplicates/extra",
        missing.len(),
        sent.len(),
        &missing[..missing.len().min(5)]
    );
}

/// Datagrams sent as fast as a few threads can from a namespace (`sendmmsg`, 64 a call), round
/// robin over `payloads`, until stopped: a flood.
pub struct Flood {
    stop: Arc<AtomicBool>,
    sent: Arc<std::sync::atomic::AtomicU64>,
    handles: Vec<std::thread::JoinHandle<Result<()>>>,
}

impl Flood {
    /// `threads` senders in namespace `ns` to `to`, from one socket each.
    pub fn start(ns: &str, to: SocketAddr, payloads: Vec<Vec<u8>>, threads: usize) -> Self {
        let mut f = Self {
            stop: Arc::new(AtomicBool::new(false)),
            sent: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            handles: Vec::new(),
        };
        f.add(ns, to, payloads, threads);
        f
    }

    /// `threads` more senders.
    pub fn add(&mut self, ns: &str, to: SocketAddr, payloads: Vec<Vec<u8>>, threads: usize) {
        for _ in 0..threads {
            let (stop, sent, payloads) = (self.stop.clone(), self.sent.clone(), payloads.clone());
            self.handles.push(crate::netns::spawn_in(ns, move || {
                flood(to, &payloads, &stop, &sent)
            }));
        }
    }

    /// Datagrams sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops the senders; returns the datagrams sent.
    pub fn stop(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            h.join()
                .map_err(|_| anyhow::anyhow!("flood thread panicked"))??;
        }
        Ok(self.sent())
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn flood(
    to: SocketAddr,
    payloads: &[Vec<u8>],
    stop: &AtomicBool,
    sent: &std::sync::atomic::AtomicU64,
) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    const BATCH: usize = 64;
    let sock = UdpSocket::bind(if to.is_ipv4() {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    })?;
    sock.connect(to)?;
    let mut iovs: Vec<libc::iovec> = (0..BATCH)
        .map(|i| {
            let p = &payloads[i % payloads.len()];
            libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            }
        })
        .collect();
    // SAFETY: mmsghdr is plain data; every field is set below.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `msgs` points at `BATCH` headers whose iovecs point into `payloads`, all
        // alive for the call; the socket is connected, so no addresses are needed.
        let n = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                0,
            )
        };
        if n > 0 {
            sent.fetch_add(n as u64, Ordering::Relaxed);
        } else {
            // ECONNREFUSED from an ICMP error, ENOBUFS: keep flooding.
            std::thread::yield_now();
        }
    }
    Ok(())
}
