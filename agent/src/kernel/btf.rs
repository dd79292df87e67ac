//! What the running kernel looks like, read from its BTF: struct member offsets for the eBPF
//! programs and the names behind drop-reason numbers. All kernel-version knowledge stops here.
use std::{collections::HashMap, path::Path};

use agent_ebpf::{Offsets, ABSENT};
use anyhow::{anyhow, bail, Result};
use btf_rs::{Btf, Type};
use fallible_iterator::FallibleIterator;

/// The kernel's BTF, with the lookups dropscope needs.
pub struct KernelBtf {
    btf: Btf,
    /// BTF of the loaded modules that define what the context probes read (nf_tables,
    /// x_tables, ...), split on top of `btf`.
    modules: Vec<(String, Btf)>,
}

/// Modules whose types or functions the context probes use, when they are modules.
const PROBE_MODULES: [&str; 4] = ["nf_tables", "x_tables", "ip_tables", "ip6_tables"];

/// Where a kernel function is defined, from BTF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FunctionHome {
    Vmlinux,
    Module(String),
    Missing,
}

impl KernelBtf {
    /// Opens a BTF file (normally `/sys/kernel/btf/vmlinux`).
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!(
                "no kernel BTF at {} (dropscope needs a kernel built with CONFIG_DEBUG_INFO_BTF=y)",
                path.display()
            );
        }
        // mmap keeps memory low; kernels before 6.x refuse mmap of /sys/kernel/btf (ENODEV).
        let btf = Btf::from_file_with_backend(path, btf_rs::Backend::Mmap)
            .or_else(|_| Btf::from_file(path))
            .map_err(|e| anyhow!("cannot parse kernel BTF at {}: {e}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("/sys/kernel/btf"));
        let modules = PROBE_MODULES
            .iter()
            .filter_map(|m| Some((m.to_string(), Btf::from_split_file(dir.join(m), &btf).ok()?)))
            .collect();
        Ok(KernelBtf { btf, modules })
    }

    /// Byte offset of `path` ("a.b.c", members of nested structs, anonymous ones looked
    /// through) inside `struct name`, or `None` if this kernel has no such member. Structs
    /// of the probe modules are looked up in their BTF when vmlinux does not define them.
    pub fn offset_of(&self, name: &str, path: &str) -> Option<u32> {
        std::iter::once(&self.btf)
            .chain(self.modules.iter().map(|(_, b)| b))
            .find_map(|btf| {
                let mut ty = named_composite(btf, name)?;
                let mut total = 0;
                for part in path.split('.') {
                    let (bits, member_ty) = find_member(btf, &ty, part)?;
                    total += bits / 8;
                    ty = member_ty;
                }
                Some(total)
            })
    }

    /// Where `function` is defined: vmlinux, a loaded probe module, or nowhere BTF knows.
    pub fn function_home(&self, function: &str) -> FunctionHome {
        if func_proto(&self.btf, function).is_some() {
            return FunctionHome::Vmlinux;
        }
        match self
            .modules
            .iter()
            .find(|(_, b)| func_proto(b, function).is_some())
        {
            Some((m, _)) => FunctionHome::Module(m.clone()),
            None => FunctionHome::Missing,
        }
    }

    /// Parameter names of `function`, from vmlinux or a probe module.
    pub fn params(&self, function: &str) -> Option<Vec<String>> {
        std::iter::once(&self.btf)
            .chain(self.modules.iter().map(|(_, b)| b))
            .find_map(|btf| {
                let proto = func_proto(btf, function)?;
                proto
                    .parameters
                    .iter()
                    .map(|p| btf.resolve_name(p).ok())
                    .collect()
            })
    }

    /// Like [`Self::offset_of`], but [`ABSENT`] when missing (the form the eBPF side takes).
    fn offset_or_absent(&self, name: &str, path: &str) -> u32 {
        self.offset_of(name, path).unwrap_or(ABSENT)
    }

    /// Values of a named enum: `name -> value`.
    pub fn enum_values(&self, name: &str) -> Result<Vec<(String, u32)>> {
        let types = self.btf.resolve_types_by_name(name).unwrap_or_default();
        for ty in types {
            if let Type::Enum(e) = ty {
                return e
                    .members
                    .iter()
                    .map(|m| Ok((self.btf.resolve_name(m)?, m.val())))
                    .collect::<Result<_, btf_rs::Error>>()
                    .map_err(|e| anyhow!("reading enum {name}: {e}"));
            }
        }
        bail!("this kernel's BTF has no enum {name}")
    }

    /// Values of constants declared in anonymous enums (e.g. `IPV4_DEVCONF_FORWARDING`),
    /// found in one pass over the enums (anonymous types cannot be looked up by name).
    pub fn anonymous_enum_values(&self, constants: &[&str]) -> HashMap<String, u32> {
        let mut found = HashMap::new();
        for members in enums(&self.btf) {
            for (name, value) in members {
                if constants.contains(&name.as_str()) {
                    found.insert(name, value);
                }
            }
            if found.len() == constants.len() {
                break;
            }
        }
        found
    }

    /// Number of arguments of the raw tracepoint `btf_trace_<name>` minus its leading context.
    pub fn tracepoint_args(&self, name: &str) -> Option<usize> {
        let ty = self
            .btf
            .resolve_types_by_name(&format!("btf_trace_{name}"))
            .ok()?
            .pop()?;
        let mut t = ty;
        for _ in 0..4 {
            match t {
                Type::FuncProto(p) => return Some(p.parameters.len().saturating_sub(1)),
                other => t = self.btf.resolve_chained_type(other.as_btf_type()?).ok()?,
            }
        }
        None
    }

    fn window(fields: &[(u32, u32)], width: u32) -> u32 {
        if fields.iter().any(|(o, _)| *o == ABSENT) {
            return ABSENT;
        }
        let start = fields.iter().map(|(o, _)| *o).min().unwrap_or(0);
        let end = fields.iter().map(|(o, s)| o + s).max().unwrap_or(0);
        if end - start <= width {
            start
        } else {
            ABSENT
        }
    }

    /// All offsets the eBPF programs use. Missing members stay [`ABSENT`]: the programs then
    /// report "unknown" for that fact instead of reading a wrong place.
    pub fn offsets(&self) -> Offsets {
        let mut o = Offsets::UNKNOWN;
        o.fill_from_btf(|s, p| self.offset_or_absent(s, p));
        let consts =
            self.anonymous_enum_values(&["IPV4_DEVCONF_FORWARDING", "IPV4_DEVCONF_RP_FILTER"]);
        // The kernel indexes data[] with IPV4_DEVCONF_X - 1.
        let devconf = |c: &str| consts.get(c).map(|v| v - 1).unwrap_or(ABSENT);
        o.devconf_idx_forwarding = devconf("IPV4_DEVCONF_FORWARDING");
        o.devconf_idx_rp_filter = devconf("IPV4_DEVCONF_RP_FILTER");
        let possible_net = self.offset_of("possible_net_t", "net").unwrap_or(0);
        let in_possible_net = |s, p| self.offset_of(s, p).map_or(ABSENT, |o| o + possible_net);
        o.dev_nd_net = in_possible_net("net_device", "nd_net");
        o.sk_net = in_possible_net("sock_common", "skc_net");
        // Tracepoint layouts come from tracefs (kernel::tracefs), not BTF.
        o.with_windows()
    }

    /// Netfilter hook numbers and protocol families of this kernel, named.
    pub fn netfilter_names(&self) -> NetfilterNames {
        let mut names = NetfilterNames::default();
        for (name, value) in self.enum_values("nf_inet_hooks").unwrap_or_default() {
            let hook = match name.as_str() {
                "NF_INET_PRE_ROUTING" => "prerouting",
                "NF_INET_LOCAL_IN" => "input",
                "NF_INET_FORWARD" => "forward",
                "NF_INET_LOCAL_OUT" => "output",
                "NF_INET_POST_ROUTING" => "postrouting",
                "NF_INET_INGRESS" => "ingress",
                _ => continue,
            };
            names.hooks.insert(value, hook);
        }
        let families = [
            ("NFPROTO_INET", "inet"),
            ("NFPROTO_IPV4", "ipv4"),
            ("NFPROTO_ARP", "arp"),
            ("NFPROTO_NETDEV", "netdev"),
            ("NFPROTO_BRIDGE", "bridge"),
            ("NFPROTO_IPV6", "ipv6"),
        ];
        let values = self.anonymous_enum_values(&families.map(|(c, _)| c));
        for (constant, family) in families {
            if let Some(&v) = values.get(constant) {
                names.families.insert(v, family);
            }
        }
        names
    }

    /// The drop-reason names of this kernel (`enum skb_drop_reason` and its subsystems).
    /// Subsystem reasons (mac80211, openvswitch, qdisc on 7.x) are named from the BTF of the
    /// module that registers them, when it is loaded. Kernels before 5.17 have no such enum
    /// (their `kfree_skb` passes no reason): the table is then [`DropReasons::absent`].
    pub fn drop_reasons(&self, btf_dir: &Path) -> Result<DropReasons> {
        let has_enum = self
            .btf
            .resolve_types_by_name("skb_drop_reason")
            .unwrap_or_default()
            .iter()
            .any(|t| matches!(t, Type::Enum(_)));
        if !has_enum {
            return Ok(DropReasons::absent());
        }
        // Present but unreadable is a broken BTF file, not an old kernel: that one stops.
        let values = self.enum_values("skb_drop_reason")?;
        let subsystems = self
            .enum_values("skb_drop_reason_subsys")
            .unwrap_or_default();
        let mut reasons = DropReasons::new(values, subsystems);
        let ids: Vec<u32> = reasons.subsystems.keys().copied().collect();
        if !ids.is_empty() {
            // Built-in subsystems (qdisc on 7.x) live in vmlinux (one enum pass: ~15 ms).
            reasons.add_subsystem_names(enums(&self.btf), &ids);
            // Module subsystems: BTF of the module named after the subsystem, when loaded
            // (MAC80211_UNUSABLE -> mac80211, OPENVSWITCH -> openvswitch).
            let modules: Vec<String> = reasons
                .subsystems
                .values()
                .filter_map(|n| n.split('_').next().map(str::to_ascii_lowercase))
                .collect();
            for module in modules {
                if let Ok(btf) = Btf::from_split_file(btf_dir.join(&module), &self.btf) {
                    reasons.add_subsystem_names(enums(&btf), &ids);
                }
            }
        }
        Ok(reasons)
    }
}

