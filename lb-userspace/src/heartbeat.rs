//! The heartbeat wire protocol (agent <-> balancer), byte by byte in `docs/heartbeat.md`.
//!
//! Two message kinds share one frame: `magic "LBHB" | version | kind | body length | body |
//! HMAC-SHA256(key, everything before it)`. HEARTBEAT goes agent -> balancer and drives
//! liveness; ROUTE_MOVED goes balancer -> agent when route ids move off the node. The decoder
//! authenticates before it parses the body, never panics, and allocates at most one datagram's
//! worth of route ranges. Replay protection is not here: it needs per-node state, which lives in
//! `membership` (heartbeats) and the agent (notices).
//!
//! The balancer's socket ([`Receiver`]) stamps every heartbeat with the moment the *kernel*
//! received it (`SO_TIMESTAMPNS`), not the moment the daemon got round to reading it: a daemon
//! that falls behind under load must not judge a node dead whose heartbeats sat in the socket
//! queue. For the same reason the receive buffer is large (4 MiB) and the kernel's count of
//! datagrams dropped for a full queue (`SO_RXQ_OVFL`) is kept in [`RecvCounters::queue_drops`].
use hmac::{Hmac, Mac};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::socket::{self as nixsock, ControlMessageOwned, MsgFlags, SockaddrStorage, sockopt};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// First four bytes of every message.
pub const MAGIC: [u8; 4] = *b"LBHB";
/// The protocol version this code speaks.
pub const VERSION: u8 = 1;
/// Message kind: agent -> balancer heartbeat.
pub const KIND_HEARTBEAT: u8 = 1;
/// Message kind: balancer -> agent "route moved" notice.
pub const KIND_ROUTE_MOVED: u8 = 2;
/// magic(4) + version(1) + kind(1) + body length(2).
pub const HEADER_LEN: usize = 8;
/// HMAC-SHA256 tag length.
pub const MAC_LEN: usize = 32;
/// Largest datagram we send or accept: fits the IPv6 minimum MTU (1280 - 40 - 8), so no
/// message is ever fragmented.
pub const MAX_DATAGRAM: usize = 1232;
/// Body length of a HEARTBEAT.
pub const HEARTBEAT_BODY_LEN: usize = 36;
/// Total length of a HEARTBEAT datagram.
pub const HEARTBEAT_LEN: usize = HEADER_LEN + HEARTBEAT_BODY_LEN + MAC_LEN;
/// Fixed part of a ROUTE_MOVED body, before the VIP address and the ranges.
pub const NOTICE_FIXED_LEN: usize = 32;
/// Bytes per route range (first u32, last u32).
pub const RANGE_LEN: usize = 8;
/// Most ranges one ROUTE_MOVED datagram carries (IPv6 VIP, the larger address).
pub const MAX_RANGES_PER_NOTICE: usize =
    (MAX_DATAGRAM - HEADER_LEN - MAC_LEN - NOTICE_FIXED_LEN - 16) / RANGE_LEN;
/// Default UDP port the balancer listens on for heartbeats.
pub const DEFAULT_PORT: u16 = 7711;
/// Wire value of an unknown CPU load.
pub const CPU_UNKNOWN: u16 = 0xffff;
/// Wire value of an unknown connection count.
pub const CONNS_UNKNOWN: u32 = 0xffff_ffff;
/// Shortest key accepted.
pub const MIN_KEY_LEN: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// The shared HMAC key. `Debug` never shows the key bytes.
#[derive(Clone)]
pub struct Key {
    mac: HmacSha256,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// Why a key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("key is {len} bytes ({form}); at least {MIN_KEY_LEN} are required")]
    TooShort { len: usize, form: &'static str },
}

impl Key {
    /// A key from raw bytes (at least [`MIN_KEY_LEN`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Key, KeyError> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort {
                len: bytes.len(),
                form: "raw",
            });
        }
        // HMAC accepts keys of any length; the error branch cannot happen.
        let mac = HmacSha256::new_from_slice(bytes).map_err(|_| KeyError::TooShort {
            len: bytes.len(),
            form: "raw",
        })?;
        Ok(Key { mac })
    }

    /// A key from a key file's contents: if the contents, without surrounding whitespace, are
    /// an even number of hex digits, the decoded bytes; otherwise the bytes exactly as stored.
    pub fn parse(contents: &[u8]) -> Result<Key, KeyError> {
        let trimmed = contents.trim_ascii();
        if !trimmed.is_empty()
            && trimmed.len().is_multiple_of(2)
            && trimmed.iter().all(u8::is_ascii_hexdigit)
        {
            let bytes: Vec<u8> = trimmed
                .chunks_exact(2)
                .map(|p| (hex_val(p[0]) << 4) | hex_val(p[1]))
                .collect();
            if bytes.len() < MIN_KEY_LEN {
                return Err(KeyError::TooShort {
                    len: bytes.len(),
                    form: "hex-decoded",
                });
            }
            return Key::from_bytes(&bytes);
        }
        Key::from_bytes(contents)
    }

    /// Reads and parses a key file (see [`Key::parse`]).
    pub fn from_file(path: &Path) -> Result<Key, KeyError> {
        let contents = std::fs::read(path).map_err(|source| KeyError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Key::parse(&contents)
    }

    fn tag(&self, data: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = self.mac.clone();
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        let mut mac = self.mac.clone();
        mac.update(data);
        mac.verify_slice(tag).is_ok() // constant time
    }
}

fn hex_val(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => 0,
    }
}

/// What an agent says about its node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeState {
    /// Take new flows.
    Up = 0,
    /// Finish existing flows, take no new ones.
    Draining = 1,
}

/// HEARTBEAT: agent -> balancer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// The node index configured on the balancer.
    pub node: u32,
    /// Changes on every agent start (larger is newer).
    pub incarnation: u64,
    /// Increases by one per heartbeat within an incarnation (first is 1).
    pub sequence: u64,
    pub state: NodeState,
    /// Advertised weight; 0 = no opinion, keep the weight configured on the balancer.
    pub weight: u32,
    /// The interval the agent sends at, in milliseconds (>= 1).
    pub interval_ms: u32,
    /// CPU busy, per mille (0..=1000), if known.
    pub cpu_permille: Option<u16>,
    /// Active TCP connections, if known.
    pub active_conns: Option<u32>,
}

/// Why routes moved off a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MoveReason {
    /// Another node joined and took its share.
    Join = 1,
    /// This node is draining.
    Drain = 2,
    /// This node was declared down.
    Failure = 3,
    /// Weights changed.
    Weight = 4,
    /// This node was removed by the operator.
    Removed = 5,
}

impl MoveReason {
    /// Lower-case name, as in `LB_REASON`.
    pub fn as_str(self) -> &'static str {
        match self {
            MoveReason::Join => "join",
            MoveReason::Drain => "drain",
            MoveReason::Failure => "failure",
            MoveReason::Weight => "weight",
            MoveReason::Removed => "removed",
        }
    }

    fn from_u8(v: u8) -> Option<MoveReason> {
        Some(match v {
            1 => MoveReason::Join,
            2 => MoveReason::Drain,
            3 => MoveReason::Failure,
            4 => MoveReason::Weight,
            5 => MoveReason::Removed,
            _ => return None,
        })
    }
}

impl fmt::Display for MoveReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A VIP as the notice names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Vip {
    pub addr: IpAddr,
    /// 0 = all ports.
    pub port: u16,
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
}

impl fmt::Display for Vip {
    /// `10.0.0.1:80/tcp`, `[2001:db8::1]:443/udp`, `10.0.0.1:0/47`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sa = SocketAddr::new(self.addr, self.port);
        match self.proto {
            6 => write!(f, "{sa}/tcp"),
            17 => write!(f, "{sa}/udp"),
            p => write!(f, "{sa}/{p}"),
        }
    }
}

/// An inclusive range of route ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteRange {
    pub first: u32,
    pub last: u32,
}

impl RouteRange {
    /// Number of route ids in the range.
    pub fn len(&self) -> u64 {
        u64::from(self.last.saturating_sub(self.first)) + 1
    }

    /// Never true: a range holds at least one id.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Compact ranges from route ids (any order, duplicates allowed).
pub fn ranges_from_ids(ids: &[u32]) -> Vec<RouteRange> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut out: Vec<RouteRange> = Vec::new();
    for id in ids {
        match out.last_mut() {
            Some(r) if r.last.checked_add(1) == Some(id) => r.last = id,
            _ => out.push(RouteRange {
                first: id,
                last: id,
            }),
        }
    }
    out
}

/// `0-9,17,20-25` (what `LB_ROUTES` holds).
pub fn format_ranges(ranges: &[RouteRange]) -> String {
    let mut s = String::new();
    for (i, r) in ranges.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        if r.first == r.last {
            s.push_str(&r.first.to_string());
        } else {
            s.push_str(&format!("{}-{}", r.first, r.last));
        }
    }
    s
}

/// ROUTE_MOVED: balancer -> agent. One datagram; a large move is split into `parts` notices,
/// each complete in itself (a subset of the ranges) and each with its own sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// The node the routes moved off.
    pub node: u32,
    /// The sending balancer's incarnation (changes on every balancer start, larger is newer).
    pub incarnation: u64,
    /// Increases by one per notice sent by this balancer incarnation.
    pub sequence: u64,
    pub reason: MoveReason,
    pub vip: Vip,
    /// 0-based index of this datagram within its batch.
    pub part: u16,
    /// Datagrams in the batch (>= 1).
    pub parts: u16,
    /// Sorted, non-overlapping, at most [`MAX_RANGES_PER_NOTICE`].
    pub ranges: Vec<RouteRange>,
}

impl Notice {
    /// Number of route ids this notice names.
    pub fn route_count(&self) -> u64 {
        self.ranges.iter().map(RouteRange::len).sum()
    }
}

/// A decoded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Heartbeat(Heartbeat),
    RouteMoved(Notice),
}

