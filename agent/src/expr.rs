//! Filter expressions in tcpdump's language (pcap-filter), the common subset:
//! `host`, `net` (CIDR, `mask`, or a dotted prefix), `port`, `portrange`, the `src`/`dst`
//! qualifiers (`src or dst`, `src and dst`), `ip`, `ip6`, `tcp`, `udp`, `icmp`, `icmp6`,
//! `proto`, `and`/`or`/`not` (`&&`, `||`, `!`) and parentheses, with tcpdump's shorthand
//! (`host A or B` is `host A or host B`).
//!
//! What the kernel's filter lists can express exactly (a conjunction of those lists) is
//! compiled into them; every drop is also checked against the whole expression in userspace,
//! on the decoded packet. Semantics follow libpcap where dropscope sees the same fields:
//! `port` matches TCP and UDP packets that carry ports (not a later IPv4 fragment, not an
//! IPv6 fragment), `icmp` is IPv4 and `icmp6` IPv6, `host` of an IPv4 address is IPv4.
use std::{fmt, net::IpAddr};

use agent_ebpf::{Cidr, Filters, FILTER_SLOTS, FLAG_IPV4, FLAG_IPV6};
use ipnet::IpNet;

use crate::events::{DropEvent, Family};

/// A parsed expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    /// `ip`, `ip6`.
    Family(Family),
    /// `tcp`, `udp`, `icmp`, `icmp6`, `ip proto N`: the upper-layer protocol, and the family
    /// it implies (`icmp` is IPv4's, `ip proto` IPv4's).
    Proto(u8, Option<Family>),
    /// `host`, `net`: an address of the packet, on the given side, in the prefix.
    Net(Dir, IpNet),
    /// `port`, `portrange`: a port in `[lo, hi]`.
    Port(Dir, u16, u16),
}

/// Which address or port a primitive looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Src,
    Dst,
    /// Either (no qualifier, or `src or dst`).
    Any,
}

impl Expr {
    /// Parses a pcap-filter expression; the error is one line naming the part at fault.
    pub fn parse(text: &str) -> Result<Expr, String> {
        let tokens = lex(text)?;
        if tokens.is_empty() {
            return Err("empty expression".into());
        }
        let mut p = Parser {
            tokens,
            at: 0,
            last: Qualifiers::default(),
        };
        let e = p.or()?;
        match p.peek() {
            None => Ok(e),
            Some(t) => Err(format!(
                "unexpected '{t}' (expected 'and', 'or' or the end)"
            )),
        }
    }

    /// Whether a drop matches.
    pub fn matches(&self, d: &DropEvent) -> bool {
        let flow = d.flow.as_ref();
        match self {
            Expr::And(a, b) => a.matches(d) && b.matches(d),
            Expr::Or(a, b) => a.matches(d) || b.matches(d),
            Expr::Not(a) => !a.matches(d),
            Expr::Family(f) => flow.is_some_and(|fl| fl.family == *f),
            Expr::Proto(p, fam) => {
                flow.is_some_and(|fl| fl.proto == *p && fam.is_none_or(|f| fl.family == f))
            }
            Expr::Net(dir, net) => flow.is_some_and(|fl| {
                let has = |a: &IpAddr| net.contains(a);
                match dir {
                    Dir::Src => has(&fl.src),
                    Dir::Dst => has(&fl.dst),
                    Dir::Any => has(&fl.src) || has(&fl.dst),
                }
            }),
            Expr::Port(dir, lo, hi) => ports(d).is_some_and(|(s, p)| {
                let has = |v: u16| *lo <= v && v <= *hi;
                match dir {
                    Dir::Src => has(s),
                    Dir::Dst => has(p),
                    Dir::Any => has(s) || has(p),
                }
            }),
        }
    }

    /// Compiles what the kernel's lists can express into `k` (which may already hold the
    /// flags' lists). Returns whether the kernel now filters exactly this expression; if not,
    /// what it filters is a superset, and userspace decides the rest.
    pub fn compile(&self, k: &mut Filters) -> bool {
        let mut conjuncts = Vec::new();
        flatten_and(self, &mut conjuncts);
        let mut exact = true;
        for c in conjuncts {
            exact &= match term(c) {
                Some((t, t_exact)) => t.apply(k) && t_exact,
                None => {
                    // Not a list the kernel has: a superset of it still spares userspace
                    // what cannot match (`udp port 53 or tcp port 80` needs UDP or TCP,
                    // and port 53 or 80).
                    for t in approx(c).unwrap_or_default() {
                        t.apply(k);
                    }
                    false
                }
            };
        }
        exact
    }
}