fn named_composite(btf: &Btf, name: &str) -> Option<Type> {
    btf.resolve_types_by_name(name)
        .ok()?
        .into_iter()
        .find(|t| match t {
            Type::Struct(s) | Type::Union(s) => !s.members.is_empty(),
            _ => false,
        })
}

/// Finds `name` among the members of a struct/union, descending into anonymous members.
/// Returns the member's bit offset and its type with typedefs/qualifiers stripped.
fn find_member(btf: &Btf, ty: &Type, name: &str) -> Option<(u32, Type)> {
    let (Type::Struct(s) | Type::Union(s)) = ty else {
        return None;
    };
    for m in &s.members {
        let member_name = btf.resolve_name(m).unwrap_or_default();
        let member_ty = strip(btf, btf.resolve_chained_type(m).ok()?);
        if member_name == name {
            return Some((m.bit_offset(), member_ty));
        }
        if member_name.is_empty() {
            if let Some((bits, t)) = find_member(btf, &member_ty, name) {
                return Some((m.bit_offset() + bits, t));
            }
        }
    }
    None
}

fn strip(btf: &Btf, mut ty: Type) -> Type {
    for _ in 0..8 {
        match &ty {
            Type::Typedef(_)
            | Type::Const(_)
            | Type::Volatile(_)
            | Type::Restrict(_)
            | Type::TypeTag(_) => {
                match ty
                    .as_btf_type()
                    .and_then(|t| btf.resolve_chained_type(t).ok())
                {
                    Some(next) => ty = next,
                    None => return ty,
                }
            }
            _ => return ty,
        }
    }
    ty
}

