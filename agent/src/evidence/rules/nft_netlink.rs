//! nftables read straight from the kernel over netlink (what `nft` itself asks), without the
//! `nft` tool: the ruleset generation, rule dumps (all, or one chain's) and base chain counters.
//!
//! `nft -j list ruleset` needs seconds and hundreds of MB for a kube-proxy-sized ruleset (it
//! builds its whole cache and a JSON tree of it); a dump read here costs milliseconds and
//! holds one datagram at a time. Native rules are decoded into what attribution needs (handle,
//! comment, counter, drop/reject verdict, simple match fields); rules of iptables-nft tables
//! give only their handle and counter (their text comes from `iptables-nft-save`).
use std::{io, os::fd::AsRawFd};

use ipnet::IpNet;
use netlink_sys::{protocols, Socket, SocketAddr};

use super::{Counted, Matcher, RuleId, Target};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
use netlink_packet_core::{NLMSG_DONE, NLMSG_ERROR, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST};

/// A netlink socket to nftables in the calling thread's namespace.
pub struct Nl {
    sock: Socket,
    seq: u32,
}

/// One rule of a dump, borrowed from the datagram it came in.
pub struct NlRule<'a> {
    pub family: u8,
    pub table: &'a str,
    pub chain: &'a str,
    pub handle: u64,
    exprs: &'a [u8],
    udata: Option<&'a [u8]>,
}

/// A base chain's policy and counters.
pub struct NlChain {
    pub table: String,
    pub name: String,
    /// NF_DROP (0) or NF_ACCEPT (1); only base chains have one.
    pub policy: Option<u32>,
    pub packets: Option<u64>,
}

