//! Live state of the network namespace a drop happened in: what proves a cause.
pub mod conntrack;
pub mod counters;
pub mod investigator;
pub mod netfilter;
pub mod policy;
pub mod routes;
pub mod rules;
pub mod tunnels;
