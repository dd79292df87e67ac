//! Faults the integration tests inject into a running session, to check what an operator
//! would see if the observe loop got stuck or crashed with the probes attached:
//! `DROPSCOPE_FAULT=stall=SECS@AFTER` blocks the loop for SECS seconds (as a read that does
//! not return would) at its first tick AFTER seconds after attaching, and
//! `DROPSCOPE_FAULT=panic@AFTER` panics there (`@AFTER` may be left out: at once).
//! Undocumented on purpose; without the variable nothing happens.
use std::time::{Duration, Instant};

#[derive(Debug, PartialEq)]
enum Kind {
    Stall(Duration),
    Panic,
}

/// A fault to strike once, `after` the loop started.
#[derive(Debug, PartialEq)]
pub struct Fault {
    kind: Option<Kind>,
    after: Duration,
    since: Instant,
}

impl Fault {
    /// The fault asked for in the environment, if any, counting from now.
    pub fn from_env() -> Self {
        let value = std::env::var("DROPSCOPE_FAULT").unwrap_or_default();
        Self::parse(&value, Instant::now())
    }

    fn parse(value: &str, since: Instant) -> Self {
        let secs = |s: &str| {
            s.parse::<f64>()
                .ok()
                .and_then(|v| Duration::try_from_secs_f64(v).ok())
        };
        let (what, after) = match value.split_once('@') {
            Some((what, after)) => (what, secs(after)),
            None => (value, Some(Duration::ZERO)),
        };
        let kind = match what.split_once('=') {
            None if what == "panic" => Some(Kind::Panic),
            Some(("stall", s)) => secs(s).map(Kind::Stall),
            _ => None,
        };
        match (kind, after) {
            (Some(kind), Some(after)) => Fault {
                kind: Some(kind),
                after,
                since,
            },
            _ => Fault {
                kind: None,
                after: Duration::ZERO,
                since,
            },
        }
    }

    /// Called by the observe loop after each tick; the fault strikes once, when due.
    pub fn strike(&mut self) {
        if self.kind.is_none() || self.since.elapsed() < self.after {
            return;
        }
        match self.kind.take() {
            Some(Kind::Stall(d)) => std::thread::sleep(d),
            Some(Kind::Panic) => panic!("DROPSCOPE_FAULT=panic"),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_known_faults_are_recognised() {
        let t = Instant::now();
        let f = |v| Fault::parse(v, t);
        assert_eq!(f("panic").kind, Some(Kind::Panic));
        assert_eq!(f("panic@2").after, Duration::from_secs(2));
        let stall = f("stall=1.5@0.5");
        assert_eq!(stall.kind, Some(Kind::Stall(Duration::from_millis(1500))));
        assert_eq!(stall.after, Duration::from_millis(500));
        for other in [
            "", "stall", "stall=-1", "stall=x", "panic=1", "panic@x", "crash",
        ] {
            assert_eq!(f(other).kind, None, "{other}");
        }
        let mut once = f("stall=0");
        once.strike();
        assert_eq!(once.kind, None, "strikes once");
        let mut later = f("stall=0@3600");
        later.strike();
        assert!(later.kind.is_some(), "not before it is due");
    }
}
