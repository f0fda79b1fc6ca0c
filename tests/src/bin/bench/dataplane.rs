//! `lb-bench dataplane`: ns/packet of the balancer through `BPF_PROG_TEST_RUN`, against
//! trivial baseline programs measured in the same run.
//!
//! The balancer is loaded and configured exactly as the fixture tests do (`lb_tests::fixture`),
//! and the cases are packets of the fixture flows.
//!
//! Every case is measured `--runs` times (default 7, at least 5), each run paired with a run of
//! its baseline (case then baseline, then baseline then case, alternating): the ratio is the
//! median of the per-pair ratios, so drift in the machine's speed cancels. With `repeat > 1`
//! the kernel feeds a program's output back in as the next run's input (it does not reset the
//! packet), hence two methods:
//! - `repeat`: one call with a large repeat; the kernel reports the mean time per run. Only for
//!   packets whose output is its own input: dsr-l2 rewrites only the MACs, to the same values
//!   every run; pass-through and the baselines change nothing that matters.
//! - `wrapper`: one call with a large repeat through `bench_wrapper`, which turns the last
//!   run's output back into the input (cut back to the input's length, its Ethernet header
//!   restored: ipip), optionally makes every run a never-seen flow from a per-CPU counter
//!   (source address low half and port; the destination too, spread over VIPs), and tail-calls
//!   the balancer. Its own cost with the same settings (tail-calling `baseline_tx` instead,
//!   minus `baseline_tx` alone, measured in the same pair) is subtracted.
//!   - `v4/v6_established_ipip`: the same established packet, encapsulated every run.
//!   - `v4_syn_refresh`: the same SYN every run: the balancer re-records the same flow in its
//!     own way, a hot line (what a retransmitted SYN costs).
//!   - `v4_syn_newflow`: a never-seen flow every run into a long-lived 1M-flow table filled to
//!     25% by earlier flows (32% after its 7 runs of 10,000); `v4_syn_newflow_full`: the same
//!     into a table whose every set is full (filled with 3x its capacity first). The bench
//!     checks that every run inserted, and for `_full` that every insert evicted.
//!   - `v4_established_dsr_1m_flows`: an established packet of a different flow every run (1M
//!     flows in turn) to a VIP of 65536 routes over 20 nodes: each touches another route slot,
//!     node and `ROUTE_STATS` counter, where `v4_established_dsr` repeats one flow whose lines
//!     are all hot.
//!
//! `--scaling` measures instead how the cost grows (`scaling.json`): one flow against 1M
//! flows, 1/100/10,000 VIPs, conntrack fill 0-90%, 2/100/1000 nodes.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::Xdp;
use lb_common::{NODE_ACTIVE, NodeEntry, PROTO_TCP, RouteEntry, Stat};
use lb_tests::{
    fixture::{
        self as fx, Baseline, CLIENT4, OTHER4, V4_TCP_DSR, V4_TCP_IPIP, V6_TCP_DSR, V6_TCP_IPIP,
        WrapperCfg,
    },
    packet::{Packet, TCP_ACK, TCP_PSH, TCP_SYN, XDP_PASS, XDP_TX, verdict_name},
};
use lb_userspace::dataplane::{
    Dataplane, DataplaneOptions, ForwardMode, HashMode, VipSpec, vip_key,
};
use serde::Serialize;

struct Opts {
    runs: usize,
    repeat: u32,
    scaling: bool,
    /// `--scaling` only: the dimensions to measure (all when empty).
    only: Vec<String>,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        runs: 7,
        repeat: 1_000_000,
        scaling: false,
        only: vec![],
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || -> Result<u64> {
            it.next()
                .with_context(|| format!("{a} needs a value"))?
                .parse::<u64>()
                .with_context(|| format!("{a} needs a number"))
        };
        match a.as_str() {
            "--runs" => o.runs = usize::try_from(val()?)?,
            "--repeat" => o.repeat = u32::try_from(val()?)?,
            "--scaling" => o.scaling = true,
            "--only" => {
                let d = it.next().context("--only needs a dimension")?;
                if !DIMENSIONS.contains(&d.as_str()) {
                    bail!("--only {d:?}: the dimensions are {}", DIMENSIONS.join(", "));
                }
                o.only.push(d.clone());
            }
            other => bail!(
                "unknown argument {other:?} (--runs N, --repeat N, --scaling [--only DIMENSION]...)"
            ),
        }
    }
    if !o.only.is_empty() && !o.scaling {
        bail!("--only needs --scaling");
    }
    if o.runs < 5 {
        bail!("--runs must be at least 5");
    }
    if o.repeat < 10_000 {
        bail!("--repeat must be at least 10000");
    }
    Ok(o)
}

