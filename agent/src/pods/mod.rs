//! Pod and container attribution, node-locally and without the API server: a drop's network
//! namespace -> the processes in it (`/proc/*/ns/net`) -> their kubelet cgroup (pod UID and
//! container id) -> the pod's namespace and name from kubelet's log directories. Drops in the
//! node's own namespace are attributed by address: when the packet's source or destination is
//! an address configured in a pod's namespace.
pub mod addrs;
pub mod cgroup;
pub mod podlogs;
pub mod procs;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use podlogs::{PodDir, PodLogs};
use procs::PodProcess;

use crate::events::Flow;

/// The pod (and container) a drop is attributed to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The container whose processes live in the pod's network namespace (the sandbox's
    /// `pause` left out); several, comma-separated, when containers share it; the short
    /// container id when kubelet's logs do not name it.
    pub container: Option<String>,
}

impl PodRef {
    /// Whether this is the pod `wanted` names.
    pub fn is(&self, wanted: &PodName) -> bool {
        self.namespace == wanted.namespace && self.name == wanted.name
    }
}

impl fmt::Display for PodRef {
    /// `namespace/name (container)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        match &self.container {
            Some(c) => write!(f, " ({c})"),
            None => Ok(()),
        }
    }
}

/// A pod by namespace and name, as `--pod` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodName {
    pub namespace: String,
    pub name: String,
}

impl FromStr for PodName {
    type Err = String;

    /// `NAMESPACE/NAME`, each spelled as Kubernetes allows (lowercase DNS names).
    fn from_str(s: &str) -> Result<Self, String> {
        let dns = |v: &str, max: usize, dots: bool| {
            !v.is_empty()
                && v.len() <= max
                && v.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.')
                })
        };
        match s.split_once('/') {
            Some((ns, name)) if dns(ns, 63, false) && dns(name, 253, true) => Ok(PodName {
                namespace: ns.to_string(),
                name: name.to_string(),
            }),
            _ => Err(format!(
                "'{s}' is not a pod: use NAMESPACE/NAME, e.g. kube-system/coredns-5d78c9869d-7xk2p"
            )),
        }
    }
}

impl fmt::Display for PodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// However many drops come from unknown namespaces, the node is rescanned at most this often.
const MIN_RESCAN: Duration = Duration::from_secs(2);
/// After this long a scan no longer vouches that a namespace or an address is no pod's.
const STALE: Duration = Duration::from_secs(30);
/// Pods, and namespaces remembered as no pod's, kept at most.
const MAX_ENTRIES: usize = 4096;

/// The pods on the node, as one scan found them.
#[derive(Debug, Default)]
struct Snapshot {
    by_netns: HashMap<u32, Arc<PodRef>>,
    /// A process of each pod's namespace (its sandbox's when there is one): while it still
    /// lives in that namespace, the inode still means that pod. A deleted namespace's inode is
    /// given to the next one created, maybe another pod's.
    witness: HashMap<u32, u32>,
    /// Addresses configured in exactly one pod's namespace (and not in the node's own).
    by_addr: HashMap<IpAddr, Arc<PodRef>>,
}

/// Answers "which pod is this drop's?" from a cached scan of the node, rescanned when a
/// namespace it has not seen shows up (at most every 2 s) and when the scan is 30 s old.
pub struct Resolver {
    root: PathBuf,
    own: u32,
    prefer: Vec<PodName>,
    snap: Snapshot,
    scanned: Option<Instant>,
    /// Namespaces seen in drops that the last scan found no pod in.
    not_pods: HashSet<u32>,
    /// Kubelet's pod directories as the last scan read them (for cgroup lookups).
    logs: PodLogs,
    /// The network namespace of a process (/proc/PID/ns/net).
    netns_of: fn(u32) -> Option<u32>,
}

