//! Control plane of the load balancer: data-plane loading and map writes, route assignment,
//! membership (heartbeats, failure detection), persistent state, the daemon and the agent.
pub mod objects;
