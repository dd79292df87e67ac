//! Kubelet's cgroup tree: which pod and container a process belongs to, from its
//! `/proc/PID/cgroup` lines.
//!
//! Both cgroup drivers are recognised, wherever the kubepods tree sits (kind and nested nodes
//! put it under another slice):
//! - systemd: `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid, _ for ->.slice/cri-containerd-<id>.scope`
//!   (also `crio-<id>.scope`, `docker-<id>.scope`; guaranteed pods sit directly in `kubepods.slice`);
//! - cgroupfs: `kubepods/burstable/pod<uid>/<id>` (besteffort alike, guaranteed directly in `kubepods`).

/// Where a process sits in kubelet's cgroup tree.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodCgroup {
    /// The pod's UID with dashes, as the API and `/var/log/pods` spell it.
    pub uid: String,
    /// The container's id (lowercase hex), when the process is in a container's cgroup.
    pub container_id: Option<String>,
}

/// Container runtimes' scope prefixes under the systemd driver.
const SCOPE_PREFIXES: &[&str] = &["cri-containerd-", "crio-", "docker-", "cri-o-"];

/// The pod of a process from the whole text of `/proc/PID/cgroup`: the first line (cgroup v2
/// `0::/path` or a v1 hierarchy `N:controllers:/path`) whose path is in the kubepods tree.
pub fn parse(text: &str) -> Option<PodCgroup> {
    text.lines().find_map(parse_line)
}

/// One `/proc/PID/cgroup` line.
pub fn parse_line(line: &str) -> Option<PodCgroup> {
    parse_path(line.splitn(3, ':').nth(2)?)
}

/// A cgroup path: the pod segment must come at or after a segment naming kubepods, and the
/// segment after it, if any, is the container.
pub fn parse_path(path: &str) -> Option<PodCgroup> {
    let segments: Vec<&str> = path.trim().split('/').filter(|s| !s.is_empty()).collect();
    let kube = segments.iter().position(|s| s.contains("kubepods"))?;
    segments.iter().enumerate().skip(kube).find_map(|(i, seg)| {
        let uid = pod_uid(seg)?;
        let container_id = segments.get(i + 1).and_then(|c| container_id(c));
        Some(PodCgroup { uid, container_id })
    })
}

/// `kubepods-burstable-pod<uid>.slice` (systemd, dashes written as `_`) or `pod<uid>` (cgroupfs).
fn pod_uid(seg: &str) -> Option<String> {
    let raw = match seg.strip_suffix(".slice") {
        Some(stem) => &stem[stem.rfind("-pod")? + 4..],
        None => seg.strip_prefix("pod")?,
    };
    let valid = raw.len() >= 8
        && raw
            .chars()
            .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_');
    valid.then(|| raw.replace('_', "-").to_ascii_lowercase())
}

