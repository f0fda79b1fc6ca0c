//! `lb run`: the balancer daemon, a thin tokio shell around the [`Controller`].
//!
//! Start-up: config, persisted state, the data plane (re-adopting pinned maps: what the kernel
//! holds wins over an older state file), the controller's full plan pushed, then the XDP program
//! attached, or swapped into the link pinned by an earlier run, so traffic never sees a gap.
//!
//! The loop, on one thread: whatever wakes it (a heartbeat, a health-check result, a deadline,
//! a conntrack-scan result), it first reads every queued heartbeat, each judged by the time the
//! kernel received it, then applies everything pending as one batch and executes the
//! controller's plan. Persisting runs on its own thread (coalesced: the latest state wins) and
//! the conntrack scan on a blocking task, so neither the disk nor a scan of a million flows ever
//! delays failure detection. SIGTERM leaves the program attached and forwarding (pinned);
//! `--detach-on-exit` removes it.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd, RawFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{
    XdpMode,
    links::{FdLink, PinnedLink},
};
use lb_common::{
    CT_CLOSE_QUIET, CT_F_FIN, CT_F_KEEP, CT_F_RST, FlowKey, GlobalConfig, MAX_NODES, NODE_NONE,
    NodeEntry, VipKey,
};
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind, sync::mpsc};
use tracing::{error, info, warn};

mod clustered;
mod ops;

use crate::{
    api,
    config::{self, Config, XdpModeSetting},
    conntrack::CtTable,
    controller::{Adopted, AdoptedVip, Controller, Input, Plan, RouteSet, Step},
    dataplane::{self, Dataplane, DataplaneOptions, HashMode},
    health,
    heartbeat::{self, Key, Received, Receiver},
    membership::{self, Event, Membership},
    offload::{self, Feature},
    persist::Persister,
    replica::Pin,
    routes::{NodeState, RouteTable},
    running,
    server::{self, Call, Server},
    state::{self, State},
};

/// How often conntrack is scanned (only while some route is flagged "moved").
const MAINTENANCE_PERIOD: Duration = Duration::from_secs(2);
/// A rejected heartbeat is warned about at most this often per node and reason.
const REJECT_WARN_PERIOD: Duration = Duration::from_secs(10);
/// A batch slower than this is reported (it delays the next heartbeats' processing, though
/// not their judgement: they are judged by their arrival time).
const SLOW_BATCH: Duration = Duration::from_millis(50);
/// A node shows a second agent claiming it (`duplicate_agent`) this long after its last
/// heartbeat.
const DUPLICATE_SHOWN: Duration = Duration::from_secs(10);
/// How long shutdown waits for the last state to reach the disk.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Arguments of `lb run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Network interface to attach the balancer to.
    #[arg(long)]
    pub iface: String,
    /// Configuration file (TOML).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where the state file lives (default /var/lib/lb/<instance>).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Start with empty state even if a state file exists (it is overwritten).
    #[arg(long)]
    pub reset_state: bool,
    /// Detach the program and remove the pinned maps on exit (default: keep forwarding).
    #[arg(long)]
    pub detach_on_exit: bool,
    /// bpffs directory under which `<instance>/` is created.
    #[arg(long, default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
}

/// `lb run`: start, then run until SIGTERM/SIGINT.
pub fn run(args: RunArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let d = Daemon::start(args)?;
        d.run().await
    })
}

