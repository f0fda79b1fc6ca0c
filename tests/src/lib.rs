//! Shared helpers of the root-only suites: packet builder, network-namespace guards.
pub mod bench_control;
pub mod cli;
pub mod daemon;
pub mod echo;
pub mod fixture;
pub mod lab;
pub mod labctl;
pub mod load;
pub mod netns;
pub mod packet;
pub mod scale;
