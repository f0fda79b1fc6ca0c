//! ECMP over BGP in the cluster lab (`lb_tests::cluster_lab`), before any cluster daemon: three
//! balancers announce the VIPs through `lb_userspace::announce::Announcer` to their bird2, the
//! router (bird2, `merge paths on`, L4 multipath hash) spreads connections over them, and drops
//! a balancer that withdraws or dies. The balancers forward with the kernel (no XDP here):
//! balancer I routes the VIPs to node I, so the node that answers names the balancer that
//! carried the connection, and a connection moved to another balancer would reach a node
//! without its socket and break. Also: the lab's etcd, reached from the balancers, restarted on
//! its data dir. Root only; namespaces `lbcecmplab-*` and `lbcetcdlab-*`.
#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{IpAddr, TcpStream},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use lb_tests::{
    cluster_lab::{ClusterLab, ClusterSpec},
    lab::{self, ECHO_PORT, HTTP_PORT, all_vips, ip_batch, node_ip, node_ip6, sysctls},
    netns::spawn_in,
};
use lb_userspace::announce::Announcer;

const BALANCERS: usize = 3;

fn spec(name: &str) -> ClusterSpec {
    ClusterSpec {
        name: name.into(),
        balancers: BALANCERS,
        nodes: BALANCERS,
        lab_bin: env!("CARGO_BIN_EXE_lb-lab").into(),
    }
}

/// Balancer `i` forwards every VIP to node `i` with the kernel's router.
fn forward_to_node(lab: &ClusterLab, i: usize) {
    let ns = lab.balancer_ns(i);
    sysctls(
        &ns,
        &[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
        ],
    )
    .unwrap();
    let lines: Vec<String> = all_vips()
        .iter()
        .map(|vip| match vip {
            IpAddr::V4(_) => format!("route add {vip}/32 via {}", node_ip(i)),
            IpAddr::V6(_) => format!("route add {vip}/128 via {}", node_ip6(i)),
        })
        .collect();
    ip_batch(&ns, &lines).unwrap();
}

/// `n` HTTP requests to `vip` from the client, each a new connection (a new source port):
/// how many each node answered.
fn spread(lab: &ClusterLab, vip: IpAddr, n: usize) -> BTreeMap<usize, usize> {
    spawn_in(&lab.client_ns(), move || {
        let mut by_node = BTreeMap::new();
        for k in 0..n {
            let body = lab::http_get_ip(None, vip, HTTP_PORT)
                .map_err(|e| e.context(format!("request {k} of {n} to {vip}")))?;
            let node: usize = body
                .trim()
                .strip_prefix("node ")
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("{vip} answered {body:?}"))?;
            *by_node.entry(node).or_insert(0) += 1;
        }
        Ok(by_node)
    })
    .join()
    .unwrap()
    .unwrap()
}

/// Packets each balancer forwarded so far (IPv4 + IPv6).
fn forwarded(lab: &ClusterLab) -> Vec<u64> {
    (1..=lab.balancers())
        .map(|i| {
            let (v4, v6) = ClusterLab::forwarded(&lab.balancer_ns(i)).unwrap();
            v4 + v6
        })
        .collect()
}

/// `forwarded` once it stopped moving (a closed connection's last ACKs may still be on their
/// way): two reads 30 ms apart agree, within 2 s.
fn settled(lab: &ClusterLab) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut last = forwarded(lab);
    loop {
        std::thread::sleep(Duration::from_millis(30));
        let now = forwarded(lab);
        if now == last {
            return now;
        }
        assert!(Instant::now() < deadline, "the balancers keep forwarding");
        last = now;
    }
}

fn delta(after: &[u64], before: &[u64]) -> Vec<u64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

