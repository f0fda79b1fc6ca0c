//! `CONNTRACK` from userspace: the map mmapped (it is created `BPF_F_MMAPABLE`), read and edited
//! with the kernel's own rules from `lb_common::ct`, so a scan of a million flows costs memory
//! reads, not a syscall per entry.

use std::{io, os::fd::OwnedFd};

use lb_common::{
    CT_F_KEEP, CtEntry, FlowKey,
    ct::{
        CT_WAYS, CtSet, ct_entry, ct_find, ct_flow_key, ct_get_in, ct_holds, ct_insert_way, ct_key,
        ct_key_tag, ct_seen, ct_seen_parts, ct_set_index, ct_store,
    },
};

use crate::mmap::MappedArray;

/// The mapped table.
pub struct CtTable {
    sets: MappedArray<CtSet>,
    /// The flow-hash seed the kernel tags flows with (a flow's set and tag depend on it).
    seed: u32,
}

impl CtTable {
    /// Maps the `CONNTRACK` array behind `fd`, which has `sets` entries, for flows hashed
    /// with `seed`.
    pub fn map(fd: OwnedFd, sets: u32, seed: u32) -> io::Result<Self> {
        if sets == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "CONNTRACK has no sets",
            ));
        }
        Ok(Self {
            sets: MappedArray::map(fd, sets)?,
            seed,
        })
    }

    /// The flow-hash seed.
    pub fn seed(&self) -> u32 {
        self.seed
    }

    /// Flows are hashed with `seed` from now on.
    pub fn set_seed(&mut self, seed: u32) {
        self.seed = seed;
    }

    /// Sets in the table.
    pub fn sets(&self) -> u32 {
        self.sets.len()
    }

    fn set_ptr(&self, i: u32) -> *mut CtSet {
        self.sets.ptr(i)
    }

    /// A snapshot of set `i`.
    fn read(&self, i: u32) -> CtSet {
        self.sets.get(i)
    }

    fn set_of(&self, key: &FlowKey) -> (u32, u32) {
        let tag = ct_key_tag(self.seed, key);
        (tag, ct_set_index(tag, self.sets.len()))
    }

    /// Every tracked flow (ways that validate: tag, key and check word agree).
    pub fn entries(&self) -> Vec<(FlowKey, CtEntry)> {
        let mut out = Vec::new();
        for i in 0..self.sets.len() {
            let set = self.read(i);
            for w in 0..CT_WAYS {
                let tag = set.tags[w];
                if tag == 0 {
                    continue;
                }
                let key = ct_flow_key(&set.slots[w].key);
                if ct_key_tag(self.seed, &key) == tag && ct_holds(&set, w, &set.slots[w].key, tag) {
                    out.push((key, ct_entry(&set, w)));
                }
            }
        }
        out
    }

    /// One flow's entry.
    pub fn get(&self, key: &FlowKey) -> Option<CtEntry> {
        let (tag, i) = self.set_of(key);
        let mut out = CtEntry::default();
        // SAFETY: set `i` lies inside the mapping; read as the kernel reads it.
        unsafe { ct_get_in(self.set_ptr(i), &ct_key(key), tag, CT_WAYS, &mut out) }.then_some(out)
    }

    /// Forgets a flow; true if it was tracked.
    pub fn remove(&mut self, key: &FlowKey) -> bool {
        let (tag, i) = self.set_of(key);
        let words = ct_key(key);
        let set = self.read(i);
        let mut found = false;
        for w in 0..CT_WAYS {
            if ct_holds(&set, w, &words, tag) {
                // SAFETY: way `w` of a set inside the mapping.
                unsafe { (&raw mut (*self.set_ptr(i)).tags[w]).write_volatile(0) };
                found = true;
            }
        }
        found
    }

    /// Rewrites a tracked flow's flags in place (its `seen` word, one 32-bit store, as the
    /// kernel's `lb_ct_touch` does): unlike `insert`, the way never reads as free meanwhile, so
    /// a packet racing the rewrite still finds its flow. False if the flow is not tracked.
    pub fn set_flags(&mut self, key: &FlowKey, flags: u32) -> bool {
        let (tag, i) = self.set_of(key);
        let words = ct_key(key);
        let Some(w) = ct_find(&self.read(i), &words, tag) else {
            return false;
        };
        // SAFETY: way `w` of a set inside the mapping.
        unsafe {
            let seen = &raw mut (*self.set_ptr(i)).seen[w];
            let (last_seen, _) = ct_seen_parts(seen.read_volatile());
            seen.write_volatile(ct_seen(last_seen, flags));
        }
        true
    }

    /// Records a flow where the kernel would (its own way, a free way, or the victim), in the
    /// kernel's write order; false when the set has no way it may take (see
    /// `ct_insert_way`).
    pub fn insert(&mut self, key: &FlowKey, entry: &CtEntry) -> bool {
        let (tag, i) = self.set_of(key);
        let words = ct_key(key);
        let keep = entry.flags & CT_F_KEEP != 0;
        let Some(w) = ct_insert_way(&self.read(i), &words, tag, entry.last_seen, keep) else {
            return false;
        };
        // SAFETY: a set inside the mapping.
        unsafe { ct_store(self.set_ptr(i), w, &words, tag, entry) };
        true
    }
}
