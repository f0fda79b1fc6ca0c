//! Shared helpers of the root-only suites: packet builder, network-namespace guards.
pub mod bench_control;
pub mod charts;
pub mod cli;
pub mod cluster;
pub mod cluster_lab;
pub mod cluster_labctl;
pub mod daemon;
pub mod echo;
pub mod etcd;
pub mod fixture;
pub mod lab;
pub mod labctl;
pub mod load;
pub mod netns;
pub mod packet;
pub mod scale;

/// `target/bench/` of this workspace, where the benchmarks write their JSON and charts.
pub fn bench_dir() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    dir.canonicalize().unwrap_or(dir)
}

/// Writes a benchmark's JSON document to `target/bench/<file>` and returns the path.
pub fn write_bench_json(
    file: &str,
    doc: &impl serde::Serialize,
) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context as _;
    let dir = bench_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize().unwrap_or(dir);
    let path = dir.join(file);
    std::fs::write(&path, serde_json::to_string_pretty(doc)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
