//! Fixture tests of the XDP balancer and the node-side decapsulator (root only).
//!
//! Katran's fixture idea in Rust: a fixed configuration written through `Dataplane` (the code
//! the daemon uses), then a table of rows — what the row checks, the input frame built with
//! `lb_tests::packet`, the expected verdict and the expected output bytes — run through
//! `BPF_PROG_TEST_RUN`. Every row also checks the exact change of `STATS`, `DROPS`,
//! `VIP_STATS` and `NODE_STATS`; after the rows the totals, traffic counters and per-route
//! counters are checked against the tallies. The contract is `docs/dataplane.md`.
//!
//! Run: `cargo test --release -p lb-tests --test fixtures -- --test-threads=1` (as root).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{
    CT_F_FIN, CT_F_KEEP, CT_F_RST, CtEntry, DROP_REASON_COUNT, DecapStat, DropReason, NODE_ACTIVE,
    NODE_DOWN, NODE_DRAINING, PROTO_TCP, PROTO_UDP, ROUTE_F_MOVED, ROUTE_STATS_SAMPLE, RouteEntry,
    STAT_COUNT, Stat, hash::filter_slot,
};
use lb_tests::{
    fixture::{self as fx, *},
    packet::{self as pk, *},
};
use lb_userspace::dataplane::{Dataplane, ForwardMode, addr_hash, ip_bytes};

// ---------------------------------------------------------------------------------------------
// Rows and the runner.
// ---------------------------------------------------------------------------------------------

/// What the output frame must be.
#[derive(Clone, Debug)]
enum Out {
    /// Exactly these bytes.
    Exact(Vec<u8>),
    /// The input, byte for byte.
    Unchanged,
    /// Not checked (drops).
    Any,
}

/// Where a forwarded packet went, for the traffic counters.
#[derive(Clone, Copy, Debug)]
struct Fwd {
    vip: u32,
    node: u32,
    route: u32,
}

/// One row.
#[derive(Clone, Debug)]
struct Fixture {
    what: String,
    input: Vec<u8>,
    verdict: u32,
    output: Out,
    /// Event counters expected to rise by one, besides the verdict counter (Pass/Tx/Drop).
    events: Vec<Stat>,
    drop: Option<DropReason>,
    to: Option<Fwd>,
    /// Counters this row does not check (spec ambiguity, see the row).
    ignore: Vec<Stat>,
}

impl Fixture {
    fn pass(what: &str, input: Vec<u8>) -> Self {
        Self {
            what: what.into(),
            input,
            verdict: XDP_PASS,
            output: Out::Unchanged,
            events: vec![],
            drop: None,
            to: None,
            ignore: vec![],
        }
    }

    fn drop(what: &str, input: Vec<u8>, reason: DropReason) -> Self {
        Self {
            verdict: XDP_DROP,
            output: Out::Any,
            drop: Some(reason),
            ..Self::pass(what, input)
        }
    }

    /// A PMTU reply (XDP_TX, not forwarded to a node).
    fn reply(what: &str, input: Vec<u8>, output: Vec<u8>) -> Self {
        Self {
            verdict: XDP_TX,
            output: Out::Exact(output),
            events: vec![Stat::PmtuReply],
            ..Self::pass(what, input)
        }
    }

    fn ignoring(mut self, stats: &[Stat]) -> Self {
        self.ignore.extend_from_slice(stats);
        self
    }

    fn with_events(mut self, stats: &[Stat]) -> Self {
        self.events.extend_from_slice(stats);
        self
    }
}

/// The expected output of forwarding `input` of `vip` (flow hash `hash`) to `node`.
fn forwarded(vip: &Vip, input: &[u8], hash: u32, node: u32) -> Vec<u8> {
    match (vip.mode, vip.addr) {
        (ForwardMode::DsrL2, _) => dsr_rewrite(input, node_mac(node)),
        (ForwardMode::Ipip, IpAddr::V4(_)) => ipip4_encap(
            input,
            GW_MAC,
            ipip_src4(IPIP_SRC4, IPIP_SRC4_MASK, hash),
            node_addr4(node),
        ),
        (ForwardMode::Ipip, IpAddr::V6(_)) => ipip6_encap(
            input,
            GW_MAC,
            ipip_src6(IPIP_SRC6, hash),
            node_addr6(node),
            hash,
        ),
    }
}

/// A row forwarding `input` (a packet of `vip` with flow hash `hash`) to `node`, counting
/// `events` (plus `Encap` for ipip VIPs).
fn fwd_to(what: &str, vip: &Vip, input: Vec<u8>, hash: u32, node: u32, events: &[Stat]) -> Fixture {
    let mut ev = events.to_vec();
    if vip.mode == ForwardMode::Ipip {
        ev.push(Stat::Encap);
    }
    Fixture {
        verdict: XDP_TX,
        output: Out::Exact(forwarded(vip, &input, hash, node)),
        events: ev,
        to: Some(Fwd {
            vip: vip.index,
            node,
            route: route_of(hash),
        }),
        ..Fixture::pass(what, input)
    }
}

/// As [`fwd_to`], to the standard owner of `hash`.
fn fwd(what: &str, vip: &Vip, input: Vec<u8>, hash: u32, events: &[Stat]) -> Fixture {
    fwd_to(what, vip, input, hash, std_owner(hash), events)
}

const ALL_STATS: [Stat; STAT_COUNT as usize] = [
    Stat::Pass,
    Stat::Tx,
    Stat::Drop,
    Stat::CtInsert,
    Stat::CtHit,
    Stat::CtMiss,
    Stat::CtReroute,
    Stat::IcmpForward,
    Stat::PmtuReply,
    Stat::Fragment,
    Stat::Encap,
    Stat::DrainKeep,
    Stat::CtEvict,
    Stat::CtFull,
    Stat::EncapAggregate,
];

const ALL_DROPS: [DropReason; DROP_REASON_COUNT as usize] = [
    DropReason::TruncatedVlan,
    DropReason::BadIpv4Header,
    DropReason::BadIpv4Length,
    DropReason::BadIpv6Header,
    DropReason::BadIpv6Length,
    DropReason::BadTcpHeader,
    DropReason::BadUdpHeader,
    DropReason::BadIcmp,
    DropReason::NoBackend,
    DropReason::TooBig,
    DropReason::HelperFailed,
    DropReason::NoRoute,
    DropReason::PmtuLimited,
];