impl Nl {
    /// Opens the socket (in the calling thread's network namespace).
    pub fn open() -> io::Result<Nl> {
        let mut sock = Socket::new(protocols::NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        // A kernel that never answers must not hang the reader.
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: a valid socket and a timeval of the size given.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        Ok(Nl { sock, seq: 0 })
    }

    /// The ruleset generation: it changes with every committed change to any table.
    pub fn generation(&mut self) -> io::Result<u32> {
        let mut gen = None;
        self.request(NFT_MSG_GETGEN, 0, 0, &[], |ty, body| {
            if ty == NFT_MSG_NEWGEN {
                gen = attrs(body.get(4..).unwrap_or_default())
                    .find(|(k, _)| *k == 1)
                    .and_then(|(_, v)| be_u32(v));
            }
        })?;
        gen.ok_or_else(|| io::Error::other("no generation in the answer"))
    }

    /// Dumps rules: all of them (`family` 0, no table), or one table's, or one chain's.
    pub fn rules(
        &mut self,
        family: u8,
        table: Option<&str>,
        chain: Option<&str>,
        mut each: impl FnMut(NlRule),
    ) -> io::Result<()> {
        let mut filter = Vec::new();
        if let Some(t) = table {
            put_str(&mut filter, 1, t);
        }
        if let Some(c) = chain {
            put_str(&mut filter, 2, c);
        }
        self.request(NFT_MSG_GETRULE, NLM_F_DUMP, family, &filter, |ty, body| {
            if ty == NFT_MSG_NEWRULE {
                if let Some(r) = parse_rule(body) {
                    each(r);
                }
            }
        })
    }

    /// The tables: (family, name).
    pub fn tables(&mut self) -> io::Result<Vec<(u8, String)>> {
        const NFT_MSG_NEWTABLE: u16 = 0;
        const NFT_MSG_GETTABLE: u16 = 1;
        let mut out = Vec::new();
        self.request(NFT_MSG_GETTABLE, NLM_F_DUMP, 0, &[], |ty, body| {
            if ty != NFT_MSG_NEWTABLE || body.len() < 4 {
                return;
            }
            if let Some((_, name)) = attrs(&body[4..]).find(|(k, _)| *k == 1) {
                out.push((body[0], c_str(name).to_string()));
            }
        })?;
        Ok(out)
    }

    /// Dumps the chains of `family` (0: all), with the policy and counters of base chains.
    pub fn chains(&mut self, family: u8, table: Option<&str>) -> io::Result<Vec<NlChain>> {
        let mut filter = Vec::new();
        if let Some(t) = table {
            put_str(&mut filter, 1, t);
        }
        let mut out = Vec::new();
        self.request(NFT_MSG_GETCHAIN, NLM_F_DUMP, family, &filter, |ty, body| {
            if ty != NFT_MSG_NEWCHAIN || body.len() < 4 {
                return;
            }
            let mut c = NlChain {
                table: String::new(),
                name: String::new(),
                policy: None,
                packets: None,
            };
            for (k, v) in attrs(&body[4..]) {
                match k {
                    1 => c.table = c_str(v).into(),
                    3 => c.name = c_str(v).into(),
                    5 => c.policy = be_u32(v),
                    8 => c.packets = attrs(v).find(|(k, _)| *k == 2).and_then(|(_, v)| be_u64(v)),
                    _ => {}
                }
            }
            out.push(c);
        })?;
        Ok(out)
    }

    /// Whether an anonymous set of conntrack states (`ct state { invalid, new }`) holds
    /// INVALID (state bit 0).
    pub fn ct_set_has_invalid(&mut self, family: u8, table: &str, set: &str) -> io::Result<bool> {
        const NFT_MSG_GETSETELEM: u16 = 13;
        const NFT_MSG_NEWSETELEM: u16 = 12;
        let mut filter = Vec::new();
        put_str(&mut filter, 1, table);
        put_str(&mut filter, 2, set);
        let mut invalid = false;
        self.request(
            NFT_MSG_GETSETELEM,
            NLM_F_DUMP,
            family,
            &filter,
            |ty, body| {
                if ty != NFT_MSG_NEWSETELEM {
                    return;
                }
                let elems = attrs(body.get(4..).unwrap_or_default()).filter(|(k, _)| *k == 3);
                for (_, list) in elems {
                    for (_, elem) in attrs(list) {
                        let key = attrs(elem)
                            .find(|(k, _)| *k == 1)
                            .and_then(|(_, d)| attrs(d).find(|(k, _)| *k == 1))
                            .map(|(_, v)| v);
                        if let Some(v) = key.and_then(|v| v.get(..4)) {
                            invalid |= u32::from_ne_bytes(v.try_into().unwrap()) & 1 != 0;
                        }
                    }
                }
            },
        )?;
        Ok(invalid)
    }

    /// Sends one request and hands every answer message to `each` until the dump ends.
    fn request(
        &mut self,
        msg: u16,
        flags: u16,
        family: u8,
        payload: &[u8],
        mut each: impl FnMut(u16, &[u8]),
    ) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let len = 16 + 4 + payload.len();
        let mut req = Vec::with_capacity(len);
        req.extend_from_slice(&(len as u32).to_ne_bytes());
        req.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | msg).to_ne_bytes());
        req.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        req.extend_from_slice(&self.seq.to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes());
        req.extend_from_slice(&[family, 0, 0, 0]); // struct nfgenmsg
        req.extend_from_slice(payload);
        self.sock.send_to(&req, &SocketAddr::new(0, 0), 0)?;
        let dump = flags & NLM_F_DUMP != 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.recv(&mut buf)?;
            let mut at = 0;
            while at + 16 <= n {
                let h = &buf[at..];
                let len = u32::from_ne_bytes(h[0..4].try_into().unwrap()) as usize;
                if len < 16 || at + len > n {
                    return Err(io::Error::other("truncated netlink message"));
                }
                let ty = u16::from_ne_bytes(h[4..6].try_into().unwrap());
                let mflags = u16::from_ne_bytes(h[6..8].try_into().unwrap());
                let seq = u32::from_ne_bytes(h[8..12].try_into().unwrap());
                let body = &h[16..len];
                at += (len + 3) & !3;
                if seq != self.seq {
                    continue; // an answer to an earlier, abandoned request
                }
                if mflags & NLM_F_DUMP_INTR != 0 {
                    return Err(io::Error::other("ruleset changed during the dump"));
                }
                match ty & 0xff {
                    _ if ty == NLMSG_DONE => return Ok(()),
                    _ if ty == NLMSG_ERROR => {
                        let errno = body
                            .get(..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                            .unwrap_or(0);
                        if errno == 0 {
                            continue; // an ACK
                        }
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                    _ if ty >> 8 == NFNL_SUBSYS_NFTABLES => {
                        each(ty & 0xff, body);
                        if !dump {
                            return Ok(());
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: a valid socket and a buffer of the length given.
        let n = unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

fn put_str(out: &mut Vec<u8>, kind: u16, s: &str) {
    let len = 4 + s.len() + 1;
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(s.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// The attributes of a netlink body: (type without flags, value). Stops at a malformed one.
pub fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            b = &[];
            return None;
        }
        let value = &b[4..len];
        b = &b[((len + 3) & !3).min(b.len())..];
        Some((kind, value))
    })
}

fn be_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
}

fn be_u64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.get(..8)?.try_into().ok()?))
}

