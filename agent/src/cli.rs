//! Command-line interface. Bad input dies here with one clear line (clap's exit code 2).
use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::{
    filter::{parse_net, parse_proto, Filter},
    kernel::{
        attach::Mode,
        context_probes::{Arming, ContextMode},
    },
    pods::PodName,
};

const ABOUT: &str = "Tells you, live, why the kernel is dropping your packets.";

const LONG_ABOUT: &str = "\
Tells you, live, why the kernel is dropping your packets.

dropscope attaches to the kernel's packet-drop tracepoint (skb:kfree_skb) and to icmp:icmp_send,
reads each dropped packet's flow, device, network namespace and the sysctls the kernel used, and
names the cause in operator terms, with the evidence that proves it and the command that fixes it:
forwarding disabled, strict rp_filter, firewall DROP or REJECT (nftables vs iptables-legacy),
MTU exceeded, no route, TTL expired, ARP failure, nothing listening, and more.

Identical drops are folded: the first is shown at once, repeats are counted and shown once per
--interval. Ctrl-C (or SIGTERM, or --duration) prints a summary ranked by count. Benign kernel
housekeeping (ping socket copies, socket close purges) is counted but hidden unless --all.

On a Kubernetes node every drop is attributed to its pod and container, node-locally (no API
server): the packet's network namespace -> the processes in it -> their kubelet cgroup ->
the pod named by kubelet's /var/log/pods. Drops in the node's own namespace are attributed by
address, when the packet comes from or goes to an address of a pod's namespace.

Under a drop storm the kernel counts every drop exactly (per reason, location, device, netns
and protocol) and sends only --sample events per kind per second; the rest are reported as
'... and N more like this'. Filters run in the kernel, before any event is produced. Memory
stays bounded whatever the traffic: the kernel table holds 16384 kinds of drop (beyond that,
counts are flagged as not exact), userspace keeps at most 65536 distinct drops for folding and
1024 flows per cause.

Needs root, or CAP_BPF + CAP_PERFMON, and a kernel with BTF (/sys/kernel/btf/vmlinux).
Nothing stays attached after exit: the programs live only as long as the process.";

const AFTER_HELP: &str = "\
Examples:
  dropscope                                   stream every drop on this node, summary on Ctrl-C
  dropscope 'dst net 10.96.0.0/12 and udp port 53'   the same filter in tcpdump's language
  dropscope --pcap drops.pcapng               also write each reported drop's packet (Wireshark)
  dropscope --pcap - | tshark -r -            packets to standard output (the stream goes to stderr)
  dropscope --dst 10.96.0.0/12 --port 53      only DNS to the service range
  dropscope --netns dr-r --duration 30        one `ip netns` namespace, for 30 seconds
  dropscope --pod kube-system/coredns-7xk2p   one pod's drops, wherever they happen on the node
  dropscope --format json | jq 'select(.cause==\"netfilter_drop\")'

Filter expression (tcpdump/pcap-filter syntax, common subset), AND-ed with the flags:
  host ADDR, net CIDR (or ADDR mask MASK, or 10.231), port N, portrange LO-HI,
  each optionally after src, dst, 'src or dst' or 'src and dst';
  ip, ip6, tcp, udp, icmp, icmp6, ip proto N; and/&&, or/||, not/!, ( );
  a bare value repeats the previous keywords: 'host 10.0.0.1 or 10.0.0.2'.
  port matches TCP/UDP packets carrying ports (not later IPv4 fragments, no IPv6 fragment).
  What the kernel filters can express runs there; the rest is checked in userspace.
  Anything else (ether, vlan, tcp[13], len, host names, ...) is refused with one line.

--pcap FILE writes pcapng: one interface per device, namespace and link-layer header
(name@netns), each packet's drop time as its timestamp and a comment with cause, reason,
location, hook, rule, devices, namespace, pod and evidence (tshark -e frame.comment). Drops
sampled away in the kernel are not in the file; its section comment and the summary say, per
cause, how many packets were written of how many dropped.

