//! deploy/: the DaemonSet manifest is valid Kubernetes, its capability set is enough for the
//! agent and none of it is spare, and the Grafana dashboard queries only what the exporter
//! serves.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command},
};

use dropscope_tests::{
    iptables_rule_packets, kube_validate, traffic::Udp, wait_for, Netns, Observer, Report,
};
use serde_json::Value;

fn deploy_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name)
}

// --- The manifest against the Kubernetes OpenAPI schema -----------------------------------

/// Kubernetes versions the manifest must be valid for: the first whose security context has
/// `appArmorProfile`, and the newest the validator knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// Runs kubernetes-validate in strict mode (unknown fields are errors). Returns whether it
/// passed, and what it said.
fn validate(manifest: &Path, version: &str) -> (bool, String) {
    let exe = kube_validate::executable();
    let out = Command::new(&exe)
        .args(["--strict", "--kubernetes-version", version])
        .arg(manifest)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); `cargo xtask setup` installs it",
                exe.display()
            )
        });
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[test]
fn manifest_validates_against_the_kubernetes_schema() {
    let manifest = deploy_file("daemonset.yaml");
    for version in KUBERNETES_VERSIONS {
        let (ok, said) = validate(&manifest, version);
        assert!(
            ok,
            "deploy/daemonset.yaml is not valid Kubernetes {version}:\n{said}"
        );
        for resource in [
            "namespace/dropscope",
            "serviceaccount/dropscope",
            "daemonset/dropscope",
        ] {
            assert!(
                said.contains(&format!("passed for resource {resource}")),
                "{resource} not validated:\n{said}"
            );
        }
    }
}

