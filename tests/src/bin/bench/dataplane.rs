//! `lb-bench dataplane`: ns/packet of the balancer through `BPF_PROG_TEST_RUN`, against
//! trivial baseline programs measured in the same run.
//!
//! The balancer is loaded and configured exactly as the fixture tests do (`lb_tests::fixture`),
//! and the cases are packets of the fixture flows.
//!
//! Every case is measured `--runs` times (default 7, at least 5), each run paired with a run of
//! its baseline (case then baseline, then baseline then case, alternating): the ratio is the
//! median of the per-pair ratios, so drift in the machine's speed cancels. Three methods,
//! because with `repeat > 1` the kernel feeds a program's output back in as the next run's
//! input (it does not reset the packet):
//! - `repeat`: one call with a large repeat; the kernel reports the mean time per run. Only for
//!   packets whose rewrite is idempotent (dsr-l2 rewrites only MACs and takes the same path
//!   again; pass-through leaves the packet alone), and for the baselines.
//! - `wrapper`: one call with a large repeat through `bench_new_flow`, which rewrites the
//!   source address's low half and the source port from a per-CPU counter, restoring the input,
//!   and tail-calls the balancer. Its own cost (tail-calling `baseline_tx` instead, minus
//!   `baseline_tx` alone, measured in the same pair) is subtracted.
//!   - `v4_syn_refresh`: the same SYN every run (step 0): the balancer re-records the same flow
//!     in its own way, a hot line (what a retransmitted SYN costs).
//!   - `v4_syn_newflow`: a never-seen flow every run into a long-lived 1M-flow table filled to
//!     25% by earlier flows (32% after its 7 runs of 10,000); `v4_syn_newflow_full`: the same
//!     into a table whose every set is full (filled with 3x its capacity first): the bench
//!     checks that every run inserted, and for `_full` that every insert evicted.
//!   - `v4_established_dsr_1m_flows`: an established packet of a different flow every run
//!     (1M flows in turn): each touches another route slot, node line and `ROUTE_STATS`
//!     counter, where `v4_established_dsr` repeats one flow whose lines are all hot.
//! - `loop`: many calls with repeat = 1 (ipip would re-encapsulate its own output). The time is
//!   the kernel-reported duration of each call (so the syscall itself is not counted, but the
//!   per-call timer and setup are), averaged over the calls of a run; the baselines are
//!   measured the same way (`baseline_*_loop`). The wall-clock time per call is reported
//!   alongside.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use aya::programs::Xdp;
use lb_tests::{
    fixture::{
        self as fx, Baseline, CLIENT4, OTHER4, V4_TCP_DSR, V4_TCP_IPIP, V6_TCP_DSR, V6_TCP_IPIP,
    },
    packet::{Packet, TCP_ACK, TCP_PSH, TCP_SYN, XDP_PASS, XDP_TX, verdict_name},
};
use serde::Serialize;

struct Opts {
    runs: usize,
    repeat: u32,
    loop_calls: usize,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        runs: 7,
        repeat: 1_000_000,
        loop_calls: 20_000,
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
            "--loop" => o.loop_calls = usize::try_from(val()?)?,
            other => bail!("unknown argument {other:?} (--runs N, --repeat N, --loop N)"),
        }
    }
    if o.runs < 5 {
        bail!("--runs must be at least 5");
    }
    if o.repeat == 0 || o.loop_calls == 0 {
        bail!("--repeat and --loop must be positive");
    }
    Ok(o)
}

#[derive(Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Method {
    Repeat,
    Loop,
    Wrapper,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Repeat => "repeat",
            Method::Loop => "loop",
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
    /// `ns_median / baseline ns_median`.
    ratio: f64,
    /// Loop method only: wall-clock ns per call (syscall included), median of the runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    wall_ns_median: Option<f64>,
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
    name: &'static str,
    method: Method,
    baseline: &'static str,
    runs: Vec<f64>,
    /// The baseline's run paired with each of `runs` (empty for a baseline itself).
    base_runs: Vec<f64>,
    wall: Vec<f64>,
    verdict: u32,
    want: u32,
}

