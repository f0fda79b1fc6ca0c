//! Persistent daemon state: VIP route tables, node weights/states and agent incarnations.
//!
//! Written atomically (temp file, fsync, rename, fsync of the directory), so a crash leaves
//! either the old or the new file; [`crate::persist::Persister`] does it off the membership
//! path, coalescing bursts of changes. A file that exists but cannot be read or parsed is an
//! error naming the path and the problem: the daemon refuses to start rather than silently
//! starting empty (`--reset-state` is the explicit way to do that).
//!
//! Format 2 keeps route owners bit-packed (see `routes::RouteTable`'s serde form: ~55 KB for
//! 65536 routes over 20 nodes, whatever the table's history),
//! "moved" flags as ranges and each VIP's data-plane index. Format 1 files (per-route owners,
//! no indices) are upgraded on load so an upgrade keeps its tables; others are refused.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File},
    io::{self, BufWriter},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
};

use lb_common::MAX_VIPS;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::routes::{NodeInfo, NodeState, RouteTable};

/// Bumped whenever the file's meaning changes; older files are upgraded when this lb knows how
/// (format 1), others are refused, not guessed at.
pub const STATE_FORMAT: u32 = 2;
pub const STATE_FILE: &str = "state.json";

#[derive(Debug, Error)]
pub enum StateError {
    #[error("state file {path}: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error(
        "state file {path}: format {found}, this lb reads formats 1 and {STATE_FORMAT} (move it aside or use --reset-state)"
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    /// Node index -> what we knew of it.
    pub nodes: BTreeMap<u32, NodeRecord>,
    /// One record per VIP.
    pub vips: Vec<VipRecord>,
    /// The data plane's flow-hash seed (`lb_common::hash`): it decides which route every flow
    /// takes, so it lives as long as the tables. Files written before it existed get a fresh
    /// one (flows are re-hashed once; the route owners are kept).
    #[serde(default = "rand::random")]
    pub hash_seed: u32,
}

/// A node's persisted status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Weight the route tables use for it.
    pub weight: u32,
    /// active | draining | down: the node's one state, as in the route tables.
    pub status: NodeState,
    /// Weight the node's agent last advertised (0 or absent = no opinion).
    #[serde(default)]
    pub advertised_weight: u32,
    /// Whether the node's agent said it was draining (absent in older files, where a draining
    /// node was always drained by its agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_draining: Option<bool>,
    /// Held drained after its agent restarted (cluster revisions carry it, so a new leader
    /// ends the hold-down as the old one would have).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restarting: bool,
    /// Last agent incarnation seen (replay protection survives restarts).
    pub incarnation: Option<u64>,
    /// Last agent sequence seen in that incarnation.
    pub sequence: Option<u64>,
}

/// One VIP: its identity, data-plane index, route table (validated when parsed: see
/// `routes::RouteTable`'s serde form) and the routes flagged "moved" (the kernel consults
/// conntrack for them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipRecord {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    /// Stable data-plane index (counters, generation word): kept across restarts and config edits.
    pub index: u32,
    /// Shared with the daemon's live table, so handing a snapshot to the writer copies nothing.
    #[serde(with = "arc_table")]
    pub table: Arc<RouteTable>,
    /// Routes flagged moved, as sorted inclusive ranges [[first,last],...].
    pub moved: Vec<(u32, u32)>,
}

/// Serde for `Arc<RouteTable>` without serde's `rc` feature (a table is never shared within
/// one file, so nothing is lost by (de)serializing the value).
mod arc_table {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::routes::RouteTable;

    pub fn serialize<S: Serializer>(t: &Arc<RouteTable>, s: S) -> Result<S::Ok, S::Error> {
        t.as_ref().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<RouteTable>, D::Error> {
        RouteTable::deserialize(d).map(Arc::new)
    }
}

impl Default for State {
    /// Empty, in the current format (a format-0 default would be refused when read back).
    fn default() -> Self {
        Self {
            format: STATE_FORMAT,
            nodes: BTreeMap::new(),
            vips: Vec::new(),
            hash_seed: rand::random(),
        }
    }
}

/// Sorted, disjoint inclusive ranges covering `ids` (any order, duplicates allowed): the
/// compact form of a VIP's "moved" routes.
pub fn ranges(ids: impl IntoIterator<Item = u32>) -> Vec<(u32, u32)> {
    let mut ids: Vec<u32> = ids.into_iter().collect();
    ids.sort_unstable();
    ids.dedup();
    let mut out: Vec<(u32, u32)> = Vec::new();
    for id in ids {
        match out.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(id) => *last = id,
            _ => out.push((id, id)),
        }
    }
    out
}