#[test]
fn validator_rejects_broken_manifests() {
    let text = fs::read_to_string(deploy_file("daemonset.yaml")).unwrap();
    let dir = std::env::temp_dir().join(format!("dropscope-deploy-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("misspelled field", "readOnlyRootFilesystem: true", "readOnlyRootFileSystem: true", "readOnlyRootFileSystem"),
        ("port given as a string", "containerPort: 9655", "containerPort: \"9655\"", "'9655' is not of type 'integer'"),
        (
            "DaemonSet without a selector",
            "  selector:\n    matchLabels:\n      app.kubernetes.io/name: dropscope\n  updateStrategy:",
            "  updateStrategy:",
            "'selector' is a required property",
        ),
        ("unknown update strategy field", "maxUnavailable: 10%", "maxUnavailble: 10%", "maxUnavailble"),
    ];
    for (i, (what, from, to, complaint)) in cases.iter().enumerate() {
        assert!(
            text.contains(from),
            "negative case '{what}' no longer applies: {from:?} is not in the manifest"
        );
        let broken = dir.join(format!("broken-{i}.yaml"));
        fs::write(&broken, text.replacen(from, to, 1)).unwrap();
        let (ok, said) = validate(&broken, KUBERNETES_VERSIONS[1]);
        assert!(
            !ok,
            "{what}: the validator accepted a broken manifest:\n{said}"
        );
        assert!(
            said.contains(complaint),
            "{what}: expected {complaint:?} in:\n{said}"
        );
    }
    let _ = fs::remove_dir_all(&dir);
}

// --- The capability set, against the real agent ------------------------------------------

/// The manifest's documents.
fn manifest() -> Vec<Value> {
    let text = fs::read_to_string(deploy_file("daemonset.yaml")).unwrap();
    serde_saphyr::from_multiple(&text).expect("deploy/daemonset.yaml is YAML")
}

/// A process holding a network namespace the way a pod's pause container does: another user
/// (65535), no capabilities, and no `ip netns` name visible to the container.
struct PauseProcess(Child);

impl PauseProcess {
    fn start(ns: &Netns) -> Self {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args([
                "setpriv",
                "--reuid=65535",
                "--regid=65535",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ])
            .args(["sleep", "600"])
            .spawn()
            .expect("start the pause process");
        let pause = PauseProcess(child);
        let (pid, inode) = (pause.pid(), ns.inode());
        // `ip netns exec` and setpriv exec in place: the same pid ends up as uid 65535 in `ns`.
        wait_for(
            "the pause process to run as 65535 in the namespace",
            10.0,
            || {
                let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let in_ns = fs::metadata(format!("/proc/{pid}/ns/net"))
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
                status.lines().any(|l| l.starts_with("Uid:\t65535\t")) && in_ns.ok() == Some(inode)
            },
        );
        pause
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for PauseProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A wrapper that runs dropscope the way the DaemonSet's container does: root holding only
/// `caps` (as its bounding set, so the firewall tools it runs get no more), no_new_privs
/// (`allowPrivilegeEscalation: false`), and a /run of its own, so pods' namespaces can only
/// be found through /proc as in the container.
fn as_in_the_container(caps: &[&str]) -> Vec<String> {
    let bounding: Vec<String> = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
        .collect();
    let script = "mount -t tmpfs -o size=64k tmpfs /run/netns && \
                  exec setpriv --bounding-set=\"$0\" --inh-caps=-all --ambient-caps=-all --no-new-privs -- \"$@\"";
    [
        "unshare",
        "--mount",
        "--",
        "sh",
        "-c",
        script,
        &bounding.join(","),
    ]
    .map(String::from)
    .to_vec()
}

/// Sends 3 UDP packets that an iptables-nft rule drops inside the pod's namespace, watched by
/// dropscope running with `caps`. Returns the report and how many packets the rule counted.
fn observe_pod_drop(pod: &Netns, caps: &[&str]) -> (Report, u64) {
    let rule = "-A OUTPUT -p udp -m udp --dport 5555 -j DROP";
    let before = iptables_rule_packets(pod, "iptables-nft", rule);
    let wrapper = as_in_the_container(caps);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let inode = pod.inode().to_string();
    let obs = Observer::start_wrapped(&wrapper, &["--netns", &inode]);
    Udp::to("127.0.0.1", 5555).count(3).send(pod);
    let report = obs.stop();
    report.assert_consistent();
    (
        report,
        iptables_rule_packets(pod, "iptables-nft", rule) - before,
    )
}

#[test]
fn manifest_runs_unprivileged_with_all_capabilities_dropped() {
    let docs = manifest();
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        pod["hostNetwork"], true,
        "the node's namespace must be dropscope's own"
    );
    assert_eq!(
        pod["hostPID"], true,
        "pods' namespaces are found through the node's /proc"
    );
    let sc = &pod["containers"][0]["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let mounts = pod["containers"][0]["volumeMounts"]
        .as_array()
        .expect("volume mounts");
    assert!(
        !mounts.is_empty() && mounts.iter().all(|m| m["readOnly"] == true),
        "every host mount is read-only: {mounts:?}"
    );
    assert_eq!(
        pod["containers"][0]["terminationMessagePolicy"], "FallbackToLogsOnError",
        "a crash's last words (stderr) must reach kubectl describe"
    );
}

/// The host directories dropscope reads for pod attribution are mounted where `--pods-root`
/// makes it look: `<pods-root>/var/log/pods` and `<pods-root>/var/log/containers`.
#[test]
fn manifest_mounts_what_pod_attribution_reads() {
    let docs = manifest();
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let pods_root = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .find_map(|a| a.as_str()?.strip_prefix("--pods-root="))
        .expect("--pods-root");
    for dir in ["/var/log/pods", "/var/log/containers"] {
        let path = format!("{}{dir}", pods_root.trim_end_matches('/'));
        let mount = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == path.as_str())
            .unwrap_or_else(|| panic!("nothing mounted at {path}"));
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("the mount's volume");
        assert_eq!(volume["hostPath"]["path"], dir, "{volume}");
    }
}

// --- The PodMonitor and the kustomization -------------------------------------------------

/// One YAML document of deploy/.
fn deploy_doc(name: &str) -> Value {
    let text = fs::read_to_string(deploy_file(name)).unwrap();
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("deploy/{name}: {e}"))
}

/// Keys a monitoring.coreos.com/v1 PodMonitor allows, per object (the operator's CRD, as far
/// as a PodMonitor for dropscope could use it).
const POD_MONITOR_SPEC: &[&str] = &[
    "selector",
    "namespaceSelector",
    "podMetricsEndpoints",
    "jobLabel",
    "podTargetLabels",
    "sampleLimit",
    "targetLimit",
    "labelLimit",
    "labelNameLengthLimit",
    "labelValueLengthLimit",
    "keepDroppedTargets",
    "attachMetadata",
    "scrapeProtocols",
    "scrapeClass",
    "bodySizeLimit",
];
const POD_METRICS_ENDPOINT: &[&str] = &[
    "port",
    "portNumber",
    "targetPort",
    "path",
    "scheme",
    "params",
    "interval",
    "scrapeTimeout",
    "honorLabels",
    "honorTimestamps",
    "trackTimestampsStaleness",
    "enableHttp2",
    "filterRunning",
    "followRedirects",
    "relabelings",
    "metricRelabelings",
    "tlsConfig",
    "authorization",
    "basicAuth",
    "bearerTokenSecret",
    "oauth2",
    "proxyUrl",
];
const RELABEL_CONFIG: &[&str] = &[
    "sourceLabels",
    "separator",
    "targetLabel",
    "regex",
    "modulus",
    "replacement",
    "action",
];
const RELABEL_ACTIONS: &[&str] = &[
    "replace",
    "keep",
    "drop",
    "hashmod",
    "labelmap",
    "labeldrop",
    "labelkeep",
    "lowercase",
    "uppercase",
    "keepequal",
    "dropequal",
];

fn only_keys(what: &str, object: &Value, allowed: &[&str]) -> Result<(), String> {
    let map = object
        .as_object()
        .ok_or_else(|| format!("{what} is not a mapping"))?;
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(format!("{what} has no field {k:?}")),
        None => Ok(()),
    }
}

