//! Which drops the operator asked to see (`--src`, `--dst`, `--port`, `--proto`, `--iface`,
//! `--netns`, `--pod`, and a pcap-filter expression). Within one flag values are
//! alternatives; different flags, and the expression, must all match.
use agent_ebpf::{Filters, FILTER_SLOTS};
use ipnet::IpNet;

use crate::{
    events::DropEvent,
    expr::{cidr, Expr},
    pods::PodName,
};

#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub src: Vec<IpNet>,
    pub dst: Vec<IpNet>,
    pub ports: Vec<u16>,
    pub protos: Vec<u8>,
    pub ifaces: Vec<String>,
    pub netns: Vec<u32>,
    /// Pods, matched against the drop's attribution (userspace only: the kernel knows no names,
    /// and a pod's namespace changes when it restarts).
    pub pods: Vec<PodName>,
    /// A pcap-filter expression (the positional argument), AND-ed with the flags.
    pub expr: Option<Expr>,
}

impl Filter {
    /// The same filters for the kernel, so unwanted drops never reach userspace. A list longer
    /// than the kernel's capacity is left empty there (userspace still applies it).
    pub fn to_kernel(&self) -> Filters {
        self.compile().0
    }

    /// Whether the kernel filters exactly what the flags and the expression select (pods
    /// aside, which only userspace knows): then every drop the kernel counts matches.
    pub fn kernel_exact(&self) -> bool {
        self.compile().1
    }

    /// For drops the kernel counted without sending an event (only the key of the count is
    /// known): what the kernel did not already filter. Where the kernel filters exactly,
    /// only the pods are left; otherwise the whole filter, on what the key tells.
    pub fn matches_unsent(&self, d: &DropEvent) -> bool {
        if self.kernel_exact() {
            Filter {
                pods: self.pods.clone(),
                ..Default::default()
            }
            .matches(d)
        } else {
            self.matches(d)
        }
    }

    /// The kernel filters, and whether they are exact.
    fn compile(&self) -> (Filters, bool) {
        let mut k = Filters::NONE;
        let fits = [
            self.src.len(),
            self.dst.len(),
            self.netns.len(),
            self.ports.len(),
            self.protos.len(),
            self.ifaces.len(),
        ]
        .iter()
        .all(|&n| n <= FILTER_SLOTS);
        fn fill<T: Copy, U>(
            src: &[T],
            dst: &mut [U; FILTER_SLOTS],
            n: &mut u8,
            f: impl Fn(T) -> U,
        ) {
            if src.len() <= FILTER_SLOTS {
                for (slot, v) in dst.iter_mut().zip(src) {
                    *slot = f(*v);
                }
                *n = src.len() as u8;
            }
        }
        fill(&self.src, &mut k.src, &mut k.n_src, cidr);
        fill(&self.dst, &mut k.dst, &mut k.n_dst, cidr);
        fill(&self.netns, &mut k.netns, &mut k.n_netns, |v| v);
        fill(&self.ports, &mut k.ports, &mut k.n_ports, |v| v);
        fill(&self.protos, &mut k.protos, &mut k.n_protos, |v| v);
        let names: Vec<[u8; 16]> = self.ifaces.iter().map(|n| ifname_bytes(n)).collect();
        fill(&names, &mut k.ifnames, &mut k.n_ifnames, |v| v);
        let expr_exact = self.expr.as_ref().is_none_or(|e| e.compile(&mut k));
        (k, fits && expr_exact)
    }

    /// Whether `d` passes. A drop without the field a filter needs (e.g. no parsed address)
    /// does not pass that filter.
    pub fn matches(&self, d: &DropEvent) -> bool {
        let flow = d.flow.as_ref();
        let any = |set: bool, ok: bool| !set || ok;
        any(
            !self.src.is_empty(),
            flow.is_some_and(|f| self.src.iter().any(|n| n.contains(&f.src))),
        ) && any(
            !self.dst.is_empty(),
            flow.is_some_and(|f| self.dst.iter().any(|n| n.contains(&f.dst))),
        ) && any(
            !self.ports.is_empty(),
            flow.and_then(|f| f.ports)
                .is_some_and(|(s, p)| self.ports.contains(&s) || self.ports.contains(&p)),
        ) && any(
            !self.protos.is_empty(),
            flow.is_some_and(|f| self.protos.contains(&f.proto)),
        ) && any(
            !self.ifaces.is_empty(),
            [d.dev, d.out]
                .iter()
                .flatten()
                .any(|dev| self.ifaces.iter().any(|i| i == dev.name())),
        ) && any(!self.netns.is_empty(), self.netns.contains(&d.netns))
            && any(
                !self.pods.is_empty(),
                d.pod
                    .as_ref()
                    .is_some_and(|p| self.pods.iter().any(|w| p.is(w))),
            )
            && self.expr.as_ref().is_none_or(|e| e.matches(d))
    }
}

