//! SVG charts of the benchmark JSON under `target/bench/`: `dataplane.svg` (ns per packet of each
//! case beside its baseline) and `failover.svg` (CDF of the failover trials).
//!
//! plotters' SVG backend without its `ttf` feature: text is written as SVG `<text>` elements,
//! so no system font or freetype is needed to render.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail, ensure};
use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};
use serde::{Deserialize, de::DeserializeOwned};

/// The fields of `dataplane.json` the chart uses.
#[derive(Deserialize)]
pub struct Dataplane {
    pub cases: BTreeMap<String, Case>,
}

#[derive(Deserialize)]
pub struct Case {
    pub ns_median: f64,
    /// The case the ratio is against; a baseline names itself.
    pub baseline: String,
    pub ratio: f64,
    /// The baseline's ns in the runs paired with this case's (a case run at another repeat
    /// than its baseline's own row has its own); absent for a baseline.
    #[serde(default)]
    pub baseline_ns_median: Option<f64>,
}

/// The fields of `control.json` the chart uses.
#[derive(Deserialize)]
pub struct Control {
    pub failover_ms: Trials,
}

#[derive(Deserialize)]
pub struct Trials {
    pub trials: Vec<f64>,
}

const FONT: &str = "sans-serif";
const CASE_COLOR: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const BASE_COLOR: RGBColor = RGBColor(0xaa, 0xaa, 0xaa);

/// Horizontal bars, one pair per non-baseline case: its median ns/packet (labelled with its
/// ratio) above its baseline's median in the same pairs (labelled with the baseline's name).
pub fn dataplane(doc: &Dataplane, out: &Path) -> Result<()> {
    let mut rows = vec![];
    for (name, case) in doc.cases.iter().filter(|(n, c)| **n != c.baseline) {
        let base = doc.cases.get(&case.baseline).with_context(|| {
            format!(
                "case {name}: its baseline {:?} is not a case in the file",
                case.baseline
            )
        })?;
        rows.push((
            name.as_str(),
            case,
            case.baseline_ns_median.unwrap_or(base.ns_median),
        ));
    }
    ensure!(!rows.is_empty(), "no case with a baseline to chart");
    let n = rows.len();
    let xmax = rows
        .iter()
        .map(|(_, c, b)| c.ns_median.max(*b))
        .fold(0.0, f64::max)
        * 1.3; // room for the labels right of the longest bar
    // Row i (from the top) is the band [100 (n-1-i), 100 (n-i)): the case bar in its upper
    // half, the baseline bar in its lower half, the case name at its middle. (Integer y: plotters
    // formats custom key points on integer axes only.)
    let rows_y = 100 * n as i32;
    let band = |i: usize| 100 * (n - 1 - i) as i32;

    let root = SVGBackend::new(out, (960, 110 + 56 * n as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Data plane: ns per packet (median), each case beside its baseline",
            (FONT, 20),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(220)
        .build_cartesian_2d(
            0.0..xmax,
            (0..rows_y).with_key_points((0..n).map(|i| band(i) + 50).collect()),
        )?;
    let label_of = |y: &i32| {
        let row = usize::try_from(y / 100).unwrap_or(0).min(n - 1);
        rows[n - 1 - row].0.to_string()
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .light_line_style(WHITE)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&label_of)
        .y_label_style((FONT, 14))
        .x_desc("ns per packet (BPF_PROG_TEST_RUN, median of the runs)")
        .draw()?;

    let bar = |y0: i32, y1: i32, ns: f64, color: RGBColor| {
        Rectangle::new([(0.0, y0), (ns, y1)], color.filled())
    };
    let text = |s: String, ns: f64, y: i32| {
        let style = TextStyle::from((FONT, 13).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        Text::new(s, (ns + xmax * 0.01, y), style)
    };
    chart
        .draw_series(
            rows.iter()
                .enumerate()
                .map(|(i, (_, c, _))| bar(band(i) + 50, band(i) + 88, c.ns_median, CASE_COLOR)),
        )?
        .label("case: median ns (its ratio to the baseline)")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], CASE_COLOR.filled()));
    chart
        .draw_series(
            rows.iter()
                .enumerate()
                .map(|(i, (_, _, b))| bar(band(i) + 12, band(i) + 50, *b, BASE_COLOR)),
        )?
        .label("its baseline, same run")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], BASE_COLOR.filled()));
    chart.draw_series(rows.iter().enumerate().flat_map(|(i, (_, c, b))| {
        [
            text(
                format!("{:.0} ns ({:.2}x)", c.ns_median, c.ratio),
                c.ns_median,
                band(i) + 69,
            ),
            text(format!("{} {b:.0} ns", c.baseline), *b, band(i) + 31),
        ]
    }))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// The empirical CDF of the failover trials: x = ms, y = fraction of trials done by then.
