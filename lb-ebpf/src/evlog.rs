//! The balancer's event records (drops, PMTU replies, conntrack evictions) in aya-log's wire
//! format (`aya-log-common` 0.2), so that userspace reads them with `aya_log::EbpfLogger` like
//! any aya-log record: target `lb_common::LOG_TARGET`, level debug, text
//! `LABEL proto=P CLIENT:PORT -> VIP:PORT vip=I node=N` (I and N are -1 where not known).
//!
//! Why not aya-log-ebpf's macros: an expansion keeps its ~25 fields on the stack (144 bytes for
//! this record), and the stack is nearly full where evictions and PMTU replies happen (the
//! 512-byte limit counts every frame of the call chain: entry 256 + `pick` 184 + `lb_ct_put`
//! 40). Here a record is a template built at compile time: the program copies it whole into a
//! per-CPU map value, writes the event's fields at fixed offsets and hands it to the ring
//! buffer. No stack, a constant size per address family, and the same short straight-line code
//! for every event.
use aya_log_common::{ArgumentKind, DisplayHint, Level, RecordFieldKind};

/// Bytes of a record's label (`drop <DropReason>`, `pmtu-reply`, `ct-evict`), space-padded.
pub const LABEL_LEN: usize = 18;

/// The longest record (IPv6), rounded up to whole words.
pub const RECORD_WORDS: usize = V6.len.div_ceil(8);

/// A record buffer: 8-byte aligned, so the template copies word by word.
pub type Record = [u64; RECORD_WORDS];

/// Where a record's variable fields start (byte offsets of the values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The record's length, the leading length field included.
    pub len: usize,
    pub label: usize,
    pub proto: usize,
    pub client: usize,
    pub cport: usize,
    pub vip_addr: usize,
    pub vport: usize,
    pub vip: usize,
    pub node: usize,
}

/// Layout of records with IPv4 addresses.
pub const V4: Layout = build(4).1;
/// Layout of records with IPv6 addresses.
pub const V6: Layout = build(16).1;
/// The IPv4 record with every variable field zero (the label spaces).
pub static TEMPLATE_V4: Record = words(&build(4).0);
/// The IPv6 record with every variable field zero (the label spaces).
pub static TEMPLATE_V6: Record = words(&build(16).0);

/// Room for building a record (more than the longest needs; `build` checks).
const BUILD_MAX: usize = 512;

/// Module and file the records name (aya-log passes them on to the `log` record).
const MODULE: &str = "lb_balancer";
const FILE: &str = "lb-ebpf/src/evlog.rs";

/// A record under construction.
struct Writer {
    buf: [u8; BUILD_MAX],
    pos: usize,
    args: u32,
}

impl Writer {
    /// Appends one field (kind, native-endian u16 length, value); returns the value's offset.
    const fn field(&mut self, kind: u8, value: &[u8]) -> usize {
        let len = (value.len() as u16).to_ne_bytes();
        self.buf[self.pos] = kind;
        self.buf[self.pos + 1] = len[0];
        self.buf[self.pos + 2] = len[1];
        self.pos += 3;
        let at = self.pos;
        let mut i = 0;
        while i < value.len() {
            self.buf[at + i] = value[i];
            i += 1;
        }
        self.pos += value.len();
        at
    }

    /// A literal part of the text.
    const fn text(&mut self, s: &str) -> usize {
        self.args += 1;
        self.field(ArgumentKind::Str as u8, s.as_bytes())
    }

    /// A value with its display hint (two arguments, as aya-log-ebpf writes a `{}`/`{:i}`).
    const fn value(&mut self, hint: DisplayHint, kind: ArgumentKind, zero: &[u8]) -> usize {
        self.args += 2;
        self.field(ArgumentKind::DisplayHint as u8, &[hint as u8]);
        self.field(kind as u8, zero)
    }
}