fn c_str(v: &[u8]) -> &str {
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    std::str::from_utf8(&v[..end]).unwrap_or("")
}

/// An NFT_MSG_NEWRULE body.
pub fn parse_rule(body: &[u8]) -> Option<NlRule<'_>> {
    let family = *body.first()?;
    let mut r = NlRule {
        family,
        table: "",
        chain: "",
        handle: 0,
        exprs: &[],
        udata: None,
    };
    for (k, v) in attrs(body.get(4..)?) {
        match k {
            1 => r.table = c_str(v),
            2 => r.chain = c_str(v),
            3 => r.handle = be_u64(v)?,
            4 => r.exprs = v,
            7 => r.udata = Some(v),
            _ => {}
        }
    }
    Some(r)
}

/// nft's name of an NFPROTO_* family.
pub fn family_name(f: u8) -> &'static str {
    match f {
        1 => "inet",
        2 => "ip",
        3 => "arp",
        5 => "netdev",
        7 => "bridge",
        10 => "ip6",
        _ => "unknown",
    }
}

/// The expressions of a rule: (name, data).
fn exprs<'a>(rule: &NlRule<'a>) -> impl Iterator<Item = (&'a str, &'a [u8])> {
    attrs(rule.exprs).filter(|(k, _)| *k == 1).map(|(_, elem)| {
        let (mut name, mut data): (&str, &[u8]) = ("", &[]);
        for (k, v) in attrs(elem) {
            match k {
                1 => name = c_str(v),
                2 => data = v,
                _ => {}
            }
        }
        (name, data)
    })
}

impl NlRule<'_> {
    /// Packets of the rule's first counter.
    pub fn packets(&self) -> Option<u64> {
        exprs(self)
            .find(|(n, _)| *n == "counter")
            .and_then(|(_, d)| attrs(d).find(|(k, _)| *k == 2))
            .and_then(|(_, v)| be_u64(v))
    }

    /// The rule's comment (nft's userdata TLV type 0).
    pub fn comment(&self) -> Option<&str> {
        let mut u = self.udata?;
        while u.len() >= 2 {
            let (ty, len) = (u[0], u[1] as usize);
            let value = u.get(2..2 + len)?;
            if ty == 0 {
                return Some(c_str(value));
            }
            u = &u[2 + len..];
        }
        None
    }

    /// A native rule with a counter and a drop/reject verdict, as attribution keeps it, and
    /// the anonymous set its `ct state { ... }` looks up, if any (its elements say whether
    /// it matches INVALID: see [`Nl::ct_set_has_invalid`]).
    pub fn decode(&self) -> Option<(RuleId, Counted, Option<String>)> {
        // Most rules jump, go to, NAT or accept: pass them over before looking closer.
        let (mut counter, mut verdict_expr) = (false, false);
        for (name, _) in exprs(self) {
            match name {
                "counter" => counter = true,
                "immediate" | "reject" => verdict_expr = true,
                _ => {}
            }
        }
        if !(counter && verdict_expr) {
            return None;
        }
        let mut packets = None;
        let mut verdict = None;
        let mut m = MatchState::new(self.family);
        for (name, data) in exprs(self) {
            match name {
                "counter" if packets.is_none() => {
                    packets = attrs(data)
                        .find(|(k, _)| *k == 2)
                        .and_then(|(_, v)| be_u64(v))
                }
                "immediate" => {
                    // dreg 0 is the verdict register; NF_DROP is verdict code 0.
                    let dreg = attrs(data)
                        .find(|(k, _)| *k == 1)
                        .and_then(|(_, v)| be_u32(v));
                    let code = attrs(data)
                        .find(|(k, _)| *k == 2)
                        .and_then(|(_, d)| attrs(d).find(|(k, _)| *k == 2))
                        .and_then(|(_, v)| attrs(v).find(|(k, _)| *k == 1))
                        .and_then(|(_, v)| be_u32(v));
                    if dreg == Some(0) && code == Some(0) {
                        verdict.get_or_insert(Target::Drop);
                    }
                }
                "reject" => {
                    let ty = attrs(data)
                        .find(|(k, _)| *k == 1)
                        .and_then(|(_, v)| be_u32(v));
                    let code = attrs(data)
                        .find(|(k, _)| *k == 2)
                        .and_then(|(_, v)| v.first().copied());
                    verdict.get_or_insert(Target::Reject(reject_with(
                        m.v6 == Some(true),
                        ty,
                        code,
                    )));
                }
                _ => m.expr(name, data),
            }
        }
        let (verdict, packets) = (verdict?, packets?);
        let comment = self
            .comment()
            .map(|c| format!(" comment \"{c}\""))
            .unwrap_or_default();
        let id = RuleId {
            engine: "nftables",
            table: format!("{} {}", family_name(self.family), self.table),
            chain: self.chain.to_string(),
            text: format!("handle {}{comment}", self.handle),
        };
        Some((
            id,
            Counted {
                verdict,
                matcher: m.matcher,
                packets,
            },
            m.ct_set,
        ))
    }
}

