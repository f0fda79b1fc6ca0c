//! Packet logic of the XDP programs. Builds for the BPF target and on the host, so parsing,
//! checksum, encapsulation and forwarding decisions get ordinary unit tests; the programs
//! (`main.rs` with `balancer/`, `bin/decap.rs`) only wire maps and packet memory (`pkt`) to
//! these functions.
#![cfg_attr(target_arch = "bpf", no_std)]

pub mod csum;
pub use lb_common::decide;
pub mod encap;
pub mod evlog;
pub mod parse;
pub mod pkt;
