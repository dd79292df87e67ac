//! Pod and container names from kubelet's log directories, without the API server:
//! `var/log/pods/<namespace>_<name>_<uid>/<container>/<restart>.log`, and the links kubelet
//! keeps beside them, `var/log/containers/<name>_<namespace>_<container>-<container id>.log`.
//! Namespaces, pod names and container names cannot contain `_`, so the names split cleanly.
use std::{collections::HashMap, fs, path::Path};

/// One pod's log directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodDir {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Container names (the subdirectories), sorted.
    pub containers: Vec<String>,
}

/// What kubelet's log directories under one root say.
#[derive(Debug, Clone, Default)]
pub struct PodLogs {
    /// Pods by UID.
    pub pods: HashMap<String, PodDir>,
    /// Container names by container id (from `var/log/containers`).
    pub container_names: HashMap<String, String>,
}

impl PodLogs {
    /// Reads `<root>/var/log/pods` and `<root>/var/log/containers`; missing directories give
    /// an empty answer (not a Kubernetes node, or not yet).
    pub fn read(root: &Path) -> PodLogs {
        let mut logs = PodLogs::default();
        for (dir_name, path) in entries(&root.join("var/log/pods")) {
            let Some((namespace, name, uid)) = parse_pod_dir(&dir_name) else {
                continue;
            };
            let mut containers: Vec<String> = entries(&path)
                .into_iter()
                .filter(|(_, p)| p.is_dir())
                .map(|(n, _)| n)
                .collect();
            containers.sort();
            logs.pods.insert(
                uid.to_string(),
                PodDir {
                    namespace: namespace.into(),
                    name: name.into(),
                    uid: uid.into(),
                    containers,
                },
            );
        }
        for (file, _) in entries(&root.join("var/log/containers")) {
            if let Some(link) = parse_container_link(&file) {
                logs.container_names
                    .insert(link.id.to_string(), link.container.to_string());
            }
        }
        logs
    }
}

fn entries(dir: &Path) -> Vec<(String, std::path::PathBuf)> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect()
}

/// `<namespace>_<name>_<uid>` -> (namespace, name, uid).
pub fn parse_pod_dir(dir: &str) -> Option<(&str, &str, &str)> {
    let mut parts = dir.splitn(3, '_');
    let (namespace, name, uid) = (parts.next()?, parts.next()?, parts.next()?);
    let ok = !namespace.is_empty() && !name.is_empty() && uid.len() >= 8 && !uid.contains('_');
    ok.then_some((namespace, name, uid))
}

/// A `var/log/containers` file name, taken apart.
#[derive(Debug, PartialEq, Eq)]
pub struct ContainerLink<'a> {
    pub pod: &'a str,
    pub namespace: &'a str,
    pub container: &'a str,
    pub id: &'a str,
}