/// TCP/UDP ports as tcpdump's `port` sees them.
fn ports(d: &DropEvent) -> Option<(u16, u16)> {
    let f = d.flow.as_ref()?;
    if !matches!(f.proto, 6 | 17) || (f.family == Family::Ipv6 && d.fragment.is_some()) {
        return None;
    }
    f.ports
}

fn flatten_and<'a>(e: &'a Expr, out: &mut Vec<&'a Expr>) {
    match e {
        Expr::And(a, b) => {
            flatten_and(a, out);
            flatten_and(b, out);
        }
        other => out.push(other),
    }
}

/// One kernel list constraint.
#[derive(Debug, Clone, PartialEq)]
enum Term {
    /// Protocols, and the families they imply (a mask; 0: any).
    Protos(Vec<u8>, u8),
    Families(u8),
    Nets(Dir, Vec<IpNet>),
    Ports(Dir, Vec<[u16; 2]>),
}

fn mask(f: Family) -> u8 {
    match f {
        Family::Ipv4 => FLAG_IPV4,
        Family::Ipv6 => FLAG_IPV6,
    }
}

/// The kernel term a conjunct is, and whether it is that term exactly (an `or` of
/// protocols with different implied families is only approximated).
fn term(e: &Expr) -> Option<(Term, bool)> {
    match e {
        Expr::Family(f) => Some((Term::Families(mask(*f)), true)),
        Expr::Proto(p, f) => Some((Term::Protos(vec![*p], f.map_or(0, mask)), true)),
        Expr::Net(dir, net) => Some((Term::Nets(*dir, vec![*net]), true)),
        Expr::Port(dir, lo, hi) => Some((Term::Ports(*dir, vec![[*lo, *hi]]), true)),
        Expr::Or(a, b) => {
            let ((ta, ea), (tb, eb)) = (term(a)?, term(b)?);
            let (t, exact) = match (ta, tb) {
                (Term::Families(x), Term::Families(y)) => (Term::Families(x | y), true),
                (Term::Protos(mut x, fx), Term::Protos(y, fy)) => {
                    x.extend(y);
                    // Different implied families: the kernel can only allow their union.
                    let fam = if fx == 0 || fy == 0 { 0 } else { fx | fy };
                    (Term::Protos(x, fam), fx == fy)
                }
                (Term::Nets(dx, mut x), Term::Nets(dy, y)) if dx == dy => {
                    x.extend(y);
                    (Term::Nets(dx, x), true)
                }
                (Term::Ports(dx, mut x), Term::Ports(dy, y)) if dx == dy => {
                    x.extend(y);
                    (Term::Ports(dx, x), true)
                }
                _ => return None,
            };
            Some((t, exact && ea && eb))
        }
        Expr::And(..) | Expr::Not(_) => None,
    }
}

/// Kernel terms whose conjunction every packet matching `e` satisfies (a sound
/// over-approximation), or `None` when nothing useful is known.
fn approx(e: &Expr) -> Option<Vec<Term>> {
    match e {
        Expr::And(a, b) => {
            let mut v = approx(a).unwrap_or_default();
            v.extend(approx(b).unwrap_or_default());
            Some(v)
        }
        Expr::Or(a, b) => {
            let (a, b) = (approx(a)?, approx(b)?);
            // A list constrains the union only where both sides constrain it.
            let mut out = Vec::new();
            for x in &a {
                for y in &b {
                    if let Some(u) = x.union(y) {
                        out.push(u);
                    }
                }
            }
            Some(out)
        }
        Expr::Not(_) => None,
        prim => term(prim).map(|(t, _)| vec![t]),
    }
}

impl Term {
    /// The term both `self` and `other` imply, when they constrain the same list.
    fn union(&self, other: &Term) -> Option<Term> {
        fn merged<T: Clone + PartialEq>(a: &[T], b: &[T]) -> Option<Vec<T>> {
            let mut v = a.to_vec();
            for x in b {
                if !v.contains(x) {
                    v.push(x.clone());
                }
            }
            (v.len() <= FILTER_SLOTS).then_some(v)
        }
        Some(match (self, other) {
            (Term::Families(x), Term::Families(y)) => Term::Families(x | y),
            (Term::Protos(x, fx), Term::Protos(y, fy)) => {
                let fam = if *fx == 0 || *fy == 0 { 0 } else { fx | fy };
                Term::Protos(merged(x, y)?, fam)
            }
            (Term::Nets(dx, x), Term::Nets(dy, y)) if dx == dy => Term::Nets(*dx, merged(x, y)?),
            (Term::Ports(dx, x), Term::Ports(dy, y)) if dx == dy => Term::Ports(*dx, merged(x, y)?),
            _ => return None,
        })
    }