impl Resolver {
    /// A resolver reading kubelet's directories under `root` (normally `/`). When a drop in
    /// the node's namespace is between two pods, a pod in `prefer` (the `--pod` filter) wins
    /// over the source, which otherwise wins over the destination. Nothing is read until
    /// [`Resolver::scan`] or the first lookup.
    pub fn new(root: &Path, prefer: Vec<PodName>) -> Self {
        let own = crate::netns::inode_of(Path::new("/proc/self/ns/net")).unwrap_or(0);
        Resolver {
            root: root.to_path_buf(),
            own,
            prefer,
            snap: Snapshot::default(),
            scanned: None,
            not_pods: HashSet::new(),
            logs: PodLogs::default(),
            netns_of: |pid| {
                crate::netns::inode_of(Path::new(&format!("/proc/{pid}/ns/net"))).ok()
            },
        }
    }

    /// Reads the node's pods now.
    pub fn scan(&mut self) {
        let logs = PodLogs::read(&self.root);
        self.snap = if logs.pods.is_empty() {
            Snapshot::default()
        } else {
            let own_addrs = addrs::of_process(std::process::id());
            build(procs::scan(self.own), &logs, &own_addrs, addrs::of_process)
        };
        self.logs = logs;
        self.scanned = Some(Instant::now());
        self.not_pods.clear();
    }

    /// The pods found by the last scan.
    pub fn pods(&self) -> impl Iterator<Item = &Arc<PodRef>> {
        self.snap.by_netns.values()
    }

    /// The pod of a drop in namespace `netns` with addresses `flow`.
    pub fn for_drop(&mut self, netns: u32, flow: Option<&Flow>) -> Option<Arc<PodRef>> {
        if netns == 0 {
            return None;
        }
        if netns == self.own {
            return self.by_address(flow?);
        }
        if let Some(pod) = self.snap.by_netns.get(&netns) {
            let witness = self.snap.witness.get(&netns).copied();
            if witness.is_some_and(|pid| (self.netns_of)(pid) == Some(netns)) {
                return Some(pod.clone());
            }
            // The pod's sandbox is gone: the inode may be another namespace's now. Rather no
            // pod than the wrong one until a scan says.
            self.snap.by_netns.remove(&netns);
            self.snap.witness.remove(&netns);
        } else if self.not_pods.contains(&netns) && !self.stale() {
            return None;
        }
        // Not remembered unless a scan just looked: a rate-limited miss retries later.
        if self.may_rescan() {
            self.scan();
            if let Some(pod) = self.snap.by_netns.get(&netns) {
                return Some(pod.clone());
            }
            if self.not_pods.len() < MAX_ENTRIES {
                self.not_pods.insert(netns);
            }
        }
        None
    }

    /// The pod and container of a process in cgroup `path` (a cgroup v2 path as
    /// /proc/PID/cgroup gives it): `(None, None)` outside kubelet's tree.
    pub fn for_cgroup(&mut self, path: &str) -> (Option<Arc<PodRef>>, Option<String>) {
        let Some(pc) = cgroup::parse_path(path) else {
            return (None, None);
        };
        if !self.logs.pods.contains_key(&pc.uid) && self.may_rescan() {
            self.scan();
        }
        let container = pc.container_id.as_ref().map(|id| {
            self.logs
                .container_names
                .get(id)
                .cloned()
                .unwrap_or_else(|| id[..id.len().min(12)].to_string())
        });
        let pod = self.logs.pods.get(&pc.uid).map(|dir| {
            Arc::new(PodRef {
                namespace: dir.namespace.clone(),
                name: dir.name.clone(),
                uid: dir.uid.clone(),
                container: container.clone(),
            })
        });
        (pod, container)
    }

    fn by_address(&mut self, flow: &Flow) -> Option<Arc<PodRef>> {
        if self.stale() && self.may_rescan() {
            self.scan();
        }
        let src = self.snap.by_addr.get(&flow.src);
        let dst = self.snap.by_addr.get(&flow.dst);
        let wanted = |p: &&Arc<PodRef>| self.prefer.iter().any(|w| p.is(w));
        src.filter(wanted)
            .or(dst.filter(wanted))
            .or(src)
            .or(dst)
            .cloned()
    }

