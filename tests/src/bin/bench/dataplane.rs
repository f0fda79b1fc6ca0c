//! `lb-bench dataplane`: ns/packet of the balancer through `BPF_PROG_TEST_RUN`, against
//! trivial baseline programs measured in the same run.
//!
//! The balancer is loaded and configured exactly as the fixture tests do (`lb_tests::fixture`),
//! and the cases are packets of the fixture flows.
//!
//! Two methods, because with `repeat > 1` the kernel feeds the program's output back in:
//! - `repeat`: one call with a large repeat; the kernel reports the mean time per run. Only for
//!   packets whose rewrite is idempotent (dsr-l2 rewrites only MACs and takes the same path
//!   again; pass-through leaves the packet alone), and for the baselines.
//! - `wrapper` (SYN): one call with a large repeat through `bench_new_flow`, which sets the
//!   source address/port and tail-calls the balancer. `v4_syn_dsr`: the input is restored to
//!   the same SYN every run, and every run makes the balancer insert the flow's conntrack entry
//!   (an LRU update always links a newly taken element). `v4_syn_dsr_newflow`: every run is a
//!   flow never seen before, so the table's memory is cold (a 1M-entry table). Both check that
//!   the number of inserts equals the number of runs. The wrapper's own cost (tail-calling
//!   `baseline_tx` instead, minus `baseline_tx` alone) is subtracted. Each run starts with a
//!   freshly loaded balancer, so the inserts never evict.
//! - `loop`: many calls with repeat = 1 (ipip would re-encapsulate its own output; the SYN is
//!   also reported this way, `v4_syn_dsr_loop`). The time is the kernel-reported
//!   duration of each call (so the syscall itself is not counted, but the per-call timer and
//!   setup are), averaged over the calls of a run; the baselines are measured the same way
//!   (`baseline_*_loop`) for the ratio. The wall-clock time per call is reported alongside.
//!
//! Every case is measured `--runs` times (default 7, at least 5); the table shows the median
//! and the minimum of the runs and the ratio of the median to the matching baseline's.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use aya::programs::Xdp;
use lb_tests::{
    fixture::{self as fx, Baseline, CLIENT4, OTHER4, V4_TCP_DSR, V4_TCP_IPIP, V6_TCP_DSR},
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
    wall: Vec<f64>,
    verdict: u32,
    want: u32,
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

/// `repeat` method: `runs` calls with a large repeat; ns per run of the program.
fn by_repeat(prog: &mut Xdp, pkt: &[u8], o: &Opts) -> Result<(Vec<f64>, u32)> {
    let (verdict, _, _) = fx::xdp_run(prog, pkt, 1)?;
    // One warm-up call.
    fx::xdp_run(prog, pkt, o.repeat.min(10_000))?;
    let mut runs = Vec::with_capacity(o.runs);
    for _ in 0..o.runs {
        let (_, _, d) = fx::xdp_run(prog, pkt, o.repeat)?;
        runs.push(d.as_nanos() as f64);
    }
    Ok((runs, verdict))
}

/// `loop` method: `runs` rounds of `loop_calls` calls with repeat 1; per round the mean
/// kernel-reported ns per call and the mean wall-clock ns per call. `pkts(round)` gives the
/// packets of a round (one per call, cycled).
fn by_loop(
    prog: &mut Xdp,
    o: &Opts,
    mut pkts: impl FnMut(usize) -> Vec<Vec<u8>>,
) -> Result<(Vec<f64>, Vec<f64>, u32)> {
    let warm = pkts(usize::MAX);
    let (verdict, _, _) = fx::xdp_run(prog, &warm[0], 1)?;
    for p in warm.iter().take(1000) {
        fx::xdp_run(prog, p, 1)?;
    }
    let mut runs = Vec::with_capacity(o.runs);
    let mut wall = Vec::with_capacity(o.runs);
    for round in 0..o.runs {
        let batch = pkts(round);
        let t0 = Instant::now();
        let mut kernel_ns = 0u128;
        for i in 0..o.loop_calls {
            let (_, _, d) = fx::xdp_run(prog, &batch[i % batch.len()], 1)?;
            kernel_ns += d.as_nanos();
        }
        let w = t0.elapsed().as_nanos() as f64 / o.loop_calls as f64;
        runs.push(kernel_ns as f64 / o.loop_calls as f64);
        wall.push(w);
    }
    Ok((runs, wall, verdict))
}

/// SYNs of distinct new flows: round `r`, call `i` (the warm-up round uses its own range).
fn syn_batch(round: usize, calls: usize) -> Vec<Vec<u8>> {
    let base = if round == usize::MAX {
        0xff_0000u32
    } else {
        (round as u32 + 1) << 16
    };
    (0..calls as u32)
        .map(|i| {
            let n = base + i;
            // Client 100.64.0.0/10 + n / 32768, port 16384 + n % 32768: unique per call.
            let a = 0x6440_0000u32 + (n >> 15);
            let src = IpAddr::V4(Ipv4Addr::from(a));
            let port = 16384 + (n & 0x7fff) as u16;
            Packet::tcp(src, V4_TCP_DSR.addr, port, V4_TCP_DSR.port, TCP_SYN).build()
        })
        .collect()
}

/// `wrapper` method for SYNs: per run, ns of (wrapper -> balancer) minus the wrapper's own
/// cost (wrapper -> baseline_tx, minus baseline_tx alone).
fn syn_by_wrapper(base: &mut Baseline, o: &Opts, new_flows: bool) -> Result<Measured> {
    base.set_wrapper_new_flows(new_flows)?;
    // Below the conntrack size, so no run evicts.
    let repeat = o.repeat.min(500_000);
    let syn = Packet::tcp(CLIENT4, V4_TCP_DSR.addr, 1, V4_TCP_DSR.port, TCP_SYN).build();
    let mut runs = Vec::with_capacity(o.runs);
    let mut verdict = 0;
    for _ in 0..o.runs {
        base.wrap_baseline_tx()?;
        let (_, _, wrapped_tx) = fx::xdp_run(base.program_mut("bench_new_flow")?, &syn, repeat)?;
        let (_, _, tx) = fx::xdp_run(base.program_mut("baseline_tx")?, &syn, repeat)?;
        let overhead = wrapped_tx.as_nanos() as f64 - tx.as_nanos() as f64;

        let mut dp = fx::load_with(1 << 20).context("loading the balancer")?;
        let fd = dp.program_mut()?.fd()?.try_clone()?;
        base.set_wrapper_target(&fd)?;
        let wrap = base.program_mut("bench_new_flow")?;
        let (v, _, _) = fx::xdp_run(wrap, &syn, 1)?;
        verdict = v;
        let (_, _, d) = fx::xdp_run(wrap, &syn, repeat)?;
        let inserted = dp.counters()?.stats[lb_common::Stat::CtInsert as usize];
        if inserted < u64::from(repeat) {
            bail!("wrapper SYN run made {inserted} conntrack inserts for {repeat} packets");
        }
        runs.push(d.as_nanos() as f64 - overhead);
    }
    Ok(Measured {
        name: if new_flows {
            "v4_syn_dsr_newflow"
        } else {
            "v4_syn_dsr"
        },
        method: Method::Wrapper,
        baseline: "baseline_tx",
        runs,
        wall: vec![],
        verdict,
        want: XDP_TX,
    })
}

fn established(vip: &fx::Vip, client: IpAddr, sport: u16) -> Vec<u8> {
    Packet::tcp(client, vip.addr, sport, vip.port, TCP_PSH | TCP_ACK)
        .payload_len(64)
        .build()
}

pub fn run(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let mut dp = fx::load_with(1 << 20).context("loading the balancer (run as root)")?;
    let mut base = Baseline::load().context("loading the baselines")?;

    let v4_dsr = established(&V4_TCP_DSR, CLIENT4, 40000);
    let v6_dsr = established(&V6_TCP_DSR, fx::CLIENT6, 40000);
    let v4_ipip = established(&V4_TCP_IPIP, CLIENT4, 40000);
    let non_vip = Packet::tcp(CLIENT4, OTHER4, 40000, 80, TCP_PSH | TCP_ACK)
        .payload_len(64)
        .build();

    let mut results: Vec<Measured> = vec![];
    let repeat_case = |name: &'static str,
                       prog: &mut Xdp,
                       pkt: &[u8],
                       baseline: &'static str,
                       want: u32|
     -> Result<Measured> {
        let (runs, verdict) = by_repeat(prog, pkt, &o)?;
        Ok(Measured {
            name,
            method: Method::Repeat,
            baseline,
            runs,
            wall: vec![],
            verdict,
            want,
        })
    };
    // Baselines first and last would both do; interleaving is not needed at these run lengths.
    results.push(repeat_case(
        "baseline_tx",
        base.program_mut("baseline_tx")?,
        &v4_dsr,
        "baseline_tx",
        XDP_TX,
    )?);
    results.push(repeat_case(
        "baseline_pass",
        base.program_mut("baseline_pass")?,
        &v4_dsr,
        "baseline_pass",
        XDP_PASS,
    )?);
    results.push(repeat_case(
        "v4_established_dsr",
        dp.program_mut()?,
        &v4_dsr,
        "baseline_tx",
        XDP_TX,
    )?);
    results.push(repeat_case(
        "v6_established_dsr",
        dp.program_mut()?,
        &v6_dsr,
        "baseline_tx",
        XDP_TX,
    )?);
    results.push(repeat_case(
        "non_vip",
        dp.program_mut()?,
        &non_vip,
        "baseline_pass",
        XDP_PASS,
    )?);

    let calls = o.loop_calls;
    let loop_case = |name: &'static str,
                     prog: &mut Xdp,
                     baseline: &'static str,
                     want: u32,
                     pkts: &mut dyn FnMut(usize) -> Vec<Vec<u8>>|
     -> Result<Measured> {
        let (runs, wall, verdict) = by_loop(prog, &o, pkts)?;
        Ok(Measured {
            name,
            method: Method::Loop,
            baseline,
            runs,
            wall,
            verdict,
            want,
        })
    };
    results.push(loop_case(
        "baseline_tx_loop",
        base.program_mut("baseline_tx")?,
        "baseline_tx_loop",
        XDP_TX,
        &mut |_| vec![v4_dsr.clone()],
    )?);
    results.push(loop_case(
        "baseline_pass_loop",
        base.program_mut("baseline_pass")?,
        "baseline_pass_loop",
        XDP_PASS,
        &mut |_| vec![v4_dsr.clone()],
    )?);
    results.push(loop_case(
        "v4_established_ipip",
        dp.program_mut()?,
        "baseline_tx_loop",
        XDP_TX,
        &mut |_| vec![v4_ipip.clone()],
    )?);
    results.push(loop_case(
        "v4_syn_dsr_loop",
        dp.program_mut()?,
        "baseline_tx_loop",
        XDP_TX,
        &mut |round| syn_batch(round, calls),
    )?);

    results.push(syn_by_wrapper(&mut base, &o, false)?);
    results.push(syn_by_wrapper(&mut base, &o, true)?);

    // Report.
    let medians: BTreeMap<&str, f64> = results.iter().map(|m| (m.name, median(&m.runs))).collect();
    let mut report = Report {
        cases: BTreeMap::new(),
    };
    println!(
        "{:<22} {:<7} {:>10} {:>10} {:>8}  {:<18} {:>10}  verdict",
        "case", "method", "ns median", "ns min", "ratio", "baseline", "wall ns"
    );
    for m in &results {
        let med = median(&m.runs);
        let b = medians.get(m.baseline).copied().unwrap_or(f64::NAN);
        let ratio = med / b;
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
            "{:<22} {:<7} {:>10.1} {:>10.1} {:>8.2}  {:<18} {:>10}  {}",
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
    Ok(())
}
