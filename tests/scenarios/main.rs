//! Integration tests: one scenario per cause, each breaking the network the way the cause does,
//! observing it with the real dropscope, and checking cause, interface, flow and count against
//! a kernel counter that dropscope does not read.
mod changes;
mod check;
mod churn;
mod conntrack;
mod context;
mod corpus;
mod deploy;
mod faults;
mod forwarding;
mod licenses;
mod lifecycle;
mod metrics;
mod mtu;
mod neighbor;
mod netfilter;
mod no_reasons;
mod packets;
mod pods;
mod policy;
mod scale;
mod signals;
mod sockets;
mod storm;

use dropscope_tests::{
    topology::{A4, B4},
    Netns, Nstat, Observer, Report, Topology,
};
use serde_json::Value;

/// Watches `watch` with dropscope (plus `extra` flags) while `traffic` runs. Returns the report
/// and how much the kernel counter `counter` grew in its namespace meanwhile: the oracle that
/// dropscope's counts are checked against.
pub fn observe(
    watch: &Netns,
    extra: &[&str],
    counter: (&Netns, &str),
    traffic: impl FnOnce(),
) -> (Report, u64) {
    let before = Nstat::read(counter.0);
    let mut args = vec!["--netns", watch.name.as_str()];
    args.extend_from_slice(extra);
    let obs = Observer::start(&args);
    traffic();
    let report = obs.stop();
    (report, Nstat::delta(counter.0, &before, counter.1))
}

/// The fields every cause test checks on each of its drop records.
pub struct Expect<'a> {
    pub cause: &'a str,
    pub ifname: &'a str,
    pub family: &'a str,
    pub proto: &'a str,
    pub src: &'a str,
    pub dst: &'a str,
    pub dport: Option<u16>,
    pub netns: u64,
}

impl<'a> Expect<'a> {
    /// UDP from A to B that the router R drops on its ingress r0.
    pub fn routed(t: &Topology, cause: &'a str, dport: u16) -> Self {
        Expect {
            cause,
            ifname: "r0",
            family: "ipv4",
            proto: "udp",
            src: A4,
            dst: B4,
            dport: Some(dport),
            netns: t.r.inode(),
        }
    }

    /// Checks every record of the cause and returns the packets they stand for. Also checks
    /// that nothing else was reported in the namespace.
    pub fn check(&self, report: &Report) -> u64 {
        report.assert_consistent();
        let recs = report.of(self.cause);
        assert!(
            !recs.is_empty(),
            "no {} record; got {:#?}\nstderr: {}",
            self.cause,
            report.records,
            report.stderr
        );
        for r in &recs {
            self.check_record(r);
        }
        let others: Vec<_> = report
            .drops()
            .into_iter()
            .filter(|r| r["cause"] != self.cause)
            .collect();
        assert!(others.is_empty(), "unexpected other drops: {others:#?}");
        report.count(self.cause)
    }

    fn check_record(&self, r: &Value) {
        let ctx = || format!("record {r:#}");
        assert_eq!(r["ifname"], self.ifname, "{}", ctx());
        assert_eq!(r["family"], self.family, "{}", ctx());
        assert_eq!(r["proto"], self.proto, "{}", ctx());
        assert_eq!(r["src"], self.src, "{}", ctx());
        assert_eq!(r["dst"], self.dst, "{}", ctx());
        assert_eq!(r["netns"].as_u64(), Some(self.netns), "{}", ctx());
        if let Some(p) = self.dport {
            assert_eq!(r["dport"].as_u64(), Some(p.into()), "{}", ctx());
        }
        for field in [
            "time", "reason", "location", "evidence", "fix", "len", "ifindex", "count",
        ] {
            assert!(!r[field].is_null(), "{field} missing: {}", ctx());
        }
    }
}

/// The evidence of the first record of a cause.
pub fn evidence<'a>(report: &'a Report, cause: &str) -> &'a str {
    report.of(cause)[0]["evidence"].as_str().unwrap()
}
