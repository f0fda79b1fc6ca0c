//! Cluster mode in the daemon (issue 12; docs/control-plane.md, "Cluster mode").
//!
//! A task of its own keeps the etcd session (connect, and connect again after a lost lease),
//! follows the table revisions and the other balancers' reports, and publishes this
//! balancer's report; it hands everything to the loop as [`Msg`]s, so etcd never blocks
//! failure detection. The loop, each round:
//! - turns its own membership events and conntrack scans into this balancer's [`Report`]
//!   (they are evidence, not decisions: nobody but the leader changes tables);
//! - applies a newer table revision ([`Daemon::follow`]);
//! - as the leader only: merges every live balancer's report ([`replica::merge`]) into events
//!   and settled routes, and makes the `lb` changes proposed by any balancer (itself
//!   included); each result is written as the next revision first (guarded by its term and
//!   the revision it derives from) and runs here only once written.
//!
//! With etcd unreachable the balancer keeps forwarding on the revision it runs, changes
//! nothing, warns (rate-limited) and counts; once connected again the watch hands it the
//! current revision.
use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use futures_util::StreamExt as _;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::Daemon;
use crate::{
    api,
    cluster::{
        Answer, Cluster, NodeView, Proposal, Report, RevisionStream, ScanReport, TableRevision,
    },
    config::ClusterConfig,
    controller::{Controller, Input},
    dataplane,
    heartbeat::Receiver,
    membership::{Event, Phase},
    replica::{self, Revision, Shared},
    server::{Fail, Reply, Server},
    state,
};

/// Pause before the session task tries etcd again (and before a leader's failed write is
/// tried again).
pub(super) const RETRY: Duration = Duration::from_millis(250);
/// etcd trouble is warned about at most this often.
const WARN_PERIOD: Duration = Duration::from_secs(10);
/// How long an `lb` change made on a follower waits for the leader's answer and its revision.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// What the session task tells the loop.
pub(super) enum Msg {
    /// A session (new, or again after a lost lease).
    Connected(Arc<Cluster>),
    /// A table revision (the current one first after every (re)connect, then every write).
    Revision(TableRevision),
    /// Every live balancer's report (this one's included), after any change.
    Reports(BTreeMap<String, Report>),
    /// Who leads changed.
    Leadership,
    /// etcd could not be reached or answered an error.
    Trouble(String),
}

/// The daemon's side of cluster mode.
pub(super) struct Link {
    pub id: String,
    conn: Option<Arc<Cluster>>,
    rx: mpsc::UnboundedReceiver<Msg>,
    publish: watch::Sender<Option<Report>>,
    _task: Server,
    /// The revision live in the kernel (0: none yet).
    pub applied: i64,
    /// When the leader's last write failed (etcd trouble): the next is tried [`RETRY`] later.
    write_failed: Option<Instant>,
    /// The leader decides again only when something it decides from changed: the others'
    /// reports, leadership, the revision running, or its own report (`decided_on`). A loop
    /// round comes with every heartbeat; the settled-routes intersection is not free.
    decide: bool,
    decided_on: Option<Report>,
    /// The other live balancers' reports, by id.
    others: BTreeMap<String, Report>,
    /// Whether the reports were read since the last connect (a leader decides only then).
    reports_known: bool,
    /// This balancer's last conntrack scan, by VIP.
    scans: BTreeMap<String, ScanReport>,
    /// Health-checked nodes' last result here (heartbeat nodes: the detector).
    health: BTreeMap<u32, bool>,
    /// The report last handed to the publisher.
    published: Option<Report>,
    pub counters: api::ClusterCounters,
    warned: Option<Instant>,
    /// This balancer's change waiting for the leader's answer, since when, and its caller.
    proposal: Option<(Proposal, Instant)>,
    parked: Option<tokio::sync::oneshot::Sender<Result<Reply, Fail>>>,
    /// Set by [`Link::forward`] for the loop: the call just handled waits for an answer.
    forwarded: bool,
    next_proposal: u64,
    /// The leader's answers to the others' proposals (published in its report).
    answers: BTreeMap<String, Answer>,
    /// This balancer's moved-route flows as last scanned (encoded for its report).
    pins: String,
    /// The others' shared flows, and the set waiting for the next scan to record it.
    wanted: Vec<replica::Pin>,
    import: Option<Vec<replica::Pin>>,
    /// A scan is due (a new revision, or new shared flows).
    rescan: bool,
}

