//! From a kernel drop to an operator cause: the rule table (`rules.toml`), the facts it can
//! test, and the engine that applies it.
pub mod catalogue;
pub mod engine;
pub mod facts;
pub mod table;

pub use engine::{Attribution, Engine, Verdict};
pub use facts::Facts;