/// The running daemon.
pub struct Daemon {
    cfg: Config,
    dp: Dataplane,
    ctl: Controller,
    membership: Membership,
    receiver: Option<Receiver>,
    /// Where each node's agent sends from (route-moved notices go there).
    agents: BTreeMap<u32, SocketAddr>,
    health_tx: mpsc::UnboundedSender<(u32, Event)>,
    health_rx: mpsc::UnboundedReceiver<(u32, Event)>,
    /// Active health checks by node, with the settings they run with (dropping one stops it).
    checks: BTreeMap<u32, (String, health::HealthChecker)>,
    persister: Persister,
    pin_dir: PathBuf,
    link: Option<PinnedLink>,
    args: RunArgs,
    /// A plan step failed: the next round writes everything again.
    resync: bool,
    /// Last warning per (node, reason), for rate limiting.
    warned: BTreeMap<(u32, &'static str), Instant>,
    /// This instance's lock, held while the daemon runs.
    _lock: nix::fcntl::Flock<std::fs::File>,
    started: Instant,
    state_dir: PathBuf,
    /// SHA-256 of the `--config` file the running configuration derives from.
    source_sha256: Option<String>,
    /// `native` or `generic` (or `unknown` for a link re-adopted without a record of it).
    xdp_mode: String,
    /// Receive offloads this daemon (or an earlier run on the same link) turned off for
    /// generic mode; turned on again when the program is detached.
    offloads_off: Vec<Feature>,
    /// The MAC of the interface the program runs on (no node may have it).
    own_mac: Option<[u8; 6]>,
    program_id: Option<u32>,
    /// What the last conntrack scan counted.
    ct: ops::CtCounts,
    /// Bumped by every configuration change; a scan records the value it started at.
    change_seq: u64,
    /// Conntrack scans completed.
    ct_scans: u64,
    /// Routes moved since start, by reason.
    route_moves: BTreeMap<&'static str, u64>,
    /// VIPs warned about having no active node (until one is active again).
    unserved: BTreeSet<VipKey>,
    /// Times a VIP lost its last active node.
    unserved_episodes: u64,
    /// API requests (the servers' side of the channel).
    api: Option<mpsc::Receiver<Call>>,
    /// The API and metrics servers (stopped when dropped).
    servers: Vec<Server>,
    /// The task moving the program's event records into the log.
    _events: Option<Server>,
    /// Cluster mode (`[cluster]`): the etcd session and what the loop knows of the others.
    cluster: Option<clustered::Link>,
    /// `[bgp]`: the VIPs announced through bird2, when a failed announcement is tried again,
    /// and whether bird was told anything yet (at start its file may hold an earlier run's set).
    bgp: Option<(crate::announce::Announcer, Option<Instant>, bool)>,
}

impl Daemon {
    /// Everything up to and including attaching; does not run the loop.
    pub fn start(args: RunArgs) -> Result<Self> {
        // Fail before touching anything if the interface does not exist.
        nix::net::if_::if_nametoindex(args.iface.as_str()).map_err(|_| {
            anyhow::anyhow!(
                "interface {:?} does not exist (ip link shows the names)",
                args.iface
            )
        })?;
        let file = match &args.config {
            Some(p) => {
                let (cfg, digest) = load_config(p)?;
                Some((cfg, digest))
            }
            None => None,
        };
        let instance = file.as_ref().map_or_else(
            || Config::default().daemon.instance,
            |(c, _)| c.daemon.instance.clone(),
        );
        // Before anything is touched: two daemons on one instance would fight over its maps.
        let lock = lock_instance(&instance)?;
        let state_dir = args
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/lb").join(&instance));
        let saved = if args.reset_state {
            None
        } else {
            running::load(&state_dir)?
        };
        let saved_mode = saved.as_ref().and_then(|r| r.xdp_mode.clone());
        let saved_offloads: Vec<Feature> = saved
            .as_ref()
            .map(|r| {
                r.offloads_off
                    .iter()
                    .filter_map(|n| Feature::from_name(n))
                    .collect()
            })
            .unwrap_or_default();
        let file_daemon = file.as_ref().map(|(c, _)| c.daemon.clone());
        let (mut cfg, source_sha256, note) = running::choose(file, saved);
        // Restart-only settings come from the file at every start (at runtime they keep their
        // running value; a restart is when they change).
        if let Some(d) = file_daemon {
            ops::keep_restart_only(&d, &mut cfg.daemon);
        }
        if let Some(note) = note {
            warn!("{note}");
        }
        let own_mac = iface_mac(&args.iface);
        if let Some(mac) = own_mac {
            cfg.check_own_mac(mac).context("invalid config")?;
        }
        if args.config.is_none() && cfg.nodes.is_empty() && cfg.vips.is_empty() {
            warn!("no --config given: starting with no VIPs and no nodes (add them with `lb`)");
        }
        ensure_bpffs(&args.bpffs)?;
        let pin_dir = args.bpffs.join(&instance);

        let state = if args.reset_state {
            info!("--reset-state: starting with empty state");
            None
        } else {
            State::load(&state_dir)?
        };

        let mut dp = Dataplane::load(&DataplaneOptions {
            route_slots: cfg.daemon.route_slots,
            conntrack_size: cfg.daemon.conntrack_size,
            pin_dir: Some(pin_dir.clone()),
        })
        .with_context(|| {
            format!(
                "loading the data plane (maps pinned in {})",
                pin_dir.display()
            )
        })?;
        dp.set_config(&global_config(&cfg)?)?;
        // The program's event log (off until `lb trace --live` asks): records are pumped from
        // its ring buffer into the log by a task of their own.
        let events = match dp.take_event_logger() {
            Some(logger) => Some(pump_events(logger)?),
            None => None,
        };

        let adopted = adopted(&dp)?;
        let (ctl, plan) = Controller::start(&cfg, state.as_ref(), &adopted).with_context(|| {
            format!(
                "the state in {} does not fit the configuration (move it aside or use \
                 --reset-state to start empty)",
                state_dir.display()
            )
        })?;
        dp.set_hash_seed(ctl.hash_seed());

        let key = match &cfg.daemon.key_file {
            Some(p) => {
                Some(Key::from_file(p).with_context(|| format!("key file {}", p.display()))?)
            }
            None => None,
        };
        let needs_heartbeats = cfg.nodes.iter().any(|n| n.check == "heartbeat");
        let receiver = match (key, needs_heartbeats) {
            (Some(key), _) => {
                let mut r =
                    Receiver::bind(cfg.daemon.heartbeat_listen, key).with_context(|| {
                        format!(
                            "binding the heartbeat socket {}",
                            cfg.daemon.heartbeat_listen
                        )
                    })?;
                if let Some(g) = cfg.daemon.heartbeat_group {
                    r.join_multicast(g, None, 0)
                        .with_context(|| format!("joining multicast group {g}"))?;
                }
                r.set_node_keys(node_keys(&cfg)?);
                Some(r)
            }
            (None, true) => bail!(
                "nodes use heartbeats but daemon.key_file is not set (the key authenticates them)"
            ),
            (None, false) => None,
        };

        let membership = membership_for(&cfg, &ctl, Instant::now());
        let (health_tx, health_rx) = mpsc::unbounded_channel();

        // The API (and metrics) bound before attaching: a socket that cannot be bound stops
        // the start before traffic is touched.
        let (api_tx, api_rx) = mpsc::channel(64);
        let socket_path = cfg
            .daemon
            .api_socket
            .clone()
            .unwrap_or_else(|| api::default_socket(&instance));
        let mut servers = vec![server::spawn_api(
            server::bind_api(&socket_path)?,
            api_tx.clone(),
            socket_path.clone(),
        )];
        if let Some(addr) = cfg.daemon.metrics_listen {
            servers.push(server::spawn_metrics(server::bind_metrics(addr)?, api_tx));
            info!("metrics and status page on http://{addr}/");
        }
        info!("control API on {}", socket_path.display());

        let persister = Persister::spawn(state_dir.clone());
        let mut d = Self {
            cfg,
            dp,
            ctl,
            membership,
            receiver,
            agents: BTreeMap::new(),
            health_tx,
            health_rx,
            checks: BTreeMap::new(),
            persister,
            pin_dir,
            link: None,
            args,
            resync: false,
            warned: BTreeMap::new(),
            _lock: lock,
            started: Instant::now(),
            state_dir,
            source_sha256,
            xdp_mode: saved_mode.unwrap_or_else(|| "unknown".into()),
            offloads_off: saved_offloads,
            own_mac,
            program_id: None,
            ct: ops::CtCounts::default(),
            change_seq: 0,
            ct_scans: 0,
            route_moves: BTreeMap::new(),
            unserved: BTreeSet::new(),
            unserved_episodes: 0,
            api: Some(api_rx),
            servers,
            _events: events,
            cluster: None,
            bgp: None,
        };
        if let Some(c) = &d.cfg.cluster {
            info!(
                "cluster mode: balancer {} of cluster {} (etcd {}); tables come from the leader",
                c.id,
                c.name,
                c.endpoints.join(",")
            );
            d.cluster = Some(clustered::Link::start(c));
        }
        if let Some(b) = &d.cfg.bgp {
            d.bgp = Some((crate::announce::Announcer::new(b), None, false));
        }
        d.sync_checks();
        d.execute(&plan, None)
            .context("writing the start-up state to the kernel")?;
        d.attach()?;
        d.program_id = d.dp.program_mut()?.info().ok().map(|i| i.id());
        d.sync_announcements();
        // The first save is waited for, so a state directory that cannot be written stops
        // the start instead of being found out at the first failover.
        d.save_running()?;
        Ok(d)
    }

    /// Attaches, or swaps the new program into the link pinned by an earlier run (no gap).
    fn attach(&mut self) -> Result<()> {
        let iface = self.args.iface.clone();
        let link_path = self.pin_dir.join(format!("link-{iface}"));
        if link_path.exists() {
            let pinned = PinnedLink::from_pin(&link_path)
                .with_context(|| format!("opening pinned link {}", link_path.display()))?;
            let fd_link = FdLink::from(pinned);
            self.dp
                .replace_in_link(fd_link)
                .with_context(|| format!("replacing the program in {}", link_path.display()))?;
            // Re-open the pin so we can unpin it later (--detach-on-exit).
            self.link = Some(PinnedLink::from_pin(&link_path)?);
            info!("re-adopted the XDP link on {iface}: program replaced atomically");
            if self.xdp_mode == "generic" {
                self.aggregation_off(&iface);
            }
            return Ok(());
        }
        let setting = config::parse_xdp_mode(&self.cfg.daemon.xdp_mode)?;
        let (link, mode_name) = match setting {
            XdpModeSetting::Native => (self.dp.attach(&iface, XdpMode::Driver)?, "native"),
            XdpModeSetting::Generic => (self.dp.attach(&iface, XdpMode::Skb)?, "generic"),
            XdpModeSetting::Auto => match self.dp.attach(&iface, XdpMode::Driver) {
                Ok(l) => (l, "native"),
                Err(e) => {
                    info!("native XDP unavailable on {iface} ({e}); using generic mode");
                    (self.dp.attach(&iface, XdpMode::Skb)?, "generic")
                }
            },
        };
        let pinned = link
            .pin(&link_path)
            .with_context(|| format!("pinning the XDP link at {}", link_path.display()))?;
        self.link = Some(pinned);
        self.xdp_mode = mode_name.into();
        info!("attached to {iface} in {mode_name} mode");
        println!("lb: attached to {iface} in {mode_name} XDP mode");
        if mode_name == "generic" {
            self.aggregation_off(&iface);
        }
        Ok(())
    }

