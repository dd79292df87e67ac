//! `--pcap FILE`: every reported drop's packet, written as it arrives.
//!
//! A regular file starts with a section header block padded to a fixed size; at the end it
//! is rewritten in place with the final per-cause counts, so the file is complete and valid
//! after SIGINT, SIGTERM or `--duration`. Standard output (`-`) cannot be rewritten: there
//! the counts go into an interface statistics block at the end. A failed write (a full disk)
//! ends the session with an error: the file is never silently short.
use std::{
    collections::HashMap,
    fs::File,
    io::{BufWriter, Seek, SeekFrom, Write},
    sync::Arc,
};

use anyhow::{anyhow, Context, Result};

use super::{os, pcapng, Entries, Interface, Packet, PacketTap, Totals};
use crate::{
    causes::Verdict,
    events::{Answer, DropEvent},
    output::{Clock, Summary},
};

/// Room for the section header, rewritten at the end with the counts per cause.
const HEADER_ROOM: usize = 16 * 1024;

/// A regular file is written block by block (so that after a failed write it can be cut
/// back to its last complete block); standard output through a buffer flushed per batch.
enum Out {
    File { file: File, committed: u64 },
    Stdout(BufWriter<std::io::Stdout>),
}

pub struct PcapFile {
    target: String,
    out: Out,
    snaplen: u32,
    entries: Entries,
    interfaces: HashMap<Interface, u32>,
    written: HashMap<String, u64>,
    /// Packets written per interface (index).
    per_interface: Vec<u64>,
    first_ts: Option<u64>,
    last_ts: u64,
    header: String,
    /// The first write error; the session ends with it.
    error: Option<String>,
}

impl PcapFile {
    /// Creates (truncates) `target`, or writes to standard output for `-`, and writes the
    /// section header. `about` describes the session (filters, sampling) for its comment.
    pub fn create(target: &str, snaplen: u32, about: &str) -> Result<Self> {
        let header = format!(
            "Packets dropped by the Linux kernel, written by dropscope {} (snaplen {snaplen}). {about}",
            env!("CARGO_PKG_VERSION")
        );
        let out = if target == "-" {
            Out::Stdout(BufWriter::new(std::io::stdout()))
        } else {
            let file =
                File::create(target).with_context(|| format!("cannot create --pcap {target}"))?;
            Out::File { file, committed: 0 }
        };
        let mut f = PcapFile {
            target: target.to_string(),
            out,
            snaplen,
            entries: Entries::new(Clock::new()),
            interfaces: HashMap::new(),
            written: HashMap::new(),
            per_interface: Vec::new(),
            first_ts: None,
            last_ts: 0,
            header,
            error: None,
        };
        let (comment, room) = match f.out {
            Out::File { .. } => (
                format!(
                    "{} Counts per cause are written here when dropscope stops.",
                    f.header
                ),
                Some(HEADER_ROOM),
            ),
            Out::Stdout(_) => (
                format!(
                    "{} Counts per cause are in the interface statistics block at the end.",
                    f.header
                ),
                None,
            ),
        };
        let shb = pcapng::section_header(&comment, &os(), &application(), room)
            .ok_or_else(|| anyhow!("section header too large"))?;
        f.write(&shb)
            .with_context(|| format!("writing --pcap {target}"))?;
        f.flush()?;
        Ok(f)
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match &mut self.out {
            Out::File { file, committed } => {
                file.write_all(bytes)?;
                *committed += bytes.len() as u64;
                Ok(())
            }
            Out::Stdout(w) => w.write_all(bytes),
        }
    }

    fn fail(&mut self, e: std::io::Error) {
        if self.error.is_none() {
            let written: u64 = self.written.values().sum();
            self.error = Some(format!(
                "writing --pcap {}: {e} (stopped after {written} packets)",
                self.target
            ));
        }
    }

    fn interface(&mut self, i: &Interface) -> std::io::Result<u32> {
        if let Some(&id) = self.interfaces.get(i) {
            return Ok(id);
        }
        let id = self.interfaces.len() as u32;
        self.write(&i.block(self.snaplen))?;
        self.interfaces.insert(i.clone(), id);
        self.per_interface.push(0);
        Ok(id)
    }

    /// Rewrites the section header of a regular file in place, with `comment`.
    fn rewrite_header(
        file: &mut File,
        header: &str,
        comment: &str,
        written: u64,
    ) -> std::io::Result<()> {
        let shb = pcapng::section_header(comment, &os(), &application(), Some(HEADER_ROOM))
            .or_else(|| {
                // Too much to list in the room reserved: keep the total.
                let short = format!("{header} {written} packets written.");
                pcapng::section_header(&short, &os(), &application(), Some(HEADER_ROOM))
            })
            .expect("the short header fits");
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&shb)?;
        file.sync_data()
    }
}

/// `shb_userappl`.
fn application() -> String {
    format!("dropscope {}", env!("CARGO_PKG_VERSION"))
}

