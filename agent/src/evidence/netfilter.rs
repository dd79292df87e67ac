//! Which netfilter engine owns a drop: nftables (and iptables-nft) free the packet in
//! `nft_do_chain`; x_tables (iptables-legacy), conntrack and other hooks in `nf_hook_slow`.
use super::netns::{read_in, NetnsRef};

/// The engine to name for a netfilter drop at `location`, given the namespace's state.
pub fn engine(location: &str, ns: Option<&NetnsRef>) -> &'static str {
    match location {
        "nft_do_chain" => "nftables",
        "nf_hook_slow" => match ns.map(legacy_tables) {
            Some(tables) if !tables.is_empty() => "iptables-legacy",
            // No x_tables table here: conntrack (table full, insert race) or another hook.
            Some(_) => "conntrack/other hook",
            None => "iptables-legacy or other hook",
        },
        _ => "netfilter",
    }
}

/// Tables registered by iptables-legacy (x_tables) in the namespace.
pub fn legacy_tables(ns: &NetnsRef) -> Vec<String> {
    let mut tables = Vec::new();
    for file in [
        "/proc/thread-self/net/ip_tables_names",
        "/proc/thread-self/net/ip6_tables_names",
    ] {
        if let Ok(text) = read_in(ns, file) {
            tables.extend(text.lines().map(str::to_string));
        }
    }
    tables
}

/// The netfilter hook a packet was dropped in, from the kernel stack of the drop: the first
/// frame after `nf_hook_slow` is the function that ran the hook.
pub fn hook_from_stack(frames: &[std::sync::Arc<str>]) -> Option<&'static str> {
    let at = frames
        .iter()
        .position(|f| &**f == "nf_hook_slow" || &**f == "nf_hook_slow_list")?;
    let caller = frames[at + 1..]
        .iter()
        .find(|f| !f.starts_with("nf_hook"))?;
    Some(match &**caller {
        "ip_rcv" | "ip_list_rcv" | "ip_sublist_rcv" | "ipv6_rcv" | "ipv6_list_rcv"
        | "ip6_sublist_rcv" => "prerouting",
        "ip_local_deliver" | "ip6_input" => "input",
        "ip_forward" | "ip6_forward" => "forward",
        "__ip_local_out" | "ip_local_out" | "__ip6_local_out" | "ip6_local_out" => "output",
        "ip_output" | "ip6_output" | "ip_finish_output" | "ip6_finish_output" => "postrouting",
        c if c.starts_with("br_") || c.starts_with("__br_") => "bridge",
        c if c.starts_with("arp_") => "arp",
        c if c.contains("ingress") => "ingress",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn stack(names: &[&str]) -> Vec<Arc<str>> {
        names.iter().map(|n| Arc::from(*n)).collect()
    }

    #[test]
    fn hook_is_the_caller_of_nf_hook_slow() {
        // Shapes observed on 6.18 (reference kernel-drops.md 3.3).
        let nft = stack(&[
            "sk_skb_reason_drop",
            "nft_do_chain",
            "nft_do_chain_ipv4",
            "nf_hook_slow",
            "ip_forward",
            "ip_rcv",
        ]);
        assert_eq!(hook_from_stack(&nft), Some("forward"));
        let legacy = stack(&[
            "sk_skb_reason_drop",
            "nf_hook_slow",
            "ip_local_deliver",
            "ip_rcv",
        ]);
        assert_eq!(hook_from_stack(&legacy), Some("input"));
        assert_eq!(
            hook_from_stack(&stack(&["x", "nf_hook_slow", "ip_rcv"])),
            Some("prerouting")
        );
        assert_eq!(
            hook_from_stack(&stack(&["x", "nf_hook_slow", "__ip_local_out"])),
            Some("output")
        );
        assert_eq!(
            hook_from_stack(&stack(&["x", "nf_hook_slow", "ip_output"])),
            Some("postrouting")
        );
        assert_eq!(
            hook_from_stack(&stack(&["x", "nf_hook_slow", "br_nf_forward_ip"])),
            Some("bridge")
        );
        assert_eq!(hook_from_stack(&stack(&["x", "ip_error"])), None);
    }

    #[test]
    fn nft_location_needs_no_lookup() {
        assert_eq!(engine("nft_do_chain", None), "nftables");
        assert_eq!(
            engine("nf_hook_slow", None),
            "iptables-legacy or other hook"
        );
    }
}