    /// Puts the term into its kernel list if that list is still free and large enough.
    fn apply(self, k: &mut Filters) -> bool {
        fn families(k: &mut Filters, m: u8) -> bool {
            if m == 0 {
                return true;
            }
            let new = if k.families == 0 { m } else { k.families & m };
            if new == 0 {
                // Nothing can match; the kernel has no way to say so (0 is "any").
                return false;
            }
            k.families = new;
            true
        }
        match self {
            Term::Families(m) => families(k, m),
            Term::Protos(p, m) => {
                if k.n_protos != 0 || p.len() > FILTER_SLOTS {
                    return false;
                }
                for (slot, v) in k.protos.iter_mut().zip(&p) {
                    *slot = *v;
                }
                k.n_protos = p.len() as u8;
                families(k, m)
            }
            Term::Nets(dir, nets) => {
                let (list, n) = match dir {
                    Dir::Src => (&mut k.src, &mut k.n_src),
                    Dir::Dst => (&mut k.dst, &mut k.n_dst),
                    Dir::Any => (&mut k.addrs, &mut k.n_addrs),
                };
                if *n != 0 || nets.len() > FILTER_SLOTS {
                    return false;
                }
                for (slot, v) in list.iter_mut().zip(&nets) {
                    *slot = cidr(*v);
                }
                *n = nets.len() as u8;
                true
            }
            Term::Ports(dir, ranges) => {
                let (list, n) = match dir {
                    Dir::Src => (&mut k.sport_ranges, &mut k.n_sport_ranges),
                    Dir::Dst => (&mut k.dport_ranges, &mut k.n_dport_ranges),
                    Dir::Any => (&mut k.port_ranges, &mut k.n_port_ranges),
                };
                if *n != 0 || ranges.len() > FILTER_SLOTS {
                    return false;
                }
                for (slot, v) in list.iter_mut().zip(&ranges) {
                    *slot = *v;
                }
                *n = ranges.len() as u8;
                true
            }
        }
    }
}

/// A prefix as the kernel filters take it.
pub fn cidr(net: IpNet) -> Cidr {
    let mut c = Cidr::NONE;
    match net {
        IpNet::V4(n) => {
            c.addr[..4].copy_from_slice(&n.network().octets());
            c.family = FLAG_IPV4;
        }
        IpNet::V6(n) => {
            c.addr = n.network().octets();
            c.family = FLAG_IPV6;
        }
    }
    c.prefix_len = net.prefix_len();
    c
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = |d: &Dir| match d {
            Dir::Src => "src ",
            Dir::Dst => "dst ",
            Dir::Any => "",
        };
        match self {
            Expr::And(a, b) => write!(f, "({a} and {b})"),
            Expr::Or(a, b) => write!(f, "({a} or {b})"),
            Expr::Not(a) => write!(f, "not {a}"),
            Expr::Family(Family::Ipv4) => f.write_str("ip"),
            Expr::Family(Family::Ipv6) => f.write_str("ip6"),
            Expr::Proto(p, fam) => match (p, fam) {
                (6, None) => f.write_str("tcp"),
                (17, None) => f.write_str("udp"),
                (1, Some(Family::Ipv4)) => f.write_str("icmp"),
                (58, Some(Family::Ipv6)) => f.write_str("icmp6"),
                (p, Some(Family::Ipv6)) => write!(f, "ip6 proto {p}"),
                (p, Some(Family::Ipv4)) => write!(f, "ip proto {p}"),
                (p, None) => write!(f, "proto {p}"),
            },
            Expr::Net(d, n) if n.prefix_len() == n.max_prefix_len() => {
                write!(f, "{}host {}", dir(d), n.addr())
            }
            Expr::Net(d, n) => write!(f, "{}net {n}", dir(d)),
            Expr::Port(d, lo, hi) if lo == hi => write!(f, "{}port {lo}", dir(d)),
            Expr::Port(d, lo, hi) => write!(f, "{}portrange {lo}-{hi}", dir(d)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Lexer and parser.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Open,
    Close,
    Not,
    And,
    Or,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Word(w) => f.write_str(w),
            Token::Open => f.write_str("("),
            Token::Close => f.write_str(")"),
            Token::Not => f.write_str("not"),
            Token::And => f.write_str("and"),
            Token::Or => f.write_str("or"),
        }
    }
}

