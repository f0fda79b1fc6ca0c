//! Shared helpers of the root-only suites: packet builder, network-namespace guards.
pub mod netns;
pub mod fixture;
pub mod packet;
pub mod daemon;
pub mod bench_control;