pub fn failover(doc: &Control, out: &Path) -> Result<()> {
    let mut ms = doc.failover_ms.trials.clone();
    ensure!(
        !ms.is_empty() && ms.iter().all(|v| v.is_finite()),
        "failover_ms.trials is empty or has a non-number"
    );
    ms.sort_by(f64::total_cmp);
    let n = ms.len() as f64;
    let (lo, hi) = (ms[0], ms[ms.len() - 1]);
    let pad = ((hi - lo) * 0.1).max(5.0);
    let mid = ms.len() / 2;
    let median = if ms.len() % 2 == 1 {
        ms[mid]
    } else {
        (ms[mid - 1] + ms[mid]) / 2.0
    };
    // A step function: each trial lifts the fraction by 1/n at its own time.
    let mut steps = vec![(lo - pad, 0.0)];
    for (i, v) in ms.iter().enumerate() {
        steps.push((*v, i as f64 / n));
        steps.push((*v, (i + 1) as f64 / n));
    }
    steps.push((hi + pad, 1.0));

    let root = SVGBackend::new(out, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Failover: agent killed -> its routes moved in the kernel ({} trials)",
                ms.len()
            ),
            (FONT, 18),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((lo - pad)..(hi + pad), 0.0..1.05)?;
    chart
        .configure_mesh()
        .x_desc("failover time (ms)")
        .y_desc("fraction of trials")
        .light_line_style(WHITE)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style((FONT, 13))
        .draw()?;
    chart
        .draw_series(LineSeries::new(steps, CASE_COLOR.stroke_width(2)))?
        .label(format!("failover_ms (median {median:.0} ms)"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], CASE_COLOR.stroke_width(2)));
    chart.draw_series(
        ms.iter()
            .enumerate()
            .map(|(i, v)| Circle::new((*v, (i + 1) as f64 / n), 3, CASE_COLOR.filled())),
    )?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

fn read<T: DeserializeOwned>(path: &Path, made_by: &str) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {} (written by `{made_by}`)", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// `<json_dir>/dataplane.json` -> `<out_dir>/dataplane.svg`; returns the SVG's path.
pub fn dataplane_from(json_dir: &Path, out_dir: &Path) -> Result<PathBuf> {
    let json = json_dir.join("dataplane.json");
    let doc = read(&json, "cargo xtask bench dataplane")?;
    let out = out_dir.join("dataplane.svg");
    dataplane(&doc, &out).with_context(|| format!("charting {}", json.display()))?;
    Ok(out)
}

/// `<json_dir>/control.json` -> `<out_dir>/failover.svg`; returns the SVG's path.
pub fn failover_from(json_dir: &Path, out_dir: &Path) -> Result<PathBuf> {
    let json = json_dir.join("control.json");
    let doc = read(&json, "cargo xtask bench control")?;
    let out = out_dir.join("failover.svg");
    failover(&doc, &out).with_context(|| format!("charting {}", json.display()))?;
    Ok(out)
}