/// `<pod>_<namespace>_<container>-<id>.log`.
pub fn parse_container_link(file: &str) -> Option<ContainerLink<'_>> {
    let stem = file.strip_suffix(".log")?;
    let (rest, id) = stem.rsplit_once('-')?;
    let mut parts = rest.splitn(3, '_');
    let (pod, namespace, container) = (parts.next()?, parts.next()?, parts.next()?);
    let ok = id.len() >= 12
        && id.chars().all(|c| c.is_ascii_hexdigit())
        && ![pod, namespace, container].contains(&"");
    ok.then_some(ContainerLink {
        pod,
        namespace,
        container,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_directory_names() {
        assert_eq!(
            parse_pod_dir(
                "kube-system_coredns-5d78c9869d-7xk2p_0b8c3f6e-1d2a-4e5f-8a9b-0c1d2e3f4a5b"
            ),
            Some((
                "kube-system",
                "coredns-5d78c9869d-7xk2p",
                "0b8c3f6e-1d2a-4e5f-8a9b-0c1d2e3f4a5b"
            ))
        );
        // Static pods have a config hash for a UID; names may contain dots.
        assert_eq!(
            parse_pod_dir("kube-system_etcd-node1.example_a1b2c3d4e5f60718293a4b5c6d7e8f90"),
            Some((
                "kube-system",
                "etcd-node1.example",
                "a1b2c3d4e5f60718293a4b5c6d7e8f90"
            ))
        );
        for bad in [
            "",
            "default",
            "default_web",
            "_web_0b8c3f6e-1d2a",
            "default__0b8c3f6e",
            "default_web_short",
            "a_b_c_d",
        ] {
            assert_eq!(parse_pod_dir(bad), None, "{bad}");
        }
    }

    #[test]
    fn container_link_names() {
        let id = "3f4e8a0c1b2d4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";
        let file = format!("coredns-5d78c9869d-7xk2p_kube-system_coredns-{id}.log");
        assert_eq!(
            parse_container_link(&file),
            Some(ContainerLink {
                pod: "coredns-5d78c9869d-7xk2p",
                namespace: "kube-system",
                container: "coredns",
                id
            })
        );
        let file = format!("web_shop_istio-proxy-{id}.log");
        assert_eq!(
            parse_container_link(&file).map(|l| l.container),
            Some("istio-proxy")
        );
        for bad in [
            "web_shop_api.log",
            "web_shop_api-xyz.log",
            &format!("web_shop-{id}.log"),
            &format!("web_shop_api-{id}"),
        ] {
            assert_eq!(parse_container_link(bad), None, "{bad}");
        }
    }

    #[test]
    fn reads_a_kubelet_layout() {
        let root = tempfile::tempdir().unwrap();
        let id = "ab".repeat(32);
        let pods = root.path().join("var/log/pods");
        for dir in [
            "shop_cart_11111111-2222-3333-4444-555555555555/api",
            "shop_cart_11111111-2222-3333-4444-555555555555/init",
            "not-a-pod-dir/x",
        ] {
            fs::create_dir_all(pods.join(dir)).unwrap();
        }
        fs::write(
            pods.join("shop_cart_11111111-2222-3333-4444-555555555555/api/0.log"),
            "",
        )
        .unwrap();
        let links = root.path().join("var/log/containers");
        fs::create_dir_all(&links).unwrap();
        std::os::unix::fs::symlink(
            pods.join("shop_cart_11111111-2222-3333-4444-555555555555/api/0.log"),
            links.join(format!("cart_shop_api-{id}.log")),
        )
        .unwrap();
        let logs = PodLogs::read(root.path());
        assert_eq!(logs.pods.len(), 1);
        let pod = &logs.pods["11111111-2222-3333-4444-555555555555"];
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str()),
            ("shop", "cart")
        );
        assert_eq!(pod.containers, ["api", "init"]);
        assert_eq!(
            logs.container_names.get(&id).map(String::as_str),
            Some("api")
        );
        assert!(PodLogs::read(&root.path().join("nowhere")).pods.is_empty());
    }

    mod props {
        use super::*;
        use crate::fuzz;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(fuzz::config())]

            #[test]
            fn prop_any_name_never_panics(text in fuzz::text(), words in prop::collection::vec(
                prop_oneof![Just("_".to_string()), Just("-".to_string()), Just(".log".to_string()), fuzz::junk()],
                0..12,
            )) {
                for name in [&text, &words.concat()] {
                    parse_pod_dir(name);
                    parse_container_link(name);
                }
            }

            #[test]
            fn prop_names_read_back(
                namespace in "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?",
                name in "[a-z0-9]([a-z0-9.-]{0,30}[a-z0-9])?",
                container in "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?",
                uid in "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}",
                id in "[0-9a-f]{12,64}",
            ) {
                let dir = format!("{namespace}_{name}_{uid}");
                prop_assert_eq!(parse_pod_dir(&dir), Some((namespace.as_str(), name.as_str(), uid.as_str())));
                let file = format!("{name}_{namespace}_{container}-{id}.log");
                prop_assert_eq!(
                    parse_container_link(&file),
                    Some(ContainerLink { pod: &name, namespace: &namespace, container: &container, id: &id })
                );
                // Cut anywhere: a shorter name or nothing, never other parts.
                for cut in 0..file.len() {
                    if let Some(l) = parse_container_link(&file[..cut]) {
                        prop_assert!(false, "{} gave {:?}", &file[..cut], l);
                    }
                }
            }
        }
    }
}
