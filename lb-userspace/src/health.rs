//! Active health checks for nodes without an agent: TCP connect, optionally an HTTP GET that
//! must answer 2xx/3xx.
//!
//! The decision (rise/fall counting) is the pure [`RiseFall`]; [`HealthChecker`] runs probes as
//! a task on the daemon's tokio runtime and sends the resulting membership [`Event`]s (`NodeUp` /
//! `NodeDown{HealthCheck}`) down a channel to the controller loop. The daemon picks a source per node: heartbeats ([`crate::membership`]) or a
//! checker; both speak the same event type.
use crate::membership::{DownReason, Event};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc,
};

/// Health-check settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCfg {
    /// Time between probe starts.
    pub interval: Duration,
    /// Whole-probe timeout (connect, and the HTTP exchange).
    pub timeout: Duration,
    /// Consecutive successes to become up.
    pub rise: u32,
    /// Consecutive failures to become down.
    pub fall: u32,
    /// `Some("/healthz")`: send `GET /healthz` and require a 2xx/3xx status.
    pub http_path: Option<String>,
    /// Host header for HTTP (default: the target address).
    pub http_host: Option<String>,
}

impl Default for HealthCfg {
    fn default() -> Self {
        HealthCfg {
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 3,
            http_path: None,
            http_host: None,
        }
    }
}

/// Rise/fall counting. The state starts unknown; `rise` successes in a row make it up, `fall`
/// failures in a row make it down; a transition is reported once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RiseFall {
    rise: u32,
    fall: u32,
    up: Option<bool>,
    streak: u32,
    last_ok: bool,
}

impl RiseFall {
    /// `rise` and `fall` below 1 count as 1.
    pub fn new(rise: u32, fall: u32) -> RiseFall {
        RiseFall {
            rise: rise.max(1),
            fall: fall.max(1),
            up: None,
            streak: 0,
            last_ok: false,
        }
    }

    /// Counting that starts decided (`up`, e.g. from a first probe): a change then takes
    /// `rise` successes or `fall` failures in a row.
    pub fn decided(up: bool, rise: u32, fall: u32) -> RiseFall {
        RiseFall {
            up: Some(up),
            streak: 1,
            last_ok: up,
            ..RiseFall::new(rise, fall)
        }
    }

    /// `Some(true)` up, `Some(false)` down, `None` not decided yet.
    pub fn state(&self) -> Option<bool> {
        self.up
    }

    /// Records a probe result; returns the new state on a transition.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.last_ok {
            self.streak = self.streak.saturating_add(1);
        } else {
            self.last_ok = ok;
            self.streak = 1;
        }
        let need = if ok { self.rise } else { self.fall };
        if self.streak >= need && self.up != Some(ok) {
            self.up = Some(ok);
            return Some(ok);
        }
        None
    }

    /// The membership event for a transition of `node`.
    pub fn event(node: u32, up: bool) -> Event {
        if up {
            Event::NodeUp {
                node,
                weight: 0,
                draining: false,
            }
        } else {
            Event::NodeDown {
                node,
                reason: DownReason::HealthCheck,
            }
        }
    }
}

/// One probe: TCP connect to `target` and, with `cfg.http_path`, a GET with a 2xx/3xx answer,
/// all within `cfg.timeout`. `Err` says what failed.
pub async fn probe(target: SocketAddr, cfg: &HealthCfg) -> Result<(), String> {
    match tokio::time::timeout(cfg.timeout, probe_inner(target, cfg)).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {:?}", cfg.timeout)),
    }
}

