//! Background writer for the state file.
//!
//! Writing `state.json` (serialize, fsync, rename, fsync the directory) takes milliseconds and
//! much longer on a busy disk; done inline after every membership event it stalls heartbeat
//! processing and makes nodes flap. The daemon instead hands each new [`State`] to a
//! [`Persister`] and goes on: one thread writes, at most one write is in flight, and a state
//! submitted meanwhile replaces any older one still waiting (only the latest matters, since
//! each is complete). A failed write is logged and retried with backoff until it succeeds or a
//! newer state arrives, so a full or read-only disk is loud but never blocks membership.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    thread,
    time::{Duration, Instant},
};

use tracing::{error, info};

use crate::state::{STATE_FILE, State};

/// First retry delay after a failed write; doubles per failure up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// The same error is logged at most this often (each failure is still counted).
const LOG_REPEAT: Duration = Duration::from_secs(1);
/// How long dropping a [`Persister`] waits for the pending write (a hung disk must not hang
/// the daemon's exit).
const STOP_WAIT: Duration = Duration::from_secs(5);

/// What the writer has done so far (for logs and status output).
#[derive(Clone, Debug, Default)]
pub struct PersistStats {
    /// States written to disk.
    pub writes: u64,
    /// Failed write attempts (every retry counts).
    pub failures: u64,
    /// Submitted states never written because a newer one replaced them.
    pub coalesced: u64,
    /// The latest write error; cleared by the next successful write.
    pub last_error: Option<String>,
    /// How long the last successful write took (serialize, fsync, rename, fsync).
    pub last_write: Option<Duration>,
    /// Something submitted is not on disk yet.
    pub pending: bool,
}

/// Owns the writer thread of one state directory. Dropping it writes what is pending (waiting
/// a bounded time) and stops the thread.
pub struct Persister {
    shared: Arc<Shared>,
    path: PathBuf,
    thread: Option<thread::JoinHandle<()>>,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Signalled on every change of `inner` (new state, write done, stop, exit).
    changed: Condvar,
}

#[derive(Default)]
struct Inner {
    /// The newest submitted state the writer has not taken yet.
    next: Option<State>,
    /// Sequence number of the newest submission (0: none yet).
    submitted: u64,
    /// Sequence number of the newest state on disk.
    written: u64,
    /// Asked to stop (after writing what is pending).
    stop: bool,
    /// The writer thread has exited (or never started).
    done: bool,
    stats: PersistStats,
}

impl Shared {
    /// The lock, also after a panic elsewhere (the fields stay consistent at every unlock).
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_for<'a>(
        &self,
        g: MutexGuard<'a, Inner>,
        timeout: Option<Duration>,
    ) -> MutexGuard<'a, Inner> {
        match timeout {
            Some(t) => {
                self.changed
                    .wait_timeout(g, t)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
            None => self.changed.wait(g).unwrap_or_else(PoisonError::into_inner),
        }
    }
}

impl Persister {
    /// Starts the writer thread for `dir/state.json`.
    pub fn spawn(dir: PathBuf) -> Persister {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            changed: Condvar::new(),
        });
        let path = dir.join(STATE_FILE);
        let worker = shared.clone();
        let thread = thread::Builder::new()
            .name("lb-persist".into())
            .spawn(move || {
                let _done = Done(&worker);
                write_loop(&worker, &dir);
            });
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                // Not fatal here: flush() reports it, and the daemon decides.
                let msg = format!(
                    "state file {}: cannot start the writer: {e}",
                    path.display()
                );
                error!("{msg}");
                let mut g = shared.lock();
                g.done = true;
                g.stats.last_error = Some(msg);
                None
            }
        };
        Persister {
            shared,
            path,
            thread,
        }
    }

    /// Hands over the newest state; returns at once. At most one write is in flight; a state
    /// submitted while one is written replaces any older pending one (the latest wins).
    pub fn submit(&self, state: State) {
        let mut g = self.shared.lock();
        g.submitted += 1;
        let replaced = g.next.replace(state);
        if replaced.is_some() {
            g.stats.coalesced += 1;
        }
        drop(g);
        self.shared.changed.notify_all();
        // Freed outside the lock.
        drop(replaced);
    }

    /// Blocks until everything submitted so far is on disk or `timeout` passes; the last error
    /// if the newest state could not be written.
    pub fn flush(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now().checked_add(timeout);
        let mut g = self.shared.lock();
        let target = g.submitted;
        while g.written < target {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if g.done || left == Some(Duration::ZERO) {
                return Err(match &g.stats.last_error {
                    Some(e) => e.clone(),
                    None if g.done => {
                        format!("state file {}: the writer has stopped", self.path.display())
                    }
                    None => format!(
                        "state file {}: not written within {timeout:?}",
                        self.path.display()
                    ),
                });
            }
            g = self.shared.wait_for(g, left);
        }
        Ok(())
    }

    pub fn stats(&self) -> PersistStats {
        let g = self.shared.lock();
        PersistStats {
            pending: g.written < g.submitted,
            ..g.stats.clone()
        }
    }
}