impl Measured {
    fn new(name: &'static str, method: Method, baseline: &'static str, r: Runs, want: u32) -> Self {
        Self {
            name,
            method,
            baseline,
            runs: r.runs,
            base_runs: r.base_runs,
            wall: r.wall,
            verdict: r.verdict,
            want,
        }
    }

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

/// What a method measured.
#[derive(Default)]
struct Runs {
    /// ns per packet of each run.
    runs: Vec<f64>,
    /// The baseline's run paired with each (empty without a baseline).
    base_runs: Vec<f64>,
    /// `loop` only: wall-clock ns per call (syscall included) of each run.
    wall: Vec<f64>,
    verdict: u32,
}

/// `repeat` method: `runs` calls with a large repeat; ns per run of the program. With `base`,
/// each call is paired with one of the baseline (alternating which goes first).
fn by_repeat(prog: &mut Xdp, pkt: &[u8], mut base: Option<&mut Xdp>, o: &Opts) -> Result<Runs> {
    let (verdict, _, _) = fx::xdp_run(prog, pkt, 1)?;
    // One warm-up call each.
    fx::xdp_run(prog, pkt, o.repeat.min(10_000))?;
    if let Some(b) = base.as_deref_mut() {
        fx::xdp_run(b, pkt, o.repeat.min(10_000))?;
    }
    let mut runs = Vec::with_capacity(o.runs);
    let mut base_runs = Vec::with_capacity(o.runs);
    for i in 0..o.runs {
        let mut case = || -> Result<()> {
            runs.push(fx::xdp_run(prog, pkt, o.repeat)?.2.as_nanos() as f64);
            Ok(())
        };
        match base.as_deref_mut() {
            None => case()?,
            Some(b) => {
                let mut baseline = || -> Result<()> {
                    base_runs.push(fx::xdp_run(b, pkt, o.repeat)?.2.as_nanos() as f64);
                    Ok(())
                };
                if i % 2 == 0 {
                    case()?;
                    baseline()?;
                } else {
                    baseline()?;
                    case()?;
                }
            }
        }
    }
    Ok(Runs {
        runs,
        base_runs,
        wall: vec![],
        verdict,
    })
}

/// One `loop` run: `calls` calls with repeat 1 over `batch` (cycled); mean kernel-reported ns
/// per call and mean wall-clock ns per call.
fn loop_round(prog: &mut Xdp, batch: &[Vec<u8>], calls: usize) -> Result<(f64, f64)> {
    let t0 = Instant::now();
    let mut kernel_ns = 0u128;
    for i in 0..calls {
        let (_, _, d) = fx::xdp_run(prog, &batch[i % batch.len()], 1)?;
        kernel_ns += d.as_nanos();
    }
    let wall = t0.elapsed().as_nanos() as f64 / calls as f64;
    Ok((kernel_ns as f64 / calls as f64, wall))
}

/// `loop` method: `runs` rounds of `loop_calls` calls with repeat 1, each round paired with a
/// round of `base` (if any) over the same packets.
fn by_loop(prog: &mut Xdp, mut base: Option<&mut Xdp>, o: &Opts, pkts: &[Vec<u8>]) -> Result<Runs> {
    let (verdict, _, _) = fx::xdp_run(prog, &pkts[0], 1)?;
    loop_round(prog, pkts, 1000)?;
    if let Some(b) = base.as_deref_mut() {
        loop_round(b, pkts, 1000)?;
    }
    let (mut runs, mut base_runs, mut wall) = (vec![], vec![], vec![]);
    for i in 0..o.runs {
        let first_base = i % 2 == 1;
        if first_base && let Some(b) = base.as_deref_mut() {
            base_runs.push(loop_round(b, pkts, o.loop_calls)?.0);
        }
        let (k, w) = loop_round(prog, pkts, o.loop_calls)?;
        runs.push(k);
        wall.push(w);
        if !first_base && let Some(b) = base.as_deref_mut() {
            base_runs.push(loop_round(b, pkts, o.loop_calls)?.0);
        }
    }
    Ok(Runs {
        runs,
        base_runs,
        wall,
        verdict,
    })
}

/// What a `wrapper` case feeds the balancer.
#[derive(Clone, Copy)]
enum Wrapped {
    /// The same SYN every run.
    SynRefresh,
    /// A never-seen SYN every run, into a table filled to this share of its capacity first.
    SynNew { fill: f64 },
    /// An established packet of another flow every run.
    EstablishedFlows,
}

/// The conntrack table of the `wrapper` cases (and of the whole bench): 1M flows.
const CT_SIZE: u32 = 1 << 20;
/// Runs per call of a filling case: 7 calls add 7% of the table to its 25% fill.
const NEWFLOW_REPEAT: u32 = 10_000;

/// Records `n` random flows (never the wrapper's) in `dp`'s conntrack, as a table that has been
/// in use. Flows land in sets at random, so a full table takes more than its capacity: after
/// 2x some sets still had a free way (9994 of 10001 inserts evicted); 3x leaves every set full
/// (the bench checks that every insert evicts).
fn prefill(dp: &mut lb_userspace::dataplane::Dataplane, fill: f64) -> Result<()> {
    let n = (f64::from(CT_SIZE) * fill) as u64;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // 10.0.0.0/8 clients: the wrapper's are CLIENT4 with another low half.
        let src = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (x as u32 & 0x00ff_ffff)));
        let key = fx::flow_key(src, V4_TCP_DSR.addr, (x >> 32) as u16, V4_TCP_DSR.port, 6);
        let e = lb_common::CtEntry {
            node: 1,
            vip: V4_TCP_DSR.index,
            last_seen: 0,
            flags: 0,
        };
        dp.conntrack_insert(&key, &e)?;
    }
    Ok(())
}