    fn stale(&self) -> bool {
        self.scanned.is_none_or(|t| t.elapsed() > STALE)
    }

    fn may_rescan(&self) -> bool {
        self.scanned.is_none_or(|t| t.elapsed() >= MIN_RESCAN)
    }
}

/// Joins the pods' processes with kubelet's logs: a namespace whose pod processes all belong
/// to one pod is that pod's. `addrs_of(pid)` reads the addresses of a process's namespace.
fn build(
    procs: Vec<PodProcess>,
    logs: &PodLogs,
    own_addrs: &[IpAddr],
    addrs_of: impl Fn(u32) -> Vec<IpAddr>,
) -> Snapshot {
    let mut by_netns: HashMap<u32, Vec<PodProcess>> = HashMap::new();
    for p in procs {
        by_netns.entry(p.netns).or_default().push(p);
    }
    let mut snap = Snapshot::default();
    // None: the address is configured in more than one pod's namespace, so it names none.
    let mut owners: HashMap<IpAddr, Option<Arc<PodRef>>> = HashMap::new();
    for (netns, ps) in by_netns {
        if snap.by_netns.len() >= MAX_ENTRIES {
            tracing::warn!(
                "more than {MAX_ENTRIES} pod network namespaces: the rest are not attributed"
            );
            break;
        }
        let uids: BTreeSet<&str> = ps.iter().map(|p| p.cgroup.uid.as_str()).collect();
        let (Some(uid), 1) = (uids.first(), uids.len()) else {
            continue;
        };
        let Some(dir) = logs.pods.get(*uid) else {
            continue;
        };
        let pod = Arc::new(PodRef {
            namespace: dir.namespace.clone(),
            name: dir.name.clone(),
            uid: dir.uid.clone(),
            container: container_of(&ps, dir, &logs.container_names),
        });
        let addrs = ps
            .iter()
            .map(|p| addrs_of(p.pid))
            .find(|a| !a.is_empty())
            .unwrap_or_default();
        for addr in addrs.into_iter().filter(|a| !own_addrs.contains(a)) {
            owners
                .entry(addr)
                .and_modify(|o| {
                    if o.as_ref().is_some_and(|p| p.uid != pod.uid) {
                        *o = None;
                    }
                })
                .or_insert_with(|| Some(pod.clone()));
        }
        let witness = ps.iter().find(|p| p.comm == "pause").unwrap_or(&ps[0]).pid;
        snap.witness.insert(netns, witness);
        snap.by_netns.insert(netns, pod);
    }
    snap.by_addr = owners
        .into_iter()
        .filter_map(|(a, o)| Some((a, o?)))
        .collect();
    snap
}