/// Hex dump of a byte range, 16 per line, for failure messages.
fn hex(b: &[u8]) -> String {
    b.chunks(16)
        .map(|c| {
            c.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n      ")
}

fn byte_diff(got: &[u8], want: &[u8]) -> String {
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let from = first.saturating_sub(first % 16);
    let to_g = (from + 64).min(got.len());
    let to_w = (from + 64).min(want.len());
    format!(
        "output differs: got {} bytes, want {}; first difference at byte {first}\n    got  [{from}..]: {}\n    want [{from}..]: {}",
        got.len(),
        want.len(),
        hex(&got[from.min(got.len())..to_g]),
        hex(&want[from.min(want.len())..to_w]),
    )
}

/// (packets, bytes) per VIP index and per node index.
type Traffic = (Vec<(u64, u64)>, Vec<(u64, u64)>);

fn traffic(dp: &Dataplane) -> Traffic {
    let v = VIPS
        .iter()
        .map(|v| {
            let t = dp.vip_traffic(v.index).unwrap();
            (t.packets, t.bytes)
        })
        .collect();
    let n = (0..=NODE_NOADDR)
        .map(|i| {
            let t = dp.node_traffic(i).unwrap();
            (t.packets, t.bytes)
        })
        .collect();
    (v, n)
}

/// Runs rows against one `Dataplane`, collecting failures, and keeps the tallies the final
/// counter checks compare against.
struct Runner {
    dp: Dataplane,
    rows: usize,
    failures: Vec<String>,
    stats: Vec<u64>,
    drops: Vec<u64>,
    ignored: Vec<Stat>,
    vip_traffic: BTreeMap<u32, (u64, u64)>,
    node_traffic: BTreeMap<u32, (u64, u64)>,
    /// `ROUTE_STATS` as the kernel samples it: every `ROUTE_STATS_SAMPLE`-th packet of a VIP
    /// counts that many for its route (per CPU: the runner keeps to one).
    route_packets: BTreeMap<(u32, u32), u64>,
    _cpu: OneCpu,
}

impl Runner {
    fn new() -> Self {
        Self::with(fx::load().expect("load and configure the balancer (root needed)"))
    }

    fn with(dp: Dataplane) -> Self {
        Self {
            dp,
            rows: 0,
            failures: vec![],
            stats: vec![0; STAT_COUNT as usize],
            drops: vec![0; DROP_REASON_COUNT as usize],
            ignored: vec![],
            vip_traffic: BTreeMap::new(),
            node_traffic: BTreeMap::new(),
            route_packets: BTreeMap::new(),
            _cpu: OneCpu::pin(),
        }
    }

    fn run_all(&mut self, rows: Vec<Fixture>) {
        for f in rows {
            self.row(f);
        }
    }

    fn row(&mut self, f: Fixture) {
        self.rows += 1;
        let before = self.dp.counters().unwrap();
        let (tv0, tn0) = traffic(&self.dp);
        let (verdict, out) = match self.dp.test_run(&f.input) {
            Ok(r) => r,
            Err(e) => {
                self.failures.push(format!(
                    "row {} '{}': test_run failed: {e}",
                    self.rows, f.what
                ));
                return;
            }
        };
        let after = self.dp.counters().unwrap();
        let (tv1, tn1) = traffic(&self.dp);
        let mut errs = vec![];
        if verdict != f.verdict {
            errs.push(format!(
                "verdict {} (want {})",
                verdict_name(verdict),
                verdict_name(f.verdict)
            ));
        }
        match &f.output {
            Out::Exact(want) if out != *want && verdict == f.verdict => {
                errs.push(byte_diff(&out, want))
            }
            Out::Unchanged if out != f.input && verdict == f.verdict => errs.push(format!(
                "not passed unchanged: {}",
                byte_diff(&out, &f.input)
            )),
            _ => {}
        }

        // Counters: the verdict counter, the listed events, the drop reason; nothing else.
        let mut want_stats = vec![0u64; STAT_COUNT as usize];
        let vstat = match f.verdict {
            XDP_PASS => Stat::Pass,
            XDP_TX => Stat::Tx,
            _ => Stat::Drop,
        };
        want_stats[vstat as usize] += 1;
        for e in &f.events {
            want_stats[*e as usize] += 1;
        }
        let mut want_drops = vec![0u64; DROP_REASON_COUNT as usize];
        if let Some(r) = f.drop {
            want_drops[r as usize] += 1;
        }
        for s in ALL_STATS {
            let i = s as usize;
            let got = after.stats[i].wrapping_sub(before.stats[i]);
            if f.ignore.contains(&s) {
                continue;
            }
            if got != want_stats[i] {
                errs.push(format!("STATS[{s:?}] +{got} (want +{})", want_stats[i]));
            }
        }
        for d in ALL_DROPS {
            let i = d as usize;
            let got = after.drops[i].wrapping_sub(before.drops[i]);
            if got != want_drops[i] {
                errs.push(format!("DROPS[{d:?}] +{got} (want +{})", want_drops[i]));
            }
        }
        let len = f.input.len() as u64;
        for (k, v) in VIPS.iter().enumerate() {
            let want = match f.to {
                Some(t) if t.vip == v.index => (1, len),
                _ => (0, 0),
            };
            let got = (tv1[k].0 - tv0[k].0, tv1[k].1 - tv0[k].1);
            if got != want {
                errs.push(format!(
                    "VIP_STATS[{}] +{got:?} packets/bytes (want +{want:?})",
                    v.index
                ));
            }
        }
        for n in 0..=NODE_NOADDR {
            let k = n as usize;
            let want = match f.to {
                Some(t) if t.node == n => (1, len),
                _ => (0, 0),
            };
            let got = (tn1[k].0 - tn0[k].0, tn1[k].1 - tn0[k].1);
            if got != want {
                errs.push(format!(
                    "NODE_STATS[{n}] +{got:?} packets/bytes (want +{want:?})"
                ));
            }
        }

        // Tallies for the totals check.
        for (i, w) in want_stats.iter().enumerate() {
            self.stats[i] += w;
        }
        for (i, w) in want_drops.iter().enumerate() {
            self.drops[i] += w;
        }
        self.ignored.extend_from_slice(&f.ignore);
        if let Some(t) = f.to {
            let e = self.vip_traffic.entry(t.vip).or_default();
            *e = (e.0 + 1, e.1 + len);
            let sampled = e.0.is_multiple_of(ROUTE_STATS_SAMPLE);
            let e = self.node_traffic.entry(t.node).or_default();
            *e = (e.0 + 1, e.1 + len);
            if sampled {
                *self.route_packets.entry((t.vip, t.route)).or_default() += ROUTE_STATS_SAMPLE;
            }
        }
        if !errs.is_empty() {
            self.failures.push(format!(
                "row {} '{}':\n  {}",
                self.rows,
                f.what,
                errs.join("\n  ")
            ));
        }
    }

    /// A failure outside a row (conntrack contents and the like).
    fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.failures.push(what.into());
        }
    }

    /// Totals against the tallies, then panics with every failure.
    fn finish(mut self, name: &str) {
        let c = self.dp.counters().unwrap();
        for s in ALL_STATS {
            if self.ignored.contains(&s) {
                continue;
            }
            let (got, want) = (c.stats[s as usize], self.stats[s as usize]);
            self.check(
                got == want,
                format!("totals: STATS[{s:?}] = {got}, tally {want}"),
            );
        }
        for d in ALL_DROPS {
            let (got, want) = (c.drops[d as usize], self.drops[d as usize]);
            self.check(
                got == want,
                format!("totals: DROPS[{d:?}] = {got}, tally {want}"),
            );
        }
        for v in VIPS {
            let t = self.dp.vip_traffic(v.index).unwrap();
            let want = self.vip_traffic.get(&v.index).copied().unwrap_or_default();
            self.check(
                (t.packets, t.bytes) == want,
                format!(
                    "totals: VIP_STATS[{}] = ({}, {}), tally {want:?}",
                    v.index, t.packets, t.bytes
                ),
            );
            let routes = self.dp.route_packets(&v.key()).unwrap();
            let want: Vec<u64> = (0..N)
                .map(|r| {
                    self.route_packets
                        .get(&(v.index, r))
                        .copied()
                        .unwrap_or_default()
                })
                .collect();
            self.check(
                routes == want,
                format!(
                    "totals: ROUTE_STATS of VIP {} = {routes:?}, tally {want:?}",
                    v.index
                ),
            );
        }
        for n in 0..=NODE_NOADDR {
            let t = self.dp.node_traffic(n).unwrap();
            let want = self.node_traffic.get(&n).copied().unwrap_or_default();
            self.check(
                (t.packets, t.bytes) == want,
                format!(
                    "totals: NODE_STATS[{n}] = ({}, {}), tally {want:?}",
                    t.packets, t.bytes
                ),
            );
        }
        println!(
            "{name}: {} rows, {} failures",
            self.rows,
            self.failures.len()
        );
        if !self.failures.is_empty() {
            panic!(
                "{name}: {} of the checks failed:\n{}",
                self.failures.len(),
                self.failures.join("\n")
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Packet shorthands.
// ---------------------------------------------------------------------------------------------

fn client_of(dst: IpAddr) -> IpAddr {
    match dst {
        IpAddr::V4(_) => CLIENT4,
        IpAddr::V6(_) => CLIENT6,
    }
}

fn router_of(dst: IpAddr) -> IpAddr {
    match dst {
        IpAddr::V4(_) => ROUTER4,
        IpAddr::V6(_) => ROUTER6,
    }
}

/// A client TCP segment to `vip` from client port `sport`.
fn tcp(vip: &Vip, sport: u16, flags: u8) -> Packet {
    Packet::tcp(client_of(vip.addr), vip.addr, sport, vip.port, flags)
}

/// A client UDP datagram to `vip`.
fn udp(vip: &Vip, sport: u16) -> Packet {
    Packet::udp(client_of(vip.addr), vip.addr, sport, vip.port).payload_len(32)
}

/// The flow hash of a client packet to `vip` from `sport`.
fn h(vip: &Vip, sport: u16) -> u32 {
    vip_hash(vip, client_of(vip.addr), sport, vip.port)
}

/// An ICMP (v4: type/code, v6: type/code) error from a router to `vip`'s address about the
/// node's reply packet of the flow (client port `cport`), quoting `quote_len` bytes of it.
fn icmp_about(
    vip: &Vip,
    cport: u16,
    ty: u8,
    code: u8,
    rest: [u8; 4],
    quote: Option<usize>,
) -> Packet {
    let client = client_of(vip.addr);
    let reply = if vip.proto == PROTO_TCP {
        Packet::tcp(vip.addr, client, vip.port, cport, TCP_ACK).payload_len(40)
    } else {
        Packet::udp(vip.addr, client, vip.port, cport).payload_len(40)
    };
    let mut q = reply.l3();
    if let Some(n) = quote {
        q.truncate(n);
    }
    Packet::icmp(router_of(vip.addr), vip.addr, ty, code, rest, &q)
}

const ACK: u8 = TCP_ACK;
const SYN: u8 = TCP_SYN;
const PSH_ACK: u8 = TCP_PSH | TCP_ACK;

/// An IPv4 address that is not a VIP but shares a `VIP_FILTER` bit with `VIP4_A`.
fn filter_twin_v4() -> IpAddr {
    let want = filter_slot(addr_hash(&ip_bytes(VIP4_A).0, 4));
    (0..1u32 << 24)
        .map(|i| v4(100, (i >> 16) as u8, (i >> 8) as u8, i as u8))
        .find(|a| !is_vip_addr(*a) && filter_slot(addr_hash(&ip_bytes(*a).0, 4)) == want)
        .expect("some address shares the filter bit")
}

fn assert_filter_clear(a: IpAddr) {
    let (b, fam) = ip_bytes(a);
    let slot = filter_slot(addr_hash(&b, fam));
    for v in VIPS {
        let (vb, vf) = ip_bytes(v.addr);
        assert!(
            vf != fam || filter_slot(addr_hash(&vb, vf)) != slot,
            "{a} shares a filter bit with VIP {}; pick another test address",
            v.addr
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The main table.
// ---------------------------------------------------------------------------------------------

fn forwarding_rows() -> Vec<Fixture> {
    use Stat::*;
    let mut rows = vec![];
    // --- TCP and UDP, IPv4 and IPv6, dsr-l2 and ipip, SYN and established.
    let p = tcp(&V4_TCP_DSR, 40000, SYN).build();
    rows.push(fwd(
        "fwd/v4 tcp syn dsr-l2",
        &V4_TCP_DSR,
        p,
        h(&V4_TCP_DSR, 40000),
        &[CtInsert],
    ));
    let p = tcp(&V4_TCP_DSR, 40001, PSH_ACK).payload_len(100).build();
    rows.push(fwd(
        "fwd/v4 tcp established dsr-l2 (no conntrack)",
        &V4_TCP_DSR,
        p,
        h(&V4_TCP_DSR, 40001),
        &[],
    ));
    let p = tcp(&V4_TCP_IPIP, 40002, SYN).build();
    rows.push(fwd(
        "fwd/v4 tcp syn ipip",
        &V4_TCP_IPIP,
        p,
        h(&V4_TCP_IPIP, 40002),
        &[CtInsert],
    ));
    let p = tcp(&V4_TCP_IPIP, 40003, PSH_ACK)
        .tos(0x28)
        .payload_len(200)
        .build();
    rows.push(fwd(
        "fwd/v4 tcp established ipip (TOS copied)",
        &V4_TCP_IPIP,
        p,
        h(&V4_TCP_IPIP, 40003),
        &[],
    ));
    let p = udp(&V4_UDP_DSR, 5353).build();
    rows.push(fwd(
        "fwd/v4 udp dsr-l2 first packet (ct miss+insert)",
        &V4_UDP_DSR,
        p,
        h(&V4_UDP_DSR, 5353),
        &[CtMiss, CtInsert],
    ));
    let p = udp(&V4_UDP_DSR, 5353).payload_len(64).build();
    rows.push(fwd(
        "fwd/v4 udp dsr-l2 second packet (ct hit)",
        &V4_UDP_DSR,
        p,
        h(&V4_UDP_DSR, 5353),
        &[CtHit],
    ));
    let p = udp(&V4_UDP_IPIP, 5000).build();
    rows.push(fwd(
        "fwd/v4 udp ipip",
        &V4_UDP_IPIP,
        p,
        h(&V4_UDP_IPIP, 5000),
        &[CtMiss, CtInsert],
    ));
    let p = tcp(&V6_TCP_DSR, 40000, SYN).build();
    rows.push(fwd(
        "fwd/v6 tcp syn dsr-l2",
        &V6_TCP_DSR,
        p,
        h(&V6_TCP_DSR, 40000),
        &[CtInsert],
    ));
    let p = tcp(&V6_TCP_DSR, 40001, PSH_ACK).payload_len(100).build();
    rows.push(fwd(
        "fwd/v6 tcp established dsr-l2",
        &V6_TCP_DSR,
        p,
        h(&V6_TCP_DSR, 40001),
        &[],
    ));
    let p = tcp(&V6_TCP_IPIP, 40002, SYN)
        .tos(0xb8)
        .flow_label(0xabcde)
        .build();
    rows.push(fwd(
        "fwd/v6 tcp syn ipip (traffic class copied)",
        &V6_TCP_IPIP,
        p,
        h(&V6_TCP_IPIP, 40002),
        &[CtInsert],
    ));
    let p = tcp(&V6_TCP_IPIP, 40003, PSH_ACK).payload_len(300).build();
    rows.push(fwd(
        "fwd/v6 tcp established ipip",
        &V6_TCP_IPIP,
        p,
        h(&V6_TCP_IPIP, 40003),
        &[],
    ));
    let p = udp(&V6_UDP_DSR, 5353).build();
    rows.push(fwd(
        "fwd/v6 udp dsr-l2",
        &V6_UDP_DSR,
        p,
        h(&V6_UDP_DSR, 5353),
        &[CtMiss, CtInsert],
    ));
    let p = udp(&V6_UDP_IPIP, 5000).build();
    rows.push(fwd(
        "fwd/v6 udp ipip",
        &V6_UDP_IPIP,
        p,
        h(&V6_UDP_IPIP, 5000),
        &[CtMiss, CtInsert],
    ));
    let p = Packet::udp(CLIENT4, VIP4_ALLPORTS, 6000, 9999)
        .payload_len(10)
        .build();
    let hash = flow_hash(CLIENT4, VIP4_ALLPORTS, 6000, 9999, PROTO_UDP);
    rows.push(fwd(
        "fwd/v4 udp all-ports VIP, any port",
        &V4_UDP_ALL,
        p,
        hash,
        &[CtMiss, CtInsert],
    ));

    // --- VLAN, IPv4 options, Ethernet padding.
    let p = tcp(&V4_TCP_DSR, 40010, ACK)
        .vlan(100)
        .payload_len(20)
        .build();
    rows.push(fwd(
        "vlan/v4 tcp dsr-l2, tag kept",
        &V4_TCP_DSR,
        p,
        h(&V4_TCP_DSR, 40010),
        &[],
    ));
    let p = tcp(&V6_TCP_IPIP, 40011, ACK)
        .vlan(0x2064)
        .payload_len(20)
        .build();
    rows.push(fwd(
        "vlan/v6 tcp ipip, tag kept",
        &V6_TCP_IPIP,
        p,
        h(&V6_TCP_IPIP, 40011),
        &[],
    ));
    let p = udp(&V4_UDP_IPIP, 5001).vlan(7).build();
    rows.push(fwd(
        "vlan/v4 udp ipip, tag kept",
        &V4_UDP_IPIP,
        p,
        h(&V4_UDP_IPIP, 5001),
        &[CtMiss, CtInsert],
    ));
    let opts = [0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00]; // router alert, NOPs, EOL
    let p = tcp(&V4_TCP_DSR, 40012, ACK)
        .ip_options(&opts)
        .payload_len(10)
        .build();
    rows.push(fwd(
        "options/v4 ip options, tcp dsr-l2",
        &V4_TCP_DSR,
        p,
        h(&V4_TCP_DSR, 40012),
        &[],
    ));
    let p = tcp(&V4_TCP_IPIP, 40013, ACK)
        .ip_options(&opts)
        .payload_len(10)
        .build();
    rows.push(fwd(
        "options/v4 ip options, tcp ipip (inner kept whole)",
        &V4_TCP_IPIP,
        p,
        h(&V4_TCP_IPIP, 40013),
        &[],
    ));
    let p = udp(&V4_UDP_DSR, 5354).ip_options(&[0x01; 4]).build();
    rows.push(fwd(
        "options/v4 ip options, udp dsr-l2",
        &V4_UDP_DSR,
        p,
        h(&V4_UDP_DSR, 5354),
        &[CtMiss, CtInsert],
    ));
    let mut p = tcp(&V4_TCP_DSR, 40014, SYN).build();
    p.resize(60, 0);
    rows.push(fwd(
        "padding/v4 syn with ethernet padding (allowed, kept)",
        &V4_TCP_DSR,
        p,
        h(&V4_TCP_DSR, 40014),
        &[CtInsert],
    ));

    // --- Source affinity: two source ports of one client, one node; ports chosen so that a
    // 5-tuple hash would have split them.
    for vip in [V4_TCP_AFF, V6_TCP_AFF] {
        let client = client_of(vip.addr);
        let five = |p: u16| std_owner(flow_hash(client, vip.addr, p, vip.port, vip.proto));
        let a = 1111u16;
        let b = (a + 1..u16::MAX).find(|p| five(*p) != five(a)).unwrap();
        let hash = flow_hash(client, vip.addr, 0, 0, vip.proto);
        let fam = if vip.addr.is_ipv4() { "v4" } else { "v6" };
        for (port, flags) in [(a, SYN), (b, ACK)] {
            let p = tcp(&vip, port, flags).build();
            let ev: &[Stat] = if flags == SYN { &[CtInsert] } else { &[] };
            rows.push(fwd(
                &format!("affinity/{fam} source port {port} -> the client's node"),
                &vip,
                p,
                hash,
                ev,
            ));
        }
    }
    rows
}

fn fragment_rows() -> Vec<Fixture> {
    use Stat::*;
    let mut rows = vec![];
    // UDP datagram to 10.0.0.1:53 split in two: both halves to the owner of the
    // (src, dst, 0, UDP) hash, via the fragment entry (VIP index of port 53).
    let dgram = udp(&V4_UDP_DSR, 7000).payload_len(100).ip_id(0x4242);
    let frags = fragments(&dgram, 64);
    let hash = flow_hash(CLIENT4, VIP4_A, 0, 0, PROTO_UDP);
    rows.push(fwd(
        "frag/v4 udp first fragment (MF) via fragment entry",
        &V4_UDP_DSR,
        frags[0].clone(),
        hash,
        &[Fragment],
    ));
    rows.push(fwd(
        "frag/v4 udp later fragment -> same node",
        &V4_UDP_DSR,
        frags[1].clone(),
        hash,
        &[Fragment],
    ));
    let seg = tcp(&V4_TCP_IPIP, 40100, PSH_ACK)
        .payload_len(120)
        .ip_id(0x77);
    let frags = fragments(&seg, 80);
    let hash = flow_hash(CLIENT4, VIP4_B, 0, 0, PROTO_TCP);
    rows.push(fwd(
        "frag/v4 tcp first fragment ipip",
        &V4_TCP_IPIP,
        frags[0].clone(),
        hash,
        &[Fragment],
    ));
    rows.push(fwd(
        "frag/v4 tcp later fragment ipip -> same node",
        &V4_TCP_IPIP,
        frags[1].clone(),
        hash,
        &[Fragment],
    ));
    let dgram = Packet::udp(CLIENT4, VIP4_ALLPORTS, 6001, 7777).payload_len(50);
    let frags = fragments(&dgram, 32);
    let hash = flow_hash(CLIENT4, VIP4_ALLPORTS, 0, 0, PROTO_UDP);
    rows.push(fwd(
        "frag/v4 later fragment to an all-ports VIP",
        &V4_UDP_ALL,
        frags[1].clone(),
        hash,
        &[Fragment],
    ));
    // 10.0.0.3 has only a TCP VIP: a UDP fragment finds no (dst, 0, UDP) entry.
    let dgram = Packet::udp(CLIENT4, VIP4_AFF, 6002, 8080).payload_len(50);
    let frags = fragments(&dgram, 32);
    rows.push(Fixture::pass(
        "frag/v4 udp fragment to a VIP address without a UDP VIP -> pass",
        frags[1].clone(),
    ));
    rows
}

fn pass_rows() -> Vec<Fixture> {
    assert_filter_clear(OTHER4);
    assert_filter_clear(OTHER6);
    let mut rows = vec![];
    let p = Packet::tcp(CLIENT4, OTHER4, 40000, 80, SYN).build();
    rows.push(Fixture::pass("pass/non-VIP v4 tcp unchanged", p));
    let p = Packet::udp(CLIENT6, OTHER6, 5353, 53)
        .payload_len(20)
        .build();
    rows.push(Fixture::pass("pass/non-VIP v6 udp unchanged", p));
    let p = Packet::tcp(CLIENT4, OTHER4, 40000, 80, ACK)
        .vlan(12)
        .build();
    rows.push(Fixture::pass("pass/non-VIP v4 vlan unchanged", p));
    let vip4 = match VIP4_A {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => unreachable!(),
    };
    rows.push(Fixture::pass(
        "pass/arp request for a VIP unchanged",
        arp_request(ROUTER_MAC, "192.0.2.1".parse().unwrap(), vip4, None),
    ));
    rows.push(Fixture::pass(
        "pass/arp with vlan unchanged",
        arp_request(ROUTER_MAC, "192.0.2.1".parse().unwrap(), vip4, Some(3)),
    ));
    let mut qinq = tcp(&V4_TCP_DSR, 40000, SYN).vlan(10).build();
    // Inner tag: only one tag is skipped, so the next ethertype (0x8100) is not IP.
    qinq.splice(16..16, [0x81, 0x00, 0x00, 0x14]);
    rows.push(Fixture::pass(
        "pass/two 802.1Q tags (only one skipped) unchanged",
        qinq,
    ));
    let p = Packet::tcp(CLIENT4, VIP4_A, 40000, 81, SYN).build();
    rows.push(Fixture::pass("pass/VIP address, port without a VIP", p));
    let p = Packet::udp(CLIENT4, VIP4_A, 40000, 80).build();
    rows.push(Fixture::pass(
        "pass/VIP address, udp to a tcp-only port (frag-only entry ignored)",
        p,
    ));
    let p = Packet::raw(CLIENT4, VIP4_A, IPPROTO_GRE, &[0, 0, 0x08, 0, 1, 2, 3, 4]).build();
    rows.push(Fixture::pass("pass/VIP address, GRE", p));
    let mut hbh = vec![IPPROTO_TCP, 0, 1, 4, 0, 0, 0, 0];
    hbh.extend_from_slice(&tcp(&V6_TCP_DSR, 40000, SYN).l4_bytes());
    let p = Packet::raw(CLIENT6, VIP6_A, IPPROTO_HOPOPTS, &hbh).build();
    rows.push(Fixture::pass(
        "pass/VIP v6 address, hop-by-hop extension header",
        p,
    ));
    let p = Packet::icmp(CLIENT4, VIP4_A, 8, 0, [0, 1, 0, 1], b"ping").build();
    rows.push(Fixture::pass("pass/VIP address, icmp echo request", p));
    let p = Packet::icmp(CLIENT6, VIP6_A, 128, 0, [0, 1, 0, 1], b"ping").build();
    rows.push(Fixture::pass("pass/VIP v6 address, icmpv6 echo request", p));
    let p = Packet::icmp(CLIENT6, VIP6_A, 135, 0, [0; 4], &ip_bytes(VIP6_A).0)
        .ttl(255)
        .build();
    rows.push(Fixture::pass(
        "pass/VIP v6 address, neighbor solicitation",
        p,
    ));
    let mut p = Packet::tcp(CLIENT4, OTHER4, 40000, 80, SYN).build();
    set_u16(&mut p, 16, 2000);
    rows.push(Fixture::pass(
        "pass/non-VIP with bad ipv4 total length unchanged",
        p,
    ));
    let mut p = Packet::tcp(CLIENT6, OTHER6, 40000, 80, SYN).build();
    p[14 + 40 + 12] = 0x20;
    rows.push(Fixture::pass(
        "pass/non-VIP v6 with tcp data offset 2 unchanged",
        p,
    ));
    let twin = filter_twin_v4();
    let mut p = Packet::tcp(CLIENT4, twin, 40000, 80, SYN).build();
    p[14 + 20 + 12] = 0x30;
    rows.push(Fixture::pass(
        "pass/filter bit shared with a VIP, not a VIP address: malformed passed",
        p,
    ));
    let p = Packet::tcp(CLIENT4, twin, 40000, 80, SYN).build();
    rows.push(Fixture::pass(
        "pass/filter bit shared with a VIP, not a VIP address: valid passed",
        p,
    ));
    rows
}

fn malformed_rows() -> Vec<Fixture> {
    use DropReason::*;
    let mut rows = vec![];
    // BPF_PROG_TEST_RUN refuses frames under 14 bytes (EINVAL), so the shortest Ethernet
    // case it can run is a bare header.
    let e = eth_header(LB_MAC, ROUTER_MAC, None, ETH_P_IPV4);
    rows.push(Fixture::pass(
        "trunc/ethernet header only (ipv4 ethertype)",
        e,
    ));
    let mut e = eth_header(LB_MAC, ROUTER_MAC, None, ETH_P_8021Q);
    e.extend_from_slice(&[0x00, 0x64]);
    rows.push(Fixture::pass("trunc/802.1Q tag cut short", e));
    let mut p = tcp(&V4_TCP_DSR, 40000, SYN).build();
    p.truncate(14 + 19);
    rows.push(Fixture::pass("trunc/ipv4 header cut short (19 bytes)", p));
    let mut p = tcp(&V4_TCP_DSR, 40000, SYN).vlan(5).build();
    p.truncate(18 + 16);
    rows.push(Fixture::pass(
        "trunc/vlan + ipv4 header cut short (16 bytes)",
        p,
    ));
    let mut p = tcp(&V6_TCP_DSR, 40000, SYN).build();
    p.truncate(14 + 39);
    rows.push(Fixture::pass("trunc/ipv6 header cut short (39 bytes)", p));

    let mut p = tcp(&V4_TCP_DSR, 40000, SYN).build();
    p[14] = 0x44;
    rows.push(Fixture::drop("bad/ipv4 IHL 4", p, BadIpv4Header));
    let mut p = tcp(&V4_TCP_DSR, 40000, SYN).build();
    p[14] = 0x65;
    rows.push(Fixture::drop(
        "bad/ipv4 ethertype, version 6",
        p,
        BadIpv4Header,
    ));
    let mut p = tcp(&V4_TCP_DSR, 40000, SYN).build();
    p[14] = 0x4f;
    rows.push(Fixture::drop(
        "bad/ipv4 IHL 15 beyond the frame",
        p,
        BadIpv4Header,
    ));
    let mut p = tcp(&V4_TCP_DSR, 40000, SYN).ip_options(&[1; 8]).build();
    p.truncate(14 + 24);
    rows.push(Fixture::drop(
        "trunc/ipv4 options cut short",
        p,
        BadIpv4Header,
    ));
    let mut p = tcp(&V4_TCP_DSR, 40000, SYN).build();
    set_u16(&mut p, 16, 41);
    fix_ipv4_checksum(&mut p, 14);
    rows.push(Fixture::drop(
        "bad/ipv4 total length beyond the frame",
        p,
        BadIpv4Length,
    ));
    let mut p = tcp(&V4_TCP_DSR, 40000, SYN).build();
    set_u16(&mut p, 16, 19);
    fix_ipv4_checksum(&mut p, 14);
    rows.push(Fixture::drop(
        "bad/ipv4 total length below the header",
        p,
        BadIpv4Length,
    ));
    let mut p = tcp(&V6_TCP_DSR, 40000, SYN).build();
    set_u16(&mut p, 18, 21);
    rows.push(Fixture::drop(
        "bad/ipv6 payload length beyond the frame",
        p,
        BadIpv6Length,
    ));

    let mut p = tcp(&V4_TCP_DSR, 40000, SYN).build();
    p.truncate(14 + 20 + 12);
    set_u16(&mut p, 16, 32);
    fix_ipv4_checksum(&mut p, 14);
    rows.push(Fixture::drop(
        "trunc/v4 tcp header cut short (12 bytes)",
        p,
        BadTcpHeader,
    ));
    let mut p = tcp(&V4_TCP_DSR, 40000, SYN).build();
    p[14 + 20 + 12] = 0x40;
    rows.push(Fixture::drop("bad/v4 tcp data offset 4", p, BadTcpHeader));
    let mut p = tcp(&V6_TCP_DSR, 40000, SYN).build();
    p.truncate(14 + 40 + 12);
    set_u16(&mut p, 18, 12);
    rows.push(Fixture::drop(
        "trunc/v6 tcp header cut short (12 bytes)",
        p,
        BadTcpHeader,
    ));
    let mut p = udp(&V4_UDP_DSR, 5353).build();
    p.truncate(14 + 20 + 6);
    set_u16(&mut p, 16, 26);
    fix_ipv4_checksum(&mut p, 14);
    rows.push(Fixture::drop(
        "trunc/v4 udp header cut short (6 bytes)",
        p,
        BadUdpHeader,
    ));
    let mut p = udp(&V4_UDP_DSR, 5353).build();
    set_u16(&mut p, 14 + 20 + 4, 7);
    rows.push(Fixture::drop("bad/v4 udp length 7", p, BadUdpHeader));
    let mut p = udp(&V4_UDP_DSR, 5353).build();
    set_u16(&mut p, 14 + 20 + 4, 41);
    rows.push(Fixture::drop(
        "bad/v4 udp length beyond the ip payload",
        p,
        BadUdpHeader,
    ));
    let mut p = udp(&V6_UDP_DSR, 5353).build();
    set_u16(&mut p, 14 + 40 + 4, 41);
    rows.push(Fixture::drop(
        "bad/v6 udp length beyond the payload",
        p,
        BadUdpHeader,
    ));
    let mut p = udp(&V6_UDP_DSR, 5353).build();
    p.truncate(14 + 40 + 4);
    set_u16(&mut p, 18, 4);
    rows.push(Fixture::drop(
        "trunc/v6 udp header cut short (4 bytes)",
        p,
        BadUdpHeader,
    ));
    let p = icmp_about(&V4_TCP_DSR, 40000, 3, 1, [0; 4], Some(20 + 4)).build();
    rows.push(Fixture::drop(
        "trunc/icmp embedded header cut short (ports)",
        p,
        BadIcmp,
    ));
    let p = icmp_about(&V4_TCP_DSR, 40000, 11, 0, [0; 4], Some(12)).build();
    rows.push(Fixture::drop(
        "trunc/icmp embedded ipv4 header cut short",
        p,
        BadIcmp,
    ));
    let p = icmp_about(&V6_TCP_DSR, 40000, 1, 4, [0; 4], Some(40 + 6)).build();
    rows.push(Fixture::drop(
        "trunc/icmpv6 embedded header cut short",
        p,
        BadIcmp,
    ));
    rows
}

fn icmp_rows() -> Vec<Fixture> {
    use Stat::*;
    let mut rows = vec![];
    let mtu = 1400u16.to_be_bytes();
    let frag_needed = [0, 0, mtu[0], mtu[1]];
    let p = icmp_about(&V4_TCP_DSR, 40020, 3, 4, frag_needed, None).build();
    rows.push(fwd(
        "icmp/frag-needed about a v4 dsr tcp flow -> its node",
        &V4_TCP_DSR,
        p,
        h(&V4_TCP_DSR, 40020),
        &[IcmpForward, CtMiss],
    ));
    let p = icmp_about(&V4_TCP_IPIP, 40021, 3, 3, [0; 4], Some(28)).build();
    rows.push(fwd(
        "icmp/port-unreachable about a v4 ipip tcp flow -> encapsulated",
        &V4_TCP_IPIP,
        p,
        h(&V4_TCP_IPIP, 40021),
        &[IcmpForward, CtMiss],
    ));
    // About the UDP flow the forwarding rows created (client port 5353).
    let p = icmp_about(&V4_UDP_DSR, 5353, 11, 0, [0; 4], None).build();
    rows.push(
        fwd(
            "icmp/time-exceeded about a v4 udp flow -> its node",
            &V4_UDP_DSR,
            p,
            h(&V4_UDP_DSR, 5353),
            &[IcmpForward],
        )
        .ignoring(&[CtHit, CtMiss]),
    );
    let p = icmp_about(&V4_TCP_DSR, 40022, 3, 4, frag_needed, None)
        .vlan(100)
        .build();
    rows.push(fwd(
        "icmp/frag-needed with vlan -> its node, tag kept",
        &V4_TCP_DSR,
        p,
        h(&V4_TCP_DSR, 40022),
        &[IcmpForward, CtMiss],
    ));
    let ptb = 1280u32.to_be_bytes();
    let p = icmp_about(&V6_TCP_DSR, 40023, 2, 0, ptb, None).build();
    rows.push(fwd(
        "icmp/v6 packet-too-big about a dsr tcp flow -> its node",
        &V6_TCP_DSR,
        p,
        h(&V6_TCP_DSR, 40023),
        &[IcmpForward, CtMiss],
    ));
    let p = icmp_about(&V6_TCP_IPIP, 40024, 1, 4, [0; 4], Some(48)).build();
    rows.push(fwd(
        "icmp/v6 dest-unreachable about an ipip tcp flow -> encapsulated",
        &V6_TCP_IPIP,
        p,
        h(&V6_TCP_IPIP, 40024),
        &[IcmpForward, CtMiss],
    ));
    let p = icmp_about(&V6_UDP_DSR, 5353, 3, 0, [0; 4], None).build();
    rows.push(
        fwd(
            "icmp/v6 time-exceeded about a udp flow -> its node",
            &V6_UDP_DSR,
            p,
            h(&V6_UDP_DSR, 5353),
            &[IcmpForward],
        )
        .ignoring(&[CtHit, CtMiss]),
    );
    let p = icmp_about(&V4_TCP_AFF, 40025, 3, 4, frag_needed, None).build();
    let hash = flow_hash(CLIENT4, VIP4_AFF, 0, 0, PROTO_TCP);
    rows.push(fwd(
        "icmp/about an affinity flow -> the client's node",
        &V4_TCP_AFF,
        p,
        hash,
        &[IcmpForward, CtMiss],
    ));
    // The embedded source port is not a VIP port: lookup misses.
    let q = Packet::tcp(VIP4_A, CLIENT4, 81, 40000, ACK).l3();
    let p = Packet::icmp(ROUTER4, VIP4_A, 3, 3, [0; 4], &q).build();
    rows.push(Fixture::pass(
        "icmp/error about a non-VIP port of a VIP address -> pass",
        p,
    ));
    rows
}

fn pmtu_rows() -> Vec<Fixture> {
    use DropReason::*;
    use Stat::*;
    let mut rows = vec![];
    // IPv4 total length + 20 > 1500 from total 1481.
    let p = tcp(&V4_TCP_IPIP, 40030, PSH_ACK).payload_len(1441).build();
    let r = icmp4_frag_needed(&p, MTU);
    rows.push(Fixture::reply(
        "pmtu/v4 ipip too big with DF -> frag-needed",
        p,
        r,
    ));
    let p = tcp(&V4_TCP_IPIP, 40031, PSH_ACK)
        .ip_options(&[0x94, 4, 0, 0])
        .vlan(9)
        .payload_len(1437)
        .build();
    let r = icmp4_frag_needed(&p, MTU);
    rows.push(Fixture::reply(
        "pmtu/v4 ipip too big, options + vlan -> frag-needed quoting them",
        p,
        r,
    ));
    let p = tcp(&V4_TCP_IPIP, 40032, PSH_ACK)
        .df(false)
        .payload_len(1441)
        .build();
    rows.push(Fixture::drop(
        "pmtu/v4 ipip too big without DF -> TooBig",
        p,
        TooBig,
    ));
    let p = udp(&V4_UDP_IPIP, 5002).df(false).payload_len(1453).build();
    rows.push(
        Fixture::drop("pmtu/v4 udp ipip too big without DF -> TooBig", p, TooBig)
            .with_events(&[CtMiss, CtInsert]),
    );
    let p = tcp(&V4_TCP_IPIP, 40033, PSH_ACK).payload_len(1440).build();
    rows.push(fwd(
        "pmtu/v4 ipip exactly the mtu after encap -> encapsulated",
        &V4_TCP_IPIP,
        p,
        h(&V4_TCP_IPIP, 40033),
        &[],
    ));
    let p = tcp(&V6_TCP_IPIP, 40034, PSH_ACK).payload_len(1401).build();
    let r = icmp6_packet_too_big(&p, MTU);
    rows.push(Fixture::reply(
        "pmtu/v6 ipip too big -> packet-too-big",
        p,
        r,
    ));
    let p = tcp(&V6_TCP_IPIP, 40035, PSH_ACK)
        .vlan(33)
        .payload_len(1401)
        .build();
    let r = icmp6_packet_too_big(&p, MTU);
    rows.push(Fixture::reply(
        "pmtu/v6 ipip too big with vlan -> packet-too-big, tag kept",
        p,
        r,
    ));
    let p = tcp(&V6_TCP_IPIP, 40036, PSH_ACK).payload_len(1400).build();
    rows.push(fwd(
        "pmtu/v6 ipip exactly the mtu after encap -> encapsulated",
        &V6_TCP_IPIP,
        p,
        h(&V6_TCP_IPIP, 40036),
        &[],
    ));
    // BPF_PROG_TEST_RUN receives on `lo` (MTU 65536 here): a 3000-byte packet could have
    // arrived as one frame (jumbo frames), so it is answered (`aggregates_...` has MTU 1500).
    let p = tcp(&V4_TCP_IPIP, 40038, PSH_ACK).payload_len(2960).build();
    let r = icmp4_frag_needed(&p, MTU);
    rows.push(Fixture::reply(
        "pmtu/v4 ipip 3000 bytes within the interface mtu -> frag-needed",
        p,
        r,
    ));
    // The outer header as Katran writes it (docs/dataplane.md "ipip outer header"): DF clear
    // and TTL / hop limit 64 whatever the inner packet has, TOS / traffic class copied, the
    // inner packet untouched (a TTL of 1 is neither decremented nor refused).
    let p = tcp(&V4_TCP_IPIP, 40039, PSH_ACK)
        .ttl(1)
        .tos(0xb8)
        .payload_len(100)
        .build();
    rows.push(fwd(
        "outer/v4 ipip inner DF, TTL 1, DSCP EF -> outer DF clear, TTL 64, TOS copied",
        &V4_TCP_IPIP,
        p,
        h(&V4_TCP_IPIP, 40039),
        &[],
    ));
    let p = tcp(&V6_TCP_IPIP, 40039, PSH_ACK)
        .ttl(1)
        .tos(0xb8)
        .payload_len(100)
        .build();
    rows.push(fwd(
        "outer/v6 ipip inner hop limit 1 -> outer hop limit 64, traffic class copied",
        &V6_TCP_IPIP,
        p,
        h(&V6_TCP_IPIP, 40039),
        &[],
    ));
    let p = tcp(&V4_TCP_DSR, 40037, PSH_ACK).payload_len(1460).build();
    rows.push(fwd(
        "pmtu/v4 dsr-l2 1500-byte packet: no mtu check",
        &V4_TCP_DSR,
        p,
        h(&V4_TCP_DSR, 40037),
        &[],
    ));
    rows
}

fn nobackend_rows() -> Vec<Fixture> {
    use DropReason::*;
    vec![
        Fixture::drop(
            "nobackend/v4 ipip to a node without an ipv4 address",
            tcp(&V4_NOADDR, 40040, ACK).build(),
            NoBackend,
        ),
        Fixture::drop(
            "nobackend/v6 ipip to a node without an ipv6 address",
            tcp(&V6_NOADDR, 40041, ACK).build(),
            NoBackend,
        ),
    ]
}

/// Generic XDP is handed aggregates longer than the interface's MTU (GRO, LRO, a veth peer's
/// TSO): ipip encapsulates them whole instead of answering frag-needed (docs/dataplane.md
/// "Generic XDP and aggregated frames"). Run in a namespace whose `lo` (the device
/// BPF_PROG_TEST_RUN receives on) has MTU 1500, like a NIC.
#[test]
fn aggregates_are_encapsulated_whole() {
    use Stat::*;
    let ns = lb_tests::netns::Netns::new(&format!("lbedgefx{}", std::process::id())).unwrap();
    ns.ip(&["link", "set", "lo", "mtu", "1500"]).unwrap();
    let _in = lb_tests::netns::ThreadNetns::enter(ns).unwrap();
    let mut r = Runner::new();
    let mut rows = vec![];
    for (what, payload) in [
        ("aggregate/v4 tcp 3000 bytes -> encapsulated whole", 2960),
        (
            "aggregate/v4 tcp 1501 bytes (mtu + 1) -> encapsulated whole",
            1461,
        ),
    ] {
        let sport = 41000 + payload as u16 % 1000;
        let p = tcp(&V4_TCP_IPIP, sport, PSH_ACK)
            .payload_len(payload)
            .build();
        rows.push(fwd(
            what,
            &V4_TCP_IPIP,
            p,
            h(&V4_TCP_IPIP, sport),
            &[EncapAggregate],
        ));
    }
    let p = tcp(&V4_TCP_IPIP, 41010, PSH_ACK).payload_len(1460).build();
    let reply = icmp4_frag_needed(&p, MTU);
    rows.push(Fixture::reply(
        "aggregate/v4 tcp 1500 bytes (the interface mtu) -> frag-needed, not an aggregate",
        p,
        reply,
    ));
    let p = tcp(&V4_TCP_IPIP, 41011, PSH_ACK).payload_len(1441).build();
    let reply = icmp4_frag_needed(&p, MTU);
    rows.push(Fixture::reply(
        "aggregate/v4 tcp 1481 bytes -> frag-needed as ever",
        p,
        reply,
    ));
    let p = tcp(&V4_TCP_IPIP, 41012, PSH_ACK)
        .vlan(9)
        .payload_len(1460)
        .build();
    let reply = icmp4_frag_needed(&p, MTU);
    rows.push(Fixture::reply(
        "aggregate/v4 tcp 1500 bytes behind a vlan tag -> frag-needed (the tag is not L3)",
        p,
        reply,
    ));
    let p = tcp(&V6_TCP_IPIP, 41013, PSH_ACK).payload_len(2900).build();
    rows.push(fwd(
        "aggregate/v6 tcp 2960 bytes -> encapsulated whole",
        &V6_TCP_IPIP,
        p,
        h(&V6_TCP_IPIP, 41013),
        &[EncapAggregate],
    ));
    let p = tcp(&V6_TCP_IPIP, 41014, PSH_ACK).payload_len(1440).build();
    let reply = icmp6_packet_too_big(&p, MTU);
    rows.push(Fixture::reply(
        "aggregate/v6 tcp 1500 bytes -> packet-too-big, not an aggregate",
        p,
        reply,
    ));
    let p = udp(&V4_UDP_IPIP, 41015).df(false).payload_len(2972).build();
    rows.push(fwd(
        "aggregate/v4 udp 3000 bytes without DF -> encapsulated whole, not TooBig",
        &V4_UDP_IPIP,
        p,
        h(&V4_UDP_IPIP, 41015),
        &[CtMiss, CtInsert, EncapAggregate],
    ));
    let p = tcp(&V4_TCP_DSR, 41016, PSH_ACK).payload_len(2960).build();
    rows.push(fwd(
        "aggregate/v4 dsr-l2 3000 bytes: no mtu check at all",
        &V4_TCP_DSR,
        p,
        h(&V4_TCP_DSR, 41016),
        &[],
    ));
    r.run_all(rows);
    r.finish("aggregates_are_encapsulated_whole");
}

/// The calling thread on one CPU until dropped (then on the CPUs it had).
struct OneCpu(libc::cpu_set_t);

impl OneCpu {
    fn pin() -> Self {
        // SAFETY: plain affinity calls on the calling thread with a zeroed, then filled set.
        unsafe {
            let mut old: libc::cpu_set_t = std::mem::zeroed();
            assert_eq!(
                libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut old),
                0
            );
            let cpu = (0..libc::CPU_SETSIZE as usize)
                .find(|c| libc::CPU_ISSET(*c, &old))
                .unwrap();
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut one);
            assert_eq!(
                libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &one),
                0
            );
            Self(old)
        }
    }
}

impl Drop for OneCpu {
    fn drop(&mut self) {
        // SAFETY: restores the set read in `pin`.
        unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &self.0) };
    }
}

/// PMTU replies come out of a per-CPU token bucket (`PMTU_BURST`, then `PMTU_PER_SEC`); the
/// packets beyond it are dropped and counted as `PmtuLimited`, and the bucket refills.
#[test]
fn pmtu_replies_are_rate_limited() {
    use lb_common::{PMTU_BURST, PMTU_PER_SEC};
    let _cpu = OneCpu::pin();
    let mut dp = fx::load().unwrap();
    const SENT: u64 = 500;
    let big = |sport: u16| tcp(&V4_TCP_IPIP, sport, PSH_ACK).payload_len(1441).build();
    let before = dp.counters().unwrap();
    let (mut replies, mut limited) = (0u64, 0u64);
    let t0 = std::time::Instant::now();
    for i in 0..SENT {
        let p = big(42000 + i as u16);
        match dp.test_run(&p).unwrap() {
            (XDP_TX, out) => {
                assert_eq!(out, icmp4_frag_needed(&p, MTU), "reply {i}");
                replies += 1;
            }
            (XDP_DROP, _) => limited += 1,
            (v, _) => panic!("packet {i}: verdict {}", verdict_name(v)),
        }
    }
    let elapsed = t0.elapsed();
    let c = dp.counters().unwrap();
    let refill = (elapsed.as_secs_f64() * PMTU_PER_SEC as f64).ceil() as u64;
    println!(
        "pmtu_replies_are_rate_limited: {SENT} too-big packets in {elapsed:.1?}: {replies} replies, \
         {limited} limited (burst {PMTU_BURST}, refill in that time <= {refill})"
    );
    assert!(
        (PMTU_BURST..=PMTU_BURST + refill + 1).contains(&replies),
        "{replies} replies to {SENT} packets in {elapsed:?} (burst {PMTU_BURST}, {PMTU_PER_SEC}/s)"
    );
    assert_eq!(replies + limited, SENT);
    let d = |i: usize| c.drops[i] - before.drops[i];
    let st = |s: Stat| c.stats[s as usize] - before.stats[s as usize];
    assert_eq!(d(DropReason::PmtuLimited as usize), limited);
    assert_eq!(st(Stat::PmtuReply), replies);
    assert_eq!(st(Stat::Drop), limited);
    // The bucket refills: a reply again within a deadline.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut n = 0u16;
    loop {
        n += 1;
        if dp.test_run(&big(43000 + n)).unwrap().0 == XDP_TX {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no PMTU reply again within 2 s ({n} tries)"
        );
        std::thread::yield_now();
    }
}

/// The main table against the fixed configuration, then the totals.
#[test]
fn fixture_table() {
    let mut r = Runner::new();
    let mut rows = forwarding_rows();
    rows.extend(fragment_rows());
    rows.extend(pass_rows());
    rows.extend(malformed_rows());
    rows.extend(icmp_rows());
    rows.extend(pmtu_rows());
    rows.extend(nobackend_rows());
    for f in &rows {
        println!("row: {}", f.what);
    }
    r.run_all(rows);
    // Conntrack holds the UDP flows and SYNs of the table (spot checks).
    let k = flow_key(CLIENT4, VIP4_A, 5353, 53, PROTO_UDP);
    let e = r.dp.conntrack_get(&k).unwrap();
    let want = std_owner(h(&V4_UDP_DSR, 5353));
    r.check(
        matches!(e, Some(CtEntry { node, vip: 1, flags: 0, .. }) if node == want),
        format!("conntrack of the v4 udp flow: {e:?}, want node {want} vip 1"),
    );
    let k = flow_key(CLIENT6, VIP6_B, 40002, 443, PROTO_TCP);
    let e = r.dp.conntrack_get(&k).unwrap();
    let want = std_owner(h(&V6_TCP_IPIP, 40002));
    r.check(
        matches!(e, Some(CtEntry { node, vip: 6, .. }) if node == want),
        format!("conntrack of the v6 ipip syn: {e:?}, want node {want} vip 6"),
    );
    let k = flow_key(CLIENT4, VIP4_A, 40001, 80, PROTO_TCP);
    let e = r.dp.conntrack_get(&k).unwrap();
    r.check(
        e.is_none(),
        format!("an established tcp packet inserted conntrack: {e:?}"),
    );
    r.finish("fixture_table");
}

/// `ROUTE_STATS` samples one packet in `ROUTE_STATS_SAMPLE` per VIP: 3.5 x that many packets
/// of distinct flows to one VIP give exactly 3 samples, each on the route of the packet that
/// took it (the runner's totals check), while `VIP_STATS` counts every packet.
#[test]
fn route_stats_are_sampled() {
    let mut r = Runner::new();
    let n = ROUTE_STATS_SAMPLE * 7 / 2;
    let rows = (0..n as u16)
        .map(|i| {
            let sport = 20000 + i;
            let input = tcp(&V4_TCP_DSR, sport, TCP_ACK).build();
            fwd(
                "established",
                &V4_TCP_DSR,
                input,
                h(&V4_TCP_DSR, sport),
                &[],
            )
        })
        .collect();
    r.run_all(rows);
    let sampled: u64 = r.dp.route_packets(&V4_TCP_DSR.key()).unwrap().iter().sum();
    r.check(
        sampled == 3 * ROUTE_STATS_SAMPLE,
        format!("ROUTE_STATS of {n} packets: {sampled}, want 3 samples"),
    );
    r.check(
        r.dp.vip_traffic(V4_TCP_DSR.index).unwrap().packets == n,
        "VIP_STATS counts every packet",
    );
    r.finish("route_stats_are_sampled");
}

// ---------------------------------------------------------------------------------------------
// Stateful scenarios: table changes, node state changes.
// ---------------------------------------------------------------------------------------------

/// The standard table with `route` moved to `node` and marked `ROUTE_F_MOVED`.
fn moved(routes: &[(u32, u32)]) -> Vec<RouteEntry> {
    let mut t = std_routes();
    for (r, n) in routes {
        t[*r as usize] = RouteEntry {
            node: *n,
            flags: ROUTE_F_MOVED,
        };
    }
    t
}

/// A node of the route set other than `n`.
fn other(n: u32) -> u32 {
    if n == 4 { 1 } else { n + 1 }
}

#[test]
fn conntrack_across_table_change() {
    use Stat::*;
    let mut r = Runner::new();
    for vip in [V4_TCP_DSR, V6_TCP_IPIP] {
        let fam = if vip.addr.is_ipv4() { "v4" } else { "v6" };
        let client = client_of(vip.addr);
        let pf = 41000u16;
        let hf = h(&vip, pf);
        let route = route_of(hf);
        let old = std_owner(hf);
        let new = other(old);
        r.row(fwd(
            &format!("ct/{fam} syn inserts flow F"),
            &vip,
            tcp(&vip, pf, SYN).build(),
            hf,
            &[CtInsert],
        ));
        let key_f = flow_key(client, vip.addr, pf, vip.port, PROTO_TCP);
        let e = r.dp.conntrack_get(&key_f).unwrap();
        r.check(
            matches!(e, Some(CtEntry { node, vip: v, flags: 0, .. }) if node == old && v == vip.index),
            format!("ct/{fam}: entry of F after SYN {e:?}, want node {old}"),
        );
        // Route moves to another node; conntrack keeps F on the old one.
        r.dp.set_routes(&vip.key(), &moved(&[(route, new)]))
            .unwrap();
        r.row(fwd_to(
            &format!("ct/{fam} ack on F after the move -> old node"),
            &vip,
            tcp(&vip, pf, PSH_ACK).payload_len(10).build(),
            hf,
            old,
            &[CtHit],
        ));
        // Seen again on a moved route: kept (a new flow's SYN cannot evict it).
        let flags = |r: &mut Runner| r.dp.conntrack_get(&key_f).unwrap().map(|e| e.flags);
        let f = flags(&mut r);
        r.check(
            f == Some(CT_F_KEEP),
            format!("ct/{fam}: F's flags after a hit on the moved route {f:?}"),
        );
        // A forged RST (any sequence number) is recorded, but F goes on talking on its node:
        // each packet refreshes `last_seen`, so F is never quiet, never closed.
        r.row(fwd_to(
            &format!("ct/{fam} forged rst on F -> old node"),
            &vip,
            tcp(&vip, pf, TCP_RST).build(),
            hf,
            old,
            &[CtHit],
        ));
        let f = flags(&mut r);
        r.check(
            f == Some(CT_F_KEEP | CT_F_RST),
            format!("ct/{fam}: F's flags after the rst {f:?}"),
        );
        r.row(fwd_to(
            &format!("ct/{fam} ack on F after the forged rst -> old node"),
            &vip,
            tcp(&vip, pf, ACK).build(),
            hf,
            old,
            &[CtHit],
        ));
        let f = flags(&mut r);
        r.check(
            f == Some(CT_F_KEEP | CT_F_RST),
            format!("ct/{fam}: F's flags after it went on {f:?}"),
        );
        let pg = port_for_route(&vip, client, pf + 1, route);
        let hg = h(&vip, pg);
        r.row(fwd_to(
            &format!("ct/{fam} ack on untracked G of the moved route -> new owner, recorded"),
            &vip,
            tcp(&vip, pg, ACK).build(),
            hg,
            new,
            &[CtMiss, CtInsert],
        ));
        // Recorded where it went (without CT_F_KEEP: one packet is no evidence of a flow).
        let e =
            r.dp.conntrack_get(&flow_key(client, vip.addr, pg, vip.port, PROTO_TCP))
                .unwrap();
        r.check(
            e.is_some_and(|e| e.node == new && e.flags == 0),
            format!("ct/{fam}: untracked ack recorded as {e:?}"),
        );
        let ph = port_for_route(&vip, client, pg + 1, route);
        let hh = h(&vip, ph);
        r.row(fwd_to(
            &format!("ct/{fam} new syn H on the moved route -> new owner"),
            &vip,
            tcp(&vip, ph, SYN).build(),
            hh,
            new,
            &[CtInsert],
        ));
        r.row(fwd_to(
            &format!("ct/{fam} ack on H -> new owner (ct hit)"),
            &vip,
            tcp(&vip, ph, ACK).build(),
            hh,
            new,
            &[CtHit],
        ));
        let icmp = if vip.addr.is_ipv4() {
            icmp_about(&vip, pf, 3, 4, [0, 0, 0x05, 0x78], None)
        } else {
            icmp_about(&vip, pf, 2, 0, 1280u32.to_be_bytes(), None)
        };
        r.row(fwd_to(
            &format!("ct/{fam} icmp error about F -> old node"),
            &vip,
            icmp.build(),
            hf,
            old,
            &[IcmpForward, CtHit],
        ));
        r.row(fwd_to(
            &format!("ct/{fam} fin on F -> old node"),
            &vip,
            tcp(&vip, pf, TCP_FIN | ACK).build(),
            hf,
            old,
            &[CtHit],
        ));
        let e = r.dp.conntrack_get(&key_f).unwrap();
        r.check(
            matches!(e, Some(CtEntry { flags, node, .. }) if flags & CT_F_FIN != 0 && node == old),
            format!("ct/{fam}: FIN not recorded: {e:?}"),
        );
        r.row(fwd_to(
            &format!("ct/{fam} rst on F -> old node"),
            &vip,
            tcp(&vip, pf, TCP_RST).build(),
            hf,
            old,
            &[CtHit],
        ));
        let e = r.dp.conntrack_get(&key_f).unwrap();
        r.check(
            matches!(e, Some(CtEntry { flags, .. }) if flags & CT_F_RST != 0),
            format!("ct/{fam}: RST not recorded: {e:?}"),
        );
        // A route that did not move: FIN is looked up (miss -> owner); plain ACKs are not
        // looked up at all, even when conntrack holds a (stale) entry for the flow.
        let pk = (42000u16..)
            .find(|p| route_of(h(&vip, *p)) != route)
            .unwrap();
        let hk = h(&vip, pk);
        r.row(fwd(
            &format!("ct/{fam} fin on an untracked flow of an unmoved route -> owner"),
            &vip,
            tcp(&vip, pk, TCP_FIN | ACK).build(),
            hk,
            &[CtMiss],
        ));
        let pl = (pk + 1..).find(|p| route_of(h(&vip, *p)) != route).unwrap();
        let hl = h(&vip, pl);
        let stale = CtEntry {
            node: other(std_owner(hl)),
            vip: vip.index,
            last_seen: 0,
            flags: 0,
        };
        r.dp.conntrack_insert(&flow_key(client, vip.addr, pl, vip.port, PROTO_TCP), &stale)
            .unwrap();
        r.row(fwd(
            &format!("ct/{fam} ack on an unmoved route ignores conntrack -> owner"),
            &vip,
            tcp(&vip, pl, ACK).build(),
            hl,
            &[],
        ));
        // A new SYN of F itself goes to the new owner and overwrites the entry.
        r.row(fwd_to(
            &format!("ct/{fam} syn reusing F's tuple -> new owner"),
            &vip,
            tcp(&vip, pf, SYN).build(),
            hf,
            new,
            &[CtInsert],
        ));
        let e = r.dp.conntrack_get(&key_f).unwrap();
        r.check(
            matches!(e, Some(CtEntry { node, flags: 0, .. }) if node == new),
            format!("ct/{fam}: SYN did not overwrite F's entry: {e:?}, want node {new} flags 0"),
        );
    }
    r.finish("conntrack_across_table_change");
}

#[test]
fn reroute_off_down_node() {
    use DropReason::*;
    use Stat::*;
    let mut r = Runner::new();
    let vip = V4_TCP_DSR;
    let pf = 43000u16;
    let hf = h(&vip, pf);
    let route = route_of(hf);
    let old = std_owner(hf);
    let new = other(old);
    r.row(fwd(
        "down/tcp syn F",
        &vip,
        tcp(&vip, pf, SYN).build(),
        hf,
        &[CtInsert],
    ));
    r.dp.set_routes(&vip.key(), &moved(&[(route, new)]))
        .unwrap();
    r.dp.set_node_state(old, NODE_DOWN).unwrap();
    r.row(fwd_to(
        "down/tcp ack on F, its node down -> new owner (reroute)",
        &vip,
        tcp(&vip, pf, ACK).build(),
        hf,
        new,
        &[CtReroute],
    ));
    let e =
        r.dp.conntrack_get(&flow_key(CLIENT4, VIP4_A, pf, 80, PROTO_TCP))
            .unwrap();
    r.check(
        matches!(e, Some(CtEntry { node, .. }) if node == new),
        format!("down: F's entry not rewritten to {new}: {e:?}"),
    );
    r.row(fwd_to(
        "down/tcp ack on F again -> new owner (ct hit)",
        &vip,
        tcp(&vip, pf, ACK).build(),
        hf,
        new,
        &[CtHit],
    ));
    // Routes of the down node that did not move: no live owner.
    let pd = (43001u16..)
        .find(|p| std_owner(h(&vip, *p)) == old && route_of(h(&vip, *p)) != route)
        .unwrap();
    r.row(Fixture::drop(
        "down/tcp ack on an unmoved route of the down node -> NoBackend",
        tcp(&vip, pd, ACK).build(),
        NoBackend,
    ));
    r.row(Fixture::drop(
        "down/tcp syn on an unmoved route of the down node -> NoBackend",
        tcp(&vip, pd, SYN).build(),
        NoBackend,
    ));

    // UDP: a tracked flow whose node goes down follows its route's new owner.
    let u = V4_UDP_DSR;
    let nu = other(other(old));
    let pu = port_for_node(&u, CLIENT4, 5000, nu);
    let hu = h(&u, pu);
    let ru = route_of(hu);
    r.row(fwd(
        "down/udp flow U first packet",
        &u,
        udp(&u, pu).build(),
        hu,
        &[CtMiss, CtInsert],
    ));
    // U's node goes down while its route still points there: no live node.
    r.dp.set_node_state(nu, NODE_DOWN).unwrap();
    r.row(Fixture::drop(
        "down/udp U, node and owner down -> NoBackend",
        udp(&u, pu).build(),
        NoBackend,
    ));
    let nu2 = other(nu);
    r.dp.set_routes(&u.key(), &moved(&[(ru, nu2)])).unwrap();
    r.row(fwd_to(
        "down/udp U after its route moved -> new owner (reroute)",
        &u,
        udp(&u, pu).build(),
        hu,
        nu2,
        &[CtReroute],
    ));
    r.row(fwd_to(
        "down/udp U again -> new owner (ct hit)",
        &u,
        udp(&u, pu).build(),
        hu,
        nu2,
        &[CtHit],
    ));
    let e =
        r.dp.conntrack_get(&flow_key(CLIENT4, VIP4_A, pu, 53, PROTO_UDP))
            .unwrap();
    r.check(
        matches!(e, Some(CtEntry { node, .. }) if node == nu2),
        format!("down: U's entry not rewritten to {nu2}: {e:?}"),
    );
    // Node back up: traffic returns.
    r.dp.set_node_state(old, NODE_ACTIVE).unwrap();
    r.row(fwd(
        "down/node back up: tcp ack on its unmoved route -> owner",
        &vip,
        tcp(&vip, pd, ACK).build(),
        h(&vip, pd),
        &[],
    ));
    r.finish("reroute_off_down_node");
}

#[test]
fn draining() {
    use DropReason::*;
    use Stat::*;
    let mut r = Runner::new();
    let t = V4_TCP_DSR;
    let u = V4_UDP_DSR;
    let drain = 2u32;
    let pf = port_for_node(&t, CLIENT4, 44000, drain);
    let hf = h(&t, pf);
    let rf = route_of(hf);
    let pu = port_for_node(&u, CLIENT4, 6000, drain);
    let hu = h(&u, pu);
    let ru = route_of(hu);
    r.row(fwd(
        "drain/tcp syn F to node 2",
        &t,
        tcp(&t, pf, SYN).build(),
        hf,
        &[CtInsert],
    ));
    r.row(fwd(
        "drain/udp U to node 2",
        &u,
        udp(&u, pu).build(),
        hu,
        &[CtMiss, CtInsert],
    ));
    r.dp.set_node_state(drain, NODE_DRAINING).unwrap();
    // Stage 1: the node drains, its routes still point at it.
    let pg = port_for_route(&t, CLIENT4, pf + 1, rf);
    r.row(Fixture::drop(
        "drain/new syn on the draining owner's route -> NoBackend",
        tcp(&t, pg, SYN).build(),
        NoBackend,
    ));
    r.row(fwd(
        "drain/tcp ack on F (route not moved) -> draining owner",
        &t,
        tcp(&t, pf, ACK).build(),
        hf,
        &[],
    ));
    r.row(fwd(
        "drain/udp U -> stays on the draining node",
        &u,
        udp(&u, pu).build(),
        hu,
        &[CtHit, DrainKeep],
    ));
    let pv = port_for_route(&u, CLIENT4, pu + 1, ru);
    r.row(
        Fixture::drop(
            "drain/new udp flow to the draining owner -> NoBackend",
            udp(&u, pv).build(),
            NoBackend,
        )
        .ignoring(&[CtMiss]),
    );
    // Stage 2: the control plane moves the draining node's routes away (MOVED).
    let away: Vec<(u32, u32)> = (0..N)
        .filter(|i| std_routes()[*i as usize].node == drain)
        .map(|i| (i, other(drain)))
        .collect();
    r.dp.set_routes(&t.key(), &moved(&away)).unwrap();
    r.dp.set_routes(&u.key(), &moved(&away)).unwrap();
    let to = other(drain);
    r.row(fwd_to(
        "drain/tracked tcp F -> stays on the draining node",
        &t,
        tcp(&t, pf, ACK).build(),
        hf,
        drain,
        &[CtHit, DrainKeep],
    ));
    r.row(fwd_to(
        "drain/new syn on a moved route -> new owner",
        &t,
        tcp(&t, pg, SYN).build(),
        h(&t, pg),
        to,
        &[CtInsert],
    ));
    let pw = port_for_route(&t, CLIENT4, pg + 1, rf);
    r.row(fwd_to(
        "drain/untracked ack on a moved route -> new owner, recorded",
        &t,
        tcp(&t, pw, ACK).build(),
        h(&t, pw),
        to,
        &[CtMiss, CtInsert],
    ));
    r.row(fwd_to(
        "drain/tracked udp U -> stays on the draining node",
        &u,
        udp(&u, pu).build(),
        hu,
        drain,
        &[CtHit, DrainKeep],
    ));
    r.row(fwd_to(
        "drain/new udp flow on a moved route -> new owner",
        &u,
        udp(&u, pv).build(),
        h(&u, pv),
        to,
        &[CtMiss, CtInsert],
    ));
    // Stage 3: the draining node goes down: tracked flows move to the route's owner.
    r.dp.set_node_state(drain, NODE_DOWN).unwrap();
    r.row(fwd_to(
        "drain/node down: tracked tcp F -> new owner (reroute)",
        &t,
        tcp(&t, pf, ACK).build(),
        hf,
        to,
        &[CtReroute],
    ));
    r.row(fwd_to(
        "drain/node down: tracked udp U -> new owner (reroute)",
        &u,
        udp(&u, pu).build(),
        hu,
        to,
        &[CtReroute],
    ));
    r.finish("draining");
}

// ---------------------------------------------------------------------------------------------
// Node-side decap.
// ---------------------------------------------------------------------------------------------

struct DecapRow {
    what: &'static str,
    input: Vec<u8>,
    verdict: u32,
    output: Out,
    stat: DecapStat,
}

#[test]
fn decap_table() {
    let mut d = Decap::load().expect("load the decap program (root needed)");
    d.add_vip(VIP4_B).unwrap();
    d.add_vip(VIP6_B).unwrap();
    d.add_vip(VIP6_AFF).unwrap();
    // The fixture balancer's outer sources: IPIP_SRC4/16 and IPIP_SRC6/96.
    d.add_source("172.16.0.0/16").unwrap();
    d.add_source("fd00:ffff::/96").unwrap();
    let lb4 = IpAddr::V4([172, 16, 1, 2].into());
    let node4 = IpAddr::V4(node_addr4(1).into());
    let lb6 = IpAddr::V6(ipip_src6(IPIP_SRC6, 0x1234_5678).into());
    let node6 = IpAddr::V6(node_addr6(1).into());
    let ours4 = tcp(&V4_TCP_IPIP, 45000, PSH_ACK).payload_len(50).build();
    let ours6 = tcp(&V6_TCP_IPIP, 45000, PSH_ACK).payload_len(50).build();
    let mut rows = vec![];
    let e = encapsulate(&ours4, lb4, node4);
    rows.push(DecapRow {
        what: "decap/ipip to a VIP: outer header stripped",
        output: Out::Exact(pk::decap(&e)),
        input: e,
        verdict: XDP_PASS,
        stat: DecapStat::Decapsulated,
    });
    let e = encapsulate(&ours6, lb6, node6);
    rows.push(DecapRow {
        what: "decap/ip6ip6 to a VIP: outer header stripped",
        output: Out::Exact(pk::decap(&e)),
        input: e,
        verdict: XDP_PASS,
        stat: DecapStat::Decapsulated,
    });
    let inner = tcp(&V4_TCP_IPIP, 45001, ACK).vlan(77).build();
    let e = encapsulate(&inner, lb4, node4);
    rows.push(DecapRow {
        what: "decap/ipip with vlan: tag moved up",
        output: Out::Exact(pk::decap(&e)),
        input: e,
        verdict: XDP_PASS,
        stat: DecapStat::Decapsulated,
    });
    let inner = udp(&V6_UDP_IPIP, 45002).vlan(78).build();
    let e = encapsulate(&inner, lb6, node6);
    rows.push(DecapRow {
        what: "decap/ip6ip6 udp with vlan: tag moved up",
        output: Out::Exact(pk::decap(&e)),
        input: e,
        verdict: XDP_PASS,
        stat: DecapStat::Decapsulated,
    });
    let other4 = Packet::tcp(CLIENT4, OTHER4, 45003, 443, ACK).build();
    let e = encapsulate(&other4, lb4, node4);
    rows.push(DecapRow {
        what: "decap/ipip, inner destination not a VIP: passed untouched",
        input: e,
        output: Out::Unchanged,
        verdict: XDP_PASS,
        stat: DecapStat::NotOurs,
    });
    let other6 = Packet::tcp(CLIENT6, OTHER6, 45003, 443, ACK).build();
    let e = encapsulate(&other6, lb6, node6);
    rows.push(DecapRow {
        what: "decap/ip6ip6, inner destination not a VIP: passed untouched",
        input: e,
        output: Out::Unchanged,
        verdict: XDP_PASS,
        stat: DecapStat::NotOurs,
    });
    // Tunnels from anyone but the balancers: only a VIP's are refused (counted); the rest is
    // not ours to judge.
    for (what, src) in [
        (
            "decap/ipip to a VIP from outside the source networks: dropped",
            IpAddr::V4([172, 17, 0, 1].into()),
        ),
        (
            "decap/ipip to a VIP from a node's address: dropped",
            IpAddr::V4(node_addr4(2).into()),
        ),
        (
            "decap/ip6ip6 to a VIP from outside the source prefix: dropped",
            IpAddr::V6(
                ipip_src6([0xfd, 0, 0xff, 0xfe, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 7).into(),
            ),
        ),
    ] {
        let (inner, dst) = if src.is_ipv4() {
            (&ours4, node4)
        } else {
            (&ours6, node6)
        };
        rows.push(DecapRow {
            what,
            input: encapsulate(inner, src, dst),
            output: Out::Any,
            verdict: XDP_DROP,
            stat: DecapStat::ForeignSource,
        });
    }
    let e = encapsulate(&other4, IpAddr::V4([172, 17, 0, 1].into()), node4);
    rows.push(DecapRow {
        what: "decap/ipip from outside the sources, inner not a VIP: passed untouched",
        input: e,
        output: Out::Unchanged,
        verdict: XDP_PASS,
        stat: DecapStat::NotOurs,
    });
    let p = Packet::raw(lb4, node4, IPPROTO_IPIP, &ours4[14..14 + 12]).build();
    rows.push(DecapRow {
        what: "decap/ipip, inner ipv4 header cut short: dropped",
        input: p,
        output: Out::Any,
        verdict: XDP_DROP,
        stat: DecapStat::Malformed,
    });
    let p = Packet::raw(lb6, node6, IPPROTO_IPV6, &ours6[14..14 + 30]).build();
    rows.push(DecapRow {
        what: "decap/ip6ip6, inner ipv6 header cut short: dropped",
        input: p,
        output: Out::Any,
        verdict: XDP_DROP,
        stat: DecapStat::Malformed,
    });
    rows.push(DecapRow {
        what: "decap/plain tcp to the VIP: passed untouched",
        input: ours4.clone(),
        output: Out::Unchanged,
        verdict: XDP_PASS,
        stat: DecapStat::Pass,
    });
    rows.push(DecapRow {
        what: "decap/plain v6 tcp: passed untouched",
        input: ours6.clone(),
        output: Out::Unchanged,
        verdict: XDP_PASS,
        stat: DecapStat::Pass,
    });
    let vip4 = match VIP4_B {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => unreachable!(),
    };
    rows.push(DecapRow {
        what: "decap/arp: passed untouched",
        input: arp_request(ROUTER_MAC, "10.1.0.9".parse().unwrap(), vip4, None),
        output: Out::Unchanged,
        verdict: XDP_PASS,
        stat: DecapStat::Pass,
    });
    let gre = Packet::raw(lb4, node4, IPPROTO_GRE, &[0, 0, 8, 0]).build();
    rows.push(DecapRow {
        what: "decap/gre: passed untouched",
        input: gre,
        output: Out::Unchanged,
        verdict: XDP_PASS,
        stat: DecapStat::Pass,
    });

    // End to end: what the balancer sends decapsulates to the client's packet.
    let mut dp = fx::load().unwrap();
    let mut failures = vec![];
    for (vip, sport) in [
        (V4_TCP_IPIP, 45010u16),
        (V6_TCP_IPIP, 45011),
        (V6_TCP_AFF, 45012),
    ] {
        let orig = tcp(&vip, sport, SYN).vlan(5).build();
        let (v, out) = dp.test_run(&orig).unwrap();
        if v == XDP_TX && out.len() > orig.len() {
            let mut want = orig.clone();
            want[0..6].copy_from_slice(&GW_MAC);
            want[6..12].copy_from_slice(&LB_MAC);
            rows.push(DecapRow {
                what: "decap/balancer ipip output -> the client's packet",
                input: out,
                output: Out::Exact(want),
                verdict: XDP_PASS,
                stat: DecapStat::Decapsulated,
            });
        } else {
            failures.push(format!(
                "decap/end to end: the balancer did not encapsulate {vip:?} (verdict {})",
                verdict_name(v)
            ));
        }
    }

    let mut tally = [0u64; lb_common::DECAP_STAT_COUNT as usize];
    let n = rows.len();
    for (i, row) in rows.into_iter().enumerate() {
        println!("row: {}", row.what);
        let before = d.stats().unwrap();
        let (v, out) = d.test_run(&row.input).unwrap();
        let after = d.stats().unwrap();
        let mut errs = vec![];
        if v != row.verdict {
            errs.push(format!(
                "verdict {} (want {})",
                verdict_name(v),
                verdict_name(row.verdict)
            ));
        }
        match &row.output {
            Out::Exact(w) if out != *w => errs.push(byte_diff(&out, w)),
            Out::Unchanged if out != row.input => errs.push(byte_diff(&out, &row.input)),
            _ => {}
        }
        tally[row.stat as usize] += 1;
        for s in [
            DecapStat::Decapsulated,
            DecapStat::NotOurs,
            DecapStat::Malformed,
            DecapStat::Pass,
            DecapStat::ForeignSource,
        ] {
            let got = after[s as usize] - before[s as usize];
            let want = u64::from(s == row.stat);
            if got != want {
                errs.push(format!("DECAP_STATS[{s:?}] +{got} (want +{want})"));
            }
        }
        if !errs.is_empty() {
            failures.push(format!(
                "row {} '{}':\n  {}",
                i + 1,
                row.what,
                errs.join("\n  ")
            ));
        }
    }
    let totals = d.stats().unwrap();
    if totals != tally {
        failures.push(format!("totals: DECAP_STATS {totals:?}, tally {tally:?}"));
    }
    println!("decap_table: {n} rows, {} failures", failures.len());
    assert!(
        failures.is_empty(),
        "decap_table: {} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Sanity of the configuration itself: the loader wrote what the fixtures assume.
#[test]
fn configuration_as_assumed() {
    let dp = fx::load().unwrap();
    for v in VIPS {
        let m = dp.vip_meta(&v.key()).expect("VIP configured");
        assert_eq!(m.route_count, N);
        assert_eq!(m.index, v.index);
        assert_eq!(dp.routes(&v.key()).unwrap(), routes_for(&v));
    }
    for n in NODES {
        assert_eq!(dp.node(n).unwrap(), node_entry(n));
    }
    // The loader fills in the conntrack geometry; the rest is what was written.
    let got = dp.config().unwrap();
    assert_eq!(got.ct_sets, lb_common::ct::ct_sets_for(64 * 1024));
    assert_eq!(lb_common::GlobalConfig { ct_sets: 0, ..got }, config());
}

/// The runner itself fails rows that deviate: a wrong verdict, wrong bytes, a wrong counter
/// and a wrong node each produce a failure (so a green table means something).
#[test]
fn runner_detects_deviations() {
    let mut r = Runner::new();
    let p = tcp(&V4_TCP_DSR, 46000, ACK).build();
    let hash = h(&V4_TCP_DSR, 46000);
    let right = fwd("meta/right", &V4_TCP_DSR, p.clone(), hash, &[]);
    r.row(right.clone());
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    r.row(Fixture::pass("meta/wrong verdict", p.clone()));
    let mut wrong_bytes = right.clone();
    wrong_bytes.output = Out::Exact(dsr_rewrite(&p, node_mac(9)));
    r.row(wrong_bytes);
    r.row(right.clone().with_events(&[Stat::CtHit]));
    r.row(fwd_to(
        "meta/wrong node",
        &V4_TCP_DSR,
        p,
        hash,
        other(std_owner(hash)),
        &[],
    ));
    assert_eq!(r.failures.len(), 4, "{:#?}", r.failures);
}

#[test]
fn conntrack_details() {
    use Stat::*;
    let mut r = Runner::new();
    let u = V4_UDP_DSR;
    // A hit on an entry whose last_seen is stale refreshes it.
    let pu = 47000u16;
    let hu = h(&u, pu);
    let ku = flow_key(CLIENT4, VIP4_A, pu, 53, PROTO_UDP);
    let stale = CtEntry {
        node: std_owner(hu),
        vip: u.index,
        last_seen: 0,
        flags: 0,
    };
    r.dp.conntrack_insert(&ku, &stale).unwrap();
    r.row(fwd(
        "ctd/udp hit on a stale entry -> its node",
        &u,
        udp(&u, pu).build(),
        hu,
        &[CtHit],
    ));
    let e = r.dp.conntrack_get(&ku).unwrap();
    r.check(
        matches!(e, Some(CtEntry { last_seen, .. }) if last_seen != 0),
        format!("ctd: stale last_seen not refreshed: {e:?}"),
    );
    // A SYN records `now` (uptime in ~1.07 s units, so not 0 on a machine up for seconds).
    let ps = 47001u16;
    r.row(fwd(
        "ctd/syn records last_seen",
        &V4_TCP_DSR,
        tcp(&V4_TCP_DSR, ps, SYN).build(),
        h(&V4_TCP_DSR, ps),
        &[CtInsert],
    ));
    let e =
        r.dp.conntrack_get(&flow_key(CLIENT4, VIP4_A, ps, 80, PROTO_TCP))
            .unwrap();
    r.check(
        matches!(e, Some(CtEntry { last_seen, vip: 0, flags: 0, .. }) if last_seen != 0),
        format!("ctd: SYN entry {e:?}"),
    );
    // ICMP errors about UDP flows never insert.
    let pw = 47002u16;
    let hw = h(&u, pw);
    r.row(
        fwd(
            "ctd/icmp about an untracked udp flow -> owner, no insert",
            &u,
            icmp_about(&u, pw, 3, 3, [0; 4], None).build(),
            hw,
            &[IcmpForward],
        )
        .ignoring(&[CtMiss]),
    );
    let kw = flow_key(CLIENT4, VIP4_A, pw, 53, PROTO_UDP);
    let e = r.dp.conntrack_get(&kw).unwrap();
    r.check(e.is_none(), format!("ctd: icmp inserted {e:?}"));
    let rw = route_of(hw);
    let to = other(std_owner(hw));
    r.dp.set_routes(&u.key(), &moved(&[(rw, to)])).unwrap();
    r.row(fwd_to(
        "ctd/icmp about an untracked udp flow of a moved route -> new owner (ct miss)",
        &u,
        icmp_about(&u, pw, 3, 3, [0; 4], None).build(),
        hw,
        to,
        &[IcmpForward, CtMiss],
    ));
    let e = r.dp.conntrack_get(&kw).unwrap();
    r.check(e.is_none(), format!("ctd: icmp inserted {e:?}"));
    // The flow itself then inserts on its first packet.
    r.row(fwd_to(
        "ctd/udp flow of the moved route -> new owner (miss, insert)",
        &u,
        udp(&u, pw).build(),
        hw,
        to,
        &[CtMiss, CtInsert],
    ));
    r.finish("conntrack_details");
}
