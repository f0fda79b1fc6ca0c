//! The cluster store API (`lb_userspace::cluster`) against a real etcd (Debian's `etcd-server`,
//! which `cargo xtask setup` installs; `lb_tests::etcd`) on 127.0.0.1 with free ports and a
//! temporary data dir: one leader, failover within the lease TTL, liveness reports tied to the lease, table
//! revisions written by the leader only and seen by the others, and etcd going away and back.
//! No kernel, no namespaces; a missing etcd binary fails the tests.
#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test
use std::{
    future::Future,
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use lb_tests::etcd::Etcd;
use lb_userspace::{
    cluster::{Cluster, Error, NodeView, OP_TIMEOUT, Report},
    config::ClusterConfig,
};

const TTL: Duration = Duration::from_secs(2);

fn cfg(etcd: &Etcd, name: &str, id: &str) -> ClusterConfig {
    ClusterConfig {
        endpoints: vec![etcd.endpoint()],
        name: name.into(),
        id: id.into(),
        lease_ttl: TTL,
    }
}

/// Polls `cond` every 10 ms until it holds; panics after `limit`. Returns the time it took.
async fn wait_for<F: Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut cond: impl FnMut() -> F,
) -> Duration {
    let start = Instant::now();
    loop {
        if cond().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until exactly one of `cs` leads and every one sees it; returns its index.
async fn one_leader(cs: &[&Cluster]) -> usize {
    wait_for("exactly one leader, seen by all", TTL * 3, || async {
        let leaders: Vec<&str> = cs
            .iter()
            .filter(|c| c.is_leader())
            .map(|c| c.id())
            .collect();
        leaders.len() == 1
            && cs
                .iter()
                .all(|c| c.watch_leader().borrow().leader.as_deref() == Some(leaders[0]))
    })
    .await;
    let leaders: Vec<usize> = (0..cs.len()).filter(|i| cs[*i].is_leader()).collect();
    assert_eq!(leaders.len(), 1, "exactly one leads");
    leaders[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_and_failover_within_the_lease() {
    let etcd = Etcd::start_local().unwrap();
    let a = Cluster::connect(&cfg(&etcd, "t1", "a")).await.unwrap();
    let b = Cluster::connect(&cfg(&etcd, "t1", "b")).await.unwrap();
    assert_eq!(a.lease_ttl(), TTL);
    let lead = one_leader(&[&a, &b]).await;
    // It stays that way: still exactly one a while later.
    tokio::time::sleep(TTL).await;
    assert_eq!(one_leader(&[&a, &b]).await, lead, "leadership is stable");
    let (leader, other) = if lead == 0 { (a, b) } else { (b, a) };
    println!("leader: {}", leader.id());

    // The leader dies (dropped: its lease is not revoked, it expires).
    let t0 = Instant::now();
    drop(leader);
    wait_for(
        "the other leads after a crash",
        TTL + Duration::from_secs(1),
        || async { other.is_leader() },
    )
    .await;
    let crash = t0.elapsed();
    println!(
        "failover after the leader died (lease expiry): {} ms (lease_ttl {} ms)",
        crash.as_millis(),
        TTL.as_millis()
    );

    // A third joins; the leader leaves cleanly (lease revoked): the third leads at once.
    let c = Cluster::connect(&cfg(&etcd, "t1", "c")).await.unwrap();
    assert_eq!(
        one_leader(&[&other, &c]).await,
        0,
        "the older candidate keeps leading"
    );
    let t0 = Instant::now();
    other.close().await.unwrap();
    let clean = wait_for("the third leads after a clean leave", TTL, || async {
        c.is_leader()
    })
    .await;
    println!(
        "failover after the leader left (lease revoked): {} ms",
        clean.as_millis()
    );
    assert!(t0.elapsed() < TTL, "a clean leave needs no lease expiry");
    // Another cluster name is another election.
    let other_cluster = Cluster::connect(&cfg(&etcd, "t2", "x")).await.unwrap();
    one_leader(&[&other_cluster]).await;
    assert!(c.is_leader());
}

fn report(nodes: &[(u32, NodeView)], running: i64) -> Report {
    Report {
        running,
        nodes: nodes.iter().copied().collect(),
        ..Report::default()
    }
}

const UP: NodeView = NodeView::Up {
    weight: 0,
    draining: false,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_shared_and_end_with_the_lease() {
    let etcd = Etcd::start_local().unwrap();
    let a = Cluster::connect(&cfg(&etcd, "t1", "a")).await.unwrap();
    let b = Cluster::connect(&cfg(&etcd, "t1", "b")).await.unwrap();
    let mut watched = a.watch_reports();
    a.publish(&report(&[(1, UP), (2, NodeView::Down)], 5))
        .await
        .unwrap();
    b.publish(&report(&[(1, NodeView::Held)], 5)).await.unwrap();
    for c in [&a, &b] {
        let seen = c.reports().await.unwrap();
        assert_eq!(seen.keys().collect::<Vec<_>>(), ["a", "b"], "{}", c.id());
        assert!(seen["a"].same_as(&report(&[(1, UP), (2, NodeView::Down)], 5)));
        assert!(seen["b"].same_as(&report(&[(1, NodeView::Held)], 5)));
        assert!(seen["a"].published_unix_ms > 0);
    }
    // A new report replaces the old one, and the watch follows.
    b.publish(&report(&[(1, UP), (3, UP)], 6)).await.unwrap();
    let t0 = Instant::now();
    wait_for("the watch shows b's new report", TTL, || {
        let ok = watched
            .borrow_and_update()
            .get("b")
            .is_some_and(|r| r.running == 6);
        async move { ok }
    })
    .await;
    println!(
        "a new report reached the other's watch in {} ms",
        t0.elapsed().as_millis()
    );
    // b dies: its report goes when its lease expires, a's stays.
    let t0 = Instant::now();
    drop(b);
    wait_for("b's report gone", TTL + Duration::from_secs(1), || async {
        !a.reports().await.unwrap().contains_key("b")
    })
    .await;
    println!(
        "a dead balancer's report gone after {} ms",
        t0.elapsed().as_millis()
    );
    assert!(a.reports().await.unwrap().contains_key("a"));
    // A report that is not one is left out (one bad publisher must not blind the leader).
    let mut raw = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    raw.put("/lb/t1/liveness/z", "not json", None)
        .await
        .unwrap();
    let seen = a.reports().await.unwrap();
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_writes_tables_and_everyone_sees_them() {
    let etcd = Etcd::start_local().unwrap();
    let a = Cluster::connect(&cfg(&etcd, "t1", "a")).await.unwrap();
    let b = Cluster::connect(&cfg(&etcd, "t1", "b")).await.unwrap();
    let lead = one_leader(&[&a, &b]).await;
    let (leader, other) = if lead == 0 { (&a, &b) } else { (&b, &a) };
    let mut watch = other.watch_revisions().await.unwrap();

    let t0 = Instant::now();
    let r1 = leader.write_revision(b"tables v1", 0).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(2), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    println!(
        "a table revision written by the leader seen by the other's watch in {} us",
        t0.elapsed().as_micros()
    );
    assert_eq!(
        (seen.revision, seen.bytes.as_slice()),
        (r1, &b"tables v1"[..])
    );

    // The other may not write, and nothing reaches the watch.
    let err = other.write_revision(b"rogue", r1).await.unwrap_err();
    assert!(matches!(err, Error::NotLeader { .. }), "{err}");
    println!("a non-leader's write: {err}");
    // Nor may the leader write over a revision it has not seen.
    let err = leader.write_revision(b"blind", 0).await.unwrap_err();
    assert!(
        matches!(err, Error::Behind { expect: 0, current } if current == r1),
        "{err}"
    );
    let r2 = leader.write_revision(b"tables v2", r1).await.unwrap();
    assert!(r2 > r1);
    let seen = watch.next().await.unwrap().unwrap();
    assert_eq!(
        (seen.revision, seen.bytes.as_slice()),
        (r2, &b"tables v2"[..])
    );

    // A watch started later begins with the current revision.
    let mut late = leader.watch_revisions().await.unwrap();
    let seen = late.next().await.unwrap().unwrap();
    assert_eq!(
        (seen.revision, seen.bytes.as_slice()),
        (r2, &b"tables v2"[..])
    );

    // The leader's term ends in etcd (its election key deleted, as if its lease had ended
    // unseen): its writes are refused, and the other one leads.
    let mut raw = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    let key = raw
        .get(
            "/lb/t1/election/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap()
        .kvs()
        .iter()
        .find(|kv| kv.value() == leader.id().as_bytes())
        .unwrap()
        .key()
        .to_vec();
    raw.delete(key, None).await.unwrap();
    let err = leader.write_revision(b"stale", r2).await.unwrap_err();
    assert!(matches!(err, Error::NotLeader { .. }), "{err}");
    wait_for("the other leads", TTL, || async { other.is_leader() }).await;
    let r3 = other.write_revision(b"tables v3", r2).await.unwrap();
    let seen = watch.next().await.unwrap().unwrap();
    assert_eq!(
        (seen.revision, seen.bytes.as_slice()),
        (r3, &b"tables v3"[..])
    );
    assert!(!leader.is_leader());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_fails_in_bounded_time_and_back_works() {
    let mut etcd = Etcd::start_local().unwrap();
    let a = Cluster::connect(&cfg(&etcd, "t1", "a")).await.unwrap();
    one_leader(&[&a]).await;
    let r1 = a.write_revision(b"before", 0).await.unwrap();

    etcd.kill();
    let bound = OP_TIMEOUT + Duration::from_secs(1);
    let t0 = Instant::now();
    let err = a.publish(&report(&[(1, UP)], 1)).await.unwrap_err();
    println!(
        "etcd down: publish failed in {} ms: {err}",
        t0.elapsed().as_millis()
    );
    assert!(t0.elapsed() < bound);
    let t0 = Instant::now();
    let err = a.reports().await.unwrap_err();
    println!(
        "etcd down: reports failed in {} ms: {err}",
        t0.elapsed().as_millis()
    );
    assert!(t0.elapsed() < bound);
    assert!(err.to_string().starts_with("etcd "), "{err}");
    // The leader cut off from etcd stops leading once its lease may have ended.
    let gone = wait_for("a stops leading", TTL + Duration::from_secs(1), || async {
        !a.is_leader()
    })
    .await;
    println!(
        "etcd down: the leader stopped leading after {} ms",
        gone.as_millis()
    );
    let err = a.write_revision(b"cut off", r1).await.unwrap_err();
    assert!(matches!(err, Error::NotLeader { .. }), "{err}");
    let t0 = Instant::now();
    let err = Cluster::connect(&cfg(&etcd, "t1", "n"))
        .await
        .err()
        .unwrap();
    println!(
        "etcd down: connect failed in {} ms: {err}",
        t0.elapsed().as_millis()
    );
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(t0.elapsed() < bound);

    // A bad section is refused before any request.
    let mut bad = cfg(&etcd, "t1", "n");
    bad.name = "a/b".into();
    let err = Cluster::connect(&bad).await.err().unwrap();
    assert!(matches!(err, Error::Config(_)), "{err}");

    // etcd back on the same data: a new member connects and sees the tables written before;
    // exactly one of the two leads (the old one renews its lease if etcd kept it).
    etcd.run().unwrap();
    let n = Cluster::connect(&cfg(&etcd, "t1", "n")).await.unwrap();
    let mut watch = n.watch_revisions().await.unwrap();
    let seen = watch.next().await.unwrap().unwrap();
    assert_eq!((seen.revision, seen.bytes.as_slice()), (r1, &b"before"[..]));
    let lead = one_leader(&[&a, &n]).await;
    println!("after etcd restarted: {} leads", [&a, &n][lead].id());
}
