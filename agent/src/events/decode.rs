//! Ring-buffer records to the event model: reason numbers and addresses named, devices,
//! flows and sysctls typed, absent values `None`.
use std::{net::IpAddr, sync::Arc};

use agent_ebpf::{
    AggKey, Event, EventKind, CTX_FORWARD, CTX_NETFILTER, CTX_ROUTE_ERROR, CTX_RULESET, ENGINE_NFT,
    FLAG_DEV, FLAG_DST, FLAG_FRAG, FLAG_IPV4, FLAG_IPV6, FLAG_L4,
};

use super::*;
use crate::kernel::{
    btf::{DropReasons, NetfilterNames},
    kallsyms::Kallsyms,
};

/// Turns raw records into typed ones, naming reasons and locations.
pub struct Decoder {
    pub reasons: DropReasons,
    /// Shared with the stack reader (single-threaded session).
    pub symbols: std::rc::Rc<std::cell::RefCell<Kallsyms>>,
    names: std::collections::HashMap<u32, Arc<str>>,
    netfilter: NetfilterNames,
}

impl Decoder {
    pub fn new(reasons: DropReasons, symbols: std::rc::Rc<std::cell::RefCell<Kallsyms>>) -> Self {
        Decoder {
            reasons,
            symbols,
            names: Default::default(),
            netfilter: NetfilterNames::default(),
        }
    }

    /// Names netfilter hooks and families reported by the nf_hook_slow probe.
    pub fn with_netfilter_names(mut self, names: NetfilterNames) -> Self {
        self.netfilter = names;
        self
    }

    /// Decodes one ring-buffer record; `None` if it is not a record this version knows.
    pub fn decode(&mut self, bytes: &[u8]) -> Option<Record> {
        let ev = parse(bytes)?;
        match ev.kind {
            k if k == EventKind::Drop as u8 => {
                let mut d = self.drop(&ev);
                d.packet = crate::capture::Packet::after_event(bytes).map(Arc::new);
                Some(Record::Drop(d))
            }
            k if k == EventKind::IcmpSent as u8
                || k == EventKind::Icmp6Sent as u8
                || k == EventKind::RstSent as u8 =>
            {
                let answer = if k == EventKind::RstSent as u8 {
                    Answer::TcpReset
                } else if k == EventKind::Icmp6Sent as u8 {
                    Answer::Icmp6(ev.icmp_type, ev.icmp_code)
                } else {
                    Answer::Icmp(ev.icmp_type, ev.icmp_code)
                };
                Some(Record::Reply(Reply {
                    ts_ns: ev.ts_ns,
                    skb: ev.skb,
                    answer,
                    flow: flow(&ev),
                }))
            }
            _ => None,
        }
    }

    fn drop(&mut self, ev: &Event) -> DropEvent {
        let reasons = &self.reasons;
        let reason = self
            .names
            .entry(ev.reason)
            .or_insert_with(|| Arc::from(reasons.name(ev.reason)))
            .clone();
        let opt = |v: i8| u8::try_from(v).ok();
        let context = self.context(ev);
        let dev = (ev.flags & FLAG_DEV != 0).then(|| Device::new(ev.ifindex, ev.ifname, ev.mtu));
        // A forwarded packet that died on its way out (queue, shaper) is on its egress device
        // already, and may have lost its route: that device is where it was going.
        // skb_iif is where the packet arrived; when it differs from skb->dev the packet is
        // on its way out (forwarded, bridged) and skb->dev is an egress device.
        let iif = (ev.iif != 0 && dev.is_some_and(|d| d.ifindex != ev.iif)).then_some(ev.iif);
        let egress = dev.filter(|d| {
            iif.is_some()
                || context
                    .forwarded_from
                    .is_some_and(|from| from.ifindex != d.ifindex)
        });
        let flow = flow(ev);
        DropEvent {
            ts_ns: ev.ts_ns,
            skb: ev.skb,
            reason,
            location: self.symbols.borrow_mut().resolve(ev.location),
            netns: ev.netns,
            dev,
            // A packet on its way out is on its egress device; the route's device may be a
            // stand-in (br_netfilter gives bridged frames the bridge's own route).
            out: egress.or(route_device(ev)),
            len: ev.len,
            mark: (!tailroom_in_mark(flow.as_ref())).then_some(ev.mark),
            ttl: (ev.flags & (FLAG_IPV4 | FLAG_IPV6) != 0).then_some(ev.ttl),
            flow,
            fragment: (ev.flags & FLAG_FRAG != 0).then_some(ev.frag_off),
            iif,
            arrived_on: None,
            sysctls: Sysctls {
                dev_forwarding: opt(ev.dev_forwarding),
                all_forwarding: opt(ev.all_forwarding),
                dev_rp_filter: opt(ev.dev_rp_filter),
                all_rp_filter: opt(ev.all_rp_filter),
                dev6_forwarding: opt(ev.dev6_forwarding),
                all6_forwarding: opt(ev.all6_forwarding),
            },
            stack_id: u32::try_from(ev.stack_id).ok(),
            agg: AggKey::of(ev),
            context,
            pod: None,
            packet: None,
        }
    }