/// The containers running in a pod's namespace, by name: named by `var/log/containers`, or
/// the pod's only log directory; else their short ids. The sandbox (only `pause`) is left out.
fn container_of(
    ps: &[PodProcess],
    dir: &PodDir,
    names: &HashMap<String, String>,
) -> Option<String> {
    let ids: BTreeSet<&str> = ps
        .iter()
        .filter_map(|p| p.cgroup.container_id.as_deref())
        .collect();
    let sandbox = |id: &str| {
        ps.iter()
            .filter(|p| p.cgroup.container_id.as_deref() == Some(id))
            .all(|p| p.comm == "pause")
    };
    let ids: Vec<&str> = ids.into_iter().filter(|id| !sandbox(id)).collect();
    let named: BTreeSet<&str> = ids
        .iter()
        .filter_map(|id| names.get(*id))
        .map(String::as_str)
        .collect();
    let list: Vec<&str> = if !named.is_empty() {
        named.into_iter().collect()
    } else if let ([only], false) = (&dir.containers[..], ids.is_empty()) {
        vec![only.as_str()]
    } else {
        ids.iter().map(|id| &id[..id.len().min(12)]).collect()
    };
    (!list.is_empty()).then(|| list.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cgroup::PodCgroup;

    const UID_A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
    const UID_B: &str = "bbbbbbbb-0000-4000-8000-000000000002";

    fn id(c: char) -> String {
        c.to_string().repeat(64)
    }

    fn process(
        pid: u32,
        netns: u32,
        uid: &str,
        container: Option<String>,
        comm: &str,
    ) -> PodProcess {
        PodProcess {
            pid,
            netns,
            cgroup: PodCgroup {
                uid: uid.into(),
                container_id: container,
            },
            comm: comm.into(),
        }
    }

    fn logs() -> PodLogs {
        let dir = |ns: &str, name: &str, uid: &str, containers: &[&str]| {
            let containers = containers.iter().map(|c| c.to_string()).collect();
            (
                uid.to_string(),
                PodDir {
                    namespace: ns.into(),
                    name: name.into(),
                    uid: uid.into(),
                    containers,
                },
            )
        };
        PodLogs {
            pods: [
                dir("shop", "cart", UID_A, &["api"]),
                dir("shop", "db", UID_B, &["postgres", "metrics"]),
            ]
            .into(),
            container_names: [
                (id('b'), "postgres".to_string()),
                (id('c'), "metrics".to_string()),
            ]
            .into(),
        }
    }

    fn addrs(pid: u32) -> Vec<IpAddr> {
        match pid {
            10 | 11 => vec!["10.244.0.5".parse().unwrap(), "10.0.0.1".parse().unwrap()],
            20 => vec![
                "10.244.0.6".parse().unwrap(),
                "10.0.0.1".parse().unwrap(),
                "192.0.2.2".parse().unwrap(),
            ],
            _ => vec![],
        }
    }

    #[test]
    fn namespaces_name_their_pod_and_container() {
        let procs = vec![
            process(10, 100, UID_A, Some(id('0')), "pause"),
            process(11, 100, UID_A, Some(id('a')), "node"),
            process(20, 200, UID_B, Some(id('1')), "pause"),
            process(21, 200, UID_B, Some(id('b')), "postgres"),
            process(22, 200, UID_B, Some(id('b')), "postgres"),
            process(23, 200, UID_B, Some(id('c')), "exporter"),
            // Two pods in one namespace: neither can claim it.
            process(30, 300, UID_A, Some(id('a')), "x"),
            process(31, 300, UID_B, Some(id('b')), "y"),
            // A pod kubelet's logs do not know.
            process(40, 400, "cccccccc-0000-4000-8000-000000000003", None, "z"),
        ];
        let snap = build(procs, &logs(), &["192.0.2.2".parse().unwrap()], addrs);
        let cart = &snap.by_netns[&100];
        assert_eq!(
            (
                cart.namespace.as_str(),
                cart.name.as_str(),
                cart.uid.as_str()
            ),
            ("shop", "cart", UID_A)
        );
        // Not in var/log/containers, but the pod's only log directory.
        assert_eq!(cart.to_string(), "shop/cart (api)");
        assert_eq!(
            snap.by_netns[&200].to_string(),
            "shop/db (metrics,postgres)"
        );
        assert!(!snap.by_netns.contains_key(&300) && !snap.by_netns.contains_key(&400));
        // Addresses: one pod's only; shared ones and the node's own name nobody.
        assert_eq!(
            snap.by_addr[&"10.244.0.5".parse::<IpAddr>().unwrap()].name,
            "cart"
        );
        assert_eq!(
            snap.by_addr[&"10.244.0.6".parse::<IpAddr>().unwrap()].name,
            "db"
        );
        assert_eq!(snap.by_addr.len(), 2, "{:?}", snap.by_addr.keys());
    }

    #[test]
    fn containers_without_names_keep_their_short_id() {
        let dir = PodDir {
            namespace: "n".into(),
            name: "p".into(),
            uid: UID_A.into(),
            containers: vec!["a".into(), "b".into()],
        };
        let ps = vec![
            process(1, 1, UID_A, Some(id('d')), "app"),
            process(2, 1, UID_A, Some(id('0')), "pause"),
        ];
        assert_eq!(
            container_of(&ps, &dir, &HashMap::new()).as_deref(),
            Some("dddddddddddd")
        );
        // Only the sandbox is running: no container.
        assert_eq!(container_of(&ps[1..], &dir, &HashMap::new()), None);
    }

    #[test]
    fn host_drops_go_to_the_source_pod_unless_the_other_is_wanted() {
        let snap = build(
            vec![
                process(10, 100, UID_A, Some(id('a')), "a"),
                process(20, 200, UID_B, Some(id('b')), "b"),
            ],
            &logs(),
            &[],
            |pid| {
                vec![if pid == 10 {
                    "10.244.0.5"
                } else {
                    "10.244.0.6"
                }
                .parse()
                .unwrap()]
            },
        );
        let mut r = Resolver::new(Path::new("/nonexistent"), vec![]);
        r.snap = snap;
        r.scanned = Some(Instant::now());
        r.netns_of = |pid| Some(pid * 10);
        let flow = |src: &str, dst: &str| Flow {
            family: crate::events::Family::Ipv4,
            proto: 17,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            ports: Some((1, 2)),
            icmp: None,
        };
        let own = r.own;
        let name = |r: &mut Resolver, f: &Flow| r.for_drop(own, Some(f)).map(|p| p.name.clone());
        assert_eq!(
            name(&mut r, &flow("10.244.0.5", "10.244.0.6")).as_deref(),
            Some("cart")
        );
        assert_eq!(
            name(&mut r, &flow("10.9.9.9", "10.244.0.6")).as_deref(),
            Some("db")
        );
        assert_eq!(name(&mut r, &flow("10.9.9.9", "10.9.9.8")), None);
        r.prefer = vec!["shop/db".parse().unwrap()];
        assert_eq!(
            name(&mut r, &flow("10.244.0.5", "10.244.0.6")).as_deref(),
            Some("db")
        );
        // Namespaces: a hit, and a miss remembered until the next scan.
        assert_eq!(
            r.for_drop(100, None).map(|p| p.name.clone()).as_deref(),
            Some("cart")
        );
        r.scanned = Some(Instant::now() - MIN_RESCAN);
        assert_eq!(r.for_drop(999, None), None);
        assert!(
            r.not_pods.contains(&999),
            "the miss rescanned and is remembered"
        );
    }

    #[test]
    fn a_reused_namespace_inode_is_not_the_old_pod() {
        let snap = build(
            vec![
                process(10, 100, UID_A, Some(id('0')), "pause"),
                process(11, 100, UID_A, Some(id('a')), "node"),
            ],
            &logs(),
            &[],
            |_| vec![],
        );
        assert_eq!(
            snap.witness[&100], 10,
            "the sandbox vouches for the namespace"
        );
        let mut r = Resolver::new(Path::new("/nonexistent"), vec![]);
        r.snap = snap;
        r.scanned = Some(Instant::now());
        r.netns_of = |pid| (pid == 10).then_some(100);
        assert_eq!(
            r.for_drop(100, None).map(|p| p.name.clone()).as_deref(),
            Some("cart")
        );
        // The pod is deleted and a new namespace gets inode 100 before the next scan.
        r.netns_of = |_| None;
        assert_eq!(r.for_drop(100, None), None, "not the deleted pod");
        assert!(!r.snap.by_netns.contains_key(&100));
    }

    #[test]
    fn pod_names_are_checked() {
        let p: PodName = "kube-system/coredns-5d78c9869d-7xk2p".parse().unwrap();
        assert_eq!(
            (p.namespace.as_str(), p.name.as_str()),
            ("kube-system", "coredns-5d78c9869d-7xk2p")
        );
        assert_eq!(
            "default/etcd-node1.example"
                .parse::<PodName>()
                .unwrap()
                .to_string(),
            "default/etcd-node1.example"
        );
        for bad in ["coredns", "/x", "x/", "a/b/c", "Kube/x", "a.b/x", "a_b/x"] {
            let err = bad.parse::<PodName>().unwrap_err();
            assert!(err.contains("NAMESPACE/NAME"), "{bad}: {err}");
        }
    }
}