    /// Generic XDP runs after GRO (and sees what LRO built): it would get aggregates of many
    /// segments, which ipip can only encapsulate whole and `XDP_TX` hands to the driver as
    /// they are (docs/dataplane.md "Generic XDP and aggregated frames"). Turns both off on
    /// `iface` and says so; they are turned on again when the program is detached.
    fn aggregation_off(&mut self, iface: &str) {
        let mut turned = Vec::new();
        for f in [Feature::Gro, Feature::Lro] {
            match offload::get(iface, f) {
                Ok(false) => {}
                Ok(true) => match offload::set(iface, f, false) {
                    Ok(()) => {
                        turned.push(f.name());
                        if !self.offloads_off.contains(&f) {
                            self.offloads_off.push(f);
                        }
                    }
                    Err(e) => warn!(
                        "generic XDP on {iface}: could not turn {} off ({e:#}): aggregated \
                         frames to ipip VIPs are encapsulated whole",
                        f.name()
                    ),
                },
                // Not every driver reports every switch (LRO especially).
                Err(e) => tracing::debug!("{iface}: reading {}: {e:#}", f.name()),
            }
        }
        if !turned.is_empty() {
            let msg = format!(
                "generic XDP on {iface}: turned {} off, so the program sees frames as they \
                 arrived, not aggregates (turned on again when the program is detached)",
                turned.join(" and ")
            );
            info!("{msg}");
            println!("lb: {msg}");
        }
    }

    /// The loop until SIGTERM/SIGINT, then the shutdown (also when the loop failed: the
    /// state is saved and the program stays attached, or is detached as asked).
    pub async fn run(mut self) -> Result<()> {
        let served = self.serve().await;
        self.withdraw_on_exit();
        if let Some(link) = self.cluster.take() {
            link.close().await;
        }
        let shut = self.shutdown();
        served.and(shut)
    }