/// The prototype of a function defined in `btf` itself (for split BTF: not its base).
fn func_proto(btf: &Btf, name: &str) -> Option<btf_rs::FuncProto> {
    btf.resolve_types_by_name(name)
        .ok()?
        .into_iter()
        .find_map(|t| match t {
            Type::Func(f) => match btf.resolve_chained_type(&f).ok()? {
                Type::FuncProto(p) => Some(p),
                _ => None,
            },
            _ => None,
        })
}

/// Every enum of a BTF object (for split BTF the module's, then the base's), as (name, value)
/// lists.
fn enums(btf: &Btf) -> impl Iterator<Item = Vec<(String, u32)>> + '_ {
    let mut iter = btf.type_iter();
    std::iter::from_fn(move || loop {
        match iter.next() {
            Ok(Some(Type::Enum(e))) => {
                return Some(
                    e.members
                        .iter()
                        .filter_map(|m| Some((btf.resolve_name(m).ok()?, m.val())))
                        .collect(),
                )
            }
            Ok(Some(_)) => continue,
            _ => return None,
        }
    })
}

trait Windows {
    fn with_windows(self) -> Self;
}

impl Windows for Offsets {
    /// Adds the read windows (see `agent_ebpf::Offsets::skb_window`).
    fn with_windows(mut self) -> Self {
        self.skb_window = KernelBtf::window(
            &[
                (self.skb_len, 4),
                (self.skb_dev, 8),
                (self.skb_protocol, 2),
                (self.skb_head, 8),
                (self.skb_network_header, 2),
                (self.skb_iif, 4),
            ],
            agent_ebpf::SKB_WINDOW,
        );
        self.dev_window = KernelBtf::window(
            &[(self.dev_ifindex, 4), (self.dev_nd_net, 8)],
            agent_ebpf::DEV_WINDOW,
        );
        self
    }
}