Node health check without traffic: dropscope check (see dropscope check --help).
DaemonSet mode with Prometheus metrics: dropscope serve (see dropscope serve --help).
Shell completions: dropscope completions bash|zsh|fish|elvish|powershell.

JSON records (one per line): {\"type\":\"attach\",...} first, then {\"type\":\"drop\",\"cause\",\"reason\",
\"location\",\"family\",\"proto\",\"src\",\"dst\",\"sport\",\"dport\",\"len\",\"ifname\",\"ifindex\",\"netns\",
\"pod_namespace\",\"pod\",\"pod_uid\",\"container\",\"count\",\"evidence\",\"hint\",...}, and
{\"type\":\"summary\",\"causes\":{..},\"reasons\":{..},\"suppressed\",\"lost\",...} at exit. `count` is
how many identical drops a record stands for; the pod fields are absent for drops of no known pod.

Exit status: 0 after a normal stop (Ctrl-C, SIGTERM, --duration), 1 for a runtime error (one
line on stderr), 2 for bad flags; `dropscope check` exits 3 when it finds problems.

Environment:
  DROPSCOPE_LOG   diagnostics on stderr, as a tracing filter: warn (default), info, debug,
                  or per module (DROPSCOPE_LOG=dropscope::evidence=debug); overrides -v
  NO_COLOR        when set and not empty, text output is not coloured (--color always wins)";

#[derive(Debug, Parser)]
#[command(
    name = "dropscope",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub run: RunArgs,

    /// More diagnostics on stderr (-v: progress, -vv: debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

impl Cli {
    /// Parses the command line and applies the environment's conventions (`NO_COLOR`).
    pub fn parse_env() -> Result<Self, clap::Error> {
        let mut cli = Cli::try_parse()?;
        if no_color() && cli.run.color == Color::Auto {
            cli.run.color = Color::Never;
        }
        Ok(cli)
    }

    /// The completion script for `shell`.
    pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "dropscope", &mut out);
        out
    }
}

/// Whether `NO_COLOR` asks for no colour (https://no-color.org: set and not empty).
pub fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Node health snapshot, no traffic needed: forwarding, rp_filter, rules split between
    /// iptables-legacy and nftables, conntrack fill, veth and overlay MTU mismatches, in every
    /// network namespace. Exit status 3 when problems are found, 0 when none.
    Check(CheckArgs),
    /// Long-running mode for a DaemonSet: JSON log lines and a Prometheus endpoint, no live stream.
    #[command(long_about = SERVE_ABOUT, after_help = SERVE_AFTER_HELP)]
    Serve(Box<ServeArgs>),
    /// Print a completion script for a shell, e.g. `dropscope completions bash >
    /// /etc/bash_completion.d/dropscope` (zsh: a file `_dropscope` on $fpath; fish:
    /// ~/.config/fish/completions/dropscope.fish).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

const SERVE_ABOUT: &str = "\
Long-running mode for a DaemonSet: watches drops like the default mode, but instead of a live
stream it writes a few JSON log lines and serves Prometheus metrics.

Endpoints on --metrics: /metrics (OpenMetrics for Prometheus, the classic text format for other
clients), /healthz (200 while the process runs), /readyz (200 only while the probes are attached),
/packets.pcapng (the flight recorder: the last --recorder-packets dropped packets, at most
--recorder-bytes, as pcapng; sampled-away drops are not in it).
The endpoint listens on loopback unless --metrics-allow-remote is given.

Counts are exact: every drop the kernel counted under the filters is in
dropscope_drops_total{cause,reason,iface,pod_namespace,pod}. Each metric keeps at most
--max-series label sets; drops of any newer label set are counted in a series whose labels are
all \"other\" except the cause, and dropscope_label_sets_folded_total says how many were folded.

SIGTERM or SIGINT: the probes are detached, the summary is logged, the exit status is 0.";