/// What a reject answers, in the words of nft's JSON ("tcp-reset", "port-unreachable",
/// "admin-prohibited", ...): the code names of ICMP, ICMPv6 (`v6`) or ICMPX.
fn reject_with(v6: bool, ty: Option<u32>, code: Option<u8>) -> String {
    let code = code.unwrap_or(if v6 { 4 } else { 3 });
    match ty {
        Some(1) => "tcp-reset",
        // NFT_REJECT_ICMPX_UNREACH: one code for both families.
        Some(2) => match code {
            0 => "no-route",
            1 => "port-unreachable",
            2 => "host-unreachable",
            3 => "admin-prohibited",
            _ => "unreachable",
        },
        _ if v6 => match code {
            0 => "no-route",
            1 => "admin-prohibited",
            3 => "addr-unreachable",
            4 => "port-unreachable",
            5 => "policy-fail",
            6 => "reject-route",
            _ => "unreachable",
        },
        _ => match code {
            0 => "net-unreachable",
            1 => "host-unreachable",
            2 => "prot-unreachable",
            3 => "port-unreachable",
            9 => "net-prohibited",
            10 => "host-prohibited",
            13 => "admin-prohibited",
            _ => "unreachable",
        },
    }
    .into()
}

/// What a register holds while a rule's expressions are walked.
#[derive(Clone, Copy)]
enum Load {
    /// Header field: base (1 network, 2 transport), offset, length.
    Payload(u32, u32, u32),
    Meta(u32),
    Ct(u32),
    /// A value masked by a bitwise expression (the mask's first bytes, as prefix length
    /// for addresses or as bits for ct state).
    Masked(u32, u32, u32, [u8; 16]),
    CtMasked([u8; 4]),
}

/// Turns a rule's loads and comparisons into the simple fields of a [`Matcher`]; anything
/// else (negations, sets, lookups, maps) is left unknown.
struct MatchState {
    /// The network protocol the rule is restricted to (inet: from `meta nfproto`).
    v6: Option<bool>,
    regs: [Option<Load>; 24],
    matcher: Matcher,
    /// The set a `ct state` is looked up in.
    ct_set: Option<String>,
    /// A port compared with `>=` (the low end of a range, `<=` comes next): (offset, port).
    low_port: Option<(u32, u16)>,
}

const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
const NFT_CT_STATE: u32 = 0;

impl MatchState {
    fn new(family: u8) -> Self {
        MatchState {
            v6: match family {
                2 => Some(false),
                10 => Some(true),
                _ => None,
            },
            regs: [None; 24],
            matcher: Matcher::default(),
            ct_set: None,
            low_port: None,
        }
    }

    /// Registers 1-4 are 16 bytes, 8-23 are 4: both index the same array.
    fn reg(r: Option<u32>) -> Option<usize> {
        let r = r? as usize;
        (r < 24).then_some(r)
    }

