//! Randomised robustness test of the balancer and the decapsulator through
//! `BPF_PROG_TEST_RUN` (root only).
//!
//! Valid frames (VIP and non-VIP, every protocol the balancer handles, VLAN, options,
//! fragments, ICMP errors) are mutated — bit flips, truncation, random length fields, random
//! protocol/ethertype/destination, random byte runs, appended bytes — or replaced by random
//! frames, and run through the programs with a fixed seed. Invariants (docs/dataplane.md):
//! - never `XDP_ABORTED`; the verdict is always `XDP_PASS`, `XDP_DROP` or `XDP_TX`;
//! - a frame whose destination (parsed here, independently, from the mutated bytes) is not a
//!   configured VIP address, or that has no readable IPv4/IPv6 destination at all, is passed
//!   byte for byte unchanged;
//! - every `XDP_PASS` leaves the frame unchanged;
//! - `STATS` Pass/Tx/Drop equal the verdicts seen.
//!
//! Run: `cargo test --release -p lb-tests --test fuzz -- --test-threads=1`.
//! `LB_FUZZ_PACKETS` and `LB_FUZZ_SEED` override the count and the seed.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
use std::{net::IpAddr, time::Instant};

use lb_common::{PROTO_TCP, Stat};
use lb_tests::{
    fixture::{self as fx, *},
    packet::*,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn client_of(dst: IpAddr) -> IpAddr {
    if dst.is_ipv4() { CLIENT4 } else { CLIENT6 }
}

/// Valid frames to mutate.
fn corpus() -> Vec<Vec<u8>> {
    let mut c = vec![];
    for v in VIPS {
        let client = client_of(v.addr);
        let port = if v.port == 0 { 9999 } else { v.port };
        for flags in [
            TCP_SYN,
            TCP_ACK,
            TCP_PSH | TCP_ACK,
            TCP_FIN | TCP_ACK,
            TCP_RST,
        ] {
            if v.proto == PROTO_TCP {
                let p = Packet::tcp(client, v.addr, 40000, port, flags).payload_len(40);
                c.push(p.build());
                c.push(p.clone().vlan(42).build());
            }
        }
        if v.proto != PROTO_TCP {
            let p = Packet::udp(client, v.addr, 5353, port).payload_len(60);
            c.push(p.build());
            c.push(p.vlan(9).build());
        }
        // An ICMP error about the flow, quoting the node's packet.
        let reply = if v.proto == PROTO_TCP {
            Packet::tcp(v.addr, client, port, 40000, TCP_ACK).l3()
        } else {
            Packet::udp(v.addr, client, port, 5353).l3()
        };
        let router = if v.addr.is_ipv4() { ROUTER4 } else { ROUTER6 };
        let (ty, code) = if v.addr.is_ipv4() { (3, 4) } else { (2, 0) };
        c.push(Packet::icmp(router, v.addr, ty, code, [0, 0, 5, 0x78], &reply).build());
        if v.addr.is_ipv4() {
            let p = Packet::tcp(client, v.addr, 40001, port, TCP_ACK)
                .ip_options(&[0x94, 4, 0, 0])
                .payload_len(20);
            c.push(p.build());
            let d = Packet::udp(client, v.addr, 7000, port).payload_len(100);
            c.extend(fragments(&d, 48));
            // Big enough for the PMTU paths.
            c.push(
                Packet::tcp(client, v.addr, 40002, port, TCP_ACK)
                    .payload_len(1450)
                    .build(),
            );
        } else {
            c.push(
                Packet::tcp(client, v.addr, 40002, port, TCP_ACK)
                    .payload_len(1410)
                    .build(),
            );
        }
    }
    for dst in [OTHER4, OTHER6] {
        let client = client_of(dst);
        c.push(Packet::tcp(client, dst, 1, 80, TCP_SYN).build());
        c.push(Packet::udp(client, dst, 1, 53).payload_len(10).build());
        c.push(
            Packet::icmp(
                client,
                dst,
                if dst.is_ipv4() { 8 } else { 128 },
                0,
                [0; 4],
                b"x",
            )
            .build(),
        );
    }
    c.push(arp_request(
        ROUTER_MAC,
        "192.0.2.1".parse().unwrap(),
        "10.0.0.1".parse().unwrap(),
        None,
    ));
    // Encapsulated frames (for the decapsulator).
    for v in [V4_TCP_IPIP, V6_TCP_IPIP] {
        let inner = Packet::tcp(client_of(v.addr), v.addr, 1234, v.port, TCP_ACK).build();
        let (s, d) = if v.addr.is_ipv4() {
            (
                IpAddr::V4([172, 16, 0, 1].into()),
                IpAddr::V4(node_addr4(1).into()),
            )
        } else {
            (
                IpAddr::V6(ipip_src6(IPIP_SRC6, 7).into()),
                IpAddr::V6(node_addr6(1).into()),
            )
        };
        c.push(encapsulate(&inner, s, d));
    }
    c
}

const ADDRS: [IpAddr; 11] = [
    VIP4_A,
    VIP4_B,
    VIP4_AFF,
    VIP4_NOADDR,
    VIP4_ALLPORTS,
    VIP6_A,
    VIP6_B,
    VIP6_AFF,
    VIP6_NOADDR,
    OTHER4,
    OTHER6,
];

fn rand_u16(rng: &mut StdRng, current: u16) -> u16 {
    match rng.gen_range(0..4) {
        0 => rng.r#gen(),
        1 => current.wrapping_add(rng.gen_range(1..=8)),
        2 => current.wrapping_sub(rng.gen_range(1..=8)),
        _ => rng.gen_range(0..64),
    }
}

/// One mutation of `p` in place.
fn mutate_once(rng: &mut StdRng, p: &mut Vec<u8>) {
    let len = p.len();
    let (l2len, et) = l2(p).unwrap_or((14, 0));
    let l3 = l2len;
    let ihl = if et == ETH_P_IPV4 && len > l3 {
        usize::from(p[l3] & 0x0f) * 4
    } else {
        40
    };
    let l4 = l3 + ihl;
    match rng.gen_range(0..10) {
        0 => {
            for _ in 0..rng.gen_range(1..=4) {
                let i = rng.gen_range(0..len);
                p[i] ^= 1 << rng.gen_range(0..8);
            }
        }
        1 => {
            // Bit flips in the headers.
            let i = rng.gen_range(0..len.min(l4 + 40));
            p[i] ^= 1 << rng.gen_range(0..8);
        }
        2 => {
            let n = rng.gen_range(14..=len.max(14));
            p.truncate(n);
        }
        3 => {
            // A length field: IPv4 total length / IHL, IPv6 payload length, UDP length,
            // TCP data offset, the embedded IPv4 IHL of an ICMP error.
            let choice = rng.gen_range(0..6);
            let off = match choice {
                0 => l3 + if et == ETH_P_IPV6 { 4 } else { 2 },
                1 => l3,
                2 => l4 + 4,
                3 => l4 + 12,
                4 => l4 + 8,
                _ => rng.gen_range(0..len),
            };
            if choice == 1 || choice == 3 || choice == 4 {
                if off < len {
                    p[off] = (p[off] & 0xf0) | rng.gen_range(0..16);
                }
            } else if off + 2 <= len {
                let v = rand_u16(rng, get_u16(p, off));
                set_u16(p, off, v);
            }
        }
        4 => {
            let start = rng.gen_range(0..len);
            let n = rng.gen_range(1..=16).min(len - start);
            rng.fill(&mut p[start..start + n]);
        }
        5 => {
            let n = rng.gen_range(1..64);
            p.extend((0..n).map(|_| rng.r#gen::<u8>()));
        }
        6 => {
            // Destination: another VIP or a non-VIP address of the same family.
            let a = ADDRS[rng.gen_range(0..ADDRS.len())];
            match (et, a) {
                (ETH_P_IPV4, IpAddr::V4(a)) if len >= l3 + 20 => {
                    p[l3 + 16..l3 + 20].copy_from_slice(&a.octets())
                }
                (ETH_P_IPV6, IpAddr::V6(a)) if len >= l3 + 40 => {
                    p[l3 + 24..l3 + 40].copy_from_slice(&a.octets())
                }
                _ => {}
            }
        }
        7 => {
            // Protocol / next header.
            let protos = [1u8, 4, 6, 17, 41, 47, 58, 0, 44, 60, rng.r#gen()];
            let pr = protos[rng.gen_range(0..protos.len())];
            let off = if et == ETH_P_IPV6 { l3 + 6 } else { l3 + 9 };
            if off < len {
                p[off] = pr;
            }
        }
        8 => {
            // Ethertype, or the tag.
            let ets = [
                ETH_P_IPV4,
                ETH_P_IPV6,
                ETH_P_8021Q,
                ETH_P_ARP,
                0x88a8,
                rng.r#gen(),
            ];
            let e = ets[rng.gen_range(0..ets.len())];
            let off = if rng.gen_bool(0.5) { 12 } else { l2len - 2 };
            set_u16(p, off, e);
        }
        _ => {
            // IPv4 flags/fragment offset, TCP flags.
            if et == ETH_P_IPV4 && len >= l3 + 8 {
                let v = rng.r#gen::<u16>() & 0xe0ff;
                set_u16(p, l3 + 6, v);
            } else if l4 + 14 <= len {
                p[l4 + 13] = rng.r#gen();
            }
        }
    }
}

fn random_frame(rng: &mut StdRng) -> Vec<u8> {
    let n = rng.gen_range(14..200);
    let mut p: Vec<u8> = (0..n).map(|_| rng.r#gen()).collect();
    if rng.gen_bool(0.7) {
        let ets = [ETH_P_IPV4, ETH_P_IPV6, ETH_P_8021Q];
        set_u16(&mut p, 12, ets[rng.gen_range(0..3)]);
    }
    if rng.gen_bool(0.5) && n >= 34 {
        // Often a VIP destination, so the random bytes reach the VIP paths.
        let a = ADDRS[rng.gen_range(0..ADDRS.len())];
        match a {
            IpAddr::V4(a) => {
                set_u16(&mut p, 12, ETH_P_IPV4);
                p[14] = 0x45;
                p[30..34].copy_from_slice(&a.octets());
            }
            IpAddr::V6(a) if n >= 54 => {
                set_u16(&mut p, 12, ETH_P_IPV6);
                p[14] = 0x60;
                p[38..54].copy_from_slice(&a.octets());
            }
            _ => {}
        }
    }
    p
}

fn packets(rng: &mut StdRng, corpus: &[Vec<u8>]) -> Vec<u8> {
    if rng.gen_ratio(1, 20) {
        return random_frame(rng);
    }
    let mut p = corpus[rng.gen_range(0..corpus.len())].clone();
    for _ in 0..rng.gen_range(1..=3) {
        mutate_once(rng, &mut p);
    }
    p.truncate(3000);
    p
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn fuzz_balancer() {
    let count = env_or("LB_FUZZ_PACKETS", 1_000_000);
    let seed = env_or("LB_FUZZ_SEED", 0x5eed_1b1b);
    let mut rng = StdRng::seed_from_u64(seed);
    let corpus = corpus();
    let mut dp = fx::load_with(16 * 1024).unwrap();
    let before = dp.counters().unwrap();
    let mut verdicts = [0u64; 5];
    let mut failures: Vec<String> = vec![];
    let mut failed = 0u64;
    let mut non_vip = 0u64;
    let t0 = Instant::now();
    for i in 0..count {
        let p = packets(&mut rng, &corpus);
        let (v, out) = match dp.test_run(&p) {
            Ok(r) => r,
            Err(e) => {
                failed += 1;
                if failures.len() < 20 {
                    failures.push(format!("#{i}: test_run error {e} on {}", hex(&p)));
                }
                continue;
            }
        };
        let mut bad = vec![];
        if !matches!(v, XDP_PASS | XDP_DROP | XDP_TX) {
            bad.push(format!("verdict {}", verdict_name(v)));
        } else {
            verdicts[v as usize] += 1;
        }
        let vip_dst = frame_dst(&p).is_some_and(is_vip_addr);
        if !vip_dst {
            non_vip += 1;
            if v != XDP_PASS {
                bad.push(format!(
                    "not a VIP destination ({:?}) but {}",
                    frame_dst(&p),
                    verdict_name(v)
                ));
            }
        }
        if v == XDP_PASS && out != p {
            bad.push("XDP_PASS with a modified frame".into());
        }
        if v == XDP_TX && out.len() < 14 {
            bad.push(format!("XDP_TX with a {}-byte frame", out.len()));
        }
        record(&mut failed, &mut failures, i, &bad, &p, &out);
    }
    let elapsed = t0.elapsed();
    let after = dp.counters().unwrap();
    let d = |s: Stat| after.stats[s as usize] - before.stats[s as usize];
    println!(
        "fuzz_balancer: {count} packets (seed {seed:#x}) in {:.1?}: PASS {} DROP {} TX {} ({non_vip} non-VIP); {failed} failed",
        elapsed, verdicts[2], verdicts[1], verdicts[3]
    );
    for (s, n) in [
        (Stat::Pass, verdicts[2]),
        (Stat::Drop, verdicts[1]),
        (Stat::Tx, verdicts[3]),
    ] {
        if d(s) != n {
            failures.push(format!(
                "STATS[{s:?}] rose by {} but {n} such verdicts",
                d(s)
            ));
            failed += 1;
        }
    }
    let drops: u64 = (0..after.drops.len())
        .map(|i| after.drops[i] - before.drops[i])
        .sum();
    if drops != verdicts[1] {
        failures.push(format!(
            "DROPS total rose by {drops} but {} drops",
            verdicts[1]
        ));
        failed += 1;
    }
    assert!(
        failed == 0,
        "{failed} of {count} fuzzed packets broke an invariant; first ones:\n{}",
        failures.join("\n")
    );
    assert!(
        count < 1000 || verdicts[3] > 0 && verdicts[1] > 0,
        "the fuzzer never reached the forwarding or drop paths: {verdicts:?}"
    );
}

#[test]
fn fuzz_decap() {
    let count = env_or("LB_FUZZ_PACKETS", 1_000_000) / 4;
    let seed = env_or("LB_FUZZ_SEED", 0x5eed_1b1b) ^ 0xdeca;
    let mut rng = StdRng::seed_from_u64(seed);
    let corpus = corpus();
    let mut d = Decap::load().unwrap();
    d.add_vip(VIP4_B).unwrap();
    d.add_vip(VIP6_B).unwrap();
    // The corpus's tunnels come from the fixture balancer's outer sources.
    d.add_source("172.16.0.0/16").unwrap();
    d.add_source("fd00:ffff::/96").unwrap();
    let mut failures = vec![];
    let mut failed = 0u64;
    let mut verdicts = [0u64; 5];
    let t0 = Instant::now();
    for i in 0..count {
        let p = packets(&mut rng, &corpus);
        let (v, out) = d.test_run(&p).unwrap();
        let mut bad = vec![];
        if !matches!(v, XDP_PASS | XDP_DROP) {
            bad.push(format!("verdict {}", verdict_name(v)));
        } else {
            verdicts[v as usize] += 1;
        }
        // Not encapsulated (by the outer protocol) -> passed untouched.
        let encapsulated = match l2(&p) {
            Some((o, ETH_P_IPV4)) => p.len() < o + 20 || p[o + 9] == IPPROTO_IPIP,
            Some((o, ETH_P_IPV6)) => p.len() < o + 40 || p[o + 6] == IPPROTO_IPV6,
            _ => false,
        };
        if !encapsulated && (v != XDP_PASS || out != p) {
            bad.push(format!(
                "not encapsulated but {} / {}",
                verdict_name(v),
                if out == p { "unchanged" } else { "modified" }
            ));
        }
        record(&mut failed, &mut failures, i, &bad, &p, &out);
    }
    println!(
        "fuzz_decap: {count} packets in {:.1?}: PASS {} DROP {}; {failed} failed",
        t0.elapsed(),
        verdicts[2],
        verdicts[1]
    );
    assert!(
        failed == 0,
        "{failed} of {count} fuzzed packets broke a decap invariant; first ones:\n{}",
        failures.join("\n")
    );
}

/// Counts a packet whose checks failed and keeps the first 20 for the report.
fn record(
    failed: &mut u64,
    failures: &mut Vec<String>,
    i: impl std::fmt::Display,
    bad: &[String],
    input: &[u8],
    output: &[u8],
) {
    if bad.is_empty() {
        return;
    }
    *failed += 1;
    if failures.len() < 20 {
        failures.push(format!(
            "#{i}: {}\n    in:  {}\n    out: {}",
            bad.join("; "),
            hex(input),
            hex(output)
        ));
    }
}