async fn probe_inner(target: SocketAddr, cfg: &HealthCfg) -> Result<(), String> {
    let mut s = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect {target}: {e}"))?;
    let Some(path) = &cfg.http_path else {
        return Ok(());
    };
    let host = cfg.http_host.clone().unwrap_or_else(|| target.to_string());
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: lb-health\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send request: {e}"))?;
    let mut buf = [0u8; 256];
    let mut got = 0;
    while !buf[..got].contains(&b'\n') && got < buf.len() {
        match s.read(&mut buf[got..]).await {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(format!("read status: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&buf[..got]);
    let line = line.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    let status = match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => code.parse::<u16>().ok(),
        _ => None,
    };
    match status {
        Some(200..=399) => Ok(()),
        Some(code) => Err(format!("HTTP status {code}")),
        None => Err(format!("not an HTTP status line: {line:?}")),
    }
}

/// A running checker: a task on the daemon's runtime; dropping it stops the task.
#[derive(Debug)]
pub struct HealthChecker {
    task: tokio::task::JoinHandle<()>,
}

impl HealthChecker {
    /// Probes `target` every `cfg.interval` on a task of the current tokio runtime, sending
    /// `(node, event)` on each rise/fall transition. The task ends when the checker is dropped
    /// or `events` closes.
    pub fn spawn(
        node: u32,
        target: SocketAddr,
        cfg: HealthCfg,
        events: mpsc::UnboundedSender<(u32, Event)>,
    ) -> HealthChecker {
        let task = tokio::spawn(async move {
            let mut rf = RiseFall::new(cfg.rise, cfg.fall);
            let mut every = tokio::time::interval(cfg.interval);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let result = probe(target, &cfg).await;
                if let Err(e) = &result {
                    tracing::debug!("health check of node {node} ({target}): {e}");
                }
                if let Some(up) = rf.record(result.is_ok()) {
                    tracing::info!(
                        "node {node} ({target}) health check: {}",
                        if up { "up" } else { "down" }
                    );
                    if events.send((node, RiseFall::event(node, up))).is_err() {
                        return;
                    }
                }
            }
        });
        HealthChecker { task }
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{Read as _, Write as _},
        net::TcpListener,
        thread,
    };

    #[test]
    fn rise_and_fall() {
        let mut rf = RiseFall::new(2, 3);
        assert_eq!(rf.state(), None);
        assert_eq!(rf.record(true), None);
        assert_eq!(rf.record(true), Some(true));
        assert_eq!(rf.record(true), None, "reported once");
        assert_eq!(rf.record(false), None);
        assert_eq!(rf.record(false), None);
        assert_eq!(rf.record(true), None, "a success resets the failure streak");
        assert_eq!(rf.record(false), None);
        assert_eq!(rf.record(false), None);
        assert_eq!(rf.record(false), Some(false));
        assert_eq!(rf.record(false), None);
        assert_eq!(rf.record(true), None);
        assert_eq!(rf.record(false), None);
        assert_eq!(rf.record(true), None);
        assert_eq!(rf.record(true), Some(true));
        assert_eq!(rf.state(), Some(true));
    }

    #[test]
    fn starts_down_after_fall_failures_and_minimums() {
        let mut rf = RiseFall::new(0, 0); // treated as 1/1
        assert_eq!(rf.record(false), Some(false));
        assert_eq!(rf.record(true), Some(true));
        let mut rf = RiseFall::new(5, 2);
        assert_eq!(rf.record(false), None);
        assert_eq!(rf.record(false), Some(false));
        assert_eq!(
            RiseFall::event(4, false),
            Event::NodeDown {
                node: 4,
                reason: DownReason::HealthCheck
            }
        );
        assert_eq!(
            RiseFall::event(4, true),
            Event::NodeUp {
                node: 4,
                weight: 0,
                draining: false
            }
        );
    }

    fn cfg() -> HealthCfg {
        HealthCfg {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(500),
            rise: 1,
            fall: 2,
            http_path: None,
            http_host: None,
        }
    }

    #[tokio::test]
    async fn tcp_check_up_then_down() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(probe(addr, &cfg()).await, Ok(()));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let checker = HealthChecker::spawn(9, addr, cfg(), tx);
        let next = Duration::from_secs(5);
        let (node, ev) = tokio::time::timeout(next, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((node, ev), (9, RiseFall::event(9, true)));
        drop(l);
        let (_, ev) = tokio::time::timeout(next, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            ev,
            Event::NodeDown {
                node: 9,
                reason: DownReason::HealthCheck
            }
        );
        assert!(probe(addr, &cfg()).await.is_err());
        // Dropping the checker stops it: the channel closes.
        drop(checker);
        assert_eq!(tokio::time::timeout(next, rx.recv()).await.unwrap(), None);
    }

    fn http_server(status: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            for s in l.incoming().take(1) {
                let mut s = s.unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).unwrap();
                assert!(buf[..n].starts_with(b"GET /healthz HTTP/1.0\r\n"));
                let _ = s.write_all(
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                );
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_check() {
        let mut c = cfg();
        c.http_path = Some("/healthz".into());
        assert_eq!(probe(http_server("200 OK"), &c).await, Ok(()));
        assert_eq!(probe(http_server("302 Found"), &c).await, Ok(()));
        assert_eq!(
            probe(http_server("503 Unavailable"), &c).await,
            Err("HTTP status 503".into())
        );
        // A TCP listener that never answers: timeout.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        c.timeout = Duration::from_millis(100);
        let t = std::time::Instant::now();
        assert!(probe(l.local_addr().unwrap(), &c).await.is_err());
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