    fn expr(&mut self, name: &str, data: &[u8]) {
        let get = |k: u16| attrs(data).find(|(kk, _)| *kk == k).map(|(_, v)| v);
        let u = |k: u16| get(k).and_then(be_u32);
        match name {
            "payload" => {
                if let (Some(r), Some(base), Some(off), Some(len)) =
                    (Self::reg(u(1)), u(2), u(3), u(4))
                {
                    self.regs[r] = Some(Load::Payload(base, off, len));
                }
            }
            "meta" => {
                if let (Some(r), Some(key)) = (Self::reg(u(1)), u(2)) {
                    self.regs[r] = Some(Load::Meta(key));
                }
            }
            "ct" => {
                if let (Some(r), Some(key)) = (Self::reg(u(1)), u(2)) {
                    self.regs[r] = Some(Load::Ct(key));
                }
            }
            "bitwise" => {
                let (Some(s), Some(d)) = (Self::reg(u(1)), Self::reg(u(2))) else {
                    return;
                };
                let mask = get(4)
                    .and_then(|d| attrs(d).find(|(k, _)| *k == 1))
                    .map(|(_, v)| v)
                    .unwrap_or_default();
                self.regs[d] = match self.regs[s] {
                    Some(Load::Payload(b, o, l)) => {
                        let mut m = [0u8; 16];
                        let n = mask.len().min(16);
                        m[..n].copy_from_slice(&mask[..n]);
                        Some(Load::Masked(b, o, l, m))
                    }
                    Some(Load::Ct(NFT_CT_STATE)) => {
                        let mut m = [0u8; 4];
                        let n = mask.len().min(4);
                        m[..n].copy_from_slice(&mask[..n]);
                        Some(Load::CtMasked(m))
                    }
                    _ => None,
                };
            }
            "cmp" => {
                let (Some(r), Some(op)) = (Self::reg(u(1)), u(2)) else {
                    return;
                };
                let value = get(3)
                    .and_then(|d| attrs(d).find(|(k, _)| *k == 1))
                    .map(|(_, v)| v)
                    .unwrap_or_default();
                if let Some(load) = self.regs[r] {
                    self.cmp(load, op, value);
                }
            }
            "lookup" => {
                // `ct state { invalid, ... }`: a lookup (not inverted) in an anonymous set.
                let inverted = u(5).is_some_and(|f| f & 1 != 0);
                if let (Some(r), Some(set)) = (Self::reg(u(2)), get(1)) {
                    if matches!(self.regs[r], Some(Load::Ct(NFT_CT_STATE))) && !inverted {
                        self.ct_set = Some(c_str(set).to_string());
                    }
                }
            }
            "range" => {
                // Ports in a range: `tcp dport 1000-2000`.
                let (Some(r), Some(0)) = (Self::reg(u(1)), u(2)) else {
                    return;
                };
                let val = |k| {
                    get(k)
                        .and_then(|d| attrs(d).find(|(k, _)| *k == 1))
                        .and_then(|(_, v)| Some(u16::from_be_bytes(v.get(..2)?.try_into().ok()?)))
                };
                if let (Some(Load::Payload(2, off, 2)), Some(lo), Some(hi)) =
                    (self.regs[r], val(3), val(4))
                {
                    match off {
                        0 => self.matcher.sport = Some((lo, hi)),
                        2 => self.matcher.dport = Some((lo, hi)),
                        _ => {}
                    }
                }
            }
            // Anything else that writes a register (lookup with a dreg, fib, ...) makes what
            // it held unknown; plain lookups only read.
            _ => {}
        }
    }