const SERVE_AFTER_HELP: &str = "\
Examples:
  dropscope serve                                  metrics on 127.0.0.1:9655
  dropscope serve --metrics 0.0.0.0:9655 --metrics-allow-remote   scraped over the pod network
  curl -s localhost:9655/metrics | grep dropscope_drops_total
  curl -s localhost:9655/packets.pcapng -o last-drops.pcapng   the recent dropped packets

Log lines (stdout, one JSON object each): {\"type\":\"attach\",...,\"metrics\"} once; a
{\"type\":\"drop\",...} record with evidence and fix for each kind of drop (cause, reason,
location, interface, namespace) the first time it is seen in a --log-interval; a
{\"type\":\"digest\",\"drops\",\"causes\":{..},...} line per --log-interval in which something
dropped; the {\"type\":\"summary\",...} at exit.

Metrics: dropscope_drops_total, dropscope_drop_bytes_total, dropscope_drops_unsent_total{kind},
dropscope_events_lost_total, dropscope_drops_suppressed_total, dropscope_probe_info{probe,mode},
dropscope_build_info{version,kernel}, dropscope_label_sets_folded_total.";

/// Flags of `dropscope serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub observe: ObserveArgs,

    /// Address of the metrics endpoint (/metrics, /healthz, /readyz).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9655")]
    pub metrics: SocketAddr,

    /// Allow a --metrics address other than loopback, reachable from the network (for
    /// example 0.0.0.0:9655 when Prometheus scrapes the pod).
    #[arg(long)]
    pub metrics_allow_remote: bool,

    /// At most this many label sets per metric; drops of newer label sets are counted under
    /// labels "other" (the cause is kept), so a node with many pods or interfaces stays cheap
    /// to scrape and store.
    #[arg(long, value_name = "N", default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_series: u64,

    /// Seconds between digest log lines (written only when something dropped).
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_seconds)]
    pub log_interval: f64,

    /// Dropped packets the flight recorder keeps (the last ones), served as pcapng at
    /// /packets.pcapng. 0 turns it off (and the kernel copies no packet bytes).
    #[arg(long, value_name = "N", default_value_t = crate::capture::recorder::DEFAULT_PACKETS)]
    pub recorder_packets: usize,

    /// Memory bound of the flight recorder: packet bytes, comments and bookkeeping (K, M, G
    /// suffixes allowed); the oldest packets go first.
    #[arg(long, value_name = "BYTES", default_value = "4M", value_parser = parse_bytes)]
    pub recorder_bytes: usize,
}

impl ServeArgs {
    /// Refuses a metrics address reachable from the network unless it was asked for.
    pub fn check(&self) -> Result<(), String> {
        if self.metrics.ip().is_loopback() || self.metrics_allow_remote {
            return Ok(());
        }
        Err(format!(
            "--metrics {} is not a loopback address and would expose the endpoint to the network; \
             add --metrics-allow-remote to allow it",
            self.metrics
        ))
    }
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Only these network namespaces (inode, `ip netns` name, or a file such as
    /// /proc/PID/ns/net). Repeatable. Default: all.
    #[arg(long, value_name = "NETNS")]
    pub netns: Vec<String>,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human-readable lines, coloured on a terminal.
    Text,
    /// One JSON object per line, for scripts.
    Json,
}

/// When to colour text output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Color {
    Auto,
    Always,
    Never,
}

/// Flags of the default mode: the live stream (text, JSON or `--top`).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    #[command(flatten)]
    pub observe: ObserveArgs,

    /// Colour text output.
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    pub color: Color,

    /// Live view instead of a stream: causes ranked by drop rate, redrawn every --interval
    /// (plain lines when stdout is not a terminal). Ctrl-C prints the summary.
    #[arg(long, conflicts_with = "format")]
    pub top: bool,

    /// Benchmark floor: attach only an empty program to kfree_skb, then wait for a signal.
    #[arg(long, hide = true)]
    pub null_observer: bool,

    /// Print the catalogue of causes dropscope knows (Markdown) and exit.
    #[arg(long)]
    pub causes: bool,

    /// Also write every reported drop's packet (its first --snaplen bytes) to this pcapng
    /// file, with the cause in each packet's comment. `-` writes to standard output (the text
    /// or JSON stream then goes to standard error).
    #[arg(long, value_name = "FILE")]
    pub pcap: Option<String>,

    /// Print the licenses of dropscope and of the code built into it, and exit.
    #[arg(long)]
    pub licenses: bool,
}

