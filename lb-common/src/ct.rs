//! `CONNTRACK`'s layout and the way choice, shared by the kernel and userspace.
//!
//! `CONNTRACK` is an array of [`CtSet`]s, each a 16-way set-associative bucket: a flow lives in
//! set `route_index(tag, sets)` of its 5-tuple hash (`tag`), in any of its ways. Lookups and
//! inserts cost one inlined array lookup, a scan of one cache line of tags and one slot line,
//! where the kernel's LRU hash costs ~250 ns per insert (its free-list and bucket locking).
//! Eviction is LRU within the set: a full set gives up a closing flow (FIN/RST seen) first,
//! then the least recently seen one. What the victim choice reads (each way's last-seen time
//! and flags) is packed in the set's second cache line, so choosing a victim in a full set reads
//! two lines, not one per way.
//!
//! Concurrency without locks: a writer clears the way's tag, writes the slot, then sets the
//! tag. A reader accepts a slot only if its tag, its key and its check word (a hash of the
//! tag, node and VIP) all agree, so a slot read while another CPU rewrites it reads as a miss
//! (the route owner is used, as after an eviction) rather than as a wrong node; this holds on
//! any memory ordering, up to a 2^-32 chance that a torn slot's check word matches.

use crate::{CT_CLOSE_QUIET, CT_F_FIN, CT_F_KEEP, CT_F_RST, CtEntry, FlowKey, hash};

/// Ways per set: 16 tags fill one cache line, and with 16 ways a set rarely overflows before
/// the table is half full (`set_overflow_is_rare_below_half_fill`).
pub const CT_WAYS: usize = 16;
/// Map flags of `CONNTRACK`: `BPF_F_MMAPABLE`, so userspace scans and edits it in place.
pub const CT_MAP_FLAGS: u32 = crate::BPF_F_MMAPABLE;
/// Words of a [`CtSlot`] key.
pub const CT_KEY_WORDS: usize = 5;

/// A flow key as five little-endian words: client address (2), VIP address (2), then the
/// ports word in the low half and `proto | family << 8` in the high half of the last.
pub type CtKey = [u64; CT_KEY_WORDS];

/// One way of a set: a tracked flow (its `last_seen` and flags are in [`CtSet::seen`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtSlot {
    /// The flow ([`ct_key`]).
    pub key: CtKey,
    /// `CtEntry::node`: where it goes.
    pub node: u32,
    /// `CtEntry::vip`.
    pub vip: u32,
    /// [`hash::ct_check`] of the way's tag, `node` and `vip`.
    pub check: u32,
    /// Explicit padding to one cache line; always zero.
    pub _pad: [u32; 3],
}

/// Value of `CONNTRACK`: one set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtSet {
    /// Per way: the flow's [`ct_tag`], 0 when the way is free. One cache line, so a lookup
    /// reads a slot line only on a tag match.
    pub tags: [u32; CT_WAYS],
    /// Per way: [`ct_seen`] of the flow's `last_seen` and flags. One cache line: all a full
    /// set's victim choice reads besides the tags (it was one slot line per way).
    pub seen: [u32; CT_WAYS],
    /// The ways.
    pub slots: [CtSlot; CT_WAYS],
}

/// Low bits of a [`CtSet::seen`] word: the `CT_F_*` flags; the time is above them.
pub const CT_FLAG_BITS: u32 = 3;
/// `CtEntry::last_seen` as stored: its low 29 bits, which wrap every ~18 years; [`ct_age`]
/// works modulo this.
pub const CT_TIME_MASK: u32 = u32::MAX >> CT_FLAG_BITS;

/// A way's `seen` word: `last_seen` (low 29 bits) above the flags.
#[inline(always)]
pub const fn ct_seen(last_seen: u32, flags: u32) -> u32 {
    last_seen << CT_FLAG_BITS | (flags & !(u32::MAX << CT_FLAG_BITS))
}

/// `(last_seen, flags)` of a `seen` word.
#[inline(always)]
pub const fn ct_seen_parts(seen: u32) -> (u32, u32) {
    (seen >> CT_FLAG_BITS, seen & !(u32::MAX << CT_FLAG_BITS))
}