/// The PodMonitor's shape, and that it scrapes the DaemonSet's pods on their metrics port.
fn check_pod_monitor(pm: &Value, ds: &Value) -> Result<(), String> {
    let err = |m: &str| Err(m.to_string());
    if pm["apiVersion"] != "monitoring.coreos.com/v1" || pm["kind"] != "PodMonitor" {
        return err("not a monitoring.coreos.com/v1 PodMonitor");
    }
    only_keys(
        "PodMonitor",
        pm,
        &["apiVersion", "kind", "metadata", "spec"],
    )?;
    if pm["metadata"]["namespace"] != ds["metadata"]["namespace"] {
        return err("not in the DaemonSet's namespace");
    }
    let spec = &pm["spec"];
    only_keys("spec", spec, POD_MONITOR_SPEC)?;
    let wanted = spec["selector"]["matchLabels"]
        .as_object()
        .ok_or("spec.selector.matchLabels missing")?;
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    if wanted.is_empty() || wanted.iter().any(|(k, v)| &labels[k] != v) {
        return Err(format!(
            "selector {wanted:?} does not select the DaemonSet's pods ({labels})"
        ));
    }
    let ports: Vec<&Value> = ds["spec"]["template"]["spec"]["containers"][0]["ports"]
        .as_array()
        .ok_or("the DaemonSet has no ports")?
        .iter()
        .map(|p| &p["name"])
        .collect();
    let endpoints = spec["podMetricsEndpoints"]
        .as_array()
        .filter(|e| !e.is_empty())
        .ok_or("no podMetricsEndpoints")?;
    for e in endpoints {
        only_keys("podMetricsEndpoint", e, POD_METRICS_ENDPOINT)?;
        if !ports.contains(&&e["port"]) {
            return Err(format!("port {} is no port of the DaemonSet", e["port"]));
        }
        if !e["path"].is_null() && e["path"] != "/metrics" {
            return Err(format!("path {} is not /metrics", e["path"]));
        }
        for r in e["relabelings"].as_array().into_iter().flatten() {
            only_keys("relabeling", r, RELABEL_CONFIG)?;
            let action = r["action"].as_str().unwrap_or("replace");
            if !RELABEL_ACTIONS.contains(&action.to_lowercase().as_str()) {
                return Err(format!("unknown relabel action {action:?}"));
            }
            if r["sourceLabels"]
                .as_array()
                .is_some_and(|l| l.iter().any(|l| !l.is_string()))
            {
                return Err("sourceLabels must be strings".into());
            }
        }
    }
    Ok(())
}

