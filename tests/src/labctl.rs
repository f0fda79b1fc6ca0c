//! Operating a running lab (`lab::up`) from a test: its processes by role, found through the
//! lab's documented names (pid files `/run/<name>/pids/<role>.pid` holding `pid start-time`,
//! `argv[0]` = `<name>:<role>`, namespaces `<name>-<role>`), a node vanishing, the daemon and
//! an agent stopped and started again the way the lab starts them, and the `lb` CLI against
//! the lab's daemon. Processes are started with `lab::spawn`, so they look to `lab::down`
//! exactly like the lab's own (same `argv[0]`, pid file, log file, namespace).
use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

pub use crate::lab::alive;
use crate::lab::{self, Names, reap, start_time};

/// A lab that `lab::up` started, and the `lb` binary it runs.
pub struct LabCtl {
    pub names: Names,
    pub nodes: usize,
    pub lb: PathBuf,
}

impl LabCtl {
    pub fn new(names: Names, nodes: usize, lb: PathBuf) -> Self {
        Self { names, nodes, lb }
    }

    /// Namespace of node `i`.
    pub fn node_ns(&self, i: usize) -> String {
        self.names.ns(&format!("node{i}"))
    }

    /// The live pid of `role` (`daemon`, `agent-1`, `serve-2`, `decap-3`): its pid file names
    /// a process with the recorded start time.
    pub fn pid(&self, role: &str) -> Option<u32> {
        let s = fs::read_to_string(self.names.pid_dir().join(format!("{role}.pid"))).ok()?;
        let mut it = s.split_whitespace();
        let pid: u32 = it.next()?.parse().ok()?;
        let start: u64 = it.next()?.parse().ok()?;
        (alive(pid) && start_time(pid) == Some(start)).then_some(pid)
    }

    /// Sends `sig` to `role` and waits (5 s) until it is gone.
    pub fn kill(&self, role: &str, sig: i32) -> Result<()> {
        let pid = self
            .pid(role)
            .with_context(|| format!("{role} of lab {} is not running", self.names.name))?;
        // SAFETY: kill(2) of the lab's process, just seen alive with its recorded start time.
        unsafe { libc::kill(pid as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            reap(pid);
            if !alive(pid) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{role} ({pid}) still runs 5 s after signal {sig}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts `program args` in namespace `ns` as the lab does (`lab::spawn`): `argv[0]` =
    /// `<name>:<role>`, a session of its own, output appended to `logs/<role>.log`, pid file.
    pub fn spawn(&self, role: &str, ns: &str, program: &Path, args: &[OsString]) -> Result<u32> {
        lab::spawn(&self.names, role, ns, program.as_os_str(), args, false).map(|c| c.id())
    }

    /// Starts node `i`'s agent with the lab's arguments (a new incarnation).
    pub fn start_agent(&self, i: usize) -> Result<u32> {
        let args = lab::agent_args(&self.names, i);
        self.spawn(&format!("agent-{i}"), &self.node_ns(i), &self.lb, &args)
    }

    /// Stops the daemon with `sig` (SIGTERM: it exits leaving the program forwarding unless it
    /// was started with `--detach-on-exit`; SIGKILL: nothing runs its exit path).
    pub fn stop_daemon(&self, sig: i32) -> Result<()> {
        self.kill("daemon", sig)
    }

    /// Starts `lb run` in the gateway namespace with the lab's arguments (`--detach-on-exit`
    /// as the lab has it, or without, so a SIGTERM leaves the program forwarding), then waits
    /// (30 s) until its API answers with `active` nodes active. Returns how long that took.
    pub fn start_daemon(&self, detach_on_exit: bool, active: usize) -> Result<Duration> {
        let n = &self.names;
        let t0 = Instant::now();
        let mut args: Vec<OsString> = ["run", "--iface", "eth0", "--config"]
            .map(OsString::from)
            .to_vec();
        args.extend([
            n.config().into(),
            "--state-dir".into(),
            n.state_dir().into(),
        ]);
        if detach_on_exit {
            args.push("--detach-on-exit".into());
        }
        self.spawn("daemon", &n.ns("gw"), &self.lb, &args)?;
        self.wait_for("the restarted daemon", Duration::from_secs(30), || {
            ensure!(
                self.pid("daemon").is_some(),
                "the daemon exited; its log:\n{}",
                self.log_tail("daemon", 20)
            );
            Ok(self
                .status()
                .is_ok_and(|s| s["nodes"]["active"].as_u64() == Some(active as u64)))
        })?;
        Ok(t0.elapsed())
    }

    /// Node `i` vanishes as a crashed machine would: its link goes down first (so nothing it
    /// sends on the way out, such as the FINs of its closing sockets, escapes), then its agent,
    /// servers and decapsulator are killed.
    pub fn vanish_node(&self, i: usize) -> Result<()> {
        crate::netns::sh(&["ip", "-n", &self.node_ns(i), "link", "set", "eth0", "down"])?;
        for role in ["agent", "serve", "decap"] {
            self.kill(&format!("{role}-{i}"), libc::SIGKILL)?;
        }
        Ok(())
    }

    /// The lab daemon's log so far.
    pub fn log(&self, role: &str) -> String {
        fs::read_to_string(self.names.log_dir().join(format!("{role}.log"))).unwrap_or_default()
    }

    pub fn log_tail(&self, role: &str, lines: usize) -> String {
        let s = self.log(role);
        let v: Vec<&str> = s.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    /// `lb ARGS --socket <the lab's>`; its stdout, failing with its stderr.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.lb)
            .args(args)
            .arg("--socket")
            .arg(self.names.socket())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running lb {}", args.join(" ")))?;
        ensure!(
            out.status.success(),
            "lb {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// [`LabCtl::cli`] with `--json`, parsed.
    pub fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli(&a)?;
        serde_json::from_str(&out).with_context(|| format!("lb {} printed {out:?}", a.join(" ")))
    }

    /// `lb status --json`.
    pub fn status(&self) -> Result<serde_json::Value> {
        lab::lb_status(&self.lb, &self.names)
    }

    /// Node `id` as `lb node list --json` shows it.
    pub fn node(&self, id: u32) -> Result<serde_json::Value> {
        self.cli_json(&["node", "list"])?
            .as_array()
            .and_then(|a| a.iter().find(|n| n["id"] == id).cloned())
            .with_context(|| format!("node {id} is not listed"))
    }

    /// `state` of node `id` (`active`, `draining`, `down`).
    pub fn node_state(&self, id: u32) -> Result<String> {
        Ok(self.node(id)?["state"].as_str().unwrap_or("?").to_string())
    }

    /// Polls `f` every 20 ms until it says true; an error from `f` ends the wait.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        f: impl FnMut() -> Result<bool>,
    ) -> Result<Duration> {
        wait_for(what, timeout, f)
    }
}

/// Polls `f` every 20 ms until it says true, returning how long that took; an error from `f`
/// ends the wait, and so does `timeout`.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if f().with_context(|| format!("waiting for {what}"))? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
