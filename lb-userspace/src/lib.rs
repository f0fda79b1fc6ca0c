//! Control plane of the load balancer: data-plane loading and map writes, route assignment,
//! membership (heartbeats, failure detection), persistent state, the daemon and the agent.
pub mod agent;
pub mod announce;
pub mod api;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod conntrack;
pub mod controller;
pub mod daemon;
pub mod dataplane;
pub mod decap;
pub mod health;
pub mod heartbeat;
pub mod livelog;
pub mod membership;
pub mod mmap;
pub mod objects;
pub mod observe;
pub mod offload;
pub mod persist;
pub mod routes;
pub mod running;
pub mod server;
pub mod signals;
pub mod state;
