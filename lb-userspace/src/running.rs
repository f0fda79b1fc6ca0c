//! `running.json`: the configuration the daemon runs, as changed at runtime (`lb node add`,
//! `lb vip remove`, `lb node drain`, `lb apply`, ...), saved next to the state file before each
//! change is acknowledged, so runtime changes survive a restart.
//!
//! Which configuration a starting daemon runs: the saved one if the `--config` file is still
//! the one it was derived from (same SHA-256), else the file (the operator edited it since:
//! the newer intent wins, and the log says the runtime changes were dropped). SIGHUP re-applies
//! the file, which becomes the new origin.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::config::Config;

/// File name in the state directory.
pub const FILE: &str = "running.json";

/// What `running.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Running {
    /// SHA-256 (hex) of the `--config` file this configuration derives from; `None` when the
    /// daemon was started without one.
    pub source_sha256: Option<String>,
    /// The XDP mode the program was attached in (`native` or `generic`), kept for restarts
    /// that re-adopt the pinned link.
    #[serde(default)]
    pub xdp_mode: Option<String>,
    /// Receive offloads (`ethtool -k` names) the daemon turned off on its interface for
    /// generic XDP mode, to turn on again when the program is detached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offloads_off: Vec<String>,
    pub config: Config,
}

/// SHA-256 of a file's bytes, hex.
pub fn digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Reads `running.json` (`None` when there is none). A file that does not parse or validate
/// is an error naming it: the operator decides (move it aside or `--reset-state`).
pub fn load(dir: &Path) -> Result<Option<Running>> {
    let p = path(dir);
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    };
    let r: Running = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{} is corrupt (move it aside or use --reset-state)",
            p.display()
        )
    })?;
    r.config.validate().with_context(|| {
        format!(
            "{} holds an invalid configuration (move it aside or use --reset-state)",
            p.display()
        )
    })?;
    Ok(Some(r))
}

/// Writes `running.json` atomically (temp file, fsync, rename, fsync of the directory).
pub fn save(dir: &Path, r: &Running) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let p = path(dir);
    let tmp = dir.join(format!("{FILE}.tmp"));
    let bytes = serde_json::to_vec_pretty(r).context("encoding the running configuration")?;
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &p)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().with_context(|| format!("writing {}", p.display()))
}

/// The configuration to start with: `file` (with its digest) or the saved one derived from
/// it. Returns the choice and a line for the log when the saved one was set aside.
pub fn choose(
    file: Option<(Config, String)>,
    saved: Option<Running>,
) -> (Config, Option<String>, Option<String>) {
    match (file, saved) {
        (Some((_, d)), Some(s)) if s.source_sha256.as_deref() == Some(d.as_str()) => {
            (s.config, Some(d), None)
        }
        (Some((cfg, d)), Some(_)) => (
            cfg,
            Some(d),
            Some(
                "the config file changed since the last runtime change: running the file \
                 (runtime changes made with `lb` before are dropped)"
                    .into(),
            ),
        ),
        (Some((cfg, d)), None) => (cfg, Some(d), None),
        (None, Some(s)) if s.source_sha256.is_none() => (s.config, None, None),
        (None, Some(_)) => (
            Config::default(),
            None,
            Some("started without --config: the saved configuration came from a file; starting empty".into()),
        ),
        (None, None) => (Config::default(), None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(nodes: u32) -> Config {
        let mut text = String::new();
        for i in 1..=nodes {
            text.push_str(&format!(
                "[[node]]\nid = {i}\nmac = \"02:00:00:00:00:0{i}\"\n"
            ));
        }
        toml::from_str(&text).expect("config")
    }

    #[test]
    fn the_saved_configuration_wins_only_over_its_own_file() {
        let saved = Running {
            source_sha256: Some("aa".into()),
            xdp_mode: None,
            offloads_off: vec![],
            config: cfg(3),
        };
        let (c, _, note) = choose(Some((cfg(1), "aa".into())), Some(saved.clone()));
        assert_eq!(c.nodes.len(), 3);
        assert!(note.is_none());
        let (c, _, note) = choose(Some((cfg(1), "bb".into())), Some(saved));
        assert_eq!(c.nodes.len(), 1);
        assert!(note.is_some());
    }

    #[test]
    fn round_trips_through_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Running {
            source_sha256: None,
            xdp_mode: Some("generic".into()),
            offloads_off: vec!["generic-receive-offload".into()],
            config: cfg(2),
        };
        save(dir.path(), &r).expect("save");
        let back = load(dir.path()).expect("load").expect("some");
        assert_eq!(back.config.nodes.len(), 2);
        assert_eq!(back.xdp_mode.as_deref(), Some("generic"));
        std::fs::write(dir.path().join(FILE), b"{").expect("write");
        let e = load(dir.path()).expect_err("corrupt");
        assert!(format!("{e:#}").contains("corrupt"), "{e:#}");
    }
}