/// Way `i`'s entry as stored (not checked: see [`ct_holds`]).
#[inline(always)]
pub fn ct_entry(set: &CtSet, i: usize) -> CtEntry {
    let (last_seen, flags) = ct_seen_parts(set.seen[i]);
    CtEntry {
        node: set.slots[i].node,
        vip: set.slots[i].vip,
        last_seen,
        flags,
    }
}

/// Words of a flow from the kernel's view: addresses as little-endian words (IPv4 in word 0),
/// the ports word as on the wire, protocol and family.
#[inline(always)]
pub const fn ct_key_words(
    client: &[u32; 4],
    vip: &[u32; 4],
    ports: u32,
    proto: u8,
    family: u8,
) -> CtKey {
    [
        client[0] as u64 | (client[1] as u64) << 32,
        client[2] as u64 | (client[3] as u64) << 32,
        vip[0] as u64 | (vip[1] as u64) << 32,
        vip[2] as u64 | (vip[3] as u64) << 32,
        ports as u64 | (proto as u64 | (family as u64) << 8) << 32,
    ]
}

/// The words of a [`FlowKey`].
#[inline(always)]
pub const fn ct_key(key: &FlowKey) -> CtKey {
    ct_key_words(
        &hash::addr_words(&key.src),
        &hash::addr_words(&key.dst),
        hash::ports_word(key.sport, key.dport),
        key.proto,
        key.family,
    )
}

/// The [`FlowKey`] of key words (inverse of [`ct_key`]).
pub const fn ct_flow_key(w: &CtKey) -> FlowKey {
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        src[i] = (w[i / 8] >> (8 * (i % 8))) as u8;
        dst[i] = (w[2 + i / 8] >> (8 * (i % 8))) as u8;
        i += 1;
    }
    let ports = w[4] as u32;
    FlowKey {
        src,
        dst,
        sport: ports as u16,
        dport: (ports >> 16) as u16,
        proto: (w[4] >> 32) as u8,
        family: (w[4] >> 40) as u8,
        _pad: [0; 2],
    }
}

/// A flow's tag: its 5-tuple hash, never 0 (0 marks a free way).
#[inline(always)]
pub const fn ct_tag(flow_hash: u32) -> u32 {
    if flow_hash == 0 { 1 } else { flow_hash }
}

/// The tag of a [`FlowKey`] under the balancer's hash `seed`.
#[inline(always)]
pub const fn ct_key_tag(seed: u32, key: &FlowKey) -> u32 {
    ct_tag(hash::flow_key_hash(seed, key, true))
}

/// The set of a tag in a table of `sets` sets.
#[inline(always)]
pub const fn ct_set_index(tag: u32, sets: u32) -> u32 {
    hash::route_index(tag, sets)
}

/// Sets for a table of `flows` entries.
pub const fn ct_sets_for(flows: u32) -> u32 {
    flows.div_ceil(CT_WAYS as u32)
}

/// Key equality without a `memcmp` (which BPF lacks).
#[inline(always)]
pub const fn same_key(a: &CtKey, b: &CtKey) -> bool {
    (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4]) == 0
}

/// Whether way `i` validly holds the flow (`key`, `tag`).
#[inline(always)]
pub fn ct_holds(set: &CtSet, i: usize, key: &CtKey, tag: u32) -> bool {
    let s = &set.slots[i];
    set.tags[i] == tag && same_key(&s.key, key) && s.check == hash::ct_check(tag, s.node, s.vip)
}

/// The way holding the flow, if any.
#[inline(always)]
pub fn ct_find(set: &CtSet, key: &CtKey, tag: u32) -> Option<usize> {
    ct_find_in(set, key, tag, CT_WAYS)
}

/// How long ago `last_seen` was at `now` (both `CtEntry::last_seen` units, compared modulo
/// [`CT_TIME_MASK`] as stored), 0 for a stamp ahead of `now`: another CPU (or the kernel, for a
/// userspace reader) may have written a later tick than the caller read, and a wrapped
/// difference would make that fresh entry the oldest.
#[inline(always)]
pub const fn ct_age(now: u32, last_seen: u32) -> u32 {
    let d = now.wrapping_sub(last_seen) & CT_TIME_MASK;
    if d > CT_TIME_MASK / 2 { 0 } else { d }
}

