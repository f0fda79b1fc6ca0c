//! Long-lived TCP: an echo server per node namespace that answers every line with its node id
//! and keeps the connection open until the client closes it, and a client connection held
//! through the balancer.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use lb_common::VipKey;
use lb_userspace::dataplane::vip_key;

use crate::{
    daemon::DaemonSetup,
    netns::{ChildGuard, Lab, Netns},
};

/// One echo server per node namespace on `0.0.0.0:port`.
pub struct EchoServers {
    stop: Arc<AtomicBool>,
    /// Duplicates of the listening sockets: `shutdown` on one wakes its blocked `accept`.
    listeners: Vec<OwnedFd>,
    _handles: Vec<JoinHandle<Result<()>>>,
}

impl EchoServers {
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
                loop {
                    match l.accept() {
                        Ok((s, _)) => {
                            std::thread::spawn(move || echo(s, id));
                        }
                        Err(_) if stop2.load(Ordering::Relaxed) => return Ok(()),
                        Err(e) => eprintln!("[echo {id}] accept: {e}"),
                    }
                }
            }));
            let fd = rx
                .recv_timeout(Duration::from_secs(5))
                .context("echo server did not start")??;
            listeners.push(fd);
        }
        Ok(Self {
            stop,
            listeners,
            _handles: handles,
        })
    }
}

impl Drop for EchoServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for fd in &self.listeners {
            // SAFETY: shutdown(2) on a socket fd we own.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

fn echo(s: TcpStream, id: u32) {
    let Ok(mut w) = s.try_clone() else { return };
    for line in BufReader::new(s).lines() {
        if line.is_err() || writeln!(w, "{id}").is_err() {
            return;
        }
    }
}

/// A client connection through the balancer to an [`EchoServers`] node.
pub struct Held {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Held {
    /// Connects to `vip:port` from the calling thread's namespace.
    pub fn connect(vip: Ipv4Addr, port: u16) -> Result<Self> {
        let stream =
            TcpStream::connect_timeout(&SocketAddr::from((vip, port)), Duration::from_secs(2))
                .with_context(|| format!("connecting to {vip}:{port}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }

    /// Sends a line; returns the id of the node that answered.
    pub fn ask(&mut self) -> Result<u32> {
        writeln!(self.stream, "which")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("connection closed by the far end");
        }
        line.trim()
            .parse()
            .with_context(|| format!("echo answered {line:?}"))
    }
}

/// Opens connections to `vip:port` from the client namespace until one lands on `node`;
/// returns it (the others are closed).
pub fn connection_to(lab: &Lab, vip: Ipv4Addr, port: u16, node: u32) -> Result<Held> {
    lab.client
        .ns
        .spawn(move || {
            for _ in 0..200 {
                let mut c = Held::connect(vip, port)?;
                if c.ask()? == node {
                    return Ok(c);
                }
            }
            bail!("no connection landed on node {node} in 200 tries")
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
}

/// Which nodes `n` new connections to `vip:port` land on.
pub fn new_connections(lab: &Lab, vip: Ipv4Addr, port: u16, n: usize) -> Result<Vec<u32>> {
    lab.client
        .ns
        .spawn(move || (0..n).map(|_| Held::connect(vip, port)?.ask()).collect())
        .join()
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
}

/// Two nodes with agents (beating every 100 ms) and echo servers on `echo_port` behind a
/// daemon with one dsr-l2 TCP VIP `vip:vip_port` (0: all ports) of `routes` routes, both nodes
/// owning routes. Fields drop in order: servers, agents, daemon, files, namespaces.
pub struct TwoNodes {
    _servers: EchoServers,
    _agents: [ChildGuard; 2],
    _daemon: ChildGuard,
    pub setup: DaemonSetup,
    pub lab: Lab,
    pub key: VipKey,
}

impl TwoNodes {
    /// `extra_daemon` is appended to the config's `[daemon]`.
    pub fn up(
        vip: Ipv4Addr,
        vip_port: u16,
        echo_port: u16,
        routes: u32,
        conntrack_size: u32,
        extra_daemon: &str,
    ) -> Result<Self> {
        let lab = Lab::new(2)?;
        lab.add_dsr_vip(vip)?;
        let setup = DaemonSetup::dsr_many(
            &lab,
            &[vip],
            vip_port,
            "tcp",
            routes,
            conntrack_size,
            extra_daemon,
        )?;
        let daemon = setup.start(&lab, &[])?;
        let key = vip_key(vip.into(), vip_port, lb_common::PROTO_TCP);
        let agents = [
            setup.agent(&lab, 1, "100ms")?,
            setup.agent(&lab, 2, "100ms")?,
        ];
        setup.wait_routes(&key, Duration::from_secs(10), |r| {
            r.iter().any(|e| e.node == 1) && r.iter().any(|e| e.node == 2)
        })?;
        let servers =
            EchoServers::start(&[(&lab.nodes[0].ns, 1), (&lab.nodes[1].ns, 2)], echo_port)?;
        Ok(Self {
            _servers: servers,
            _agents: agents,
            _daemon: daemon,
            setup,
            lab,
            key,
        })
    }
}