fn lex(text: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        if c.is_whitespace() {
            i += 1;
        } else if c == '(' {
            out.push(Token::Open);
            i += 1;
        } else if c == ')' {
            out.push(Token::Close);
            i += 1;
        } else if two == "&&" {
            out.push(Token::And);
            i += 2;
        } else if two == "||" {
            out.push(Token::Or);
            i += 2;
        } else if c == '!' && two != "!=" {
            out.push(Token::Not);
            i += 1;
        } else if c.is_ascii_alphanumeric() || ".:/-_\\".contains(c) {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || ".:/-_\\".contains(chars[i]))
            {
                i += 1;
            }
            let w: String = chars[start..i].iter().collect();
            out.push(match w.as_str() {
                "and" => Token::And,
                "or" => Token::Or,
                "not" => Token::Not,
                _ => Token::Word(w),
            });
        } else {
            // Byte offsets, comparisons, arithmetic: tcp[13] & 2 != 0, len > 100, ...
            let rest: String = chars[i..].iter().take(20).collect();
            return Err(format!(
                "'{}' is not supported (dropscope understands host, net, port, portrange, src, dst, ip, ip6, tcp, udp, icmp, icmp6, proto, and, or, not and parentheses)",
                rest.trim()
            ));
        }
    }
    Ok(out)
}

/// The qualifiers of the last primitive: a bare value repeats them (`host A or B`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Qualifiers {
    proto: Option<&'static str>,
    dir: Option<DirQ>,
    kind: Option<&'static str>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum DirQ {
    Src,
    Dst,
    SrcOrDst,
    SrcAndDst,
}