/// The template and layout of a record whose addresses are `addr_len` (4 or 16) bytes.
const fn build(addr_len: usize) -> ([u8; BUILD_MAX], Layout) {
    let addr_kind = if addr_len == 4 {
        ArgumentKind::ArrU8Len4
    } else {
        ArgumentKind::ArrU8Len16
    };
    let zero_addr: &[u8] = if addr_len == 4 { &[0; 4] } else { &[0; 16] };
    let mut w = Writer {
        buf: [0; BUILD_MAX],
        pos: 2,
        args: 0,
    };
    w.field(
        RecordFieldKind::Target as u8,
        lb_common::LOG_TARGET.as_bytes(),
    );
    w.field(RecordFieldKind::Level as u8, &[Level::Debug as u8]);
    w.field(RecordFieldKind::Module as u8, MODULE.as_bytes());
    w.field(RecordFieldKind::File as u8, FILE.as_bytes());
    w.field(RecordFieldKind::Line as u8, &1u32.to_ne_bytes());
    // The argument count goes here once known.
    let num_args = w.field(RecordFieldKind::NumArgs as u8, &[0; 4]);
    let label = w.text("                  ");
    w.text(" proto=");
    let proto = w.value(DisplayHint::Default, ArgumentKind::U8, &[0]);
    w.text(" ");
    let client = w.value(DisplayHint::Ip, addr_kind, zero_addr);
    w.text(":");
    let cport = w.value(DisplayHint::Default, ArgumentKind::U16, &[0; 2]);
    w.text(" -> ");
    let vip_addr = w.value(DisplayHint::Ip, addr_kind, zero_addr);
    w.text(":");
    let vport = w.value(DisplayHint::Default, ArgumentKind::U16, &[0; 2]);
    w.text(" vip=");
    let vip = w.value(DisplayHint::Default, ArgumentKind::I32, &[0; 4]);
    w.text(" node=");
    let node = w.value(DisplayHint::Default, ArgumentKind::I32, &[0; 4]);
    let n = w.args.to_ne_bytes();
    let mut i = 0;
    while i < 4 {
        w.buf[num_args + i] = n[i];
        i += 1;
    }
    assert!(w.pos <= BUILD_MAX);
    let len = (w.pos as u16).to_ne_bytes();
    w.buf[0] = len[0];
    w.buf[1] = len[1];
    let layout = Layout {
        len: w.pos,
        label,
        proto,
        client,
        cport,
        vip_addr,
        vport,
        vip,
        node,
    };
    (w.buf, layout)
}

/// A built record as words, in memory order.
const fn words(b: &[u8; BUILD_MAX]) -> Record {
    let mut words = [0u64; RECORD_WORDS];
    let mut i = 0;
    while i < RECORD_WORDS {
        words[i] = u64::from_ne_bytes([
            b[8 * i],
            b[8 * i + 1],
            b[8 * i + 2],
            b[8 * i + 3],
            b[8 * i + 4],
            b[8 * i + 5],
            b[8 * i + 6],
            b[8 * i + 7],
        ]);
        i += 1;
    }
    words
}

/// `Event::kind` values after the `DropReason` indices.
pub const PMTU: u32 = lb_common::DROP_REASON_COUNT;
pub const EVICT: u32 = lb_common::DROP_REASON_COUNT + 1;
/// Kinds of event.
pub const KINDS: usize = lb_common::DROP_REASON_COUNT as usize + 2;

/// Labels by `Event::kind`: `drop <DropReason>`, `pmtu-reply`, `ct-evict`, space-padded.
pub static LABELS: [[u8; LABEL_LEN]; KINDS] = {
    const fn put(t: &mut [u8; LABEL_LEN], at: usize, s: &[u8]) {
        assert!(at + s.len() <= LABEL_LEN, "raise LABEL_LEN");
        let mut j = 0;
        while j < s.len() {
            t[at + j] = s[j];
            j += 1;
        }
    }
    let mut t = [[b' '; LABEL_LEN]; KINDS];
    let mut i = 0;
    while i < lb_common::DROP_REASON_COUNT as usize {
        let Some(r) = lb_common::DropReason::from_index(i as u32) else {
            panic!("DropReason indices are dense")
        };
        put(&mut t[i], 0, b"drop ");
        put(&mut t[i], 5, r.name().as_bytes());
        i += 1;
    }
    put(&mut t[PMTU as usize], 0, b"pmtu-reply");
    put(&mut t[EVICT as usize], 0, b"ct-evict");
    t
};