    async fn serve(&mut self) -> Result<()> {
        let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())
            .context("installing the SIGINT handler")?;
        let mut sighup = tokio::signal::unix::signal(SignalKind::hangup())
            .context("installing the SIGHUP handler")?;
        let mut socket = self.receiver.take();
        let ready = match &socket {
            // SAFETY: the descriptor belongs to `socket`, which outlives `ready` (dropped at
            // the end of this function, after `ready`, declared later, is).
            Some(r) => Some(
                unsafe {
                    AsyncFd::register_with_interest(
                        Readiness(r.as_fd().as_raw_fd()),
                        tokio::io::Interest::READABLE,
                    )
                }
                .context("registering the heartbeat socket")?,
            ),
            None => None,
        };
        let (scan_tx, mut scan_rx) = mpsc::unbounded_channel::<ScanResult>();
        // The mapping the scan task works on; it travels to the task and back.
        let mut ct_view: Option<CtView> = Some(CtView {
            table: self.dp.conntrack_view()?,
            moved_since: HashMap::new(),
            imported: HashMap::new(),
        });
        let mut maintenance = tokio::time::interval(MAINTENANCE_PERIOD);
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heartbeats: Vec<Received> = Vec::new();
        // The last drain stopped at its bound: drain again without waiting.
        let mut more = false;
        let mut queue_drops = 0;
        let mut api_rx = self.api.take();
        let mut calls: Vec<Call> = Vec::new();
        // Start a conntrack scan at the end of this round (if none is running).
        let mut scan_now = false;
        // `lb trace --live` clients: the event log is on while there is at least one.
        let mut watchers = crate::livelog::watch_subscribers();
        let mut cluster_msgs = Vec::new();
        println!("lb: ready");
        loop {
            let mut inputs: Vec<Input> = Vec::new();
            let mut reload = false;
            let deadline = self
                .membership
                .next_deadline()
                .map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
                _ = sighup.recv() => reload = true,
                // Not `ready()`: under a flood `more` stays set, and a loop that never
                // returns Pending would starve the runtime (signals, timers, the API's tasks).
                _ = tokio::task::yield_now(), if more => {}
                r = readable(&ready) => {
                    if let Some(mut guard) = r.context("waiting for heartbeats")? {
                        // Cleared before reading: a datagram arriving during the drain sets it again.
                        guard.clear_ready();
                    }
                }
                Some((_, ev)) = self.health_rx.recv() => inputs.push(Input::Membership(ev)),
                Some(msg) = clustered::next(&mut self.cluster) => cluster_msgs.push(msg),
                _ = tokio::time::sleep(clustered::RETRY),
                    if self.cluster.as_ref().is_some_and(|l| l.retry_pending()) => {}
                Some(call) = next_call(&mut api_rx) => calls.push(call),
                _ = sleep_until(deadline) => {}
                Some(res) = scan_rx.recv() => {
                    let imported = res.view.imported.len();
                    ct_view = Some(res.view);
                    match self.cluster.as_mut() {
                        // Evidence for the leader, not a decision of this balancer's.
                        Some(link) => link.scanned(&res.settled, &res.pins, imported),
                        None => inputs.extend(res.settled),
                    }
                    self.ct = res.counts;
                    self.ct_scans += 1;
                }
                _ = maintenance.tick() => scan_now = true,
                Ok(()) = watchers.changed() => {
                    let on = *watchers.borrow_and_update() > 0;
                    if on != self.dp.event_log() {
                        match self.dp.set_event_log(on) {
                            Ok(()) => info!("data-plane event log {}", if on { "on" } else { "off" }),
                            Err(e) => error!("switching the data-plane event log: {e}"),
                        }
                    }
                }
            }
            // Time is read before the socket is drained: every heartbeat that arrived before
            // `now` is then read and counted before any deadline is judged at `now`.
            let now = Instant::now();
            if let Some(sock) = socket.as_mut() {
                // One bounded drain a round, so a flood cannot keep the loop from its
                // deadlines; what is left is read in the next round, at once.
                heartbeats.clear();
                let n = sock
                    .drain(&mut heartbeats)
                    .context("receiving heartbeats")?;
                more = sock.more();
                let _ = n;
                for r in heartbeats.drain(..) {
                    self.on_heartbeat(r, &mut inputs);
                }
                // Known agents get sockets of their own: a flood at the port cannot crowd
                // their heartbeats out of the shared queue.
                let agents: Vec<(u32, SocketAddr)> =
                    self.agents.iter().map(|(n, a)| (*n, *a)).collect();
                for (node, from) in agents {
                    if let Err(e) = sock.pin_peer(node, from) {
                        self.warn_limited(
                            node,
                            "pin",
                            &format!(
                                "node {node}: cannot open a socket of its own for its agent at \
                                 {from}: {e}"
                            ),
                        );
                    }
                }
                for r in sock.take_rejects() {
                    self.on_rejected(&r);
                }
                // Once per period, with the count since the last warning (a flood would
                // otherwise log a line per round).
                let drops = sock.counters().queue_drops;
                if drops > queue_drops
                    && self.warn_limited(
                        u32::MAX,
                        "queue_drops",
                        &format!(
                            "{} datagrams dropped by the kernel at the heartbeat port (socket \
                             receive queue full; {drops} in all)",
                            drops - queue_drops
                        ),
                    )
                {
                    queue_drops = drops;
                }
            }
            while let Ok((_, ev)) = self.health_rx.try_recv() {
                inputs.push(Input::Membership(ev));
            }
            let was_holding = self.membership.holding();
            for ev in self.membership.tick(now) {
                if let Event::NodeDown { node, .. } = ev
                    && let Some(st) = self.membership.status(node)
                {
                    info!(
                        "node {node}: no heartbeat for {:?} (interval {:?}, k = {})",
                        st.last_seen
                            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t)),
                        st.interval.unwrap_or_default(),
                        st.cfg.miss_limit
                    );
                }
                inputs.push(Input::Membership(ev));
            }
            self.report_fail_static(was_holding);
            if self.resync {
                self.resync = false;
                let plan = self.ctl.full_plan();
                self.execute_logged(&plan, socket.as_mut());
            }
            if reload {
                match self.reload(socket.as_mut()) {
                    Ok(diff) if diff.applied => info!(
                        "reloaded {}: {} changes",
                        self.args
                            .config
                            .as_deref()
                            .unwrap_or(Path::new("?"))
                            .display(),
                        diff.changes.len()
                    ),
                    Ok(_) => info!("reload: the file matches the running configuration"),
                    Err(e) => error!("reload refused, nothing changed: {e:#}"),
                }
            }
            if let Some(link) = self.cluster.as_mut() {
                link.drain(&mut cluster_msgs);
                let local = std::mem::take(&mut inputs);
                let msgs = std::mem::take(&mut cluster_msgs);
                self.cluster_round(local, msgs, socket.as_mut()).await;
            }
            if !inputs.is_empty() {
                let start = Instant::now();
                let plan = self.ctl.apply(&inputs);
                self.execute_logged(&plan, socket.as_mut());
                let took = start.elapsed();
                if took > SLOW_BATCH {
                    warn!(
                        "a batch of {} inputs took {took:?} ({} route writes)",
                        inputs.len(),
                        plan.route_writes()
                    );
                }
            }
            // API requests after the batch: they see (and change) the state it left.
            if let Some(rx) = api_rx.as_mut() {
                while let Ok(call) = rx.try_recv() {
                    calls.push(call);
                }
            }
            let seq = self.change_seq;
            for call in calls.drain(..) {
                let answer = self.handle(call.req, socket.as_mut());
                let forwarded = self.cluster.as_mut().is_some_and(|l| l.take_forwarded());
                match self.cluster.as_mut() {
                    // Proposed to the leader: answered when it has answered.
                    Some(link) if forwarded => link.park(call.reply),
                    // The client may have gone; the change (if any) is made either way.
                    _ => {
                        let _ = call.reply.send(answer);
                    }
                }
            }
            if self.cluster.is_some() {
                // A change made here is proposed to the leader: made at once if that is us.
                self.answer_proposals(socket.as_mut()).await;
                self.publish_report();
            }
            // After a change, counts (flows per node: `drain --wait`) are taken again at once
            // (or as soon as the running scan returns the table).
            scan_now |= self.change_seq != seq;
            // Cluster mode: after a new revision, and when the others' shared flows changed.
            scan_now |= self.cluster.as_mut().is_some_and(|l| l.take_rescan());
            self.sync_announcements();
            if scan_now && let Some(view) = ct_view.take() {
                scan_now = false;
                let job = self.scan_job(view);
                let tx = scan_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let _ = tx.send(job.run());
                });
            }
        }
        drop(ready);
        self.receiver = socket;
        Ok(())
    }

    /// SIGHUP: `lb apply` of the file the daemon was started with, which becomes the origin
    /// of the running configuration (runtime changes made since are replaced). A file that
    /// does not load or does not fit changes nothing.
    fn reload(&mut self, socket: Option<&mut Receiver>) -> Result<api::Diff> {
        let path = self
            .args
            .config
            .clone()
            .context("started without --config: nothing to reload")?;
        let (cfg, digest) = load_config(&path)?;
        let diff = self.change(cfg, socket, false);
        if let Some(link) = self.cluster.as_mut()
            && link.take_forwarded()
        {
            info!("reload: the file's nodes and VIPs are proposed to the cluster's leader");
            return Ok(api::Diff::default());
        }
        let diff = diff.map_err(|f| anyhow::anyhow!("{}", f.body.error))?;
        if self.source_sha256.as_deref() != Some(digest.as_str()) {
            self.source_sha256 = Some(digest);
            self.save_running()?;
        }
        Ok(diff)
    }

    /// Makes the TCP health checks match the configuration: a check whose settings did not
    /// change keeps running (and keeps its rise/fall count).
    fn sync_checks(&mut self) {
        let d = health::HealthCfg::default();
        let mut keep = BTreeMap::new();
        for n in self.cfg.nodes.iter().filter(|n| n.check != "heartbeat") {
            let Some(addr) = n.check_addr else { continue };
            let hc = health::HealthCfg {
                http_path: n.check_http_path.clone(),
                interval: n.check_interval.unwrap_or(d.interval),
                timeout: n.check_timeout.unwrap_or(d.timeout),
                rise: n.check_rise.unwrap_or(d.rise),
                fall: n.check_fall.unwrap_or(d.fall),
                ..d.clone()
            };
            let settings = format!("{addr} {hc:?}");
            let check = match self.checks.remove(&n.id) {
                Some((s, c)) if s == settings => c,
                _ => health::HealthChecker::spawn(n.id, addr, hc, self.health_tx.clone()),
            };
            keep.insert(n.id, (settings, check));
        }
        self.checks = keep;
    }

    /// One authentic heartbeat, judged at its arrival time.
    fn on_heartbeat(&mut self, r: Received, inputs: &mut Vec<Input>) {
        let was_holding = self.membership.holding();
        let before = *self.membership.counters();
        match self.membership.on_heartbeat_at(r.at, Some(r.wall), &r.hb) {
            Ok(evs) => {
                let after = *self.membership.counters();
                if after.weight_clamped > before.weight_clamped {
                    let max = self
                        .membership
                        .status(r.hb.node)
                        .map_or(0, |s| s.cfg.max_weight);
                    self.warn_limited(
                        r.hb.node,
                        "weight",
                        &format!(
                            "node {} advertises weight {}, above its advertised_weight_max: \
                             clamped to {max}",
                            r.hb.node, r.hb.weight
                        ),
                    );
                }
                if after.incarnation_reset > before.incarnation_reset {
                    warn!(
                        "node {}: incarnation {:#x} from {} accepted below the one before (a \
                         start time in the future, or a clock that stepped back)",
                        r.hb.node, r.hb.incarnation, r.from
                    );
                }
                self.agents.insert(r.hb.node, r.from);
                self.ctl
                    .set_seen(r.hb.node, r.hb.incarnation, r.hb.sequence);
                inputs.extend(evs.into_iter().map(Input::Membership));
                if let Some(st) = self.membership.status(r.hb.node)
                    && let (Some(adv), Some(used)) = (st.advertised_interval, st.interval)
                    && adv > used
                {
                    self.warn_limited(
                        r.hb.node,
                        "interval",
                        &format!(
                            "node {} advertises a {adv:?} heartbeat interval, above \
                             daemon.heartbeat_interval_max: judged at {used:?}",
                            r.hb.node
                        ),
                    );
                }
            }
            Err(e) => {
                let reason = match e {
                    membership::Reject::UnknownNode => "unknown",
                    membership::Reject::Replay => "replay",
                    membership::Reject::StaleIncarnation => "stale",
                    membership::Reject::Duplicate => "duplicate",
                };
                let hint = match e {
                    membership::Reject::Duplicate => format!(
                        "; two agents claim node {}: the one at {} (incarnation {:#x}) is \
                         ignored while the newer one{} beats; give each node its own --node-id",
                        r.hb.node,
                        r.from,
                        r.hb.incarnation,
                        self.agents
                            .get(&r.hb.node)
                            .map_or(String::new(), |a| format!(" at {a}"))
                    ),
                    membership::Reject::StaleIncarnation => {
                        let ms = i128::from(membership::incarnation_ms(r.hb.incarnation))
                            - i128::from(membership::unix_ms(r.wall));
                        format!(
                            " (incarnation {:#x}: its agent's start time is {} s {} this \
                             balancer's clock; if no newer agent runs for node {}, check the \
                             node's clock and restart its agent)",
                            r.hb.incarnation,
                            ms.unsigned_abs() / 1000,
                            if ms < 0 { "behind" } else { "ahead of" },
                            r.hb.node
                        )
                    }
                    _ => String::new(),
                };
                self.warn_limited(
                    r.hb.node,
                    reason,
                    &format!(
                        "heartbeat for node {} from {} rejected: {e}{hint}",
                        r.hb.node, r.from
                    ),
                );
            }
        }
        self.report_fail_static(was_holding);
    }

    /// A refused datagram that names a configured node is worth a (rate-limited) warning: a
    /// node with the wrong key otherwise silently never comes up.
    fn on_rejected(&mut self, r: &heartbeat::Rejected) {
        let Some(node) = r
            .claimed_node
            .filter(|n| self.cfg.nodes.iter().any(|c| c.id == *n))
        else {
            return;
        };
        let (reason, what) = match r.error {
            heartbeat::DecodeError::BadHmac => (
                "bad_hmac",
                "wrong key (HMAC does not verify; check daemon.key_file and the agent's --key-file)",
            ),
            _ => ("malformed", "malformed heartbeat"),
        };
        let msg = format!(
            "heartbeat claiming node {node} from {} rejected: {what}: {}",
            r.from, r.error
        );
        self.warn_limited(node, reason, &msg);
    }

    fn report_fail_static(&self, was_holding: bool) {
        match (was_holding, self.membership.holding()) {
            (false, true) => warn!(
                "fail static: most nodes went silent at once, which points at this balancer's \
                 own receive path; holding the route tables until heartbeats flow again \
                 (episode {})",
                self.membership.counters().fail_static
            ),
            (true, false) => info!("fail static: heartbeats flow again; judging nodes normally"),
            _ => {}
        }
    }

    /// Logs `msg` as a warning unless one for `(node, reason)` was logged in the last
    /// [`REJECT_WARN_PERIOD`]; returns whether it was logged.
    fn warn_limited(&mut self, node: u32, reason: &'static str, msg: &str) -> bool {
        let now = Instant::now();
        if self
            .warned
            .get(&(node, reason))
            .is_some_and(|t| now.saturating_duration_since(*t) < REJECT_WARN_PERIOD)
        {
            return false;
        }
        self.warned.insert((node, reason), now);
        warn!(node, reason, "{msg}");
        true
    }

    /// Executes a plan: its log lines, the kernel writes in order, the notices, and, once the
    /// writes succeeded, the hand-off to the persister (after a failure the resync's full plan
    /// persists).
    fn execute(&mut self, plan: &Plan, socket: Option<&mut Receiver>) -> Result<()> {
        for line in &plan.log {
            info!("{line}");
        }
        // Once per transition, never per packet: the data plane counts the drops.
        for key in &plan.unserved {
            if self.unserved.insert(*key) {
                self.unserved_episodes += 1;
                warn!(
                    "VIP {} has no active node: its new flows are dropped (counted as \
                     no_backend drops, `lb stats`) until a node is up",
                    dataplane::vip_display(key)
                );
            }
        }
        for key in &plan.served {
            if self.unserved.remove(key) {
                info!(
                    "VIP {} has an active node again: new flows are forwarded",
                    dataplane::vip_display(key)
                );
            }
        }
        for n in &plan.notices {
            *self.route_moves.entry(n.reason.as_str()).or_default() += n.routes.len() as u64;
        }
        let written = execute_steps(&mut self.dp, plan);
        if let Some(sock) = socket {
            self.send_notices(plan, sock);
        }
        if plan.persist && written.is_ok() {
            self.persister.submit(self.ctl.snapshot());
        }
        written
    }

    /// [`Daemon::execute`] in the loop: a failed kernel write is logged and everything is
    /// written again next round (the controller's state is what the kernel is brought back to).
    fn execute_logged(&mut self, plan: &Plan, socket: Option<&mut Receiver>) {
        if let Err(e) = self.execute(plan, socket) {
            error!("applying a plan to the kernel maps: {e:#}; writing everything again");
            self.resync = true;
        }
    }

    /// HaloD's "route moved": tell each old owner's agent which of its routes moved.
    fn send_notices(&self, plan: &Plan, r: &mut Receiver) {
        for n in &plan.notices {
            let Some(to) = self.agents.get(&n.node) else {
                continue;
            };
            let vip = heartbeat::Vip {
                addr: dataplane::key_ip(&n.vip),
                port: u16::from_be(n.vip.port),
                proto: n.vip.proto,
            };
            if let Err(e) = r.send_route_moved(*to, n.node, vip, n.reason, &n.routes) {
                warn!("route-moved notice to node {} at {to}: {e}", n.node);
            }
        }
    }

    /// What a conntrack scan needs.
    fn scan_job(&mut self, mut view: CtView) -> ScanJob {
        // The seed flows hash with: a cluster revision may have brought another one since the
        // view was made.
        view.table.set_seed(self.dp.hash_seed());
        let vips: Vec<ScanVip> = self
            .ctl
            .vips()
            .filter(|v| !v.moved.is_empty())
            .map(|v| ScanVip {
                key: v.spec.key,
                revision: v.revision,
                hash: v.spec.hash,
                table: Arc::clone(&v.table),
                moved: v.moved.clone(),
            })
            .collect();
        ScanJob {
            view,
            taken: coarse_now(),
            all: self.ctl.vips().map(|v| v.spec.key).collect(),
            seq: self.change_seq,
            vips,
            idle: (self.cfg.daemon.flow_idle_timeout.as_nanos() >> lb_common::CT_TIME_SHIFT) as u32,
            share: self.cluster.is_some(),
            import: self.cluster.as_mut().and_then(|l| l.take_import()),
        }
    }

    /// What bird should announce (`[bgp]`): every VIP address while this balancer can serve:
    /// its program attached, no kernel write pending a retry, and in cluster mode a table
    /// revision of the cluster's running (before it, its tables may be stale). Nothing
    /// otherwise. A failed announcement is tried again a second later.
    fn sync_announcements(&mut self) {
        let serving = self.link.is_some()
            && !self.resync
            && self.cluster.as_ref().is_none_or(|l| l.applied > 0);
        let wanted: BTreeSet<std::net::IpAddr> = if serving {
            self.ctl
                .vips()
                .map(|v| dataplane::key_ip(&v.spec.key))
                .collect()
        } else {
            BTreeSet::new()
        };
        let Some((announcer, retry_at, told)) = self.bgp.as_mut() else {
            return;
        };
        let now = Instant::now();
        if *told && announcer.announced() == &wanted && retry_at.is_none() {
            return;
        }
        if retry_at.is_some_and(|t| now < t) {
            return;
        }
        match announcer.announce(&wanted) {
            Ok(()) => {
                *retry_at = None;
                *told = true;
                info!("bgp: announcing {} VIP addresses", wanted.len());
            }
            Err(e) => {
                if retry_at.is_none() {
                    error!("bgp: {e:#}; trying again every second");
                }
                *retry_at = Some(now + Duration::from_secs(1));
            }
        }
    }

    /// On exit, bird withdraws the VIPs when this balancer stops serving them: in cluster mode
    /// (the others run the same tables and take its flows; its program would forward on
    /// tables nobody updates), or when the program is detached. A single box that leaves its
    /// program forwarding keeps announcing (withdrawing would leave the VIPs unserved).
    fn withdraw_on_exit(&mut self) {
        let withdraw = self.cluster.is_some() || self.args.detach_on_exit;
        if let Some((announcer, _, _)) = self.bgp.as_mut()
            && withdraw
        {
            match announcer.withdraw_all() {
                Ok(()) => info!("bgp: VIPs withdrawn"),
                Err(e) => error!("bgp: withdrawing the VIPs on exit: {e:#}"),
            }
        }
    }

    fn shutdown(&mut self) -> Result<()> {
        // The API first: its socket goes while the instance lock is still held, so it can
        // never be a newer daemon's.
        self.servers.clear();
        self.persister.submit(self.ctl.snapshot());
        let saved = self
            .persister
            .flush(FLUSH_TIMEOUT)
            .map_err(|e| anyhow::anyhow!("saving state on exit: {e}"));
        if self.args.detach_on_exit {
            if let Some(link) = self.link.take() {
                let fd = link.unpin().context("unpinning the XDP link")?;
                drop(fd);
            }
            dataplane::remove_pins(&self.pin_dir)
                .with_context(|| format!("removing {}", self.pin_dir.display()))?;
            println!("lb: detached and removed pinned maps");
            if !self.offloads_off.is_empty() {
                self.restore_offloads();
                // The record says nothing is left to turn on again.
                if let Err(e) = self.save_running() {
                    warn!("saving the running configuration on exit: {e:#}");
                }
            }
        } else {
            println!("lb: exiting; the program stays attached and forwarding (pinned)");
            if !self.offloads_off.is_empty() {
                let names: Vec<&str> = self.offloads_off.iter().map(|f| f.name()).collect();
                println!(
                    "lb: {} stay off on {} while the program stays attached",
                    names.join(" and "),
                    self.args.iface
                );
            }
        }
        saved
    }

    /// Turns on again what [`Daemon::aggregation_off`] turned off (the program is detached).
    fn restore_offloads(&mut self) {
        let iface = self.args.iface.clone();
        for f in std::mem::take(&mut self.offloads_off) {
            match offload::set(&iface, f, true) {
                Ok(()) => {
                    info!("{iface}: {} on again (program detached)", f.name());
                    println!("lb: {} on again on {iface}", f.name());
                }
                Err(e) => warn!("{iface}: turning {} on again: {e:#}", f.name()),
            }
        }
    }
}