/// `wrapper` method: per run, ns of (wrapper -> balancer) minus the wrapper's own cost
/// (wrapper -> baseline_tx, minus baseline_tx alone), paired with that `baseline_tx` run.
fn by_wrapper(base: &mut Baseline, o: &Opts, what: Wrapped) -> Result<Measured> {
    let (name, flags, repeat) = match what {
        Wrapped::SynRefresh => ("v4_syn_refresh", TCP_SYN, o.repeat.min(500_000)),
        Wrapped::SynNew { fill } if fill >= 1.0 => ("v4_syn_newflow_full", TCP_SYN, NEWFLOW_REPEAT),
        Wrapped::SynNew { .. } => ("v4_syn_newflow", TCP_SYN, NEWFLOW_REPEAT),
        Wrapped::EstablishedFlows => (
            "v4_established_dsr_1m_flows",
            TCP_PSH | TCP_ACK,
            o.repeat.min(1_000_000),
        ),
    };
    base.set_wrapper_new_flows(!matches!(what, Wrapped::SynRefresh))?;
    let pkt = Packet::tcp(CLIENT4, V4_TCP_DSR.addr, 1, V4_TCP_DSR.port, flags).build();
    // One long-lived balancer per case: a table in use, not one just zeroed and cached.
    let mut dp = fx::load_with(CT_SIZE).context("loading the balancer")?;
    if let Wrapped::SynNew { fill } = what {
        prefill(&mut dp, fill)?;
    }
    let fd = dp.program_mut()?.fd()?.try_clone()?;
    let (mut runs, mut base_runs) = (vec![], vec![]);
    let mut verdict = 0;
    // (inserts, evictions) so far: each run's must match what the case's name says.
    let ct = |dp: &lb_userspace::dataplane::Dataplane| -> Result<(u64, u64)> {
        let s = dp.counters()?.stats;
        Ok((
            s[lb_common::Stat::CtInsert as usize],
            s[lb_common::Stat::CtEvict as usize],
        ))
    };
    let (mut inserts, mut evictions) = ct(&dp)?;
    for _ in 0..o.runs {
        base.wrap_baseline_tx()?;
        let (_, _, wrapped_tx) = fx::xdp_run(base.program_mut("bench_new_flow")?, &pkt, repeat)?;
        let (_, _, tx) = fx::xdp_run(base.program_mut("baseline_tx")?, &pkt, repeat)?;
        let overhead = wrapped_tx.as_nanos() as f64 - tx.as_nanos() as f64;
        base.set_wrapper_target(&fd)?;
        let wrap = base.program_mut("bench_new_flow")?;
        let (_, _, d) = fx::xdp_run(wrap, &pkt, repeat)?;
        verdict = fx::xdp_run(wrap, &pkt, 1)?.0;
        runs.push(d.as_nanos() as f64 - overhead);
        base_runs.push(tx.as_nanos() as f64);
        let (now_inserts, now_evictions) = ct(&dp)?;
        let (made, evicted) = (now_inserts - inserts, now_evictions - evictions);
        (inserts, evictions) = (now_inserts, now_evictions);
        match what {
            Wrapped::SynNew { fill } if fill >= 1.0 && evicted < made => {
                bail!("{name}: {evicted} evictions for {made} inserts into a full table")
            }
            Wrapped::EstablishedFlows if made != 0 => {
                bail!("{name}: {made} conntrack inserts for established packets")
            }
            Wrapped::SynRefresh | Wrapped::SynNew { .. } if made < u64::from(repeat) => {
                bail!("{name}: {made} conntrack inserts for {repeat} SYNs")
            }
            _ => {}
        }
    }
    let r = Runs {
        runs,
        base_runs,
        wall: vec![],
        verdict,
    };
    Ok(Measured::new(
        name,
        Method::Wrapper,
        "baseline_tx",
        r,
        XDP_TX,
    ))
}