/// Netfilter hook and family numbers -> names, for what the nf_hook_slow probe reports.
#[derive(Debug, Clone, Default)]
pub struct NetfilterNames {
    hooks: HashMap<u32, &'static str>,
    families: HashMap<u32, &'static str>,
}

impl NetfilterNames {
    /// The protocol family ("ipv4", "ipv6", "bridge", "arp", ...).
    pub fn family(&self, pf: u8) -> Option<&'static str> {
        self.families.get(&u32::from(pf)).copied()
    }

    /// The hook, named like the chains that run in it; bridge and ARP hooks by family (their
    /// numbers mean other hooks there).
    pub fn hook(&self, pf: u8, hook: u8) -> Option<&'static str> {
        match self.family(pf)? {
            "bridge" => Some("bridge"),
            "arp" => Some("arp"),
            "netdev" => Some("ingress"),
            _ => self.hooks.get(&u32::from(hook)).copied(),
        }
    }
}

/// Drop-reason numbers <-> names for the running kernel.
#[derive(Debug, Clone, Default)]
pub struct DropReasons {
    by_value: HashMap<u32, String>,
    by_name: HashMap<String, u32>,
    subsystems: HashMap<u32, String>,
    /// The kernel has no drop reasons at all (before 5.17): every drop is [`UNKNOWN_REASON`].
    absent: bool,
}

/// The reason of every drop on a kernel that gives none. Kernel names are the enum's members
/// without `SKB_DROP_REASON_`, and no kernel has an `SKB_DROP_REASON_UNKNOWN`, so rules can
/// ask for it without matching a drop a kernel did explain.
pub const UNKNOWN_REASON: &str = "UNKNOWN";

/// What a kernel without drop reasons gives up, for the start-up line and the attach record.
pub const NO_REASONS: &str = "this kernel reports no drop reasons (enum skb_drop_reason is missing; kernels before 5.17): causes come from the drop's location and context only, the rest is unclassified";

/// Reasons carry the subsystem in their upper 16 bits (6.4+).
pub const SUBSYS_SHIFT: u32 = 16;

impl DropReasons {
    /// Builds the table from BTF enum members, shortening `SKB_DROP_REASON_X` to `X`.
    pub fn new(values: Vec<(String, u32)>, subsystems: Vec<(String, u32)>) -> Self {
        let mut r = DropReasons::default();
        for (name, value) in values {
            let short = name
                .strip_prefix("SKB_DROP_REASON_")
                .unwrap_or(&name)
                .to_string();
            if short == "MAX" || short.starts_with("SUBSYS_") {
                continue;
            }
            r.by_name.insert(short.clone(), value);
            r.by_value.entry(value).or_insert(short);
        }
        for (name, value) in subsystems {
            if let Some(short) = name.strip_prefix("SKB_DROP_REASON_SUBSYS_") {
                if short != "NUM" && short != "CORE" {
                    r.subsystems.insert(value, short.to_string());
                }
            }
        }
        r
    }

    /// The table of a kernel that gives no reasons: every value is named [`UNKNOWN_REASON`].
    pub fn absent() -> Self {
        DropReasons {
            absent: true,
            ..Default::default()
        }
    }

    /// Whether the kernel gives no drop reasons.
    pub fn is_absent(&self) -> bool {
        self.absent
    }

