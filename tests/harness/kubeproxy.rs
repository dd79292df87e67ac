//! Kube-proxy-shaped rulesets of a chosen size, for scale tests and measurements.
//!
//! [`Iptables`] writes `iptables-restore` input shaped like kube-proxy's iptables mode: nat
//! KUBE-SERVICES -> KUBE-SVC-* (statistic/probability over the endpoints) -> KUBE-SEP-* (DNAT),
//! KUBE-NODEPORTS / KUBE-EXT-*, KUBE-POSTROUTING / KUBE-MARK-MASQ; filter KUBE-SERVICES and
//! KUBE-EXTERNAL-SERVICES `REJECT` rules for services without endpoints (with kube-proxy's
//! `"ns/svc:port has no endpoints"` comments), KUBE-FORWARD (the conntrack INVALID `DROP`),
//! KUBE-FIREWALL, KUBE-PROXY-FIREWALL. [`Nft`] writes an `nft -f` ruleset shaped like kube-proxy's
//! nftables mode: one `ip` table with verdict maps (service-ips, no-endpoint-services,
//! firewall-ips), a cluster-ips set, per-service and per-endpoint chains, and source-range
//! firewall chains whose drop rules carry counters.
//!
//! Everything is deterministic: a test knows the addresses, ports and comments of the services
//! it probes ([`Iptables::no_endpoints`], [`Nft::firewalled`]). Each engine gets its own service
//! range so that rulesets of several engines loaded in one namespace never match each other's
//! traffic.
use std::{fmt::Write as _, path::PathBuf};

use crate::netns::Netns;

/// A service a test sends to, and the rule that handles it.
#[derive(Debug, Clone)]
pub struct Probe {
    pub ip: String,
    pub port: u16,
    pub proto: &'static str,
    /// The comment of the rule that drops or rejects its traffic.
    pub comment: String,
    /// The chain of that rule.
    pub chain: String,
}

/// kube-proxy's iptables mode.
#[derive(Debug, Clone)]
pub struct Iptables {
    /// About this many rules (`-A` lines) in all.
    pub rules: usize,
    /// Second octet of the service range: services are `10.<octet>.x.y`.
    pub octet: u8,
    /// Whether KUBE-FORWARD drops conntrack INVALID packets (only one engine of a namespace
    /// should, or which one drops a packet depends on hook registration order).
    pub invalid_drop: bool,
}

/// kube-proxy's nftables mode.
#[derive(Debug, Clone)]
pub struct Nft {
    /// About this many rules in all.
    pub rules: usize,
    /// Second octet of the service range: services are `10.<octet>.x.y`.
    pub octet: u8,
    /// Name of the `ip` table.
    pub table: String,
}

/// The pod network behind every endpoint.
pub const POD_CIDR: &str = "10.244.0.0/16";
/// The only source range allowed into firewalled load balancers: the test hosts are outside it.
pub const ALLOWED_SOURCES: &str = "203.0.113.0/24";

/// One generated service.
struct Svc {
    ns: String,
    name: String,
    port_name: &'static str,
    ip: String,
    port: u16,
    proto: &'static str,
    endpoints: Vec<String>,
    node_port: Option<u16>,
    target_port: u16,
}

impl Svc {
    /// Service `i` of a range (`octet`): a mix of TCP and UDP, 0-3 endpoints, some NodePorts.
    fn nth(i: usize, octet: u8) -> Svc {
        let (proto, port, port_name, target_port) = match i % 7 {
            0 => ("udp", 53, "dns", 53),
            1 => ("tcp", 443, "https", 8443),
            2 => ("tcp", 8080, "http-alt", 8080),
            _ => ("tcp", 80, "http", 8080),
        };
        // Every 10th service has no endpoints (scaled to zero, selector matches nothing).
        let n = if i % 10 == 7 { 0 } else { 1 + i % 3 };
        let endpoints = (0..n)
            .map(|j| {
                let e = i * 3 + j;
                format!("10.244.{}.{}", (e / 250) % 256, e % 250 + 2)
            })
            .collect();
        Svc {
            ns: format!("ns{}", i % 40),
            name: format!("svc{i}"),
            port_name,
            ip: format!("10.{octet}.{}.{}", (i / 250) % 256, i % 250 + 1),
            port,
            proto,
            endpoints,
            node_port: (i % 4 == 1).then(|| 30000 + (i % 2768) as u16),
            target_port,
        }
    }