/// What to watch and how: the flags the live stream and `serve` share.
#[derive(Debug, Args)]
pub struct ObserveArgs {
    /// Only drops matching this pcap-filter expression (tcpdump's language), AND-ed with the
    /// flags: e.g. 'dst net 10.96.0.0/12 and udp port 53'. Quote it, or give it as several
    /// words. See the syntax below.
    #[arg(value_name = "EXPRESSION")]
    pub expression: Vec<String>,

    /// Bytes of each dropped packet to keep (--pcap, the flight recorder), 64 to 512, from
    /// its link-layer header, or its network header when the kernel had none.
    #[arg(long, value_name = "N", default_value_t = crate::capture::DEFAULT_SNAPLEN,
          value_parser = clap::value_parser!(u32).range(crate::capture::MIN_SNAPLEN as i64..=crate::capture::MAX_SNAPLEN as i64))]
    pub snaplen: u32,

    /// Stop after this many seconds (default: run until Ctrl-C / SIGTERM).
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
    pub duration: Option<f64>,

    /// Create this file once the probes are attached (start test traffic after it appears).
    /// It is removed on exit.
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,

    /// Also show benign drops (ping socket copies, socket close purges, frames for other hosts).
    #[arg(long)]
    pub all: bool,

    /// Only drops whose source is in this CIDR (or address). Repeatable.
    #[arg(long, value_name = "CIDR", value_parser = parse_net)]
    pub src: Vec<IpNet>,

    /// Only drops whose destination is in this CIDR (or address). Repeatable.
    #[arg(long, value_name = "CIDR", value_parser = parse_net)]
    pub dst: Vec<IpNet>,

    /// Only drops with this TCP/UDP port, source or destination. Repeatable.
    #[arg(long, value_name = "PORT")]
    pub port: Vec<u16>,

    /// Only this protocol: tcp, udp, icmp, icmpv6, sctp, gre, esp or a number. Repeatable.
    #[arg(long, value_name = "PROTO", value_parser = parse_proto)]
    pub proto: Vec<u8>,

    /// Only drops on this interface (ingress or egress). Repeatable.
    #[arg(long, value_name = "NAME")]
    pub iface: Vec<String>,

    /// Only drops in this network namespace: an inode number (see `ls -l /proc/PID/ns/net`),
    /// an `ip netns` name, or a namespace file such as /proc/PID/ns/net (a container's: its
    /// PID from `crictl inspect` or `docker inspect`). Repeatable.
    #[arg(long, value_name = "NETNS")]
    pub netns: Vec<String>,

    /// Only drops attributed to this pod: in its network namespace, or in the node's own
    /// namespace from or to one of its addresses. Repeatable. A pod not running on the node at
    /// start is warned about, and its drops are shown once it runs.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub pod: Vec<PodName>,

    /// Where kubelet's directories are: pods are named from DIR/var/log/pods/<namespace>_<name>_<uid>/
    /// and containers from DIR/var/log/containers/ (e.g. /host when the node's / is mounted
    /// there). Processes and their cgroups are read from /proc: in a container, share the
    /// host's PID namespace.
    #[arg(long, value_name = "DIR", default_value = "/", value_parser = parse_dir)]
    pub pods_root: PathBuf,

    /// How repeated identical drops are reported: once per this many seconds.
    #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_seconds)]
    pub interval: f64,

    /// Drop events sent to userspace per kind of drop per second (per CPU); the rest are only
    /// counted in the kernel and reported as "... and N more like this". 0 sends every drop.
    /// Counts stay exact either way.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub sample: u32,

    /// How to attach the drop probes: auto tries BTF tracepoints, then classic tracepoints.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub attach: Mode,

    /// Context probes on nf_hook_slow, ip_forward/ip6_forward, ip_error, nft_do_chain and
    /// ipt_do_table add the netfilter hook, table and chain, and the ingress device of
    /// forwarded packets, straight from the kernel. auto tries fentry/fexit, then
    /// kprobe/kretprobe; the first line of output says what each probe got and why.
    #[arg(long, value_enum, default_value_t = ContextMode::Auto)]
    pub context: ContextMode,

    /// When the context probes on paths every forwarded or filtered packet takes
    /// (nf_hook_slow, ip_forward, nft_do_chain, ipt_do_table) are attached. on-demand: while
    /// netfilter or forwarding drops occur (the first drop of a burst gets the answer
    /// without them: the hook from the kernel stack); always: from start to exit, as every
    /// such packet then pays for them. ip_error and icmp6_send are always attached.
    #[arg(long, value_enum, default_value_t = Arming::OnDemand)]
    pub context_arm: Arming,

    /// With --context-arm on-demand: seconds without a drop that needs them before the
    /// context probes are detached again.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_seconds)]
    pub context_linger: f64,

    /// Kernel BTF to read struct layouts and drop-reason names from.
    #[arg(long, value_name = "PATH", default_value = "/sys/kernel/btf/vmlinux")]
    pub btf: PathBuf,
}