/// The way a new entry for the flow goes to: the flow's own way (a retransmitted SYN re-records
/// rather than duplicates), else a free way, else the victim: a closing flow (FIN/RST last,
/// quiet for `CT_CLOSE_QUIET`) first, then the least recently seen (`now` in
/// `CtEntry::last_seen` units). An entry without `CT_F_KEEP` (`keep` false: a new flow) never
/// evicts one with it; `None` when every way holds such a flow.
#[inline(always)]
pub fn ct_insert_way(set: &CtSet, key: &CtKey, tag: u32, now: u32, keep: bool) -> Option<usize> {
    ct_insert_way_in(set, key, tag, now, keep, CT_WAYS).map(|(w, _)| w)
}

// The `_in` forms scan the first `ways` ways (`CT_WAYS` in every call). The kernel calls them
// from global subprograms that get `ways` as an argument, so LLVM keeps each loop rolled (few
// registers, a small stack) and the verifier walks it once. Indices are reduced modulo
// `CT_WAYS`, which proves every access in bounds.

/// [`ct_find`] over the first `ways` ways.
#[inline(always)]
pub fn ct_find_in(set: &CtSet, key: &CtKey, tag: u32, ways: usize) -> Option<usize> {
    let mut i = 0;
    while i < ways {
        if ct_holds(set, i % CT_WAYS, key, tag) {
            return Some(i % CT_WAYS);
        }
        i += 1;
    }
    None
}

/// The flow's entry, copied once and checked as copied: the entry and check word of a way
/// whose tag matches are copied into `out` first, then the tag is read again, the key compared
/// and the copied check verified over the copied entry. A store racing with the read (tag := 0,
/// slot, check, tag) changes the tag or breaks the check, so what `out` holds on `true` is
/// never another flow's entry (a check-then-copy could return the evicting flow's). The copy
/// goes straight to `out`: the kernel's stack has no room for another.
///
/// # Safety
/// `set` is valid for reads (a live `CONNTRACK` value or its mapping), `out` for writes.
#[inline(always)]
pub unsafe fn ct_get_in(
    set: *const CtSet,
    key: &CtKey,
    tag: u32,
    ways: usize,
    out: *mut CtEntry,
) -> bool {
    // SAFETY: per the contract.
    unsafe { ct_get_with(set, key, tag, ways, out, |_| {}) }
}

/// [`ct_get_in`] with `between(way)` run after the copy and before the checks (tests interleave
/// a store there).
///
/// # Safety
/// As [`ct_get_in`].
#[inline(always)]
pub unsafe fn ct_get_with(
    set: *const CtSet,
    key: &CtKey,
    tag: u32,
    ways: usize,
    out: *mut CtEntry,
    mut between: impl FnMut(usize),
) -> bool {
    let mut i = 0;
    while i < ways {
        let w = i % CT_WAYS;
        // SAFETY: per the contract; `w` is a way of the set. Volatile reads keep the copy
        // before the checks (other CPUs write this memory concurrently).
        unsafe {
            let t = &raw const (*set).tags[w];
            if t.read_volatile() == tag {
                let s = &raw const (*set).slots[w];
                (*out).node = (&raw const (*s).node).read_volatile();
                (*out).vip = (&raw const (*s).vip).read_volatile();
                let (last_seen, flags) = ct_seen_parts((&raw const (*set).seen[w]).read_volatile());
                (*out).last_seen = last_seen;
                (*out).flags = flags;
                let check = (&raw const (*s).check).read_volatile();
                between(w);
                if t.read_volatile() == tag
                    && same_key(&(*s).key, key)
                    && check == hash::ct_check(tag, (*out).node, (*out).vip)
                {
                    return true;
                }
            }
        }
        i += 1;
    }
    false
}

