//! `--format json`: one JSON object per line. The field names are a contract other tools rely
//! on: fields may be added, never renamed.
use std::io::Write;

use serde_json::{json, Map, Value};

use super::{top, AttachInfo, ChangeRecord, Clock, DropRecord, Sink, Summary};
use crate::{
    causes::{
        facts::{icmp6_name, icmp_name},
        Attribution,
    },
    events::Answer,
};

pub struct JsonSink<W: Write> {
    out: W,
    clock: Clock,
}

impl<W: Write> JsonSink<W> {
    pub fn new(out: W, clock: Clock) -> Self {
        JsonSink { out, clock }
    }

    fn emit(&mut self, v: &Value) {
        emit(&mut self.out, v);
    }
}

/// Writes one JSON line and flushes it.
pub fn emit(out: &mut impl Write, v: &Value) {
    // A closed pipe (e.g. `| head`) must not kill the session mid-detach; ignore errors.
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// The JSON object for one drop record.
pub fn drop_json(r: &DropRecord, clock: &Clock) -> Value {
    let d = &r.drop;
    let mut m = Map::new();
    m.insert("type".into(), json!("drop"));
    m.insert(
        "time".into(),
        json!(clock
            .wall(d.ts_ns)
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
    );
    m.insert("cause".into(), json!(r.verdict.cause));
    m.insert("title".into(), json!(r.verdict.title));
    m.insert("reason".into(), json!(&*d.reason));
    m.insert("location".into(), json!(&*d.location));
    if let Some(f) = d.flow {
        m.insert("family".into(), json!(f.family.as_str()));
        m.insert("proto".into(), json!(f.proto_name()));
        m.insert("src".into(), json!(f.src.to_string()));
        m.insert("dst".into(), json!(f.dst.to_string()));
        if let Some((sp, dp)) = f.ports {
            m.insert("sport".into(), json!(sp));
            m.insert("dport".into(), json!(dp));
        }
        if let Some((t, c)) = f.icmp {
            m.insert("icmp_type".into(), json!(t));
            m.insert("icmp_code".into(), json!(c));
        }
    }
    m.insert("len".into(), json!(d.len));
    if let Some(dev) = d.dev {
        m.insert("ifname".into(), json!(dev.name()));
        m.insert("ifindex".into(), json!(dev.ifindex));
    }
    if let Some(out) = d.out {
        m.insert("out_ifname".into(), json!(out.name()));
        m.insert("out_ifindex".into(), json!(out.ifindex));
        m.insert("out_mtu".into(), json!(out.mtu));
    }
    if let Some(from) = d.context.forwarded_from {
        m.insert("forwarded".into(), json!(true));
        m.insert("in_ifname".into(), json!(from.name()));
        m.insert("in_ifindex".into(), json!(from.ifindex));
    } else if let Some(from) = d.arrived_on {
        m.insert("in_ifname".into(), json!(from.name()));
        m.insert("in_ifindex".into(), json!(from.ifindex));
    }
    if let Some(err) = d.context.route_error {
        // dst->error holds a positive errno (ip_route_input stores -err).
        let name = format!("{:?}", nix::errno::Errno::from_raw(err.abs()));
        m.insert("route_error".into(), json!(name));
    }
    m.insert("netns".into(), json!(d.netns));
    if let Some(name) = &r.netns_name {
        m.insert("netns_name".into(), json!(name));
    }
    if let Some(pod) = &d.pod {
        m.insert("pod_namespace".into(), json!(pod.namespace));
        m.insert("pod".into(), json!(pod.name));
        m.insert("pod_uid".into(), json!(pod.uid));
        if let Some(c) = &pod.container {
            m.insert("container".into(), json!(c));
        }
    }
    match r.answer {
        Some(Answer::Icmp(t, c)) => {
            m.insert(
                "icmp_sent".into(),
                json!({"type": t, "code": c, "name": icmp_name(t, c)}),
            );
        }
        Some(Answer::Icmp6(t, c)) => {
            m.insert(
                "icmp_sent".into(),
                json!({"family": "ipv6", "type": t, "code": c, "name": icmp6_name(t, c)}),
            );
        }
        Some(Answer::TcpReset) => {
            m.insert("tcp_reset_sent".into(), json!(true));
        }
        None => {}
    }
    if let Some(mark) = d.mark.filter(|&m| m != 0) {
        m.insert("mark".into(), json!(mark));
    }
    attribution_json(&r.verdict.attribution, &mut m);
    if let Some(off) = d.fragment {
        m.insert("fragment_offset".into(), json!(off));
    }
    m.insert("count".into(), json!(r.count));
    m.insert("repeat".into(), json!(!r.first));
    if let Some(kind) = r.unsent {
        m.insert(kind.into(), json!(true));
    }
    m.insert("evidence".into(), json!(r.verdict.evidence));
    m.insert("fix".into(), json!(r.verdict.fix));
    if r.verdict.benign {
        m.insert("benign".into(), json!(true));
    }
    Value::Object(m)
}

/// The attribution fields of a drop (each only when known).
fn attribution_json(a: &Attribution, m: &mut Map<String, Value>) {
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.into(), v);
        }
    };
    put("hook", a.hook.map(|v| json!(v)));
    put("hook_from", a.hook_from.map(|v| json!(v)));
    put("engine", a.engine.as_ref().map(|v| json!(v)));
    put("rule", a.rule.as_ref().map(|v| json!(v)));
    put("nf_family", a.nf_family.map(|v| json!(v)));
    put("bridged", a.nf_bridged.then(|| json!(true)));
    put("nf_table", a.nf_table.as_ref().map(|v| json!(v)));
    put("nf_chain", a.nf_chain.as_ref().map(|v| json!(v)));
    put("route", a.route.as_ref().map(|v| json!(v)));
    put("path_mtu", a.path_mtu.map(|v| json!(v)));
    put("tunnel", a.tunnel.as_ref().map(|v| json!(v)));
    put("stack", a.stack.as_ref().map(|v| json!(v)));
    if let Some(c) = &a.change {
        let mut cm = Map::new();
        cm.insert("kind".into(), json!(c.kind));
        cm.insert("key".into(), json!(c.key));
        if let Some(o) = &c.old {
            cm.insert("old".into(), json!(o));
        }
        if let Some(n) = &c.new {
            cm.insert("new".into(), json!(n));
        }
        if let Some(d) = &c.detail {
            cm.insert("detail".into(), json!(d));
        }
        cm.insert("at_ns".into(), json!(c.ts_ns));
        if let Some(p) = &c.process {
            process_json(p, &mut cm);
        }
        m.insert("change".into(), Value::Object(cm));
    }
    if !a.counters.is_empty() {
        let c: Map<String, Value> = a
            .counters
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        m.insert("counters".into(), Value::Object(c));
    }
}

