//! Shared helpers of the root-only suites: packet builder, network-namespace guards.
pub mod netns;