#[derive(Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Method {
    Repeat,
    Wrapper,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Repeat => "repeat",
            Method::Wrapper => "wrapper",
        }
    }
}

#[derive(Serialize)]
struct CaseResult {
    ns_median: f64,
    ns_min: f64,
    method: Method,
    /// The baseline case the ratio is against.
    baseline: String,
    /// Median of the per-pair ratios `ns / baseline ns`.
    ratio: f64,
    /// The baseline's ns per packet, median of the runs paired with this case's.
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_ns_median: Option<f64>,
    /// The verdict the case returned (a sanity check that it took the intended path).
    verdict: String,
    runs: usize,
}

#[derive(Serialize)]
struct Report {
    cases: BTreeMap<String, CaseResult>,
}

/// One measured case.
struct Measured {
    name: String,
    method: Method,
    baseline: &'static str,
    /// ns per packet of each run.
    runs: Vec<f64>,
    /// The baseline's run paired with each of `runs` (empty for a baseline itself).
    base_runs: Vec<f64>,
    verdict: u32,
    want: u32,
}

impl Measured {
    /// Median of the per-pair ratios (1 for a baseline).
    fn ratio(&self) -> f64 {
        if self.base_runs.is_empty() {
            return 1.0;
        }
        let r: Vec<f64> = self
            .runs
            .iter()
            .zip(&self.base_runs)
            .map(|(c, b)| c / b)
            .collect();
        median(&r)
    }

    fn result(&self) -> CaseResult {
        CaseResult {
            ns_median: median(&self.runs),
            ns_min: min(&self.runs),
            method: self.method,
            baseline: self.baseline.to_string(),
            ratio: self.ratio(),
            baseline_ns_median: (!self.base_runs.is_empty()).then(|| median(&self.base_runs)),
            verdict: verdict_name(self.verdict).to_string(),
            runs: self.runs.len(),
        }
    }

