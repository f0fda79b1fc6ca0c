//! `lb-bench <which> [args]`: benchmarks that print a table and write JSON under
//! `target/bench/` (run through `cargo xtask bench <which>`, as root); `dataplane` and `control`
//! also write their SVG chart there, which `lb-bench charts` re-renders from the JSON alone.
//!
//! The data-plane and lab benchmarks are the modules `bench/dataplane.rs` and `bench/lab.rs`
//! (not directly in `src/bin/`, where cargo would take every file for a binary of its own).
#[path = "bench/dataplane.rs"]
mod dataplane;
#[path = "bench/lab.rs"]
mod lab;

const USAGE: &str = "usage: lb-bench dataplane [--runs N] [--repeat N] [--loop N]\n       lb-bench control [--quick]\n       lb-bench lab [--rounds N] [--repeat N] [--batch N] [--conns N] [--secs S] [--rps-rounds N] [--only mpps|rps]\n       lb-bench charts [--out DIR]";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("dataplane") => dataplane::run(&args[1..]),
        Some("control") => lb_tests::bench_control::run(&args[1..]),
        Some("lab") => lab::run(&args[1..]),
        Some("charts") => lb_tests::charts::run(&args[1..]),
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    }
}
