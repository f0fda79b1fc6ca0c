//! Announcing this balancer's VIPs over BGP through an existing bird2 (`[bgp]`).
//!
//! The balancer does not speak BGP itself: the operator's bird.conf includes a file the balancer
//! owns (`bgp.routes_file`), which defines two static protocols, `lb_vips4` and `lb_vips6`, one
//! `route <vip>/32 blackhole;` (or `/128`) per VIP, and exports them to its BGP peers. To change
//! what is announced the balancer rewrites that file (atomically) and has bird re-read its
//! configuration (`birdc -s <socket> configure`); bird then updates its peers, and a router with
//! several balancers as equal paths spreads the VIPs' flows over them (ECMP). Withdrawing
//! everything writes the protocols without routes. The bird.conf this needs:
//! `docs/control-plane.md`, "Announcing VIPs over BGP (bird2)".
//!
//! The blackhole routes are only something to announce: bird.conf must not export them to this
//! box's kernel (the data plane, not the kernel, handles the VIPs' packets).
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    io::{Read as _, Write as _},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::config::BgpConfig;

/// The static protocol carrying the IPv4 VIPs (/32).
pub const PROTO_V4: &str = "lb_vips4";
/// The static protocol carrying the IPv6 VIPs (/128).
pub const PROTO_V6: &str = "lb_vips6";
/// How long `birdc configure` may take before it is killed and the call fails (bird answers in
/// milliseconds; a hung bird must not hang the balancer).
pub const BIRDC_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps bird announcing exactly a set of VIPs.
#[derive(Debug)]
pub struct Announcer {
    birdc: PathBuf,
    socket: PathBuf,
    routes_file: PathBuf,
    /// What bird was last told successfully.
    announced: BTreeSet<IpAddr>,
    /// `announced` is what the file says and bird runs: false before the first write and after
    /// a failed one (the next call then writes and reconfigures whatever it is given).
    synced: bool,
}

impl Announcer {
    pub fn new(cfg: &BgpConfig) -> Self {
        Self {
            birdc: cfg.birdc.clone(),
            socket: cfg.socket.clone(),
            routes_file: cfg.routes_file.clone(),
            announced: BTreeSet::new(),
            synced: false,
        }
    }

    /// Makes bird announce exactly `vips` (/32 and /128 routes); idempotent: writes the file
    /// (atomically) and reconfigures bird only when the set changed (or the last attempt
    /// failed). Errors carry context.
    pub fn announce(&mut self, vips: &BTreeSet<IpAddr>) -> Result<()> {
        if self.synced && &self.announced == vips {
            return Ok(());
        }
        self.synced = false;
        write_atomically(&self.routes_file, &render(vips)).with_context(|| {
            format!(
                "announcing {} VIPs: writing bird's include file {}",
                vips.len(),
                self.routes_file.display()
            )
        })?;
        self.configure().with_context(|| {
            format!(
                "announcing {} VIPs: {} was written but bird did not take it",
                vips.len(),
                self.routes_file.display()
            )
        })?;
        self.announced = vips.clone();
        self.synced = true;
        Ok(())
    }

    /// Announces nothing (shutdown, or a balancer that cannot serve).
    pub fn withdraw_all(&mut self) -> Result<()> {
        self.announce(&BTreeSet::new())
            .context("withdrawing every VIP")
    }

    /// The VIPs bird was last told to announce (empty before the first success).
    pub fn announced(&self) -> &BTreeSet<IpAddr> {
        &self.announced
    }

    /// `birdc -s <socket> configure`: bird re-reads bird.conf (and so the include file).
    fn configure(&self) -> Result<()> {
        let what = format!(
            "{} -s {} configure",
            self.birdc.display(),
            self.socket.display()
        );
        let out = run_with_timeout(
            Command::new(&self.birdc)
                .arg("-s")
                .arg(&self.socket)
                .arg("configure"),
            BIRDC_TIMEOUT,
        )
        .with_context(|| format!("running {what}"))?;
        check_configure_reply(out.success, &out.text).context(what)
    }
}