    fn verdict_text(&self) -> String {
        if self.verdict == self.want {
            verdict_name(self.verdict).to_string()
        } else {
            format!(
                "{} (UNEXPECTED, want {})",
                verdict_name(self.verdict),
                verdict_name(self.want)
            )
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// `repeat` method: `runs` calls with a large repeat, each paired with one of `base` (if any;
/// alternating which goes first); ns per run of the program.
fn by_repeat(
    name: &'static str,
    prog: &mut Xdp,
    pkt: &[u8],
    mut base: Option<(&'static str, &mut Xdp)>,
    o: &Opts,
    want: u32,
) -> Result<Measured> {
    let (verdict, _, _) = fx::xdp_run(prog, pkt, 1)?;
    // One warm-up call each.
    fx::xdp_run(prog, pkt, o.repeat.min(10_000))?;
    if let Some((_, b)) = base.as_mut() {
        fx::xdp_run(b, pkt, o.repeat.min(10_000))?;
    }
    let (mut runs, mut base_runs) = (vec![], vec![]);
    for i in 0..o.runs {
        let base_first = i % 2 == 1;
        if base_first && let Some((_, b)) = base.as_mut() {
            base_runs.push(fx::xdp_run(b, pkt, o.repeat)?.2.as_nanos() as f64);
        }
        runs.push(fx::xdp_run(prog, pkt, o.repeat)?.2.as_nanos() as f64);
        if !base_first && let Some((_, b)) = base.as_mut() {
            base_runs.push(fx::xdp_run(b, pkt, o.repeat)?.2.as_nanos() as f64);
        }
    }
    Ok(Measured {
        name: name.to_string(),
        method: Method::Repeat,
        baseline: base.map_or(name, |(n, _)| n),
        runs,
        base_runs,
        verdict,
        want,
    })
}

/// What a `wrapper` case's runs must do to the balancer's conntrack (checked after every run,
/// so a case cannot silently measure another path).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Established packets on unmoved routes: no inserts.
    NoInserts,
    /// Every run records its flow.
    InsertEach,
    /// Every run records its flow, evicting another.
    EvictEach,
}

/// A `wrapper` case.
struct Wrapped {
    name: String,
    pkt: Vec<u8>,
    cfg: WrapperCfg,
    repeat: u32,
    expect: Expect,
}

/// The conntrack table of the whole bench: 1M flows (the default size).
const CT_SIZE: u32 = 1 << 20;
/// Runs per call of a case that fills the table: 7 calls add 7% of it.
const NEWFLOW_REPEAT: u32 = 10_000;

/// `wrapper` method: per run, ns of (wrapper -> balancer) minus the wrapper's own cost
/// (wrapper -> baseline_tx, minus baseline_tx alone), paired with that `baseline_tx` run.
fn by_wrapper(base: &mut Baseline, dp: &mut Dataplane, c: &Wrapped, o: &Opts) -> Result<Measured> {
    let name = &c.name;
    base.set_wrapper(&c.cfg)?;
    let fd = dp.program_mut()?.fd()?.try_clone()?;
    let ct = |dp: &Dataplane| -> Result<(u64, u64)> {
        let s = dp.counters()?.stats;
        Ok((s[Stat::CtInsert as usize], s[Stat::CtEvict as usize]))
    };
    // One warm-up call each way.
    base.wrap_baseline_tx()?;
    fx::xdp_run(
        base.program_mut("bench_wrapper")?,
        &c.pkt,
        c.repeat.min(10_000),
    )?;
    base.set_wrapper_target(&fd)?;
    let verdict = fx::xdp_run(base.program_mut("bench_wrapper")?, &c.pkt, 1)?.0;
    if c.expect == Expect::NoInserts {
        fx::xdp_run(
            base.program_mut("bench_wrapper")?,
            &c.pkt,
            c.repeat.min(10_000),
        )?;
    }
    let (mut inserts, mut evictions) = ct(dp)?;
    let (mut runs, mut base_runs) = (vec![], vec![]);
    for _ in 0..o.runs {
        base.wrap_baseline_tx()?;
        let (_, _, wrapped_tx) = fx::xdp_run(base.program_mut("bench_wrapper")?, &c.pkt, c.repeat)?;
        let (_, _, tx) = fx::xdp_run(base.program_mut("baseline_tx")?, &c.pkt, c.repeat)?;
        let overhead = wrapped_tx.as_nanos() as f64 - tx.as_nanos() as f64;
        base.set_wrapper_target(&fd)?;
        let (_, _, d) = fx::xdp_run(base.program_mut("bench_wrapper")?, &c.pkt, c.repeat)?;
        runs.push(d.as_nanos() as f64 - overhead);
        base_runs.push(tx.as_nanos() as f64);
        let (now_inserts, now_evictions) = ct(dp)?;
        let (made, evicted) = (now_inserts - inserts, now_evictions - evictions);
        (inserts, evictions) = (now_inserts, now_evictions);
        let repeat = u64::from(c.repeat);
        match c.expect {
            Expect::NoInserts if made != 0 => {
                bail!("{name}: {made} conntrack inserts for established packets")
            }
            Expect::InsertEach | Expect::EvictEach if made < repeat => {
                bail!("{name}: {made} conntrack inserts for {repeat} SYNs")
            }
            Expect::EvictEach if evicted < made => {
                bail!("{name}: {evicted} evictions for {made} inserts into a full table")
            }
            _ => {}
        }
    }
    Ok(Measured {
        name: name.clone(),
        method: Method::Wrapper,
        baseline: "baseline_tx",
        runs,
        base_runs,
        verdict,
        want: XDP_TX,
    })
}

/// Records `share` x the table's capacity of random flows (never the wrapper's) in `dp`'s
/// conntrack, as a table that has been in use. Flows land in sets at random, so a full table
/// takes more than its capacity: after 2x some sets still had a free way (9994 of 10001
/// inserts evicted); 3x leaves every set full (`Expect::EvictEach` checks it).
fn prefill(dp: &mut Dataplane, vip: IpAddr, share: f64) -> Result<()> {
    let n = (f64::from(CT_SIZE) * share) as u64;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // 10.0.0.0/8 clients: the wrapper's are CLIENT4 with another low half.
        let src = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (x as u32 & 0x00ff_ffff)));
        let key = fx::flow_key(src, vip, (x >> 32) as u16, 80, PROTO_TCP);
        let e = lb_common::CtEntry {
            node: 1,
            vip: 0,
            last_seen: 0,
            flags: 0,
        };
        dp.conntrack_insert(&key, &e)?;
    }
    Ok(())
}

/// First address of the scaled setups' VIPs: VIP `i` is `SCALED_VIP + i`, TCP port 80, dsr-l2.
const SCALED_VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 0);