/// `lb-bench charts [--out DIR]`: re-renders both charts from the JSON in `target/bench/`
/// (nothing is measured) into DIR (default `target/bench/`).
pub fn run(args: &[String]) -> Result<()> {
    let json_dir = crate::bench_dir();
    let out_dir = match args {
        [] => json_dir.clone(),
        [flag, dir] if flag == "--out" => PathBuf::from(dir),
        _ => bail!("usage: lb-bench charts [--out DIR]"),
    };
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    // Render whichever chart can be, then report every failure.
    let mut failed = vec![];
    for made in [
        dataplane_from(&json_dir, &out_dir),
        failover_from(&json_dir, &out_dir),
    ] {
        match made {
            Ok(path) => println!("wrote {}", path.display()),
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("\n"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(ns: f64, baseline: &str, ratio: f64) -> Case {
        Case {
            ns_median: ns,
            baseline: baseline.into(),
            ratio,
            baseline_ns_median: None,
        }
    }

    fn assert_svg(path: &Path, want: &[&str]) {
        let svg = std::fs::read_to_string(path).unwrap();
        assert!(svg.trim_start().starts_with("<svg"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"), "{svg}");
        for w in want {
            assert!(svg.contains(w), "{w:?} missing in {svg}");
        }
    }

    #[test]
    fn dataplane_chart_has_cases_baselines_and_ratios() {
        let dir = tempfile::tempdir().unwrap();
        let doc = Dataplane {
            cases: BTreeMap::from([
                ("baseline_tx".into(), case(31.0, "baseline_tx", 1.0)),
                (
                    "v4_established_dsr".into(),
                    case(53.0, "v4_established_dsr_bad", 1.7),
                ),
            ]),
        };
        // A baseline that is not in the file is an error, not a bar against nothing.
        let err = dataplane(&doc, &dir.path().join("x.svg")).unwrap_err();
        assert!(err.to_string().contains("v4_established_dsr_bad"), "{err}");

        let doc = Dataplane {
            cases: BTreeMap::from([
                ("baseline_tx".into(), case(31.0, "baseline_tx", 1.0)),
                ("baseline_pass".into(), case(28.0, "baseline_pass", 1.0)),
                ("v4_established_dsr".into(), case(53.0, "baseline_tx", 1.71)),
                ("non_vip".into(), case(33.0, "baseline_pass", 1.18)),
                // Paired with baseline runs of its own (another repeat): those are its bar.
                (
                    "v4_syn_newflow".into(),
                    Case {
                        baseline_ns_median: Some(38.0),
                        ..case(400.0, "baseline_tx", 10.5)
                    },
                ),
            ]),
        };
        let out = dir.path().join("dataplane.svg");
        dataplane(&doc, &out).unwrap();
        assert_svg(
            &out,
            &[
                "v4_established_dsr",
                "non_vip",
                "53 ns (1.71x)",
                "baseline_tx 31 ns",
                "baseline_pass 28 ns",
                "400 ns (10.50x)",
                "baseline_tx 38 ns",
            ],
        );
    }

    #[test]
    fn failover_chart_is_written_and_bad_json_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let doc: Control =
            serde_json::from_str(r#"{"failover_ms": {"median": 2, "trials": [250.4, 210, 300]}}"#)
                .unwrap();
        let out = dir.path().join("failover.svg");
        failover(&doc, &out).unwrap();
        assert_svg(
            &out,
            &[
                "failover_ms (median 250 ms)",
                "fraction of trials",
                "3 trials",
            ],
        );

        let empty = Control {
            failover_ms: Trials { trials: vec![] },
        };
        assert!(failover(&empty, &out).is_err());

        // Missing and malformed files name the file.
        let err = failover_from(dir.path(), dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("control.json"), "{err:#}");
        std::fs::write(dir.path().join("control.json"), r#"{"failover_ms": {}}"#).unwrap();
        let err = format!("{:#}", failover_from(dir.path(), dir.path()).unwrap_err());
        assert!(err.contains("parsing") && err.contains("trials"), "{err}");
    }
}