/// [`ct_insert_way`] over the first `ways` ways, and whether the way holds another flow (an
/// eviction). The free way is found in a second pass rather than remembered in the first: a
/// carried index would multiply the verifier's states.
#[inline(always)]
pub fn ct_insert_way_in(
    set: &CtSet,
    key: &CtKey,
    tag: u32,
    now: u32,
    keep: bool,
    ways: usize,
) -> Option<(usize, bool)> {
    let mut i = 0;
    while i < ways {
        let w = i % CT_WAYS;
        if set.tags[w] == tag && same_key(&set.slots[w].key, key) {
            return Some((w, false));
        }
        i += 1;
    }
    let mut i = 0;
    while i < ways {
        let w = i % CT_WAYS;
        if set.tags[w] == 0 {
            return Some((w, false));
        }
        i += 1;
    }
    // Full set: reads the `seen` line. Ties are broken from a start that depends on the tag,
    // so same-age sets do not always evict the same way.
    let start = tag as usize % CT_WAYS;
    let mut best = CT_WAYS;
    let mut best_score = 0u64;
    let mut j = 0;
    while j < ways {
        let w = (start + j) % CT_WAYS;
        let (last_seen, flags) = ct_seen_parts(set.seen[w]);
        if keep || flags & CT_F_KEEP == 0 {
            let age = ct_age(now, last_seen);
            let closing = flags & (CT_F_FIN | CT_F_RST) != 0 && age >= CT_CLOSE_QUIET;
            let score = ((closing as u64) << 32) | age as u64;
            if best == CT_WAYS || score > best_score {
                best = w;
                best_score = score;
            }
        }
        j += 1;
    }
    if best == CT_WAYS {
        return None;
    }
    Some((best, true))
}

