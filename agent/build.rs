//! Builds the eBPF programs (agent-ebpf's binary) for the bpf target and leaves the object in
//! OUT_DIR, from where the agent embeds it: the release binary is self-contained.
fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf");
    let package = aya_build::Package {
        name: "agent-ebpf",
        root_dir: root,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
