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

use crate::netns::Netns;

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