/// The JSON object for a configuration change.
pub fn change_json(r: &ChangeRecord, clock: &Clock) -> Value {
    let c = &r.change;
    let mut m = Map::new();
    m.insert("type".into(), json!("change"));
    m.insert(
        "time".into(),
        json!(clock
            .wall(c.ts_ns)
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
    );
    m.insert("kind".into(), json!(c.kind));
    m.insert("key".into(), json!(c.key));
    if let Some(o) = &c.old {
        m.insert("old".into(), json!(o));
    }
    if let Some(n) = &c.new {
        m.insert("new".into(), json!(n));
    }
    if let Some(d) = &c.detail {
        m.insert("detail".into(), json!(d));
    }
    m.insert("netns".into(), json!(c.netns));
    if let Some(name) = &r.netns_name {
        m.insert("netns_name".into(), json!(name));
    }
    if let Some(p) = &c.process {
        process_json(p, &mut m);
    }
    Value::Object(m)
}

/// The process fields of a change: `process`, `parents`, `container`, the pod.
fn process_json(p: &crate::changes::Process, m: &mut Map<String, Value>) {
    let mut proc_ = json!({"pid": p.pid, "comm": p.comm});
    if let Some(exe) = &p.exe {
        proc_["exe"] = json!(exe);
    }
    if let Some(cg) = &p.cgroup {
        proc_["cgroup"] = json!(cg);
    }
    m.insert("process".into(), proc_);
    m.insert(
        "parents".into(),
        json!(p
            .parents
            .iter()
            .map(|(pid, comm)| json!({"pid": pid, "comm": comm}))
            .collect::<Vec<_>>()),
    );
    if let Some(c) = &p.container {
        m.insert("container".into(), json!(c));
    }
    if let Some(pod) = &p.pod {
        m.insert("pod_namespace".into(), json!(pod.namespace));
        m.insert("pod".into(), json!(pod.name));
        m.insert("pod_uid".into(), json!(pod.uid));
    }
}

/// The JSON object for the attach record.
pub fn attach_json(info: &AttachInfo) -> Value {
    let mut v = json!({
        "type": "attach",
        "kernel": info.kernel,
        "attach_ms": info.attach_ms,
        "drop_reasons": info.reasons,
        "probes": info.probes,
    });
    if !info.limits.is_empty() {
        v["limits"] = json!(info.limits);
    }
    if let Some((target, snaplen)) = &info.packets {
        v["pcap"] = json!({"target": target, "snaplen": snaplen});
    }
    if let Some((expression, exact)) = &info.expression {
        v["filter"] = json!({
            "expression": expression,
            "in_kernel": if *exact { "exact" } else { "partial" },
        });
    }
    v
}

/// The JSON object for the summary.
pub fn summary_json(s: &Summary) -> Value {
    let causes: Map<String, Value> = s
        .causes
        .iter()
        .map(|(id, t)| (id.clone(), json!(t.count)))
        .collect();
    let details: Vec<Value> = s
        .causes
        .iter()
        .map(|(id, t)| {
            let (evidence, fix, share) = match t.representative() {
                Some((v, share)) => (v.evidence.clone(), v.fix.clone(), share),
                None => (String::new(), String::new(), 0.0),
            };
            json!({
                "cause": id,
                "title": t.title,
                "count": t.count,
                "evidence_share": (share * 1000.0).round() / 1000.0,
                "reasons": top(t.reasons.iter().map(|(k, v)| (k, *v)), 8),
                "locations": top(t.locations.iter().map(|(k, v)| (k, *v)), 8),
                "ifaces": top(t.ifaces.iter().map(|(k, v)| (k, *v)), 8),
                "top_flows": top(t.flows.iter().map(|(k, v)| (k, *v)), 5),
                "pods": top(t.pod_counts(), 5),
                "evidence": evidence,
                "fix": fix,
                "changes": t.changes.iter().map(|c| {
                    let mut cm = Map::new();
                    cm.insert("key".into(), json!(c.key));
                    cm.insert("what".into(), json!(c.to_string()));
                    Value::Object(cm)
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut v = json!({
        "type": "summary",
        "causes": causes,
        "reasons": s.reasons,
        "suppressed": s.suppressed,
        "hidden": s.hidden.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<Map<String, Value>>(),
        "filtered": s.filtered,
        "filtered_in_kernel": s.filtered_in_kernel,
        "seen": s.seen,
        "decoded": s.decoded,
        "lost": s.lost,
        "lost_by_cause": s.lost_by_cause,
        "counts_exact": s.counts_exact,
        "evidence_skipped": s.evidence_skipped,
        "agg_full": s.agg_full,
        "loop_stall_max_ms": (s.stalls.max.as_secs_f64() * 1e4).round() / 10.0,
        "loop_stalls": s.stalls.long,
        "seconds": (s.seconds * 1000.0).round() / 1000.0,
        "details": details,
    });
    if let Some(p) = &s.packets {
        let causes: Map<String, Value> = p
            .causes
            .iter()
            .map(|(c, total, written)| (c.clone(), json!({"total": total, "written": written})))
            .collect();
        v["pcap"] = json!({
            "target": p.target,
            "snaplen": p.snaplen,
            "written": p.written,
            "causes": causes,
        });
    }
    if s.unchecked > 0 {
        v["filter_unchecked"] = json!(s.unchecked);
    }
    v
}

impl<W: Write> Sink for JsonSink<W> {
    fn attach(&mut self, info: &AttachInfo) {
        self.emit(&attach_json(info));
    }

    fn drop(&mut self, record: &DropRecord) {
        let v = drop_json(record, &self.clock);
        self.emit(&v);
    }

    fn change(&mut self, record: &ChangeRecord) {
        let v = change_json(record, &self.clock);
        self.emit(&v);
    }

    fn summary(&mut self, summary: &Summary) {
        let v = summary_json(summary);
        self.emit(&v);
    }
}