/// The fields of one event (in the program, a per-CPU map value: see [`Slot`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// A `DropReason` index, [`PMTU`] or [`EVICT`].
    pub kind: u32,
    /// VIP index and node index; -1 where not known.
    pub vip: i32,
    pub node: i32,
    /// Addresses as wire bytes; IPv4 in the first 4.
    pub client: [u8; 16],
    pub vip_addr: [u8; 16],
    /// Ports, host order (0 where not known).
    pub cport: u16,
    pub vport: u16,
    pub proto: u8,
    /// 1 for IPv6 addresses.
    pub v6: u8,
    pub _pad: [u8; 2],
}

impl Event {
    /// An event of `kind` with nothing known yet.
    #[inline(always)]
    pub fn reset(&mut self, kind: u32) {
        *self = Self {
            kind,
            vip: -1,
            node: -1,
            ..Self::default()
        };
    }
}

/// The per-CPU room where the program assembles a record: the event, then the record.
#[repr(C)]
pub struct Slot {
    pub ev: Event,
    pub rec: Record,
}

/// Writes `ev`'s fields into `rec`, which holds the template of `layout` (whose addresses are
/// `A` = 4 or 16 bytes).
#[inline(always)]
pub fn fill<const A: usize>(
    rec: &mut Record,
    layout: &Layout,
    label: &[u8; LABEL_LEN],
    ev: &Event,
) {
    // SAFETY: a `Record` is plain bytes, and as bytes it is exactly this long.
    let b = unsafe { &mut *(rec as *mut Record).cast::<[u8; RECORD_WORDS * 8]>() };
    put(b, layout.label, label);
    put(b, layout.proto, &[ev.proto]);
    put(b, layout.client, &ev.client[..A]);
    put(b, layout.cport, &ev.cport.to_ne_bytes());
    put(b, layout.vip_addr, &ev.vip_addr[..A]);
    put(b, layout.vport, &ev.vport.to_ne_bytes());
    put(b, layout.vip, &ev.vip.to_ne_bytes());
    put(b, layout.node, &ev.node.to_ne_bytes());
}

