//! Which netfilter engine, family and hook a drop belongs to. nftables (and iptables-nft)
//! free the packet in `nft_do_chain`; x_tables (iptables-legacy), conntrack, NAT, defrag
//! and other hook functions return NF_DROP and the packet is freed in `nf_hook_slow`.
use std::{path::Path, sync::Arc};

use crate::netns::in_namespace;

/// The engine to name for a netfilter drop at `location`, given the namespace's x_tables
/// tables (`None`: unknown).
pub fn engine(location: &str, legacy_tables: Option<&[String]>) -> &'static str {
    match location {
        "nft_do_chain" => "nftables",
        "nf_hook_slow" => match legacy_tables {
            Some(tables) if !tables.is_empty() => "iptables-legacy or a netfilter module",
            // No x_tables table here: conntrack, NAT, defragmentation or another hook.
            Some(_) => "a netfilter module (conntrack, NAT, defrag)",
            None => "iptables-legacy or a netfilter module",
        },
        _ => "netfilter",
    }
}

/// Tables registered by iptables-legacy (x_tables) in the namespace at `ns`.
pub fn legacy_tables(ns: Option<&Path>) -> Vec<String> {
    in_namespace(ns, || {
        let mut tables = Vec::new();
        for (file, family) in [
            ("/proc/thread-self/net/ip_tables_names", "ip"),
            ("/proc/thread-self/net/ip6_tables_names", "ip6"),
        ] {
            if let Ok(text) = std::fs::read_to_string(file) {
                tables.extend(text.lines().map(|t| format!("{family} {t}")));
            }
        }
        tables
    })
    .unwrap_or_default()
}

/// Where in the stack the innermost netfilter hook is: the frame after `nf_hook_slow`.
fn hook_caller(frames: &[Arc<str>]) -> Option<&str> {
    let at = frames
        .iter()
        .position(|f| &**f == "nf_hook_slow" || &**f == "nf_hook_slow_list")?;
    frames[at + 1..]
        .iter()
        .find(|f| !f.starts_with("nf_hook"))
        .map(|f| &**f)
}

/// The netfilter hook a packet was dropped in, from the kernel stack of the drop: the first
/// frame after `nf_hook_slow` is the function that ran the hook (after inlining: the
/// closest caller that survived it).
pub fn hook_from_stack(frames: &[Arc<str>]) -> Option<&'static str> {
    let caller = hook_caller(frames)?;
    Some(match caller {
        "ip_rcv" | "ip_list_rcv" | "ip_sublist_rcv" | "ipv6_rcv" | "ipv6_list_rcv"
        | "ip6_sublist_rcv" | "ip_rcv_core" => "prerouting",
        "ip_local_deliver" | "ip6_input" => "input",
        "ip_forward" | "ip6_forward" => "forward",
        "__ip_local_out"
        | "ip_local_out"
        | "__ip6_local_out"
        | "ip6_local_out"
        | "ip_send_skb"
        | "ip_push_pending_frames"
        | "ip6_xmit"
        | "ip6_send_skb"
        | "ip6_push_pending_frames"
        | "ip_build_and_send_pkt"
        | "__ip_queue_xmit"
        | "ip_queue_xmit"
        | "raw_send_hdrinc"
        | "rawv6_send_hdrinc"
        | "ndisc_send_skb"
        | "mld_sendpack"
        | "igmp_send_report"
        | "igmpv3_sendpack" => "output",
        "ip_output" | "ip6_output" | "ip_finish_output" | "ip6_finish_output" | "ip_mc_output"
        | "ip6_finish_output2" => "postrouting",
        // br_netfilter runs the IPv4/IPv6 hooks from its own br_nf_* functions; the
        // bridge family's hooks are run by the bridge itself.
        c if c.starts_with("br_nf_") => bridged_l3_hook(c),
        c if c.starts_with("br_") || c.starts_with("__br_") => "bridge",
        c if c.starts_with("arp_") => "arp",
        c if c.contains("ingress") || c.contains("egress") => "ingress",
        _ => return None,
    })
}

/// The IP hook br_netfilter runs from each of its functions.
fn bridged_l3_hook(caller: &str) -> &'static str {
    match caller {
        c if c.starts_with("br_nf_pre_routing") => "prerouting",
        c if c.starts_with("br_nf_local_in") => "input",
        c if c.starts_with("br_nf_forward") => "forward",
        c if c.starts_with("br_nf_local_out") => "output",
        c if c.starts_with("br_nf_post_routing") || c.starts_with("br_nf_dev_queue") => {
            "postrouting"
        }
        _ => "forward",
    }
}

/// The netfilter family of a drop's hook, from its stack: nftables names it in its hook
/// function (`nft_do_chain_bridge`), ebtables is the bridge family, a hook run by the bridge
/// itself is too. (An IP hook run by br_netfilter, `br_nf_*`, is the packet's own family.)
pub fn family_from_stack(frames: &[Arc<str>]) -> Option<&'static str> {
    for f in frames {
        match &**f {
            "nft_do_chain_bridge" | "ebt_do_table" => return Some("bridge"),
            "nft_do_chain_ipv4" | "ipt_do_table" => return Some("ipv4"),
            "nft_do_chain_ipv6" | "ip6t_do_table" => return Some("ipv6"),
            "nft_do_chain_inet" => return Some("inet"),
            "nft_do_chain_arp" | "arpt_do_table" => return Some("arp"),
            "nft_do_chain_netdev" => return Some("netdev"),
            _ => {}
        }
    }
    match hook_caller(frames)? {
        c if c.starts_with("br_") && !c.starts_with("br_nf_") => Some("bridge"),
        c if c.starts_with("__br_") => Some("bridge"),
        _ => None,
    }
}