    /// "ns/svc:port", kube-proxy's service port name.
    fn id(&self) -> String {
        format!("{}/{}:{}", self.ns, self.name, self.port_name)
    }
}

/// A kube-proxy-like chain suffix: 16 base32 characters of a hash of `parts`.
fn hash(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    let mut out = String::new();
    for round in 0..2u8 {
        for p in parts {
            for b in p.bytes().chain([round, 0]) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x100000001b3);
            }
        }
        let mut v = h;
        for _ in 0..8 {
            out.push(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"[(v % 32) as usize] as char);
            v /= 32;
        }
    }
    out
}

/// The rules and chain declarations of one iptables table.
#[derive(Default)]
struct Table {
    chains: Vec<String>,
    rules: Vec<String>,
}

impl Table {
    fn chain(&mut self, name: &str) {
        self.chains.push(format!(":{name} - [0:0]"));
    }
    fn rule(&mut self, rule: String) {
        self.rules.push(rule);
    }
    fn write(&self, out: &mut String, name: &str, builtin: &[&str]) {
        let _ = writeln!(out, "*{name}");
        for b in builtin {
            let _ = writeln!(out, ":{b} ACCEPT [0:0]");
        }
        for c in &self.chains {
            let _ = writeln!(out, "{c}");
        }
        for r in &self.rules {
            let _ = writeln!(out, "{r}");
        }
        let _ = writeln!(out, "COMMIT");
    }
}

impl Iptables {
    /// The service range of an engine's ruleset, with the INVALID drop or without.
    pub fn new(rules: usize, octet: u8, invalid_drop: bool) -> Self {
        Iptables {
            rules,
            octet,
            invalid_drop,
        }
    }

    /// How many services make about `self.rules` rules.
    fn services(&self) -> usize {
        // Averaged over the mix in Svc::nth: about 8 rules a service.
        (self.rules.saturating_sub(20) / 8).max(10)
    }

    /// A service without endpoints from the middle of the ruleset, and the comment of the
    /// filter KUBE-SERVICES rule that rejects its traffic.
    pub fn no_endpoints(&self) -> Probe {
        let n = self.services();
        // The first service at or after the middle that has no endpoints and is TCP port 80.
        let i = (n / 2..n)
            .find(|i| i % 10 == 7 && i % 7 >= 3)
            .expect("a service without endpoints");
        let s = Svc::nth(i, self.octet);
        Probe {
            ip: s.ip.clone(),
            port: s.port,
            proto: s.proto,
            comment: format!("{} has no endpoints", s.id()),
            chain: "KUBE-SERVICES".into(),
        }
    }