#[test]
fn pod_monitor_scrapes_the_daemonset_pods() {
    let docs = manifest();
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let pm = deploy_doc("podmonitor.yaml");
    check_pod_monitor(&pm, ds).unwrap();
    // The checks have teeth: broken copies are refused.
    let broken: [(&str, fn(&mut Value)); 5] = [
        ("another selector", |pm| {
            pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] = "other".into()
        }),
        ("an unknown port", |pm| {
            pm["spec"]["podMetricsEndpoints"][0]["port"] = "http".into()
        }),
        ("a misspelt field", |pm| {
            let e = pm["spec"]["podMetricsEndpoints"][0]
                .as_object_mut()
                .unwrap();
            let r = e.remove("relabelings").unwrap();
            e.insert("relabellings".into(), r);
        }),
        ("an unknown action", |pm| {
            pm["spec"]["podMetricsEndpoints"][0]["relabelings"][1]["action"] = "labeldel".into()
        }),
        ("another namespace", |pm| {
            pm["metadata"]["namespace"] = "monitoring".into()
        }),
    ];
    for (what, breaks) in broken {
        let mut copy = pm.clone();
        breaks(&mut copy);
        assert!(
            check_pod_monitor(&copy, ds).is_err(),
            "{what}: accepted {copy:#}"
        );
    }
}

#[test]
fn kustomization_names_the_manifests_and_the_image() {
    let k = deploy_doc("kustomization.yaml");
    assert_eq!(k["apiVersion"], "kustomize.config.k8s.io/v1beta1");
    assert_eq!(k["kind"], "Kustomization");
    let resources = k["resources"].as_array().expect("resources");
    assert!(
        resources.contains(&"daemonset.yaml".into()),
        "{resources:?}"
    );
    for r in resources {
        assert!(
            deploy_file(r.as_str().unwrap()).is_file(),
            "resource {r} does not exist"
        );
    }
    let docs = manifest();
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let image = ds["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap();
    let (name, tag) = image.rsplit_once(':').expect("a tagged image");
    let images = k["images"].as_array().expect("images");
    let entry = images
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("no images: entry for the DaemonSet's image {name}"));
    assert!(entry["newName"].is_string(), "{entry}");
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(entry["newTag"], version, "the image tag is the release's");
    assert_eq!(tag, version, "the DaemonSet's image tag is the release's");
}

