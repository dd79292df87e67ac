//! Test harness: network namespaces wired like a small network, traffic generators that run
//! inside them, the kernel's own counters, and the real `dropscope` binary observing it all.
pub mod counters;
pub mod http;
pub mod kube_validate;
pub mod kubelet;
pub mod kubeproxy;
pub mod netns;
pub mod observer;
pub mod packets;
pub mod process;
pub mod prometheus;
pub mod topology;
pub mod traffic;

pub use counters::{
    iptables_rule_packets, nft_forward_drop, nft_rule_counter, nft_rule_packets, tc_stat,
    udp_no_ports, Nstat,
};
pub use kubelet::Kubelet;
pub use netns::Netns;
pub use observer::{Observer, Report};
pub use topology::Topology;

/// Waits until `cond` holds, polling every 20 ms, or panics with `what` after `secs`.
/// Used to wait for a kernel-side condition (a counter reaching a value), never for time.
pub fn wait_for(what: &str, secs: f64, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
    while !cond() {
        if std::time::Instant::now() > deadline {
            panic!("timed out after {secs} s waiting for {what}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether the running kernel gives drop reasons (5.17+): its BTF names the members of
/// `enum skb_drop_reason`. Read independently of dropscope, so a test can tell which answer
/// this kernel allows (a cause from the reason, or the degraded one from the location) without
/// trusting the program under test to say it.
pub fn kernel_has_drop_reasons() -> bool {
    let btf = std::fs::read("/sys/kernel/btf/vmlinux").expect("reading /sys/kernel/btf/vmlinux");
    btf.windows(b"SKB_DROP_REASON_".len())
        .any(|w| w == b"SKB_DROP_REASON_")
}