    /// The `iptables-restore` input.
    pub fn restore(&self) -> String {
        let mut nat = Table::default();
        let mut filter = Table::default();
        for c in [
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-POSTROUTING",
            "KUBE-MARK-MASQ",
            "KUBE-PROXY-CANARY",
            "KUBE-KUBELET-CANARY",
        ] {
            nat.chain(c);
        }
        for c in [
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-FORWARD",
            "KUBE-FIREWALL",
            "KUBE-NODEPORTS",
            "KUBE-PROXY-FIREWALL",
            "KUBE-PROXY-CANARY",
            "KUBE-KUBELET-CANARY",
        ] {
            filter.chain(c);
        }
        for hook in ["PREROUTING", "OUTPUT"] {
            nat.rule(format!(
                "-A {hook} -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
            ));
        }
        nat.rule("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING".into());
        nat.rule("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000".into());
        nat.rule("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN".into());
        nat.rule("-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0".into());
        nat.rule("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".into());

        for hook in ["INPUT", "FORWARD", "OUTPUT"] {
            filter.rule(format!("-A {hook} -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"));
        }
        filter.rule("-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS".into());
        filter.rule("-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES".into());
        filter.rule("-A INPUT -j KUBE-FIREWALL".into());
        filter.rule(
            "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD"
                .into(),
        );
        filter.rule("-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".into());
        filter.rule("-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES".into());
        filter.rule("-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".into());
        filter.rule("-A OUTPUT -j KUBE-FIREWALL".into());
        filter.rule("-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP".into());
        if self.invalid_drop {
            filter.rule("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP".into());
        }
        filter.rule("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT".into());
        filter.rule("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".into());

        for i in 0..self.services() {
            let s = Svc::nth(i, self.octet);
            let (id, p) = (s.id(), s.proto);
            if s.endpoints.is_empty() {
                filter.rule(format!(
                    "-A KUBE-SERVICES -d {}/32 -p {p} -m comment --comment \"{id} has no endpoints\" -m {p} --dport {} -j REJECT --reject-with icmp-port-unreachable",
                    s.ip, s.port
                ));
                if let Some(np) = s.node_port {
                    filter.rule(format!(
                        "-A KUBE-EXTERNAL-SERVICES -p {p} -m comment --comment \"{id} has no endpoints\" -m addrtype --dst-type LOCAL -m {p} --dport {np} -j REJECT --reject-with icmp-port-unreachable"
                    ));
                }
                continue;
            }
            let svc = format!("KUBE-SVC-{}", hash(&[&id, p]));
            nat.chain(&svc);
            nat.rule(format!(
                "-A KUBE-SERVICES -d {}/32 -p {p} -m comment --comment \"{id} cluster IP\" -m {p} --dport {} -j {svc}",
                s.ip, s.port
            ));
            nat.rule(format!(
                "-A {svc} ! -s {POD_CIDR} -d {}/32 -p {p} -m comment --comment \"{id} cluster IP\" -m {p} --dport {} -j KUBE-MARK-MASQ",
                s.ip, s.port
            ));
            let n = s.endpoints.len();
            for (j, ep) in s.endpoints.iter().enumerate() {
                let sep = format!("KUBE-SEP-{}", hash(&[&id, p, ep]));
                nat.chain(&sep);
                let statistic = if j + 1 < n {
                    format!(
                        " -m statistic --mode random --probability {:.11}",
                        1.0 / (n - j) as f64
                    )
                } else {
                    String::new()
                };
                nat.rule(format!(
                    "-A {svc} -m comment --comment \"{id} -> {ep}:{}\"{statistic} -j {sep}",
                    s.target_port
                ));
                nat.rule(format!(
                    "-A {sep} -s {ep}/32 -m comment --comment \"{id}\" -j KUBE-MARK-MASQ"
                ));
                nat.rule(format!(
                    "-A {sep} -p {p} -m comment --comment \"{id}\" -m {p} -j DNAT --to-destination {ep}:{}",
                    s.target_port
                ));
            }
            if let Some(np) = s.node_port {
                let ext = format!("KUBE-EXT-{}", hash(&[&id, p, "external"]));
                nat.chain(&ext);
                nat.rule(format!(
                    "-A KUBE-NODEPORTS -p {p} -m comment --comment \"{id}\" -m {p} --dport {np} -j {ext}"
                ));
                nat.rule(format!("-A {ext} -m comment --comment \"masquerade traffic for {id} external destinations\" -j KUBE-MARK-MASQ"));
                nat.rule(format!("-A {ext} -j {svc}"));
            }
        }
        nat.rule("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS".into());

        let mut out = String::with_capacity(self.rules * 160);
        out.push_str("# Generated by dropscope's tests: kube-proxy iptables mode\n");
        filter.write(&mut out, "filter", &["INPUT", "FORWARD", "OUTPUT"]);
        nat.write(
            &mut out,
            "nat",
            &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
        );
        out
    }