/// The include file for `vips`: both static protocols, always (an empty one is valid), so
/// bird.conf can refer to them whatever is announced.
pub fn render(vips: &BTreeSet<IpAddr>) -> String {
    let mut s = String::from(
        "# Written by the load balancer (lb, [bgp] routes_file): the VIPs it announces. Do not\n\
         # edit: it is rewritten whenever they change. bird.conf includes this file and exports\n\
         # these two protocols to its BGP peers, never to the kernel.\n",
    );
    for (name, channel, v4) in [(PROTO_V4, "ipv4", true), (PROTO_V6, "ipv6", false)] {
        let _ = writeln!(s, "protocol static {name} {{\n  {channel};");
        for vip in vips.iter().filter(|v| v.is_ipv4() == v4) {
            let len = if v4 { 32 } else { 128 };
            let _ = writeln!(s, "  route {vip}/{len} blackhole;");
        }
        s.push_str("}\n");
    }
    s
}

/// What `birdc configure` answered: bird took the configuration (now, or queued behind one in
/// progress), or why not in one line.
fn check_configure_reply(success: bool, text: &str) -> Result<()> {
    let took = text.lines().any(|l| {
        let l = l.trim();
        l == "Reconfigured"
            || l.starts_with("Reconfiguration in progress")
            || l.starts_with("Reconfiguration already in progress")
    });
    if success && took {
        return Ok(());
    }
    // The lines that say something: not the greeting, not the file being read.
    let said: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("BIRD ") && !l.starts_with("Reading configuration")
        })
        .collect();
    let said = if said.is_empty() {
        "no answer".to_string()
    } else {
        said.join("; ")
    };
    if success {
        bail!("bird did not confirm the new configuration: {said}");
    }
    bail!("failed: {said}")
}