impl Link {
    /// Starts the session task (it connects in the background: a balancer whose etcd is down
    /// starts anyway and forwards on the tables it had).
    pub fn start(cfg: &ClusterConfig) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (publish, publish_rx) = watch::channel(None);
        Self {
            id: cfg.id.clone(),
            conn: None,
            rx,
            publish,
            _task: Server::spawn(session(cfg.clone(), tx, publish_rx)),
            applied: 0,
            write_failed: None,
            decide: true,
            decided_on: None,
            others: BTreeMap::new(),
            reports_known: false,
            scans: BTreeMap::new(),
            health: BTreeMap::new(),
            published: None,
            counters: api::ClusterCounters::default(),
            warned: None,
            proposal: None,
            parked: None,
            forwarded: false,
            // Unique across this balancer's runs (its earlier answers stay in the leader's report).
            next_proposal: crate::membership::unix_ms(std::time::SystemTime::now()),
            answers: BTreeMap::new(),
            pins: String::new(),
            wanted: Vec::new(),
            import: None,
            rescan: false,
        }
    }

    /// The others' shared flows for the next scan to record, if they changed.
    pub fn take_import(&mut self) -> Option<Vec<replica::Pin>> {
        self.import.take()
    }

    /// Whether a scan is due now.
    pub fn take_rescan(&mut self) -> bool {
        std::mem::take(&mut self.rescan)
    }

    /// The other balancers' reports changed: their shared flows, if changed, go to the next
    /// scan (at once).
    fn take_reports(&mut self, mut r: BTreeMap<String, Report>) {
        r.remove(&self.id);
        let (wanted, errors) = replica::wanted_pins(&r);
        for e in errors {
            self.trouble(&e);
        }
        if wanted != self.wanted {
            self.wanted = wanted.clone();
            self.import = Some(wanted);
            self.rescan = true;
        }
        self.others = r;
        self.reports_known = true;
        self.decide = true;
    }

    /// An `lb` change made on this balancer while another leads: proposed to the leader
    /// (through this balancer's report); the caller is answered once the leader answers and
    /// the revision that holds the change runs here. The `Err` returned is a marker the loop
    /// replaces by that answer ([`Link::take_forwarded`]).
    pub fn forward(&mut self, current: &Shared, next: &Shared) -> Result<api::Diff, Fail> {
        if self.conn.is_none() {
            return Err(Fail::internal(
                "cluster mode: no etcd session, so no leader to make the change",
            )
            .hint("`lb status` shows the cluster; changes wait until etcd answers"));
        }
        if self.proposal.is_some() {
            return Err(Fail::conflict(
                "another change made on this balancer is waiting for the leader's answer",
            )
            .hint("try again in a moment"));
        }
        self.next_proposal += 1;
        self.proposal = Some((
            Proposal {
                id: self.next_proposal,
                base: current.digest(),
                config: next.to_json(),
            },
            Instant::now(),
        ));
        self.forwarded = true;
        Err(Fail::internal("forwarded to the leader"))
    }

    /// Whether the call just handled was forwarded to the leader (its answer comes later).
    pub fn take_forwarded(&mut self) -> bool {
        std::mem::take(&mut self.forwarded)
    }

    /// Holds the caller of the forwarded change until the leader answers.
    pub fn park(&mut self, reply: tokio::sync::oneshot::Sender<Result<Reply, Fail>>) {
        self.parked = Some(reply);
    }

    /// This balancer's own proposal, answered by itself as the leader.
    fn answer_own(&mut self, a: &Answer) {
        if self.proposal.as_ref().is_none_or(|(p, _)| p.id != a.id) {
            return;
        }
        self.proposal = None;
        let result = match &a.error {
            Some(e) => Err(Fail::conflict(format!("the change was not made: {e}"))),
            None => serde_json::to_value(&a.diff)
                .map(Reply::Json)
                .map_err(|e| Fail::internal(format!("encoding the answer: {e}"))),
        };
        if let Some(reply) = self.parked.take() {
            let _ = reply.send(result);
        }
    }

    /// Answers the parked caller when the leader has answered (and, for a change made, once
    /// this balancer runs the revision that holds it), or after [`FORWARD_TIMEOUT`].
    fn check_answer(&mut self) {
        let Some((p, since)) = &self.proposal else {
            return;
        };
        let answer = self
            .others
            .values()
            .filter_map(|r| r.answers.get(&self.id))
            .find(|a| a.id == p.id);
        let result = match answer {
            Some(a) => match &a.error {
                Some(e) => Err(Fail::conflict(format!(
                    "the leader refused the change: {e}"
                ))),
                None if self.applied >= a.revision => serde_json::to_value(&a.diff)
                    .map(Reply::Json)
                    .map_err(|e| Fail::internal(format!("encoding the answer: {e}"))),
                None => return,
            },
            None if since.elapsed() > FORWARD_TIMEOUT => Err(Fail::internal(format!(
                "the leader ({}) did not answer within {FORWARD_TIMEOUT:?}: the change may \
                 still be made",
                self.leader().as_deref().unwrap_or("nobody leads now")
            ))
            .hint("`lb status` shows the cluster and the revision running here")),
            None => return,
        };
        self.proposal = None;
        if let Some(reply) = self.parked.take() {
            let _ = reply.send(result);
        }
    }

    /// Messages the session task sent meanwhile.
    pub fn drain(&mut self, out: &mut Vec<Msg>) {
        while let Ok(m) = self.rx.try_recv() {
            out.push(m);
        }
    }

    /// Whether a leader's failed write waits to be tried again.
    pub fn retry_pending(&self) -> bool {
        self.write_failed.is_some() && self.conn.is_some()
    }

    /// Whether this balancer leads now.
    pub fn leading(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.is_leader())
    }

    /// Who leads, as last read from etcd.
    pub fn leader(&self) -> Option<String> {
        self.conn
            .as_ref()
            .and_then(|c| c.watch_leader().borrow().leader.clone())
    }

    /// Keeps this balancer's evidence from a round's local inputs: health results and scans.
    pub fn take_evidence(&mut self, inputs: Vec<Input>) {
        for input in inputs {
            match input {
                Input::Membership(Event::NodeUp { node, .. }) => {
                    self.health.insert(node, true);
                }
                Input::Membership(Event::NodeDown { node, .. }) => {
                    self.health.insert(node, false);
                }
                Input::Membership(_) => {}
                Input::Settled { .. } => {}
            }
        }
    }

    /// A conntrack scan's result: what it found settled, per VIP; the moved-route flows it
    /// keeps on previous owners (shared, up to [`replica::MAX_PINS`]); how many of the
    /// others' it holds.
    pub fn scanned(&mut self, settled: &[Input], pins: &[replica::Pin], imported: usize) {
        let shared = &pins[..pins.len().min(replica::MAX_PINS)];
        self.pins = replica::encode_pins(shared);
        self.counters.flows_exported = shared.len() as u64;
        self.counters.flows_unshared = (pins.len() - shared.len()) as u64;
        self.counters.flows_imported = imported as u64;
        self.scans = settled
            .iter()
            .filter_map(|i| match i {
                Input::Settled {
                    vip,
                    revision,
                    routes,
                } => Some((
                    dataplane::vip_display(vip),
                    ScanReport {
                        revision: *revision,
                        settled: state::ranges(routes.iter().copied()),
                    },
                )),
                Input::Membership(_) => None,
            })
            .collect();
    }

    /// Logs etcd trouble at most once per [`WARN_PERIOD`], and counts it.
    fn trouble(&mut self, what: &str) {
        self.counters.errors += 1;
        let now = Instant::now();
        if self
            .warned
            .is_none_or(|t| now.saturating_duration_since(t) >= WARN_PERIOD)
        {
            self.warned = Some(now);
            warn!(
                "cluster: {what}; forwarding goes on with table revision {} (nothing changes \
                 until etcd answers again)",
                self.applied
            );
        }
    }

    /// Closes the session (its lease revoked: another balancer leads at once).
    pub async fn close(&self) {
        if let Some(c) = &self.conn
            && let Err(e) = tokio::time::timeout(Duration::from_secs(1), c.close())
                .await
                .unwrap_or_else(|_| {
                    Err(crate::cluster::Error::Timeout {
                        what: "lease revoke",
                        after: Duration::from_secs(1),
                    })
                })
        {
            warn!("cluster: leaving: {e}");
        }
    }
}

