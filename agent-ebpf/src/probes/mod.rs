//! One module per kernel hook.
pub mod icmp_send;
pub mod kfree_skb;