/// An interface name as the kernel stores it (`char name[16]`, NUL-padded).
fn ifname_bytes(name: &str) -> [u8; 16] {
    let mut b = [0u8; 16];
    let n = name.len().min(15);
    b[..n].copy_from_slice(&name.as_bytes()[..n]);
    b
}

/// Parses a `--proto` value: a name or an IP protocol number.
pub fn parse_proto(s: &str) -> Result<u8, String> {
    match s.to_ascii_lowercase().as_str() {
        "icmp" => Ok(1),
        "tcp" => Ok(6),
        "udp" => Ok(17),
        "icmpv6" | "icmp6" => Ok(58),
        "sctp" => Ok(132),
        "gre" => Ok(47),
        "esp" => Ok(50),
        other => other
            .parse::<u8>()
            .map_err(|_| format!("'{s}' is not a protocol (use tcp, udp, icmp, icmpv6, sctp, gre, esp or a number 0-255)")),
    }
}

/// Parses a `--src`/`--dst` value: a CIDR or a single address.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| {
            format!("'{s}' is not an address or CIDR (e.g. 10.0.0.0/8, fd00::/64, 10.1.2.3)")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::PodRef;
    use agent_ebpf::{FLAG_IPV4, FLAG_IPV6};
    use std::sync::Arc;

    fn sample() -> DropEvent {
        let mut d = DropEvent::example("NO_SOCKET", "tcp_v4_rcv");
        d.flow.as_mut().unwrap().proto = 6;
        d
    }

    #[test]
    fn flags_combine_with_and_values_with_or() {
        let d = sample();
        assert!(Filter::default().matches(&d));
        let f = Filter {
            src: vec![parse_net("10.0.0.0/8").unwrap()],
            ports: vec![80, 443],
            ..Default::default()
        };
        assert!(f.matches(&d));
        let f = Filter {
            ports: vec![22],
            ..Default::default()
        };
        assert!(!f.matches(&d));
        let f = Filter {
            protos: vec![parse_proto("udp").unwrap()],
            ..Default::default()
        };
        assert!(!f.matches(&d));
        let f = Filter {
            ifaces: vec!["r0".into()],
            netns: vec![42],
            ..Default::default()
        };
        assert!(f.matches(&d));
        let f = Filter {
            dst: vec![parse_net("10.9.0.1").unwrap()],
            netns: vec![7],
            ..Default::default()
        };
        assert!(!f.matches(&d));
    }

    #[test]
    fn pod_filter_needs_an_attributed_drop() {
        let f = Filter {
            pods: vec!["shop/db".parse().unwrap(), "shop/cart".parse().unwrap()],
            ..Default::default()
        };
        let mut d = sample();
        assert!(!f.matches(&d), "no pod known: not that pod");
        let pod = |ns: &str, name: &str| {
            Some(Arc::new(PodRef {
                namespace: ns.into(),
                name: name.into(),
                uid: "u".into(),
                container: None,
            }))
        };
        d.pod = pod("shop", "cart");
        assert!(f.matches(&d));
        d.pod = pod("other", "cart");
        assert!(!f.matches(&d));
        assert_eq!(
            f.to_kernel(),
            Filters::NONE,
            "names are not filtered in the kernel"
        );
    }

    #[test]
    fn kernel_filters_mirror_the_flags() {
        let f = Filter {
            dst: vec![
                parse_net("10.231.2.0/24").unwrap(),
                parse_net("fd00::1").unwrap(),
            ],
            ports: vec![53],
            ifaces: vec!["r0".into()],
            netns: (0..20).collect(),
            ..Default::default()
        };
        let k = f.to_kernel();
        assert_eq!((k.n_dst, k.n_ports, k.n_ifnames, k.n_src), (2, 1, 1, 0));
        assert_eq!(
            (k.dst[0].prefix_len, k.dst[0].family, &k.dst[0].addr[..4]),
            (24, FLAG_IPV4, &[10, 231, 2, 0][..])
        );
        assert_eq!((k.dst[1].prefix_len, k.dst[1].family), (128, FLAG_IPV6));
        assert_eq!(&k.ifnames[0][..3], b"r0\0");
        assert_eq!(
            k.n_netns, 0,
            "too many namespaces for the kernel: filtered in userspace only"
        );
    }

    #[test]
    fn bad_values_are_explained() {
        assert!(parse_proto("tcpp").unwrap_err().contains("not a protocol"));
        assert!(parse_net("10.0.0.0/33")
            .unwrap_err()
            .contains("not an address or CIDR"));
        assert_eq!(parse_proto("47").unwrap(), 47);
    }
}