    fn context(&self, ev: &Event) -> Context {
        let has = |flag| ev.context & flag != 0;
        Context {
            forwarded_from: has(CTX_FORWARD).then(|| Device::new(ev.in_ifindex, ev.in_ifname, 0)),
            netfilter: has(CTX_NETFILTER).then(|| NfHook {
                hook: self.netfilter.hook(ev.nf_pf, ev.nf_hook),
                family: self.netfilter.family(ev.nf_pf),
                in_ifindex: ev.nf_in_ifindex,
                out_ifindex: ev.nf_out_ifindex,
            }),
            ruleset: has(CTX_RULESET).then(|| Ruleset {
                engine: if ev.rs_engine == ENGINE_NFT {
                    "nftables"
                } else {
                    "iptables-legacy"
                },
                table: c_string(&ev.rs_table),
                chain: Some(c_string(&ev.rs_chain)).filter(|c| !c.is_empty()),
            }),
            route_error: has(CTX_ROUTE_ERROR).then_some(ev.route_error),
        }
    }

    /// A drop standing for a kernel count whose events never reached userspace (all sampled
    /// away or lost): only what the key itself says is known.
    pub fn synthetic(&mut self, key: &AggKey, ts_ns: u64) -> DropEvent {
        let mut ev = Event::zeroed();
        ev.kind = EventKind::Drop as u8;
        ev.ts_ns = ts_ns;
        ev.location = key.location;
        ev.reason = key.reason;
        ev.netns = key.netns;
        ev.ifindex = key.ifindex;
        ev.l4_proto = key.l4_proto;
        self.drop(&ev)
    }
}

/// Whether `skb->mark` may hold `reserved_tailroom` instead (they share memory): the kernel
/// sets it on the IGMP and MLD reports it builds, and the value travels with the packet within
/// a namespace (a veth peer receives it as it was). A mark read there is not a mark.
fn tailroom_in_mark(flow: Option<&Flow>) -> bool {
    const IPPROTO_IGMP: u8 = 2;
    const MLD_TYPES: [u8; 4] = [130, 131, 132, 143];
    flow.is_some_and(|f| {
        f.proto == IPPROTO_IGMP
            || (f.proto == 58 && f.icmp.is_some_and(|(t, _)| MLD_TYPES.contains(&t)))
    })
}