const PROTOS: [&str; 6] = ["ip", "ip6", "tcp", "udp", "icmp", "icmp6"];
const KINDS: [&str; 5] = ["host", "net", "port", "portrange", "proto"];
/// Words of pcap-filter dropscope does not support, named in the error.
const UNSUPPORTED: [&str; 30] = [
    "ether",
    "arp",
    "rarp",
    "vlan",
    "mpls",
    "pppoed",
    "pppoes",
    "geneve",
    "vxlan",
    "sctp",
    "igmp",
    "igrp",
    "pim",
    "vrrp",
    "carp",
    "ah",
    "esp",
    "broadcast",
    "multicast",
    "gateway",
    "less",
    "greater",
    "len",
    "inbound",
    "outbound",
    "ifname",
    "on",
    "link",
    "decnet",
    "wlan",
];

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    last: Qualifiers,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn peek_word(&self, n: usize) -> Option<&str> {
        match self.tokens.get(self.at + n) {
            Some(Token::Word(w)) => Some(w.as_str()),
            _ => None,
        }
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut e = self.and()?;
        while self.peek() == Some(&Token::Or) {
            self.next();
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut e = self.unary()?;
        while self.peek() == Some(&Token::And) {
            self.next();
            e = Expr::And(Box::new(e), Box::new(self.unary()?));
        }
        Ok(e)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        match self.next() {
            Some(Token::Not) => Ok(Expr::Not(Box::new(self.unary()?))),
            Some(Token::Open) => {
                let e = self.or()?;
                match self.next() {
                    Some(Token::Close) => Ok(e),
                    Some(t) => Err(format!("unexpected '{t}' (expected ')')")),
                    None => Err("missing ')'".into()),
                }
            }
            Some(Token::Word(w)) => self.primitive(w),
            Some(t) => Err(format!("unexpected '{t}'")),
            None => Err("the expression ends too early".into()),
        }
    }

    fn primitive(&mut self, first: String) -> Result<Expr, String> {
        let mut q = Qualifiers::default();
        let mut word = Some(first);
        let mut explicit = false;
        // [proto] [dir] [kind] value, each optional.
        if let Some(p) = word
            .as_deref()
            .and_then(|w| PROTOS.iter().find(|p| **p == w))
        {
            q.proto = Some(p);
            explicit = true;
            word = self.take_word_if(|w| is_dir(w) || KINDS.contains(&w));
            if word.is_none() {
                self.last = q;
                return proto_only(p);
            }
        }
        if let Some(d) = word.as_deref().filter(|w| is_dir(w)) {
            let d = if d == "src" { DirQ::Src } else { DirQ::Dst };
            // "src or dst" / "src and dst" before a kind or a value.
            let combined = match (self.peek(), self.peek_word(1)) {
                (Some(Token::Or), Some(w)) if d == DirQ::Src && w == "dst" => Some(DirQ::SrcOrDst),
                (Some(Token::And), Some(w)) if d == DirQ::Src && w == "dst" => {
                    Some(DirQ::SrcAndDst)
                }
                _ => None,
            };
            q.dir = Some(match combined {
                Some(c) => {
                    self.at += 2;
                    c
                }
                None => d,
            });
            explicit = true;
            word = self.next_word("a value after 'src'/'dst'")?.into();
        }
        if let Some(k) = word
            .as_deref()
            .and_then(|w| KINDS.iter().find(|k| **k == w))
        {
            q.kind = Some(k);
            explicit = true;
            word = Some(self.next_word(&format!("a value after '{k}'"))?);
        }
        let value = word.expect("a word is left");
        if !explicit {
            if UNSUPPORTED.contains(&value.as_str()) {
                return Err(format!("'{value}' is not supported (dropscope understands host, net, port, portrange, src, dst, ip, ip6, tcp, udp, icmp, icmp6, proto, and, or, not and parentheses)"));
            }
            // A bare value: the previous primitive's qualifiers (tcpdump's shorthand).
            q = self.last;
        }
        self.last = q;
        self.build(q, &value)
    }

    fn take_word_if(&mut self, f: impl Fn(&str) -> bool) -> Option<String> {
        match self.peek() {
            Some(Token::Word(w)) if f(w) => {
                let w = w.clone();
                self.at += 1;
                Some(w)
            }
            _ => None,
        }
    }

    fn next_word(&mut self, what: &str) -> Result<String, String> {
        match self.next() {
            Some(Token::Word(w)) => Ok(w),
            Some(t) => Err(format!("expected {what}, found '{t}'")),
            None => Err(format!("expected {what} at the end")),
        }
    }

    fn build(&mut self, q: Qualifiers, value: &str) -> Result<Expr, String> {
        let family = match q.proto {
            Some("ip") => Some(Family::Ipv4),
            Some("ip6") => Some(Family::Ipv6),
            _ => None,
        };
        let kind = match q.kind {
            Some(k) => k,
            None if value.parse::<IpAddr>().is_ok() => "host",
            None if value.contains('/') || looks_like_net(value) => "net",
            None => {
                return Err(format!(
                    "'{value}' is not an address, a network or a known keyword (names are not resolved)"
                ))
            }
        };
        let dirs = |make: &dyn Fn(Dir) -> Expr| -> Expr {
            match q.dir {
                None | Some(DirQ::SrcOrDst) => make(Dir::Any),
                Some(DirQ::Src) => make(Dir::Src),
                Some(DirQ::Dst) => make(Dir::Dst),
                Some(DirQ::SrcAndDst) => {
                    Expr::And(Box::new(make(Dir::Src)), Box::new(make(Dir::Dst)))
                }
            }
        };
        let prim = match kind {
            "host" | "net" => {
                let net = if kind == "host" {
                    host(value)?
                } else {
                    net(value, self)?
                };
                let fam = if net.addr().is_ipv4() {
                    Family::Ipv4
                } else {
                    Family::Ipv6
                };
                if family.is_some_and(|f| f != fam)
                    || q.proto.is_some_and(|p| {
                        p == "icmp6" && fam == Family::Ipv4 || p == "icmp" && fam == Family::Ipv6
                    })
                {
                    return Err(format!(
                        "'{} {kind} {value}': the address is not of that protocol's family",
                        q.proto.unwrap_or_default()
                    ));
                }
                if matches!(q.proto, Some("tcp" | "udp" | "icmp" | "icmp6")) {
                    return Err(format!(
                        "'{} {kind} {value}' is not supported: write '{} and {kind} {value}'",
                        q.proto.unwrap_or_default(),
                        q.proto.unwrap_or_default()
                    ));
                }
                dirs(&|d| Expr::Net(d, net))
            }
            "port" | "portrange" => {
                let (lo, hi) = if kind == "port" {
                    let p = port(value)?;
                    (p, p)
                } else {
                    portrange(value)?
                };
                if matches!(q.proto, Some("icmp" | "icmp6")) {
                    return Err(format!(
                        "'{} {kind} {value}': ICMP has no ports",
                        q.proto.unwrap_or_default()
                    ));
                }
                let p = dirs(&|d| Expr::Port(d, lo, hi));
                match q.proto {
                    Some("tcp") => and(Expr::Proto(6, None), p),
                    Some("udp") => and(Expr::Proto(17, None), p),
                    Some("ip") => and(Expr::Family(Family::Ipv4), p),
                    Some("ip6") => and(Expr::Family(Family::Ipv6), p),
                    _ => p,
                }
            }
            "proto" => {
                if q.dir.is_some() {
                    return Err(format!("'proto {value}' takes no 'src'/'dst'"));
                }
                let n = proto_number(value)?;
                match q.proto {
                    None => Expr::Or(
                        Box::new(Expr::Proto(n, Some(Family::Ipv4))),
                        Box::new(Expr::Proto(n, Some(Family::Ipv6))),
                    ),
                    Some("ip") => Expr::Proto(n, Some(Family::Ipv4)),
                    Some("ip6") => Expr::Proto(n, Some(Family::Ipv6)),
                    Some(p) => return Err(format!("'{p} proto {value}' is not supported")),
                }
            }
            _ => unreachable!("kinds are listed"),
        };
        // `ip host X` is `ip and host X`.
        Ok(match (q.proto, kind) {
            (Some("ip"), "host" | "net") => and(Expr::Family(Family::Ipv4), prim),
            (Some("ip6"), "host" | "net") => and(Expr::Family(Family::Ipv6), prim),
            _ => prim,
        })
    }
}

