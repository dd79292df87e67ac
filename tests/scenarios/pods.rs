//! Pod attribution: A and B are pods (processes in their namespaces, in cgroups named like
//! kubelet's, with /var/log/pods-style directories in a temporary --pods-root), R is no pod.
//! Drops in and between the pods name the right pod and container, R's keep their inode,
//! --pod keeps one pod's drops, and drops in the node's own namespace are attributed by the
//! pods' addresses.
use dropscope_tests::{
    kubelet::{Driver, Pod},
    nft_rule_packets,
    topology::{A4, B4},
    traffic::Udp,
    Kubelet, Netns, Nstat, Report, Topology,
};
use serde_json::Value;

use dropscope_tests::Observer;

/// cart runs in A (systemd driver; its container is named by its only log directory), db in
/// B (cgroupfs driver; containers named through var/log/containers). R is no pod.
fn shop() -> (Topology, Kubelet, Pod, Pod) {
    let t = Topology::new();
    let mut k = Kubelet::new();
    let cart = k.run_pod(&t.a, "shop", "cart", &["api"], Driver::Systemd, false);
    let db = k.run_pod(&t.b, "shop", "db", &["postgres"], Driver::Cgroupfs, true);
    (t, k, cart, db)
}

/// The drop records sent to UDP port `dport`, and the packets they stand for.
fn to_port(report: &Report, dport: u16) -> (Vec<&Value>, u64) {
    let recs: Vec<&Value> = report
        .drops()
        .into_iter()
        .filter(|r| r["dport"] == dport)
        .collect();
    let count = recs.iter().map(|r| r["count"].as_u64().unwrap()).sum();
    (recs, count)
}

/// Every record names `pod` (and `container`), in namespace `netns`.
fn assert_attributed(recs: &[&Value], pod: &Pod, container: &str, netns: u64) {
    assert!(!recs.is_empty(), "no records for {}", pod.name);
    for r in recs {
        assert_eq!(r["pod_namespace"], pod.namespace.as_str(), "{r:#}");
        assert_eq!(r["pod"], pod.name.as_str(), "{r:#}");
        assert_eq!(r["pod_uid"], pod.uid.as_str(), "{r:#}");
        assert_eq!(r["container"], container, "{r:#}");
        assert_eq!(r["netns"].as_u64(), Some(netns), "{r:#}");
    }
}

/// Closed UDP ports in cart (A), db (B) and R, hit from the other side: 3 drops in db, 2 in
/// cart, 4 in R. Returns the kernel's UdpNoPorts growth in A, B and R.
fn drops_everywhere(t: &Topology, run: impl FnOnce()) -> [u64; 3] {
    let spaces: [&Netns; 3] = [&t.a, &t.b, &t.r];
    let before = spaces.map(Nstat::read);
    run();
    let mut deltas = [0; 3];
    for (i, ns) in spaces.iter().enumerate() {
        deltas[i] = Nstat::delta(ns, &before[i], "UdpNoPorts");
    }
    deltas
}

fn send_to_closed_ports(t: &Topology) {
    Udp::to(B4, 9441).count(3).send(&t.a);
    Udp::to(A4, 9442).count(2).send(&t.b);
    Udp::to("10.231.1.1", 9443).count(4).send(&t.a);
}

#[test]
fn drops_in_and_between_pods_name_pod_and_container() {
    let (t, k, cart, db) = shop();
    let mut report = None;
    let [in_a, in_b, in_r] = drops_everywhere(&t, || {
        let obs = Observer::start(&[
            "--netns",
            &t.a.name,
            "--netns",
            &t.b.name,
            "--netns",
            &t.r.name,
            "--pods-root",
            k.root_arg(),
        ]);
        send_to_closed_ports(&t);
        report = Some(obs.stop());
    });
    let report = report.unwrap();
    report.assert_consistent();
    assert_eq!((in_a, in_b, in_r), (2, 3, 4));
    assert_eq!(
        report.causes(),
        vec![("no_listener".to_string(), 9)],
        "{:#?}",
        report.drops()
    );

    let (recs, n) = to_port(&report, 9441);
    assert_attributed(&recs, &db, "postgres", t.b.inode());
    assert_eq!(n, in_b);
    let (recs, n) = to_port(&report, 9442);
    assert_attributed(&recs, &cart, "api", t.a.inode());
    assert_eq!(n, in_a);

    // R is no pod: its drops keep their namespace inode and carry no pod fields.
    let (recs, n) = to_port(&report, 9443);
    assert_eq!(n, in_r);
    for r in recs {
        assert_eq!(r["netns"].as_u64(), Some(t.r.inode()), "{r:#}");
        for key in ["pod_namespace", "pod", "pod_uid", "container"] {
            assert!(r.get(key).is_none(), "{key} on a drop in R: {r:#}");
        }
    }
    // The summary names the pods of each cause.
    let pods = &report.summary()["details"][0]["pods"];
    assert_eq!(
        pods,
        &serde_json::json!([["shop/db", 3], ["shop/cart", 2]]),
        "{pods}"
    );
}