fn established(vip: &fx::Vip, client: IpAddr, sport: u16) -> Vec<u8> {
    Packet::tcp(client, vip.addr, sport, vip.port, TCP_PSH | TCP_ACK)
        .payload_len(64)
        .build()
}

pub fn run(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let mut dp = fx::load_with(CT_SIZE).context("loading the balancer (run as root)")?;
    let mut base = Baseline::load().context("loading the baselines")?;

    let v4_dsr = established(&V4_TCP_DSR, CLIENT4, 40000);
    let v6_dsr = established(&V6_TCP_DSR, fx::CLIENT6, 40000);
    let v4_ipip = established(&V4_TCP_IPIP, CLIENT4, 40000);
    let v6_ipip = established(&V6_TCP_IPIP, fx::CLIENT6, 40000);
    let non_vip = Packet::tcp(CLIENT4, OTHER4, 40000, 80, TCP_PSH | TCP_ACK)
        .payload_len(64)
        .build();

    let mut results: Vec<Measured> = vec![];
    let mut repeat_case = |name: &'static str,
                           prog: &mut Xdp,
                           pkt: &[u8],
                           base: Option<&mut Xdp>,
                           baseline: &'static str,
                           want: u32|
     -> Result<()> {
        let r = by_repeat(prog, pkt, base, &o)?;
        results.push(Measured::new(name, Method::Repeat, baseline, r, want));
        Ok(())
    };
    let tx = "baseline_tx";
    let pass = "baseline_pass";
    repeat_case(tx, base.program_mut(tx)?, &v4_dsr, None, tx, XDP_TX)?;
    repeat_case(pass, base.program_mut(pass)?, &v4_dsr, None, pass, XDP_PASS)?;
    for (name, pkt) in [
        ("v4_established_dsr", &v4_dsr),
        ("v6_established_dsr", &v6_dsr),
    ] {
        let b = Some(base.program_mut(tx)?);
        repeat_case(name, dp.program_mut()?, pkt, b, tx, XDP_TX)?;
    }
    let b = Some(base.program_mut(pass)?);
    repeat_case("non_vip", dp.program_mut()?, &non_vip, b, pass, XDP_PASS)?;

    let mut loop_case = |name: &'static str,
                         prog: &mut Xdp,
                         base: Option<&mut Xdp>,
                         baseline: &'static str,
                         want: u32,
                         pkts: &[Vec<u8>]|
     -> Result<()> {
        let r = by_loop(prog, base, &o, pkts)?;
        results.push(Measured::new(name, Method::Loop, baseline, r, want));
        Ok(())
    };
    let one = std::slice::from_ref(&v4_dsr);
    loop_case(
        "baseline_tx_loop",
        base.program_mut(tx)?,
        None,
        "baseline_tx_loop",
        XDP_TX,
        one,
    )?;
    for (name, pkt) in [
        ("v4_established_ipip", v4_ipip),
        ("v6_established_ipip", v6_ipip),
    ] {
        let b = Some(base.program_mut(tx)?);
        loop_case(
            name,
            dp.program_mut()?,
            b,
            "baseline_tx_loop",
            XDP_TX,
            &[pkt],
        )?;
    }

    for what in [
        Wrapped::EstablishedFlows,
        Wrapped::SynRefresh,
        Wrapped::SynNew { fill: 0.25 },
        Wrapped::SynNew { fill: 3.0 },
    ] {
        results.push(by_wrapper(&mut base, &o, what)?);
    }

    // Report.
    let mut report = Report {
        cases: BTreeMap::new(),
    };
    println!(
        "{:<28} {:<7} {:>10} {:>10} {:>8}  {:<18} {:>10}  verdict",
        "case", "method", "ns median", "ns min", "ratio", "baseline", "wall ns"
    );
    for m in &results {
        let med = median(&m.runs);
        let ratio = m.ratio();
        let wall = (!m.wall.is_empty()).then(|| median(&m.wall));
        let verdict = if m.verdict == m.want {
            verdict_name(m.verdict).to_string()
        } else {
            format!(
                "{} (UNEXPECTED, want {})",
                verdict_name(m.verdict),
                verdict_name(m.want)
            )
        };
        println!(
            "{:<28} {:<7} {:>10.1} {:>10.1} {:>8.2}  {:<18} {:>10}  {}",
            m.name,
            m.method.name(),
            med,
            min(&m.runs),
            ratio,
            m.baseline,
            wall.map_or("-".into(), |w| format!("{w:.0}")),
            verdict
        );
        report.cases.insert(
            m.name.to_string(),
            CaseResult {
                ns_median: med,
                ns_min: min(&m.runs),
                method: m.method,
                baseline: m.baseline.to_string(),
                ratio,
                wall_ns_median: wall,
                verdict: verdict_name(m.verdict).to_string(),
                runs: m.runs.len(),
            },
        );
    }
    let path = lb_tests::write_bench_json("dataplane.json", &report)?;
    println!(
        "\n{} runs per case; repeat = {}, loop = {} calls per run; wrote {}",
        o.runs,
        o.repeat,
        o.loop_calls,
        path.display()
    );
    let wrong: Vec<&str> = results
        .iter()
        .filter(|m| m.verdict != m.want)
        .map(|m| m.name)
        .collect();
    if !wrong.is_empty() {
        eprintln!(
            "warning: {} returned an unexpected verdict: the numbers do not measure the intended path",
            wrong.join(", ")
        );
    }
    let dir = lb_tests::bench_dir();
    println!(
        "wrote {}",
        lb_tests::charts::dataplane_from(&dir, &dir)?.display()
    );
    Ok(())
}