#[test]
fn manifest_capabilities_are_enough_and_each_is_needed() {
    let docs = manifest();
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let caps: Vec<&str> = ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]
        ["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| c.as_str().expect("capability name"))
        .collect();

    let pod = Netns::new("pod");
    pod.sh("iptables-nft -A OUTPUT -p udp --dport 5555 -j DROP");
    let pause = PauseProcess::start(&pod);
    let nsenter = format!("nsenter -t {} -n ", pause.pid());

    // With exactly the manifest's set: the drop is located, its hook and rule are named, and
    // the fix is given for the namespace found through the pause process.
    let (report, counted) = observe_pod_drop(&pod, &caps);
    assert_eq!(counted, 3, "the rule's counter");
    assert_eq!(
        report.count("netfilter_drop"),
        counted,
        "{:#?}",
        report.records
    );
    for r in report.of("netfilter_drop") {
        assert_eq!(r["location"], "nft_do_chain", "{r:#}");
        assert_eq!(r["engine"], "iptables-nft", "{r:#}");
        assert_eq!(r["hook"], "output", "{r:#}");
        assert_eq!(r["netns"].as_u64(), Some(pod.inode()), "{r:#}");
        assert!(
            r["rule"]
                .as_str()
                .is_some_and(|s| s.contains("-A OUTPUT -p udp -m udp --dport 5555 -j DROP")),
            "{r:#}"
        );
        assert!(
            r["fix"]
                .as_str()
                .unwrap()
                .contains(&format!("{nsenter}iptables-nft -t filter -D OUTPUT")),
            "{r:#}"
        );
    }

    // Without any one of them, something the operator relies on is lost (the drops are still
    // counted exactly: that needs only BPF and PERFMON).
    let without = |cap: &str| -> Vec<Value> {
        assert!(
            caps.contains(&cap),
            "{cap} is no longer in the manifest: update this test"
        );
        let fewer: Vec<&str> = caps.iter().copied().filter(|c| *c != cap).collect();
        let (report, counted) = observe_pod_drop(&pod, &fewer);
        assert_eq!(
            report.count("netfilter_drop"),
            counted,
            "without {cap}: {:#?}",
            report.records
        );
        report.of("netfilter_drop").into_iter().cloned().collect()
    };
    for r in without("SYSLOG") {
        // No kernel symbols: the location stays an address and the hook is unknown.
        assert!(
            r["location"].as_str().unwrap().starts_with("0x"),
            "without SYSLOG: {r:#}"
        );
        assert!(r["hook"].is_null(), "without SYSLOG: {r:#}");
    }
    for cap in ["SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE"] {
        for r in without(cap) {
            // SYS_ADMIN: the namespace cannot be entered; NET_ADMIN: the rule counters cannot be
            // read; SYS_PTRACE: the pause process's namespace cannot even be found.
            let named = r["rule"]
                .as_str()
                .is_some_and(|s| s.contains("--dport 5555 -j DROP"));
            assert!(!named, "without {cap} the rule was still named: {r:#}");
            assert_eq!(r["location"], "nft_do_chain", "without {cap}: {r:#}");
        }
    }
    let missing_ns: Vec<Value> = without("SYS_PTRACE");
    assert!(
        missing_ns
            .iter()
            .all(|r| !r["fix"].as_str().unwrap().contains(&nsenter)),
        "{missing_ns:#?}"
    );
    drop(pause);
}

// --- The Grafana dashboard against the exporter's metrics ---------------------------------

/// What `dropscope serve` exports on /metrics: each metric with its labels.
const METRICS: &[(&str, &[&str])] = &[
    (
        "dropscope_drops_total",
        &["cause", "reason", "iface", "pod_namespace", "pod"],
    ),
    (
        "dropscope_drop_bytes_total",
        &["cause", "iface", "pod_namespace", "pod"],
    ),
    ("dropscope_drops_unsent_total", &["kind"]),
    ("dropscope_events_lost_total", &[]),
    ("dropscope_drops_suppressed_total", &[]),
    ("dropscope_probe_info", &["probe", "mode"]),
    ("dropscope_build_info", &["version", "kernel"]),
    ("dropscope_label_sets_folded_total", &[]),
];

/// Labels the scrape job adds to every series (docs/deployment.md, "Scraping").
const TARGET_LABELS: &[&str] = &["node", "instance", "job"];

/// The `dropscope_*` metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("dropscope_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(&tail[..end]);
        rest = &tail[end..];
    }
    names
}

/// Label names an expression refers to: in `by (...)` / `without (...)` clauses and in
/// `{...}` matchers. Quoted values are skipped.
fn label_names(expr: &str) -> Vec<String> {
    let mut labels = Vec::new();
    for keyword in ["by (", "without ("] {
        for (at, _) in expr.match_indices(keyword) {
            let inner = &expr[at + keyword.len()..];
            let inner = &inner[..inner.find(')').expect("closing parenthesis")];
            labels.extend(inner.split(',').map(|l| l.trim().to_string()));
        }
    }
    let mut rest = expr;
    while let Some(open) = rest.find('{') {
        let body = &rest[open + 1..];
        let close = body.find('}').expect("closing brace");
        let (mut in_quotes, mut start) = (false, 0);
        let matchers = &body[..close];
        for (i, c) in matchers
            .char_indices()
            .chain(std::iter::once((matchers.len(), ',')))
        {
            match c {
                '"' => in_quotes = !in_quotes,
                ',' if !in_quotes => {
                    let m = matchers[start..i].trim();
                    let name_end = m.find(['=', '!']).expect("label matcher");
                    labels.push(m[..name_end].trim().to_string());
                    start = i + 1;
                }
                _ => {}
            }
        }
        rest = &body[close + 1..];
    }
    labels
}