fn parse_dir(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    if path.is_dir() {
        Ok(path)
    } else {
        Err(format!("'{s}' is not a directory"))
    }
}

/// A size in bytes, with an optional K, M or G (binary) suffix.
fn parse_bytes(s: &str) -> Result<usize, String> {
    let (digits, unit) = match s.trim().to_ascii_uppercase() {
        t if t.ends_with('K') => (t[..t.len() - 1].to_string(), 1usize << 10),
        t if t.ends_with('M') => (t[..t.len() - 1].to_string(), 1 << 20),
        t if t.ends_with('G') => (t[..t.len() - 1].to_string(), 1 << 30),
        t => (t, 1),
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| format!("'{s}' is not a size in bytes (e.g. 4M, 65536)"))
}

/// Bounds of a number of seconds: below a millisecond a timer period is zero, and beyond a
/// few decades a deadline no longer fits the clock (both would panic once attached).
const SECONDS_MIN: f64 = 0.001;
const SECONDS_MAX: f64 = 1e9;

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (SECONDS_MIN..=SECONDS_MAX).contains(&v) => Ok(v),
        Ok(v) if v > 0.0 && v.is_finite() => Err(format!(
            "'{s}' seconds is out of range ({SECONDS_MIN} to {SECONDS_MAX:e})"
        )),
        _ => Err(format!("'{s}' is not a positive number of seconds")),
    }
}

impl ObserveArgs {
    /// The filter expression, parsed (`None` when none was given).
    pub fn expression(&self) -> Result<Option<crate::expr::Expr>, String> {
        if self.expression.is_empty() {
            return Ok(None);
        }
        crate::expr::Expr::parse(&self.expression.join(" ")).map(Some)
    }