/// Writes way `i` of a set in the order readers rely on: tag cleared, slot and check word
/// written, tag set. Field by field with volatile stores, so nothing is staged on the kernel's
/// small stack and the stores stay in this order.
///
/// # Safety
/// `set` is valid for writes (a live `CONNTRACK` value or its mapping).
#[inline(always)]
pub unsafe fn ct_store(set: *mut CtSet, i: usize, key: &CtKey, tag: u32, e: &CtEntry) {
    let i = i % CT_WAYS;
    // SAFETY: per the contract; `i` is reduced to a way of the set.
    unsafe {
        let t = &raw mut (*set).tags[i];
        let s = &raw mut (*set).slots[i];
        t.write_volatile(0);
        let mut j = 0;
        while j < CT_KEY_WORDS {
            (&raw mut (*s).key[j]).write_volatile(key[j]);
            j += 1;
        }
        (&raw mut (*s).node).write_volatile(e.node);
        (&raw mut (*s).vip).write_volatile(e.vip);
        (&raw mut (*s).check).write_volatile(hash::ct_check(tag, e.node, e.vip));
        (&raw mut (*set).seen[i]).write_volatile(ct_seen(e.last_seen, e.flags));
        t.write_volatile(tag);
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::{FAMILY_V4, FAMILY_V6};

    /// Any seed: the tests are about ways and tags, not which set a flow lands in.
    const SEED: u32 = 0x5eed_0001;

    /// A store that evicts the flow while it is being read (between the copy and the checks)
    /// yields no entry, never the evicting flow's.
    #[test]
    fn a_read_racing_an_eviction_never_returns_the_other_flow() {
        let (ka, kb) = (ct_key(&key(1, FAMILY_V4)), ct_key(&key(2, FAMILY_V4)));
        let (ta, tb) = (7, 9);
        let a = CtEntry {
            node: 1,
            vip: 3,
            last_seen: 10,
            flags: 0,
        };
        let b = CtEntry { node: 2, ..a };
        let mut set = CtSet::default();
        let p = &raw mut set;
        // SAFETY: `p` points at a live set for the whole test.
        unsafe {
            let get = move |between: &mut dyn FnMut(usize)| {
                let mut out = CtEntry::default();
                ct_get_with(p, &ka, ta, CT_WAYS, &mut out, between).then_some(out)
            };
            ct_store(p, 0, &ka, ta, &a);
            assert_eq!(get(&mut |_| {}), Some(a));
            // B takes A's way mid-read.
            let got = get(&mut |w| ct_store(p, w, &kb, tb, &b));
            assert_eq!(got, None);
            // A is rewritten to another node after the copy: the read returns the flow's own
            // entry as copied (consistent: its check word matched), the next read the new one.
            ct_store(p, 0, &ka, ta, &a);
            let got = get(&mut |w| ct_store(p, w, &ka, ta, &b));
            assert_eq!(got, Some(a));
            // A torn copy (node from one store, check word from another) is refused.
            ct_store(p, 0, &ka, ta, &a);
            (*p).slots[0].check = hash::ct_check(ta, b.node, b.vip);
            assert_eq!(get(&mut |_| {}), None);
            ct_store(p, 0, &ka, ta, &b);
            assert_eq!(get(&mut |_| {}), Some(b));
            // A half-done store (tag cleared) reads as absent.
            let got = get(&mut |w| (*p).tags[w] = 0);
            assert_eq!(got, None);
        }
    }

    fn key(n: u32, family: u8) -> FlowKey {
        let mut k = FlowKey {
            sport: n as u16,
            dport: 80u16.to_be(),
            proto: 6,
            family,
            ..Default::default()
        };
        k.src[..4].copy_from_slice(&n.to_be_bytes());
        k.dst[..4].copy_from_slice(&[10, 0, 0, 1]);
        if family == FAMILY_V6 {
            k.src[15] = 7;
            k.dst[15] = 9;
        }
        k
    }

    fn put(set: &mut CtSet, i: usize, k: &FlowKey, node: u32, last_seen: u32, flags: u32) {
        let tag = ct_key_tag(SEED, k);
        set.tags[i] = tag;
        set.slots[i] = CtSlot {
            key: ct_key(k),
            node,
            vip: 3,
            check: hash::ct_check(tag, node, 3),
            _pad: [0; 3],
        };
        set.seen[i] = ct_seen(last_seen, flags);
    }

    #[test]
    fn key_words_round_trip_and_match_the_kernel_view() {
        for fam in [FAMILY_V4, FAMILY_V6] {
            let k = key(0x0a01_0203, fam);
            assert_eq!(ct_flow_key(&ct_key(&k)), k);
        }
        let k = key(0x0a01_0203, FAMILY_V4);
        // What the kernel builds from packet words.
        let client = hash::addr_words(&k.src);
        let vip = hash::addr_words(&k.dst);
        let ports = hash::ports_word(k.sport, k.dport);
        assert_eq!(ct_key_words(&client, &vip, ports, 6, FAMILY_V4), ct_key(&k));
        // The words are the FlowKey's own bytes, little-endian.
        let mut bytes = [0u8; 40];
        for (i, w) in ct_key(&k).iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        assert_eq!(&bytes[..16], &k.src);
        assert_eq!(&bytes[16..32], &k.dst);
        assert_eq!(bytes[36], 6);
        assert_eq!(bytes[37], FAMILY_V4);
    }

    #[test]
    fn find_needs_tag_key_and_check() {
        let mut set = CtSet::default();
        let a = key(1, FAMILY_V4);
        let b = key(2, FAMILY_V4);
        put(&mut set, 5, &a, 9, 0, 0);
        let (ka, ta) = (ct_key(&a), ct_key_tag(SEED, &a));
        assert_eq!(ct_find(&set, &ka, ta), Some(5));
        assert_eq!(ct_find(&set, &ct_key(&b), ct_key_tag(SEED, &b)), None);
        // A torn slot: node rewritten, check not (yet).
        set.slots[5].node = 4;
        assert_eq!(ct_find(&set, &ka, ta), None);
        set.slots[5].check = hash::ct_check(ta, 4, 3);
        assert_eq!(ct_find(&set, &ka, ta), Some(5));
        // Same tag, other key (a tag collision) is not the flow.
        set.slots[5].key = ct_key(&b);
        assert_eq!(ct_find(&set, &ka, ta), None);
        // A freed way.
        set.slots[5].key = ka;
        set.tags[5] = 0;
        assert_eq!(ct_find(&set, &ka, ta), None);
    }

    #[test]
    fn insert_prefers_own_then_free_then_quiet_closing_then_oldest_never_kept() {
        let mut set = CtSet::default();
        let flows: [FlowKey; CT_WAYS] = core::array::from_fn(|i| key(100 + i as u32, FAMILY_V6));
        let new = key(7, FAMILY_V6);
        let (kn, tn) = (ct_key(&new), ct_key_tag(SEED, &new));
        // Free ways are taken in order.
        assert_eq!(ct_insert_way(&set, &kn, tn, 50, false).unwrap(), 0);
        for (i, f) in flows.iter().enumerate().take(3) {
            put(&mut set, i, f, 1, 40, 0);
        }
        assert_eq!(ct_insert_way(&set, &kn, tn, 50, false).unwrap(), 3);
        // The flow's own way, even with free ways before it.
        put(&mut set, 6, &new, 1, 40, 0);
        assert_eq!(ct_insert_way(&set, &kn, tn, 50, false).unwrap(), 6);
        set.tags[6] = 0;
        // Full: the oldest loses.
        for (i, f) in flows.iter().enumerate() {
            put(&mut set, i, f, 1, 20 + i as u32, 0);
        }
        put(&mut set, 4, &flows[4], 1, 10, 0);
        assert_eq!(ct_insert_way(&set, &kn, tn, 50, false).unwrap(), 4);
        // A closing flow loses before an older open one, once it has been quiet (a FIN/RST
        // of a flow still talking, as a forged one would be, does not make it the victim).
        put(&mut set, 2, &flows[2], 1, 49, CT_F_FIN);
        assert_eq!(ct_insert_way(&set, &kn, tn, 50, false).unwrap(), 4);
        put(&mut set, 2, &flows[2], 1, 50 - CT_CLOSE_QUIET, CT_F_RST);
        assert_eq!(ct_insert_way(&set, &kn, tn, 50, false).unwrap(), 2);
        // Flows on moved routes (`CT_F_KEEP`) are out of a new flow's reach: the oldest other
        // one loses, and none when all are kept; another kept flow may evict them.
        put(&mut set, 2, &flows[2], 1, 5, CT_F_KEEP | CT_F_FIN);
        put(&mut set, 4, &flows[4], 1, 6, CT_F_KEEP);
        assert_eq!(ct_insert_way(&set, &kn, tn, 50, false).unwrap(), 0);
        assert_eq!(ct_insert_way(&set, &kn, tn, 50, true).unwrap(), 2);
        for (i, f) in flows.iter().enumerate() {
            put(&mut set, i, f, 1, 20, CT_F_KEEP);
        }
        assert_eq!(ct_insert_way(&set, &kn, tn, 50, false), None);
        assert!(ct_insert_way(&set, &kn, tn, 50, true).is_some());
        // Its own way, kept or not.
        put(&mut set, 9, &new, 1, 20, CT_F_KEEP);
        assert_eq!(ct_insert_way(&set, &kn, tn, 50, false), Some(9));
        // Ages survive the clock wrapping.
        let mut set2 = CtSet::default();
        for (i, f) in flows.iter().enumerate() {
            put(&mut set2, i, f, 1, 3, 0);
        }
        put(&mut set2, 1, &flows[1], 1, u32::MAX - 5, 0);
        assert_eq!(ct_insert_way(&set2, &kn, tn, 5, false).unwrap(), 1);
    }

    #[test]
    fn a_stamp_ahead_of_now_is_fresh() {
        assert_eq!(ct_age(10, 7), 3);
        assert_eq!(ct_age(10, 11), 0);
        assert_eq!(ct_age(2, u32::MAX - 1), 4);
        // Stored stamps keep 29 bits: ages still come out right across that wrap.
        let (stored, _) = ct_seen_parts(ct_seen(u32::MAX - 1, CT_F_KEEP));
        assert_eq!(ct_age(2, stored), 4);
        assert_eq!(ct_age(u32::MAX - 1, stored), 0);
        assert_eq!(
            ct_seen_parts(ct_seen(77, CT_F_FIN | CT_F_KEEP)),
            (77, CT_F_FIN | CT_F_KEEP)
        );
        // Full set: the way stamped one tick ahead (by another CPU) is not the oldest.
        let mut set = CtSet::default();
        for i in 0..CT_WAYS {
            put(&mut set, i, &key(300 + i as u32, FAMILY_V4), 1, 100, 0);
        }
        put(&mut set, 5, &key(305, FAMILY_V4), 1, 101, 0);
        put(&mut set, 9, &key(309, FAMILY_V4), 1, 90, 0);
        let k = key(7, FAMILY_V4);
        let w = ct_insert_way(&set, &ct_key(&k), ct_key_tag(SEED, &k), 100, false);
        assert_eq!(w, Some(9));
    }

    #[test]
    fn same_age_evictions_spread_over_ways() {
        let mut set = CtSet::default();
        for i in 0..CT_WAYS {
            put(&mut set, i, &key(200 + i as u32, FAMILY_V4), 1, 0, 0);
        }
        let mut hit = [0u32; CT_WAYS];
        for n in 0..4000 {
            let k = key(10_000 + n, FAMILY_V4);
            hit[ct_insert_way(&set, &ct_key(&k), ct_key_tag(SEED, &k), 0, false).unwrap()] += 1;
        }
        let even = 4000 / CT_WAYS as u32;
        for h in hit {
            assert!((even * 7 / 10..=even * 13 / 10).contains(&h), "{hit:?}");
        }
    }

    /// Share of inserts that evict a live flow at a given fill, uniform random flows: the
    /// sizing advice of docs/dataplane.md. Fills the table to `fill` (inserting flows with
    /// increasing `last_seen`), then measures 20,000 more inserts, removing the oldest flow
    /// per insert so the fill holds.
    fn evicting_share(fill: f64) -> f64 {
        const SETS: u32 = 4096;
        let mut table = std::vec![CtSet::default(); SETS as usize];
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut live = std::collections::VecDeque::new();
        let target = (fill * (SETS as usize * CT_WAYS) as f64) as usize;
        let (mut inserts, mut evictions) = (0u32, 0u32);
        for now in 0..(target as u32 + 20_000) {
            let r = next();
            let k = FlowKey {
                src: [0; 16],
                dst: [0; 16],
                sport: r as u16,
                dport: (r >> 16) as u16,
                proto: 6,
                family: FAMILY_V6,
                _pad: [0; 2],
            };
            let mut k = k;
            k.src[..8].copy_from_slice(&(r >> 32).to_le_bytes());
            let (tag, words) = (ct_key_tag(SEED, &k), ct_key(&k));
            let set = &mut table[ct_set_index(tag, SETS) as usize];
            let (w, evicts) =
                ct_insert_way_in(set, &words, tag, now, false, CT_WAYS).expect("no flow is kept");
            set.tags[w] = tag;
            set.slots[w].key = words;
            set.seen[w] = ct_seen(now, 0);
            if now as usize >= target {
                inserts += 1;
                evictions += u32::from(evicts);
                // Keep the fill: the oldest flow ends (if still there).
                if let Some(old) = live.pop_front() {
                    let (ot, ok): (u32, CtKey) = old;
                    let s = &mut table[ct_set_index(ot, SETS) as usize];
                    if let Some(i) = (0..CT_WAYS).find(|&i| s.tags[i] == ot && s.slots[i].key == ok)
                    {
                        s.tags[i] = 0;
                    }
                }
            }
            live.push_back((tag, words));
        }
        f64::from(evictions) / f64::from(inserts)
    }

    #[test]
    fn set_overflow_is_rare_below_half_fill() {
        let quarter = evicting_share(0.25);
        let half = evicting_share(0.5);
        std::println!("evicting inserts: 25% fill {quarter:.5}, 50% fill {half:.5}");
        assert!(quarter < 0.0005, "{quarter}");
        assert!(half < 0.01, "{half}");
    }

    #[test]
    fn sets_cover_the_table() {
        assert_eq!(ct_sets_for(1 << 20), 1 << 16);
        assert_eq!(ct_sets_for(17), 2);
        assert_eq!(ct_tag(0), 1);
        for t in [1u32, 0x8000_0000, u32::MAX] {
            assert!(ct_set_index(t, 1000) < 1000);
        }
    }
}
