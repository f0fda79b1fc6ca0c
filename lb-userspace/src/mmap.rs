//! A `BPF_F_MMAPABLE` array map mapped into this process: entries are read and written as
//! memory (volatile, since the kernel's programs use the same memory), so a scan or a batch of
//! writes costs memory accesses, not a syscall (about 1-3 us) per entry.

use std::{
    io,
    os::fd::{AsRawFd as _, OwnedFd},
    ptr::NonNull,
};

/// A mapped array of `len` entries of `T`.
pub struct MappedArray<T: Copy> {
    base: NonNull<T>,
    len: u32,
    /// Bytes mapped (whole pages).
    bytes: usize,
    /// Keeps the map alive for as long as the mapping.
    _fd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory owned by this value; access goes through
// volatile reads and writes of `Copy` values.
unsafe impl<T: Copy + Send> Send for MappedArray<T> {}

impl<T: Copy> MappedArray<T> {
    /// Maps the array behind `fd`, which has `len` entries of `T` (the kernel lays array
    /// values out contiguously; `T`'s size must be a multiple of 8, as the kernel rounds).
    pub fn map(fd: OwnedFd, len: u32) -> io::Result<Self> {
        if len == 0 || !size_of::<T>().is_multiple_of(8) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an empty array, or a value size the kernel would pad",
            ));
        }
        // SAFETY: no arguments.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let bytes = (len as usize * size_of::<T>()).next_multiple_of(page);
        // SAFETY: a fresh shared mapping of the map's fd; checked for failure below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<T>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self {
            base,
            len,
            bytes,
            _fd: fd,
        })
    }

    /// Entries in the array.
    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pointer to entry `i`, which must be `< len`.
    pub fn ptr(&self, i: u32) -> *mut T {
        assert!(i < self.len, "entry {i} of a {}-entry array", self.len);
        // SAFETY: `i < len`, inside the mapping.
        unsafe { self.base.as_ptr().add(i as usize) }
    }

    /// A copy of entry `i` (`i < len`).
    pub fn get(&self, i: u32) -> T {
        // SAFETY: inside the mapping; the kernel may be writing, hence volatile.
        unsafe { self.ptr(i).read_volatile() }
    }

    /// Writes entry `i` (`i < len`).
    pub fn set(&mut self, i: u32, v: T) {
        // SAFETY: inside the mapping.
        unsafe { self.ptr(i).write_volatile(v) }
    }
}

impl<T: Copy> Drop for MappedArray<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}
