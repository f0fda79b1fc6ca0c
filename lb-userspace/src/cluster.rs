//! The cluster store (issue 12): several balancers share one etcd. This module is the typed
//! API over it; the daemon's use of it is `daemon/clustered.rs`, its rules `replica.rs`.
//!
//! Every key lives under `/lb/<name>/` (`<name>`: `[cluster] name`):
//!
//! | key | value | lease | written by |
//! | --- | --- | --- | --- |
//! | `election/<lease hex>` | the balancer's id | its own | etcd's election API (`campaign`) |
//! | `liveness/<id>` | [`Report`] as JSON | its own | each balancer ([`Cluster::publish`]) |
//! | `tables` | a table revision (bytes) | none | the leader only ([`Cluster::write_revision`]) |
//!
//! - **Lease**: each balancer holds one lease of `lease_ttl`, renewed every third of it by a
//!   background task. Its election key and liveness report are attached to it, so they vanish
//!   when the balancer dies or loses etcd for longer than the TTL.
//! - **Leader**: the balancer whose election key has the lowest create revision (etcd's
//!   election rule: `campaign` returns once every older key is gone). A leader's term is its
//!   key and that key's create revision; a table write is a transaction that succeeds only
//!   while that key still exists with that revision, so a deposed leader cannot write, whatever
//!   it believes. [`Cluster::is_leader`] is also false once the lease may have expired as seen
//!   from here (the last renewal's send time + TTL), so a leader cut off from etcd stops
//!   leading before etcd lets another one lead.
//! - **Tables**: one key; its etcd revision (`mod_revision`) names the table revision.
//!   [`Cluster::watch_revisions`] yields the current one first, then every later write.
//! - **Faults**: every request is bounded by [`OP_TIMEOUT`] and fails with a typed [`Error`];
//!   a lease that etcd reports ended is final ([`Error::LeaseLost`]): connect again.
use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LeaderKey, PutOptions,
    SortOrder, SortTarget, Txn, TxnOp, WatchOptions,
};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::config::ClusterConfig;

/// Longest wait for one etcd request (and for the connection at start): past it the
/// operation fails with [`Error::Timeout`].
pub const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before a background task tries again after a failed request.
const RETRY: Duration = Duration::from_millis(250);

/// What went wrong talking to the cluster store.
#[derive(Debug, Error)]
pub enum Error {
    #[error("invalid [cluster] section: {0}")]
    Config(String),
    #[error("cannot reach etcd at {endpoints}: {reason}")]
    Connect { endpoints: String, reason: String },
    #[error("etcd {what}: no answer within {after:?} (is etcd reachable?)")]
    Timeout { what: &'static str, after: Duration },
    #[error("etcd {what}: {source}")]
    Etcd {
        what: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("balancer {id} is not the leader of cluster {cluster}: only the leader writes tables")]
    NotLeader { cluster: String, id: String },
    #[error(
        "balancer {id}'s etcd lease ended (etcd unreachable for longer than lease_ttl, or \
         revoked): connect again"
    )]
    LeaseLost { id: String },
    #[error(
        "the tables in etcd are at revision {current}, not {expect} as this balancer's are: it \
         applies the newer one first"
    )]
    Behind { expect: i64, current: i64 },
    #[error("etcd key {key}: {reason}")]
    Decode { key: String, reason: String },
    #[error("etcd watch on {key} ended: {reason}")]
    WatchEnded { key: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What one balancer's own detector (its heartbeats, its health checks) says of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum NodeView {
    /// Not heard within its detection window (or never).
    Down,
    /// Its agent restarted while up: held drained until the hold-down ends.
    Held,
    /// Heard within its detection window; `weight` as advertised (0: none), and whether its
    /// agent says it is draining.
    Up { weight: u32, draining: bool },
}

/// One VIP in a balancer's last conntrack scan.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanReport {
    /// The VIP's revision counter the scan looked at (the leader's, as written in the table
    /// revision): a report of another revision says nothing of the current moved routes.
    pub revision: u64,
    /// The moved routes no tracked flow on this balancer still needs, as inclusive ranges.
    pub settled: Vec<(u32, u32)>,
}

