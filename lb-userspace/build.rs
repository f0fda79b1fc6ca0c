//! Builds the XDP programs (crate `lb-ebpf`, nightly + bpf-linker) and leaves their ELF files in
//! OUT_DIR, where `src/objects.rs` embeds them. `AYA_BUILD_SKIP=1` skips the eBPF build for
//! host-only work; the embedded objects are then empty and loading them fails with a clear error.
use std::{env, fs, path::PathBuf};

use anyhow::Context as _;

const BINS: [&str; 3] = ["lb-balancer", "lb-decap", "lb-baseline"];

fn main() -> anyhow::Result<()> {
    let manifest = env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let root = PathBuf::from(&manifest).join("../lb-ebpf");
    let root = root.to_str().context("lb-ebpf path is not UTF-8")?;
    // The programs also compile lb-common (map types, the flow hash).
    println!("cargo:rerun-if-changed={manifest}/../lb-common");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF programs failed; did `cargo xtask setup` run?")?;
    let out = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR not set")?);
    for bin in BINS {
        let path = out.join(bin);
        if !path.exists() {
            // Only reached with AYA_BUILD_SKIP: an empty object that refuses to load.
            fs::write(&path, []).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}