/// The heartbeat socket's descriptor, registered with tokio only to learn when it is readable
/// (the [`Receiver`] itself stays a plain value the loop reads and sends with).
struct Readiness(RawFd);

impl AsRawFd for Readiness {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Writes a plan's steps to the kernel maps, in order.
pub fn execute_steps(dp: &mut Dataplane, plan: &Plan) -> Result<()> {
    for step in &plan.steps {
        match step {
            Step::Node { id, entry } => dp.set_node(*id, entry)?,
            Step::ClearNode { id } => dp.set_node(*id, &NodeEntry::default())?,
            Step::Vip { spec, routes } => dp.upsert_vip(spec, routes)?,
            Step::Routes { key, changes } => dp.update_routes(key, changes)?,
            Step::RemoveVip { key } => {
                info!("removing VIP {}", dataplane::vip_display(key));
                dp.remove_vip(key)?
            }
        }
    }
    Ok(())
}

/// Waits until the heartbeat socket is readable (never, without one).
async fn readable(
    socket: &Option<AsyncFd<Readiness>>,
) -> std::io::Result<Option<tokio::io::unix::AsyncFdReadyGuard<'_, Readiness>>> {
    match socket {
        Some(s) => s.readable().await.map(Some),
        None => std::future::pending().await,
    }
}