/// What one balancer publishes under `liveness/<id>` (attached to its lease).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The publisher's clock when it published (Unix ms).
    pub published_unix_ms: u64,
    /// The table revision live in its kernel maps (0: none yet).
    pub running: i64,
    /// Its detector is in fail static (it hears almost no node, so the likelier fault is its
    /// own receive path): its `Up`s are not evidence that a node lives.
    #[serde(default)]
    pub fail_static: bool,
    /// Node id -> what its own detector says.
    pub nodes: BTreeMap<u32, NodeView>,
    /// VIP (as `lb` writes it) -> its last conntrack scan of that VIP's moved routes.
    #[serde(default)]
    pub scans: BTreeMap<String, ScanReport>,
    /// A change an `lb` command run on this balancer (not the leader) asks the leader to make.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposal: Option<Proposal>,
    /// The leader's answers to the others' proposals, by balancer id (the last of each).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub answers: BTreeMap<String, Answer>,
    /// The flows on moved routes this balancer keeps on their old nodes
    /// (`replica::encode_pins`): every other balancer records them too.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pins: String,
}

/// A change of the cluster's nodes and VIPs proposed to the leader.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// Unique per proposing balancer run (its answer names it).
    pub id: u64,
    /// Digest of the configuration the change was made against: the leader refuses it if
    /// the cluster's has changed since (the command is run again on the new one).
    pub base: String,
    /// The proposed nodes, VIPs and reserve node (`replica::Shared` as JSON).
    pub config: String,
}

/// The leader's answer to a proposal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub id: u64,
    /// Why it was refused (`None`: made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What changed.
    #[serde(default)]
    pub diff: crate::api::Diff,
    /// The revision that holds it (the proposer answers its operator once it runs it).
    pub revision: i64,
}

impl Report {
    /// The same report, publication time aside (a report is published again only when this
    /// differs).
    pub fn same_as(&self, other: &Report) -> bool {
        Report {
            published_unix_ms: other.published_unix_ms,
            ..self.clone()
        } == *other
    }
}

/// One table revision as written by the leader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableRevision {
    /// etcd's revision of the write (the `tables` key's `mod_revision`).
    pub revision: i64,
    pub bytes: Vec<u8>,
}

/// [`Cluster::watch_revisions`]'s stream (`futures_util::StreamExt::next` reads it).
pub type RevisionStream = Pin<Box<dyn Stream<Item = Result<TableRevision>> + Send>>;

/// Who leads, as last read from etcd.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leadership {
    /// The leader's balancer id; `None` while nobody leads (or before the first read).
    pub leader: Option<String>,
    /// The etcd revision this view was read at.
    pub revision: i64,
    /// The leader's election key: its term.
    key: Option<Vec<u8>>,
}

/// State the background tasks share with the handle.
struct Shared {
    /// Until when the lease surely lives, as seen from here; `None` once etcd said it ended.
    lease_valid_until: Mutex<Option<Instant>>,
    /// This balancer's term while it leads.
    term: Mutex<Option<LeaderKey>>,
    /// Set (true) once the lease ended: the tasks stop.
    lost: watch::Sender<bool>,
}

impl Shared {
    fn lease_alive(&self) -> bool {
        lock(&self.lease_valid_until).is_some_and(|t| Instant::now() < t)
    }
    fn lease_lost(&self) -> bool {
        *self.lost.borrow()
    }
}

/// A poisoned lock only means a task panicked mid-update of a plain value: use it as is.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// This balancer's membership in a cluster. Dropping it stops the background tasks without
/// revoking the lease (like a crash: its keys vanish after `lease_ttl`); [`Cluster::close`]
/// revokes it (at once).
pub struct Cluster {
    client: Client,
    name: String,
    id: String,
    prefix: String,
    lease: i64,
    ttl: Duration,
    shared: Arc<Shared>,
    leadership: watch::Receiver<Leadership>,
    reports: watch::Receiver<BTreeMap<String, Report>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// One etcd request, bounded by [`OP_TIMEOUT`].
async fn op<T>(
    what: &'static str,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(Error::Etcd { what, source }),
        Err(_) => Err(Error::Timeout {
            what,
            after: OP_TIMEOUT,
        }),
    }
}