    /// Rules (`-A` lines) in [`Self::restore`].
    pub fn count(text: &str) -> usize {
        text.lines().filter(|l| l.starts_with("-A ")).count()
    }
}

impl Nft {
    pub fn new(rules: usize, octet: u8, table: &str) -> Self {
        Nft {
            rules,
            octet,
            table: table.into(),
        }
    }

    fn services(&self) -> usize {
        // About 5 rules a service (see Svc::nth), plus the fixed chains.
        (self.rules.saturating_sub(20) / 5).max(10)
    }

    /// Whether service `i` is a load balancer with source ranges (a firewall chain).
    fn firewalled(i: usize) -> bool {
        i % 20 == 3
    }

    /// A firewalled load balancer from the middle of the ruleset (UDP: nothing retransmits),
    /// and the comment and chain of the counted rule that drops traffic from outside its
    /// source ranges.
    pub fn firewalled_probe(&self) -> Probe {
        let n = self.services();
        let i = (n / 2..n)
            .find(|&i| Self::firewalled(i) && Svc::nth(i, self.octet).proto == "udp")
            .expect("a firewalled service");
        let s = Svc::nth(i, self.octet);
        Probe {
            ip: s.ip.clone(),
            port: s.port,
            proto: s.proto,
            comment: format!("{} source ranges", s.id()),
            chain: Self::firewall_chain(&s),
        }
    }

    fn firewall_chain(s: &Svc) -> String {
        let short = &hash(&[&s.id(), s.proto])[..8];
        format!(
            "firewall-{short}-{}/{}/{}/{}",
            s.ns, s.name, s.proto, s.port_name
        )
    }