fn and(a: Expr, b: Expr) -> Expr {
    Expr::And(Box::new(a), Box::new(b))
}

fn is_dir(w: &str) -> bool {
    w == "src" || w == "dst"
}

fn proto_only(p: &str) -> Result<Expr, String> {
    Ok(match p {
        "ip" => Expr::Family(Family::Ipv4),
        "ip6" => Expr::Family(Family::Ipv6),
        "tcp" => Expr::Proto(6, None),
        "udp" => Expr::Proto(17, None),
        "icmp" => Expr::Proto(1, Some(Family::Ipv4)),
        "icmp6" => Expr::Proto(58, Some(Family::Ipv6)),
        _ => unreachable!("protocols are listed"),
    })
}

fn host(value: &str) -> Result<IpNet, String> {
    value
        .parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("'host {value}': not a numeric address (names are not resolved)"))
}

/// Whether `value` is a dotted IPv4 prefix such as `10.231` (tcpdump's `net 10.231`).
fn looks_like_net(value: &str) -> bool {
    let parts: Vec<&str> = value.split('.').collect();
    parts.len() <= 3 && parts.len() >= 2 && parts.iter().all(|p| p.parse::<u8>().is_ok())
}

/// `net` values: CIDR, an address, a dotted prefix (`10.231` = 10.231.0.0/16), or
/// `ADDR mask MASK` (IPv4). Host bits set are an error, as in tcpdump.
fn net(value: &str, p: &mut Parser) -> Result<IpNet, String> {
    let net = if let Ok(n) = value.parse::<IpNet>() {
        n
    } else if let Ok(a) = value.parse::<IpAddr>() {
        if p.peek_word(0) == Some("mask") {
            p.at += 1;
            let m = p.next_word("a netmask after 'mask'")?;
            let mask: std::net::Ipv4Addr = m
                .parse()
                .map_err(|_| format!("'mask {m}': not an IPv4 netmask"))?;
            let bits = u32::from(mask);
            if bits.leading_ones() + bits.trailing_zeros() != 32 || !a.is_ipv4() {
                return Err(format!(
                    "'net {value} mask {m}': not a contiguous IPv4 netmask"
                ));
            }
            IpNet::new(a, bits.leading_ones() as u8).map_err(|e| e.to_string())?
        } else {
            IpNet::from(a)
        }
    } else if looks_like_net(value) {
        let parts: Vec<u8> = value.split('.').map(|p| p.parse().unwrap_or(0)).collect();
        let mut o = [0u8; 4];
        o[..parts.len()].copy_from_slice(&parts);
        IpNet::new(IpAddr::from(o), (parts.len() * 8) as u8).map_err(|e| e.to_string())?
    } else {
        return Err(format!(
            "'net {value}': not a network (e.g. 10.96.0.0/12, fd00::/64, 10.231)"
        ));
    };
    if net.trunc() != net {
        return Err(format!(
            "'net {value}': non-network bits set (did you mean {}?)",
            net.trunc()
        ));
    }
    Ok(net)
}