impl Cluster {
    /// Connects to etcd, grants this balancer's lease and starts keeping it alive, campaigning
    /// for leadership and following who leads. Fails within about [`OP_TIMEOUT`] when etcd
    /// does not answer.
    pub async fn connect(cfg: &ClusterConfig) -> Result<Self> {
        cfg.validate()
            .map_err(|e| Error::Config(format!("{e:#}")))?;
        let connect_err = |reason: String| Error::Connect {
            endpoints: cfg.endpoints.join(","),
            reason,
        };
        // HTTP/2 keep-alives notice a dead etcd on idle streams (campaign, watches).
        let opts = ConnectOptions::new()
            .with_connect_timeout(OP_TIMEOUT)
            .with_keep_alive(Duration::from_secs(1), OP_TIMEOUT)
            .with_keep_alive_while_idle(true);
        let client = op("connect", Client::connect(&cfg.endpoints, Some(opts)))
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let ttl_s = i64::try_from(cfg.lease_ttl.as_secs()).unwrap_or(i64::MAX);
        let sent = Instant::now();
        let grant = op("lease grant", client.lease_client().grant(ttl_s, None))
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        // etcd raises a TTL below its minimum (1.5 x its election timeout): go by what it gave.
        let ttl = Duration::from_secs(u64::try_from(grant.ttl()).unwrap_or(0).max(1));
        if ttl != cfg.lease_ttl {
            warn!(
                "cluster {}: etcd granted a lease of {ttl:?}, not the configured {:?} (its \
                 minimum is 1.5 x its election timeout)",
                cfg.name, cfg.lease_ttl
            );
        }
        let (lost, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            lease_valid_until: Mutex::new(Some(sent + ttl)),
            term: Mutex::new(None),
            lost,
        });
        let prefix = format!("/lb/{}/", cfg.name);
        let (lead_tx, leadership) = watch::channel(Leadership::default());
        let (reports_tx, reports) = watch::channel(BTreeMap::new());
        let mut c = Self {
            client,
            name: cfg.name.clone(),
            id: cfg.id.clone(),
            prefix,
            lease: grant.id(),
            ttl,
            shared,
            leadership,
            reports,
            tasks: Vec::new(),
        };
        c.tasks = vec![
            tokio::spawn(keep_alive(
                c.client.clone(),
                c.lease,
                ttl,
                c.shared.clone(),
                c.id.clone(),
            )),
            tokio::spawn(observe(c.client.clone(), c.election_prefix(), lead_tx)),
            tokio::spawn(observe_reports(
                c.client.clone(),
                c.liveness_prefix(),
                reports_tx,
            )),
            tokio::spawn(campaign(
                c.client.clone(),
                c.election_name(),
                c.id.clone(),
                c.lease,
                c.shared.clone(),
                c.leadership.clone(),
            )),
        ];
        info!(
            "cluster {}: balancer {} joined (lease {:x}, ttl {ttl:?})",
            c.name, c.id, c.lease
        );
        Ok(c)
    }

    /// The election's name: etcd's campaign puts `<name>/<lease hex>`.
    fn election_name(&self) -> String {
        format!("{}election", self.prefix)
    }
    fn election_prefix(&self) -> String {
        format!("{}election/", self.prefix)
    }
    fn liveness_prefix(&self) -> String {
        format!("{}liveness/", self.prefix)
    }
    /// The key of the table revisions.
    pub fn tables_key(&self) -> String {
        format!("{}tables", self.prefix)
    }
    /// This balancer's id.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The lease TTL etcd granted.
    pub fn lease_ttl(&self) -> Duration {
        self.ttl
    }

    /// Whether this balancer leads now: it won the election, etcd has not shown its key gone,
    /// and its lease surely still lives.
    pub fn is_leader(&self) -> bool {
        lock(&self.shared.term).is_some() && self.shared.lease_alive()
    }

    /// Who leads, as last read from etcd; `changed()` on it wakes at every change.
    pub fn watch_leader(&self) -> watch::Receiver<Leadership> {
        self.leadership.clone()
    }

    fn alive(&self) -> Result<()> {
        if self.shared.lease_lost() {
            return Err(Error::LeaseLost {
                id: self.id.clone(),
            });
        }
        Ok(())
    }

    /// Publishes this balancer's report under `liveness/<id>`, attached to its lease (the
    /// publication time is set here).
    pub async fn publish(&self, report: &Report) -> Result<()> {
        self.alive()?;
        let report = Report {
            published_unix_ms: unix_ms_now(),
            ..report.clone()
        };
        let value = serde_json::to_vec(&report).map_err(|e| Error::Decode {
            key: self.liveness_prefix(),
            reason: e.to_string(),
        })?;
        let key = format!("{}{}", self.liveness_prefix(), self.id);
        let opts = PutOptions::new().with_lease(self.lease);
        op(
            "put liveness",
            self.client.kv_client().put(key, value, Some(opts)),
        )
        .await?;
        Ok(())
    }

    /// Every live balancer's last report, by balancer id.
    pub async fn reports(&self) -> Result<BTreeMap<String, Report>> {
        read_reports(&self.client, &self.liveness_prefix())
            .await
            .map(|(r, _)| r)
    }

    /// Every live balancer's last report, read again at every change under `liveness/`
    /// (a report that does not decode is left out, and warned about).
    pub fn watch_reports(&self) -> watch::Receiver<BTreeMap<String, Report>> {
        self.reports.clone()
    }

    /// Set (true) once the lease ended for good: connect again.
    pub fn lease_ended(&self) -> watch::Receiver<bool> {
        self.shared.lost.subscribe()
    }

    /// Writes a table revision; only the leader can, only while its term lasts (a
    /// transaction on its election key), and only over revision `expect` (the one its tables
    /// derive from; 0: none written yet), so a leader that missed a newer revision cannot
    /// overwrite it ([`Error::Behind`]). Returns the etcd revision of the write.
    pub async fn write_revision(&self, bytes: &[u8], expect: i64) -> Result<i64> {
        self.alive()?;
        let not_leader = || Error::NotLeader {
            cluster: self.name.clone(),
            id: self.id.clone(),
        };
        let term = lock(&self.shared.term).clone();
        let Some(term) = term.filter(|_| self.shared.lease_alive()) else {
            return Err(not_leader());
        };
        let key = self.tables_key();
        let txn = Txn::new()
            .when([
                Compare::create_revision(term.key(), CompareOp::Equal, term.rev()),
                Compare::mod_revision(key.clone(), CompareOp::Equal, expect),
            ])
            .and_then([TxnOp::put(key.clone(), bytes, None)])
            .or_else([TxnOp::get(term.key(), None), TxnOp::get(key.clone(), None)]);
        let resp = op("write tables", self.client.kv_client().txn(txn)).await?;
        if resp.succeeded() {
            return Ok(resp.header().map_or(0, |h| h.revision()));
        }
        // Which compare failed: the term (someone else leads) or the revision.
        let mut found = resp.op_responses().into_iter().filter_map(|r| match r {
            etcd_client::TxnOpResponse::Get(g) => Some(g),
            _ => None,
        });
        let term_held = found.next().is_some_and(|g| {
            g.kvs()
                .first()
                .is_some_and(|kv| kv.create_revision() == term.rev())
        });
        if !term_held {
            return Err(not_leader());
        }
        let current = found
            .next()
            .and_then(|g| g.kvs().first().map(|kv| kv.mod_revision()))
            .unwrap_or(0);
        Err(Error::Behind { expect, current })
    }

    /// The current table revision (`None`: none written yet).
    pub async fn current_revision(&self) -> Result<Option<TableRevision>> {
        let resp = op(
            "get tables",
            self.client.kv_client().get(self.tables_key(), None),
        )
        .await?;
        Ok(resp.kvs().first().map(|kv| TableRevision {
            revision: kv.mod_revision(),
            bytes: kv.value().to_vec(),
        }))
    }

    /// The table revisions: the current one (if any) first, then every later write, until
    /// the watch fails ([`Error::WatchEnded`], or an etcd error: watch again to re-sync).
    pub async fn watch_revisions(&self) -> Result<RevisionStream> {
        let key = self.tables_key();
        let current = op("get tables", self.client.kv_client().get(key.clone(), None)).await?;
        let from = current.header().map_or(0, |h| h.revision()) + 1;
        let first = current.kvs().first().map(|kv| TableRevision {
            revision: kv.mod_revision(),
            bytes: kv.value().to_vec(),
        });
        let stream = op(
            "watch tables",
            self.client.watch_client().watch(
                key.clone(),
                Some(WatchOptions::new().with_start_revision(from)),
            ),
        )
        .await?;
        let pending: std::collections::VecDeque<_> = first.into_iter().collect();
        Ok(Box::pin(futures_util::stream::unfold(
            (pending, Some(stream), key),
            |(mut pending, mut stream, key)| async move {
                loop {
                    if let Some(r) = pending.pop_front() {
                        return Some((Ok(r), (pending, stream, key)));
                    }
                    let s = stream.as_mut()?;
                    let ended = |reason: String| Error::WatchEnded {
                        key: key.clone(),
                        reason,
                    };
                    let err = match s.message().await {
                        Ok(Some(resp)) if resp.canceled() => {
                            ended(format!("cancelled by etcd: {}", resp.cancel_reason()))
                        }
                        Ok(Some(resp)) => {
                            pending.extend(
                                resp.events()
                                    .iter()
                                    .filter(|e| e.event_type() == EventType::Put)
                                    .filter_map(|e| e.kv())
                                    .map(|kv| TableRevision {
                                        revision: kv.mod_revision(),
                                        bytes: kv.value().to_vec(),
                                    }),
                            );
                            continue;
                        }
                        Ok(None) => ended("the stream closed".into()),
                        Err(source) => Error::Etcd {
                            what: "watch tables",
                            source,
                        },
                    };
                    // One error, then the stream ends.
                    return Some((Err(err), (pending, None, key)));
                }
            },
        )))
    }

    /// Leaves the cluster: revokes the lease, so this balancer's election key and report go
    /// at once (the next leader need not wait for the TTL).
    pub async fn close(&self) -> Result<()> {
        for t in &self.tasks {
            t.abort();
        }
        *lock(&self.shared.term) = None;
        self.shared.lost.send_replace(true);
        op(
            "lease revoke",
            self.client.lease_client().revoke(self.lease),
        )
        .await?;
        info!("cluster {}: balancer {} left", self.name, self.id);
        Ok(())
    }
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Every report under `prefix`, by balancer id, and the etcd revision read at. A report that
/// does not decode is left out (with a warning): one bad publisher must not blind the leader.
async fn read_reports(client: &Client, prefix: &str) -> Result<(BTreeMap<String, Report>, i64)> {
    let resp = op(
        "get liveness",
        client
            .kv_client()
            .get(prefix, Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let mut out = BTreeMap::new();
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        match serde_json::from_slice::<Report>(kv.value()) {
            Ok(r) => {
                out.insert(key[prefix.len()..].to_string(), r);
            }
            Err(e) => warn!("etcd key {key}: not a balancer report ({e}); ignored"),
        }
    }
    Ok((out, resp.header().map_or(0, |h| h.revision())))
}

/// Follows the reports: read again at every change under `prefix`. Runs until the handle goes.
async fn observe_reports(
    client: Client,
    prefix: String,
    tx: watch::Sender<BTreeMap<String, Report>>,
) {
    follow_prefix(
        client,
        prefix,
        "liveness",
        tx,
        |client, prefix| async move { read_reports(&client, &prefix).await },
    )
    .await
}

/// Keeps `tx` at `read`'s view of the keys under `prefix`: read once, then again at every
/// change (a watch from the etcd revision the view was read at, so nothing in between is
/// missed); after an error, all over again after [`RETRY`]. Runs until the handle goes.
async fn follow_prefix<T, F, Fut>(
    client: Client,
    prefix: String,
    what: &'static str,
    tx: watch::Sender<T>,
    read: F,
) where
    F: Fn(Client, String) -> Fut,
    Fut: Future<Output = Result<(T, i64)>>,
{
    loop {
        let result = async {
            let (view, at) = read(client.clone(), prefix.clone()).await?;
            tx.send_replace(view);
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(at + 1);
            let mut stream = op(
                "watch",
                client.watch_client().watch(prefix.clone(), Some(opts)),
            )
            .await?;
            loop {
                match stream.message().await {
                    Ok(Some(r)) if r.canceled() => return Ok::<_, Error>(()),
                    Ok(Some(r)) if !r.events().is_empty() => {
                        tx.send_replace(read(client.clone(), prefix.clone()).await?.0);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(()),
                    Err(source) => {
                        return Err(Error::Etcd {
                            what: "watch",
                            source,
                        });
                    }
                }
            }
        }
        .await;
        if let Err(e) = result {
            tracing::debug!("cluster {what} watch: {e}; again");
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Renews the lease every third of its TTL; on a failure, retries (a new keep-alive stream)
/// every [`RETRY`]. Stops for good once etcd says the lease is gone.
async fn keep_alive(client: Client, lease: i64, ttl: Duration, shared: Arc<Shared>, id: String) {
    let period = ttl / 3;
    let mut failing = false;
    loop {
        let (mut keeper, mut stream) =
            match op("lease keep-alive", client.lease_client().keep_alive(lease)).await {
                Ok(v) => v,
                Err(e) => {
                    if !failing {
                        warn!("balancer {id}: cannot renew its etcd lease: {e}; retrying");
                        failing = true;
                    }
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
        loop {
            let sent = Instant::now();
            let reply = match keeper.keep_alive().await {
                Ok(()) => op("lease keep-alive", stream.message()).await,
                Err(source) => Err(Error::Etcd {
                    what: "lease keep-alive",
                    source,
                }),
            };
            match reply {
                Ok(Some(r)) if r.ttl() > 0 => {
                    let granted = Duration::from_secs(u64::try_from(r.ttl()).unwrap_or(0));
                    *lock(&shared.lease_valid_until) = Some(sent + granted);
                    if failing {
                        info!("balancer {id}: etcd lease renewed again");
                        failing = false;
                    }
                }
                Ok(Some(_)) => {
                    warn!("balancer {id}: its etcd lease ended; it no longer leads or reports");
                    *lock(&shared.lease_valid_until) = None;
                    *lock(&shared.term) = None;
                    shared.lost.send_replace(true);
                    return;
                }
                Ok(None) | Err(_) => {
                    if !failing {
                        let why = match reply {
                            Err(e) => e.to_string(),
                            _ => "the stream closed".into(),
                        };
                        warn!("balancer {id}: cannot renew its etcd lease: {why}; retrying");
                        failing = true;
                    }
                    break;
                }
            }
            tokio::time::sleep(period).await;
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Follows who leads: the election key with the lowest create revision, read again at every
/// change under the election prefix. Runs until the handle goes (also after the lease ended:
/// who leads is still worth knowing).
async fn observe(client: Client, prefix: String, tx: watch::Sender<Leadership>) {
    follow_prefix(
        client,
        prefix,
        "election",
        tx,
        |client, prefix| async move {
            let opts = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Ascend)
                .with_limit(1);
            let resp = op("get election", client.kv_client().get(prefix, Some(opts))).await?;
            let first = resp.kvs().first();
            let revision = resp.header().map_or(0, |h| h.revision());
            let view = Leadership {
                leader: first.map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                revision,
                key: first.map(|kv| kv.key().to_vec()),
            };
            Ok((view, revision))
        },
    )
    .await
}

/// Campaigns until this balancer leads, holds the term until etcd shows its key gone (or the
/// lease ends), then campaigns again.
async fn campaign(
    client: Client,
    name: String,
    id: String,
    lease: i64,
    shared: Arc<Shared>,
    mut leadership: watch::Receiver<Leadership>,
) {
    let mut lost = shared.lost.subscribe();
    while !shared.lease_lost() {
        // No timeout: the call returns when every older candidate is gone.
        let won = client
            .election_client()
            .campaign(name.clone(), id.clone(), lease)
            .await;
        let term = match won {
            Ok(r) => match r.leader() {
                Some(k) => k.clone(),
                None => {
                    warn!("balancer {id}: etcd answered the campaign without a leader key");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            },
            Err(e) => {
                tracing::debug!("balancer {id}: campaign: {e}; again");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        info!("balancer {id} leads (term {})", term.rev());
        *lock(&shared.term) = Some(term.clone());
        // The term ends when a view read after it began shows another key first (or none).
        loop {
            let ended = {
                let v = leadership.borrow_and_update();
                v.revision >= term.rev() && v.key.as_deref() != Some(term.key())
            };
            if ended || shared.lease_lost() {
                break;
            }
            tokio::select! {
                r = leadership.changed() => if r.is_err() { break },
                _ = lost.changed() => {}
            }
        }
        *lock(&shared.term) = None;
        info!("balancer {id} no longer leads");
    }
}
