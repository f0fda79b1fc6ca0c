//! One etcd server (Debian's `etcd-server`, installed by `cargo xtask setup`) for the cluster
//! suites, inside a lab namespace or on free loopback ports, on a temporary data dir; killed
//! (and the dir removed) when dropped. `kill` and `run` stop and start it again on the same
//! data.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    daemon::TempDir,
    netns::{Netns, spawn_in},
};

pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;

pub struct Etcd {
    child: Option<Child>,
    dir: TempDir,
    /// The namespace it runs in (`None`: this process's).
    ns: Option<String>,
    ip: Ipv4Addr,
    client_port: u16,
    peer_port: u16,
}

/// The etcd binary (setup installs it; its absence fails the suite with this message).
pub fn binary() -> Result<PathBuf> {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("etcd is not installed: run `cargo xtask setup` (it installs etcd-server)")
}

impl Etcd {
    /// Starts etcd in namespace `ns` on `ip` and waits until it answers.
    pub fn start(ns: &Netns, ip: Ipv4Addr) -> Result<Self> {
        let mut e = Self {
            child: None,
            dir: TempDir::new("etcd")?,
            ns: Some(ns.name.clone()),
            ip,
            client_port: CLIENT_PORT,
            peer_port: PEER_PORT,
        };
        e.run()?;
        Ok(e)
    }

    /// Starts etcd on 127.0.0.1 (this process's namespace) on free ports.
    pub fn start_local() -> Result<Self> {
        let free = || -> Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let mut e = Self {
            child: None,
            dir: TempDir::new("etcd")?,
            ns: None,
            ip: Ipv4Addr::LOCALHOST,
            client_port: free()?,
            peer_port: free()?,
        };
        e.run()?;
        Ok(e)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.ip, self.client_port)
    }

    fn log(&self) -> PathBuf {
        self.dir.0.join("etcd.log")
    }

    /// Starts etcd on its data dir (again, after [`Etcd::kill`]) and waits until it answers.
    pub fn run(&mut self) -> Result<()> {
        let peer = format!("http://{}:{}", self.ip, self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())?;
        let mut cmd = match &self.ns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(binary()?);
                c
            }
            None => std::process::Command::new(binary()?),
        };
        let child = cmd
            .arg("--name=lbtest")
            .arg(format!("--data-dir={}", self.dir.0.join("data").display()))
            .arg(format!("--listen-client-urls={}", self.endpoint()))
            .arg(format!("--advertise-client-urls={}", self.endpoint()))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=lbtest={peer}"))
            .arg("--initial-cluster-state=new")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd")?;
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(st) = c.try_wait()?
            {
                bail!("etcd exited ({st}) at start: {}", self.tail());
            }
            if self.healthy() {
                break;
            }
            if started.elapsed() > Duration::from_secs(20) {
                bail!("etcd not ready within 20 s: {}", self.tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        println!(
            "etcd on {} ready in {} ms",
            self.endpoint(),
            started.elapsed().as_millis()
        );
        Ok(())
    }

    /// Whether etcd answers `GET /health` with `"health":"true"` (asked from its namespace).
    pub fn healthy(&self) -> bool {
        let addr = SocketAddr::from((self.ip, self.client_port));
        let ask = move || -> Result<bool> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(300))?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            s.write_all(b"GET /health HTTP/1.0\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body.contains("\"health\":\"true\""))
        };
        match &self.ns {
            Some(ns) => spawn_in(ns, ask).join().ok().and_then(|r| r.ok()),
            None => ask().ok(),
        }
        .unwrap_or(false)
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Kills etcd (SIGKILL), keeping its data.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