/// Service names tcpdump users type most; others must be numbers (names are not looked up).
const SERVICES: [(&str, u16); 16] = [
    ("ftp", 21),
    ("ssh", 22),
    ("telnet", 23),
    ("smtp", 25),
    ("domain", 53),
    ("bootps", 67),
    ("bootpc", 68),
    ("http", 80),
    ("ntp", 123),
    ("snmp", 161),
    ("bgp", 179),
    ("https", 443),
    ("syslog", 514),
    ("vxlan", 4789),
    ("geneve", 6081),
    ("kubelet", 10250),
];

fn port(value: &str) -> Result<u16, String> {
    value
        .parse::<u16>()
        .ok()
        .or_else(|| SERVICES.iter().find(|(n, _)| *n == value).map(|(_, p)| *p))
        .ok_or_else(|| {
            format!("'port {value}': not a port number (0-65535) or a known service name")
        })
}

fn portrange(value: &str) -> Result<(u16, u16), String> {
    let (a, b) = value
        .split_once('-')
        .ok_or_else(|| format!("'portrange {value}': expected LOW-HIGH, e.g. 30000-32767"))?;
    let (a, b) = (port(a)?, port(b)?);
    Ok((a.min(b), a.max(b)))
}

fn proto_number(value: &str) -> Result<u8, String> {
    let v = value.trim_start_matches('\\');
    match v {
        "tcp" => Ok(6),
        "udp" => Ok(17),
        "icmp" => Ok(1),
        "icmp6" | "icmpv6" => Ok(58),
        "gre" => Ok(47),
        "esp" => Ok(50),
        "sctp" => Ok(132),
        _ => v
            .parse()
            .map_err(|_| format!("'proto {value}': not a protocol number (0-255) or name")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Flow;

    fn parse(s: &str) -> Expr {
        Expr::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn drop(family: Family, proto: u8, src: &str, dst: &str, ports: Option<(u16, u16)>) -> DropEvent {
        let mut d = DropEvent::example("NO_SOCKET", "x");
        d.flow = Some(Flow {
            family,
            proto,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            ports,
            icmp: None,
        });
        d
    }

    fn udp4(sport: u16, dport: u16) -> DropEvent {
        drop(
            Family::Ipv4,
            17,
            "10.231.1.2",
            "10.96.0.10",
            Some((sport, dport)),
        )
    }

    #[test]
    fn parses_tcpdump_syntax() {
        for (text, shown) in [
            (
                "dst net 10.96.0.0/12 and udp port 53",
                "(dst net 10.96.0.0/12 and (udp and port 53))",
            ),
            (
                "host 10.0.0.1 or 10.0.0.2",
                "(host 10.0.0.1 or host 10.0.0.2)",
            ),
            ("port 53 or 80", "(port 53 or port 80)"),
            (
                "not host 10.0.0.1 and not 10.0.0.2",
                "(not host 10.0.0.1 and not host 10.0.0.2)",
            ),
            ("src or dst host fd00::1", "host fd00::1"),
            (
                "src and dst net 10.231",
                "(src net 10.231.0.0/16 and dst net 10.231.0.0/16)",
            ),
            (
                "tcp dst portrange 8000-8080",
                "(tcp and dst portrange 8000-8080)",
            ),
            ("icmp or icmp6", "(icmp or icmp6)"),
            ("!(tcp || udp) && ip6", "(not (tcp or udp) and ip6)"),
            ("ip host 10.1.2.3", "(ip and host 10.1.2.3)"),
            ("net 10.0.0.0 mask 255.0.0.0", "net 10.0.0.0/8"),
            ("src 10.0.0.1", "src host 10.0.0.1"),
            ("dst 10.0.0.0/8", "dst net 10.0.0.0/8"),
            ("port domain", "port 53"),
            ("ip proto 47", "ip proto 47"),
            (
                "udp port 53 and (src host 10.0.0.1 or 10.0.0.2)",
                "((udp and port 53) and (src host 10.0.0.1 or src host 10.0.0.2))",
            ),
        ] {
            assert_eq!(parse(text).to_string(), shown, "{text}");
        }
    }

    #[test]
    fn rejects_what_it_does_not_support_naming_the_part() {
        for (text, part) in [
            ("tcp[13] & 2 != 0", "'[13] & 2 != 0'"),
            ("ether host 00:11:22:33:44:55", "'ether'"),
            ("vlan 100", "'vlan'"),
            ("host gateway.local", "'host gateway.local'"),
            ("port 70000", "'port 70000'"),
            ("net 10.1.2.3/16", "non-network bits"),
            ("host 10.0.0.1 and", "ends too early"),
            ("(port 53", "missing ')'"),
            ("ip6 host 10.0.0.1", "family"),
            ("greater 100", "'greater'"),
            ("", "empty"),
            ("port 53 port 80", "unexpected 'port'"),
        ] {
            let err = Expr::parse(text).unwrap_err();
            assert!(err.contains(part), "{text}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn matches_like_tcpdump() {
        let dns = udp4(40000, 53);
        assert!(parse("dst net 10.96.0.0/12 and udp port 53").matches(&dns));
        assert!(!parse("src net 10.96.0.0/12").matches(&dns));
        assert!(parse("host 10.96.0.10").matches(&dns));
        assert!(parse("portrange 50-60").matches(&dns));
        assert!(!parse("tcp").matches(&dns));
        assert!(parse("ip and not ip6").matches(&dns));
        assert!(!parse("src port 53").matches(&dns));
        // A later IPv4 fragment has no ports; no IPv6 fragment matches `port`.
        let mut later = udp4(0, 0);
        later.flow.as_mut().unwrap().ports = None;
        later.fragment = Some(1480);
        assert!(!parse("port 0").matches(&later) && parse("udp").matches(&later));
        let mut v6 = drop(Family::Ipv6, 17, "fd00::1", "fd00::2", Some((1, 53)));
        assert!(parse("port 53").matches(&v6));
        v6.fragment = Some(0);
        assert!(
            !parse("port 53").matches(&v6),
            "tcpdump: ip6 port does not chase fragments"
        );
        assert!(parse("udp and ip6").matches(&v6));
        let icmp = drop(Family::Ipv4, 1, "10.0.0.1", "10.0.0.2", None);
        assert!(parse("icmp").matches(&icmp) && !parse("icmp6").matches(&icmp));
        assert!(!parse("port 0").matches(&icmp));
        let mut none = udp4(1, 2);
        none.flow = None;
        assert!(!parse("ip").matches(&none) && parse("not ip").matches(&none));
    }

    #[test]
    fn conjunctions_compile_exactly_into_the_kernel_lists() {
        let mut k = Filters::NONE;
        assert!(parse("dst net 10.96.0.0/12 and udp port 53").compile(&mut k));
        assert_eq!((k.n_dst, k.n_protos, k.n_port_ranges), (1, 1, 1));
        assert_eq!(
            (k.dst[0].prefix_len, k.protos[0], k.port_ranges[0]),
            (12, 17, [53, 53])
        );

        let mut k = Filters::NONE;
        assert!(
            parse("(host 10.0.0.1 or host 10.0.0.2) and tcp dst port 80 and ip").compile(&mut k)
        );
        assert_eq!((k.n_addrs, k.n_dport_ranges, k.families), (2, 1, FLAG_IPV4));

        let mut k = Filters::NONE;
        assert!(parse("icmp").compile(&mut k));
        assert_eq!((k.protos[0], k.families), (1, FLAG_IPV4));

        // Over-approximations: sound supersets, marked inexact.
        for text in [
            "not port 22",
            "host 10.0.0.1 or port 53",
            "icmp or icmp6",
            "ip and ip6",
        ] {
            let mut k = Filters::NONE;
            assert!(!parse(text).compile(&mut k), "{text}");
        }
        let mut k = Filters::NONE;
        assert!(!parse("udp and not port 22").compile(&mut k));
        assert_eq!(
            (k.n_protos, k.n_port_ranges),
            (1, 0),
            "the compilable part still filters"
        );
        let mut k = Filters::NONE;
        assert!(!parse("udp port 53 or tcp port 8080 and host 10.0.0.1").compile(&mut k));
        assert_eq!(
            (
                &k.protos[..2],
                k.n_protos,
                &k.port_ranges[..2],
                k.n_port_ranges,
                k.n_addrs
            ),
            (&[17, 6][..], 2, &[[53, 53], [8080, 8080]][..], 2, 0),
            "a superset: UDP or TCP, port 53 or 8080"
        );
        let mut k = Filters::NONE;
        assert!(!parse("(icmp and host 10.0.0.1) or not tcp").compile(&mut k));
        assert_eq!(k, Filters::NONE, "nothing is known of a negation");

        // A list the flags already use is left to userspace.
        let mut k = Filters::NONE;
        k.n_protos = 1;
        k.protos[0] = 6;
        assert!(!parse("udp").compile(&mut k));
        assert_eq!(k.protos[0], 6);
    }
}
