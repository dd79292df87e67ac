//! `serve`'s flight recorder: the last dropped packets, bounded in packets and in bytes,
//! downloadable as pcapng (`GET /packets.pcapng` on the metrics listener), so that after an
//! alert the packets of the last minutes can be fetched without having been recording.
use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use super::{os, pcapng, Entries, Entry, Interface, Packet, PacketTap, Totals};
use crate::{
    causes::Verdict,
    events::{Answer, DropEvent},
    output::{Clock, Summary},
};

/// Default number of packets kept (the default memory bound, 4 MiB, is in the CLI).
pub const DEFAULT_PACKETS: usize = 4096;

/// The packets kept, oldest first.
pub struct Ring {
    max_packets: usize,
    max_bytes: usize,
    snaplen: u32,
    bytes: usize,
    entries: VecDeque<Entry>,
    /// Packets recorded since the start, and how many of them were evicted since.
    recorded: u64,
    evicted: u64,
}

impl Ring {
    pub fn new(max_packets: usize, max_bytes: usize, snaplen: u32) -> Self {
        Ring {
            max_packets,
            max_bytes,
            snaplen,
            bytes: 0,
            entries: VecDeque::new(),
            recorded: 0,
            evicted: 0,
        }
    }

    pub fn push(&mut self, e: Entry) {
        if self.max_packets == 0 || e.size() > self.max_bytes {
            return;
        }
        self.bytes += e.size();
        self.entries.push_back(e);
        self.recorded += 1;
        while self.entries.len() > self.max_packets || self.bytes > self.max_bytes {
            let Some(old) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= old.size();
            self.evicted += 1;
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Bytes the kept packets use, as counted against the bound.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The kept packets as a pcapng file.
    pub fn pcapng(&self) -> Vec<u8> {
        let mut per_cause: Vec<(String, u64)> = Vec::new();
        for e in &self.entries {
            match per_cause.iter_mut().find(|(c, _)| *c == e.cause) {
                Some((_, n)) => *n += 1,
                None => per_cause.push((e.cause.clone(), 1)),
            }
        }
        let causes = if per_cause.is_empty() {
            "none".to_string()
        } else {
            per_cause
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let comment = format!(
            "The last {} packets dropped by the Linux kernel, kept by dropscope {} serve's flight recorder \
             (at most {} packets and {} bytes, snaplen {}): {} recorded since it started, {} older ones evicted. \
             Per cause: {causes}. Drops sampled away in the kernel were never recorded.",
            self.entries.len(),
            env!("CARGO_PKG_VERSION"),
            self.max_packets,
            self.max_bytes,
            self.snaplen,
            self.recorded,
            self.evicted,
        );
        let app = format!("dropscope {} serve", env!("CARGO_PKG_VERSION"));
        let mut out = pcapng::section_header(&comment, &os(), &app, None).unwrap_or_default();
        let mut ids: HashMap<&Interface, u32> = HashMap::new();
        for e in &self.entries {
            let id = match ids.get(&e.interface) {
                Some(&id) => id,
                None => {
                    let id = ids.len() as u32;
                    out.extend(e.interface.block(self.snaplen));
                    ids.insert(&e.interface, id);
                    id
                }
            };
            out.extend(e.block(id));
        }
        if ids.is_empty() {
            out.extend(super::no_interface_block(self.snaplen));
        }
        out
    }
}

/// The tap side: turns drops into entries of a shared [`Ring`].
pub struct Recorder {
    url: String,
    ring: Arc<Mutex<Ring>>,
    entries: Entries,
    snaplen: u32,
    written: HashMap<String, u64>,
}

impl Recorder {
    /// A recorder whose packets are served at `url`.
    pub fn new(max_packets: usize, max_bytes: usize, snaplen: u32, url: String) -> Self {
        Recorder {
            url,
            ring: Arc::new(Mutex::new(Ring::new(max_packets, max_bytes, snaplen))),
            entries: Entries::new(Clock::new()),
            snaplen,
            written: HashMap::new(),
        }
    }

    /// The same recorder, served at `url` (known once the endpoint listens).
    pub fn served_at(self, url: String) -> Self {
        Recorder { url, ..self }
    }

    /// The ring, for the endpoint.
    pub fn ring(&self) -> Arc<Mutex<Ring>> {
        self.ring.clone()
    }
}

impl PacketTap for Recorder {
    fn packet(
        &mut self,
        d: &DropEvent,
        packet: Option<&Arc<Packet>>,
        v: &Verdict,
        answer: Option<Answer>,
        netns_name: &mut dyn FnMut(u32) -> Option<String>,
    ) {
        let Some(packet) = packet else { return };
        let entry = self.entries.entry(d, packet, v, answer, netns_name);
        *self.written.entry(entry.cause.clone()).or_default() += 1;
        if let Ok(mut ring) = self.ring.lock() {
            ring.push(entry);
        }
    }

    fn snaplen(&self) -> u32 {
        self.snaplen
    }

    fn target(&self) -> String {
        self.url.clone()
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        Ok(())
    }

    fn finish(&mut self, summary: &Summary) -> anyhow::Result<Option<Totals>> {
        Ok(Some(Totals::new(
            &self.url,
            self.snaplen,
            &self.written,
            summary,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::pcapng;

    fn entry(i: u64, cause: &str) -> Entry {
        Entry {
            interface: Interface {
                ifname: Some(format!("r{}", i % 2)),
                ifindex: 2,
                netns: 7,
                netns_name: None,
                real_link_header: true,
            },
            cause: cause.into(),
            ts_ns: 1_000 + i,
            frame: vec![0; 60],
            orig_len: 60,
            comment: format!("cause={cause}; n={i}"),
            direction: None,
        }
    }

    #[test]
    fn keeps_the_last_packets_within_both_bounds() {
        let mut r = Ring::new(5, 1 << 20, 128);
        for i in 0..12 {
            r.push(entry(i, "no_listener"));
        }
        assert_eq!(r.len(), 5);
        let file = r.pcapng();
        let blocks = pcapng::blocks(&file);
        let packets: Vec<_> = blocks.iter().filter(|(k, _)| *k == 6).collect();
        assert_eq!(packets.len(), 5);
        let first =
            String::from_utf8(pcapng::options(&packets[0].1, 20 + 60)[0].1.clone()).unwrap();
        assert!(
            first.ends_with("n=7"),
            "the oldest kept is the 8th: {first}"
        );
        assert_eq!(
            blocks.iter().filter(|(k, _)| *k == 1).count(),
            2,
            "two interfaces"
        );
        let shb = String::from_utf8(pcapng::options(&blocks[0].1, 16)[0].1.clone()).unwrap();
        assert!(
            shb.contains("12 recorded since it started, 7 older ones evicted"),
            "{shb}"
        );

        let one = entry(0, "x").size();
        let mut r = Ring::new(1000, one * 3 + one / 2, 128);
        for i in 0..10 {
            r.push(entry(i, "x"));
        }
        assert_eq!(r.len(), 3, "bounded in bytes");
        assert!(r.bytes() <= one * 3 + one / 2);
    }
}
