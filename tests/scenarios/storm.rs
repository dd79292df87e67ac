//! A drop storm: counts stay exact while the event stream is sampled in the kernel.
use dropscope_tests::{
    nft_forward_drop, nft_rule_packets, topology::B4, traffic::Udp, Observer, Topology,
};

#[test]
fn sampled_storm_keeps_exact_counts() {
    let t = Topology::new();
    nft_forward_drop(&t.r, "st", 9800, "storm");
    let obs = Observer::start(&["--netns", &t.r.name, "--sample", "5"]);
    Udp::to(B4, 9800).count(3000).send(&t.a);
    let report = obs.stop();
    report.assert_consistent();
    let kernel = nft_rule_packets(&t.r, "storm");
    assert!(kernel > 2000, "the storm reached the router ({kernel})");
    assert_eq!(
        report.count("netfilter_drop"),
        kernel,
        "exact count despite sampling"
    );
    let s = report.summary();
    assert_eq!(s["counts_exact"], true, "{s}");
    // At most 5 events per second per CPU crossed into userspace (the storm may take longer
    // on a slow machine: the bound follows the run's own length); the rest are records.
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()) as f64;
    let bound = 5.0 * cpus * (s["seconds"].as_f64().unwrap().ceil() + 1.0);
    assert!(
        s["decoded"].as_u64().unwrap() as f64 <= bound,
        "{s} (bound {bound})"
    );
    let sampled: Vec<_> = report
        .of("netfilter_drop")
        .into_iter()
        .filter(|r| r["sampled"] == true)
        .collect();
    assert!(!sampled.is_empty());
    assert!(
        sampled
            .iter()
            .all(|r| r["dport"] == 9800 && r["ifname"] == "r0"),
        "{sampled:#?}"
    );
}