    /// The value this kernel uses for a reason name.
    #[cfg(test)]
    pub fn value(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    /// The name of a reason value: the core name, `SUBSYS:index` for subsystem reasons this
    /// kernel's BTF does not name, or the raw number.
    pub fn name(&self, value: u32) -> String {
        if self.absent {
            // The programs pass 0 there; it is not NOT_SPECIFIED, which such kernels lack too.
            return UNKNOWN_REASON.to_string();
        }
        let subsys = value >> SUBSYS_SHIFT;
        if let Some(name) = self.by_value.get(&value) {
            return name.clone();
        }
        if subsys != 0 {
            let sub = self
                .subsystems
                .get(&subsys)
                .map(String::as_str)
                .unwrap_or("SUBSYS");
            return format!("{sub}:{}", value & 0xffff);
        }
        format!("REASON_{value}")
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Names subsystem reasons from module enums. A subsystem's enum starts with a marker
    /// member (`__OVS_DROP_REASON = SUBSYS << 16`); its other members are the full values.
    pub fn add_subsystem_names(
        &mut self,
        enums: impl Iterator<Item = Vec<(String, u32)>>,
        ids: &[u32],
    ) {
        for members in enums {
            let marker = members.iter().find(|(n, v)| {
                n.starts_with("__") && v & 0xffff == 0 && ids.contains(&(v >> SUBSYS_SHIFT))
            });
            let Some((_, base)) = marker else { continue };
            let id = base >> SUBSYS_SHIFT;
            for (name, value) in &members {
                if value >> SUBSYS_SHIFT == id && value & 0xffff != 0 && !name.starts_with("__") {
                    self.by_value.insert(*value, name.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel() -> KernelBtf {
        KernelBtf::open(Path::new("/sys/kernel/btf/vmlinux")).expect("this machine has BTF")
    }

    #[test]
    fn resolves_every_offset_the_programs_use() {
        let k = kernel();
        let o = k.offsets();
        // Structs of modules (nf_tables, x_tables) may be missing from vmlinux's BTF.
        let in_modules = ["nft_pktinfo", "nft_chain", "nft_table", "xt_table"];
        for (st, path) in Offsets::FROM_BTF {
            if !in_modules.contains(st) {
                assert!(k.offset_of(st, path).is_some(), "{st}.{path} not found in BTF");
            }
        }
        assert_ne!(o.sk_net, ABSENT);
        assert_ne!(o.dev_nd_net, ABSENT);
        // On 6.18 the hot fields fit one read each.
        assert_ne!(o.skb_window, ABSENT);
        assert_ne!(o.dev_window, ABSENT);
        // Stable since the devconf enum was introduced: FORWARDING=1, RP_FILTER=8.
        assert_eq!(o.devconf_idx_forwarding, 0);
        assert_eq!(o.devconf_idx_rp_filter, 7);
    }

    #[test]
    fn offsets_agree_with_independent_pahole_style_reading() {
        // Cross-check against bpftool's own BTF dump (installed by `cargo xtask`).
        let out = std::process::Command::new("bpftool")
            .args([
                "btf",
                "dump",
                "file",
                "/sys/kernel/btf/vmlinux",
                "format",
                "raw",
            ])
            .output()
            .expect("bpftool is needed for this cross-check (cargo xtask setup installs it)");
        let text = String::from_utf8_lossy(&out.stdout);
        // "[N] STRUCT 'net_device' size=..." followed by "'mtu' type_id=.. bits_offset=X".
        let start = text
            .find("STRUCT 'net_device' size=")
            .expect("net_device in dump");
        let body = &text[start..];
        let end = body[1..].find("\n[").map(|i| i + 1).unwrap_or(body.len());
        let line = body[..end]
            .lines()
            .find(|l| l.trim_start().starts_with("'mtu' "))
            .unwrap();
        let bits: u32 = line
            .split("bits_offset=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(kernel().offset_of("net_device", "mtu"), Some(bits / 8));
    }

    #[test]
    fn reason_names_come_from_the_running_kernel() {
        let reasons = kernel().drop_reasons(Path::new("/sys/kernel/btf")).unwrap();
        assert!(reasons.len() > 50);
        for name in [
            "NOT_SPECIFIED",
            "NO_SOCKET",
            "NETFILTER_DROP",
            "IP_RPFILTER",
            "PKT_TOO_BIG",
        ] {
            let v = reasons
                .value(name)
                .unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(reasons.name(v), name);
        }
        // Tracefs prints the same table; compare one entry when it is mounted.
        if let Ok(fmt) = std::fs::read_to_string("/sys/kernel/tracing/events/skb/kfree_skb/format")
        {
            let v = reasons.value("NETFILTER_DROP").unwrap();
            assert!(
                fmt.contains(&format!("{{ {v}, \"NETFILTER_DROP\" }}")),
                "tracefs disagrees"
            );
        }
    }

    #[test]
    fn a_kernel_without_reasons_names_every_drop_unknown() {
        let r = DropReasons::absent();
        assert!(r.is_absent() && r.len() == 0);
        // 0 is what the programs pass there; no number may become a kernel reason name.
        for v in [0, 1, 2, 77] {
            assert_eq!(r.name(v), UNKNOWN_REASON);
        }
        assert!(
            !DropReasons::new(vec![("SKB_DROP_REASON_NO_SOCKET".into(), 3)], vec![]).is_absent()
        );
    }

    #[test]
    fn subsystem_reasons_are_never_confused_with_core_ones() {
        let r = DropReasons::new(
            vec![("SKB_DROP_REASON_NO_SOCKET".into(), 3)],
            vec![("SKB_DROP_REASON_SUBSYS_OPENVSWITCH".into(), 2)],
        );
        assert_eq!(r.name(3), "NO_SOCKET");
        assert_eq!(r.name((2 << 16) | 3), "OPENVSWITCH:3");
        assert_eq!(r.name((9 << 16) | 1), "SUBSYS:1");
        assert_eq!(r.name(999), "REASON_999");
    }

    #[test]
    fn subsystem_reasons_are_named_from_module_enums() {
        let mut r = DropReasons::new(
            vec![],
            vec![("SKB_DROP_REASON_SUBSYS_OPENVSWITCH".into(), 2)],
        );
        let ovs = vec![
            ("__OVS_DROP_REASON".to_string(), 2 << 16),
            ("OVS_DROP_LAST_ACTION".to_string(), (2 << 16) | 1),
            ("OVS_DROP_ACTION_ERROR".to_string(), (2 << 16) | 2),
            ("OVS_DROP_MAX".to_string(), (2 << 16) | 3),
        ];
        // An unrelated enum with similar-looking values is ignored (no marker).
        let other = vec![("SOME_FLAG".to_string(), (2 << 16) | 1)];
        r.add_subsystem_names([other, ovs].into_iter(), &[2]);
        assert_eq!(r.name((2 << 16) | 2), "OVS_DROP_ACTION_ERROR");
        assert_eq!(r.name((2 << 16) | 9), "OPENVSWITCH:9");
    }

    #[test]
    fn kfree_skb_tracepoint_arguments_are_detected() {
        // 6.11+: (skb, location, reason, rx_sk)
        assert!(kernel().tracepoint_args("kfree_skb").unwrap() >= 3);
    }

    #[test]
    fn netfilter_hooks_and_families_are_named_from_btf() {
        let names = kernel().netfilter_names();
        // uapi values: NFPROTO_IPV4=2, NFPROTO_IPV6=10, NFPROTO_BRIDGE=7; NF_INET_* 0..4.
        assert_eq!(names.family(2), Some("ipv4"));
        assert_eq!(names.family(10), Some("ipv6"));
        let hooks: Vec<_> = (0..5).map(|h| names.hook(10, h)).collect();
        assert_eq!(
            hooks,
            ["prerouting", "input", "forward", "output", "postrouting"].map(Some)
        );
        assert_eq!(names.hook(7, 2), Some("bridge"));
        assert_eq!(
            names.hook(99, 2),
            None,
            "unknown family: unnamed, not guessed"
        );
    }

    #[test]
    fn probe_struct_offsets_and_function_homes_resolve() {
        let k = kernel();
        let o = k.offsets();
        for (name, v) in [
            ("nf_state_hook", o.nf_state_hook),
            ("nf_state_pf", o.nf_state_pf),
            ("nf_state_in", o.nf_state_in),
            ("nf_state_out", o.nf_state_out),
            ("nft_pktinfo_skb", o.nft_pktinfo_skb),
            ("nft_chain_table", o.nft_chain_table),
            ("nft_chain_name", o.nft_chain_name),
            ("nft_table_name", o.nft_table_name),
            ("xt_table_name", o.xt_table_name),
            ("dst_error", o.dst_error),
        ] {
            assert_ne!(v, ABSENT, "{name} not found in BTF");
        }
        assert_eq!(k.function_home("nf_hook_slow"), FunctionHome::Vmlinux);
        assert_eq!(
            k.function_home("no_such_function_here"),
            FunctionHome::Missing
        );
    }

    #[test]
    fn missing_btf_is_a_clear_error() {
        let err = KernelBtf::open(Path::new("/nonexistent/vmlinux"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
    }
}