#[test]
fn pod_filter_keeps_only_that_pods_drops() {
    let (t, k, _cart, db) = shop();
    let mut report = None;
    let [in_a, in_b, in_r] = drops_everywhere(&t, || {
        // The whole node, no --netns: the pod filter alone narrows it down.
        let obs = Observer::start(&[
            "--pod",
            "shop/db",
            "--pod",
            "shop/gone",
            "--pods-root",
            k.root_arg(),
        ]);
        send_to_closed_ports(&t);
        report = Some(obs.stop());
    });
    let report = report.unwrap();
    report.assert_consistent();
    // One line says the missing pod is not there; the pod that is goes unmentioned.
    let warned: Vec<&str> = report
        .stderr
        .lines()
        .filter(|l| l.contains("--pod"))
        .collect();
    assert_eq!(warned.len(), 1, "{}", report.stderr);
    assert!(
        warned[0].contains("--pod shop/gone: no such pod running on this node yet"),
        "{}",
        report.stderr
    );
    for r in report.drops() {
        assert_eq!(
            (&r["pod_namespace"], &r["pod"]),
            (&"shop".into(), &"db".into()),
            "{r:#}"
        );
    }
    let (recs, n) = to_port(&report, 9441);
    assert_attributed(&recs, &db, "postgres", t.b.inode());
    assert_eq!((n, in_b), (3, 3));
    assert_eq!(report.count("no_listener"), 3, "{:#?}", report.drops());
    let filtered = report.summary()["filtered"].as_u64().unwrap();
    assert!(
        filtered >= in_a + in_r,
        "cart's and R's drops are filtered out: {}",
        report.summary()
    );
}

#[test]
fn node_namespace_drops_are_attributed_by_pod_address() {
    // R plays the node: dropscope runs in it, and R's firewall drops traffic between the pods.
    let (t, k, cart, db) = shop();
    t.r.sh("nft add table inet dsnode; \
         nft add chain inet dsnode f '{ type filter hook forward priority 0; }'; \
         nft add rule inet dsnode f udp dport 9451 counter drop comment '\"a2b\"'; \
         nft add rule inet dsnode f udp dport 9452 counter drop comment '\"b2a\"'");
    let node = t.r.inode();
    let run = |extra: &[&str]| {
        let mut args = vec!["--netns", t.r.name.as_str(), "--pods-root", k.root_arg()];
        args.extend_from_slice(extra);
        let obs = Observer::start_in(&t.r, &args);
        Udp::to(B4, 9451).count(3).send(&t.a);
        Udp::to(A4, 9452).count(2).send(&t.b);
        let report = obs.stop();
        report.assert_consistent();
        assert_eq!(
            report.causes(),
            vec![("netfilter_drop".to_string(), 5)],
            "{:#?}",
            report.drops()
        );
        report
    };

    let (a2b, b2a) = (nft_rule_packets(&t.r, "a2b"), nft_rule_packets(&t.r, "b2a"));
    let report = run(&[]);
    // Between two pods the source is named: A -> B is cart's, B -> A is db's.
    let (recs, n) = to_port(&report, 9451);
    assert_attributed(&recs, &cart, "api", node);
    assert_eq!(n, nft_rule_packets(&t.r, "a2b") - a2b);
    let (recs, n) = to_port(&report, 9452);
    assert_attributed(&recs, &db, "postgres", node);
    assert_eq!(n, nft_rule_packets(&t.r, "b2a") - b2a);

    // Asked for db, both directions are db's: it is one end of each.
    let report = run(&["--pod", "shop/db"]);
    for port in [9451, 9452] {
        let (recs, _) = to_port(&report, port);
        assert_attributed(&recs, &db, "postgres", node);
    }
}