/// Moves the program's event records from their ring buffer into the log (and so to
/// `lb trace --live`) whenever it is readable; stopped when dropped.
fn pump_events(logger: crate::livelog::EventLogger) -> Result<Server> {
    // SAFETY: the AsyncFd owns the logger, so its descriptor outlives the registration.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
        .context("registering the event log's ring buffer")?;
    Ok(Server::spawn(async move {
        while let Ok(mut ready) = fd.readable_mut().await {
            ready.get_inner_mut().pump();
            ready.clear_ready();
        }
    }))
}

/// The next API request (never, without a server).
async fn next_call(rx: &mut Option<mpsc::Receiver<Call>>) -> Option<Call> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Reads and validates a config file; returns it with the SHA-256 of its bytes.
fn load_config(path: &Path) -> Result<(Config, String)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    let cfg = Config::parse(&text, &path.display().to_string())?;
    Ok((cfg, running::digest(text.as_bytes())))
}

/// Sleeps until `deadline` (forever without one).
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The failure detector for the configured heartbeat nodes, with the nodes the controller
/// holds as up (re-adopted after a restart) assumed up for one detection window from `now`,
/// with the weight and drain state their agents last advertised (so their next heartbeat is
/// no change), and their last accepted heartbeat remembered (captured ones stay replays).
pub fn membership_for(cfg: &Config, ctl: &Controller, now: Instant) -> Membership {
    let d = &cfg.daemon;
    let mut m = Membership::new(membership::NodeCfg::default());
    sync_membership(&mut m, cfg);
    for n in cfg.nodes.iter().filter(|n| n.check == "heartbeat") {
        let Some(node_cfg) = m.status(n.id).map(|s| s.cfg) else {
            continue;
        };
        if let Some(node) = ctl.node(n.id)
            && node.state != NodeState::Down
        {
            m.assume_up(
                n.id,
                now,
                d.heartbeat_interval * node_cfg.miss_limit,
                node.agent_draining,
                node.advertised_weight,
            );
        }
        if let Some((inc, seq)) = ctl.seen(n.id) {
            m.restore_seen(n.id, inc, seq);
        }
    }
    m
}

/// The keys of the heartbeat nodes that have one of their own (`daemon.node_key_dir/<id>.key`);
/// a file that exists but does not load is an error naming it.
pub fn node_keys(cfg: &Config) -> Result<BTreeMap<u32, Key>> {
    let Some(dir) = &cfg.daemon.node_key_dir else {
        return Ok(BTreeMap::new());
    };
    let mut keys = BTreeMap::new();
    for n in cfg.nodes.iter().filter(|n| n.check == "heartbeat") {
        let path = dir.join(format!("{}.key", n.id));
        if path.exists() {
            let key = Key::from_file(&path)
                .with_context(|| format!("node {}'s key file {}", n.id, path.display()))?;
            keys.insert(n.id, key);
        }
    }
    Ok(keys)
}

/// Makes the detector's nodes and settings match `cfg`; nodes it knows keep their state.
fn sync_membership(m: &mut Membership, cfg: &Config) {
    let d = &cfg.daemon;
    m.set_fail_static(d.fail_static());
    let wanted: BTreeMap<u32, membership::NodeCfg> = cfg
        .nodes
        .iter()
        .filter(|n| n.check == "heartbeat")
        .map(|n| {
            let nc = membership::NodeCfg {
                miss_limit: n.miss_limit.unwrap_or(d.miss_limit),
                hold_down: d.hold_down,
                max_interval: d.max_interval(),
                max_weight: n.max_advertised_weight(),
                clock_skew: d.clock_skew_max,
                ..Default::default()
            };
            (n.id, nc)
        })
        .collect();
    let gone: Vec<u32> = m
        .nodes()
        .map(|(id, _)| id)
        .filter(|id| !wanted.contains_key(id))
        .collect();
    for id in gone {
        m.remove_node(id);
    }
    for (id, nc) in wanted {
        m.add_node(id, nc);
    }
}