/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope` or a bare id.
fn container_id(seg: &str) -> Option<String> {
    let stem = seg.strip_suffix(".scope").unwrap_or(seg);
    let id = SCOPE_PREFIXES
        .iter()
        .find_map(|p| stem.strip_prefix(p))
        .unwrap_or(stem);
    // Runtimes' helper scopes (crio-conmon-<id>.scope) are not containers.
    let valid = id.len() >= 12 && id.chars().all(|c| c.is_ascii_hexdigit());
    valid.then(|| id.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "5d1e0b9c-3a2f-4c6e-9b1a-7f0e2d4c8a61";
    const ID: &str = "3f4e8a0c1b2d4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";

    fn pod(container: Option<&str>) -> Option<PodCgroup> {
        Some(PodCgroup {
            uid: UID.into(),
            container_id: container.map(Into::into),
        })
    }

    #[test]
    fn systemd_driver_with_every_runtime_and_qos() {
        let u = UID.replace('-', "_");
        for (runtime, qos) in [
            ("cri-containerd", "burstable"),
            ("crio", "besteffort"),
            ("docker", "burstable"),
        ] {
            let line = format!("0::/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{u}.slice/{runtime}-{ID}.scope");
            assert_eq!(parse_line(&line), pod(Some(ID)), "{line}");
        }
        // Guaranteed: no QoS slice.
        let line = format!("0::/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{ID}.scope");
        assert_eq!(parse_line(&line), pod(Some(ID)));
        // Read from inside a container (dropscope as a DaemonSet): the path is relative to the
        // container's own cgroup namespace.
        let line = format!("0::/../../kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{ID}.scope");
        assert_eq!(parse_line(&line), pod(Some(ID)), "{line}");
        // crun's sub-cgroup inside the scope; kind's nesting under kubelet.slice.
        let line = format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/crio-{ID}.scope/container");
        assert_eq!(parse_line(&line), pod(Some(ID)));
        let line = format!(
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{u}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(parse_line(&line), pod(Some(ID)));
    }

    #[test]
    fn cgroupfs_driver() {
        for qos in ["burstable/", "besteffort/", ""] {
            let line = format!("0::/kubepods/{qos}pod{UID}/{ID}");
            assert_eq!(parse_line(&line), pod(Some(ID)), "{line}");
        }
        // The pod's own cgroup, no container.
        assert_eq!(
            parse_line(&format!("0::/kubepods/burstable/pod{UID}")),
            pod(None)
        );
    }

    #[test]
    fn v1_and_v2_lines_in_one_file() {
        let text = format!(
            "12:pids:/kubepods/besteffort/pod{UID}/{ID}\n\
             4:memory:/kubepods/besteffort/pod{UID}/{ID}\n\
             1:name=systemd:/kubepods/besteffort/pod{UID}/{ID}\n0::/\n"
        );
        assert_eq!(parse(&text), pod(Some(ID)));
        let hybrid = format!(
            "4:memory:/user.slice\n0::/kubepods.slice/kubepods-pod{}.slice/docker-{ID}.scope\n",
            UID.replace('-', "_")
        );
        assert_eq!(parse(&hybrid), pod(Some(ID)));
    }

    #[test]
    fn other_processes_are_not_pods() {
        for line in [
            "0::/",
            "0::/system.slice/containerd.service",
            "0::/user.slice/user-0.slice/session-1.scope",
            "0::/kubepods.slice/kubepods-burstable.slice",
            "4:memory:/process_api/7538814daefcde75c30ec8b6563dc44e",
            // A pod-looking segment outside the kubepods tree.
            "0::/system.slice/pod5d1e0b9c3a2f4c6e.slice",
            "garbage",
        ] {
            assert_eq!(parse_line(line), None, "{line}");
        }
        // conmon runs in the pod's slice but is no container.
        let line = format!(
            "0::/kubepods.slice/kubepods-pod{}.slice/crio-conmon-{ID}.scope",
            UID.replace('-', "_")
        );
        assert_eq!(parse_line(&line), pod(None));
    }

    mod props {
        use super::*;
        use crate::fuzz;
        use proptest::prelude::*;

        fn uid() -> impl Strategy<Value = String> {
            "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
        }

        proptest! {
            #![proptest_config(fuzz::config())]

            #[test]
            fn prop_any_text_never_panics(text in fuzz::text(), words in prop::collection::vec(
                prop_oneof![
                    Just("kubepods".to_string()), Just("-pod".to_string()), Just("pod".to_string()),
                    Just(".slice".to_string()), Just(".scope".to_string()), Just("/".to_string()),
                    Just("0::".to_string()), Just("cri-containerd-".to_string()), fuzz::junk(),
                ],
                0..16,
            )) {
                parse(&text);
                parse(&words.concat());
                parse_path(&words.concat());
            }

            #[test]
            fn prop_both_drivers_name_pod_and_container(
                uid in uid(),
                id in "[0-9a-f]{12,64}",
                qos in prop::sample::select(&["burstable", "besteffort", ""][..]),
                runtime in prop::sample::select(SCOPE_PREFIXES),
                prefix in prop::sample::select(&["", "/kubelet.slice/kubelet-", "/../.."][..]),
                controller in prop::sample::select(&["0::", "4:memory:", "1:name=systemd:"][..]),
            ) {
                let want = Some(PodCgroup { uid: uid.clone(), container_id: Some(id.clone()) });
                let u = uid.replace('-', "_");
                let systemd = if qos.is_empty() {
                    format!("{controller}{prefix}/kubepods.slice/kubepods-pod{u}.slice/{runtime}{id}.scope")
                } else {
                    format!("{controller}{prefix}/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{u}.slice/{runtime}{id}.scope")
                };
                prop_assert_eq!(parse(&format!("5:cpu:/\n{systemd}\n")), want.clone(), "{}", systemd);
                let qos = if qos.is_empty() { String::new() } else { format!("{qos}/") };
                let cgroupfs = format!("{controller}/kubepods/{qos}pod{uid}/{id}");
                prop_assert_eq!(parse_line(&cgroupfs), want, "{}", cgroupfs);
                // The pod's own cgroup: no container.
                let pod_only = format!("0::/kubepods/{qos}pod{uid}");
                prop_assert_eq!(parse_line(&pod_only).and_then(|p| p.container_id), None);
            }
        }
    }
}