/// Bytes `v` at `at`. Every offset is a constant inside the record once inlined, so the checks
/// fold away.
#[inline(always)]
fn put(b: &mut [u8; RECORD_WORDS * 8], at: usize, v: &[u8]) {
    let mut i = 0;
    while i < v.len() {
        if let Some(d) = b.get_mut(at + i) {
            *d = v[i];
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader of the wire format as aya-log's (`aya_log::log_buf`) reads it: the target and
    /// level, and the text.
    fn decode(rec: &[u8]) -> (String, u8, String) {
        let len = u16::from_ne_bytes([rec[0], rec[1]]) as usize;
        let mut buf = &rec[2..len];
        let mut read = || {
            let kind = buf[0];
            let n = u16::from_ne_bytes([buf[1], buf[2]]) as usize;
            let value = buf[3..3 + n].to_vec();
            buf = &buf[3 + n..];
            (kind, value)
        };
        let (mut target, mut level, mut args) = (String::new(), 0, 0);
        for _ in 0..6 {
            let (kind, v) = read();
            match kind {
                k if k == RecordFieldKind::Target as u8 => target = String::from_utf8(v).unwrap(),
                k if k == RecordFieldKind::Level as u8 => level = v[0],
                k if k == RecordFieldKind::NumArgs as u8 => {
                    args = u32::from_ne_bytes(v.try_into().unwrap())
                }
                _ => {}
            }
        }
        let mut text = String::new();
        let mut hint = 0;
        for _ in 0..args {
            let (kind, v) = read();
            match kind {
                k if k == ArgumentKind::DisplayHint as u8 => hint = v[0],
                k if k == ArgumentKind::Str as u8 => text += std::str::from_utf8(&v).unwrap(),
                k if k == ArgumentKind::U8 as u8 => text += &v[0].to_string(),
                k if k == ArgumentKind::U16 as u8 => {
                    text += &u16::from_ne_bytes([v[0], v[1]]).to_string()
                }
                k if k == ArgumentKind::I32 as u8 => {
                    text += &i32::from_ne_bytes(v.try_into().unwrap()).to_string()
                }
                k if k == ArgumentKind::ArrU8Len4 as u8 => {
                    assert_eq!(hint, DisplayHint::Ip as u8);
                    let a: [u8; 4] = v.try_into().unwrap();
                    text += &std::net::Ipv4Addr::from(a).to_string()
                }
                k if k == ArgumentKind::ArrU8Len16 as u8 => {
                    assert_eq!(hint, DisplayHint::Ip as u8);
                    let a: [u8; 16] = v.try_into().unwrap();
                    text += &std::net::Ipv6Addr::from(a).to_string()
                }
                k => panic!("unexpected kind {k}"),
            }
        }
        assert!(buf.is_empty(), "fields fill the record exactly");
        (target, level, text)
    }

    fn bytes(rec: &Record) -> Vec<u8> {
        rec.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    #[test]
    fn labels() {
        let l = |k: u32| {
            std::str::from_utf8(&LABELS[k as usize])
                .unwrap()
                .to_string()
        };
        assert_eq!(l(0), "drop TruncatedVlan");
        assert_eq!(
            l(lb_common::DropReason::NoBackend as u32),
            "drop NoBackend    "
        );
        assert_eq!(l(PMTU), "pmtu-reply        ");
        assert_eq!(l(EVICT), "ct-evict          ");
    }

    #[test]
    fn v4_record() {
        let mut rec = TEMPLATE_V4;
        let kind = lb_common::DropReason::NoBackend as u32;
        let mut ev = Event::default();
        ev.reset(kind);
        ev.proto = 6;
        ev.cport = 40000;
        ev.vport = 80;
        ev.vip = 0;
        ev.node = 3;
        ev.client[..4].copy_from_slice(&[192, 0, 2, 10]);
        ev.vip_addr[..4].copy_from_slice(&[10, 0, 0, 1]);
        fill::<4>(&mut rec, &V4, &LABELS[kind as usize], &ev);
        let (target, level, text) = decode(&bytes(&rec)[..V4.len]);
        assert_eq!(target, lb_common::LOG_TARGET);
        assert_eq!(level, Level::Debug as u8);
        assert_eq!(
            text,
            "drop NoBackend     proto=6 192.0.2.10:40000 -> 10.0.0.1:80 vip=0 node=3"
        );
    }

    #[test]
    fn v6_record() {
        let mut rec = TEMPLATE_V6;
        let client: std::net::Ipv6Addr = "2001:db8:c1::10".parse().unwrap();
        let vip: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        let ev = Event {
            kind: EVICT,
            proto: 17,
            client: client.octets(),
            vip_addr: vip.octets(),
            cport: 5353,
            vport: 53,
            vip: -1,
            node: 12,
            v6: 1,
            ..Default::default()
        };
        fill::<16>(&mut rec, &V6, &LABELS[EVICT as usize], &ev);
        let (_, _, text) = decode(&bytes(&rec)[..V6.len]);
        assert_eq!(
            text,
            "ct-evict           proto=17 2001:db8:c1::10:5353 -> 2001:db8::1:53 vip=-1 node=12"
        );
        const { assert!(V6.len <= RECORD_WORDS * 8 && V4.len < V6.len) };
    }
}