/// What the kernel holds at start-up: the pinned VIPs' live tables and non-empty node slots.
fn adopted(dp: &Dataplane) -> Result<Adopted> {
    let mut a = Adopted::default();
    for key in dp.vip_keys() {
        let (Some(meta), Some(routes)) = (dp.vip_meta(&key), dp.live_routes(&key)) else {
            continue;
        };
        a.hash_seed.get_or_insert(meta.hash_seed);
        a.vips.insert(
            key,
            AdoptedVip {
                index: meta.index,
                routes: routes.to_vec(),
            },
        );
    }
    for id in 0..MAX_NODES {
        if id == NODE_NONE {
            continue;
        }
        let e = dp.node(id)?;
        if e != NodeEntry::default() {
            a.nodes.insert(id, e.state);
        }
    }
    Ok(a)
}

/// One VIP with moved routes, as the scan sees it.
struct ScanVip {
    key: VipKey,
    revision: u64,
    hash: HashMode,
    table: Arc<RouteTable>,
    moved: RouteSet,
}

/// `CONNTRACK` as the scan sees it, handed between scans: the mapped table, and since when (scan
/// clock, `CtEntry::last_seen` units) each moved route has been seen moved.
struct CtView {
    table: CtTable,
    moved_since: HashMap<(VipKey, u32), u32>,
    /// Other balancers' moved-route flows recorded here (cluster mode), with the stamp they
    /// were recorded at: while the entry is unchanged, the flow has not come here.
    imported: HashMap<FlowKey, u32>,
}

/// A conntrack scan, run on a blocking task: expire entries that no flow needs, and find the
/// moved routes whose previous owners no longer have tracked flows.
///
/// Which entries expire (docs/dataplane.md, "Conntrack lifetime"): only on a moved route does
/// every packet of a TCP flow refresh its entry (and set `CT_F_KEEP`), so only there does
/// `last_seen` say how long the flow has been idle:
/// - moved route, `CT_F_KEEP`: idle past `flow_idle_timeout`, or closing and quiet;
/// - moved route, no `CT_F_KEEP` (not seen since the move): once the route has been moved for
///   `flow_idle_timeout` (the flow has been idle at least that long), or closing and quiet;
/// - unmoved route: TCP only when closing and quiet (an established flow never refreshes its
///   entry there, so its age says nothing: the entry of a long-lived flow must outlive any
///   timeout, for the day its route moves); UDP (always looked up) idle past the timeout;
/// - a flow of no VIP: at once, if it was recorded before the scan's snapshot.
///
/// `CT_F_KEEP` is cleared on unmoved routes, so those entries are evictable again.
struct ScanJob {
    view: CtView,
    /// Every VIP (a flow belongs to the VIP of its port, else to its address's all-ports VIP).
    all: BTreeSet<VipKey>,
    /// When `all` and `vips` were taken (`CtEntry::last_seen` units): the scan runs on its own
    /// thread while the daemon goes on, so a VIP added since then has flows it does not know.
    taken: u32,
    /// The daemon's change sequence when the scan started.
    seq: u64,
    vips: Vec<ScanVip>,
    /// `flow_idle_timeout` in `CtEntry::last_seen` units.
    idle: u32,
    /// Cluster mode: collect this balancer's moved-route flows to share.
    share: bool,
    /// Cluster mode: every moved-route flow the other balancers share now, when it changed
    /// since the last scan (recorded here if missing; earlier imports no longer shared and
    /// never seen here are removed).
    import: Option<Vec<Pin>>,
}

struct ScanResult {
    view: CtView,
    settled: Vec<Input>,
    counts: ops::CtCounts,
    /// This balancer's flows on moved routes kept on a previous owner (`share` only).
    pins: Vec<Pin>,
}

impl ScanJob {
    /// Records the other balancers' shared flows missing here, and removes the earlier
    /// imports they no longer share (unless the flow came here since: then it is this
    /// balancer's own). An import takes no `CT_F_KEEP`: a hit here sets it.
    fn import(&mut self, now: u32) {
        let Some(wanted) = self.import.take() else {
            return;
        };
        let table = &mut self.view.table;
        let imported = &mut self.view.imported;
        let wanted_keys: std::collections::HashSet<FlowKey> =
            wanted.iter().map(|p| p.key).collect();
        imported.retain(|key, stamp| {
            let unseen = table
                .get(key)
                .is_some_and(|e| e.flags & CT_F_KEEP == 0 && e.last_seen == *stamp);
            if !unseen {
                return false;
            }
            if wanted_keys.contains(key) {
                return true;
            }
            table.remove(key);
            false
        });
        for p in wanted {
            if table.get(&p.key).is_none()
                && table.insert(
                    &p.key,
                    &lb_common::CtEntry {
                        node: p.node,
                        vip: p.vip,
                        last_seen: now,
                        flags: 0,
                    },
                )
            {
                imported.insert(p.key, now);
            }
        }
    }

    fn run(mut self) -> ScanResult {
        let now = coarse_now();
        self.import(now);
        let by_key: BTreeMap<VipKey, usize> = self
            .vips
            .iter()
            .enumerate()
            .map(|(i, v)| (v.key, i))
            .collect();
        // Moved routes keep the time they were first seen moved; others are forgotten.
        let mut since = HashMap::new();
        for v in &self.vips {
            for r in v.moved.iter() {
                let t = self.view.moved_since.get(&(v.key, r)).copied();
                since.insert((v.key, r), t.unwrap_or(now));
            }
        }
        self.view.moved_since = since;
        let table = &mut self.view.table;
        let mut still_needed: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); self.vips.len()];
        let mut pins = Vec::new();
        let mut counts = ops::CtCounts {
            seq: self.seq,
            ..Default::default()
        };
        for (key, ct) in table.entries() {
            let age = lb_common::ct::ct_age(now, ct.last_seen);
            let closing = ct.flags & (CT_F_FIN | CT_F_RST) != 0 && age >= CT_CLOSE_QUIET;
            let Some(vip) = flow_vip(&key, |k| self.all.contains(k)) else {
                // Only flows recorded before the snapshot's tick: a newer one may belong to a
                // VIP added since (its entry goes at a later scan if its VIP is really gone).
                if lb_common::ct::ct_age(self.taken, ct.last_seen) > 0 {
                    table.remove(&key);
                }
                continue;
            };
            let moved = by_key.get(&vip).and_then(|&i| {
                let v = &self.vips[i];
                let route = flow_route(table.seed(), v.hash, v.table.route_count(), &key);
                v.moved.contains(route).then_some((i, route))
            });
            let expired = closing
                || match moved {
                    Some(_) if ct.flags & CT_F_KEEP != 0 => age > self.idle,
                    Some((_, route)) => self
                        .view
                        .moved_since
                        .get(&(vip, route))
                        .is_some_and(|&t| now.wrapping_sub(t) > self.idle),
                    None => key.proto == lb_common::PROTO_UDP && age > self.idle,
                };
            if expired {
                table.remove(&key);
                continue;
            }
            if moved.is_none() && ct.flags & CT_F_KEEP != 0 {
                // Only the flags word: a rewrite of the whole way would make the flow read as
                // untracked for a moment, and if its route has moved since this scan's view,
                // a packet in that moment would be recorded on the route's new owner.
                table.set_flags(&key, ct.flags & !CT_F_KEEP);
            }
            counts.count(&ct);
            let Some((i, route)) = moved else {
                continue;
            };
            let v = &self.vips[i];
            let owner_live = v
                .table
                .node(ct.node)
                .is_some_and(|n| matches!(n.state, NodeState::Active | NodeState::Draining));
            if v.table.owner(route) != Some(ct.node) && owner_live {
                still_needed[i].insert(route);
                // Shared unless it is another balancer's flow that never came here.
                let foreign = self
                    .view
                    .imported
                    .get(&key)
                    .is_some_and(|stamp| ct.flags & CT_F_KEEP == 0 && ct.last_seen == *stamp);
                if self.share && !foreign {
                    pins.push(Pin {
                        key,
                        node: ct.node,
                        vip: ct.vip,
                    });
                }
            }
        }
        let settled = self
            .vips
            .iter()
            .zip(still_needed)
            // Also when none settled: in cluster mode the leader waits for every balancer's
            // scan of a VIP's revision.
            .map(|(v, needed)| Input::Settled {
                vip: v.key,
                revision: v.revision,
                routes: v.moved.iter().filter(|r| !needed.contains(r)).collect(),
            })
            .collect();
        ScanResult {
            view: self.view,
            settled,
            counts,
            pins,
        }
    }
}