/// Why a datagram was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated message")]
    Truncated,
    #[error("oversized message")]
    Oversized,
    #[error("bad magic")]
    BadMagic,
    #[error("unknown protocol version")]
    UnknownVersion,
    #[error("unknown message kind")]
    UnknownKind,
    #[error("bad HMAC (wrong key or altered message)")]
    BadHmac,
    #[error("malformed field: {0}")]
    Malformed(&'static str),
}

/// Why a message could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

fn frame(kind: u8, body: &[u8], key: &Key) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + MAC_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind);
    // Callers keep bodies far below MAX_DATAGRAM.
    out.extend_from_slice(&(body.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
    out.extend_from_slice(body);
    let tag = key.tag(&out);
    out.extend_from_slice(&tag);
    out
}

impl Heartbeat {
    /// The datagram ([`HEARTBEAT_LEN`] bytes).
    pub fn encode(&self, key: &Key) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEARTBEAT_BODY_LEN);
        b.extend_from_slice(&self.node.to_be_bytes());
        b.extend_from_slice(&self.incarnation.to_be_bytes());
        b.extend_from_slice(&self.sequence.to_be_bytes());
        b.push(self.state as u8);
        b.push(0); // flags, reserved
        let cpu = self.cpu_permille.map_or(CPU_UNKNOWN, |c| c.min(1000));
        b.extend_from_slice(&cpu.to_be_bytes());
        b.extend_from_slice(&self.weight.to_be_bytes());
        b.extend_from_slice(&self.interval_ms.max(1).to_be_bytes());
        let conns = self
            .active_conns
            .map_or(CONNS_UNKNOWN, |c| c.min(CONNS_UNKNOWN - 1));
        b.extend_from_slice(&conns.to_be_bytes());
        frame(KIND_HEARTBEAT, &b, key)
    }
}

impl Notice {
    /// The datagram, or an error if the notice breaks the format's rules.
    pub fn encode(&self, key: &Key) -> Result<Vec<u8>, EncodeError> {
        if self.ranges.len() > MAX_RANGES_PER_NOTICE {
            return Err(EncodeError::Invalid("too many ranges for one datagram"));
        }
        if self.parts == 0 || self.part >= self.parts {
            return Err(EncodeError::Invalid("part"));
        }
        check_ranges(&self.ranges).map_err(EncodeError::Invalid)?;
        let mut b = Vec::with_capacity(NOTICE_FIXED_LEN + 16 + RANGE_LEN * self.ranges.len());
        b.extend_from_slice(&self.node.to_be_bytes());
        b.extend_from_slice(&self.incarnation.to_be_bytes());
        b.extend_from_slice(&self.sequence.to_be_bytes());
        b.push(self.reason as u8);
        b.push(self.vip.proto);
        b.push(if self.vip.addr.is_ipv4() { 4 } else { 6 });
        b.push(0); // reserved
        b.extend_from_slice(&self.vip.port.to_be_bytes());
        b.extend_from_slice(&self.part.to_be_bytes());
        b.extend_from_slice(&self.parts.to_be_bytes());
        b.extend_from_slice(&(self.ranges.len() as u16).to_be_bytes());
        match self.vip.addr {
            IpAddr::V4(a) => b.extend_from_slice(&a.octets()),
            IpAddr::V6(a) => b.extend_from_slice(&a.octets()),
        }
        for r in &self.ranges {
            b.extend_from_slice(&r.first.to_be_bytes());
            b.extend_from_slice(&r.last.to_be_bytes());
        }
        Ok(frame(KIND_ROUTE_MOVED, &b, key))
    }
}

fn check_ranges(ranges: &[RouteRange]) -> Result<(), &'static str> {
    let mut prev: Option<u32> = None;
    for r in ranges {
        if r.first > r.last {
            return Err("range first > last");
        }
        if prev.is_some_and(|p| r.first <= p) {
            return Err("ranges not sorted or overlapping");
        }
        prev = Some(r.last);
    }
    Ok(())
}

/// Splits moved routes into notices of at most [`MAX_RANGES_PER_NOTICE`] ranges, numbering
/// them from `*next_seq` (which advances). An empty move gives no notice.
pub fn split_notices(
    node: u32,
    vip: Vip,
    reason: MoveReason,
    ranges: &[RouteRange],
    incarnation: u64,
    next_seq: &mut u64,
) -> Vec<Notice> {
    let chunks: Vec<&[RouteRange]> = ranges.chunks(MAX_RANGES_PER_NOTICE).collect();
    let parts = chunks.len().min(usize::from(u16::MAX)) as u16;
    chunks
        .into_iter()
        .take(usize::from(parts))
        .enumerate()
        .map(|(i, c)| {
            let sequence = *next_seq;
            *next_seq = next_seq.wrapping_add(1);
            Notice {
                node,
                incarnation,
                sequence,
                reason,
                vip,
                part: i as u16,
                parts,
                ranges: c.to_vec(),
            }
        })
        .collect()
}

/// A bounds-checked big-endian reader over an authenticated body.
struct Rd<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .ok_or(DecodeError::Malformed(field))?;
        let s = self
            .b
            .get(self.at..end)
            .ok_or(DecodeError::Malformed(field))?;
        self.at = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let s = self.take(N, field)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self, f: &'static str) -> Result<u8, DecodeError> {
        Ok(self.arr::<1>(f)?[0])
    }
    fn u16(&mut self, f: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.arr(f)?))
    }
    fn u32(&mut self, f: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.arr(f)?))
    }
    fn u64(&mut self, f: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.arr(f)?))
    }
}

/// Checks and authenticates a datagram, then parses it. Order: size, magic, version, kind,
/// length (a heartbeat's body is exactly [`HEARTBEAT_BODY_LEN`]), HMAC, body fields. Only
/// authenticated bytes are ever parsed.
pub fn decode(bytes: &[u8], key: &Key) -> Result<Message, DecodeError> {
    if bytes.len() > MAX_DATAGRAM {
        return Err(DecodeError::Oversized);
    }
    if bytes.len() < MAGIC.len() {
        return Err(DecodeError::Truncated);
    }
    if bytes[..4] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Truncated);
    }
    if bytes[4] != VERSION {
        return Err(DecodeError::UnknownVersion);
    }
    let kind = bytes[5];
    if kind != KIND_HEARTBEAT && kind != KIND_ROUTE_MOVED {
        return Err(DecodeError::UnknownKind);
    }
    let body_len = usize::from(u16::from_be_bytes([bytes[6], bytes[7]]));
    let signed_len = HEADER_LEN + body_len;
    let total = signed_len + MAC_LEN;
    if bytes.len() < total {
        return Err(DecodeError::Truncated);
    }
    if bytes.len() > total {
        return Err(DecodeError::Malformed("trailing bytes after HMAC"));
    }
    // A heartbeat has one length: anything else is refused before the HMAC costs anything.
    if kind == KIND_HEARTBEAT && body_len != HEARTBEAT_BODY_LEN {
        return Err(DecodeError::Malformed("heartbeat length"));
    }
    if !key.verify(&bytes[..signed_len], &bytes[signed_len..]) {
        return Err(DecodeError::BadHmac);
    }
    let body = &bytes[HEADER_LEN..signed_len];
    match kind {
        KIND_HEARTBEAT => decode_heartbeat(body).map(Message::Heartbeat),
        _ => decode_notice(body).map(Message::RouteMoved),
    }
}

fn decode_heartbeat(body: &[u8]) -> Result<Heartbeat, DecodeError> {
    if body.len() != HEARTBEAT_BODY_LEN {
        return Err(DecodeError::Malformed("heartbeat length"));
    }
    let mut r = Rd { b: body, at: 0 };
    let node = r.u32("node")?;
    let incarnation = r.u64("incarnation")?;
    let sequence = r.u64("sequence")?;
    let state = match r.u8("state")? {
        0 => NodeState::Up,
        1 => NodeState::Draining,
        _ => return Err(DecodeError::Malformed("state")),
    };
    if r.u8("flags")? != 0 {
        return Err(DecodeError::Malformed("flags"));
    }
    let cpu = r.u16("cpu_permille")?;
    let cpu_permille = match cpu {
        CPU_UNKNOWN => None,
        0..=1000 => Some(cpu),
        _ => return Err(DecodeError::Malformed("cpu_permille")),
    };
    let weight = r.u32("weight")?;
    let interval_ms = r.u32("interval_ms")?;
    if interval_ms == 0 {
        return Err(DecodeError::Malformed("interval_ms"));
    }
    let conns = r.u32("active_conns")?;
    let active_conns = (conns != CONNS_UNKNOWN).then_some(conns);
    Ok(Heartbeat {
        node,
        incarnation,
        sequence,
        state,
        weight,
        interval_ms,
        cpu_permille,
        active_conns,
    })
}

fn decode_notice(body: &[u8]) -> Result<Notice, DecodeError> {
    let mut r = Rd { b: body, at: 0 };
    let node = r.u32("node")?;
    let incarnation = r.u64("incarnation")?;
    let sequence = r.u64("sequence")?;
    let reason = MoveReason::from_u8(r.u8("reason")?).ok_or(DecodeError::Malformed("reason"))?;
    let proto = r.u8("proto")?;
    let family = r.u8("family")?;
    if r.u8("reserved")? != 0 {
        return Err(DecodeError::Malformed("reserved"));
    }
    let port = r.u16("port")?;
    let part = r.u16("part")?;
    let parts = r.u16("parts")?;
    if parts == 0 || part >= parts {
        return Err(DecodeError::Malformed("part"));
    }
    let count = usize::from(r.u16("range_count")?);
    let addr = match family {
        4 => IpAddr::from(r.arr::<4>("vip address")?),
        6 => IpAddr::from(r.arr::<16>("vip address")?),
        _ => return Err(DecodeError::Malformed("family")),
    };
    // The count must match the bytes exactly; this also bounds the allocation by the datagram.
    if body.len() - r.at != count * RANGE_LEN {
        return Err(DecodeError::Malformed("range_count"));
    }
    let mut ranges = Vec::with_capacity(count);
    for _ in 0..count {
        let first = r.u32("range")?;
        let last = r.u32("range")?;
        ranges.push(RouteRange { first, last });
    }
    check_ranges(&ranges).map_err(|_| DecodeError::Malformed("ranges"))?;
    Ok(Notice {
        node,
        incarnation,
        sequence,
        reason,
        vip: Vip { addr, port, proto },
        part,
        parts,
        ranges,
    })
}

