//! Live state of the network namespace a drop happened in: what proves a cause.
pub mod netfilter;
pub mod netns;
pub mod rules;
