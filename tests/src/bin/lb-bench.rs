//! `lb-bench <which> [args]`: benchmarks that print a table and write JSON under
//! `target/bench/` (run through `cargo xtask bench <which>`, as root).
//!
//! The data-plane benchmark is the module `bench/dataplane.rs` (not directly in `src/bin/`,
//! where cargo would take every file for a binary of its own).
#[path = "bench/dataplane.rs"]
mod dataplane;

const USAGE: &str = "usage: lb-bench dataplane [--runs N] [--repeat N] [--loop N]\n       lb-bench control [--quick]";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("dataplane") => dataplane::run(&args[1..]),
        Some("control") => lb_tests::bench_control::run(&args[1..]),
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    }
}