/// The device the route sends the packet to. Received packets that end in a local or error
/// route (forwarding off, no route, delivered here) point at loopback (always ifindex 1):
/// that is not an egress, so it is left out rather than reported as one.
fn route_device(ev: &Event) -> Option<Device> {
    const LOOPBACK_IFINDEX: u32 = 1;
    if ev.flags & FLAG_DST == 0 {
        return None;
    }
    let received = ev.flags & FLAG_DEV != 0 && ev.ifindex != LOOPBACK_IFINDEX;
    if received && ev.out_ifindex == LOOPBACK_IFINDEX {
        return None;
    }
    Some(Device::new(ev.out_ifindex, ev.out_ifname, ev.out_mtu))
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Copies a record out of the ring buffer (which gives no alignment guarantee for our type).
pub fn parse(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < std::mem::size_of::<Event>() {
        return None;
    }
    // SAFETY: length checked; Event is plain old data valid for any bit pattern.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

fn flow(ev: &Event) -> Option<Flow> {
    let (family, src, dst) = if ev.flags & FLAG_IPV4 != 0 {
        let v4 = |a: &[u8; 16]| IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]));
        (Family::Ipv4, v4(&ev.saddr), v4(&ev.daddr))
    } else if ev.flags & FLAG_IPV6 != 0 {
        (
            Family::Ipv6,
            IpAddr::V6(Ipv6Addr::from(ev.saddr)),
            IpAddr::V6(Ipv6Addr::from(ev.daddr)),
        )
    } else {
        return None;
    };
    let l4 = ev.flags & FLAG_L4 != 0;
    let is_icmp = matches!(ev.l4_proto, 1 | 58);
    Some(Flow {
        family,
        proto: ev.l4_proto,
        src,
        dst,
        ports: (l4 && !is_icmp).then_some((ev.sport, ev.dport)),
        icmp: (l4 && is_icmp).then_some((ev.icmp_type, ev.icmp_code)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(f: impl FnOnce(&mut Event)) -> Vec<u8> {
        let mut ev = Event::zeroed();
        f(&mut ev);
        // SAFETY: Event is POD; view it as bytes like the ring buffer delivers it.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&ev as *const Event).cast::<u8>(),
                std::mem::size_of::<Event>(),
            )
        };
        bytes.to_vec()
    }

    fn decoder() -> Decoder {
        let reasons = DropReasons::new(
            vec![
                ("SKB_DROP_REASON_NO_SOCKET".into(), 3),
                ("SKB_DROP_REASON_IP_RPFILTER".into(), 16),
            ],
            vec![],
        );
        let symbols = Kallsyms::parse("ffffffff81000000 T tcp_v4_rcv\n");
        Decoder::new(reasons, std::rc::Rc::new(std::cell::RefCell::new(symbols)))
    }

    #[test]
    fn decodes_an_ipv4_tcp_drop() {
        let bytes = raw(|e| {
            e.kind = EventKind::Drop as u8;
            e.reason = 3;
            e.location = 0xffffffff81000040;
            e.flags = FLAG_IPV4 | FLAG_L4 | FLAG_DEV;
            e.l4_proto = 6;
            e.saddr[..4].copy_from_slice(&[10, 231, 1, 2]);
            e.daddr[..4].copy_from_slice(&[10, 231, 2, 2]);
            e.sport = 40000;
            e.dport = 8081;
            e.ifindex = 7;
            e.ifname[..2].copy_from_slice(b"b0");
            e.dev_forwarding = 0;
            e.all_rp_filter = 2;
        });
        let Some(Record::Drop(d)) = decoder().decode(&bytes) else {
            panic!("not a drop")
        };
        assert_eq!(&*d.reason, "NO_SOCKET");
        assert_eq!(&*d.location, "tcp_v4_rcv");
        let flow = d.flow.unwrap();
        assert_eq!(flow.to_string(), "10.231.1.2:40000 -> 10.231.2.2:8081 tcp");
        assert_eq!(d.dev.unwrap().name(), "b0");
        assert_eq!(d.sysctls.dev_forwarding, Some(0));
        assert_eq!(
            d.sysctls.dev_rp_filter, None,
            "-1 from the kernel means unknown"
        );
        assert_eq!(d.sysctls.effective_rp_filter(), Some(2));
        assert!(d.out.is_none());
    }

    #[test]
    fn loopback_routes_of_received_packets_are_not_an_egress() {
        let mut dec = decoder();
        let with_route = |out_ifindex| {
            raw(|e| {
                e.kind = EventKind::Drop as u8;
                e.flags = FLAG_DEV | FLAG_DST;
                e.ifindex = 2;
                e.out_ifindex = out_ifindex;
            })
        };
        let Some(Record::Drop(d)) = dec.decode(&with_route(1)) else {
            panic!()
        };
        assert!(d.out.is_none(), "error/local route via lo");
        let Some(Record::Drop(d)) = dec.decode(&with_route(3)) else {
            panic!()
        };
        assert_eq!(d.out.unwrap().ifindex, 3);
    }

    #[test]
    fn decodes_ipv6_icmp_and_icmp_sent() {
        let mut dec = decoder();
        let bytes = raw(|e| {
            e.kind = EventKind::Drop as u8;
            e.flags = FLAG_IPV6 | FLAG_L4;
            e.l4_proto = 58;
            e.saddr = Ipv6Addr::new(0xfd00, 0x231, 1, 0, 0, 0, 0, 2).octets();
            e.daddr = Ipv6Addr::new(0xfd00, 0x231, 2, 0, 0, 0, 0, 2).octets();
            e.icmp_type = 128;
            e.reason = 77;
        });
        let Some(Record::Drop(d)) = dec.decode(&bytes) else {
            panic!()
        };
        assert_eq!(
            d.flow.unwrap().to_string(),
            "fd00:231:1::2 -> fd00:231:2::2 icmpv6 128/0"
        );
        assert_eq!(&*d.reason, "REASON_77", "unknown numbers stay visible");
        let bytes = raw(|e| {
            e.kind = EventKind::IcmpSent as u8;
            e.icmp_type = 3;
            e.icmp_code = 3;
            e.skb = 0x1234;
        });
        let Some(Record::Reply(i)) = dec.decode(&bytes) else {
            panic!()
        };
        assert_eq!((i.answer, i.skb), (Answer::Icmp(3, 3), 0x1234));
        let bytes = raw(|e| e.kind = EventKind::RstSent as u8);
        let Some(Record::Reply(r)) = dec.decode(&bytes) else {
            panic!()
        };
        assert_eq!(r.answer, Answer::TcpReset);
    }

    #[test]
    fn context_probe_facts_are_decoded_and_named_from_btf() {
        let btf =
            crate::kernel::btf::KernelBtf::open(std::path::Path::new("/sys/kernel/btf/vmlinux"))
                .unwrap();
        let mut dec = decoder().with_netfilter_names(btf.netfilter_names());
        let bytes = raw(|e| {
            e.kind = EventKind::Drop as u8;
            e.flags = FLAG_DEV;
            e.ifindex = 5;
            e.ifname[..2].copy_from_slice(b"r1");
            e.context = CTX_FORWARD | CTX_NETFILTER | CTX_RULESET;
            e.in_ifindex = 4;
            e.in_ifname[..2].copy_from_slice(b"r0");
            e.nf_pf = 2; // NFPROTO_IPV4
            e.nf_hook = 2; // NF_INET_FORWARD
            e.rs_engine = ENGINE_NFT;
            e.rs_table[..3].copy_from_slice(b"ctx");
            e.rs_chain[..3].copy_from_slice(b"fwd");
        });
        let Some(Record::Drop(d)) = dec.decode(&bytes) else {
            panic!()
        };
        let nf = d.context.netfilter.unwrap();
        assert_eq!((nf.hook, nf.family), (Some("forward"), Some("ipv4")));
        let rs = d.context.ruleset.as_ref().unwrap();
        assert_eq!(
            (rs.engine, rs.table.as_str(), rs.chain.as_deref()),
            ("nftables", "ctx", Some("fwd"))
        );
        assert_eq!(
            d.ingress().unwrap().name(),
            "r0",
            "a forwarded packet came in on r0, not skb->dev"
        );
        assert_eq!(d.dev.unwrap().name(), "r1");
        assert!(d.context.route_error.is_none());
        // Without context flags nothing is made up.
        let Some(Record::Drop(d)) = dec.decode(&raw(|e| e.kind = EventKind::Drop as u8)) else {
            panic!()
        };
        assert_eq!(d.context, Context::default());
    }

    #[test]
    fn short_or_unknown_records_are_rejected() {
        assert!(decoder().decode(&[0u8; 10]).is_none());
        assert!(decoder().decode(&raw(|e| e.kind = 99)).is_none());
    }

    mod props {
        use super::*;
        use crate::fuzz;
        use proptest::prelude::*;

        const SIZE: usize = std::mem::size_of::<Event>();

        /// Any bit pattern of a whole record, as the ring buffer could deliver it.
        fn record() -> impl Strategy<Value = Vec<u8>> {
            prop::collection::vec(any::<u8>(), SIZE)
        }

        proptest! {
            #![proptest_config(fuzz::config())]

            #[test]
            fn prop_any_bytes_of_any_length_never_panic(bytes in fuzz::bytes(SIZE + 64)) {
                let decoded = decoder().decode(&bytes);
                if bytes.len() < SIZE {
                    prop_assert!(decoded.is_none(), "a short record decoded");
                }
            }

            #[test]
            fn prop_every_truncation_of_a_record_is_rejected(
                bytes in record(),
                cut in 0..SIZE,
            ) {
                prop_assert!(decoder().decode(&bytes[..cut]).is_none());
                prop_assert!(parse(&bytes[..cut]).is_none());
            }

            #[test]
            fn prop_a_record_decodes_to_its_own_fields(mut bytes in record(), kind in 0u8..8) {
                // `kind` sits at a fixed offset; set it so every kind is tried often.
                bytes[std::mem::offset_of!(Event, kind)] = kind;
                let ev = parse(&bytes).unwrap();
                let decoded = decoder().decode(&bytes);
                let ip = ev.flags & (FLAG_IPV4 | FLAG_IPV6) != 0;
                let check_flow = |flow: Option<Flow>| -> Result<(), TestCaseError> {
                    prop_assert_eq!(flow.is_some(), ip);
                    if let Some(f) = flow {
                        prop_assert_eq!(f.proto, ev.l4_proto);
                        if ev.flags & FLAG_IPV4 != 0 {
                            prop_assert_eq!(f.family, Family::Ipv4);
                            let v4: [u8; 4] = ev.saddr[..4].try_into().unwrap();
                            prop_assert_eq!(f.src, IpAddr::from(v4));
                        } else {
                            prop_assert_eq!(f.family, Family::Ipv6);
                            prop_assert_eq!(f.dst, IpAddr::from(ev.daddr));
                        }
                        let l4 = ev.flags & FLAG_L4 != 0;
                        prop_assert_eq!(f.ports.is_some() || f.icmp.is_some(), l4);
                        if let Some(p) = f.ports {
                            prop_assert_eq!(p, (ev.sport, ev.dport));
                        }
                        // Displaying any flow works.
                        let _ = f.to_string();
                    }
                    Ok(())
                };
                match decoded {
                    Some(Record::Drop(d)) => {
                        prop_assert_eq!(kind, EventKind::Drop as u8);
                        prop_assert_eq!((d.ts_ns, d.skb, d.netns, d.len), (ev.ts_ns, ev.skb, ev.netns, ev.len));
                        let reason = decoder().reasons.name(ev.reason);
                        prop_assert_eq!(&*d.reason, reason.as_str());
                        prop_assert_eq!(d.dev.map(|d| d.ifindex), (ev.flags & FLAG_DEV != 0).then_some(ev.ifindex));
                        prop_assert_eq!(d.sysctls.all_rp_filter, u8::try_from(ev.all_rp_filter).ok());
                        prop_assert_eq!(d.stack_id, u32::try_from(ev.stack_id).ok());
                        prop_assert_eq!(d.fragment, (ev.flags & FLAG_FRAG != 0).then_some(ev.frag_off));
                        prop_assert_eq!(d.context.route_error, (ev.context & CTX_ROUTE_ERROR != 0).then_some(ev.route_error));
                        if let Some(rs) = &d.context.ruleset {
                            prop_assert!(rs.table.len() <= 3 * ev.rs_table.len());
                        }
                        if let Some(dev) = d.dev {
                            let _ = dev.name();
                        }
                        check_flow(d.flow)?;
                    }
                    Some(Record::Reply(r)) => {
                        prop_assert!(matches!(kind, 2..=4), "kind {} is no reply", kind);
                        prop_assert_eq!((r.ts_ns, r.skb), (ev.ts_ns, ev.skb));
                        let want = match kind {
                            2 => Answer::Icmp(ev.icmp_type, ev.icmp_code),
                            4 => Answer::Icmp6(ev.icmp_type, ev.icmp_code),
                            _ => Answer::TcpReset,
                        };
                        prop_assert_eq!(r.answer, want);
                        check_flow(r.flow)?;
                    }
                    None => prop_assert!(!matches!(kind, 1..=4), "kind {} was dropped", kind),
                }
            }

            #[test]
            fn prop_synthetic_drops_of_any_key_never_panic(
                location in any::<u64>(),
                reason in any::<u32>(),
                netns in any::<u32>(),
                ifindex in any::<u32>(),
                l4_proto in any::<u8>(),
            ) {
                let key = AggKey { location, reason, netns, ifindex, l4_proto, ..Default::default() };
                let d = decoder().synthetic(&key, 1);
                prop_assert_eq!((d.netns, d.flow.is_none()), (netns, true));
            }
        }
    }
}