    /// The filters, with `--netns` names resolved to inodes.
    pub fn filter(&self) -> anyhow::Result<Filter> {
        let netns = self
            .netns
            .iter()
            .map(|n| crate::netns::resolve_arg(n))
            .collect::<anyhow::Result<_>>()?;
        Ok(Filter {
            src: self.src.clone(),
            dst: self.dst.clone(),
            ports: self.port.clone(),
            protos: self.proto.clone(),
            ifaces: self.iface.clone(),
            netns,
            pods: self.pod.clone(),
            expr: self
                .expression()
                .map_err(|e| anyhow::anyhow!("filter expression: {e}"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn conventions_operators_expect() {
        let run = Cli::try_parse_from(["dropscope", "-o", "json"]).unwrap();
        assert_eq!(run.run.format, Format::Json);
        match Cli::try_parse_from(["dropscope", "check", "-o", "json"])
            .unwrap()
            .command
        {
            Some(Command::Check(c)) => assert_eq!(c.format, Format::Json),
            other => panic!("{other:?}"),
        }
        let help = Cli::command().render_long_help().to_string();
        for needle in [
            "Exit status",
            "DROPSCOPE_LOG",
            "NO_COLOR",
            "/proc/PID/ns/net",
            "completions",
        ] {
            assert!(help.contains(needle), "--help does not mention {needle}");
        }
        let bash = String::from_utf8(Cli::completions(clap_complete::Shell::Bash)).unwrap();
        assert!(bash.contains("--netns") && bash.contains("serve"), "{bash}");
    }

    #[test]
    fn bad_values_are_rejected() {
        for args in [
            &["dropscope", "--format", "yaml"][..],
            &["dropscope", "--duration", "-1"],
            // Accepted once, these panicked after attaching.
            &["dropscope", "--duration", "1e300"],
            &["dropscope", "--interval", "1e-12"],
            &["dropscope", "--interval", "NaN"],
            &["dropscope", "serve", "--log-interval", "1e30"],
            // Past what a timer holds.
            &["dropscope", "--interval", "1e19"],
            &["dropscope", "--duration", "NaN"],
            &["dropscope", "--src", "10.0.0.0/40"],
            &["dropscope", "--port", "70000"],
            &["dropscope", "--proto", "nope"],
            &["dropscope", "--attach", "kprobe"],
            &["dropscope", "--pod", "coredns"],
            &["dropscope", "--pods-root", "/nonexistent/root"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?} accepted");
        }
        let ok = Cli::try_parse_from([
            "dropscope",
            "--format",
            "json",
            "--dst",
            "10.231.2.2",
            "--proto",
            "udp",
        ])
        .unwrap();
        assert_eq!(ok.run.format, Format::Json);
        assert_eq!(ok.run.observe.proto, vec![17]);
        let ok = Cli::try_parse_from([
            "dropscope",
            "--pod",
            "shop/db",
            "--pod",
            "kube-system/coredns",
            "--pods-root",
            "/",
        ])
        .unwrap();
        assert_eq!(
            ok.run
                .observe
                .pod
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["shop/db", "kube-system/coredns"]
        );
    }

    fn serve(args: &[&str]) -> ServeArgs {
        match Cli::try_parse_from(args).unwrap().command {
            Some(Command::Serve(s)) => *s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn serve_shares_the_run_flags_and_stays_on_loopback() {
        let s = serve(&["dropscope", "serve", "--netns", "dr-r", "--sample", "5"]);
        assert_eq!(
            (s.observe.netns.as_slice(), s.observe.sample),
            (&["dr-r".to_string()][..], 5)
        );
        assert_eq!(s.metrics.to_string(), "127.0.0.1:9655");
        assert_eq!(s.check(), Ok(()));
        assert_eq!(
            serve(&["dropscope", "serve", "--metrics", "[::1]:9700"]).check(),
            Ok(())
        );
        for remote in ["0.0.0.0:9655", "[::]:9655", "10.1.2.3:9655"] {
            let err = serve(&["dropscope", "serve", "--metrics", remote])
                .check()
                .unwrap_err();
            assert!(err.contains("--metrics-allow-remote"), "{err}");
            assert_eq!(
                serve(&[
                    "dropscope",
                    "serve",
                    "--metrics",
                    remote,
                    "--metrics-allow-remote"
                ])
                .check(),
                Ok(())
            );
        }
        for bad in [
            &["dropscope", "serve", "--metrics", "localhost"][..],
            &["dropscope", "serve", "--max-series", "0"],
            &["dropscope", "serve", "--top"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} accepted");
        }
    }
}