/// A balancer with `vips` VIPs of `routes` routes each, spread round robin over `nodes` nodes
/// (indices 1..=nodes), and a 1M-flow conntrack table.
fn scaled(vips: u32, routes: u32, nodes: u32) -> Result<Dataplane> {
    let mut dp = Dataplane::load(&DataplaneOptions {
        route_slots: 2 * vips * routes,
        conntrack_size: CT_SIZE,
        pin_dir: None,
    })
    .context("loading the balancer")?;
    dp.set_hash_seed(fx::HASH_SEED);
    dp.set_config(&fx::config())?;
    for i in 1..=nodes {
        let [_, _, hi, lo] = i.to_be_bytes();
        let node = NodeEntry {
            addr6: [0; 16],
            addr4: [10, 1, hi, lo],
            mac: [0x02, 0x4e, 0, 0, hi, lo],
            state: NODE_ACTIVE,
            _pad: 0,
        };
        dp.set_node(i, &node)?;
    }
    let table: Vec<RouteEntry> = (0..routes)
        .map(|r| RouteEntry {
            node: 1 + r % nodes,
            flags: 0,
        })
        .collect();
    for i in 0..vips {
        let addr = IpAddr::V4(Ipv4Addr::from(u32::from(SCALED_VIP) + i));
        let spec = VipSpec {
            key: vip_key(addr, 80, PROTO_TCP),
            index: i,
            mode: ForwardMode::DsrL2,
            hash: HashMode::FiveTuple,
        };
        dp.upsert_vip(&spec, &table)
            .with_context(|| format!("VIP {i} of {vips}"))?;
    }
    Ok(dp)
}

fn established(vip: &fx::Vip, client: IpAddr, sport: u16) -> Vec<u8> {
    Packet::tcp(client, vip.addr, sport, vip.port, TCP_PSH | TCP_ACK)
        .payload_len(64)
        .build()
}

/// A packet to the scaled setups' first VIP (the wrapper spreads it).
fn to_scaled(flags: u8) -> Vec<u8> {
    Packet::tcp(CLIENT4, IpAddr::V4(SCALED_VIP), 1, 80, flags)
        .payload_len(if flags & TCP_SYN != 0 { 0 } else { 64 })
        .build()
}

/// A never-seen flow every run (`vips` > 1: spread over that many VIPs).
fn new_flows(vips: u32) -> WrapperCfg {
    WrapperCfg {
        new_flows: true,
        rewrite_src: true,
        vips: if vips > 1 { vips } else { 0 },
        restore: None,
    }
}

/// The main table: each case beside its baseline (`dataplane.json`).
fn main_cases(o: &Opts, base: &mut Baseline) -> Result<Vec<Measured>> {
    let mut dp = fx::load_with(CT_SIZE).context("loading the balancer (run as root)")?;
    let v4_dsr = established(&V4_TCP_DSR, CLIENT4, 40000);
    let v6_dsr = established(&V6_TCP_DSR, fx::CLIENT6, 40000);
    let non_vip = Packet::tcp(CLIENT4, OTHER4, 40000, 80, TCP_PSH | TCP_ACK)
        .payload_len(64)
        .build();
    let (tx, pass) = ("baseline_tx", "baseline_pass");

    let mut out = vec![
        by_repeat(tx, base.program_mut(tx)?, &v4_dsr, None, o, XDP_TX)?,
        by_repeat(pass, base.program_mut(pass)?, &v4_dsr, None, o, XDP_PASS)?,
    ];
    for (name, pkt) in [
        ("v4_established_dsr", &v4_dsr),
        ("v6_established_dsr", &v6_dsr),
    ] {
        let b = Some((tx, base.program_mut(tx)?));
        out.push(by_repeat(name, dp.program_mut()?, pkt, b, o, XDP_TX)?);
    }
    let b = Some((pass, base.program_mut(pass)?));
    out.push(by_repeat(
        "non_vip",
        dp.program_mut()?,
        &non_vip,
        b,
        o,
        XDP_PASS,
    )?);

    for (name, pkt) in [
        (
            "v4_established_ipip",
            established(&V4_TCP_IPIP, CLIENT4, 40000),
        ),
        (
            "v6_established_ipip",
            established(&V6_TCP_IPIP, fx::CLIENT6, 40000),
        ),
    ] {
        let c = Wrapped {
            name: name.into(),
            cfg: WrapperCfg {
                restore: Some(pkt.clone()),
                ..Default::default()
            },
            pkt,
            repeat: o.repeat,
            expect: Expect::NoInserts,
        };
        out.push(by_wrapper(base, &mut dp, &c, o)?);
    }

    let mut flows = scaled(1, lb_common::DEFAULT_ROUTES_PER_VIP, 20)?;
    let c = Wrapped {
        name: "v4_established_dsr_1m_flows".into(),
        pkt: to_scaled(TCP_PSH | TCP_ACK),
        cfg: new_flows(1),
        repeat: o.repeat,
        expect: Expect::NoInserts,
    };
    out.push(by_wrapper(base, &mut flows, &c, o)?);

    let syn = Packet::tcp(CLIENT4, V4_TCP_DSR.addr, 1, V4_TCP_DSR.port, TCP_SYN).build();
    let refresh = Wrapped {
        name: "v4_syn_refresh".into(),
        pkt: syn.clone(),
        cfg: WrapperCfg {
            rewrite_src: true,
            ..Default::default()
        },
        repeat: o.repeat.min(500_000),
        expect: Expect::InsertEach,
    };
    out.push(by_wrapper(base, &mut dp, &refresh, o)?);
    for (name, share, expect) in [
        ("v4_syn_newflow", 0.25, Expect::InsertEach),
        ("v4_syn_newflow_full", 3.0, Expect::EvictEach),
    ] {
        // One long-lived balancer per case: a table in use, not one just zeroed and cached.
        let mut dp = fx::load_with(CT_SIZE).context("loading the balancer")?;
        prefill(&mut dp, V4_TCP_DSR.addr, share)?;
        let c = Wrapped {
            name: name.into(),
            pkt: syn.clone(),
            cfg: new_flows(1),
            repeat: NEWFLOW_REPEAT,
            expect,
        };
        out.push(by_wrapper(base, &mut dp, &c, o)?);
    }
    Ok(out)
}