/// A fresh incarnation number: wall-clock milliseconds in the high bits (so a later start is
/// larger), 20 random bits below (so two starts in the same millisecond differ).
pub fn new_incarnation() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (ms << 20) | (h.finish() & 0xf_ffff)
}

/// Waits until `sock` is readable or `timeout` passes (`poll`, so the wake-up is accurate to
/// about a millisecond rather than a jiffy). EINTR counts as "not readable yet".
pub(crate) fn wait_readable(sock: &impl AsFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: sock.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // Round up, so we never wake before the deadline.
    let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd, count 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(rc > 0)
}

/// What the receiver did with the datagrams it read: heartbeats accepted, datagrams rejected by
/// reason, and the kernel's count of datagrams it dropped before we could read them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecvCounters {
    /// Valid heartbeats returned.
    pub accepted: u64,
    pub truncated: u64,
    pub oversized: u64,
    pub bad_magic: u64,
    pub unknown_version: u64,
    pub unknown_kind: u64,
    pub bad_hmac: u64,
    pub malformed: u64,
    /// Authentic messages of a kind the balancer does not accept (ROUTE_MOVED).
    pub wrong_direction: u64,
    /// Datagrams the kernel dropped because the socket's receive queue was full (its socket
    /// drop counter, `SO_RXQ_OVFL`): the latest cumulative value it reported. The kernel attaches
    /// it to the next datagram queued after a drop, so it shows once such a datagram is read; it
    /// counts since the socket was bound and wraps at 2^32. These datagrams were never read, so
    /// they are not part of [`RecvCounters::rejected`].
    pub queue_drops: u64,
}

impl RecvCounters {
    /// Counts one decode failure.
    pub fn record(&mut self, e: &DecodeError) {
        let c = match e {
            DecodeError::Truncated => &mut self.truncated,
            DecodeError::Oversized => &mut self.oversized,
            DecodeError::BadMagic => &mut self.bad_magic,
            DecodeError::UnknownVersion => &mut self.unknown_version,
            DecodeError::UnknownKind => &mut self.unknown_kind,
            DecodeError::BadHmac => &mut self.bad_hmac,
            DecodeError::Malformed(_) => &mut self.malformed,
        };
        *c += 1;
    }

    /// All rejections (datagrams read and refused; not [`RecvCounters::queue_drops`]).
    pub fn rejected(&self) -> u64 {
        self.truncated
            + self.oversized
            + self.bad_magic
            + self.unknown_version
            + self.unknown_kind
            + self.bad_hmac
            + self.malformed
            + self.wrong_direction
    }
}

/// An authentic heartbeat with its source and the moment the kernel received it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    pub hb: Heartbeat,
    pub from: SocketAddr,
    /// When the datagram reached the socket (the kernel's receive stamp on the monotonic
    /// clock), never later than when it was read; the read time if the kernel gave no stamp.
    pub at: Instant,
    /// The same moment on the wall clock (the kernel's stamp as it is, or the read time).
    pub wall: SystemTime,
}

/// Most datagrams one [`Receiver::drain`] call reads from the shared socket, so a flood cannot
/// keep the caller in it forever. When a call stops at a bound, [`Receiver::more`] says so:
/// call it again.
pub const DRAIN_MAX: usize = 4096;

/// Most datagrams one [`Receiver::drain`] call reads from one agent's own socket (an agent
/// sends one heartbeat per interval; more is a backlog, read on the next call).
pub const PEER_DRAIN_MAX: usize = 256;

/// Receive buffer the heartbeat socket asks for (the kernel doubles it for its bookkeeping):
/// 4096 heartbeat datagrams or more, so a daemon that stalls for a moment loses none.
pub const RECV_BUFFER: usize = 4 << 20;

/// Control-message space per datagram: a `SCM_TIMESTAMPNS` timespec and a `SO_RXQ_OVFL` u32,
/// plus room for an unexpected one (a truncated control buffer would cost us the stamp).
const CMSG_SPACE: usize =
    nixsock::cmsg_space::<libc::timespec>() + nixsock::cmsg_space::<u32>() + 64;

/// Epoll token of the shared socket; an agent's own socket has its node ID + 1.
const SHARED: u64 = 0;

/// Maps the kernel's CLOCK_REALTIME stamps onto the monotonic clock: the two clocks read
/// together once, and a stamp placed at the same distance from `mono` as it is from `wall`.
#[derive(Clone, Copy, Debug)]
struct ClockMap {
    wall: SystemTime,
    mono: Instant,
}

impl ClockMap {
    fn now() -> ClockMap {
        ClockMap {
            wall: SystemTime::now(),
            mono: Instant::now(),
        }
    }

    /// The wall-clock time of a CLOCK_REALTIME stamp, `None` if it is unrepresentable.
    fn system_time(stamp: &nix::sys::time::TimeSpec) -> Option<SystemTime> {
        let secs = u64::try_from(stamp.tv_sec()).ok()?;
        let nanos = u32::try_from(stamp.tv_nsec()).ok()?;
        UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
    }

    /// The monotonic instant of a wall-clock time, `None` if it is unrepresentable.
    fn instant(&self, t: SystemTime) -> Option<Instant> {
        match t.duration_since(self.wall) {
            Ok(ahead) => self.mono.checked_add(ahead),
            Err(e) => self.mono.checked_sub(e.duration()),
        }
    }

    /// The wall-clock time of a monotonic instant (for a datagram without a stamp).
    fn system(&self, t: Instant) -> SystemTime {
        match t.checked_duration_since(self.mono) {
            Some(ahead) => self.wall.checked_add(ahead),
            None => self
                .wall
                .checked_sub(self.mono.saturating_duration_since(t)),
        }
        .unwrap_or(self.wall)
    }
}

/// One datagram read from a socket: its first `len` bytes are in the receiver's buffer.
#[derive(Clone, Copy, Debug)]
struct Datagram {
    len: usize,
    from: SocketAddr,
    stamp: Option<nix::sys::time::TimeSpec>,
    read_at: Instant,
}

fn to_std_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::from(*v4));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6))
}

/// Receive stamps and drop reports on a heartbeat socket.
fn stamp_socket(sock: &impl AsFd) -> io::Result<()> {
    let opt_err = |name: &str, e: nix::errno::Errno| {
        let e = io::Error::from(e);
        io::Error::new(e.kind(), format!("heartbeat socket: setting {name}: {e}"))
    };
    nixsock::setsockopt(sock, sockopt::ReceiveTimestampns, &true)
        .map_err(|e| opt_err("SO_TIMESTAMPNS", e))?;
    nixsock::setsockopt(sock, sockopt::RxqOvfl, &1).map_err(|e| opt_err("SO_RXQ_OVFL", e))
}

/// A socket of its own for one agent: bound to the heartbeat address and connected to the
/// agent's, so the kernel queues that agent's heartbeats apart from everything else.
#[derive(Debug)]
struct Peer {
    sock: UdpSocket,
    addr: SocketAddr,
    /// The socket's latest `SO_RXQ_OVFL` count.
    drops: u64,
    /// The `at` of the last heartbeat read from this socket (stamps are clamped to be no
    /// earlier: one socket's queue is in arrival order).
    last_at: Instant,
}

/// Which socket a datagram is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Shared,
    Peer(u32),
}

/// The balancer's heartbeat socket: receives and authenticates heartbeats, sends notices.
///
/// Heartbeats arrive on one shared socket. Once an agent is known (an authentic heartbeat
/// accepted by the detector), [`Receiver::pin_peer`] gives it a socket of its own, connected to
/// its address: the kernel then queues its heartbeats there, so a flood at the heartbeat port
/// (from any other source) fills only the shared socket's queue and never costs a known agent
/// a heartbeat. [`Receiver::drain`] reads the agents' sockets first, then a bounded batch from
/// the shared one.
///
/// Reading ([`Receiver::drain`], [`Receiver::recv`]) never blocks in the kernel: the sockets are
/// non-blocking, and one epoll descriptor ([`AsFd`]) is readable when any of them is: an async
/// caller waits on it (e.g. tokio's `AsyncFd`) and then drains; `recv` polls it.
#[derive(Debug)]
pub struct Receiver {
    sock: UdpSocket,
    peers: BTreeMap<u32, Peer>,
    epoll: Epoll,
    /// Keys of the nodes that have one of their own (the others use `key`).
    node_keys: BTreeMap<u32, Key>,
    /// Agents get sockets of their own (not with multicast: every matching socket gets a copy
    /// of a multicast datagram, so a pinned agent's heartbeats would arrive twice).
    pinning: bool,
    key: Key,
    counters: RecvCounters,
    /// The shared socket's latest `SO_RXQ_OVFL` count, and the counts of closed peers' sockets.
    shared_drops: u64,
    closed_drops: u64,
    incarnation: u64,
    next_seq: u64,
    buf: Box<[u8; MAX_DATAGRAM + 1]>,
    /// `CMSG_SPACE` bytes plus slack to align the control buffer for `cmsghdr`.
    cmsg: Box<[u8]>,
    /// The `at` of the last heartbeat read from the shared socket (at first: when it was bound).
    last_at: Instant,
    /// Datagrams refused since the caller last took them (at most [`REJECTS_KEPT`]), so the
    /// daemon can warn about, say, a node with the wrong key by name.
    rejects: Vec<Rejected>,
    /// The last drain stopped at a bound with datagrams left.
    more: bool,
    /// Heartbeats read by `recv_stamped` beyond the one it returned.
    pending: std::collections::VecDeque<Received>,
}