    /// The `nft -f` input (one table; it is created fresh).
    pub fn ruleset(&self) -> String {
        let t = &self.table;
        let mut chains = String::new();
        let mut service_ips = Vec::new();
        let mut no_endpoints = Vec::new();
        let mut firewall_ips = Vec::new();
        let mut cluster_ips = Vec::new();
        for i in 0..self.services() {
            let s = Svc::nth(i, self.octet);
            let (id, p) = (s.id(), s.proto);
            let short = hash(&[&id, p])[..8].to_string();
            let key = format!("{}/{}/{p}/{}", s.ns, s.name, s.port_name);
            cluster_ips.push(s.ip.clone());
            if Self::firewalled(i) {
                let fw = Self::firewall_chain(&s);
                let _ = writeln!(
                    chains,
                    "add chain ip {t} {fw}\nadd rule ip {t} {fw} ip saddr != {{ {ALLOWED_SOURCES} }} counter drop comment \"{id} source ranges\""
                );
                firewall_ips.push(format!("{} . {p} . {} : goto {fw}", s.ip, s.port));
            }
            if s.endpoints.is_empty() {
                no_endpoints.push(format!("{} . {p} . {} : goto reject-chain", s.ip, s.port));
                continue;
            }
            let svc = format!("service-{short}-{key}");
            let _ = writeln!(chains, "add chain ip {t} {svc}");
            let _ = writeln!(
                chains,
                "add rule ip {t} {svc} ip daddr {} {p} dport {} ip saddr != {POD_CIDR} jump mark-for-masquerade",
                s.ip, s.port
            );
            let mut vmap = Vec::new();
            for (j, ep) in s.endpoints.iter().enumerate() {
                let epc = format!(
                    "endpoint-{}-{key}__{ep}/{}",
                    &hash(&[&id, p, ep])[..8],
                    s.target_port
                );
                let _ = writeln!(
                    chains,
                    "add chain ip {t} {epc}\nadd rule ip {t} {epc} ip saddr {ep} jump mark-for-masquerade\nadd rule ip {t} {epc} meta l4proto {p} dnat to {ep}:{}",
                    s.target_port
                );
                vmap.push(format!("{j} : goto {epc}"));
            }
            let _ = writeln!(
                chains,
                "add rule ip {t} {svc} numgen random mod {} vmap {{ {} }}",
                s.endpoints.len(),
                vmap.join(", ")
            );
            service_ips.push(format!("{} . {p} . {} : goto {svc}", s.ip, s.port));
        }

        let mut out = String::with_capacity(self.rules * 200);
        let _ = writeln!(
            out,
            "# Generated by dropscope's tests: kube-proxy nftables mode\n\
             add table ip {t} {{ comment \"rules for kube-proxy\"; }}\n\
             add chain ip {t} mark-for-masquerade\n\
             add rule ip {t} mark-for-masquerade meta mark set meta mark or 0x4000\n\
             add chain ip {t} masquerading\n\
             add rule ip {t} masquerading meta mark and 0x4000 == 0 return\n\
             add rule ip {t} masquerading meta mark set meta mark xor 0x4000\n\
             add rule ip {t} masquerading masquerade fully-random\n\
             add chain ip {t} nat-prerouting {{ type nat hook prerouting priority -100; }}\n\
             add chain ip {t} nat-output {{ type nat hook output priority -100; }}\n\
             add chain ip {t} nat-postrouting {{ type nat hook postrouting priority 100; }}\n\
             add chain ip {t} filter-prerouting {{ type filter hook prerouting priority -110; }}\n\
             add chain ip {t} filter-forward {{ type filter hook forward priority -110; }}\n\
             add chain ip {t} filter-output {{ type filter hook output priority -110; }}\n\
             add chain ip {t} services\n\
             add chain ip {t} firewall-check\n\
             add chain ip {t} service-endpoints-check\n\
             add chain ip {t} cluster-ips-check\n\
             add chain ip {t} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\"; }}\n\
             add set ip {t} cluster-ips {{ type ipv4_addr; comment \"Active ClusterIPs\"; }}\n\
             add map ip {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\"; }}\n\
             add map ip {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict; comment \"vmap to drop or reject packets to services with no endpoints\"; }}\n\
             add map ip {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; comment \"destinations that are subject to LoadBalancerSourceRanges\"; }}"
        );
        out.push_str(&chains);
        for (name, elems) in [
            ("service-ips", &service_ips),
            ("no-endpoint-services", &no_endpoints),
            ("firewall-ips", &firewall_ips),
            ("cluster-ips", &cluster_ips),
        ] {
            for chunk in elems.chunks(500) {
                let _ = writeln!(out, "add element ip {t} {name} {{ {} }}", chunk.join(", "));
            }
        }
        let octet = self.octet;
        let _ = writeln!(
            out,
            "add rule ip {t} nat-prerouting jump services\n\
             add rule ip {t} nat-output jump services\n\
             add rule ip {t} nat-postrouting jump masquerading\n\
             add rule ip {t} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
             add rule ip {t} filter-prerouting ct state new jump firewall-check\n\
             add rule ip {t} filter-forward ct state new jump service-endpoints-check\n\
             add rule ip {t} filter-forward ct state new jump cluster-ips-check\n\
             add rule ip {t} filter-output ct state new jump service-endpoints-check\n\
             add rule ip {t} filter-output ct state new jump cluster-ips-check\n\
             add rule ip {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips\n\
             add rule ip {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\
             add rule ip {t} reject-chain counter reject\n\
             add rule ip {t} cluster-ips-check ip daddr @cluster-ips counter reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n\
             add rule ip {t} cluster-ips-check ip daddr 10.{octet}.0.0/16 counter drop comment \"Drop traffic to unallocated ClusterIPs\""
        );
        out
    }

    /// Rules in [`Self::ruleset`].
    pub fn count(text: &str) -> usize {
        text.lines().filter(|l| l.starts_with("add rule ")).count()
    }
}

/// The full scale ruleset of the tests: ~20,000 iptables-nft rules, ~20,000 iptables-legacy
/// rules and ~10,000 native nftables rules, each engine with its own service range.
pub struct Scale {
    pub nft_iptables: Iptables,
    pub legacy: Iptables,
    pub nft: Nft,
}

impl Scale {
    /// The sizes of issue 13: 20k + 20k + 10k rules.
    pub fn full() -> Self {
        Scale::sized(20_000, 20_000, 10_000)
    }

    pub fn sized(iptables_nft: usize, legacy: usize, nft: usize) -> Self {
        Scale {
            // Only iptables-nft drops INVALID packets: one engine decides.
            nft_iptables: Iptables::new(iptables_nft, 96, true),
            legacy: Iptables::new(legacy, 100, false),
            nft: Nft::new(nft, 104, "kube-proxy"),
        }
    }

    /// Writes the three inputs to the temporary directory and returns their paths:
    /// iptables-nft, legacy, nft. Generating them takes milliseconds; a file that already
    /// holds the same text (from an earlier test or run) is not written again, and one
    /// directory per size serves every run.
    pub fn files(&self) -> [PathBuf; 3] {
        let dir = std::env::temp_dir().join(format!(
            "dropscope-kubeproxy-{}-{}-{}",
            self.nft_iptables.rules, self.legacy.rules, self.nft.rules
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let texts = [
            ("iptables-nft.rules", self.nft_iptables.restore()),
            ("iptables-legacy.rules", self.legacy.restore()),
            ("nft.rules", self.nft.ruleset()),
        ];
        texts.map(|(name, text)| {
            let path = dir.join(name);
            if std::fs::read(&path).ok().as_deref() != Some(text.as_bytes()) {
                // Written aside and renamed: tests running in parallel never read half a file.
                let tmp = path.with_extension(format!(
                    "tmp{}{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                std::fs::write(&tmp, &text).expect("write ruleset");
                std::fs::rename(&tmp, &path).expect("rename ruleset");
            }
            path
        })
    }

    /// Loads all three into `ns` (iptables-nft-restore, iptables-legacy-restore, nft -f).
    pub fn load(&self, ns: &Netns) {
        let [ipt, legacy, nft] = self.files();
        ns.sh(&format!(
            "iptables-nft-restore < {}; iptables-legacy-restore < {}; nft -f {}",
            ipt.display(),
            legacy.display(),
            nft.display()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_close_to_asked() {
        for rules in [1_000, 20_000] {
            let n = Iptables::count(&Iptables::new(rules, 96, true).restore());
            assert!(n.abs_diff(rules) < rules / 10, "{n} rules for {rules}");
        }
        let n = Nft::count(&Nft::new(10_000, 104, "kp").ruleset());
        assert!(n.abs_diff(10_000) < 1_000, "{n} nft rules");
    }

    #[test]
    fn probes_are_in_the_rulesets() {
        let ipt = Iptables::new(2_000, 96, true);
        let text = ipt.restore();
        let p = ipt.no_endpoints();
        let line = text
            .lines()
            .find(|l| {
                l.contains(&format!("\"{}\"", p.comment)) && l.starts_with("-A KUBE-SERVICES")
            })
            .expect("the probe's REJECT rule");
        assert!(line.contains(&format!("-d {}/32", p.ip)), "{line}");
        assert!(line.ends_with("-j REJECT --reject-with icmp-port-unreachable"));
        let nft = Nft::new(2_000, 104, "kp");
        let p = nft.firewalled_probe();
        assert!(nft
            .ruleset()
            .contains(&format!("counter drop comment \"{}\"", p.comment)));
    }
}