/// `conns` TCP echo connections open at once, each `rounds` round trips 5 ms apart: every one
/// must get every echo back (one that ECMP moved to another balancer would reach another node,
/// which has no such connection, and be reset).
fn echo_connections(lab: &ClusterLab, vip: IpAddr, conns: usize, rounds: usize) {
    let handles: Vec<_> = (0..conns)
        .map(|c| {
            spawn_in(&lab.client_ns(), move || {
                let mut s = lab::connect_ip(None, vip, ECHO_PORT)?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.set_nodelay(true)?;
                for r in 0..rounds {
                    let msg = format!("connection {c} round {r}\n");
                    s.write_all(msg.as_bytes())?;
                    let mut back = vec![0u8; msg.len()];
                    s.read_exact(&mut back)
                        .map_err(|e| anyhow::anyhow!("connection {c} to {vip}, round {r}: {e}"))?;
                    anyhow::ensure!(back == msg.as_bytes(), "connection {c}: wrong echo");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
}

/// `n` TCP echo connections to `vip` opened from the client (each its own source port).
fn open_echo(lab: &ClusterLab, vip: IpAddr, n: usize) -> Vec<TcpStream> {
    spawn_in(&lab.client_ns(), move || {
        (0..n)
            .map(|_| {
                let s = lab::connect_ip(None, vip, ECHO_PORT)?;
                s.set_read_timeout(Some(Duration::from_secs(1)))?;
                s.set_nodelay(true)?;
                Ok(s)
            })
            .collect()
    })
    .join()
    .unwrap()
    .unwrap()
}

/// One round trip on `s`, alone in the lab: which balancer carried it (the only one whose
/// forwarding counter moved) and whether the echo came back.
fn probe(lab: &ClusterLab, s: &mut TcpStream) -> (usize, bool) {
    let before = settled(lab);
    let ok = s.write_all(b"probe\n").is_ok() && {
        let mut back = [0u8; 6];
        s.read_exact(&mut back).is_ok() && &back == b"probe\n"
    };
    // The ACK owed for the echo leaves now, not after the delayed-ACK timer (it would be
    // counted in the next probe's window).
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a c_int it reads.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
    let d = delta(&settled(lab), &before);
    let carriers: Vec<usize> = (0..d.len()).filter(|&b| d[b] > 0).collect();
    assert_eq!(carriers.len(), 1, "one round trip, forwarded by {d:?}");
    (carriers[0] + 1, ok)
}

#[test]
fn ecmp_spreads_connections_over_balancers_and_drops_withdrawn_and_dead_ones() {
    let started = Instant::now();
    let mut lab = ClusterLab::new(&spec("lbcecmplab")).unwrap();
    let vips = all_vips();
    for vip in vips {
        assert!(
            lab.ecmp_nexthops(vip).unwrap().is_empty(),
            "the router has a route to {vip} before anything is announced"
        );
    }
    for i in 1..=BALANCERS {
        forward_to_node(&lab, i);
    }

    // Every balancer announces every VIP: three next hops for each at the router.
    let mut announcers: Vec<Announcer> = (1..=BALANCERS)
        .map(|i| Announcer::new(&lab.bgp_config(i)))
        .collect();
    let want: BTreeSet<IpAddr> = vips.into_iter().collect();
    let t0 = Instant::now();
    for a in &mut announcers {
        a.announce(&want).unwrap();
        assert_eq!(a.announced(), &want);
    }
    let calls = t0.elapsed();
    let all: BTreeSet<usize> = (1..=BALANCERS).collect();
    let appear = lab
        .wait_nexthops(&vips, &all, Duration::from_secs(10))
        .unwrap();
    println!(
        "announce: {BALANCERS} x Announcer::announce took {} ms; every VIP (2 IPv4, 2 IPv6) had \
         {BALANCERS} ECMP next hops at the router {} ms after the first call",
        calls.as_millis(),
        (calls + appear).as_millis()
    );
    // Announcing the same set again changes nothing (and calls no birdc: unit-tested).
    announcers[0].announce(&want).unwrap();

    // Connections spread over all balancers, IPv4 and IPv6.
    for (vip, n) in [(lab::DSR_VIP.into(), 90), (lab::DSR_VIP6.into(), 60)] {
        let before = settled(&lab);
        let by_node = spread(&lab, vip, n);
        let d = delta(&settled(&lab), &before);
        println!(
            "spread: {n} connections to {vip}: per balancer (= answering node) {by_node:?}, \
             packets forwarded per balancer {d:?}"
        );
        assert_eq!(by_node.values().sum::<usize>(), n);
        for i in 1..=BALANCERS {
            let conns = by_node.get(&i).copied().unwrap_or(0);
            assert!(conns > 0, "balancer {i} carried none of {n}: {by_node:?}");
            // Its packets went through balancer i's kernel, at least SYN, ACK and request.
            assert!(
                d[i - 1] >= 3 * conns as u64,
                "balancer {i}: {d:?} for {by_node:?}"
            );
        }
    }

    // A connection keeps its balancer: alone, all its packets through one.
    let before = settled(&lab);
    echo_connections(&lab, lab::DSR_VIP.into(), 1, 50);
    let d = delta(&settled(&lab), &before);
    println!("one connection, 50 round trips: packets forwarded per balancer {d:?}");
    let carriers: Vec<usize> = (0..BALANCERS).filter(|&b| d[b] > 0).collect();
    assert_eq!(
        carriers.len(),
        1,
        "one connection, several balancers: {d:?}"
    );
    assert!(d[carriers[0]] >= 50, "{d:?}");
    // ... and so do 12 at once, over IPv4 and IPv6.
    echo_connections(&lab, lab::DSR_VIP.into(), 12, 30);
    echo_connections(&lab, lab::DSR_VIP6.into(), 12, 30);

    // Open connections, and which balancer carries each, before balancer 1 leaves.
    let mut conns = open_echo(&lab, lab::DSR_VIP.into(), 30);
    let before: Vec<usize> = conns
        .iter_mut()
        .map(|s| {
            let (b, ok) = probe(&lab, s);
            assert!(ok, "an open connection's echo failed before any change");
            b
        })
        .collect();

    // Balancer 1 withdraws everything: the router drops it.
    let t = Instant::now();
    announcers[0].withdraw_all().unwrap();
    let call = t.elapsed();
    assert!(announcers[0].announced().is_empty());
    let rest: BTreeSet<usize> = [2, 3].into();
    lab.wait_nexthops(&vips, &rest, Duration::from_secs(5))
        .unwrap();
    println!(
        "withdraw: balancer 1 gone from every VIP's next hops {} ms after withdraw_all \
         (the call: {} ms)",
        t.elapsed().as_millis(),
        call.as_millis()
    );
    // Where the open connections went: balancer 1's to the others (and to another node:
    // broken here, where each balancer has its own node), and Linux's hash-threshold ECMP
    // also moves some of the survivors' flows between them (1/4 of them in theory, 3 -> 2
    // equal paths). A connection that kept its balancer kept working.
    let (mut stayed, mut moved, mut from1) = (0, 0, 0);
    for (s, &was) in conns.iter_mut().zip(&before) {
        let (now, ok) = probe(&lab, s);
        assert_ne!(now, 1, "a connection still goes through balancer 1");
        assert_eq!(ok, now == was, "balancer {was} -> {now}: echo ok = {ok}");
        match (was, now == was) {
            (1, _) => from1 += 1,
            (_, true) => stayed += 1,
            (_, false) => moved += 1,
        }
    }
    println!(
        "withdraw, 30 open connections: {from1} on balancer 1 moved to 2 or 3; of the {} on \
         balancers 2 and 3, {moved} moved between them and {stayed} stayed (and kept working)",
        moved + stayed
    );
    drop(conns);
    let by_node = spread(&lab, lab::DSR_VIP.into(), 30);
    assert!(
        !by_node.contains_key(&1),
        "balancer 1 still carries: {by_node:?}"
    );
    assert!(
        by_node.contains_key(&2) && by_node.contains_key(&3),
        "{by_node:?}"
    );

    // Balancer 2 dies as a box: the router notices by BFD alone.
    let t = Instant::now();
    lab.kill_balancer(2).unwrap();
    let only3: BTreeSet<usize> = [3].into();
    lab.wait_nexthops(&vips, &only3, Duration::from_secs(10))
        .unwrap();
    let detect = t.elapsed();
    println!(
        "box failure: balancer 2 gone from every VIP's next hops {} ms after it died \
         (BFD {} ms x {}; the BGP hold time would be {} s)",
        detect.as_millis(),
        lb_tests::cluster_lab::BFD_INTERVAL_MS,
        lb_tests::cluster_lab::BFD_MULTIPLIER,
        lb_tests::cluster_lab::BGP_HOLD_S
    );
    assert!(
        detect < Duration::from_millis(1500),
        "{detect:?}: BFD should have noticed well before the hold time"
    );
    let by_node = spread(&lab, lab::DSR_VIP6.into(), 20);
    assert_eq!(by_node.keys().collect::<Vec<_>>(), [&3], "{by_node:?}");

    // It comes back with its include file as it was: announced again.
    let t = Instant::now();
    lab.revive_balancer(2).unwrap();
    let back: BTreeSet<usize> = [2, 3].into();
    lab.wait_nexthops(&vips, &back, Duration::from_secs(15))
        .unwrap();
    println!(
        "revive: balancer 2 back in every VIP's next hops {} ms after its bird started",
        t.elapsed().as_millis()
    );
    println!("ecmp test: {} ms in all", started.elapsed().as_millis());
}

#[test]
fn cluster_lab_etcd_is_reached_from_the_balancers_and_restarts_on_its_data_dir() {
    let mut lab = ClusterLab::new(&ClusterSpec {
        balancers: 2,
        nodes: 1,
        ..spec("lbcetcdlab")
    })
    .unwrap();
    // etcd's JSON gateway: key "/lbc/key", value "value-1" (base64).
    let put = r#"{"key":"L2xiYy9rZXk=","value":"dmFsdWUtMQ=="}"#;
    let get = r#"{"key":"L2xiYy9rZXk="}"#;
    let (b1, b2) = (lab.balancer_ns(1), lab.balancer_ns(2));
    lab.etcd_request(&b1, "POST", "/v3/kv/put", Some(put))
        .unwrap();
    let got = lab
        .etcd_request(&b2, "POST", "/v3/kv/range", Some(get))
        .unwrap();
    assert!(got.contains("dmFsdWUtMQ=="), "{got}");
    assert!(lab.etcd_endpoint().starts_with("http://198.18.0.250:"));

    lab.stop_etcd().unwrap();
    let e = lab
        .etcd_request(&b2, "POST", "/v3/kv/range", Some(get))
        .unwrap_err();
    assert!(format!("{e:#}").contains("connecting to etcd"), "{e:#}");

    lab.start_etcd().unwrap();
    let got = lab
        .etcd_request(&b1, "POST", "/v3/kv/range", Some(get))
        .unwrap();
    assert!(
        got.contains("dmFsdWUtMQ=="),
        "the key is gone after the restart: {got}"
    );
}