/// How many refused datagrams [`Receiver`] keeps for [`Receiver::take_rejects`].
pub const REJECTS_KEPT: usize = 64;

/// A datagram the receiver refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub from: SocketAddr,
    /// The node ID the datagram claims (unauthenticated: read from a heartbeat body whose
    /// HMAC did not verify), when it has one.
    pub claimed_node: Option<u32>,
    pub error: DecodeError,
}

/// The node field of a heartbeat, read without verifying anything.
fn claimed_node(bytes: &[u8]) -> Option<u32> {
    if bytes.len() < HEADER_LEN + 4 || bytes.get(5) != Some(&KIND_HEARTBEAT) {
        return None;
    }
    let b = &bytes[HEADER_LEN..HEADER_LEN + 4];
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Whether a datagram has a valid version-1 header of kind ROUTE_MOVED (read without
/// verifying anything: the balancer refuses notices whatever their HMAC says).
fn is_notice(bytes: &[u8]) -> bool {
    bytes.len() >= HEADER_LEN
        && bytes[..4] == MAGIC
        && bytes[4] == VERSION
        && bytes[5] == KIND_ROUTE_MOVED
}

impl Receiver {
    /// Binds the heartbeat socket (e.g. `0.0.0.0:7711`, `[::]:7711`), turns on kernel receive
    /// timestamps and drop reports, and raises the receive buffer to [`RECV_BUFFER`]: with
    /// `SO_RCVBUFFORCE` (needs `CAP_NET_ADMIN`), else with `SO_RCVBUF` (capped by
    /// `net.core.rmem_max`). A buffer that cannot be raised is logged, not an error.
    ///
    /// The socket is bound without `SO_REUSEPORT`, so an address already in use is an error
    /// as ever; the option is set afterwards, which lets the agents' own sockets (same user)
    /// bind the same address.
    ///
    /// When no other socket on the host has receive stamps on, the kernel switches stamping on
    /// from a workqueue, shortly after this returns; datagrams queued before that are stamped
    /// when they are read (no worse than reading time).
    pub fn bind(addr: SocketAddr, key: Key) -> io::Result<Receiver> {
        let sock = UdpSocket::bind(addr)?;
        sock.set_nonblocking(true)?;
        stamp_socket(&sock)?;
        // SO_RCVBUFFORCE ignores net.core.rmem_max but needs CAP_NET_ADMIN; SO_RCVBUF is capped
        // by rmem_max without an error. A small buffer loses heartbeats only under a backlog.
        if let Err(force) = nixsock::setsockopt(&sock, sockopt::RcvBufForce, &RECV_BUFFER)
            && let Err(plain) = nixsock::setsockopt(&sock, sockopt::RcvBuf, &RECV_BUFFER)
        {
            tracing::debug!("heartbeat socket: SO_RCVBUFFORCE: {force}; SO_RCVBUF: {plain}");
        }
        match nixsock::getsockopt(&sock, sockopt::RcvBuf) {
            // The kernel reports twice the size set (its bookkeeping share).
            Ok(n) if n < 2 * RECV_BUFFER => tracing::warn!(
                "heartbeat socket {addr}: receive buffer is {n} bytes, not {}; run with \
                 CAP_NET_ADMIN or raise net.core.rmem_max",
                2 * RECV_BUFFER
            ),
            Ok(n) => tracing::debug!("heartbeat socket {addr}: receive buffer {n} bytes"),
            Err(e) => {
                tracing::debug!("heartbeat socket {addr}: cannot read the receive buffer: {e}")
            }
        }
        let pinning = match nixsock::setsockopt(&sock, sockopt::ReusePort, &true) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    "heartbeat socket {addr}: SO_REUSEPORT: {e}; agents share one socket (a \
                     flood at the port can cost them heartbeats)"
                );
                false
            }
        };
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        epoll
            .add(&sock, EpollEvent::new(EpollFlags::EPOLLIN, SHARED))
            .map_err(io::Error::from)?;
        Ok(Receiver {
            sock,
            peers: BTreeMap::new(),
            epoll,
            node_keys: BTreeMap::new(),
            pinning,
            key,
            counters: RecvCounters::default(),
            shared_drops: 0,
            closed_drops: 0,
            incarnation: new_incarnation(),
            next_seq: 1,
            buf: Box::new([0u8; MAX_DATAGRAM + 1]),
            cmsg: vec![0u8; CMSG_SPACE + std::mem::align_of::<libc::cmsghdr>()].into_boxed_slice(),
            last_at: Instant::now(),
            rejects: Vec::new(),
            more: false,
            pending: std::collections::VecDeque::new(),
        })
    }

    /// Joins a multicast group (v4: on `iface_v4`, or the default interface; v6: on interface
    /// index `ifindex`, 0 = default). Bind to the unspecified address and the group's port.
    /// Agents then share the one socket (see [`Receiver::pin_peer`]).
    pub fn join_multicast(
        &mut self,
        group: IpAddr,
        iface_v4: Option<std::net::Ipv4Addr>,
        ifindex: u32,
    ) -> io::Result<()> {
        self.pinning = false;
        let pinned: Vec<u32> = self.peers.keys().copied().collect();
        for node in pinned {
            self.unpin_peer(node);
        }
        match group {
            IpAddr::V4(g) => self
                .sock
                .join_multicast_v4(&g, &iface_v4.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED)),
            IpAddr::V6(g) => self.sock.join_multicast_v6(&g, ifindex),
        }
    }

    /// Per-node keys: a heartbeat claiming one of these nodes is verified with its key only
    /// (never the shared one), and notices to it are signed with it.
    pub fn set_node_keys(&mut self, keys: BTreeMap<u32, Key>) {
        self.node_keys = keys;
    }

    /// The key of `node`: its own, else the shared one.
    fn key_of(&self, node: u32) -> &Key {
        self.node_keys.get(&node).unwrap_or(&self.key)
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// The shared socket's receive buffer in bytes, as the kernel reports it (twice what was
    /// set).
    pub fn recv_buffer_size(&self) -> io::Result<usize> {
        nixsock::getsockopt(&self.sock, sockopt::RcvBuf).map_err(io::Error::from)
    }

    /// Gives node `node`'s agent, at `addr` (where its authentic heartbeats come from), a
    /// socket of its own, replacing one it had at another address (a restarted agent sends
    /// from a new port). Call only for heartbeats the detector accepted, so a forger without
    /// the key cannot take one. Returns whether a socket was opened. No-op with multicast.
    pub fn pin_peer(&mut self, node: u32, addr: SocketAddr) -> io::Result<bool> {
        if !self.pinning || self.peers.get(&node).is_some_and(|p| p.addr == addr) {
            return Ok(false);
        }
        self.unpin_peer(node);
        // One socket per address: a second node ID heard from the same address takes it.
        let other: Vec<u32> = self
            .peers
            .iter()
            .filter(|(_, p)| p.addr == addr)
            .map(|(n, _)| *n)
            .collect();
        for n in other {
            self.unpin_peer(n);
        }
        let local = self.sock.local_addr()?;
        let family = if local.is_ipv4() {
            nixsock::AddressFamily::Inet
        } else {
            nixsock::AddressFamily::Inet6
        };
        let fd = nixsock::socket(
            family,
            nixsock::SockType::Datagram,
            nixsock::SockFlag::SOCK_NONBLOCK | nixsock::SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        nixsock::setsockopt(&fd, sockopt::ReusePort, &true)?;
        if local.is_ipv6() {
            // As the shared socket has it (a `[::]` socket hears IPv4 agents too).
            let v6only = nixsock::getsockopt(&self.sock, sockopt::Ipv6V6Only)?;
            nixsock::setsockopt(&fd, sockopt::Ipv6V6Only, &v6only)?;
        }
        stamp_socket(&fd)?;
        nixsock::bind(fd.as_raw_fd(), &SockaddrStorage::from(local))?;
        nixsock::connect(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
        let sock = UdpSocket::from(fd);
        self.epoll.add(
            &sock,
            EpollEvent::new(EpollFlags::EPOLLIN, u64::from(node) + 1),
        )?;
        self.peers.insert(
            node,
            Peer {
                sock,
                addr,
                drops: 0,
                last_at: Instant::now(),
            },
        );
        Ok(true)
    }

    /// Closes node `node`'s own socket, if it has one (its heartbeats arrive on the shared
    /// socket again).
    pub fn unpin_peer(&mut self, node: u32) {
        if let Some(p) = self.peers.remove(&node) {
            let _ = self.epoll.delete(&p.sock);
            self.closed_drops = self.closed_drops.saturating_add(p.drops);
        }
    }

    /// Closes the own sockets of the nodes `keep` refuses (e.g. removed from the
    /// configuration).
    pub fn retain_peers(&mut self, keep: impl Fn(u32) -> bool) {
        let gone: Vec<u32> = self.peers.keys().copied().filter(|n| !keep(*n)).collect();
        for n in gone {
            self.unpin_peer(n);
        }
    }

    /// The address node `node`'s own socket is connected to, if it has one.
    pub fn pinned(&self, node: u32) -> Option<SocketAddr> {
        self.peers.get(&node).map(|p| p.addr)
    }

    /// Reads the next queued datagram of `from` into `self.buf` with its source, arrival stamp
    /// and the kernel's drop count (recorded at once). `None` when the queue is empty. Retries
    /// `Interrupted`; skips `ConnectionRefused` (ICMP errors from earlier notices surface here
    /// on some stacks; not fatal).
    fn read_datagram(&mut self, from: Source) -> io::Result<Option<Datagram>> {
        let fd = match from {
            Source::Shared => self.sock.as_raw_fd(),
            Source::Peer(n) => match self.peers.get(&n) {
                Some(p) => p.sock.as_raw_fd(),
                None => return Ok(None),
            },
        };
        // The kernel writes `cmsghdr`s at the start of the control buffer and nix reads them by
        // reference, so it must be aligned for `cmsghdr`; the allocation has the slack for it.
        let off = self
            .cmsg
            .as_ptr()
            .align_offset(std::mem::align_of::<libc::cmsghdr>());
        loop {
            let cmsg = self.cmsg.get_mut(off..off + CMSG_SPACE);
            let mut iov = [IoSliceMut::new(&mut self.buf[..])];
            let msg =
                match nixsock::recvmsg::<SockaddrStorage>(fd, &mut iov, cmsg, MsgFlags::empty()) {
                    Ok(msg) => msg,
                    Err(errno) => {
                        let e = io::Error::from(errno);
                        match e.kind() {
                            io::ErrorKind::WouldBlock => return Ok(None),
                            io::ErrorKind::Interrupted | io::ErrorKind::ConnectionRefused => {
                                continue;
                            }
                            _ => return Err(e),
                        }
                    }
                };
            let read_at = Instant::now();
            let mut stamp = None;
            let mut drops = None;
            match msg.cmsgs() {
                Ok(cmsgs) => {
                    for c in cmsgs {
                        match c {
                            ControlMessageOwned::ScmTimestampns(ts) => stamp = Some(ts),
                            ControlMessageOwned::RxqOvfl(n) => drops = Some(u64::from(n)),
                            _ => {}
                        }
                    }
                }
                Err(e) => tracing::debug!("heartbeat socket: control data lost: {e}"),
            }
            let address = msg.address;
            let bytes = msg.bytes;
            if let Some(n) = drops {
                match from {
                    Source::Shared => self.shared_drops = n,
                    Source::Peer(node) => {
                        if let Some(p) = self.peers.get_mut(&node) {
                            p.drops = n;
                        }
                    }
                }
                self.counters.queue_drops = self.queue_drops();
            }
            let Some(from) = address.as_ref().and_then(to_std_addr) else {
                // A UDP socket of an IP family always reports an IP source; be defensive.
                tracing::debug!("heartbeat socket: datagram without an IP source ignored");
                continue;
            };
            return Ok(Some(Datagram {
                len: bytes,
                from,
                stamp,
                read_at,
            }));
        }
    }

    /// Every socket's drops: the shared one's, the open peers', the closed peers'.
    fn queue_drops(&self) -> u64 {
        self.peers.values().fold(
            self.shared_drops.saturating_add(self.closed_drops),
            |a, p| a.saturating_add(p.drops),
        )
    }

    /// Decodes the datagram in `self.buf` (read from `src`) and counts it: the heartbeat, with
    /// its arrival time mapped through `clock` and clamped between the previous arrival on the
    /// same socket and the read time, or `None` for a rejected datagram.
    fn accept(&mut self, d: &Datagram, src: Source, clock: &ClockMap) -> Option<Received> {
        let bytes = &self.buf[..d.len];
        // Cheap checks first: the balancer takes no notices, whatever their HMAC.
        if is_notice(bytes) {
            self.counters.wrong_direction += 1;
            return None;
        }
        // The node field is read before it is authenticated, only to pick the key; the HMAC
        // covers it, so a heartbeat verified with node N's key is node N's.
        let key = match claimed_node(bytes) {
            Some(n) => self.key_of(n),
            None => &self.key,
        };
        match decode(bytes, key) {
            Ok(Message::Heartbeat(hb)) => {
                self.counters.accepted += 1;
                let wall = d.stamp.as_ref().and_then(ClockMap::system_time);
                let arrived = wall.and_then(|w| clock.instant(w)).unwrap_or(d.read_at);
                let last = match src {
                    Source::Shared => &mut self.last_at,
                    Source::Peer(n) => match self.peers.get_mut(&n) {
                        Some(p) => &mut p.last_at,
                        None => &mut self.last_at,
                    },
                };
                // `last` is never later than `read_at`: both come from the monotonic clock.
                let at = arrived.min(d.read_at).max(*last);
                *last = at;
                Some(Received {
                    hb,
                    from: d.from,
                    at,
                    wall: wall.unwrap_or_else(|| clock.system(at)),
                })
            }
            Ok(Message::RouteMoved(_)) => {
                self.counters.wrong_direction += 1;
                None
            }
            Err(e) => {
                tracing::debug!("heartbeat from {} rejected: {e}", d.from);
                self.counters.record(&e);
                if self.rejects.len() < REJECTS_KEPT {
                    self.rejects.push(Rejected {
                        from: d.from,
                        claimed_node: claimed_node(&self.buf[..d.len]),
                        error: e,
                    });
                }
                None
            }
        }
    }

    /// Reads up to `max` datagrams of `src`, appending its heartbeats to `out`; returns how
    /// many were read.
    fn drain_one(
        &mut self,
        src: Source,
        max: usize,
        clock: &ClockMap,
        out: &mut Vec<Received>,
    ) -> io::Result<usize> {
        let mut read = 0;
        while read < max {
            let Some(d) = self.read_datagram(src)? else {
                break;
            };
            read += 1;
            if let Some(r) = self.accept(&d, src, clock) {
                out.push(r);
            }
        }
        if read == max {
            self.more = true;
        }
        Ok(read)
    }

    /// Reads the queued datagrams without blocking: those of every agent's own socket that
    /// has any (up to [`PEER_DRAIN_MAX`] each), then up to [`DRAIN_MAX`] from the shared socket.
    /// Appends the authentic heartbeats to `out` in arrival order (the kernel's stamps order
    /// the sockets' datagrams among themselves) and counts the rejected ones. Returns how many
    /// datagrams were read (accepted + rejected); [`Receiver::more`] says whether a bound left
    /// some queued. On an error, the heartbeats read before it are already in `out`.
    pub fn drain(&mut self, out: &mut Vec<Received>) -> io::Result<usize> {
        let clock = ClockMap::now();
        let start = out.len();
        self.more = false;
        let mut read = 0;
        // Which agents' sockets have something (the shared one is read whatever it says).
        let mut ready: Vec<u32> = Vec::new();
        let mut events = [EpollEvent::empty(); 64];
        loop {
            let n = match self.epoll.wait(&mut events, 0u8) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            ready.extend(
                events[..n]
                    .iter()
                    .map(EpollEvent::data)
                    .filter(|&t| t != SHARED)
                    .filter_map(|t| u32::try_from(t - 1).ok()),
            );
            // epoll hands out ready descriptors round-robin: a full batch may hide more.
            if n < events.len() || ready.len() > self.peers.len() {
                break;
            }
        }
        ready.sort_unstable();
        ready.dedup();
        for node in ready {
            read += self.drain_one(Source::Peer(node), PEER_DRAIN_MAX, &clock, out)?;
        }
        read += self.drain_one(Source::Shared, DRAIN_MAX, &clock, out)?;
        out[start..].sort_by_key(|r| r.at);
        Ok(read)
    }

    /// Whether the last [`Receiver::drain`] stopped at a bound with datagrams left: drain again
    /// without waiting for readiness.
    pub fn more(&self) -> bool {
        self.more
    }

    /// The next authentic heartbeat with its arrival time, or `None` when `timeout` passes
    /// first. Rejected datagrams are counted (see [`Receiver::counters`]) and skipped.
    pub fn recv_stamped(&mut self, timeout: Duration) -> io::Result<Option<Received>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.pending.pop_front() {
                return Ok(Some(r));
            }
            let mut got = Vec::new();
            let read = self.drain(&mut got)?;
            self.pending.extend(got);
            if read > 0 || self.more {
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            wait_readable(&self.epoll.0, deadline - now)?;
        }
    }

    /// The next authentic heartbeat and its source, or `None` when `timeout` passes first.
    /// Rejected datagrams are counted (see [`Receiver::counters`]) and skipped.
    pub fn recv(&mut self, timeout: Duration) -> io::Result<Option<(Heartbeat, SocketAddr)>> {
        Ok(self.recv_stamped(timeout)?.map(|r| (r.hb, r.from)))
    }

    /// The datagrams refused since the last call.
    pub fn take_rejects(&mut self) -> Vec<Rejected> {
        std::mem::take(&mut self.rejects)
    }

    /// Counters: heartbeats accepted, datagrams rejected by reason, kernel queue drops.
    pub fn counters(&self) -> &RecvCounters {
        &self.counters
    }

    /// This balancer's notice incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Sends one prepared notice (its incarnation and sequence are sent as given).
    pub fn send_notice(&self, to: SocketAddr, notice: &Notice) -> io::Result<()> {
        let bytes = notice
            .encode(self.key_of(notice.node))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        self.sock.send_to(&bytes, to)?;
        Ok(())
    }

    /// Tells a node's agent (at `to`, the source address of its heartbeats) which of its routes
    /// moved: builds compact ranges, splits them across datagrams and numbers them with this
    /// receiver's incarnation and sequence. Returns the number of datagrams sent.
    pub fn send_route_moved(
        &mut self,
        to: SocketAddr,
        node: u32,
        vip: Vip,
        reason: MoveReason,
        route_ids: &[u32],
    ) -> io::Result<usize> {
        let ranges = ranges_from_ids(route_ids);
        let notices = split_notices(
            node,
            vip,
            reason,
            &ranges,
            self.incarnation,
            &mut self.next_seq,
        );
        for n in &notices {
            self.send_notice(to, n)?;
        }
        Ok(notices.len())
    }
}

impl AsFd for Receiver {
    /// The epoll descriptor over all of the receiver's sockets, readable when any of them is:
    /// e.g. for tokio's `AsyncFd` to wait on before [`Receiver::drain`].
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn key() -> Key {
        Key::from_bytes(b"0123456789abcdef0123456789abcdef").unwrap()
    }

    fn hb() -> Heartbeat {
        Heartbeat {
            node: 7,
            incarnation: 0x0123_4567_89ab_cdef,
            sequence: 42,
            state: NodeState::Draining,
            weight: 100,
            interval_ms: 100,
            cpu_permille: Some(250),
            active_conns: Some(1234),
        }
    }

    fn notice() -> Notice {
        Notice {
            node: 7,
            incarnation: 0x1122_3344_5566_7788,
            sequence: 3,
            reason: MoveReason::Failure,
            vip: Vip {
                addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                port: 80,
                proto: 6,
            },
            part: 0,
            parts: 1,
            ranges: vec![
                RouteRange { first: 0, last: 9 },
                RouteRange {
                    first: 17,
                    last: 17,
                },
            ],
        }
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // The same bytes are in docs/heartbeat.md.
    const GOLDEN_HEARTBEAT: &str = "
        4c424842 01 01 0024
        00000007 0123456789abcdef 000000000000002a 01 00 00fa 00000064 00000064 000004d2
        71ca7816efd97c9ff4fc937f6f1e6f39 79ef3fe75e8f688f1707552d2f2fb4ac";
    const GOLDEN_NOTICE: &str = "
        4c424842 01 02 0034
        00000007 1122334455667788 0000000000000003 03 06 04 00 0050 0000 0001 0002 0a000001
        00000000 00000009 00000011 00000011
        f7ae791337a2c0cfc9cd5510a3b023ca e5f03604174f39a1e3d04b5f02f28d06";

    #[test]
    fn heartbeat_golden_vector() {
        let bytes = hb().encode(&key());
        assert_eq!(hex(&bytes), hex(&unhex(GOLDEN_HEARTBEAT)));
        assert_eq!(bytes.len(), HEARTBEAT_LEN);
        assert_eq!(decode(&bytes, &key()), Ok(Message::Heartbeat(hb())));
    }

    #[test]
    fn notice_golden_vector() {
        let bytes = notice().encode(&key()).unwrap();
        assert_eq!(hex(&bytes), hex(&unhex(GOLDEN_NOTICE)));
        assert_eq!(decode(&bytes, &key()), Ok(Message::RouteMoved(notice())));
    }

    #[test]
    fn round_trips() {
        let k = key();
        let mut h = hb();
        h.state = NodeState::Up;
        h.cpu_permille = None;
        h.active_conns = None;
        h.weight = 0;
        assert_eq!(decode(&h.encode(&k), &k), Ok(Message::Heartbeat(h)));
        let mut n = notice();
        n.vip = Vip {
            addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
            port: 0,
            proto: 17,
        };
        n.ranges = vec![];
        n.reason = MoveReason::Removed;
        assert_eq!(
            decode(&n.encode(&k).unwrap(), &k),
            Ok(Message::RouteMoved(n.clone()))
        );
        n.ranges = (0..MAX_RANGES_PER_NOTICE as u32)
            .map(|i| RouteRange {
                first: i * 3,
                last: i * 3 + 1,
            })
            .collect();
        let bytes = n.encode(&k).unwrap();
        assert_eq!(bytes.len(), MAX_DATAGRAM);
        assert!(bytes.len() <= MAX_DATAGRAM);
        assert_eq!(decode(&bytes, &k), Ok(Message::RouteMoved(n.clone())));
        n.ranges.push(RouteRange {
            first: 100_000,
            last: 100_000,
        });
        assert!(n.encode(&k).is_err());
    }

    #[test]
    fn ranges_and_splitting() {
        let r = ranges_from_ids(&[5, 1, 2, 3, 9, 3, u32::MAX, u32::MAX - 1]);
        assert_eq!(
            format_ranges(&r),
            format!("1-3,5,9,{}-{}", u32::MAX - 1, u32::MAX)
        );
        assert_eq!(r.iter().map(RouteRange::len).sum::<u64>(), 7);
        let ids: Vec<u32> = (0..1000).map(|i| i * 2).collect();
        let ranges = ranges_from_ids(&ids);
        let vip = notice().vip;
        let mut seq = 10;
        let ns = split_notices(1, vip, MoveReason::Join, &ranges, 5, &mut seq);
        assert_eq!(ns.len(), 1000usize.div_ceil(MAX_RANGES_PER_NOTICE));
        assert_eq!(seq, 10 + ns.len() as u64);
        let mut all = vec![];
        for (i, n) in ns.iter().enumerate() {
            assert_eq!((n.part as usize, n.parts as usize), (i, ns.len()));
            assert_eq!(n.sequence, 10 + i as u64);
            let bytes = n.encode(&key()).unwrap();
            assert!(bytes.len() <= MAX_DATAGRAM);
            all.extend_from_slice(&n.ranges);
        }
        assert_eq!(all, ranges);
        assert!(split_notices(1, vip, MoveReason::Join, &[], 5, &mut seq).is_empty());
    }

    fn resign(mut b: Vec<u8>) -> Vec<u8> {
        let n = b.len() - MAC_LEN;
        let tag = key().tag(&b[..n]);
        b[n..].copy_from_slice(&tag);
        b
    }

    #[test]
    fn each_decode_error() {
        let k = key();
        let good = hb().encode(&k);
        assert_eq!(decode(&[], &k), Err(DecodeError::Truncated));
        assert_eq!(decode(&good[..3], &k), Err(DecodeError::Truncated));
        assert_eq!(decode(&good[..7], &k), Err(DecodeError::Truncated));
        assert_eq!(
            decode(&good[..good.len() - 1], &k),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode(&vec![0u8; MAX_DATAGRAM + 1], &k),
            Err(DecodeError::Oversized)
        );
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(decode(&b, &k), Err(DecodeError::BadMagic));
        let mut b = good.clone();
        b[4] = 2;
        assert_eq!(decode(&b, &k), Err(DecodeError::UnknownVersion));
        let mut b = good.clone();
        b[5] = 9;
        assert_eq!(decode(&b, &k), Err(DecodeError::UnknownKind));
        let mut b = good.clone();
        b[10] ^= 1;
        assert_eq!(decode(&b, &k), Err(DecodeError::BadHmac));
        let other = Key::from_bytes(b"another key, 16+ bytes").unwrap();
        assert_eq!(decode(&good, &other), Err(DecodeError::BadHmac));
        let mut b = good.clone();
        b.push(0);
        assert_eq!(
            decode(&b, &k),
            Err(DecodeError::Malformed("trailing bytes after HMAC"))
        );
        // Authentic but malformed bodies (a key holder with a bug).
        let mut b = good.clone();
        b[HEADER_LEN + 20] = 7;
        assert_eq!(decode(&resign(b), &k), Err(DecodeError::Malformed("state")));
        let mut b = good.clone();
        b[HEADER_LEN + 22..HEADER_LEN + 24].copy_from_slice(&1001u16.to_be_bytes());
        assert_eq!(
            decode(&resign(b), &k),
            Err(DecodeError::Malformed("cpu_permille"))
        );
        let mut b = good.clone();
        b[HEADER_LEN + 28..HEADER_LEN + 32].copy_from_slice(&[0; 4]);
        assert_eq!(
            decode(&resign(b), &k),
            Err(DecodeError::Malformed("interval_ms"))
        );
        let mut b = good.clone();
        b[7] -= 1; // body one byte shorter, MAC moves
        b.remove(HEADER_LEN);
        assert_eq!(
            decode(&resign(b), &k),
            Err(DecodeError::Malformed("heartbeat length"))
        );
        let nb = notice().encode(&k).unwrap();
        let mut b = nb.clone();
        b[HEADER_LEN + 22] = 5;
        assert_eq!(
            decode(&resign(b), &k),
            Err(DecodeError::Malformed("family"))
        );
        let mut b = nb.clone();
        b[HEADER_LEN + 20] = 0;
        assert_eq!(
            decode(&resign(b), &k),
            Err(DecodeError::Malformed("reason"))
        );
        let mut b = nb.clone();
        b[HEADER_LEN + 31] = 3;
        assert_eq!(
            decode(&resign(b), &k),
            Err(DecodeError::Malformed("range_count"))
        );
        let mut b = nb.clone();
        b[HEADER_LEN + 27] = 1; // part 1 of 1
        assert_eq!(decode(&resign(b), &k), Err(DecodeError::Malformed("part")));
        let mut b = nb.clone();
        b[HEADER_LEN + 36 + 8 + 3] = 5; // second range starts at 5 <= 9
        assert_eq!(
            decode(&resign(b), &k),
            Err(DecodeError::Malformed("ranges"))
        );
    }

    #[test]
    fn keys() {
        assert!(matches!(
            Key::parse(b"short"),
            Err(KeyError::TooShort { len: 5, .. })
        ));
        assert!(matches!(
            Key::parse(b"00112233445566778899aabbccddee\n"),
            Err(KeyError::TooShort {
                len: 15,
                form: "hex-decoded"
            })
        ));
        let hexkey =
            Key::parse(b" 3031323334353637383961626364656630313233343536373839616263646566\n")
                .unwrap();
        let raw = Key::parse(b"0123456789abcdef0123456789abcdef").unwrap();
        // "0123...ef" is itself hex, so it decodes to 16 bytes: a different key than the hex one.
        let bytes = hb().encode(&hexkey);
        assert_eq!(decode(&bytes, &key()), Ok(Message::Heartbeat(hb())));
        assert_eq!(decode(&bytes, &raw), Err(DecodeError::BadHmac));
        assert!(Key::parse(b"not hex but long enough!").is_ok());
        assert!(Key::from_file(Path::new("/nonexistent/key")).is_err());
        assert_eq!(format!("{:?}", key()), "Key(<redacted>)");
        assert!(new_incarnation() != new_incarnation() || new_incarnation() > 0);
    }

    #[test]
    fn receiver_counts_and_notices() {
        let mut rx = Receiver::bind("127.0.0.1:0".parse().unwrap(), key()).unwrap();
        let to = rx.local_addr().unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let forged = Key::from_bytes(b"forged key forged key").unwrap();
        tx.send_to(&hb().encode(&forged), to).unwrap();
        tx.send_to(b"garbage", to).unwrap();
        tx.send_to(&notice().encode(&key()).unwrap(), to).unwrap();
        tx.send_to(&hb().encode(&key()), to).unwrap();
        let (got, from) = rx.recv(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!((got, from), (hb(), tx.local_addr().unwrap()));
        let c = *rx.counters();
        assert_eq!(
            (c.bad_hmac, c.bad_magic, c.wrong_direction, c.accepted),
            (1, 1, 1, 1)
        );
        assert_eq!(c.rejected(), 3);
        let t = Instant::now();
        assert!(rx.recv(Duration::from_millis(30)).unwrap().is_none());
        assert!(t.elapsed() >= Duration::from_millis(30));
        let ids: Vec<u32> = (0..400).map(|i| i * 2).collect();
        let sent = rx
            .send_route_moved(
                tx.local_addr().unwrap(),
                7,
                notice().vip,
                MoveReason::Drain,
                &ids,
            )
            .unwrap();
        assert_eq!(sent, 3);
        let mut buf = [0u8; 2048];
        let mut count = 0;
        for i in 0..sent {
            let n = tx.recv(&mut buf).unwrap();
            let Ok(Message::RouteMoved(m)) = decode(&buf[..n], &key()) else {
                panic!()
            };
            assert_eq!(
                (m.part as usize, m.incarnation, m.sequence),
                (i, rx.incarnation(), 1 + i as u64)
            );
            count += m.route_count();
        }
        assert_eq!(count, 400);
    }

    fn hb_of(node: u32, sequence: u64) -> Heartbeat {
        Heartbeat {
            node,
            sequence,
            ..hb()
        }
    }

    fn loopback_receiver() -> (Receiver, SocketAddr) {
        let rx = Receiver::bind("127.0.0.1:0".parse().unwrap(), key()).unwrap();
        let to = rx.local_addr().unwrap();
        (rx, to)
    }

    /// Drains until a call reads nothing; returns all heartbeats and the number of calls.
    fn drain_all(rx: &mut Receiver) -> (Vec<Received>, usize) {
        let mut out = vec![];
        let mut calls = 1;
        while rx.drain(&mut out).unwrap() > 0 {
            calls += 1;
            assert!(calls < 1000, "drain never ran dry");
        }
        (out, calls)
    }

    #[test]
    fn drain_returns_queued_heartbeats_in_order() {
        let (mut rx, to) = loopback_receiver();
        assert!(
            rx.recv_buffer_size().unwrap() >= 2 * RECV_BUFFER,
            "receive buffer not raised (needs CAP_NET_ADMIN or net.core.rmem_max >= 4 MiB)"
        );
        let senders: Vec<UdpSocket> = (0..4)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let mut sent = vec![];
        for i in 0..1000u64 {
            let s = &senders[(i % 4) as usize];
            let h = hb_of((i % 4) as u32, i + 1);
            s.send_to(&h.encode(&key()), to).unwrap();
            sent.push((h, s.local_addr().unwrap()));
        }
        let (got, _) = drain_all(&mut rx);
        let now = Instant::now();
        assert_eq!(rx.counters().queue_drops, 0);
        assert_eq!(got.iter().map(|r| (r.hb, r.from)).collect::<Vec<_>>(), sent);
        assert!(got.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(got.iter().all(|r| r.at <= now));
        let c = *rx.counters();
        assert_eq!((c.accepted, c.rejected()), (1000, 0));
    }

    #[test]
    fn drain_is_bounded() {
        let (mut rx, to) = loopback_receiver();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let total = DRAIN_MAX + 10;
        for i in 0..total as u64 {
            tx.send_to(&hb_of(1, i + 1).encode(&key()), to).unwrap();
        }
        let mut out = vec![];
        assert_eq!(rx.drain(&mut out).unwrap(), DRAIN_MAX);
        assert_eq!(rx.drain(&mut out).unwrap(), 10);
        assert_eq!(rx.drain(&mut out).unwrap(), 0);
        assert_eq!(rx.counters().queue_drops, 0);
        assert!(out.iter().map(|r| r.hb.sequence).eq(1..=total as u64));
    }

    /// The kernel turns receive stamping on host-wide from a workqueue when the first socket
    /// asks for it; until then it stamps datagrams when they are read. Probes until stamps
    /// show the time a datagram waited.
    fn wait_for_kernel_stamps(rx: &mut Receiver, tx: &UdpSocket, to: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            tx.send_to(&hb_of(99, 1).encode(&key()), to).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            let t = Instant::now();
            let (got, _) = drain_all(rx);
            if got
                .iter()
                .any(|r| t.saturating_duration_since(r.at) >= Duration::from_millis(10))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the kernel never stamped arrivals"
            );
        }
    }

    #[test]
    fn arrival_time_is_the_kernels_not_the_readers() {
        let (mut rx, to) = loopback_receiver();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        wait_for_kernel_stamps(&mut rx, &tx, to);
        tx.send_to(&hb().encode(&key()), to).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        let mut out = vec![];
        assert_eq!(rx.drain(&mut out).unwrap(), 1);
        let age = t.saturating_duration_since(out[0].at);
        assert!(age >= Duration::from_millis(150), "age {age:?}");
        assert!(out[0].at <= Instant::now());
        // `recv_stamped` (and so `recv`) reads through the same path.
        tx.send_to(&hb_of(7, 43).encode(&key()), to).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        let r = rx.recv_stamped(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!((r.hb, r.from), (hb_of(7, 43), tx.local_addr().unwrap()));
        let age = t.saturating_duration_since(r.at);
        assert!(age >= Duration::from_millis(150), "age {age:?}");
        assert!(r.at >= out[0].at);
    }

    #[test]
    fn drain_counts_rejects_by_reason_and_goes_on() {
        let (mut rx, to) = loopback_receiver();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let forged = Key::from_bytes(b"forged key forged key").unwrap();
        let good = hb_of(1, 1).encode(&key());
        let datagrams: Vec<Vec<u8>> = vec![
            good.clone(),
            b"garbage".to_vec(),
            hb_of(2, 1).encode(&forged),
            hb_of(1, 2).encode(&key()),
            notice().encode(&key()).unwrap(),
            good[..20].to_vec(),
            vec![0u8; MAX_DATAGRAM + 100],
            hb_of(2, 2).encode(&forged),
            hb_of(1, 3).encode(&key()),
        ];
        for d in &datagrams {
            tx.send_to(d, to).unwrap();
        }
        let mut out = vec![];
        assert_eq!(rx.drain(&mut out).unwrap(), datagrams.len());
        assert_eq!(
            out.iter().map(|r| r.hb).collect::<Vec<_>>(),
            vec![hb_of(1, 1), hb_of(1, 2), hb_of(1, 3)]
        );
        let c = *rx.counters();
        assert_eq!(
            (
                c.accepted,
                c.bad_magic,
                c.bad_hmac,
                c.wrong_direction,
                c.truncated,
                c.oversized
            ),
            (3, 1, 2, 1, 1, 1)
        );
        assert_eq!(c.rejected(), 6);
        assert_eq!(rx.drain(&mut out).unwrap(), 0);
    }

    #[test]
    fn drain_on_empty_socket_returns_at_once() {
        let (mut rx, _) = loopback_receiver();
        let mut out = vec![Received {
            hb: hb(),
            from: "127.0.0.1:1".parse().unwrap(),
            at: Instant::now(),
            wall: SystemTime::now(),
        }];
        let t = Instant::now();
        assert_eq!(rx.drain(&mut out).unwrap(), 0);
        // Not blocking (a blocking read would wait for a datagram that never comes); the bound
        // is loose so a loaded machine does not fail it.
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(out.len(), 1, "drain appends, never clears");
        assert_eq!(*rx.counters(), RecvCounters::default());
        // The descriptor is the epoll over the sockets (what an `AsyncFd` waits on).
        assert_eq!(rx.as_fd().as_raw_fd(), rx.epoll.0.as_raw_fd());
    }

    #[test]
    fn queue_drops_are_reported_not_rejected() {
        let (mut rx, to) = loopback_receiver();
        // A tiny buffer (the kernel's minimum) so a short burst overflows it.
        nixsock::setsockopt(&rx.sock, sockopt::RcvBuf, &1).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..200 {
            tx.send_to(&hb_of(1, i + 1).encode(&key()), to).unwrap();
        }
        let (first, _) = drain_all(&mut rx);
        assert!(!first.is_empty() && first.len() < 200, "{}", first.len());
        // The kernel reports the drops on the next datagram it queues after them.
        tx.send_to(&hb_of(1, 201).encode(&key()), to).unwrap();
        let (second, _) = drain_all(&mut rx);
        assert_eq!(second.len(), 1);
        let c = *rx.counters();
        assert_eq!(c.queue_drops, 201 - (first.len() as u64 + 1));
        assert_eq!((c.accepted, c.rejected()), (first.len() as u64 + 1, 0));
    }

    /// Defect: one socket queue held every datagram sent to the heartbeat port, so a flood
    /// over the rate the daemon reads made the kernel drop real heartbeats with it. Now a
    /// known agent's heartbeats go to a socket of its own: with the shared queue overflowing,
    /// none of them is lost, and they come out first.
    #[test]
    fn a_pinned_agent_is_read_apart_from_a_flood() {
        let (mut rx, to) = loopback_receiver();
        // The kernel's smallest buffer, so a short burst overflows the shared queue.
        nixsock::setsockopt(&rx.sock, sockopt::RcvBuf, &1).unwrap();
        let agent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let flood = UdpSocket::bind("127.0.0.1:0").unwrap();
        let forged = Key::from_bytes(b"forged key forged key").unwrap();
        let junk = hb_of(1, 1).encode(&forged);
        let mut seq = 0;
        let beat = |rx_seq: &mut u64| {
            *rx_seq += 1;
            agent
                .send_to(&hb_of(1, *rx_seq).encode(&key()), to)
                .unwrap();
        };
        // Unpinned, the agent's heartbeats share the queue with the flood.
        for _ in 0..10 {
            for _ in 0..100 {
                flood.send_to(&junk, to).unwrap();
            }
            beat(&mut seq);
        }
        let (got, _) = drain_all(&mut rx);
        assert!(got.len() < 10, "the flood cost no heartbeat: {}", got.len());
        // The kernel reports drops with the next datagram it queues.
        flood.send_to(&junk, to).unwrap();
        drain_all(&mut rx);
        let drops = rx.counters().queue_drops;
        assert!(drops > 0);
        // Pinned: every heartbeat arrives, first, while the flood goes on being dropped.
        assert!(rx.pin_peer(1, agent.local_addr().unwrap()).unwrap());
        assert!(
            !rx.pin_peer(1, agent.local_addr().unwrap()).unwrap(),
            "once"
        );
        assert_eq!(rx.pinned(1), Some(agent.local_addr().unwrap()));
        let first = seq + 1;
        for _ in 0..10 {
            for _ in 0..100 {
                flood.send_to(&junk, to).unwrap();
            }
            beat(&mut seq);
        }
        let mut out = vec![];
        rx.drain(&mut out).unwrap();
        assert_eq!(
            out.iter().map(|r| r.hb.sequence).collect::<Vec<_>>(),
            (first..=seq).collect::<Vec<_>>()
        );
        assert!(out.iter().all(|r| r.from == agent.local_addr().unwrap()));
        let (rest, _) = drain_all(&mut rx);
        assert!(rest.is_empty());
        // Notices still go out (from the shared socket) and reach the agent.
        rx.send_route_moved(
            agent.local_addr().unwrap(),
            1,
            notice().vip,
            MoveReason::Join,
            &[3],
        )
        .unwrap();
        let mut buf = [0u8; 2048];
        agent
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let (n, from) = agent.recv_from(&mut buf).unwrap();
        assert_eq!(from, to);
        assert!(matches!(
            decode(&buf[..n], &key()),
            Ok(Message::RouteMoved(_))
        ));
        // Unpinned (or moved: a restarted agent sends from a new port; or removed), the
        // shared socket hears it again.
        rx.retain_peers(|n| n != 1);
        assert_eq!(rx.pinned(1), None);
        beat(&mut seq);
        let got = rx.recv(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(got.0.sequence, seq);
        assert!(
            rx.counters().queue_drops > drops,
            "the flood overflowed again"
        );
    }

    /// The balancer hashes nothing it would refuse anyway: a long heartbeat-kind datagram or a
    /// notice-kind one is refused by its header (a flood of 1232-byte datagrams would
    /// otherwise cost an HMAC over each).
    #[test]
    fn refused_kinds_and_lengths_cost_no_hmac() {
        let forged = Key::from_bytes(b"forged key forged key").unwrap();
        let mut long = vec![];
        long.extend_from_slice(&MAGIC);
        long.extend_from_slice(&[VERSION, KIND_HEARTBEAT]);
        let body = MAX_DATAGRAM - HEADER_LEN - MAC_LEN;
        long.extend_from_slice(&(body as u16).to_be_bytes());
        long.resize(MAX_DATAGRAM, 0);
        assert_eq!(
            decode(&long, &key()),
            Err(DecodeError::Malformed("heartbeat length"))
        );
        let (mut rx, to) = loopback_receiver();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(&long, to).unwrap();
        tx.send_to(&notice().encode(&forged).unwrap(), to).unwrap();
        let (got, _) = drain_all(&mut rx);
        assert!(got.is_empty());
        let c = *rx.counters();
        assert_eq!((c.malformed, c.wrong_direction, c.bad_hmac), (1, 1, 0));
    }

    /// How many datagrams a second the receiver reads and verifies (forged heartbeats that
    /// pass every check before the HMAC), one drain after another. Run by hand:
    /// `cargo test --release -p lb-userspace --lib measure_verify_rate -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn measure_verify_rate() {
        let (mut rx, to) = loopback_receiver();
        let forged = Key::from_bytes(b"forged key forged key").unwrap();
        let junk = hb_of(1, 1).encode(&forged);
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut total = 0;
        let mut spent = Duration::ZERO;
        for _ in 0..20 {
            for _ in 0..4000 {
                tx.send_to(&junk, to).unwrap();
            }
            let t = Instant::now();
            let (_, _) = drain_all(&mut rx);
            spent += t.elapsed();
            total += 4000;
        }
        let started = Instant::now();
        for _ in 0..200_000 {
            std::hint::black_box(decode(&junk, &key()).is_err());
        }
        let hmac = started.elapsed() / 200_000;
        eprintln!(
            "receiver: {total} forged heartbeats in {spent:?}: {:.0}/s read and verified; \
             decode alone {hmac:?} each; bad_hmac {}",
            total as f64 / spent.as_secs_f64(),
            rx.counters().bad_hmac
        );
    }

    /// Per-node keys: a node with a key of its own is heard only with it (a node holding the
    /// shared key cannot speak for it), and its notices are signed with it.
    #[test]
    fn per_node_keys() {
        let (mut rx, to) = loopback_receiver();
        let own = Key::from_bytes(b"node two's very own key").unwrap();
        rx.set_node_keys([(2, own.clone())].into());
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        for d in [
            hb_of(1, 1).encode(&key()),
            hb_of(2, 1).encode(&key()),
            hb_of(2, 2).encode(&own),
            hb_of(1, 2).encode(&own),
        ] {
            tx.send_to(&d, to).unwrap();
        }
        let (got, _) = drain_all(&mut rx);
        assert_eq!(
            got.iter().map(|r| r.hb).collect::<Vec<_>>(),
            vec![hb_of(1, 1), hb_of(2, 2)]
        );
        assert_eq!(rx.counters().bad_hmac, 2);
        let mut buf = [0u8; 2048];
        tx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for node in [1, 2] {
            rx.send_route_moved(
                tx.local_addr().unwrap(),
                node,
                notice().vip,
                MoveReason::Join,
                &[1],
            )
            .unwrap();
            let n = tx.recv(&mut buf).unwrap();
            let (right, wrong) = if node == 2 {
                (&own, &key())
            } else {
                (&key(), &own)
            };
            assert!(decode(&buf[..n], right).is_ok(), "node {node}");
            assert_eq!(decode(&buf[..n], wrong), Err(DecodeError::BadHmac));
        }
    }

    fn valid_messages() -> impl Strategy<Value = Vec<u8>> {
        let hbs = (
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            any::<u32>(),
            1..u32::MAX,
        )
            .prop_map(|(node, inc, seq, d, w, iv)| {
                Heartbeat {
                    node,
                    incarnation: inc,
                    sequence: seq,
                    state: if d {
                        NodeState::Draining
                    } else {
                        NodeState::Up
                    },
                    weight: w,
                    interval_ms: iv,
                    cpu_permille: Some((w % 1001) as u16),
                    active_conns: Some(w / 2),
                }
                .encode(&key())
            });
        let notices = (
            any::<u32>(),
            any::<u64>(),
            proptest::collection::vec(any::<u16>(), 0..300),
            any::<bool>(),
        )
            .prop_map(|(node, seq, ids, v6)| {
                let ids: Vec<u32> = ids.into_iter().map(u32::from).collect();
                let ranges = ranges_from_ids(&ids);
                let addr = if v6 {
                    IpAddr::V6(Ipv6Addr::LOCALHOST)
                } else {
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                };
                let vip = Vip {
                    addr,
                    port: 443,
                    proto: 6,
                };
                let mut s = seq;
                let ns = split_notices(node, vip, MoveReason::Weight, &ranges, 1, &mut s);
                ns.first().map_or_else(
                    || {
                        Heartbeat {
                            node,
                            incarnation: 1,
                            sequence: seq,
                            state: NodeState::Up,
                            weight: 1,
                            interval_ms: 1,
                            cpu_permille: None,
                            active_conns: None,
                        }
                        .encode(&key())
                    },
                    |n| n.encode(&key()).unwrap(),
                )
            });
        prop_oneof![hbs, notices]
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        Flip(usize, u8),
        Truncate(usize),
        Extend(Vec<u8>),
        Set(usize, u8),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
            any::<usize>().prop_map(Mutation::Truncate),
            proptest::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
            (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Set(i, v)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]
        #[test]
        fn decode_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1400)) {
            let r = decode(&bytes, &key());
            // Without the key nothing random authenticates.
            prop_assert!(r.is_err());
            if bytes.len() > MAX_DATAGRAM {
                prop_assert_eq!(r, Err(DecodeError::Oversized));
            }
        }

        #[test]
        fn decode_with_magic_prefix_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..200), kind in 0u8..4, len in 0u16..300) {
            let mut b = MAGIC.to_vec();
            b.push(VERSION);
            b.push(kind);
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(&tail);
            prop_assert!(decode(&b, &key()).is_err());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3_000, ..ProptestConfig::default() })]
        #[test]
        fn mutated_messages_rejected_unless_unchanged(msg in valid_messages(), m in mutation()) {
            let k = key();
            prop_assert!(decode(&msg, &k).is_ok());
            let mut b = msg.clone();
            match m {
                Mutation::Flip(i, bit) => { let i = i % b.len(); b[i] ^= 1 << bit; }
                Mutation::Truncate(n) => b.truncate(n % b.len()),
                Mutation::Extend(extra) => b.extend_from_slice(&extra),
                Mutation::Set(i, v) => { let i = i % b.len(); b[i] = v; }
            }
            let r = decode(&b, &k);
            if b == msg {
                prop_assert!(r.is_ok());
            } else {
                prop_assert!(r.is_err(), "mutation accepted: {:?}", r);
            }
        }

        #[test]
        fn heartbeat_round_trip(node: u32, inc: u64, seq: u64, w: u32, iv in 1..u32::MAX, cpu in proptest::option::of(0u16..=1000), conns in proptest::option::of(0..CONNS_UNKNOWN)) {
            let h = Heartbeat { node, incarnation: inc, sequence: seq, state: NodeState::Up, weight: w, interval_ms: iv, cpu_permille: cpu, active_conns: conns };
            prop_assert_eq!(decode(&h.encode(&key()), &key()), Ok(Message::Heartbeat(h)));
        }
    }
}