/// Whether an IP (not bridge-family) hook ran for a bridged frame: br_netfilter called it
/// (`net.bridge.bridge-nf-call-iptables=1`).
pub fn via_br_netfilter(frames: &[Arc<str>]) -> bool {
    hook_caller(frames).is_some_and(|c| c.starts_with("br_nf_"))
}

/// The tunnel a packet was being encapsulated by, from the transmit functions in its stack
/// (a driver's own function names it; the generic IP/UDP tunnel helpers below it do not).
pub fn tunnel_from_stack(frames: &[Arc<str>]) -> Option<&'static str> {
    let specific = |f: &str| {
        Some(match f {
            f if f.starts_with("vxlan_xmit") => "vxlan",
            f if f.starts_with("geneve_xmit") || f.starts_with("geneve6_xmit") => "geneve",
            f if f.starts_with("ip6gre") => "ip6gre",
            f if f.starts_with("ipgre")
                || f.starts_with("gre_tap_xmit")
                || f.starts_with("erspan") =>
            {
                "gre"
            }
            f if f.starts_with("ipip_tunnel_xmit") => "ipip",
            f if f.starts_with("ipip6_tunnel_xmit") || f.starts_with("sit_tunnel_xmit") => "sit",
            f if f.starts_with("ip6_tnl_xmit") || f.starts_with("ip6ip6_tnl_xmit") => "ip6tnl",
            f if f.starts_with("wg_") => "wireguard",
            _ => return None,
        })
    };
    let generic = |f: &str| {
        (f.starts_with("ip_tunnel_xmit")
            || f.starts_with("iptunnel_xmit")
            || f.starts_with("udp_tunnel_xmit")
            || f.starts_with("udp_tunnel6_xmit"))
        .then_some("ip tunnel")
    };
    frames
        .iter()
        .find_map(|f| specific(f))
        .or_else(|| frames.iter().find_map(|f| generic(f)))
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
        // Kernel stacks of netfilter drops as observed on 6.18.
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
            hook_from_stack(&stack(&["x", "nf_hook_slow", "br_forward"])),
            Some("bridge")
        );
        assert_eq!(hook_from_stack(&stack(&["x", "ip_error"])), None);
    }

    #[test]
    fn nft_location_needs_no_lookup() {
        assert_eq!(engine("nft_do_chain", None), "nftables");
        assert_eq!(
            engine("nf_hook_slow", Some(&[])),
            "a netfilter module (conntrack, NAT, defrag)"
        );
    }

    #[test]
    fn bridge_family_and_br_netfilter_are_told_apart() {
        let bridge_family = stack(&[
            "sk_skb_reason_drop",
            "nft_do_chain",
            "nft_do_chain_bridge",
            "nf_hook_slow",
            "__br_forward",
            "br_handle_frame_finish",
        ]);
        assert_eq!(family_from_stack(&bridge_family), Some("bridge"));
        assert_eq!(hook_from_stack(&bridge_family), Some("bridge"));
        assert!(!via_br_netfilter(&bridge_family));
        let br_nf = stack(&[
            "sk_skb_reason_drop",
            "nft_do_chain",
            "nft_do_chain_ipv4",
            "nf_hook_slow",
            "br_nf_forward_ip",
            "nf_hook_slow",
            "__br_forward",
        ]);
        assert_eq!(family_from_stack(&br_nf), Some("ipv4"));
        let legacy_br_nf = stack(&["sk_skb_reason_drop", "nf_hook_slow", "br_nf_forward_ip"]);
        assert_eq!(
            family_from_stack(&legacy_br_nf),
            None,
            "the packet's family tells"
        );
        assert!(via_br_netfilter(&legacy_br_nf));
        assert_eq!(hook_from_stack(&br_nf), Some("forward"));
        assert!(via_br_netfilter(&br_nf));
    }

    #[test]
    fn tunnels_are_named_from_their_transmit_functions() {
        let s = stack(&[
            "sk_skb_reason_drop",
            "ip_fragment",
            "ip_output",
            "iptunnel_xmit",
            "vxlan_xmit_one",
        ]);
        assert_eq!(tunnel_from_stack(&s), Some("vxlan"));
        let s = stack(&[
            "sk_skb_reason_drop",
            "ip6_fragment",
            "ip6_output",
            "udp_tunnel6_xmit_skb",
            "vxlan_xmit_one",
        ]);
        assert_eq!(tunnel_from_stack(&s), Some("vxlan"));
        assert_eq!(
            tunnel_from_stack(&stack(&["ip_fragment", "ip_output", "raw_sendmsg"])),
            None
        );
    }
}
