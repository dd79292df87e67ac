//! One module per kernel hook.
pub mod icmp_send;
pub mod kfree_skb;
pub mod tcp_send_reset;
