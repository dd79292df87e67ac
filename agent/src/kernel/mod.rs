//! Everything that depends on the running kernel: BTF, symbols, tracefs, privileges, attaching.
pub mod agg;
pub mod attach;
pub mod btf;
pub mod context_probes;
pub mod kallsyms;
pub mod loader_btf;
pub mod preflight;
pub mod tracefs;
