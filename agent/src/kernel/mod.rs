//! Everything that depends on the running kernel: BTF, symbols, tracefs, privileges, attaching.
pub mod btf;
