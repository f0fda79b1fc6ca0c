//! Persistent daemon state: VIP route tables, node weights/states and agent incarnations.
//!
//! Written after every change, atomically (temp file, fsync, rename, fsync of the directory), so
//! a crash leaves either the old or the new file. A file that exists but cannot be read or
//! parsed is an error naming the path and the problem: the daemon refuses to start rather than
//! silently starting empty (`--reset-state` is the explicit way to do that).
use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::routes::RouteTable;

/// Bumped whenever the file's meaning changes; older/newer files are refused, not guessed at.
pub const STATE_FORMAT: u32 = 1;
pub const STATE_FILE: &str = "state.json";

#[derive(Debug, Error)]
pub enum StateError {
    #[error("state file {path}: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error(
        "state file {path}: format {found}, this lb reads format {STATE_FORMAT} (move it aside or use --reset-state)"
    )]
    Format { path: PathBuf, found: u32 },
    #[error("state file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Everything the daemon persists.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    /// Node index -> what we knew of it.
    pub nodes: BTreeMap<u32, NodeRecord>,
    /// One route table per VIP.
    pub tables: Vec<TableRecord>,
}

/// A node's persisted status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub weight: u32,
    /// `active`, `draining` or `down`.
    pub status: NodeStatus,
    /// Last agent incarnation seen (replay protection survives restarts).
    pub incarnation: Option<u64>,
    /// Last agent sequence seen in that incarnation.
    pub sequence: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    Active,
    Draining,
    Down,
}

/// A VIP's route table (validated when parsed: see `routes::RouteTable`'s serde form) and the
/// routes flagged "moved" (the kernel consults conntrack for them), sorted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRecord {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub table: RouteTable,
    #[serde(default)]
    pub moved: Vec<u32>,
}

impl State {
    pub fn new() -> Self {
        Self {
            format: STATE_FORMAT,
            ..Default::default()
        }
    }

    /// Reads `dir/state.json`. `Ok(None)` if it does not exist (first start).
    pub fn load(dir: &Path) -> Result<Option<Self>, StateError> {
        let path = dir.join(STATE_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        // Look at the format first, so a future format is reported as such, not as garbage.
        #[derive(Deserialize)]
        struct Probe {
            format: u32,
        }
        let probe: Probe = serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            what: format!("not a state file ({e})"),
        })?;
        if probe.format != STATE_FORMAT {
            return Err(StateError::Format {
                path,
                found: probe.format,
            });
        }
        let state: State = serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            what: e.to_string(),
        })?;
        Ok(Some(state))
    }

    /// Writes `dir/state.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let data = serde_json::to_vec(self).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            what: format!("serializing: {e}"),
        })?;
        {
            let mut f = File::create(&tmp).map_err(io)?;
            f.write_all(&data).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        fs::rename(&tmp, &path).map_err(io)?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lb-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn sample() -> State {
        let mut s = State::new();
        s.nodes.insert(
            1,
            NodeRecord {
                weight: 2,
                status: NodeStatus::Active,
                incarnation: Some(7),
                sequence: Some(9),
            },
        );
        let mut table = RouteTable::new(4).unwrap();
        table.join(1, 2).unwrap();
        s.tables.push(TableRecord {
            addr: "198.18.0.100".parse().unwrap(),
            port: 80,
            proto: 6,
            table,
            moved: vec![3],
        });
        s
    }

    #[test]
    fn round_trip() {
        let d = tmpdir("rt");
        assert_eq!(State::load(&d).unwrap(), None);
        let s = sample();
        s.save(&d).unwrap();
        assert_eq!(State::load(&d).unwrap(), Some(s.clone()));
        assert!(!d.join(format!(".{STATE_FILE}.tmp")).exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn corrupt_and_foreign_files_are_refused_with_the_path() {
        let d = tmpdir("bad");
        let p = d.join(STATE_FILE);
        for (content, needle) in [
            (&b"{not json"[..], "not a state file"),
            (&b"{\"format\": 99}"[..], "format 99"),
            (&b"{\"format\": 1, \"nodes\": 5}"[..], "invalid type"),
            (
                &b"{\"format\":1,\"nodes\":{},\"tables\":[{\"addr\":\"1.2.3.4\",\"port\":1,\"proto\":6,\"table\":{\"routes\":2,\"nodes\":[],\"reserve\":null,\"owners\":[5,null]}}]}"[..],
                "route table",
            ),
        ] {
            fs::write(&p, content).unwrap();
            let e = State::load(&d).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle:?} not in {e:?}");
            assert!(e.contains(&p.display().to_string()), "path missing in {e:?}");
        }
        fs::remove_dir_all(&d).unwrap();
    }
}
