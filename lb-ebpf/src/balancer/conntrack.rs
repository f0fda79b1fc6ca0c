//! `CONNTRACK` set operations (step 9): global subprograms, so the verifier checks each once
//! rather than once per path that reaches it (there are hundreds), and a way index never
//! leaves them. `ways` is always `CT_WAYS`; as an argument it keeps the scans rolled (see
//! `lb_common::ct`, which has the layout, the way choice and why no lock is needed). `set` is a
//! `CONNTRACK` value, `key` the flow's words, `tag` its tag. They return 1 or 0 (globals
//! return scalars). Safety, for all three: each pointer is null (then they do nothing) or
//! valid for its type; the verifier enforces this on every call.
use lb_common::{
    CT_F_KEEP, CtEntry,
    ct::{CT_WAYS, CtKey, CtSet, ct_find_in, ct_get_in, ct_insert_way_in, ct_seen, ct_store},
};

use super::events::note_evict;

/// Copies the flow's entry to `out`; 0 if the flow is not tracked. A way another CPU is
/// rewriting fails the check word (a miss), never gives a torn entry.
///
/// # Safety
/// Each pointer is null or valid for its type (see the module docs).
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn lb_ct_get(
    set: *mut CtSet,
    key: *const CtKey,
    tag: u32,
    ways: usize,
    out: *mut CtEntry,
) -> u32 {
    // verifier: a global's pointer arguments may be null.
    if set.is_null() || key.is_null() || out.is_null() {
        return 0;
    }
    // SAFETY: non-null pointers to a live set, a key and an entry (the verifier checks sizes).
    unsafe { ct_get_in(set, &*key, tag, ways.min(CT_WAYS), out) as u32 }
}

/// `lb_ct_put` results: stored in the flow's own or a free way; stored over a victim; over a
/// victim noted for the event log; not stored (the set holds only `CT_F_KEEP` flows).
pub(crate) const CT_PUT_STORED: u32 = 1;
pub(crate) const CT_PUT_EVICTED: u32 = 2;
pub(crate) const CT_PUT_EVICTED_LOGGED: u32 = 3;
pub(crate) const CT_PUT_FULL: u32 = 4;

/// Records `e` for the flow (`ct_store`): in its own way, else a free one, else the set's
/// victim (`ct_insert_way_in`); returns a `CT_PUT_*`.
///
/// # Safety
/// Each pointer is null or valid for its type (see the module docs).
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn lb_ct_put(
    set: *mut CtSet,
    key: *const CtKey,
    tag: u32,
    ways: usize,
    e: *const CtEntry,
) -> u32 {
    // verifier: a global's pointer arguments may be null.
    if set.is_null() || key.is_null() || e.is_null() {
        return 0;
    }
    // SAFETY: as in `lb_ct_get`.
    unsafe {
        let keep = (*e).flags & CT_F_KEEP != 0;
        let Some((i, evicts)) =
            ct_insert_way_in(&*set, &*key, tag, (*e).last_seen, keep, ways.min(CT_WAYS))
        else {
            return CT_PUT_FULL;
        };
        let mut r = CT_PUT_STORED;
        if evicts {
            // The victim's record is written by the caller (see `note_evict`).
            r = if (*set).slots.get(i).is_some_and(note_evict) {
                CT_PUT_EVICTED_LOGGED
            } else {
                CT_PUT_EVICTED
            };
        }
        ct_store(set, i, &*key, tag, &*e);
        r
    }
}

/// Stores `e.last_seen` and `e.flags` in the flow's way, if it is still there: fields the
/// check word does not cover, so no reader sees them torn against the node.
///
/// # Safety
/// Each pointer is null or valid for its type (see the module docs).
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn lb_ct_touch(
    set: *mut CtSet,
    key: *const CtKey,
    tag: u32,
    ways: usize,
    e: *const CtEntry,
) -> u32 {
    // verifier: a global's pointer arguments may be null.
    if set.is_null() || key.is_null() || e.is_null() {
        return 0;
    }
    // SAFETY: as in `lb_ct_get`.
    unsafe {
        let Some(i) = ct_find_in(&*set, &*key, tag, ways.min(CT_WAYS)) else {
            return 0;
        };
        (&raw mut (*set).seen[i]).write_volatile(ct_seen((*e).last_seen, (*e).flags));
    }
    1
}
