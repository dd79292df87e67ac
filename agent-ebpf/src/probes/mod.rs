//! One module per kernel hook.
pub mod config_changes;
pub mod forward;
pub mod icmp6_send;
pub mod icmp_send;
pub mod kfree_skb;
pub mod netfilter;
pub mod ruleset;
pub mod tcp_send_reset;