impl PacketTap for PcapFile {
    fn packet(
        &mut self,
        d: &DropEvent,
        packet: Option<&Arc<Packet>>,
        v: &Verdict,
        answer: Option<Answer>,
        netns_name: &mut dyn FnMut(u32) -> Option<String>,
    ) {
        let Some(packet) = packet else { return };
        if self.error.is_some() {
            return;
        }
        let entry = self.entries.entry(d, packet, v, answer, netns_name);
        let result = self.interface(&entry.interface).and_then(|id| {
            self.write(&entry.block(id))?;
            Ok(id)
        });
        match result {
            Ok(id) => {
                *self.written.entry(entry.cause.clone()).or_default() += 1;
                self.per_interface[id as usize] += 1;
                self.first_ts.get_or_insert(entry.ts_ns);
                self.last_ts = self.last_ts.max(entry.ts_ns);
            }
            Err(e) => self.fail(e),
        }
    }

    fn snaplen(&self) -> u32 {
        self.snaplen
    }

    fn target(&self) -> String {
        self.target.clone()
    }

    fn flush(&mut self) -> Result<()> {
        if let Out::Stdout(w) = &mut self.out {
            if let Err(e) = w.flush() {
                self.fail(e);
            }
        }
        match &self.error {
            Some(e) => Err(anyhow!("{e}")),
            None => Ok(()),
        }
    }

    fn finish(&mut self, summary: &Summary) -> Result<Option<Totals>> {
        let totals = Totals::new(&self.target, self.snaplen, &self.written, summary);
        let mut comment = format!(
            "{} {} packets written. Dropped packets per cause, written of total: {}.",
            self.header,
            totals.written,
            totals.text()
        );
        if self.interfaces.is_empty() && self.error.is_none() {
            let block = super::no_interface_block(self.snaplen);
            if let Err(e) = self.write(&block) {
                self.fail(e);
            }
            self.per_interface.push(0);
        }
        let _ = self.flush();
        if let Some(e) = &self.error {
            comment = format!("{} Writing stopped early: {e}.", self.header);
        }
        let (start, end) = (self.first_ts.unwrap_or(0), self.last_ts);
        let result = match &mut self.out {
            Out::File { file, committed } => {
                // After a failed write, cut the file back to its last complete block.
                let cut = match self.error {
                    Some(_) => file.set_len(*committed),
                    None => Ok(()),
                };
                cut.and_then(|_| Self::rewrite_header(file, &self.header, &comment, totals.written))
            }
            Out::Stdout(w) => {
                let mut blocks = Vec::new();
                for (i, n) in self.per_interface.iter().enumerate() {
                    let text = if i == 0 { comment.as_str() } else { "" };
                    blocks.extend(pcapng::statistics(i as u32, start, end, *n, text));
                }
                w.write_all(&blocks).and_then(|_| w.flush())
            }
        };
        if let Some(e) = &self.error {
            return Err(anyhow!("{e}"));
        }
        result.with_context(|| format!("writing --pcap {}", self.target))?;
        Ok(Some(totals))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{capture::pcapng, output::DropRecord};
    use agent_ebpf::PacketHead;

    #[test]
    fn the_header_is_rewritten_in_place_with_the_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.pcapng");
        let mut f = PcapFile::create(path.to_str().unwrap(), 128, "filter: none.").unwrap();
        let rec = DropRecord::example("no_listener", 1, None);
        let mut ip = vec![
            0x45, 0, 0, 28, 0, 1, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 9, 0, 1,
        ];
        ip.extend_from_slice(&[0x9c, 0x40, 0, 80, 0, 8, 0, 0]);
        let packet = Arc::new(Packet {
            head: PacketHead {
                start: 80,
                mac: u16::MAX,
                network: 80,
                caplen: 28,
                data: 100,
                headlen: 8,
            },
            l3_proto: 0x0800,
            bytes: ip,
        });
        for _ in 0..3 {
            f.packet(&rec.drop, Some(&packet), &rec.verdict, None, &mut |_| {
                Some("dr-b".into())
            });
        }
        f.packet(&rec.drop, None, &rec.verdict, None, &mut |_| None);
        let mut summary = Summary::default();
        let totals = crate::pipeline::CauseTotals {
            count: 10,
            ..Default::default()
        };
        summary.causes.push(("no_listener".into(), totals));
        let t = f.finish(&summary).unwrap().unwrap();
        assert_eq!((t.written, t.causes[0].1, t.causes[0].2), (3, 10, 3));
        let bytes = std::fs::read(&path).unwrap();
        let blocks = pcapng::blocks(&bytes);
        assert_eq!(
            blocks.len(),
            1 + 1 + 3,
            "header, one interface, three packets"
        );
        assert_eq!(blocks[0].1.len() + 12, HEADER_ROOM);
        let comment = String::from_utf8(pcapng::options(&blocks[0].1, 16)[0].1.clone()).unwrap();
        assert!(comment.contains("no_listener 3 of 10"), "{comment}");
        let name = String::from_utf8(pcapng::options(&blocks[1].1, 8)[0].1.clone()).unwrap();
        assert_eq!(name, "r0@dr-b (no link-layer header)");
    }
}