/// The IDs in `ranges`, in order (the inverse of [`ranges`]).
pub fn expand(ranges: &[(u32, u32)]) -> impl Iterator<Item = u32> {
    ranges.iter().flat_map(|&(first, last)| first..=last)
}

impl State {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads `dir/state.json`. `Ok(None)` if it does not exist (first start). A format-1 file
    /// comes back upgraded (in memory; the next save writes format 2).
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
        let corrupt = |what: String| StateError::Corrupt {
            path: path.clone(),
            what,
        };
        let state = match probe.format {
            1 => v1::upgrade(&bytes).map_err(corrupt)?,
            STATE_FORMAT => serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?,
            found => return Err(StateError::Format { path, found }),
        };
        state.check().map_err(corrupt)?;
        Ok(Some(state))
    }

    /// What serde cannot see: VIPs listed once with distinct in-range indices, and "moved"
    /// ranges well-formed, sorted, disjoint and inside their table.
    fn check(&self) -> Result<(), String> {
        let mut indices = BTreeSet::new();
        let mut vips = BTreeSet::new();
        for v in &self.vips {
            let vip = format!("VIP {}/{}", SocketAddr::new(v.addr, v.port), v.proto);
            if v.index >= MAX_VIPS {
                return Err(format!(
                    "{vip}: index {} is out of range (must be below {MAX_VIPS})",
                    v.index
                ));
            }
            if !indices.insert(v.index) {
                return Err(format!("{vip}: index {} is used twice", v.index));
            }
            if !vips.insert((v.addr, v.port, v.proto)) {
                return Err(format!("{vip} is listed twice"));
            }
            let mut prev: Option<u32> = None;
            for &(first, last) in &v.moved {
                let range = format!("moved range [{first},{last}]");
                if first > last {
                    return Err(format!("{vip}: {range} is reversed"));
                }
                if prev.is_some_and(|p| first <= p) {
                    return Err(format!(
                        "{vip}: {range} is out of order or overlaps the previous one"
                    ));
                }
                if last >= v.table.route_count() {
                    return Err(format!(
                        "{vip}: {range} is beyond the table's {} routes",
                        v.table.route_count()
                    ));
                }
                prev = Some(last);
            }
        }
        Ok(())
    }

    /// Writes `dir/state.json` atomically, serializing straight into the temp file.
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let path = dir.join(STATE_FILE);
        if self.format != STATE_FORMAT {
            return Err(StateError::Corrupt {
                path,
                what: format!(
                    "refusing to write format {} (this lb writes format {STATE_FORMAT})",
                    self.format
                ),
            });
        }
        let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
        let write = || -> io::Result<()> {
            fs::create_dir_all(dir)?;
            let mut w = BufWriter::with_capacity(1 << 16, File::create(&tmp)?);
            serde_json::to_writer(&mut w, self)?;
            let f = w.into_inner().map_err(io::IntoInnerError::into_error)?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &path)?;
            File::open(dir)?.sync_all()
        };
        write().map_err(|source| {
            // Best effort: a half-written temp file must not linger (after the rename it is
            // gone already).
            let _ = fs::remove_file(&tmp);
            StateError::Io {
                path: path.clone(),
                source,
            }
        })
    }
}

/// Format 1: `tables` with per-route `owners` and `moved` lists, no VIP indices.
mod v1 {
    use super::*;

    #[derive(Deserialize)]
    struct Old {
        nodes: BTreeMap<u32, Node>,
        tables: Vec<Table>,
    }

    #[derive(Deserialize)]
    struct Node {
        weight: u32,
        status: NodeState,
        incarnation: Option<u64>,
        sequence: Option<u64>,
    }

    #[derive(Deserialize)]
    struct Table {
        addr: IpAddr,
        port: u16,
        proto: u8,
        table: Routes,
        #[serde(default)]
        moved: Vec<u32>,
    }

    #[derive(Deserialize)]
    struct Routes {
        routes: u32,
        nodes: Vec<RouteNode>,
        reserve: Option<u32>,
        owners: Vec<Option<u32>>,
    }

    #[derive(Deserialize)]
    struct RouteNode {
        node: u32,
        weight: u32,
        state: NodeState,
    }

