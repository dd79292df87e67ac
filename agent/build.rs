//! Builds the eBPF programs (agent-ebpf's binary) for the bpf target and leaves the object in
//! OUT_DIR, from where the agent embeds it: the release binary is self-contained.
fn main() -> anyhow::Result<()> {
    // aya-build runs a nested `cargo build` and relays every line it writes to stderr as a
    // build-script warning, including cargo's progress lines ("Compiling core", "Finished"):
    // a fresh build would print dozens of warnings that are not warnings. Quiet cargo prints
    // no progress; compiler diagnostics still arrive (as JSON on stdout) and are still shown.
    // The build script is single-threaded here; the nested cargo inherits the variable.
    std::env::set_var("CARGO_TERM_QUIET", "true");
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf");
    let package = aya_build::Package {
        name: "agent-ebpf",
        root_dir: root,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
