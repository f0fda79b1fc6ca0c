//! Network namespaces for end-to-end tests. Every namespace and link gets a unique name and is
//! removed in `Drop`, so a failing test leaves nothing behind.
use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread::JoinHandle,
};

use anyhow::{Context as _, Result, bail};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique short prefix for names (interface names are limited to 15 bytes).
pub fn unique_prefix() -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("t{}{}", std::process::id() % 100_000, n)
}

/// Runs a command, failing with its stderr if it fails.
pub fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?}"))?;
    check(args, out)
}

fn check(args: &[&str], out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace, deleted on drop (which also deletes the links inside it).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Result<Self> {
        // A stale namespace of the same name (a killed earlier run) is replaced.
        let _ = sh(&["ip", "netns", "del", name]);
        sh(&["ip", "netns", "add", name])?;
        let ns = Self { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// Runs a command inside the namespace and waits for it.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// A command prepared to run inside the namespace. `nsenter --net` enters only the network
    /// namespace (`ip netns exec` would also give it a private /sys, hiding the bpffs at
    /// /sys/fs/bpf, so a daemon's pins would be invisible to the test and to its next start).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs many `ip` commands (one per line, without the leading `ip`) in one `ip -batch`
    /// process inside the namespace: much faster than one process each.
    pub fn ip_batch(&self, lines: &[String]) -> Result<()> {
        use std::io::Write as _;
        let mut child = Command::new("ip")
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running ip -batch")?;
        {
            let mut stdin = child.stdin.take().context("ip -batch stdin")?;
            for l in lines {
                writeln!(stdin, "{l}")?;
            }
        }
        let out = child.wait_with_output().context("waiting for ip -batch")?;
        check(&["ip", "-n", &self.name, "-batch", "-"], out).map(|_| ())
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it opens live there.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> JoinHandle<Result<T>> {
        spawn_in(&self.name, f)
    }
}

/// Runs `f` on a thread inside the namespace called `name`.
pub fn spawn_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> JoinHandle<Result<T>> {
    let path = PathBuf::from("/run/netns").join(name);
    std::thread::spawn(move || {
        enter(&path)?;
        f()
    })
}

/// Moves the calling thread into the namespace at `path`.
pub fn enter(path: &std::path::Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: setns on a valid namespace fd affects only the calling thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "setns {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The calling thread working in a namespace of its own until dropped: then the thread goes
/// back to the namespace it came from and the namespace is deleted. (`BPF_PROG_TEST_RUN` runs a
/// program as if received on the calling thread's namespace's `lo`.)
pub struct ThreadNetns {
    home: File,
    _ns: Netns,
}

impl ThreadNetns {
    pub fn enter(ns: Netns) -> Result<Self> {
        let home = File::open("/proc/thread-self/ns/net").context("opening our namespace")?;
        enter(&PathBuf::from("/run/netns").join(&ns.name))?;
        Ok(Self { home, _ns: ns })
    }
}

impl Drop for ThreadNetns {
    fn drop(&mut self) {
        // SAFETY: setns back to the namespace this thread came from (a valid fd we own).
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// A child process killed (and reaped) on drop.
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    pub fn pid(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }

    /// Sends a signal (e.g. `libc::SIGTERM`) and waits for exit.
    pub fn signal_and_wait(&mut self, sig: i32) -> Result<std::process::ExitStatus> {
        let mut child = self.0.take().context("process already gone")?;
        // SAFETY: kill(2) with a pid we own.
        unsafe { libc::kill(child.id() as i32, sig) };
        child.wait().context("waiting for child")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A host in a [`Lab`]: its namespace, address and MAC on the shared segment.
pub struct Host {
    pub ns: Netns,
    pub ip: std::net::Ipv4Addr,
    pub mac: [u8; 6],
    /// Interface name inside the namespace.
    pub ifname: String,
}

impl Host {
    /// A new namespace `ns_name` on the bridge `br0` of `bridge` through a veth (`peer` on the
    /// bridge side, `eth0` inside): MAC `02:00:00:00:00:<last>`, address `198.18.0.<last>/24`,
    /// reverse-path filtering off (the balancer's forwarded frames keep the client's source).
    pub fn attach(bridge: &Netns, ns_name: &str, peer: &str, last: u8) -> Result<Self> {
        let ns = Netns::new(ns_name)?;
        let mac = [0x02, 0x00, 0x00, 0x00, 0x00, last];
        bridge.ip(&[
            "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])?;
        bridge.ip(&["link", "set", peer, "master", "br0", "up"])?;
        ns.ip(&["link", "set", "eth0", "address", &mac_str(&mac), "up"])?;
        let ip: std::net::Ipv4Addr = format!("{LAB_NET}.{last}").parse()?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        ns.sysctl("net.ipv4.conf.eth0.rp_filter", "0")?;
        Ok(Self {
            ns,
            ip,
            mac,
            ifname: "eth0".into(),
        })
    }
}

/// One L2 segment (a bridge in its own namespace) with a client, a balancer and `n` nodes.
/// Addresses: 198.18.0.1 client, .2 balancer, .11.. nodes (198.18.0.0/15 is the benchmarking
/// range; it only exists inside these namespaces).
pub struct Lab {
    pub prefix: String,
    pub client: Host,
    pub lb: Host,
    pub nodes: Vec<Host>,
    /// Declared last: dropped after the hosts.
    pub bridge: Netns,
}

pub const LAB_NET: &str = "198.18.0";

impl Lab {
    pub fn new(n_nodes: usize) -> Result<Self> {
        let prefix = unique_prefix();
        let bridge = Netns::new(&format!("{prefix}br"))?;
        bridge.ip(&["link", "add", "br0", "type", "bridge"])?;
        bridge.ip(&["link", "set", "br0", "up"])?;
        let mk = |name: &str, last: u8| {
            Host::attach(
                &bridge,
                &format!("{prefix}{name}"),
                &format!("{prefix}{name}p"),
                last,
            )
        };
        let client = mk("c", 1)?;
        let lb = mk("l", 2)?;
        let nodes = (0..n_nodes)
            .map(|i| mk(&format!("n{i}"), 11 + i as u8))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            prefix,
            client,
            lb,
            nodes,
            bridge,
        })
    }

    /// Makes `vip` reachable for DSR: the client routes it via the balancer, every node holds
    /// it on loopback (LVS-DR) and does not answer ARP for it.
    pub fn add_dsr_vip(&self, vip: std::net::Ipv4Addr) -> Result<()> {
        self.client.ns.ip(&[
            "route",
            "add",
            &format!("{vip}/32"),
            "via",
            &self.lb.ip.to_string(),
        ])?;
        for n in &self.nodes {
            n.ns.ip(&["addr", "add", &format!("{vip}/32"), "dev", "lo"])?;
            n.ns.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
            n.ns.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
        }
        Ok(())
    }

    /// [`Lab::add_dsr_vip`] for many VIPs at once (one `ip -batch` per host).
    pub fn add_dsr_vips(&self, vips: &[std::net::Ipv4Addr]) -> Result<()> {
        let via = self.lb.ip.to_string();
        let client: Vec<String> = vips
            .iter()
            .map(|v| format!("route add {v}/32 via {via}"))
            .collect();
        self.client.ns.ip_batch(&client)?;
        let lo: Vec<String> = vips
            .iter()
            .map(|v| format!("addr add {v}/32 dev lo"))
            .collect();
        for n in &self.nodes {
            n.ns.ip_batch(&lo)?;
            n.ns.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
            n.ns.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
        }
        Ok(())
    }
}

pub fn mac_str(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Sends raw Ethernet frames out of `ifname` through an `AF_PACKET` socket of the calling
/// thread's namespace (a flood generator: the frames need not belong to any socket), `batch`
/// at a time with `pause` between batches so the receiver's backlog is not simply overrun.
/// Returns how many the kernel took.
pub fn send_frames(
    ifname: &str,
    frames: impl Iterator<Item = Vec<u8>>,
    batch: usize,
    pause: std::time::Duration,
) -> Result<u64> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    let name = std::ffi::CString::new(ifname)?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("no interface {ifname} in this namespace");
    }
    // SAFETY: plain socket(2); protocol 0 = send only.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_ifindex = index as i32;
    to.sll_halen = 6;
    let mut sent = 0u64;
    for (i, f) in frames.enumerate() {
        if i > 0 && i % batch == 0 {
            std::thread::sleep(pause);
        }
        // SAFETY: the frame and the address outlive the call; sizes are theirs.
        let r = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                f.as_ptr().cast(),
                f.len(),
                0,
                (&raw const to).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r >= 0 {
            sent += 1;
        } else {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOBUFS) {
                bail!("sending a frame on {ifname}: {e}");
            }
        }
    }
    Ok(sent)
}
