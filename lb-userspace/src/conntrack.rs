//! `CONNTRACK` from userspace: the map mmapped (it is created `BPF_F_MMAPABLE`), read and edited
//! with the kernel's own rules from `lb_common::ct`, so a scan of a million flows costs memory
//! reads, not a syscall per entry.

use std::{
    io,
    os::fd::{AsRawFd as _, OwnedFd},
    ptr::NonNull,
};

use lb_common::{
    CtEntry, FlowKey,
    ct::{
        CT_WAYS, CtSet, ct_find, ct_flow_key, ct_holds, ct_insert_way, ct_key, ct_key_tag,
        ct_set_index, ct_store,
    },
};

/// The mapped table.
pub struct CtTable {
    base: NonNull<CtSet>,
    sets: u32,
    len: usize,
    /// Keeps the map alive for as long as the mapping.
    _fd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory owned by this value; access goes through
// volatile reads and writes.
unsafe impl Send for CtTable {}

impl CtTable {
    /// Maps the `CONNTRACK` array behind `fd`, which has `sets` entries.
    pub fn map(fd: OwnedFd, sets: u32) -> io::Result<Self> {
        if sets == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "CONNTRACK has no sets",
            ));
        }
        // SAFETY: no arguments.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = (sets as usize * size_of::<CtSet>()).next_multiple_of(page);
        // SAFETY: a fresh shared mapping of the map's fd; checked for failure below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<CtSet>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self {
            base,
            sets,
            len,
            _fd: fd,
        })
    }

    /// Sets in the table.
    pub fn sets(&self) -> u32 {
        self.sets
    }

    fn set_ptr(&self, i: u32) -> *mut CtSet {
        debug_assert!(i < self.sets);
        // SAFETY: `i < sets`, inside the mapping.
        unsafe { self.base.as_ptr().add(i as usize) }
    }

    /// A snapshot of set `i`.
    fn read(&self, i: u32) -> CtSet {
        // SAFETY: inside the mapping; the kernel may be writing, hence volatile.
        unsafe { self.set_ptr(i).read_volatile() }
    }

    fn set_of(&self, key: &FlowKey) -> (u32, u32) {
        let tag = ct_key_tag(key);
        (tag, ct_set_index(tag, self.sets))
    }

    /// Every tracked flow (ways that validate: tag, key and check word agree).
    pub fn entries(&self) -> Vec<(FlowKey, CtEntry)> {
        let mut out = Vec::new();
        for i in 0..self.sets {
            let set = self.read(i);
            for w in 0..CT_WAYS {
                let tag = set.tags[w];
                if tag == 0 {
                    continue;
                }
                let key = ct_flow_key(&set.slots[w].key);
                if ct_key_tag(&key) == tag && ct_holds(&set, w, &set.slots[w].key, tag) {
                    out.push((key, set.slots[w].entry));
                }
            }
        }
        out
    }

    /// One flow's entry.
    pub fn get(&self, key: &FlowKey) -> Option<CtEntry> {
        let (tag, i) = self.set_of(key);
        let set = self.read(i);
        ct_find(&set, &ct_key(key), tag).map(|w| set.slots[w].entry)
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

    /// Records a flow where the kernel would (its own way, a free way, or the victim), in the
    /// kernel's write order.
    pub fn insert(&mut self, key: &FlowKey, entry: &CtEntry) {
        let (tag, i) = self.set_of(key);
        let words = ct_key(key);
        let w = ct_insert_way(&self.read(i), &words, tag, entry.last_seen);
        // SAFETY: a set inside the mapping.
        unsafe { ct_store(self.set_ptr(i), w, &words, tag, entry) };
    }
}

impl Drop for CtTable {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