/// Checks one expression: known metrics only, and only labels those metrics (or the scrape)
/// have.
fn check_expr(expr: &str, used: &mut Vec<String>) {
    let metrics = metric_names(expr);
    assert!(
        !metrics.is_empty(),
        "query without a dropscope metric: {expr}"
    );
    let mut allowed: Vec<&str> = TARGET_LABELS.to_vec();
    for name in &metrics {
        let (_, labels) = METRICS.iter().find(|(m, _)| m == name).unwrap_or_else(|| {
            panic!("the dashboard queries {name}, which dropscope does not export: {expr}")
        });
        allowed.extend(labels.iter());
        used.push(name.to_string());
    }
    for label in label_names(expr) {
        assert!(
            allowed.contains(&label.as_str()),
            "label {label} does not exist on {metrics:?}: {expr}"
        );
    }
}

#[test]
fn dashboard_queries_only_exported_metrics_and_labels() {
    let text = fs::read_to_string(deploy_file("grafana-dashboard.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    for field in [
        "title",
        "uid",
        "schemaVersion",
        "panels",
        "templating",
        "time",
    ] {
        assert!(!dash[field].is_null(), "dashboard field {field} missing");
    }
    let variables = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    assert!(
        variables.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "no $datasource variable of type datasource"
    );
    let datasource = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});

    let mut used = Vec::new();
    for v in variables.iter().filter(|v| v["type"] == "query") {
        assert_eq!(v["datasource"], datasource, "variable {}", v["name"]);
        // label_values(metric, label)
        let q = v["definition"].as_str().expect("variable definition");
        let args = q
            .strip_prefix("label_values(")
            .and_then(|a| a.strip_suffix(')'))
            .expect("label_values query");
        let (metric, label) = args.split_once(',').expect("metric and label");
        check_expr(&format!("{metric}{{{}=\"\"}}", label.trim()), &mut used);
    }

    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = Vec::new();
    for p in panels {
        ids.push(p["id"].as_u64().expect("panel id"));
        let g = &p["gridPos"];
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
            "panel {} wider than the grid",
            p["title"]
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"], datasource, "panel {}", p["title"]);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"], datasource, "panel {}", p["title"]);
            check_expr(t["expr"].as_str().expect("expr"), &mut used);
        }
    }
    ids.sort_unstable();
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n, "panel ids are not unique");
    for (metric, _) in METRICS {
        assert!(
            used.iter().any(|u| u == metric),
            "{metric} is exported but no panel shows it"
        );
    }
}

#[test]
fn expression_parsing_finds_metrics_and_labels() {
    let expr = r#"topk(10, sum by (pod_namespace, pod) (rate(dropscope_drops_total{node=~"$node", pod!="a,b"}[5m])))"#;
    assert_eq!(metric_names(expr), vec!["dropscope_drops_total"]);
    assert_eq!(
        label_names(expr),
        vec!["pod_namespace", "pod", "node", "pod"]
    );
    let mut used = Vec::new();
    check_expr(expr, &mut used);
    let bad = std::panic::catch_unwind(|| {
        check_expr(
            "sum by (kernel) (rate(dropscope_drops_total[1m]))",
            &mut Vec::new(),
        )
    });
    assert!(
        bad.is_err(),
        "a label the metric does not have must be refused"
    );
    let bad =
        std::panic::catch_unwind(|| check_expr("rate(dropscope_drops_totl[1m])", &mut Vec::new()));
    assert!(bad.is_err(), "an unknown metric must be refused");
}