/// The VIP a flow belongs to, as the program finds it: the VIP of its destination port, else
/// the all-ports VIP (port 0) of its address; `has` says which VIPs exist.
pub fn flow_vip(key: &FlowKey, has: impl Fn(&VipKey) -> bool) -> Option<VipKey> {
    let exact = VipKey {
        addr: key.dst,
        port: key.dport,
        proto: key.proto,
        family: key.family,
    };
    let any_port = VipKey { port: 0, ..exact };
    [exact, any_port].into_iter().find(|k| has(k))
}

/// Route ID of a tracked flow, as the kernel computes it under the hash `seed`.
pub fn flow_route(seed: u32, mode: HashMode, n: u32, key: &FlowKey) -> u32 {
    let h = lb_common::hash::flow_key_hash(seed, key, mode == HashMode::FiveTuple);
    lb_common::hash::route_index(h, n)
}

/// `CLOCK_MONOTONIC_COARSE` in `CtEntry::last_seen` units (what `bpf_ktime_get_coarse_ns` reads).
fn coarse_now() -> u32 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .unwrap_or_else(|_| nix::sys::time::TimeSpec::new(0, 0));
    let ns = (ts.tv_sec() as u64) * 1_000_000_000 + ts.tv_nsec() as u64;
    (ns >> lb_common::CT_TIME_SHIFT) as u32
}

fn global_config(cfg: &Config) -> Result<GlobalConfig> {
    let (src4, mask4) = config::parse_v4_net(&cfg.ipip.source_v4)?;
    Ok(GlobalConfig {
        gw_mac: match &cfg.ipip.gateway_mac {
            Some(m) => config::parse_mac(m)?,
            None => [0; 6],
        },
        mtu: cfg.ipip.mtu,
        ipip_src4: src4,
        ipip_src4_mask: mask4,
        ipip_src6: cfg.ipip.source_v6.octets(),
        ..Default::default()
    })
}

/// The MAC of `iface` (in our network namespace), if it has one.
fn iface_mac(iface: &str) -> Option<[u8; 6]> {
    nix::ifaddrs::getifaddrs()
        .ok()?
        .filter(|a| a.interface_name == iface)
        .find_map(|a| a.address?.as_link_addr()?.addr())
        .filter(|m| *m != [0; 6])
}

/// Where `lb run` locks its instance.
const LOCK_DIR: &str = "/run/lb";

/// Takes `/run/lb/<instance>.lock` (an exclusive `flock`, released when the process ends,
/// however it ends) and writes our pid in it; a second `lb run` of the instance is refused.
fn lock_instance(instance: &str) -> Result<nix::fcntl::Flock<std::fs::File>> {
    use std::io::{Read as _, Seek as _, Write as _};
    let path = Path::new(LOCK_DIR).join(format!("{instance}.lock"));
    std::fs::create_dir_all(LOCK_DIR).with_context(|| format!("mkdir {LOCK_DIR}"))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
    {
        Ok(l) => l,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            bail!(
                "instance {instance:?} is already running (pid {}, lock {}); stop it first or \
                 choose another daemon.instance",
                pid.trim(),
                path.display()
            );
        }
        Err((_, e)) => bail!("locking {}: {e}", path.display()),
    };
    lock.set_len(0)
        .and_then(|()| lock.rewind())
        .and_then(|()| writeln!(lock, "{}", std::process::id()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(lock)
}

/// Mounts bpffs at `dir` if it is not mounted yet.
fn ensure_bpffs(dir: &Path) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let target = dir.to_string_lossy();
    if mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, mnt, fs) = (f.next(), f.next(), f.next());
        mnt == Some(&*target) && fs == Some("bpf")
    }) {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    nix::mount::mount(
        Some("bpf"),
        dir,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "bpffs is not mounted at {} and mounting it failed: {e} (is BPF available? are you root?)",
            dir.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{controller::Input, heartbeat::Heartbeat};

    /// Defect: after a restart the daemon emitted `WeightChanged` for every node (the detector
    /// was seeded with the table's weight, not the one the agent advertises).
    #[test]
    fn a_restarted_daemon_sees_no_change_in_an_unchanged_agent() {
        let cfg: Config = toml::from_str(
            "[[vip]]\naddr = \"198.18.100.1\"\nport = 80\nproto = \"tcp\"\nroutes = 64\n\
             [[node]]\nid = 1\nmac = \"02:00:00:00:00:01\"\nweight = 1\n\
             [[node]]\nid = 2\nmac = \"02:00:00:00:00:02\"\nweight = 5\n",
        )
        .expect("config");
        let (mut ctl, _) = Controller::start(&cfg, None, &Adopted::default()).expect("start");
        // Node 1's agent advertises 3; node 2's has no opinion (0) and is draining.
        ctl.apply(&[
            Input::Membership(Event::NodeUp {
                node: 1,
                weight: 3,
                draining: false,
            }),
            Input::Membership(Event::NodeUp {
                node: 2,
                weight: 0,
                draining: true,
            }),
        ]);
        let state = ctl.snapshot();
        let (restarted, _) =
            Controller::start(&cfg, Some(&state), &Adopted::default()).expect("restart");
        let now = Instant::now();
        let mut m = membership_for(&cfg, &restarted, now);
        for (node, weight, st) in [
            (1, 3, heartbeat::NodeState::Up),
            (2, 0, heartbeat::NodeState::Draining),
        ] {
            let hb = Heartbeat {
                node,
                incarnation: 7,
                sequence: 1,
                state: st,
                weight,
                interval_ms: 100,
                cpu_permille: None,
                active_conns: None,
            };
            let evs = m
                .on_heartbeat(now + Duration::from_millis(10), &hb)
                .expect("accepted");
            assert_eq!(evs, vec![], "node {node}");
        }
    }

    /// `daemon.node_key_dir`: nodes with a file of their own get its key; a file that does
    /// not load is an error naming it; no directory, no keys.
    #[test]
    fn node_keys_come_from_their_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = |extra: &str| -> Config {
            toml::from_str(&format!(
                "[daemon]\n{extra}\n[[node]]\nid = 1\n[[node]]\nid = 2\n[[node]]\nid = 3\n"
            ))
            .expect("config")
        };
        let with_dir = format!("node_key_dir = \"{}\"", dir.path().display());
        assert!(node_keys(&cfg("")).expect("no dir").is_empty());
        std::fs::write(dir.path().join("2.key"), "00112233445566778899aabbccddeeff")
            .expect("write");
        let keys = node_keys(&cfg(&with_dir)).expect("keys");
        assert_eq!(keys.keys().copied().collect::<Vec<_>>(), vec![2]);
        std::fs::write(dir.path().join("3.key"), "short").expect("write");
        let e = format!(
            "{:#}",
            node_keys(&cfg(&with_dir)).expect_err("a bad key file")
        );
        assert!(e.contains("3.key") && e.contains("at least 16"), "{e}");
    }
}
