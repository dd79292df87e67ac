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
    for file in ["/proc/thread-self/net/ip_tables_names", "/proc/thread-self/net/ip6_tables_names"] {
        if let Ok(text) = read_in(ns, file) {
            tables.extend(text.lines().map(str::to_string));
        }
    }
    tables
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nft_location_needs_no_lookup() {
        assert_eq!(engine("nft_do_chain", None), "nftables");
        assert_eq!(engine("nf_hook_slow", None), "iptables-legacy or other hook");
    }
}