/// One row of the scaling table.
struct Row {
    dimension: &'static str,
    value: String,
    m: Measured,
}

#[derive(Serialize)]
struct ScalingRow {
    dimension: &'static str,
    value: String,
    case: String,
    #[serde(flatten)]
    result: CaseResult,
}

/// The scaling table's dimensions.
const DIMENSIONS: [&str; 4] = ["flows", "vips", "ct_fill", "nodes"];

/// Routes per VIP in the VIP-count rows (10,000 VIPs of 65536 routes would not fit one box).
const SCALED_ROUTES: u32 = 256;

/// The scaling table (`scaling.json`): every row by the wrapper method against `baseline_tx`.
fn scaling_cases(o: &Opts, base: &mut Baseline) -> Result<Vec<Row>> {
    let est = || to_scaled(TCP_PSH | TCP_ACK);
    let syn = || to_scaled(TCP_SYN);
    let mut rows = vec![];
    let want = |d: &str| o.only.is_empty() || o.only.iter().any(|x| x == d);
    let mut row = |rows: &mut Vec<Row>,
                   dimension: &'static str,
                   value: String,
                   dp: &mut Dataplane,
                   c: Wrapped|
     -> Result<()> {
        eprintln!("scaling: {dimension} = {value}: {}", c.name);
        let m = by_wrapper(base, dp, &c, o)?;
        rows.push(Row {
            dimension,
            value,
            m,
        });
        Ok(())
    };

    // Flows: one flow again and again, against 1M flows in turn (65536 routes, 20 nodes).
    if want("flows") {
        let mut dp = scaled(1, lb_common::DEFAULT_ROUTES_PER_VIP, 20)?;
        let one = WrapperCfg {
            rewrite_src: true,
            ..Default::default()
        };
        for (value, cfg) in [("1", one), ("1M", new_flows(1))] {
            let c = Wrapped {
                name: "v4_established_dsr".into(),
                pkt: est(),
                cfg,
                repeat: o.repeat,
                expect: Expect::NoInserts,
            };
            row(&mut rows, "flows", value.into(), &mut dp, c)?;
        }
    }

    // VIPs: traffic spread over all of them (1M flows), established and new flows (25% fill).
    for vips in [1, 100, 10_000].into_iter().filter(|_| want("vips")) {
        let mut dp = scaled(vips, SCALED_ROUTES, 20)?;
        let c = Wrapped {
            name: "v4_established_dsr_1m_flows".into(),
            pkt: est(),
            cfg: new_flows(vips),
            repeat: o.repeat,
            expect: Expect::NoInserts,
        };
        row(&mut rows, "vips", vips.to_string(), &mut dp, c)?;
        prefill(&mut dp, IpAddr::V4(SCALED_VIP), 0.25)?;
        let c = Wrapped {
            name: "v4_syn_newflow".into(),
            pkt: syn(),
            cfg: new_flows(vips),
            repeat: NEWFLOW_REPEAT,
            expect: Expect::InsertEach,
        };
        row(&mut rows, "vips", vips.to_string(), &mut dp, c)?;
    }

    // Conntrack fill: a never-seen flow into a 1M-flow table at that fill.
    for pct in [0u32, 25, 50, 90].into_iter().filter(|_| want("ct_fill")) {
        let mut dp = scaled(1, lb_common::DEFAULT_ROUTES_PER_VIP, 20)?;
        prefill(&mut dp, IpAddr::V4(SCALED_VIP), f64::from(pct) / 100.0)?;
        let c = Wrapped {
            name: "v4_syn_newflow".into(),
            pkt: syn(),
            cfg: new_flows(1),
            repeat: NEWFLOW_REPEAT,
            expect: Expect::InsertEach,
        };
        row(&mut rows, "ct_fill", format!("{pct}%"), &mut dp, c)?;
    }

    // Nodes: 1M flows over a 65536-route VIP owned by that many nodes.
    for nodes in [2, 100, 1000].into_iter().filter(|_| want("nodes")) {
        let mut dp = scaled(1, lb_common::DEFAULT_ROUTES_PER_VIP, nodes)?;
        let c = Wrapped {
            name: "v4_established_dsr_1m_flows".into(),
            pkt: est(),
            cfg: new_flows(1),
            repeat: o.repeat,
            expect: Expect::NoInserts,
        };
        row(&mut rows, "nodes", nodes.to_string(), &mut dp, c)?;
    }
    Ok(rows)
}