    fn cmp(&mut self, load: Load, op: u32, v: &[u8]) {
        const EQ: u32 = 0;
        const NEQ: u32 = 1;
        const LTE: u32 = 3;
        const GTE: u32 = 5;
        match (load, op) {
            // `tcp dport 1000-2000`: >= 1000, then <= 2000.
            (Load::Payload(2, off @ (0 | 2), 2), GTE) if v.len() >= 2 => {
                self.low_port = Some((off, u16::from_be_bytes([v[0], v[1]])));
            }
            (Load::Payload(2, off @ (0 | 2), 2), LTE) if v.len() >= 2 => {
                if let Some((o, lo)) = self.low_port.take().filter(|(o, _)| *o == off) {
                    let range = Some((lo, u16::from_be_bytes([v[0], v[1]])));
                    if o == 0 {
                        self.matcher.sport = range;
                    } else {
                        self.matcher.dport = range;
                    }
                }
            }
            // ct state & BITS != 0, INVALID being bit 0; or ct state == invalid.
            (Load::CtMasked(mask), NEQ)
                if v.iter().all(|&b| b == 0) && u32::from_ne_bytes(mask) & 1 != 0 =>
            {
                self.matcher.ct_invalid = true;
            }
            (Load::Ct(NFT_CT_STATE), EQ)
                if v.len() >= 4 && u32::from_ne_bytes(v[..4].try_into().unwrap()) == 1 =>
            {
                self.matcher.ct_invalid = true;
            }
            (Load::Meta(NFT_META_NFPROTO), EQ) => match v.first() {
                Some(2) => self.v6 = Some(false),
                Some(10) => self.v6 = Some(true),
                _ => {}
            },
            (Load::Meta(NFT_META_L4PROTO), EQ) => self.matcher.proto = v.first().copied(),
            (Load::Meta(key @ (NFT_META_IIFNAME | NFT_META_OIFNAME)), EQ) => {
                // A wildcard ("eth*") compares fewer bytes and has no terminating NUL.
                if let Some(end) = v.iter().position(|&b| b == 0) {
                    let name = String::from_utf8_lossy(&v[..end]).into_owned();
                    if key == NFT_META_IIFNAME {
                        self.matcher.iif = Some(name);
                    } else {
                        self.matcher.oif = Some(name);
                    }
                }
            }
            (Load::Payload(1, off, 1), EQ) => {
                // ip protocol / ip6 nexthdr
                match (self.v6, off) {
                    (Some(false), 9) | (Some(true), 6) => self.matcher.proto = v.first().copied(),
                    _ => {}
                }
            }
            (Load::Payload(2, off, 2), EQ) if v.len() >= 2 => {
                let p = u16::from_be_bytes([v[0], v[1]]);
                match off {
                    0 => self.matcher.sport = Some((p, p)),
                    2 => self.matcher.dport = Some((p, p)),
                    _ => {}
                }
            }
            (Load::Payload(1, off, len), EQ) => {
                if let Some((src, net)) = self.address(off, len, v, None) {
                    self.set_addr(src, net);
                }
            }
            (Load::Masked(1, off, len, mask), EQ) => {
                if let Some((src, net)) = self.address(off, len, v, Some(&mask)) {
                    self.set_addr(src, net);
                }
            }
            _ => {}
        }
    }

    fn set_addr(&mut self, src: bool, net: IpNet) {
        if src {
            self.matcher.src = Some(net);
        } else {
            self.matcher.dst = Some(net);
        }
    }

    /// An address compared at a network header offset: (is source, network). nft loads only
    /// the bytes a prefix covers (`ip daddr 10.0.0.0/8` compares one byte) and masks the
    /// rest of a prefix that ends inside a byte.
    fn address(
        &self,
        off: u32,
        len: u32,
        v: &[u8],
        mask: Option<&[u8; 16]>,
    ) -> Option<(bool, IpNet)> {
        let (src, size) = match (self.v6?, off) {
            (false, 12) => (true, 4),
            (false, 16) => (false, 4),
            (true, 8) => (true, 16),
            (true, 24) => (false, 16),
            _ => return None,
        };
        let n = len as usize;
        if n == 0 || n > size || v.len() < n {
            return None;
        }
        let prefix = match mask {
            None => n * 8,
            Some(m) => {
                // Only a contiguous prefix mask is a network.
                let bits: Vec<u8> = m[..n]
                    .iter()
                    .flat_map(|b| (0..8).rev().map(move |i| b >> i & 1))
                    .collect();
                let ones = bits.iter().take_while(|&&b| b == 1).count();
                if bits[ones..].contains(&1) {
                    return None;
                }
                ones
            }
        };
        let mut full = [0u8; 16];
        full[..n].copy_from_slice(&v[..n]);
        let net = if size == 4 {
            let a = std::net::Ipv4Addr::new(full[0], full[1], full[2], full[3]);
            IpNet::V4(ipnet::Ipv4Net::new(a, prefix as u8).ok()?.trunc())
        } else {
            IpNet::V6(
                ipnet::Ipv6Net::new(std::net::Ipv6Addr::from(full), prefix as u8)
                    .ok()?
                    .trunc(),
            )
        };
        Some((src, net))
    }
}
