//! Packet logic of the XDP programs. Builds for the BPF target and on the host, so parsing,
//! hashing and rewrite logic get ordinary unit tests.
#![cfg_attr(target_arch = "bpf", no_std)]