/// Writes `path` through a temporary file in the same directory, synced, then renamed over it:
/// bird reads the old file or the new one, never half of one.
fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .context("the file has no directory")?;
    let name = path.file_name().context("the path names no file")?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| -> Result<()> {
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

struct Reply {
    success: bool,
    /// stdout and stderr.
    text: String,
}

/// Runs `cmd` to its end or kills it after `timeout`.
fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Reply> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Readers on threads: a chatty child must not block on a full pipe while we wait.
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = drain(child.stdout.take().map(|r| Box::new(r) as _));
    let err = drain(child.stderr.take().map(|r| Box::new(r) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("no answer within {timeout:?} (killed): is bird hung?");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut text = out.join().unwrap_or_default();
    text += &err.join().unwrap_or_default();
    Ok(Reply {
        success: status.success(),
        text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> BTreeSet<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn renders_both_protocols_one_route_per_vip() {
        let text = render(&set(&["198.18.100.2", "2001:db8:100::1", "198.18.100.1"]));
        let body: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            body,
            [
                "protocol static lb_vips4 {",
                "  ipv4;",
                "  route 198.18.100.1/32 blackhole;",
                "  route 198.18.100.2/32 blackhole;",
                "}",
                "protocol static lb_vips6 {",
                "  ipv6;",
                "  route 2001:db8:100::1/128 blackhole;",
                "}",
            ]
        );
        // Nothing announced: the protocols stay (bird.conf names them), without routes.
        let empty = render(&BTreeSet::new());
        assert!(!empty.contains("route "));
        assert!(empty.contains("protocol static lb_vips4 {\n  ipv4;\n}\n"));
        assert!(empty.contains("protocol static lb_vips6 {\n  ipv6;\n}\n"));
    }

    #[test]
    fn configure_replies() {
        let ok =
            "BIRD 2.0.12 ready.\nReading configuration from /etc/bird/bird.conf\nReconfigured\n";
        check_configure_reply(true, ok).unwrap();
        check_configure_reply(true, "Reconfiguration in progress\n").unwrap();
        check_configure_reply(
            true,
            "Reconfiguration already in progress, queueing new config\n",
        )
        .unwrap();
        let bad = "BIRD 2.0.12 ready.\nReading configuration from /etc/bird/bird.conf\n\
                   /etc/bird/lb-vips.conf:1:51 syntax error, unexpected CF_SYM_UNDEFINED\n";
        let e = format!("{:#}", check_configure_reply(false, bad).unwrap_err());
        assert_eq!(
            e,
            "failed: /etc/bird/lb-vips.conf:1:51 syntax error, unexpected CF_SYM_UNDEFINED"
        );
        let e = format!(
            "{:#}",
            check_configure_reply(
                false,
                "Unable to connect to server control socket (/x): No such file or directory\n"
            )
            .unwrap_err()
        );
        assert!(e.contains("Unable to connect"), "{e}");
        // Exit 0 without the confirmation is not taken for one.
        let e = format!("{:#}", check_configure_reply(true, "").unwrap_err());
        assert_eq!(e, "bird did not confirm the new configuration: no answer");
    }

    /// A stand-in `birdc`: a shell script that records its arguments and answers what
    /// [`reply`] last set. (Written once per test: rewriting an executable while another
    /// test thread forks could make running it fail with ETXTBSY.)
    fn fake_birdc(dir: &Path, answer: &str, code: i32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let p = dir.join("birdc");
        let d = dir.display();
        fs::write(
            &p,
            format!(
                "#!/bin/sh\necho \"$@\" >> '{d}/calls'\ncat '{d}/reply'\nexit $(cat '{d}/code')\n"
            ),
        )
        .unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        reply(dir, answer, code);
        p
    }

    fn reply(dir: &Path, answer: &str, code: i32) {
        fs::write(dir.join("reply"), format!("{answer}\n")).unwrap();
        fs::write(dir.join("code"), code.to_string()).unwrap();
    }

    fn calls(dir: &Path) -> Vec<String> {
        fs::read_to_string(dir.join("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn announces_only_changes_and_retries_after_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = BgpConfig {
            birdc: fake_birdc(dir.path(), "Reconfigured", 0),
            socket: dir.path().join("bird.ctl"),
            routes_file: dir.path().join("vips.conf"),
        };
        let mut a = Announcer::new(&cfg);
        let one = set(&["198.18.100.1"]);
        a.announce(&one).unwrap();
        assert_eq!(fs::read_to_string(&cfg.routes_file).unwrap(), render(&one));
        let sock = cfg.socket.display().to_string();
        assert_eq!(calls(dir.path()), [format!("-s {sock} configure")]);
        assert_eq!(a.announced(), &one);
        // The same set again: no write, no birdc.
        fs::write(&cfg.routes_file, "left alone").unwrap();
        a.announce(&one).unwrap();
        assert_eq!(calls(dir.path()).len(), 1);
        assert_eq!(fs::read_to_string(&cfg.routes_file).unwrap(), "left alone");
        // Withdrawing: a file without routes, one more configure.
        a.withdraw_all().unwrap();
        assert_eq!(
            fs::read_to_string(&cfg.routes_file).unwrap(),
            render(&set(&[]))
        );
        assert_eq!(calls(dir.path()).len(), 2);
        assert!(a.announced().is_empty());
        // No temporary file left beside it.
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("tmp"))
            .collect();
        assert!(names.is_empty(), "{names:?}");

        // bird refuses: the error says so, and the same set is tried again next time.
        reply(dir.path(), "vips.conf:1:1 syntax error", 1);
        let e = format!("{:#}", a.announce(&one).unwrap_err());
        assert!(
            e.contains("announcing 1 VIPs") && e.contains("syntax error"),
            "{e}"
        );
        assert!(a.announced().is_empty(), "not announced: bird refused");
        reply(dir.path(), "Reconfigured", 0);
        a.announce(&one).unwrap();
        assert_eq!(a.announced(), &one);
        assert_eq!(calls(dir.path()).len(), 4);
    }

    #[test]
    fn errors_name_what_failed() {
        let dir = tempfile::tempdir().unwrap();
        // The include file's directory does not exist.
        let cfg = BgpConfig {
            birdc: fake_birdc(dir.path(), "Reconfigured", 0),
            socket: dir.path().join("bird.ctl"),
            routes_file: dir.path().join("missing/vips.conf"),
        };
        let e = format!(
            "{:#}",
            Announcer::new(&cfg)
                .announce(&set(&["10.0.0.1"]))
                .unwrap_err()
        );
        assert!(
            e.contains("writing bird's include file") && e.contains("missing/vips.conf"),
            "{e}"
        );
        // No such birdc.
        let cfg = BgpConfig {
            birdc: dir.path().join("no-birdc"),
            socket: dir.path().join("bird.ctl"),
            routes_file: dir.path().join("vips.conf"),
        };
        let e = format!("{:#}", Announcer::new(&cfg).withdraw_all().unwrap_err());
        assert!(
            e.contains("withdrawing every VIP") && e.contains("no-birdc -s"),
            "{e}"
        );
        // A birdc that hangs is killed after the timeout.
        let hang = dir.path().join("hang");
        fs::write(&hang, "#!/bin/sh\nexec sleep 60\n").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&hang, fs::Permissions::from_mode(0o755)).unwrap();
        let start = Instant::now();
        let e = run_with_timeout(&mut Command::new(&hang), Duration::from_millis(200))
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("no answer within 200ms"), "{e:#}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