impl Drop for Persister {
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = Instant::now() + STOP_WAIT;
        let mut g = self.shared.lock();
        g.stop = true;
        self.shared.changed.notify_all();
        while !g.done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Leave the thread to finish (or hang) on its own.
                error!(
                    "state file {}: still writing after {STOP_WAIT:?}; the newest state may be missing",
                    self.path.display()
                );
                return;
            }
            g = self.shared.wait_for(g, Some(left));
        }
        drop(g);
        let _ = thread.join();
    }
}

/// Marks the writer as exited, however it exits (a panic included), so waiters do not hang.
struct Done<'a>(&'a Shared);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.lock().done = true;
        self.0.changed.notify_all();
    }
}

/// A state whose write failed, and when to try again.
struct Retry {
    seq: u64,
    state: State,
    at: Instant,
}

/// The writer thread: take the newest state (or the one to retry), write it unlocked, record
/// the result; until stopped with nothing left to write.
fn write_loop(shared: &Shared, dir: &Path) {
    let path = dir.join(STATE_FILE);
    let mut retry: Option<Retry> = None;
    let mut backoff = RETRY_FIRST;
    let mut log = ErrorLog::default();
    let mut g = shared.lock();
    loop {
        let (seq, state) = if let Some(state) = g.next.take() {
            // A newer state supersedes one waiting for a retry: write it instead, now.
            if retry.take().is_some() {
                g.stats.coalesced += 1;
            }
            (g.submitted, state)
        } else if let Some(r) = retry.take_if(|r| g.stop || r.at <= Instant::now()) {
            (r.seq, r.state)
        } else if g.stop {
            break;
        } else {
            let timeout = retry
                .as_ref()
                .map(|r| r.at.saturating_duration_since(Instant::now()));
            g = shared.wait_for(g, timeout);
            continue;
        };
        let stopping = g.stop;
        drop(g);
        let start = Instant::now();
        let result = state.save(dir);
        let took = start.elapsed();
        // Written: let go of the state (its tables are shared with the daemon, which would
        // otherwise copy each one it changes next) before anyone is told.
        let state = result.is_err().then_some(state);
        g = shared.lock();
        match result {
            Ok(()) => {
                g.written = g.written.max(seq);
                g.stats.writes += 1;
                g.stats.last_write = Some(took);
                g.stats.last_error = None;
                backoff = RETRY_FIRST;
                log.recovered(&path);
            }
            Err(e) => {
                let msg = e.to_string();
                g.stats.failures += 1;
                g.stats.last_error = Some(msg.clone());
                if stopping {
                    error!("giving up on the daemon state: {msg}");
                } else if let Some(state) = state {
                    log.failed(&msg, backoff);
                    retry = Some(Retry {
                        seq,
                        state,
                        at: Instant::now() + backoff,
                    });
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
        shared.changed.notify_all();
    }
}

/// Logs every write failure, except that the same error repeated within [`LOG_REPEAT`] is
/// counted and reported with the next log line instead.
#[derive(Default)]
struct ErrorLog {
    last: Option<(String, Instant)>,
    suppressed: u64,
    failed: u64,
}

impl ErrorLog {
    fn failed(&mut self, msg: &str, retry_in: Duration) {
        self.failed += 1;
        if let Some((last, at)) = &self.last
            && last == msg
            && at.elapsed() < LOG_REPEAT
        {
            self.suppressed += 1;
            return;
        }
        let also = match self.suppressed {
            0 => String::new(),
            n => format!(" ({n} more failures since the last report)"),
        };
        error!("cannot write the daemon state: {msg}; retrying in {retry_in:?}{also}");
        self.last = Some((msg.to_owned(), Instant::now()));
        self.suppressed = 0;
    }

    fn recovered(&mut self, path: &Path) {
        if self.failed > 0 {
            info!(
                "state file {} written after {} failed attempts",
                path.display(),
                self.failed
            );
        }
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::routes::RouteTable;
    use crate::{
        routes::NodeState,
        state::{NodeRecord, VipRecord},
    };

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lb-persist-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// A realistic state: 20 nodes, one 65536-route VIP; `seq` marks which one it is.
    fn state(seq: u64) -> State {
        let mut table = RouteTable::new(65536).unwrap();
        let mut s = State::new();
        for id in 0..20 {
            table.join(id, id + 1).unwrap();
            s.nodes.insert(
                id,
                NodeRecord {
                    weight: id + 1,
                    status: NodeState::Active,
                    advertised_weight: 0,
                    agent_draining: None,
                    restarting: false,
                    incarnation: Some(1),
                    sequence: Some(seq),
                },
            );
        }
        s.vips.push(VipRecord {
            addr: "198.18.0.100".parse().unwrap(),
            port: 80,
            proto: 6,
            index: 0,
            table: Arc::new(table),
            moved: vec![(0, 99)],
        });
        s
    }

    fn with_seq(base: &State, seq: u64) -> State {
        let mut s = base.clone();
        for n in s.nodes.values_mut() {
            n.sequence = Some(seq);
        }
        s
    }

    #[test]
    fn rapid_submits_coalesce_and_the_last_state_wins() {
        let d = tmpdir("burst");
        let p = Persister::spawn(d.clone());
        assert!(p.flush(Duration::ZERO).is_ok(), "nothing submitted");
        let base = state(0);
        const N: u64 = 2000;
        let start = Instant::now();
        for i in 1..=N {
            p.submit(with_seq(&base, i));
        }
        let submitting = start.elapsed();
        p.flush(Duration::from_secs(60)).unwrap();
        let st = p.stats();
        println!("{N} submits in {submitting:?}: {st:?}");
        assert!(st.writes >= 1 && st.writes < N / 10, "{st:?}");
        assert_eq!(
            st.writes + st.coalesced,
            N,
            "every state written or replaced"
        );
        assert_eq!((st.failures, st.pending, st.last_error), (0, false, None));
        assert!(st.last_write.is_some());
        assert_eq!(State::load(&d).unwrap(), Some(with_seq(&base, N)));
        // A later submit is written too.
        p.submit(with_seq(&base, N + 1));
        p.flush(Duration::from_secs(60)).unwrap();
        assert_eq!(p.stats().writes, st.writes + 1);
        assert_eq!(State::load(&d).unwrap(), Some(with_seq(&base, N + 1)));
        drop(p);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn failing_dir_is_retried_until_it_works() {
        let d = tmpdir("fail");
        // A state directory under a regular file cannot be created.
        let blocker = d.join("blocker");
        fs::write(&blocker, b"not a directory").unwrap();
        let dir = blocker.join("state");
        let p = Persister::spawn(dir.clone());
        let base = state(0);
        p.submit(with_seq(&base, 1));
        let err = p.flush(Duration::from_millis(600)).unwrap_err();
        assert!(
            err.contains(&dir.join(STATE_FILE).display().to_string()),
            "{err}"
        );
        assert!(err.contains("Not a directory"), "{err}");
        let st = p.stats();
        assert!(st.failures >= 2, "retried with backoff: {st:?}");
        assert_eq!((st.writes, st.pending), (0, true));
        assert_eq!(st.last_error.as_deref(), Some(err.as_str()));
        // A newer state replaces the one being retried.
        p.submit(with_seq(&base, 2));
        assert!(p.flush(Duration::from_millis(50)).is_err());
        // Fixing the directory is enough: the retry writes without a new submit.
        fs::remove_file(&blocker).unwrap();
        p.flush(Duration::from_secs(30)).unwrap();
        let after = p.stats();
        assert_eq!((after.writes, after.coalesced), (1, 1), "{after:?}");
        assert!(after.failures > st.failures);
        assert_eq!((after.pending, after.last_error), (false, None));
        assert_eq!(State::load(&dir).unwrap(), Some(with_seq(&base, 2)));
        drop(p);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn drop_writes_what_is_pending() {
        let d = tmpdir("drop");
        let p = Persister::spawn(d.clone());
        let base = state(0);
        for i in 1..=50 {
            p.submit(with_seq(&base, i));
        }
        drop(p);
        assert_eq!(State::load(&d).unwrap(), Some(with_seq(&base, 50)));
        // Dropping with a failing directory gives up within the bound.
        let blocker = d.join("blocker");
        fs::write(&blocker, b"x").unwrap();
        let p = Persister::spawn(blocker.join("state"));
        p.submit(base);
        let start = Instant::now();
        drop(p);
        assert!(start.elapsed() < STOP_WAIT);
        fs::remove_dir_all(&d).unwrap();
    }
}