    /// A format-1 file as format 2: VIP indices in file order (the old daemon's config order),
    /// no advertised weights, and moved routes outside the table dropped (as the old daemon
    /// ignored them).
    pub(super) fn upgrade(bytes: &[u8]) -> Result<State, String> {
        let old: Old = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let nodes = old
            .nodes
            .into_iter()
            .map(|(id, n)| {
                let rec = NodeRecord {
                    weight: n.weight,
                    status: n.status,
                    advertised_weight: 0,
                    agent_draining: None,
                    restarting: false,
                    incarnation: n.incarnation,
                    sequence: n.sequence,
                };
                (id, rec)
            })
            .collect();
        let mut vips = Vec::with_capacity(old.tables.len());
        for (index, t) in old.tables.into_iter().enumerate() {
            let vip = format!("VIP {}/{}", SocketAddr::new(t.addr, t.port), t.proto);
            let r = t.table;
            if r.owners.len() != r.routes as usize {
                return Err(format!(
                    "{vip}: invalid route table: {} owners for {} routes",
                    r.owners.len(),
                    r.routes
                ));
            }
            let route_nodes = r.nodes.into_iter().map(|n| {
                let info = NodeInfo {
                    weight: n.weight,
                    state: n.state,
                };
                (n.node, info)
            });
            let table = RouteTable::from_parts(route_nodes, r.reserve, &r.owners)
                .map_err(|e| format!("{vip}: {e}"))?;
            let moved = ranges(t.moved.into_iter().filter(|&m| m < r.routes));
            vips.push(VipRecord {
                addr: t.addr,
                port: t.port,
                proto: t.proto,
                index: index as u32,
                table: Arc::new(table),
                moved,
            });
        }
        Ok(State {
            format: STATE_FORMAT,
            nodes,
            vips,
            hash_seed: rand::random(),
        })
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

    fn node(weight: u32, status: NodeState) -> NodeRecord {
        NodeRecord {
            weight,
            status,
            advertised_weight: 0,
            agent_draining: None,
            restarting: false,
            incarnation: None,
            sequence: None,
        }
    }

    fn sample() -> State {
        let mut s = State::new();
        s.hash_seed = 0x5eed;
        s.nodes.insert(
            1,
            NodeRecord {
                weight: 2,
                status: NodeState::Active,
                advertised_weight: 3,
                agent_draining: None,
                restarting: false,
                incarnation: Some(7),
                sequence: Some(9),
            },
        );
        s.nodes.insert(4, node(1, NodeState::Draining));
        let mut table = RouteTable::new(4096).unwrap();
        table.join(1, 2).unwrap();
        table.join(4, 1).unwrap();
        table.join(6, 5).unwrap();
        table.fail(6).unwrap();
        table.drain(4).unwrap();
        let table = Arc::new(table);
        s.vips.push(VipRecord {
            addr: "198.18.0.100".parse().unwrap(),
            port: 80,
            proto: 6,
            index: 3,
            table: table.clone(),
            moved: ranges([3, 4, 5, 9, 4000]),
        });
        s.vips.push(VipRecord {
            addr: "2001:db8::1".parse().unwrap(),
            port: 53,
            proto: 17,
            index: 0,
            table,
            moved: Vec::new(),
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
        // The documented shape.
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(d.join(STATE_FILE)).unwrap()).unwrap();
        assert_eq!(json["format"], 2);
        assert_eq!(json["hash_seed"], s.hash_seed);
        // A file from before the seed existed loads, with a seed of its own.
        let mut old = json.clone();
        old.as_object_mut().unwrap().remove("hash_seed");
        fs::write(d.join(STATE_FILE), serde_json::to_vec(&old).unwrap()).unwrap();
        let loaded = State::load(&d).unwrap().unwrap();
        assert_eq!(loaded.vips, s.vips);
        fs::write(d.join(STATE_FILE), serde_json::to_vec(&json).unwrap()).unwrap();
        assert_eq!(json["nodes"]["1"]["advertised_weight"], 3);
        assert_eq!(json["nodes"]["4"]["status"], "draining");
        assert_eq!(json["vips"][0]["index"], 3);
        assert_eq!(
            json["vips"][0]["moved"],
            serde_json::json!([[3, 5], [9, 9], [4000, 4000]])
        );
        assert!(
            json["vips"][0]["table"]["owners"]
                .as_str()
                .is_some_and(|o| o.contains(':'))
        );
        // Overwrites, and creates a missing directory.
        let mut s2 = s.clone();
        s2.vips.pop();
        s2.save(&d).unwrap();
        assert_eq!(State::load(&d).unwrap(), Some(s2));
        let sub = d.join("a/b");
        let fresh = State::new();
        fresh.save(&sub).unwrap();
        assert_eq!(State::load(&sub).unwrap(), Some(fresh));
        // `advertised_weight` may be absent.
        let mut v = json.clone();
        v["nodes"]["1"]
            .as_object_mut()
            .unwrap()
            .remove("advertised_weight");
        fs::write(d.join(STATE_FILE), v.to_string()).unwrap();
        let back = State::load(&d).unwrap().unwrap();
        assert_eq!(back.nodes[&1].advertised_weight, 0);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn save_refuses_a_foreign_format_and_leaves_no_temp_file() {
        let d = tmpdir("fmt");
        let s = State {
            format: 1,
            ..sample()
        };
        let e = s.save(&d).unwrap_err().to_string();
        assert!(e.contains("refusing to write format 1"), "{e}");
        assert!(!d.join(STATE_FILE).exists());
        assert_eq!(State::default().format, STATE_FORMAT);
        // A directory that cannot exist: the error names the file.
        let blocker = d.join("file");
        fs::write(&blocker, b"x").unwrap();
        let e = sample().save(&blocker.join("sub")).unwrap_err().to_string();
        assert!(e.contains(&blocker.join("sub").join(STATE_FILE).display().to_string()));
        // A temp file left by a crash is replaced.
        fs::write(d.join(format!(".{STATE_FILE}.tmp")), b"garbage").unwrap();
        sample().save(&d).unwrap();
        assert!(!d.join(format!(".{STATE_FILE}.tmp")).exists());
        assert_eq!(State::load(&d).unwrap(), Some(sample()));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn format_1_files_are_migrated() {
        let d = tmpdir("v1");
        // Exactly what the format-1 daemon wrote (per-route owners, moved as a list).
        let v1 = r#"{"format":1,
            "nodes":{"1":{"weight":2,"status":"active","incarnation":7,"sequence":9},
                     "4":{"weight":1,"status":"draining","incarnation":null,"sequence":null},
                     "6":{"weight":5,"status":"down","incarnation":3,"sequence":1}},
            "tables":[
              {"addr":"198.18.0.100","port":80,"proto":6,
               "table":{"routes":8,"nodes":[{"node":1,"weight":2,"state":"active"},
                                            {"node":4,"weight":1,"state":"draining"},
                                            {"node":6,"weight":5,"state":"down"}],
                        "reserve":null,"owners":[1,1,1,1,1,1,1,1]},
               "moved":[2,3,7,12]},
              {"addr":"2001:db8::1","port":53,"proto":17,
               "table":{"routes":4,"nodes":[{"node":1,"weight":2,"state":"active"},
                                            {"node":4,"weight":1,"state":"active"}],
                        "reserve":4,"owners":[4,1,null,1]}}]}"#;
        fs::write(d.join(STATE_FILE), v1).unwrap();
        let s = State::load(&d).unwrap().unwrap();
        assert_eq!(s.format, STATE_FORMAT);
        assert_eq!(
            s.nodes[&1],
            NodeRecord {
                weight: 2,
                status: NodeState::Active,
                advertised_weight: 0,
                agent_draining: None,
                restarting: false,
                incarnation: Some(7),
                sequence: Some(9),
            }
        );
        assert_eq!(s.nodes[&4], node(1, NodeState::Draining));
        assert_eq!(s.nodes[&6].status, NodeState::Down);
        assert_eq!(s.vips.len(), 2);
        let (a, b) = (&s.vips[0], &s.vips[1]);
        assert_eq!((a.index, b.index), (0, 1), "indices in file order");
        assert_eq!(
            (a.port, a.proto, b.addr),
            (80, 6, "2001:db8::1".parse().unwrap())
        );
        assert_eq!(a.moved, [(2, 3), (7, 7)], "route 12 is outside the table");
        assert!(b.moved.is_empty());
        let mut expect = RouteTable::new(8).unwrap();
        expect.join(1, 2).unwrap();
        expect.join(4, 1).unwrap();
        expect.join(6, 5).unwrap();
        expect.drain(4).unwrap();
        expect.fail(6).unwrap();
        assert_eq!(*a.table, expect);
        assert_eq!(b.table.reserve(), Some(4));
        assert_eq!(
            b.table.owners().collect::<Vec<_>>(),
            [Some(4), Some(1), None, Some(1)]
        );
        assert_eq!((b.table.count(1), b.table.unowned()), (2, 1));
        // Saved again, it is format 2 and reads back the same.
        s.save(&d).unwrap();
        let text = fs::read_to_string(d.join(STATE_FILE)).unwrap();
        assert!(text.starts_with(r#"{"format":2,"#), "{text}");
        assert_eq!(State::load(&d).unwrap(), Some(s));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn corrupt_and_foreign_files_are_refused_with_the_path() {
        let d = tmpdir("bad");
        let p = d.join(STATE_FILE);
        let table = r#"{"routes":8,"nodes":[],"reserve":null,"owners":"1:AA=="}"#;
        let v2 = |vips: &str| format!(r#"{{"format":2,"nodes":{{}},"vips":[{vips}]}}"#);
        let vip = |index: u32, port: u16, moved: &str| {
            format!(
                r#"{{"addr":"1.2.3.4","port":{port},"proto":6,"index":{index},"table":{table},"moved":{moved}}}"#
            )
        };
        let ok = v2(&vip(0, 1, "[[0,0],[2,7]]"));
        fs::write(&p, &ok).unwrap();
        assert_eq!(
            State::load(&d).unwrap().unwrap().vips[0].moved,
            [(0, 0), (2, 7)]
        );
        let cases: Vec<(String, &str)> = vec![
            ("{not json".into(), "not a state file"),
            (r#"{"format": 99}"#.into(), "format 99"),
            (r#"{"format": 0, "nodes": {}, "vips": []}"#.into(), "format 0"),
            (r#"{"format": 1, "nodes": 5}"#.into(), "invalid type"),
            (r#"{"format": 2, "nodes": 5}"#.into(), "invalid type"),
            (
                r#"{"format":1,"nodes":{},"tables":[{"addr":"1.2.3.4","port":1,"proto":6,"table":{"routes":2,"nodes":[],"reserve":null,"owners":[5,null]}}]}"#.into(),
                "route table",
            ),
            (
                r#"{"format":1,"nodes":{},"tables":[{"addr":"1.2.3.4","port":1,"proto":6,"table":{"routes":3,"nodes":[],"reserve":null,"owners":[null]}}]}"#.into(),
                "1 owners for 3 routes",
            ),
            (
                v2(&vip(0, 1, "[]").replace("1:AA==", "1:AAA=")),
                "owners: 2 bytes, 8 routes of 1 bits need 1",
            ),
            (v2(&vip(0, 1, "[[3,2]]")), "VIP 1.2.3.4:1/6: moved range [3,2] is reversed"),
            (v2(&vip(0, 1, "[[4,5],[1,2]]")), "moved range [1,2] is out of order"),
            (v2(&vip(0, 1, "[[1,5],[5,6]]")), "moved range [5,6] is out of order or overlaps"),
            (v2(&vip(0, 1, "[[1,1],[1,1]]")), "overlaps"),
            (v2(&vip(0, 1, "[[6,8]]")), "moved range [6,8] is beyond the table's 8 routes"),
            (v2(&vip(0, 1, "[3]")), "invalid type"),
            (v2(&format!("{},{}", vip(0, 1, "[]"), vip(0, 2, "[]"))), "index 0 is used twice"),
            (v2(&format!("{},{}", vip(0, 1, "[]"), vip(1, 1, "[]"))), "listed twice"),
            (v2(&vip(MAX_VIPS, 1, "[]")), "index 16384 is out of range"),
            (v2(&vip(0, 1, "[]").replace(r#","index":0"#, "")), "missing field `index`"),
        ];
        for (content, needle) in cases {
            fs::write(&p, &content).unwrap();
            let e = State::load(&d).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle:?} not in {e:?}");
            assert!(
                e.contains(&p.display().to_string()),
                "path missing in {e:?}"
            );
        }
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn ranges_and_expand() {
        assert_eq!(ranges([]), []);
        assert!(expand(&[]).next().is_none());
        assert_eq!(ranges([5]), [(5, 5)]);
        assert_eq!(ranges([9, 1, 2, 3, 3, 7, 8, 2]), [(1, 3), (7, 9)]);
        assert_eq!(ranges([0, 2, 4]), [(0, 0), (2, 2), (4, 4)]);
        assert_eq!(
            ranges([u32::MAX, 0, u32::MAX - 1]),
            [(0, 0), (u32::MAX - 1, u32::MAX)]
        );
        assert_eq!(ranges(0..65536), [(0, 65535)]);
        assert_eq!(
            expand(&[(1, 3), (7, 9)]).collect::<Vec<_>>(),
            [1, 2, 3, 7, 8, 9]
        );
        assert_eq!(
            expand(&[(u32::MAX - 1, u32::MAX)]).collect::<Vec<_>>(),
            [u32::MAX - 1, u32::MAX]
        );
        // Inverse of each other on sorted sets.
        let mut x = 0x9e37_79b9u32;
        for _ in 0..50 {
            let ids: BTreeSet<u32> = (0..200)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x % 300
                })
                .collect();
            let r = ranges(ids.iter().copied());
            assert!(r.windows(2).all(|p| p[0].1 + 1 < p[1].0), "{r:?}");
            assert!(expand(&r).eq(ids.iter().copied()));
        }
    }
}