fn link_trouble(d: &mut Daemon, what: &str) {
    if let Some(l) = d.cluster.as_mut() {
        l.trouble(what);
    }
}

/// The next message of the session task (never, outside cluster mode).
pub(super) async fn next(link: &mut Option<Link>) -> Option<Msg> {
    match link {
        Some(l) => l.rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The etcd session: connect (again after a lost lease), then follow revisions and reports
/// and publish this balancer's report (the latest wins; published again after a failure and
/// after every reconnect).
async fn session(
    cfg: ClusterConfig,
    tx: mpsc::UnboundedSender<Msg>,
    mut publish: watch::Receiver<Option<Report>>,
) {
    loop {
        let c = match Cluster::connect(&cfg).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                let _ = tx.send(Msg::Trouble(e.to_string()));
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        if tx.send(Msg::Connected(Arc::clone(&c))).is_err() {
            return;
        }
        let mut reports = c.watch_reports();
        let mut leadership = c.watch_leader();
        let mut ended = c.lease_ended();
        let mut revisions: Option<RevisionStream> = None;
        let mut unpublished = true;
        loop {
            if revisions.is_none() {
                match c.watch_revisions().await {
                    Ok(s) => revisions = Some(s),
                    Err(e) => {
                        let _ = tx.send(Msg::Trouble(e.to_string()));
                    }
                }
            }
            tokio::select! {
                r = next_revision(&mut revisions) => match r {
                    Some(Ok(t)) => {
                        let _ = tx.send(Msg::Revision(t));
                    }
                    Some(Err(e)) => {
                        let _ = tx.send(Msg::Trouble(e.to_string()));
                        revisions = None;
                        tokio::time::sleep(RETRY).await;
                    }
                    None => {
                        revisions = None;
                        tokio::time::sleep(RETRY).await;
                    }
                },
                Ok(()) = reports.changed() => {
                    let r = reports.borrow_and_update().clone();
                    let _ = tx.send(Msg::Reports(r));
                }
                Ok(()) = leadership.changed() => {
                    leadership.borrow_and_update();
                    let _ = tx.send(Msg::Leadership);
                }
                Ok(()) = publish.changed() => unpublished = true,
                _ = tokio::time::sleep(RETRY), if unpublished => {}
                _ = ended.changed() => break,
            }
            if unpublished {
                let report = publish.borrow_and_update().clone();
                if let Some(report) = report {
                    match c.publish(&report).await {
                        Ok(()) => unpublished = false,
                        Err(e) => {
                            let _ = tx.send(Msg::Trouble(e.to_string()));
                        }
                    }
                }
            }
        }
        let _ = tx.send(Msg::Trouble(
            "this balancer's etcd lease ended: joining again".into(),
        ));
    }
}

async fn next_revision(
    s: &mut Option<RevisionStream>,
) -> Option<crate::cluster::Result<TableRevision>> {
    match s {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

impl Daemon {
    /// One round of cluster mode (see the module docs): `local` is what this balancer's own
    /// detector and health checks produced this round, `msgs` what the session task sent.
    pub(super) async fn cluster_round(
        &mut self,
        local: Vec<Input>,
        msgs: Vec<Msg>,
        mut socket: Option<&mut Receiver>,
    ) {
        let Some(link) = self.cluster.as_mut() else {
            return;
        };
        link.take_evidence(local);
        let mut newest: Option<TableRevision> = None;
        for m in msgs {
            match m {
                Msg::Connected(c) => {
                    info!("cluster: balancer {} connected to etcd", link.id);
                    link.conn = Some(c);
                    link.decide = true;
                    link.reports_known = false;
                    link.published = None;
                }
                Msg::Revision(t) => {
                    if newest.as_ref().is_none_or(|n| t.revision > n.revision) {
                        newest = Some(t);
                    }
                }
                Msg::Reports(r) => link.take_reports(r),
                Msg::Leadership => link.decide = true,
                Msg::Trouble(e) => link.trouble(&e),
            }
        }
        if let Some(t) = newest
            && t.revision > link.applied
        {
            let rev = t.revision;
            if let Err(e) = self.follow(t, socket.as_deref_mut()) {
                if let Some(l) = self.cluster.as_mut() {
                    l.counters.refused += 1;
                }
                warn!("cluster: table revision {rev} not applied: {e:#}");
            }
        }
        if let Some(l) = self.cluster.as_mut() {
            l.check_answer();
        }
        self.answer_proposals(socket.as_deref_mut()).await;
        self.lead(socket).await;
        self.publish_report();
    }

    /// The leader's part for `lb` changes (made on any balancer, this one included): each
    /// proposal is checked again here, unless the cluster's configuration changed since it was
    /// made, written to etcd as the next revision and only then made here
    /// ([`Daemon::install`]); the answer goes to this balancer's caller directly and to the
    /// others in its report.
    pub(super) async fn answer_proposals(&mut self, mut socket: Option<&mut Receiver>) {
        let Some(link) = self.cluster.as_ref() else {
            return;
        };
        if !link.leading() || !link.reports_known {
            return;
        }
        let mut todo: Vec<(String, Proposal)> = link
            .others
            .iter()
            .filter_map(|(from, r)| {
                let p = r.proposal.clone()?;
                let done = link.answers.get(from).is_some_and(|a| a.id == p.id);
                (!done).then(|| (from.clone(), p))
            })
            .collect();
        if let Some((p, _)) = &link.proposal {
            todo.push((link.id.clone(), p.clone()));
        }
        for (from, p) in todo {
            let answer = self.make_proposal(&p, socket.as_deref_mut()).await;
            info!("cluster: balancer {from}'s change {}: {answer:?}", p.id);
            let Some(link) = self.cluster.as_mut() else {
                return;
            };
            if from == link.id {
                link.answer_own(&answer);
            } else {
                link.answers.insert(from, answer);
            }
        }
    }

    /// Makes one proposal (leader only): written first, then installed here.
    async fn make_proposal(&mut self, p: &Proposal, socket: Option<&mut Receiver>) -> Answer {
        let mut answer = Answer {
            id: p.id,
            revision: self.cluster.as_ref().map_or(0, |l| l.applied),
            ..Answer::default()
        };
        let current = Shared::of(&self.cfg);
        let next = match Shared::from_json(&p.config) {
            Err(e) => {
                answer.error = Some(e);
                return answer;
            }
            // Already so (e.g. made by an earlier leader): nothing to do.
            Ok(next) if next.digest() == current.digest() => return answer,
            Ok(_) if p.base != current.digest() => {
                answer.error = Some(
                    "the cluster's configuration changed since the command was run: run it again"
                        .into(),
                );
                return answer;
            }
            Ok(next) => next,
        };
        let c = match self.prepare(next.apply_to(&self.cfg), false) {
            Err(f) => {
                answer.error = Some(f.body.error);
                return answer;
            }
            Ok(super::ops::Prepared::Done(diff)) => {
                answer.diff = diff;
                return answer;
            }
            Ok(super::ops::Prepared::Change(c)) => c,
        };
        match self.write(&c.next, &c.ctl).await {
            Ok(rev) => {
                answer.revision = rev;
                if let Some(l) = self.cluster.as_mut() {
                    l.decide = true;
                }
                match self.install(*c, socket) {
                    Ok(diff) => answer.diff = diff,
                    Err(f) => answer.error = Some(f.body.error),
                }
            }
            Err(e) => answer.error = Some(format!("the cluster store did not take it: {e}")),
        }
        answer
    }

    /// This balancer's report: its detector's view, its last scans and the revision it runs.
    fn own_report(&self) -> Report {
        let Some(link) = self.cluster.as_ref() else {
            return Report::default();
        };
        let nodes = self
            .cfg
            .nodes
            .iter()
            .map(|n| {
                let view = if n.check == "heartbeat" {
                    match self.membership.status(n.id) {
                        Some(st) if st.phase == Phase::Up => NodeView::Up {
                            weight: st.weight,
                            draining: st.draining,
                        },
                        Some(st)
                            if matches!(st.phase, Phase::Joining { .. })
                                && st.held_after_restart =>
                        {
                            NodeView::Held
                        }
                        _ => NodeView::Down,
                    }
                } else if link.health.get(&n.id).copied().unwrap_or(false) {
                    NodeView::Up {
                        weight: 0,
                        draining: false,
                    }
                } else {
                    NodeView::Down
                };
                (n.id, view)
            })
            .collect();
        Report {
            published_unix_ms: 0,
            running: link.applied,
            fail_static: self.membership.holding(),
            nodes,
            scans: link.scans.clone(),
            proposal: link.proposal.as_ref().map(|(p, _)| p.clone()),
            answers: link.answers.clone(),
            pins: link.pins.clone(),
        }
    }

    pub(super) fn publish_report(&mut self) {
        let own = self.own_report();
        let Some(link) = self.cluster.as_mut() else {
            return;
        };
        // Own reports carry no publication time (`publish` stamps the copy it sends), so `==`
        // compares them without a copy.
        if link.published.as_ref() != Some(&own) {
            link.publish.send_replace(Some(own.clone()));
            link.published = Some(own);
        }
    }

    /// The leader's part: decide from every live balancer's report; the result is written to
    /// etcd first and run here only once written, so no kernel ever runs tables no revision
    /// holds (with etcd unreachable, nothing changes anywhere). Writes the first revision of a
    /// cluster too.
    pub(super) async fn lead(&mut self, socket: Option<&mut Receiver>) {
        let own = self.own_report();
        let Some(link) = self.cluster.as_ref() else {
            return;
        };
        if !link.leading()
            || !link.reports_known
            || link.write_failed.is_some_and(|t| t.elapsed() < RETRY)
        {
            return;
        }
        let bootstrap = link.applied == 0;
        if !bootstrap && !link.decide && link.decided_on.as_ref() == Some(&own) {
            return;
        }
        if let Some(l) = self.cluster.as_mut() {
            l.decide = false;
            l.decided_on = Some(own.clone());
        }
        let Some(link) = self.cluster.as_ref() else {
            return;
        };
        let merged = replica::merge(self.ctl.nodes().map(|n| n.id), &own, &link.others);
        let mut inputs: Vec<Input> = replica::events(&self.ctl, &merged)
            .into_iter()
            .map(Input::Membership)
            .collect();
        inputs.extend(replica::settled(&self.ctl, &own, &link.others));
        if inputs.is_empty() && !bootstrap {
            return;
        }
        let mut next = self.ctl.clone();
        let plan = next.apply(&inputs);
        if plan.steps.is_empty() && !plan.persist && !bootstrap {
            return;
        }
        if self.write(&self.cfg.clone(), &next).await.is_ok() {
            self.ctl = next;
            self.execute_logged(&plan, socket);
        } else if let Some(l) = self.cluster.as_mut() {
            // Decided again at the next try.
            l.decide = true;
        }
    }

    /// Writes `ctl` running `cfg` as the next revision (leader only), over the revision this
    /// balancer runs; on success that is the revision it runs. Another leader or a newer
    /// revision: the current one is applied here (nothing was changed locally).
    async fn write(
        &mut self,
        cfg: &crate::config::Config,
        ctl: &Controller,
    ) -> Result<i64, String> {
        let Some(link) = self.cluster.as_mut() else {
            return Err("not in cluster mode".into());
        };
        let Some(conn) = link.conn.clone() else {
            return Err("no etcd session".into());
        };
        let expect = link.applied;
        let bytes = Revision::new(&link.id, cfg, ctl).encode();
        let start = Instant::now();
        let e = match conn.write_revision(&bytes, expect).await {
            Ok(rev) => {
                link.applied = rev;
                link.write_failed = None;
                link.counters.written += 1;
                info!(
                    "cluster: wrote table revision {rev} ({} KiB, {:?})",
                    bytes.len() / 1024,
                    start.elapsed()
                );
                return Ok(rev);
            }
            Err(e) => e,
        };
        use crate::cluster::Error;
        if !matches!(e, Error::NotLeader { .. } | Error::Behind { .. }) {
            // etcd trouble: the change is decided again and written next round.
            let hint = if e.to_string().contains("too large") {
                " (etcd refuses requests over its --max-request-bytes, 1.5 MiB by default: \
                 raise it for this many VIPs)"
            } else {
                ""
            };
            link.write_failed = Some(Instant::now());
            link.trouble(&format!(
                "writing table revision ({} KiB): {e}{hint}",
                bytes.len() / 1024
            ));
            return Err(e.to_string());
        }
        info!("cluster: table revision not written: {e}");
        match conn.current_revision().await {
            Ok(Some(t)) if t.revision > expect => {
                let rev = t.revision;
                if let Err(e) = self.follow(t, None) {
                    warn!("cluster: table revision {rev} not applied: {e:#}");
                }
            }
            Ok(_) => {}
            Err(e) => link_trouble(self, &format!("reading the current table revision: {e}")),
        }
        Err(e.to_string())
    }

    /// Runs a table revision: the controller becomes the revision's, the kernel gets what
    /// differs (in the safe order, each VIP's changes with one generation flip), and the
    /// running configuration takes the revision's nodes and VIPs.
    pub(super) fn follow(&mut self, t: TableRevision, socket: Option<&mut Receiver>) -> Result<()> {
        let start = Instant::now();
        let rev = Revision::decode(&t.bytes).map_err(anyhow::Error::msg)?;
        let cfg = rev.config(&self.cfg);
        cfg.validate()
            .context("the revision's configuration is invalid")?;
        let keys = super::node_keys(&cfg)?;
        let next = Controller::from_revision(&rev.state, &cfg, &rev.vip_revisions())?;
        let seed = next.hash_seed();
        let mut ctl = self.ctl.clone();
        let plan = ctl.replace_with(next);
        let config_changed = !super::ops::config_diff(&self.cfg, &cfg).is_empty();
        if seed != self.dp.hash_seed() {
            self.dp.set_hash_seed(seed);
        }
        self.ctl = ctl;
        self.adopt_config(cfg, keys, socket);
        if let Some(l) = self.cluster.as_mut() {
            l.applied = t.revision;
            l.counters.applied += 1;
            l.decide = true;
            // Routes that moved: the flows this balancer keeps on old nodes are shared soon.
            l.rescan = true;
        }
        self.execute(&plan, None)
            .with_context(|| format!("writing table revision {} to the kernel", t.revision))?;
        if config_changed {
            self.save_running()?;
        }
        info!(
            "cluster: running table revision {} of {} ({} route writes, {:?})",
            t.revision,
            rev.leader,
            plan.route_writes(),
            start.elapsed()
        );
        Ok(())
    }

    /// `lb status`'s cluster part.
    pub(super) fn cluster_status(&self) -> Option<api::ClusterStatus> {
        let link = self.cluster.as_ref()?;
        let mut balancers: Vec<String> = link.others.keys().cloned().collect();
        balancers.push(link.id.clone());
        balancers.sort();
        Some(api::ClusterStatus {
            id: link.id.clone(),
            connected: link.conn.is_some(),
            leader: link.leader(),
            leading: link.leading(),
            revision: link.applied,
            digest: self.tables_digest(),
            balancers,
            counters: link.counters.clone(),
        })
    }

    /// SHA-256 of what the kernel runs: the hash seed, every node's `NODES` entry and every
    /// VIP's live routes (from the data plane's mirror of its writes), in key order. Equal
    /// digests on two balancers mean they forward every flow the same way.
    pub(super) fn tables_digest(&self) -> String {
        let mut buf = Vec::new();
        buf.extend_from_slice(&self.dp.hash_seed().to_le_bytes());
        for n in self.ctl.nodes() {
            let e = n.entry();
            buf.extend_from_slice(&n.id.to_le_bytes());
            buf.extend_from_slice(&e.addr4);
            buf.extend_from_slice(&e.addr6);
            buf.extend_from_slice(&e.mac);
            buf.push(e.state);
        }
        for v in self.ctl.vips() {
            buf.extend_from_slice(dataplane::vip_display(&v.spec.key).as_bytes());
            buf.extend_from_slice(&v.spec.index.to_le_bytes());
            for r in self.dp.live_routes(&v.spec.key).unwrap_or(&[]) {
                buf.extend_from_slice(&r.node.to_le_bytes());
                buf.extend_from_slice(&r.flags.to_le_bytes());
            }
        }
        crate::running::digest(&buf)
    }
}
