//! The eBPF ELF objects built by `build.rs`, embedded in the binary.
use anyhow::{Result, bail};

/// The balancer (`lb_balancer`).
pub static BALANCER: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-balancer"));
/// The node-side decapsulator (`lb_decap`).
pub static DECAP: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap"));
/// Benchmark baselines (`baseline_pass`, `baseline_tx`).
pub static BASELINE: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-baseline"));

/// An embedded object, or a clear error when the build skipped eBPF.
pub fn get(obj: &'static [u8], name: &str) -> Result<&'static [u8]> {
    if obj.is_empty() {
        bail!(
            "the {name} eBPF object is empty: this binary was built with AYA_BUILD_SKIP=1; rebuild without it (cargo xtask build)"
        );
    }
    Ok(obj)
}