const HEADER: &str = "ns median     ns min    ratio  baseline      base ns  verdict";

fn line(m: &Measured) -> String {
    let r = m.result();
    format!(
        "{:>9.1} {:>10.1} {:>8.2}  {:<12} {:>8}  {}",
        r.ns_median,
        r.ns_min,
        r.ratio,
        m.baseline,
        r.baseline_ns_median
            .map_or("-".into(), |b| format!("{b:.1}")),
        m.verdict_text()
    )
}

fn warn_wrong<'a>(wrong: impl Iterator<Item = &'a Measured>) {
    let wrong: Vec<&str> = wrong
        .filter(|m| m.verdict != m.want)
        .map(|m| m.name.as_str())
        .collect();
    if !wrong.is_empty() {
        eprintln!(
            "warning: {} returned an unexpected verdict: the numbers do not measure the intended path",
            wrong.join(", ")
        );
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let mut base = Baseline::load().context("loading the baselines (run as root)")?;
    if o.scaling {
        let rows = scaling_cases(&o, &mut base)?;
        println!(
            "{:<10} {:>6}  {:<28} {:<7} {HEADER}",
            "dimension", "value", "case", "method"
        );
        let mut json = vec![];
        for r in &rows {
            println!(
                "{:<10} {:>6}  {:<28} {:<7} {}",
                r.dimension,
                r.value,
                r.m.name,
                r.m.method.name(),
                line(&r.m)
            );
            json.push(ScalingRow {
                dimension: r.dimension,
                value: r.value.clone(),
                case: r.m.name.clone(),
                result: r.m.result(),
            });
        }
        let path = lb_tests::write_bench_json("scaling.json", &json)?;
        println!(
            "\n{} runs per row; repeat = {} ({NEWFLOW_REPEAT} for new flows); {SCALED_ROUTES} routes per VIP in the VIP rows, else 65536; wrote {}",
            o.runs,
            o.repeat,
            path.display()
        );
        warn_wrong(rows.iter().map(|r| &r.m));
        return Ok(());
    }

    let results = main_cases(&o, &mut base)?;
    println!("{:<28} {:<7} {HEADER}", "case", "method");
    let mut report = Report {
        cases: BTreeMap::new(),
    };
    for m in &results {
        println!("{:<28} {:<7} {}", m.name, m.method.name(), line(m));
        report.cases.insert(m.name.clone(), m.result());
    }
    let path = lb_tests::write_bench_json("dataplane.json", &report)?;
    println!(
        "\n{} runs per case; repeat = {}; wrote {}",
        o.runs,
        o.repeat,
        path.display()
    );
    warn_wrong(results.iter());
    let dir = lb_tests::bench_dir();
    println!(
        "wrote {}",
        lb_tests::charts::dataplane_from(&dir, &dir)?.display()
    );
    Ok(())
}
