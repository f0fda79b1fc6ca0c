//! Packet access for the XDP programs: the frame's bounds, the one bounds check, and plain
//! loads and stores at addresses it returned. Shared by the balancer and the decapsulator.
//!
//! Addresses are `usize`, not references: the verifier tracks packet pointers through plain
//! arithmetic, and typed references to unaligned packet memory would be undefined behaviour.
use core::mem::size_of;

use aya_ebpf::programs::XdpContext;

use crate::parse::{ETH_HLEN, ETH_P_8021Q, ETH_VLAN_HLEN, VLAN_HLEN, eth, vlan};

/// The frame's bounds, read from the context (again after every head/tail adjustment).
#[derive(Clone, Copy)]
pub struct Frame {
    pub start: usize,
    pub end: usize,
}

impl Frame {
    #[inline(always)]
    pub fn of(ctx: &XdpContext) -> Self {
        Self {
            start: ctx.data(),
            end: ctx.data_end(),
        }
    }

    #[inline(always)]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// The one bounds check: a `T` at byte `off` lies inside the frame.
    #[inline(always)]
    pub fn ptr_at<T>(&self, off: usize) -> Option<*mut T> {
        let p = self.start + off;
        if p + size_of::<T>() > self.end {
            return None;
        }
        Some(p as *mut T)
    }

    /// `ptr_at` for an `N`-byte header, as its address (read it with `ld` and friends).
    #[inline(always)]
    pub fn at<const N: usize>(&self, off: usize) -> Option<usize> {
        self.ptr_at::<[u8; N]>(off).map(|p| p as usize)
    }

    /// Step 1: the ethertype and the L3 offset, behind at most one 802.1Q tag (skipped). None
    /// when the frame is too short for the Ethernet header or the tag.
    #[inline(always)]
    pub fn l3(&self) -> Option<(u16, usize)> {
        let e = self.at::<ETH_HLEN>(0)?;
        let ethertype = be16(e + eth::ETHER_TYPE);
        if ethertype != ETH_P_8021Q {
            return Some((ethertype, ETH_HLEN));
        }
        let tag = self.at::<VLAN_HLEN>(ETH_HLEN)?;
        Some((be16(tag + vlan::ETHER_TYPE), ETH_VLAN_HLEN))
    }
}

/// A `T` from packet (or map) memory at `p`, bounds already checked by the caller.
///
/// Packet fields are only 2-byte aligned behind a 14-byte Ethernet header. A plain typed load
/// makes LLVM emit one BPF load instead of a byte-by-byte sequence (which also spills heavily);
/// the kernel permits unaligned packet loads on the architectures XDP runs on.
#[inline(always)]
pub fn ld<T: Copy>(p: usize) -> T {
    // SAFETY: every caller passes an address inside a bounds-checked header.
    unsafe { (p as *const T).read() }
}

/// A big-endian 16-bit field in host order.
#[inline(always)]
pub fn be16(p: usize) -> u16 {
    u16::from_be(ld::<u16>(p))
}

/// A big-endian 32-bit field in host order.
#[inline(always)]
pub fn be32(p: usize) -> u32 {
    u32::from_be(ld::<u32>(p))
}

/// A port as stored in keys: the wire bytes read as a native `u16`.
#[inline(always)]
pub fn port(p: usize) -> u16 {
    ld::<u16>(p)
}

/// Wire bytes read as a little-endian word (the hash and key convention of `lb-common`).
#[inline(always)]
pub fn le32(p: usize) -> u32 {
    u32::from_le(ld::<u32>(p))
}

/// A 16-byte address as four `le32` words.
#[inline(always)]
pub fn words16(p: usize) -> [u32; 4] {
    [le32(p), le32(p + 4), le32(p + 8), le32(p + 12)]
}

/// Address words back to wire bytes (the words were read little-endian).
#[inline(always)]
pub fn bytes16(w: &[u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let x = w[i].to_le_bytes();
        b[i * 4] = x[0];
        b[i * 4 + 1] = x[1];
        b[i * 4 + 2] = x[2];
        b[i * 4 + 3] = x[3];
        i += 1;
    }
    b
}

/// Copies `N` (even) bytes into the packet at `p` (2-byte aligned) as 16-bit stores.
///
/// # Safety
/// `p .. p + N` must be bounds-checked packet memory.
#[inline(always)]
pub unsafe fn put<const N: usize>(p: usize, bytes: &[u8; N]) {
    let mut i = 0;
    while i + 1 < N {
        // SAFETY: the caller checked `p .. p + N` against the frame end.
        unsafe { ((p + i) as *mut u16).write(u16::from_ne_bytes([bytes[i], bytes[i + 1]])) };
        i += 2;
    }
}

/// Stores a 16-bit word at `p` as it is (no byte swap).
///
/// # Safety
/// `p .. p + 2` must be bounds-checked packet memory.
#[inline(always)]
pub unsafe fn st16(p: usize, v: u16) {
    // SAFETY: the caller checked `p .. p + 2`.
    unsafe { (p as *mut u16).write(v) }
}

/// Stores a 32-bit word at `p` as it is (no byte swap).
///
/// # Safety
/// `p .. p + 4` must be bounds-checked packet memory.
#[inline(always)]
pub unsafe fn st32(p: usize, v: u32) {
    // SAFETY: the caller checked `p .. p + 4`.
    unsafe { (p as *mut u32).write(v) }
}

/// A MAC address as a 16-bit and a 32-bit word (two loads/stores instead of six).
#[derive(Clone, Copy)]
pub struct Mac {
    pub hi: u16,
    pub lo: u32,
}

impl Mac {
    /// The MAC at `p` (packet or map memory, 6 bytes checked by the caller).
    #[inline(always)]
    pub fn load(p: usize) -> Self {
        Self {
            hi: ld(p),
            lo: ld(p + 2),
        }
    }

    /// # Safety
    /// `p .. p + 6` must be bounds-checked packet memory.
    #[inline(always)]
    pub unsafe fn store(self, p: usize) {
        // SAFETY: as the caller promised.
        unsafe {
            st16(p, self.hi);
            st32(p + 2, self.lo);
        }
    }
}
